//! Causality for ap keys: dotted version vectors with a causal context (as in Riak 2's
//! `dvv_enabled` objects), whose contexts can also name single dots (as the causal
//! contexts of delta-state CRDTs do).
//!
//! An [`Object`] is the state of one key on one replica: a set of **siblings**, each a
//! value (or a tombstone) tagged with the **dot** `(actor, counter)` of the write that
//! made it, and a [`Context`]: every dot this object has seen, including those it has
//! since superseded.
//!
//! - A write carrying a client's context replaces exactly the siblings that context
//!   covers; siblings the client did not see stay (they are concurrent).
//! - Two replicas merge by keeping a sibling unless the other side has seen its dot and
//!   dropped it. Merge is commutative, associative and idempotent (property-tested), so
//!   replicas converge whatever order messages arrive in.
//!
//! **Why a context is more than a version vector.** A version vector covers dot `(a, c)`
//! by covering every `(a, 1..=c)`. A client that wrote `(a, 5)` without having seen
//! `(a, 3)` (a concurrent write by someone else at the same home) must get back a context
//! that covers its own write and not `(a, 3)`: otherwise its next write would silently
//! replace a value it never saw (issue #8 item 12). So a [`Context`] is a version vector
//! plus **exact dots** above it, and the context a write hands back is the client's
//! context plus the write's own dot ([`Context::after_write`]), never the home's whole
//! object context.
//!
//! ```text
//!   client 2 writes "two"            home n1: (n1,1)="two"                    {n1:1}
//!   client 1 (saw nothing) writes    home n1: (n1,1)="two", (n1,2)="one"      {n1:2}
//!     "one"; it gets {} + (n1,2),    (not {n1:2}: that covers (n1,1) as well)
//!   client 1 writes "one again"      home n1: (n1,1)="two", (n1,3)="one again"
//!     with that context: it replaces (n1,2) only
//! ```
//!
//! Invariant the rest of the system keeps: an actor issues dot `(a, c)` for a key only
//! from a local object that has seen all of `(a, 1..c)` for that key. Dots are issued by
//! home replicas (whose local object is exactly that) or, when no home replica is
//! reachable, by a one-time actor that issues a single dot (see `ap::coordinator`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The writer of a dot: a node's id plus an incarnation (a wiped node is a new actor).
pub type Actor = String;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub actor: Actor,
    pub counter: u64,
}

/// actor → highest counter seen. A vector covers dot `(a, c)` iff `vv[a] >= c`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionVector(pub BTreeMap<Actor, u64>);

impl VersionVector {
    pub fn get(&self, actor: &str) -> u64 {
        self.0.get(actor).copied().unwrap_or(0)
    }
    pub fn covers(&self, dot: &Dot) -> bool {
        self.get(&dot.actor) >= dot.counter
    }
}

/// Most actors a client context may name (every node's incarnations and one-time actors).
pub const CONTEXT_ACTORS_MAX: usize = 4096;
/// Most exact dots a client context may carry. A context a write returns keeps at most
/// this many (see [`Context::after_write`]).
pub const CONTEXT_DOTS_MAX: usize = 4096;
/// Largest dot counter a client context may carry: 2^62, far above any count of writes,
/// far below the wrap of the u64 the next dot is computed in.
pub const CONTEXT_COUNTER_MAX: u64 = 1 << 62;
/// Longest actor name a client context may carry (ours are `n<id>.<hex>`, plus `~<hex>`
/// for one-time actors).
pub const CONTEXT_ACTOR_BYTES_MAX: usize = 256;

/// A set of dots: every dot `(a, c)` with `c <= vv[a]`, plus the exact `dots`.
///
/// Kept in one normal form, so that two contexts covering the same dots are equal values
/// (and encode to equal bytes, which anti-entropy compares): no zero entries in `vv`, and
/// every exact dot lies above `vv[actor] + 1` (a dot right above the vector is folded
/// into it). Every constructor, merge and decode normalizes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ContextParts")]
pub struct Context {
    vv: VersionVector,
    dots: BTreeSet<Dot>,
}

/// A [`Context`] as stored or sent, before it is normalized.
#[derive(Deserialize)]
struct ContextParts {
    vv: VersionVector,
    dots: BTreeSet<Dot>,
}

impl From<ContextParts> for Context {
    fn from(p: ContextParts) -> Context {
        Context::new(p.vv, p.dots)
    }
}

impl From<VersionVector> for Context {
    fn from(vv: VersionVector) -> Context {
        Context::new(vv, [])
    }
}

impl Context {
    /// The context covering `vv` and `dots`.
    pub fn new(vv: VersionVector, dots: impl IntoIterator<Item = Dot>) -> Context {
        let mut c = Context {
            vv,
            dots: dots.into_iter().collect(),
        };
        c.vv.0.retain(|_, n| *n > 0);
        let actors: BTreeSet<Actor> = c.dots.iter().map(|d| d.actor.clone()).collect();
        for a in actors {
            c.normalize(&a);
        }
        c
    }

    /// The version-vector part: every dot up to these counters.
    pub fn vv(&self) -> &VersionVector {
        &self.vv
    }

    /// The exact dots beyond the version vector, in order.
    pub fn dots(&self) -> impl Iterator<Item = &Dot> {
        self.dots.iter()
    }

    /// Every actor this context names.
    pub fn actors(&self) -> BTreeSet<&str> {
        let mut a: BTreeSet<&str> = self.vv.0.keys().map(String::as_str).collect();
        a.extend(self.dots.iter().map(|d| d.actor.as_str()));
        a
    }

    pub fn covers(&self, dot: &Dot) -> bool {
        self.vv.covers(dot) || self.dots.contains(dot)
    }

    /// The highest counter of `actor` this context names (0: none).
    pub fn max_counter(&self, actor: &str) -> u64 {
        let exact = self.dots_of(actor).next_back().map_or(0, |d| d.counter);
        self.vv.get(actor).max(exact)
    }

    /// Adds one dot (and only that dot).
    pub fn add(&mut self, dot: &Dot) {
        if !self.vv.covers(dot) {
            self.dots.insert(dot.clone());
            self.normalize(&dot.actor);
        }
    }

    /// Covers every dot of `actor` up to `counter`. Only for the actor's own dots at an
    /// object that has seen all of them (see [`Object::update`]), or for counters known
    /// never to have been issued (the reap floor).
    pub fn raise(&mut self, actor: &str, counter: u64) {
        if counter > self.vv.get(actor) {
            self.vv.0.insert(actor.to_owned(), counter);
            self.normalize(actor);
        }
    }

    /// Adds every dot `other` covers.
    pub fn join(&mut self, other: &Context) {
        for (a, c) in &other.vv.0 {
            self.raise(a, *c);
        }
        for d in &other.dots {
            self.add(d);
        }
    }

    /// The context a client gets back for a write it made with this context: what this
    /// context covered plus the write's own dot, and nothing else, so the client's next
    /// write replaces its own write and what it had seen, never a sibling it was not shown.
    ///
    /// Bounded like a client context: past [`CONTEXT_DOTS_MAX`] exact dots the first ones
    /// other than the new one are left out, and a dot that would make the context name
    /// more than [`CONTEXT_ACTORS_MAX`] actors is not added. Covering less is always safe:
    /// a write made with this context keeps what it does not cover as siblings, it never
    /// loses anything.
    pub fn after_write(&self, dot: &Dot) -> Context {
        let mut c = self.clone();
        c.add(dot);
        if c.actors().len() > CONTEXT_ACTORS_MAX {
            // The client's context already named as many actors as it may, and the new
            // dot's actor is one more: the context as it was (the client's next write
            // keeps this write as a sibling).
            return self.clone();
        }
        while c.dots.len() > CONTEXT_DOTS_MAX {
            let Some(first) = c.dots.iter().find(|d| *d != dot).cloned() else {
                break;
            };
            c.dots.remove(&first);
        }
        c
    }

    fn dots_of(&self, actor: &str) -> impl DoubleEndedIterator<Item = &Dot> {
        let from = Dot {
            actor: actor.to_owned(),
            counter: 0,
        };
        let to = Dot {
            actor: actor.to_owned(),
            counter: u64::MAX,
        };
        self.dots.range(from..=to)
    }

    /// Restores the normal form for `actor`: exact dots the vector covers go, and exact
    /// dots right above the vector are folded into it.
    fn normalize(&mut self, actor: &str) {
        let mut top = self.vv.get(actor);
        let mut drop = Vec::new();
        for d in self.dots_of(actor) {
            if d.counter <= top {
                drop.push(d.clone());
            } else if d.counter == top + 1 {
                top += 1;
                drop.push(d.clone());
            } else {
                break;
            }
        }
        for d in &drop {
            self.dots.remove(d);
        }
        if top > 0 {
            self.vv.0.insert(actor.to_owned(), top);
        }
    }
}

/// One concurrent version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sibling {
    pub dot: Dot,
    /// `None` is a tombstone: a delete that must still be replicated.
    #[serde(with = "serde_bytes")]
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
    pub context: Context,
}

impl Object {
    /// Applies a client write at `actor`: `value` (or a tombstone) replaces every
    /// sibling covered by `client_context`; the others remain as concurrent siblings.
    /// Returns the new object and the new write's dot (the client's next context is
    /// `client_context.after_write(&dot)`), or `None` if `actor`'s counters are exhausted
    /// (only a forged context can get there: counters a client sends stay below 2^62).
    pub fn update(
        &self,
        client_context: &Context,
        actor: &str,
        value: Option<Vec<u8>>,
        now_ms: u64,
    ) -> Option<(Object, Dot)> {
        let mut context = self.context.clone();
        context.join(client_context);
        // `actor` issues its dots for this key only from this object, which has seen every
        // one it issued (module invariant). A higher counter of `actor` in the client's
        // context was never issued (the context is forged): the new dot goes above it, so
        // it never lands on a dot some context already covers, and the object covers the
        // counters in between, which no write will ever have.
        let counter = context.max_counter(actor).checked_add(1)?;
        let dot = Dot {
            actor: actor.to_owned(),
            counter,
        };
        context.raise(actor, counter);
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
        Some((Object { siblings, context }, dot))
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

    fn dot(actor: &str, counter: u64) -> Dot {
        Dot {
            actor: actor.into(),
            counter,
        }
    }

    fn none() -> Context {
        Context::default()
    }

    fn write(o: &Object, ctx: &Context, actor: &str, v: &str) -> (Object, Dot) {
        o.update(ctx, actor, Some(v.as_bytes().to_vec()), 0)
            .unwrap()
    }

    #[test]
    fn a_write_with_the_read_context_replaces_what_it_saw() {
        let (a, _) = write(&Object::default(), &none(), "n1", "1");
        let (b, _) = write(&a, &a.context, "n1", "2");
        assert_eq!(b.values(), vec![b"2".as_slice()]);
    }

    #[test]
    fn concurrent_writes_become_siblings_and_a_context_write_resolves_them() {
        let base = Object::default();
        // Two clients both read the empty key and write at different replicas.
        let (x, _) = write(&base, &none(), "n1", "x");
        let (y, _) = write(&base, &none(), "n2", "y");
        let merged = x.merge(&y);
        assert_eq!(merged.values(), vec![b"x".as_slice(), b"y".as_slice()]);
        // A write at n1 that saw only x keeps y.
        let (partial, _) = write(&merged, &x.context, "n1", "x2");
        assert_eq!(partial.values(), vec![b"x2".as_slice(), b"y".as_slice()]);
        // A write that saw both resolves them.
        let (resolved, _) = write(&merged, &merged.context, "n3", "z");
        assert_eq!(resolved.values(), vec![b"z".as_slice()]);
        // And the resolution wins when merged back into a stale replica.
        assert_eq!(resolved.merge(&x).values(), vec![b"z".as_slice()]);
        assert_eq!(y.merge(&resolved), resolved.merge(&y));
    }

    #[test]
    fn deletes_are_tombstones_until_overwritten() {
        let (a, _) = write(&Object::default(), &none(), "n1", "v");
        let (d, _) = a.update(&a.context, "n1", None, 0).unwrap();
        assert!(d.is_deleted());
        assert!(d.values().is_empty());
        assert!(
            a.merge(&d).is_deleted(),
            "the delete wins over the value it saw"
        );
        assert_eq!(Context::from(vv(&[("n1", 2)])), d.context);
    }

    /// Regression (issue #8 item 12): the context a write returned was the home's whole
    /// object context, which covered a concurrent sibling the client had never seen; the
    /// client's next write with it silently replaced that sibling.
    #[test]
    fn a_write_context_covers_the_clients_context_and_its_own_write_only() {
        let home = Object::default();
        // Client 2 writes first; client 1, which has seen nothing, writes concurrently at
        // the same home, so its dot (n1,2) is above client 2's (n1,1).
        let (after_2, _) = write(&home, &none(), "n1", "two");
        let (after_1, dot_1) = write(&after_2, &none(), "n1", "one");
        assert_eq!(after_1.values(), vec![b"two".as_slice(), b"one".as_slice()]);
        let ctx_1 = none().after_write(&dot_1);
        assert!(ctx_1.covers(&dot_1));
        assert!(
            !ctx_1.covers(&dot("n1", 1)),
            "client 1 never saw client 2's write"
        );
        // Client 1 writes again with the context its first write returned: it replaces
        // its own first write, and client 2's value survives as a sibling.
        let (again, dot_again) = write(&after_1, &ctx_1, "n1", "one again");
        assert_eq!(
            again.values(),
            vec![b"two".as_slice(), b"one again".as_slice()]
        );
        // Also after merging with a replica that still holds the first write only.
        let elsewhere = Object::default().merge(&after_1);
        assert_eq!(again.merge(&elsewhere), again);
        // A context read from the object covers everything it showed and resolves it.
        let (resolved, _) = write(&again, &again.context, "n1", "both");
        assert_eq!(resolved.values(), vec![b"both".as_slice()]);
        // Chained contexts keep naming exactly the client's own writes.
        let ctx_again = ctx_1.after_write(&dot_again);
        assert_eq!(ctx_again.dots().count(), 2);
        assert!(!ctx_again.covers(&dot("n1", 1)));
    }

    #[test]
    fn a_write_context_at_another_replica_replaces_only_what_it_names() {
        // Client 1 wrote (n1,2) at n1 above client 2's (n1,1); n2 has neither yet and
        // takes client 1's next write (n1 unreachable, say).
        let (after_2, _) = write(&Object::default(), &none(), "n1", "two");
        let (after_1, dot_1) = write(&after_2, &none(), "n1", "one");
        let ctx_1 = none().after_write(&dot_1);
        let (at_n2, _) = write(&Object::default(), &ctx_1, "n2", "one again");
        // n2 records that (n1,2) is superseded, and only that.
        assert!(at_n2.context.covers(&dot_1) && !at_n2.context.covers(&dot("n1", 1)));
        let merged = at_n2.merge(&after_1);
        assert_eq!(
            merged.values(),
            vec![b"two".as_slice(), b"one again".as_slice()]
        );
        assert_eq!(merged, after_1.merge(&at_n2));
        // Once n2 has seen (n1,1) too, the exact dot folds into the vector.
        assert_eq!(merged.context, Context::from(vv(&[("n1", 2), ("n2", 1)])));
    }

    #[test]
    fn contexts_keep_one_normal_form() {
        let c = Context::new(
            vv(&[("a", 2), ("z", 0)]),
            [dot("a", 1), dot("a", 3), dot("a", 5), dot("b", 2)],
        );
        assert_eq!(c.vv(), &vv(&[("a", 3)]));
        assert_eq!(
            c.dots().cloned().collect::<Vec<_>>(),
            vec![dot("a", 5), dot("b", 2)]
        );
        assert_eq!(c.max_counter("a"), 5);
        assert_eq!(c.max_counter("b"), 2);
        assert!(c.covers(&dot("a", 3)) && !c.covers(&dot("a", 4)) && c.covers(&dot("a", 5)));
        let mut d = c.clone();
        d.add(&dot("a", 4));
        assert_eq!(d, Context::from(vv(&[("a", 5)])).after_write(&dot("b", 2)));
        // Decoding normalizes too.
        let raw = serde_json::json!({"vv": {"a": 1}, "dots": [{"actor": "a", "counter": 2}]});
        let back: Context = serde_json::from_value(raw).unwrap();
        assert_eq!(back, Context::from(vv(&[("a", 2)])));
    }

    #[test]
    fn a_forged_counter_of_the_writing_actor_is_stepped_over_never_reused() {
        let (a, _) = write(&Object::default(), &none(), "n1", "a");
        let forged = Context::new(VersionVector::default(), [dot("n1", 9)]);
        let (b, d) = write(&a, &forged, "n1", "b");
        assert_eq!(d, dot("n1", 10));
        assert_eq!(b.context, Context::from(vv(&[("n1", 10)])));
        let at_the_top = Context::from(vv(&[("n1", u64::MAX)]));
        assert!(a.update(&at_the_top, "n1", None, 0).is_none());
    }

    #[test]
    fn a_write_context_stays_within_the_client_bounds() {
        let many = Context::new(
            VersionVector::default(),
            (0..CONTEXT_DOTS_MAX as u64).map(|i| dot("a", 2 * i + 2)),
        );
        let next = many.after_write(&dot("b", 7));
        assert_eq!(next.dots().count(), CONTEXT_DOTS_MAX);
        assert!(next.covers(&dot("b", 7)), "the new write is kept");
        assert!(
            !next.covers(&dot("a", 2)),
            "the first exact dot is left out"
        );
        let actors = Context::from(VersionVector(
            (0..CONTEXT_ACTORS_MAX)
                .map(|i| (format!("n{i}"), 1))
                .collect(),
        ));
        assert_eq!(actors.after_write(&dot("new", 3)), actors);
        assert!(actors.after_write(&dot("n1", 2)).covers(&dot("n1", 2)));
    }

    /// One step of a random history on three replicas.
    #[derive(Debug, Clone)]
    enum Step {
        /// Replica `at` merges replica `from`'s state.
        Sync { at: usize, from: usize },
        /// A client reads replica `from` and writes at replica `at` with that context.
        ReadWrite { at: usize, from: usize, v: u8 },
        /// A client writes at `at` with the context an earlier write (the `nth`, modulo
        /// the writes so far) returned.
        Chain { at: usize, nth: usize, v: u8 },
    }

    fn history() -> impl Strategy<Value = Vec<Step>> {
        let step = prop_oneof![
            (0usize..3, 0usize..3).prop_map(|(at, from)| Step::Sync { at, from }),
            (0usize..3, 0usize..3, 0u8..4).prop_map(|(at, from, v)| Step::ReadWrite {
                at,
                from,
                v
            }),
            (0usize..3, 0usize..64, 0u8..4).prop_map(|(at, nth, v)| Step::Chain { at, nth, v }),
        ];
        proptest::collection::vec(step, 1..40)
    }

    /// Runs a history; returns the replicas, every dot issued, every context a write was
    /// made with and the dots each of those contexts was entitled to cover: what its
    /// read showed, or the earlier write's entitlement plus that write's own dot.
    #[allow(clippy::type_complexity)]
    fn run(h: &[Step]) -> (Vec<Object>, Vec<Dot>, Vec<Context>, Vec<BTreeSet<Dot>>) {
        let mut replicas = vec![Object::default(); 3];
        let mut issued = Vec::new();
        let mut contexts = Vec::new();
        let mut seen = Vec::new();
        // Per write: the context it returned, and the dots its client had seen.
        let mut returned: Vec<(Context, BTreeSet<Dot>)> = Vec::new();
        for (i, step) in h.iter().enumerate() {
            let (at, ctx, saw, v) = match step {
                Step::Sync { at, from } => {
                    replicas[*at] = replicas[*at].merge(&replicas[*from]);
                    continue;
                }
                Step::ReadWrite { at, from, v } => {
                    let shown: BTreeSet<Dot> = replicas[*from]
                        .siblings
                        .iter()
                        .map(|s| s.dot.clone())
                        .collect();
                    (*at, replicas[*from].context.clone(), shown, *v)
                }
                Step::Chain { at, nth, v } if !returned.is_empty() => {
                    let (ctx, saw) = returned[nth % returned.len()].clone();
                    (*at, ctx, saw, *v)
                }
                Step::Chain { .. } => continue,
            };
            let value = (v != 0).then(|| vec![v, i as u8]);
            let (next, dot) = replicas[at]
                .update(&ctx, &format!("n{at}"), value, i as u64)
                .unwrap();
            replicas[at] = next;
            let mut saw_after = saw.clone();
            saw_after.insert(dot.clone());
            returned.push((ctx.after_write(&dot), saw_after));
            issued.push(dot);
            contexts.push(ctx);
            seen.push(saw);
        }
        (replicas, issued, contexts, seen)
    }

    proptest! {
        #[test]
        fn merge_is_commutative_associative_idempotent(h in history()) {
            let (r, _, _, _) = run(&h);
            prop_assert_eq!(r[0].merge(&r[1]), r[1].merge(&r[0]));
            prop_assert_eq!(r[0].merge(&r[1]).merge(&r[2]), r[0].merge(&r[1].merge(&r[2])));
            prop_assert_eq!(r[0].merge(&r[0]), r[0].clone());
        }

        #[test]
        fn no_write_is_lost_unless_a_later_write_saw_it(h in history()) {
            // After merging every replica, each dot ever issued is still a sibling, or some
            // client wrote with a context that covered it, having been shown that write
            // (by a read, or because it was the client's own earlier write).
            let (r, issued, contexts, seen) = run(&h);
            let all = r[0].merge(&r[1]).merge(&r[2]);
            for d in &issued {
                let present = all.siblings.iter().any(|s| &s.dot == d);
                let superseded = contexts
                    .iter()
                    .zip(&seen)
                    .any(|(c, saw)| c.covers(d) && saw.contains(d));
                prop_assert!(present || superseded, "{:?} lost", d);
            }
            // Converged replicas agree whatever the order.
            prop_assert_eq!(all.clone(), r[2].merge(&r[0]).merge(&r[1]));
        }
    }
}
