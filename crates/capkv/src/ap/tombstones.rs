//! Tombstone collection: a delete stays as a tombstone until every copy of its key in
//! the cluster equals it, and only then is dropped, everywhere.
//!
//! Dropping it sooner resurrects data: a replica that missed the delete still holds the
//! old value, and anti-entropy or read repair would copy it back to the replicas that
//! forgot the delete. So the key's first home (one collector per key) runs, every
//! [`REAP_INTERVAL`], over its local tombstones:
//!
//! ```text
//!   check  ── ApReapCheck {tombstones} ──▶ every node (all must answer)
//!          ◀── per tombstone: "every copy I hold, replica or hint, equals it or is absent"
//!   ... at least `grace` later, the same check passes again with the same tombstone ...
//!   reap   ── ApReap {tombstones} ───────▶ every node: drop copies still equal to it
//! ```
//!
//! - Every node, not just the key's homes: a fallback may hold a hint for the key.
//! - Twice, `grace` apart: a stale copy already in flight at the first check (a write,
//!   a read repair, a hint handoff, an anti-entropy push, each bounded by its deadline)
//!   has landed by the second and fails it, or merged into the tombstone and changed
//!   nothing. `grace` must exceed the longest deadline (client timeouts are ≤ 60 s).
//! - A node that is down or cut off blocks collection: tombstones wait for a healthy
//!   cluster, the condition the issue names ("once every replica has them").
//! - After a key is collected, no copy remembers the dots or stamp it had, so each node
//!   raises a floor ([`ReapFloor`](super::value::ReapFloor)) in the same durable batch:
//!   its later dots and `lww` stamps are issued above the collected ones. A client
//!   still holding a context read before the delete then cannot silently overwrite a
//!   write made after the collection (the two become siblings).
//! - A node that misses the `ApReap` keeps the tombstone; anti-entropy copies it back and
//!   a later round collects it again. Harmless: it is a delete.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::rt::Instant;

use capkv_core::{ApiError, KeyspaceSpec, Mode};

use super::coordinator::Coordinator;
use super::replica::{obj_key, StoredObject};
use super::ring::key_hash;
use super::rpc::{ApReap, ApReapCheck, ApRequest, ApResponse};
use crate::cluster::NodeId;
use crate::message::Rpc;

pub const REAP_INTERVAL: Duration = Duration::from_secs(2);
/// Tombstones checked per round (one message to each node).
pub const REAP_BATCH: usize = 256;
/// Objects read per storage scan while looking for tombstones.
const SCAN_CHUNK: usize = 1024;
/// Default time between the two checks (see the module doc).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(120);

/// This node's answer to a check: per tombstone, whether every copy it holds equals it.
pub fn check(c: &Coordinator, items: &[StoredObject]) -> Result<Vec<bool>, ApiError> {
    let nodes = c.nodes();
    items
        .iter()
        .map(|(ks, key, state)| {
            Ok(state.is_tombstone() && c.replica.holds_only(ks, key, state, &nodes)?)
        })
        .collect()
}

/// Collects tombstones every node confirmed twice: drops this node's copies that still
/// equal them and raises its floor. Returns the number of copies dropped.
pub async fn reap(c: &Coordinator, items: &[StoredObject]) -> Result<u64, ApiError> {
    let nodes = c.nodes();
    let mut dropped = 0;
    for (ks, key, state) in items {
        dropped += c.replica.reap(ks, key, state, &nodes, &c.actor).await?;
    }
    Ok(dropped)
}

/// The collector's memory between rounds.
pub struct Collector {
    grace: Duration,
    /// Tombstones every node confirmed, by object key: their digest and the first time.
    confirmed: HashMap<Vec<u8>, (u64, Instant)>,
    /// Where the next round's scan starts (rounds walk the store in key order).
    cursor: Option<Vec<u8>>,
}

impl Collector {
    pub fn new(grace: Duration) -> Collector {
        Collector {
            grace,
            confirmed: HashMap::new(),
            cursor: None,
        }
    }

    /// The next tombstones this node collects (it is their key's first home), up to
    /// [`REAP_BATCH`], from the cursor on. Forgets confirmations of keys no longer deleted.
    fn candidates(
        &mut self,
        c: &Coordinator,
        specs: &BTreeMap<String, KeyspaceSpec>,
    ) -> Result<Vec<StoredObject>, ApiError> {
        let mut found = Vec::new();
        loop {
            let (chunk, more) = c.replica.objects(self.cursor.as_deref(), SCAN_CHUNK)?;
            let at_end = !more;
            for (ks, key, state) in chunk {
                let k = obj_key(&ks, &key);
                self.cursor = Some(k.clone());
                let mine = specs
                    .get(&ks)
                    .filter(|s| s.mode == Mode::Ap)
                    .is_some_and(|s| {
                        let pl = c
                            .ring
                            .preference_list(key_hash(&ks, &key), s.n.unwrap_or(3) as usize);
                        pl.first() == Some(&c.me)
                    });
                if mine && state.is_tombstone() {
                    found.push((ks, key, state));
                    if found.len() == REAP_BATCH {
                        return Ok(found);
                    }
                } else {
                    self.confirmed.remove(&k);
                }
            }
            if at_end {
                self.cursor = None;
                return Ok(found);
            }
        }
    }

    /// One round. Returns how many tombstones were collected.
    pub async fn round(
        &mut self,
        c: &Arc<Coordinator>,
        specs: &BTreeMap<String, KeyspaceSpec>,
    ) -> Result<u64, ApiError> {
        if c.replica.tombstones_held() == 0 {
            self.confirmed.clear();
            return Ok(0);
        }
        let candidates = self.candidates(c, specs)?;
        if candidates.is_empty() {
            return Ok(0);
        }
        let nodes = c.nodes();
        let mut everywhere = check(c, &candidates)?;
        for &node in nodes.iter().filter(|n| **n != c.me) {
            let answer = ask(
                c,
                node,
                ApReapCheck {
                    items: candidates.clone(),
                },
            )
            .await;
            match answer {
                Ok(Ok(v)) if v.len() == everywhere.len() => {
                    for (all, yes) in everywhere.iter_mut().zip(v) {
                        *all &= yes;
                    }
                }
                other => {
                    tracing::debug!(node, reply = ?other.err(), "tombstone check not answered");
                    everywhere.iter_mut().for_each(|all| *all = false);
                    break;
                }
            }
        }

        let now = Instant::now();
        let mut ripe = Vec::new();
        let mut deferred = 0u64;
        for (item, ok) in candidates.into_iter().zip(everywhere) {
            let k = obj_key(&item.0, &item.1);
            let digest = item.2.digest();
            if !ok {
                self.confirmed.remove(&k);
                deferred += 1;
                continue;
            }
            match self.confirmed.get(&k) {
                Some((d, first)) if *d == digest => {
                    if now.duration_since(*first) >= self.grace {
                        self.confirmed.remove(&k);
                        ripe.push(item);
                    }
                }
                _ => {
                    self.confirmed.insert(k, (digest, now));
                }
            }
        }
        metrics::counter!("capkv_ap_tombstones_deferred_total").increment(deferred);
        if ripe.is_empty() {
            return Ok(0);
        }
        reap(c, &ripe).await?;
        for &node in nodes.iter().filter(|n| **n != c.me) {
            match ask(
                c,
                node,
                ApReap {
                    items: ripe.clone(),
                },
            )
            .await
            {
                Ok(Ok(_)) => {}
                // It keeps the tombstones; anti-entropy brings them back and a later
                // round collects them again.
                other => {
                    tracing::debug!(node, reply = ?other.err(), "tombstone collection not confirmed")
                }
            }
        }
        metrics::counter!("capkv_ap_tombstones_collected_total").increment(ripe.len() as u64);
        Ok(ripe.len() as u64)
    }
}

async fn ask<M: Rpc<Request = ApRequest, Response = ApResponse>>(
    c: &Coordinator,
    node: NodeId,
    m: M,
) -> Result<M::Reply, ApiError> {
    crate::message::ask(&*c.transport, node, m, Duration::from_secs(5))
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ap::dvv::Context;
    use crate::ap::replica::Replica;
    use crate::ap::ring::Ring;
    use crate::ap::value::{ApState, Mutation};
    use crate::net::FaultFilter;
    use crate::storage::{Engine, GroupCommit, MemoryEngine};
    use crate::PeerTransport;
    use capkv_core::ValueType;

    /// A one-node cluster: the collector needs no peers, so rounds run for real.
    fn single_node() -> Arc<Coordinator> {
        let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let replica = Arc::new(Replica::new(engine.clone(), GroupCommit::start(engine)).unwrap());
        Arc::new(Coordinator::new(
            1,
            "n1.test".into(),
            Ring::new([1], 16),
            Arc::new(crate::rpc::Side::new(Arc::new(PeerTransport::new(
                1,
                BTreeMap::new(),
                Arc::new(FaultFilter::default()),
                1 << 20,
            )))),
            replica,
            Arc::default(),
        ))
    }

    fn specs() -> BTreeMap<String, KeyspaceSpec> {
        let spec: KeyspaceSpec =
            serde_json::from_str(r#"{"name":"cart","mode":"ap","n":1}"#).unwrap();
        [("cart".to_string(), spec)].into()
    }

    fn write(context: Context, v: Option<&str>) -> Mutation {
        Mutation::Write {
            context,
            value: v.map(|v| v.as_bytes().to_vec()),
        }
    }

    async fn put(c: &Coordinator, ctx: Context, v: Option<&str>) -> ApState {
        c.replica
            .update(
                "cart",
                b"k",
                ValueType::Register,
                &write(ctx, v),
                &c.actor,
                1,
            )
            .await
            .unwrap()
            .state
    }

    fn context(s: &ApState) -> Context {
        match s {
            ApState::Register(o) => o.context.clone(),
            _ => panic!("register expected"),
        }
    }

    #[tokio::test]
    async fn a_tombstone_is_collected_after_two_checks_and_later_dots_stay_above_it() {
        let c = single_node();
        let mut collector = Collector::new(Duration::ZERO);
        let v = put(&c, Context::default(), Some("v")).await;
        let stale = context(&v);
        // A live value is never a candidate.
        assert_eq!(collector.round(&c, &specs()).await.unwrap(), 0);
        assert!(collector.confirmed.is_empty());
        assert_eq!(c.replica.tombstones_held(), 0);
        let t = put(&c, stale.clone(), None).await;
        assert!(t.is_tombstone());
        assert_eq!(c.replica.tombstones_held(), 1);
        assert_eq!(
            collector.round(&c, &specs()).await.unwrap(),
            0,
            "first check"
        );
        assert_eq!(
            collector.round(&c, &specs()).await.unwrap(),
            1,
            "second check"
        );
        assert!(c.replica.read("cart", b"k", &[1]).unwrap().is_none());
        assert_eq!(c.replica.tombstones_held(), 0);

        // A new write after collection, then a write with the context read before the
        // delete: the new write is not covered by that old context, so both stay.
        let x = put(&c, Context::default(), Some("x")).await;
        assert_eq!(c.replica.tombstones_held(), 0);
        assert!(context(&x).max_counter("n1.test") > context(&t).max_counter("n1.test"));
        let both = put(&c, stale, Some("y")).await;
        let ApState::Register(o) = both else {
            panic!("register expected")
        };
        assert_eq!(o.values(), vec![b"x".as_slice(), b"y".as_slice()]);
    }

    #[tokio::test]
    async fn a_tombstone_that_changes_between_checks_starts_over_and_other_copies_block() {
        let c = single_node();
        let mut collector = Collector::new(Duration::ZERO);
        let v = put(&c, Context::default(), Some("v")).await;
        let t = put(&c, context(&v), None).await;
        assert_eq!(collector.round(&c, &specs()).await.unwrap(), 0);
        // A second delete changes the tombstone: the next check is a first check again.
        let t2 = put(&c, context(&t), None).await;
        assert_ne!(t, t2);
        assert_eq!(collector.round(&c, &specs()).await.unwrap(), 0);
        // A hint held for another node with an older value blocks collection.
        c.replica.hold_hint(1, "cart", b"k", &v).await.unwrap();
        assert!(!check(&c, &[("cart".into(), b"k".to_vec(), t2.clone())]).unwrap()[0]);
        assert_eq!(collector.round(&c, &specs()).await.unwrap(), 0);
        assert_eq!(collector.round(&c, &specs()).await.unwrap(), 0);
        assert!(c.replica.read("cart", b"k", &[]).unwrap().is_some());
    }

    #[tokio::test]
    async fn lww_stamps_after_collection_stay_above_the_collected_delete() {
        let c = single_node();
        let lww = |v: Option<&'static str>, now: u64| {
            let c = c.clone();
            async move {
                c.replica
                    .update(
                        "cart",
                        b"l",
                        ValueType::Lww,
                        &write(Context::default(), v),
                        &c.actor,
                        now,
                    )
                    .await
                    .unwrap()
                    .state
            }
        };
        lww(Some("a"), 5_000).await;
        let t = lww(None, 5_000).await;
        reap(&c, &[("cart".into(), b"l".to_vec(), t.clone())])
            .await
            .unwrap();
        // This node's clock went back; the new write must still win over a stale copy of
        // the delete that a node which missed the collection may still hold.
        let after = lww(Some("b"), 1_000).await;
        assert_eq!(after.merge(&t), after);
    }
}
