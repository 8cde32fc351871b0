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
//!
//! **Writers on their way** ([`GroupCommit::coming`], Postgres's `commit_delay` with
//! `commit_siblings`): a writer that will ask for a sync in a moment says so first. While
//! any such writer exists, the sync thread waits for it, at most [`GATHER_MAX`], before it
//! fsyncs, so that it shares this fsync rather than paying for the next one alone. ap
//! writes, which each carry one key (cp batches a whole Raft entry per fsync), were
//! fsynced at 1.7 writes per fsync under 64 clients (docs/benchmarks.md).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Engine;

/// Called once the sync covering the caller's writes finished (or failed).
type Waiter = Box<dyn FnOnce(Result<(), String>) + Send>;

/// The longest a sync waits for writers on their way (see the module docs): about one
/// fsync on the disks measured, so a write waits at most one fsync longer.
pub const GATHER_MAX: Duration = Duration::from_micros(200);

#[derive(Clone)]
pub struct GroupCommit {
    tx: Syncer,
    coming: Arc<AtomicUsize>,
}

/// Where waiters go: the fsync thread, or in a simulation a task of the node (a thread's
/// timing would make the run unrepeatable, and a crash must end it with the node).
#[derive(Clone)]
enum Syncer {
    Thread(mpsc::Sender<Waiter>),
    Task(tokio::sync::mpsc::UnboundedSender<Waiter>),
}

/// A writer on its way to a sync (see [`GroupCommit::coming`]); dropped, it is no longer.
pub struct Coming {
    coming: Arc<AtomicUsize>,
}

impl Drop for Coming {
    fn drop(&mut self) {
        self.coming.fetch_sub(1, Ordering::SeqCst);
    }
}

impl GroupCommit {
    /// Starts the sync thread. It stops when the last `GroupCommit` handle is dropped.
    pub fn start(engine: Arc<dyn Engine>) -> GroupCommit {
        GroupCommit::start_gathering(engine, GATHER_MAX)
    }

    /// [`GroupCommit::start`], waiting at most `gather` for writers on their way.
    pub fn start_gathering(engine: Arc<dyn Engine>, gather: Duration) -> GroupCommit {
        let coming = Arc::new(AtomicUsize::new(0));
        if crate::rt::simulated() {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            crate::rt::spawn(simulated_syncs(engine, rx));
            return GroupCommit {
                tx: Syncer::Task(tx),
                coming,
            };
        }
        let (tx, rx) = mpsc::channel::<Waiter>();
        let on_their_way = coming.clone();
        std::thread::Builder::new()
            .name("capkv-fsync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    let until = Instant::now() + gather;
                    while on_their_way.load(Ordering::SeqCst) > 0 {
                        let left = until.saturating_duration_since(Instant::now());
                        match rx.recv_timeout(left) {
                            Ok(w) => {
                                waiters.push(w);
                                waiters.extend(rx.try_iter());
                            }
                            Err(_) => break,
                        }
                    }
                    sync_for(engine.as_ref(), waiters);
                }
            })
            .expect("spawning the fsync thread");
        GroupCommit {
            tx: Syncer::Thread(tx),
            coming,
        }
    }

    /// Says a write that will ask for a sync is on its way: until the returned guard is
    /// dropped (or passed to [`GroupCommit::sync_coming`]), syncs wait a little for it.
    pub fn coming(&self) -> Coming {
        self.coming.fetch_add(1, Ordering::SeqCst);
        Coming {
            coming: self.coming.clone(),
        }
    }

    /// [`GroupCommit::sync`] for a writer that announced itself with `coming`: no
    /// longer on its way once it waits (so no sync waits for it in vain).
    pub async fn sync_coming(&self, coming: Coming) -> Result<(), String> {
        drop(coming);
        self.sync().await
    }

    /// Runs `done` after a sync that started after this call. If the sync thread is gone
    /// (shutdown), `done` gets an error.
    pub fn after_sync(&self, done: impl FnOnce(Result<(), String>) + Send + 'static) {
        let refused = match &self.tx {
            Syncer::Thread(tx) => tx.send(Box::new(done)).err().map(|e| e.0),
            Syncer::Task(tx) => tx.send(Box::new(done)).err().map(|e| e.0),
        };
        if let Some(w) = refused {
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

/// One fsync, then every waiter it covers is told.
fn sync_for(engine: &dyn Engine, waiters: Vec<Waiter>) {
    let result = engine.sync().map_err(|e| e.to_string());
    metrics::counter!("capkv_storage_fsyncs_total").increment(1);
    metrics::counter!("capkv_storage_synced_waiters_total").increment(waiters.len() as u64);
    if let Err(e) = &result {
        tracing::error!(error = %e, "fsync failed");
    }
    for w in waiters {
        w(result.clone());
    }
}

/// The fsync loop of a simulated node: an fsync takes 0.2 to 2 ms of simulated time;
/// writes made meanwhile are covered by it, and a crash before it ends loses them.
async fn simulated_syncs(
    engine: Arc<dyn Engine>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Waiter>,
) {
    while let Some(first) = rx.recv().await {
        let took = Duration::from_micros(200 + crate::rt::random_u64() % 1800);
        tokio::time::sleep(took).await;
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        sync_for(engine.as_ref(), waiters);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Entry, MemoryEngine, Result, Tree, WriteBatch};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    /// An engine that counts its syncs. With a gate, its first sync blocks until the test
    /// opens the gate, so the test can queue waiters while a sync is in flight.
    #[derive(Default)]
    struct GatedEngine {
        inner: MemoryEngine,
        syncs: AtomicU64,
        gate: Option<Gate>,
    }

    /// Told when the first sync has begun; opened by the test to let it finish.
    type Gate = (Mutex<mpsc::Sender<()>>, Mutex<mpsc::Receiver<()>>);

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
            let first = self.syncs.fetch_add(1, Ordering::SeqCst) == 0;
            if let (true, Some((entered, gate))) = (first, &self.gate) {
                entered.lock().unwrap().send(()).unwrap();
                gate.lock().unwrap().recv().unwrap();
            }
            Ok(())
        }
    }

    /// A sync waits for a writer on its way, and shares one fsync with it.
    #[tokio::test]
    async fn a_sync_waits_for_a_writer_on_its_way() {
        let engine = Arc::new(GatedEngine::default());
        // A gather far longer than the test: only the writer's arrival ends the wait.
        let gc = GroupCommit::start_gathering(engine.clone(), Duration::from_secs(600));
        let on_its_way = gc.coming();
        let (tx, rx) = tokio::sync::oneshot::channel();
        gc.after_sync(move |r| tx.send(r).unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(engine.syncs.load(Ordering::SeqCst), 0, "it waits");
        gc.sync_coming(on_its_way).await.unwrap();
        rx.await.unwrap().unwrap();
        assert_eq!(engine.syncs.load(Ordering::SeqCst), 1, "one fsync for both");
    }

    /// A writer announced but never coming holds a sync back for the gather time only.
    #[tokio::test]
    async fn a_writer_that_never_comes_delays_a_sync_by_the_gather_time_at_most() {
        let engine = Arc::new(GatedEngine::default());
        let gc = GroupCommit::start_gathering(engine.clone(), Duration::from_millis(20));
        let _stuck = gc.coming();
        for _ in 0..3 {
            gc.sync().await.unwrap();
        }
        assert_eq!(engine.syncs.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn waiters_queued_during_a_sync_share_the_next_one() {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (gate_tx, gate_rx) = mpsc::channel();
        let engine = Arc::new(GatedEngine {
            gate: Some((Mutex::new(entered_tx), Mutex::new(gate_rx))),
            ..GatedEngine::default()
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
