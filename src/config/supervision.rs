//! What the supervisor does around a VM: its outputs (metrics file, alerts), its time limit,
//! and the response to violations. Shapes only; nothing here opens a file or resolves a name.

use std::path::PathBuf;

use super::ConfigError;
use crate::telemetry::OnViolation;

/// Longest `--timeout`: a year, far beyond any CI job, and well inside a timer's range.
pub const MAX_TIMEOUT_SECS: u64 = 366 * 24 * 3600;

/// Where alerts go as JSON lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertsTarget {
    /// `-`: standard error.
    Stderr,
    /// Appended to a file.
    File(PathBuf),
}

impl std::str::FromStr for AlertsTarget {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err(ConfigError::Alerts(s.to_string())),
            "-" => Ok(AlertsTarget::Stderr),
            path => Ok(AlertsTarget::File(PathBuf::from(path))),
        }
    }
}

/// An `http://host[:port][/path]` endpoint taking falcosidekick's alert POSTs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl std::str::FromStr for HttpTarget {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::AlertsHttp(s.to_string());
        let rest = s.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            // An IPv6 literal in brackets keeps its colons.
            Some((h, p)) if !p.contains(']') => (h, p.parse::<u16>().map_err(|_| bad())?),
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ok_char = |c: char| c.is_ascii_alphanumeric() || ".-:".contains(c);
        if host.is_empty() || !host.chars().all(ok_char) || port == 0 {
            return Err(bad());
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad());
        }
        Ok(HttpTarget {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }
}

/// The supervisor's settings for one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Supervision {
    /// Prometheus text file, replaced every second and at exit.
    pub metrics_file: Option<PathBuf>,
    pub alerts: Option<AlertsTarget>,
    pub alerts_http: Option<HttpTarget>,
    /// Seconds the VM may run before the supervisor ends it.
    pub timeout_secs: Option<u64>,
    pub on_violation: OnViolation,
}

/// The supervisor's settings as given (the JSON file's and the flags' fields, merged by
/// `RawConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawSupervision {
    pub metrics_file: Option<PathBuf>,
    pub alerts: Option<String>,
    pub alerts_http: Option<String>,
    pub timeout: Option<u64>,
    pub on_violation: Option<String>,
}

impl RawSupervision {
    pub fn validate(self) -> Result<Supervision, ConfigError> {
        let timeout_secs = match self.timeout {
            Some(t) if t == 0 || t > MAX_TIMEOUT_SECS => return Err(ConfigError::Timeout(t)),
            t => t,
        };
        if self
            .metrics_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(ConfigError::MetricsFile);
        }
        Ok(Supervision {
            metrics_file: self.metrics_file,
            alerts: self.alerts.map(|a| a.parse()).transpose()?,
            alerts_http: self.alerts_http.map(|a| a.parse()).transpose()?,
            timeout_secs,
            on_violation: match self.on_violation {
                Some(v) => v.parse().map_err(ConfigError::OnViolation)?,
                None => OnViolation::default(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_targets_take_host_port_and_path() {
        let t: HttpTarget = "http://127.0.0.1:2801/".parse().unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 2801, "/")
        );
        let t: HttpTarget = "http://sidekick.local".parse().unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("sidekick.local", 80, "/")
        );
        let t: HttpTarget = "http://[::1]:9/alerts".parse().unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 9, "/alerts")
        );
        for bad in [
            "https://x/",
            "http://",
            "http://a b/",
            "http://x:0/",
            "http://x:99999/",
            "x",
        ] {
            assert!(bad.parse::<HttpTarget>().is_err(), "{bad}");
        }
    }

    #[test]
    fn timeouts_must_be_positive_and_sane() {
        let raw = |t| RawSupervision {
            timeout: Some(t),
            ..Default::default()
        };
        assert_eq!(raw(5).validate().unwrap().timeout_secs, Some(5));
        assert_eq!(raw(0).validate(), Err(ConfigError::Timeout(0)));
        assert!(raw(u64::MAX).validate().is_err());
    }

    #[test]
    fn alerts_go_to_stderr_with_a_dash_and_responses_parse() {
        let s = RawSupervision {
            alerts: Some("-".into()),
            on_violation: Some("stop-vm".into()),
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(s.alerts, Some(AlertsTarget::Stderr));
        assert_eq!(s.on_violation, OnViolation::StopVm);
        let bad = RawSupervision {
            on_violation: Some("panic".into()),
            ..Default::default()
        };
        assert!(matches!(bad.validate(), Err(ConfigError::OnViolation(_))));
    }
}
