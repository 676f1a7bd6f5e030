//! The management plane, three front ends over the same supervisor code and one client:
//!
//! - [`serve`]: `bulkhead serve`, a daemon serving tenants' and admins' requests on Unix
//!   sockets, with its registry of VMs, quotas, tamper-evident audit log, isolation reports and
//!   merged metrics endpoint;
//! - [`firecracker`]: the Firecracker personality;
//! - [`audit`]: `bulkhead audit`, which runs a daemon of its own and writes the isolation
//!   evidence bundle;
//! - [`launch`]: how a front end starts, watches and reaps a `bulkhead run` supervisor;
//! - [`client`]: the HTTP client `bulkhead ctl` and `bulkhead audit` speak to a daemon with;
//! - [`markdown`]: the table writer reports are rendered for people with.
//!
//! Imports go one way: `audit` uses `serve` and `client`; `serve` and `firecracker` use
//! `launch`; none of them uses another front end.

pub mod audit;
pub mod client;
pub mod firecracker;
pub mod launch;
pub mod markdown;
pub mod serve;
