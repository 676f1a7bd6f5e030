//! `bulkhead exec` against a real Linux guest, in the nested lane: the command's status,
//! stdout and stderr come back separately and in order, a panicking kernel and a timeout end
//! with their own statuses, the host's root is read-only and an extra share is writable.

mod common;

use common::lane::{lane_available, lane_script, LANE};

/// Run inside L1: $1 bulkhead, $2 kernel. Each case prints `case NAME status N`.
const EXEC_LANE_SCRIPT: &str = r#"
bulkhead=$1 kernel=$2
# The guest runs the command in this directory; /tmp is its own, so not one under /tmp.
cd /
ex() { "$bulkhead" exec --kernel "$kernel" --mem-mib 256 --vcpus 1 "$@"; }
ex -- sh -c 'exit 7'
echo "case exit7 status $?"

# 3000 lines on each stream, interleaved in the guest: each arrives whole and in order.
ex -- sh -c 'i=0; while [ $i -lt 3000 ]; do echo "out $i"; echo "err $i" >&2; i=$((i + 1)); done' > /tmp/out.txt 2> /tmp/err.txt
echo "case streams status $?"
seq_ok() { i=0; while read -r word n; do [ "$word $n" = "$1 $i" ] || { echo "case $1 order broken at line $i: $word $n"; return; }; i=$((i + 1)); done; echo "case $1 lines $i"; }
seq_ok out < /tmp/out.txt
seq_ok err < /tmp/err.txt

mkdir -p /tmp/rwshare /var/lib
echo host-var-file > /var/lib/hostfile
# /var is an overlay: the host's files show through, writes stay in the guest.
ex --share /tmp/rwshare -- sh -c 'echo written-by-guest > /tmp/rwshare/f; (echo x > /etc/bulkhead-exec-test) 2>/dev/null && echo ROOT-WRITABLE-$((1 + 1)); echo t > /tmp/t && echo tmp-writable; cat /var/lib/hostfile && echo v > /var/v && echo var-writable'
echo "case share status $?"
echo "case host-sees $(cat /tmp/rwshare/f)"
test -e /etc/bulkhead-exec-test && echo "case root-leaked"
test -e /var/v && echo "case var-leaked"

# The host's /sys and /dev are hidden from the shared root: mounted again, they are empty.
ex -- sh -c 'mkdir /tmp/m && mount -t virtiofs root /tmp/m && echo "case hidden sys $(ls -A /tmp/m/sys | wc -l) dev $(ls -A /tmp/m/dev | wc -l) etc $(ls -A /tmp/m/etc | wc -l)"'

ex -- /nonexistent/program
echo "case missing status $?"

ex -- sh -c 'kill -9 $$'
echo "case killed status $?"

ex --timeout 5 -- sleep 600
echo "case timeout status $?"

ex -- sh -c 'echo c > /proc/sysrq-trigger; sleep 600' 2> /tmp/panic.txt
echo "case panic status $?"
grep -q "guest kernel panicked" /tmp/panic.txt && echo "case panic explained"
for p in /proc/[0-9]*; do grep -qx virtiofsd $p/comm 2>/dev/null && echo "case backend-left $p"; done
exit 0
"#;

#[test]
fn exec_returns_the_commands_status_and_streams_and_distinct_statuses_for_panic_and_timeout() {
    let test =
        "exec_returns_the_commands_status_and_streams_and_distinct_statuses_for_panic_and_timeout";
    if !lane_available(test) {
        return;
    }
    let _serial = LANE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("lane-exec");
    let (status, out) = lane_script(&dir, EXEC_LANE_SCRIPT, &[]);
    assert_eq!(status, 0, "{out}");
    for line in [
        "case exit7 status 7",
        "case streams status 0",
        "case out lines 3000",
        "case err lines 3000",
        "case share status 0",
        "tmp-writable",
        "host-var-file",
        "var-writable",
        "case host-sees written-by-guest",
        "case hidden sys 0 dev 0 etc ",
        // Not found, as a shell says it.
        "case missing status 127",
        "case killed status 137",
        "case timeout status 124",
        "case panic status 87",
        "case panic explained",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    for line in [
        "order broken",
        "ROOT-WRITABLE-2",
        "case root-leaked",
        "case var-leaked",
        "case backend-left",
    ] {
        assert!(!out.contains(line), "{line:?} in:\n{out}");
    }
}

/// The fragment users merge into their own kernel trees is the project kernel's (which the
/// lane boots), less the L1 host's options, and keeps everything `bulkhead exec` needs.
#[test]
fn the_kernel_fragment_is_the_booted_kernels_and_has_what_exec_needs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join("scripts/kernel-config"))
        .output()
        .expect("cannot run scripts/kernel-config");
    assert!(out.status.success());
    let fragment = String::from_utf8(out.stdout).unwrap();
    let full = std::fs::read_to_string(root.join("guest-images/linux/kernel.config")).unwrap();
    let options: Vec<&str> = fragment
        .lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .collect();
    for line in &options {
        assert!(
            full.lines().any(|l| l == *line),
            "{line} is not in the booted kernel's"
        );
    }
    for needed in [
        "CONFIG_VIRTIO_MMIO=y",
        "CONFIG_VIRTIO_VSOCKETS=y",
        "CONFIG_FUSE_FS=y",
        "CONFIG_VIRTIO_FS=y",
        "CONFIG_OVERLAY_FS=y",
        "CONFIG_PVPANIC_MMIO=y",
        "CONFIG_DEVTMPFS=y",
        "CONFIG_BLK_DEV_INITRD=y",
    ] {
        assert!(options.contains(&needed), "{needed} missing");
    }
    assert!(!options.iter().any(|l| l.starts_with("CONFIG_KVM=")));
}
