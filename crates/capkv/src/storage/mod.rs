//! Storage: the `Engine` trait and its two implementations.
//!
//! Everything a node persists goes through [`Engine`]: the Raft log and vote, the state
//! machine's data, and the last snapshot. The trait is deliberately small (point reads,
//! ordered range reads, atomic write batches, and an explicit `sync`) so that the cp
//! layer states its own ordering rules in terms of it:
//!
//! - a write batch is atomic (all of its operations are visible, or none) but **not**
//!   durable until a later [`Engine::sync`] returns;
//! - `sync` makes every batch written before it durable (fsync);
//! - after a process crash, the batches that survive are a prefix of those written (fjall
//!   keeps one journal for all trees). Code that must survive a crash part way through a
//!   sequence of batches (log purge and truncation) orders them so every prefix is valid.
//!
//! [`GroupCommit`] turns many "write, then wait for sync" callers into one fsync.
//!
//! Two engines: [`FjallEngine`] (an LSM tree on disk, the production engine) and
//! [`MemoryEngine`] (ordered maps, for tests of the layers above).

mod fjall_engine;
mod group_commit;
mod memory;
mod watched;

pub use fjall_engine::FjallEngine;
pub use group_commit::GroupCommit;
pub use memory::MemoryEngine;
pub use watched::{off_the_workers, Watched};

#[cfg(test)]
pub use crash::CrashAfter;

/// The separate ordered key spaces of a node's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tree {
    /// Raft log entries, keyed by big-endian index.
    Log,
    /// Small records: the Raft vote, committed and purged ids, the state machine's
    /// applied id and membership, the current snapshot; the node's incarnation and ap
    /// reap floor.
    Meta,
    /// The replicated state machine: keyspaces, keys, idempotency records.
    Data,
    /// ap replicas: one dotted-version-vector object per key this node holds.
    Ap,
    /// ap hints: objects held for an unreachable home replica (hinted handoff).
    Hints,
    /// ap replicas by ring position: `ring hash (u64 BE) ++ keyspace \0 key` → the
    /// object's digest (u64 BE). Written in the batch of every `Ap` change, so an
    /// anti-entropy leaf (a range of ring hashes) is one range read.
    ApIndex,
}

impl Tree {
    pub const ALL: [Tree; 6] = [
        Tree::Log,
        Tree::Meta,
        Tree::Data,
        Tree::Ap,
        Tree::Hints,
        Tree::ApIndex,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tree::Log => "raft_log",
            Tree::Meta => "meta",
            Tree::Data => "data",
            Tree::Ap => "ap",
            Tree::Hints => "hints",
            Tree::ApIndex => "ap_index",
        }
    }
}

/// A storage failure. Storage errors are not recoverable by the caller: the cp layer
/// turns them into a fatal Raft error and the node stops serving.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("corrupt record in {tree}: {detail}")]
    Corrupt { tree: &'static str, detail: String },
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// One operation of a write batch: `Some(value)` puts, `None` deletes.
pub type WriteOp = (Tree, Vec<u8>, Option<Vec<u8>>);

/// An ordered list of writes applied atomically by [`Engine::write`].
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    pub ops: Vec<WriteOp>,
}

impl WriteBatch {
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }
    pub fn put(&mut self, tree: Tree, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((tree, key.into(), Some(value.into())));
    }
    pub fn delete(&mut self, tree: Tree, key: impl Into<Vec<u8>>) {
        self.ops.push((tree, key.into(), None));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// A key-value pair read from a tree.
pub type Entry = (Vec<u8>, Vec<u8>);

/// An ordered, atomic-batch key-value store with an explicit durability point.
pub trait Engine: Send + Sync + 'static {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Entries with `start <= key < end` (no upper bound when `end` is `None`), in key
    /// order, at most `limit` of them.
    fn range(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>>;

    /// The entry with the largest key in `start <= key < end`, if any.
    fn last_in_range(&self, tree: Tree, start: &[u8], end: Option<&[u8]>) -> Result<Option<Entry>>;

    /// Applies every operation of the batch atomically. Not durable until [`Engine::sync`].
    fn write(&self, batch: WriteBatch) -> Result<()>;

    /// Makes every batch written so far durable (fsync).
    fn sync(&self) -> Result<()>;

    /// A frozen view of `tree` as of now: writes after this call are not seen through
    /// it, and it costs no copy of the data (an LSM snapshot). cp snapshots are built
    /// from one while applies go on (#9 item 1).
    fn read_view(&self, tree: Tree) -> Result<Box<dyn ReadView>>;

    /// How long reads, writes or fsyncs (each kind on its own) have been waiting with
    /// none of that kind finishing, if one is waiting now: the longest.
    fn stall(&self) -> Option<std::time::Duration> {
        None
    }

    /// Sets the engine's own gauges (buffer and journal sizes) for `/metrics`.
    fn report_gauges(&self) {}
}

#[cfg(test)]
mod crash {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// An engine that stops taking writes after `writes_left` batches: a crash between
    /// two batches. The inner engine then holds exactly what survived.
    pub struct CrashAfter {
        pub inner: Arc<MemoryEngine>,
        pub writes_left: AtomicUsize,
    }

    impl Engine for CrashAfter {
        fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
            self.inner.get(tree, key)
        }
        fn range(
            &self,
            tree: Tree,
            start: &[u8],
            end: Option<&[u8]>,
            limit: usize,
        ) -> Result<Vec<Entry>> {
            self.inner.range(tree, start, end, limit)
        }
        fn last_in_range(
            &self,
            tree: Tree,
            start: &[u8],
            end: Option<&[u8]>,
        ) -> Result<Option<Entry>> {
            self.inner.last_in_range(tree, start, end)
        }
        fn write(&self, batch: WriteBatch) -> Result<()> {
            let left = self.writes_left.load(Ordering::SeqCst);
            if left == 0 {
                return Err(StorageError::Engine("crashed".into()));
            }
            self.writes_left.store(left - 1, Ordering::SeqCst);
            self.inner.write(batch)
        }
        fn sync(&self) -> Result<()> {
            self.inner.sync()
        }
        fn read_view(&self, tree: Tree) -> Result<Box<dyn ReadView>> {
            self.inner.read_view(tree)
        }
    }
}

/// An engine shared by owners (the simulator keeps a node's disk across its restarts).
impl<E: Engine + ?Sized> Engine for std::sync::Arc<E> {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        (**self).get(tree, key)
    }
    fn range(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        (**self).range(tree, start, end, limit)
    }
    fn last_in_range(&self, tree: Tree, start: &[u8], end: Option<&[u8]>) -> Result<Option<Entry>> {
        (**self).last_in_range(tree, start, end)
    }
    fn write(&self, batch: WriteBatch) -> Result<()> {
        (**self).write(batch)
    }
    fn sync(&self) -> Result<()> {
        (**self).sync()
    }
    fn read_view(&self, tree: Tree) -> Result<Box<dyn ReadView>> {
        (**self).read_view(tree)
    }
    fn stall(&self) -> Option<std::time::Duration> {
        (**self).stall()
    }
    fn report_gauges(&self) {
        (**self).report_gauges()
    }
}

/// A frozen, ordered view of one tree (see [`Engine::read_view`]).
pub trait ReadView: Send + Sync + 'static {
    /// The entries with `key >= start`, in key order, read as the iterator goes (one
    /// entry in memory at a time, whatever their sizes).
    fn iter_from<'a>(&'a self, start: &[u8]) -> Box<dyn Iterator<Item = Result<Entry>> + 'a>;
}

/// The smallest key greater than every key with this prefix, or `None` if there is
/// none (the prefix is all 0xff bytes). Used as the exclusive end of a prefix range.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The range of a prefix scan resuming after `after` (both already full storage keys):
/// from the first key strictly after `after`, or from `prefix` if that is later, to the
/// end of the prefix.
pub fn prefix_range_after(prefix: Vec<u8>, after: Option<Vec<u8>>) -> (Vec<u8>, Option<Vec<u8>>) {
    let end = prefix_end(&prefix);
    let start = match after {
        Some(mut a) => {
            a.push(0); // the smallest key strictly after `after`
            a.max(prefix)
        }
        None => prefix,
    };
    (start, end)
}

#[cfg(test)]
pub(crate) mod engine_tests {
    //! Behaviour every engine must share; run against both implementations.
    use super::*;

    pub fn check_engine(e: &dyn Engine) {
        assert_eq!(e.get(Tree::Data, b"a").unwrap(), None);
        let mut b = WriteBatch::new();
        b.put(Tree::Data, b"a".to_vec(), b"1".to_vec());
        b.put(Tree::Data, b"b".to_vec(), b"2".to_vec());
        b.put(Tree::Data, b"c".to_vec(), b"3".to_vec());
        b.put(Tree::Log, b"a".to_vec(), b"log".to_vec());
        e.write(b).unwrap();
        e.sync().unwrap();
        assert_eq!(e.get(Tree::Data, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(e.get(Tree::Log, b"a").unwrap(), Some(b"log".to_vec()));
        assert_eq!(e.get(Tree::Meta, b"a").unwrap(), None, "trees are separate");

        let all = e.range(Tree::Data, b"", None, 100).unwrap();
        assert_eq!(all.len(), 3);
        let some = e.range(Tree::Data, b"b", Some(b"c"), 100).unwrap();
        assert_eq!(some, vec![(b"b".to_vec(), b"2".to_vec())]);
        assert_eq!(e.range(Tree::Data, b"", None, 2).unwrap().len(), 2);
        assert_eq!(
            e.last_in_range(Tree::Data, b"", None).unwrap().unwrap().0,
            b"c".to_vec()
        );
        assert_eq!(
            e.last_in_range(Tree::Data, b"a", Some(b"c"))
                .unwrap()
                .unwrap()
                .0,
            b"b".to_vec()
        );
        assert_eq!(e.last_in_range(Tree::Data, b"x", None).unwrap(), None);

        let mut b = WriteBatch::new();
        b.delete(Tree::Data, b"a".to_vec());
        b.put(Tree::Data, b"b".to_vec(), b"22".to_vec());
        e.write(b).unwrap();
        assert_eq!(e.get(Tree::Data, b"a").unwrap(), None);
        assert_eq!(e.get(Tree::Data, b"b").unwrap(), Some(b"22".to_vec()));
    }

    #[test]
    fn prefix_end_is_the_next_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }
}
