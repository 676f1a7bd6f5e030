//! Virtio devices driven through their registers by the `virtio` test guest: block, rng, and
//! every bad input the devices must refuse and count.

mod common;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use common::{
    kvm_available, run_guest, run_observed, scratch, vsock_host_side, Observed, Run, TestTap,
};

const SECTORS: usize = 128;

/// A disk whose sector n holds the byte n.
fn patterned_disk(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    let bytes: Vec<u8> = (0..SECTORS).flat_map(|n| [n as u8; 512]).collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Runs the `virtio` test guest with `extra` flags and `cmdline`, collecting its metrics
/// and alerts. These tests prove what the devices accept and refuse, so a refusal only logs
/// (`--on-violation log`) and the device goes on serving the rest of the test; the attack
/// tests cover the default response.
fn run_virtio(test: &str, extra: &[&str], cmdline: &str) -> Observed {
    let mut args = extra.to_vec();
    args.extend(["--on-violation", "log"]);
    run_virtio_as_is(test, &args, cmdline)
}

/// [`run_virtio`] under the default policy (for the honest, `clean=1` runs).
fn run_virtio_as_is(test: &str, extra: &[&str], cmdline: &str) -> Observed {
    let mut args = extra.to_vec();
    args.extend(["--cmdline", cmdline]);
    run_observed(test, "virtio", &args)
}

/// The honest runs: nothing refused, nothing alerted at Notice or above.
fn assert_silent(o: &Observed, device: &str) {
    assert_eq!(o.metrics.total_refusals(device), 0);
    let loud = o.alerts_at_least("Notice", &[]);
    assert!(loud.is_empty(), "{loud:?}");
}

/// `device`'s `counter`, e.g. `requests`, or `bytes_to_guest`.
fn counter(o: &Observed, device: &str, counter: &str) -> u64 {
    let m = &o.metrics;
    match counter {
        "requests" | "interrupts" | "dropped" | "policy_resets" => m.value(
            &format!("bulkhead_virtio_{counter}_total"),
            &[("device", device)],
        ),
        "bytes_to_guest" | "bytes_from_guest" => m.value(
            "bulkhead_virtio_bytes_total",
            &[
                ("device", device),
                ("direction", counter.trim_start_matches("bytes_")),
            ],
        ),
        other => panic!("no counter {other}"),
    }
}

fn assert_passed(o: &Observed) {
    assert_run_passed(&o.run);
}

fn assert_run_passed(run: &Run) {
    assert_eq!(
        run.status, 0,
        "guest checks failed; stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.contains("virtio: all checks passed"));
}

#[test]
fn rng_fills_requests_with_random_bytes_up_to_its_cap() {
    if !kvm_available("rng_fills_requests_with_random_bytes_up_to_its_cap") {
        return;
    }
    let o = run_virtio("virtio-rng", &[], "mode=rng");
    assert_passed(&o);
    assert_eq!(counter(&o, "virtio-rng0", "requests"), 2);
    assert_eq!(counter(&o, "virtio-rng0", "bytes_to_guest"), 64 + 4096);
    assert_eq!(o.metrics.total_refusals("virtio-rng0"), 0);
}

#[test]
fn no_rng_leaves_the_device_out() {
    if !kvm_available("no_rng_leaves_the_device_out") {
        return;
    }
    let run = run_guest("virtio", &["--cmdline", "mode=rng", "--no-rng"]);
    assert_eq!(run.status, 1, "stdout: {}", run.stdout);
    assert!(run.stdout.contains("no such device"));
}

#[test]
fn devices_are_announced_in_the_dsdt_and_on_the_command_line_only_when_asked() {
    if !kvm_available("devices_are_announced_in_the_dsdt_and_on_the_command_line_only_when_asked") {
        return;
    }
    for (flags, announced) in [
        (
            &[][..],
            "virtio: devices in the DSDT, 0 on the command line",
        ),
        (
            &["--cmdline-devices"][..],
            "virtio: devices in the DSDT, 1 on the command line",
        ),
        (&["--no-acpi"][..], "virtio: no DSDT, 1 on the command line"),
    ] {
        let mut args = flags.to_vec();
        args.extend(["--cmdline", "mode=rng"]);
        let run = run_guest("virtio", &args);
        assert_run_passed(&run);
        assert!(run.stdout.contains(announced), "{flags:?}: {}", run.stdout);
    }
}

#[test]
fn block_reads_writes_flushes_and_reports_its_id() {
    if !kvm_available("block_reads_writes_flushes_and_reports_its_id") {
        return;
    }
    let dir = scratch("virtio-blk");
    let disk = patterned_disk(&dir);
    let disk_arg = format!("{},id=tenant-a.data", disk.display());
    let o = run_virtio(
        "virtio-blk-run",
        &["--disk", &disk_arg],
        "mode=blk expect_id=tenant-a.data",
    );
    assert_passed(&o);
    let after = std::fs::read(&disk).unwrap();
    for (n, sector) in after.chunks(512).enumerate() {
        let want = if n == 2 || n == 3 { 0xa5 } else { n as u8 };
        assert!(
            sector.iter().all(|&b| b == want),
            "sector {n} holds {:#x}, expected {want:#x}",
            sector[0]
        );
    }
    assert_eq!(counter(&o, "virtio-blk0", "bytes_from_guest"), 1024);
    assert_eq!(o.metrics.refusals("virtio-blk0", "request.out_of_range"), 1);
}

#[test]
fn a_read_only_disk_refuses_writes_whatever_the_guest_negotiated() {
    if !kvm_available("a_read_only_disk_refuses_writes_whatever_the_guest_negotiated") {
        return;
    }
    let dir = scratch("virtio-blk-ro");
    let disk = patterned_disk(&dir);
    let before = std::fs::read(&disk).unwrap();
    let disk_arg = format!("{},ro", disk.display());
    // The guest does not check the RO feature bit: it writes anyway.
    let o = run_virtio(
        "virtio-blk-ro-run",
        &["--disk", &disk_arg],
        "mode=blk-ro expect_id=disk0",
    );
    assert_passed(&o);
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        before,
        "the read-only disk changed"
    );
    assert_eq!(o.metrics.refusals("virtio-blk0", "request.read_only"), 1);
}

#[test]
fn every_bad_input_is_refused_counted_and_survived() {
    if !kvm_available("every_bad_input_is_refused_counted_and_survived") {
        return;
    }
    let dir = scratch("virtio-hostile");
    let disk = patterned_disk(&dir);
    let before = std::fs::read(&disk).unwrap();
    let disk_arg = disk.display().to_string();
    let o = run_virtio("virtio-hostile-run", &["--disk", &disk_arg], "mode=hostile");
    assert_passed(&o);
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        before,
        "a refused request wrote the disk"
    );
    let expected_blk = [
        ("transport.bad_access", 1),
        ("transport.bad_status_transition", 1),
        ("transport.bad_features", 1),
        // A feature write after DRIVER_OK, and one after FEATURES_OK.
        ("transport.features_locked", 2),
        ("transport.queue_locked", 1),
        ("transport.bad_queue_size", 2),
        ("transport.misaligned_ring", 1),
        ("transport.no_such_queue", 2),
        ("transport.config_write_refused", 1),
        ("transport.wrong_direction", 1),
        ("transport.notify_not_ready", 1),
        ("transport.queue_not_ready", 1),
        // A next index and a head index past the table.
        ("chain.index_out_of_range", 2),
        ("chain.loop", 1),
        ("chain.too_many_descriptors", 1),
        ("chain.zero_length", 1),
        ("chain.outside_ram", 1),
        ("chain.overlaps_rings", 1),
        ("chain.readable_after_writable", 1),
        ("chain.indirect_with_next", 1),
        ("chain.nested_indirect", 1),
        ("chain.bad_indirect_table", 1),
        ("chain.ring_outside_ram", 1),
        ("chain.avail_index_jump", 1),
        ("request.bad_header", 1),
        ("request.unsupported", 1),
        // Past the end, and a sector number that overflows.
        ("request.out_of_range", 2),
        ("request.bad_length", 1),
        ("request.no_status", 1),
    ];
    for (name, want) in expected_blk {
        assert_eq!(o.metrics.refusals("virtio-blk0", name), want, "{name}");
    }
    let total: u64 = expected_blk.iter().map(|(_, n)| n).sum();
    assert_eq!(
        o.metrics.total_refusals("virtio-blk0"),
        total,
        "unexpected refusals"
    );
    for (name, want) in [
        ("chain.too_long", 1),
        ("chain.indirect_not_negotiated", 1),
        ("request.unexpected_readable", 1),
    ] {
        assert_eq!(o.metrics.refusals("virtio-rng0", name), want, "{name}");
    }
    assert_eq!(o.metrics.total_refusals("virtio-rng0"), 3);
    // Every refusal raised its rule's alert; the log response kept the devices working.
    assert_eq!(o.metrics.sum("bulkhead_virtio_policy_resets_total", &[]), 0);
    assert!(!o.alerts_of("virtio_bad_chain").is_empty());
    assert!(!o.alerts_of("virtio_reconfig_after_activation").is_empty());
    assert!(!o.alerts_of("virtio_avail_index_jump").is_empty());
}

/// Holds `lock` (LOCK_EX or LOCK_SH) on `path` while it lives, as another VMM would.
struct HeldLock {
    _file: std::fs::File,
}

impl HeldLock {
    /// Takes the lock, retrying for a moment: a child another test thread is forking may
    /// briefly share an earlier lock's file description until it execs.
    fn take(path: &Path, lock: libc::c_int) -> HeldLock {
        let file = std::fs::File::open(path).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            // SAFETY: flock on a descriptor this test owns; it touches no memory.
            let rc = unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) };
            if rc == 0 {
                return HeldLock { _file: file };
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cannot take the lock: {}",
                std::io::Error::last_os_error()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[test]
fn a_disk_in_use_by_another_process_is_refused_for_writing() {
    if !kvm_available("a_disk_in_use_by_another_process_is_refused_for_writing") {
        return;
    }
    let dir = scratch("virtio-lock");
    let disk = patterned_disk(&dir);
    let disk_arg = disk.display().to_string();
    let ro_arg = format!("{},ro", disk.display());
    let args = |arg: &str, mode: &str| {
        vec![
            "--disk".to_string(),
            arg.to_string(),
            "--cmdline".to_string(),
            format!("mode={mode} expect_id=disk0"),
        ]
    };
    let run_with = |mut a: Vec<String>| {
        a.extend(["--on-violation".to_string(), "log".to_string()]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        run_guest("virtio", &a)
    };

    // A reader holds it: no writer, but other readers are fine.
    let reader = HeldLock::take(&disk, libc::LOCK_SH);
    let run = run_with(args(&disk_arg, "blk"));
    assert_eq!(run.status, 2, "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains("is in use by another process"),
        "{}",
        run.stderr
    );
    let run = run_with(args(&ro_arg, "blk-ro"));
    assert_eq!(run.status, 0, "stderr: {}", run.stderr);
    drop(reader);

    // A writer holds it: not even a reader.
    let writer = HeldLock::take(&disk, libc::LOCK_EX);
    let run = run_with(args(&ro_arg, "blk-ro"));
    assert_eq!(run.status, 2, "stderr: {}", run.stderr);
    drop(writer);
}

#[test]
fn bad_device_arguments_are_refused_before_boot() {
    if !kvm_available("bad_device_arguments_are_refused_before_boot") {
        return;
    }
    let dir = scratch("virtio-bad-disk");
    let disk = patterned_disk(&dir);
    let missing = dir.join("missing.img").display().to_string();
    let dir_arg = format!("{},ro", dir.display());
    let twice = disk.display().to_string();
    let taken_cid = 50_000 + std::process::id();
    let name = format!("bulkhead-vsock-cid-{taken_cid}");
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _other_vm = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    let taken = format!("cid={taken_cid},uds={}", dir.join("v.sock").display());
    let existing = format!("cid=3,uds={twice}");
    let cases: [(&[&str], &str); 16] = [
        (
            &["--vsock", "cid=2,uds=/tmp/x"],
            "vsock CID 2 is out of range",
        ),
        (&["--vsock", "cid=3"], "expected cid=N,uds=PATH"),
        (&["--vsock", &taken], "is in use by another VM"),
        (&["--vsock", &existing], "it must not exist yet"),
        (&["--net", "tap=a/b"], "invalid tap name"),
        (&["--net", "tap=this-name-is-too-long"], "invalid tap name"),
        (
            &["--net", "tap=t0,mac=07:00:00:00:00:01"],
            "invalid MAC address",
        ),
        (
            &["--net", "tap=t0,mac=06:00:00:00:01"],
            "invalid MAC address",
        ),
        (
            &["--net", "tap=t0", "--net", "tap=t0"],
            "two network devices use tap t0",
        ),
        (
            &["--disk", "/dev/null,ro"],
            "not a regular file or block device",
        ),
        (&["--disk", &missing], "cannot open disk"),
        (&["--disk", &dir_arg], "not a regular file or block device"),
        (
            &["--disk", &format!("{twice},rw")],
            "expected PATH[,ro][,id=NAME]",
        ),
        (
            &["--disk", &format!("{twice},id=this-id-is-much-too-long")],
            "invalid disk id",
        ),
        (&["--disk", &twice, "--disk", &twice], "is given twice"),
        (
            &[
                "--disk",
                &format!("{twice},id=a"),
                "--disk",
                &format!("{missing},id=a"),
            ],
            "disk ids must be unique",
        ),
    ];
    for (extra, message) in cases {
        let run = run_guest("hello", extra);
        assert_eq!(run.status, 2, "{extra:?}: {}", run.stderr);
        assert!(run.stderr.contains(message), "{extra:?}: {}", run.stderr);
    }
}

/// A raw packet socket on one interface: sees every frame the tap's reader wrote, and what it
/// sends arrives at the tap's reader.
struct PacketSocket {
    fd: std::os::fd::OwnedFd,
}

impl PacketSocket {
    fn bind(interface: &str) -> PacketSocket {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the fd is owned by the OwnedFd below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(raw >= 0, "cannot open a packet socket");
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let cname = std::ffi::CString::new(interface).unwrap();
        // SAFETY: `cname` is a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert_ne!(index, 0, "no interface {interface}");
        // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "cannot bind the packet socket");
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of the size passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        PacketSocket { fd }
    }

    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n > 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is readable for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "cannot send the test frame");
    }
}

/// Runs the `virtio` guest's net mode (`cmdline`) against a tap: watches the frames it sends
/// and answers with one for it. Returns the run and the payloads of frames that should never
/// have reached the tap.
fn net_exchange(
    test: &str,
    cmdline: &'static str,
    honest: bool,
) -> Option<(Observed, Vec<String>)> {
    let tap = TestTap::create(test)?;
    let socket = PacketSocket::bind(&tap.name);
    let mac = [0x06, 0x00, 0x00, 0x00, 0x00, 0x01];
    let net_arg = format!("tap={},mac=06:00:00:00:00:01", tap.name);
    let scratch_name = format!("{test}-run");
    let guest = std::thread::spawn(move || {
        if honest {
            run_virtio_as_is(&scratch_name, &["--net", &net_arg], cmdline)
        } else {
            run_virtio(&scratch_name, &["--net", &net_arg], cmdline)
        }
    });
    let mut seen_out = false;
    let mut seen_forbidden = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !seen_out && std::time::Instant::now() < deadline && !guest.is_finished() {
        let Some(frame) = socket.recv() else { continue };
        if frame.len() < 14 || frame[12..14] != [0x88, 0xb5] {
            continue;
        }
        let payload = String::from_utf8_lossy(&frame[14..]).to_string();
        if payload.starts_with("bulkhead-net-out") {
            assert_eq!(
                &frame[6..12],
                &mac,
                "the guest's frame has the wrong source"
            );
            assert_eq!(frame.len(), 60);
            seen_out = true;
        } else if payload.starts_with("bulkhead-net-in") {
            continue; // our own frame, seen going out
        } else {
            seen_forbidden.push(payload);
        }
    }
    assert!(seen_out, "the guest's frame never reached the tap");
    let mut reply = vec![0u8; 60];
    reply[..6].copy_from_slice(&mac);
    reply[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    reply[12..14].copy_from_slice(&[0x88, 0xb5]);
    reply[14..29].copy_from_slice(b"bulkhead-net-in");
    socket.send(&reply);
    let o = guest.join().unwrap();
    assert_passed(&o);
    assert_eq!(counter(&o, "virtio-net0", "bytes_from_guest"), 60);
    Some((o, seen_forbidden))
}

#[test]
fn net_sends_only_frames_from_the_vms_mac_and_delivers_frames_for_it() {
    let test = "net_sends_only_frames_from_the_vms_mac_and_delivers_frames_for_it";
    if !kvm_available(test) {
        return;
    }
    let Some((o, seen_forbidden)) = net_exchange(test, "mode=net", false) else {
        return;
    };
    assert!(
        seen_forbidden.is_empty(),
        "frames that should have been dropped reached the tap: {seen_forbidden:?}"
    );
    let m = &o.metrics;
    assert_eq!(m.refusals("virtio-net0", "request.foreign_source_mac"), 1);
    assert_eq!(m.refusals("virtio-net0", "request.bad_header"), 1);
    assert_eq!(m.refusals("virtio-net0", "request.unexpected_writable"), 1);
    assert_eq!(m.total_refusals("virtio-net0"), 3);
    let spoof = o.alerts_of("net_mac_spoof");
    assert_eq!(spoof.len(), 1, "{:?}", o.alerts);
    assert_eq!(spoof[0]["output_fields"]["source_mac"], "06:00:00:00:00:00");
}

#[test]
fn an_honest_net_driver_raises_no_alert() {
    let test = "an_honest_net_driver_raises_no_alert";
    if !kvm_available(test) {
        return;
    }
    if let Some((o, seen_forbidden)) = net_exchange(test, "mode=net clean=1", true) {
        assert!(seen_forbidden.is_empty(), "{seen_forbidden:?}");
        assert_silent(&o, "virtio-net0");
    }
}

/// Runs the `virtio` guest's vsock mode (`cmdline`) and plays the host side: connects to the
/// guest's port 1234 and echoes, and answers the guest's connection to port 5000.
fn vsock_exchange(test: &str, cmdline: &'static str, honest: bool, cid: u32) -> Observed {
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::{Duration, Instant};
    let dir = scratch(test);
    let uds = dir.join("v.sock");
    let host_listener = UnixListener::bind(dir.join("v.sock_5000")).unwrap();
    // Never accepted: the guest's connection here is never drained.
    let _silent_listener = UnixListener::bind(dir.join("v.sock_6000")).unwrap();
    let vsock_arg = format!("cid={cid},uds={}", uds.display());
    let scratch_name = format!("{test}-run");
    let guest = std::thread::spawn(move || {
        if honest {
            run_virtio_as_is(&scratch_name, &["--vsock", &vsock_arg], cmdline)
        } else {
            run_virtio(&scratch_name, &["--vsock", &vsock_arg], cmdline)
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match UnixStream::connect(&uds) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline && !guest.is_finished() => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("cannot connect to {}: {e}", uds.display()),
        }
    };
    vsock_host_side(stream, &host_listener);

    let o = guest.join().unwrap();
    assert_passed(&o);
    o
}

#[test]
fn vsock_connects_both_ways_and_refuses_packets_that_are_not_the_guests() {
    let test = "vsock_connects_both_ways_and_refuses_packets_that_are_not_the_guests";
    if !kvm_available(test) {
        return;
    }
    // CIDs no other test uses, so runs in parallel do not collide.
    let o = vsock_exchange(
        "virtio-vsock",
        "mode=vsock",
        false,
        40_000 + std::process::id(),
    );
    for (name, want) in [
        ("request.wrong_cid", 2),
        ("request.unsupported", 1),
        ("request.bad_length", 1),
        ("request.bad_header", 1),
        ("request.credit_overrun", 1),
    ] {
        assert_eq!(o.metrics.refusals("virtio-vsock0", name), want, "{name}");
    }
    assert_eq!(o.metrics.total_refusals("virtio-vsock0"), 6);
    let wrong = o
        .alerts_of("virtio_malformed_payload")
        .into_iter()
        .find(|a| a["output_fields"]["reason"] == "wrong_cid")
        .expect("no alert for the foreign CID");
    assert_eq!(wrong["output_fields"]["destination_cid"], 2);
}

#[test]
fn an_honest_vsock_driver_raises_no_alert() {
    let test = "an_honest_vsock_driver_raises_no_alert";
    if !kvm_available(test) {
        return;
    }
    let o = vsock_exchange(
        "virtio-vsock-clean",
        "mode=vsock clean=1",
        true,
        30_000 + std::process::id(),
    );
    assert_silent(&o, "virtio-vsock0");
}

#[test]
fn a_host_io_failure_is_answered_with_ioerr_and_counted() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let test = "a_host_io_failure_is_answered_with_ioerr_and_counted";
    if !kvm_available(test) {
        return;
    }
    let dir = scratch("virtio-hostio");
    let disk = patterned_disk(&dir);
    let (metrics, alerts) = (dir.join("vm.prom"), dir.join("alerts.jsonl"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["run", "--kernel"])
        .arg(common::guest("virtio"))
        .arg("--disk")
        .arg(&disk)
        .arg("--metrics-file")
        .arg(&metrics)
        .arg("--alerts")
        .arg(&alerts)
        .args(["--cmdline", "mode=blk-hostio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reads below block: a hung VM is killed after a minute instead of hanging the test.
    let pid = child.id() as libc::pid_t;
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .is_err()
        {
            // SAFETY: kill has no memory effects, and the child is only reaped (its pid freed)
            // after the watchdog has finished.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while stdout.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if line.contains("waiting for the host") {
            break;
        }
        line.clear();
    }
    assert!(
        seen.contains("waiting for the host"),
        "guest output: {seen}"
    );
    // The file loses its second half under the running VM: the last sector is gone.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len((SECTORS as u64 / 2) * 512)
        .unwrap();
    child.stdin.take().unwrap().write_all(b"\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let _ = done.send(());
    watchdog.join().unwrap();
    let status = child.wait().unwrap();
    let run = Run {
        status: status.code().unwrap_or(-1),
        stdout: seen + &rest,
        stderr,
        elapsed: std::time::Duration::ZERO,
    };
    let o = common::observed(run, &metrics, &alerts);
    assert_passed(&o);
    assert_eq!(o.metrics.refusals("virtio-blk0", "request.host_io"), 1);
    assert_eq!(o.metrics.total_refusals("virtio-blk0"), 1);
    // The host's failure is not the guest's doing: no alert, and no reset.
    assert!(o.alerts.is_empty(), "{:?}", o.alerts);
    assert_eq!(counter(&o, "virtio-blk0", "policy_resets"), 0);
}
