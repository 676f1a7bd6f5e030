//! The management plane (`bulkhead serve`, growing under the multi-tenant issue). So far: the
//! tamper-evident audit log every management request will be written to.

pub mod audit;
