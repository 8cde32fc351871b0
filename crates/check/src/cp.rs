//! Checks particular to the cp workloads beyond linearizability itself.
//!
//! `idempotent`: every write carries an `Idempotency-Key` and is retried, through other
//! nodes, after an unknown outcome. All attempts with one key are one logical write: it must
//! apply at most once, and every attempt that got an answer must have got the same one (the
//! first). The logical writes, with the reads, must then be linearizable: a write applied
//! twice gets two versions, and the read of the second one has no explanation.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::history::{Call, History, Op, Outcome, Ret};
use crate::{linearizable, Anomaly, CheckResult, Limits, ModelKind};

/// Checks an `idempotent` history.
pub fn check_idempotent(h: &History, limits: Limits, deadline: Instant, result: &mut CheckResult) {
    let mut attempts: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    let mut merged = History {
        info: h.info.clone(),
        nemesis: h.nemesis.clone(),
        final_at_us: h.final_at_us,
        ops: Vec::new(),
    };
    for op in &h.ops {
        match &op.call {
            Call::Put {
                idempotency_key: Some(k),
                ..
            } => attempts.entry(k).or_default().push(op),
            _ => merged.ops.push(op.clone()),
        }
    }
    for (idem, tries) in attempts {
        let answers: Vec<&Op> = tries
            .iter()
            .copied()
            .filter(|o| o.outcome == Outcome::Ok)
            .collect();
        if let Some(first) = answers.first() {
            for later in &answers[1..] {
                if later.ret != first.ret {
                    result.add(Anomaly {
                        kind: "retry-answer-differs".into(),
                        key: first.key.clone(),
                        message: format!(
                            "two attempts of the write with Idempotency-Key {idem} got different \
                             answers: {} and {}: it was applied more than once",
                            first.describe(),
                            later.describe()
                        ),
                        ops: vec![first.id, later.id],
                        stuck: None,
                    });
                }
            }
        }
        for t in &tries {
            if t.status == Some(409) {
                result.add(Anomaly {
                    kind: "retry-refused".into(),
                    key: t.key.clone(),
                    message: format!(
                        "a retry of the same write with Idempotency-Key {idem} was refused as a \
                         conflict: {}",
                        t.describe()
                    ),
                    ops: tries.iter().map(|o| o.id).collect(),
                    stuck: None,
                });
            }
        }
        // The logical write: from the first invoke to the first answer; unknown if any
        // attempt may have applied and none answered; failed only if every attempt failed.
        let first = tries[0];
        let mut logical = first.clone();
        logical.invoke_us = tries.iter().map(|o| o.invoke_us).min().unwrap_or(0);
        if let Some(ok) = answers.iter().min_by_key(|o| o.complete_us) {
            logical.outcome = Outcome::Ok;
            logical.ret = ok.ret.clone();
            logical.complete_us = ok.complete_us;
        } else if tries.iter().any(|o| o.outcome == Outcome::Unknown) {
            logical.outcome = Outcome::Unknown;
            logical.ret = None;
        } else {
            logical.outcome = Outcome::Fail;
            logical.ret = tries.iter().find_map(|o| match o.ret {
                Some(Ret::Mismatch) => Some(Ret::Mismatch),
                _ => None,
            });
        }
        merged.ops.push(logical);
    }
    merged.ops.sort_by_key(|o| (o.invoke_us, o.id));
    linearizable(&merged, ModelKind::CpKey, limits, deadline, result);
}
