//! `bulkhead serve`: the management daemon. Its layers, each importing only those below it:
//!
//! - [`server`]: sockets, connections, callers (SO_PEERCRED), rate budgets, the audit line of
//!   every request;
//! - [`routes`]: what each request may do, decided with its caller;
//! - [`report`] and [`exposition`]: a VM's isolation report and the merged metrics endpoint;
//! - [`registry`]: the daemon's state: its VMs and their lives, quotas, alerts, the audit log;
//! - [`http`]: the answer a request gets, and the one mapping of a [`ServeError`] to its
//!   status code;
//! - [`vms`], [`paths`], [`quota`], [`audit_log`]: records and files, path checks as the
//!   tenant, quota arithmetic, the tamper-evident log.

pub mod audit_log;
pub mod error;
pub mod exposition;
pub mod http;
pub mod paths;
pub mod quota;
pub mod registry;
pub mod report;
pub mod routes;
pub mod server;
pub mod snapshots;
pub mod vms;

pub use error::ServeError;
pub use server::serve;
