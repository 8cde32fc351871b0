//! Causality for ap keys: dotted version vectors with a causal context (as in Riak 2's
//! `dvv_enabled` objects).
//!
//! An [`Object`] is the state of one key on one replica: a set of **siblings**, each a
//! value (or a tombstone) tagged with the **dot** `(actor, counter)` of the write that
//! made it, and a **context**: a version vector covering every dot this object has
//! seen, including those it has since superseded.
//!
//! - A write carrying the context of what the client read replaces exactly the siblings
//!   that context covers; siblings the client did not see stay (they are concurrent).
//! - Two replicas merge by keeping a sibling unless the other side has seen its dot and
//!   dropped it. Merge is commutative, associative and idempotent (property-tested), so
//!   replicas converge whatever order messages arrive in.
//!
//! Invariant the rest of the system keeps: an actor issues dot `(a, c)` for a key only
//! from a local object that has seen all of `(a, 1..c)` for that key. Dots are issued by
//! home replicas (whose local object is exactly that) or, when no home replica is
//! reachable, by a one-time actor that issues a single dot (see `ap::coordinator`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The writer of a dot: a node's id plus an incarnation (a wiped node is a new actor).
pub type Actor = String;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub actor: Actor,
    pub counter: u64,
}

/// actor → highest counter seen. A context covers dot `(a, c)` iff `vv[a] >= c`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionVector(pub BTreeMap<Actor, u64>);

impl VersionVector {
    pub fn get(&self, actor: &str) -> u64 {
        self.0.get(actor).copied().unwrap_or(0)
    }
    pub fn covers(&self, dot: &Dot) -> bool {
        self.get(&dot.actor) >= dot.counter
    }
    pub fn add(&mut self, dot: &Dot) {
        let e = self.0.entry(dot.actor.clone()).or_insert(0);
        *e = (*e).max(dot.counter);
    }
    pub fn join(&mut self, other: &VersionVector) {
        for (a, c) in &other.0 {
            let e = self.0.entry(a.clone()).or_insert(0);
            *e = (*e).max(*c);
        }
    }
}

/// One concurrent version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sibling {
    pub dot: Dot,
    /// `None` is a tombstone: a delete that must still be replicated.
    pub value: Option<Vec<u8>>,
    /// Wall-clock time of the write at its coordinator, in ms (for tombstone GC and
    /// display only; never for ordering).
    pub written_at_ms: u64,
}

/// The state of one key on one replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    /// Sorted by dot, so equal states are equal values.
    pub siblings: Vec<Sibling>,
    pub context: VersionVector,
}

impl Object {
    /// Applies a client write at `actor`: `value` (or a tombstone) replaces every
    /// sibling covered by `client_context`; the others remain as concurrent siblings.
    /// Returns the new object and the new write's dot.
    pub fn update(
        &self,
        client_context: &VersionVector,
        actor: &str,
        value: Option<Vec<u8>>,
        now_ms: u64,
    ) -> (Object, Dot) {
        let counter = self.context.get(actor) + 1;
        let dot = Dot {
            actor: actor.to_owned(),
            counter,
        };
        let mut siblings: Vec<Sibling> = self
            .siblings
            .iter()
            .filter(|s| !client_context.covers(&s.dot))
            .cloned()
            .collect();
        siblings.push(Sibling {
            dot: dot.clone(),
            value,
            written_at_ms: now_ms,
        });
        siblings.sort_by(|a, b| a.dot.cmp(&b.dot));
        let mut context = self.context.clone();
        context.join(client_context);
        context.add(&dot);
        (Object { siblings, context }, dot)
    }

    /// Merges two replicas' states of the same key.
    pub fn merge(&self, other: &Object) -> Object {
        let mut siblings: BTreeMap<Dot, Sibling> = BTreeMap::new();
        for (mine, theirs) in [(self, other), (other, self)] {
            for s in &mine.siblings {
                let kept_there = theirs.siblings.iter().any(|t| t.dot == s.dot);
                if kept_there || !theirs.context.covers(&s.dot) {
                    siblings.entry(s.dot.clone()).or_insert_with(|| s.clone());
                }
            }
        }
        let mut context = self.context.clone();
        context.join(&other.context);
        Object {
            siblings: siblings.into_values().collect(),
            context,
        }
    }

    /// The live values (tombstones left out), in dot order.
    pub fn values(&self) -> Vec<&[u8]> {
        self.siblings
            .iter()
            .filter_map(|s| s.value.as_deref())
            .collect()
    }

    /// True when every sibling is a tombstone (the key reads as absent).
    pub fn is_deleted(&self) -> bool {
        self.siblings.iter().all(|s| s.value.is_none())
    }

    /// Whether `self` has seen everything `other` has (merging `other` changes nothing).
    pub fn dominates(&self, other: &Object) -> bool {
        &self.merge(other) == self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vv(pairs: &[(&str, u64)]) -> VersionVector {
        VersionVector(pairs.iter().map(|(a, c)| (a.to_string(), *c)).collect())
    }

    #[test]
    fn a_write_with_the_read_context_replaces_what_it_saw() {
        let empty = Object::default();
        let (a, _) = empty.update(&VersionVector::default(), "n1", Some(b"1".to_vec()), 0);
        let (b, _) = a.update(&a.context, "n1", Some(b"2".to_vec()), 0);
        assert_eq!(b.values(), vec![b"2".as_slice()]);
    }

    #[test]
    fn concurrent_writes_become_siblings_and_a_context_write_resolves_them() {
        let base = Object::default();
        // Two clients both read the empty key and write at different replicas.
        let (x, _) = base.update(&VersionVector::default(), "n1", Some(b"x".to_vec()), 0);
        let (y, _) = base.update(&VersionVector::default(), "n2", Some(b"y".to_vec()), 0);
        let merged = x.merge(&y);
        assert_eq!(merged.values(), vec![b"x".as_slice(), b"y".as_slice()]);
        // A write at n1 that saw only x keeps y.
        let (partial, _) = merged.update(&x.context, "n1", Some(b"x2".to_vec()), 0);
        assert_eq!(partial.values(), vec![b"x2".as_slice(), b"y".as_slice()]);
        // A write that saw both resolves them.
        let (resolved, _) = merged.update(&merged.context, "n3", Some(b"z".to_vec()), 0);
        assert_eq!(resolved.values(), vec![b"z".as_slice()]);
        // And the resolution wins when merged back into a stale replica.
        assert_eq!(resolved.merge(&x).values(), vec![b"z".as_slice()]);
        assert_eq!(y.merge(&resolved), resolved.merge(&y));
    }

    #[test]
    fn deletes_are_tombstones_until_overwritten() {
        let (a, _) =
            Object::default().update(&VersionVector::default(), "n1", Some(b"v".to_vec()), 0);
        let (d, _) = a.update(&a.context, "n1", None, 0);
        assert!(d.is_deleted());
        assert!(d.values().is_empty());
        assert!(
            a.merge(&d).is_deleted(),
            "the delete wins over the value it saw"
        );
        assert_eq!(vv(&[("n1", 2)]), d.context);
    }

    /// Random histories: updates at replicas with contexts read anywhere, and syncs.
    fn history() -> impl Strategy<Value = Vec<(u8, u8, u8, bool)>> {
        proptest::collection::vec((0u8..3, 0u8..3, 0u8..4, any::<bool>()), 1..30)
    }

    /// Runs a history; returns the replicas, every dot issued, and every client context
    /// an update was made with.
    fn run(h: &[(u8, u8, u8, bool)]) -> (Vec<Object>, Vec<Dot>, Vec<VersionVector>) {
        let mut replicas = vec![Object::default(); 3];
        let (mut issued, mut contexts) = (Vec::new(), Vec::new());
        for (i, (at, from, v, sync)) in h.iter().enumerate() {
            let (at, from) = (*at as usize, *from as usize);
            if *sync {
                replicas[at] = replicas[at].merge(&replicas[from]);
            } else {
                let ctx = replicas[from].context.clone();
                let actor = format!("n{at}");
                let value = if *v == 0 {
                    None
                } else {
                    Some(vec![*v, i as u8])
                };
                let (next, dot) = replicas[at].update(&ctx, &actor, value, i as u64);
                replicas[at] = next;
                issued.push(dot);
                contexts.push(ctx);
            }
        }
        (replicas, issued, contexts)
    }

    proptest! {
        #[test]
        fn merge_is_commutative_associative_idempotent(h in history()) {
            let (r, _, _) = run(&h);
            prop_assert_eq!(r[0].merge(&r[1]), r[1].merge(&r[0]));
            prop_assert_eq!(r[0].merge(&r[1]).merge(&r[2]), r[0].merge(&r[1].merge(&r[2])));
            prop_assert_eq!(r[0].merge(&r[0]), r[0].clone());
        }

        #[test]
        fn no_write_is_lost_unless_a_later_write_saw_it(h in history()) {
            // After merging every replica, each dot ever issued is still a sibling, or some
            // client wrote with a context that covered it (it was superseded knowingly).
            let (r, issued, contexts) = run(&h);
            let all = r[0].merge(&r[1]).merge(&r[2]);
            for dot in &issued {
                let present = all.siblings.iter().any(|s| &s.dot == dot);
                let superseded = contexts.iter().any(|c| c.covers(dot));
                prop_assert!(present || superseded, "{:?} lost", dot);
            }
            // Converged replicas agree whatever the order.
            prop_assert_eq!(all.clone(), r[2].merge(&r[0]).merge(&r[1]));
        }
    }
}
