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
    #[error(
        "a restore may give each network device its tap again, and nothing else about it: {0}"
    )]
    NetGiven(String),
    #[error("snapshot {}: its settings do not parse: {source}", path.display())]
    Machine {
        path: std::path::PathBuf,
        #[source]
        source: crate::ConfigError,
    },
}

/// The settings of a restore: the snapshot's machine, and from `raw` who runs it and how (a
/// machine setting given again is refused: the snapshot fixes it). The exceptions are what a
/// clone on the same host can not share with the VM it was taken from: the vsock device's CID
/// and socket (the guest learns its new CID from the transport reset it gets on restore), and
/// each network device's tap (the guest's MAC and the device's limits stay the snapshot's).
/// `raw` without a restore is returned as it is. Reads the state file: `bulkhead run` and the
/// Firecracker personality's VM process call this before validating the settings.
pub fn restore_settings(raw: crate::RawConfig) -> Result<crate::RawConfig, RestoreSettingsError> {
    let Some(restore) = raw.restore.clone() else {
        return Ok(raw);
    };
    let mut given = raw.machine_fields_given();
    given.retain(|f| *f != "vsock" && *f != "nets");
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
    let mut raw = raw;
    if let Some(given) = raw.nets.take() {
        raw.nets = Some(move_taps(machine.nets.clone().unwrap_or_default(), given)?);
    }
    Ok(machine.overlay(raw))
}

/// The snapshot's network devices with the taps `given` names, in the same order: one entry
/// per device, each naming only its tap (a MAC or id, if given, must be the snapshot's).
pub fn move_taps(
    saved: Vec<crate::config::RawNet>,
    given: Vec<crate::config::RawNet>,
) -> Result<Vec<crate::config::RawNet>, RestoreSettingsError> {
    if saved.len() != given.len() {
        return Err(RestoreSettingsError::NetGiven(format!(
            "the snapshot has {} network devices and {} were given",
            saved.len(),
            given.len()
        )));
    }
    let same_mac = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    saved
        .into_iter()
        .zip(given)
        .enumerate()
        .map(|(index, (saved, given))| {
            let differs = given
                .mac
                .as_deref()
                .is_some_and(|m| !saved.mac.as_deref().is_some_and(|s| same_mac(s, m)))
                || given
                    .id
                    .as_ref()
                    .is_some_and(|id| saved.id.as_ref() != Some(id))
                || given.rx_rate_limiter.is_some()
                || given.tx_rate_limiter.is_some();
            if differs {
                return Err(RestoreSettingsError::NetGiven(format!(
                    "device {index} (tap {}) was given a MAC, id or rate limit of its own",
                    given.tap
                )));
            }
            Ok(crate::config::RawNet {
                tap: given.tap,
                ..saved
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(tap: &str, mac: Option<&str>, id: Option<&str>) -> crate::config::RawNet {
        crate::config::RawNet {
            tap: tap.into(),
            mac: mac.map(Into::into),
            id: id.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn a_restore_moves_each_devices_tap_and_keeps_its_mac_id_and_limits() {
        let mut limited = net("tap0", Some("06:00:00:00:00:01"), Some("eth0"));
        limited.rx_rate_limiter = Some(Default::default());
        let saved = vec![
            limited.clone(),
            net("tap1", Some("06:00:00:00:00:02"), None),
        ];
        let moved = move_taps(
            saved,
            vec![
                net("clone0", Some("06:00:00:00:00:01"), Some("eth0")),
                net("clone1", None, None),
            ],
        )
        .unwrap();
        assert_eq!(
            moved[0],
            crate::config::RawNet {
                tap: "clone0".into(),
                ..limited
            }
        );
        assert_eq!(moved[1], net("clone1", Some("06:00:00:00:00:02"), None));
    }

    #[test]
    fn a_restore_may_not_add_drop_or_change_a_network_device() {
        let saved = || vec![net("tap0", Some("06:00:00:00:00:01"), Some("eth0"))];
        let refused = |given: Vec<crate::config::RawNet>| {
            matches!(
                move_taps(saved(), given),
                Err(RestoreSettingsError::NetGiven(_))
            )
        };
        assert!(refused(vec![]));
        assert!(refused(vec![net("a", None, None), net("b", None, None)]));
        assert!(refused(vec![net("a", Some("06:00:00:00:00:09"), None)]));
        assert!(refused(vec![net("a", None, Some("eth1"))]));
        let mut limited = net("a", None, None);
        limited.tx_rate_limiter = Some(Default::default());
        assert!(refused(vec![limited]));
    }
}
