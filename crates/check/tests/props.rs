//! Property tests of the linearizability checker, for both models.
//!
//! A history made from a sequential run of the model (see `common`) is linearizable by
//! construction, whatever the overlaps and however many answers were lost: the checker must
//! say valid. Then it is broken in ways that provably leave no linearization — a read of a
//! value nobody wrote, a read of a value provably overwritten, an acknowledged write that
//! wrote something else, an applied write answered as failed, a read showing another version
//! than the write's, a version below an earlier write's — and the checker must say invalid.

mod common;

use std::time::Duration;

use capkv_check::{check, Call, CheckResult, History, Limits, Op, Outcome, Ret, Validity};
use common::{generate, written_value, Fate, Flavor, Generated, Kind, Spec, SLOT};
use proptest::prelude::*;

fn limits() -> Limits {
    Limits {
        time: Duration::from_secs(30),
        memory_bytes: 256 << 20,
    }
}

fn describe(h: &History) -> String {
    let mut ops: Vec<&Op> = h.ops.iter().collect();
    ops.sort_by_key(|o| (o.invoke_us, o.id));
    ops.iter()
        .map(|o| format!("  [{}, {:?}] {}", o.invoke_us, o.complete_us, o.describe()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn verdict(h: &History) -> CheckResult {
    check(h, limits())
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        3 => Just(Kind::Read),
        3 => Just(Kind::Write),
        1 => any::<u8>().prop_map(Kind::CasValue),
        1 => any::<u8>().prop_map(Kind::CasVersion),
        1 => Just(Kind::Insert),
        1 => Just(Kind::Delete),
    ]
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        14 => Just(Fate::Ok),
        2 => Just(Fate::UnknownApplied),
        2 => Just(Fate::UnknownNotApplied),
        2 => Just(Fate::Fail),
    ]
}

/// Up to 3 keys; each op in flight over up to `spread` neighbours' instants on each side.
fn specs(max_ops: usize) -> impl Strategy<Value = Vec<Spec>> {
    (1u8..=3, 0u64..=4).prop_flat_map(move |(keys, spread)| {
        let w = spread * SLOT;
        prop::collection::vec(
            (
                0..keys,
                kind(),
                fate(),
                0..=w,
                0..=w,
                prop::option::of(0..=2 * w + SLOT),
                0u8..3,
            )
                .prop_map(|(key, kind, fate, before, after, gave_up, other_writes)| {
                    Spec {
                        key,
                        kind,
                        fate,
                        before,
                        after,
                        gave_up,
                        other_writes,
                    }
                }),
            1..max_ops,
        )
    })
}

fn flavor() -> impl Strategy<Value = Flavor> {
    prop_oneof![Just(Flavor::Register), Just(Flavor::CpKey)]
}

fn is_ok_read(op: &Op) -> bool {
    op.outcome == Outcome::Ok
        && matches!(op.call, Call::Read)
        && matches!(op.ret, Some(Ret::Value { .. }))
}

fn read_value(op: &Op) -> Option<&str> {
    match &op.ret {
        Some(Ret::Value { value, .. }) => value.as_deref(),
        _ => None,
    }
}

fn pick<T: Clone>(xs: &[T], sel: usize) -> Option<T> {
    (!xs.is_empty()).then(|| xs[sel % xs.len()].clone())
}

/// The op that wrote `v`, if one applied.
fn writer_of(g: &Generated, v: &str) -> Option<usize> {
    g.meta.iter().position(|m| m.wrote.as_deref() == Some(v))
}

fn complete(op: &Op) -> u64 {
    op.complete_us.unwrap_or(u64::MAX)
}

/// The ways to break a generated history that certainly leave no linearization. Each
/// returns the broken history and what was done, or None when the history has no place for
/// that break.
fn breaks(g: &Generated, sel: usize) -> Vec<(&'static str, String, History)> {
    let ops = &g.history.ops;
    let cp = g.history.info.workload == "register";
    let mut out = Vec::new();
    let reads: Vec<usize> = (0..ops.len()).filter(|&i| is_ok_read(&ops[i])).collect();

    // A read of a value nobody wrote.
    if let Some(r) = pick(&reads, sel) {
        let mut h = g.history.clone();
        if let Some(Ret::Value { value, .. }) = &mut h.ops[r].ret {
            *value = Some("never-written".into());
        }
        out.push((
            "never-written",
            format!("#{r} reads a value never written"),
            h,
        ));
    }

    // A read of a value provably overwritten: u's only write completed before another
    // write (or delete) began, which completed before the read began.
    let acked_writer = |i: usize| g.meta[i].wrote.is_some() && ops[i].outcome == Outcome::Ok;
    let acked_change = |i: usize| {
        (g.meta[i].wrote.is_some() || g.meta[i].deleted) && ops[i].outcome == Outcome::Ok
    };
    let mut stale = Vec::new();
    for &r in &reads {
        for w2 in (0..ops.len()).filter(|&i| acked_change(i) && ops[i].key == ops[r].key) {
            if complete(&ops[w2]) >= ops[r].invoke_us {
                continue;
            }
            for w1 in (0..ops.len()).filter(|&i| acked_writer(i) && ops[i].key == ops[r].key) {
                if complete(&ops[w1]) < ops[w2].invoke_us {
                    stale.push((r, w1, w2));
                }
            }
        }
    }
    if let Some((r, w1, w2)) = pick(&stale, sel) {
        let mut h = g.history.clone();
        h.ops[r].ret = Some(Ret::Value {
            value: g.meta[w1].wrote.clone(),
            version: if cp { g.meta[w1].version } else { None },
        });
        out.push((
            "stale",
            format!("#{r} reads #{w1}'s value, overwritten by #{w2} before"),
            h,
        ));
    }

    // An acknowledged write whose value a read saw wrote something else; an applied write
    // whose value a read saw is answered as failed (503).
    let seen: Vec<usize> = (0..ops.len())
        .filter(|&i| g.meta[i].wrote.is_some())
        .filter(|&i| {
            reads
                .iter()
                .any(|&r| ops[r].key == ops[i].key && read_value(&ops[r]) == written_value(&ops[i]))
        })
        .collect();
    if let Some(w) = pick(
        &seen
            .iter()
            .copied()
            .filter(|&i| ops[i].outcome == Outcome::Ok)
            .collect::<Vec<_>>(),
        sel,
    ) {
        let mut h = g.history.clone();
        match &mut h.ops[w].call {
            Call::Write { value } | Call::Put { value, .. } => *value = "swapped".into(),
            Call::Cas { to, .. } => *to = "swapped".into(),
            _ => unreachable!(),
        }
        out.push((
            "swapped",
            format!("#{w} acknowledged, but wrote something else"),
            h,
        ));
    }
    if let Some(w) = pick(&seen, sel) {
        let mut h = g.history.clone();
        let op = &mut h.ops[w];
        op.outcome = Outcome::Fail;
        op.ret = None;
        op.status = Some(503);
        op.complete_us = Some(op.complete_us.unwrap_or(op.invoke_us + 1));
        out.push(("failed", format!("#{w} applied, but answered 503"), h));
    }

    if cp {
        // A read showing another version than its write's.
        let versioned: Vec<usize> = reads
            .iter()
            .copied()
            .filter(|&r| {
                read_value(&ops[r])
                    .and_then(|v| writer_of(g, v))
                    .is_some_and(|w| ops[w].outcome == Outcome::Ok)
            })
            .collect();
        if let Some(r) = pick(&versioned, sel) {
            let mut h = g.history.clone();
            if let Some(Ret::Value {
                version: Some(v), ..
            }) = &mut h.ops[r].ret
            {
                *v += 1 + (sel as u64 % 3);
            }
            out.push((
                "version",
                format!("#{r} reads another version than the write's"),
                h,
            ));
        }

        // A version at or below that of a write (or delete) that completed before it began.
        let mut back = Vec::new();
        for w2 in (0..ops.len()).filter(|&i| acked_writer(i)) {
            for w1 in (0..ops.len()).filter(|&i| acked_change(i) && ops[i].key == ops[w2].key) {
                if complete(&ops[w1]) < ops[w2].invoke_us {
                    back.push((w1, w2));
                }
            }
        }
        if let Some((w1, w2)) = pick(&back, sel) {
            let mut h = g.history.clone();
            let lower = g.meta[w1].version.unwrap() - (sel as u64 % 2);
            h.ops[w2].ret = Some(Ret::Written {
                version: Some(lower),
            });
            out.push((
                "backwards",
                format!("#{w2} got version {lower}, not above #{w1}'s, which completed before"),
                h,
            ));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 192,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// A sequential run with intervals around its instants is valid, whatever the overlaps
    /// and the lost answers (lost answers of ops that applied, and of ops that did not).
    #[test]
    fn a_run_of_the_model_is_valid(flavor in flavor(), specs in specs(48)) {
        let g = generate(flavor, &specs, 5);
        let r = verdict(&g.history);
        prop_assert_eq!(
            r.validity, Validity::Valid,
            "{:#?} {:?}\n{}", r.anomalies, r.undecided, describe(&g.history)
        );
    }

    /// Losing more answers never makes a valid history invalid: an unknown op may or may not
    /// have applied.
    #[test]
    fn losing_answers_keeps_it_valid(
        flavor in flavor(),
        specs in specs(40),
        lose in prop::collection::vec(any::<bool>(), 40),
    ) {
        let g = generate(flavor, &specs, 5);
        let mut h = g.history.clone();
        for (op, lose) in h.ops.iter_mut().zip(lose) {
            if lose {
                op.outcome = Outcome::Unknown;
                op.ret = None;
                op.complete_us = op.complete_us.map(|c| c.min(op.invoke_us + 1));
            }
        }
        let r = verdict(&h);
        prop_assert_eq!(
            r.validity, Validity::Valid,
            "{:#?} {:?}\n{}", r.anomalies, r.undecided, describe(&h)
        );
    }

    /// Each break that leaves no linearization is found.
    #[test]
    fn a_broken_run_is_invalid(flavor in flavor(), specs in specs(40), sel in any::<usize>()) {
        let g = generate(flavor, &specs, 5);
        for (_, what, h) in breaks(&g, sel) {
            let r = verdict(&h);
            prop_assert_eq!(
                r.validity, Validity::Invalid,
                "{}: {:?}\n{}", what, r.undecided, describe(&h)
            );
            let a = &r.anomalies[0];
            prop_assert_eq!(&a.kind, "not-linearizable");
            let stuck = a.stuck.as_ref().unwrap();
            prop_assert!(a.ops.contains(&stuck.op));
            prop_assert!(h.ops.iter().any(|o| o.id == stuck.op && o.key == a.key));
        }
    }
}

/// The breaks do happen: over a fixed set of runs, each kind of break is made and caught
/// (so the property above is not vacuous).
#[test]
fn every_kind_of_break_is_exercised() {
    use std::collections::BTreeMap;
    let mut made: BTreeMap<&str, usize> = BTreeMap::new();
    let mut rng = common::Rng::new(7);
    for round in 0..60 {
        let flavor = if round % 2 == 0 {
            Flavor::Register
        } else {
            Flavor::CpKey
        };
        let specs: Vec<Spec> = (0..30)
            .map(|_| Spec {
                key: rng.below(2) as u8,
                kind: match rng.below(6) {
                    0 | 1 => Kind::Read,
                    2 | 3 => Kind::Write,
                    4 => Kind::CasValue(rng.below(256) as u8),
                    _ => Kind::Delete,
                },
                fate: match rng.below(10) {
                    0 => Fate::UnknownApplied,
                    1 => Fate::UnknownNotApplied,
                    2 => Fate::Fail,
                    _ => Fate::Ok,
                },
                before: rng.below(3 * SLOT),
                after: rng.below(3 * SLOT),
                gave_up: Some(rng.below(4 * SLOT)),
                other_writes: rng.below(2) as u8,
            })
            .collect();
        let g = generate(flavor, &specs, 5);
        assert_eq!(verdict(&g.history).validity, Validity::Valid);
        for (kind, what, h) in breaks(&g, rng.next() as usize) {
            assert_eq!(verdict(&h).validity, Validity::Invalid, "{what}");
            *made.entry(kind).or_default() += 1;
        }
    }
    assert_eq!(made.len(), 6, "{made:?}");
}
