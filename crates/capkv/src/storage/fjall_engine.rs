//! The production engine: fjall, an LSM-tree store with a shared write-ahead journal.
//!
//! Each [`Tree`] is a fjall partition; all partitions share the keyspace's journal, so a
//! batch that spans trees is atomic, and one `persist(SyncAll)` makes every tree durable
//! up to that point. We never let fjall fsync on its own schedule: durability points are
//! chosen by the layer above (see `GroupCommit`).
//!
//! **The recovery stall (#8 item 14).** After a kill -9 with several memtables waiting
//! to be flushed, fjall 2.11 recovers them all but wakes its flusher once per partition
//! with work, and each flush run takes at most "flush workers" memtables (by default the
//! machine's cores, at most 4). The rest are never flushed: the write buffer stays over
//! its 64 MiB limit and every write sleeps in fjall's write halt for ever ("write halt
//! because of write buffer saturation"). We let a run take [`FLUSH_TASKS_PER_RUN`]
//! memtables, more than recovery can queue per partition (one per sealed journal), so the
//! first runs flush everything. `tests/storage.rs` kills a writer mid-flood and reopens;
//! it froze in the first round before. (The same upstream shape as fjall issue #257.)

use std::path::Path;

use fjall::{Config, Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};

use super::{Engine, Entry, ReadView, Result, StorageError, Tree, WriteBatch};

/// Memtables one flush run may take (fjall calls it flush "workers"; it is the task
/// limit of a run, not a thread count). See the module docs on the recovery stall: it
/// must exceed the memtables recovery can queue for one partition (one per sealed
/// journal; fjall keeps at most 512 MiB of journals in files of about 16 MiB).
const FLUSH_TASKS_PER_RUN: usize = 64;

pub struct FjallEngine {
    keyspace: Keyspace,
    log: PartitionHandle,
    meta: PartitionHandle,
    data: PartitionHandle,
    ap: PartitionHandle,
    hints: PartitionHandle,
    ap_index: PartitionHandle,
}

fn engine_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::Engine(e.to_string())
}

impl FjallEngine {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<FjallEngine> {
        std::fs::create_dir_all(dir)?;
        let keyspace = Config::new(dir)
            .flush_workers(FLUSH_TASKS_PER_RUN)
            .open()
            .map_err(engine_err)?;
        let open = |tree: Tree| {
            keyspace
                .open_partition(tree.name(), PartitionCreateOptions::default())
                .map_err(engine_err)
        };
        Ok(FjallEngine {
            log: open(Tree::Log)?,
            meta: open(Tree::Meta)?,
            data: open(Tree::Data)?,
            ap: open(Tree::Ap)?,
            hints: open(Tree::Hints)?,
            ap_index: open(Tree::ApIndex)?,
            keyspace,
        })
    }

    fn partition(&self, tree: Tree) -> &PartitionHandle {
        match tree {
            Tree::Log => &self.log,
            Tree::Meta => &self.meta,
            Tree::Data => &self.data,
            Tree::Ap => &self.ap,
            Tree::Hints => &self.hints,
            Tree::ApIndex => &self.ap_index,
        }
    }
}

impl Engine for FjallEngine {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .partition(tree)
            .get(key)
            .map_err(engine_err)?
            .map(|v| v.to_vec()))
    }

    fn range(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let p = self.partition(tree);
        let iter: Box<dyn Iterator<Item = _>> = match end {
            Some(end) => Box::new(p.range(start..end)),
            None => Box::new(p.range(start..)),
        };
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (k, v) = item.map_err(engine_err)?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn last_in_range(&self, tree: Tree, start: &[u8], end: Option<&[u8]>) -> Result<Option<Entry>> {
        let p = self.partition(tree);
        let last = match end {
            Some(end) => p.range(start..end).next_back(),
            None => p.range(start..).next_back(),
        };
        match last {
            None => Ok(None),
            Some(item) => {
                let (k, v) = item.map_err(engine_err)?;
                Ok(Some((k.to_vec(), v.to_vec())))
            }
        }
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut b = self.keyspace.batch();
        for (tree, key, value) in batch.ops {
            match value {
                Some(v) => b.insert(self.partition(tree), key, v),
                None => b.remove(self.partition(tree), key),
            }
        }
        b.commit().map_err(engine_err)
    }

    fn sync(&self) -> Result<()> {
        self.keyspace
            .persist(PersistMode::SyncAll)
            .map_err(engine_err)
    }

    /// An LSM snapshot at the keyspace's visible sequence number: it pins the segments
    /// and memtables it reads (no copy); fjall keeps versions it needs from being
    /// compacted away until it is dropped.
    fn read_view(&self, tree: Tree) -> Result<Box<dyn ReadView>> {
        Ok(Box::new(FjallView(
            self.partition(tree).snapshot_at(self.keyspace.instant()),
        )))
    }

    fn report_gauges(&self) {
        metrics::gauge!("capkv_storage_write_buffer_bytes")
            .set(self.keyspace.write_buffer_size() as f64);
        metrics::gauge!("capkv_storage_journals").set(self.keyspace.journal_count() as f64);
        metrics::gauge!("capkv_storage_journal_bytes")
            .set(self.keyspace.journal_disk_space() as f64);
        metrics::gauge!("capkv_storage_disk_bytes").set(self.keyspace.disk_space() as f64);
    }
}

struct FjallView(fjall::Snapshot);

impl ReadView for FjallView {
    fn iter_from<'a>(&'a self, start: &[u8]) -> Box<dyn Iterator<Item = Result<Entry>> + 'a> {
        Box::new(self.0.range(start.to_vec()..).map(|item| {
            item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(engine_err)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fjall_engine_behaves_like_an_engine() {
        let dir = tempfile::tempdir().unwrap();
        super::super::engine_tests::check_engine(&FjallEngine::open(dir.path()).unwrap());
    }

    #[test]
    fn synced_writes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let e = FjallEngine::open(dir.path()).unwrap();
            let mut b = WriteBatch::new();
            b.put(Tree::Log, 7u64.to_be_bytes().to_vec(), b"entry".to_vec());
            e.write(b).unwrap();
            e.sync().unwrap();
        }
        let e = FjallEngine::open(dir.path()).unwrap();
        assert_eq!(
            e.get(Tree::Log, &7u64.to_be_bytes()).unwrap(),
            Some(b"entry".to_vec())
        );
    }
}
