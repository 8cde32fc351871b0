//! Group commit for Raft proposals.
//!
//! openraft 0.9 appends each proposal as its own log write and waits for that write to
//! be flushed before it appends the next, so N concurrent writes would cost N fsyncs
//! in a row. The proposer sits in front of it: concurrent commands queue here, and one
//! task takes everything queued (up to [`BATCH_COMMANDS_MAX`] commands or
//! [`BATCH_BYTES_MAX`] bytes) and proposes it as one [`Batch`] entry: one append, one
//! fsync, one replication round for all of them. While a batch is in flight the next
//! one fills up, so the busier the node, the bigger the batches.
//!
//! "Was it proposed?" is decided exactly once per command, by a compare-and-swap on its
//! state: the proposer claims it or the waiter cancels it first (then it was certainly
//! never proposed: 503). **Once claimed, every outcome but success is unknown (504)**:
//! openraft may have appended the entry before it answers `ForwardToLeader` (a deposed
//! leader whose entry another leader may still commit) or drops the answer when it stops
//! (a graceful shutdown); neither tells whether the entry commits elsewhere. So the
//! proposer checks leadership *before* it claims (not the leader: nothing proposed, the
//! caller may try the new leader) and never reports "not proposed" after.
//!
//! The proposer also stamps each batch with the cluster time ([`ClusterClock`]), which
//! dates idempotency records: the leader stamps, not the node a client happened to call.

use crate::rt::Instant;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use capkv_core::ApiError;
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::state_machine::Reader;
use super::{Batch, Command, Raft, Reply};
use crate::clock::WallClock;

/// The leader's clock for stamping commands with cluster time (see the `state_machine`
/// docs): the cluster time applied here, advanced by this process's monotonic clock.
/// Re-anchored at the applied cluster time when the term changes or the applied time
/// is ahead; only a cluster that has no time yet (nothing applied) takes one from the
/// wall clock, once. So a node's wall clock, however skewed, moves no record's expiry,
/// and stamps from one leader never go back.
#[derive(Default)]
pub struct ClusterClock {
    /// (term, cluster time, when it was taken).
    anchor: Option<(u64, u64, Instant)>,
    last: u64,
}

impl ClusterClock {
    /// Whether the next stamp would read the wall clock (nothing applied here carries a
    /// time, and this proposer has stamped nothing).
    pub fn needs_wall(&self, applied: u64) -> bool {
        applied == 0 && self.last == 0
    }

    /// The stamp for a batch proposed now in `term`; `applied` is the cluster time of
    /// the last command applied on this node (0: none).
    pub fn stamp(&mut self, term: u64, applied: u64, wall_ms: impl FnOnce() -> u64) -> u64 {
        let ahead = |a: &(u64, u64, Instant)| a.1 + a.2.elapsed().as_millis() as u64;
        let anchor = match self.anchor {
            Some(a) if a.0 == term && ahead(&a) >= applied => a,
            _ => {
                let base = if applied > 0 || self.last > 0 {
                    applied
                } else {
                    wall_ms()
                };
                let a = (term, base, Instant::now());
                self.anchor = Some(a);
                a
            }
        };
        self.last = self.last.max(ahead(&anchor));
        self.last
    }
}

/// Most commands in one log entry.
pub const BATCH_COMMANDS_MAX: usize = 256;
/// Most value bytes in one log entry (a single larger command still goes alone).
pub const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Batches proposed but not yet answered; more wait in the queue.
const IN_FLIGHT_BATCHES_MAX: usize = 4;
/// Commands waiting to be batched before senders wait (backpressure).
const QUEUE_MAX: usize = 4096;

const QUEUED: u8 = 0;
const CLAIMED: u8 = 1;
const CANCELLED: u8 = 2;

/// Why a proposal has no reply.
#[derive(Debug)]
pub enum ProposeError {
    /// This node is not the leader: nothing was proposed.
    NotLeader,
    /// Raft or the proposer stopped before the command was proposed: it was not applied.
    Stopped(String),
    /// The command was proposed and then its answer was lost (leadership moved, Raft
    /// stopped): it may or may not take effect.
    Unknown(String),
    /// The deadline passed; `proposed` says whether it may still take effect.
    Deadline { proposed: bool },
    /// A bug or a broken disk.
    Internal(String),
}

struct Pending {
    cmd: Command,
    state: Arc<AtomicU8>,
    reply: oneshot::Sender<Result<Reply, ProposeError>>,
    /// When its waiter stops waiting.
    deadline: Instant,
}

/// How long a batch's slot stays taken after the last of its waiters gave up. openraft
/// never answers a proposal whose entry a snapshot install purged (a deposed leader that
/// caught up by snapshot); without a bound, each such batch would hold one of the
/// IN_FLIGHT_BATCHES_MAX slots for ever, and after four of them no write could pass.
const ANSWER_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
    in_flight: Arc<Semaphore>,
    /// Set when the node stops: queued commands are refused (not proposed) from then on.
    stopping: Arc<AtomicBool>,
}

/// The bytes a command adds to a log entry: everything it carries that can be large (key,
/// value, the value a CAS compares with, names), plus a fixed allowance for the rest.
fn size_of(cmd: &Command) -> usize {
    const FIXED: usize = 64;
    let op = match &cmd.op {
        super::Op::Put {
            keyspace,
            key,
            value,
            condition,
        } => keyspace.len() + key.len() + value.len() + condition_len(condition),
        super::Op::Delete {
            keyspace,
            key,
            condition,
        } => keyspace.len() + key.len() + condition_len(condition),
        super::Op::CreateKeyspace { .. } => 256,
        super::Op::PutUser { spec, .. } => 256 + spec.grants.len() * 80,
        super::Op::DeleteUser { name } => name.len(),
    };
    FIXED + op + cmd.idempotency_key.as_ref().map_or(0, String::len)
}

fn condition_len(c: &Option<super::Condition>) -> usize {
    match c {
        Some(super::Condition::Value(v)) => v.len(),
        _ => 0,
    }
}

impl Proposer {
    /// Starts the proposer. `fresh_quorum_ms`: a leader proposes only if a quorum
    /// acknowledged it this recently (a restarted old leader still believes it leads
    /// until it hears otherwise; its proposals could never commit).
    /// `reader` gives the applied cluster time and `wall` the one-time start of it (see
    /// [`ClusterClock`]).
    pub fn start(
        raft: Raft,
        fresh_quorum_ms: u64,
        reader: Reader,
        wall: Arc<WallClock>,
    ) -> Proposer {
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_BATCHES_MAX));
        let stopping = Arc::new(AtomicBool::new(false));
        crate::rt::spawn(run(
            raft,
            rx,
            in_flight.clone(),
            stopping.clone(),
            fresh_quorum_ms,
            (reader, wall),
        ));
        Proposer {
            tx,
            in_flight,
            stopping,
        }
    }

    /// Stops proposing: every command not yet claimed is answered "not proposed" (503).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Waits (up to `limit`) until no batch is in flight: used before Raft stops, so
    /// proposals already made get their real answer rather than an unknown one.
    /// Batches proposed and not yet answered (or given up on, past their grace).
    pub fn in_flight(&self) -> usize {
        IN_FLIGHT_BATCHES_MAX - self.in_flight.available_permits()
    }

    pub async fn drain(&self, limit: std::time::Duration) -> bool {
        let all = IN_FLIGHT_BATCHES_MAX as u32;
        tokio::time::timeout(limit, self.in_flight.acquire_many(all))
            .await
            .is_ok_and(|p| p.is_ok())
    }

    /// Proposes `cmd` and waits for its reply until `deadline`.
    pub async fn propose(&self, cmd: Command, deadline: Instant) -> Result<Reply, ProposeError> {
        let state = Arc::new(AtomicU8::new(QUEUED));
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            cmd,
            state: state.clone(),
            reply,
            deadline,
        };
        match tokio::time::timeout_at(deadline, self.tx.send(pending)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(ProposeError::Stopped("the proposer has stopped".into())),
            Err(_) => return Err(ProposeError::Deadline { proposed: false }),
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r,
            // The answer was dropped: if the command had been claimed it may be in the log.
            Ok(Err(_)) if state.load(Ordering::Acquire) == CLAIMED => Err(ProposeError::Unknown(
                "the proposer stopped after the write was proposed".into(),
            )),
            Ok(Err(_)) => Err(ProposeError::Stopped("the proposer has stopped".into())),
            Err(_) => {
                let cancelled = state
                    .compare_exchange(QUEUED, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
                Err(ProposeError::Deadline {
                    proposed: !cancelled,
                })
            }
        }
    }
}

async fn run(
    raft: Raft,
    mut rx: mpsc::Receiver<Pending>,
    in_flight: Arc<Semaphore>,
    stopping: Arc<AtomicBool>,
    fresh_quorum_ms: u64,
    (reader, wall): (Reader, Arc<WallClock>),
) {
    // A command that did not fit the last batch starts the next one.
    let mut carry: Option<Pending> = None;
    let mut clock = ClusterClock::default();
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        // Wait for a slot first, so that commands arriving meanwhile join this batch.
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let mut queued = vec![first];
        let mut bytes = size_of(&queued[0].cmd);
        // Fill up to the limits; a command that would cross BATCH_BYTES_MAX waits for the
        // next batch, so an entry is at most BATCH_BYTES_MAX, or one larger command alone.
        while queued.len() < BATCH_COMMANDS_MAX {
            match rx.try_recv() {
                Ok(p) if bytes + size_of(&p.cmd) > BATCH_BYTES_MAX => {
                    carry = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += size_of(&p.cmd);
                    queued.push(p);
                }
                Err(_) => break,
            }
        }
        // Stopping, or not the leader: refuse before claiming, while "nothing was
        // proposed" is still certain. The waiter's own compare-and-swap still decides
        // (it may have given up meanwhile); either way the answer is "not applied".
        // (Leadership can still move between here and the append; then the outcome is
        // unknown, below.)
        let stopping_now = stopping.load(Ordering::Acquire);
        if stopping_now || !leads_with_fresh_quorum(&raft, fresh_quorum_ms) {
            for p in queued {
                let _ = p.reply.send(Err(if stopping_now {
                    ProposeError::Stopped("this node is shutting down".into())
                } else {
                    ProposeError::NotLeader
                }));
            }
            continue;
        }
        // The cluster time applied here; unreadable (a storage failure): the last stamp
        // stands (the clock never goes back), and Raft reports the storage failure.
        let applied = reader.cluster_time().unwrap_or(0);
        let (term, applied_own_term) = {
            let m = raft.metrics();
            let m = m.borrow();
            let own = m
                .last_applied
                .is_some_and(|l| l.leader_id.term == m.current_term);
            (m.current_term, own)
        };
        // A leader that would start the cluster's time from its own wall clock must first
        // have applied everything before its term (its first entry of the term applied):
        // else an earlier leader's time may exist in entries not applied here yet, and a
        // skewed clock would move it. Until then: not proposed, retry (503).
        if clock.needs_wall(applied) && !applied_own_term {
            for p in queued {
                let _ = p.reply.send(Err(ProposeError::NotLeader));
            }
            continue;
        }
        let stamp = clock.stamp(term, applied, || wall.now_ms());
        let claimed: Vec<Pending> = queued
            .into_iter()
            .filter(|p| {
                p.state
                    .compare_exchange(QUEUED, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            })
            .map(|mut p| {
                p.cmd.proposed_at_ms = stamp;
                p
            })
            .collect();
        if claimed.is_empty() {
            continue;
        }
        metrics::histogram!("capkv_raft_batch_commands").record(claimed.len() as f64);
        let raft = raft.clone();
        let until = claimed
            .iter()
            .map(|p| p.deadline)
            .max()
            .unwrap_or_else(Instant::now)
            + if crate::rt::reverted(crate::rt::Revert::ProposalsWedge) {
                std::time::Duration::from_secs(1 << 30)
            } else {
                ANSWER_GRACE
            };
        crate::rt::spawn(async move {
            let (cmds, waiters): (Vec<Command>, Vec<_>) =
                claimed.into_iter().map(|p| (p.cmd, p.reply)).unzip();
            let n = cmds.len();
            let answer = tokio::time::timeout_at(until, raft.client_write(Batch(cmds))).await;
            drop(permit);
            let Ok(result) = answer else {
                // Every waiter has gone (with 504: these were claimed); free the slot.
                metrics::counter!("capkv_raft_proposals_unanswered_total").increment(1);
                tracing::warn!(
                    commands = n,
                    "raft never answered a proposal; its slot is freed"
                );
                for w in waiters {
                    let _ = w.send(Err(ProposeError::Unknown(
                        "raft did not answer the proposal".into(),
                    )));
                }
                return;
            };
            match result {
                Ok(resp) if resp.data.len() == n => {
                    for (w, r) in waiters.into_iter().zip(resp.data) {
                        let _ = w.send(Ok(r));
                    }
                }
                Ok(resp) => {
                    let e = format!("batch of {n} commands got {} replies", resp.data.len());
                    for w in waiters {
                        let _ = w.send(Err(ProposeError::Internal(e.clone())));
                    }
                }
                Err(e) => {
                    // Claimed: whatever openraft says, the entry may have been appended.
                    let why = match &e {
                        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                            "leadership moved after the write was proposed".to_owned()
                        }
                        RaftError::APIError(other) => other.to_string(),
                        RaftError::Fatal(f) => {
                            format!("raft stopped after the write was proposed: {f}")
                        }
                    };
                    let stopped = matches!(e, RaftError::Fatal(_))
                        && crate::rt::reverted(crate::rt::Revert::StopAnswers503);
                    for w in waiters {
                        let _ = w.send(Err(if stopped {
                            ProposeError::Stopped(why.clone())
                        } else {
                            ProposeError::Unknown(why.clone())
                        }));
                    }
                }
            }
        });
    }
}

/// Whether this node leads and a quorum acknowledged it within `fresh_ms` (a single voter
/// is its own quorum).
fn leads_with_fresh_quorum(raft: &Raft, fresh_ms: u64) -> bool {
    let m = raft.metrics().borrow().clone();
    let alone = m.membership_config.membership().voter_ids().count() <= 1;
    m.current_leader == Some(m.id)
        && (alone || m.millis_since_quorum_ack.is_some_and(|ms| ms < fresh_ms))
}

impl From<ApiError> for ProposeError {
    fn from(e: ApiError) -> ProposeError {
        ProposeError::Internal(e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// #8 item 6: the leader's stamps follow the applied cluster time and the monotonic
    /// clock; the wall clock is read only when the cluster has no time yet.
    #[test]
    fn cluster_clock_stamps_ignore_the_wall_clock_and_never_go_back() {
        let hour = 3_600_000;
        let mut c = ClusterClock::default();
        assert!(c.needs_wall(0) && !c.needs_wall(5));
        // A fresh cluster takes its start from the wall clock, once.
        let first = c.stamp(1, 0, || 5 * hour);
        assert!((5 * hour..5 * hour + 1000).contains(&first), "{first}");
        // Later stamps never read it again, however far off it is.
        assert!(
            !c.needs_wall(0),
            "a proposer that stamped never reads it again"
        );
        let s = c.stamp(1, first, || panic!("the wall clock was read"));
        assert!(s >= first && s < first + 1000);
        // A new term re-anchors at the applied time, wall clock unread.
        let s2 = c.stamp(2, first + 10, || panic!("the wall clock was read"));
        assert!(s2 >= first + 10);
        // Applied time ahead of our stamps (another leader's entries): we move up to it.
        let s3 = c.stamp(2, first + hour, || 0);
        assert!(s3 >= first + hour);
        // Applied time behind (a lagging state machine): our stamps do not go back.
        let s4 = c.stamp(3, first, || 0);
        assert!(s4 >= s3, "{s4} < {s3}");
        // A node joining with an empty state machine but a clock already running does
        // not consult the wall clock either.
        let mut fresh = ClusterClock::default();
        fresh.stamp(1, 0, || 7);
        assert!(fresh.stamp(2, 0, || panic!("read twice")) >= 7);
    }
    use crate::cp::{Condition, Op};

    fn put(value: usize, if_value: usize) -> Command {
        Command {
            op: Op::Put {
                keyspace: "cp".into(),
                key: b"k".to_vec(),
                value: vec![0; value],
                condition: (if_value > 0).then(|| Condition::Value(vec![0; if_value])),
            },
            idempotency_key: Some("idem".into()),
            proposed_at_ms: 0,
        }
    }

    #[test]
    fn a_command_counts_everything_it_carries() {
        let plain = size_of(&put(1000, 0));
        // A CAS by value carries the value it compares with: 256 of them at 1 MiB each
        // once made an entry no follower could receive.
        assert_eq!(size_of(&put(1000, 1 << 20)), plain + (1 << 20));
        assert!(
            plain >= 1000 + 1 + 2 + 4,
            "key, value, keyspace, idempotency key"
        );
    }
}
