//! The ap coordinator: any node runs reads and writes for any ap key.
//!
//! Write (n, w): the coordinator, if it is one of the key's homes (and neither rebuilding
//! a lost store nor stalled on storage), or else the first reachable home in the key's
//! preference list, issues the new dot and stores the object; the coordinator then sends
//! the object to the other homes. A home that is unreachable (or fails) gets a **hint**
//! instead: the object is held by a fallback node (the next reachable nodes on the ring,
//! or the coordinator itself as the last resort) and handed back when the home is
//! reachable again. The write succeeds once `w` distinct nodes hold it durably (sloppy quorum).
//! If no home replica is reachable at all, a one-time actor issues the dot, so dots
//! stay unique without the home's state (see `ap::dvv`).
//!
//! Read (n, r): ask every reachable home (and, if fewer than `r` are reachable, the
//! fallbacks, which may hold hints), merge the first `r` answers, and answer. Replicas
//! whose answer was behind the merged object are repaired in the background (read repair).
//!
//! With the defaults n=3, r=1, w=1 any live node can answer any request on any side of
//! any partition: it can always be its own fallback.
//!
//! **At most once.** A mutation (an increment, an add, a write with a new dot) is not
//! idempotent: applied by two homes, it counts twice. So the coordinator moves on to the
//! next home only when the request **certainly did not reach** the last one (never sent,
//! or refused); if it may have arrived (a timeout, a lost connection) the outcome is
//! unknown and the answer is `504`: the home applies it once, or never. Storing a whole
//! object (replicas, hints) is idempotent, so those go on as before. `503` only when
//! nothing could have been stored anywhere.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::rt::Instant;

use capkv_core::ApiError;
use tokio::task::JoinSet;

use capkv_core::ValueType;

use super::batch::StoreBatches;
use super::call::{is_refusal, net_err, replica_err, CallError};
use super::dvv::Actor;
use super::local::LocalWrites;
use super::merkle::Leaves;
use super::replica::{Held, Replica, Update};
use super::ring::{key_hash, Ring};
use super::rpc::ApNet;
use super::rpc::{ApHint, ApRead, ApRequest, ApResponse, ApUpdate};
use super::value::{ApState, Applied, Mutation, ReapFloor};
use crate::clock::WallClock;
use crate::cluster::NodeId;
use crate::cluster::REACHABLE_WINDOW;
use crate::message::{ask, Rpc};

/// Hints sent to a home per round of handoff (backpressure: one round at a time).
const HANDOFF_BATCH: usize = 64;
/// Pause between handoff rounds.
const HANDOFF_INTERVAL: Duration = Duration::from_millis(500);
/// How long a read that has only "not yet rebuilt" answers waits for a better one before
/// it takes them as "absent": a few times a loaded round trip.
const REBUILDING_READ_WAIT: Duration = Duration::from_millis(500);

pub struct Coordinator {
    pub me: NodeId,
    pub actor: Actor,
    pub ring: Ring,
    pub transport: Arc<ApNet>,
    pub replica: Arc<Replica>,
    /// The node's wall clock: HLC stamps of `lww` writes, `written_at_ms` of siblings.
    pub clock: Arc<WallClock>,
    /// The anti-entropy leaves, kept up to date by the replica on every change.
    pub leaves: Arc<Leaves>,
    /// Replica copies to other nodes, batched per peer.
    batches: Arc<StoreBatches>,
    /// Client writes this node issues dots for, batched.
    local: Arc<LocalWrites>,
}

impl Coordinator {
    pub fn new(
        me: NodeId,
        actor: Actor,
        ring: Ring,
        transport: Arc<ApNet>,
        replica: Arc<Replica>,
        clock: Arc<WallClock>,
    ) -> Coordinator {
        let leaves = Arc::new(Leaves::new(me, ring.clone()));
        let observer = leaves.clone();
        replica.set_observer(Arc::new(move |ks, k, hash, before, after| {
            observer.changed(ks, k, hash, before, after)
        }));
        Coordinator {
            me,
            actor,
            ring,
            batches: StoreBatches::new(transport.clone()),
            local: LocalWrites::new(replica.clone()),
            transport,
            replica,
            clock,
            leaves,
        }
    }
}

/// A copy of a write (to a home, or as a hint for it) that failed: neither the home nor
/// a fallback holds it from this write; anti-entropy repairs the home later.
fn copy_failed(e: &CallError) {
    metrics::counter!("capkv_ap_copies_failed_total").increment(1);
    tracing::warn!(error = %e, "a replica copy and its hint both failed; anti-entropy will repair the home");
}

impl Coordinator {
    /// Whether `id` is this node or a peer heard from recently.
    pub(super) fn up(&self, id: NodeId) -> bool {
        id == self.me || self.transport.reachable(id, REACHABLE_WINDOW)
    }

    /// Every node of the cluster (the ring's members).
    pub(crate) fn nodes(&self) -> Vec<NodeId> {
        self.ring.nodes().iter().copied().collect()
    }

    async fn call<M: Rpc<Request = ApRequest, Response = ApResponse>>(
        &self,
        to: NodeId,
        m: M,
        deadline: Instant,
    ) -> Result<M::Reply, ApiError> {
        self.call_for_effect(to, m, deadline)
            .await
            .map_err(|e| e.error().clone())
    }

    /// A call whose error says whether the request may have taken effect.
    async fn call_for_effect<M: Rpc<Request = ApRequest, Response = ApResponse>>(
        &self,
        to: NodeId,
        m: M,
        deadline: Instant,
    ) -> Result<M::Reply, CallError> {
        let left = deadline.saturating_duration_since(Instant::now());
        ask(&*self.transport, to, m, left).await.map_err(net_err)
    }

    async fn update_at(
        &self,
        home: NodeId,
        keyspace: &str,
        key: &[u8],
        value_type: ValueType,
        mutation: &Mutation,
        deadline: Instant,
    ) -> Result<Applied, CallError> {
        if home == self.me {
            // Batched with the other writes issued here, in a task of its own: a write
            // waiting on stalled storage blocks the thread it runs on, and the answer
            // must still come at the deadline (504: it may yet be applied, once, when
            // storage moves).
            let write = self.local.submit(Update {
                keyspace: keyspace.to_owned(),
                key: key.to_vec(),
                value_type,
                mutation: mutation.clone(),
                actor: self.actor.clone(),
                now_ms: self.clock.now_ms(),
                deadline: Some(deadline),
            });
            return match tokio::time::timeout_at(deadline, write).await {
                Ok(Ok(r)) => r.map_err(replica_err),
                Ok(Err(_)) => Err(CallError::Unknown(ApiError::internal(
                    "the local write batch stopped before answering",
                ))),
                Err(_) => Err(CallError::Unknown(ApiError::timeout(
                    "the local replica did not finish the write before the deadline",
                ))),
            };
        }
        let req = ApUpdate {
            keyspace: keyspace.to_owned(),
            key: key.to_vec(),
            value_type,
            mutation: mutation.clone(),
            now_ms: self.clock.now_ms(),
            timeout_ms: deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
        };
        self.call_for_effect(home, req, deadline)
            .await?
            .map_err(replica_err)
    }

    /// Applies a write this node issues the dot for, batched with the others
    /// ([`super::local`]); for a peer's `ApUpdate`, whose coordinator keeps the deadline.
    pub async fn apply_here(&self, update: Update) -> Result<Applied, ApiError> {
        self.local.submit(update).await.unwrap_or_else(|_| {
            Err(ApiError::internal(
                "the local write batch stopped before answering",
            ))
        })
    }

    /// Stores `object` on `node`: as its replica if `home` is None, else as a hint for `home`.
    async fn store_at(
        self: Arc<Self>,
        node: NodeId,
        home: Option<NodeId>,
        keyspace: String,
        key: Vec<u8>,
        object: ApState,
        deadline: Instant,
    ) -> Result<(), CallError> {
        if node == self.me {
            return match home {
                None => self
                    .replica
                    .merge(&keyspace, &key, &object)
                    .await
                    .map(|_| ()),
                Some(h) => self.replica.hold_hint(h, &keyspace, &key, &object).await,
            }
            .map_err(replica_err);
        }
        let Some(home) = home else {
            return self
                .batches
                .store(node, (keyspace, key, object), deadline)
                .await;
        };
        let req = ApHint {
            home,
            keyspace,
            key,
            object,
        };
        self.call_for_effect(node, req, deadline)
            .await?
            .map_err(replica_err)
    }

    /// Coordinates a mutation. Returns the state as stored by the replica that applied it,
    /// and a register write's dot.
    #[allow(clippy::too_many_arguments)]
    pub async fn write(
        self: &Arc<Self>,
        keyspace: &str,
        key: &[u8],
        value_type: ValueType,
        mutation: &Mutation,
        n: usize,
        w: usize,
        deadline: Instant,
    ) -> Result<Applied, ApiError> {
        let walk = self.ring.walk(key_hash(keyspace, key));
        let homes: Vec<NodeId> = walk.iter().copied().take(n).collect();
        let mut holders: BTreeSet<NodeId> = BTreeSet::new();

        // 1. A reachable home issues the dot: this node if it is one (as Riak's
        // coordinators do: no hop to another home and back, measured in
        // docs/benchmarks.md), else the first in the preference list. Not this node first
        // while it rebuilds a lost store (a set remove there would remove nothing it never
        // saw) or while its storage is stalled (every write would wait for its disk): then
        // it comes last (found by review). The next one is asked only if the last
        // certainly did not apply it (see the module docs: at most once).
        let mut issued = None;
        let me_first = !self.replica.rebuilding() && !self.replica.storage_stalled();
        let mut issuers: Vec<NodeId> = homes.iter().copied().filter(|h| *h != self.me).collect();
        if homes.contains(&self.me) {
            if me_first {
                issuers.insert(0, self.me);
            } else {
                issuers.push(self.me);
            }
        }
        for h in issuers.into_iter().filter(|h| self.up(*h)) {
            match self
                .update_at(h, keyspace, key, value_type, mutation, deadline)
                .await
            {
                Ok(obj) => {
                    issued = Some((h, obj));
                    break;
                }
                // A refusal (wrong type for this key, an object at its size bound) is
                // the client's answer: nothing was applied.
                Err(CallError::NotApplied(e)) if is_refusal(&e) => return Err(e),
                Err(CallError::NotApplied(e)) => {
                    tracing::debug!(home = h, error = %e, "home replica did not take the write")
                }
                Err(CallError::Unknown(e))
                    if crate::rt::reverted(crate::rt::Revert::ApRetriesMaybeDelivered) =>
                {
                    tracing::debug!(home = h, error = %e, "home replica may have taken the write")
                }
                Err(CallError::Unknown(e)) => {
                    return Err(ApiError::timeout(format!(
                        "home replica {h} may have applied the write ({}); it was not sent \
                         elsewhere, so it takes effect once or not at all",
                        e.message
                    )))
                }
            }
        }
        let applied = match issued {
            Some((h, applied)) => {
                holders.insert(h);
                applied
            }
            None => {
                let one_time = format!("{}~{:016x}", self.actor, crate::rt::random_u64());
                ApState::empty(value_type).apply_above(
                    mutation,
                    &one_time,
                    self.clock.now_ms(),
                    &ReapFloor::default(),
                )?
            }
        };
        let object = applied.state.clone();

        // 2. Every other home gets the object, or a fallback holds it as a hint.
        let fallbacks: Vec<NodeId> = walk
            .iter()
            .copied()
            .skip(n)
            .filter(|f| self.up(*f))
            .collect();
        let mut next_fallback = 0usize;
        let mut pick_fallback = || {
            let f = fallbacks.get(next_fallback).copied().unwrap_or(self.me);
            next_fallback += 1;
            f
        };
        let issued_by_home = !holders.is_empty();
        let mut tasks = JoinSet::new();
        for &h in homes.iter().filter(|h| !holders.contains(h)) {
            let (ks, k, obj) = (keyspace.to_owned(), key.to_vec(), object.clone());
            let this = self.clone();
            if self.up(h) {
                let fallback = pick_fallback();
                tasks.spawn(crate::rt::scoped(async move {
                    match this
                        .clone()
                        .store_at(h, None, ks.clone(), k.clone(), obj.clone(), deadline)
                        .await
                    {
                        Ok(()) => Ok(h),
                        // A home is never its own fallback: a hint held for itself would
                        // never be handed off (handoff goes to other nodes), and it adds
                        // nothing its failed store did not.
                        Err(e) if fallback == h => Err(e),
                        Err(e) => {
                            tracing::debug!(home = h, error = %e, "replica store failed; hinting");
                            let hinted = this
                                .store_at(fallback, Some(h), ks, k, obj, deadline)
                                .await
                                .map(|()| fallback);
                            // If the home may hold it, a refused hint must not turn the
                            // answer into "not applied".
                            match (e, hinted) {
                                (CallError::Unknown(e), Err(CallError::NotApplied(_))) => {
                                    Err(CallError::Unknown(e))
                                }
                                (_, hinted) => hinted,
                            }
                        }
                    }
                }));
            } else {
                let fallback = pick_fallback();
                tasks.spawn(crate::rt::scoped(async move {
                    this.store_at(fallback, Some(h), ks, k, obj, deadline)
                        .await
                        .map(|()| fallback)
                }));
            }
        }
        // Whether some store may have taken effect without confirming it.
        let mut uncertain = false;
        while holders.len() < w {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, tasks.join_next()).await {
                Ok(Some(Ok(Ok(node)))) => {
                    holders.insert(node);
                }
                Ok(Some(Ok(Err(e)))) => {
                    uncertain |= matches!(e, CallError::Unknown(_));
                    copy_failed(&e);
                }
                Ok(Some(Err(e))) => {
                    uncertain = true;
                    tracing::warn!(error = %e, "replication task failed")
                }
                Ok(None) => break,
                Err(_) => {
                    uncertain = true; // stores still running at the deadline
                    break;
                }
            }
        }
        // The rest finish in the background; their outcome no longer changes the answer,
        // but a copy that failed is counted (anti-entropy brings that home up to date).
        crate::rt::spawn(async move {
            while let Some(done) = tasks.join_next().await {
                if let Ok(Err(e)) = done {
                    copy_failed(&e);
                }
            }
        });
        if holders.len() >= w {
            metrics::counter!("capkv_ap_writes_total").increment(1);
            Ok(applied)
        } else if holders.is_empty() && !issued_by_home && !uncertain {
            Err(ApiError::unavailable(format!(
                "no replica could store the write (w={w}); it was not applied"
            )))
        } else if holders.is_empty() {
            Err(ApiError::timeout(format!(
                "no replica confirmed the write (w={w}) before the deadline; it may still take effect"
            )))
        } else {
            Err(ApiError::timeout(format!(
                "only {} of w={w} replicas stored the write before the deadline; it will still propagate",
                holders.len()
            )))
        }
    }

    async fn read_at(
        self: Arc<Self>,
        node: NodeId,
        keyspace: String,
        key: Vec<u8>,
        deadline: Instant,
    ) -> Result<Held, ApiError> {
        if node == self.me {
            return self.replica.held(&keyspace, &key, &self.nodes());
        }
        self.call(node, ApRead { keyspace, key }, deadline).await?
    }

    /// Coordinates a read: the merged object of the first `r` replicas to answer.
    pub async fn read(
        self: &Arc<Self>,
        keyspace: &str,
        key: &[u8],
        n: usize,
        r: usize,
        deadline: Instant,
    ) -> Result<Option<ApState>, ApiError> {
        let walk = self.ring.walk(key_hash(keyspace, key));
        let homes: Vec<NodeId> = walk.iter().copied().take(n).collect();
        let mut targets: Vec<NodeId> = homes.iter().copied().filter(|h| self.up(*h)).collect();
        if targets.len() < r {
            targets.extend(walk.iter().copied().skip(n).filter(|f| self.up(*f)));
        }
        if !targets.contains(&self.me) && targets.len() < r {
            targets.push(self.me); // it may hold hints for this key
        }
        let mut tasks = JoinSet::new();
        for t in targets {
            let this = self.clone();
            let (ks, k) = (keyspace.to_owned(), key.to_vec());
            tasks.spawn(crate::rt::scoped(async move {
                (t, this.read_at(t, ks, k, deadline).await)
            }));
        }
        let mut answers: Vec<(NodeId, Option<ApState>)> = Vec::new();
        // Replicas rebuilding a lost store that lack the key: not an answer while another
        // replica may still give one (Riak's `notfound_ok = false`, for them alone).
        // They are waited past for a bounded time only: a peer that is paused yet still
        // counted reachable would otherwise hold every such read to its deadline (review).
        let mut not_yet_rebuilt: Vec<NodeId> = Vec::new();
        let mut wait_until = deadline;
        while answers.len() < r {
            let left = wait_until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, tasks.join_next()).await {
                Ok(Some(Ok((node, Ok(Held::NotYetRebuilt))))) => {
                    if not_yet_rebuilt.is_empty() {
                        wait_until = deadline.min(Instant::now() + REBUILDING_READ_WAIT);
                    }
                    not_yet_rebuilt.push(node)
                }
                Ok(Some(Ok((node, Ok(held))))) => answers.push((node, held.object())),
                Ok(Some(Ok((node, Err(e))))) => {
                    tracing::debug!(node, error = %e, "replica read failed")
                }
                Ok(Some(Err(e))) => tracing::warn!(error = %e, "read task failed"),
                Ok(None) | Err(_) => break,
            }
        }
        // Nothing better came: their "absent" is the best answer there is.
        while answers.len() < r {
            let Some(node) = not_yet_rebuilt.pop() else {
                break;
            };
            answers.push((node, None));
        }
        if answers.len() < r {
            return Err(ApiError::unavailable(format!(
                "only {} of r={r} replicas answered",
                answers.len()
            )));
        }
        let merged = answers
            .iter()
            .filter_map(|(_, o)| o.clone())
            .reduce(|a, b| a.merge(&b));
        // Read repair, in the background: late answers are merged too, and every home
        // replica that answered with less than the merged object gets it.
        let this = self.clone();
        let (ks, k) = (keyspace.to_owned(), key.to_vec());
        let seen = merged.clone();
        crate::rt::spawn(async move {
            let mut all = answers;
            all.extend(not_yet_rebuilt.into_iter().map(|node| (node, None)));
            while let Some(res) = tasks.join_next().await {
                if let Ok((node, Ok(held))) = res {
                    all.push((node, held.object()));
                }
            }
            let Some(full) = all
                .iter()
                .filter_map(|(_, o)| o.clone())
                .reduce(|a, b| a.merge(&b))
                .or(seen)
            else {
                return;
            };
            for (node, obj) in all {
                let behind = obj.as_ref().is_none_or(|o| !o.dominates(&full));
                if behind && homes.contains(&node) {
                    metrics::counter!("capkv_ap_read_repairs_total").increment(1);
                    let deadline = Instant::now() + Duration::from_secs(2);
                    if let Err(e) = this
                        .clone()
                        .store_at(node, None, ks.clone(), k.clone(), full.clone(), deadline)
                        .await
                    {
                        tracing::debug!(node, error = %e, "read repair failed");
                    }
                }
            }
        });
        if let Some(ApState::Register(o)) = &merged {
            metrics::histogram!("capkv_ap_siblings").record(o.values().len() as f64);
        }
        Ok(merged)
    }

    /// Hands hints back to their homes when they are reachable; runs forever.
    pub async fn handoff_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(HANDOFF_INTERVAL).await;
            if self.replica.hints_held() == 0 {
                continue;
            }
            for home in self
                .nodes()
                .into_iter()
                .filter(|h| *h != self.me && self.up(*h))
            {
                let hints = match self.replica.hints_for(home, HANDOFF_BATCH) {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading hints");
                        continue;
                    }
                };
                for hint in hints {
                    let deadline = Instant::now() + Duration::from_secs(2);
                    let sent = self
                        .clone()
                        .store_at(
                            home,
                            None,
                            hint.keyspace.clone(),
                            hint.key.clone(),
                            hint.object.clone(),
                            deadline,
                        )
                        .await;
                    match sent {
                        Ok(()) => {
                            if let Ok(true) = self.replica.drop_hint_if_unchanged(home, &hint).await
                            {
                                metrics::counter!("capkv_ap_hints_replayed_total").increment(1);
                            }
                        }
                        Err(e) => {
                            tracing::debug!(home, error = %e, "handoff failed; will retry");
                            break;
                        }
                    }
                }
            }
        }
    }
}
