//! A node that starts without Raft state may have lost it (a wiped or replaced disk), and
//! Raft's safety rests on that state: the vote (one vote per term) and the log (entries
//! that counted toward a commit). A node that forgot both and then acts on them can vote
//! twice in a term (two leaders in one term) or help elect a leader that lacks committed
//! entries, which then overwrites them. Both happened: a wiped node that rejoined voted
//! for a stale candidate, committed writes were lost, and openraft caught the two
//! leaders in a debug assertion.
//!
//! So a node that starts with no Raft state rebuilds, conservatively, what it could have
//! known, before it takes part: it asks its peers for their term and last log id until
//! enough of them have answered that every majority of the cluster includes one of them
//! ([`probes_needed`]: any majority that elected a leader or committed an entry, even one
//! that counted this node's lost state, then has a member in the answers). From then on it
//! acts as if its lost vote were in the highest term reported and its lost log ended at the
//! highest last log id reported:
//!
//! - it grants no vote for a term at or below that term, nor to a candidate whose log is
//!   behind that log id (the candidate could lack a committed entry);
//! - it takes no entries or snapshot from a leader of a lower term (a stale leader), and
//!   tells it of the higher term.
//!
//! A peer that is itself rebuilding cannot vouch for anything and does not count toward
//! that number. But if every member answered and none vouched, no member holds state:
//! the cluster is new (its first start: every node begins without state) or every disk
//! was lost. Either way there is nothing to protect; the floor is term 0 and an empty
//! log, and the nodes form a new cluster. A majority without state is not enough by
//! default: a member that never started looks like one that lost its disk, so a wiped
//! node and a never-started one would form a new cluster while the members holding the
//! data are down (found by review). `--initial-cluster-state new` lets such a majority
//! form one (a new cluster with members missing: the operator vouches that nothing is
//! lost); `existing` never forms one (a replaced disk only joins).
//!
//! Until then the node takes part in nothing (votes refused, replication failed so the
//! leader retries). The price: a node that lost its disk can help the cluster again only
//! once enough others are up to vouch for what it lost.

use std::sync::Mutex;

use serde::Deserialize;

use openraft::raft::VoteRequest;

use super::{LogId, NodeId};

/// What a node that starts without Raft state (first start, or a lost disk) may do; a
/// node with Raft state ignores it. Named after etcd's `--initial-cluster-state`.
///
/// Only the operator knows whether a member with no state is new or lost its disk: a
/// member that never started and a wiped one look the same to their peers. So forming a
/// new cluster is safe by default only when no member anywhere holds state (see the
/// module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum InitialClusterState {
    /// Form a new cluster only once every member has answered and none holds Raft state;
    /// join the cluster whose members hold state otherwise. A member that is down keeps
    /// a fresh cluster from forming until it starts (or `new` is given).
    #[default]
    Auto,
    /// Form a new cluster as soon as this node and members without state make a
    /// majority: to start a new cluster with members missing. Wrong for a node that lost
    /// its disk while the members holding the data are down: it would form a new cluster
    /// without their data.
    New,
    /// Never form a cluster: only join one whose members hold state (a replaced disk).
    Existing,
}

/// What a peer reports: its current term and the id of the last entry in its log.
pub type Report = (u64, Option<LogId>);

/// A learned floor as stored: term, last log id, and whether enough peers vouched.
pub type PersistedFloor = (u64, Option<LogId>, bool);

/// How many peers (other than this node) must report before a node without state knows
/// an upper bound of what it lost: enough that every majority includes one of them.
pub fn probes_needed(cluster_size: usize) -> usize {
    if cluster_size <= 1 {
        return 0;
    }
    let majority = cluster_size / 2 + 1;
    cluster_size - majority + 1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Floor {
    /// The node started with Raft state: nothing was lost.
    Unneeded,
    /// It started without, and not enough peers have answered yet.
    Unknown,
    /// The highest term and last log id the peers reported; `vouched`: enough of them
    /// vouched (else a stateless majority, or every peer, answered).
    Known {
        term: u64,
        last_log: Option<LogId>,
        vouched: bool,
    },
}

/// Why a message is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not enough peers have answered yet: take part in nothing.
    NotReady,
    /// A term below what this node may have seen: answer with that term.
    StaleTerm(u64),
    /// A vote for a term this node may already have voted in, or for a candidate whose
    /// log is behind what this node may have held.
    Vote,
}

pub struct LostState {
    floor: Mutex<Floor>,
}

impl LostState {
    /// `had_state`: whether the node started with Raft state.
    pub fn new(had_state: bool) -> LostState {
        LostState {
            floor: Mutex::new(if had_state {
                Floor::Unneeded
            } else {
                Floor::Unknown
            }),
        }
    }

    /// A node that learned its floor in an earlier run (persisted by the caller, see
    /// [`LostState::known_floor`]): it keeps it across restarts, so it goes on vouching
    /// for what it may hold even before any entry reached it (found in CI: a node that
    /// learned its floor, then restarted with no entry yet, counted as stateless and
    /// helped a wiped node form a "new cluster" without a committed write).
    pub fn with_floor(floor: PersistedFloor) -> LostState {
        let (term, last_log, vouched) = floor;
        LostState {
            floor: Mutex::new(Floor::Known {
                term,
                last_log,
                vouched,
            }),
        }
    }

    /// The floor learned, to persist: (term, last log id, vouched).
    pub fn known_floor(&self) -> Option<PersistedFloor> {
        match self.get() {
            Floor::Known {
                term,
                last_log,
                vouched,
            } => Some((term, last_log, vouched)),
            Floor::Unneeded | Floor::Unknown => None,
        }
    }

    fn get(&self) -> Floor {
        *self.floor.lock().expect("lost state lock poisoned")
    }

    /// Whether the node still waits for its peers' reports.
    pub fn waiting(&self) -> bool {
        self.get() == Floor::Unknown
    }

    /// Takes the answers of peers in a cluster of `cluster_size` (`None`: a peer that
    /// cannot vouch). The floor is known once enough peers vouched ([`probes_needed`]),
    /// or every peer answered (under `existing`: and one of them vouched), or (under
    /// `new` only) this node and the peers that cannot vouch are a majority; it is the
    /// highest term and log id vouched for. Returns whether the floor is now known.
    pub fn learn(
        &self,
        answers: &[Option<Report>],
        cluster_size: usize,
        mode: InitialClusterState,
    ) -> bool {
        let mut floor = self.floor.lock().expect("lost state lock poisoned");
        if *floor != Floor::Unknown {
            return true;
        }
        let reports: Vec<Report> = answers.iter().flatten().copied().collect();
        let every_peer = answers.len() + 1 >= cluster_size;
        let stateless = answers.len() - reports.len() + 1;
        let enough = reports.len() >= probes_needed(cluster_size)
            || match mode {
                InitialClusterState::Auto => every_peer,
                InitialClusterState::New => every_peer || stateless > cluster_size / 2,
                InitialClusterState::Existing => every_peer && !reports.is_empty(),
            };
        if !enough {
            return false;
        }
        let term = reports.iter().map(|r| r.0).max().unwrap_or(0);
        let last_log = reports.iter().map(|r| r.1).max().flatten();
        let vouched = reports.len() >= probes_needed(cluster_size);
        *floor = Floor::Known {
            term,
            last_log,
            vouched,
        };
        true
    }

    /// What this node reports to a peer that probes it: its own state, raised to its
    /// floor. Nothing while its own floor is unknown (it cannot vouch for anything), nor
    /// while it learned its floor without enough vouchers and still holds no entry past
    /// the initial one: it is as stateless as the peer asking, and must count as such
    /// (else, of two new nodes, the one that learned first would stop counting as
    /// stateless for the other, which would wait for ever for the third: found in CI).
    pub fn report(&self, own: Report) -> Option<Report> {
        match self.get() {
            Floor::Unneeded => Some(own),
            Floor::Unknown => None,
            Floor::Known { vouched: false, .. } if own.1.is_none_or(|l| l.index == 0) => None,
            Floor::Known { term, last_log, .. } => Some((own.0.max(term), own.1.max(last_log))),
        }
    }

    /// The highest last log id peers reported, once the floor is known (`None`: none
    /// reported a log, or the node never lost its state).
    pub fn floor_log(&self) -> Option<LogId> {
        match self.get() {
            Floor::Known { last_log, .. } => last_log,
            Floor::Unneeded | Floor::Unknown => None,
        }
    }

    /// Whether a vote request may go to Raft.
    pub fn check_vote(&self, req: &VoteRequest<NodeId>) -> Result<(), Refusal> {
        match self.get() {
            Floor::Unneeded => Ok(()),
            Floor::Unknown => Err(Refusal::NotReady),
            Floor::Known { term, last_log, .. } => {
                if req.vote.leader_id().term <= term || req.last_log_id < last_log {
                    Err(Refusal::Vote)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Whether entries or a snapshot from a leader of `term` may go to Raft.
    pub fn check_leader(&self, term: u64) -> Result<(), Refusal> {
        match self.get() {
            Floor::Unneeded => Ok(()),
            Floor::Unknown => Err(Refusal::NotReady),
            Floor::Known { term: floor, .. } if term < floor => Err(Refusal::StaleTerm(floor)),
            Floor::Known { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Vote};
    use InitialClusterState::{Auto, Existing, New};

    fn id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn vote(term: u64, last: Option<LogId>) -> VoteRequest<NodeId> {
        VoteRequest {
            vote: Vote::new(term, 3),
            last_log_id: last,
        }
    }

    /// A floor learned in an earlier run is kept: the node vouches for it with no entry
    /// of its own, and still refuses candidates behind it.
    #[test]
    fn a_persisted_floor_vouches_before_any_entry_arrives() {
        let learned = LostState::new(false);
        assert!(learned.learn(
            &[Some((2, Some(id(2, 9)))), Some((2, Some(id(2, 7))))],
            3,
            Auto
        ));
        let floor = learned.known_floor().unwrap();
        let restarted = LostState::with_floor(floor);
        assert!(!restarted.waiting());
        assert_eq!(restarted.report((0, None)), Some((2, Some(id(2, 9)))));
        assert_eq!(restarted.floor_log(), Some(id(2, 9)));
        assert_eq!(
            restarted.check_vote(&vote(3, Some(id(2, 8)))),
            Err(Refusal::Vote)
        );
        assert_eq!(restarted.check_vote(&vote(3, Some(id(2, 9)))), Ok(()));
    }

    #[test]
    fn enough_peers_that_every_majority_has_one() {
        assert_eq!(probes_needed(1), 0);
        assert_eq!(probes_needed(2), 1);
        assert_eq!(probes_needed(3), 2);
        assert_eq!(probes_needed(4), 2);
        assert_eq!(probes_needed(5), 3);
        // Brute force: for every cluster size and every set of `needed` peers, every
        // majority (which may include this node, 0) meets the set.
        for n in 2..=7usize {
            let needed = probes_needed(n);
            let majority = n / 2 + 1;
            for peers in 0u32..(1 << n) {
                if peers & 1 != 0 || peers.count_ones() as usize != needed {
                    continue;
                }
                for m in 0u32..(1 << n) {
                    if m.count_ones() as usize >= majority {
                        assert!(m & peers != 0, "n={n}: majority {m:b} misses {peers:b}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_node_that_had_state_is_never_restricted() {
        let s = LostState::new(true);
        assert_eq!(s.check_vote(&vote(1, None)), Ok(()));
        assert_eq!(s.check_leader(0), Ok(()));
        assert_eq!(s.report((4, Some(id(4, 9)))), Some((4, Some(id(4, 9)))));
    }

    #[test]
    fn a_node_without_state_waits_then_acts_on_the_highest_report() {
        let s = LostState::new(false);
        assert_eq!(
            s.check_vote(&vote(9, Some(id(9, 99)))),
            Err(Refusal::NotReady)
        );
        assert_eq!(s.check_leader(9), Err(Refusal::NotReady));
        assert_eq!(s.report((0, None)), None, "it vouches for nothing yet");
        // Three nodes: both others must vouch.
        assert!(!s.learn(&[Some((2, Some(id(2, 7))))], 3, Auto));
        // Seven: a peer that is rebuilding too vouches for nothing and does not count.
        assert!(!s.learn(&[Some((2, Some(id(2, 7)))), None], 7, Auto));
        assert!(s.waiting());
        assert!(s.learn(
            &[Some((2, Some(id(2, 7)))), Some((1, Some(id(1, 3))))],
            3,
            Auto
        ));
        // Its lost vote may have been in term 2: no vote at or below it.
        assert_eq!(s.check_vote(&vote(2, Some(id(2, 7)))), Err(Refusal::Vote));
        // Its lost log may have held 2-7: no vote for a candidate behind it.
        assert_eq!(s.check_vote(&vote(3, Some(id(1, 3)))), Err(Refusal::Vote));
        assert_eq!(s.check_vote(&vote(3, Some(id(2, 7)))), Ok(()));
        // A leader of term 1 is stale; term 2 and later are taken.
        assert_eq!(s.check_leader(1), Err(Refusal::StaleTerm(2)));
        assert_eq!(s.check_leader(2), Ok(()));
        assert_eq!(s.report((0, None)), Some((2, Some(id(2, 7)))));
    }

    #[test]
    fn a_fresh_cluster_forms_once_every_member_answers_without_state() {
        let three = LostState::new(false);
        assert!(
            !three.learn(&[None], 3, Auto),
            "the third may hold the data"
        );
        assert!(three.learn(&[None, None], 3, Auto), "nobody holds state");
        assert_eq!(three.check_vote(&vote(1, None)), Ok(()));
        assert_eq!(three.check_leader(1), Ok(()));
        // A new node that learned without vouchers still reports nothing while its log
        // is empty, so its new peers count it as stateless too (found in CI: the second
        // of two new nodes waited for ever for the third)...
        assert_eq!(three.report((1, Some(id(0, 0)))), None);
        let peer = three.report((1, Some(id(0, 0))));
        assert!(LostState::new(false).learn(&[peer, None], 3, Auto));
        // ...and reports its state once it holds entries.
        assert_eq!(three.report((2, Some(id(2, 5)))), Some((2, Some(id(2, 5)))));
        // Every peer answering is enough even if fewer than `probes_needed` vouch: the
        // floor is what the vouching ones hold.
        let five = LostState::new(false);
        let answers = [None, Some((4, Some(id(4, 2)))), None, None];
        assert!(!five.learn(&answers[..3], 5, Auto));
        assert!(five.learn(&answers, 5, Auto));
        assert_eq!(five.check_leader(3), Err(Refusal::StaleTerm(4)));
        // A node that learned from enough vouchers reports what it learned.
        let vouched = LostState::new(false);
        assert!(vouched.learn(&[Some((3, Some(id(3, 4)))), Some((2, None))], 3, Auto));
        assert_eq!(vouched.report((0, None)), Some((3, Some(id(3, 4)))));
    }

    /// The review's case: n1 lost its disk, n2 never started (or never got an entry), n3
    /// holds the committed writes and is down. n1 and n2 are a majority without state,
    /// but forming a cluster would lose n3's data; by default they wait for n3.
    #[test]
    fn a_wiped_node_and_a_never_started_one_wait_for_the_member_holding_the_data() {
        let n1 = LostState::new(false);
        assert!(!n1.learn(&[None], 3, Auto));
        assert!(!n1.learn(&[None], 3, Existing));
        assert!(n1.waiting());
        // n3 comes back: its log is the floor, and n1 elects nobody behind it.
        assert!(n1.learn(&[None, Some((3, Some(id(3, 40))))], 3, Auto));
        assert_eq!(n1.check_vote(&vote(4, Some(id(2, 50)))), Err(Refusal::Vote));
        assert_eq!(n1.check_vote(&vote(4, Some(id(3, 40)))), Ok(()));
    }

    #[test]
    fn new_lets_a_stateless_majority_form_a_cluster() {
        let three = LostState::new(false);
        assert!(three.learn(&[None], 3, New), "2 of 3 fresh nodes form it");
        let five = LostState::new(false);
        assert!(!five.learn(&[None], 5, New));
        assert!(
            five.learn(&[None, None], 5, New),
            "3 of 5 fresh nodes form it"
        );
        // With a vouching peer among them, its report is the floor.
        let mixed = LostState::new(false);
        assert!(mixed.learn(&[None, Some((4, Some(id(4, 2)))), None], 5, New));
        assert_eq!(mixed.check_leader(3), Err(Refusal::StaleTerm(4)));
    }

    #[test]
    fn existing_never_forms_a_cluster() {
        let s = LostState::new(false);
        assert!(!s.learn(&[None, None], 3, Existing), "nobody to join");
        assert!(s.waiting());
        assert!(s.learn(&[None, Some((2, Some(id(2, 7))))], 3, Existing));
        assert_eq!(s.floor_log(), Some(id(2, 7)));
    }
}
