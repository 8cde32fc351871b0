//! Merging pages of keys from several sources (pure; property-tested): the heart of an
//! ap scan (`ap::scan`), apart from the I/O that gathers the pages.

use std::collections::BTreeMap;

use super::value::ApState;
use crate::cluster::PAGE_BYTES_MAX;
use crate::codec::encode;

/// Keys in order with their state.
pub type Page = Vec<(Vec<u8>, ApState)>;

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
