//! What an ap key holds, by keyspace type, and how writes and merges act on it.
//!
//! - `register`: a dotted-version-vector [`Object`]: concurrent writes become siblings.
//! - `counter`: a PN-counter (`crdts::PNCounter`): every increment from every side counts.
//! - `set`: an add-wins observed-remove set (`crdts::Orswot`): a remove takes away the
//!   adds it observed; an add it did not observe survives.
//!
//! All three merge commutatively, associatively and idempotently (property-tested), so
//! the replication machinery (replica store, hints, read repair) treats them alike. The
//! same actor rule as for dots holds: an actor's increments and adds are issued only
//! from a local state that contains all its earlier ones (home replicas, or a one-time
//! actor), so per-actor entries never go backwards or collide.

use capkv_core::{ApiError, ValueType};
use crdts::{CmRDT, CvRDT, Orswot, PNCounter};
use serde::{Deserialize, Serialize};

use super::dvv::{Actor, Object, VersionVector};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApState {
    Register(Object),
    Counter(PNCounter<Actor>),
    Set(Orswot<String, Actor>),
}

/// A client's change to an ap key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mutation {
    /// Register write (`None`: delete) replacing what `context` saw.
    Write {
        context: VersionVector,
        value: Option<Vec<u8>>,
    },
    /// Counter change, positive or negative.
    Add { by: i64 },
    /// Set: add members.
    Insert { members: Vec<String> },
    /// Set: remove the members, as observed by the replica applying it.
    Remove { members: Vec<String> },
}

impl Mutation {
    /// The value type this mutation applies to.
    pub fn value_type(&self) -> ValueType {
        match self {
            Mutation::Write { .. } => ValueType::Register,
            Mutation::Add { .. } => ValueType::Counter,
            Mutation::Insert { .. } | Mutation::Remove { .. } => ValueType::Set,
        }
    }
}

impl ApState {
    pub fn empty(t: ValueType) -> ApState {
        match t {
            ValueType::Register => ApState::Register(Object::default()),
            ValueType::Counter => ApState::Counter(PNCounter::new()),
            ValueType::Set => ApState::Set(Orswot::new()),
        }
    }

    pub fn value_type(&self) -> ValueType {
        match self {
            ApState::Register(_) => ValueType::Register,
            ApState::Counter(_) => ValueType::Counter,
            ApState::Set(_) => ValueType::Set,
        }
    }

    /// Applies a client's mutation as `actor`.
    pub fn apply(&self, m: &Mutation, actor: &str, now_ms: u64) -> Result<ApState, ApiError> {
        let actor = actor.to_owned();
        Ok(match (self, m) {
            (ApState::Register(o), Mutation::Write { context, value }) => {
                ApState::Register(o.update(context, &actor, value.clone(), now_ms).0)
            }
            (ApState::Counter(c), Mutation::Add { by }) => {
                let mut c = c.clone();
                let op = if *by >= 0 {
                    c.inc_many(actor, by.unsigned_abs())
                } else {
                    c.dec_many(actor, by.unsigned_abs())
                };
                c.apply(op);
                ApState::Counter(c)
            }
            (ApState::Set(s), Mutation::Insert { members }) => {
                let mut s = s.clone();
                let op = s.add_all(members.iter().cloned(), s.read_ctx().derive_add_ctx(actor));
                s.apply(op);
                ApState::Set(s)
            }
            (ApState::Set(s), Mutation::Remove { members }) => {
                let mut s = s.clone();
                let op = s.rm_all(members.iter().cloned(), s.read_ctx().derive_rm_ctx());
                s.apply(op);
                ApState::Set(s)
            }
            (state, m) => {
                return Err(ApiError::bad_request(format!(
                    "this operation applies to {:?} keys, but the key holds a {:?}",
                    m.value_type(),
                    state.value_type()
                )))
            }
        })
    }

    /// Merges two replicas' states. States of different types never meet (a keyspace's
    /// type is fixed); if they did, `self` is kept.
    pub fn merge(&self, other: &ApState) -> ApState {
        match (self, other) {
            (ApState::Register(a), ApState::Register(b)) => ApState::Register(a.merge(b)),
            (ApState::Counter(a), ApState::Counter(b)) => {
                let mut m = a.clone();
                m.merge(b.clone());
                ApState::Counter(m)
            }
            (ApState::Set(a), ApState::Set(b)) => {
                let mut m = a.clone();
                m.merge(b.clone());
                ApState::Set(m)
            }
            (a, b) => {
                tracing::error!(mine = ?a.value_type(), theirs = ?b.value_type(), "merging ap states of different types");
                a.clone()
            }
        }
    }

    /// Whether merging `other` changes nothing.
    pub fn dominates(&self, other: &ApState) -> bool {
        &self.merge(other) == self
    }

    /// A hash of the state that is equal on two replicas exactly when their states are
    /// (for sets: their clocks and members with their dots; removes still deferred are
    /// left out). Anti-entropy compares these.
    pub fn digest(&self) -> u64 {
        let bytes = match self {
            ApState::Register(o) => crate::cp::encode(o),
            ApState::Counter(c) => crate::cp::encode(c),
            ApState::Set(s) => {
                let mut members: Vec<(String, Vec<u8>)> = s
                    .iter()
                    .map(|m| (m.val.clone(), crate::cp::encode(&m.rm_clock)))
                    .collect();
                members.sort();
                crate::cp::encode(&(crate::cp::encode(&s.clock()), members))
            }
        };
        super::ring::hash64(&bytes)
    }

    /// The counter's total (0 for other types).
    pub fn total(&self) -> i64 {
        match self {
            ApState::Counter(c) => c.read().to_string().parse().unwrap_or(i64::MAX),
            _ => 0,
        }
    }

    /// The set's members, sorted (empty for other types).
    pub fn members(&self) -> Vec<String> {
        match self {
            ApState::Set(s) => {
                let mut m: Vec<String> = s.read().val.into_iter().collect();
                m.sort();
                m
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ops() -> impl Strategy<Value = Vec<(u8, u8, i8, bool)>> {
        // (replica, other replica, amount or member, sync?)
        proptest::collection::vec((0u8..3, 0u8..3, any::<i8>(), any::<bool>()), 1..40)
    }

    /// Runs random counter or set histories on three replicas.
    fn run(t: ValueType, h: &[(u8, u8, i8, bool)]) -> (Vec<ApState>, i64) {
        let mut r = vec![ApState::empty(t); 3];
        let mut sum = 0i64;
        for (at, from, x, sync) in h {
            let (at, from) = (*at as usize, *from as usize);
            if *sync {
                r[at] = r[at].merge(&r[from]);
                continue;
            }
            let m = match t {
                ValueType::Counter => {
                    sum += i64::from(*x);
                    Mutation::Add { by: i64::from(*x) }
                }
                _ if *x >= 0 => Mutation::Insert {
                    members: vec![format!("m{}", x % 4)],
                },
                _ => Mutation::Remove {
                    members: vec![format!("m{}", x.rem_euclid(4))],
                },
            };
            r[at] = r[at].apply(&m, &format!("n{at}"), 0).unwrap();
        }
        (r, sum)
    }

    proptest! {
        #[test]
        fn counter_merges_are_lawful_and_exact(h in ops()) {
            let (r, sum) = run(ValueType::Counter, &h);
            prop_assert_eq!(r[0].merge(&r[1]), r[1].merge(&r[0]));
            prop_assert_eq!(r[0].merge(&r[1]).merge(&r[2]), r[0].merge(&r[1].merge(&r[2])));
            prop_assert_eq!(r[0].merge(&r[0]), r[0].clone());
            // Once every replica's state meets, the total is exactly the sum of all changes.
            prop_assert_eq!(r[0].merge(&r[1]).merge(&r[2]).total(), sum);
        }

        #[test]
        fn set_merges_are_lawful(h in ops()) {
            let (r, _) = run(ValueType::Set, &h);
            prop_assert_eq!(r[0].merge(&r[1]), r[1].merge(&r[0]));
            prop_assert_eq!(r[0].merge(&r[1]).merge(&r[2]), r[0].merge(&r[1].merge(&r[2])));
            prop_assert_eq!(r[0].merge(&r[0]), r[0].clone());
        }
    }

    #[test]
    fn concurrent_add_wins_over_remove() {
        let base = ApState::empty(ValueType::Set)
            .apply(
                &Mutation::Insert {
                    members: vec!["x".into()],
                },
                "n1",
                0,
            )
            .unwrap();
        // n1 removes x while n2 (which saw the first add) adds x again.
        let removed = base
            .apply(
                &Mutation::Remove {
                    members: vec!["x".into()],
                },
                "n1",
                0,
            )
            .unwrap();
        let readded = base
            .apply(
                &Mutation::Insert {
                    members: vec!["x".into()],
                },
                "n2",
                0,
            )
            .unwrap();
        assert_eq!(removed.members(), Vec::<String>::new());
        assert_eq!(removed.merge(&readded).members(), vec!["x".to_string()]);
        // A remove that observed every add removes for good.
        let both = removed.merge(&readded);
        let gone = both
            .apply(
                &Mutation::Remove {
                    members: vec!["x".into()],
                },
                "n1",
                0,
            )
            .unwrap();
        assert!(gone.merge(&readded).members().is_empty());
    }

    #[test]
    fn mutations_of_the_wrong_type_are_refused() {
        let c = ApState::empty(ValueType::Counter);
        assert!(c
            .apply(&Mutation::Insert { members: vec![] }, "n1", 0)
            .is_err());
    }
}
