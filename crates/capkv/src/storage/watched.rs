//! [`Watched`]: the engine as the node uses it — every call kept off the async workers,
//! its progress watched, and stalls that can be injected.
//!
//! A storage call may block for long: fjall halts a writer (a sleep loop inside
//! `Batch::commit`) while its write buffer or journal is over its limit, a read of a
//! cold key or a range waits for the disk, and a disk can be slow. If that ran on an
//! async worker it would stop HTTP, pings and Raft messages with it. So on a
//! multi-thread runtime every read, write and fsync runs in
//! [`tokio::task::block_in_place`], which hands the worker's other tasks to another
//! thread first: only the tasks that wait for storage wait. The threads doing so are
//! bounded by the runtime's blocking pool (tokio's default, 512 threads; each blocked
//! call's worker is replaced from it, so a smaller pool would strand workers). A call that makes no progress is reported by
//! [`Engine::stall`] (and so by `/healthz`), writes, fsyncs and reads each watched
//! on their own so that one kind finishing does not hide another that hangs.
//!
//! The injected stalls (`/v1/faults`): `storage_stall` makes every write and fsync wait
//! the way fjall's write halt does; `storage_read_stall` makes every read of user data
//! (cp keys, ap objects and hints, not Raft's own log and records) wait the way a slow
//! disk does. Tests use them to see what the node does meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::rt::Instant;

use super::{Engine, Entry, ReadView, Result, Tree, WriteBatch};

/// Runs a call that may block for long without blocking an async worker (see the module
/// docs). Off a multi-thread runtime (a plain thread, a current-thread test runtime) it
/// simply runs.
pub fn off_the_workers<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Progress of one kind of call: how many started and finished, and since when none has
/// finished while one was running.
#[derive(Default)]
struct Progress {
    started: AtomicU64,
    finished: AtomicU64,
    /// When one last finished, or one started while none was running (ms since `base`).
    since_ms: AtomicU64,
}

impl Progress {
    fn start(&self, now_ms: u64) {
        let was = self.started.fetch_add(1, Ordering::SeqCst);
        if was == self.finished.load(Ordering::SeqCst) {
            self.since_ms.store(now_ms, Ordering::SeqCst);
        }
    }

    fn finish(&self, now_ms: u64) {
        self.since_ms.store(now_ms, Ordering::SeqCst);
        self.finished.fetch_add(1, Ordering::SeqCst);
    }

    /// How long calls have waited with none finishing, if one is running.
    fn stall(&self, now_ms: u64) -> Option<u64> {
        (self.started.load(Ordering::SeqCst) > self.finished.load(Ordering::SeqCst))
            .then(|| now_ms.saturating_sub(self.since_ms.load(Ordering::SeqCst)))
    }
}

/// An injected stall: calls wait while it is closed, asleep (found by review: hundreds of
/// held calls each polling a flag every 10 ms kept a core busy).
#[derive(Default)]
struct Gate {
    closed: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn set_closed(&self, closed: bool) {
        *self.closed.lock().unwrap_or_else(|p| p.into_inner()) = closed;
        if !closed {
            self.opened.notify_all();
        }
    }

    fn is_closed(&self) -> bool {
        *self.closed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pass(&self) {
        let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        while *closed {
            closed = self.opened.wait(closed).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The kinds of call, each watched on its own.
#[derive(Clone, Copy)]
enum Kind {
    Write,
    Read,
}

pub struct Watched {
    inner: Box<dyn Engine>,
    base: Instant,
    writes: Progress,
    reads: Progress,
    /// When the fsync in progress started (ms since `base`), or `u64::MAX`: fsyncs come one
    /// at a time from the group commit, and a hung one must show even while writes go on.
    sync_since_ms: AtomicU64,
    stalled: Gate,
    reads_stalled: Gate,
}

impl Watched {
    pub fn new(inner: impl Engine) -> Watched {
        Watched {
            inner: Box::new(inner),
            base: Instant::now(),
            writes: Progress::default(),
            reads: Progress::default(),
            sync_since_ms: AtomicU64::new(u64::MAX),
            stalled: Gate::default(),
            reads_stalled: Gate::default(),
        }
    }

    /// Injects (or lifts) a stall of every write and fsync.
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.set_closed(stalled);
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled.is_closed()
    }

    /// Injects (or lifts) a stall of every read of user data (not of the Raft log or
    /// `meta`).
    pub fn set_reads_stalled(&self, stalled: bool) {
        self.reads_stalled.set_closed(stalled);
    }

    pub fn reads_stalled(&self) -> bool {
        self.reads_stalled.is_closed()
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Runs a call: off the workers, counted, timed (`metric`, a histogram in seconds),
    /// held while `hold` is set (an injected stall).
    fn watch<T>(
        &self,
        kind: Kind,
        hold: Option<&Gate>,
        metric: &'static str,
        op: impl FnOnce() -> T,
    ) -> T {
        let progress = match kind {
            Kind::Write => &self.writes,
            Kind::Read => &self.reads,
        };
        let began = Instant::now();
        progress.start(self.now_ms());
        let result = off_the_workers(|| {
            if let Some(gate) = hold {
                gate.pass();
            }
            op()
        });
        progress.finish(self.now_ms());
        metrics::histogram!(metric).record(began.elapsed().as_secs_f64());
        result
    }

    /// A read of `tree`: Raft's own trees are never held by the injected read stall.
    fn read<T>(&self, tree: Tree, op: impl FnOnce() -> T) -> T {
        let hold = (!matches!(tree, Tree::Log | Tree::Meta)).then_some(&self.reads_stalled);
        self.watch(Kind::Read, hold, "capkv_storage_read_seconds", op)
    }
}

impl Engine for Watched {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.read(tree, || self.inner.get(tree, key))
    }

    fn range(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        self.read(tree, || self.inner.range(tree, start, end, limit))
    }

    fn last_in_range(&self, tree: Tree, start: &[u8], end: Option<&[u8]>) -> Result<Option<Entry>> {
        self.read(tree, || self.inner.last_in_range(tree, start, end))
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        self.watch(
            Kind::Write,
            Some(&self.stalled),
            "capkv_storage_write_seconds",
            || self.inner.write(batch),
        )
    }

    fn sync(&self) -> Result<()> {
        self.sync_since_ms.store(self.now_ms(), Ordering::SeqCst);
        let result = self.watch(
            Kind::Write,
            Some(&self.stalled),
            "capkv_storage_fsync_seconds",
            || self.inner.sync(),
        );
        self.sync_since_ms.store(u64::MAX, Ordering::SeqCst);
        result
    }

    fn read_view(&self, tree: Tree) -> Result<Box<dyn ReadView>> {
        self.read(tree, || self.inner.read_view(tree))
    }

    fn stall(&self) -> Option<Duration> {
        let now = self.now_ms();
        let sync = match self.sync_since_ms.load(Ordering::SeqCst) {
            u64::MAX => None,
            since => Some(now.saturating_sub(since)),
        };
        [self.writes.stall(now), self.reads.stall(now), sync]
            .into_iter()
            .flatten()
            .max()
            .map(Duration::from_millis)
    }

    fn report_gauges(&self) {
        self.inner.report_gauges();
        let stall = self.stall().unwrap_or_default();
        metrics::gauge!("capkv_storage_stall_seconds").set(stall.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryEngine;
    use std::sync::Arc;

    #[test]
    fn a_watched_engine_behaves_like_an_engine() {
        crate::storage::engine_tests::check_engine(&Watched::new(MemoryEngine::new()));
    }

    /// With one async worker, a call blocked in `off_the_workers` must not stop the
    /// other tasks: here the very task that would unblock it.
    #[test]
    fn a_blocked_call_does_not_stop_the_other_tasks() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let got = rt.block_on(async {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let blocking = started.clone();
            let blocked = tokio::spawn(async move {
                blocking.store(true, Ordering::SeqCst);
                off_the_workers(|| rx.recv_timeout(Duration::from_secs(10)))
            });
            // The blocked task holds the only worker before the unblocker is spawned.
            while !started.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let unblocker = tokio::spawn(async move { tx.send(()) });
            unblocker.await.unwrap().unwrap();
            blocked.await.unwrap()
        });
        assert_eq!(got, Ok(()));
    }

    /// A hung fsync is reported even while writes keep finishing (found by review: the
    /// writes reset the one timer).
    #[test]
    fn a_hung_fsync_is_reported_while_writes_finish() {
        struct SlowSync(MemoryEngine, Arc<std::sync::Mutex<()>>);
        impl Engine for SlowSync {
            fn get(&self, t: Tree, k: &[u8]) -> Result<Option<Vec<u8>>> {
                self.0.get(t, k)
            }
            fn range(&self, t: Tree, s: &[u8], e: Option<&[u8]>, l: usize) -> Result<Vec<Entry>> {
                self.0.range(t, s, e, l)
            }
            fn last_in_range(&self, t: Tree, s: &[u8], e: Option<&[u8]>) -> Result<Option<Entry>> {
                self.0.last_in_range(t, s, e)
            }
            fn read_view(&self, t: Tree) -> Result<Box<dyn ReadView>> {
                self.0.read_view(t)
            }
            fn write(&self, b: WriteBatch) -> Result<()> {
                self.0.write(b)
            }
            fn sync(&self) -> Result<()> {
                drop(self.1.lock().unwrap()); // held by the test: a hung fsync
                self.0.sync()
            }
        }
        let lock = Arc::new(std::sync::Mutex::new(()));
        let held = lock.lock().unwrap();
        let engine = Arc::new(Watched::new(SlowSync(MemoryEngine::new(), lock.clone())));
        let syncer = engine.clone();
        let sync = std::thread::spawn(move || syncer.sync());
        let deadline = Instant::now() + Duration::from_secs(10);
        while engine.stall().unwrap_or_default() < Duration::from_millis(100) {
            assert!(
                Instant::now() < deadline,
                "the hung fsync is never reported"
            );
            let mut b = WriteBatch::new();
            b.put(Tree::Data, b"k".to_vec(), b"v".to_vec());
            engine.write(b).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(held);
        sync.join().unwrap().unwrap();
        assert_eq!(engine.stall(), None);
    }

    /// An injected stall holds writes, is reported while it lasts, and lifting it lets
    /// the held write finish.
    #[test]
    fn a_stalled_write_is_reported_until_it_finishes() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let engine = Arc::new(Watched::new(MemoryEngine::new()));
            assert_eq!(engine.stall(), None);
            engine.set_stalled(true);
            let writer = engine.clone();
            let write = tokio::spawn(async move {
                let mut b = WriteBatch::new();
                b.put(Tree::Data, b"k".to_vec(), b"v".to_vec());
                writer.write(b)
            });
            let deadline = Instant::now() + Duration::from_secs(10);
            while engine.stall().unwrap_or_default() < Duration::from_millis(50) {
                assert!(Instant::now() < deadline, "the stall is never reported");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(engine.get(Tree::Data, b"k").unwrap(), None);
            engine.set_stalled(false);
            write.await.unwrap().unwrap();
            assert_eq!(engine.stall(), None);
            assert_eq!(engine.get(Tree::Data, b"k").unwrap(), Some(b"v".to_vec()));
        });
    }
}
