//! What a peer's Raft messages and cp commands must look like before this node lets them
//! near openraft or the state machine.
//!
//! Peers are authenticated (mutual TLS), but a compromised node, a bug or an operator
//! who runs with `--insecure-peers` can still send anything; openraft trusts what it is
//! given and panics on some of it (a vote with term 2^64-1 made `term + 1` overflow in
//! every core that saw it, and the vote was persisted). So every message is checked here
//! as if it came from a client. The rules refuse only what no honest peer sends:
//!
//! - the sender is the node the message speaks for (a candidate asks for its own vote, a
//!   leader sends its own entries and snapshots);
//! - terms stay below [`TERM_MAX`] and indexes below [`INDEX_MAX`] (an honest cluster
//!   adds one per election or entry: it would need millennia to get near either, while
//!   openraft adds one to both without checking);
//! - log ids are ordered as Raft orders them (entries consecutive after `prev_log_id`,
//!   no log id newer than the vote that carries it);
//! - memberships name only this cluster's nodes;
//! - snapshot chunks stay within [`SNAPSHOT_OFFSET_MAX`] and one chunk's size.
//!
//! Commands inside entries cannot be refused by a follower without breaking Raft's log
//! matching; the state machine instead applies a malformed command as an error that
//! changes nothing ([`check_op`]), the same on every replica.

use std::collections::BTreeSet;

use capkv_core::{validate, ApiError, Mode};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{EntryPayload, Membership, Vote};

use super::{Command, Condition, LogId, NodeId, Op, PeerNode, TypeConfig};

/// Highest term a peer may send (2^48).
pub const TERM_MAX: u64 = 1 << 48;
/// Highest log index a peer may send (2^62).
pub const INDEX_MAX: u64 = 1 << 62;
/// Highest byte offset of a snapshot chunk (1 TiB): far beyond any snapshot this node
/// could write, and a bound on the file a hostile offset could make it seek to.
pub const SNAPSHOT_OFFSET_MAX: u64 = 1 << 40;
/// Keyspaces a cluster may hold: each is listed whole by `GET /v1/keyspaces` and checked
/// on every request, so the registry must stay small.
pub const KEYSPACES_MAX: usize = 1024;

/// Why a peer's message was refused.
pub type Refused = String;

fn check_vote_shape(from: NodeId, vote: &Vote<NodeId>, what: &str) -> Result<(), Refused> {
    let leader = vote.leader_id();
    if leader.voted_for() != Some(from) {
        return Err(format!(
            "{what} from node {from} speaks for node {:?}",
            leader.voted_for()
        ));
    }
    if leader.term > TERM_MAX {
        return Err(format!("{what} with term {} (max {TERM_MAX})", leader.term));
    }
    Ok(())
}

fn check_log_id(id: &LogId, vote: &Vote<NodeId>, what: &str) -> Result<(), Refused> {
    if id.index > INDEX_MAX {
        return Err(format!("{what} at index {} (max {INDEX_MAX})", id.index));
    }
    if id.leader_id.term > vote.leader_id().term {
        return Err(format!(
            "{what} of term {} is newer than its vote's term {}",
            id.leader_id.term,
            vote.leader_id().term
        ));
    }
    Ok(())
}

fn check_membership(
    m: &Membership<NodeId, PeerNode>,
    members: &BTreeSet<NodeId>,
) -> Result<(), Refused> {
    match m
        .nodes()
        .map(|(id, _)| *id)
        .find(|id| !members.contains(id))
    {
        Some(id) => Err(format!(
            "a membership naming node {id}, not in this cluster"
        )),
        None => Ok(()),
    }
}

pub fn check_vote(from: NodeId, r: &VoteRequest<NodeId>) -> Result<(), Refused> {
    check_vote_shape(from, &r.vote, "a vote request")?;
    if let Some(last) = &r.last_log_id {
        check_log_id(last, &r.vote, "a candidate's last log id")?;
    }
    Ok(())
}

pub fn check_append(
    from: NodeId,
    r: &AppendEntriesRequest<TypeConfig>,
    members: &BTreeSet<NodeId>,
) -> Result<(), Refused> {
    check_vote_shape(from, &r.vote, "append-entries")?;
    let mut prev = r.prev_log_id;
    if let Some(p) = &prev {
        check_log_id(p, &r.vote, "prev_log_id")?;
    }
    for e in &r.entries {
        check_log_id(&e.log_id, &r.vote, "an entry")?;
        let expected = prev.map_or(0, |p| p.index + 1);
        if e.log_id.index != expected {
            return Err(format!(
                "entry index {} where {expected} follows",
                e.log_id.index
            ));
        }
        if prev.is_some_and(|p| p.leader_id.term > e.log_id.leader_id.term) {
            return Err(format!(
                "entry {} has an older term than the entry before it",
                e.log_id.index
            ));
        }
        if let EntryPayload::Membership(m) = &e.payload {
            check_membership(m, members)?;
        }
        prev = Some(e.log_id);
    }
    if let Some(c) = &r.leader_commit {
        check_log_id(c, &r.vote, "leader_commit")?;
    }
    Ok(())
}

pub fn check_snapshot(
    from: NodeId,
    r: &InstallSnapshotRequest<TypeConfig>,
    members: &BTreeSet<NodeId>,
    chunk_bytes_max: usize,
) -> Result<(), Refused> {
    check_vote_shape(from, &r.vote, "a snapshot chunk")?;
    if let Some(last) = &r.meta.last_log_id {
        check_log_id(last, &r.vote, "a snapshot's last log id")?;
    }
    check_membership(r.meta.last_membership.membership(), members)?;
    if r.offset > SNAPSHOT_OFFSET_MAX {
        return Err(format!("a snapshot chunk at offset {}", r.offset));
    }
    if r.data.len() > chunk_bytes_max {
        return Err(format!(
            "a snapshot chunk of {} bytes (max {chunk_bytes_max})",
            r.data.len()
        ));
    }
    if r.meta.snapshot_id.len() > 256 {
        return Err("a snapshot id over 256 bytes".into());
    }
    Ok(())
}

/// The checks of an operation that depend on nothing but the operation (names, keys, a
/// valid and normalized keyspace spec): the state machine applies an operation that
/// fails them as an error that changes nothing, on every replica alike.
pub fn check_op(op: &Op) -> Result<(), ApiError> {
    match op {
        Op::Put { keyspace, key, .. } | Op::Delete { keyspace, key, .. } => {
            validate::keyspace_name(keyspace)?;
            validate::key(key)
        }
        Op::CreateKeyspace { spec } => {
            if &spec.clone().normalized()? != spec {
                return Err(ApiError::bad_request(
                    "a keyspace spec that is not normalized",
                ));
            }
            Ok(())
        }
        Op::PutUser { spec, token_sha256 } => {
            spec.validate()?;
            if token_sha256.len() != 32 {
                return Err(ApiError::bad_request("a token hash is 32 bytes"));
            }
            Ok(())
        }
        Op::DeleteUser { name } => validate::keyspace_name(name),
    }
}

/// All of a forwarded command's checks, as the HTTP API makes them: [`check_op`], an ap
/// keyspace's `n` within the cluster, the value and condition sizes of this node's
/// `--max-value-bytes`, and the idempotency key.
pub fn check_command(
    c: &Command,
    cluster_nodes: u32,
    max_value_bytes: usize,
) -> Result<(), ApiError> {
    check_op(&c.op)?;
    if let Op::CreateKeyspace { spec } = &c.op {
        if spec.mode == Mode::Ap && spec.n.is_some_and(|n| n > cluster_nodes) {
            return Err(ApiError::bad_request(format!(
                "n={:?} replicas, but the cluster has {cluster_nodes} nodes",
                spec.n
            )));
        }
    }
    if let Some(k) = &c.idempotency_key {
        validate::idempotency_key(k)?;
    }
    let too_large = |what: &str, n: usize| {
        ApiError::too_large(format!(
            "{what} is {n} bytes; the limit is {max_value_bytes} (--max-value-bytes)"
        ))
    };
    let condition = match &c.op {
        Op::Put {
            value, condition, ..
        } => {
            if value.len() > max_value_bytes {
                return Err(too_large("the value", value.len()));
            }
            condition
        }
        Op::Delete { condition, .. } => condition,
        Op::CreateKeyspace { .. } | Op::PutUser { .. } | Op::DeleteUser { .. } => &None,
    };
    match condition {
        Some(Condition::Value(v)) if v.len() > max_value_bytes => {
            Err(too_large("if_value", v.len()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capkv_core::KeyspaceSpec;
    use openraft::{CommittedLeaderId, Entry};

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 0), index)
    }

    #[test]
    fn a_vote_must_speak_for_its_sender_with_a_sane_term() {
        let ok = VoteRequest::new(Vote::new(5, 2), Some(log_id(4, 10)));
        check_vote(2, &ok).unwrap();
        assert!(check_vote(3, &ok).is_err(), "n3 cannot ask votes for n2");
        let forged = VoteRequest::new(Vote::new(u64::MAX, 2), None);
        assert!(check_vote(2, &forged).is_err());
        let future_log = VoteRequest::new(Vote::new(5, 2), Some(log_id(6, 10)));
        assert!(check_vote(2, &future_log).is_err());
        let far = VoteRequest::new(Vote::new(5, 2), Some(log_id(5, u64::MAX)));
        assert!(check_vote(2, &far).is_err());
    }

    #[test]
    fn entries_must_follow_one_another() {
        let members = BTreeSet::from([1, 2, 3]);
        let vote = Vote::new_committed(3, 1);
        let entry = |t, i| Entry::<TypeConfig> {
            log_id: log_id(t, i),
            payload: EntryPayload::Blank,
        };
        let req = |prev, entries| AppendEntriesRequest {
            vote,
            prev_log_id: prev,
            entries,
            leader_commit: Some(log_id(3, 5)),
        };
        check_append(
            1,
            &req(Some(log_id(2, 5)), vec![entry(2, 6), entry(3, 7)]),
            &members,
        )
        .unwrap();
        check_append(1, &req(None, vec![entry(1, 0)]), &members).unwrap();
        assert!(check_append(2, &req(None, vec![]), &members).is_err());
        let gap = req(Some(log_id(2, 5)), vec![entry(3, 7)]);
        assert!(check_append(1, &gap, &members).is_err());
        let back = req(Some(log_id(3, 5)), vec![entry(2, 6)]);
        assert!(check_append(1, &back, &members).is_err());
        let future = req(Some(log_id(2, 5)), vec![entry(4, 6)]);
        assert!(check_append(1, &future, &members).is_err());
        let stranger = Entry::<TypeConfig> {
            log_id: log_id(3, 6),
            payload: EntryPayload::Membership(Membership::new(
                vec![BTreeSet::from([1, 2, 9])],
                None,
            )),
        };
        assert!(check_append(1, &req(Some(log_id(2, 5)), vec![stranger]), &members).is_err());
    }

    #[test]
    fn commands_are_checked_as_client_requests() {
        let put = |ks: &str, key: &[u8], value: usize| Command {
            op: Op::Put {
                keyspace: ks.into(),
                key: key.to_vec(),
                value: vec![0; value],
                condition: None,
            },
            idempotency_key: None,
            proposed_at_ms: 0,
        };
        check_command(&put("cp", b"k", 10), 3, 100).unwrap();
        assert!(check_command(&put("a/b", b"k", 10), 3, 100).is_err());
        assert!(check_command(&put("cp", b"", 10), 3, 100).is_err());
        assert!(check_command(&put("cp", b"k", 101), 3, 100).is_err());
        let mut bad = KeyspaceSpec::new("ap", Mode::Ap);
        bad.n = Some(0);
        bad.r = Some(0);
        bad.w = Some(0);
        assert!(check_op(&Op::CreateKeyspace { spec: bad }).is_err());
        let raw = KeyspaceSpec::new("ap", Mode::Ap);
        assert!(check_op(&Op::CreateKeyspace { spec: raw.clone() }).is_err());
        let good = raw.normalized().unwrap();
        check_op(&Op::CreateKeyspace { spec: good.clone() }).unwrap();
        let mut wide = good;
        wide.n = Some(5);
        wide.r = Some(1);
        let wide = Command {
            op: Op::CreateKeyspace { spec: wide },
            idempotency_key: None,
            proposed_at_ms: 0,
        };
        check_command(&wide, 5, 100).unwrap();
        assert!(check_command(&wide, 3, 100).is_err());
    }
}
