//! The front end of `bulkhead snapshot`: asks a running VM, through its control socket, to
//! pause, write a snapshot into files this side creates, and resume. The files are made here
//! (mode 0600, as the caller), not by the VM process, which only writes into the descriptors
//! it is sent.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::control::{self, Answer, ControlError, Request};

/// Why a snapshot request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the control socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Channel(#[from] ControlError),
    #[error("the VM answered {request:?} with {answer:?}{hint}")]
    Refused {
        request: Request,
        answer: Answer,
        hint: &'static str,
    },
}

fn expect_done(channel: &UnixStream, request: Request, files: &[&File]) -> Result<(), ClientError> {
    match control::ask_with(channel, request, files)? {
        Answer::Done => Ok(()),
        answer => Err(ClientError::Refused {
            request,
            answer,
            hint: match answer {
                Answer::Unsupported => " (a VM with virtio-fs shares can not be snapshotted)",
                Answer::Failed => " (the VM's log says why)",
                _ => "",
            },
        }),
    }
}

fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })
}

/// A new, empty file for the snapshot, readable by its owner only; an existing one is
/// replaced (never followed through a symlink).
fn create_file(path: &Path) -> Result<File, ClientError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| ClientError::Create {
            path: path.to_path_buf(),
            source,
        })
}

/// Pauses the VM, writes its snapshot to `state` and `mem`, and resumes it unless
/// `keep_paused`. The VM is resumed even when the snapshot failed.
pub fn create(
    socket: &Path,
    state: &Path,
    mem: &Path,
    keep_paused: bool,
) -> Result<(), ClientError> {
    let channel = connect(socket)?;
    expect_done(&channel, Request::Pause, &[])?;
    let written = (|| {
        let state_file = create_file(state)?;
        let mem_file = create_file(mem)?;
        expect_done(&channel, Request::Snapshot, &[&state_file, &mem_file])
    })();
    if !keep_paused {
        expect_done(&channel, Request::Resume, &[])?;
    }
    written
}

/// Pauses (`true`) or resumes the VM.
pub fn pause(socket: &Path, pause: bool) -> Result<(), ClientError> {
    let channel = connect(socket)?;
    let request = if pause {
        Request::Pause
    } else {
        Request::Resume
    };
    expect_done(&channel, request, &[])
}
