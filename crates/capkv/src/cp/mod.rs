//! cp keyspaces: one Raft group (openraft) replicating a state machine over the [`Engine`].
//!
//! ```text
//!   Node::write ──client_write──▶ openraft ──append──▶ LogStore ──▶ Engine (Tree::Log)
//!                                    │                    └─ GroupCommit: fsync, then ack
//!                                    └──apply (committed)──▶ StateMachine ──▶ Engine (Tree::Data)
//!   Node::read (linearizable) ──ensure_linearizable (ReadIndex)──▶ Reader ──▶ Engine (Tree::Data)
//! ```
//!
//! Ordering rules, enforced in [`log_store`] and [`state_machine`]:
//! 1. An appended entry is reported flushed to openraft only after an fsync that began
//!    after it was written. openraft only counts a node toward a commit quorum after
//!    that, so an acknowledged write is on disk on a majority.
//! 2. The vote is fsynced before `save_vote` returns (a node must never vote twice in a term).
//! 3. The state machine writes without fsync: after a crash it may be behind the log, and
//!    openraft re-applies from the log. So the log is never purged past what is durable
//!    in the state machine: `purge` fsyncs first.
//!
//! [`Engine`]: crate::storage::Engine

// openraft's `StorageError` is large and is the error type its storage traits demand;
// boxing it in our helpers would only add conversions at every trait boundary.
#![allow(clippy::result_large_err)]

pub mod guard;
pub mod log_store;
pub mod lost_state;
pub mod network;
pub mod proposer;
pub mod rpc;
pub mod snapshot;
pub mod state_machine;

use std::fmt;

use capkv_core::{ApiError, KeyspaceSpec, UserSpec};
use serde::{Deserialize, Serialize};

/// Raft's node id: the number in a node name such as `n3`.
pub use crate::cluster::NodeId;

/// What openraft stores about each member: how to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    pub name: String,
    pub peer_addr: String,
    pub http_addr: String,
}

impl fmt::Display for PeerNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.peer_addr)
    }
}

openraft::declare_raft_types!(
    /// The Raft type configuration of capkv's cp group.
    pub TypeConfig:
        D = Batch,
        R = Vec<Reply>,
        NodeId = NodeId,
        Node = PeerNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = snapshot::SnapshotFile,
        AsyncRuntime = crate::rt::RaftRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageResult<T> = Result<T, openraft::StorageError<NodeId>>;

/// A compare-and-set precondition on a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    /// The key's version must equal this; `0` means the key must be absent.
    Version(u64),
    /// The key must exist with exactly this value.
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// A state-changing operation on the cp state machine.
///
/// Byte fields are serialized as byte strings (`serde_bytes`): the same bincode bytes as
/// a sequence of `u8` (length, then the bytes), written and read in one copy instead of
/// one call per byte, which made a 4 MiB AppendEntries take longer than the 100 ms
/// openraft allows it in a debug build (#9 item 3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        keyspace: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        condition: Option<Condition>,
    },
    Delete {
        keyspace: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        condition: Option<Condition>,
    },
    CreateKeyspace {
        spec: KeyspaceSpec,
    },
    /// Creates or replaces a user: its grants and the SHA-256 of its bearer token (the
    /// token itself is never stored).
    PutUser {
        spec: UserSpec,
        #[serde(with = "serde_bytes")]
        token_sha256: Vec<u8>,
    },
    DeleteUser {
        name: String,
    },
}

/// A Raft log entry's payload: an operation plus what makes its application
/// deterministic and idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub op: Op,
    /// The client's `Idempotency-Key`: a second command with the same key gets the
    /// first one's reply and changes nothing.
    pub idempotency_key: Option<String>,
    /// Cluster time in ms, stamped by the leader's proposer ([`proposer::ClusterClock`]:
    /// the applied cluster time advanced by the leader's monotonic clock; no node's wall
    /// clock once the cluster has a time). Used only to date idempotency records; carried
    /// in the entry so every replica dates and expires the same ones (the state machine
    /// applies each command at the larger of this and the cluster time so far).
    pub proposed_at_ms: u64,
}

/// The payload of one Raft log entry: commands proposed together (group commit, see
/// [`proposer`]), applied in order, each with its own reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch(pub Vec<Command>);

/// The outcome of applying a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Written {
    Put {
        version: u64,
    },
    Delete {
        deleted: bool,
        version: u64,
    },
    KeyspaceCreated,
    /// A blank or membership entry: nothing a client asked for.
    Internal,
    UserSaved,
    UserDeleted {
        deleted: bool,
    },
}

/// What a client gets back for a [`Command`]: deterministic, so it can be stored for
/// idempotent retries.
pub type Reply = Result<Written, ApiError>;

pub use crate::codec::{decode, encode, encoded_len, Stored, FORMAT, MAGIC};

// openraft's records, stored by the log store and the state machine.
impl Stored for openraft::Entry<TypeConfig> {}
impl Stored for openraft::LogId<NodeId> {}
impl Stored for openraft::Vote<NodeId> {}
impl Stored for openraft::StoredMembership<NodeId, PeerNode> {}

#[cfg(test)]
mod tests {
    use super::*;
    use capkv_core::Mode;

    #[test]
    fn records_carry_their_format_and_other_formats_are_refused_by_name() {
        let raw = encode(&(7u64, "x".to_owned()));
        assert_eq!(raw[..2], [MAGIC, FORMAT]);
        assert_eq!(decode::<(u64, String)>(&raw).unwrap(), (7, "x".to_owned()));
        let mut other = raw.clone();
        other[1] = FORMAT + 1;
        let e = decode::<(u64, String)>(&other).unwrap_err().to_string();
        assert!(e.contains(&format!("storage format {}", FORMAT + 1)), "{e}");
        // A record from before formats (plain bincode) is refused, not misread.
        let old = bincode::serialize(&(7u64, "x".to_owned())).unwrap();
        let e = decode::<(u64, String)>(&old).unwrap_err().to_string();
        assert!(e.contains("without a storage format header"), "{e}");
        assert!(decode::<u64>(&[]).is_err());
    }

    /// Log entries are bincode: every command must survive the round trip (a field that
    /// serde skips would shift every byte after it).
    #[test]
    fn commands_round_trip_through_bincode() {
        for op in [
            Op::CreateKeyspace {
                spec: KeyspaceSpec::new("cp", Mode::Cp),
            },
            Op::CreateKeyspace {
                spec: KeyspaceSpec {
                    name: "ap".into(),
                    mode: Mode::Ap,
                    n: Some(3),
                    r: Some(1),
                    w: Some(2),
                    value_type: None,
                },
            },
            Op::Put {
                keyspace: "cp".into(),
                key: b"k".to_vec(),
                value: vec![0, 255],
                condition: Some(Condition::Version(0)),
            },
            Op::Delete {
                keyspace: "cp".into(),
                key: b"k".to_vec(),
                condition: Some(Condition::Value(b"v".to_vec())),
            },
            Op::PutUser {
                spec: UserSpec {
                    name: "ann".into(),
                    grants: vec!["read:cp".parse().unwrap()],
                },
                token_sha256: vec![7; 32],
            },
            Op::DeleteUser { name: "ann".into() },
        ] {
            let cmd = Command {
                op,
                idempotency_key: Some("id".into()),
                proposed_at_ms: 7,
            };
            let entry: openraft::Entry<TypeConfig> = openraft::Entry {
                log_id: LogId::new(openraft::CommittedLeaderId::new(2, 1), 9),
                payload: openraft::EntryPayload::Normal(Batch(vec![cmd.clone(), cmd.clone()])),
            };
            let back: openraft::Entry<TypeConfig> = decode(&encode(&entry)).unwrap();
            assert_eq!(back.log_id, entry.log_id);
            assert!(
                matches!(back.payload, openraft::EntryPayload::Normal(b) if b.0 == vec![cmd.clone(), cmd])
            );
        }
    }
}
