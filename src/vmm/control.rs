//! The control channel: how the VMM's front end (the Firecracker personality) acts on the
//! running VM. One Unix stream socket, inherited from the front end; each request is 8 bytes
//! (a command byte, then a little-endian u32 argument), a disk swap carries the new backing
//! file as SCM_RIGHTS, and each answer is one byte: 0 for done, or an error code.
//!
//! The front end is host input, not guest input, but it is still checked: an unknown command,
//! a disk index out of range or a file that is not a disk is refused, never trusted.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::devices::legacy::I8042;
use crate::devices::virtio::block::DiskHandle;
use crate::devices::virtio::shared::DeviceShared;

/// Press Ctrl-Alt-Del on the i8042 keyboard.
pub const CTRL_ALT_DEL: u8 = 1;
/// Swap the backing file of disk N (the argument) for the file sent along.
pub const SWAP_DISK: u8 = 2;
/// Are you running? Answered once the VMM serves its event loop (the vCPUs run), with
/// DONE and then the VM process's pid (u32, little-endian).
pub const PING: u8 = 3;

/// Answers.
pub const DONE: u8 = 0;
pub const UNKNOWN: u8 = 1;
pub const NO_SUCH_DISK: u8 = 2;
pub const NO_FILE: u8 = 3;
pub const BAD_FILE: u8 = 4;

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
        let mut msg = [0u8; 8];
        let (n, file) = match self.channel.recv_with_fd(&mut msg) {
            Ok(got) => got,
            Err(_) => return false,
        };
        if n == 0 {
            return false;
        }
        let arg = u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
        let answer = match (n, msg[0]) {
            (8, CTRL_ALT_DEL) => {
                self.i8042.ctrl_alt_del();
                DONE
            }
            (8, SWAP_DISK) => {
                let disk = usize::try_from(arg).ok().and_then(|i| self.disks.get(i));
                match (disk, file) {
                    (None, _) => NO_SUCH_DISK,
                    (Some(_), None) => NO_FILE,
                    (Some((handle, device)), Some(file)) => {
                        match handle.swap(file, Path::new("(from the control channel)")) {
                            Ok(sectors) => {
                                log::info!(
                                    "{}: backing file swapped ({sectors} sectors)",
                                    device.name()
                                );
                                device.config_changed();
                                DONE
                            }
                            Err(e) => {
                                log::warn!("{}: swap refused: {e}", device.name());
                                BAD_FILE
                            }
                        }
                    }
                }
            }
            (8, PING) => {
                // SAFETY: getpid has no preconditions.
                let pid = u32::try_from(unsafe { libc::getpid() })
                    .unwrap_or(0)
                    .to_le_bytes();
                let reply = [DONE, pid[0], pid[1], pid[2], pid[3]];
                return std::io::Write::write_all(&mut &self.channel, &reply).is_ok();
            }
            _ => UNKNOWN,
        };
        std::io::Write::write_all(&mut &self.channel, &[answer]).is_ok()
    }
}
