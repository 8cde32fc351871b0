//! Scans of ap keyspaces: every reachable node's copies, merged page by page.
//!
//! No node holds every key of an ap keyspace (each key lives on its n homes, plus hints
//! on fallbacks), so a scan asks every reachable node for its next page of keys in the
//! range and merges the copies of each key. A node's page is complete only up to its
//! last key when it was cut short (by the limit or the byte bound), so the merged page
//! stops at the smallest such key ([`merge_pages`]); the next page continues after it.
//! Tombstones are merged like any copy (a newer delete hides an older value), then
//! left out of the answer.
//!
//! Like a point read at r=1, a scan answers with what the reachable nodes hold: a key
//! whose every copy is on unreachable nodes is missing from it until the heal.

use crate::rt::Instant;
use std::collections::BTreeMap;
use std::sync::Arc;

use capkv_core::ApiError;
use tokio::task::JoinSet;

use super::coordinator::Coordinator;
use super::value::ApState;
use crate::cp::{encode, NodeId};
use crate::rpc::{PeerRequest, PeerResponse};

/// Keys in order with their state.
pub type Page = Vec<(Vec<u8>, ApState)>;

pub use crate::rpc::PAGE_BYTES_MAX;

/// Merges pages of the same key range from several sources. Each page is sorted and
/// `truncated` when its source may hold further keys after its last. Returns the
/// merged copies of the first keys (at most `limit`, at most [`PAGE_BYTES_MAX`] bytes
/// beyond the first) known to be complete, and whether keys may remain after them.
pub fn merge_pages(pages: Vec<(Page, bool)>, limit: usize) -> (Page, bool) {
    let horizon: Option<Vec<u8>> = pages
        .iter()
        .filter(|(p, truncated)| *truncated && !p.is_empty())
        .filter_map(|(p, _)| p.last().map(|(k, _)| k.clone()))
        .min();
    let mut more = pages.iter().any(|(_, t)| *t);
    let mut merged: BTreeMap<Vec<u8>, ApState> = BTreeMap::new();
    for (page, _) in pages {
        for (k, s) in page {
            if horizon.as_ref().is_some_and(|h| &k > h) {
                continue;
            }
            match merged.get_mut(&k) {
                Some(have) => *have = have.merge(&s),
                None => {
                    merged.insert(k, s);
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut bytes = 0;
    for (k, s) in merged {
        if out.len() == limit || bytes > PAGE_BYTES_MAX {
            more = true;
            break;
        }
        bytes += k.len() + encode(&s).len();
        out.push((k, s));
    }
    (out, more)
}

impl Coordinator {
    async fn scan_at(
        self: Arc<Self>,
        node: NodeId,
        keyspace: String,
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
        limit: usize,
        deadline: Instant,
    ) -> Result<(Page, bool), ApiError> {
        if node == self.me {
            return self
                .replica
                .scan(&keyspace, &prefix, after.as_deref(), limit, &self.nodes());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let req = PeerRequest::ApScan {
            keyspace,
            prefix,
            after,
            limit,
        };
        match self.transport.call(node, req, left).await {
            Ok(PeerResponse::ApScanned(r)) => r,
            Ok(_) => Err(ApiError::internal("wrong reply to ApScan")),
            Err(e) => Err(ApiError::unavailable(e.to_string())),
        }
    }

    /// The live keys of `keyspace` with `prefix`, after `after`, in key order: up to
    /// `limit`, and whether more may follow. Tombstones are skipped; rounds continue
    /// past them until `limit` live keys are found, the range ends, or the deadline.
    pub async fn scan(
        self: &Arc<Self>,
        keyspace: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        deadline: Instant,
    ) -> Result<(Page, bool), ApiError> {
        let mut out: Page = Vec::new();
        let mut after = after.map(<[u8]>::to_vec);
        loop {
            let mut tasks = JoinSet::new();
            for node in self.nodes().into_iter().filter(|n| self.up(*n)) {
                let this = self.clone();
                let (ks, p, a) = (keyspace.to_owned(), prefix.to_vec(), after.clone());
                let want = limit - out.len();
                tasks.spawn(crate::rt::scoped(async move {
                    this.scan_at(node, ks, p, a, want, deadline).await
                }));
            }
            let mut pages = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok(Ok(page)) => pages.push(page),
                    // A node that does not answer is like an unreachable one.
                    Ok(Err(e)) => tracing::debug!(error = %e, "a node's scan page failed"),
                    Err(e) => tracing::warn!(error = %e, "scan task failed"),
                }
            }
            let (page, more) = merge_pages(pages, limit - out.len());
            match page.last() {
                Some((last, _)) => after = Some(last.clone()),
                None => return Ok((out, false)),
            }
            out.extend(page.into_iter().filter(|(_, s)| !s.is_tombstone()));
            if !more || out.len() == limit {
                return Ok((out, more));
            }
            if Instant::now() >= deadline {
                return if out.is_empty() {
                    Err(ApiError::timeout(
                        "the scan met only deleted keys before the deadline; retry with a longer timeout_ms",
                    ))
                } else {
                    Ok((out, true))
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ap::value::Mutation;
    use capkv_core::ValueType;
    use proptest::prelude::*;

    fn counter(by: i64, actor: &str) -> ApState {
        ApState::empty(ValueType::Counter)
            .apply(&Mutation::Add { by }, actor, 0)
            .unwrap()
    }

    /// A source's page: its keys after `after`, at most `limit`, cut if more remain (a
    /// source may cut its page below the limit, as the byte bound does).
    fn page_of(keys: &[u8], after: Option<u8>, limit: usize, actor: &str) -> (Page, bool) {
        let rest: Vec<u8> = keys
            .iter()
            .copied()
            .filter(|k| after.is_none_or(|a| *k > a))
            .collect();
        let page = rest
            .iter()
            .take(limit)
            .map(|k| (vec![*k], counter(1, actor)))
            .collect();
        (page, rest.len() > limit)
    }

    proptest! {
        #[test]
        fn paging_through_merged_sources_sees_every_key_once_in_order(
            sources in proptest::collection::vec(proptest::collection::btree_set(any::<u8>(), 0..40), 1..5),
            limit in 1usize..8,
            cuts in proptest::collection::vec(1usize..8, 5),
        ) {
            let sources: Vec<Vec<u8>> = sources.into_iter().map(|s| s.into_iter().collect()).collect();
            let mut all: Vec<u8> = sources.iter().flatten().copied().collect();
            all.sort();
            all.dedup();
            let mut seen = Vec::new();
            let mut after = None;
            for _ in 0..1000 {
                let pages = sources.iter().enumerate()
                    .map(|(i, s)| page_of(s, after, limit.min(cuts[i]), &format!("n{i}")))
                    .collect();
                let (page, more) = merge_pages(pages, limit);
                prop_assert!(page.len() <= limit);
                for (k, state) in &page {
                    // Every copy of the key was merged: one increment per source holding it.
                    let holders = sources.iter().filter(|s| s.contains(&k[0])).count() as i64;
                    prop_assert_eq!(state.total().unwrap(), holders);
                    seen.push(k[0]);
                }
                if let Some((k, _)) = page.last() {
                    after = Some(k[0]);
                }
                if !more {
                    break;
                }
            }
            prop_assert_eq!(seen, all);
        }
    }
}
