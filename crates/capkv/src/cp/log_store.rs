//! The Raft log and vote, persisted in the [`Engine`].
//!
//! Entries live in [`Tree::Log`] under their index (u64 big-endian, so key order is log
//! order). The vote, the committed id and the last purged id live in [`Tree::Meta`].
//!
//! Durability (see the rules in the `cp` module docs): `append` writes the entries and
//! reports them flushed only from the group-commit thread, after an fsync that started
//! after the write; `save_vote` waits for an fsync before it returns.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, StorageError, StorageIOError, Vote};

use super::{decode, encode, LogId, NodeId, StorageResult, TypeConfig};
use crate::storage::{Engine, GroupCommit, Tree, WriteBatch};

const META_VOTE: &[u8] = b"raft_vote";
const META_COMMITTED: &[u8] = b"raft_committed";
const META_PURGED: &[u8] = b"raft_purged";

/// Entries deleted per write batch when purging or truncating.
const DELETE_CHUNK: usize = 1024;

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
}

impl LogStore {
    pub fn new(engine: Arc<dyn Engine>, group_commit: GroupCommit) -> LogStore {
        LogStore {
            engine,
            group_commit,
        }
    }

    fn meta<T: serde::de::DeserializeOwned + 'static>(
        &self,
        key: &[u8],
    ) -> StorageResult<Option<T>> {
        match self.engine.get(Tree::Meta, key).map_err(read_err)? {
            None => Ok(None),
            Some(raw) => decode(&raw).map(Some).map_err(read_err),
        }
    }

    /// Deletes every entry with `start <= index < end`, in bounded batches; `extra` is
    /// written atomically with the last batch.
    fn delete_range(&self, start: u64, end: Option<u64>, extra: WriteBatch) -> StorageResult<()> {
        let end_key = end.map(log_key);
        let mut from = start;
        loop {
            let rows = self
                .engine
                .range(
                    Tree::Log,
                    &log_key(from),
                    end_key.as_ref().map(|k| &k[..]),
                    DELETE_CHUNK,
                )
                .map_err(read_err)?;
            let done = rows.len() < DELETE_CHUNK;
            let mut batch = if done {
                extra.clone()
            } else {
                WriteBatch::new()
            };
            for (k, _) in &rows {
                batch.delete(Tree::Log, k.clone());
            }
            if let Some((k, _)) = rows.last() {
                from = u64::from_be_bytes(k[..8].try_into().map_err(read_err)?) + 1;
            }
            self.engine.write(batch).map_err(write_err)?;
            if done {
                return Ok(());
            }
        }
    }
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
        let end = match range.end_bound() {
            Bound::Included(i) => Some(i + 1),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
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
        let last_purged: Option<LogId> = self.meta::<Option<LogId>>(META_PURGED)?.flatten();
        let last = match self
            .engine
            .last_in_range(Tree::Log, &[], None)
            .map_err(read_err)?
        {
            Some((_, v)) => Some(decode::<Entry>(&v).map_err(read_err)?.log_id),
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
        self.meta(META_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> StorageResult<()> {
        // Not fsynced: losing it only means re-learning the commit index from the leader.
        let mut b = WriteBatch::new();
        b.put(Tree::Meta, META_COMMITTED.to_vec(), encode(&committed));
        self.engine.write(b).map_err(write_err)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId>> {
        Ok(self.meta::<Option<LogId>>(META_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::new();
        for e in entries {
            batch.put(Tree::Log, log_key(e.log_id.index).to_vec(), encode(&e));
        }
        metrics::counter!("capkv_raft_log_entries_appended_total").increment(batch.len() as u64);
        self.engine.write(batch).map_err(write_err)?;
        self.group_commit
            .after_sync(move |r| callback.log_io_completed(r.map_err(io::Error::other)));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> StorageResult<()> {
        self.delete_range(log_id.index, None, WriteBatch::new())?;
        self.group_commit.sync().await.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> StorageResult<()> {
        // Rule 3: the state machine writes without fsync, so make it durable before the
        // log entries that could rebuild it are gone.
        self.group_commit.sync().await.map_err(write_err)?;
        let mut last = WriteBatch::new();
        last.put(Tree::Meta, META_PURGED.to_vec(), encode(&Some(log_id)));
        self.delete_range(0, Some(log_id.index + 1), last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cp::state_machine::StateMachine;
    use crate::storage::MemoryEngine;
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::StorageError;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, ()> for Builder {
        async fn build(&self) -> Result<((), LogStore, StateMachine), StorageError<NodeId>> {
            let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
            let gc = GroupCommit::start(engine.clone());
            Ok((
                (),
                LogStore::new(engine.clone(), gc),
                StateMachine::open(engine)?,
            ))
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
            Ok((
                (),
                LogStore::new(engine.clone(), gc),
                StateMachine::open(engine)?,
            ))
        }
    }

    /// The same suite on the production engine.
    #[test]
    fn openraft_storage_suite_on_fjall() {
        Suite::test_all(FjallBuilder(tempfile::tempdir().unwrap())).unwrap();
    }
}
