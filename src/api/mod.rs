//! The management plane: `bulkhead serve` (a daemon serving tenants' and admins' requests on
//! Unix sockets), its tamper-evident audit log, the isolation report, the `ctl` client, and the
//! Firecracker personality.

pub mod audit;
pub mod client;
pub mod daemon;
pub mod evidence;
pub mod exposition;
pub mod firecracker;
pub mod launch;
pub mod paths;
pub mod report;
pub mod routes;
pub mod server;
pub mod vms;
