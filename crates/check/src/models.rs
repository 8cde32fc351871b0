//! The sequential models the linearizability checker holds histories against, and the
//! translation of recorded operations into model operations.
//!
//! - [`Register`]: Jepsen's register: `read`, `write`, `cas` by value. A `cas` that failed
//!   its comparison (Jepsen `:fail`, capkv `409`) is an observation that the value differed.
//! - [`CpKey`]: a capkv cp key: `get` (value and version), `put` (blind, CAS by version,
//!   CAS by value; `if_version=0` = only if absent), `delete`. Versions are cluster-wide
//!   revisions, so each write of the key gets a version above every earlier one, and a read
//!   must show the version of the write it reads. A delete that deleted something is a write
//!   too (it takes a revision); a delete that found nothing answers the revision so far, so
//!   every later write's version is above it. A write whose answer was lost still took a
//!   revision of its own if it applied.
//!
//! Values are interned to small integers per key, so states are cheap to hash and compare.

use std::collections::HashMap;

use crate::history::{Call, Op, Outcome, Ret};
use crate::linear::{LinOp, Model};

/// Maps a key's values to small integers.
#[derive(Debug, Default)]
pub struct Interner {
    ids: HashMap<String, u32>,
    values: Vec<String>,
}

impl Interner {
    pub fn id(&mut self, v: &str) -> u32 {
        if let Some(&id) = self.ids.get(v) {
            return id;
        }
        let id = self.values.len() as u32;
        self.ids.insert(v.to_owned(), id);
        self.values.push(v.to_owned());
        id
    }

    pub fn value(&self, id: u32) -> &str {
        &self.values[id as usize]
    }
}

/// A model that knows how to read recorded operations.
pub trait HistoryModel: Model + Sized {
    /// Builds the model for one key (it keeps the key's interned values for reports).
    fn for_key(interner: Interner) -> Self;
    /// The model operation an operation stands for, or None when it constrains nothing
    /// (a fail that had no effect, a read with no answer).
    fn compile(op: &Op, interner: &mut Interner) -> Option<<Self as Model>::Op>;
}

/// What the search needs to know of an op: when it may take effect.
pub(crate) fn lin_op<O>(op: &Op, model_op: O) -> LinOp<O> {
    LinOp {
        id: op.id,
        op: model_op,
        call_us: op.invoke_us,
        ret_us: match op.outcome {
            Outcome::Ok | Outcome::Fail => op.complete_us.or(Some(u64::MAX)),
            Outcome::Unknown => None,
        },
    }
}

// ---------------------------------------------------------------------------------------
// Register

/// Jepsen's single register, starting absent.
pub struct Register {
    interner: Interner,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterOp {
    Read(Option<u32>),
    Write(u32),
    /// `ok`: the cas applied; otherwise its comparison failed.
    Cas {
        from: u32,
        to: u32,
        ok: bool,
    },
}

impl Model for Register {
    type State = Option<u32>;
    type Op = RegisterOp;

    fn init(&self) -> Option<u32> {
        None
    }

    fn step(&self, state: &Option<u32>, op: &RegisterOp) -> Option<Option<u32>> {
        match *op {
            RegisterOp::Read(v) => (*state == v).then_some(*state),
            RegisterOp::Write(v) => Some(Some(v)),
            RegisterOp::Cas { from, to, ok: true } => (*state == Some(from)).then_some(Some(to)),
            RegisterOp::Cas {
                from, ok: false, ..
            } => (*state != Some(from)).then_some(*state),
        }
    }

    fn describe(&self, state: &Option<u32>) -> String {
        match state {
            None => "absent".into(),
            Some(v) => self.interner.value(*v).to_owned(),
        }
    }
}

impl HistoryModel for Register {
    fn for_key(interner: Interner) -> Self {
        Register { interner }
    }

    fn compile(op: &Op, interner: &mut Interner) -> Option<RegisterOp> {
        let mismatch = matches!(op.ret, Some(Ret::Mismatch));
        match (&op.call, op.outcome) {
            (Call::Read, Outcome::Ok) => match &op.ret {
                Some(Ret::Value { value, .. }) => {
                    Some(RegisterOp::Read(value.as_deref().map(|v| interner.id(v))))
                }
                _ => None,
            },
            (Call::Read, _) => None,
            (_, Outcome::Fail) if !mismatch => None,
            (Call::Write { value }, _)
            | (
                Call::Put {
                    value,
                    if_version: None,
                    if_value: None,
                    ..
                },
                _,
            ) => Some(RegisterOp::Write(interner.id(value))),
            (Call::Cas { from, to }, outcome)
            | (
                Call::Put {
                    value: to,
                    if_value: Some(from),
                    if_version: None,
                    ..
                },
                outcome,
            ) => Some(RegisterOp::Cas {
                from: interner.id(from),
                to: interner.id(to),
                ok: outcome != Outcome::Fail,
            }),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// CpKey

/// A capkv cp key: a value, its version, and a floor below every later write's version.
pub struct CpKey {
    interner: Interner,
}

/// What the model knows of the current value's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// The key is absent.
    Absent,
    Known(u64),
    /// Written by an operation whose answer was lost: at least [`KeyState::floor`]; the
    /// first read that sees it says which.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyState {
    pub value: Option<u32>,
    pub version: Version,
    /// Every later write of this key gets a version above this. With a
    /// [`Version::Known`] it is that version; with a [`Version::Unknown`] it is the least
    /// that version can be (above the floor before that write: each write takes a revision
    /// of its own, and above any version a refused `if_version` ruled out).
    pub floor: u64,
    /// With a [`Version::Unknown`]: versions above the floor it cannot be, because an
    /// `if_version` naming them was refused (409) while it was current. Sorted; empty
    /// otherwise.
    pub not: Vec<u64>,
}

impl KeyState {
    fn new(value: Option<u32>, version: Version, floor: u64) -> KeyState {
        KeyState {
            value,
            version,
            floor,
            not: Vec::new(),
        }
    }

    /// Whether the current value's version can be `n`; binds it if it was unknown.
    fn bind(&self, n: u64) -> Option<KeyState> {
        match self.version {
            Version::Known(v) => (v == n).then(|| self.clone()),
            Version::Unknown => (n >= self.floor && !self.not.contains(&n))
                .then(|| KeyState::new(self.value, Version::Known(n), n)),
            Version::Absent => None,
        }
    }

    /// The current value's version is not `n`.
    fn rule_out(&self, n: u64) -> Option<KeyState> {
        match self.version {
            Version::Known(v) => (v != n).then(|| self.clone()),
            Version::Absent => Some(self.clone()),
            Version::Unknown if n < self.floor => Some(self.clone()),
            Version::Unknown => {
                let mut s = self.clone();
                if let Err(at) = s.not.binary_search(&n) {
                    s.not.insert(at, n);
                }
                // Keep the floor the least version it can be.
                while s.not.first() == Some(&s.floor) {
                    s.not.remove(0);
                    s.floor += 1;
                }
                Some(s)
            }
        }
    }

    /// After a write (put or delete) of the key: a known version must be above every
    /// earlier one; an unknown one is at least one above.
    fn written(&self, value: Option<u32>, version: Option<u64>) -> Option<KeyState> {
        let known = |v| match value {
            Some(_) => Version::Known(v),
            None => Version::Absent,
        };
        match version {
            Some(v) if v <= self.floor => None,
            Some(v) => Some(KeyState::new(value, known(v), v)),
            None if value.is_some() => Some(KeyState::new(value, Version::Unknown, self.floor + 1)),
            None => Some(KeyState::new(None, Version::Absent, self.floor + 1)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    None,
    /// `if_version=V` (`0`: only if absent).
    Version(u64),
    /// `if_value=X`.
    Value(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOp {
    Read {
        value: Option<u32>,
        version: Option<u64>,
    },
    /// `applied`: false for a 409, whose condition did not hold.
    Put {
        value: u32,
        cond: Cond,
        version: Option<u64>,
        applied: bool,
    },
    /// `deleted`: whether the key existed (None: the answer was lost); `version`: the
    /// revision the delete answered.
    Delete {
        deleted: Option<bool>,
        version: Option<u64>,
    },
}

impl CpKey {
    /// Whether `cond` holds in `s`; binding an unknown version when it must be `n`.
    fn holds(s: &KeyState, cond: Cond) -> Option<KeyState> {
        match cond {
            Cond::None => Some(s.clone()),
            Cond::Version(0) => s.value.is_none().then(|| s.clone()),
            Cond::Version(n) => s.bind(n),
            Cond::Value(x) => (s.value == Some(x)).then(|| s.clone()),
        }
    }

    /// Whether `cond` can fail in `s`, and what that says of `s`.
    fn fails(s: &KeyState, cond: Cond) -> Option<KeyState> {
        match cond {
            Cond::None => None,
            Cond::Version(0) => s.value.is_some().then(|| s.clone()),
            Cond::Version(n) => s.rule_out(n),
            Cond::Value(x) => (s.value != Some(x)).then(|| s.clone()),
        }
    }
}

impl Model for CpKey {
    type State = KeyState;
    type Op = KeyOp;

    fn init(&self) -> KeyState {
        KeyState::new(None, Version::Absent, 0)
    }

    fn step(&self, s: &KeyState, op: &KeyOp) -> Option<KeyState> {
        match *op {
            KeyOp::Read { value: None, .. } => s.value.is_none().then(|| s.clone()),
            KeyOp::Read {
                value: Some(v),
                version,
            } => {
                if s.value != Some(v) {
                    return None;
                }
                match version {
                    Some(b) => s.bind(b),
                    None => Some(s.clone()),
                }
            }
            KeyOp::Put {
                value,
                cond,
                version,
                applied: true,
            } => Self::holds(s, cond)?.written(Some(value), version),
            KeyOp::Put {
                cond,
                applied: false,
                ..
            } => Self::fails(s, cond),
            KeyOp::Delete { deleted, version } => {
                if deleted.is_some_and(|d| d != s.value.is_some()) {
                    return None;
                }
                if s.value.is_some() {
                    // It deleted: a write, with a revision of its own.
                    return s.written(None, version);
                }
                // It found nothing: it answered the revision so far, which is at least the
                // version of every earlier write; every later write is above it.
                match version {
                    Some(v) if v < s.floor => None,
                    Some(v) => Some(KeyState::new(None, Version::Absent, v)),
                    None => Some(s.clone()),
                }
            }
        }
    }

    fn describe(&self, s: &KeyState) -> String {
        let value = match s.value {
            None => "absent".to_owned(),
            Some(v) => self.interner.value(v).to_owned(),
        };
        match s.version {
            Version::Absent => value,
            Version::Known(v) => format!("{value} v{v}"),
            Version::Unknown if s.not.is_empty() => format!("{value} v>={}", s.floor),
            Version::Unknown => {
                let not: Vec<String> = s.not.iter().map(u64::to_string).collect();
                format!("{value} v>={} not {}", s.floor, not.join(","))
            }
        }
    }
}

impl HistoryModel for CpKey {
    fn for_key(interner: Interner) -> Self {
        CpKey { interner }
    }

    fn compile(op: &Op, interner: &mut Interner) -> Option<KeyOp> {
        let mismatch = matches!(op.ret, Some(Ret::Mismatch));
        if op.outcome == Outcome::Fail && !mismatch {
            return None;
        }
        match &op.call {
            Call::Read => match (&op.ret, op.outcome) {
                (Some(Ret::Value { value, version }), Outcome::Ok) => Some(KeyOp::Read {
                    value: value.as_deref().map(|v| interner.id(v)),
                    version: *version,
                }),
                _ => None,
            },
            Call::Write { value } => Some(KeyOp::Put {
                value: interner.id(value),
                cond: Cond::None,
                version: None,
                applied: true,
            }),
            Call::Cas { from, to } => Some(KeyOp::Put {
                value: interner.id(to),
                cond: Cond::Value(interner.id(from)),
                version: None,
                applied: !mismatch,
            }),
            Call::Put {
                value,
                if_version,
                if_value,
                ..
            } => {
                let cond = match (if_version, if_value) {
                    (Some(v), _) => Cond::Version(*v),
                    (None, Some(x)) => Cond::Value(interner.id(x)),
                    (None, None) => Cond::None,
                };
                let version = match &op.ret {
                    Some(Ret::Written { version }) if op.outcome == Outcome::Ok => *version,
                    _ => None,
                };
                Some(KeyOp::Put {
                    value: interner.id(value),
                    cond,
                    version,
                    applied: !mismatch,
                })
            }
            // Deletes carry no condition: a failed one did nothing.
            Call::Delete if op.outcome == Outcome::Fail => None,
            Call::Delete => {
                let (deleted, version) = match (&op.ret, op.outcome) {
                    (Some(Ret::Deleted { deleted, version }), Outcome::Ok) => {
                        (Some(*deleted), *version)
                    }
                    _ => (None, None),
                };
                Some(KeyOp::Delete { deleted, version })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(value: Option<u32>, version: Version, floor: u64) -> KeyState {
        KeyState::new(value, version, floor)
    }

    #[test]
    fn register_steps() {
        let r = Register {
            interner: Interner::default(),
        };
        assert_eq!(r.step(&None, &RegisterOp::Read(None)), Some(None));
        assert_eq!(r.step(&None, &RegisterOp::Read(Some(1))), None);
        assert_eq!(r.step(&None, &RegisterOp::Write(1)), Some(Some(1)));
        let cas = |ok| RegisterOp::Cas { from: 1, to: 2, ok };
        assert_eq!(r.step(&Some(1), &cas(true)), Some(Some(2)));
        assert_eq!(r.step(&Some(3), &cas(true)), None);
        assert_eq!(r.step(&Some(3), &cas(false)), Some(Some(3)));
        assert_eq!(r.step(&Some(1), &cas(false)), None);
    }

    #[test]
    fn cp_key_versions_only_grow_and_reads_see_the_written_version() {
        let k = CpKey {
            interner: Interner::default(),
        };
        let put = |value, cond, version| KeyOp::Put {
            value,
            cond,
            version,
            applied: true,
        };
        let s0 = k.init();
        let s1 = k.step(&s0, &put(1, Cond::Version(0), Some(5))).unwrap();
        assert_eq!(s1, st(Some(1), Version::Known(5), 5));
        // A later write with a smaller version is impossible.
        assert_eq!(k.step(&s1, &put(2, Cond::None, Some(4))), None);
        // if_version=0 on a present key cannot apply, and must fail.
        assert_eq!(k.step(&s1, &put(2, Cond::Version(0), Some(9))), None);
        let mismatch = KeyOp::Put {
            value: 2,
            cond: Cond::Version(0),
            version: None,
            applied: false,
        };
        assert_eq!(k.step(&s1, &mismatch), Some(s1.clone()));
        assert_eq!(k.step(&s0, &mismatch), None);
        // A read must show the version.
        let read = |value, version| KeyOp::Read { value, version };
        assert_eq!(k.step(&s1, &read(Some(1), Some(5))), Some(s1.clone()));
        assert_eq!(k.step(&s1, &read(Some(1), Some(6))), None);
        // A write whose answer was lost: the first read binds its version.
        let s2 = k.step(&s1, &put(2, Cond::None, None)).unwrap();
        assert_eq!(s2, st(Some(2), Version::Unknown, 6));
        assert_eq!(k.step(&s2, &read(Some(2), Some(5))), None);
        assert_eq!(
            k.step(&s2, &read(Some(2), Some(6))),
            Some(st(Some(2), Version::Known(6), 6))
        );
        // Another lost write after it takes a version above the first one's.
        let s3 = k.step(&s2, &put(3, Cond::None, None)).unwrap();
        assert_eq!(s3, st(Some(3), Version::Unknown, 7));
        assert_eq!(k.step(&s3, &put(4, Cond::None, Some(7))), None);
        assert!(k.step(&s3, &put(4, Cond::None, Some(8))).is_some());
        assert_eq!(
            k.step(&s2, &read(Some(2), Some(8))),
            Some(st(Some(2), Version::Known(8), 8))
        );
        // CAS by version and value.
        assert!(k.step(&s1, &put(3, Cond::Version(5), Some(7))).is_some());
        assert!(k.step(&s1, &put(3, Cond::Version(4), Some(7))).is_none());
        assert!(k.step(&s1, &put(3, Cond::Value(1), Some(7))).is_some());
        assert!(k.step(&s1, &put(3, Cond::Value(2), Some(7))).is_none());
        // Deletes say whether the key was there, and take a revision when they delete.
        let del = |deleted, version| KeyOp::Delete { deleted, version };
        assert_eq!(
            k.step(&s1, &del(Some(true), Some(6))),
            Some(st(None, Version::Absent, 6))
        );
        assert_eq!(k.step(&s1, &del(Some(true), Some(5))), None);
        assert_eq!(
            k.step(&s1, &del(Some(true), None)),
            Some(st(None, Version::Absent, 6))
        );
        assert_eq!(
            k.step(&s1, &del(None, None)),
            Some(st(None, Version::Absent, 6))
        );
        assert_eq!(k.step(&s1, &del(Some(false), Some(9))), None);
        assert_eq!(k.step(&s0, &del(Some(false), None)), Some(s0));
        // One that found nothing saw the revision so far.
        let gone = st(None, Version::Absent, 6);
        assert_eq!(k.step(&gone, &del(Some(false), Some(5))), None);
        assert_eq!(
            k.step(&gone, &del(Some(false), Some(9))),
            Some(st(None, Version::Absent, 9))
        );
        assert_eq!(k.step(&gone, &del(None, None)), Some(gone.clone()));
    }

    #[test]
    fn cp_key_a_refused_if_version_rules_out_an_unknown_version() {
        let k = CpKey {
            interner: Interner::default(),
        };
        let refused = |n| KeyOp::Put {
            value: 9,
            cond: Cond::Version(n),
            version: None,
            applied: false,
        };
        let read = |version| KeyOp::Read {
            value: Some(1),
            version: Some(version),
        };
        let put = |version| KeyOp::Put {
            value: 2,
            cond: Cond::None,
            version: Some(version),
            applied: true,
        };
        // Written at some version >= 4, answer lost.
        let s = st(Some(1), Version::Unknown, 4);
        // if_version=6 refused: it is not 6.
        let s6 = k.step(&s, &refused(6)).unwrap();
        assert_eq!(s6.not, vec![6]);
        assert_eq!(k.step(&s6, &read(6)), None);
        assert!(k.step(&s6, &read(5)).is_some());
        // if_version=4 refused as well: it is at least 5, so a later write is above 5.
        let s46 = k.step(&s6, &refused(4)).unwrap();
        assert_eq!((s46.floor, s46.not.clone()), (5, vec![6]));
        assert_eq!(k.step(&s46, &put(5)), None);
        assert!(k.step(&s46, &put(6)).is_some());
        // and 5: then it is at least 7.
        let s = k.step(&s46, &refused(5)).unwrap();
        assert_eq!((s.floor, s.not.clone()), (7, vec![]));
        // Versions below the floor, and known versions, are simply not it.
        assert_eq!(k.step(&s, &refused(2)), Some(s.clone()));
        let known = st(Some(1), Version::Known(4), 4);
        assert_eq!(k.step(&known, &refused(4)), None);
        assert_eq!(k.step(&known, &refused(3)), Some(known.clone()));
    }
}
