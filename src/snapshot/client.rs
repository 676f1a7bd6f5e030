//! The front end of `bulkhead snapshot`: asks a running VM, through its control socket, to
//! pause, write a snapshot into files this side creates, and resume. The files are made here
//! (mode 0600, as the caller), not by the VM process, which only writes into the descriptors
//! it is sent.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::SnapshotKind;
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
                Answer::Unsupported => {
                    " (a VM with virtio-fs shares, or whose disk was swapped, can not be snapshotted)"
                }
                Answer::Failed => " (the VM's log says why)",
                Answer::NotTracking => {
                    " (a diff snapshot needs the VM started with --track-dirty-pages)"
                }
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

/// A snapshot file being written: a new file beside its final path (made here, mode 0600, never
/// through a symlink), renamed over that path once the snapshot is complete and removed if it
/// is not. An existing file at the path is never written into: clones may be mapping it (a
/// truncated memory file would take their pages away), and a failed snapshot must not destroy
/// the last good one.
pub struct NewFile {
    file: File,
    temp: PathBuf,
    path: PathBuf,
    done: bool,
}

impl NewFile {
    pub fn create(path: &Path) -> Result<NewFile, ClientError> {
        let error = |source| ClientError::Create {
            path: path.to_path_buf(),
            source,
        };
        let name = path
            .file_name()
            .ok_or_else(|| error(std::io::Error::from_raw_os_error(libc::EISDIR)))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.partial", std::process::id()));
        let temp = path.with_file_name(temp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp)
            .map_err(error)?;
        Ok(NewFile {
            file,
            temp,
            path: path.to_path_buf(),
            done: false,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Makes the written file durable and puts it at its path.
    pub fn commit(mut self) -> Result<(), ClientError> {
        let error = |source| ClientError::Create {
            path: self.path.clone(),
            source,
        };
        self.file.sync_all().map_err(error)?;
        std::fs::rename(&self.temp, &self.path).map_err(error)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Pauses the VM, writes its snapshot of `kind` to `state` and `mem`, and resumes it unless
/// `keep_paused`. The VM is resumed even when the snapshot failed.
pub fn create(
    socket: &Path,
    state: &Path,
    mem: &Path,
    kind: SnapshotKind,
    keep_paused: bool,
) -> Result<(), ClientError> {
    let channel = connect(socket)?;
    expect_done(&channel, Request::Pause, &[])?;
    let written = (|| {
        let state_file = NewFile::create(state)?;
        let mem_file = NewFile::create(mem)?;
        expect_done(
            &channel,
            Request::Snapshot { kind },
            &[state_file.file(), mem_file.file()],
        )?;
        state_file.commit()?;
        mem_file.commit()?;
        // Only now may the VM forget the pages this snapshot took. Should the word not reach
        // it, the next diff holds them again: more pages than needed, none lost.
        if let Err(e) = expect_done(&channel, Request::SnapshotKept, &[]) {
            log::warn!("the snapshot is kept, but the VM was not told so ({e}): its next diff snapshot writes this one's pages again");
        }
        Ok(())
    })();
    // The VM runs on whatever became of the snapshot; the snapshot's own error is the one
    // reported.
    let resumed = if keep_paused {
        Ok(())
    } else {
        expect_done(&channel, Request::Resume, &[])
    };
    written.and(resumed)
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
