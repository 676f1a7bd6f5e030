//! The vsock connection broker: the supervisor connects a guest's connection to host port P
//! (the socket `uds_P`) for the VM process and hands it the connected socket, so the VM
//! process's seccomp filter holds neither `socket` nor `connect`. A VM process taken over by a
//! guest can then reach no Unix socket on the host (a container runtime's, the management
//! daemon's) and no abstract one: only sockets named `uds_P` in the directory of its own
//! `uds`, as the supervisor finds them.
//!
//! The two ends are a Unix sequenced-packet socket pair made before the VM process is forked. The VM
//! process sends a [`Request`] (a sequence number and the port) and waits, at most
//! [`REPLY_TIMEOUT`], for the answer with the same sequence number: a status, and the
//! connected socket as SCM_RIGHTS when it worked. The supervisor takes nothing from the VM
//! process but those eight bytes: the name is its own `uds` and the port as a number; the
//! socket is opened in a directory it opened itself, following no symlink, must be a socket,
//! and is connected by a thread of the supervisor's that has taken the VM process's
//! credentials for good (a jailed VM's uid and gid, no groups): the kernel's permission check
//! and the listener's SO_PEERCRED see that user, never root. At most [`CONNECTS_PER_SECOND`]
//! connections a second (after a burst as large) are made; past that the guest's connection
//! is refused, so a guest can not spend the supervisor's CPU, which its cgroup does not count.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long the VM process waits for the supervisor's answer before it refuses the guest's
/// connection.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// How long one wait for the answer lasts; the VM process waits again until
/// [`REPLY_TIMEOUT`] has passed since it asked.
const RECV_SLICE: Duration = Duration::from_millis(100);
/// Connections the broker makes a second for one VM, and at once.
pub const CONNECTS_PER_SECOND: u32 = 100;

/// A request: connect guest port `port`'s host socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub seq: u32,
    pub port: u32,
}

impl Request {
    pub fn encode(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.seq.to_le_bytes());
        b[4..].copy_from_slice(&self.port.to_le_bytes());
        b
    }

    /// Exactly eight bytes, or nothing.
    pub fn decode(bytes: &[u8]) -> Option<Request> {
        let b: &[u8; 8] = bytes.try_into().ok()?;
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(Request {
            seq: word(0),
            port: word(4),
        })
    }
}

/// The two ends: (the supervisor's, the VM process's). Sequenced packets: messages keep their
/// bounds, and the supervisor's end reads the end of the stream when the VM process is gone.
pub fn pair() -> io::Result<(UnixDatagram, UnixDatagram)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is valid for writes of two ints.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair returned two new descriptors nothing else owns; a sequenced-packet
    // socket takes the datagram type's send and receive calls.
    Ok(unsafe {
        (
            UnixDatagram::from_raw_fd(fds[0]),
            UnixDatagram::from_raw_fd(fds[1]),
        )
    })
}

/// The VM process's end.
#[derive(Debug)]
pub struct BrokerClient {
    socket: UnixDatagram,
    seq: u32,
}

impl BrokerClient {
    /// Takes over `fd`, the VM process's end (sets its receive timeout: do this before the
    /// seccomp filter is installed).
    pub fn new(fd: OwnedFd) -> io::Result<BrokerClient> {
        let socket = UnixDatagram::from(fd);
        socket.set_read_timeout(Some(RECV_SLICE))?;
        Ok(BrokerClient { socket, seq: 0 })
    }

    /// Asks for a connection to host port `port`; the connected, non-blocking socket.
    pub fn connect(&mut self, port: u32) -> io::Result<UnixStream> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.socket.send(&Request { seq, port }.encode())?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            if Instant::now() >= deadline {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            let mut answer = [0u8; 8];
            let (n, file) = match self.socket.recv_with_fd(&mut answer) {
                Ok(got) => got,
                Err(e) if matches!(e.errno(), libc::EAGAIN | libc::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            };
            let Some(reply) = Request::decode(answer.get(..n).unwrap_or(&[])) else {
                continue;
            };
            // An answer to an earlier request that timed out: its socket is dropped.
            if reply.seq != seq {
                continue;
            }
            // The status travels where the port went: 0, or the errno of the refusal.
            return match (reply.port, file) {
                // Non-blocking already: the supervisor made it so, and the flag belongs to the
                // socket, not to the descriptor.
                (0, Some(f)) => Ok(UnixStream::from(OwnedFd::from(f))),
                (0, None) => Err(io::Error::from(io::ErrorKind::InvalidData)),
                (errno, _) => Err(io::Error::from_raw_os_error(errno as i32)),
            };
        }
    }
}

/// The supervisor's end, with where the VM's host sockets are.
#[derive(Debug)]
pub struct BrokerServer {
    socket: UnixDatagram,
    /// The directory of the VM's `uds`, opened by the supervisor itself.
    dir: OwnedFd,
    dir_path: PathBuf,
    /// The file name of the VM's `uds`: a guest port P's socket is `BASE_P`.
    base: String,
    /// The user the connections are made as (a jailed VM's uid and gid).
    as_user: Option<(u32, u32)>,
    /// Whether /proc is there to connect through the opened file itself.
    proc: bool,
}

impl BrokerServer {
    /// The supervisor's end `socket`, for a VM whose `uds` is at `uds` (as the host sees it),
    /// connecting as `as_user` when given. Opens the socket directory now, before the
    /// supervisor's filter goes on.
    pub fn new(
        socket: UnixDatagram,
        uds: &Path,
        as_user: Option<(u32, u32)>,
    ) -> io::Result<BrokerServer> {
        let bad = || io::Error::new(io::ErrorKind::InvalidInput, "the vsock path has no name");
        let base = uds
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(bad)?
            .to_string();
        let dir_path = uds
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let c = CString::new(dir_path.as_os_str().as_encoded_bytes()).map_err(|_| bad())?;
        // SAFETY: a valid NUL-terminated path; the descriptor is owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(BrokerServer {
            socket,
            // SAFETY: open returned a new descriptor nothing else owns.
            dir: unsafe { OwnedFd::from_raw_fd(fd) },
            dir_path,
            base,
            as_user,
            proc: Path::new("/proc/self/fd").is_dir(),
        })
    }

    /// Serves requests on a thread of its own (`vsock-broker`), which takes the VM's user for
    /// good first. Start it after the VM process is forked and before the supervisor's filter
    /// goes on (the filter covers it too). It ends when the VM process's end is gone.
    ///
    /// Returns once the thread has taken the user: after that, it makes no system call the
    /// supervisor's filter does not allow.
    pub fn start(self) -> io::Result<std::thread::JoinHandle<()>> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vsock-broker".into())
            .spawn(move || {
                if let Some((uid, gid)) = self.as_user {
                    let user = crate::jail::privileges::User {
                        uid,
                        gid,
                        groups: Vec::new(),
                    };
                    if let Err(e) = crate::jail::privileges::become_user_on_this_thread(&user) {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(()));
                self.serve();
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(thread),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::other(
                "the broker thread ended before it started",
            )),
        }
    }

    /// Answers requests until the VM process's end is closed.
    fn serve(&self) {
        let mut tokens = f64::from(CONNECTS_PER_SECOND);
        let mut last = Instant::now();
        loop {
            let mut buf = [0u8; 16];
            let n = match self.socket.recv(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // Anything but eight bytes is not a request: dropped, unanswered.
            let Some(req) = Request::decode(buf.get(..n).unwrap_or(&[])) else {
                continue;
            };
            let now = Instant::now();
            tokens = (tokens
                + now.duration_since(last).as_secs_f64() * f64::from(CONNECTS_PER_SECOND))
            .min(f64::from(CONNECTS_PER_SECOND));
            last = now;
            let answer = |status: u32| {
                Request {
                    seq: req.seq,
                    port: status,
                }
                .encode()
            };
            let connected = if tokens >= 1.0 {
                tokens -= 1.0;
                self.connect(req.port)
            } else {
                Err(io::Error::from_raw_os_error(libc::EAGAIN))
            };
            let sent = match connected {
                Ok(stream) => self.socket.send_with_fd(&answer(0)[..], stream.as_raw_fd()),
                Err(e) => self
                    .socket
                    .send(&answer(
                        e.raw_os_error().unwrap_or(libc::ECONNREFUSED) as u32
                    ))
                    .map_err(vmm_sys_util::errno::Error::from),
            };
            if sent.is_err() {
                crate::warn_limited!("vsock broker: cannot answer the VM process");
            }
        }
    }

    /// Connects to `BASE_PORT` in the socket directory: a socket file there, no symlink.
    fn connect(&self, port: u32) -> io::Result<UnixStream> {
        let name = format!("{}_{port}", self.base);
        let c = CString::new(name.as_str())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // One name, no slash: nothing is resolved but the name itself, and O_NOFOLLOW refuses
        // a symlink there.
        // SAFETY: an open directory and a valid NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openat returned a new descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: an all-zero stat is a valid buffer; fstat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: an open descriptor and a valid buffer.
        if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        }
        // Through the opened file itself where /proc shows it. Without /proc (a jailer's
        // chroot without one) by name, checked just before: whoever could swap it in between
        // could write that directory, and so could name the socket themselves.
        let target = if self.proc {
            PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
        } else {
            self.dir_path.join(&name)
        };
        crate::devices::virtio::vsock::sock::connect(&target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("bulkhead-broker-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_request_is_eight_bytes_and_nothing_else_decodes() {
        let r = Request { seq: 7, port: 5000 };
        assert_eq!(Request::decode(&r.encode()), Some(r));
        assert_eq!(Request::decode(&[0u8; 7]), None);
        assert_eq!(Request::decode(&[0u8; 9]), None);
    }

    #[test]
    fn the_broker_connects_uds_port_and_nothing_a_symlink_or_another_name_leads_to() {
        let dir = scratch("connect");
        let uds = dir.join("v.sock");
        let listener = UnixListener::bind(dir.join("v.sock_5000")).unwrap();
        let elsewhere = scratch("elsewhere");
        let _other = UnixListener::bind(elsewhere.join("daemon.sock")).unwrap();
        std::os::unix::fs::symlink(elsewhere.join("daemon.sock"), dir.join("v.sock_6000")).unwrap();
        std::fs::write(dir.join("v.sock_7000"), b"not a socket").unwrap();
        let (ours, theirs) = pair().unwrap();
        let server = BrokerServer::new(ours, &uds, None).unwrap();
        let mut client = BrokerClient::new(OwnedFd::from(theirs)).unwrap();
        let serve = server.start().unwrap();
        let stream = client.connect(5000).unwrap();
        let (peer, _) = listener.accept().unwrap();
        drop(peer);
        drop(stream);
        for port in [6000, 7000, 8000] {
            assert!(client.connect(port).is_err(), "port {port}");
        }
        drop(client);
        serve.join().unwrap();
    }
}
