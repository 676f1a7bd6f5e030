//! Unix-socket calls for the vsock back-end, made directly so every socket is non-blocking
//! from birth (no FIONBIO ioctl, which the VMM's seccomp filter does not allow).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

fn sockaddr(path: &[u8]) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if path.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(path) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + path.len();
    Ok((addr, len as libc::socklen_t))
}

fn new_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the result is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A listening socket at `path` (`\0name` for the abstract namespace).
pub fn listen(path: &[u8]) -> io::Result<OwnedFd> {
    let fd = new_socket()?;
    let (addr, len) = sockaddr(path)?;
    // SAFETY: `addr` is a sockaddr_un whose first `len` bytes are initialised.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a descriptor we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The next waiting connection on `listener`, non-blocking; None when there is none.
pub fn accept(listener: &OwnedFd) -> io::Result<Option<UnixStream>> {
    // SAFETY: null address buffers are allowed; the result is owned below.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(Some(unsafe { UnixStream::from_raw_fd(fd) }))
}

/// A non-blocking connection to the socket at `path`.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let fd = new_socket()?;
    let (addr, len) = sockaddr(path.as_os_str().as_bytes())?;
    // SAFETY: `addr` is a sockaddr_un whose first `len` bytes are initialised.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc != 0 {
        // A Unix socket connects at once or not at all: EAGAIN (the listener's backlog is
        // full) leaves it unconnected, so it is a refusal like any other.
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}
