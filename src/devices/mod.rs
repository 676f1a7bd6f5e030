//! Device emulation. Every device sits on a [`bus::Bus`] and treats each access as untrusted
//! guest input: a malformed access is refused and counted, never a panic.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusAccess, BusDevice, BusError};
