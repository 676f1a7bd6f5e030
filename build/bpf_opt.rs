//! Shrinks a classic-BPF seccomp program without changing a verdict.
//!
//! seccompiler's chains, and the dispatch build/seccomp_dispatch.rs puts in front of them,
//! test the call number twice (at the search's leaf and again at the chain's head), load the
//! same argument again before each value it is compared with, jump to jumps and to returns,
//! and end each rule with its own return (three values in all). The kernel pays for every
//! instruction at each install: it checks and converts the program, JIT-compiles it in
//! passes over the whole image, and runs it once per call number to fill its allow cache.
//! Four passes here, repeated until nothing changes:
//! - a test whose outcome is known, because an equality test just taken set the accumulator
//!   (or a mask since) and nothing loaded it since, becomes a plain jump; a load of the word
//!   the accumulator still holds becomes a jump to the next instruction;
//! - a jump to a jump goes straight to the end of the chain, a plain jump to a return becomes
//!   that return, a test whose branches meet becomes a plain jump;
//! - a test jumping to a return jumps to one copy of it at the end of the program instead;
//! - instructions no path reaches, and jumps to the next instruction, are dropped.
//!
//! Only forward jumps exist in classic BPF, so one pass in program order sees every edge into
//! an instruction before the instruction itself. Dropping instructions only shortens forward
//! distances, so a test's 8-bit offsets that fit before a pass fit after it; the passes that
//! send a test further on check its reach in the layout of the moment. A program with
//! an instruction not listed below is returned unchanged. build/seccomp_check.rs then checks
//! the kernel will take the result and that it gives the original's verdicts.

use seccompiler::sock_filter;

const LD_W_ABS: u16 = 0x20;
const ALU_AND_K: u16 = 0x54;
const RET_K: u16 = 0x06;
const JA: u16 = 0x05;
const JEQ_K: u16 = 0x15;
const JGT_K: u16 = 0x25;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
/// Rounds of the passes before giving up (the filters settle in under ten).
const MAX_ROUNDS: usize = 64;

/// Where control goes after an instruction, as absolute indices.
#[derive(Clone, Copy, PartialEq)]
enum Next {
    /// ld, and: the next instruction.
    Fall,
    /// ja.
    Jump(usize),
    /// A test: taken, not taken.
    Test(usize, usize),
    Ret,
}

#[derive(Clone)]
struct Node {
    insn: sock_filter,
    next: Next,
}

/// `prog` made shorter; `runtime(k)` says a constant is patched in at run time (so a test
/// against it is never decided here).
pub fn optimize(prog: &[sock_filter], runtime: impl Fn(u32) -> bool) -> Vec<sock_filter> {
    let Some(mut nodes) = decode(prog) else {
        return prog.to_vec();
    };
    // Each pass only moves jumps forward, removes tests and jumps, or adds a return some test
    // then uses, so this settles in a few rounds; a pass that undid another would not, and
    // fails the build here rather than hanging it.
    for _ in 0..MAX_ROUNDS {
        let before = nodes.len();
        let mut changed = fold_known(&mut nodes, &runtime);
        changed |= thread(&mut nodes);
        changed |= share_returns(&mut nodes);
        nodes = compact(nodes);
        if !changed && nodes.len() == before {
            return encode(&nodes);
        }
    }
    panic!("the BPF shortening did not settle in {MAX_ROUNDS} rounds")
}

fn decode(prog: &[sock_filter]) -> Option<Vec<Node>> {
    let mut nodes = Vec::with_capacity(prog.len());
    for (i, insn) in prog.iter().enumerate() {
        let next = match insn.code {
            LD_W_ABS | ALU_AND_K => Next::Fall,
            RET_K => Next::Ret,
            JA => Next::Jump(
                usize::try_from(insn.k)
                    .ok()
                    .and_then(|k| (i + 1).checked_add(k))?,
            ),
            JEQ_K | JGT_K | JGE_K | JSET_K => {
                Next::Test(i + 1 + usize::from(insn.jt), i + 1 + usize::from(insn.jf))
            }
            _ => return None,
        };
        let target_ok = match next {
            Next::Fall => i + 1 < prog.len(),
            Next::Jump(t) => t < prog.len(),
            Next::Test(t, f) => t < prog.len() && f < prog.len(),
            Next::Ret => true,
        };
        if !target_ok {
            return None;
        }
        nodes.push(Node {
            insn: insn.clone(),
            next,
        });
    }
    Some(nodes)
}

/// What is known of the accumulator on entry to an instruction: its value, and the word of
/// the call's data it was loaded from (still holding it).
#[derive(Clone, Copy, PartialEq)]
enum Acc {
    Unreached,
    Known {
        value: Option<u32>,
        field: Option<u32>,
    },
}

const NOTHING_KNOWN: Acc = Acc::Known {
    value: None,
    field: None,
};

fn meet(a: Acc, b: Acc) -> Acc {
    let same = |x: Option<u32>, y: Option<u32>| if x == y { x } else { None };
    match (a, b) {
        (Acc::Unreached, x) | (x, Acc::Unreached) => x,
        (Acc::Known { value: v, field: f }, Acc::Known { value: w, field: g }) => Acc::Known {
            value: same(v, w),
            field: same(f, g),
        },
    }
}

/// Turns tests whose outcome the accumulator's known value decides into plain jumps, and loads
/// of the word the accumulator already holds into jumps to the next instruction.
fn fold_known(nodes: &mut [Node], runtime: &impl Fn(u32) -> bool) -> bool {
    let mut acc = vec![Acc::Unreached; nodes.len()];
    if let Some(first) = acc.first_mut() {
        *first = NOTHING_KNOWN;
    }
    let mut changed = false;
    for i in 0..nodes.len() {
        let Acc::Known { value, field } = acc[i] else {
            continue;
        };
        let (insn, next) = (nodes[i].insn.clone(), nodes[i].next);
        let decided = match (value, next) {
            (Some(a), Next::Test(t, f)) if !runtime(insn.k) => {
                let holds = match insn.code {
                    JEQ_K => Some(a == insn.k),
                    JGT_K => Some(a > insn.k),
                    JGE_K => Some(a >= insn.k),
                    JSET_K => Some(a & insn.k != 0),
                    _ => None,
                };
                holds.map(|h| if h { t } else { f })
            }
            (_, Next::Fall) if insn.code == LD_W_ABS && field == Some(insn.k) => Some(i + 1),
            _ => None,
        };
        if let Some(to) = decided {
            nodes[i] = jump(to, i);
            changed = true;
        }
        let out = match insn.code {
            // The call's data does not change while the filter runs: a load again leaves
            // what the first left.
            LD_W_ABS if field == Some(insn.k) => acc[i],
            LD_W_ABS => Acc::Known {
                value: None,
                field: Some(insn.k),
            },
            ALU_AND_K => Acc::Known {
                value: value.map(|a| a & insn.k),
                field: None,
            },
            // Jumps and returns leave the accumulator as it is; anything decode might let
            // through later leaves nothing known.
            RET_K | JA | JEQ_K | JGT_K | JGE_K | JSET_K => acc[i],
            _ => NOTHING_KNOWN,
        };
        match nodes[i].next {
            Next::Fall => acc[i + 1] = meet(acc[i + 1], out),
            Next::Jump(t) => acc[t] = meet(acc[t], out),
            Next::Test(t, f) => {
                // An equality test taken leaves a known accumulator, unless its constant is
                // only known at run time (it may turn out equal to any other constant).
                let taken = match out {
                    Acc::Known { field, .. } if insn.code == JEQ_K && !runtime(insn.k) => {
                        Acc::Known {
                            value: Some(insn.k),
                            field,
                        }
                    }
                    _ => out,
                };
                acc[t] = meet(acc[t], taken);
                acc[f] = meet(acc[f], out);
            }
            Next::Ret => {}
        }
    }
    changed
}

/// Sends each test that jumps to a return to one copy of that return at the program's end,
/// where the test reaches it (its offsets are 8 bits); the copies no path reaches any more are
/// dropped next. (A plain jump to a return already became the return, in `thread`.) Programs
/// end with a return, so the copies there keep that true.
fn share_returns(nodes: &mut Vec<Node>) -> bool {
    let is_ret = |n: &Node| n.next == Next::Ret;
    // The returns already at the end, by value.
    let mut shared: Vec<(u32, usize)> = Vec::new();
    for (i, n) in nodes.iter().enumerate().rev() {
        if !is_ret(n) {
            break;
        }
        if !shared.iter().any(|&(k, _)| k == n.insn.k) {
            shared.push((n.insn.k, i));
        }
    }
    // The other values returned somewhere: a copy at the end, each, if a jump will use it.
    let mut wanted: Vec<u32> = Vec::new();
    for n in nodes.iter().filter(|n| is_ret(n)) {
        if !shared.iter().any(|&(k, _)| k == n.insn.k) && !wanted.contains(&n.insn.k) {
            wanted.push(n.insn.k);
        }
    }
    // Where the last copy would land if every value got one: a test that reaches it reaches
    // any copy (fewer copies may be added, so this errs on the short side).
    let end = nodes.len() + wanted.len();
    let fits = |from: usize, to: usize| to - from - 1 <= usize::from(u8::MAX);
    let redirected = |from: usize, to: usize, nodes: &[Node]| -> bool {
        is_ret(&nodes[to]) && fits(from, end - 1)
    };
    // Only add copies some test will jump to: one nobody reaches would be dropped again.
    let used = |k: u32| {
        nodes.iter().enumerate().any(|(i, n)| match n.next {
            Next::Test(t, f) => [t, f]
                .iter()
                .any(|&x| redirected(i, x, nodes) && nodes[x].insn.k == k),
            _ => false,
        })
    };
    wanted.retain(|&k| used(k));
    for k in wanted {
        shared.push((k, nodes.len()));
        nodes.push(Node {
            insn: sock_filter {
                code: RET_K,
                jt: 0,
                jf: 0,
                k,
            },
            next: Next::Ret,
        });
    }
    let mut changed = false;
    let len = nodes.len();
    for i in 0..len {
        if let Next::Test(t, f) = nodes[i].next {
            let to_shared = |x: usize| {
                if !is_ret(&nodes[x]) {
                    return x;
                }
                match shared.iter().find(|&&(k, _)| k == nodes[x].insn.k) {
                    Some(&(_, s)) if s != x && fits(i, s) => s,
                    _ => x,
                }
            };
            let (t2, f2) = (to_shared(t), to_shared(f));
            if (t2, f2) != (t, f) {
                nodes[i].next = Next::Test(t2, f2);
                changed = true;
            }
        }
    }
    changed
}

fn jump(to: usize, from: usize) -> Node {
    let k = u32::try_from(to - from - 1).expect("a forward jump");
    Node {
        insn: sock_filter {
            code: JA,
            jt: 0,
            jf: 0,
            k,
        },
        next: Next::Jump(to),
    }
}

/// Sends jumps to where their chain of plain jumps ends; a plain jump to a return becomes the
/// return.
fn thread(nodes: &mut [Node]) -> bool {
    let end = |nodes: &[Node], mut t: usize| {
        while let Next::Jump(u) = nodes[t].next {
            t = u;
        }
        t
    };
    let mut changed = false;
    for i in 0..nodes.len() {
        match nodes[i].next {
            Next::Jump(t) => {
                let to = end(nodes, t);
                if nodes[to].next == Next::Ret {
                    nodes[i] = nodes[to].clone();
                    changed = true;
                } else if to != t {
                    nodes[i] = jump(to, i);
                    changed = true;
                }
            }
            Next::Test(t, f) => {
                // A test's offsets are 8 bits: follow a chain only as far as one reaches.
                let near = |to: usize| to - i - 1 <= usize::from(u8::MAX);
                let (t2, f2) = (end(nodes, t), end(nodes, f));
                let (t2, f2) = (if near(t2) { t2 } else { t }, if near(f2) { f2 } else { f });
                if t2 == f2 {
                    nodes[i] = jump(t2, i);
                    changed = true;
                } else if (t2, f2) != (t, f) {
                    nodes[i].next = Next::Test(t2, f2);
                    changed = true;
                }
            }
            Next::Fall | Next::Ret => {}
        }
    }
    changed
}

/// Drops what no path reaches and jumps to the next instruction, renumbering the rest.
fn compact(nodes: Vec<Node>) -> Vec<Node> {
    let mut live = vec![false; nodes.len()];
    if let Some(first) = live.first_mut() {
        *first = true;
    }
    for i in 0..nodes.len() {
        if !live[i] {
            continue;
        }
        match nodes[i].next {
            Next::Fall => live[i + 1] = true,
            Next::Jump(t) => live[t] = true,
            Next::Test(t, f) => {
                live[t] = true;
                live[f] = true;
            }
            Next::Ret => {}
        }
    }
    // A plain jump over nothing live goes: whatever reached it reaches its target instead,
    // which is the instruction that now follows.
    for i in 0..nodes.len() {
        if let (true, Next::Jump(t)) = (live[i], nodes[i].next) {
            if (i + 1..t).all(|j| !live[j]) {
                live[i] = false;
            }
        }
    }
    // Each old index's new one: a dropped instruction's is that of the next kept one.
    let mut new_index = vec![0; nodes.len() + 1];
    let mut kept = 0;
    for i in 0..nodes.len() {
        new_index[i] = kept;
        kept += usize::from(live[i]);
    }
    new_index[nodes.len()] = kept;
    nodes
        .iter()
        .enumerate()
        .filter(|&(i, _)| live[i])
        .map(|(_, n)| Node {
            insn: n.insn.clone(),
            next: match n.next {
                Next::Jump(t) => Next::Jump(new_index[t]),
                Next::Test(t, f) => Next::Test(new_index[t], new_index[f]),
                other => other,
            },
        })
        .collect()
}

fn encode(nodes: &[Node]) -> Vec<sock_filter> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut insn = n.insn.clone();
            match n.next {
                Next::Jump(t) => insn.k = u32::try_from(t - i - 1).expect("forward"),
                Next::Test(t, f) => {
                    insn.jt = u8::try_from(t - i - 1).expect("a test's offset fits");
                    insn.jf = u8::try_from(f - i - 1).expect("a test's offset fits");
                }
                Next::Fall | Next::Ret => {}
            }
            insn
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOW: u32 = 0x7fff_0000;
    const TRAP: u32 = 0x0003_0000;
    const KILL: u32 = 0x8000_0000;
    const ARCH: u32 = 0xc000_003e;

    fn i(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
        sock_filter { code, jt, jf, k }
    }

    fn verdict(prog: &[sock_filter], nr: u32, arg0: u64) -> u32 {
        super::super::bpf_run::run(prog, nr, ARCH, [arg0, 0, 0, 0, 0, 0])
    }

    /// `short` gives `prog`'s verdict for each call in `calls` (arguments 0).
    fn same_verdicts(
        prog: &[sock_filter],
        short: &[sock_filter],
        calls: impl Iterator<Item = u32>,
    ) {
        for nr in calls {
            assert_eq!(verdict(short, nr, 0), verdict(prog, nr, 0), "call {nr}");
        }
    }

    fn no_runtime(_: u32) -> bool {
        false
    }

    #[test]
    fn a_test_an_earlier_equality_decides_becomes_a_jump() {
        // ld nr; nr == 5 ? (nr == 5 ? allow : trap) : trap
        let prog = [
            i(LD_W_ABS, 0, 0, 0),
            i(JEQ_K, 0, 1, 5),
            i(JA, 0, 0, 1),
            i(RET_K, 0, 0, TRAP),
            i(JEQ_K, 0, 1, 5),
            i(RET_K, 0, 0, ALLOW),
            i(RET_K, 0, 0, TRAP),
        ];
        let short = optimize(&prog, no_runtime);
        assert_eq!(short.len(), 4, "{short:?}");
        same_verdicts(&prog, &short, 3..8);
    }

    #[test]
    fn a_mask_leaves_the_masked_value_known() {
        // nr == 6, then A &= 4: A is 4, not 6.
        let prog = [
            i(LD_W_ABS, 0, 0, 0),
            i(JEQ_K, 0, 3, 6),
            i(ALU_AND_K, 0, 0, 4),
            i(JEQ_K, 2, 0, 6),
            i(JEQ_K, 2, 1, 4),
            i(RET_K, 0, 0, TRAP),
            i(RET_K, 0, 0, KILL),
            i(RET_K, 0, 0, ALLOW),
        ];
        let short = optimize(&prog, no_runtime);
        assert_eq!(verdict(&short, 6, 0), ALLOW, "{short:?}");
        assert_eq!(verdict(&short, 5, 0), TRAP);
        assert!(short.len() < prog.len());
    }

    #[test]
    fn paths_that_meet_with_different_values_know_neither() {
        // nr == 1 or nr == 2 reach the same test of nr == 1, which must stay.
        let prog = [
            i(LD_W_ABS, 0, 0, 0),
            i(JEQ_K, 1, 0, 1),
            i(JEQ_K, 0, 2, 2),
            i(JEQ_K, 0, 1, 1),
            i(RET_K, 0, 0, ALLOW),
            i(RET_K, 0, 0, KILL),
            i(RET_K, 0, 0, TRAP),
        ];
        let short = optimize(&prog, no_runtime);
        same_verdicts(&prog, &short, 0..4);
        assert_eq!(verdict(&short, 2, 0), KILL);
    }

    #[test]
    fn tests_against_run_time_constants_are_never_decided() {
        // arg0 == P1 ? (arg0 == P2 ? allow : trap) : trap, where P1 and P2 are patched in at
        // run time and may turn out equal.
        let (p1, p2) = (0x7fff_fff1, 0x7fff_fff4);
        let prog = [
            i(LD_W_ABS, 0, 0, 0x10),
            i(JEQ_K, 0, 2, p1),
            i(JEQ_K, 0, 1, p2),
            i(RET_K, 0, 0, ALLOW),
            i(RET_K, 0, 0, TRAP),
        ];
        let mut short = optimize(&prog, |k| k == p1 || k == p2);
        for insn in &mut short {
            if insn.code == JEQ_K && (insn.k == p1 || insn.k == p2) {
                insn.k = 42;
            }
        }
        assert_eq!(verdict(&short, 0, 42), ALLOW, "{short:?}");
    }

    #[test]
    fn a_literal_never_decides_a_test_against_a_run_time_constant() {
        // arg0 == 42 ? (arg0 == P ? allow : kill) : trap, P patched in at run time: when P
        // turns out 42, the call is allowed.
        let p = 0x7fff_fff3;
        let prog = [
            i(LD_W_ABS, 0, 0, 0x10),
            i(JEQ_K, 0, 3, 42),
            i(JEQ_K, 0, 1, p),
            i(RET_K, 0, 0, ALLOW),
            i(RET_K, 0, 0, KILL),
            i(RET_K, 0, 0, TRAP),
        ];
        let mut short = optimize(&prog, |k| k == p);
        for insn in &mut short {
            if insn.code == JEQ_K && insn.k == p {
                insn.k = 42;
            }
        }
        assert_eq!(verdict(&short, 0, 42), ALLOW, "{short:?}");
        assert_eq!(verdict(&short, 0, 41), TRAP);
    }

    #[test]
    fn a_jump_to_the_next_instruction_goes_and_what_reached_it_reaches_its_target() {
        // ja +0 first; a load falling into a chain of two ja +0; a test whose branches are
        // ja +0 (and a ja beyond them).
        let prog = [
            i(JA, 0, 0, 0),
            i(LD_W_ABS, 0, 0, 0),
            i(JA, 0, 0, 0),
            i(JA, 0, 0, 0),
            i(JEQ_K, 0, 1, 3),
            i(JA, 0, 0, 1),
            i(JA, 0, 0, 0),
            i(JEQ_K, 0, 1, 4),
            i(RET_K, 0, 0, KILL),
            i(RET_K, 0, 0, ALLOW),
        ];
        let short = optimize(&prog, no_runtime);
        assert!(short.iter().all(|insn| insn.code != JA), "{short:?}");
        same_verdicts(&prog, &short, 0..6);
        assert_eq!(verdict(&short, 3, 0), ALLOW);
        assert_eq!(verdict(&short, 4, 0), KILL);
        assert_eq!(verdict(&short, 5, 0), ALLOW);
    }

    #[test]
    fn a_load_of_the_word_the_accumulator_holds_goes_and_one_after_a_mask_stays() {
        // arg1 == 1 or arg1 == 2: allow; else arg0 & 4 == 0: trap; else arg0 == 5: kill.
        let prog = [
            i(LD_W_ABS, 0, 0, 0x18),
            i(JEQ_K, 2, 0, 1),
            i(LD_W_ABS, 0, 0, 0x18),
            i(JEQ_K, 0, 1, 2),
            i(RET_K, 0, 0, ALLOW),
            i(LD_W_ABS, 0, 0, 0x10),
            i(ALU_AND_K, 0, 0, 4),
            i(JEQ_K, 2, 0, 0),
            i(LD_W_ABS, 0, 0, 0x10),
            i(JEQ_K, 1, 0, 5),
            i(RET_K, 0, 0, TRAP),
            i(RET_K, 0, 0, KILL),
        ];
        let short = optimize(&prog, no_runtime);
        let loads = |p: &[sock_filter], k| {
            p.iter()
                .filter(|insn| insn.code == LD_W_ABS && insn.k == k)
                .count()
        };
        assert_eq!(loads(&short, 0x18), 1, "{short:?}");
        assert_eq!(loads(&short, 0x10), 2, "{short:?}");
        let run = |p: &[sock_filter], a0: u64, a1: u64| {
            super::super::bpf_run::run(p, 0, ARCH, [a0, a1, 0, 0, 0, 0])
        };
        for (a0, a1) in [(0, 1), (0, 2), (0, 3), (5, 0), (4, 0), (1, 0), (7, 9)] {
            assert_eq!(run(&short, a0, a1), run(&prog, a0, a1), "args {a0} {a1}");
        }
        assert_eq!(run(&short, 5, 0), KILL);
    }

    #[test]
    fn loads_of_different_words_meeting_leave_the_next_load_in_place() {
        // Call 1 loads arg0 last, any other call arg1; where the paths meet, the word one of
        // them loaded is loaded again, the first path's or the second's.
        for again in [0x10, 0x18] {
            let prog = [
                i(LD_W_ABS, 0, 0, 0),
                i(JEQ_K, 0, 2, 1),
                i(LD_W_ABS, 0, 0, 0x10),
                i(JA, 0, 0, 1),
                i(LD_W_ABS, 0, 0, 0x18),
                i(LD_W_ABS, 0, 0, again),
                i(JEQ_K, 0, 1, 9),
                i(RET_K, 0, 0, ALLOW),
                i(RET_K, 0, 0, TRAP),
            ];
            let short = optimize(&prog, no_runtime);
            // arg0 is `a`, arg1 `a + 1`.
            let run = |p: &[sock_filter], nr: u32, a: u64| {
                super::super::bpf_run::run(p, nr, ARCH, [a, a + 1, 0, 0, 0, 0])
            };
            for (nr, a) in [(1, 9), (2, 9), (1, 8), (2, 8)] {
                assert_eq!(run(&short, nr, a), run(&prog, nr, a), "call {nr} arg {a}");
            }
            // The path that loaded the other word compares the right one only by loading
            // again.
            let (nr, a) = if again == 0x10 { (2, 9) } else { (1, 8) };
            assert_eq!(run(&short, nr, a), ALLOW, "loaded again {again:#x}");
        }
    }

    #[test]
    fn tests_that_return_share_one_return_of_each_value() {
        // Calls 1 to 6 allowed, each through its own test and its own return.
        let mut prog = vec![i(LD_W_ABS, 0, 0, 0)];
        for nr in 1..=6 {
            prog.push(i(JEQ_K, 0, 1, nr));
            prog.push(i(RET_K, 0, 0, ALLOW));
        }
        prog.push(i(RET_K, 0, 0, TRAP));
        let short = optimize(&prog, no_runtime);
        let returns = short.iter().filter(|insn| insn.code == RET_K).count();
        assert_eq!(returns, 2, "{short:?}");
        assert_eq!(short.len(), 1 + 6 + 2);
        same_verdicts(&prog, &short, 0..9);
    }

    #[test]
    fn a_value_not_returned_at_the_end_gets_one_copy_there() {
        // Calls 1 to 4 allowed mid-program; the program ends with a kill and a trap.
        let mut prog = vec![i(LD_W_ABS, 0, 0, 0)];
        for nr in 1..=4 {
            prog.push(i(JEQ_K, 0, 1, nr));
            prog.push(i(RET_K, 0, 0, ALLOW));
        }
        prog.push(i(JEQ_K, 0, 1, 9));
        prog.push(i(RET_K, 0, 0, KILL));
        prog.push(i(RET_K, 0, 0, TRAP));
        let short = optimize(&prog, no_runtime);
        let allows: Vec<usize> = (0..short.len())
            .filter(|&n| short[n].code == RET_K && short[n].k == ALLOW)
            .collect();
        assert_eq!(allows, [short.len() - 1], "{short:?}");
        same_verdicts(&prog, &short, 0..11);
    }

    #[test]
    fn a_test_keeps_its_own_return_when_the_shared_one_is_out_of_reach() {
        // Call 1 is allowed by the return just after its test; the program's last return,
        // also an allow, lies 301 instructions on (loads of two words in turn, which stay),
        // beyond a test's 8-bit offset.
        let mut prog = vec![
            i(LD_W_ABS, 0, 0, 0),
            i(JEQ_K, 0, 1, 1),
            i(RET_K, 0, 0, ALLOW),
        ];
        for n in 0..300 {
            prog.push(i(LD_W_ABS, 0, 0, if n % 2 == 0 { 0x10 } else { 0x18 }));
        }
        prog.push(i(RET_K, 0, 0, ALLOW));
        let short = optimize(&prog, no_runtime);
        assert_eq!(short.len(), prog.len(), "{short:?}");
        same_verdicts(&prog, &short, 0..3);
    }

    #[test]
    fn a_program_with_an_instruction_it_does_not_know_is_left_alone() {
        // `ldx` is not one seccompiler emits.
        let prog = [i(0x01, 0, 0, 0), i(JA, 0, 0, 0), i(RET_K, 0, 0, ALLOW)];
        assert_eq!(optimize(&prog, no_runtime), prog);
    }

    #[test]
    fn a_test_is_never_sent_beyond_its_reach() {
        // A test taken jumps to a plain jump just after it whose target lies more than 255
        // instructions on; threading the test there would not fit in its offset.
        let mut prog = vec![i(LD_W_ABS, 0, 0, 0), i(JEQ_K, 0, 1, 7), i(JA, 0, 0, 300)];
        // 300 instructions the test's other branch reaches, so they stay: call 100 + n
        // gets its own verdict.
        for n in 0..150 {
            prog.push(i(JEQ_K, 0, 1, 100 + n));
            prog.push(i(RET_K, 0, 0, TRAP + n));
        }
        prog.push(i(RET_K, 0, 0, ALLOW));
        assert_eq!(prog.len(), 3 + 300 + 1);
        let short = optimize(&prog, no_runtime);
        same_verdicts(&prog, &short, (6..10).chain(98..252));
        assert_eq!(verdict(&short, 7, 0), ALLOW);
        assert_eq!(verdict(&short, 101, 0), TRAP + 1);
    }
}
