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
use std::sync::Arc;

use capkv_core::ApiError;
use tokio::task::JoinSet;

use super::coordinator::Coordinator;
use super::rpc::ApScan;
use crate::cluster::NodeId;
use crate::message::ask;

pub use super::page::{merge_pages, Page};

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
        let req = ApScan {
            keyspace,
            prefix,
            after,
            limit,
        };
        match ask(&*self.transport, node, req, left).await {
            Ok(r) => r,
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
