//! The VM process's end of the control channel ([`crate::control`]): carries out what the
//! front end (the Firecracker personality, or `bulkhead snapshot` through `--control-socket`)
//! asks of the running VM. A request it can not carry out (an unknown message, a disk index out
//! of range, a file that is not a disk, a snapshot of a running VM) is refused with its answer,
//! never trusted.
//!
//! The channel is either a connected socket the front end holds the other end of, or a
//! listening socket (`--control-socket`): the VMM then takes one connection at a time, from the
//! user that started the VM or root only.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::control::{self, Answer, ControlError, Request};
use crate::devices::legacy::I8042;
use crate::devices::virtio::block::DiskHandle;
use crate::devices::virtio::shared::DeviceShared;
use crate::devices::virtio::VirtioWorker;
use crate::snapshot::{self, CreateError, Sources};
use crate::vstate::pause::PauseError;
use crate::vstate::vm::VmError;

/// How long a pause waits for every vCPU to leave KVM_RUN.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where requests come from.
enum Channel {
    Connected(UnixStream),
    /// A listening socket, its current connection, and who may connect.
    Listening {
        listener: UnixListener,
        peer: Option<UnixStream>,
        owner: u32,
    },
}

/// What the snapshot requests act on, filled in when the VM starts running.
pub struct Running {
    pub sources: Sources,
    pub workers: Vec<Arc<Mutex<VirtioWorker>>>,
    /// Each vCPU thread's id, to kick out of KVM_RUN for a pause.
    pub vcpu_threads: Vec<libc::pid_t>,
}

/// What the control channel acts on.
pub struct Control {
    channel: Channel,
    pub i8042: Arc<I8042>,
    /// Each disk's handle and its device, in the guest's order.
    pub disks: Vec<(DiskHandle, Arc<DeviceShared>)>,
    pub running: Option<Running>,
    /// A disk's backing file was swapped: the settings a snapshot keeps would name the old one,
    /// so snapshots are refused from then on.
    disk_swapped: std::sync::atomic::AtomicBool,
    /// The dirty pages the last snapshot took, until the front end says its files are kept
    /// ([`Request::SnapshotKept`]). A front end that could not keep them (a failed rename or
    /// fsync) or died first never says so, and the next snapshot takes these pages again: a
    /// diff made after a lost one still holds everything since the last kept snapshot.
    unkept: Mutex<Option<Vec<Vec<u64>>>>,
}

/// What the event loop must do after a control event.
#[derive(Debug)]
pub enum Served {
    /// Nothing more.
    Done,
    /// A new connection: watch this descriptor too.
    Accepted(RawFd),
    /// The connection closed: stop watching it, then drop it (in that order: the event loop
    /// can only forget a descriptor that is still open, or the number stays taken for it).
    Closed(UnixStream),
    /// The control channel itself is gone.
    Gone,
}

/// True when `fd` is a listening socket.
fn is_listener(fd: &OwnedFd) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, an int.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && value != 0
}

/// The uid of the process at the other end of `stream`.
fn peer_uid(stream: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

impl Control {
    /// The control channel on `fd`: a connected socket, or a listening one whose connections
    /// must come from `owner` (the uid that started the VM) or root.
    pub fn new(
        fd: OwnedFd,
        owner: u32,
        i8042: Arc<I8042>,
        disks: Vec<(DiskHandle, Arc<DeviceShared>)>,
    ) -> Control {
        let channel = if is_listener(&fd) {
            Channel::Listening {
                listener: UnixListener::from(fd),
                peer: None,
                owner,
            }
        } else {
            Channel::Connected(UnixStream::from(fd))
        };
        Control {
            channel,
            i8042,
            disks,
            running: None,
            disk_swapped: std::sync::atomic::AtomicBool::new(false),
            unkept: Mutex::new(None),
        }
    }

    /// The descriptor the event loop watches first.
    pub fn fd(&self) -> RawFd {
        match &self.channel {
            Channel::Connected(s) => s.as_raw_fd(),
            Channel::Listening { listener, .. } => listener.as_raw_fd(),
        }
    }

    /// Serves an event on descriptor `fd` (the channel, the listener or its connection).
    pub fn serve(&mut self, fd: RawFd) -> Served {
        if let Channel::Listening {
            listener,
            peer,
            owner,
        } = &mut self.channel
        {
            if fd == listener.as_raw_fd() {
                return match listener.accept() {
                    Ok((stream, _)) => {
                        let allowed = peer_uid(&stream).is_some_and(|u| u == *owner || u == 0);
                        if !allowed || peer.is_some() {
                            // One controller at a time, and only the VM's owner.
                            log::warn!("control socket: a connection was refused");
                            return Served::Done;
                        }
                        let raw = stream.as_raw_fd();
                        *peer = Some(stream);
                        Served::Accepted(raw)
                    }
                    Err(_) => Served::Done,
                };
            }
        }
        let stream = match &self.channel {
            Channel::Connected(s) => s,
            Channel::Listening { peer: Some(p), .. } => p,
            Channel::Listening { peer: None, .. } => return Served::Done,
        };
        let answer = match control::receive(stream) {
            Ok(None) | Err(ControlError::Io(_) | ControlError::Closed) => None,
            Err(ControlError::Malformed(_)) => Some(Answer::Unknown),
            Ok(Some((request, files))) => Some(self.carry_out(request, files)),
        };
        match answer {
            Some(answer) if control::reply(stream, answer).is_ok() => Served::Done,
            _ => self.closed(),
        }
    }

    /// The connection went away: a listener waits for the next one.
    fn closed(&mut self) -> Served {
        match &mut self.channel {
            Channel::Connected(_) => Served::Gone,
            Channel::Listening { peer, .. } => match peer.take() {
                Some(p) => Served::Closed(p),
                None => Served::Done,
            },
        }
    }

    fn carry_out(&self, request: Request, files: Vec<File>) -> Answer {
        match request {
            Request::CtrlAltDel => {
                self.i8042.ctrl_alt_del();
                Answer::Done
            }
            Request::Ping => Answer::Running {
                pid: std::process::id(),
            },
            Request::SwapDisk { index } => self.swap_disk(index, files.into_iter().next()),
            Request::Pause => self.pause(),
            Request::Resume => match &self.running {
                Some(r) => {
                    r.sources.pause.resume();
                    Answer::Done
                }
                None => Answer::Failed,
            },
            Request::Snapshot { kind } => self.snapshot(files, kind),
            Request::SnapshotKept => {
                self.unkept.lock().unwrap_or_else(|e| e.into_inner()).take();
                Answer::Done
            }
        }
    }

    fn pause(&self) -> Answer {
        let Some(running) = &self.running else {
            return Answer::Failed;
        };
        let kick = || {
            for &t in &running.vcpu_threads {
                super::kick(t);
            }
        };
        match running.sources.pause.pause(kick, PAUSE_TIMEOUT) {
            Ok(()) => {
                log::info!("the VM is paused");
                Answer::Done
            }
            Err(e) => {
                log::warn!("the VM could not be paused: {e}");
                Answer::Failed
            }
        }
    }

    fn snapshot(&self, files: Vec<File>, kind: snapshot::SnapshotKind) -> Answer {
        let Some(running) = &self.running else {
            return Answer::Failed;
        };
        let [state, mem] = files.as_slice() else {
            return Answer::NoFile;
        };
        if self.disk_swapped.load(std::sync::atomic::Ordering::Relaxed) {
            log::warn!("snapshot refused: a disk's backing file was swapped since the VM started, and a restore would open the old one");
            return Answer::Unsupported;
        }
        let started = std::time::Instant::now();
        let mut unkept = self.unkept.lock().unwrap_or_else(|e| e.into_inner());
        // The last snapshot's files were never said to be kept: its pages go back into the
        // log, for this one to take again.
        if let Some(taken) = unkept.take() {
            running.sources.vm.return_dirty_pages(&taken);
        }
        match snapshot::create(&running.sources, &running.workers, state, mem, kind) {
            Ok(done) => {
                *unkept = done.taken;
                log::info!(
                    "{kind:?} snapshot written in {:?}: state {} bytes, memory {} MiB ({} pages written, {} {} pages left as holes)",
                    started.elapsed(),
                    done.state_bytes,
                    done.memory.bytes >> 20,
                    done.memory.pages_written,
                    done.memory.pages_skipped,
                    match kind {
                        snapshot::SnapshotKind::Full => "zero",
                        snapshot::SnapshotKind::Diff => "unchanged",
                    }
                );
                Answer::Done
            }
            Err(CreateError::Pause(PauseError::NotPaused)) => Answer::NotPaused,
            Err(CreateError::Shares) => Answer::Unsupported,
            Err(CreateError::Vm(VmError::NotTracking)) => Answer::NotTracking,
            Err(e) => {
                log::warn!("snapshot failed: {e}");
                Answer::Failed
            }
        }
    }

    fn swap_disk(&self, index: u32, file: Option<File>) -> Answer {
        let disk = usize::try_from(index).ok().and_then(|i| self.disks.get(i));
        let Some((handle, device)) = disk else {
            return Answer::NoSuchDisk;
        };
        let Some(file) = file else {
            return Answer::NoFile;
        };
        match handle.swap(file, Path::new("(from the control channel)")) {
            Ok(sectors) => {
                log::info!(
                    "{}: backing file swapped ({sectors} sectors)",
                    device.name()
                );
                device.config_changed();
                self.disk_swapped
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Answer::Done
            }
            Err(e) => {
                log::warn!("{}: swap refused: {e}", device.name());
                Answer::BadFile
            }
        }
    }
}
