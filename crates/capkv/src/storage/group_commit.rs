//! Group commit: one fsync for every write that is waiting for one.
//!
//! Callers write their batch first (cheap, in memory and the journal buffer) and then
//! register a waiter here. A single thread takes *all* waiters queued at that moment,
//! calls [`Engine::sync`] once, and completes them together. Ordering rule: a waiter is
//! registered only after its batch was written, and the sync that completes it starts
//! after it was registered, so that sync covers the batch.
//!
//! With 64 concurrent writers this turns 64 fsyncs into a handful; the metrics
//! `capkv_storage_fsyncs_total` and `capkv_storage_synced_waiters_total` show the ratio.

use std::sync::mpsc;
use std::sync::Arc;

use super::Engine;

/// Called once the sync covering the caller's writes finished (or failed).
type Waiter = Box<dyn FnOnce(Result<(), String>) + Send>;

#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Waiter>,
}

impl GroupCommit {
    /// Starts the sync thread. It stops when the last `GroupCommit` handle is dropped.
    pub fn start(engine: Arc<dyn Engine>) -> GroupCommit {
        let (tx, rx) = mpsc::channel::<Waiter>();
        std::thread::Builder::new()
            .name("capkv-fsync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    let result = engine.sync().map_err(|e| e.to_string());
                    metrics::counter!("capkv_storage_fsyncs_total").increment(1);
                    metrics::counter!("capkv_storage_synced_waiters_total")
                        .increment(waiters.len() as u64);
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "fsync failed");
                    }
                    for w in waiters {
                        w(result.clone());
                    }
                }
            })
            .expect("spawning the fsync thread");
        GroupCommit { tx }
    }

    /// Runs `done` after a sync that started after this call. If the sync thread is gone
    /// (shutdown), `done` gets an error.
    pub fn after_sync(&self, done: impl FnOnce(Result<(), String>) + Send + 'static) {
        if let Err(mpsc::SendError(w)) = self.tx.send(Box::new(done)) {
            w(Err("storage is shutting down".into()));
        }
    }

    /// Waits until everything written before this call is durable.
    pub async fn sync(&self) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.after_sync(move |r| {
            let _ = tx.send(r);
        });
        rx.await
            .unwrap_or_else(|_| Err("storage is shutting down".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Entry, MemoryEngine, Result, Tree, WriteBatch};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    /// An engine whose first sync blocks until the test opens the gate, so the test can
    /// queue waiters while a sync is in flight.
    struct GatedEngine {
        inner: MemoryEngine,
        syncs: AtomicU64,
        entered: Mutex<mpsc::Sender<()>>,
        gate: Mutex<mpsc::Receiver<()>>,
    }

    impl Engine for GatedEngine {
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
            self.inner.write(batch)
        }
        fn read_view(&self, tree: Tree) -> Result<Box<dyn crate::storage::ReadView>> {
            self.inner.read_view(tree)
        }
        fn sync(&self) -> Result<()> {
            if self.syncs.fetch_add(1, Ordering::SeqCst) == 0 {
                self.entered.lock().unwrap().send(()).unwrap();
                self.gate.lock().unwrap().recv().unwrap();
            }
            Ok(())
        }
    }

    #[test]
    fn waiters_queued_during_a_sync_share_the_next_one() {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (gate_tx, gate_rx) = mpsc::channel();
        let engine = Arc::new(GatedEngine {
            inner: MemoryEngine::new(),
            syncs: AtomicU64::new(0),
            entered: Mutex::new(entered_tx),
            gate: Mutex::new(gate_rx),
        });
        let gc = GroupCommit::start(engine.clone());
        let (done_tx, done_rx) = mpsc::channel();
        let d = done_tx.clone();
        gc.after_sync(move |r| d.send(r).unwrap());
        entered_rx.recv().unwrap();
        for _ in 0..63 {
            let d = done_tx.clone();
            gc.after_sync(move |r| d.send(r).unwrap());
        }
        gate_tx.send(()).unwrap();
        for _ in 0..64 {
            done_rx.recv().unwrap().unwrap();
        }
        assert_eq!(
            engine.syncs.load(Ordering::SeqCst),
            2,
            "64 waiters, 2 fsyncs"
        );
    }

    #[tokio::test]
    async fn async_sync_completes() {
        let engine = Arc::new(MemoryEngine::new());
        let gc = GroupCommit::start(engine.clone());
        gc.sync().await.unwrap();
        assert_eq!(engine.sync_count(), 1);
    }
}
