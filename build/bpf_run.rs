//! A classic-BPF interpreter for the instructions seccompiler and build/seccomp_dispatch.rs
//! emit, run as the kernel runs a seccomp filter. Shared by build.rs (which checks the
//! dispatch it adds) and src/seccomp.rs's tests (which check what the filters allow).

use seccompiler::sock_filter;

/// The classic-BPF subset seccompiler emits, run as the kernel would.
pub fn run(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    // struct seccomp_data: nr, arch, instruction pointer (0 here), args.
    let mut data = [0u8; 64];
    data[..4].copy_from_slice(&nr.to_le_bytes());
    data[4..8].copy_from_slice(&arch.to_le_bytes());
    for (slot, a) in data[16..].chunks_exact_mut(8).zip(args) {
        slot.copy_from_slice(&a.to_le_bytes());
    }
    let (mut acc, mut pc) = (0u32, 0usize);
    loop {
        let i = &prog[pc];
        pc += 1;
        let jump = |taken: bool| usize::from(if taken { i.jt } else { i.jf });
        match i.code {
            0x20 => {
                // ld [k]
                let k = i.k as usize;
                acc = u32::from_le_bytes(data[k..k + 4].try_into().expect("4 bytes"));
            }
            0x54 => acc &= i.k,                 // and #k
            0x05 => pc += i.k as usize,         // ja
            0x15 => pc += jump(acc == i.k),     // jeq #k
            0x25 => pc += jump(acc > i.k),      // jgt #k
            0x35 => pc += jump(acc >= i.k),     // jge #k
            0x45 => pc += jump(acc & i.k != 0), // jset #k
            0x06 => return i.k,                 // ret #k
            code => panic!("instruction {code:#x} at {} not interpreted", pc - 1),
        }
    }
}
