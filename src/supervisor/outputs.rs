//! The supervisor's outputs: the metrics file (replaced atomically, the node_exporter
//! textfile convention) and the alert sinks (a JSON-lines file or stderr, and an HTTP
//! endpoint). All are opened before the supervisor confines itself.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::config::{AlertsTarget, ConsoleConfig, VmConfig};
use crate::telemetry::{MetricsSnapshot, Page, Region, RegionError, SupervisorFacts};

use super::http::{Endpoint, HttpSink};

/// Errors opening an output: bad input, reported before the VM starts.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot open console file {path}: {source}")]
    Console {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open alerts file {path}: {source}")]
    Alerts {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the metrics file {path}: {source}")]
    Metrics {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Http(#[from] super::http::HttpError),
    #[error(transparent)]
    Region(#[from] RegionError),
}

/// Writes the metrics of VM `config` before anything of it runs, for a front end that starts
/// it (`bulkhead serve`): its shape, running, every counter at zero.
pub fn write_initial_metrics(config: &VmConfig, path: &Path) -> Result<(), OutputError> {
    let page = Region::anonymous()?;
    MetricsFile::open(path)?.write_initial(config, &page, SystemTime::now())
}

/// The metrics file: written to a hidden sibling, then renamed over the real name, so a
/// reader never sees half a file.
#[derive(Debug)]
pub struct MetricsFile {
    path: PathBuf,
    tmp: PathBuf,
}

impl MetricsFile {
    /// Checks the file can be written now, so a bad path fails before the VM starts. The
    /// file itself is left as it is until the first snapshot replaces it: never emptied.
    pub fn open(path: &Path) -> Result<MetricsFile, OutputError> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let Some(name) = name else {
            return Err(OutputError::Metrics {
                path: path.to_path_buf(),
                source: std::io::Error::other("it names no file"),
            });
        };
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        let file = MetricsFile {
            path: path.to_path_buf(),
            tmp,
        };
        file.create_tmp()?;
        std::fs::remove_file(&file.tmp).map_err(|source| OutputError::Metrics {
            path: file.path.clone(),
            source,
        })?;
        Ok(file)
    }

    fn create_tmp(&self) -> Result<File, OutputError> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.tmp)
            .map_err(|source| OutputError::Metrics {
                path: self.path.clone(),
                source,
            })
    }

    /// Writes what a VM's metrics are before its process runs (its shape, running, every
    /// counter at zero, from `page`): what a scrape sees from the moment it is started.
    pub fn write_initial(
        &self,
        config: &VmConfig,
        page: &Page,
        start_wall: SystemTime,
    ) -> Result<(), OutputError> {
        let facts = initial_facts(config, start_wall);
        let text = MetricsSnapshot::collect(page, &facts)
            .encode(&config.process.vm_id, &config.process.tenant)
            .map_err(|e| OutputError::Metrics {
                path: self.path.clone(),
                source: std::io::Error::other(e),
            })?;
        self.write(&text)
    }

    pub fn write(&self, text: &str) -> Result<(), OutputError> {
        let err = |source| OutputError::Metrics {
            path: self.path.clone(),
            source,
        };
        let mut f = self.create_tmp()?;
        f.write_all(text.as_bytes()).map_err(err)?;
        drop(f);
        std::fs::rename(&self.tmp, &self.path).map_err(err)
    }
}

/// What the supervisor knows of a VM before its process starts: the VM's shape, running, and
/// nothing counted yet.
pub fn initial_facts(config: &VmConfig, start_wall: SystemTime) -> SupervisorFacts {
    SupervisorFacts {
        vcpus: config.vm.vcpus as usize,
        devices: config.vm.device_names(),
        guest_memory_bytes: config.vm.mem_bytes(),
        running: true,
        start_time_seconds: start_wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
        ..SupervisorFacts::default()
    }
}

/// Where alert lines go.
pub enum AlertLines {
    Stderr,
    File(File),
}

impl AlertLines {
    pub fn open(target: &AlertsTarget) -> Result<AlertLines, OutputError> {
        match target {
            AlertsTarget::Stderr => Ok(AlertLines::Stderr),
            AlertsTarget::File(path) => OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map(AlertLines::File)
                .map_err(|source| OutputError::Alerts {
                    path: path.clone(),
                    source,
                }),
        }
    }

    /// Writes one line (whole, in one write, so concurrent writers do not interleave).
    pub fn write(&mut self, line: &str) {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        let result = match self {
            AlertLines::Stderr => std::io::stderr().lock().write_all(&buf),
            AlertLines::File(f) => f.write_all(&buf),
        };
        if let Err(e) = result {
            crate::warn_limited!("cannot write an alert: {e}");
        }
    }
}

/// Everything the supervisor writes to, opened up front (a bad path is bad input, reported
/// before the VM starts). The HTTP delivery thread starts later, once the VM process is
/// forked: a fork must find the supervisor single-threaded.
pub struct Outputs {
    pub console: Option<File>,
    pub metrics: Option<MetricsFile>,
    pub alerts: Option<AlertLines>,
    endpoint: Option<Endpoint>,
    pub http: Option<HttpSink>,
}

impl Outputs {
    pub fn open(config: &VmConfig) -> Result<Outputs, OutputError> {
        let console = match &config.vm.console {
            ConsoleConfig::File(path) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(path)
                    .map_err(|source| OutputError::Console {
                        path: path.clone(),
                        source,
                    })?,
            ),
            _ => None,
        };
        let s = &config.process.supervision;
        Ok(Outputs {
            console,
            metrics: s
                .metrics_file
                .as_deref()
                .map(MetricsFile::open)
                .transpose()?,
            alerts: s.alerts.as_ref().map(AlertLines::open).transpose()?,
            endpoint: s.alerts_http.as_ref().map(Endpoint::resolve).transpose()?,
            http: None,
        })
    }

    /// Starts delivering alerts to the HTTP endpoint, if there is one.
    pub fn start_http(&mut self) -> Result<(), super::http::HttpError> {
        if let Some(endpoint) = self.endpoint.take() {
            self.http = Some(HttpSink::start(endpoint)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_file_is_replaced_whole_and_leaves_no_temporary_behind() {
        let dir = std::env::temp_dir().join(format!("bulkhead-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.prom");
        let m = MetricsFile::open(&path).unwrap();
        m.write("a 1\n").unwrap();
        m.write("a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a 2\n");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("vm.prom")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_metrics_path_in_a_missing_directory_is_refused_up_front() {
        assert!(MetricsFile::open(Path::new("/nonexistent-dir/x.prom")).is_err());
    }
}
