//! capkv-check: finds the truth in a recorded history.
//!
//! ```text
//!   history (JSON lines, or a Jepsen log)
//!        │
//!        ├── cp workloads ── per key ── linear::check (Wing-Gong/Lowe) with models::CpKey
//!        │                  (register, unique-insert, idempotent; jepsen: models::Register)
//!        ├── ap workloads ── ap::check_set / check_counter / check_siblings
//!        ▼
//!   CheckResult: valid | invalid (with the anomalies and the operations involved) | unknown
//!        │
//!        └── report::html: a self-contained page (timeline, nemesis, latency, throughput)
//! ```
//!
//! Everything here is pure: it reads histories and returns verdicts; the harness that runs
//! clients and faults against a cluster (`capkv check`) lives in the capkv crate.
//!
//! The one rule every checker keeps: **never say valid without proof**. An operation with an
//! unknown outcome may have taken effect at any time after its invoke, or never; a search
//! that runs out of time or memory says `unknown`.

pub mod ap;
pub mod cp;
pub mod history;
pub mod jepsen;
pub mod linear;
pub mod models;
pub mod report;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use history::{Call, History, NemesisEvent, Op, Outcome, Record, Ret, RunInfo};
use linear::{Budget, LinOp, Stuck, Verdict};
use models::{lin_op, CpKey, HistoryModel, Interner, Register};

/// The verdict on a whole history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Validity {
    Valid,
    Invalid,
    /// Could not be decided within the budget; never read this as valid.
    Unknown,
}

impl Validity {
    /// The exit code of `capkv check` and `capkv check-history`: 0 valid, 1 invalid, 2 unknown
    /// (3 is the harness failing, which never gets as far as a verdict).
    pub fn exit_code(self) -> i32 {
        match self {
            Validity::Valid => 0,
            Validity::Invalid => 1,
            Validity::Unknown => 2,
        }
    }

    /// Invalid wins over unknown, which wins over valid.
    pub fn and(self, other: Validity) -> Validity {
        use Validity::*;
        match (self, other) {
            (Invalid, _) | (_, Invalid) => Invalid,
            (Unknown, _) | (_, Unknown) => Unknown,
            _ => Valid,
        }
    }
}

/// One thing found wrong, with the operations that show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Anomaly {
    /// `not-linearizable`, `lost-write`, `phantom`, `double-apply`, `diverged`, ...
    pub kind: String,
    pub key: String,
    pub message: String,
    /// The history's op ids involved.
    pub ops: Vec<u64>,
    /// For a linearizability violation: where the search got stuck.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stuck: Option<Stuck>,
}

/// What the checkers found in a history.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub validity: Validity,
    pub workload: String,
    pub ops: usize,
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
    pub keys: usize,
    pub anomalies: Vec<Anomaly>,
    /// Why parts could not be decided (budgets).
    pub undecided: Vec<String>,
    pub check_ms: u64,
}

impl CheckResult {
    fn new(h: &History, check_ms: u64) -> CheckResult {
        let count = |o: Outcome| h.ops.iter().filter(|op| op.outcome == o).count();
        CheckResult {
            validity: Validity::Valid,
            workload: h.info.workload.clone(),
            ops: h.ops.len(),
            ok: count(Outcome::Ok),
            fail: count(Outcome::Fail),
            unknown: count(Outcome::Unknown),
            keys: h.ops.iter().map(|o| &o.key).collect::<HashSet<_>>().len(),
            anomalies: Vec::new(),
            undecided: Vec::new(),
            check_ms,
        }
    }

    pub fn add(&mut self, anomaly: Anomaly) {
        self.validity = Validity::Invalid;
        self.anomalies.push(anomaly);
    }

    pub fn undecided(&mut self, why: String) {
        self.validity = self.validity.and(Validity::Unknown);
        self.undecided.push(why);
    }
}

/// Limits for the linearizability search.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall time for the whole history.
    pub time: Duration,
    /// Memo-table bytes for one key's search.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            time: Duration::from_secs(120),
            memory_bytes: 1 << 30,
        }
    }
}

/// Which sequential model a linearizability check uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Register,
    CpKey,
}

/// The workloads this crate has checkers for (a history names one in its header).
pub const WORKLOADS: [&str; 7] = [
    "jepsen-register",
    "register",
    "unique-insert",
    "idempotent",
    "set",
    "counter",
    "siblings",
];

/// Checks a history with the checkers its workload calls for.
pub fn check(h: &History, limits: Limits) -> CheckResult {
    let started = Instant::now();
    let mut result = CheckResult::new(h, 0);
    let budget_end = started + limits.time;
    match h.info.workload.as_str() {
        "jepsen-register" => linearizable(h, ModelKind::Register, limits, budget_end, &mut result),
        "register" | "unique-insert" => {
            linearizable(h, ModelKind::CpKey, limits, budget_end, &mut result)
        }
        "idempotent" => cp::check_idempotent(h, limits, budget_end, &mut result),
        "set" => ap::check_set(h, &mut result),
        "counter" => ap::check_counter(h, &mut result),
        "siblings" => ap::check_siblings(h, &mut result),
        other => result.undecided(format!("no checker for workload {other:?}")),
    }
    result.check_ms = started.elapsed().as_millis() as u64;
    result
}

/// Checks that the history is linearizable, key by key.
pub(crate) fn linearizable(
    h: &History,
    model: ModelKind,
    limits: Limits,
    deadline: Instant,
    result: &mut CheckResult,
) {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in &h.ops {
        by_key.entry(&op.key).or_default().push(op);
    }
    for (key, ops) in by_key {
        let budget = Budget {
            deadline,
            memory_bytes: limits.memory_bytes,
        };
        let verdict = match model {
            ModelKind::Register => check_key::<Register>(&ops, budget),
            ModelKind::CpKey => check_key::<CpKey>(&ops, budget),
        };
        match verdict {
            Verdict::Valid => {}
            Verdict::Invalid(stuck) => {
                let mut involved = vec![stuck.op];
                for id in stuck
                    .pending
                    .iter()
                    .chain(stuck.prefix_tail.iter().rev().take(3))
                {
                    if !involved.contains(id) {
                        involved.push(*id);
                    }
                }
                let by_id: BTreeMap<u64, &&Op> = ops.iter().map(|o| (o.id, o)).collect();
                let stuck_desc = by_id
                    .get(&stuck.op)
                    .map(|o| o.describe())
                    .unwrap_or_default();
                result.add(Anomaly {
                    kind: "not-linearizable".into(),
                    key: key.to_owned(),
                    message: format!(
                        "no order of the {} operations on this key explains them: after a \
                         linearizable prefix of {} operations, {stuck_desc} cannot take effect \
                         before it completed from any of the states [{}]",
                        ops.len(),
                        stuck.prefix_len,
                        stuck.states.join("; ")
                    ),
                    ops: involved,
                    stuck: Some(stuck),
                });
            }
            Verdict::Unknown(why) => result.undecided(format!("key {key}: {why}")),
        }
    }
}

/// Checks one key's operations. Unknown writes whose value nothing ever observed are left
/// out first (an unknown op may never have taken effect, so a linearization without them
/// is one with them); only if that fails is the whole sub-history searched. That can fail
/// on a valid history: such a write is still seen through the key's existence (a delete
/// that deleted, a refused insert) and its version, so the second search is needed.
///
/// In the whole sub-history, the values of those writes are all replaced by one value: no
/// read or condition compares with them (else they would be observed), so no step can tell
/// them apart, and the search then treats these writes as interchangeable (see
/// [`linear`]).
pub(crate) fn check_key<M: HistoryModel>(ops: &[&Op], budget: Budget) -> Verdict {
    let observed: HashSet<&str> = ops
        .iter()
        .flat_map(|o| {
            let mut v: Vec<&str> = Vec::new();
            if let Some(Ret::Value { value: Some(x), .. }) = &o.ret {
                v.push(x);
            }
            match &o.call {
                Call::Cas { from, .. } => v.push(from),
                Call::Put {
                    if_value: Some(x), ..
                } => v.push(x),
                _ => {}
            }
            v
        })
        .collect();
    let unobserved_unknown_write = |o: &Op| {
        o.outcome == Outcome::Unknown
            && match &o.call {
                Call::Write { value } | Call::Put { value, .. } | Call::Cas { to: value, .. } => {
                    !observed.contains(value.as_str())
                }
                _ => false,
            }
    };
    let mut interner = Interner::default();
    let mut full: Vec<LinOp<M::Op>> = Vec::new();
    let mut reduced: Vec<LinOp<M::Op>> = Vec::new();
    // The one value for them: one that no op observes (else a read of it would be
    // explained by any of them).
    let mut unseen = String::from("(a value no read saw)");
    while observed.contains(unseen.as_str()) {
        unseen.push('*');
    }
    for o in ops {
        let merged;
        let o: &Op = match written_value(o) {
            Some(v) if o.outcome == Outcome::Unknown && !observed.contains(v) => {
                let mut c = (*o).clone();
                match &mut c.call {
                    Call::Write { value }
                    | Call::Put { value, .. }
                    | Call::Cas { to: value, .. } => *value = unseen.clone(),
                    _ => {}
                }
                merged = c;
                &merged
            }
            _ => o,
        };
        if let Some(m) = M::compile(o, &mut interner) {
            let lin = lin_op(o, m);
            if !unobserved_unknown_write(o) {
                reduced.push(lin.clone());
            }
            full.push(lin);
        }
    }
    let model = M::for_key(interner);
    let first = linear::check(&model, &reduced, budget);
    if first == Verdict::Valid || reduced.len() == full.len() {
        return first;
    }
    if let Verdict::Unknown(_) = first {
        return first;
    }
    linear::check(&model, &full, budget)
}

fn written_value(o: &Op) -> Option<&str> {
    match &o.call {
        Call::Write { value } | Call::Put { value, .. } | Call::Cas { to: value, .. } => {
            Some(value)
        }
        _ => None,
    }
}

/// Checks a Jepsen register log (see [`jepsen`]).
pub fn check_jepsen(text: &str, limits: Limits) -> Result<CheckResult, history::ParseError> {
    let h = jepsen::parse(text)?;
    Ok(check(&h, limits))
}
