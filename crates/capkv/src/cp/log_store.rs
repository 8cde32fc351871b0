//! The Raft log and vote, persisted in the [`Engine`].
//!
//! Entries live in [`Tree::Log`] under their index (u64 big-endian, so key order is log
//! order). The vote, the committed id and the last purged id live in [`Tree::Meta`].
//!
//! Durability (see the rules in the `cp` module docs): `append` writes the entries and
//! reports them flushed only from the group-commit thread, after an fsync that started
//! after the write; `save_vote` waits for an fsync before it returns.
//!
//! Crash safety of deletes. Purging and truncating delete many entries, in bounded
//! batches, and a crash can stop them after any batch (the engine recovers a prefix of
//! the batches written). Each is ordered so that every such prefix is a valid log:
//! - `purge` records the new purged id *first*, then deletes from the lowest index up.
//!   Entries left at or below the purged id are invisible (the log starts above it, and
//!   `get_log_state` never reports a last id below it); the next purge deletes them.
//!
//! A purge runs on its own thread ([`Purger`]), not in the Raft core: it waits for two
//! fsyncs and deletes tens of thousands of entries, and while the core awaited it (right
//! after each snapshot) it sent no heartbeat and ran no election timer for up to 2.7 s
//! under load, after which the follower's first tick started an election (measured, #9
//! item 3). openraft needs no durability from `purge`, only that purged entries are never
//! read and the log has no hole: `purge` makes the entries invisible at once (in memory)
//! and returns; the purger records and deletes them in the order above. A crash before it
//! finishes leaves the older, longer log, which is valid. The exception is a purge past
//! the end of the log (a snapshot installed): the appends that follow start above the
//! purged id, so without the record on disk first a crash could leave a hole; that record
//! is written and fsynced before `purge` returns.
//! - `truncate` deletes from the *highest* index down, so what is left is always a
//!   contiguous prefix: a log truncated part of the way is a log not yet truncated, which
//!   openraft handles like any log whose tail conflicts with the leader's.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{mpsc, Arc, Condvar, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, StorageError, StorageIOError, Vote};

use super::{decode, encode, LogId, NodeId, StorageResult, TypeConfig};
use crate::storage::{Engine, GroupCommit, Tree, WriteBatch};

const META_VOTE: &[u8] = b"raft_vote";
const META_COMMITTED: &[u8] = b"raft_committed";
const META_PURGED: &[u8] = b"raft_purged";

/// Entries deleted per write batch when purging or truncating.
const DELETE_CHUNK: usize = 1024;

/// Entries per delete batch: [`DELETE_CHUNK`], or 16 in a simulation, whose short runs
/// purge tens of entries at a time; so a crash between two batches of one purge or
/// truncate is a schedule it can reach.
fn delete_chunk() -> u64 {
    if crate::rt::simulated() {
        16
    } else {
        DELETE_CHUNK as u64
    }
}

type Entry = openraft::Entry<TypeConfig>;

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn read_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_logs(openraft::AnyError::error(e.to_string())).into()
}

fn write_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_logs(openraft::AnyError::error(e.to_string())).into()
}

#[derive(Clone)]
pub struct LogStore {
    engine: Arc<dyn Engine>,
    group_commit: GroupCommit,
    purger: Arc<Purger>,
    /// Encoded bytes of every entry appended since start (snapshots are also taken by
    /// log bytes, not only by entry count: see `Node::snapshot_by_bytes_loop`).
    appended_bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl LogStore {
    pub fn new(engine: Arc<dyn Engine>, group_commit: GroupCommit) -> LogStore {
        LogStore {
            purger: Purger::start(engine.clone(), group_commit.clone()),
            engine,
            group_commit,
            appended_bytes: Default::default(),
        }
    }

    /// Makes a node that led when it stopped start as a follower: a stored vote that is this
    /// node's own and committed (it was the leader) is stored uncommitted, durably, and true
    /// is returned. openraft would otherwise restore it as the leader of its old term, with
    /// the first entry of that term as its "noop" and the commit index it last stored; that
    /// record is not fsynced, so after a crash the restored leader serves linearizable reads
    /// from before writes it had acknowledged (found by `capkv sim --seed 1030 --faults
    /// crash-at-write,crash,restart`). Starting as a follower, it must win an election, whose
    /// new noop entry every read then waits for.
    pub async fn step_down_on_start(&self, me: NodeId) -> StorageResult<bool> {
        let Some(vote) = meta::<Vote<NodeId>>(self.engine.as_ref(), META_VOTE)? else {
            return Ok(false);
        };
        if !vote.committed || vote.leader_id.node_id != me {
            return Ok(false);
        }
        let mut b = WriteBatch::new();
        let demoted = Vote::new(vote.leader_id.term, me);
        b.put(Tree::Meta, META_VOTE.to_vec(), encode(&demoted));
        self.engine.write(b).map_err(write_err)?;
        self.group_commit.sync().await.map_err(|e| {
            StorageError::from(StorageIOError::write_vote(openraft::AnyError::error(e)))
        })?;
        Ok(true)
    }

    /// Waits until every purge asked for so far was recorded and its entries deleted
    /// (or failed: the error is returned; the next purge tries again).
    pub fn purge_settled(&self) -> Result<(), String> {
        self.purger.settled()
    }

    /// The purged id: the highest asked for (in memory), else the recorded one.
    fn purged(&self) -> StorageResult<Option<LogId>> {
        let recorded = meta::<Option<LogId>>(self.engine.as_ref(), META_PURGED)?.flatten();
        Ok(by_index_max(recorded, self.purger.asked()))
    }

    /// Encoded bytes of the entries appended since this store was made.
    pub fn appended_bytes(&self) -> u64 {
        self.appended_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Deletes every entry with `index >= first`, highest first, in bounded batches, so
    /// that after each batch the log is still contiguous. Log indexes above the purged id
    /// have no holes, so the batches name indexes directly instead of reading entries.
    fn delete_from(&self, first: u64) -> StorageResult<()> {
        let Some((k, _)) = self
            .engine
            .last_in_range(Tree::Log, &log_key(first), None)
            .map_err(read_err)?
        else {
            return Ok(());
        };
        let mut high = log_index(&k).map_err(read_err)?;
        loop {
            let low = high.saturating_sub(delete_chunk() - 1).max(first);
            let mut batch = WriteBatch::new();
            for i in (low..=high).rev() {
                batch.delete(Tree::Log, log_key(i).to_vec());
            }
            self.engine.write(batch).map_err(write_err)?;
            if low == first {
                return Ok(());
            }
            high = low - 1;
        }
    }
}

/// The index a log key names (a key that is not 8 bytes is a corrupt store).
fn log_index(key: &[u8]) -> crate::storage::Result<u64> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| crate::storage::StorageError::Corrupt {
            tree: "log",
            detail: format!("a key of {} bytes, not 8", key.len()),
        })
}

/// Checks what a log store holds on `engine` is a log: above the recorded purged id, the
/// entries run without a hole to the last one (below it, leftovers of a purge a crash
/// cut short are allowed). The simulator checks it every time a node starts; a hole
/// would be served to followers as a log (#8 item 3).
pub fn verify(engine: &dyn Engine) -> Result<(), String> {
    let purged = meta::<Option<LogId>>(engine, META_PURGED)
        .map_err(|e| e.to_string())?
        .flatten();
    let from = purged.map_or(0, |p| p.index.saturating_add(1));
    let mut expect = None;
    let mut start = log_key(from).to_vec();
    loop {
        let page = engine
            .range(Tree::Log, &start, None, 1024)
            .map_err(|e| e.to_string())?;
        for (k, _) in &page {
            let i = log_index(k).map_err(|e| e.to_string())?;
            let want = *expect.get_or_insert(if purged.is_some() { from } else { i });
            if i != want {
                return Err(format!(
                    "the log has a hole: entries {want}..{i} are missing above the purged \
                     id {purged:?}"
                ));
            }
            expect = Some(i + 1);
        }
        match page.last() {
            Some((k, _)) if page.len() == 1024 => {
                start = k.clone();
                start.push(0);
            }
            _ => return Ok(()),
        }
    }
}

fn meta<T: crate::codec::Stored>(engine: &dyn Engine, key: &[u8]) -> StorageResult<Option<T>> {
    match engine.get(Tree::Meta, key).map_err(read_err)? {
        None => Ok(None),
        Some(raw) => decode(&raw).map(Some).map_err(read_err),
    }
}

/// Deletes every entry with `index <= last`, lowest first, in bounded batches of keys
/// (the entries are not read: only the lowest one left, to know where to start). Only
/// for entries already invisible (at or below a recorded purged id): a crash part way
/// leaves some of them behind, which the next call deletes.
fn delete_up_to(engine: &dyn Engine, last: u64) -> crate::storage::Result<()> {
    let end = last.checked_add(1).map(log_key);
    let end = end.as_ref().map(|k| &k[..]);
    // From the lowest entry left to the highest at or below `last` (a purge past the end
    // of the log must not write tombstones for indexes that never held an entry).
    let Some((first, _)) = engine.range(Tree::Log, &log_key(0), end, 1)?.pop() else {
        return Ok(());
    };
    let Some((top, _)) = engine.last_in_range(Tree::Log, &log_key(0), end)? else {
        return Ok(());
    };
    let mut low = log_index(&first)?;
    let last = log_index(&top)?;
    while low <= last {
        let high = low.saturating_add(delete_chunk() - 1).min(last);
        let mut batch = WriteBatch::new();
        for i in low..=high {
            batch.delete(Tree::Log, log_key(i).to_vec());
        }
        engine.write(batch)?;
        match high.checked_add(1) {
            Some(next) => low = next,
            None => break,
        }
    }
    Ok(())
}

/// Where purges are asked for: the purge thread, or a simulated node's purge task.
enum PurgeTx {
    Thread(mpsc::Sender<LogId>),
    Task(tokio::sync::mpsc::UnboundedSender<LogId>),
}

enum PurgeRx {
    Thread(mpsc::Receiver<LogId>),
    Task(tokio::sync::mpsc::UnboundedReceiver<LogId>),
}

/// The highest of purged ids asked for together, by index.
fn highest(asked: &[LogId]) -> LogId {
    asked
        .iter()
        .fold(None, |m, id| by_index_max(m, Some(*id)))
        .expect("at least one purge was asked for")
}

/// The value of a future whose every await is ready at once (the purge thread's, whose
/// syncs block instead of waiting).
fn ready_now<T>(f: impl std::future::Future<Output = T>) -> T {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => unreachable!("every await of the purge thread is ready"),
    }
}

/// Runs purges on a thread of its own (see the module docs). Purges asked for while one
/// runs are merged: only the highest matters.
struct Purger {
    /// The highest purged id asked for: entries at or below it are invisible at once.
    asked: Mutex<Option<LogId>>,
    tx: Mutex<PurgeTx>,
    /// Purges asked for and finished (with the last error), for `settled`.
    progress: Mutex<(u64, u64, Option<String>)>,
    finished: Condvar,
}

impl Purger {
    fn start(engine: Arc<dyn Engine>, group_commit: GroupCommit) -> Arc<Purger> {
        let (tx, rx) = if crate::rt::simulated() {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (PurgeTx::Task(tx), PurgeRx::Task(rx))
        } else {
            let (tx, rx) = mpsc::channel();
            (PurgeTx::Thread(tx), PurgeRx::Thread(rx))
        };
        let purger = Arc::new(Purger {
            asked: Mutex::new(None),
            tx: Mutex::new(tx),
            progress: Mutex::new((0, 0, None)),
            finished: Condvar::new(),
        });
        // The runner holds a weak handle: it ends when the last store is dropped (its
        // sender with it), after finishing what was asked.
        let weak = Arc::downgrade(&purger);
        match rx {
            PurgeRx::Thread(rx) => {
                std::thread::Builder::new()
                    .name("capkv-purge".into())
                    .spawn(move || {
                        while let Ok(first) = rx.recv() {
                            let asked: Vec<LogId> =
                                std::iter::once(first).chain(rx.try_iter()).collect();
                            let sync = || std::future::ready(sync_now(&group_commit));
                            let result =
                                ready_now(purge_now(engine.as_ref(), sync, highest(&asked)));
                            if !Purger::finished(&weak, asked.len(), result) {
                                return;
                            }
                        }
                    })
                    .expect("spawning the purge thread");
            }
            // A simulated node purges in a task of its own (a thread's timing would make
            // the run unrepeatable, and a crash must end the purge with the node).
            PurgeRx::Task(mut rx) => {
                crate::rt::spawn(async move {
                    while let Some(first) = rx.recv().await {
                        let mut asked = vec![first];
                        while let Ok(later) = rx.try_recv() {
                            asked.push(later);
                        }
                        let sync = || group_commit.sync();
                        let result = purge_now(engine.as_ref(), sync, highest(&asked)).await;
                        if !Purger::finished(&weak, asked.len(), result) {
                            return;
                        }
                    }
                });
            }
        }
        purger
    }

    /// Records `n` purges finished; false once the store is gone.
    fn finished(weak: &std::sync::Weak<Purger>, n: usize, result: Result<(), String>) -> bool {
        if let Err(e) = &result {
            tracing::error!(error = %e, "purging the Raft log failed; the next purge tries again");
        }
        let Some(p) = weak.upgrade() else {
            return false;
        };
        let mut progress = p.progress.lock().expect("purge progress poisoned");
        progress.1 += n as u64;
        progress.2 = result.err();
        p.finished.notify_all();
        true
    }

    fn asked(&self) -> Option<LogId> {
        *self.asked.lock().expect("purge lock poisoned")
    }

    fn ask(&self, id: LogId) -> Result<(), String> {
        {
            let mut asked = self.asked.lock().expect("purge lock poisoned");
            *asked = by_index_max(*asked, Some(id));
        }
        self.progress.lock().expect("purge progress poisoned").0 += 1;
        let sent = match &*self.tx.lock().expect("purge lock poisoned") {
            PurgeTx::Thread(tx) => tx.send(id).is_ok(),
            PurgeTx::Task(tx) => tx.send(id).is_ok(),
        };
        sent.then_some(())
            .ok_or_else(|| "the purge thread has stopped".to_string())
    }

    fn settled(&self) -> Result<(), String> {
        let mut progress = self.progress.lock().expect("purge progress poisoned");
        while progress.1 < progress.0 {
            progress = self
                .finished
                .wait(progress)
                .expect("purge progress poisoned");
        }
        match &progress.2 {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

/// The later of two purged ids, by index: a snapshot's id may carry an older term than
/// entries a cut-short purge left (log id order compares terms first).
fn by_index_max(a: Option<LogId>, b: Option<LogId>) -> Option<LogId> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.index > x.index { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

/// A blocking wait for an fsync that starts after this call.
fn sync_now(group_commit: &GroupCommit) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    group_commit.after_sync(move |r| {
        let _ = tx.send(r);
    });
    rx.recv()
        .unwrap_or_else(|_| Err("storage is shutting down".into()))
}

/// One purge; `sync` waits for an fsync that starts after it is called.
async fn purge_now<F>(engine: &dyn Engine, sync: impl Fn() -> F, id: LogId) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), String>>,
{
    // Rule 3: the state machine writes without fsync, so make it durable before the log
    // entries that could rebuild it are gone.
    sync().await?;
    if crate::rt::reverted(crate::rt::Revert::PurgeDeletesFirst) {
        delete_up_to(engine, id.index).map_err(|e| e.to_string())?;
    }
    let recorded: Option<LogId> = match engine.get(Tree::Meta, META_PURGED) {
        Ok(Some(raw)) => decode::<Option<LogId>>(&raw).map_err(|e| e.to_string())?,
        Ok(None) => None,
        Err(e) => return Err(e.to_string()),
    };
    if recorded.is_none_or(|r| r.index < id.index) {
        let mut record = WriteBatch::new();
        record.put(Tree::Meta, META_PURGED.to_vec(), encode(&Some(id)));
        engine.write(record).map_err(|e| e.to_string())?;
        // Durable before any entry goes, even where a crash keeps no prefix order.
        sync().await?;
    }
    delete_up_to(engine, id.index).map_err(|e| e.to_string())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        // Purged entries not yet deleted are not part of the log.
        let start = match self.purger.asked() {
            Some(p) => start.max(p.index.saturating_add(1)),
            None => start,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(i + 1),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        if end.is_some_and(|e| e <= start) {
            return Ok(Vec::new());
        }
        let end_key = end.map(log_key);
        let rows = self
            .engine
            .range(
                Tree::Log,
                &log_key(start),
                end_key.as_ref().map(|k| &k[..]),
                usize::MAX,
            )
            .map_err(read_err)?;
        rows.iter()
            .map(|(_, v)| decode(v).map_err(read_err))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged = self.purged()?;
        // Entries at or below the purged id may be left by a purge not yet finished, or
        // one a crash cut short.
        let last = match self
            .engine
            .last_in_range(Tree::Log, &[], None)
            .map_err(read_err)?
        {
            Some((_, v)) => {
                // By index: a leftover entry can carry a higher term than the purged id.
                let id = decode::<Entry>(&v).map_err(read_err)?.log_id;
                match last_purged {
                    Some(p) if p.index >= id.index => Some(p),
                    _ => Some(id),
                }
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let mut b = WriteBatch::new();
        b.put(Tree::Meta, META_VOTE.to_vec(), encode(vote));
        self.engine.write(b).map_err(write_err)?;
        // A vote must be durable before anyone hears of it.
        self.group_commit.sync().await.map_err(|e| {
            StorageError::from(StorageIOError::write_vote(openraft::AnyError::error(e)))
        })
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        meta(self.engine.as_ref(), META_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> StorageResult<()> {
        // Not fsynced: losing it only means re-learning the commit index from the leader.
        let mut b = WriteBatch::new();
        b.put(Tree::Meta, META_COMMITTED.to_vec(), encode(&committed));
        self.engine.write(b).map_err(write_err)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId>> {
        Ok(meta::<Option<LogId>>(self.engine.as_ref(), META_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::new();
        let mut bytes = 0u64;
        for e in entries {
            let encoded = encode(&e);
            bytes += encoded.len() as u64;
            batch.put(Tree::Log, log_key(e.log_id.index).to_vec(), encoded);
        }
        self.appended_bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("capkv_raft_log_entries_appended_total").increment(batch.len() as u64);
        metrics::counter!("capkv_raft_log_bytes_appended_total").increment(bytes);
        self.engine.write(batch).map_err(write_err)?;
        self.group_commit
            .after_sync(move |r| callback.log_io_completed(r.map_err(io::Error::other)));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> StorageResult<()> {
        self.delete_from(log_id.index)?;
        self.group_commit.sync().await.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> StorageResult<()> {
        // A purge past the end of the log (a snapshot installed on a follower that was
        // behind) is followed by appends above the purged id, with nothing in between:
        // were the record left to the purge thread, those appends could reach the disk
        // before it, and a crash would leave a log with a hole (found by review). So it
        // is recorded, durably, before `purge` returns; it is rare (one per install).
        let last = self
            .engine
            .last_in_range(Tree::Log, &[], None)
            .map_err(read_err)?
            .map(|(k, _)| log_index(&k))
            .transpose()
            .map_err(read_err)?;
        if last.is_none_or(|last| log_id.index > last) {
            // Rule 3 first: the state machine must be durable before the log goes.
            self.group_commit.sync().await.map_err(write_err)?;
            let mut record = WriteBatch::new();
            record.put(Tree::Meta, META_PURGED.to_vec(), encode(&Some(log_id)));
            self.engine.write(record).map_err(write_err)?;
            self.group_commit.sync().await.map_err(write_err)?;
        }
        // Deleted (and, below the end, recorded) by the purge thread (see the module docs).
        self.purger.ask(log_id).map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cp::state_machine::StateMachine;
    use crate::storage::MemoryEngine;
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::StorageError;
    use std::time::Duration;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
            let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
            let gc = GroupCommit::start(engine.clone());
            let snapshots = tempfile::tempdir().unwrap();
            let sm = StateMachine::open(engine.clone(), snapshots.path())?;
            Ok((snapshots, LogStore::new(engine, gc), sm))
        }
    }

    /// openraft's own conformance suite for log stores and state machines.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(Builder).unwrap();
    }

    struct FjallBuilder(tempfile::TempDir);

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, ()> for FjallBuilder {
        async fn build(&self) -> Result<((), LogStore, StateMachine), StorageError<NodeId>> {
            let dir = self.0.path().join(format!("{}", rand::random::<u64>()));
            let engine: Arc<dyn Engine> =
                Arc::new(crate::storage::FjallEngine::open(&dir).unwrap());
            let gc = GroupCommit::start(engine.clone());
            let sm = StateMachine::open(engine.clone(), &dir.join("snapshots"))?;
            Ok(((), LogStore::new(engine, gc), sm))
        }
    }

    /// The same suite on the production engine.
    #[test]
    fn openraft_storage_suite_on_fjall() {
        Suite::test_all(FjallBuilder(tempfile::tempdir().unwrap())).unwrap();
    }

    const ENTRIES: u64 = 3000;

    fn log_id(index: u64) -> LogId {
        LogId::new(openraft::CommittedLeaderId::new(1, 1), index)
    }

    /// A log of entries 1..=ENTRIES on a fresh memory engine.
    fn blank(index: u64) -> Entry {
        Entry {
            log_id: log_id(index),
            payload: openraft::EntryPayload::Blank,
        }
    }

    async fn full_log() -> Arc<MemoryEngine> {
        let engine = Arc::new(MemoryEngine::new());
        let mut batch = WriteBatch::new();
        for i in 1..=ENTRIES {
            let e = blank(i);
            batch.put(Tree::Log, log_key(i).to_vec(), encode(&e));
        }
        engine.write(batch).unwrap();
        engine
    }

    /// Reopens the log on what survived and checks that it is a valid Raft log: the last
    /// id is at or above the purged id, and every entry between them is there, in order.
    /// Returns (purged index, last index).
    async fn reopened(engine: Arc<MemoryEngine>) -> (u64, u64) {
        let mut store = LogStore::new(engine.clone(), GroupCommit::start(engine));
        let state = store.get_log_state().await.unwrap();
        let purged = state.last_purged_log_id.map_or(0, |id| id.index);
        let last = state.last_log_id.map_or(0, |id| id.index);
        assert!(last >= purged, "last {last} below purged {purged}");
        let entries = store.try_get_log_entries(purged + 1..=last).await.unwrap();
        let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
        let want: Vec<u64> = (purged + 1..=last).collect();
        assert_eq!(
            indexes, want,
            "a hole between purged {purged} and last {last}"
        );
        (purged, last)
    }

    /// #8 item 3: a purge cut after any of its batches leaves a log that opens, with no
    /// hole, and the next purge finishes the job.
    /// A node that was the leader when it stopped starts as a follower (its committed
    /// vote is stored uncommitted); a vote for another node, or one not committed, stays.
    #[tokio::test]
    async fn a_node_that_led_starts_as_a_follower() {
        let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let mut store = LogStore::new(engine.clone(), GroupCommit::start(engine));
        assert!(!store.step_down_on_start(1).await.unwrap(), "no vote yet");
        let mut led = Vote::new(7, 1);
        led.commit();
        store.save_vote(&led).await.unwrap();
        assert!(
            !store.step_down_on_start(2).await.unwrap(),
            "another node's leadership"
        );
        assert_eq!(store.read_vote().await.unwrap(), Some(led));
        assert!(store.step_down_on_start(1).await.unwrap());
        let now = store.read_vote().await.unwrap().unwrap();
        assert_eq!(now, Vote::new(7, 1), "same term, same vote, not committed");
        assert!(!now.is_committed());
        assert!(
            !store.step_down_on_start(1).await.unwrap(),
            "once is enough"
        );
    }

    #[tokio::test]
    async fn a_purge_cut_after_any_batch_leaves_a_valid_log() {
        let purge_to = 2500;
        for cut in 0..=5 {
            let inner = full_log().await;
            let crashing: Arc<dyn Engine> = Arc::new(crate::storage::CrashAfter {
                inner: inner.clone(),
                writes_left: cut.into(),
            });
            let mut store = LogStore::new(crashing.clone(), GroupCommit::start(crashing));
            store.purge(log_id(purge_to)).await.unwrap();
            let finished = store.purge_settled().is_ok();
            let (purged, last) = reopened(inner.clone()).await;
            assert_eq!(last, ENTRIES, "cut after {cut} batches");
            assert!(purged == 0 || purged == purge_to, "cut after {cut} batches");
            if finished {
                assert_eq!(purged, purge_to);
            }
            // Purge again on the survivor: nothing at or below the purged id remains.
            let mut store = LogStore::new(inner.clone(), GroupCommit::start(inner.clone()));
            store.purge(log_id(purge_to)).await.unwrap();
            store.purge_settled().unwrap();
            assert_eq!(reopened(inner.clone()).await, (purge_to, ENTRIES));
            let below = inner
                .range(Tree::Log, &log_key(0), Some(&log_key(purge_to + 1)), 1)
                .unwrap();
            assert!(below.is_empty(), "cut after {cut}: purged entries remain");
        }
    }

    /// A purge past the end of the log (a snapshot install) reports the purged id as the
    /// last one even when a crash left older entries behind, even entries of a higher
    /// term than the purged id's (compared by index, not by log id order).
    #[tokio::test]
    async fn a_purge_past_the_end_cut_short_reports_the_purged_id_as_last() {
        let inner = full_log().await;
        let crashing: Arc<dyn Engine> = Arc::new(crate::storage::CrashAfter {
            inner: inner.clone(),
            writes_left: 2.into(),
        });
        let mut store = LogStore::new(crashing.clone(), GroupCommit::start(crashing));
        store.purge(log_id(ENTRIES + 100)).await.unwrap();
        assert!(store.purge_settled().is_err());
        assert_eq!(reopened(inner).await, (ENTRIES + 100, ENTRIES + 100));
        // The snapshot's id is of an older term than the entries left behind.
        let inner = full_log().await;
        let crashing: Arc<dyn Engine> = Arc::new(crate::storage::CrashAfter {
            inner: inner.clone(),
            writes_left: 2.into(),
        });
        let mut store = LogStore::new(crashing.clone(), GroupCommit::start(crashing));
        let older = LogId::new(openraft::CommittedLeaderId::new(0, 1), ENTRIES + 100);
        store.purge(older).await.unwrap();
        assert!(store.purge_settled().is_err());
        assert_eq!(reopened(inner).await, (ENTRIES + 100, ENTRIES + 100));
    }

    /// #9 item 3: the Raft core awaits `purge`, and a purge waited for two fsyncs and
    /// deleted every entry (after each snapshot: up to 13 s under load, and the node's
    /// election timer then fired). It returns at once, even while the disk is stalled,
    /// and the purged entries are gone from the log from then on.
    #[tokio::test]
    async fn a_purge_returns_at_once_even_while_the_disk_is_stalled() {
        let inner = full_log().await;
        let shared = crate::storage::CrashAfter {
            inner: inner.clone(),
            writes_left: usize::MAX.into(),
        };
        let watched = Arc::new(crate::storage::Watched::new(shared));
        let engine: Arc<dyn Engine> = watched.clone();
        let mut store = LogStore::new(engine.clone(), GroupCommit::start(engine));
        watched.set_stalled(true);
        tokio::time::timeout(Duration::from_secs(5), store.purge(log_id(700)))
            .await
            .expect("purge waited for the stalled disk")
            .unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(700)));
        assert_eq!(state.last_log_id, Some(log_id(ENTRIES)));
        let first = store.try_get_log_entries(0..800).await.unwrap();
        assert_eq!(first.first().map(|e| e.log_id.index), Some(701));
        // Nothing was recorded or deleted yet; once the disk moves, it is.
        assert_eq!(reopened(inner.clone()).await, (0, ENTRIES));
        watched.set_stalled(false);
        store.purge_settled().unwrap();
        assert_eq!(reopened(inner.clone()).await, (700, ENTRIES));
        let below = inner
            .range(Tree::Log, &log_key(0), Some(&log_key(701)), 1)
            .unwrap();
        assert!(below.is_empty(), "purged entries remain");
    }

    /// Found by review: a purge past the end of the log (a snapshot installed on a
    /// follower that was behind) is followed by appends above the purged id. If its
    /// record were left to the purge thread (which can fail, or be cut by a crash), the
    /// log on disk could be 1..10 then 51..55 with no record: a hole. It is recorded
    /// before `purge` returns, and a record that cannot be written fails the purge.
    #[tokio::test]
    async fn a_purge_past_the_end_is_recorded_before_it_returns() {
        let inner = Arc::new(MemoryEngine::new());
        let mut batch = WriteBatch::new();
        for i in 1..=10 {
            let e = blank(i);
            batch.put(Tree::Log, log_key(i).to_vec(), encode(&e));
        }
        inner.write(batch).unwrap();
        // Only the record's write is allowed: anything the purge thread writes later
        // fails, as a crash right after `purge` returned would.
        let crashing: Arc<dyn Engine> = Arc::new(crate::storage::CrashAfter {
            inner: inner.clone(),
            writes_left: 1.into(),
        });
        let mut store = LogStore::new(crashing.clone(), GroupCommit::start(crashing));
        store.purge(log_id(50)).await.unwrap();
        let mut batch = WriteBatch::new();
        for i in 51..=55 {
            let e = blank(i);
            batch.put(Tree::Log, log_key(i).to_vec(), encode(&e));
        }
        inner.write(batch).unwrap();
        assert_eq!(reopened(inner.clone()).await, (50, 55));
        // With nothing writable at all, the purge fails instead of leaving a hole.
        let inner = full_log().await;
        let crashing: Arc<dyn Engine> = Arc::new(crate::storage::CrashAfter {
            inner: inner.clone(),
            writes_left: 0.into(),
        });
        let mut store = LogStore::new(crashing.clone(), GroupCommit::start(crashing));
        assert!(store.purge(log_id(ENTRIES + 10)).await.is_err());
    }

    /// #8 item 3: a truncate cut after any of its batches leaves a contiguous log that
    /// ends somewhere between the truncation point and the old end.
    #[tokio::test]
    async fn a_truncate_cut_after_any_batch_leaves_a_contiguous_log() {
        let truncate_at = 500;
        for cut in 0..=4 {
            let inner = full_log().await;
            let crashing: Arc<dyn Engine> = Arc::new(crate::storage::CrashAfter {
                inner: inner.clone(),
                writes_left: cut.into(),
            });
            let mut store = LogStore::new(crashing.clone(), GroupCommit::start(crashing));
            let finished = store.truncate(log_id(truncate_at)).await.is_ok();
            let (_, last) = reopened(inner.clone()).await;
            assert!((truncate_at - 1..=ENTRIES).contains(&last), "cut {cut}");
            if finished {
                assert_eq!(last, truncate_at - 1);
            }
            let above = inner.range(Tree::Log, &log_key(last + 1), None, 1).unwrap();
            assert!(above.is_empty(), "cut {cut}: an entry above the last one");
        }
    }
}
