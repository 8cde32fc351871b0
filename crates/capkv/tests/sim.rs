//! The deterministic simulator (`capkv sim`, docs/simulation.md) as tests: a few seeds
//! keep every promise, one seed replays bit for bit, and a fix taken back is found.
//! CI runs a few hundred seeds more with the release build (`.ci/sim.sh`).

use std::time::Duration;

use capkv::rt::Revert;
use capkv::sim::nemesis::Fault;
use capkv::sim::workload::Kind;
use capkv::sim::{run, SimOptions};

/// A short run: 8 simulated seconds of faults (this is a debug build).
fn short(seed: u64) -> SimOptions {
    let mut o = SimOptions::new(seed);
    o.faults_for = Duration::from_secs(8);
    o
}

#[test]
fn a_few_seeds_keep_every_promise() {
    for seed in 1..=3 {
        let r = run(&short(seed));
        assert!(r.valid(), "{}", r.summary());
        assert!(r.ops > 100, "the clients did work: {}", r.summary());
    }
}

#[test]
fn a_seed_replays_bit_for_bit() {
    let (a, b) = (run(&short(5)), run(&short(5)));
    assert_eq!(
        (a.trace_hash, a.events, a.ops),
        (b.trace_hash, b.events, b.ops),
        "one seed, two runs:\n{}\n{}",
        a.summary(),
        b.summary()
    );
    let other = run(&short(6));
    assert_ne!(a.trace_hash, other.trace_hash, "another seed, another run");
}

/// #8 item 10 taken back: an ap write whose home may have applied it goes to the next
/// home too, and counters count increments twice. Found in 65 of the first 100 seeds
/// (docs/simulation.md); here, within the first 8.
#[test]
fn the_ap_double_count_is_found_when_its_fix_is_taken_back() {
    let found = (1..=8).find_map(|seed| {
        let mut o = short(seed);
        o.revert = Some(Revert::ApRetriesMaybeDelivered);
        let r = run(&o);
        (!r.valid()).then_some(r)
    });
    let r = found.expect("no seed of 1..=8 found the double count");
    assert!(
        r.problems.iter().any(|p| p.contains("double-count")),
        "{}",
        r.summary()
    );
}

/// #8 item 2 taken back: a proposal openraft never answers holds its proposer slot for ever.
/// A leader cut off alone keeps entries it appended just before the cut (their proposals
/// pending); the majority moves on and purges its log past them; when the cut heals, the old
/// leader gets a snapshot whose last index is past its own last entry, so openraft purges
/// those entries without the truncation that would have answered their proposals. Found in
/// 41 of the first 100 seeds with partitions and the cp workloads (docs/simulation.md); here,
/// within the first 12.
#[test]
fn the_purged_proposal_wedge_is_found_when_its_fix_is_taken_back() {
    let found = (1..=12).find_map(|seed| {
        let mut o = SimOptions::new(seed);
        o.faults = vec![Fault::Partition];
        o.workloads = vec![Kind::Register, Kind::UniqueInsert, Kind::Idempotent];
        o.revert = Some(Revert::ProposalsWedge);
        let r = run(&o);
        (!r.valid()).then_some(r)
    });
    let r = found.expect("no seed of 1..=12 found the wedge");
    assert!(
        r.problems
            .iter()
            .any(|p| p.contains("proposals nobody answers")),
        "{}",
        r.summary()
    );
}

/// Found by the simulator: the leader crashed right after a batch of its log, with its last
/// commit index not yet fsynced; openraft restored it as the leader of its old term, and it
/// served linearizable reads from before writes it had acknowledged. A node that led now
/// starts as a follower (`LogStore::step_down_on_start`). Kept as a regression seed, with
/// the workloads it ran then: its trace is the bug's, event for event, up to the restart of
/// that leader (which now sends no append before an election).
#[test]
fn seed_1030_a_leader_restarted_after_a_crash_serves_no_stale_read() {
    let mut o = SimOptions::new(1030);
    o.faults = vec![Fault::CrashAtWrite, Fault::Crash, Fault::Restart];
    o.workloads = vec![Kind::Register, Kind::Counter, Kind::Set];
    let r = run(&o);
    assert!(r.valid(), "{}", r.summary());
}

/// Found by the simulator in the harness itself (outside review, `--nodes 5`): n5, cut off
/// alone and a home of no key it wrote, kept each acknowledged increment as hints for the
/// homes; the final reads, which go to the homes, all agreed without them before its next
/// handoff, and the counter checker saw "lost" increments. Convergence now also waits for
/// no hint held on any node. Kept as a regression seed.
#[test]
fn seed_4035_final_reads_wait_for_hints_to_be_handed_off() {
    let mut o = SimOptions::new(4035);
    o.nodes = 5;
    o.workloads = vec![Kind::Counter, Kind::Set, Kind::Siblings];
    let r = run(&o);
    assert!(r.valid(), "{}", r.summary());
}
