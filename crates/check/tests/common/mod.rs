//! Histories made from a sequential run of a model, so their verdict is known.
//!
//! A list of [`Spec`]s is run one after the other against a simple executable model of the
//! store (a register, or capkv cp keys with cluster-wide revisions): that fixes each
//! operation's effect and answer. Operation `i` takes effect at the instant `T_i`, and is
//! given an interval around it: `invoke <= T_i <= complete`. Some operations' answers are
//! lost (unknown outcome) — some of those took effect and some did not — and some failed
//! (503, not applied). Such a history is linearizable by construction: the instants are a
//! linearization. [`Generated`] keeps what the run knew, so tests can break it on purpose.

#![allow(dead_code)]

use capkv_check::{Call, History, Op, Outcome, Ret, RunInfo};

/// Which model, and so which workload and which calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Jepsen's register: `write`, `cas` by value, `read` (workload `jepsen-register`).
    Register,
    /// capkv cp keys: `put` blind or conditional, `delete`, `read` with versions
    /// (workload `register`).
    CpKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    /// Compare-and-set by value; `pick` chooses the expected value among the current one,
    /// the key's older ones and one never written.
    CasValue(u8),
    /// cp only (a `cas` by value on the register): `if_version`, picked among the current
    /// version, older ones, 0 and one in the future.
    CasVersion(u8),
    /// cp only (a write on the register): `if_version=0`.
    Insert,
    /// cp only (a read on the register).
    Delete,
}

/// What became of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It ran and its answer came back.
    Ok,
    /// It ran, but the client gave up before the answer came.
    UnknownApplied,
    /// It never ran, and the client gave up.
    UnknownNotApplied,
    /// It never ran, and the client was told so (503).
    Fail,
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub key: u8,
    pub kind: Kind,
    pub fate: Fate,
    /// Invoke this long before the instant the op takes effect.
    pub before: u64,
    /// Complete this long after it.
    pub after: u64,
    /// For an unknown outcome: when the client gave up, counted from its invoke (it may be
    /// before the op took effect), or never.
    pub gave_up: Option<u64>,
    /// Writes to other keys, not in the history, that happen after this op (cp revisions).
    pub other_writes: u8,
}

/// What the run knew about one operation of the history.
#[derive(Debug, Clone)]
pub struct Meta {
    /// Index into `Generated::history.ops`.
    pub index: usize,
    /// The instant it took effect.
    pub instant: u64,
    /// Whether it changed the state.
    pub applied: bool,
    /// The value it set, if it applied and set one.
    pub wrote: Option<String>,
    /// The version it was given, if it applied (cp).
    pub version: Option<u64>,
    /// Whether it applied as a delete that deleted.
    pub deleted: bool,
}

#[derive(Debug, Clone)]
pub struct Generated {
    pub history: History,
    /// Parallel to `history.ops` (before sorting, ops are in instant order; they stay so:
    /// `meta[i].index == i`).
    pub meta: Vec<Meta>,
}

/// Time between two consecutive instants.
pub const SLOT: u64 = 100;

pub fn key_name(k: u8) -> String {
    format!("k{k}")
}

struct KeyState {
    current: Option<(String, u64)>,
    values: Vec<String>,
    versions: Vec<u64>,
}

/// Runs the specs against the model and records the history.
pub fn generate(flavor: Flavor, specs: &[Spec], clients: u64) -> Generated {
    let max_before = specs.iter().map(|s| s.before).max().unwrap_or(0);
    let mut keys: Vec<KeyState> = Vec::new();
    let mut revision = 0u64;
    let mut ops = Vec::with_capacity(specs.len());
    let mut meta = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let k = spec.key as usize;
        while keys.len() <= k {
            keys.push(KeyState {
                current: None,
                values: Vec::new(),
                versions: Vec::new(),
            });
        }
        let ks = &mut keys[k];
        let instant = max_before + SLOT * (i as u64 + 1);
        let fresh = format!("{}-{i}", key_name(spec.key));
        let runs = matches!(spec.fate, Fate::Ok | Fate::UnknownApplied);
        let cp = flavor == Flavor::CpKey;
        // The call, and whether its condition holds now.
        let (call, holds) = match (spec.kind, flavor) {
            (Kind::Read, _) | (Kind::Delete, Flavor::Register) => (Call::Read, true),
            (Kind::Write, Flavor::Register) | (Kind::Insert, Flavor::Register) => (
                Call::Write {
                    value: fresh.clone(),
                },
                true,
            ),
            (Kind::Write, Flavor::CpKey) => (put(&fresh, None, None), true),
            (Kind::CasValue(pick), _) | (Kind::CasVersion(pick), Flavor::Register) => {
                let choices = ks.values.len() + 2;
                let from = match pick as usize % choices {
                    0 => ks
                        .current
                        .as_ref()
                        .map(|(v, _)| v.clone())
                        .unwrap_or_else(|| "never".into()),
                    1 => "never".into(),
                    j => ks.values[j - 2].clone(),
                };
                let holds = ks.current.as_ref().is_some_and(|(v, _)| *v == from);
                let call = if cp {
                    put(&fresh, None, Some(from))
                } else {
                    Call::Cas {
                        from,
                        to: fresh.clone(),
                    }
                };
                (call, holds)
            }
            (Kind::CasVersion(pick), Flavor::CpKey) => {
                let choices = ks.versions.len() + 3;
                let n = match pick as usize % choices {
                    0 => ks.current.as_ref().map(|(_, v)| *v).unwrap_or(0),
                    1 => 0,
                    2 => revision + 5,
                    j => ks.versions[j - 3],
                };
                let holds = match &ks.current {
                    None => n == 0,
                    Some((_, v)) => *v == n,
                };
                (put(&fresh, Some(n), None), holds)
            }
            (Kind::Insert, Flavor::CpKey) => (put(&fresh, Some(0), None), ks.current.is_none()),
            (Kind::Delete, Flavor::CpKey) => (Call::Delete, true),
        };
        // Its effect and its answer.
        let mut m = Meta {
            index: i,
            instant,
            applied: false,
            wrote: None,
            version: None,
            deleted: false,
        };
        let ret = match &call {
            Call::Read => Some(Ret::Value {
                value: ks.current.as_ref().map(|(v, _)| v.clone()),
                version: if cp {
                    ks.current.as_ref().map(|(_, v)| *v)
                } else {
                    None
                },
            }),
            Call::Delete => {
                let existed = ks.current.is_some();
                if runs && existed {
                    revision += 1;
                    ks.current = None;
                    m.applied = true;
                    m.deleted = true;
                    m.version = Some(revision);
                }
                Some(Ret::Deleted {
                    deleted: existed,
                    version: Some(revision),
                })
            }
            _ if !holds => Some(Ret::Mismatch),
            _ => {
                if runs {
                    revision += 1;
                    ks.current = Some((fresh.clone(), revision));
                    ks.values.push(fresh.clone());
                    ks.versions.push(revision);
                    m.applied = true;
                    m.wrote = Some(fresh.clone());
                    m.version = Some(revision);
                }
                Some(if cp {
                    Ret::Written {
                        version: Some(revision),
                    }
                } else {
                    Ret::Written { version: None }
                })
            }
        };
        revision += spec.other_writes as u64;
        let invoke_us = instant - spec.before;
        let (outcome, complete_us, ret, status) = match spec.fate {
            Fate::Ok => match ret {
                Some(Ret::Mismatch) => (Outcome::Fail, Some(instant + spec.after), ret, 409),
                Some(Ret::Written { version: None }) => {
                    (Outcome::Ok, Some(instant + spec.after), None, 200)
                }
                _ => (Outcome::Ok, Some(instant + spec.after), ret, 200),
            },
            Fate::UnknownApplied | Fate::UnknownNotApplied => (
                Outcome::Unknown,
                spec.gave_up.map(|g| invoke_us + g),
                None,
                504,
            ),
            Fate::Fail => (Outcome::Fail, Some(instant + spec.after), None, 503),
        };
        ops.push(Op {
            id: i as u64,
            client: i as u64 % clients.max(1),
            node: format!("n{}", i % 3 + 1),
            key: key_name(spec.key),
            call,
            invoke_us,
            complete_us,
            outcome,
            ret,
            status: Some(status),
            error: None,
        });
        meta.push(m);
    }
    Generated {
        history: History {
            info: RunInfo {
                workload: match flavor {
                    Flavor::Register => "jepsen-register",
                    Flavor::CpKey => "register",
                }
                .into(),
                nodes: vec!["n1".into(), "n2".into(), "n3".into()],
                clients,
                ..RunInfo::default()
            },
            ops,
            ..History::default()
        },
        meta,
    }
}

fn put(value: &str, if_version: Option<u64>, if_value: Option<String>) -> Call {
    Call::Put {
        value: value.into(),
        if_version,
        if_value,
        idempotency_key: None,
    }
}

/// The value an op writes, whatever its outcome.
pub fn written_value(op: &Op) -> Option<&str> {
    match &op.call {
        Call::Write { value } | Call::Put { value, .. } => Some(value),
        Call::Cas { to, .. } => Some(to),
        _ => None,
    }
}

/// A small deterministic generator (xorshift*), for histories too big for proptest.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}
