//! The vsock connection broker: the supervisor connects a guest's connection to host port P
//! (the socket `uds_P`) for the VM process and hands it the connected socket, so the VM
//! process's seccomp filter holds neither `socket` nor `connect`. A VM process taken over by a
//! guest can then reach no Unix socket on the host (a container runtime's, the management
//! daemon's) and no abstract one: only sockets named `uds_P` in the directory of its own
//! `uds`, as the supervisor finds them.
//!
//! The two ends are a Unix datagram socket pair made before the VM process is forked. The VM
//! process sends a [`Request`] (a sequence number and the port) and waits, at most
//! [`REPLY_TIMEOUT`], for the answer with the same sequence number: a status, and the
//! connected socket as SCM_RIGHTS when it worked. The supervisor takes nothing from the VM
//! process but those eight bytes: the name is its own `uds` and the port as a number; the
//! socket is opened in a directory it opened itself, following no symlink, must be a socket,
//! and is connected with the VM process's credentials (a jailed VM's uid and gid).

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

/// Requests the supervisor serves in one go before it looks at anything else.
const MAX_BATCH: usize = 64;

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

/// The two ends: (the supervisor's, the VM process's).
pub fn pair() -> io::Result<(UnixDatagram, UnixDatagram)> {
    UnixDatagram::pair()
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
        socket.set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(BrokerClient { socket, seq: 0 })
    }

    /// Asks for a connection to host port `port`; the connected, non-blocking socket.
    pub fn connect(&mut self, port: u32) -> io::Result<UnixStream> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.socket.send(&Request { seq, port }.encode())?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let mut answer = [0u8; 8];
            let (n, file) = self
                .socket
                .recv_with_fd(&mut answer)
                .map_err(io::Error::from)?;
            let Some(reply) = Request::decode(answer.get(..n).unwrap_or(&[])) else {
                continue;
            };
            // An answer to an earlier request that timed out: its socket is dropped.
            if reply.seq != seq {
                if Instant::now() >= deadline {
                    return Err(io::Error::from(io::ErrorKind::TimedOut));
                }
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
    /// The credentials the connection is made with (a jailed VM's uid and gid).
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
        socket.set_nonblocking(true)?;
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

    /// The descriptor to poll for requests.
    pub fn fd(&self) -> i32 {
        self.socket.as_raw_fd()
    }

    /// Answers the requests waiting (a bounded number); how many were served.
    pub fn serve(&self) -> usize {
        let mut served = 0;
        while served < MAX_BATCH {
            let mut buf = [0u8; 16];
            let Ok(n) = self.socket.recv(&mut buf) else {
                break;
            };
            served += 1;
            // Anything but eight bytes is not a request: dropped, unanswered.
            let Some(req) = Request::decode(buf.get(..n).unwrap_or(&[])) else {
                continue;
            };
            let answer = |status: u32| {
                Request {
                    seq: req.seq,
                    port: status,
                }
                .encode()
            };
            let sent = match self.connect(req.port) {
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
        served
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
        // Through the opened file itself where /proc shows it; by name otherwise (the
        // directory's writers are then the VM's own uid, who could name anything anyway).
        let target = if self.proc {
            PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
        } else {
            self.dir_path.join(&name)
        };
        let _as = self.as_user.map(AsUser::take);
        crate::devices::virtio::vsock::sock::connect(&target)
    }
}

/// This thread's file-system credentials, taken for a connect and given back when dropped:
/// the kernel checks the socket's permissions against them.
struct AsUser;

impl AsUser {
    fn take((uid, gid): (u32, u32)) -> AsUser {
        // SAFETY: setfsgid and setfsuid take integers and change this thread's file-system
        // ids only.
        unsafe {
            libc::syscall(libc::SYS_setfsgid, gid);
            libc::syscall(libc::SYS_setfsuid, uid);
        }
        AsUser
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        // SAFETY: as above, back to the real ids (root's, for a jailed VM's supervisor).
        unsafe {
            libc::syscall(libc::SYS_setfsuid, libc::getuid());
            libc::syscall(libc::SYS_setfsgid, libc::getgid());
        }
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
        let serve = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut served = 0;
            while served < 4 && Instant::now() < deadline {
                served += server.serve();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let stream = client.connect(5000).unwrap();
        let (peer, _) = listener.accept().unwrap();
        drop(peer);
        drop(stream);
        for port in [6000, 7000, 8000] {
            assert!(client.connect(port).is_err(), "port {port}");
        }
        serve.join().unwrap();
    }
}
