//! Snapshots of a Linux guest, in the nested lane (scripts/nested-kvm: Linux runs only there on
//! this host): a guest is snapshotted after boot, restored twice as two clones beside the
//! original, each with its own vsock CID and socket, and all three answer the host on vsock and
//! read their (read-only, shared) disk.

mod common;

use common::lane::{images, lane_available, lane_script, LANE};

/// Run inside L1: $1 bulkhead, $2 kernel, $3 initramfs, $4 vsock-tool. The guest prints
/// GUEST-READY after boot and waits for a vsock connection on port 1234; once answered it reads
/// the first line of its disk and exits. The snapshot is taken while it waits.
const SNAPSHOT_LANE_SCRIPT: &str = r#"
bulkhead=$1 kernel=$2 initramfs=$3 tool=$4
cd /
printf 'DISK-MARKER-OK\n' > /tmp/disk.img
dd if=/dev/zero bs=1M count=4 >> /tmp/disk.img 2>/dev/null
# The guest powers off (ACPI S5, status 0) rather than through guest-port: under this lane's
# emulated SVM, guest-port's ioperm+outb now and then takes a #GP on a 2-vCPU guest, snapshot
# or not.
"$bulkhead" run --kernel "$kernel" --initrd "$initramfs" --mem-mib 256 --vcpus 2 \
    --disk /tmp/disk.img,ro --vsock cid=3,uds=/tmp/o.sock --control-socket /tmp/o.ctl \
    --console file:/tmp/o.log --timeout 90 \
    --cmdline 'panic=-1 reboot=t -- sh -c "echo GUEST-READY; vsock-tool listen 1234; vsock-tool listen 1235; head -n 1 /dev/vda; echo RANDOM-$(head -c 16 /dev/urandom | od -An -tx1); echo CLONE-DONE; poweroff -f"' \
    > /tmp/o.err 2>&1 &
opid=$!
# connect WHO PORT: the host side of one line over vsock, tried until the guest listens.
# At most a minute in all, and each step says where it is, so a run cut short shows where.
connect() {
    i=0
    until timeout -s KILL 5 "$tool" unix-connect /tmp/$1.sock $2 hello-$1 > /tmp/$1.h2g 2>&1 || [ $i -ge 12 ]; do
        sleep 1; i=$((i + 1))
    done
    echo "lane: $1 port $2 after $i retries: $(cat /tmp/$1.h2g)"
}
i=0
until grep -q GUEST-READY /tmp/o.log 2>/dev/null || [ $i -ge 150 ]; do sleep 1; i=$((i + 1)); done
echo "lane: ready after $i s"
# The original answers once before the snapshot: vsock is live when it is taken.
connect o 1234
echo "lane: before the snapshot: $(cat /tmp/o.h2g)"
"$bulkhead" snapshot create --control-socket /tmp/o.ctl --state /tmp/s.state --mem /tmp/s.mem
echo "lane: create status $?"
echo "lane: memory file $(du -k /tmp/s.mem | cut -f1) KiB on disk"
"$bulkhead" run --restore /tmp/s.state --restore-mem /tmp/s.mem --vsock cid=4,uds=/tmp/a.sock \
    --console file:/tmp/a.log --timeout 60 > /tmp/a.err 2>&1 &
apid=$!
"$bulkhead" run --restore /tmp/s.state --restore-mem /tmp/s.mem --vsock cid=5,uds=/tmp/b.sock \
    --console file:/tmp/b.log --timeout 60 > /tmp/b.err 2>&1 &
bpid=$!
for who in o a b; do connect $who 1235; done
# Each VM ends by itself once answered (or its --timeout ends it).
wait $opid; echo "lane: o status $?"
wait $apid; echo "lane: a status $?"
wait $bpid; echo "lane: b status $?"
for who in o a b; do
    echo "lane: $who host side: $(cat /tmp/$who.h2g)"
    sed "s/^/$who| /" /tmp/$who.log
    sed "s/^/$who! /" /tmp/$who.err
done
"#;

#[test]
fn a_linux_guest_snapshotted_after_boot_runs_on_in_two_clones_that_answer_on_vsock_and_read_the_disk(
) {
    let test = "linux snapshot clones";
    if !lane_available(test) {
        return;
    }
    let _serial = LANE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("lane-snapshot");
    let tool = images().vsock_tool.to_str().unwrap();
    let (status, out) = lane_script(&dir, SNAPSHOT_LANE_SCRIPT, &[tool]);
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("lane: create status 0"), "{out}");
    assert!(
        out.contains("lane: before the snapshot: vsock-tool: got echo:hello-o"),
        "{out}"
    );
    for who in ["o", "a", "b"] {
        for line in [
            format!("lane: {who} status 0"),
            format!("lane: {who} host side: vsock-tool: got echo:hello-{who}"),
            format!("{who}| vsock-tool: answered hello-{who}"),
            format!("{who}| DISK-MARKER-OK"),
            format!("{who}| CLONE-DONE"),
        ] {
            assert!(out.contains(&line), "missing {line:?} in:\n{out}");
        }
    }
    // Each clone is a new VM generation: its RNG was reseeded with the new ID, so the two
    // clones (and the original) draw different random numbers, though their RNG state was
    // one and the same when the snapshot was taken.
    let random = |who: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{who}| RANDOM-")))
            .unwrap_or_else(|| panic!("{who} drew nothing:\n{out}"))
            .to_string()
    };
    let (o, a, b) = (random("o"), random("a"), random("b"));
    assert!(o != a && a != b && o != b, "{o} / {a} / {b}");
    for who in ["a", "b"] {
        assert!(
            out.contains(&format!("{who}| "))
                && out.lines().any(|l| l.starts_with(&format!("{who}| "))
                    && l.contains("crng reseeded due to virtual machine fork")),
            "clone {who} did not reseed:\n{out}"
        );
    }
    // The clones never booted: they start after GUEST-READY.
    for who in ["a", "b"] {
        assert!(
            !out.contains(&format!("{who}| bulkhead-init: boot complete")),
            "clone {who} booted again:\n{out}"
        );
    }
}
