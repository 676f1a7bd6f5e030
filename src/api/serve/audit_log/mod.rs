//! The management plane's audit log: one JSON line per request, allowed or refused. Each line
//! carries the SHA-256 of the line before it (the first, of nothing: 64 zeros), and a sequence
//! number, so editing, deleting or reordering lines breaks the chain where it happened, and
//! [`verify`] names that line. Truncating the tail leaves a shorter valid chain: an auditor
//! compares the head hash [`verify`] reports with one kept elsewhere.
//!
//! The hash covers the line's exact bytes (without its newline), so no canonical JSON form is
//! needed: whatever the writer wrote is what the reader checks.
//!
//! Nothing is done that the log can not record: the daemon reserves room for the next lines
//! ([`AuditLog::reserve`]) before it acts on a request and refuses the request (503) when it
//! can not; a failed write is cut back so no torn line is left; and a torn last line found at
//! start (the disk filled up, or the machine stopped, mid-write) is set aside and cut, and the
//! recovery is itself logged ([`AuditLog::open_recovering`]). The head (the last line's hash)
//! is what an auditor keeps elsewhere: `bulkhead audit-log verify --head HASH` finds it in the
//! chain, or says the log was cut or rewritten.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// 1 for the first line, one more for each after it.
    pub seq: u64,
    /// RFC 3339, UTC.
    pub time: String,
    /// The caller, from SO_PEERCRED.
    pub uid: u32,
    pub pid: i32,
    /// The tenant the request was made as (from the socket), if any.
    pub tenant: Option<String>,
    pub method: String,
    pub path: String,
    pub vm: Option<String>,
    /// The HTTP status answered.
    pub outcome: u16,
    /// Why it was refused, or an admin's break-glass reason.
    pub reason: Option<String>,
    /// The SHA-256 of the previous line, in lower-case hex.
    pub prev: String,
}

/// A request to log; the log adds the sequence number, time and chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub uid: u32,
    pub pid: i32,
    pub tenant: Option<String>,
    pub method: String,
    pub path: String,
    pub vm: Option<String>,
    pub outcome: u16,
    pub reason: Option<String>,
}

/// What the daemon does of its own accord, audited as a request of uid 0 would be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonAction {
    /// Dealt with an unfinished last line of this log at start.
    Recover,
    /// Removed an exited VM past its tenant's `max_exited_vms`.
    Reap,
    /// Refused requests past a tenant socket's rate (one line a second for all of them).
    RateLimited,
}

impl DaemonAction {
    /// The `method` its line carries.
    pub fn method(self) -> &'static str {
        match self {
            DaemonAction::Recover => "RECOVER",
            DaemonAction::Reap => "REAP",
            DaemonAction::RateLimited => "RATE_LIMITED",
        }
    }
}

impl Record {
    /// The line for something the daemon did itself: uid 0, the daemon's pid.
    pub fn of_daemon(
        action: DaemonAction,
        tenant: Option<String>,
        path: String,
        vm: Option<String>,
        outcome: u16,
        reason: String,
    ) -> Record {
        Record {
            uid: 0,
            pid: i32::try_from(std::process::id()).unwrap_or(0),
            tenant,
            method: action.method().to_string(),
            path,
            vm,
            outcome,
            reason: Some(reason),
        }
    }
}

/// Where a chain breaks: the 1-based line number and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct ChainBreak {
    pub line: u64,
    pub problem: String,
}

/// A chain that holds: how many entries, and the hash of the last line (the head).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intact {
    pub entries: u64,
    pub head: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the audit log {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the audit log {path} is broken at {source}; it is not appended to")]
    Broken {
        path: PathBuf,
        #[source]
        source: ChainBreak,
    },
    #[error("cannot append to the audit log {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks the chain line by line. A read error is reported as an `Err` of the outer result.
pub fn verify(reader: impl BufRead) -> Result<Result<Intact, ChainBreak>, std::io::Error> {
    verify_seeing(reader, |_, _| {})
}

/// Checks the chain and whether `head` (a line's hash an auditor kept) is in it: the line it
/// names, 0 for the empty chain's [`GENESIS`], or None when no line hashes to it (the log was
/// cut before it, or rewritten).
pub fn verify_with_head(
    reader: impl BufRead,
    head: &str,
) -> Result<Result<(Intact, Option<u64>), ChainBreak>, std::io::Error> {
    let mut at = (head == GENESIS).then_some(0);
    let chain = verify_seeing(reader, |n, hash| {
        if hash == head {
            at = Some(n);
        }
    })?;
    Ok(chain.map(|intact| (intact, at)))
}

/// [`verify`], telling `seen` each line's number and hash.
fn verify_seeing(
    reader: impl BufRead,
    mut seen: impl FnMut(u64, &str),
) -> Result<Result<Intact, ChainBreak>, std::io::Error> {
    let mut head = GENESIS.to_string();
    let mut entries = 0u64;
    for (n, raw) in (1u64..).zip(reader.split(b'\n')) {
        let raw = raw?;
        let broken = |problem: String| Ok(Err(ChainBreak { line: n, problem }));
        let Ok(text) = std::str::from_utf8(&raw) else {
            return broken("not UTF-8".into());
        };
        let entry: Entry = match serde_json::from_str(text) {
            Ok(e) => e,
            Err(e) => return broken(format!("not an audit entry ({e})")),
        };
        if entry.seq != n {
            return broken(format!(
                "sequence number {} where {n} belongs: a line was removed, added or moved",
                entry.seq
            ));
        }
        if entry.prev != head {
            return broken(format!(
                "does not chain to line {}: that line was changed, or lines were removed or moved",
                n - 1
            ));
        }
        head = sha256_hex(&raw);
        seen(n, &head);
        entries = n;
    }
    Ok(Ok(Intact { entries, head }))
}

/// Verifies the log at `path` and looks for `head` in it (see [`verify_with_head`]).
pub fn verify_file_with_head(
    path: &Path,
    head: &str,
) -> Result<Result<(Intact, Option<u64>), ChainBreak>, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    verify_with_head(BufReader::new(file), head).map_err(|source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Opens (or creates, mode 0600) the log file, never through a symlink: for appending, or for
/// writing anywhere (recovery).
fn open_file(path: &Path, append: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!append)
        .append(append)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The last byte of a file of `len` bytes.
fn last_byte(file: &File, len: u64) -> std::io::Result<u8> {
    let mut b = [0u8];
    file.read_exact_at(&mut b, len - 1)?;
    Ok(b[0])
}

/// Where the last line of a file of `len` bytes starts (after the last newline, or 0).
fn last_line_start(file: &File, len: u64) -> std::io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        if len - start > MAX_TORN {
            return Ok(start);
        }
        end = start;
    }
    Ok(0)
}

/// Verifies the log at `path`.
pub fn verify_file(path: &Path) -> Result<Result<Intact, ChainBreak>, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    verify(BufReader::new(file)).map_err(|source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The log, open for appending.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    seq: u64,
    head: String,
    /// Bytes of whole lines: where the next line starts.
    len: u64,
}

/// Room kept free past the log's end for the next lines.
pub const RESERVE: u64 = 256 << 10;
/// What of a request's path and reason a line keeps (a path can be as long as a request).
pub const MAX_FIELD: usize = 1024;
/// The longest last line a torn write can leave: anything longer is not one of ours.
const MAX_TORN: u64 = 1 << 20;

/// How a last line without its newline was dealt with at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// It was whole and chained: only the newline was missing, and it was added.
    Completed { line: u64 },
    /// It was cut short: its bytes were kept in `saved_to` and cut from the log.
    Cut {
        offset: u64,
        bytes: u64,
        saved_to: PathBuf,
    },
}

/// Cuts `text` to [`MAX_FIELD`] bytes (at a character boundary), saying so.
fn bounded(text: String) -> String {
    if text.len() <= MAX_FIELD {
        return text;
    }
    let mut end = MAX_FIELD;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...({} bytes)", &text[..end], text.len())
}

impl AuditLog {
    /// Opens (or creates, mode 0600) the log at `path`, after checking the chain it already
    /// holds: a broken log is refused rather than extended, so the break stays visible.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let open_err = |source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = open_file(path, true).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        let intact = verify(BufReader::new(&file))
            .map_err(|source| AuditError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .map_err(|source| AuditError::Broken {
                path: path.to_path_buf(),
                source,
            })?;
        if len > 0 && last_byte(&file, len).map_err(open_err)? != b'\n' {
            // Whole lines only: the next line would be glued to this one.
            return Err(AuditError::Broken {
                path: path.to_path_buf(),
                source: ChainBreak {
                    line: intact.entries,
                    problem: "the last line has no newline".into(),
                },
            });
        }
        Ok(AuditLog {
            path: path.to_path_buf(),
            file,
            seq: intact.entries,
            head: intact.head,
            len,
        })
    }

    /// [`AuditLog::open`], after dealing with a last line a write left without its newline:
    /// a whole line that chains gets its newline; a torn one is saved beside the log
    /// (`PATH.torn-NANOSECONDS`, 0600) and cut. Any other break is refused as by `open`.
    pub fn open_recovering(path: &Path) -> Result<(AuditLog, Option<Recovered>), AuditError> {
        let open_err = |source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        };
        let write_err = |source| AuditError::Write {
            path: path.to_path_buf(),
            source,
        };
        let file = open_file(path, false).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        if len == 0 || last_byte(&file, len).map_err(open_err)? == b'\n' {
            drop(file);
            return Ok((AuditLog::open(path)?, None));
        }
        let start = last_line_start(&file, len).map_err(open_err)?;
        if len - start > MAX_TORN {
            drop(file);
            return Ok((AuditLog::open(path)?, None));
        }
        let mut torn = vec![0u8; (len - start) as usize];
        file.read_exact_at(&mut torn, start).map_err(open_err)?;
        // What comes before must hold; then is the last line whole and chained?
        let before = verify(BufReader::new((&file).take(start)))
            .map_err(|source| AuditError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .map_err(|source| AuditError::Broken {
                path: path.to_path_buf(),
                source,
            })?;
        let whole = serde_json::from_slice::<Entry>(&torn)
            .is_ok_and(|e| e.seq == before.entries + 1 && e.prev == before.head);
        let recovered = if whole {
            file.write_all_at(b"\n", len).map_err(write_err)?;
            Recovered::Completed {
                line: before.entries + 1,
            }
        } else {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".torn-{nanos}"));
            let saved_to = PathBuf::from(name);
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&saved_to)
                .and_then(|mut f| f.write_all(&torn).and_then(|()| f.sync_all()))
                .map_err(write_err)?;
            file.set_len(start).map_err(write_err)?;
            Recovered::Cut {
                offset: start,
                bytes: len - start,
                saved_to,
            }
        };
        file.sync_all().map_err(write_err)?;
        drop(file);
        Ok((AuditLog::open(path)?, Some(recovered)))
    }

    /// Makes sure the next lines can be written: room for [`RESERVE`] bytes is allocated past
    /// the end (the file's size unchanged), so a full disk is found before a request is acted
    /// on, not when its line is written. A file system that can not reserve (no fallocate)
    /// is taken at its word.
    pub fn reserve(&mut self) -> Result<(), AuditError> {
        // SAFETY: fallocate on a descriptor this log owns, with integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                self.len as libc::off_t,
                RESERVE as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Ok(());
        }
        Err(AuditError::Write {
            path: self.path.clone(),
            source: e,
        })
    }

    /// Lines in the log.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Appends `record` as the next line, written whole and synced before it returns.
    pub fn append(&mut self, record: Record, time: SystemTime) -> Result<Entry, AuditError> {
        let write_err = |source| AuditError::Write {
            path: self.path.clone(),
            source,
        };
        let entry = Entry {
            seq: self.seq + 1,
            time: humantime::format_rfc3339_millis(time).to_string(),
            uid: record.uid,
            pid: record.pid,
            tenant: record.tenant,
            method: record.method,
            path: bounded(record.path),
            vm: record.vm,
            outcome: record.outcome,
            reason: record.reason.map(bounded),
            prev: self.head.clone(),
        };
        let line = serde_json::to_string(&entry)
            .map_err(|e| write_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let mut bytes = line.clone().into_bytes();
        bytes.push(b'\n');
        // One write of the whole line: O_APPEND places it after everything before it. A write
        // or sync that fails is cut back, so no torn line is left for the next to follow.
        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            let _ = self.file.set_len(self.len);
            return Err(write_err(e));
        }
        self.len += bytes.len() as u64;
        self.seq = entry.seq;
        self.head = sha256_hex(line.as_bytes());
        Ok(entry)
    }

    /// The hash of the last line written: what an auditor compares the file's head with.
    pub fn head(&self) -> &str {
        &self.head
    }
}

#[cfg(test)]
mod tests;
