//! Multi-process tests: real `capkv serve` processes on 127.0.0.1, faults through
//! `/v1/faults`, `kill -9` for crashes. Every wait has a deadline; every process is
//! killed when its test ends (the harness's Drop), pass or fail.

mod harness;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capkv_client::{ClientError, Consistency, ErrorCode, WriteOptions};
use harness::{eventually, eventually_some, Cluster};

const LIN: Consistency = Consistency::Linearizable;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_reads_what_any_node_wrote() {
    let c = Cluster::start(3, &[]).await;
    for i in 0..3 {
        let key = format!("k{i}");
        c.client(i)
            .put(
                "cp",
                key.as_bytes(),
                format!("v{i}").into_bytes(),
                &WriteOptions::default(),
            )
            .await
            .unwrap();
    }
    for reader in 0..3 {
        for i in 0..3 {
            let got = c
                .client(reader)
                .get("cp", format!("k{i}").as_bytes(), LIN)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                got.value,
                format!("v{i}").into_bytes(),
                "n{} reading k{i}",
                reader + 1
            );
        }
    }
    // Versions are cluster-wide revisions: they only grow.
    let v0 = c
        .client(0)
        .get("cp", b"k0", LIN)
        .await
        .unwrap()
        .unwrap()
        .version;
    let v2 = c
        .client(0)
        .get("cp", b"k2", LIN)
        .await
        .unwrap()
        .unwrap()
        .version;
    assert!(v2 > v0);
    // Scan sees all three, in key order, through any node.
    let (entries, more) = c.client(1).scan("cp", "k", None, Some(2)).await.unwrap();
    assert_eq!(
        entries
            .iter()
            .map(|e| e.key.clone().unwrap())
            .collect::<Vec<_>>(),
        vec!["k0", "k1"]
    );
    assert!(more);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_refuses_with_503_and_catches_up_after_heal() {
    let c = Cluster::start(3, &[]).await;
    let opts = WriteOptions::default();
    c.client(0)
        .put("cp", b"x", b"before".to_vec(), &opts)
        .await
        .unwrap();
    // An acknowledged write is committed on a majority, not necessarily applied on n1 yet.
    eventually(Duration::from_secs(10), "n1 has applied the first write", || async {
        matches!(c.client(0).get("cp", b"x", Consistency::Serializable).await, Ok(Some(v)) if v.value == b"before")
    })
    .await;
    c.partition(&[&[0], &[1, 2]]).await;
    // Wait until n1 has noticed it lost the majority (it pings every 200 ms).
    c.wait_cut_off(0).await;

    // The minority refuses writes and linearizable reads at once: 503, well within the deadline.
    for _ in 0..3 {
        let started = Instant::now();
        let err = c
            .client(0)
            .put("cp", b"x", b"minority".to_vec(), &opts)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "503 took {:?}",
            started.elapsed()
        );
        let err = c.client(0).get("cp", b"x", LIN).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    }
    // A serializable read still answers from the local replica: possibly stale, by choice.
    let stale = c
        .client(0)
        .get("cp", b"x", Consistency::Serializable)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stale.value, b"before");

    // The majority keeps serving (after electing a new leader if n1 led).
    let mut last = None;
    eventually(
        Duration::from_secs(15),
        "majority accepts a write",
        || async {
            c.client(1)
                .put("cp", b"x", b"majority".to_vec(), &opts)
                .await
                .is_ok()
        },
    )
    .await;
    for i in 0..5 {
        let v = format!("majority-{i}");
        let r = c
            .client(2)
            .put("cp", b"x", v.clone().into_bytes(), &opts)
            .await
            .unwrap();
        last = Some((v, r.version));
    }
    let (last_value, last_version) = last.unwrap();

    // The minority's refused write did not happen anywhere.
    let seen = c.client(1).get("cp", b"x", LIN).await.unwrap().unwrap();
    assert_eq!(seen.value, last_value.as_bytes());

    c.heal().await;
    eventually(Duration::from_secs(15), "n1 reads the majority's latest value", || async {
        matches!(c.client(0).get("cp", b"x", LIN).await, Ok(Some(v)) if v.value == last_value.as_bytes() && v.version == last_version)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_write() {
    let mut c = Cluster::start(3, &[]).await;
    let opts = WriteOptions::default();
    let mut acked = BTreeMap::new();
    for i in 0..30 {
        let (k, v) = (format!("a{i}"), format!("v{i}"));
        c.client(i % 3)
            .put("cp", k.as_bytes(), v.clone().into_bytes(), &opts)
            .await
            .unwrap();
        acked.insert(k, v);
    }
    let leader = c.leader().await;
    c.kill9(leader);
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let failover = Instant::now();
    eventually(
        Duration::from_secs(15),
        "a new leader takes writes",
        || async {
            c.client(others[0])
                .put("cp", b"after", b"failover".to_vec(), &opts)
                .await
                .is_ok()
        },
    )
    .await;
    eprintln!(
        "failover: first write accepted {:?} after kill -9 of the leader",
        failover.elapsed()
    );
    for (k, v) in &acked {
        let got = c
            .client(others[1])
            .get("cp", k.as_bytes(), LIN)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got.value, v.as_bytes(), "{k} lost");
    }
    // The old leader comes back and catches up.
    c.restart(leader).await;
    eventually(Duration::from_secs(15), "the old leader catches up", || async {
        matches!(c.client(leader).get("cp", b"after", Consistency::Serializable).await, Ok(Some(v)) if v.value == b"failover")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_every_node_loses_no_acknowledged_write() {
    let mut c = Cluster::start(3, &[]).await;
    let acked = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    // Concurrent writers, so acknowledged writes are in flight at the crash.
    let mut tasks = Vec::new();
    for w in 0..6usize {
        let client = c.client(w % 3);
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..15 {
                let (k, v) = (format!("w{w}-{i}"), format!("v{i}"));
                if client
                    .put(
                        "cp",
                        k.as_bytes(),
                        v.clone().into_bytes(),
                        &WriteOptions::default(),
                    )
                    .await
                    .is_ok()
                {
                    acked.lock().unwrap().insert(k, v);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for i in 0..3 {
        c.kill9(i);
    }
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_healthy().await;
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 80,
        "most writes should have been acknowledged, got {}",
        acked.len()
    );
    for (k, v) in &acked {
        let got = eventually_some(
            Duration::from_secs(15),
            "the restarted cluster serves reads",
            || async { c.client(1).get("cp", k.as_bytes(), LIN).await.ok() },
        )
        .await;
        assert_eq!(
            got.map(|g| g.value),
            Some(v.clone().into_bytes()),
            "{k} lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cas_increments_are_never_lost() {
    let c = Cluster::start(3, &[]).await;
    c.client(0)
        .put("cp", b"counter", b"0".to_vec(), &WriteOptions::default())
        .await
        .unwrap();
    let successes = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..8usize {
        let client = c.client(w % 3);
        let (successes, unknown) = (successes.clone(), unknown.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = 0;
            while mine < 5 {
                let cur = client.get("cp", b"counter", LIN).await.unwrap().unwrap();
                let n: u64 = String::from_utf8(cur.value).unwrap().parse().unwrap();
                let opts = WriteOptions {
                    if_version: Some(cur.version),
                    ..Default::default()
                };
                match client
                    .put("cp", b"counter", (n + 1).to_string().into_bytes(), &opts)
                    .await
                {
                    Ok(_) => {
                        successes.fetch_add(1, Ordering::SeqCst);
                        mine += 1;
                    }
                    Err(ClientError::Api { error, .. }) if error.code == ErrorCode::Conflict => {}
                    Err(ClientError::Api { error, .. }) if error.code == ErrorCode::Timeout => {
                        unknown.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let v = c
        .client(2)
        .get("cp", b"counter", LIN)
        .await
        .unwrap()
        .unwrap();
    let n: u64 = String::from_utf8(v.value).unwrap().parse().unwrap();
    let (ok, unk) = (
        successes.load(Ordering::SeqCst),
        unknown.load(Ordering::SeqCst),
    );
    assert_eq!(ok, 40);
    assert!(
        n >= ok && n <= ok + unk,
        "counter {n}, {ok} successful CAS, {unk} unknown"
    );
    if unk == 0 {
        assert_eq!(n, ok);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retry_through_another_node_applies_once() {
    let c = Cluster::start(3, &[]).await;
    let opts = WriteOptions {
        idempotency_key: Some("order-42".into()),
        ..Default::default()
    };
    let first = c
        .client(0)
        .put("cp", b"order", b"paid".to_vec(), &opts)
        .await
        .unwrap();
    // Another write in between moves the revision on.
    c.client(1)
        .put("cp", b"other", b"x".to_vec(), &WriteOptions::default())
        .await
        .unwrap();
    let retry = c
        .client(2)
        .put("cp", b"order", b"paid".to_vec(), &opts)
        .await
        .unwrap();
    assert_eq!(first, retry, "the retry returns the first answer");
    let got = c.client(1).get("cp", b"order", LIN).await.unwrap().unwrap();
    assert_eq!(
        got.version, first.version,
        "applied once: the key was not written again"
    );
    // The same key for a different request is refused, not silently ignored.
    let err = c
        .client(1)
        .put("cp", b"order", b"refunded".to_vec(), &opts)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict));
    // Deletes are idempotent too.
    let dopts = WriteOptions {
        idempotency_key: Some("del-1".into()),
        ..Default::default()
    };
    let d1 = c.client(0).delete("cp", b"other", &dopts).await.unwrap();
    let d2 = c.client(1).delete("cp", b"other", &dopts).await.unwrap();
    assert!(d1.deleted);
    assert_eq!(d1, d2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_follower_catches_up_by_snapshot() {
    let mut c = Cluster::start(3, &["--snapshot-every", "20"]).await;
    let opts = WriteOptions::default();
    let leader = c.leader().await;
    let victim = (leader + 1) % 3;
    c.kill9(victim);
    c.wipe(victim);
    for i in 0..120 {
        c.client(leader)
            .put("cp", format!("s{i}").as_bytes(), b"v".to_vec(), &opts)
            .await
            .unwrap();
    }
    // Whichever node leads when the victim is back must have purged its log, or the
    // victim catches up from the log (snapshots are paced per node, and leadership may move
    // under the load of parallel tests: a run once caught up without a snapshot).
    for i in (0..3).filter(|&i| i != victim) {
        eventually(
            Duration::from_secs(30),
            "every live node has purged part of its log",
            || async { harness::metric(&c.metrics(i).await, "capkv_raft_purged_index") > 0.0 },
        )
        .await;
    }
    c.restart(victim).await;
    eventually(
        Duration::from_secs(20),
        "the wiped node has every key",
        || async {
            matches!(
                c.client(victim)
                    .get("cp", b"s119", Consistency::Serializable)
                    .await,
                Ok(Some(_))
            )
        },
    )
    .await;
    let metrics = c.metrics(victim).await;
    assert!(
        harness::metric(&metrics, "capkv_raft_snapshots_installed_total") >= 1.0,
        "the log was purged, so catching up needs a snapshot"
    );
    let (entries, _) = c
        .client(victim)
        .scan("cp", "s", None, Some(1000))
        .await
        .unwrap();
    assert_eq!(entries.len(), 120);
}

/// Files in node i's snapshot directory, with their sizes.
fn snapshot_files(c: &Cluster, i: usize) -> Vec<(String, u64)> {
    std::fs::read_dir(c.data_dir(i).join("snapshots"))
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    (e.file_name().to_string_lossy().into_owned(), len)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// #9 items 1 and 6: a follower catches up by a snapshot of many chunks, streamed into a
/// file; killed in the middle of the transfer, it starts over after its restart, leaves
/// no partial file behind, and ends with every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_killed_in_the_middle_of_a_snapshot_transfer_catches_up_after_restart() {
    let mut c = Cluster::start(3, &["--snapshot-every", "20"]).await;
    let leader = c.leader().await;
    let victim = (leader + 1) % 3;
    let victim_last = harness::metric(&c.metrics(victim).await, "capkv_raft_last_log_index");
    c.kill9(victim);
    // Values of 256 KiB, written in rounds of 32 (8 MiB) by 4 writers, at least 96 of them
    // (24 MiB: a snapshot of about 24 chunks of 1 MiB), until every live node has purged
    // the entries the victim lacks. Then whichever node leads when the victim comes back can
    // only send it a snapshot: snapshots are paced and staggered per node, and leadership
    // may move under this load (a CI run once caught up from a log not yet purged).
    let value = vec![b'x'; 256 << 10];
    let purged_everywhere = || async {
        for i in (0..3).filter(|&i| i != victim) {
            if harness::metric(&c.metrics(i).await, "capkv_raft_purged_index") <= victim_last {
                return false;
            }
        }
        true
    };
    // The leader's snapshot must hold most keys too; a snapshot is taken only as entries
    // arrive, so the writes go on until one does (waiting without writes could wait for a
    // snapshot that never comes: seen once under load).
    let big_snapshot = || {
        snapshot_files(&c, leader)
            .into_iter()
            .find(|(name, len)| name.ends_with(".snap") && *len > 16 << 20)
            .map(|(_, len)| len)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut keys = 0;
    while keys < 96 || !purged_everywhere().await || big_snapshot().is_none() {
        assert!(
            Instant::now() < deadline,
            "the live nodes never purged their logs past the victim's ({keys} keys written)"
        );
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let client = c.client(leader);
                let value = value.clone();
                tokio::spawn(async move {
                    // A long deadline: 13 tests share two cores in a full run, and
                    // this one is about snapshots, not about write latency.
                    let opts = WriteOptions {
                        timeout_ms: Some(30_000),
                        ..WriteOptions::default()
                    };
                    for i in (keys + w..keys + 32).step_by(4) {
                        client
                            .put("cp", format!("big{i:03}").as_bytes(), value.clone(), &opts)
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        keys += 32;
    }
    let snapshot_bytes = big_snapshot().expect("the loop ends only with a big snapshot");
    c.spawn(victim);
    // Stopped (SIGSTOP) the moment a part of the snapshot is on its disk, then killed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let partial = loop {
        let part = snapshot_files(&c, victim)
            .into_iter()
            .find(|(name, len)| name.ends_with(".part") && *len > 0);
        if let Some(part) = part {
            let pid = c.pid(victim).to_string();
            std::process::Command::new("kill")
                .args(["-STOP", &pid])
                .status()
                .unwrap();
            break part;
        }
        assert!(
            Instant::now() < deadline,
            "the victim never began receiving a snapshot"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let received = snapshot_files(&c, victim)
        .into_iter()
        .find(|(name, _)| *name == partial.0)
        .map_or(0, |(_, len)| len);
    c.kill9(victim);
    assert!(
        received < snapshot_bytes,
        "killed in the middle of the transfer: {received} of {snapshot_bytes} bytes received"
    );
    c.restart(victim).await;
    eventually(
        Duration::from_secs(60),
        "the restarted victim holds every key",
        || async {
            matches!(
                c.client(victim)
                    .get(
                        "cp",
                        format!("big{:03}", keys - 1).as_bytes(),
                        Consistency::Serializable
                    )
                    .await,
                Ok(Some(_))
            )
        },
    )
    .await;
    let metrics = c.metrics(victim).await;
    assert!(harness::metric(&metrics, "capkv_raft_snapshots_installed_total") >= 1.0);
    // Pages of about 4 MiB: 16 of these values each.
    let mut found = 0;
    let mut after: Option<String> = None;
    loop {
        let (entries, more) = c
            .client(victim)
            .scan("cp", "big", after.as_deref(), Some(1000))
            .await
            .unwrap();
        found += entries.len();
        after = entries.last().and_then(|e| e.key.clone());
        if !more {
            break;
        }
    }
    assert_eq!(found, keys);
    for i in [0, keys / 2, keys - 1] {
        let got = c
            .client(victim)
            .get(
                "cp",
                format!("big{i:03}").as_bytes(),
                Consistency::Serializable,
            )
            .await
            .unwrap()
            .unwrap();
        assert!(got.value == value, "big{i:03} whole");
    }
    let files = snapshot_files(&c, victim);
    assert!(
        files.iter().all(|(name, _)| name.ends_with(".snap")) && files.len() == 1,
        "one current snapshot and nothing half-received: {files:?}"
    );
}

/// Regression (issue "Every promise kept under faults", item 9): a follower kept back a fixed
/// 50 ms when forwarding, so any `timeout_ms` below ~51 left the leader nothing and every
/// such write through a follower answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_deadlines_through_a_follower_still_reach_the_leader() {
    let cluster = Cluster::start(3, &[]).await;
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    let client = cluster.client(follower);
    let opts = WriteOptions {
        timeout_ms: Some(45),
        ..WriteOptions::default()
    };
    // A loaded machine may miss a 45 ms deadline now and then; before the fix, every
    // attempt failed.
    eventually(
        Duration::from_secs(20),
        "a 45 ms write through a follower succeeds",
        || async {
            client
                .put("cp", b"short", b"v".to_vec(), &opts)
                .await
                .is_ok()
        },
    )
    .await;
}

/// The scenario of issue "Every promise kept under faults", item 2: a leader cut off while
/// it holds proposals, deposed, and caught up by snapshot must take writes again once it
/// leads again. A review saw each such lost proposal hold one of the proposer's four
/// in-flight slots for ever (openraft never answered it), until every write answered 503;
/// slots are now freed once every waiter of a batch has given up (`ANSWER_GRACE`). This
/// schedule did not reproduce the wedge on the code before that bound (the proposals here
/// get answers), so it guards the scenario, not that exact path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_that_catches_up_by_snapshot_still_takes_writes() {
    let mut c = Cluster::start(3, &["--snapshot-every", "20"]).await;
    let old = c.leader().await;
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    // Cut it off from the others' side only, so that for a moment (until its peers are
    // silent for a second) it still believes it can reach them and keeps proposing.
    let old_id = format!("n{}", old + 1);
    for &i in &others {
        c.client(i)
            .set_faults(&c.url(i), vec![old_id.clone()])
            .await
            .unwrap();
    }
    // Proposals the cut-off leader accepts in that moment: they can never commit. Many at
    // once, so that every in-flight slot holds one.
    let url = c.url(old);
    let mut writes = Vec::new();
    for i in 0..64 {
        let client = capkv_client::Client::pinned(&url, Duration::from_secs(5));
        writes.push(tokio::spawn(async move {
            let opts = WriteOptions {
                timeout_ms: Some(400),
                ..WriteOptions::default()
            };
            let _ = client
                .put("cp", format!("lost{i}").as_bytes(), b"v".to_vec(), &opts)
                .await;
        }));
    }
    for w in writes {
        w.await.unwrap();
    }
    // The majority moves on, far enough that the old leader needs a snapshot.
    let new = eventually_some(Duration::from_secs(15), "the majority elects", || async {
        for &i in &others {
            if let Ok(info) = c.client(i).cluster_of(&c.url(i)).await {
                if info.role == "leader" {
                    return Some(i);
                }
            }
        }
        None
    })
    .await;
    for i in 0..60 {
        c.client(new)
            .put(
                "cp",
                format!("m{i}").as_bytes(),
                b"v".to_vec(),
                &WriteOptions::default(),
            )
            .await
            .unwrap();
    }
    c.heal().await;
    eventually(
        Duration::from_secs(20),
        "the old leader catches up",
        || async {
            matches!(
                c.client(old)
                    .get("cp", b"m59", Consistency::Serializable)
                    .await,
                Ok(Some(_))
            )
        },
    )
    .await;
    // Make the old leader lead again: stop whoever leads until it is elected.
    for _ in 0..8 {
        let l = c.leader().await;
        if l == old {
            break;
        }
        c.kill9(l);
        let _ = c.leader().await;
        c.restart(l).await;
    }
    if c.leader().await != old {
        eprintln!("the old leader was not re-elected in 8 tries; nothing to check this time");
        return;
    }
    eventually(
        Duration::from_secs(15),
        "the re-elected leader takes writes",
        || async {
            c.client(old)
                .put("cp", b"after", b"v".to_vec(), &WriteOptions::default())
                .await
                .is_ok()
        },
    )
    .await;
}

/// A node that lost its disk must not help a leader that lacks committed entries: x=2
/// is committed on n1 and n2 only (n3 is down); n1 loses its disk and n2 goes down. n3
/// (without x=2) and the wiped n1 are a majority, but n1 no longer knows what it held or
/// whom it voted for, so it takes part in nothing until enough peers vouch for what it
/// may have lost (`cp::lost_state`). Before, n1 followed n3 (a stale leader of term 1)
/// or voted for it, and x=2 was overwritten (or, in a race, two leaders were elected in
/// one term and openraft panicked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_disk_cannot_elect_a_leader_missing_committed_writes() {
    let mut c = Cluster::start(3, &[]).await;
    let opts = WriteOptions::default();
    c.client(0)
        .put("cp", b"x", b"1".to_vec(), &opts)
        .await
        .unwrap();
    c.kill9(2);
    eventually_some(
        Duration::from_secs(20),
        "x=2 committed on n1 and n2",
        || async { c.client(0).put("cp", b"x", b"2".to_vec(), &opts).await.ok() },
    )
    .await;
    c.kill9(0);
    c.wipe(0);
    c.kill9(1);
    c.restart(0).await;
    // Restarted again before it could rebuild: the state it began since its disk was
    // lost (found by review: the guard held only for the first run after the wipe).
    c.kill9(0);
    c.restart(0).await;
    c.restart(2).await;
    // n3 (which may still believe it leads term 1) and the wiped n1 are a majority, but
    // n1 takes part in nothing until enough peers vouch for what it lost: it follows no
    // leader and nothing can commit (watched for 5 s, several election timeouts).
    assert_no_leader_and_no_commit(
        &c,
        &[0],
        2,
        "before anyone vouched for what the wiped n1 lost (x=2 would be overwritten)",
    )
    .await;
    // n2 comes back with x=2: a leader is elected and x=2 survives everywhere.
    c.restart(1).await;
    assert_everywhere(&c, b"x", b"2").await;
}

/// For 5 s (several election timeouts), none of `nodes` follows a leader and a write
/// through `writer` does not commit.
async fn assert_no_leader_and_no_commit(c: &Cluster, nodes: &[usize], writer: usize, when: &str) {
    let watch_until = Instant::now() + Duration::from_secs(5);
    let short = WriteOptions {
        timeout_ms: Some(500),
        ..WriteOptions::default()
    };
    while Instant::now() < watch_until {
        for &i in nodes {
            if let Ok(info) = c.client(i).cluster_of(&c.url(i)).await {
                assert!(
                    info.leader.is_none(),
                    "n{} follows leader {:?} {when}",
                    i + 1,
                    info.leader
                );
            }
        }
        assert!(
            c.client(writer)
                .put("cp", b"probe", b"1".to_vec(), &short)
                .await
                .is_err(),
            "a write committed {when}"
        );
    }
}

/// Every node reads `key` = `value` (linearizable), eventually.
async fn assert_everywhere(c: &Cluster, key: &[u8], value: &[u8]) {
    for i in 0..c.size() {
        let got = eventually_some(Duration::from_secs(30), "the key readable", || async {
            c.client(i).get("cp", key, LIN).await.ok().flatten()
        })
        .await;
        assert_eq!(got.value, value, "n{} lost the committed write", i + 1);
    }
}

/// With `--initial-cluster-state new`, a brand-new cluster elects its first leader once
/// a majority has started (by default it waits for every member: see the next test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_elects_with_a_majority_started() {
    let mut c = Cluster::start_only(3, &[0, 1], &["--initial-cluster-state", "new"], true).await;
    c.client(0)
        .put("cp", b"k", b"v".to_vec(), &WriteOptions::default())
        .await
        .unwrap();
    // The third joins later and catches up.
    c.restart(2).await;
    let got = eventually_some(Duration::from_secs(20), "n3 reads k", || async {
        c.client(2).get("cp", b"k", LIN).await.ok().flatten()
    })
    .await;
    assert_eq!(got.value, b"v");
}

/// A member that never started looks like one that lost its disk. x=1 is committed on n1
/// and n3 (n2 never started); n3 goes down and n1 loses its disk. n1 and n2 are a majority
/// without Raft state, but the data is on n3: by default they form no new cluster (found
/// by review: they did, and x was gone), and once n3 is back x=1 is everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_and_a_never_started_one_wait_for_the_member_holding_the_data() {
    let mut c = Cluster::start_only(3, &[0, 2], &["--initial-cluster-state", "new"], true).await;
    let opts = WriteOptions::default();
    c.client(0)
        .put("cp", b"x", b"1".to_vec(), &opts)
        .await
        .unwrap();
    c.kill9(2);
    c.kill9(0);
    c.wipe(0);
    // Started again as an operator would after a disk swap: the default mode.
    c.set_flags(&[], true);
    c.restart(0).await;
    c.restart(1).await;
    assert_no_leader_and_no_commit(&c, &[0, 1], 1, "in a new cluster formed without n3's data")
        .await;
    c.restart(2).await;
    assert_everywhere(&c, b"x", b"1").await;
}
