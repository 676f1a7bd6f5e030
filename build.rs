//! Compiles the seccomp filters in seccomp/*.json to BPF at build time; src/seccomp.rs embeds
//! the result. A filter that fails to compile fails the build.
//!
//! Also compiles `bulkhead exec`'s guest init (src/exec/init.c) into a static program that
//! src/exec embeds and puts in the initramfs it makes.

use std::env;
use std::fs;
use std::path::PathBuf;

use seccompiler::{compile_from_json, TargetArch};

#[path = "build/bpf_opt.rs"]
mod bpf_opt;
#[path = "build/bpf_run.rs"]
mod bpf_run;
#[path = "build/seccomp_check.rs"]
mod seccomp_check;
#[path = "build/seccomp_dispatch.rs"]
mod seccomp_dispatch;

/// One filter per thread role; each JSON file holds one filter named for its role.
const ROLES: &[&str] = &["vmm", "vcpu", "supervisor"];
/// Values the filters compare with that are only known at run time (src/seccomp.rs patches
/// them in): the process's own pid, SIGRTMIN, the VM process's pid (the supervisor's), the
/// id of the thread installing the filter, and the supervisor's two other threads' ids.
const PLACEHOLDERS: &[u32] = &[
    0x7fff_fff1,
    0x7fff_fff2,
    0x7fff_fff3,
    0x7fff_fff4,
    0x7fff_fff5,
    0x7fff_fff6,
];

fn main() {
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => TargetArch::x86_64,
        Ok(other) => panic!("bulkhead's seccomp filters are written for x86_64, not {other}"),
        Err(e) => panic!("CARGO_CFG_TARGET_ARCH unset: {e}"),
    };
    for role in ROLES {
        let src = PathBuf::from("seccomp").join(format!("{role}.json"));
        println!("cargo:rerun-if-changed={}", src.display());
        let json = fs::read_to_string(&src)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
        let mut filters = compile_from_json(json.as_bytes(), arch)
            .unwrap_or_else(|e| panic!("cannot compile {}: {e}", src.display()));
        let linear = filters
            .remove(*role)
            .unwrap_or_else(|| panic!("{} has no filter named {role:?}", src.display()));
        assert!(
            filters.is_empty(),
            "{} holds filters other than {role:?}",
            src.display()
        );
        let (dispatched, calls) = seccomp_dispatch::compile(&json, role, arch, &linear);
        let program = bpf_opt::optimize(&dispatched, |k| PLACEHOLDERS.contains(&k));
        seccomp_check::kernel_shape(role, &program);
        seccomp_check::same_verdicts(&json, role, &calls, PLACEHOLDERS, &linear, &program);
        for insn in linear.iter().chain(&program) {
            assert!(
                // An equality test is the only instruction a placeholder may appear in.
                !PLACEHOLDERS.contains(&insn.k) || insn.code == seccomp_dispatch::JEQ_K,
                "{}: a placeholder value appears outside an equality test",
                src.display()
            );
        }
        let mut bytes = Vec::with_capacity(program.len() * 8);
        for insn in &program {
            bytes.extend_from_slice(&insn.code.to_le_bytes());
            bytes.push(insn.jt);
            bytes.push(insn.jf);
            bytes.extend_from_slice(&insn.k.to_le_bytes());
        }
        let dst = out_dir.join(format!("{role}.bpf"));
        fs::write(&dst, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", dst.display()));
    }
    build_exec_init(&out_dir);
    println!("cargo:rerun-if-changed=build.rs");
}

/// The guest init: static, so the initramfs needs nothing else; small, so it loads fast.
fn build_exec_init(out_dir: &std::path::Path) {
    let src = PathBuf::from("src/exec/init.c");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=CC");
    let cc = env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let dst = out_dir.join("exec-init");
    let status = std::process::Command::new(&cc)
        .args(["-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&dst)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the C compiler {cc} for {}: {e} (apt-get install build-essential)",
                src.display()
            )
        });
    assert!(
        status.success(),
        "{cc} could not build {} (a static build needs libc6-dev: apt-get install build-essential)",
        src.display()
    );
}
