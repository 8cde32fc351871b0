//! Where a node meets the world outside its own logic: its tasks, the monotonic clock,
//! randomness and blocking work. A process that serves (`capkv serve`) gets tokio's and
//! the operating system's; a simulation (`crate::sim`) runs several nodes in one
//! single-threaded runtime with paused time and gives each its own [`NodeScope`], so it
//! can pause, crash and restart one node while the others go on, and replay the whole
//! run from a seed.
//!
//! The rules every protocol path follows (docs/simulation.md):
//! - tasks are started with [`spawn`], never `tokio::spawn`: a task started inside a
//!   node's scope belongs to that node (openraft's own tasks too, through [`RaftRuntime`]);
//! - intervals and deadlines use [`Instant`] (tokio's, which a simulation drives) and
//!   tokio timers, never `std::time::Instant`; the time of day comes from the node's
//!   [`crate::clock::WallClock`];
//! - randomness comes from [`random_u64`] (or [`ThreadRng`]), seeded in a simulation;
//! - blocking work goes through [`blocking`], which a simulation runs in place.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rand::{RngCore, SeedableRng};

pub use tokio::time::Instant;

tokio::task_local! {
    static SCOPE: Arc<NodeScope>;
}

thread_local! {
    /// The simulation's RNG, when this thread runs one.
    static SEEDED: RefCell<Option<rand::rngs::StdRng>> = const { RefCell::new(None) };
    /// Whether this thread runs a simulation (blocking work runs in place).
    static SIMULATED: Cell<bool> = const { Cell::new(false) };
}

/// Fixes of issue 8 ("every promise kept under faults") that a simulation can take back,
/// one at a time, to show that it finds the bugs they fixed (docs/simulation.md). Each is
/// off everywhere except on the thread of a simulation run with `capkv sim --revert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Revert {
    /// #8 item 1: a proposal Raft dropped as it stopped answers 503 (not applied), and a
    /// stopping node does not wait for its proposals in flight.
    StopAnswers503,
    /// #8 item 2: a proposal openraft never answers (its entry purged by a snapshot
    /// install) holds its in-flight slot for ever.
    ProposalsWedge,
    /// #8 item 3: a purge deletes the entries before it records the purged id.
    PurgeDeletesFirst,
    /// #8 item 10: an ap write whose home may have applied it is sent to the next home.
    ApRetriesMaybeDelivered,
}

thread_local! {
    static REVERTED: Cell<Option<Revert>> = const { Cell::new(None) };
}

/// Takes back one fix on this thread (a simulation's), or none.
pub fn revert_on_this_thread(fix: Option<Revert>) {
    REVERTED.with(|r| r.set(fix));
}

/// Whether this thread runs with `fix` taken back.
pub fn reverted(fix: Revert) -> bool {
    REVERTED.with(|r| r.get() == Some(fix))
}

thread_local! {
    /// Panics on a simulation's thread, in any of its tasks (`take_panics`).
    static PANICS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Makes this thread a simulation's: randomness from `seed`, blocking work in place, and
/// every panic on it recorded (a panic in a node's task would otherwise only end that
/// task). `None` returns it to the operating system's randomness.
pub fn simulate_on_this_thread(seed: Option<u64>) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if SIMULATED.try_with(Cell::get).unwrap_or(false) {
                let _ = PANICS.try_with(|p| p.borrow_mut().push(info.to_string()));
            }
            previous(info);
        }));
    });
    SEEDED.with(|r| *r.borrow_mut() = seed.map(rand::rngs::StdRng::seed_from_u64));
    SIMULATED.with(|s| s.set(seed.is_some()));
    PANICS.with(|p| p.borrow_mut().clear());
}

/// The panics recorded on this simulation's thread since it began, taken.
pub fn take_panics() -> Vec<String> {
    PANICS.with(|p| std::mem::take(&mut *p.borrow_mut()))
}

/// Whether this thread runs a simulation.
pub fn simulated() -> bool {
    SIMULATED.with(Cell::get)
}

/// A random `u64`: the simulation's seeded RNG on its thread, else the OS-seeded one.
pub fn random_u64() -> u64 {
    ThreadRng.next_u64()
}

/// The RNG of this thread as [`random_u64`] describes it (what openraft draws its
/// election timeouts from, through [`RaftRuntime`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct ThreadRng;

impl RngCore for ThreadRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        SEEDED.with(|r| match r.borrow_mut().as_mut() {
            Some(rng) => rng.next_u64(),
            None => rand::random(),
        })
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let n = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&n[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// Runs `f`, which blocks (file I/O, hashing): on tokio's blocking pool, or in place in
/// a simulation (a blocking thread's timing would make the run unrepeatable).
pub async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, tokio::task::JoinError> {
    if simulated() {
        Ok(f())
    } else {
        tokio::task::spawn_blocking(f).await
    }
}

/// Starts a task. Inside a node's scope (a simulation) it belongs to that node: it is
/// paused with it and ends when the node crashes.
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match SCOPE.try_with(Arc::clone) {
        Ok(scope) => scope.spawn(fut),
        Err(_) => tokio::spawn(fut),
    }
}

/// `fut`, bound to the scope of the task that calls this (if any): for tasks that are not
/// started with [`spawn`] (a `JoinSet`'s). It is paused with its node, and once the node
/// is killed it never runs again (it ends when its owner, a task of that node, is
/// dropped).
pub fn scoped<F: Future>(fut: F) -> InScope<F> {
    InScope {
        scope: current_scope(),
        fut: Box::pin(fut),
    }
}

/// The scope this task runs in, if it belongs to a simulated node.
pub fn current_scope() -> Option<Arc<NodeScope>> {
    SCOPE.try_with(Arc::clone).ok()
}

/// One simulated node's tasks: started, paused and ended together.
pub struct NodeScope {
    name: String,
    state: Mutex<ScopeState>,
}

#[derive(Default)]
struct ScopeState {
    killed: bool,
    paused: bool,
    tasks: Vec<tokio::task::AbortHandle>,
    /// Tasks that were polled while paused, woken on resume.
    parked: Vec<Waker>,
}

impl std::fmt::Debug for NodeScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeScope")
            .field("name", &self.name)
            .finish()
    }
}

impl NodeScope {
    pub fn new(name: impl Into<String>) -> Arc<NodeScope> {
        Arc::new(NodeScope {
            name: name.into(),
            state: Mutex::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ScopeState> {
        self.state.lock().expect("node scope lock poisoned")
    }

    /// Starts `fut` as a task of this node. After [`NodeScope::kill`] the task is ended
    /// before it runs.
    pub fn spawn<F>(self: &Arc<Self>, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handle = tokio::spawn(InScope {
            scope: Some(self.clone()),
            fut: Box::pin(fut),
        });
        let mut st = self.state();
        if st.killed {
            handle.abort();
        } else {
            if st.tasks.len() >= 64 && st.tasks.len().is_power_of_two() {
                st.tasks.retain(|t| !t.is_finished());
            }
            st.tasks.push(handle.abort_handle());
        }
        handle
    }

    /// Ends every task of this node at its current await, as a crash would; tasks it
    /// starts from now on end at once.
    pub fn kill(&self) {
        let (tasks, parked) = {
            let mut st = self.state();
            st.killed = true;
            (
                std::mem::take(&mut st.tasks),
                std::mem::take(&mut st.parked),
            )
        };
        for t in tasks {
            t.abort();
        }
        parked.into_iter().for_each(Waker::wake);
    }

    pub fn is_killed(&self) -> bool {
        self.state().killed
    }

    /// Stops (or resumes) running this node's tasks, as SIGSTOP and SIGCONT would: timers
    /// still expire, but nothing of the node runs until it resumes.
    pub fn pause(&self, paused: bool) {
        let parked = {
            let mut st = self.state();
            st.paused = paused;
            if paused {
                Vec::new()
            } else {
                std::mem::take(&mut st.parked)
            }
        };
        parked.into_iter().for_each(Waker::wake);
    }

    pub fn is_paused(&self) -> bool {
        self.state().paused
    }
}

/// A future run inside a node's scope (or in none: then it is simply polled).
pub struct InScope<F: ?Sized> {
    scope: Option<Arc<NodeScope>>,
    fut: Pin<Box<F>>,
}

impl<F: Future + ?Sized> Future for InScope<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(scope) = self.scope.clone() else {
            return self.fut.as_mut().poll(cx);
        };
        {
            let mut st = scope.state();
            if st.killed {
                return Poll::Pending; // a dead node's work never runs again
            }
            if st.paused {
                if !st.parked.iter().any(|w| w.will_wake(cx.waker())) {
                    st.parked.push(cx.waker().clone());
                }
                return Poll::Pending;
            }
        }
        SCOPE.sync_scope(scope, || self.fut.as_mut().poll(cx))
    }
}

/// openraft's runtime: tokio's, except that its tasks are started with [`spawn`] (so
/// they belong to the node that started them) and its random election timeouts come from
/// [`ThreadRng`] (seeded in a simulation).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RaftRuntime;

impl openraft::AsyncRuntime for RaftRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: openraft::OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = openraft::TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + openraft::OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = ThreadRng;
    type OneshotSender<T: openraft::OptionalSend> = openraft::async_runtime::TokioOneShotSender<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;
    type OneshotReceiver<T: openraft::OptionalSend> = tokio::sync::oneshot::Receiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + openraft::OptionalSend + 'static,
        T::Output: openraft::OptionalSend + 'static,
    {
        spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + openraft::OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + openraft::OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        ThreadRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: openraft::OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (openraft::async_runtime::TokioOneShotSender(tx), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }

    #[test]
    fn a_seeded_thread_repeats_its_draws_and_an_unseeded_one_does_not() {
        simulate_on_this_thread(Some(7));
        let a: Vec<u64> = (0..4).map(|_| random_u64()).collect();
        simulate_on_this_thread(Some(7));
        let b: Vec<u64> = (0..4).map(|_| random_u64()).collect();
        assert_eq!(a, b);
        assert!(simulated());
        simulate_on_this_thread(None);
        assert!(!simulated());
        assert_ne!(random_u64(), random_u64());
    }

    #[test]
    fn a_killed_scope_ends_its_tasks_and_the_tasks_they_start() {
        sim_runtime().block_on(async {
            let scope = NodeScope::new("n1");
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let s = scope.clone();
            let root = scope.spawn(async move {
                // A task started from inside the scope belongs to it too.
                let tx2 = tx.clone();
                spawn(async move {
                    loop {
                        tx2.send("child").unwrap();
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                });
                assert_eq!(current_scope().unwrap().name(), s.name());
                std::future::pending::<()>().await;
            });
            assert_eq!(rx.recv().await, Some("child"));
            scope.kill();
            assert!(root.await.unwrap_err().is_cancelled());
            // The child's sender is dropped with it: the channel closes.
            while rx.recv().await.is_some() {}
            let late = scope.spawn(async { 1 });
            assert!(
                late.await.unwrap_err().is_cancelled(),
                "a dead node starts nothing"
            );
        });
    }

    #[test]
    fn a_paused_scope_runs_nothing_until_it_resumes() {
        sim_runtime().block_on(async {
            let scope = NodeScope::new("n1");
            let ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let t = ticks.clone();
            scope.spawn(async move {
                loop {
                    t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
            tokio::time::sleep(Duration::from_millis(55)).await;
            let before = ticks.load(std::sync::atomic::Ordering::Relaxed);
            assert!(before >= 5);
            scope.pause(true);
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert_eq!(ticks.load(std::sync::atomic::Ordering::Relaxed), before);
            scope.pause(false);
            tokio::time::sleep(Duration::from_millis(35)).await;
            assert!(ticks.load(std::sync::atomic::Ordering::Relaxed) > before);
        });
    }
}
