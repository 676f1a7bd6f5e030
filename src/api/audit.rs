//! The management plane's audit log: one JSON line per request, allowed or refused. Each line
//! carries the SHA-256 of the line before it (the first, of nothing: 64 zeros), and a sequence
//! number, so editing, deleting or reordering lines breaks the chain where it happened, and
//! [`verify`] names that line. Truncating the tail leaves a shorter valid chain: an auditor
//! compares the head hash [`verify`] reports with one kept elsewhere.
//!
//! The hash covers the line's exact bytes (without its newline), so no canonical JSON form is
//! needed: whatever the writer wrote is what the reader checks.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
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
        entries = n;
    }
    Ok(Ok(Intact { entries, head }))
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
}

impl AuditLog {
    /// Opens (or creates, mode 0600) the log at `path`, after checking the chain it already
    /// holds: a broken log is refused rather than extended, so the break stays visible.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let open_err = |source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        let intact = verify(BufReader::new(&file))
            .map_err(|source| AuditError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .map_err(|source| AuditError::Broken {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            file,
            seq: intact.entries,
            head: intact.head,
        })
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
            path: record.path,
            vm: record.vm,
            outcome: record.outcome,
            reason: record.reason,
            prev: self.head.clone(),
        };
        let line = serde_json::to_string(&entry)
            .map_err(|e| write_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let mut bytes = line.clone().into_bytes();
        bytes.push(b'\n');
        // One write of the whole line: O_APPEND places it after everything before it.
        self.file.write_all(&bytes).map_err(write_err)?;
        self.file.sync_data().map_err(write_err)?;
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
mod tests {
    use std::time::Duration;

    use super::*;

    fn record(n: u16) -> Record {
        Record {
            uid: 1001,
            pid: 4242,
            tenant: Some("acme".into()),
            method: "POST".into(),
            path: "/v1/vms".into(),
            vm: None,
            outcome: n,
            reason: None,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("bulkhead-audit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("audit.jsonl")
    }

    /// A log of `n` entries at a fresh path.
    fn written(name: &str, n: u16) -> PathBuf {
        let path = scratch(name);
        let mut log = AuditLog::open(&path).unwrap();
        for i in 0..n {
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + u64::from(i));
            log.append(record(200 + i), t).unwrap();
        }
        path
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn rewrite(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(path, text).unwrap();
    }

    fn check(path: &Path) -> Result<Intact, ChainBreak> {
        verify_file(path).unwrap()
    }

    #[test]
    fn a_log_written_by_appends_verifies_and_reopens_where_it_ended() {
        let path = written("intact", 3);
        let first = check(&path).unwrap();
        assert_eq!(first.entries, 3);
        let l = lines(&path);
        assert!(
            l[0].contains(&format!("\"prev\":\"{GENESIS}\"")),
            "{}",
            l[0]
        );
        assert!(
            l[0].contains("\"time\":\"2027-01-15T08:00:00.000Z\""),
            "{}",
            l[0]
        );
        // Reopened, the log continues the chain from its last line.
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head(), first.head);
        let e = log.append(record(404), SystemTime::now()).unwrap();
        assert_eq!((e.seq, e.prev.as_str()), (4, first.head.as_str()));
        assert_eq!(check(&path).unwrap().entries, 4);
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn an_edited_line_breaks_the_chain_at_the_line_after_it() {
        let path = written("edit", 4);
        let mut l = lines(&path);
        l[1] = l[1].replace("\"outcome\":201", "\"outcome\":403");
        rewrite(&path, &l);
        let b = check(&path).unwrap_err();
        assert_eq!(b.line, 3, "{b}");
        assert!(b.problem.contains("does not chain to line 2"), "{b}");
        // And the daemon refuses to extend it.
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Broken { source, .. }) if source.line == 3
        ));
    }

    #[test]
    fn deleted_and_reordered_lines_are_named() {
        let path = written("delete", 4);
        let mut l = lines(&path);
        l.remove(1);
        rewrite(&path, &l);
        let b = check(&path).unwrap_err();
        assert_eq!(b.line, 2, "{b}");
        assert!(
            b.problem.contains("sequence number 3 where 2 belongs"),
            "{b}"
        );

        let path = written("swap", 4);
        let mut l = lines(&path);
        l.swap(2, 3);
        rewrite(&path, &l);
        assert_eq!(check(&path).unwrap_err().line, 3);
    }

    #[test]
    fn a_forged_line_with_a_renumbered_tail_still_breaks() {
        // Removing line 2 and renumbering what follows keeps the sequence but not the chain.
        let path = written("renumber", 3);
        let l = lines(&path);
        let mut third: Entry = serde_json::from_str(&l[2]).unwrap();
        third.seq = 2;
        rewrite(
            &path,
            &[l[0].clone(), serde_json::to_string(&third).unwrap()],
        );
        let b = check(&path).unwrap_err();
        assert_eq!(b.line, 2);
        assert!(b.problem.contains("does not chain to line 1"), "{b}");
    }

    #[test]
    fn garbage_and_torn_lines_are_not_entries() {
        let path = written("garbage", 2);
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"seq\":3,\"ti");
        std::fs::write(&path, &text).unwrap();
        let b = check(&path).unwrap_err();
        assert_eq!(b.line, 3);
        assert!(b.problem.starts_with("not an audit entry"), "{b}");
        let path = written("binary", 1);
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"\xff\xfe\n");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(check(&path).unwrap_err().problem, "not UTF-8");
    }

    #[test]
    fn an_empty_log_is_an_intact_chain_of_nothing() {
        let path = scratch("empty");
        std::fs::write(&path, b"").unwrap();
        assert_eq!(
            check(&path).unwrap(),
            Intact {
                entries: 0,
                head: GENESIS.to_string()
            }
        );
    }

    #[test]
    fn a_symlink_is_not_opened_as_the_log() {
        let target = written("target", 1);
        let link = target.with_file_name("link.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            AuditLog::open(&link),
            Err(AuditError::Open { .. })
        ));
    }
}
