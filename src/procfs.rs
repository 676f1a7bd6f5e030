//! What bulkhead reads of another process (or itself) in /proc: one reader of a `status` file
//! by field, a process's start time, its children and its threads. The supervisor, the jail's
//! self-check, the daemon's report and `bulkhead audit` all read through these.

use std::path::PathBuf;

/// A `/proc/.../status` file, by field.
#[derive(Debug, Clone, Default)]
pub struct ProcStatus {
    fields: Vec<(String, String)>,
}

impl ProcStatus {
    fn read(path: PathBuf) -> std::io::Result<ProcStatus> {
        Ok(ProcStatus::parse(&std::fs::read_to_string(path)?))
    }

    pub fn parse(text: &str) -> ProcStatus {
        ProcStatus {
            fields: text
                .lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
                .collect(),
        }
    }

    /// Process `pid`'s status (its main thread's).
    pub fn of_process(pid: i32) -> std::io::Result<ProcStatus> {
        ProcStatus::read(PathBuf::from(format!("/proc/{pid}/status")))
    }

    /// Thread `tid` of process `pid`.
    pub fn of_thread(pid: i32, tid: i32) -> std::io::Result<ProcStatus> {
        ProcStatus::read(PathBuf::from(format!("/proc/{pid}/task/{tid}/status")))
    }

    /// The calling thread's.
    pub fn of_this_thread() -> std::io::Result<ProcStatus> {
        ProcStatus::read(PathBuf::from("/proc/thread-self/status"))
    }

    /// Field `name` (without its colon), as the kernel wrote it, trimmed.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A field that is a list of numbers (`Uid`, `Gid`: real, effective, saved, filesystem).
    pub fn numbers(&self, name: &str) -> Option<Vec<u64>> {
        self.field(name)?
            .split_whitespace()
            .map(|n| n.parse().ok())
            .collect()
    }

    /// A field in kB (`VmHWM`, `VmRSS`), in bytes.
    pub fn bytes(&self, name: &str) -> Option<u64> {
        let kib: u64 = self.field(name)?.strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib * 1024)
    }

    /// True when the thread runs under a seccomp filter (`Seccomp: 2`).
    pub fn seccomp_filtered(&self) -> bool {
        self.field("Seccomp") == Some("2")
    }
}

/// The thread ids of process `pid`.
pub fn threads(pid: i32) -> std::io::Result<Vec<i32>> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect())
}

/// The start time (field 22 of /proc/PID/stat, clock ticks since boot) of process `pid`, if it
/// exists: with the pid, what tells a process from a later one that reused its pid.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from its end.
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The first child of process `pid` (a supervisor's only child is its VM process).
pub fn first_child(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_file_reads_by_field_in_numbers_and_bytes() {
        let s = ProcStatus::parse(
            "Name:\tbulkhead\nUid:\t1000\t1000\t1000\t1000\nVmHWM:\t    2048 kB\nSeccomp:\t2\n",
        );
        assert_eq!(s.field("Name"), Some("bulkhead"));
        assert_eq!(s.numbers("Uid"), Some(vec![1000; 4]));
        assert_eq!(s.bytes("VmHWM"), Some(2 << 20));
        assert!(s.seccomp_filtered());
        assert_eq!(s.field("Gid"), None);
        assert!(!ProcStatus::parse("Seccomp:\t0\n").seccomp_filtered());
    }

    #[test]
    fn this_process_is_found_with_its_start_time_and_threads() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(start_time(me).is_some());
        assert!(threads(me).unwrap().contains(&me));
        let own = ProcStatus::of_process(me).unwrap();
        assert!(own.bytes("VmHWM").is_some_and(|b| b > 0));
        assert!(ProcStatus::of_this_thread()
            .unwrap()
            .numbers("Uid")
            .is_some());
    }
}
