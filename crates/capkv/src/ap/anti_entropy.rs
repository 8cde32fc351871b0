//! Anti-entropy: replicas compare Merkle trees and exchange only the ranges that differ.
//!
//! For a pair of nodes (A, B), the tree covers the keys both should hold (both are in
//! the key's preference list). Leaf `i` (of [`LEAVES`]) is the XOR of
//! `hash(key, digest(state))` over the keys whose ring hash falls in range `i`; XOR makes
//! a leaf independent of scan order. Sixteen interior nodes cover sixteen leaves each.
//!
//! ```text
//!   A ── AeCompare {root, 16 interior hashes} ──────────────▶ B
//!   A ◀── leaf hashes of the interior nodes that differ ────── B
//!   A ── AeFetch {differing leaves} ─────────────────────────▶ B
//!   A ◀── B's objects in those leaves ──────────────────────── B
//!   A merges them; A ── ApStore (its objects B lacks) ───────▶ B
//! ```
//!
//! Rate-limited: one exchange per [`AE_INTERVAL`], peers in turn, at most
//! [`AE_KEYS_MAX`] objects moved per exchange. Equal trees cost one round trip of 17
//! hashes. Caveat: trees are rebuilt by scanning the local replica each exchange
//! (fine at the sizes we test; large stores want trees maintained on write).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capkv_core::{ApiError, KeyspaceSpec, Mode};
use serde::{Deserialize, Serialize};

use super::coordinator::Coordinator;
use super::replica::{obj_key, StoredObject};
use super::ring::{hash64, key_hash};
use super::value::ApState;
use crate::cp::NodeId;
use crate::rpc::{PeerRequest, PeerResponse};

pub const LEAVES: usize = 256;
const FANOUT: usize = 16;
pub const AE_INTERVAL: Duration = Duration::from_secs(2);
pub const AE_KEYS_MAX: usize = 1000;
/// Objects scanned per storage read while building a tree.
const SCAN_CHUNK: usize = 1024;

/// The Merkle tree of what one node holds in common with one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub leaves: Vec<u64>,
}

impl Tree {
    pub fn interior(&self) -> Vec<u64> {
        self.leaves
            .chunks(FANOUT)
            .map(|c| {
                c.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, l| {
                    hash64(&[h.to_be_bytes(), l.to_be_bytes()].concat())
                })
            })
            .collect()
    }
    pub fn root(&self) -> u64 {
        hash64(
            &self
                .interior()
                .iter()
                .flat_map(|h| h.to_be_bytes())
                .collect::<Vec<u8>>(),
        )
    }
}

fn leaf_of(hash: u64) -> usize {
    (hash >> 56) as usize % LEAVES
}

/// Which keys `me` and `peer` share, per the keyspace specs (ap keyspaces only).
fn shared(
    c: &Coordinator,
    specs: &BTreeMap<String, KeyspaceSpec>,
    peer: NodeId,
    ks: &str,
    key: &[u8],
) -> Option<u64> {
    let spec = specs.get(ks).filter(|s| s.mode == Mode::Ap)?;
    let h = key_hash(ks, key);
    let pl = c.ring.preference_list(h, spec.n.unwrap_or(3) as usize);
    (pl.contains(&c.me) && pl.contains(&peer)).then_some(h)
}

/// Builds this node's tree for `peer` (and, if `leaves` is given, collects the objects
/// in those leaves, up to [`AE_KEYS_MAX`]).
pub fn build(
    c: &Coordinator,
    specs: &BTreeMap<String, KeyspaceSpec>,
    peer: NodeId,
    collect: Option<&[u16]>,
) -> Result<(Tree, Vec<StoredObject>), ApiError> {
    let mut leaves = vec![0u64; LEAVES];
    let mut objects = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let chunk = c.replica.objects(after.as_deref(), SCAN_CHUNK)?;
        let done = chunk.len() < SCAN_CHUNK;
        for (ks, key, state) in chunk {
            after = Some(obj_key(&ks, &key));
            let Some(h) = shared(c, specs, peer, &ks, &key) else {
                continue;
            };
            let leaf = leaf_of(h);
            let mut entry = obj_key(&ks, &key);
            entry.extend_from_slice(&state.digest().to_be_bytes());
            leaves[leaf] ^= hash64(&entry);
            if collect.is_some_and(|l| l.contains(&(leaf as u16))) && objects.len() < AE_KEYS_MAX {
                objects.push((ks, key, state));
            }
        }
        if done {
            return Ok((Tree { leaves }, objects));
        }
    }
}

/// B's side of step 1: the leaves under each interior node whose hash differs from A's.
pub fn compare(mine: &Tree, their_root: u64, their_interior: &[u64]) -> Vec<(u16, Vec<u64>)> {
    if mine.root() == their_root {
        return Vec::new();
    }
    mine.interior()
        .iter()
        .enumerate()
        .filter(|(i, h)| their_interior.get(*i) != Some(h))
        .map(|(i, _)| (i as u16, mine.leaves[i * FANOUT..(i + 1) * FANOUT].to_vec()))
        .collect()
}

/// One exchange with `peer`, driven by this node. Returns the number of keys repaired
/// on either side.
pub async fn exchange(
    c: &Arc<Coordinator>,
    specs: &BTreeMap<String, KeyspaceSpec>,
    peer: NodeId,
) -> Result<u64, ApiError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let call = |req: PeerRequest| {
        let left = deadline.saturating_duration_since(Instant::now());
        let t = c.transport.clone();
        async move {
            t.call(peer, req, left)
                .await
                .map_err(|e| ApiError::unavailable(e.to_string()))
        }
    };
    let (mine, _) = build(c, specs, peer, None)?;
    metrics::counter!("capkv_ap_ae_exchanges_total").increment(1);
    let differing = match call(PeerRequest::AeCompare {
        root: mine.root(),
        interior: mine.interior(),
    })
    .await?
    {
        PeerResponse::AeDiffer(r) => r?,
        _ => return Err(ApiError::internal("wrong reply to AeCompare")),
    };
    let mut leaves: Vec<u16> = Vec::new();
    for (i, theirs) in differing {
        for (j, h) in theirs.iter().enumerate() {
            let leaf = i as usize * FANOUT + j;
            if mine.leaves.get(leaf) != Some(h) {
                leaves.push(leaf as u16);
            }
        }
    }
    if leaves.is_empty() {
        return Ok(0);
    }
    let theirs = match call(PeerRequest::AeFetch {
        leaves: leaves.clone(),
    })
    .await?
    {
        PeerResponse::AeObjects(r) => r?,
        _ => return Err(ApiError::internal("wrong reply to AeFetch")),
    };
    let mut repaired = 0u64;
    let mut theirs_by_key: BTreeMap<Vec<u8>, ApState> = BTreeMap::new();
    for (ks, key, state) in theirs {
        if c.replica.merge(&ks, &key, &state).await?.1 {
            repaired += 1;
        }
        theirs_by_key.insert(obj_key(&ks, &key), state);
    }
    let (_, ours) = build(c, specs, peer, Some(&leaves))?;
    for (ks, key, state) in ours {
        let behind = theirs_by_key
            .get(&obj_key(&ks, &key))
            .is_none_or(|t| !t.dominates(&state));
        if behind {
            match call(PeerRequest::ApStore {
                keyspace: ks,
                key,
                object: state,
            })
            .await?
            {
                PeerResponse::ApAck(r) => r?,
                _ => return Err(ApiError::internal("wrong reply to ApStore")),
            }
            repaired += 1;
        }
    }
    metrics::counter!("capkv_ap_ae_keys_repaired_total").increment(repaired);
    Ok(repaired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_differing_interior_nodes_are_sent_back() {
        let a = Tree {
            leaves: vec![0; LEAVES],
        };
        let mut b = a.clone();
        assert!(
            compare(&b, a.root(), &a.interior()).is_empty(),
            "equal trees: nothing to exchange"
        );
        b.leaves[17] = 42; // interior node 1
        b.leaves[200] = 7; // interior node 12
        let d = compare(&b, a.root(), &a.interior());
        assert_eq!(d.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1, 12]);
        assert_eq!(d[0].1[1], 42);
    }
}
