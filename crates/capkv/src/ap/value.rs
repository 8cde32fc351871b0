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

use super::dvv::{Actor, Context, Dot, Object};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApState {
    Register(Object),
    Lww(Option<LwwValue>),
    Counter(PNCounter<Actor>),
    Set(Orswot<String, Actor>),
}

/// A hybrid-logical-clock timestamp: wall-clock milliseconds, then a logical counter
/// that orders events within (or behind) the same millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    pub wall_ms: u64,
    pub logical: u32,
}

impl Hlc {
    /// The HLC send/receive rule, per key: the new stamp is the later of this node's
    /// wall clock and just after `seen`, so a write that read a value always wins over
    /// it, even when this node's clock is behind the clock that wrote it.
    pub fn after(seen: Option<Hlc>, now_ms: u64) -> Hlc {
        match seen {
            Some(s) if s.wall_ms >= now_ms => Hlc {
                wall_ms: s.wall_ms,
                logical: s.logical + 1,
            },
            _ => Hlc {
                wall_ms: now_ms,
                logical: 0,
            },
        }
    }
}

/// The state of an `lww` key: the latest write (`None` value = deleted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LwwValue {
    pub stamp: Hlc,
    /// Breaks ties between equal stamps, so every replica picks the same winner.
    pub actor: Actor,
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

/// What a node must stay above after it collected tombstones (see `ap::tombstones`):
/// the highest counter its own actor had in a collected tombstone's context, and the
/// latest collected `lww` stamp. New dots and stamps are issued above it, so a write
/// made after a key was collected is never mistaken for one the old context covered,
/// nor loses to a stale copy of the old tombstone. Persisted with the collection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReapFloor {
    pub dot: u64,
    pub stamp: Option<Hlc>,
}

impl ReapFloor {
    /// Raises the floor to cover a collected tombstone as seen by `actor`.
    pub fn cover(&mut self, tombstone: &ApState, actor: &str) {
        match tombstone {
            ApState::Register(o) => self.dot = self.dot.max(o.context.max_counter(actor)),
            ApState::Lww(Some(v)) => self.stamp = self.stamp.max(Some(v.stamp)),
            _ => {}
        }
    }
}

/// What applying a client's mutation at a replica produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The key's new state at that replica.
    pub state: ApState,
    /// A register write's new dot: the context the client gets back is its own context
    /// plus this dot ([`Context::after_write`]). `None` for the other types.
    pub dot: Option<Dot>,
}

/// A client's change to an ap key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mutation {
    /// Register write (`None`: delete) replacing what `context` saw.
    Write {
        context: Context,
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
    /// Whether this mutation applies to keys of type `t` (writes go to registers and lww).
    pub fn applies_to(&self, t: ValueType) -> bool {
        self.value_type() == t || (t == ValueType::Lww && matches!(self, Mutation::Write { .. }))
    }

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
            ValueType::Lww => ApState::Lww(None),
        }
    }

    pub fn value_type(&self) -> ValueType {
        match self {
            ApState::Register(_) => ValueType::Register,
            ApState::Counter(_) => ValueType::Counter,
            ApState::Set(_) => ValueType::Set,
            ApState::Lww(_) => ValueType::Lww,
        }
    }

    /// Applies a client's mutation as `actor` (a node that never collected a tombstone).
    pub fn apply(&self, m: &Mutation, actor: &str, now_ms: u64) -> Result<ApState, ApiError> {
        self.apply_above(m, actor, now_ms, &ReapFloor::default())
            .map(|a| a.state)
    }

    /// Applies a client's mutation as `actor`, issuing its dot or stamp above `floor`.
    pub fn apply_above(
        &self,
        m: &Mutation,
        actor: &str,
        now_ms: u64,
        floor: &ReapFloor,
    ) -> Result<Applied, ApiError> {
        let actor = actor.to_owned();
        let state = match (self, m) {
            (ApState::Register(o), Mutation::Write { context, value }) => {
                // The actor's dots up to the floor were all collected with their keys:
                // this object has, in effect, seen them.
                let mut o = o.clone();
                o.context.raise(&actor, floor.dot);
                let (next, dot) = o
                    .update(context, &actor, value.clone(), now_ms)
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "the context names the largest possible dot counter of this \
                             replica: it was not issued by capkv",
                        )
                    })?;
                return Ok(Applied {
                    state: ApState::Register(next),
                    dot: Some(dot),
                });
            }
            (ApState::Lww(cur), Mutation::Write { value, .. }) => ApState::Lww(Some(LwwValue {
                stamp: Hlc::after(cur.as_ref().map(|c| c.stamp).max(floor.stamp), now_ms),
                actor,
                value: value.clone(),
            })),
            (ApState::Counter(c), Mutation::Add { by }) => {
                // Totals are 64-bit signed in the API: refuse a change that would leave
                // that range rather than wrap or clamp it.
                let now = counter_total(c)?;
                if i64::try_from(now + i128::from(*by)).is_err() {
                    return Err(ApiError::bad_request(format!(
                        "adding {by} to {now} would leave the range of a 64-bit signed counter"
                    )));
                }
                // The actor's own running sum in that direction is a u64 (a dot counter)
                // that crdts adds to unchecked: +MAX, -MAX, +MAX... stays in range as a
                // total yet wraps it (found by review). Zero steps read it safely.
                let steps = by.unsigned_abs();
                let mine = if *by >= 0 {
                    c.inc_many(actor.clone(), 0)
                } else {
                    c.dec_many(actor.clone(), 0)
                }
                .dot
                .counter;
                if mine.checked_add(steps).is_none() {
                    return Err(ApiError::bad_request(format!(
                        "this node's running sum of {} for the counter would pass 2^64; \
                         the change was not applied",
                        if *by >= 0 { "increments" } else { "decrements" }
                    )));
                }
                let mut c = c.clone();
                let op = if *by >= 0 {
                    c.inc_many(actor, steps)
                } else {
                    c.dec_many(actor, steps)
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
        };
        Ok(Applied { state, dot: None })
    }

    /// Merges two replicas' states. States of different types never meet (a keyspace's
    /// type is fixed); if they did, `self` is kept.
    pub fn merge(&self, other: &ApState) -> ApState {
        match (self, other) {
            (ApState::Register(a), ApState::Register(b)) => ApState::Register(a.merge(b)),
            (ApState::Lww(a), ApState::Lww(b)) => {
                let key = |v: &Option<LwwValue>| v.as_ref().map(|v| (v.stamp, v.actor.clone()));
                ApState::Lww(if key(b) > key(a) {
                    b.clone()
                } else {
                    a.clone()
                })
            }
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

    /// Whether this is a delete that can be collected once every copy equals it: a
    /// register whose siblings are all tombstones, or an `lww` key whose latest write is
    /// a delete. Counters and sets have no deletes.
    pub fn is_tombstone(&self) -> bool {
        match self {
            ApState::Register(o) => o.is_deleted(),
            ApState::Lww(v) => v.as_ref().is_none_or(|v| v.value.is_none()),
            ApState::Counter(_) | ApState::Set(_) => false,
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
            ApState::Register(o) => crate::codec::encode(o),
            ApState::Lww(v) => crate::codec::encode(v),
            ApState::Counter(c) => crate::codec::encode(c),
            ApState::Set(s) => {
                let mut members: Vec<(String, Vec<u8>)> = s
                    .iter()
                    .map(|m| (m.val.clone(), crate::codec::encode(&m.rm_clock)))
                    .collect();
                members.sort();
                crate::codec::encode(&(crate::codec::encode(&s.clock()), members))
            }
        };
        super::ring::hash64(&bytes)
    }

    /// The counter's total (0 for other types). Increments are refused before a replica's
    /// total leaves the i64 range, but concurrent ones merged from both sides of a
    /// partition can still add up past it: then this is an error, never a clamped number.
    pub fn total(&self) -> Result<i64, ApiError> {
        match self {
            ApState::Counter(c) => {
                let t = counter_total(c)?;
                i64::try_from(t).map_err(|_| {
                    ApiError::internal(format!(
                        "the counter's merged total {t} is outside the range of a 64-bit signed integer"
                    ))
                })
            }
            _ => Ok(0),
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

/// ap states as storage format 1 wrote them (see `cp::FORMAT`): a register's context was
/// a plain version vector. Read only, and converted at once.
impl crate::codec::Stored for ReapFloor {}

/// The one stored type whose shape changed in storage format 2: a format-1 record of it
/// is read through its format-1 layout and converted (`crate::codec`).
impl crate::codec::Stored for ApState {
    fn from_format_1(body: &[u8]) -> Result<ApState, bincode::Error> {
        bincode::deserialize::<format_1::ApState>(body).map(ApState::from)
    }
}

pub(crate) mod format_1 {
    use crdts::{Orswot, PNCounter};
    use serde::Deserialize;

    use super::LwwValue;
    use crate::ap::dvv::{Actor, Sibling, VersionVector};

    #[derive(Deserialize)]
    pub struct Object {
        siblings: Vec<Sibling>,
        context: VersionVector,
    }

    /// The variants in format 1's order, which format 2 keeps.
    #[derive(Deserialize)]
    pub enum ApState {
        Register(Object),
        Lww(Option<LwwValue>),
        Counter(PNCounter<Actor>),
        Set(Orswot<String, Actor>),
    }

    impl From<ApState> for super::ApState {
        fn from(s: ApState) -> super::ApState {
            match s {
                ApState::Register(o) => super::ApState::Register(crate::ap::dvv::Object {
                    siblings: o.siblings,
                    context: o.context.into(),
                }),
                ApState::Lww(v) => super::ApState::Lww(v),
                ApState::Counter(c) => super::ApState::Counter(c),
                ApState::Set(s) => super::ApState::Set(s),
            }
        }
    }
}

/// A PN-counter's total, exactly.
fn counter_total(c: &PNCounter<Actor>) -> Result<i128, ApiError> {
    c.read()
        .to_string()
        .parse()
        .map_err(|_| ApiError::internal("a counter's total is beyond 128 bits"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Review: each step keeps the total in range, but one actor's sum of increments
    /// would pass 2^64 at the third +MAX; refused, never wrapped.
    #[test]
    fn an_actors_running_sums_never_wrap() {
        let mut c = ApState::empty(ValueType::Counter);
        for (i, by) in [i64::MAX, -i64::MAX, i64::MAX, -i64::MAX]
            .into_iter()
            .enumerate()
        {
            c = c.apply(&Mutation::Add { by }, "a", i as u64).unwrap();
        }
        let err = c
            .apply(&Mutation::Add { by: i64::MAX }, "a", 9)
            .unwrap_err();
        assert_eq!(err.code, capkv_core::ErrorCode::BadRequest);
        assert_eq!(c.total().unwrap(), 0, "unchanged");
        // Another actor's sums are its own.
        let c = c.apply(&Mutation::Add { by: i64::MAX }, "b", 9).unwrap();
        assert_eq!(c.total().unwrap(), i64::MAX);
    }

    #[test]
    fn a_counter_never_wraps_or_clamps() {
        let add = |by| Mutation::Add { by };
        let c = ApState::empty(ValueType::Counter)
            .apply(&add(i64::MAX), "a", 1)
            .unwrap();
        assert_eq!(c.total().unwrap(), i64::MAX);
        let e = c.apply(&add(1), "a", 1).unwrap_err();
        assert_eq!(e.code, capkv_core::ErrorCode::BadRequest, "{e:?}");
        let low = ApState::empty(ValueType::Counter)
            .apply(&add(i64::MIN), "a", 1)
            .unwrap();
        assert!(low.apply(&add(-1), "a", 1).is_err());
        // Two sides each within range, merged past it: an error, not i64::MAX.
        let other = ApState::empty(ValueType::Counter)
            .apply(&add(i64::MAX), "b", 1)
            .unwrap();
        assert!(c.merge(&other).total().is_err());
    }

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
            prop_assert_eq!(r[0].merge(&r[1]).merge(&r[2]).total().unwrap(), sum);
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
    fn lww_keeps_the_latest_stamp_and_a_read_then_write_always_wins() {
        let write = |v: &str| Mutation::Write {
            context: Context::default(),
            value: Some(v.as_bytes().to_vec()),
        };
        let empty = ApState::empty(ValueType::Lww);
        // n1's clock is ahead (2000) of n2's (1000).
        let a = empty.apply(&write("a"), "n1", 2000).unwrap();
        // n2 read "a" and overwrites it: it wins although its clock is behind.
        let b = a.apply(&write("b"), "n2", 1000).unwrap();
        assert_eq!(a.merge(&b), b);
        assert_eq!(b.merge(&a), b);
        // Two concurrent writes: one wins, the same one everywhere (the other is lost).
        let c = empty.apply(&write("c"), "n3", 1500).unwrap();
        let d = empty.apply(&write("d"), "n4", 1500).unwrap();
        assert_eq!(c.merge(&d), d.merge(&c));
    }

    proptest! {
        #[test]
        fn lww_merges_are_lawful(h in ops()) {
            let mut r = vec![ApState::empty(ValueType::Lww); 3];
            for (i, (at, from, x, sync)) in h.iter().enumerate() {
                let (at, from) = (*at as usize, *from as usize);
                if *sync {
                    r[at] = r[at].merge(&r[from]);
                } else {
                    let m = Mutation::Write { context: Context::default(), value: Some(vec![*x as u8]) };
                    r[at] = r[at].apply(&m, &format!("n{at}"), (i % 5) as u64).unwrap();
                }
            }
            prop_assert_eq!(r[0].merge(&r[1]), r[1].merge(&r[0]));
            prop_assert_eq!(r[0].merge(&r[1]).merge(&r[2]), r[0].merge(&r[1].merge(&r[2])));
            prop_assert_eq!(r[0].merge(&r[0]), r[0].clone());
        }
    }

    #[test]
    fn mutations_of_the_wrong_type_are_refused() {
        let c = ApState::empty(ValueType::Counter);
        assert!(c
            .apply(&Mutation::Insert { members: vec![] }, "n1", 0)
            .is_err());
    }
}
