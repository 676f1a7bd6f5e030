//! A binary search over system call numbers in front of seccompiler's per-call rule chains.
//!
//! seccompiler lays a filter out as one chain: three instructions per allowed call, tried in
//! turn. The kernel pays for that length twice: at install, when it runs the filter for every
//! system call number to fill its allow cache (under the signal lock; 100-180 µs per install
//! on these hosts against 10 µs for a one-instruction filter), and at every later system call
//! a thread makes. Here each call's chain is compiled on its own and reached in about
//! log2(calls) comparisons. build/seccomp_check.rs checks the result gives the verdicts
//! seccompiler's own chain gives.

use seccompiler::{compile_from_json, sock_filter, BpfProgram, TargetArch};

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

/// `role`'s filter in `json` (seccompiler's format), with the dispatch above; and the name and
/// number of each call it allows some way.
pub fn compile(
    json: &str,
    role: &str,
    arch: TargetArch,
    linear: &BpfProgram,
) -> (BpfProgram, Vec<(String, u32)>) {
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
    let mut numbers = Vec::with_capacity(calls.len());
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
        numbers.push((name, prog[PREFIX].k));
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
    (out, numbers)
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
