//! The local ap store: this node's replica objects and the hints it holds for others.
//!
//! [`Tree::Ap`]: `keyspace \0 key` → bincode [`ApState`].
//! [`Tree::Hints`]: `home-node (u64 BE) keyspace \0 key` → bincode [`ApState`].
//! [`Tree::Meta`] `ap_reap_floor` → bincode [`ReapFloor`].
//!
//! Every change is a read-merge-write of one key, serialized by a striped lock so two
//! concurrent writes to a key cannot lose each other, and acknowledged only after the
//! group-commit fsync that covers it (an acknowledged ap write is on disk).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use capkv_core::ApiError;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use capkv_core::ValueType;

use super::page::{merge_pages, Page};
use super::ring::key_hash;
use super::value::{ApState, Applied, Mutation, ReapFloor};
use crate::cluster::NodeId;
use crate::codec::{decode, encode};
use crate::storage::{
    off_the_workers, prefix_end, prefix_range_after, Engine, GroupCommit, Tree, WriteBatch,
};

/// Lock stripes for read-merge-write of keys. A stripe is held from the read to the write,
/// not through the fsync that follows: the next writer of the key may read and build on
/// the not-yet-durable state, and its own fsync (which starts after both writes) makes both
/// durable before it answers, so no answered write depends on a lost one. (Holding the
/// stripes of a 256-key batch across its fsync stalled every other ap write on the node:
/// found by review.) For the same reason a write that finds nothing to change still waits
/// for an fsync before it answers: what it found may not be durable yet. A reader may see
/// a write whose fsync has not finished, as it may see any write in flight; a crash then
/// loses it, unanswered, and the node's next start uses a new actor id, so no dot is
/// issued twice.
const STRIPES: usize = 64;
/// Most hints a node holds, by count and by encoded bytes; beyond either it refuses to
/// hold more (the coordinator tries another fallback; anti-entropy repairs the home
/// later), so an outage cannot fill the disk.
pub const HINTS_MAX: u64 = 100_000;
pub const HINT_BYTES_MAX: u64 = 256 << 20;
const FLOOR_KEY: &[u8] = b"ap_reap_floor";
/// Set in [`Tree::Meta`] once [`Tree::ApIndex`] covers every object (a store from before
/// the index has it built at start).
const INDEX_BUILT_KEY: &[u8] = b"ap_index_built";

/// Set in [`Tree::Meta`] while the replica is rebuilding (see [`Replica::rebuilding`]), so
/// a restart in the middle of a rebuild still knows its store is incomplete.
const REBUILDING_KEY: &[u8] = b"ap_rebuilding";

/// What a replica holds of a key, as it answers a read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Held {
    Object(ApState),
    Absent,
    /// Absent from a replica that is rebuilding a lost store: the key may well exist, and
    /// this answer says nothing about it (a read asks another replica).
    NotYetRebuilt,
}

impl Held {
    /// The object, if any: what a read merges (a replica not yet rebuilt holds none).
    pub fn object(self) -> Option<ApState> {
        match self {
            Held::Object(o) => Some(o),
            Held::Absent | Held::NotYetRebuilt => None,
        }
    }
}

/// How long a storage call may wait before this node stops issuing ap writes first
/// ([`Replica::storage_stalled`]): half the default request deadline, and about 4x the
/// slowest fsync measured under load (docs/benchmarks.md).
pub const STORAGE_STALLED: std::time::Duration = std::time::Duration::from_secs(1);

/// Anti-entropy leaves: ranges of the ring hash (its top byte).
pub const LEAVES: usize = 256;

/// The leaf of a ring hash.
pub fn leaf_of(hash: u64) -> usize {
    (hash >> 56) as usize % LEAVES
}

/// The [`Tree::ApIndex`] key of an object: its ring hash, then its storage key.
pub fn index_key(hash: u64, k: &[u8]) -> Vec<u8> {
    let mut ik = Vec::with_capacity(8 + k.len());
    ik.extend_from_slice(&hash.to_be_bytes());
    ik.extend_from_slice(k);
    ik
}

/// Told of every change of a replica object, in storage order, while the change's leaf
/// is read-locked: (keyspace, storage key, ring hash, digest before, digest after).
pub type Observer = Arc<dyn Fn(&str, &[u8], u64, Option<u64>, Option<u64>) + Send + Sync>;

/// An index row as read: (index key, ring hash, storage key, object digest).
pub type IndexEntry = (Vec<u8>, u64, Vec<u8>, u64);

/// One object changed by a write: its keyspace, storage key, ring hash, and digests.
struct Change<'a> {
    keyspace: &'a str,
    k: &'a [u8],
    hash: u64,
    before: Option<u64>,
    after: Option<u64>,
}

pub fn obj_key(keyspace: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(keyspace.len() + 1 + key.len());
    k.extend_from_slice(keyspace.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

fn hint_key(home: NodeId, keyspace: &str, key: &[u8]) -> Vec<u8> {
    let mut k = home.to_be_bytes().to_vec();
    k.extend_from_slice(&obj_key(keyspace, key));
    k
}

/// Splits `keyspace \0 key` (borrowed).
pub fn split_obj_key_ref(k: &[u8]) -> Option<(&str, &[u8])> {
    let zero = k.iter().position(|b| *b == 0)?;
    Some((std::str::from_utf8(&k[..zero]).ok()?, &k[zero + 1..]))
}

/// Splits `keyspace \0 key`.
fn split_obj_key(k: &[u8]) -> Option<(String, Vec<u8>)> {
    let (ks, key) = split_obj_key_ref(k)?;
    Some((ks.to_owned(), key.to_vec()))
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("ap storage: {e}"))
}

/// A client mutation to apply here (see [`Replica::update_many`]).
#[derive(Debug, Clone)]
pub struct Update {
    pub keyspace: String,
    pub key: Vec<u8>,
    pub value_type: ValueType,
    pub mutation: Mutation,
    /// The actor that issues the write's dot.
    pub actor: String,
    pub now_ms: u64,
    /// Refused unapplied if the batch cannot begin before this.
    pub deadline: Option<crate::rt::Instant>,
}

/// One stored object: (keyspace, key, state).
pub type StoredObject = (String, Vec<u8>, ApState);

/// A hint to hand back: which key, and the object held for its home.
pub struct Hint {
    pub keyspace: String,
    pub key: Vec<u8>,
    pub object: ApState,
}

/// The default bound on one ap object's encoded size (see [`Replica::object_bytes_max`]).
pub const OBJECT_BYTES_MAX: usize = 4 << 20;

pub struct Replica {
    engine: Arc<dyn Engine>,
    group_commit: GroupCommit,
    /// A client write that would grow an object (all of a key's siblings, set members or
    /// counter entries) past this many encoded bytes is refused with 413. It bounds what
    /// one write rewrites and what one object weighs in a reply. Merges from other
    /// replicas are never refused (convergence must not depend on it), so an object can
    /// pass the bound only by merging writes made concurrently elsewhere.
    object_bytes_max: usize,
    /// Set when the node stops: client writes are refused from then on.
    stopped: std::sync::atomic::AtomicBool,
    stripes: Vec<Mutex<()>>,
    /// Hints held, and their encoded bytes: reserved before a hint is stored, so
    /// concurrent holds can never pass the bounds together.
    hints: AtomicU64,
    hint_bytes: AtomicU64,
    hint_bytes_max: u64,
    objects: AtomicU64,
    /// Objects that are tombstones (the collector skips its scan while there are none).
    tombstones: AtomicU64,
    /// Raised under a key's stripe lock when the key is collected, read under it by
    /// `update`, so a write to a key always sees the floor its collection left.
    /// An async lock: a collection holds it across its (possibly stalled) write, and a
    /// waiter must yield its worker, never block it.
    floor: Mutex<ReapFloor>,
    /// One per anti-entropy leaf: read-held around a change's storage write and its
    /// observer call, write-held while a leaf is recomputed from the index, so a
    /// recomputed leaf never counts a change twice or misses it.
    leaf_locks: Vec<std::sync::RwLock<()>>,
    observer: std::sync::OnceLock<Observer>,
    /// Set while this replica may lack objects wholesale: it
    /// started with an empty store (a new node, or one whose disk was lost and wiped) and
    /// has not yet finished an anti-entropy exchange of its own with every peer. Until
    /// then "absent" here proves nothing, and reads do not count it as an answer
    /// ([`Held::NotYetRebuilt`]; with r=1, a rebuilding node answered "not found" for 7.5 %
    /// of the keys it had not got back yet: docs/benchmarks.md). Read by every read of a
    /// key the replica lacks: an atomic, never behind a lock that a storage call holds (a
    /// stalled marker delete under a mutex froze a node: review).
    rebuilding: std::sync::atomic::AtomicBool,
    /// The peers synced with since the start (meaningful while rebuilding).
    synced: std::sync::Mutex<std::collections::BTreeSet<NodeId>>,
}

impl Replica {
    pub fn new(engine: Arc<dyn Engine>, group_commit: GroupCommit) -> Result<Replica, ApiError> {
        let hint_rows = engine
            .range(Tree::Hints, b"", None, usize::MAX)
            .map_err(internal)?;
        let held = hint_rows.len() as u64;
        let held_bytes: u64 = hint_rows.iter().map(|(_, v)| v.len() as u64).sum();
        drop(hint_rows);
        // Counted once at start (row by row, whatever the size), then kept up to date on
        // every change; the index is built here if the store predates it.
        let build_index = engine
            .get(Tree::Meta, INDEX_BUILT_KEY)
            .map_err(internal)?
            .is_none();
        let (mut objects, mut tombstones) = (0u64, 0u64);
        let mut index = WriteBatch::new();
        let view = engine.read_view(Tree::Ap).map_err(internal)?;
        for row in view.iter_from(b"") {
            let (k, raw) = row.map_err(internal)?;
            let state: ApState = decode(&raw).map_err(internal)?;
            objects += 1;
            tombstones += u64::from(state.is_tombstone());
            if build_index {
                let (ks, key) = split_obj_key(&k).ok_or_else(|| internal("bad object key"))?;
                index.put(
                    Tree::ApIndex,
                    index_key(key_hash(&ks, &key), &k),
                    state.digest().to_be_bytes().to_vec(),
                );
                if index.len() >= 4096 {
                    engine.write(std::mem::take(&mut index)).map_err(internal)?;
                }
            }
        }
        drop(view);
        if build_index {
            index.put(Tree::Meta, INDEX_BUILT_KEY.to_vec(), Vec::new());
            engine.write(index).map_err(internal)?;
            engine.sync().map_err(internal)?;
        }
        let floor = match engine.get(Tree::Meta, FLOOR_KEY).map_err(internal)? {
            Some(raw) => decode(&raw).map_err(internal)?,
            None => ReapFloor::default(),
        };
        let rebuilding = objects == 0
            || engine
                .get(Tree::Meta, REBUILDING_KEY)
                .map_err(internal)?
                .is_some();
        if rebuilding {
            let mut b = WriteBatch::new();
            b.put(Tree::Meta, REBUILDING_KEY.to_vec(), Vec::new());
            engine.write(b).map_err(internal)?;
            engine.sync().map_err(internal)?;
        }
        metrics::gauge!("capkv_ap_rebuilding").set(if rebuilding { 1.0 } else { 0.0 });
        metrics::gauge!("capkv_ap_hints_queued").set(held as f64);
        metrics::gauge!("capkv_ap_objects").set(objects as f64);
        metrics::gauge!("capkv_ap_tombstones").set(tombstones as f64);
        Ok(Replica {
            engine,
            group_commit,
            object_bytes_max: OBJECT_BYTES_MAX,
            stopped: std::sync::atomic::AtomicBool::new(false),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hints: AtomicU64::new(held),
            hint_bytes: AtomicU64::new(held_bytes),
            hint_bytes_max: HINT_BYTES_MAX,
            objects: AtomicU64::new(objects),
            tombstones: AtomicU64::new(tombstones),
            floor: Mutex::new(floor),
            leaf_locks: (0..LEAVES).map(|_| std::sync::RwLock::new(())).collect(),
            observer: std::sync::OnceLock::new(),
            rebuilding: std::sync::atomic::AtomicBool::new(rebuilding),
            synced: std::sync::Mutex::new(Default::default()),
        })
    }

    /// Whether storage has had a call waiting for [`STORAGE_STALLED`] or longer with none
    /// of its kind finishing: a write issued here would wait for the disk.
    pub fn storage_stalled(&self) -> bool {
        self.engine.stall().is_some_and(|d| d >= STORAGE_STALLED)
    }

    /// Whether this replica may still lack objects wholesale (see the field).
    pub fn rebuilding(&self) -> bool {
        self.rebuilding.load(Ordering::SeqCst)
    }

    /// Records that an anti-entropy exchange this node drove with `peer` finished: every
    /// object `peer` held in the ranges they share as it began is now merged here. Once
    /// that is true of every one of `peers`, the replica is rebuilt.
    /// Called by one task at a time (the anti-entropy loop).
    pub fn synced_with(&self, peer: NodeId, peers: &[NodeId]) -> Result<(), ApiError> {
        if !self.rebuilding() {
            return Ok(());
        }
        let done = {
            let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
            synced.insert(peer);
            peers.iter().all(|p| synced.contains(p))
        };
        if done {
            let mut b = WriteBatch::new();
            b.delete(Tree::Meta, REBUILDING_KEY.to_vec());
            // Not synced: should the deletion be lost, the next start rebuilds again.
            self.engine.write(b).map_err(internal)?;
            self.rebuilding.store(false, Ordering::SeqCst);
            metrics::gauge!("capkv_ap_rebuilding").set(0.0);
            tracing::info!("ap replica rebuilt: synced with every peer since it started empty");
        }
        Ok(())
    }

    /// Refuses client writes from now on and waits until none is in progress (each holds
    /// its key's stripe until it is stored and fsynced).
    pub async fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        for stripe in &self.stripes {
            drop(stripe.lock().await);
        }
    }

    /// Sets the bound on hint bytes (default [`HINT_BYTES_MAX`]).
    pub fn with_hint_bytes_max(mut self, bytes: u64) -> Replica {
        self.hint_bytes_max = bytes;
        self
    }

    /// Forgets a hint of `bytes` encoded bytes (dropped, or its reservation undone).
    fn release_hint(&self, bytes: u64) {
        let n = self.hints.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        self.shrink_hint_bytes(bytes);
        metrics::gauge!("capkv_ap_hints_queued").set(n as f64);
    }

    /// Saturating: the sizes counted at start are of the bytes stored, which an older
    /// storage format may have made a little different from today's encoding.
    fn shrink_hint_bytes(&self, bytes: u64) {
        let _ = self
            .hint_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(bytes))
            });
    }

    /// Sets the object size bound (default [`OBJECT_BYTES_MAX`]).
    pub fn with_object_bytes_max(mut self, bytes: usize) -> Replica {
        self.object_bytes_max = bytes;
        self
    }

    fn stripe_index(&self, k: &[u8]) -> usize {
        (super::ring::hash64(k) % STRIPES as u64) as usize
    }

    fn stripe(&self, k: &[u8]) -> &Mutex<()> {
        &self.stripes[self.stripe_index(k)]
    }

    fn load(&self, tree: Tree, k: &[u8]) -> Result<Option<ApState>, ApiError> {
        match self.engine.get(tree, k).map_err(internal)? {
            None => Ok(None),
            Some(raw) => decode(&raw).map(Some).map_err(internal),
        }
    }

    /// Keeps the object and tombstone counts (and their gauges) up to date after the
    /// replica of a key went from `before` to `after` (`None`: absent).
    fn account(&self, before: Option<&ApState>, after: Option<&ApState>) {
        fn adjust(counter: &AtomicU64, gauge: &'static str, before: bool, after: bool) {
            let n = match (before, after) {
                (false, true) => counter.fetch_add(1, Ordering::Relaxed) + 1,
                (true, false) => counter.fetch_sub(1, Ordering::Relaxed).saturating_sub(1),
                _ => return,
            };
            metrics::gauge!(gauge).set(n as f64);
        }
        adjust(
            &self.objects,
            "capkv_ap_objects",
            before.is_some(),
            after.is_some(),
        );
        let tomb = |s: Option<&ApState>| s.is_some_and(ApState::is_tombstone);
        adjust(
            &self.tombstones,
            "capkv_ap_tombstones",
            tomb(before),
            tomb(after),
        );
    }

    /// Tells `observer` of every object change from now on (set once, at start).
    pub fn set_observer(&self, observer: Observer) {
        let _ = self.observer.set(observer);
    }

    /// Writes `b` (which puts or deletes the objects of `changes`) with their index
    /// entries, under the read locks of their leaves, and tells the observer before the
    /// locks go. Not durable until a group-commit sync.
    fn write_changes(&self, mut b: WriteBatch, changes: &[Change]) -> Result<(), ApiError> {
        for c in changes {
            let ik = index_key(c.hash, c.k);
            match c.after {
                Some(d) => b.put(Tree::ApIndex, ik, d.to_be_bytes().to_vec()),
                None => b.delete(Tree::ApIndex, ik),
            }
        }
        let mut leaves: Vec<usize> = changes.iter().map(|c| leaf_of(c.hash)).collect();
        leaves.sort_unstable();
        leaves.dedup();
        let guards: Vec<_> = leaves
            .iter()
            .map(|l| {
                self.leaf_locks[*l]
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
            })
            .collect();
        self.engine.write(b).map_err(internal)?;
        if let Some(observe) = self.observer.get() {
            for c in changes {
                observe(c.keyspace, c.k, c.hash, c.before, c.after);
            }
        }
        drop(guards);
        Ok(())
    }

    /// Writes `obj` as the replica of a key (not yet durable: see `group_commit`).
    fn write_object(
        &self,
        keyspace: &str,
        key: &[u8],
        k: &[u8],
        before: Option<&ApState>,
        obj: &ApState,
    ) -> Result<(), ApiError> {
        let mut b = WriteBatch::new();
        b.put(Tree::Ap, k.to_vec(), encode(obj));
        let change = Change {
            keyspace,
            k,
            hash: key_hash(keyspace, key),
            before: before.map(ApState::digest),
            after: Some(obj.digest()),
        };
        self.write_changes(b, &[change])
    }

    /// The index entries of `leaf`, (ring hash, storage key, digest), read while the
    /// leaf is write-locked, and `f` of them before the lock goes (a leaf recomputed
    /// this way agrees with the changes observed before and after).
    pub fn with_leaf<T>(
        &self,
        leaf: usize,
        f: impl FnOnce(Vec<(u64, Vec<u8>, u64)>) -> T,
    ) -> Result<T, ApiError> {
        let _guard = self.leaf_locks[leaf % LEAVES]
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let mut entries = Vec::new();
        let mut after = None;
        loop {
            let page = self.leaf_entries(leaf, after.as_deref(), 4096)?;
            let more = page.len() == 4096;
            for (ik, hash, k, digest) in page {
                entries.push((hash, k, digest));
                after = Some(ik);
            }
            if !more {
                break;
            }
        }
        Ok(f(entries))
    }

    /// Index rows of `leaf` after `after` (an index key, exclusive), in index order: at
    /// most `limit` of them.
    pub fn leaf_entries(
        &self,
        leaf: usize,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<IndexEntry>, ApiError> {
        let leaf = leaf % LEAVES;
        let start = match after {
            Some(a) => {
                let mut s = a.to_vec();
                s.push(0);
                s
            }
            None => ((leaf as u64) << 56).to_be_bytes().to_vec(),
        };
        let end = (leaf + 1 < LEAVES).then(|| (((leaf + 1) as u64) << 56).to_be_bytes().to_vec());
        let rows = self
            .engine
            .range(Tree::ApIndex, &start, end.as_deref(), limit)
            .map_err(internal)?;
        rows.into_iter()
            .map(|(ik, digest)| {
                let hash = u64::from_be_bytes(
                    ik.get(..8)
                        .and_then(|h| h.try_into().ok())
                        .ok_or_else(|| internal("bad index key"))?,
                );
                let digest = u64::from_be_bytes(
                    digest
                        .as_slice()
                        .try_into()
                        .map_err(|_| internal("bad index digest"))?,
                );
                let k = ik[8..].to_vec();
                Ok((ik, hash, k, digest))
            })
            .collect()
    }

    /// The object stored under a storage key.
    pub fn object(&self, k: &[u8]) -> Result<Option<ApState>, ApiError> {
        self.load(Tree::Ap, k)
    }

    /// This node's replica of a key merged with the hints it holds for that key for any
    /// of `nodes` (point reads: hints are keyed by home first).
    pub fn read(
        &self,
        keyspace: &str,
        key: &[u8],
        nodes: &[NodeId],
    ) -> Result<Option<ApState>, ApiError> {
        let mut found = self.load(Tree::Ap, &obj_key(keyspace, key))?;
        for home in nodes {
            if let Some(h) = self.load(Tree::Hints, &hint_key(*home, keyspace, key))? {
                found = Some(found.map_or_else(|| h.clone(), |f| f.merge(&h)));
            }
        }
        Ok(found)
    }

    /// [`Replica::read`] as a read's answer: an absent key is [`Held::NotYetRebuilt`]
    /// while the replica is rebuilding.
    pub fn held(&self, keyspace: &str, key: &[u8], nodes: &[NodeId]) -> Result<Held, ApiError> {
        Ok(match self.read(keyspace, key, nodes)? {
            Some(o) => Held::Object(o),
            None if self.rebuilding() => Held::NotYetRebuilt,
            None => Held::Absent,
        })
    }

    /// A client mutation coordinated here as `actor`: applied to the local replica (an
    /// empty state of `value_type` if the key is new) and stored durably. Returns the new
    /// state and, for a register write, its dot.
    pub async fn update(
        &self,
        keyspace: &str,
        key: &[u8],
        value_type: ValueType,
        mutation: &Mutation,
        actor: &str,
        now_ms: u64,
    ) -> Result<Applied, ApiError> {
        self.update_until(keyspace, key, value_type, mutation, actor, now_ms, None)
            .await
    }

    /// [`Replica::update`], refused (503, nothing applied) if it cannot begin before
    /// `deadline`: a write whose coordinator has given up is never applied late (it
    /// may already be answered 504, or tried at another home).
    #[allow(clippy::too_many_arguments)]
    pub async fn update_until(
        &self,
        keyspace: &str,
        key: &[u8],
        value_type: ValueType,
        mutation: &Mutation,
        actor: &str,
        now_ms: u64,
        deadline: Option<crate::rt::Instant>,
    ) -> Result<Applied, ApiError> {
        let update = Update {
            keyspace: keyspace.to_owned(),
            key: key.to_vec(),
            value_type,
            mutation: mutation.clone(),
            actor: actor.to_owned(),
            now_ms,
            deadline,
        };
        self.update_many(vec![update])
            .await
            .pop()
            .unwrap_or_else(|| Err(internal("an update batch lost its only answer")))
    }

    /// Client mutations coordinated here, applied together: their stripes taken at once
    /// (in stripe order, as `merge_many`), read, changed and written in one storage
    /// batch, one stretch off the async workers and one fsync (#9 item 4: one of each per
    /// write had made an ap write cost 1.45x a cp write, whose Raft entries carry up to 256
    /// commands). One answer per update, in order. An update is refused alone, unapplied,
    /// if its deadline passed before the batch could begin (see [`Replica::update_until`]),
    /// if it is of the wrong type or would pass the object bound; a key written twice in
    /// a batch is changed twice, in order, as two writes one after the other.
    pub async fn update_many(&self, updates: Vec<Update>) -> Vec<Result<Applied, ApiError>> {
        let late = || {
            metrics::counter!("capkv_ap_late_writes_refused_total").increment(1);
            ApiError::unavailable(
                "the write's deadline passed before this replica could apply it; not applied",
            )
        };
        let coming = self.group_commit.coming();
        let keys: Vec<Vec<u8>> = updates
            .iter()
            .map(|u| obj_key(&u.keyspace, &u.key))
            .collect();
        let mut stripes: Vec<usize> = keys.iter().map(|k| self.stripe_index(k)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        // Waited for no longer than the latest deadline (an update whose own deadline
        // passes meanwhile is refused below).
        let wait_until = updates
            .iter()
            .map(|u| u.deadline)
            .try_fold(None, |latest: Option<crate::rt::Instant>, d| {
                d.map(|d| Some(latest.map_or(d, |l| l.max(d))))
            })
            .flatten();
        let lock_all = async {
            let mut guards = Vec::with_capacity(stripes.len());
            for i in &stripes {
                guards.push(self.stripes[*i].lock().await);
            }
            guards
        };
        let guards = match wait_until {
            Some(d) => match tokio::time::timeout_at(d, lock_all).await {
                Ok(g) => g,
                Err(_) => return updates.iter().map(|_| Err(late())).collect(),
            },
            None => lock_all.await,
        };
        if self.stopped.load(Ordering::SeqCst) {
            return updates
                .iter()
                .map(|_| {
                    Err(ApiError::unavailable(
                        "this node is shutting down; the write was not applied",
                    ))
                })
                .collect();
        }
        let floor = *self.floor.lock().await;
        let now = crate::rt::Instant::now();
        // The reads, the changes and the write in one stretch off the async workers: each
        // storage call alone would hand the worker's tasks to another thread (measured:
        // those hand-offs were half the CPU of an ap write).
        type Written = (Option<ApState>, ApState);
        let outcome = off_the_workers(|| {
            // Per key: the state before the batch and the state now.
            let mut states: std::collections::BTreeMap<&[u8], Written> = Default::default();
            let mut answers = Vec::with_capacity(updates.len());
            for (u, k) in updates.iter().zip(&keys) {
                if u.deadline.is_some_and(|d| now >= d) {
                    answers.push(Err(late()));
                    continue;
                }
                let current = match states.get(k.as_slice()) {
                    Some((_, now)) => Some(now.clone()),
                    None => self.load(Tree::Ap, k)?,
                };
                let base = current
                    .clone()
                    .unwrap_or_else(|| ApState::empty(u.value_type));
                let applied = match base.apply_above(&u.mutation, &u.actor, u.now_ms, &floor) {
                    Ok(a) => a,
                    Err(e) => {
                        answers.push(Err(e));
                        continue;
                    }
                };
                let size = encode(&applied.state).len();
                if size > self.object_bytes_max && size > encode(&base).len() {
                    crate::limits::hit("ap_object_bytes");
                    answers.push(Err(ApiError::too_large(format!(
                        "this write would make the object {size} bytes; an ap object (all of \
                         a key's values, siblings or set members) is at most {} bytes. \
                         Resolve siblings or remove set members first, or spread the data \
                         over more keys",
                        self.object_bytes_max
                    ))));
                    continue;
                }
                let before = match states.remove(k.as_slice()) {
                    Some((before, _)) => before,
                    None => current,
                };
                states.insert(k, (before, applied.state.clone()));
                answers.push(Ok(applied));
            }
            if !states.is_empty() {
                let mut b = WriteBatch::new();
                let mut changes = Vec::with_capacity(states.len());
                for (k, (before, after)) in &states {
                    b.put(Tree::Ap, k.to_vec(), encode(after));
                    let (ks, key) =
                        split_obj_key_ref(k).ok_or_else(|| internal("bad object key"))?;
                    changes.push(Change {
                        keyspace: ks,
                        k,
                        hash: key_hash(ks, key),
                        before: before.as_ref().map(ApState::digest),
                        after: Some(after.digest()),
                    });
                }
                self.write_changes(b, &changes)?;
            }
            let accounted: Vec<Written> = states.into_values().collect();
            Ok::<_, ApiError>((answers, accounted))
        });
        // The keys are free again before the fsync (see `STRIPES`).
        drop(guards);
        let (answers, accounted) = match outcome {
            Ok(o) => o,
            Err(e) => return updates.iter().map(|_| Err(e.clone())).collect(),
        };
        if !accounted.is_empty() {
            if let Err(e) = self.group_commit.sync_coming(coming).await {
                // The writes may or may not be durable; the refusals stay refusals.
                let e = internal(e);
                return answers
                    .into_iter()
                    .map(|a| a.and_then(|_| Err(e.clone())))
                    .collect();
            }
        }
        for (before, after) in &accounted {
            self.account(before.as_ref(), Some(after));
        }
        answers
    }

    /// Merges an object from elsewhere into the local replica; returns the result and
    /// whether the local replica changed.
    pub async fn merge(
        &self,
        keyspace: &str,
        key: &[u8],
        incoming: &ApState,
    ) -> Result<(ApState, bool), ApiError> {
        let k = obj_key(keyspace, key);
        let guard = self.stripe(&k).lock().await;
        let (current, next, changed) = off_the_workers(|| {
            let current = self.load(Tree::Ap, &k)?;
            let next = current
                .as_ref()
                .map_or_else(|| incoming.clone(), |c| c.merge(incoming));
            let changed = current.as_ref() != Some(&next);
            if changed {
                self.write_object(keyspace, key, &k, current.as_ref(), &next)?;
            }
            Ok::<_, ApiError>((current, next, changed))
        })?;
        drop(guard);
        // Even when nothing changed: the state found may be another writer's, written
        // but not yet fsynced (stripes are released before the fsync), and this answer
        // says the object is stored here.
        self.group_commit.sync().await.map_err(internal)?;
        if changed {
            self.account(current.as_ref(), Some(&next));
        }
        Ok((next, changed))
    }

    /// [`Replica::merge`] for many objects at once: one storage batch and one fsync for
    /// all of them (anti-entropy repairs a page at a time). Returns how many keys the
    /// local replica changed. The stripes of all the keys are held together, taken in
    /// stripe order so two batches never wait on each other in a cycle.
    pub async fn merge_many(&self, incoming: Vec<StoredObject>) -> Result<u64, ApiError> {
        let coming = self.group_commit.coming();
        let mut stripes: Vec<usize> = incoming
            .iter()
            .map(|(ks, key, _)| self.stripe_index(&obj_key(ks, key)))
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for i in stripes {
            guards.push(self.stripes[i].lock().await);
        }
        // Before and after of each key that changes (a key may come twice in a batch),
        // with its keyspace and ring hash. Read, merged and written in one stretch off the
        // async workers (see `update_until`).
        type Changed = (Option<ApState>, ApState, String, u64);
        let changes = off_the_workers(|| {
            let mut changes: std::collections::BTreeMap<Vec<u8>, Changed> =
                std::collections::BTreeMap::new();
            for (ks, key, state) in incoming {
                let k = obj_key(&ks, &key);
                let (before, current, hash) = match changes.remove(&k) {
                    Some((before, current, _, hash)) => (before, Some(current), hash),
                    None => {
                        let stored = self.load(Tree::Ap, &k)?;
                        (stored.clone(), stored, key_hash(&ks, &key))
                    }
                };
                let next = current
                    .as_ref()
                    .map_or_else(|| state.clone(), |c| c.merge(&state));
                if before.as_ref() != Some(&next) {
                    changes.insert(k, (before, next, ks, hash));
                }
            }
            if changes.is_empty() {
                return Ok(changes);
            }
            let mut b = WriteBatch::new();
            let mut observed = Vec::with_capacity(changes.len());
            for (k, (before, next, ks, hash)) in &changes {
                b.put(Tree::Ap, k.clone(), encode(next));
                observed.push(Change {
                    keyspace: ks,
                    k,
                    hash: *hash,
                    before: before.as_ref().map(ApState::digest),
                    after: Some(next.digest()),
                });
            }
            self.write_changes(b, &observed)?;
            Ok::<_, ApiError>(changes)
        })?;
        drop(guards);
        // Even when nothing changed (see `merge`).
        self.group_commit
            .sync_coming(coming)
            .await
            .map_err(internal)?;
        for (before, next, _, _) in changes.values() {
            self.account(before.as_ref(), Some(next));
        }
        Ok(changes.len() as u64)
    }

    /// Holds an object for `home` until it is reachable again. Refused (503, nothing
    /// stored) when the hints held would pass [`HINTS_MAX`] or the byte bound.
    pub async fn hold_hint(
        &self,
        home: NodeId,
        keyspace: &str,
        key: &[u8],
        incoming: &ApState,
    ) -> Result<(), ApiError> {
        let k = hint_key(home, keyspace, key);
        let _guard = self.stripe(&k).lock().await;
        let current = self.load(Tree::Hints, &k)?;
        let next = current
            .as_ref()
            .map_or_else(|| incoming.clone(), |c| c.merge(incoming));
        let raw = encode(&next);
        let (old_bytes, new_bytes) = (
            current.as_ref().map_or(0, |c| encode(c).len() as u64),
            raw.len() as u64,
        );
        // Reserve first (count and bytes), then check: two holds can never both fit
        // into the last free place.
        let grow = new_bytes.saturating_sub(old_bytes);
        let count_before = if current.is_none() {
            self.hints.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        let bytes_before = self.hint_bytes.fetch_add(grow, Ordering::Relaxed);
        let undo = || {
            self.hint_bytes.fetch_sub(grow, Ordering::Relaxed);
            if current.is_none() {
                self.hints.fetch_sub(1, Ordering::Relaxed);
            }
        };
        if count_before >= HINTS_MAX || bytes_before + grow > self.hint_bytes_max {
            undo();
            return Err(ApiError::unavailable(format!(
                "this node already holds as many hints as it may ({HINTS_MAX} hints, {} bytes)",
                self.hint_bytes_max
            )));
        }
        let mut b = WriteBatch::new();
        b.put(Tree::Hints, k, raw);
        let stored = match self.engine.write(b) {
            Ok(()) => self.group_commit.sync().await.map_err(internal),
            Err(e) => {
                undo(); // certainly not written
                return Err(internal(e));
            }
        };
        if new_bytes < old_bytes {
            self.shrink_hint_bytes(old_bytes - new_bytes);
        }
        metrics::gauge!("capkv_ap_hints_queued").set(self.hints.load(Ordering::Relaxed) as f64);
        stored
    }

    /// Up to `limit` hints held for `home`.
    pub fn hints_for(&self, home: NodeId, limit: usize) -> Result<Vec<Hint>, ApiError> {
        let start = home.to_be_bytes();
        let end = prefix_end(&start);
        let rows = self
            .engine
            .range(Tree::Hints, &start, end.as_deref(), limit)
            .map_err(internal)?;
        rows.into_iter()
            .map(|(k, v)| {
                let (keyspace, key) =
                    split_obj_key(&k[8..]).ok_or_else(|| internal("bad hint key"))?;
                Ok(Hint {
                    keyspace,
                    key,
                    object: decode(&v).map_err(internal)?,
                })
            })
            .collect()
    }

    /// Drops a hint once its home has it, unless it changed since it was sent.
    pub async fn drop_hint_if_unchanged(
        &self,
        home: NodeId,
        hint: &Hint,
    ) -> Result<bool, ApiError> {
        let k = hint_key(home, &hint.keyspace, &hint.key);
        let _guard = self.stripe(&k).lock().await;
        if self.load(Tree::Hints, &k)?.as_ref() != Some(&hint.object) {
            return Ok(false);
        }
        let mut b = WriteBatch::new();
        b.delete(Tree::Hints, k);
        self.engine.write(b).map_err(internal)?;
        self.release_hint(encode(&hint.object).len() as u64);
        Ok(true)
    }

    /// Entries of `tree` with `start <= key < end`, in key order: at most `limit`, and
    /// no more once they pass [`PAGE_BYTES_MAX`](crate::cluster::PAGE_BYTES_MAX) bytes (read
    /// in small chunks, so large objects never load by the thousand). Also returns
    /// whether more may follow.
    fn range_bounded(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<crate::storage::Entry>, bool), ApiError> {
        const CHUNK: usize = 16;
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut from = start.to_vec();
        loop {
            let want = (limit - out.len()).min(CHUNK);
            if want == 0 {
                return Ok((out, true));
            }
            let rows = self
                .engine
                .range(tree, &from, end, want)
                .map_err(internal)?;
            let got = rows.len();
            for (k, v) in rows {
                bytes += k.len() + v.len();
                from = k.clone();
                from.push(0);
                out.push((k, v));
            }
            if got < want {
                return Ok((out, false));
            }
            if bytes > crate::cluster::PAGE_BYTES_MAX {
                return Ok((out, true));
            }
        }
    }

    /// Objects this replica holds, in key order, starting after `after` (exclusive): at
    /// most `limit`, and about [`PAGE_BYTES_MAX`](crate::cluster::PAGE_BYTES_MAX) bytes;
    /// and whether more may follow.
    pub fn objects(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<StoredObject>, bool), ApiError> {
        let start = match after {
            Some(a) => {
                let mut s = a.to_vec();
                s.push(0);
                s
            }
            None => Vec::new(),
        };
        let (rows, more) = self.range_bounded(Tree::Ap, &start, None, limit)?;
        let objects = rows
            .into_iter()
            .map(|(k, v)| {
                let (ks, key) = split_obj_key(&k).ok_or_else(|| internal("bad object key"))?;
                Ok((ks, key, decode(&v).map_err(internal)?))
            })
            .collect::<Result<_, ApiError>>()?;
        Ok((objects, more))
    }

    /// This node's copies (replica merged with hints for any of `homes`) of the keys of
    /// `keyspace` with `prefix`, after `after`: a page for [`merge_pages`], cut short
    /// (and marked so) at `limit` keys or
    /// [`PAGE_BYTES_MAX`](crate::cluster::PAGE_BYTES_MAX) bytes.
    pub fn scan(
        &self,
        keyspace: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        homes: &[NodeId],
    ) -> Result<(Page, bool), ApiError> {
        let (start, end) = prefix_range_after(
            obj_key(keyspace, prefix),
            after.map(|a| obj_key(keyspace, a)),
        );
        // One page per source: the replica, then the hints held for each home (keyed by
        // home first). A source that filled `limit` may hold more.
        let page = |tree: Tree, head: &[u8]| -> Result<(Page, bool), ApiError> {
            let with_head = |k: &[u8]| [head, k].concat();
            let (rows, truncated) = self.range_bounded(
                tree,
                &with_head(&start),
                end.as_deref().map(with_head).as_deref(),
                limit,
            )?;
            let page = rows
                .into_iter()
                .map(|(k, v)| {
                    let key = k[head.len() + keyspace.len() + 1..].to_vec();
                    Ok((key, decode(&v).map_err(internal)?))
                })
                .collect::<Result<Page, ApiError>>()?;
            Ok((page, truncated))
        };
        let mut pages = vec![page(Tree::Ap, &[])?];
        for home in homes {
            pages.push(page(Tree::Hints, &home.to_be_bytes())?);
        }
        Ok(merge_pages(pages, limit))
    }

    /// Whether every copy of a key this node holds (its replica, and hints for any of
    /// `homes`) is exactly `tombstone`, or absent.
    pub fn holds_only(
        &self,
        keyspace: &str,
        key: &[u8],
        tombstone: &ApState,
        homes: &[NodeId],
    ) -> Result<bool, ApiError> {
        let mut copies = vec![obj_key(keyspace, key)];
        copies.extend(homes.iter().map(|h| hint_key(*h, keyspace, key)));
        for (i, k) in copies.iter().enumerate() {
            let tree = if i == 0 { Tree::Ap } else { Tree::Hints };
            if self.load(tree, k)?.is_some_and(|c| &c != tombstone) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Collects a tombstone every node confirmed holding (or not holding at all): drops
    /// this node's copies that still equal it, and raises the floor above it for `actor`
    /// (also when this node held no copy) in the same durable batch. Returns how many
    /// copies were dropped; a copy that changed since the check is kept (it is newer).
    pub async fn reap(
        &self,
        keyspace: &str,
        key: &[u8],
        tombstone: &ApState,
        homes: &[NodeId],
        actor: &str,
    ) -> Result<u64, ApiError> {
        if !tombstone.is_tombstone() {
            return Err(ApiError::bad_request("only tombstones are collected"));
        }
        let mut dropped = 0;
        {
            let k = obj_key(keyspace, key);
            let _guard = self.stripe(&k).lock().await;
            let held = self.load(Tree::Ap, &k)?.as_ref() == Some(tombstone);
            let mut b = WriteBatch::new();
            if held {
                b.delete(Tree::Ap, k);
            }
            // Held across the write so concurrent collections of other keys each raise it.
            let mut floor = self.floor.lock().await;
            let mut next = *floor;
            next.cover(tombstone, actor);
            b.put(Tree::Meta, FLOOR_KEY.to_vec(), encode(&next));
            let dropped_copy = Change {
                keyspace,
                k: &obj_key(keyspace, key),
                hash: key_hash(keyspace, key),
                before: Some(tombstone.digest()),
                after: None,
            };
            if held {
                self.write_changes(b, &[dropped_copy])?;
            } else {
                self.engine.write(b).map_err(internal)?;
            }
            *floor = next;
            drop(floor);
            if held {
                dropped += 1;
                self.account(Some(tombstone), None);
            }
        }
        // Hints are under their own stripes (taken after the replica's is released: a
        // stripe lock is not reentrant). A hint that still equals the tombstone goes.
        for home in homes {
            let hk = hint_key(*home, keyspace, key);
            let _hint_guard = self.stripe(&hk).lock().await;
            if self.load(Tree::Hints, &hk)?.as_ref() == Some(tombstone) {
                let mut b = WriteBatch::new();
                b.delete(Tree::Hints, hk);
                self.engine.write(b).map_err(internal)?;
                self.release_hint(encode(tombstone).len() as u64);
                dropped += 1;
            }
        }
        self.group_commit.sync().await.map_err(internal)?;
        Ok(dropped)
    }

    /// How many of this replica's objects are tombstones.
    pub fn tombstones_held(&self) -> u64 {
        self.tombstones.load(Ordering::Relaxed)
    }

    pub fn hints_held(&self) -> u64 {
        self.hints.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryEngine;

    fn replica() -> Replica {
        let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        Replica::new(engine.clone(), GroupCommit::start(engine)).unwrap()
    }

    /// #8 item 15: a write that would grow an object past the bound is refused (413) and
    /// changes nothing; a write that shrinks it is taken; merges are never refused.
    #[tokio::test]
    async fn objects_are_bounded_in_bytes() {
        let r = replica().with_object_bytes_max(4096);
        let add = |m: String| Mutation::Insert { members: vec![m] };
        let mut added = Vec::new();
        let refused = loop {
            let m = format!("{:0>500}", added.len());
            match r
                .update("s", b"k", ValueType::Set, &add(m.clone()), "n1.x", 1)
                .await
            {
                Ok(_) => added.push(m),
                Err(e) => break e,
            }
            assert!(added.len() < 100, "never refused");
        };
        assert_eq!(refused.code, capkv_core::ErrorCode::TooLarge, "{refused:?}");
        assert!(refused.message.contains("4096"), "{}", refused.message);
        let before = r.read("s", b"k", &[]).unwrap().unwrap();
        assert!(encode(&before).len() <= 4096);
        let ApState::Set(set) = &before else { panic!() };
        assert_eq!(
            set.read().val.len(),
            added.len(),
            "the refused add left no trace"
        );
        // Removing shrinks the object: taken, and then adding fits again.
        let remove = Mutation::Remove {
            members: vec![added[0].clone()],
        };
        r.update("s", b"k", ValueType::Set, &remove, "n1.x", 2)
            .await
            .unwrap();
        r.update("s", b"k", ValueType::Set, &add("x".into()), "n1.x", 3)
            .await
            .unwrap();
        // A replica's merge is never refused, whatever the size.
        let big = replica();
        let grown = big
            .update("s", b"k", ValueType::Set, &add("y".repeat(8000)), "n2.y", 1)
            .await
            .unwrap()
            .state
            .merge(&r.read("s", b"k", &[]).unwrap().unwrap());
        let (merged, changed) = r.merge("s", b"k", &grown).await.unwrap();
        assert!(changed && encode(&merged).len() > 4096);
    }

    /// #8 item 16: hints are bounded in bytes, and concurrent holds reserve before they
    /// store, so together they never pass the bound; a dropped hint frees its room.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hints_are_bounded_in_bytes_even_when_held_concurrently() {
        let object = |i: usize| {
            let mut s = ApState::empty(ValueType::Set);
            s = s
                .apply(
                    &Mutation::Insert {
                        members: vec![format!("{i:04}{}", "m".repeat(1000))],
                    },
                    "n1.x",
                    1,
                )
                .unwrap();
            s
        };
        let size = encode(&object(0)).len() as u64;
        let r = Arc::new(replica().with_hint_bytes_max(10 * size));
        let holds: Vec<_> = (0..50)
            .map(|i| {
                let r = r.clone();
                tokio::spawn(async move {
                    r.hold_hint(3, "s", format!("k{i}").as_bytes(), &object(i))
                        .await
                        .is_ok()
                })
            })
            .collect();
        let mut held = 0;
        for h in holds {
            held += u64::from(h.await.unwrap());
        }
        assert_eq!(held, 10, "exactly as many hints as fit");
        assert_eq!(r.hints_held(), 10);
        let stored = r.hints_for(3, 100).unwrap();
        assert_eq!(stored.len(), 10);
        let bytes: u64 = stored.iter().map(|h| encode(&h.object).len() as u64).sum();
        assert!(bytes <= 10 * size);
        let e = r.hold_hint(3, "s", b"more", &object(99)).await.unwrap_err();
        assert_eq!(e.code, capkv_core::ErrorCode::Unavailable, "{e:?}");
        // Dropping one makes room for one.
        assert!(r.drop_hint_if_unchanged(3, &stored[0]).await.unwrap());
        r.hold_hint(3, "s", b"more", &object(99)).await.unwrap();
    }

    /// #8 item 10: a write that cannot begin before its deadline (its key busy, or the
    /// deadline already gone when it arrives) is refused and leaves no trace: its
    /// coordinator has answered or moved on, so applying it late could count it twice.
    #[tokio::test]
    async fn a_write_past_its_deadline_is_refused_unapplied() {
        let r = Arc::new(replica());
        let add = Mutation::Add { by: 1 };
        let gone = crate::rt::Instant::now();
        let e = r
            .update_until("c", b"k", ValueType::Counter, &add, "n1.x", 1, Some(gone))
            .await
            .unwrap_err();
        assert_eq!(e.code, capkv_core::ErrorCode::Unavailable, "{e:?}");
        assert_eq!(r.read("c", b"k", &[]).unwrap(), None, "nothing stored");
        // The key's stripe is held (a slow write before it) until after the deadline.
        let held = r.stripe(&obj_key("c", b"k")).lock().await;
        let deadline = crate::rt::Instant::now() + std::time::Duration::from_millis(50);
        let waiter = {
            let r = r.clone();
            let add = add.clone();
            tokio::spawn(async move {
                r.update_until(
                    "c",
                    b"k",
                    ValueType::Counter,
                    &add,
                    "n1.x",
                    2,
                    Some(deadline),
                )
                .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        drop(held);
        assert!(waiter.await.unwrap().is_err());
        assert_eq!(r.read("c", b"k", &[]).unwrap(), None, "nothing stored");
        // In time, it applies.
        let soon = crate::rt::Instant::now() + std::time::Duration::from_secs(5);
        r.update_until("c", b"k", ValueType::Counter, &add, "n1.x", 3, Some(soon))
            .await
            .unwrap();
        assert!(r.read("c", b"k", &[]).unwrap().is_some());
    }

    /// Found by review: a scan page read `limit` whole objects per source before cutting
    /// to 4 MiB (hundreds of MB for one page of large objects). Reads are now byte-bounded
    /// as they go, and paging still sees every object once.
    #[tokio::test]
    async fn object_reads_stop_at_the_page_bytes() {
        let r = replica();
        let write = |i: usize| Mutation::Write {
            context: Default::default(),
            value: Some(vec![i as u8; 1 << 20]),
        };
        for i in 0..20 {
            r.update(
                "big",
                format!("k{i:02}").as_bytes(),
                ValueType::Register,
                &write(i),
                "n1.x",
                1,
            )
            .await
            .unwrap();
        }
        let (first, more) = r.objects(None, 1000).unwrap();
        assert!(
            more && first.len() < 20,
            "{} objects in one read",
            first.len()
        );
        let (mut seen, mut after) = (0, None::<Vec<u8>>);
        loop {
            let (chunk, more) = r.objects(after.as_deref(), 1000).unwrap();
            seen += chunk.len();
            after = chunk.last().map(|(ks, k, _)| obj_key(ks, k)).or(after);
            if !more {
                break;
            }
        }
        assert_eq!(seen, 20);
        let (page, more) = r.scan("big", b"", None, 1000, &[]).unwrap();
        assert!(
            more && page.len() < 20,
            "{} objects in one scan page",
            page.len()
        );
    }

    #[tokio::test]
    async fn a_batch_merge_equals_merging_one_by_one() {
        use crate::ap::dvv::{Context, Object};
        let write = |actor: &str, v: &str, t| {
            ApState::Register(
                Object::default()
                    .update(&Context::default(), actor, Some(v.as_bytes().to_vec()), t)
                    .unwrap()
                    .0,
            )
        };
        let (a, b, c) = (
            write("n1.x", "a", 1),
            write("n2.y", "b", 2),
            write("n3.z", "c", 3),
        );
        let batch = vec![
            ("cart".to_string(), b"k".to_vec(), a.clone()),
            ("cart".to_string(), b"k".to_vec(), b.clone()), // the same key twice
            ("cart".to_string(), b"j".to_vec(), c.clone()),
        ];
        let one_by_one = replica();
        for (ks, key, state) in &batch {
            one_by_one.merge(ks, key, state).await.unwrap();
        }
        let batched = replica();
        batched.merge("cart", b"j", &c).await.unwrap();
        assert_eq!(
            batched.merge_many(batch.clone()).await.unwrap(),
            1,
            "k changed; j already held c"
        );
        assert_eq!(batched.merge_many(batch).await.unwrap(), 0, "idempotent");
        for key in [b"k".as_slice(), b"j"] {
            assert_eq!(
                batched.read("cart", key, &[]).unwrap(),
                one_by_one.read("cart", key, &[]).unwrap()
            );
        }
        assert_eq!(
            batched.objects.load(Ordering::Relaxed),
            2,
            "each key counted once"
        );
    }

    #[tokio::test]
    async fn updates_merges_and_hints() {
        use crate::ap::dvv::{Context, Object};
        let r = replica();
        let write = |v: &str| Mutation::Write {
            context: Context::default(),
            value: Some(v.as_bytes().to_vec()),
        };
        let a = r
            .update("cart", b"k", ValueType::Register, &write("a"), "n1.x", 1)
            .await
            .unwrap()
            .state;
        let b = ApState::Register(
            Object::default()
                .update(&Context::default(), "n2.y", Some(b"b".to_vec()), 2)
                .unwrap()
                .0,
        );
        let (merged, changed) = r.merge("cart", b"k", &b).await.unwrap();
        assert!(changed);
        let ApState::Register(m) = &merged else {
            panic!("register expected")
        };
        assert_eq!(m.values(), vec![b"a".as_slice(), b"b".as_slice()]);
        assert_eq!(r.read("cart", b"k", &[1, 2, 3]).unwrap().unwrap(), merged);
        assert!(merged.dominates(&a));

        r.hold_hint(3, "cart", b"h", &b).await.unwrap();
        assert_eq!(r.hints_held(), 1);
        assert_eq!(
            r.read("cart", b"h", &[1, 2, 3]).unwrap().unwrap(),
            b,
            "reads see held hints"
        );
        let hints = r.hints_for(3, 10).unwrap();
        assert_eq!(hints.len(), 1);
        assert!(r.hints_for(2, 10).unwrap().is_empty());
        // A hint that changed after it was sent is kept.
        let b2 = b.apply(&write("b2"), "n2.y", 3).unwrap();
        r.hold_hint(3, "cart", b"h", &b2).await.unwrap();
        assert!(!r.drop_hint_if_unchanged(3, &hints[0]).await.unwrap());
        let hints = r.hints_for(3, 10).unwrap();
        assert!(r.drop_hint_if_unchanged(3, &hints[0]).await.unwrap());
        assert_eq!(r.hints_held(), 0);
    }

    /// #9 item 5: a replica that starts with an empty store is rebuilding, and says so of
    /// the keys it lacks, across restarts, until it has synced with every peer; a store
    /// that holds objects and finished its rebuild starts complete.
    #[tokio::test]
    async fn an_empty_store_rebuilds_until_synced_with_every_peer() {
        let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let open = || Replica::new(engine.clone(), GroupCommit::start(engine.clone())).unwrap();
        let write = Mutation::Write {
            context: Default::default(),
            value: Some(b"v".to_vec()),
        };
        let r = open();
        assert!(r.rebuilding());
        assert_eq!(r.held("ks", b"gone", &[]).unwrap(), Held::NotYetRebuilt);
        r.update("ks", b"k", ValueType::Register, &write, "n1.x", 1)
            .await
            .unwrap();
        assert!(matches!(r.held("ks", b"k", &[]).unwrap(), Held::Object(_)));
        r.synced_with(2, &[2, 3]).unwrap();
        drop(r);
        // Restarted in the middle of its rebuild: the store holds an object now, yet it is
        // still incomplete, and the peers it synced with before count no more.
        let r = open();
        assert!(r.rebuilding());
        r.synced_with(3, &[2, 3]).unwrap();
        assert!(r.rebuilding(), "n2's sync was before the restart");
        r.synced_with(2, &[2, 3]).unwrap();
        assert!(!r.rebuilding());
        assert_eq!(r.held("ks", b"gone", &[]).unwrap(), Held::Absent);
        drop(r);
        assert!(
            !open().rebuilding(),
            "rebuilt, with objects: complete at start"
        );
    }

    /// Review: the rebuild's end writes to storage; a stalled disk there must not hold the
    /// reads that ask whether the replica is rebuilding (they froze every async worker), and
    /// a stalled replica says so, so the coordinator issues writes elsewhere first.
    #[test]
    fn a_stalled_rebuild_end_holds_no_read() {
        use crate::storage::Watched;
        let watched = Arc::new(Watched::new(MemoryEngine::new()));
        let engine: Arc<dyn Engine> = watched.clone();
        let r = Arc::new(Replica::new(engine.clone(), GroupCommit::start(engine)).unwrap());
        assert!(r.rebuilding() && !r.storage_stalled());
        watched.set_stalled(true);
        let ending = {
            let r = r.clone();
            std::thread::spawn(move || r.synced_with(2, &[2]))
        };
        // The marker delete waits on the stalled disk; reads answer meanwhile.
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let r = r.clone();
            std::thread::spawn(move || tx.send(r.held("ks", b"absent", &[])).unwrap());
        }
        let held = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a read answers while the rebuild's end waits on the disk")
            .unwrap();
        assert_eq!(held, Held::NotYetRebuilt);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !r.storage_stalled() {
            assert!(
                std::time::Instant::now() < deadline,
                "the stall is reported"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        watched.set_stalled(false);
        ending.join().unwrap().unwrap();
        assert!(!r.rebuilding());
        assert_eq!(r.held("ks", b"absent", &[]).unwrap(), Held::Absent);
    }

    /// Regression (issue #8 item 12), at a home replica and a second replica: a client
    /// that writes again with the context its first write returned replaces its own first
    /// write only; a concurrent write it never saw survives as a sibling, on every replica.
    #[tokio::test]
    async fn a_write_with_the_context_a_write_returned_keeps_what_the_client_never_saw() {
        use crate::ap::dvv::Context;
        let (home, other) = (replica(), replica());
        let write = |context: &Context, v: &str| Mutation::Write {
            context: context.clone(),
            value: Some(v.as_bytes().to_vec()),
        };
        let none = Context::default();
        // Client 2 writes; client 1, which never saw it, writes concurrently at the home.
        home.update(
            "cart",
            b"k",
            ValueType::Register,
            &write(&none, "two"),
            "n1.x",
            1,
        )
        .await
        .unwrap();
        let first = home
            .update(
                "cart",
                b"k",
                ValueType::Register,
                &write(&none, "one"),
                "n1.x",
                2,
            )
            .await
            .unwrap();
        let returned = none.after_write(first.dot.as_ref().unwrap());
        // The other replica got client 1's write before client 2's.
        other.merge("cart", b"k", &first.state).await.unwrap();
        // Client 1 writes again with the context its first write returned.
        let again = home
            .update(
                "cart",
                b"k",
                ValueType::Register,
                &write(&returned, "one again"),
                "n1.x",
                3,
            )
            .await
            .unwrap();
        let values = |s: &ApState| match s {
            ApState::Register(o) => o.values().iter().map(|v| v.to_vec()).collect::<Vec<_>>(),
            _ => panic!("register expected"),
        };
        let want = vec![b"two".to_vec(), b"one again".to_vec()];
        assert_eq!(values(&again.state), want);
        let (at_other, _) = other.merge("cart", b"k", &again.state).await.unwrap();
        assert_eq!(
            values(&at_other),
            want,
            "client 2's value survives elsewhere too"
        );
    }

    #[tokio::test]
    async fn scans_merge_the_replica_with_hints_within_the_keyspace_and_prefix() {
        let r = replica();
        let add = |by| Mutation::Add { by };
        for (ks, key) in [
            ("stock", "a1"),
            ("stock", "a3"),
            ("stock", "b1"),
            ("stoc", "a2"),
        ] {
            r.update(ks, key.as_bytes(), ValueType::Counter, &add(1), "n1.x", 1)
                .await
                .unwrap();
        }
        // Hints: one for a key this replica lacks, one for a key it has (merged).
        let two = ApState::empty(ValueType::Counter)
            .apply(&add(2), "n2.y", 1)
            .unwrap();
        r.hold_hint(2, "stock", b"a2", &two).await.unwrap();
        r.hold_hint(3, "stock", b"a3", &two).await.unwrap();
        let (page, more) = r.scan("stock", b"a", None, 10, &[1, 2, 3]).unwrap();
        let got: Vec<(&[u8], i64)> = page
            .iter()
            .map(|(k, s)| (k.as_slice(), s.total().unwrap()))
            .collect();
        assert_eq!(got, vec![(b"a1".as_slice(), 1), (b"a2", 2), (b"a3", 3)]);
        assert!(!more);
        // Paging: cut at the limit, then continue after the last key.
        let (page, more) = r.scan("stock", b"", None, 2, &[1, 2, 3]).unwrap();
        assert_eq!(page.len(), 2);
        assert!(more);
        let (rest, more) = r.scan("stock", b"", Some(b"a2"), 10, &[1, 2, 3]).unwrap();
        let keys: Vec<&[u8]> = rest.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, vec![b"a3".as_slice(), b"b1"]);
        assert!(!more);
    }

    #[tokio::test]
    async fn mutations_of_the_wrong_type_change_nothing() {
        let r = replica();
        r.update(
            "stock",
            b"k",
            ValueType::Counter,
            &Mutation::Add { by: 2 },
            "n1.x",
            1,
        )
        .await
        .unwrap();
        let bad = Mutation::Insert {
            members: vec!["x".into()],
        };
        assert!(r
            .update("stock", b"k", ValueType::Counter, &bad, "n1.x", 1)
            .await
            .is_err());
        assert_eq!(
            r.read("stock", b"k", &[])
                .unwrap()
                .unwrap()
                .total()
                .unwrap(),
            2
        );
    }
}
