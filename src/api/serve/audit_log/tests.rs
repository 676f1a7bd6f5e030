//! Audit log tests: chains written, broken in every way, and recovered.
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
    let dir = std::env::temp_dir().join(format!("bulkhead-audit-{}-{name}", std::process::id()));
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

#[test]
fn a_torn_last_line_is_kept_aside_and_cut_and_the_log_goes_on() {
    let path = written("torn", 2);
    let before = check(&path).unwrap();
    let mut text = std::fs::read(&path).unwrap();
    text.extend_from_slice(b"{\"seq\":3,\"ti");
    std::fs::write(&path, &text).unwrap();
    // Refused as it is, by the plain open...
    assert!(matches!(
        AuditLog::open(&path),
        Err(AuditError::Broken { .. })
    ));
    // ...and recovered by the daemon's.
    let (mut log, recovered) = AuditLog::open_recovering(&path).unwrap();
    let Some(Recovered::Cut {
        offset,
        bytes,
        saved_to,
    }) = recovered
    else {
        panic!("{recovered:?}");
    };
    assert_eq!((offset, bytes), (text.len() as u64 - 12, 12));
    assert_eq!(std::fs::read(&saved_to).unwrap(), b"{\"seq\":3,\"ti");
    assert_eq!(log.head(), before.head);
    log.append(record(503), SystemTime::now()).unwrap();
    assert_eq!(check(&path).unwrap().entries, 3);
}

#[test]
fn a_whole_last_line_without_its_newline_gets_one() {
    let path = written("newline", 3);
    let mut text = std::fs::read(&path).unwrap();
    text.pop();
    std::fs::write(&path, &text).unwrap();
    let (mut log, recovered) = AuditLog::open_recovering(&path).unwrap();
    assert_eq!(recovered, Some(Recovered::Completed { line: 3 }));
    log.append(record(200), SystemTime::now()).unwrap();
    assert_eq!(check(&path).unwrap().entries, 4);
}

#[test]
fn a_break_before_the_last_line_is_not_recovered() {
    let path = written("midbreak", 3);
    let mut l = lines(&path);
    l[0] = l[0].replace("\"outcome\":200", "\"outcome\":403");
    let mut text = l.join("\n");
    text.push_str("\n{\"seq\":4");
    std::fs::write(&path, text).unwrap();
    assert!(matches!(
        AuditLog::open_recovering(&path),
        Err(AuditError::Broken { source, .. }) if source.line == 2
    ));
}

#[test]
fn a_kept_head_is_found_until_the_log_is_cut_before_it() {
    let path = written("head", 3);
    let kept = check(&path).unwrap().head;
    let mut log = AuditLog::open(&path).unwrap();
    log.append(record(200), SystemTime::now()).unwrap();
    let (intact, at) = verify_file_with_head(&path, &kept).unwrap().unwrap();
    assert_eq!((intact.entries, at), (4, Some(3)));
    // Cut after line 2: a shorter chain that holds, without the kept head.
    let l = lines(&path);
    rewrite(&path, &l[..2]);
    let (intact, at) = verify_file_with_head(&path, &kept).unwrap().unwrap();
    assert_eq!((intact.entries, at), (2, None));
    assert_eq!(
        verify_file_with_head(&path, GENESIS).unwrap().unwrap().1,
        Some(0)
    );
}

#[test]
fn a_huge_path_or_reason_is_kept_short() {
    let path = scratch("bounded");
    let mut log = AuditLog::open(&path).unwrap();
    let mut r = record(404);
    r.path = format!("/v1/vms/{}", "x".repeat(60_000));
    r.reason = Some("é".repeat(5_000));
    let e = log.append(r, SystemTime::now()).unwrap();
    assert!(e.path.len() < MAX_FIELD + 32, "{}", e.path.len());
    assert!(
        e.path.ends_with("(60008 bytes)"),
        "{}",
        &e.path[e.path.len() - 20..]
    );
    assert!(e.reason.unwrap().len() < MAX_FIELD + 32);
    assert!(check(&path).is_ok());
}
