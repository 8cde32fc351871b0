//! Checkers for the ap workloads: what an ap keyspace promises is not linearizability but
//! that no acknowledged write is lost, nothing appears that nobody wrote, and every replica
//! converges once the network heals.
//!
//! Each checker reads the final phase (after every fault healed, see
//! [`History::final_at_us`]): the harness reads every key from every node until they agree
//! or a deadline passes; the last answer of each node is what it converged to.
//!
//! - `set`: unique adds. Every acknowledged add is in every node's final set; every member
//!   any read shows was attempted (ok or unknown), never one whose add failed.
//! - `counter`: increments (positive). Every node's final total is the same, at least the
//!   acknowledged increments and at most those plus the unknown ones; no read during the run
//!   shows more than was attempted before it completed.
//! - `siblings`: read-then-write with the context of the read, or with the context the
//!   client's previous write returned (which covers what that write's context covered plus
//!   that write, and nothing else). Each write records the values its context covers
//!   (`seen`). An acknowledged value may be missing at the end only if a write that took
//!   effect had it in `seen` (and so replaced it).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::history::{Call, History, Op, Outcome, Ret};
use crate::{Anomaly, CheckResult};

/// The last successful final-phase read of each node, per key.
fn final_reads(
    h: &History,
    is_read: impl Fn(&Call) -> bool,
) -> BTreeMap<&str, BTreeMap<&str, &Op>> {
    let mut out: BTreeMap<&str, BTreeMap<&str, &Op>> = BTreeMap::new();
    for op in &h.ops {
        if h.is_final(op) && is_read(&op.call) && op.outcome == Outcome::Ok {
            let slot = out
                .entry(&op.key)
                .or_default()
                .entry(&op.node)
                .or_insert(op);
            if op.invoke_us >= slot.invoke_us {
                *slot = op;
            }
        }
    }
    out
}

fn ids<'a>(ops: impl IntoIterator<Item = &'a Op>, max: usize) -> Vec<u64> {
    ops.into_iter().take(max).map(|o| o.id).collect()
}

fn keys_written(h: &History, is_write: impl Fn(&Call) -> bool) -> BTreeSet<&str> {
    h.ops
        .iter()
        .filter(|o| is_write(&o.call) && o.outcome == Outcome::Ok)
        .map(|o| o.key.as_str())
        .collect()
}

/// Flags nodes whose final answers differ; a node of the run that never answered a final
/// read leaves convergence undecided (it may hold anything).
fn converged<T: PartialEq + std::fmt::Debug>(
    h: &History,
    key: &str,
    finals: Option<&BTreeMap<&str, &Op>>,
    value: impl Fn(&Op) -> Option<T>,
    result: &mut CheckResult,
) -> Option<T> {
    let silent: Vec<&String> = h
        .info
        .nodes
        .iter()
        .filter(|n| !finals.is_some_and(|f| f.contains_key(n.as_str())))
        .collect();
    if !silent.is_empty() {
        result.undecided(format!(
            "key {key}: {} never answered a read in the final phase, so convergence is not shown",
            silent
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    let Some(finals) = finals.filter(|f| !f.is_empty()) else {
        result.undecided(format!(
            "key {key}: no node answered a read in the final phase"
        ));
        return None;
    };
    let mut seen: Vec<(&str, T, u64)> = Vec::new();
    for (node, op) in finals {
        if let Some(v) = value(op) {
            seen.push((node, v, op.id));
        }
    }
    let (_, first, _) = seen.first()?;
    if seen.iter().any(|(_, v, _)| v != first) {
        let summary: Vec<String> = seen.iter().map(|(n, v, _)| format!("{n}: {v:?}")).collect();
        result.add(Anomaly {
            kind: "diverged".into(),
            key: key.to_owned(),
            message: format!(
                "the nodes did not converge after the heal: {}",
                summary.join("; ")
            ),
            ops: seen.iter().map(|(_, _, id)| *id).collect(),
            stuck: None,
        });
    }
    let (_, v, _) = seen.swap_remove(0);
    Some(v)
}

/// A read showed `value`, which no write that may have taken effect wrote: `writers` are
/// the writes of it answered as not applied (empty: nobody wrote it at all).
fn never_written(read: &Op, value: &str, writers: Vec<u64>) -> Anomaly {
    let (kind, why) = if writers.is_empty() {
        ("phantom", "no client ever wrote")
    } else {
        (
            "failed-write-visible",
            "only operations answered as not applied wrote",
        )
    };
    Anomaly {
        kind: kind.into(),
        key: read.key.clone(),
        message: format!("{} shows {value}, which {why}", read.describe()),
        ops: std::iter::once(read.id).chain(writers).collect(),
        stuck: None,
    }
}

/// Checks a `set` history.
pub fn check_set(h: &History, result: &mut CheckResult) {
    let mut adds: HashMap<(&str, &str), Vec<&Op>> = HashMap::new();
    for op in &h.ops {
        if let Call::SetAdd { member } = &op.call {
            adds.entry((&op.key, member)).or_default().push(op);
        }
    }
    let attempted = |key: &str, m: &str| {
        adds.get(&(key, m))
            .is_some_and(|v| v.iter().any(|o| o.outcome != Outcome::Fail))
    };
    // Nothing appears that was never attempted, or whose add certainly failed.
    for op in &h.ops {
        if let (Call::SetRead, Some(Ret::Members { members })) = (&op.call, &op.ret) {
            for m in members {
                if !attempted(&op.key, m) {
                    let failed = adds.get(&(op.key.as_str(), m.as_str()));
                    let writers = failed.into_iter().flatten().map(|o| o.id).collect();
                    result.add(never_written(op, m, writers));
                }
            }
        }
    }
    let finals = final_reads(h, |c| matches!(c, Call::SetRead));
    for key in keys_written(h, |c| matches!(c, Call::SetAdd { .. })) {
        let members = |op: &Op| match &op.ret {
            Some(Ret::Members { members }) => {
                Some(members.iter().cloned().collect::<BTreeSet<_>>())
            }
            _ => None,
        };
        let Some(end) = converged(h, key, finals.get(key), members, result) else {
            continue;
        };
        let lost: Vec<&Op> = h
            .ops
            .iter()
            .filter(|o| o.key == key && o.outcome == Outcome::Ok)
            .filter(|o| matches!(&o.call, Call::SetAdd { member } if !end.contains(member)))
            .collect();
        if !lost.is_empty() {
            result.add(Anomaly {
                kind: "lost-write".into(),
                key: key.to_owned(),
                message: format!(
                    "{} acknowledged adds are missing from the converged set of {} members \
                     (first: {})",
                    lost.len(),
                    end.len(),
                    lost[0].describe()
                ),
                ops: ids(lost.iter().copied(), 20),
                stuck: None,
            });
        }
    }
}

/// Checks a `counter` history.
pub fn check_counter(h: &History, result: &mut CheckResult) {
    // Sums in i128: no history can overflow them.
    let incrs = |key: &str, o: Outcome, keep: fn(i64) -> bool| -> i128 {
        h.ops
            .iter()
            .filter(|op| op.key == key && op.outcome == o)
            .filter_map(|op| match op.call {
                Call::Incr { by } if keep(by) => Some(i128::from(by)),
                _ => None,
            })
            .sum()
    };
    let finals = final_reads(h, |c| matches!(c, Call::CounterRead));
    for key in keys_written(h, |c| matches!(c, Call::Incr { .. })) {
        let total = |op: &Op| match op.ret {
            Some(Ret::Counter { value }) => Some(value),
            _ => None,
        };
        let Some(end) = converged(h, key, finals.get(key), total, result) else {
            continue;
        };
        // Each unknown increment may or may not count.
        let acked = incrs(key, Outcome::Ok, |_| true);
        let lo = acked + incrs(key, Outcome::Unknown, |by| by < 0);
        let hi = acked + incrs(key, Outcome::Unknown, |by| by > 0);
        let end_wide = i128::from(end);
        if end_wide < lo || end_wide > hi {
            let (kind, why) = if end_wide > hi {
                ("double-count", "some increment was counted more than once")
            } else {
                ("lost-write", "some acknowledged increment was lost")
            };
            result.add(Anomaly {
                kind: kind.into(),
                key: key.to_owned(),
                message: format!(
                    "the converged total is {end}, outside [{lo}, {hi}] (acknowledged \
                     increments, plus those with an unknown outcome): {why}"
                ),
                ops: ids(
                    finals
                        .get(key)
                        .into_iter()
                        .flat_map(|m| m.values().copied()),
                    8,
                ),
                stuck: None,
            });
        }
    }
    // No read shows more than was attempted before it completed. Once one does, every
    // later read usually does too: report the first per key, with the count. (This bound
    // holds when increments are positive, as the workload's are; with decrements it is
    // skipped.)
    if h.ops
        .iter()
        .any(|op| matches!(op.call, Call::Incr { by } if by < 0))
    {
        return;
    }
    let mut attempted_before: HashMap<&str, Vec<(u64, i128)>> = HashMap::new();
    for op in &h.ops {
        if let Call::Incr { by } = op.call {
            if op.outcome != Outcome::Fail {
                attempted_before
                    .entry(&op.key)
                    .or_default()
                    .push((op.invoke_us, i128::from(by)));
            }
        }
    }
    // As prefix sums by invoke time, so each read's bound is one binary search.
    for v in attempted_before.values_mut() {
        v.sort_unstable();
        let mut sum = 0i128;
        for e in v.iter_mut() {
            sum += e.1;
            e.1 = sum;
        }
    }
    let mut over: BTreeMap<&str, Vec<(&Op, i128)>> = BTreeMap::new();
    for op in &h.ops {
        if let (Call::CounterRead, Some(Ret::Counter { value })) = (&op.call, &op.ret) {
            let done = op.complete_us.unwrap_or(u64::MAX);
            let bound: i128 = attempted_before
                .get(op.key.as_str())
                .map(|v| match v.partition_point(|(t, _)| *t <= done) {
                    0 => 0,
                    n => v[n - 1].1,
                })
                .unwrap_or(0);
            if i128::from(*value) > bound {
                over.entry(&op.key).or_default().push((op, bound));
            }
        }
    }
    for (key, reads) in over {
        let (first, bound) = reads[0];
        result.add(Anomaly {
            kind: "double-count".into(),
            key: key.to_owned(),
            message: format!(
                "{} reads of this counter show more than was ever attempted before they \
                 completed; the first: {}, while the increments invoked before it add up to at \
                 most {bound}: some increment was counted more than once",
                reads.len(),
                first.describe()
            ),
            ops: ids(reads.iter().map(|(o, _)| *o), 20),
            stuck: None,
        });
    }
}

/// Checks a `siblings` history.
pub fn check_siblings(h: &History, result: &mut CheckResult) {
    let mut writes: HashMap<(&str, &str), &Op> = HashMap::new();
    let mut read_values: HashSet<(&str, &str)> = HashSet::new();
    for op in &h.ops {
        if let Call::ApWrite { value, .. } = &op.call {
            writes.insert((&op.key, value), op);
        }
        if let (Call::ApRead, Some(Ret::Siblings { values })) = (&op.call, &op.ret) {
            read_values.extend(values.iter().map(|v| (op.key.as_str(), v.as_str())));
        }
    }
    // A write replaced what its context saw only if it took effect: acknowledged, or with
    // an unknown outcome but read by someone (so it did apply).
    let mut covered: HashSet<(&str, &str)> = HashSet::new();
    for op in &h.ops {
        if let Call::ApWrite { value, seen } = &op.call {
            let applied = op.outcome == Outcome::Ok
                || (op.outcome == Outcome::Unknown
                    && read_values.contains(&(op.key.as_str(), value.as_str())));
            if applied {
                covered.extend(seen.iter().map(|s| (op.key.as_str(), s.as_str())));
            }
        }
    }
    for op in &h.ops {
        if let (Call::ApRead, Some(Ret::Siblings { values })) = (&op.call, &op.ret) {
            for v in values {
                match writes.get(&(op.key.as_str(), v.as_str())) {
                    Some(w) if w.outcome != Outcome::Fail => {}
                    found => {
                        let writers = found.map(|w| w.id).into_iter().collect();
                        result.add(never_written(op, v, writers))
                    }
                }
            }
        }
    }
    let finals = final_reads(h, |c| matches!(c, Call::ApRead));
    for key in keys_written(h, |c| matches!(c, Call::ApWrite { .. })) {
        let values = |op: &Op| match &op.ret {
            Some(Ret::Siblings { values }) => Some(values.iter().cloned().collect::<BTreeSet<_>>()),
            _ => None,
        };
        let Some(end) = converged(h, key, finals.get(key), values, result) else {
            continue;
        };
        let mut lost: Vec<&Op> = h
            .ops
            .iter()
            .filter(|o| o.key == key && o.outcome == Outcome::Ok)
            .filter(|o| match &o.call {
                Call::ApWrite { value, .. } => {
                    !end.contains(value) && !covered.contains(&(key, value.as_str()))
                }
                _ => false,
            })
            .collect();
        lost.sort_by_key(|o| o.id);
        if !lost.is_empty() {
            result.add(Anomaly {
                kind: "lost-write".into(),
                key: key.to_owned(),
                message: format!(
                    "{} acknowledged writes disappeared though no later write's context saw \
                     them (first: {}); the converged value is [{}]",
                    lost.len(),
                    lost[0].describe(),
                    end.iter().cloned().collect::<Vec<_>>().join(",")
                ),
                ops: ids(lost.iter().copied(), 20),
                stuck: None,
            });
        }
    }
}
