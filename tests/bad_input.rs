//! Every kind of bad input is refused with a clear message and exit status 2, never a panic.

mod common;

use common::{bulkhead, guest, kvm_available, run_guest, scratch};

fn assert_refused(run: &common::Run, needle: &str) {
    assert_eq!(run.status, 2, "expected status 2; stderr: {}", run.stderr);
    assert!(
        run.stderr.contains(needle),
        "expected {needle:?} in stderr: {}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("panicked"),
        "panic on bad input: {}",
        run.stderr
    );
}

#[test]
fn missing_kernel_is_refused_before_kvm_is_touched() {
    let run = bulkhead(&[
        "run",
        "--kernel",
        "/nonexistent/vmlinux",
        "--kvm-device",
        "/nonexistent/kvm",
    ]);
    assert_refused(&run, "cannot open kernel /nonexistent/vmlinux");
}

#[test]
fn no_kernel_at_all_is_refused() {
    assert_refused(&bulkhead(&["run"]), "no kernel given");
}

#[test]
fn kernel_that_is_a_directory_is_refused() {
    assert_refused(
        &bulkhead(&["run", "--kernel", "/"]),
        "cannot open kernel /: not a regular file",
    );
}

#[test]
fn missing_initrd_is_refused() {
    let kernel = guest("hello");
    let run = bulkhead(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_refused(&run, "cannot open initrd /nonexistent/initrd");
}

#[test]
fn file_that_is_neither_elf_nor_bzimage_is_refused() {
    if !kvm_available("file_that_is_neither_elf_nor_bzimage_is_refused") {
        return;
    }
    let dir = scratch("not-a-kernel");
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, vec![0x42u8; 64 * 1024]).unwrap();
    let run = bulkhead(&["run", "--kernel", junk.to_str().unwrap()]);
    assert_refused(&run, "is neither an ELF kernel nor a bzImage");
}

#[test]
fn initrd_larger_than_guest_ram_is_refused() {
    if !kvm_available("initrd_larger_than_guest_ram_is_refused") {
        return;
    }
    let dir = scratch("big-initrd");
    let initrd = dir.join("initrd.img");
    let file = std::fs::File::create(&initrd).unwrap();
    file.set_len(20 << 20).unwrap();
    let run = run_guest(
        "hello",
        &["--mem-mib", "16", "--initrd", initrd.to_str().unwrap()],
    );
    assert_refused(&run, "give the VM more memory");
}

#[test]
fn initrd_that_fits_is_accepted() {
    if !kvm_available("initrd_that_fits_is_accepted") {
        return;
    }
    let dir = scratch("small-initrd");
    let initrd = dir.join("initrd.img");
    std::fs::write(&initrd, vec![1u8; 1 << 20]).unwrap();
    let run = run_guest(
        "hello",
        &[
            "--mem-mib",
            "16",
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            "exit=5",
        ],
    );
    assert_eq!(run.status, 5, "stderr: {}", run.stderr);
}

#[test]
fn vcpu_count_of_zero_or_beyond_the_limit_is_refused() {
    let kernel = guest("hello");
    for n in ["0", "255", "100000"] {
        let run = bulkhead(&["run", "--kernel", kernel.to_str().unwrap(), "--vcpus", n]);
        assert_refused(&run, "out of range");
    }
    assert_refused(
        &bulkhead(&["run", "--kernel", "k", "--vcpus", "-1"]),
        "'-1'",
    );
}

#[test]
fn memory_below_16_mib_or_beyond_the_host_is_refused() {
    let kernel = guest("hello");
    let kernel = kernel.to_str().unwrap();
    assert_refused(
        &bulkhead(&["run", "--kernel", kernel, "--mem-mib", "15"]),
        "too small",
    );
    assert_refused(
        &bulkhead(&["run", "--kernel", kernel, "--mem-mib", "1099511627776"]),
        "more than this host's",
    );
}

#[test]
fn unknown_flag_is_refused() {
    assert_refused(
        &bulkhead(&["run", "--kernel", "k", "--frobnicate"]),
        "--frobnicate",
    );
    assert_refused(&bulkhead(&["launch"]), "launch");
}

#[test]
fn bad_console_and_ids_are_refused() {
    let kernel = guest("hello");
    let kernel = kernel.to_str().unwrap();
    assert_refused(
        &bulkhead(&["run", "--kernel", kernel, "--console", "tcp:80"]),
        "invalid --console",
    );
    assert_refused(
        &bulkhead(&["run", "--kernel", kernel, "--tenant", "a/../b"]),
        "invalid --tenant",
    );
    assert_refused(
        &bulkhead(&["run", "--kernel", kernel, "--vm-id", ""]),
        "invalid --vm-id",
    );
}

#[test]
fn unknown_json_field_is_refused_and_names_the_field() {
    let dir = scratch("bad-json");
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, r#"{"kernel": "k", "memory": 64}"#).unwrap();
    assert_refused(
        &bulkhead(&["run", "--config", cfg.to_str().unwrap()]),
        "unknown field `memory`",
    );
    std::fs::write(&cfg, "{not json").unwrap();
    assert_refused(
        &bulkhead(&["run", "--config", cfg.to_str().unwrap()]),
        "invalid config file",
    );
    assert_refused(
        &bulkhead(&["run", "--config", "/nonexistent.json"]),
        "cannot read config file",
    );
}

#[test]
fn unusable_kvm_device_is_refused_with_how_to_fix_it() {
    let kernel = guest("hello");
    let run = bulkhead(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--kvm-device",
        "/nonexistent/kvm",
    ]);
    assert_refused(&run, "modprobe");
    let run = bulkhead(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--kvm-device",
        "/dev/null",
    ]);
    assert_refused(&run, "/dev/null");
}

#[test]
fn bad_supervision_settings_are_refused_before_the_vm_starts() {
    let kernel = guest("hello");
    let kernel = kernel.to_str().unwrap();
    let cases: [(&[&str], &str); 7] = [
        (&["--timeout", "0"], "--timeout 0 is out of range"),
        (
            &["--on-violation", "panic"],
            "invalid --on-violation \"panic\"",
        ),
        (
            &["--alerts-http", "https://siem.example/"],
            "https is not supported",
        ),
        (&["--alerts-http", "http://a b/"], "invalid --alerts-http"),
        (&["--alerts", ""], "invalid --alerts"),
        (
            &["--metrics-file", "/nonexistent-dir/vm.prom"],
            "cannot write the metrics file /nonexistent-dir/vm.prom",
        ),
        (
            &["--alerts", "/nonexistent-dir/alerts.jsonl"],
            "cannot open alerts file /nonexistent-dir/alerts.jsonl",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["run", "--kernel", kernel];
        args.extend_from_slice(extra);
        assert_refused(&bulkhead(&args), needle);
    }
}

fn fifo(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    let c = std::ffi::CString::new(p.display().to_string()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only reads it.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    p
}

#[test]
fn a_fifo_as_kernel_initrd_disk_or_config_file_is_refused_at_once_never_waited_on() {
    if !kvm_available(
        "a_fifo_as_kernel_initrd_disk_or_config_file_is_refused_at_once_never_waited_on",
    ) {
        return;
    }
    let dir = scratch("fifo-inputs");
    let kernel = guest("hello").display().to_string();
    let pipe = fifo(&dir, "pipe").display().to_string();
    for (args, says) in [
        (vec!["run", "--kernel", &pipe], "not a regular file"),
        (
            vec!["run", "--kernel", &kernel, "--initrd", &pipe],
            "not a regular file",
        ),
        (
            vec!["run", "--kernel", &kernel, "--disk", &pipe],
            "not a regular file or block device",
        ),
        (vec!["run", "--config", &pipe], "not a regular file"),
    ] {
        let run = common::bulkhead_with_limit(&args, std::time::Duration::from_secs(10));
        assert_eq!(run.status, 2, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
    }
}

#[test]
fn host_side_settings_that_would_weaken_the_vm_are_refused() {
    let dir = scratch("host-side-settings");
    let kernel = guest("hello").display().to_string();
    // A tap name with '%' lets the kernel choose the device.
    assert_refused(
        &bulkhead(&["run", "--kernel", &kernel, "--net", "tap=tap%d"]),
        "tap%d",
    );
    // A file named like the vsock socket's port namespace is reachable by the guest.
    let uds = dir.join("v.sock");
    let metrics = format!("{}_80", uds.display());
    assert_refused(
        &bulkhead(&[
            "run",
            "--kernel",
            &kernel,
            "--vsock",
            &format!("cid=9,uds={}", uds.display()),
            "--metrics-file",
            &metrics,
        ]),
        "followed by _PORT",
    );
    // A settings file can not turn seccomp off alone.
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        format!(r#"{{"kernel": "{kernel}", "seccomp": false}}"#),
    )
    .unwrap();
    assert_refused(
        &bulkhead(&["run", "--config", &config.display().to_string()]),
        "needs --no-seccomp",
    );
    // Nor can it be of any size.
    let huge = dir.join("huge.json");
    std::fs::write(&huge, vec![b' '; (1 << 20) + 1]).unwrap();
    assert_refused(
        &bulkhead(&["run", "--config", &huge.display().to_string()]),
        "more than the 1048576",
    );
}

#[test]
fn no_follow_refuses_a_kernel_or_disk_that_is_a_symlink() {
    if !kvm_available("no_follow_refuses_a_kernel_or_disk_that_is_a_symlink") {
        return;
    }
    let dir = scratch("no-follow");
    let link = dir.join("vmlinux");
    std::os::unix::fs::symlink(guest("hello"), &link).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let disk_link = dir.join("disk-link.img");
    std::os::unix::fs::symlink(&disk, &disk_link).unwrap();
    let kernel = link.display().to_string();
    let follows = bulkhead(&["run", "--kernel", &kernel, "--console", "none"]);
    assert_eq!(follows.status, 0, "{}", follows.stderr);
    assert_refused(
        &bulkhead(&[
            "run",
            "--kernel",
            &kernel,
            "--console",
            "none",
            "--no-follow",
        ]),
        "cannot open kernel",
    );
    let real = guest("hello").display().to_string();
    assert_refused(
        &bulkhead(&[
            "run",
            "--kernel",
            &real,
            "--console",
            "none",
            "--disk",
            &disk_link.display().to_string(),
            "--no-follow",
        ]),
        "disk-link.img",
    );
}

/// Each bad share is refused before any backend or VM process starts, with a message naming
/// the share and what is wrong with it. No KVM is needed: the supervisor checks shares first.
#[test]
fn bad_shares_are_refused_with_the_share_named_before_anything_starts() {
    let dir = scratch("bad-shares");
    let file = dir.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let link = dir.join("link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    let kernel = guest("hello");
    let kernel = kernel.to_str().unwrap();
    let file_share = format!("{}:t", file.display());
    let long_tag = format!("{}:{}", dir.display(), "t".repeat(37));
    let link_share = format!("{}:t", link.display());
    let dir_share = format!("{}:t", dir.display());
    let cases: [(&[&str], &str); 7] = [
        (
            &["--share", "/nonexistent/dir:t"],
            "share t: /nonexistent/dir: No such file",
        ),
        (&["--share", &file_share], "is not a directory"),
        (&["--share", &long_tag], "invalid share tag"),
        (&["--share", "/proc/self:t"], "the host's /proc"),
        (&["--share", "/srv"], "invalid --share \"/srv\""),
        (
            &[
                "--share",
                &dir_share,
                "--virtiofsd",
                "/nonexistent/virtiofsd",
            ],
            "the virtiofsd /nonexistent/virtiofsd given can not be run",
        ),
        (
            &["--share", &dir_share, "--share", &dir_share],
            "two shares have the tag \"t\"",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["run", "--kernel", kernel];
        args.extend_from_slice(extra);
        assert_refused(&bulkhead(&args), needle);
    }
    // A share reached through a symlink is refused under --no-follow (what a jail implies).
    let run = bulkhead(&[
        "run",
        "--kernel",
        kernel,
        "--no-follow",
        "--share",
        &link_share,
    ]);
    assert_refused(&run, "leads through a symlink");
    // With no virtiofsd anywhere the message names the package to install.
    let run = common::command_with_limit(
        std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"))
            .env("PATH", "/nonexistent")
            .args(["run", "--kernel", kernel, "--share", &dir_share]),
        std::time::Duration::from_secs(30),
    );
    if !std::path::Path::new("/usr/libexec/virtiofsd").exists() {
        assert_refused(&run, "install Debian's virtiofsd package");
    }
}

/// `bulkhead exec` refuses what it can not run with status 2 and the input named: a kernel
/// that is not there, a share that is not there, and no command at all.
#[test]
fn exec_refuses_a_missing_kernel_a_missing_share_and_no_command() {
    let kernel = guest("hello");
    let kernel = kernel.to_str().unwrap();
    let run = bulkhead(&["exec", "--kernel", "/nonexistent/bzImage", "--", "true"]);
    assert_refused(&run, "/nonexistent/bzImage");
    let run = bulkhead(&[
        "exec",
        "--kernel",
        kernel,
        "--share",
        "/nonexistent/dir",
        "--",
        "true",
    ]);
    assert_refused(&run, "share /nonexistent/dir");
    let run = bulkhead(&["exec", "--kernel", kernel]);
    assert_eq!(run.status, 2, "{}", run.stderr);
}
