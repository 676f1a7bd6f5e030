//! The control channel's protocol: how a front end (the Firecracker personality, or
//! `bulkhead snapshot` through `--control-socket`) asks the running VM process to act, and what
//! it answers. One Unix stream socket; every message either way is 8 bytes (a code byte, three
//! zero bytes, a little-endian u32 argument); a disk swap carries the new backing file and a
//! snapshot its state and memory files, as SCM_RIGHTS. Both ends encode and decode with the types here,
//! so a request the two ends spell differently does not compile.
//!
//! The front end is host input, not guest input, but the VM process still checks it: a message
//! that decodes to no [`Request`] is answered [`Answer::Unknown`], never trusted.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub use crate::snapshot::SnapshotKind;

/// The size of every message on the channel, either way.
pub const MESSAGE_LEN: usize = 8;

/// What a front end asks of the VM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Press Ctrl-Alt-Del on the i8042 keyboard.
    CtrlAltDel,
    /// Swap the backing file of disk `index` (in the guest's order) for the file sent along.
    SwapDisk { index: u32 },
    /// Are you running? Answered once the VMM serves its event loop (the vCPUs run), with
    /// [`Answer::Running`].
    Ping,
    /// Stop the vCPUs where they are (outside KVM_RUN), for a snapshot.
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// Write a snapshot of the paused VM: its state into the first file sent along, guest RAM
    /// (all of it, or the pages changed since the last snapshot) into the second (empty) one.
    Snapshot { kind: SnapshotKind },
    /// The files of the last snapshot are in place (synced, renamed to their paths): the pages
    /// it took from the dirty log are forgotten. Until this comes, the next snapshot takes them
    /// again, so a diff whose files the front end could not keep loses nothing to the next.
    SnapshotKept,
}

/// What the VM process answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Done,
    /// The answer to [`Request::Ping`]: the VM process runs, as `pid`.
    Running {
        pid: u32,
    },
    /// The request was not one the VM process knows.
    Unknown,
    NoSuchDisk,
    /// A disk swap came without a file.
    NoFile,
    /// The file sent along is not a disk the VM process can use.
    BadFile,
    /// A snapshot was asked of a VM that is not paused.
    NotPaused,
    /// The VM process could not carry the request out (its log says why).
    Failed,
    /// This VM can not do that (a snapshot of a VM with virtio-fs shares).
    Unsupported,
    /// A diff snapshot was asked of a VM that does not track dirty pages.
    NotTracking,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the control channel failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("the control channel is closed")]
    Closed,
    #[error("the control channel carried a message that is not a known one: {0:02x?}")]
    Malformed([u8; MESSAGE_LEN]),
}

fn message(code: u8, arg: u32) -> [u8; MESSAGE_LEN] {
    let a = arg.to_le_bytes();
    [code, 0, 0, 0, a[0], a[1], a[2], a[3]]
}

fn fields(msg: &[u8; MESSAGE_LEN]) -> (u8, u32) {
    (msg[0], u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]))
}

impl Request {
    pub fn encode(self) -> [u8; MESSAGE_LEN] {
        match self {
            Request::CtrlAltDel => message(1, 0),
            Request::SwapDisk { index } => message(2, index),
            Request::Ping => message(3, 0),
            Request::Pause => message(4, 0),
            Request::Resume => message(5, 0),
            Request::Snapshot { kind } => message(6, kind.code()),
            Request::SnapshotKept => message(7, 0),
        }
    }

    /// None for a message that is no request (an unknown code, or padding that is not zero).
    pub fn decode(msg: &[u8; MESSAGE_LEN]) -> Option<Request> {
        if msg[1..4] != [0, 0, 0] {
            return None;
        }
        match fields(msg) {
            (1, 0) => Some(Request::CtrlAltDel),
            (2, index) => Some(Request::SwapDisk { index }),
            (3, 0) => Some(Request::Ping),
            (4, 0) => Some(Request::Pause),
            (5, 0) => Some(Request::Resume),
            (6, kind) => SnapshotKind::from_code(kind).map(|kind| Request::Snapshot { kind }),
            (7, 0) => Some(Request::SnapshotKept),
            _ => None,
        }
    }
}

impl Answer {
    pub fn encode(self) -> [u8; MESSAGE_LEN] {
        match self {
            Answer::Done => message(0, 0),
            Answer::Running { pid } => message(5, pid),
            Answer::Unknown => message(1, 0),
            Answer::NoSuchDisk => message(2, 0),
            Answer::NoFile => message(3, 0),
            Answer::BadFile => message(4, 0),
            Answer::NotPaused => message(6, 0),
            Answer::Failed => message(7, 0),
            Answer::Unsupported => message(8, 0),
            Answer::NotTracking => message(9, 0),
        }
    }

    pub fn decode(msg: &[u8; MESSAGE_LEN]) -> Option<Answer> {
        if msg[1..4] != [0, 0, 0] {
            return None;
        }
        Some(match fields(msg) {
            (0, 0) => Answer::Done,
            (5, pid) => Answer::Running { pid },
            (1, 0) => Answer::Unknown,
            (2, 0) => Answer::NoSuchDisk,
            (3, 0) => Answer::NoFile,
            (4, 0) => Answer::BadFile,
            (6, 0) => Answer::NotPaused,
            (7, 0) => Answer::Failed,
            (8, 0) => Answer::Unsupported,
            (9, 0) => Answer::NotTracking,
            _ => return None,
        })
    }
}

/// The most files one request carries (a snapshot's two).
pub const MAX_FILES: usize = 2;

/// Receives one request and the files sent with it. `Ok(None)` when the peer closed the
/// channel; a message that is no request decodes as `Err(Malformed)`.
pub fn receive(channel: &UnixStream) -> Result<Option<(Request, Vec<File>)>, ControlError> {
    use std::os::fd::FromRawFd;
    let mut msg = [0u8; MESSAGE_LEN];
    let mut iov = [libc::iovec {
        iov_base: msg.as_mut_ptr().cast(),
        iov_len: msg.len(),
    }];
    let mut fds = [-1; MAX_FILES];
    // SAFETY: the iovec points at `msg`, which lives across the call; the kernel writes at
    // most its length there, and at most MAX_FILES descriptors into `fds`.
    let (n, nfds) = unsafe { channel.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| ControlError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    let files: Vec<File> = fds
        .iter()
        .take(nfds)
        .filter(|fd| **fd >= 0)
        // SAFETY: each descriptor came with this message and is owned by nobody else yet.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    // A short message is padded with zeros and so decodes as no request unless it was whole.
    match (n == MESSAGE_LEN).then(|| Request::decode(&msg)).flatten() {
        Some(request) => Ok(Some((request, files))),
        None => Err(ControlError::Malformed(msg)),
    }
}

/// Sends one answer.
pub fn reply(channel: &UnixStream, answer: Answer) -> Result<(), ControlError> {
    (&*channel)
        .write_all(&answer.encode())
        .map_err(ControlError::Io)
}

/// Sends `request` (with `file`, for a disk swap) and reads its answer.
pub fn ask(
    channel: &UnixStream,
    request: Request,
    file: Option<&File>,
) -> Result<Answer, ControlError> {
    let files: Vec<&File> = file.into_iter().collect();
    ask_with(channel, request, &files)
}

/// Sends `request` with `files` (a snapshot's state and memory files) and reads its answer.
pub fn ask_with(
    channel: &UnixStream,
    request: Request,
    files: &[&File],
) -> Result<Answer, ControlError> {
    let msg = request.encode();
    if files.is_empty() {
        (&*channel).write_all(&msg).map_err(ControlError::Io)?;
    } else {
        let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        channel
            .send_with_fds(&[&msg[..]], &fds)
            .map_err(|e| ControlError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    }
    let mut answer = [0u8; MESSAGE_LEN];
    (&*channel).read_exact(&mut answer).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ControlError::Closed
        } else {
            ControlError::Io(e)
        }
    })?;
    Answer::decode(&answer).ok_or(ControlError::Malformed(answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_and_answer_decodes_to_itself() {
        for r in [
            Request::CtrlAltDel,
            Request::Ping,
            Request::SwapDisk { index: 0 },
            Request::SwapDisk { index: u32::MAX },
            Request::Pause,
            Request::Resume,
            Request::Snapshot {
                kind: SnapshotKind::Full,
            },
            Request::Snapshot {
                kind: SnapshotKind::Diff,
            },
            Request::SnapshotKept,
        ] {
            assert_eq!(Request::decode(&r.encode()), Some(r));
        }
        for a in [
            Answer::Done,
            Answer::Running { pid: 4242 },
            Answer::Unknown,
            Answer::NoSuchDisk,
            Answer::NoFile,
            Answer::BadFile,
            Answer::NotPaused,
            Answer::Failed,
            Answer::Unsupported,
            Answer::NotTracking,
        ] {
            assert_eq!(Answer::decode(&a.encode()), Some(a));
        }
    }

    #[test]
    fn a_message_with_an_unknown_code_or_stray_bytes_is_no_request() {
        assert_eq!(Request::decode(&[9, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(Request::decode(&[1, 1, 0, 0, 0, 0, 0, 0]), None);
        // Ctrl-Alt-Del, ping, pause and resume take no argument; a snapshot's is its kind.
        for code in [1, 3, 4, 5] {
            assert_eq!(Request::decode(&[code, 0, 0, 0, 1, 0, 0, 0]), None);
        }
        assert_eq!(Request::decode(&[6, 0, 0, 0, 2, 0, 0, 0]), None);
        assert_eq!(Answer::decode(&[10, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn a_request_crosses_the_channel_with_its_file_and_gets_its_answer() {
        let (front, vm) = UnixStream::pair().unwrap();
        let served = std::thread::spawn(move || {
            let (request, files) = receive(&vm).unwrap().unwrap();
            assert_eq!(request, Request::SwapDisk { index: 3 });
            assert_eq!(files.len(), 1);
            reply(&vm, Answer::BadFile).unwrap();
            // A short message is refused as malformed, and the peer's close is seen.
            assert!(matches!(receive(&vm), Err(ControlError::Malformed(_))));
            assert!(receive(&vm).unwrap().is_none());
        });
        let file = File::open("/dev/null").unwrap();
        let answer = ask(&front, Request::SwapDisk { index: 3 }, Some(&file)).unwrap();
        assert_eq!(answer, Answer::BadFile);
        (&front).write_all(&[2, 0, 0]).unwrap();
        drop(front);
        served.join().unwrap();
    }
}
