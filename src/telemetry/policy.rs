//! What follows an alert: `--on-violation log|reset-device|stop-vm`.

use super::vocabulary::Rule;

/// The operator's choice of response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnViolation {
    /// Alert only.
    Log,
    /// Put the offending virtio device in NEEDS_RESET (virtio rules); alert only for the rest.
    #[default]
    ResetDevice,
    /// End the VM (status 86) on any alert.
    StopVm,
}

/// What is done about one rule firing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    Log,
    ResetDevice,
    StopVm,
}

impl OnViolation {
    pub fn response(self, rule: Rule) -> Response {
        match self {
            OnViolation::Log => Response::Log,
            OnViolation::ResetDevice if rule.is_virtio() => Response::ResetDevice,
            OnViolation::ResetDevice => Response::Log,
            OnViolation::StopVm => Response::StopVm,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OnViolation::Log => "log",
            OnViolation::ResetDevice => "reset-device",
            OnViolation::StopVm => "stop-vm",
        }
    }
}

/// An `--on-violation` that names no policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --on-violation {0:?}: expected log, reset-device or stop-vm")]
pub struct UnknownPolicy(pub String);

impl std::str::FromStr for OnViolation {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "log" => Ok(OnViolation::Log),
            "reset-device" => Ok(OnViolation::ResetDevice),
            "stop-vm" => Ok(OnViolation::StopVm),
            _ => Err(UnknownPolicy(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_resets_virtio_devices_and_only_logs_the_rest() {
        let d = OnViolation::default();
        assert_eq!(d.response(Rule::VirtioBadChain), Response::ResetDevice);
        assert_eq!(d.response(Rule::NetMacSpoof), Response::Log);
        assert_eq!(d.response(Rule::PioScan), Response::Log);
        assert_eq!(
            OnViolation::Log.response(Rule::VirtioBadChain),
            Response::Log
        );
        assert_eq!(
            OnViolation::StopVm.response(Rule::MsrProbe),
            Response::StopVm
        );
    }
}
