//! Real Linux guests under bulkhead, through the nested lane (scripts/nested-kvm): QEMU in
//! software emulation provides an L1 VM with working KVM, and bulkhead boots the project's
//! Linux guest inside it. This host's own /dev/kvm can not run a Linux kernel.
//!
//! The lane is slow (each run boots two kernels under TCG), so the runs are few, serialised,
//! and each checks several things.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::lane::{
    boot_args, ext4_file, ext4_image, images, lane_available, lane_run, lane_script, FAIL_FAST,
    LANE,
};

#[test]
fn linux_boots_to_init_from_vmlinux_with_one_and_two_vcpus_and_returns_the_commands_status() {
    let test =
        "linux_boots_to_init_from_vmlinux_with_one_and_two_vcpus_and_returns_the_commands_status";
    if !lane_available(test) {
        return;
    }
    let kernel = &images().vmlinux;
    for vcpus in ["1", "2"] {
        // The command's status is the number of CPUs the guest sees, plus 10.
        let cmdline = format!(
            "{FAIL_FAST} bulkhead.marker=lane-test -- sh -c \"cat /proc/cmdline; exit $((10 + $(grep -c ^processor /proc/cpuinfo)))\""
        );
        let run = lane_run(&boot_args(kernel, &cmdline, vcpus));
        let want: i32 = 10 + vcpus.parse::<i32>().unwrap();
        assert_eq!(run.status, want, "vcpus {vcpus}: output\n{}", run.stdout);
        assert!(
            run.stdout.contains("bulkhead-init: boot complete"),
            "{}",
            run.stdout
        );
        assert!(
            run.stdout.contains("bulkhead.marker=lane-test"),
            "command line did not reach the guest: {}",
            run.stdout
        );
        assert!(
            run.stdout.contains("guest boot complete in "),
            "no boot time: {}",
            run.stdout
        );
    }
}

#[test]
fn linux_boots_from_bzimage_and_a_zero_status_comes_back_as_zero() {
    let test = "linux_boots_from_bzimage_and_a_zero_status_comes_back_as_zero";
    if !lane_available(test) {
        return;
    }
    let kernel = &images().bzimage;
    let cmdline = format!("{FAIL_FAST} -- sh -c \"echo from-the-guest; exit 0\"");
    let run = lane_run(&boot_args(kernel, &cmdline, "1"));
    assert_eq!(run.status, 0, "output\n{}", run.stdout);
    assert!(run.stdout.contains("from-the-guest"), "{}", run.stdout);
    assert!(
        run.stdout.contains("guest boot complete in "),
        "{}",
        run.stdout
    );
}

#[test]
fn nested_kvm_attaches_disks_whose_writes_reach_the_host_file_unless_read_only() {
    let test = "nested_kvm_attaches_disks_whose_writes_reach_the_host_file_unless_read_only";
    if !lane_available(test) {
        return;
    }
    let _serial = LANE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("lane-disk");
    let (rw, ro) = (dir.join("rw.img"), dir.join("ro.img"));
    for disk in [&rw, &ro] {
        std::fs::File::create(disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/nested-kvm");
    let write = "echo LANE-DISK-OK | dd of=\"$2\" conv=notrunc 2>/dev/null; sync; true";
    let ro_spec = format!("{},ro", ro.display());
    for spec in [rw.to_str().unwrap(), ro_spec.as_str()] {
        let run = common::command_with_limit(
            Command::new(&script).args([
                "--timeout",
                "120",
                "--",
                "sh",
                "-c",
                write,
                "x",
                "--disk",
                spec,
            ]),
            Duration::from_secs(180),
        );
        assert_eq!(run.status, 0, "{spec}: {}{}", run.stdout, run.stderr);
    }
    assert!(
        std::fs::read(&rw).unwrap().starts_with(b"LANE-DISK-OK\n"),
        "write did not reach the host file"
    );
    assert!(
        std::fs::read(&ro).unwrap().iter().all(|&b| b == 0),
        "a read-only disk was written"
    );
}

/// Run inside L1 by the virtio lane test: $1 bulkhead, $2 kernel, $3 initramfs, $5 the disk
/// (an ext4 image). Three boots of one Linux guest on that disk:
/// 1. read-only: the guest sees a read-only disk, a write fails, the disk is unchanged;
/// 2. writes and syncs a file, then the VMM is killed (SIGKILL) while the guest runs on;
/// 3. boots again, reads the file back, and reads /dev/hwrng.
const VIRTIO_LANE_SCRIPT: &str = r#"
bulkhead=$1 kernel=$2 initramfs=$3 disk=$5
boot() { "$bulkhead" run --kernel "$kernel" --initrd "$initramfs" --mem-mib 256 "$@"; }
before=$(md5sum < "$disk")
boot --disk "$disk,ro" --cmdline 'panic=-1 reboot=t -- sh -c "test $(cat /sys/block/vda/ro) = 1 || exit 3; dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync && exit 4; mkdir /m && mount -o ro /dev/vda /m && ls /m"'
echo "lane: read-only boot status $?"
test "$(md5sum < "$disk")" = "$before" && echo "lane: read-only disk unchanged"

# Not through boot(): $! must be bulkhead itself, not a subshell running it.
"$bulkhead" run --kernel "$kernel" --initrd "$initramfs" --mem-mib 256 --disk "$disk" --cmdline 'panic=-1 reboot=t -- sh -c "mkdir /m && mount /dev/vda /m && echo lane-persisted-token > /m/data && sync && echo GUEST-$((6 * 7))-SYNCED; sleep 600"' > /tmp/boot2.log 2>&1 &
pid=$!
i=0
while ! grep -q GUEST-42-SYNCED /tmp/boot2.log && [ $i -lt 240 ]; do sleep 1; i=$((i + 1)); done
kill -9 $pid
wait $pid
echo "lane: killed the VMM after the guest synced (status $?)"
cat /tmp/boot2.log

boot --disk "$disk" --cmdline 'panic=-1 reboot=t -- sh -c "mkdir /m && mount /dev/vda /m && cat /m/data && grep -q lane-persisted-token /m/data || exit 5; echo rng=$(cat /sys/class/misc/hw_random/rng_current) bytes=$(dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c)"'
echo "lane: read-back boot status $?"
"#;

#[test]
fn linux_guest_keeps_synced_ext4_data_on_virtio_blk_across_a_killed_vmm_and_reads_hwrng() {
    let test =
        "linux_guest_keeps_synced_ext4_data_on_virtio_blk_across_a_killed_vmm_and_reads_hwrng";
    if !lane_available(test) {
        return;
    }
    let _serial = LANE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("lane-virtio");
    let disk = dir.join("ext4.img");
    ext4_image(&disk, 32);
    let disk_arg = disk.to_str().unwrap();
    let (status, out) = lane_script(&dir, VIRTIO_LANE_SCRIPT, &["--disk", disk_arg]);
    assert_eq!(status, 0, "{out}");
    for line in [
        "lane: read-only boot status 0",
        "lane: read-only disk unchanged",
        "GUEST-42-SYNCED",
        "lane: killed the VMM after the guest synced",
        "lane-persisted-token",
        "rng=virtio_rng.0 bytes=256",
        "lane: read-back boot status 0",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    // The data went through both layers into the host's image file.
    assert!(
        ext4_file(&disk, "data").contains("lane-persisted-token"),
        "the host image does not hold the file"
    );
}

/// Run inside L1 by the share lane test: $1 bulkhead, $2 kernel, $3 initramfs. A read-only and
/// a read-write share: the guest reads one, writes the other, and fails to write the first.
const SHARE_LANE_SCRIPT: &str = r#"
bulkhead=$1 kernel=$2 initramfs=$3
mkdir -p /tmp/ro /tmp/rw
echo host-ro-token > /tmp/ro/file
"$bulkhead" run --metrics-file /tmp/share.prom --kernel "$kernel" --initrd "$initramfs" --mem-mib 256 --share /tmp/ro:hostro --share /tmp/rw:hostrw,rw --cmdline 'panic=-1 reboot=t -- sh -c "mkdir /ro /rw && mount -t virtiofs hostro /ro && mount -t virtiofs hostrw /rw && cat /ro/file && echo guest-wrote-$((6 * 7)) > /rw/out && if echo x > /ro/new; then echo RO-WRITE-$((1 + 1)); else echo guest-ro-write-refused; fi"'
echo "lane: share boot status $?"
echo "lane: host reads $(cat /tmp/rw/out)"
test -e /tmp/ro/new && echo "lane: the read-only share was written"
# Each backend ended with its VM and was reaped: no virtiofsd is left.
for p in /proc/[0-9]*; do grep -qx virtiofsd $p/comm 2>/dev/null && echo "lane: a virtiofsd outlived its VM"; done
true
grep -v '^#' /tmp/share.prom | grep -E 'bulkhead_vm_exit|virtio-fs' | head -5
"#;

#[test]
fn a_linux_guest_reads_a_read_only_share_writes_a_read_write_one_and_no_backend_outlives_it() {
    let test =
        "a_linux_guest_reads_a_read_only_share_writes_a_read_write_one_and_no_backend_outlives_it";
    if !lane_available(test) {
        return;
    }
    let _serial = LANE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("lane-share");
    let (status, out) = lane_script(&dir, SHARE_LANE_SCRIPT, &[]);
    assert_eq!(status, 0, "{out}");
    for line in [
        "host-ro-token",
        "guest-ro-write-refused",
        "lane: share boot status 0",
        "lane: host reads guest-wrote-42",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    for line in [
        "RO-WRITE-2",
        "the read-only share was written",
        "outlived its VM",
    ] {
        assert!(!out.contains(line), "{line:?} in:\n{out}");
    }
}

/// Run inside L1 by the network lane test: $1 bulkhead, $2 kernel, $3 initramfs. In a network
/// namespace of its own, bulkhead creates tap bhtap0; the guest (10.0.0.2) pings the tap's
/// side (10.0.0.1), and then the tap's side pings the guest.
const NET_LANE_SCRIPT: &str = r#"
if [ "$1" != inner ]; then exec unshare -n sh "$0" inner "$@"; fi
shift
bulkhead=$1 kernel=$2 initramfs=$3
echo "lane: namespace $(readlink /proc/self/ns/net), $(ls /sys/class/net | tr '\n' ' ')"
"$bulkhead" run --metrics-file /tmp/net.prom --kernel "$kernel" --initrd "$initramfs" --mem-mib 256 --net tap=bhtap0,mac=06:00:0a:00:00:02 --cmdline 'panic=-1 reboot=t -- sh -c "ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up && ping -c 3 -W 10 10.0.0.1; echo GUEST-PING-$((6 * 7))-DONE; cat /proc/net/dev; ip neigh; sleep 20"' > /tmp/net.log 2>&1 &
pid=$!
i=0
# /sys shows the namespace that mounted it, not ours: ask ip.
while ! ip link show bhtap0 >/dev/null 2>&1 && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
ip addr add 10.0.0.1/24 dev bhtap0 && ip link set bhtap0 up && echo "lane: bhtap0 is up after ${i}s"
i=0
while ! grep -q GUEST-PING-42-DONE /tmp/net.log && [ $i -lt 120 ]; do sleep 1; i=$((i + 1)); done
ping -c 3 -W 5 10.0.0.2 && echo "lane: the tap side pinged the guest"
ip neigh
cat /proc/net/dev
wait $pid
echo "lane: bulkhead exit status $?"
cat /tmp/net.log
echo "lane: metrics:"
grep -v '^#' /tmp/net.prom
echo "lane: end of metrics"
"#;

#[test]
fn linux_guest_and_a_tap_in_a_network_namespace_ping_each_other() {
    let test = "linux_guest_and_a_tap_in_a_network_namespace_ping_each_other";
    if !lane_available(test) {
        return;
    }
    let _serial = LANE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("lane-net");
    let (status, out) = lane_script(&dir, NET_LANE_SCRIPT, &[]);
    assert_eq!(status, 0, "{out}");
    for line in [
        "lane: namespace net:[",
        "GUEST-PING-42-DONE",
        "lane: the tap side pinged the guest",
        "lane: bulkhead exit status 0",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    // Guest to tap, then tap to guest.
    assert_eq!(
        out.matches("3 packets transmitted, 3 packets received")
            .count(),
        2,
        "{out}"
    );
    let metrics = lane_metrics(&out);
    let net = [("device", "virtio-net0")];
    assert!(
        metrics.sum("bulkhead_virtio_requests_total", &net) > 0,
        "{out}"
    );
    assert_eq!(
        metrics.total_refusals("virtio-net0"),
        0,
        "Linux's own frames were refused:\n{out}"
    );
}

/// The metrics a lane script printed between its markers.
fn lane_metrics(out: &str) -> common::Metrics {
    let text = out
        .split("lane: metrics:")
        .nth(1)
        .and_then(|s| s.split("lane: end of metrics").next())
        .unwrap_or_else(|| panic!("no metrics section in:\n{out}"));
    common::Metrics::parse(text)
}

/// Run inside L1 by the vsock lane test: $1 bulkhead, $2 kernel, $3 initramfs, $4 vsock-tool.
/// The guest listens on vsock port 1234 and connects to host port 5000 (the socket
/// `uds_5000`, where L1 answers); L1 reaches the guest's port through bulkhead's socket.
const VSOCK_LANE_SCRIPT: &str = r#"
bulkhead=$1 kernel=$2 initramfs=$3 tool=$4 uds=/tmp/v.sock
"$tool" unix-echo "${uds}_5000" > /tmp/host-echo.log 2>&1 &
echo_pid=$!
"$bulkhead" run --metrics-file /tmp/vsock.prom --kernel "$kernel" --initrd "$initramfs" --mem-mib 256 --vsock "cid=3,uds=$uds" --cmdline 'panic=-1 reboot=t -- sh -c "vsock-tool listen 1234 & sleep 1; vsock-tool connect 2 5000 hello-from-guest; wait"' > /tmp/vm.log 2>&1 &
pid=$!
i=0
until "$tool" unix-connect "$uds" 1234 hello-from-host > /tmp/h2g.log 2>&1 || [ $i -ge 90 ]; do sleep 1; i=$((i + 1)); done
wait $pid
status=$?
echo "lane: bulkhead exit status $status"
# A VM that ended early never reaches the echo listener: stop waiting for it, so the VM's log
# below says why.
[ $status -eq 0 ] || kill $echo_pid 2>/dev/null
wait $echo_pid
echo "lane: host side: $(cat /tmp/h2g.log) / $(cat /tmp/host-echo.log)"
cat /tmp/vm.log
echo "lane: metrics:"
grep -v '^#' /tmp/vsock.prom
echo "lane: end of metrics"
"#;

#[test]
fn linux_guest_and_host_trade_lines_over_vsock_both_ways() {
    let test = "linux_guest_and_host_trade_lines_over_vsock_both_ways";
    if !lane_available(test) {
        return;
    }
    let _serial = LANE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("lane-vsock");
    let tool = images().vsock_tool.to_str().unwrap();
    let (status, out) = lane_script(&dir, VSOCK_LANE_SCRIPT, &[tool]);
    assert_eq!(status, 0, "{out}");
    for line in [
        // host to guest: the guest answered through bulkhead's socket
        "vsock-tool: got echo:hello-from-host",
        // guest to host: L1's listener on uds_5000 answered
        "vsock-tool: answered hello-from-guest",
        "vsock-tool: got echo:hello-from-guest",
        "lane: bulkhead exit status 0",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    let metrics = lane_metrics(&out);
    let vsock = [("device", "virtio-vsock0")];
    assert!(
        metrics.sum("bulkhead_virtio_requests_total", &vsock) > 0,
        "{out}"
    );
    assert_eq!(
        metrics.total_refusals("virtio-vsock0"),
        0,
        "Linux's own packets were refused:\n{out}"
    );
}

/// Run inside L1 by the benign lane test: $1 bulkhead, $2 kernel, $3 initramfs, $4 vsock-tool.
/// In a network namespace of its own, a Linux guest with 2 vCPUs boots (its init reports boot
/// complete, so every rule is armed) and works all four devices: writes and reads its disk,
/// pings the tap's side, reads /dev/hwrng and trades a line over vsock with L1. bulkhead writes
/// alerts and metrics; the script prints both.
const BENIGN_LANE_SCRIPT: &str = r#"
if [ "$1" != inner ]; then exec unshare -n sh "$0" inner "$@"; fi
shift
bulkhead=$1 kernel=$2 initramfs=$3 tool=$4 uds=/tmp/b.sock
dd if=/dev/zero of=/tmp/disk.img bs=1M count=8 2>/dev/null
"$tool" unix-echo "${uds}_5000" > /tmp/echo.log 2>&1 &
"$bulkhead" run --kernel "$kernel" --initrd "$initramfs" --mem-mib 256 --vcpus 2 \
    --disk /tmp/disk.img --net tap=bhtap1,mac=06:00:0a:00:00:02 --vsock "cid=3,uds=$uds" \
    --alerts /tmp/alerts.jsonl --metrics-file /tmp/vm.prom \
    --cmdline 'panic=-1 reboot=t -- sh -c "grep -c ^processor /proc/cpuinfo; ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up && ping -c 2 -W 10 10.0.0.1; dd if=/dev/urandom of=/dev/vda bs=64k count=32 conv=fsync 2>&1; dd if=/dev/vda of=/dev/null bs=64k count=32 2>&1; echo hwrng=$(dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c); vsock-tool connect 2 5000 hello-benign; echo BENIGN-$((6 * 7))-DONE"' > /tmp/vm.log 2>&1 &
pid=$!
i=0
while ! ip link show bhtap1 >/dev/null 2>&1 && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
ip addr add 10.0.0.1/24 dev bhtap1 && ip link set bhtap1 up
wait $pid
echo "lane: bulkhead exit status $?"
cat /tmp/vm.log
echo "lane: alerts:"
cat /tmp/alerts.jsonl
echo "lane: end of alerts"
grep -E '^bulkhead_(virtio_violations|virtio_requests|unhandled|msr_filtered|alerts|telemetry|vm_exit|vcpus)' /tmp/vm.prom | grep -v ' 0$'
"#;

#[test]
fn a_linux_guest_with_two_vcpus_working_every_device_raises_no_alert() {
    let test = "a_linux_guest_with_two_vcpus_working_every_device_raises_no_alert";
    if !lane_available(test) {
        return;
    }
    let _serial = LANE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("lane-benign");
    let tool = images().vsock_tool.to_str().unwrap();
    let (status, out) = lane_script(&dir, BENIGN_LANE_SCRIPT, &[tool]);
    assert_eq!(status, 0, "{out}");
    for line in [
        "2 packets transmitted, 2 packets received",
        "hwrng=256",
        "vsock-tool: got echo:hello-benign",
        "BENIGN-42-DONE",
        "lane: bulkhead exit status 0",
        "bulkhead_vcpus{",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    // The whole workload went through the devices...
    for device in ["virtio-blk0", "virtio-net0", "virtio-vsock0", "virtio-rng0"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("bulkhead_virtio_requests_total")
                    && l.contains(&format!("device=\"{device}\""))),
            "{device} served nothing:\n{out}"
        );
    }
    // ...and raised nothing: no alert, no refusal.
    let alerts = out
        .split("lane: alerts:")
        .nth(1)
        .and_then(|s| s.split("lane: end of alerts").next())
        .unwrap_or_else(|| panic!("no alerts section in:\n{out}"));
    assert!(
        alerts.trim().is_empty(),
        "a clean Linux run raised alerts:\n{alerts}"
    );
    assert!(
        !out.contains("bulkhead_virtio_violations_total{")
            && !out.contains("bulkhead_alerts_total{"),
        "refusals or alerts counted:\n{out}"
    );
}

/// Run inside L1: $1 bulkhead, $2 kernel, $3 initramfs. The Firecracker personality is set up
/// through its API (with `bulkhead ctl request`, L1 having no curl); the guest reads its disk,
/// the host swaps the disk's backing file with PATCH /drives while the guest runs, and the
/// guest reads the new file and sees its new size.
const FC_API_LANE_SCRIPT: &str = r#"
bulkhead=$1 kernel=$2 initramfs=$3 S=/tmp/fc.sock
dd if=/dev/zero of=/tmp/a.img bs=1M count=4 2>/dev/null
printf 'DISK-A-ORIGIN' | dd of=/tmp/a.img conv=notrunc 2>/dev/null
dd if=/dev/zero of=/tmp/b.img bs=1M count=8 2>/dev/null
printf 'DISK-B-SWAPPED' | dd of=/tmp/b.img conv=notrunc 2>/dev/null
"$bulkhead" firecracker --api-sock $S > /tmp/vm.log 2>&1 &
pid=$!
i=0; until [ -S $S ] || [ $i -ge 100 ]; do sleep 0.1; i=$((i + 1)); done
c() { "$bulkhead" ctl --socket $S request "$@" || echo "lane: $* failed"; }
cat > /tmp/boot.tmpl <<'JSON'
{"kernel_image_path": "KERNEL", "initrd_path": "INITRD", "boot_args": "panic=-1 reboot=t -- sh -c \"echo A=$(head -c 14 /dev/vda); echo SIZE1=$(cat /sys/block/vda/size); echo GUEST-WAIT''ING; i=0; while [ $i -lt 240 ]; do echo 3 > /proc/sys/vm/drop_caches; v=$(head -c 14 /dev/vda); case $v in DISK-B*) break;; esac; sleep 0.5; i=$((i + 1)); done; echo B=$v; echo SIZE2=$(cat /sys/block/vda/size)\""}
JSON
sed -e "s|KERNEL|$kernel|" -e "s|INITRD|$initramfs|" /tmp/boot.tmpl > /tmp/boot.json
printf '{"vcpu_count": 1, "mem_size_mib": 256}' > /tmp/mc.json
printf '{"drive_id": "data", "path_on_host": "/tmp/a.img", "is_root_device": false, "is_read_only": true}' > /tmp/drive.json
printf '{"action_type": "InstanceStart"}' > /tmp/start.json
printf '{"drive_id": "data", "path_on_host": "/tmp/b.img"}' > /tmp/patch.json
c PUT /boot-source --body-file /tmp/boot.json
c PUT /machine-config --body-file /tmp/mc.json
c PUT /drives/data --body-file /tmp/drive.json
c PUT /actions --body-file /tmp/start.json
c GET /
# (The kernel echoes its command line: the marker is spelled apart there.)
i=0; until grep -q GUEST-WAITING /tmp/vm.log || [ $i -ge 600 ]; do sleep 0.5; i=$((i + 1)); done
c PATCH /drives/data --body-file /tmp/patch.json && echo "lane: patched"
wait $pid
echo "lane: personality exit status $?"
cat /tmp/vm.log
"#;

#[test]
fn a_linux_guest_boots_through_the_firecracker_api_and_reads_a_drive_swapped_while_it_runs() {
    let test =
        "a_linux_guest_boots_through_the_firecracker_api_and_reads_a_drive_swapped_while_it_runs";
    if !lane_available(test) {
        return;
    }
    let _serial = LANE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("lane-fc-api");
    let (status, out) = lane_script(&dir, FC_API_LANE_SCRIPT, &[]);
    assert_eq!(status, 0, "{out}");
    for line in [
        "\"state\":\"Running\"",
        "A=DISK-A-ORIGIN",
        "SIZE1=8192",
        "lane: patched",
        "B=DISK-B-SWAPPED",
        "SIZE2=16384",
        "lane: personality exit status 0",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(!out.contains("failed"), "{out}");
}
