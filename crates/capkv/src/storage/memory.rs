//! An in-memory engine: ordered maps under one lock. For tests of the layers above
//! storage, and for the simulator (`crate::sim`), which needs the fsync line:
//! [`MemoryEngine::with_fsync_line`] keeps, beside what reads see, what an fsync has made
//! durable, so [`MemoryEngine::crash`] can lose exactly what a power cut would.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use std::sync::Arc;

use super::{Engine, Entry, ReadView, Result, StorageError, Tree, WriteBatch};

type OrderedMap = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Default)]
pub struct MemoryEngine {
    trees: RwLock<BTreeMap<Tree, OrderedMap>>,
    syncs: AtomicU64,
    /// With the fsync line: what survives a crash.
    durable: Option<Mutex<Durable>>,
}

/// The durable side of an engine with the fsync line.
#[derive(Default)]
struct Durable {
    /// The trees as of the last sync.
    trees: BTreeMap<Tree, OrderedMap>,
    /// Batches written since, in order: a crash keeps some prefix of them (a journal is
    /// written in order; how much of it reached the disk before the cut is chance).
    unsynced: Vec<WriteBatch>,
    /// A crash point armed by [`MemoryEngine::crash_after_write`].
    trip: Option<Trip>,
    /// The crash point was passed: the process is dead to its disk, nothing more it
    /// writes or syncs reaches it (until [`MemoryEngine::crash`]).
    dead: bool,
}

/// A crash point: right after the `skip + 1`-th write that touches `tree` (that deletes
/// from it, if `deletes`).
struct Trip {
    tree: Tree,
    deletes: bool,
    skip: u32,
    then: Box<dyn FnOnce() + Send>,
}

fn apply(trees: &mut BTreeMap<Tree, OrderedMap>, batch: WriteBatch) {
    for (tree, key, value) in batch.ops {
        let t = trees.entry(tree).or_default();
        match value {
            Some(v) => {
                t.insert(key, v);
            }
            None => {
                t.remove(&key);
            }
        }
    }
}

impl MemoryEngine {
    pub fn new() -> MemoryEngine {
        MemoryEngine::default()
    }

    /// An engine that tells what was synced from what was only written (see
    /// [`MemoryEngine::crash`]).
    pub fn with_fsync_line() -> MemoryEngine {
        MemoryEngine {
            durable: Some(Mutex::default()),
            ..MemoryEngine::default()
        }
    }

    /// Arms a crash point: right after the `skip + 1`-th batch from now that writes to
    /// `tree` (that deletes from it, if `deletes`: deletions are rarer, and each ends
    /// or undoes something, so they are points worth dying at), the process is dead to
    /// this disk: what it writes or syncs from then on fails and reaches nothing (so the
    /// rest of the poll it died in cannot act as if it were durable), and `then` runs,
    /// inside that write (it must not call the engine), to end the process's tasks before
    /// any other runs. [`MemoryEngine::crash`] then decides what of
    /// the unsynced writes before the point survived. Without the fsync line, nothing.
    pub fn crash_after_write(
        &self,
        tree: Tree,
        deletes: bool,
        skip: u32,
        then: impl FnOnce() + Send + 'static,
    ) {
        if let Some(durable) = &self.durable {
            durable.lock().expect("memory engine lock poisoned").trip = Some(Trip {
                tree,
                deletes,
                skip,
                then: Box::new(then),
            });
        }
    }

    /// A new process opens the disk: writes count again.
    pub fn revive(&self) {
        if let Some(durable) = &self.durable {
            durable.lock().expect("memory engine lock poisoned").dead = false;
        }
    }

    /// Takes back an armed crash point that was not reached; true if one was.
    pub fn disarm(&self) -> bool {
        self.durable.as_ref().is_some_and(|d| {
            d.lock()
                .expect("memory engine lock poisoned")
                .trip
                .take()
                .is_some()
        })
    }

    /// A crash: everything synced survives, and of the batches written since the last
    /// sync, the first `keep(n)` of the `n` survive (at most `n`). Returns how many were
    /// lost. Without the fsync line nothing is lost. Until [`MemoryEngine::revive`],
    /// writes reach no durable state (the dead process may still be finishing a poll).
    pub fn crash(&self, keep: impl FnOnce(usize) -> usize) -> usize {
        let Some(durable) = &self.durable else {
            return 0;
        };
        let mut trees = self.trees.write().expect("memory engine lock poisoned");
        let mut d = durable.lock().expect("memory engine lock poisoned");
        let unsynced = std::mem::take(&mut d.unsynced);
        d.trip = None;
        // Dead until revived: what the rest of a dying task writes is lost too.
        d.dead = true;
        let kept = keep(unsynced.len()).min(unsynced.len());
        let lost = unsynced.len() - kept;
        for b in unsynced.into_iter().take(kept) {
            apply(&mut d.trees, b);
        }
        *trees = d.trees.clone();
        lost
    }

    /// How many times `sync` was called (tests use it to observe group commit).
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }
}

fn bounds<'a>(start: &'a [u8], end: Option<&'a [u8]>) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    (
        Bound::Included(start),
        end.map_or(Bound::Unbounded, Bound::Excluded),
    )
}

/// A range whose end is before its start is empty (as in fjall), not a panic.
fn empty_range(start: &[u8], end: Option<&[u8]>) -> bool {
    end.is_some_and(|e| e < start)
}

impl Engine for MemoryEngine {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let trees = self.trees.read().expect("memory engine lock poisoned");
        Ok(trees.get(&tree).and_then(|t| t.get(key).cloned()))
    }

    fn range(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let trees = self.trees.read().expect("memory engine lock poisoned");
        let Some(t) = trees.get(&tree).filter(|_| !empty_range(start, end)) else {
            return Ok(Vec::new());
        };
        Ok(t.range::<[u8], _>(bounds(start, end))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last_in_range(&self, tree: Tree, start: &[u8], end: Option<&[u8]>) -> Result<Option<Entry>> {
        let trees = self.trees.read().expect("memory engine lock poisoned");
        let Some(t) = trees.get(&tree).filter(|_| !empty_range(start, end)) else {
            return Ok(None);
        };
        Ok(t.range::<[u8], _>(bounds(start, end))
            .next_back()
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut trees = self.trees.write().expect("memory engine lock poisoned");
        let mut tripped = None;
        if let Some(durable) = &self.durable {
            let mut d = durable.lock().expect("memory engine lock poisoned");
            if d.dead {
                // The process is dead: the rest of the poll it died in reaches nothing.
                return Err(StorageError::Engine("the process crashed".into()));
            }
            d.unsynced.push(batch.clone());
            let hits = |t: &Trip| {
                batch
                    .ops
                    .iter()
                    .any(|(tree, _, v)| *tree == t.tree && (!t.deletes || v.is_none()))
            };
            match &mut d.trip {
                Some(t) if hits(t) && t.skip > 0 => t.skip -= 1,
                Some(t) if hits(t) => {
                    d.dead = true;
                    tripped = d.trip.take();
                }
                _ => {}
            }
        }
        apply(&mut trees, batch);
        drop(trees);
        if let Some(t) = tripped {
            (t.then)();
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        if let Some(durable) = &self.durable {
            let mut d = durable.lock().expect("memory engine lock poisoned");
            if d.dead {
                // The process died: its fsync never happens, and it must not go on as if
                // its writes were durable (remove the files they replace, answer peers).
                return Err(StorageError::Engine("the process crashed".into()));
            }
            for b in std::mem::take(&mut d.unsynced) {
                apply(&mut d.trees, b);
            }
        }
        Ok(())
    }

    /// A copy of the tree: the data is in memory already, so a copy is what a frozen
    /// view costs here.
    fn read_view(&self, tree: Tree) -> Result<Box<dyn ReadView>> {
        let trees = self.trees.read().expect("memory engine lock poisoned");
        Ok(Box::new(MemoryView(Arc::new(
            trees.get(&tree).cloned().unwrap_or_default(),
        ))))
    }
}

struct MemoryView(Arc<OrderedMap>);

impl ReadView for MemoryView {
    fn iter_from<'a>(&'a self, start: &[u8]) -> Box<dyn Iterator<Item = Result<Entry>> + 'a> {
        Box::new(
            self.0
                .range::<[u8], _>((Bound::Included(start), Bound::Unbounded))
                .map(|(k, v)| Ok((k.clone(), v.clone()))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_engine_behaves_like_an_engine() {
        super::super::engine_tests::check_engine(&MemoryEngine::new());
        super::super::engine_tests::check_engine(&MemoryEngine::with_fsync_line());
    }

    fn put(e: &MemoryEngine, k: &str) {
        let mut b = WriteBatch::new();
        b.put(Tree::Data, k.as_bytes().to_vec(), b"v".to_vec());
        e.write(b).unwrap();
    }

    fn keys(e: &MemoryEngine) -> Vec<Vec<u8>> {
        e.range(Tree::Data, b"", None, 100)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    #[test]
    fn a_crash_loses_what_was_not_synced_but_a_prefix_may_survive() {
        let e = MemoryEngine::with_fsync_line();
        put(&e, "a");
        e.sync().unwrap();
        put(&e, "b");
        put(&e, "c");
        put(&e, "d");
        assert_eq!(keys(&e).len(), 4, "reads see what was written");
        assert_eq!(e.crash(|n| n - 2), 2, "the last two batches are lost");
        assert_eq!(keys(&e), vec![b"a".to_vec(), b"b".to_vec()]);
        let mut late = WriteBatch::new();
        late.put(Tree::Data, b"dead".to_vec(), b"v".to_vec());
        assert!(e.write(late).is_err(), "a dead process writes nothing");
        assert!(e.sync().is_err(), "nor syncs");
        assert_eq!(e.crash(|n| n), 0);
        assert_eq!(keys(&e), vec![b"a".to_vec(), b"b".to_vec()]);
        e.revive();
        // What survived a crash is durable: a second crash keeps it.
        put(&e, "e");
        assert_eq!(e.crash(|_| 0), 1);
        assert_eq!(keys(&e), vec![b"a".to_vec(), b"b".to_vec()]);
        e.revive();
        assert_eq!(e.crash(|_| 99), 0, "nothing more to lose");
        e.revive();
        // A crash point: the process dies right after the second write to Log from now.
        let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = fired.clone();
        e.crash_after_write(Tree::Log, false, 1, move || f.store(true, Ordering::SeqCst));
        let mut log = WriteBatch::new();
        log.put(Tree::Log, b"l1".to_vec(), b"v".to_vec());
        e.write(log.clone()).unwrap();
        put(&e, "f");
        assert!(!fired.load(Ordering::SeqCst));
        e.write(log).unwrap();
        assert!(
            fired.load(Ordering::SeqCst),
            "fired by the second Log write"
        );
        // The rest of the poll it died in: refused, neither seen nor durable.
        let mut g = WriteBatch::new();
        g.put(Tree::Data, b"g".to_vec(), b"v".to_vec());
        assert!(e.write(g).is_err());
        assert!(
            e.sync().is_err(),
            "a dead process's fsync fails: it cannot act on it"
        );
        assert!(!keys(&e).contains(&b"g".to_vec()));
        assert_eq!(e.crash(|n| n), 0, "kept every batch up to the point");
        e.revive();
        assert_eq!(
            keys(&e),
            [&b"a"[..], b"b", b"f"].map(<[u8]>::to_vec).to_vec()
        );
        assert!(!e.disarm(), "nothing armed any more");
        // An engine without the line loses nothing.
        let plain = MemoryEngine::new();
        put(&plain, "x");
        assert_eq!(plain.crash(|_| 0), 0);
        assert_eq!(keys(&plain).len(), 1);
    }
}
