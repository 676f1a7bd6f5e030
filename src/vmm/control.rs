//! The VM process's end of the control channel ([`crate::control`]): carries out what the
//! front end (the Firecracker personality) asks of the running VM. A request it can not carry
//! out (an unknown message, a disk index out of range, a file that is not a disk) is refused
//! with its answer, never trusted.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use crate::control::{self, Answer, ControlError, Request};
use crate::devices::legacy::I8042;
use crate::devices::virtio::block::DiskHandle;
use crate::devices::virtio::shared::DeviceShared;

/// What the control channel acts on.
pub struct Control {
    pub channel: UnixStream,
    pub i8042: Arc<I8042>,
    /// Each disk's handle and its device, in the guest's order.
    pub disks: Vec<(DiskHandle, Arc<DeviceShared>)>,
}

impl Control {
    /// Reads and carries out one request; false when the front end has gone away.
    pub fn serve(&self) -> bool {
        let answer = match control::receive(&self.channel) {
            Ok(None) | Err(ControlError::Io(_) | ControlError::Closed) => return false,
            Err(ControlError::Malformed(_)) => Answer::Unknown,
            Ok(Some((request, file))) => self.carry_out(request, file),
        };
        control::reply(&self.channel, answer).is_ok()
    }

    fn carry_out(&self, request: Request, file: Option<std::fs::File>) -> Answer {
        match request {
            Request::CtrlAltDel => {
                self.i8042.ctrl_alt_del();
                Answer::Done
            }
            Request::Ping => Answer::Running {
                pid: std::process::id(),
            },
            Request::SwapDisk { index } => {
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
                        Answer::Done
                    }
                    Err(e) => {
                        log::warn!("{}: swap refused: {e}", device.name());
                        Answer::BadFile
                    }
                }
            }
        }
    }
}
