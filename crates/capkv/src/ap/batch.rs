//! Replica copies batched per peer (#9 item 4): the objects a coordinator sends to one
//! peer while a message to it is already in flight travel together in the next one
//! (`ApStoreMany`), which the peer merges in one storage batch and one fsync.
//!
//! With 64 clients writing, every ap write sent its own `ApStore` to each other home:
//! one frame, one task and one fsync wait per copy on the receiver. Now a peer gets at
//! most [`IN_FLIGHT`] messages at once from a node; what queues meanwhile goes in the
//! next, up to [`BATCH_OBJECTS`] objects and about [`PAGE_BYTES_MAX`] bytes. Nothing waits
//! for a batch to fill: an idle peer gets a copy at once, alone (as group commit does for
//! fsyncs), so batching costs no latency and grows with the load.
//!
//! A copy is a state-based merge, so a copy that arrives twice, or late, changes nothing
//! the second time. The answer each copy gets is its batch's: all of the batch was stored
//! (one atomic storage batch), or none of it was, or it may have been (the message was
//! delivered and no answer came back in time); a copy whose deadline passes while it
//! waits in the queue is answered "not applied" and never sent.

use crate::rt::Instant;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use capkv_core::ApiError;
use tokio::sync::oneshot;

use super::call::{net_err, replica_err, CallError};
use super::replica::StoredObject;
use super::rpc::ApNet;
use super::rpc::ApStoreMany;
use crate::cluster::NodeId;
use crate::cluster::PAGE_BYTES_MAX;
use crate::message::ask;

/// Messages in flight to one peer at once.
pub const IN_FLIGHT: usize = 2;
/// Most objects in one message.
pub const BATCH_OBJECTS: usize = 256;

struct Copy {
    object: StoredObject,
    bytes: usize,
    deadline: Instant,
    done: oneshot::Sender<Result<(), CallError>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Copy>,
    /// Senders running for this peer (at most [`IN_FLIGHT`]).
    senders: usize,
}

pub struct StoreBatches {
    transport: Arc<ApNet>,
    queues: Mutex<HashMap<NodeId, Queue>>,
}

impl StoreBatches {
    pub(super) fn new(transport: Arc<ApNet>) -> Arc<StoreBatches> {
        Arc::new(StoreBatches {
            transport,
            queues: Mutex::new(HashMap::new()),
        })
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Queue>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `object` as `to`'s replica, in the next message to it; answers when that
    /// message is answered (the coordinator's rules: `ap::call`), or at `deadline` (then
    /// it may yet be stored).
    pub(super) async fn store(
        self: &Arc<Self>,
        to: NodeId,
        object: StoredObject,
        deadline: Instant,
    ) -> Result<(), CallError> {
        let bytes = object.0.len() + object.1.len() + crate::codec::encoded_len(&object.2);
        let (done, answer) = oneshot::channel();
        let start_sender = {
            let mut queues = self.queues();
            let q = queues.entry(to).or_default();
            q.waiting.push(Copy {
                object,
                bytes,
                deadline,
                done,
            });
            let start = q.senders < IN_FLIGHT;
            if start {
                q.senders += 1;
            }
            start
        };
        if start_sender {
            crate::rt::spawn(self.clone().send_loop(to));
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CallError::Unknown(ApiError::internal(
                "the copy's sender stopped before answering",
            ))),
            Err(_) => Err(CallError::Unknown(ApiError::timeout(format!(
                "node {to} did not confirm the copy before the deadline"
            )))),
        }
    }

    /// Sends what waits for `to`, a batch at a time, until nothing does.
    async fn send_loop(self: Arc<Self>, to: NodeId) {
        loop {
            let batch = {
                let mut queues = self.queues();
                let Some(q) = queues.get_mut(&to) else { return };
                let batch = take_batch(&mut q.waiting, Instant::now());
                if batch.is_empty() {
                    q.senders -= 1;
                    if q.senders == 0 && q.waiting.is_empty() {
                        queues.remove(&to);
                    }
                    return;
                }
                batch
            };
            let deadline = batch
                .iter()
                .map(|c| c.deadline)
                .max()
                .unwrap_or_else(Instant::now);
            let (objects, answers): (Vec<StoredObject>, Vec<_>) =
                batch.into_iter().map(|c| (c.object, c.done)).unzip();
            metrics::histogram!("capkv_ap_copies_per_message").record(objects.len() as f64);
            let left = deadline.saturating_duration_since(Instant::now());
            let result = match ask(&*self.transport, to, ApStoreMany { objects }, left).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(replica_err(e)),
                Err(e) => Err(net_err(e)),
            };
            for done in answers {
                let _ = done.send(result.clone());
            }
        }
    }
}

/// Takes the next batch off the front of `waiting`: copies whose deadline has passed are
/// answered "not applied" (they were never sent), then as many as fit in one message.
fn take_batch(waiting: &mut Vec<Copy>, now: Instant) -> Vec<Copy> {
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    let mut rest = Vec::new();
    for copy in waiting.drain(..) {
        if copy.deadline <= now {
            let _ = copy.done.send(Err(CallError::NotApplied(ApiError::timeout(
                "the copy's deadline passed before it could be sent",
            ))));
        } else if batch.is_empty()
            || (batch.len() < BATCH_OBJECTS && bytes + copy.bytes <= PAGE_BYTES_MAX)
        {
            bytes += copy.bytes;
            batch.push(copy);
        } else {
            rest.push(copy);
        }
    }
    *waiting = rest;
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ap::value::ApState;
    use std::time::Duration;

    fn copy(
        i: usize,
        bytes: usize,
        deadline: Instant,
    ) -> (Copy, oneshot::Receiver<Result<(), CallError>>) {
        let (done, rx) = oneshot::channel();
        let object = (
            "ks".to_string(),
            format!("k{i}").into_bytes(),
            ApState::empty(capkv_core::ValueType::Register),
        );
        (
            Copy {
                object,
                bytes,
                deadline,
                done,
            },
            rx,
        )
    }

    #[test]
    fn a_copy_is_measured_as_it_will_be_encoded() {
        let mut state = ApState::empty(capkv_core::ValueType::Register);
        assert_eq!(
            crate::codec::encoded_len(&state),
            crate::codec::encode(&state).len()
        );
        state = state
            .apply_above(
                &crate::ap::value::Mutation::Write {
                    context: Default::default(),
                    value: Some(vec![7; 1000]),
                },
                "n1.a",
                1,
                &Default::default(),
            )
            .unwrap()
            .state;
        assert_eq!(
            crate::codec::encoded_len(&state),
            crate::codec::encode(&state).len()
        );
    }

    #[test]
    fn a_batch_is_bounded_by_count_and_bytes_and_skips_what_expired() {
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        let mut waiting = Vec::new();
        let mut answers = Vec::new();
        for i in 0..BATCH_OBJECTS + 10 {
            let (c, rx) = copy(i, 10, if i == 3 { now } else { later });
            waiting.push(c);
            answers.push(rx);
        }
        let batch = take_batch(&mut waiting, now);
        assert_eq!(batch.len(), BATCH_OBJECTS);
        assert_eq!(waiting.len(), 9, "the rest waits, the expired one is gone");
        assert!(matches!(
            answers[3].try_recv(),
            Ok(Err(CallError::NotApplied(_)))
        ));
        // Order is kept: the first batch is the oldest copies.
        assert_eq!(batch[0].object.1, b"k0");
        assert_eq!(batch[3].object.1, b"k4");
        // Bytes: a copy that would pass the bound waits for the next message, but a
        // copy larger than the bound still goes, alone.
        let mut waiting = Vec::new();
        for i in 0..3 {
            waiting.push(copy(i, PAGE_BYTES_MAX / 2, later).0);
        }
        assert_eq!(take_batch(&mut waiting, now).len(), 2);
        let mut waiting = vec![copy(0, PAGE_BYTES_MAX * 2, later).0, copy(1, 1, later).0];
        assert_eq!(take_batch(&mut waiting, now).len(), 1);
        assert_eq!(waiting.len(), 1);
    }
}
