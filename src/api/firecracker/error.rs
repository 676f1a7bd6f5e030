//! Why a Firecracker API call failed. Each message is the `fault_message` Firecracker's API
//! answers with (where Firecracker has one, in its words), so orchestrators that match on them
//! keep working; the cause stays attached as the error's source.

use std::path::PathBuf;

use super::state::PendingError;
use crate::control::{Answer, ControlError};

#[derive(Debug, thiserror::Error)]
pub enum FcError {
    #[error("The requested operation is not supported before starting the microVM.")]
    NotStarted,
    #[error("The requested operation is not supported after starting the microVM.")]
    Started,
    #[error("The microVM is not running.")]
    NotRunning,
    #[error(transparent)]
    Pending(#[from] PendingError),
    #[error("Logger error: Invalid log level: {0}")]
    LogLevel(String),
    #[error("Logger error: Failed to open target file: {0}")]
    LogFile(#[source] std::io::Error),
    #[error("Metrics error: Cannot initialize the metrics system due to bad user input: Reinitialization of metrics not allowed.")]
    MetricsAgain,
    #[error("Metrics error: Cannot initialize the metrics system due to bad user input: {0}")]
    MetricsFile(#[source] std::io::Error),
    #[error("Metrics error: cannot write a metrics line: {0}")]
    MetricsWrite(#[source] std::io::Error),
    #[error("Start microvm error: cannot {what}: {source}")]
    Start {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("Start microvm error: {0}")]
    Launch(#[source] crate::api::launch::LaunchError),
    #[error("Start microvm error: the VM did not start; see the log")]
    DidNotStart,
    #[error("The microVM's VMM is not running.")]
    VmmGone(#[source] ControlError),
    #[error("Drive config error: Unable to patch the block device: Failed perform action on device: Device not found Please verify the request arguments.")]
    NoSuchDrive,
    #[error("Drive config error: Unable to patch the block device: Block: Running method expected different backend. Please verify the request arguments.")]
    NoBackingFile,
    #[error("Drive config error: Unable to patch the block device: Block: Virtio backend error: Error manipulating the backing file: {source} {} Please verify the request arguments.", path.display())]
    BackingFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Drive config error: Unable to patch the block device: Block: the VMM refused the new backing file {} ({answer:?}) Please verify the request arguments.", path.display())]
    SwapRefused { path: PathBuf, answer: Answer },
    #[error("The VMM refused SendCtrlAltDel ({0:?})")]
    CtrlAltDelRefused(Answer),
    #[error(transparent)]
    ConfigFile(#[from] crate::hostfile::HostFileError),
    #[error("Invalid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("\"{0}\" is not supported by bulkhead")]
    Unsupported(&'static str),
    #[error("Create snapshot error: Cannot save the microVM state: Operation not allowed: the microVM is not paused")]
    SnapshotNotPaused,
    #[error("Create snapshot error: Diff snapshots need dirty page tracking: set track_dirty_pages in /machine-config, or in /snapshot/load for a restored microVM")]
    DiffUntracked,
    #[error("Create snapshot error: Cannot perform open on the {what} file {}: {source}", path.display())]
    SnapshotFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: crate::snapshot::client::ClientError,
    },
    #[error("Create snapshot error: Cannot perform rename on the {what} file: {source}")]
    SnapshotCommit {
        what: &'static str,
        #[source]
        source: crate::snapshot::client::ClientError,
    },
    #[error("Create snapshot error: the VMM could not write the snapshot ({0:?}); see the log")]
    SnapshotFailed(Answer),
    #[error("Loading a microVM snapshot not allowed after configuring boot-specific resources.")]
    LoadNotAllowed,
    #[error("Load snapshot error: {0}")]
    LoadParams(&'static str),
    #[error("Load snapshot error: network_overrides names iface_id {0:?}, which the snapshot has no network interface of (snapshots bulkhead took before it kept interface ids have none)")]
    NoSuchIface(String),
    #[error("Load snapshot error: Failed to restore from snapshot: {0}")]
    LoadState(#[source] crate::snapshot::SnapshotError),
    #[error("Failed to {0} the microVM: the VMM answered {1:?}")]
    PauseRefused(&'static str, Answer),
}
