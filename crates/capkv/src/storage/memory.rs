//! An in-memory engine: ordered maps under one lock. For tests of the layers above
//! storage; `sync` only counts, since there is nothing to make durable.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use std::sync::Arc;

use super::{Engine, Entry, ReadView, Result, Tree, WriteBatch};

type OrderedMap = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Default)]
pub struct MemoryEngine {
    trees: RwLock<BTreeMap<Tree, OrderedMap>>,
    syncs: AtomicU64,
}

impl MemoryEngine {
    pub fn new() -> MemoryEngine {
        MemoryEngine::default()
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
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
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
    }
}
