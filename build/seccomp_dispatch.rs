//! A binary search over system call numbers in front of seccompiler's per-call rule chains.
//!
//! seccompiler lays a filter out as one chain: three instructions per allowed call, tried in
//! turn. The kernel pays for that length twice: at install, when it runs the filter for every
//! system call number to fill its allow cache (under the signal lock; 100-180 µs per install
//! on these hosts against 10 µs for a one-instruction filter), and at every later system call
//! a thread makes. Here each call's chain is compiled on its own and reached in about
//! log2(calls) comparisons. The build checks, for every call number, that the result gives
//! the verdict seccompiler's own chain gives.

use seccompiler::{compile_from_json, sock_filter, BpfProgram, TargetArch};

use crate::bpf_run::run;
use serde_json::{Map, Value};

const LD_W_ABS: u16 = 0x20;
const JA: u16 = 0x05;
/// `BPF_JMP | BPF_JEQ | BPF_K`.
pub const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;
/// At most this many calls are compared one by one at a leaf of the search.
const LEAF: usize = 3;
/// seccompiler's arch check (three instructions) and `ld nr`.
const PREFIX: usize = 4;

/// Where an instruction jumps to, resolved once the layout is known.
enum Target {
    Block(usize),
    Default,
}

struct Op {
    insn: sock_filter,
    ja_to: Option<Target>,
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// `role`'s filter in `json` (seccompiler's format), with the dispatch above.
pub fn compile(json: &str, role: &str, arch: TargetArch, linear: &BpfProgram) -> BpfProgram {
    let doc: Value = serde_json::from_str(json).expect("the filter file is JSON");
    let filter = doc[role]
        .as_object()
        .expect("the role's filter is an object");
    let rules = filter["filter"]
        .as_array()
        .expect("the filter's rules are a list");
    // One chain per call, in the file's order of its rules.
    let mut calls: Vec<(String, Vec<Value>)> = Vec::new();
    for rule in rules {
        let name = rule["syscall"]
            .as_str()
            .expect("a rule names its syscall")
            .to_string();
        match calls.iter_mut().find(|(n, _)| *n == name) {
            Some((_, list)) => list.push(rule.clone()),
            None => calls.push((name, vec![rule.clone()])),
        }
    }
    let mut prefix: Option<Vec<sock_filter>> = None;
    let mut blocks: Vec<(u32, Vec<sock_filter>)> = Vec::new();
    for (name, list) in calls {
        let mut one: Map<String, Value> = filter.clone();
        one.insert("filter".into(), Value::Array(list));
        let text = serde_json::to_string(&Value::Object(Map::from_iter([(
            role.to_string(),
            Value::Object(one),
        )])))
        .expect("serializes");
        let mut compiled = compile_from_json(text.as_bytes(), arch)
            .unwrap_or_else(|e| panic!("cannot compile {role}'s {name} rules alone: {e}"));
        let prog = compiled.remove(role).expect("the one filter");
        // seccompiler's layout: the arch check (3), `ld nr`, then `jeq NR` opening the chain,
        // which ends with the mismatch action. Relative jumps keep the chain whole when moved.
        assert!(prog.len() > 5, "{role}'s {name}: too short");
        assert!(
            prog[3].code == LD_W_ABS && prog[3].k == 0,
            "{role}'s {name}: no ld nr"
        );
        assert!(
            prog[4].code == JEQ_K,
            "{role}'s {name}: the chain does not open with jeq"
        );
        assert!(
            prog[prog.len() - 1].code == RET_K,
            "{role}'s {name}: no closing ret"
        );
        match &prefix {
            None => prefix = Some(prog[..PREFIX].to_vec()),
            Some(p) => assert!(p[..] == prog[..PREFIX], "{role}: arch checks differ"),
        }
        blocks.push((prog[PREFIX].k, prog[PREFIX..].to_vec()));
    }
    blocks.sort_by_key(|(nr, _)| *nr);
    let prefix = prefix.expect("the filter allows at least one call");
    let default = linear.last().expect("a program").clone();
    assert!(
        default.code == RET_K,
        "{role}: the chain does not end with ret"
    );

    let index: Vec<(u32, usize)> = blocks
        .iter()
        .enumerate()
        .map(|(i, (nr, _))| (*nr, i))
        .collect();
    let mut tree = Vec::new();
    search(&index, &mut tree);
    // Layout: prefix, search, the chains, the default action.
    let mut starts = Vec::with_capacity(blocks.len());
    let mut at = prefix.len() + tree.len();
    for (_, b) in &blocks {
        starts.push(at);
        at += b.len();
    }
    let default_at = at;
    let mut out: BpfProgram = prefix;
    for (i, op) in tree.into_iter().enumerate() {
        let here = PREFIX + i;
        let mut ins = op.insn;
        if let Some(t) = op.ja_to {
            let to = match t {
                Target::Block(b) => starts[b],
                Target::Default => default_at,
            };
            ins.k = u32::try_from(to - here - 1).expect("fits");
        }
        out.push(ins);
    }
    for (_, b) in blocks {
        out.extend(b);
    }
    out.push(default);
    assert!(
        out.len() <= 4096,
        "{role}: {} instructions, over the kernel's limit",
        out.len()
    );
    out
}

/// Emits a search over `items` (number, chain), sorted by number.
fn search(items: &[(u32, usize)], out: &mut Vec<Op>) {
    if items.len() <= LEAF {
        for &(nr, block) in items {
            out.push(Op {
                insn: insn(JEQ_K, 0, 1, nr),
                ja_to: None,
            });
            out.push(Op {
                insn: insn(JA, 0, 0, 0),
                ja_to: Some(Target::Block(block)),
            });
        }
        out.push(Op {
            insn: insn(JA, 0, 0, 0),
            ja_to: Some(Target::Default),
        });
        return;
    }
    let mid = items.len() / 2;
    let mut left = Vec::new();
    search(&items[..mid], &mut left);
    let skip =
        u8::try_from(left.len()).expect("a half of the search spans at most 255 instructions");
    out.push(Op {
        insn: insn(JGE_K, skip, 0, items[mid].0),
        ja_to: None,
    });
    out.extend(left);
    search(&items[mid..], out);
}

/// Every call number, with a few argument patterns and both architectures, gets the same
/// verdict from both programs; so do the arguments each rule in `json` allows, and each of
/// those with one condition's argument changed so that condition fails.
pub fn check_same_verdicts(json: &str, role: &str, linear: &[sock_filter], tree: &[sock_filter]) {
    let mut arg_sets: Vec<[u64; 6]> = Vec::new();
    for p in [0, 1, 0x22, u64::MAX, 0x7fff_fff1] {
        for slot in 0..6 {
            let mut args = [0u64; 6];
            args[slot] = p;
            arg_sets.push(args);
        }
    }
    let doc: Value = serde_json::from_str(json).expect("the filter file is JSON");
    for rule in doc[role]["filter"]
        .as_array()
        .expect("the filter's rules are a list")
    {
        let conds: Vec<(usize, u64, Option<u64>)> = rule["args"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|c| {
                let index = c["index"].as_u64().expect("an argument index") as usize;
                let val = c["val"].as_u64().expect("a condition's value");
                (index, val, c["op"]["masked_eq"].as_u64())
            })
            .collect();
        let mut allowed = [0u64; 6];
        for &(index, val, _) in &conds {
            allowed[index] = val;
        }
        arg_sets.push(allowed);
        for &(index, val, mask) in &conds {
            let mut failing = allowed;
            failing[index] = match mask {
                Some(mask) => val ^ mask,
                None => val.wrapping_add(1),
            };
            arg_sets.push(failing);
        }
    }
    for arch in [0xc000_003e_u32, 0x4000_0003] {
        // The x86_64 calls, x32's (bit 30 set) and the largest number.
        let numbers = (0..1024u32)
            .chain(0x4000_0000..0x4000_0400)
            .chain([u32::MAX]);
        for nr in numbers {
            for &args in &arg_sets {
                let (a, b) = (run(linear, nr, arch, args), run(tree, nr, arch, args));
                assert_eq!(
                    a, b,
                    "{role}: call {nr} arch {arch:#x} args {args:?}: {a:#x} != {b:#x}"
                );
            }
        }
    }
}
