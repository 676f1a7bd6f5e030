//! What a running VMM holds: its processes' resident and peak memory, the part of it that is
//! guest RAM the guest touched, and the host's available memory.

use std::fs;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The process `pid` and its descendants (bulkhead's supervisor and VM process).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if ppid(p) == Some(parent) && !all.contains(&p) {
                all.push(p);
            }
        }
        i += 1;
    }
    all
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the fields after it do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// The value of a `Name:   123 kB` line, in KiB.
fn kib(value: &str) -> Option<u64> {
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Field `field` (with its colon) of the proc file at `path`, in KiB; 0 when absent.
pub fn proc_kib(path: &str, field: &str) -> u64 {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(kib)
        .unwrap_or(0)
}

/// Resident KiB of the mappings exactly `guest_kib` long: the guest's RAM (one region, as
/// 128 MiB lies below the MMIO gap), in each VMM's own layout.
pub fn guest_rss_kib(pid: u32, guest_kib: u64) -> u64 {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut total = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                in_guest = (e - s) / 1024 == guest_kib;
                continue;
            }
        }
        if in_guest {
            if let Some(v) = line.strip_prefix("Rss:") {
                total += kib(v).unwrap_or(0);
            }
        }
    }
    total
}

/// Memory of one idle VM, in KiB.
pub struct Footprint {
    /// Sum over the VMM's processes of their peak resident set (VmHWM).
    pub peak_rss: u64,
    /// Sum of the processes' proportional anonymous memory (the guest's RAM among it): what
    /// another VM adds in user space, binaries and libraries being shared page cache. (Private_*
    /// would count a lone process's binary as its own, which it is not once a second VM runs;
    /// plain Anonymous would count the pages a fork still shares once per process.)
    pub anon: u64,
    /// Guest RAM the guest touched (resident pages of the guest's mapping).
    pub guest_touched: u64,
}

impl Footprint {
    /// What the VMM itself costs: peak RSS less the guest's own pages.
    pub fn overhead(&self) -> u64 {
        self.peak_rss.saturating_sub(self.guest_touched)
    }

    /// Anonymous memory less the guest's own pages.
    pub fn anon_overhead(&self) -> u64 {
        self.anon.saturating_sub(self.guest_touched)
    }
}

pub fn footprint(pid: u32, guest_kib: u64) -> Footprint {
    let pids = tree(pid);
    Footprint {
        peak_rss: pids
            .iter()
            .map(|&p| proc_kib(&format!("/proc/{p}/status"), "VmHWM:"))
            .sum(),
        anon: pids
            .iter()
            .map(|&p| proc_kib(&format!("/proc/{p}/smaps_rollup"), "Pss_Anon:"))
            .sum(),
        guest_touched: pids.iter().map(|&p| guest_rss_kib(p, guest_kib)).sum(),
    }
}

/// Drops `binary` from the page cache, so that the next start reads it in as a start after a
/// reboot does. Why: the kernel maps a whole large page-cache folio on a fault, and a binary
/// just written (a fresh build, a copy) sits in folios of the writer's making. On 2026-12-07
/// bulkhead's freshly copied binary held 3.0 MiB in an idle VM's two processes, the same file
/// read in by its own starts 2.7 MiB; each VMM and the floor start from the same state this way.
pub fn drop_from_page_cache(binary: &std::path::Path) {
    let Ok(file) = fs::File::open(binary) else {
        return;
    };
    // Dirty pages (a build finished seconds ago) are not dropped: written out first.
    let _ = file.sync_data();
    use std::os::fd::AsRawFd;
    // SAFETY: a plain advice call on a descriptor this function owns; it reads no memory.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        eprintln!(
            "bench: could not drop {} from the page cache (error {rc})",
            binary.display()
        );
    }
}

/// The host's MemAvailable, in KiB.
pub fn available_kib() -> u64 {
    proc_kib("/proc/meminfo", "MemAvailable:")
}

/// Waits until the child's stdout (piped) shows `line`, then stops reading; false when the
/// output ended first or `timeout` passed.
pub fn wait_for_line(child: &mut Child, line: &str, timeout: Duration) -> bool {
    let Some(out) = child.stdout.take() else {
        return false;
    };
    let deadline = Instant::now() + timeout;
    let (tx, rx) = std::sync::mpsc::channel();
    let want = line.to_string();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut buf = String::new();
        loop {
            buf.clear();
            match reader.read_line(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(false);
                    return;
                }
                // The idle guest writes nothing after its line, so the pipe may close.
                Ok(_) if buf.contains(&want) => {
                    let _ = tx.send(true);
                    return;
                }
                Ok(_) => {}
            }
        }
    });
    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .unwrap_or(false)
}

pub fn piped(mut cmd: std::process::Command) -> std::process::Command {
    cmd.stdout(Stdio::piped());
    cmd
}
