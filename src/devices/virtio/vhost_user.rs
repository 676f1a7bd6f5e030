//! The VMM's end of a vhost-user backend (virtiofsd, for a virtio-fs share): the device's
//! queues are served by the backend process, which maps guest RAM itself. Built on rust-vmm's
//! `vhost` crate (its frontend speaks the protocol); this module decides what is sent: the
//! features the guest may see, the memory table (the RAM memfd's regions and nothing else),
//! and each queue's size, ring addresses and eventfds once the driver made it ready.
//!
//! Everything sent here comes from guest registers only through the transport, which has
//! already checked that each ring lies in RAM; a ring address that still does not translate is
//! refused, never passed on.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::vstate::dirty::GuestMemoryMmap;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::QueueConfig;

/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit in the feature word, never a virtio one.
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("cannot connect to the vhost-user backend at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: vhost::Error,
    },
    #[error("the vhost-user backend refused {what}: {source}")]
    Request {
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the vhost-user backend offers {offered} queues; this device needs {needed}")]
    Queues { offered: u64, needed: usize },
    #[error("guest RAM at {0:#x} has no descriptor a backend could map: it must be shared")]
    NotShared(u64),
    #[error("queue {queue}: its {ring} at guest address {addr:#x} is not in guest RAM")]
    Ring {
        queue: usize,
        ring: &'static str,
        addr: u64,
    },
}

fn request<T>(what: &'static str, r: vhost::Result<T>) -> Result<T, VhostUserError> {
    r.map_err(|source| VhostUserError::Request { what, source })
}

/// A queue the driver made ready, with the eventfds that carry its notifications: `kick` is
/// the queue's ioeventfd (the guest's notify writes), `call` the device's irqfd.
pub struct BackendQueue<'a> {
    pub config: QueueConfig,
    pub kick: &'a EventFd,
    pub call: &'a EventFd,
}

/// A connected vhost-user backend.
pub struct Backend {
    frontend: Frontend,
    /// The backend's virtio features, without the vhost-user bit.
    features: u64,
    /// Whether VHOST_USER_F_PROTOCOL_FEATURES was offered (then each queue is enabled
    /// explicitly once set up).
    protocol: bool,
    queues: usize,
}

impl Backend {
    /// Connects to the backend's socket at `path` and agrees on what `queues` queues need.
    pub fn connect(path: &Path, queues: usize) -> Result<Backend, VhostUserError> {
        let connect = |source| VhostUserError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let frontend = Frontend::connect(path, queues as u64).map_err(connect)?;
        Backend::handshake(frontend, queues)
    }

    /// Takes the backend at the other end of `stream`, a connection the supervisor made (the
    /// VM process itself connects nowhere), and agrees on what `queues` queues need.
    pub fn over(stream: UnixStream, queues: usize) -> Result<Backend, VhostUserError> {
        Backend::handshake(Frontend::from_stream(stream, queues as u64), queues)
    }

    fn handshake(mut frontend: Frontend, queues: usize) -> Result<Backend, VhostUserError> {
        request("SET_OWNER", frontend.set_owner())?;
        let offered = request("GET_FEATURES", frontend.get_features())?;
        let protocol = offered & PROTOCOL_FEATURES_BIT != 0;
        if protocol {
            let theirs = request("GET_PROTOCOL_FEATURES", frontend.get_protocol_features())?;
            // Multiple queues, when offered, to learn how many the backend serves; no reply
            // acks, no config space (the tag is ours), no backend-initiated requests.
            let ours = theirs & VhostUserProtocolFeatures::MQ;
            request(
                "SET_PROTOCOL_FEATURES",
                frontend.set_protocol_features(ours),
            )?;
            if ours.contains(VhostUserProtocolFeatures::MQ) {
                let offered = request("GET_QUEUE_NUM", frontend.get_queue_num())?;
                if offered < queues as u64 {
                    return Err(VhostUserError::Queues {
                        offered,
                        needed: queues,
                    });
                }
            }
        }
        Ok(Backend {
            frontend,
            features: offered & !PROTOCOL_FEATURES_BIT,
            protocol,
            queues,
        })
    }

    /// The virtio features the backend offers the guest.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Starts the backend on the queues the driver made ready, with the features it acked
    /// (`acked`, a subset of what was offered): the memory table, then each queue's size,
    /// rings, start index and eventfds.
    pub fn activate(
        &mut self,
        acked: u64,
        mem: &GuestMemoryMmap,
        queues: &[BackendQueue<'_>],
    ) -> Result<(), VhostUserError> {
        let wire = (acked & self.features)
            | if self.protocol {
                PROTOCOL_FEATURES_BIT
            } else {
                0
            };
        request("SET_FEATURES", self.frontend.set_features(wire))?;
        request(
            "SET_MEM_TABLE",
            self.frontend.set_mem_table(&memory_table(mem)?),
        )?;
        for (index, q) in queues.iter().enumerate().take(self.queues) {
            let host = |ring: &'static str, addr: u64| {
                mem.get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|_| VhostUserError::Ring {
                        queue: index,
                        ring,
                        addr,
                    })
            };
            let rings = VringConfigData {
                queue_max_size: q.config.size,
                queue_size: q.config.size,
                flags: 0,
                desc_table_addr: host("descriptor table", q.config.desc_table)?,
                used_ring_addr: host("used ring", q.config.used_ring)?,
                avail_ring_addr: host("available ring", q.config.avail_ring)?,
                log_addr: None,
            };
            request(
                "SET_VRING_NUM",
                self.frontend.set_vring_num(index, q.config.size),
            )?;
            request(
                "SET_VRING_ADDR",
                self.frontend.set_vring_addr(index, &rings),
            )?;
            request("SET_VRING_BASE", self.frontend.set_vring_base(index, 0))?;
            request(
                "SET_VRING_CALL",
                self.frontend.set_vring_call(index, q.call),
            )?;
            request(
                "SET_VRING_KICK",
                self.frontend.set_vring_kick(index, q.kick),
            )?;
            if self.protocol {
                request(
                    "SET_VRING_ENABLE",
                    self.frontend.set_vring_enable(index, true),
                )?;
            }
        }
        Ok(())
    }

    /// Takes the first `queues` queues back from the backend (the driver reset the device):
    /// each is disabled, then stopped (GET_VRING_BASE), so the backend lets go of rings the
    /// driver has reclaimed before the device can start again. Goes on past a refusal, so one
    /// queue's error leaves no other running; returns the first.
    pub fn stop(&mut self, queues: usize) -> Result<(), VhostUserError> {
        let mut first = Ok(());
        for index in 0..queues.min(self.queues) {
            let disabled = if self.protocol {
                request(
                    "SET_VRING_ENABLE",
                    self.frontend.set_vring_enable(index, false),
                )
            } else {
                Ok(())
            };
            let stopped =
                request("GET_VRING_BASE", self.frontend.get_vring_base(index)).map(|_| ());
            if first.is_ok() {
                first = disabled.and(stopped);
            }
        }
        first
    }
}

/// Guest RAM as the backend maps it: each region's guest address, size, this process's
/// address for it, and the memfd and offset it is mapped from.
fn memory_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserError> {
    mem.iter()
        .map(|r| {
            let file = r
                .file_offset()
                .ok_or(VhostUserError::NotShared(r.start_addr().0))?;
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "vhost_user_tests.rs"]
mod tests;
