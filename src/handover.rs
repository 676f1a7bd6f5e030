//! Handing a VM over to a process the supervisor did not fork.
//!
//! Under the Firecracker personality the vCPU threads must live in the process the
//! orchestrator started: Kata Containers finds them as `/proc/PID/task/*/comm` = `fc_vcpu N`
//! of the pid it launched. That process (the "host" of the VM) forks the API front end early,
//! waits, and becomes the VM process when the supervisor the front end started hands it what
//! a forked VM process would have inherited: the telemetry region's memfd, the wake eventfd,
//! the read end of the supervisor's life pipe, the write end of an "alive" pipe the supervisor
//! watches instead of a wait status, and the console file, control channel and vsock broker
//! when the VM has them. One sequenced packet carries them all (SCM_RIGHTS), on a socket pair
//! the host made before its fork.
//!
//! The same socket carries the final status back: the front end sends the supervisor's exit
//! status once it has reaped it, and the host exits with it, so the orchestrator sees the
//! status `bulkhead run` concluded.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MAGIC: [u8; 4] = *b"BHV1";
const STATUS_MAGIC: [u8; 4] = *b"BHS1";
const HAS_CONSOLE: u8 = 1;
const HAS_CONTROL: u8 = 2;
const HAS_BROKER: u8 = 4;
/// Descriptors in one hand-over: four always, three optional.
const MAX_FDS: usize = 7;

/// Errors handing a VM over.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("cannot send the VM's descriptors to the VM's host process: {0}")]
    Send(#[source] io::Error),
    #[error("cannot receive the VM's descriptors from the supervisor: {0}")]
    Receive(#[source] io::Error),
    #[error("the supervisor closed the hand-over channel before handing the VM over")]
    Closed,
    #[error("the hand-over message is malformed ({0})")]
    Malformed(&'static str),
}

/// What the VM process gets from its supervisor.
#[derive(Debug)]
pub struct Parts {
    /// The telemetry region's memfd.
    pub region: OwnedFd,
    /// The eventfd the VM process writes when it posts events.
    pub wake: OwnedFd,
    /// The read end of the supervisor's life pipe: it hangs up when the supervisor dies.
    pub life: OwnedFd,
    /// The write end of the alive pipe: the VM process's exit status goes here at its end,
    /// and the supervisor reads the hang-up of a VM process that was killed.
    pub alive: OwnedFd,
    pub console: Option<OwnedFd>,
    pub control: Option<OwnedFd>,
    pub broker: Option<OwnedFd>,
}

impl Parts {
    /// Every descriptor, for closing all others.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![
            self.region.as_raw_fd(),
            self.wake.as_raw_fd(),
            self.life.as_raw_fd(),
            self.alive.as_raw_fd(),
        ];
        for fd in [&self.console, &self.control, &self.broker]
            .into_iter()
            .flatten()
        {
            fds.push(fd.as_raw_fd());
        }
        fds
    }
}

/// Sends `parts` over `socket` (the supervisor's side).
pub fn send(socket: &UnixDatagram, parts: &Parts) -> Result<(), HandoverError> {
    let mut flags = 0u8;
    for (present, bit) in [
        (parts.console.is_some(), HAS_CONSOLE),
        (parts.control.is_some(), HAS_CONTROL),
        (parts.broker.is_some(), HAS_BROKER),
    ] {
        if present {
            flags |= bit;
        }
    }
    let mut message = MAGIC.to_vec();
    message.push(flags);
    socket
        .send_with_fds(&[&message[..]], &parts.raw_fds())
        .map_err(|e| HandoverError::Send(io::Error::from(e)))?;
    Ok(())
}

/// Waits for the parts on `socket` (the VM host's side).
pub fn receive(socket: &UnixDatagram) -> Result<Parts, HandoverError> {
    let mut message = [0u8; 8];
    let mut fds = [-1 as RawFd; MAX_FDS];
    let (n, nfds) = loop {
        let mut iov = [libc::iovec {
            iov_base: message.as_mut_ptr().cast(),
            iov_len: message.len(),
        }];
        // SAFETY: the one iovec points at `message`, a live buffer of its stated length that
        // nothing else borrows while the kernel writes to it.
        match unsafe { socket.recv_with_fds(&mut iov, &mut fds) } {
            Ok(got) => break got,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(HandoverError::Receive(io::Error::from(e))),
        }
    };
    // Owned at once, so every received descriptor is closed on any refusal below.
    let mut owned: std::collections::VecDeque<OwnedFd> = fds
        .iter()
        .take(nfds)
        // SAFETY: recvmsg placed `nfds` new descriptors here, owned by nothing else.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
        .collect();
    if n == 0 && nfds == 0 {
        return Err(HandoverError::Closed);
    }
    if n != MAGIC.len() + 1 || message.get(..4) != Some(&MAGIC[..]) {
        return Err(HandoverError::Malformed("not a hand-over"));
    }
    let flags = message.get(4).copied().unwrap_or(0);
    let optional = [HAS_CONSOLE, HAS_CONTROL, HAS_BROKER]
        .iter()
        .filter(|bit| flags & **bit != 0)
        .count();
    if owned.len() != 4 + optional {
        return Err(HandoverError::Malformed("wrong number of descriptors"));
    }
    let mut next = || owned.pop_front().ok_or(HandoverError::Malformed("short"));
    let (region, wake, life, alive) = (next()?, next()?, next()?, next()?);
    let mut optional = |bit: u8| -> Result<Option<OwnedFd>, HandoverError> {
        if flags & bit != 0 {
            next().map(Some)
        } else {
            Ok(None)
        }
    };
    let console = optional(HAS_CONSOLE)?;
    let control = optional(HAS_CONTROL)?;
    let broker = optional(HAS_BROKER)?;
    Ok(Parts {
        region,
        wake,
        life,
        alive,
        console,
        control,
        broker,
    })
}

/// The front end's last word to the VM's host: `bulkhead run`'s exit status.
pub fn send_status(socket: &UnixDatagram, status: i32) -> io::Result<()> {
    let mut message = STATUS_MAGIC.to_vec();
    message.extend_from_slice(&status.to_le_bytes());
    socket.send(&message).map(|_| ())
}

/// Waits for the front end's status on `socket`; None when it closed without one.
pub fn read_status(socket: &UnixDatagram) -> Option<i32> {
    let mut message = [0u8; 16];
    loop {
        match socket.recv(&mut message) {
            Ok(8) if message.get(..4) == Some(&STATUS_MAGIC[..]) => {
                let mut word = [0u8; 4];
                word.copy_from_slice(message.get(4..8)?);
                return Some(i32::from_le_bytes(word));
            }
            // Anything else is not for this side: look for the status after it.
            Ok(n) if n > 0 => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            _ => return None,
        }
    }
}

/// The VM process's own end of the alive pipe: its exit status, then the pipe closes.
pub fn report_status(alive: OwnedFd, status: i32) {
    let bytes = status.to_le_bytes();
    // SAFETY: writes four bytes from a live buffer to a descriptor this process owns.
    unsafe { libc::write(alive.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    drop(alive);
}

/// What the supervisor reads on the alive pipe: `Ok(Some(status))` when the VM process ended
/// and said how, `Ok(None)` when it ended without a word (killed), `Err(WouldBlock)` while it
/// runs. The descriptor must be non-blocking.
pub fn read_alive(alive: &OwnedFd) -> io::Result<Option<i32>> {
    let mut bytes = [0u8; 4];
    // SAFETY: reads at most four bytes into a live buffer.
    let n = unsafe { libc::read(alive.as_raw_fd(), bytes.as_mut_ptr().cast(), bytes.len()) };
    match n {
        4 => Ok(Some(i32::from_le_bytes(bytes))),
        // The end of the pipe, or less than a status: gone without one.
        n if n >= 0 => Ok(None),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is valid for two ints.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: two new descriptors.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn file() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/dev/null").unwrap())
    }

    #[test]
    fn a_hand_over_carries_each_descriptor_to_its_place_and_the_status_follows() {
        let (sup, host) = crate::broker::pair().unwrap();
        let (_, alive_w) = pipe();
        let parts = Parts {
            region: file(),
            wake: file(),
            life: file(),
            alive: alive_w,
            console: None,
            control: Some(file()),
            broker: None,
        };
        send(&sup, &parts).unwrap();
        let got = receive(&host).unwrap();
        assert!(got.console.is_none() && got.broker.is_none());
        assert!(got.control.is_some());
        // The alive pipe's write end arrived as the fourth descriptor.
        // SAFETY: fcntl on a descriptor this test owns.
        let mode = unsafe { libc::fcntl(got.alive.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(mode & libc::O_ACCMODE, libc::O_WRONLY);
        send_status(&sup, 143).unwrap();
        assert_eq!(read_status(&host), Some(143));
        drop(sup);
        assert_eq!(read_status(&host), None);
    }

    #[test]
    fn a_closed_channel_or_a_stray_message_is_no_hand_over() {
        let (sup, host) = crate::broker::pair().unwrap();
        sup.send(b"hello").unwrap();
        assert!(matches!(receive(&host), Err(HandoverError::Malformed(_))));
        drop(sup);
        assert!(matches!(receive(&host), Err(HandoverError::Closed)));
    }

    #[test]
    fn the_alive_pipe_says_a_status_or_that_the_process_went_without_one() {
        let (r, w) = pipe();
        // SAFETY: fcntl on our own descriptor.
        unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        assert_eq!(
            read_alive(&r).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        report_status(w, 81);
        assert_eq!(read_alive(&r).unwrap(), Some(81));
        let (r, w) = pipe();
        drop(w);
        assert_eq!(read_alive(&r).unwrap(), None);
    }
}
