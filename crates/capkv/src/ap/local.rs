//! Client writes applied at this node, batched (#9 item 4): the writes this node issues
//! dots for while a batch of them is being applied go together in the next one
//! ([`Replica::update_many`]: one stretch off the async workers, one storage batch, one
//! fsync), as the copies to a peer do ([`super::batch`]) and as cp's proposer does for
//! Raft entries.
//!
//! At most [`RUNNERS`] batches are applied at once; nothing waits for a batch to fill,
//! so a lone write goes at once and batches grow with the load. Each write keeps its own
//! answer and its own deadline: one that waited past it is refused unapplied when its
//! batch begins, and its caller stops waiting at the deadline (the write may then still
//! be applied, once: the coordinator answers 504).

use std::sync::{Arc, Mutex};

use capkv_core::ApiError;
use tokio::sync::oneshot;

use super::replica::{Replica, Update};
use super::value::Applied;
use crate::cluster::PAGE_BYTES_MAX;

/// Batches applied at once.
pub const RUNNERS: usize = 2;
/// Most writes in one batch.
pub const BATCH_WRITES: usize = 256;

type Answer = oneshot::Sender<Result<Applied, ApiError>>;

#[derive(Default)]
struct Queue {
    waiting: Vec<(Update, usize, Answer)>,
    runners: usize,
}

pub struct LocalWrites {
    replica: Arc<Replica>,
    queue: Mutex<Queue>,
}

impl LocalWrites {
    pub fn new(replica: Arc<Replica>) -> Arc<LocalWrites> {
        Arc::new(LocalWrites {
            replica,
            queue: Mutex::new(Queue::default()),
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `update` for the next batch; the answer comes on the returned channel (an
    /// error if the runner stopped before answering, which it does only on a panic).
    pub fn submit(
        self: &Arc<Self>,
        update: Update,
    ) -> oneshot::Receiver<Result<Applied, ApiError>> {
        let bytes = update.key.len() + crate::codec::encoded_len(&update.mutation);
        let (done, answer) = oneshot::channel();
        let start_runner = {
            let mut q = self.queue();
            q.waiting.push((update, bytes, done));
            let start = q.runners < RUNNERS;
            if start {
                q.runners += 1;
            }
            start
        };
        if start_runner {
            crate::rt::spawn(self.clone().run());
        }
        answer
    }

    /// Applies what waits, a batch at a time, until nothing does.
    async fn run(self: Arc<Self>) {
        // Should a batch panic (a bug), its runner's slot is given back, so later writes
        // still find a runner; the writes of that batch get "stopped before answering".
        struct Slot(Arc<LocalWrites>, bool);
        impl Drop for Slot {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.queue().runners -= 1;
                }
            }
        }
        let mut slot = Slot(self, false);
        loop {
            let batch = {
                let mut q = slot.0.queue();
                let batch = take_batch(&mut q.waiting);
                if batch.is_empty() {
                    // Given back under the same lock that saw nothing waiting, so a write
                    // queued right after starts a runner of its own.
                    q.runners -= 1;
                    drop(q);
                    slot.1 = true;
                    return;
                }
                batch
            };
            metrics::histogram!("capkv_ap_local_writes_per_batch").record(batch.len() as f64);
            let (updates, answers): (Vec<Update>, Vec<Answer>) =
                batch.into_iter().map(|(u, _, a)| (u, a)).unzip();
            let results = slot.0.replica.update_many(updates).await;
            for (answer, result) in answers.into_iter().zip(results) {
                let _ = answer.send(result);
            }
        }
    }
}

/// The next batch from `waiting`, in arrival order: at most [`BATCH_WRITES`] writes and
/// about [`PAGE_BYTES_MAX`] bytes (at least one write, whatever its size).
fn take_batch<T>(waiting: &mut Vec<(Update, usize, T)>) -> Vec<(Update, usize, T)> {
    let mut bytes = 0usize;
    let mut take = 0;
    for (_, b, _) in waiting.iter() {
        if take > 0 && (take == BATCH_WRITES || bytes + b > PAGE_BYTES_MAX) {
            break;
        }
        bytes += b;
        take += 1;
    }
    waiting.drain(..take).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ap::value::Mutation;
    use crate::storage::{Engine, GroupCommit, MemoryEngine};
    use capkv_core::ValueType;

    fn update(key: &str, value_bytes: usize) -> Update {
        Update {
            keyspace: "ks".into(),
            key: key.as_bytes().to_vec(),
            value_type: ValueType::Counter,
            mutation: if value_bytes == 0 {
                Mutation::Add { by: 1 }
            } else {
                Mutation::Write {
                    context: Default::default(),
                    value: Some(vec![b'v'; value_bytes]),
                }
            },
            actor: "n1.x".into(),
            now_ms: 1,
            deadline: None,
        }
    }

    #[test]
    fn batches_are_bounded_in_writes_and_bytes_but_hold_at_least_one() {
        let mut waiting: Vec<_> = (0..300)
            .map(|i| (update(&format!("k{i}"), 0), 10, ()))
            .collect();
        assert_eq!(take_batch(&mut waiting).len(), BATCH_WRITES);
        assert_eq!(take_batch(&mut waiting).len(), 300 - BATCH_WRITES);
        assert!(take_batch(&mut waiting).is_empty());
        let mut big: Vec<_> = (0..3)
            .map(|i| (update(&format!("k{i}"), 0), PAGE_BYTES_MAX, ()))
            .collect();
        assert_eq!(
            take_batch(&mut big).len(),
            1,
            "one oversized write goes alone"
        );
        assert_eq!(big.len(), 2);
    }

    /// Writes of one key submitted together are applied in order, each once: the counter
    /// ends at their number, and every answer is its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_each_get_their_own_answer() {
        let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
        let replica = Arc::new(Replica::new(engine.clone(), GroupCommit::start(engine)).unwrap());
        let local = LocalWrites::new(replica.clone());
        let answers: Vec<_> = (0..100)
            .map(|i| local.submit(update(if i % 2 == 0 { "even" } else { "odd" }, 0)))
            .collect();
        for a in answers {
            a.await.unwrap().unwrap();
        }
        for key in ["even", "odd"] {
            let state = replica.read("ks", key.as_bytes(), &[]).unwrap().unwrap();
            assert_eq!(state.total().unwrap(), 50, "{key}");
        }
        // A write of the wrong type is refused alone.
        let refused = local.submit(update("even", 8));
        let fine = local.submit(update("odd", 0));
        assert!(refused.await.unwrap().is_err());
        fine.await.unwrap().unwrap();
    }
}
