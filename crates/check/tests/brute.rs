//! The linearizability search against a brute force, on tiny random histories.
//!
//! The histories are arbitrary, not made from a run of the model: the answers are random
//! (values repeat, versions are anything), outcomes are random and intervals overlap and
//! touch on a coarse grid, so many are invalid. The brute force tries every order of
//! every subset of the unknown-outcome operations, with the same sequential model, and must
//! agree with the checker exactly: a disagreement is a false valid or a false invalid in the
//! search, its memoization or the driver around it.
//!
//! For cp keys there is a second brute force that does not use the model at all: it runs
//! capkv's state machine itself (a cluster-wide revision, a version per key, a write whose
//! answer was lost trying every version it could have been given), so it checks the
//! model's abstraction of versions too.

use std::time::Duration;

use capkv_check::linear::Model;
use capkv_check::models::{CpKey, HistoryModel, Interner, Register};
use capkv_check::{check, Call, History, Limits, Op, Outcome, Ret, RunInfo, Validity};
use proptest::prelude::*;

/// One op as the brute force sees it: when it may take effect, and whether it must.
struct Timed<O> {
    op: O,
    call: u64,
    /// None: unknown outcome, may take effect at any time after `call`, or never.
    ret: Option<u64>,
}

fn compile<M: HistoryModel>(h: &History) -> (M, Vec<Timed<M::Op>>) {
    let mut interner = Interner::default();
    let mut ops = Vec::new();
    for o in &h.ops {
        if let Some(op) = M::compile(o, &mut interner) {
            ops.push(Timed {
                op,
                call: o.invoke_us,
                ret: match o.outcome {
                    Outcome::Unknown => None,
                    _ => Some(o.complete_us.unwrap_or(u64::MAX)),
                },
            });
        }
    }
    (M::for_key(interner), ops)
}

/// Whether some order of all the required ops and some of the unknown ones is a legal run
/// that respects real time: an op may come next only if no op still to come (that must)
/// completed before it was invoked (touching intervals are concurrent).
fn brute<M: Model>(
    model: &M,
    ops: &[Timed<M::Op>],
    done: &mut Vec<bool>,
    state: &M::State,
) -> bool {
    let pending_required = (0..ops.len()).any(|i| !done[i] && ops[i].ret.is_some());
    if !pending_required {
        return true;
    }
    for x in 0..ops.len() {
        if done[x] {
            continue;
        }
        let blocked =
            (0..ops.len()).any(|r| !done[r] && ops[r].ret.is_some_and(|ret| ret < ops[x].call));
        if blocked {
            continue;
        }
        if let Some(next) = model.step(state, &ops[x].op) {
            done[x] = true;
            let ok = brute(model, ops, done, &next);
            done[x] = false;
            if ok {
                return true;
            }
        }
    }
    false
}

fn brute_verdict<M: HistoryModel>(h: &History) -> Validity {
    let (model, ops) = compile::<M>(h);
    let init = model.init();
    if brute(&model, &ops, &mut vec![false; ops.len()], &init) {
        Validity::Valid
    } else {
        Validity::Invalid
    }
}

/// capkv's cp state machine for one key, as far as one key can see it: the value, its
/// version, and the cluster-wide revision (which other keys' writes may raise at any time).
#[derive(Clone, Debug)]
struct Concrete {
    value: Option<String>,
    version: u64,
    revision: u64,
}

/// The states `o` can lead to from `s`, given every number in the history is below `top`
/// (a lost version is tried at each value up to it: any higher one is like `top`).
fn concrete_steps(s: &Concrete, o: &Op, top: u64) -> Vec<Concrete> {
    let lost_versions = || (s.revision + 1)..=(s.revision + 1).max(top);
    match &o.call {
        Call::Read => match &o.ret {
            Some(Ret::Value { value, version }) if o.outcome == Outcome::Ok => {
                let same = *value == s.value
                    && (value.is_none() || version.is_none() || *version == Some(s.version));
                if same {
                    vec![s.clone()]
                } else {
                    vec![]
                }
            }
            _ => vec![s.clone()],
        },
        Call::Put {
            value,
            if_version,
            if_value,
            ..
        } => {
            let holds = match (if_version, if_value) {
                (Some(0), _) => s.value.is_none(),
                (Some(n), _) => s.value.is_some() && s.version == *n,
                (None, Some(x)) => s.value.as_ref() == Some(x),
                (None, None) => true,
            };
            let put = |v: u64| Concrete {
                value: Some(value.clone()),
                version: v,
                revision: v,
            };
            match (o.outcome, &o.ret) {
                (_, Some(Ret::Mismatch)) if holds => vec![],
                (_, Some(Ret::Mismatch)) => vec![s.clone()],
                (Outcome::Ok, _) if !holds => vec![],
                (Outcome::Ok, Some(Ret::Written { version: Some(v) })) => {
                    if *v > s.revision {
                        vec![put(*v)]
                    } else {
                        vec![]
                    }
                }
                (Outcome::Unknown, _) if !holds => vec![s.clone()],
                _ => lost_versions().map(put).collect(),
            }
        }
        Call::Delete => {
            let gone = |v: u64| Concrete {
                value: None,
                version: 0,
                revision: v,
            };
            match (&o.ret, s.value.is_some()) {
                (Some(Ret::Deleted { deleted, version }), present) if o.outcome == Outcome::Ok => {
                    match (deleted, version) {
                        (d, _) if *d != present => vec![],
                        (true, Some(v)) if *v > s.revision => vec![gone(*v)],
                        (true, Some(_)) => vec![],
                        (false, Some(g)) if *g >= s.revision => vec![gone(*g)],
                        (false, Some(_)) => vec![],
                        (true, None) => lost_versions().map(gone).collect(),
                        (false, None) => vec![s.clone()],
                    }
                }
                (_, true) => lost_versions().map(gone).collect(),
                (_, false) => vec![s.clone()],
            }
        }
        _ => vec![],
    }
}

fn concrete_search(ops: &[&Op], done: &mut Vec<bool>, s: &Concrete, top: u64) -> bool {
    let required = |o: &Op| o.outcome != Outcome::Unknown;
    let ret = |o: &Op| o.complete_us.unwrap_or(u64::MAX);
    if (0..ops.len()).all(|i| done[i] || !required(ops[i])) {
        return true;
    }
    for x in 0..ops.len() {
        if done[x] {
            continue;
        }
        let blocked =
            (0..ops.len()).any(|r| !done[r] && required(ops[r]) && ret(ops[r]) < ops[x].invoke_us);
        if blocked {
            continue;
        }
        for next in concrete_steps(s, ops[x], top) {
            done[x] = true;
            let ok = concrete_search(ops, done, &next, top);
            done[x] = false;
            if ok {
                return true;
            }
        }
    }
    false
}

/// The verdict of capkv's own semantics on a one-key cp history.
fn concrete_verdict(h: &History) -> Validity {
    // Failed ops refused for their condition say something; other failed ops certainly
    // did nothing.
    let ops: Vec<&Op> = h
        .ops
        .iter()
        .filter(|o| o.outcome != Outcome::Fail || o.ret == Some(Ret::Mismatch))
        .collect();
    let top = h
        .ops
        .iter()
        .flat_map(|o| {
            let call = match &o.call {
                Call::Put { if_version, .. } => *if_version,
                _ => None,
            };
            let ret = match &o.ret {
                Some(Ret::Value { version, .. })
                | Some(Ret::Written { version })
                | Some(Ret::Deleted { version, .. }) => *version,
                _ => None,
            };
            [call, ret]
        })
        .flatten()
        .max()
        .unwrap_or(0)
        + 1;
    let init = Concrete {
        value: None,
        version: 0,
        revision: 0,
    };
    if concrete_search(&ops, &mut vec![false; ops.len()], &init, top) {
        Validity::Valid
    } else {
        Validity::Invalid
    }
}

const VALUES: [&str; 2] = ["a", "b"];

fn value() -> impl Strategy<Value = String> {
    (0..VALUES.len()).prop_map(|i| VALUES[i].to_owned())
}

fn maybe_value() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(0.8, value())
}

/// A random op: a call, an outcome with a random answer, and an interval on a 0..12 grid.
fn op(cp: bool) -> impl Strategy<Value = Op> {
    let call = if cp {
        prop_oneof![
            3 => Just(Call::Read),
            3 => (value(), prop::option::weighted(0.3, 0u64..4), prop::option::weighted(0.2, value()))
                .prop_map(|(value, if_version, if_value)| Call::Put {
                    if_value: if if_version.is_some() { None } else { if_value },
                    value,
                    if_version,
                    idempotency_key: None,
                }),
            1 => Just(Call::Delete),
        ]
        .boxed()
    } else {
        prop_oneof![
            3 => Just(Call::Read),
            3 => value().prop_map(|value| Call::Write { value }),
            2 => (value(), value()).prop_map(|(from, to)| Call::Cas { from, to }),
        ]
        .boxed()
    };
    (
        call,
        0u8..10,
        maybe_value(),
        1u64..4,
        any::<bool>(),
        0u64..12,
        0u64..5,
        prop::option::weighted(0.8, 0u64..6),
        prop::bool::weighted(0.8),
    )
        .prop_map(
            move |(call, fate, read, version, flag, invoke, len, gave_up, read_version)| {
                let mut o = Op {
                    id: 0,
                    client: 0,
                    node: String::new(),
                    key: "k".into(),
                    call,
                    invoke_us: invoke,
                    complete_us: Some(invoke + len),
                    outcome: Outcome::Ok,
                    ret: None,
                    status: None,
                    error: None,
                };
                let conditional = matches!(
                    &o.call,
                    Call::Cas { .. }
                        | Call::Put {
                            if_version: Some(_),
                            ..
                        }
                        | Call::Put {
                            if_value: Some(_),
                            ..
                        }
                );
                match fate {
                    0 | 1 => {
                        o.outcome = Outcome::Unknown;
                        o.complete_us = gave_up.map(|g| invoke + g);
                    }
                    2 => o.outcome = Outcome::Fail,
                    3 if conditional => {
                        o.outcome = Outcome::Fail;
                        o.ret = Some(Ret::Mismatch);
                    }
                    _ => {
                        o.ret = match &o.call {
                            Call::Read => Some(Ret::Value {
                                value: read,
                                version: (cp && read_version).then_some(version),
                            }),
                            Call::Put { .. } => Some(Ret::Written {
                                version: Some(version),
                            }),
                            Call::Delete => Some(Ret::Deleted {
                                deleted: flag,
                                version: Some(version),
                            }),
                            _ => None,
                        }
                    }
                }
                o
            },
        )
}

fn history(cp: bool, max_ops: usize) -> impl Strategy<Value = History> {
    prop::collection::vec(op(cp), 1..=max_ops).prop_map(move |mut ops| {
        for (i, o) in ops.iter_mut().enumerate() {
            o.id = i as u64;
            o.client = i as u64;
        }
        ops.sort_by_key(|o| (o.invoke_us, o.id));
        History {
            info: RunInfo {
                workload: if cp { "register" } else { "jepsen-register" }.into(),
                ..RunInfo::default()
            },
            ops,
            ..History::default()
        }
    })
}

fn describe(h: &History) -> String {
    h.ops
        .iter()
        .map(|o| format!("  [{}, {:?}] {}", o.invoke_us, o.complete_us, o.describe()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn limits() -> Limits {
    Limits {
        time: Duration::from_secs(30),
        memory_bytes: 64 << 20,
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn register_search_agrees_with_brute_force(h in history(false, 7)) {
        let expected = brute_verdict::<Register>(&h);
        let got = check(&h, limits());
        prop_assert_eq!(got.validity, expected, "{:#?}\n{}", got.anomalies, describe(&h));
    }

    #[test]
    fn cp_key_search_agrees_with_brute_force(h in history(true, 7)) {
        let expected = brute_verdict::<CpKey>(&h);
        let got = check(&h, limits());
        prop_assert_eq!(got.validity, expected, "{:#?}\n{}", got.anomalies, describe(&h));
    }

    /// The cp-key model is exact: it agrees with capkv's state machine run by brute force.
    #[test]
    fn cp_key_model_agrees_with_the_state_machine(h in history(true, 6)) {
        let expected = concrete_verdict(&h);
        let got = check(&h, limits());
        prop_assert_eq!(got.validity, expected, "{:#?}\n{}", got.anomalies, describe(&h));
    }
}

/// The random histories are not all one verdict (the comparison above would be weak).
#[test]
fn the_random_histories_are_mixed() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    for cp in [false, true] {
        let mut runner = TestRunner::deterministic();
        let strategy = history(cp, 7);
        let mut valid = 0;
        for _ in 0..300 {
            let h = strategy.new_tree(&mut runner).unwrap().current();
            if check(&h, limits()).validity == Validity::Valid {
                valid += 1;
            }
        }
        assert!((30..270).contains(&valid), "cp={cp}: {valid} of 300 valid");
    }
}
