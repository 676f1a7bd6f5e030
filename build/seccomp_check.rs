//! What build.rs checks of each filter before embedding it: that the kernel will take it, and
//! that it gives seccompiler's verdicts, the binary search (build/seccomp_dispatch.rs) and the
//! shortening (build/bpf_opt.rs) notwithstanding.

use std::collections::BTreeMap;

use seccompiler::sock_filter;
use serde_json::Value;

use crate::bpf_run::run;

const RET_K: u16 = 0x06;
const JA: u16 = 0x05;
/// `BPF_JMP`, the class of every jump.
const JMP_CLASS: u16 = 0x05;
/// The kernel's limit on a classic-BPF program (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;
/// The x86_64 call numbers the checks run (x32's are these with bit 30 set).
const CALL_NUMBERS: u32 = 1024;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// What the kernel's classic-BPF checker asks of a program, which the interpreter would only
/// notice on a path it takes: a length within the limit, a return last, every jump landing
/// inside the program.
pub fn kernel_shape(role: &str, prog: &[sock_filter]) {
    assert!(
        !prog.is_empty() && prog.len() <= MAX_INSNS,
        "{role}: {} instructions, outside 1..={MAX_INSNS}",
        prog.len()
    );
    assert!(
        prog.last().map(|i| i.code) == Some(RET_K),
        "{role}: the last instruction is not a return"
    );
    for (i, insn) in prog.iter().enumerate() {
        if insn.code & 0x07 != JMP_CLASS {
            continue;
        }
        let reach = if insn.code == JA {
            usize::try_from(insn.k).expect("a 32-bit offset")
        } else {
            usize::from(insn.jt.max(insn.jf))
        };
        assert!(
            i + 1 + reach < prog.len(),
            "{role}: the jump at {i} lands outside the program"
        );
    }
}

/// `made` gives the verdict `linear` (seccompiler's own chain) gives:
/// - for every call number below 1024 and x32's, and the largest, with a few argument
///   patterns, on both architectures;
/// - for each allowed call (`calls`: name and number), with every combination of the values
///   its rules compare each argument with, each one more (or with the masked bits flipped) and
///   zero;
/// - with the run-time values (`placeholders`, patched in by src/seccomp.rs) left distinct as
///   the build leaves them, and all equal to one value, as they can be: the pid and tid of a
///   main thread, the supervisor's other tids when it has fewer threads, SIGRTMIN (34, a
///   literal the rules test too), pid 1 in a namespace.
pub fn same_verdicts(
    json: &str,
    role: &str,
    calls: &[(String, u32)],
    placeholders: &[u32],
    linear: &[sock_filter],
    made: &[sock_filter],
) {
    for (name, nr) in calls {
        assert!(
            *nr < CALL_NUMBERS,
            "{role}: {name} is call {nr}, beyond the numbers the check runs"
        );
    }
    let per_call = argument_combinations(json, role);
    let mut patterns = Vec::new();
    for p in [0, 1, 0x22, u64::MAX, 0x7fff_fff1] {
        for slot in 0..6 {
            let mut args = [0u64; 6];
            args[slot] = p;
            patterns.push(args);
        }
    }
    for same in [None, Some(0x22), Some(1), Some(0x7fff_fff1)] {
        let patch = |v: u32| match same {
            Some(s) if placeholders.contains(&v) => s,
            _ => v,
        };
        let (linear, made) = (patched(linear, &patch), patched(made, &patch));
        let compare = |nr: u32, arch: u32, args: [u64; 6]| {
            let args = args.map(|a| match u32::try_from(a) {
                Ok(low) => u64::from(patch(low)),
                Err(_) => a,
            });
            let (a, b) = (run(&linear, nr, arch, args), run(&made, nr, arch, args));
            assert_eq!(
                a, b,
                "{role}: call {nr} arch {arch:#x} args {args:?} run-time values {same:?}: \
                 {a:#x} != {b:#x}"
            );
        };
        for arch in [AUDIT_ARCH_X86_64, 0x4000_0003] {
            let numbers = (0..CALL_NUMBERS)
                .chain(0x4000_0000..0x4000_0000 + CALL_NUMBERS)
                .chain([u32::MAX]);
            for nr in numbers {
                for &args in &patterns {
                    compare(nr, arch, args);
                }
            }
        }
        for (name, nr) in calls {
            for &args in per_call.get(name.as_str()).map_or(&[][..], Vec::as_slice) {
                compare(*nr, AUDIT_ARCH_X86_64, args);
            }
        }
    }
}

fn patched(prog: &[sock_filter], patch: &impl Fn(u32) -> u32) -> Vec<sock_filter> {
    prog.iter()
        .map(|i| sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: patch(i.k),
        })
        .collect()
}

/// For each call with argument conditions in `json`, every combination of the values its
/// rules compare each argument with, those plus one (or with the masked bits flipped), and 0.
fn argument_combinations(json: &str, role: &str) -> BTreeMap<String, Vec<[u64; 6]>> {
    let doc: Value = serde_json::from_str(json).expect("the filter file is JSON");
    let mut values: BTreeMap<String, [Vec<u64>; 6]> = BTreeMap::new();
    for rule in doc[role]["filter"]
        .as_array()
        .expect("the filter's rules are a list")
    {
        let name = rule["syscall"].as_str().expect("a rule names its call");
        let slots = values
            .entry(name.to_string())
            .or_insert_with(|| std::array::from_fn(|_| vec![0]));
        for cond in rule["args"].as_array().map_or(&[][..], Vec::as_slice) {
            let index = cond["index"].as_u64().expect("an argument index");
            let slot = usize::try_from(index)
                .ok()
                .and_then(|i| slots.get_mut(i))
                .expect("an argument index below 6");
            let val = cond["val"].as_u64().expect("a condition's value");
            let other = match cond["op"]["masked_eq"].as_u64() {
                Some(mask) => val ^ mask,
                None => val.wrapping_add(1),
            };
            slot.extend([val, other]);
        }
    }
    values
        .into_iter()
        .map(|(name, mut slots)| {
            let mut combos = vec![[0u64; 6]];
            for (i, slot) in slots.iter_mut().enumerate() {
                slot.sort_unstable();
                slot.dedup();
                combos = combos
                    .iter()
                    .flat_map(|c| {
                        slot.iter().map(move |&v| {
                            let mut c = *c;
                            c[i] = v;
                            c
                        })
                    })
                    .collect();
            }
            assert!(
                combos.len() <= 100_000,
                "{role}: {name}'s argument combinations are too many to check"
            );
            (name, combos)
        })
        .collect()
}
