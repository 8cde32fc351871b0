//! The Merkle leaves anti-entropy compares, kept up to date on every write (#9 item 4).
//!
//! For each peer, leaf `i` (of [`LEAVES`]) is the XOR of `hash(storage key, digest)` over
//! the objects this node holds whose ring hash falls in range `i` and whose preference
//! list holds both nodes. XOR makes a leaf independent of order and lets one change
//! update it in place: the replica tells [`Leaves::changed`] of every object it writes
//! (digest before and after), so an exchange never scans the store to build its tree.
//!
//! The leaves are built from the index ([`Tree::ApIndex`](crate::storage::Tree), keyed
//! by ring hash) a leaf at a time: at the first exchange, when the set of ap keyspaces
//! changes (a key's sharing depends on its keyspace's `n`), and for the leaves an
//! exchange found different but had nothing to repair in (a leaf that drifted). A leaf
//! is recomputed while the replica holds its write lock, and every change holds its
//! leaf's read lock from its storage write to its `changed` call, so a recomputed leaf
//! neither misses a change nor counts one twice.

use std::collections::BTreeMap;
use std::sync::Mutex;

use capkv_core::{ApiError, KeyspaceSpec, Mode};

use super::replica::{leaf_of, split_obj_key_ref, Replica, LEAVES};
use super::ring::{hash64, Ring};
use crate::cluster::NodeId;

/// One object's contribution to its leaf.
pub fn entry_hash(k: &[u8], digest: u64) -> u64 {
    let mut entry = Vec::with_capacity(k.len() + 8);
    entry.extend_from_slice(k);
    entry.extend_from_slice(&digest.to_be_bytes());
    hash64(&entry)
}

#[derive(Default)]
struct State {
    /// The `n` of each ap keyspace the leaves were built for; `None`: not built yet.
    specs: Option<BTreeMap<String, usize>>,
    by_peer: BTreeMap<NodeId, Vec<u64>>,
}

pub struct Leaves {
    me: NodeId,
    ring: Ring,
    state: Mutex<State>,
}

impl Leaves {
    pub fn new(me: NodeId, ring: Ring) -> Leaves {
        Leaves {
            me,
            ring,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The peers that share an object of `keyspace` at ring `hash` with this node.
    fn sharing(&self, specs: &BTreeMap<String, usize>, keyspace: &str, hash: u64) -> Vec<NodeId> {
        let Some(n) = specs.get(keyspace) else {
            return Vec::new();
        };
        let pl = self.ring.preference_list(hash, *n);
        if !pl.contains(&self.me) {
            return Vec::new();
        }
        pl.into_iter().filter(|p| *p != self.me).collect()
    }

    /// An object changed (see [`Replica::set_observer`]).
    pub fn changed(
        &self,
        keyspace: &str,
        k: &[u8],
        hash: u64,
        before: Option<u64>,
        after: Option<u64>,
    ) {
        let delta = before.map_or(0, |d| entry_hash(k, d)) ^ after.map_or(0, |d| entry_hash(k, d));
        let mut state = self.lock();
        let State { specs, by_peer } = &mut *state;
        let Some(specs) = specs else { return };
        for peer in self.sharing(specs, keyspace, hash) {
            by_peer.entry(peer).or_insert_with(|| vec![0; LEAVES])[leaf_of(hash)] ^= delta;
        }
    }

    /// The leaves shared with `peer`, once built for `specs` (rebuilt first if the ap
    /// keyspaces changed). Blocking: a rebuild reads the whole index.
    pub fn tree(
        &self,
        replica: &Replica,
        specs: &BTreeMap<String, KeyspaceSpec>,
        peer: NodeId,
    ) -> Result<Vec<u64>, ApiError> {
        let wanted: BTreeMap<String, usize> = specs
            .values()
            .filter(|s| s.mode == Mode::Ap)
            .map(|s| (s.name.clone(), s.n.unwrap_or(3) as usize))
            .collect();
        let stale = self.lock().specs.as_ref() != Some(&wanted);
        if stale {
            {
                let mut state = self.lock();
                state.specs = Some(wanted);
                state.by_peer.clear();
            }
            self.recompute(replica, &(0..LEAVES).collect::<Vec<_>>())?;
        }
        Ok(self
            .lock()
            .by_peer
            .get(&peer)
            .cloned()
            .unwrap_or_else(|| vec![0; LEAVES]))
    }

    /// Recomputes `leaves` (for every peer) from the index.
    pub fn recompute(&self, replica: &Replica, leaves: &[usize]) -> Result<(), ApiError> {
        for &leaf in leaves {
            replica.with_leaf(leaf, |entries| {
                let mut state = self.lock();
                let State { specs, by_peer } = &mut *state;
                let Some(specs) = specs else { return };
                for v in by_peer.values_mut() {
                    v[leaf % LEAVES] = 0;
                }
                for (hash, k, digest) in entries {
                    let Some((ks, _)) = split_obj_key_ref(&k) else {
                        continue;
                    };
                    for peer in self.sharing(specs, ks, hash) {
                        by_peer.entry(peer).or_insert_with(|| vec![0; LEAVES])[leaf % LEAVES] ^=
                            entry_hash(&k, digest);
                    }
                }
            })?;
        }
        Ok(())
    }

    /// Whether `peer` shares the object of `keyspace` at `hash` with this node (as of the
    /// specs the leaves were built for).
    pub fn shares(&self, peer: NodeId, keyspace: &str, hash: u64) -> bool {
        let state = self.lock();
        state
            .specs
            .as_ref()
            .is_some_and(|specs| self.sharing(specs, keyspace, hash).contains(&peer))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use capkv_core::ValueType;

    use super::*;
    use crate::ap::dvv::Context;
    use crate::ap::value::Mutation;
    use crate::storage::{Engine, GroupCommit, MemoryEngine, Tree, WriteBatch};

    fn specs(n: u32) -> BTreeMap<String, KeyspaceSpec> {
        let spec: KeyspaceSpec =
            serde_json::from_str(&format!(r#"{{"name":"cart","mode":"ap","n":{n}}}"#)).unwrap();
        BTreeMap::from([("cart".to_string(), spec)])
    }

    fn write(v: Option<&str>) -> Mutation {
        Mutation::Write {
            context: Context::default(),
            value: v.map(|v| v.as_bytes().to_vec()),
        }
    }

    /// #9 item 4: leaves kept on every write (updates, batch merges, collections) equal
    /// the leaves computed from scratch, for every peer.
    #[tokio::test]
    async fn leaves_kept_on_write_equal_leaves_rebuilt_from_the_index() {
        let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let replica = Arc::new(Replica::new(engine.clone(), GroupCommit::start(engine)).unwrap());
        let ring = Ring::new([1, 2, 3, 4, 5], 16);
        let leaves = Arc::new(Leaves::new(1, ring));
        let observer = leaves.clone();
        replica.set_observer(Arc::new(move |ks, k, h, b, a| {
            observer.changed(ks, k, h, b, a)
        }));
        let specs = specs(3);
        leaves.tree(&replica, &specs, 2).unwrap();
        for i in 0..300u32 {
            let key = format!("k{}", i % 120);
            let value = (i % 7 != 0).then(|| format!("v{i}"));
            replica
                .update(
                    "cart",
                    key.as_bytes(),
                    ValueType::Register,
                    &write(value.as_deref()),
                    "n1.a",
                    u64::from(i),
                )
                .await
                .unwrap();
        }
        let from_elsewhere: Vec<_> = (0..50u32)
            .map(|i| {
                let state = crate::ap::value::ApState::empty(ValueType::Register)
                    .apply(&write(Some("x")), "n2.b", u64::from(i))
                    .unwrap();
                (
                    "cart".to_string(),
                    format!("k{}", i * 3).into_bytes(),
                    state,
                )
            })
            .collect();
        replica.merge_many(from_elsewhere).await.unwrap();
        // A collection drops a tombstone's copy.
        let tomb = replica
            .update("cart", b"t", ValueType::Register, &write(None), "n1.a", 999)
            .await
            .unwrap()
            .state;
        assert!(tomb.is_tombstone());
        assert_eq!(
            replica
                .reap("cart", b"t", &tomb, &[], "n1.a")
                .await
                .unwrap(),
            1
        );
        let kept: Vec<Vec<u64>> = (2..=5)
            .map(|p| leaves.tree(&replica, &specs, p).unwrap())
            .collect();
        assert!(
            kept.iter().any(|l| l.iter().any(|h| *h != 0)),
            "something is shared"
        );
        leaves
            .recompute(&replica, &(0..LEAVES).collect::<Vec<_>>())
            .unwrap();
        let rebuilt: Vec<Vec<u64>> = (2..=5)
            .map(|p| leaves.tree(&replica, &specs, p).unwrap())
            .collect();
        assert_eq!(kept, rebuilt);
        // Other specs (n=2) rebuild the leaves: fewer keys are shared with each peer.
        let narrower: Vec<Vec<u64>> = (2..=5)
            .map(|p| leaves.tree(&replica, &specs_n2(), p).unwrap())
            .collect();
        assert_ne!(narrower, rebuilt);
    }

    fn specs_n2() -> BTreeMap<String, KeyspaceSpec> {
        specs(2)
    }

    /// A store written before the index existed gets it at start.
    #[test]
    fn the_index_is_built_at_start_for_an_older_store() {
        let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let state = crate::ap::value::ApState::empty(ValueType::Register)
            .apply(&write(Some("v")), "n1.a", 1)
            .unwrap();
        let mut b = WriteBatch::new();
        for i in 0..5000 {
            b.put(
                Tree::Ap,
                crate::ap::replica::obj_key("cart", format!("k{i}").as_bytes()),
                crate::codec::encode(&state),
            );
        }
        engine.write(b).unwrap();
        let replica = Replica::new(engine.clone(), GroupCommit::start(engine.clone())).unwrap();
        let indexed: usize = (0..LEAVES)
            .map(|l| replica.leaf_entries(l, None, usize::MAX).unwrap().len())
            .sum();
        assert_eq!(indexed, 5000);
        assert_eq!(
            engine
                .range(Tree::ApIndex, b"", None, usize::MAX)
                .unwrap()
                .len(),
            5000
        );
    }
}
