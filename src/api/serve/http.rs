//! What a request gets back: a [`Reply`] (status, body, what the audit line keeps), and the
//! one place a [`ServeError`] becomes a status code. Also the limits every listener of the
//! daemon shares.

use std::time::Duration;

use serde_json::{json, Value};

use super::error::ServeError;

/// The header an admin gives a reason in.
pub const REASON_HEADER: &str = "x-bulkhead-reason";
/// The largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Connections a listener serves at once; the rest are closed at once.
pub const MAX_CONNECTIONS: usize = 32;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// The status code of each refusal or failure.
pub fn status(e: &ServeError) -> u16 {
    use ServeError::*;
    match e {
        Body(_) | NotAnObject | SnapshotKind | NotJson(_) | Settings(_) => 400,
        NotMember { .. }
        | NotAdmin { .. }
        | AdminsOnly(_)
        | TenantsOnly(_)
        | NoAdminReason
        | NoAdminReasonToCreate
        | OtherTenant { .. }
        | FileRefused { .. }
        | FileTooSlow { .. }
        | Quota { .. } => 403,
        NoEndpoint { .. } | NoVm(_) | NoSnapshot(_) => 404,
        BodyTimeout => 408,
        NotLive { .. }
        | NotRunning(_)
        | WrongState { .. }
        | StillRunning(_)
        | DiskInUse(_)
        | NoControl(_)
        | DiffUntracked(_)
        | DiffWithoutBase(_)
        | SnapshotIsBase { .. }
        | ChainTooLong { .. } => 409,
        BodyTooLarge(_) => 413,
        NoTenantNamed
        | NoSuchTenant(_)
        | DaemonField { .. }
        | SeccompOff
        | Console
        | RelativePath { .. }
        | NoKernel
        | SnapshotMachine(_)
        | SnapshotSettings(_)
        | ConsoleLimit { .. }
        | Invalid(_) => 422,
        RateLimited => 429,
        Read { .. }
        | Prepare { .. }
        | VmLog(_)
        | Start { .. }
        | VmId(_)
        | Worker
        | BrokenChain(_)
        | Rebase { .. }
        | Snapshot { .. } => 500,
        ChecksBusy { .. } | AuditUnwritable(_) => 503,
    }
}

/// An answer, with what the audit log needs to know about it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: &'static str,
    /// The VM the request was about, if any.
    pub vm: Option<String>,
    /// Why it was refused, or an admin's reason.
    pub audit_reason: Option<String>,
}

impl Reply {
    pub fn json(status: u16, value: Value) -> Reply {
        Reply {
            status,
            body: serde_json::to_vec(&value).unwrap_or_default(),
            content_type: "application/json",
            vm: None,
            audit_reason: None,
        }
    }

    pub fn text(status: u16, content_type: &'static str, body: Vec<u8>) -> Reply {
        Reply {
            status,
            body,
            content_type,
            vm: None,
            audit_reason: None,
        }
    }

    /// The reply is about VM `vm`.
    pub fn about(mut self, vm: &str) -> Reply {
        self.vm = Some(vm.to_string());
        self
    }
}

impl From<ServeError> for Reply {
    /// `{"error": MESSAGE}` with the error's status; the audit line keeps the message.
    fn from(e: ServeError) -> Reply {
        let message = crate::error_chain(&e);
        let mut r = Reply::json(status(&e), json!({ "error": message }));
        r.audit_reason = Some(message);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_answers_its_status_with_its_message_and_audits_it() {
        let r = Reply::from(ServeError::NoVm("x1".into()));
        assert_eq!(r.status, 404);
        assert_eq!(r.audit_reason.as_deref(), Some("no VM x1"));
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"], "no VM x1");
        assert_eq!(status(&ServeError::RateLimited), 429);
        assert_eq!(status(&ServeError::NoKernel), 422);
    }
}
