//! A restore's settings: the snapshot's machine under the caller's process settings.

use super::{read, SnapshotError};

/// Why a restore's settings can not be made.
#[derive(Debug, thiserror::Error)]
pub enum RestoreSettingsError {
    #[error("a restore takes the machine from the snapshot; these settings can not be given with it: {0}")]
    MachineGiven(String),
    #[error("snapshot {}: {source}", path.display())]
    State {
        path: std::path::PathBuf,
        #[source]
        source: SnapshotError,
    },
    #[error("snapshot {}: its settings do not parse: {source}", path.display())]
    Machine {
        path: std::path::PathBuf,
        #[source]
        source: crate::ConfigError,
    },
}

/// The settings of a restore: the snapshot's machine, and from `raw` who runs it and how (a
/// machine setting given again is refused: the snapshot fixes it). The one exception is the
/// vsock device's CID and socket: each clone of a snapshot needs its own (the guest learns its
/// new CID from the transport reset it gets on restore). `raw` without a restore is returned as
/// it is. Reads the state file: `bulkhead run` and the Firecracker personality's VM process
/// call this before validating the settings.
pub fn restore_settings(raw: crate::RawConfig) -> Result<crate::RawConfig, RestoreSettingsError> {
    let Some(restore) = raw.restore.clone() else {
        return Ok(raw);
    };
    let mut given = raw.machine_fields_given();
    given.retain(|f| *f != "vsock");
    if !given.is_empty() {
        return Err(RestoreSettingsError::MachineGiven(given.join(", ")));
    }
    let path = restore.state;
    let state_error = |source| RestoreSettingsError::State {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(|e| state_error(SnapshotError::Read(e)))?;
    let saved = read(&file).map_err(state_error)?;
    let machine = crate::RawConfig::from_json(&saved.machine).map_err(|source| {
        RestoreSettingsError::Machine {
            path: path.clone(),
            source,
        }
    })?;
    if raw.vsock.is_some() && machine.vsock.is_none() {
        return Err(RestoreSettingsError::MachineGiven(
            "vsock (the snapshot has no vsock device)".into(),
        ));
    }
    Ok(machine.overlay(raw))
}
