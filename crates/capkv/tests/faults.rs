//! `/v1/faults` beyond two-way partitions, with real processes: clock skew (what the
//! node's wall clock reads, and that its stamps carry the skew), one-way partitions
//! (`drop_to`: what each side counts reachable), storage stalls (the node keeps answering
//! and says why), input checks, heal, and the CLI.

mod harness;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capkv_client::{ApValue, Client, FaultRequest, FaultState, KeyspaceSpec, Mode, ValueType};
use harness::{eventually, Cluster};

const HOUR_MS: i64 = 3_600_000;

fn local_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Asserts that `state`'s wall clock reads `skew` ms off this machine's clock (the test
/// and the node share the machine, so only the time between the reads differs).
fn assert_reads_off_by(state: &FaultState, skew: i64) {
    let off = state.wall_clock_ms as i64 - local_ms();
    assert!(
        (off - skew).abs() < 10_000,
        "wall clock should read {skew} ms off, reads {off} ms off: {state:?}"
    );
    assert_eq!(state.clock_skew_ms, skew);
}

/// Whether node `i` currently counts node `peer` (indexes) reachable.
async fn sees(c: &Cluster, i: usize, peer: usize) -> bool {
    let info = c.client(i).cluster_of(&c.url(i)).await.unwrap();
    let name = format!("n{}", peer + 1);
    info.nodes.iter().any(|n| n.id == name && n.reachable)
}

async fn raw_post(url: &str, body: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/faults"))
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn cli(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capkv"))
        .args(args)
        .output()
        .expect("running the capkv CLI");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "capkv {args:?} failed: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_and_one_way_faults_are_set_shown_checked_and_healed() {
    let c = Cluster::start(3, &[]).await;
    let (u1, u2) = (c.url(0), c.url(1));
    let client = c.client(0);

    let fresh = client.faults(&u1).await.unwrap();
    assert!(fresh.enabled && fresh.isolate_from.is_empty() && fresh.drop_to.is_empty());
    assert_reads_off_by(&fresh, 0);

    // Clock skew: the node's wall clock reads that far off; the other nodes' do not.
    let s = client
        .set_fault_request(
            &u1,
            &FaultRequest {
                clock_skew_ms: Some(HOUR_MS),
                ..FaultRequest::default()
            },
        )
        .await
        .unwrap();
    assert_reads_off_by(&s, HOUR_MS);
    assert_reads_off_by(&client.faults(&u1).await.unwrap(), HOUR_MS);
    assert_reads_off_by(&client.faults(&u2).await.unwrap(), 0);
    // Both bounds are accepted; negative skews put the clock behind.
    let s = client
        .set_fault_request(
            &u2,
            &FaultRequest {
                clock_skew_ms: Some(-86_400_000),
                ..FaultRequest::default()
            },
        )
        .await
        .unwrap();
    assert_reads_off_by(&s, -86_400_000);

    // One POST replaces the whole state: drop_to alone clears n1's skew.
    let s = client
        .set_fault_request(
            &u1,
            &FaultRequest {
                drop_to: vec!["n2".into()],
                ..FaultRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (s.drop_to.clone(), s.isolate_from.clone()),
        (vec!["n2".to_string()], vec![])
    );
    assert_reads_off_by(&s, 0);

    // What each side counts reachable: n1 hears n2 but cannot answer it, n2 hears
    // nothing from n1; n3 still talks to both, so both keep a majority.
    assert!(!sees(&c, 0, 1).await, "n1 cannot send to n2");
    eventually(
        Duration::from_secs(10),
        "n2 counts n1 unreachable",
        || async { !sees(&c, 1, 0).await },
    )
    .await;
    for (i, peer) in [(0, 2), (1, 2), (2, 0), (2, 1)] {
        assert!(sees(&c, i, peer).await, "n{} sees n{}", i + 1, peer + 1);
    }
    for i in [0, 1] {
        assert!(c.client(i).cluster_of(&c.url(i)).await.unwrap().has_quorum);
    }

    // Bad input is 400 with a message naming the problem, and changes nothing.
    for (body, says) in [
        (r#"{"drop_to":["n9"]}"#, "unknown node 'n9'"),
        (r#"{"drop_to":["n1"]}"#, "drop_to: 'n1' is this node"),
        (
            r#"{"isolate_from":["n1"]}"#,
            "isolate_from: 'n1' is this node",
        ),
        (
            r#"{"clock_skew_ms":86400001}"#,
            "clock_skew_ms must be between",
        ),
        (
            r#"{"clock_skew_ms":-86400001}"#,
            "clock_skew_ms must be between",
        ),
        (r#"{"clock_skew_ms":"5"}"#, "bad JSON body"),
        (r#"{"drop_too":["n2"]}"#, "unknown field"),
    ] {
        let (status, b) = raw_post(&u1, body).await;
        let msg = b["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(
            (status, b["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{body}: {b}"
        );
        assert!(msg.contains(says), "{body}: {msg}");
    }
    assert_eq!(client.faults(&u1).await.unwrap().drop_to, vec!["n2"]);

    // The old body still works, and replaces drop_to.
    let (status, b) = raw_post(&u1, r#"{"isolate_from":["n3"]}"#).await;
    assert_eq!(status, 200, "{b}");
    let s: FaultState = serde_json::from_value(b).unwrap();
    assert_eq!(
        (s.isolate_from, s.drop_to),
        (vec!["n3".to_string()], vec![])
    );

    // DELETE clears every kind of fault.
    let s = client
        .set_fault_request(
            &u1,
            &FaultRequest {
                isolate_from: vec!["n3".into()],
                drop_to: vec!["n2".into(), "n3".into()],
                clock_skew_ms: Some(-5_000),
                storage_stall: false,
                storage_read_stall: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(s.drop_to, vec!["n2", "n3"]);
    assert_reads_off_by(&s, -5_000);
    for u in [&u1, &u2] {
        let s = client.clear_faults(u).await.unwrap();
        assert!(s.isolate_from.is_empty() && s.drop_to.is_empty(), "{s:?}");
        assert_reads_off_by(&s, 0);
    }
    eventually(
        Duration::from_secs(10),
        "n1 and n2 see each other again",
        || async { sees(&c, 0, 1).await && sees(&c, 1, 0).await },
    )
    .await;

    // The CLI: each fault command changes its own fault and keeps the others.
    let out = cli(&["fault", "clock", "n1", "-5000", "--node", &u2]);
    assert!(out.contains("n1: wall clock skewed by -5000 ms"), "{out}");
    let out = cli(&["fault", "one-way", "n1", "n2,n3", "--node", &u2]);
    assert!(
        out.contains("n1: drops everything it sends to n2,n3"),
        "{out}"
    );
    cli(&["fault", "partition", "n1,n2", "n3", "--node", &u2]);
    let s = client.faults(&u1).await.unwrap();
    assert_eq!(
        (s.isolate_from.clone(), s.drop_to.clone()),
        (vec!["n3".into()], vec!["n2".into(), "n3".into()])
    );
    assert_reads_off_by(&s, -5_000);
    cli(&["fault", "heal", "--node", &u2]);
    for i in 0..3 {
        let s = client.faults(&c.url(i)).await.unwrap();
        assert!(s.isolate_from.is_empty() && s.drop_to.is_empty(), "{s:?}");
        assert_eq!(s.clock_skew_ms, 0);
    }
}

/// The skew reaches the decisions made with wall time: an `lww` write made on a node
/// whose clock is an hour ahead beats a write made later, in real time, elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_clock_stamps_lww_writes() {
    let c = Cluster::start(3, &[]).await;
    let spec = KeyspaceSpec {
        value_type: Some(ValueType::Lww),
        ..KeyspaceSpec::new("profile", Mode::Ap)
    };
    c.client(0).create_keyspace(&spec).await.unwrap();
    for i in 0..3 {
        let client = c.client(i);
        eventually(
            Duration::from_secs(10),
            "every node knows the lww keyspace",
            || async { client.ap_get("profile", b"probe", None).await.is_ok() },
        )
        .await;
    }
    c.partition(&[&[0], &[1, 2]]).await;
    c.wait_cut_off(0).await;
    // Keep the partition, add the skew (a POST replaces every fault: start from the state).
    let client = c.client(0);
    let mut req = client.faults(&c.url(0)).await.unwrap().request();
    req.clock_skew_ms = Some(HOUR_MS);
    let s = client.set_fault_request(&c.url(0), &req).await.unwrap();
    assert_eq!(s.isolate_from, vec!["n2", "n3"]);

    c.client(0)
        .ap_put("profile", b"bio", b"ahead".to_vec(), None, None)
        .await
        .unwrap();
    c.client(1)
        .ap_put("profile", b"bio", b"later".to_vec(), None, None)
        .await
        .unwrap();
    c.heal().await;
    for i in 0..3 {
        let client: Client = c.client(i);
        eventually(
            Duration::from_secs(20),
            &format!("n{} reads the write stamped an hour ahead", i + 1),
            || async {
                matches!(
                    client.ap_get("profile", b"bio", Some(3)).await,
                    Ok(ApValue::Value { value, .. }) if value == b"ahead"
                )
            },
        )
        .await;
    }
}

/// `/healthz` on `url`: its status and body, or `None` if it gave no answer within 2 s
/// (a node whose async workers are blocked answers nothing).
async fn health(url: &str) -> Option<(u16, String)> {
    let r = reqwest::Client::new()
        .get(format!("{url}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?))
}

/// Waits until the node at `url` answers `/healthz` with 503 naming storage.
async fn wait_until_storage_reported(url: &str) {
    eventually(
        Duration::from_secs(20),
        "the node's /healthz says storage is stalled",
        || async {
            match health(url).await {
                Some((503, body)) => body.contains("storage"),
                _ => false,
            }
        },
    )
    .await;
}

/// #8 item 14: a node whose storage writes stall (what fjall's write halt did after a
/// kill -9 and restart) keeps answering — `/healthz` says storage is the trouble, its
/// cluster view answers — and the cluster serves cp writes through the other nodes; once
/// storage moves again the node is healthy and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_storage_stalls_keeps_answering_and_says_why() {
    let c = Cluster::start(3, &[]).await;
    let stalled = c.leader().await;
    let other = (stalled + 1) % 3;
    let url = c.url(stalled);
    let client = c.client(other);
    let opts = capkv_client::WriteOptions::default();
    client
        .put("cp", b"k", b"before".to_vec(), &opts)
        .await
        .unwrap();
    client
        .create_keyspace(&KeyspaceSpec::new("cart", Mode::Ap))
        .await
        .unwrap();
    // Rebuilt (it started empty), so only the stall can make it ask another home to issue.
    eventually(
        Duration::from_secs(30),
        "the node to stall has synced with its peers",
        || async { harness::metric(&c.metrics(stalled).await, "capkv_ap_rebuilding") == 0.0 },
    )
    .await;

    let s = client
        .set_fault_request(
            &url,
            &FaultRequest {
                storage_stall: true,
                ..FaultRequest::default()
            },
        )
        .await
        .unwrap();
    assert!(s.storage_stall, "{s:?}");

    // Writes that reach the stalled node's storage wait on it: a cp write at the leader,
    // ap writes it coordinates (more of them than the node has async workers).
    let held = tokio::spawn({
        let client = c.client(stalled);
        let opts = opts.clone();
        async move { client.put("cp", b"k", b"held".to_vec(), &opts).await }
    });
    let ap_held: Vec<_> = (0..6)
        .map(|i| {
            let client = c.client(stalled);
            tokio::spawn(async move {
                let key = format!("a{i}");
                client
                    .ap_put("cart", key.as_bytes(), b"x".to_vec(), None, None)
                    .await
            })
        })
        .collect();
    wait_until_storage_reported(&url).await;
    // No request outlives its deadline (2 s by default), stall or not: every ap write
    // the stalled node coordinates gets its answer (a 504 where the write waits on this
    // node's disk) while storage is still stalled.
    for w in ap_held {
        let answer = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("an ap write outlived its deadline while storage was stalled")
            .unwrap();
        if let Err(e) = answer {
            assert!(e.to_string().starts_with("504"), "{e}");
        }
    }
    // Once its storage is known to stall, the node has another home issue the ap writes
    // it coordinates: they succeed at w=1 (they had all waited on its disk: review).
    eventually(
        Duration::from_secs(10),
        "an ap write through the stalled node succeeds",
        || async {
            c.client(stalled)
                .ap_put("cart", b"through-stalled", b"y".to_vec(), None, None)
                .await
                .is_ok()
        },
    )
    .await;
    for _ in 0..5 {
        let (status, body) = health(&url).await.expect("/healthz answers while stalled");
        assert_eq!(status, 503, "{body}");
        c.client(stalled)
            .cluster_of(&url)
            .await
            .expect("/v1/cluster answers while storage is stalled");
    }
    // The other two elect a leader between them and serve writes.
    eventually(
        Duration::from_secs(30),
        "a write through another node succeeds while one node's storage is stalled",
        || async {
            client
                .put("cp", b"k", b"during".to_vec(), &opts)
                .await
                .is_ok()
        },
    )
    .await;

    client.clear_faults(&url).await.unwrap();
    eventually(
        Duration::from_secs(20),
        "the node is healthy once its storage moves again",
        || async { matches!(health(&url).await, Some((200, _))) },
    )
    .await;
    let _ = held.await.unwrap();
    client
        .put("cp", b"k", b"after".to_vec(), &opts)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "the stalled node catches up",
        || async {
            matches!(
                c.client(stalled).get("cp", b"k", capkv_client::Consistency::Serializable).await,
                Ok(Some(v)) if v.value == b"after"
            )
        },
    )
    .await;
}

/// #8 item 6: idempotency records are dated by the cluster's time, not by the clock of
/// whichever node a request arrived at. Every node's clock jumping two hours ahead (more
/// than the one-hour record TTL) must not expire a record: a retry is still answered
/// from it, applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_records_outlive_skewed_clocks() {
    let c = Cluster::start(3, &[]).await;
    let opts = |key: &str| capkv_client::WriteOptions {
        idempotency_key: Some(key.into()),
        ..capkv_client::WriteOptions::default()
    };
    let first = c
        .client(0)
        .put("cp", b"acct", b"debit".to_vec(), &opts("pay-1"))
        .await
        .unwrap();
    for i in 0..3 {
        c.client(0)
            .set_fault_request(
                &c.url(i),
                &FaultRequest {
                    clock_skew_ms: Some(2 * HOUR_MS),
                    ..FaultRequest::default()
                },
            )
            .await
            .unwrap();
    }
    // Writes through every node, with keys of their own: under the old stamping each
    // would have swept every record older than its node's (skewed) now.
    for i in 0..3 {
        c.client(i)
            .put(
                "cp",
                format!("other{i}").as_bytes(),
                b"x".to_vec(),
                &opts(&format!("o{i}")),
            )
            .await
            .unwrap();
    }
    for i in 0..3 {
        let retry = c
            .client(i)
            .put("cp", b"acct", b"debit".to_vec(), &opts("pay-1"))
            .await
            .unwrap();
        assert_eq!(
            retry.version,
            first.version,
            "the retry through n{} was applied again",
            i + 1
        );
    }
}

/// A storage stall that begins while tombstones are being collected must not freeze the
/// node (found by review: collection held a blocking lock across its stalled write, and
/// every task wanting that lock blocked an async worker, until `/healthz`, `/v1/cluster`
/// and even `DELETE /v1/faults` went unanswered for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_stall_during_tombstone_collection_does_not_freeze_the_node() {
    let c = Cluster::start(3, &["--tombstone-grace-ms", "300"]).await;
    let client = c.client(1);
    client
        .create_keyspace(&KeyspaceSpec::new("gone", Mode::Ap))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "n2 knows keyspace gone",
        || async { client.ap_get("gone", b"probe", None).await.is_ok() },
    )
    .await;
    for i in 0..300 {
        let key = format!("k{i}");
        let ctx = client
            .ap_put("gone", key.as_bytes(), b"v".to_vec(), None, None)
            .await
            .unwrap();
        client
            .ap_delete("gone", key.as_bytes(), Some(&ctx))
            .await
            .unwrap();
    }
    let url = c.url(0);
    client
        .set_fault_request(
            &url,
            &FaultRequest {
                storage_stall: true,
                ..FaultRequest::default()
            },
        )
        .await
        .unwrap();
    // Collection rounds run every 2 s; watch several.
    let until = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < until {
        assert!(
            health(&url).await.is_some(),
            "n1 stopped answering /healthz during the stall"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::timeout(Duration::from_secs(5), client.clear_faults(&url))
        .await
        .expect("DELETE /v1/faults went unanswered")
        .unwrap();
    eventually(Duration::from_secs(20), "n1 is healthy again", || async {
        matches!(health(&url).await, Some((200, _)))
    })
    .await;
}

/// Holds every read of user data on the node at `url` (the `storage_read_stall` fault).
async fn hold_reads(client: &Client, url: &str) {
    client
        .set_fault_request(
            url,
            &FaultRequest {
                storage_read_stall: true,
                ..FaultRequest::default()
            },
        )
        .await
        .unwrap();
}

/// #9 item 2: a storage call that blocks does not stop the node's heartbeats or its HTTP.
/// The leader's reads of user data are held (a slow disk) while 16 reads and scans wait
/// on them, many more than the node has async workers: Raft goes on (the leader and term
/// do not change for several election timeouts), its cluster view answers, `/healthz`
/// says storage is the trouble; once reads move again every held request is answered.
/// (Before, reads ran on the async workers: two blocked reads stopped the node, and the
/// others elected a new leader.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_reads_do_not_stop_heartbeats() {
    let c = Cluster::start(3, &[]).await;
    let leader = c.leader().await;
    let url = c.url(leader);
    let client = c.client(leader);
    let opts = capkv_client::WriteOptions::default();
    for i in 0..20 {
        client
            .put("cp", format!("k{i}").as_bytes(), b"v".to_vec(), &opts)
            .await
            .unwrap();
    }
    let before = client.cluster_of(&url).await.unwrap();
    hold_reads(&client, &url).await;
    let held: Vec<_> = (0..16)
        .map(|i| {
            let client = c.client(leader);
            tokio::spawn(async move {
                if i % 2 == 0 {
                    let key = format!("k{i}");
                    client
                        .get(
                            "cp",
                            key.as_bytes(),
                            capkv_client::Consistency::Linearizable,
                        )
                        .await
                        .map(|_| ())
                } else {
                    client.scan("cp", "k", None, None).await.map(|_| ())
                }
            })
        })
        .collect();
    wait_until_storage_reported(&url).await;
    // Several election timeouts (600-1200 ms, plus the leader lease) with reads held.
    let watch_until = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < watch_until {
        for i in 0..3 {
            let info =
                tokio::time::timeout(Duration::from_secs(2), c.client(i).cluster_of(&c.url(i)))
                    .await
                    .unwrap_or_else(|_| panic!("n{} stopped answering /v1/cluster", i + 1))
                    .unwrap();
            assert_eq!(
                info.term,
                before.term,
                "n{}: a new term while reads were held",
                i + 1
            );
            assert_eq!(info.leader, before.leader, "n{}: the leader changed", i + 1);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client.clear_faults(&url).await.unwrap();
    for h in held {
        let answer = tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("a held read was never answered")
            .unwrap();
        // Answered: with the value, or a 504 if its deadline passed while it was held.
        if let Err(e) = answer {
            assert!(e.to_string().starts_with("504"), "{e}");
        }
    }
    let after = client.cluster_of(&url).await.unwrap();
    assert_eq!(after.term, before.term);
}

/// Found by review: with a node's reads held, 700 concurrent reads took every thread of
/// its blocking pool; the node stopped answering anything, `/healthz` and `/v1/faults`
/// included, so the fault could not even be lifted, and a held read waited 70 s for its
/// client to give up. Now data requests are bounded (the rest wait, threadless, until
/// their deadline) and each is answered by its deadline whatever storage does; status,
/// faults and Raft stay outside the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_reads_on_a_stalled_disk_leaves_the_node_in_control() {
    let c = Cluster::start(3, &[]).await;
    let target = (c.leader().await + 1) % 3;
    let url = c.url(target);
    let client = c.client(target);
    let before = client.cluster_of(&url).await.unwrap();
    hold_reads(&client, &url).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let flood: Vec<_> = (0..700)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let began = std::time::Instant::now();
                let r = http
                    .get(format!("{url}/v1/kv/cp/k{i}?consistency=serializable"))
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
                (r.map(|r| r.status().as_u16()), began.elapsed())
            })
        })
        .collect();
    wait_until_storage_reported(&url).await;
    for f in flood {
        let (status, took) = f.await.unwrap();
        let status = status.expect("a held read got no HTTP answer");
        assert!(
            status == 503 || status == 504,
            "a read on a stalled disk answered {status}"
        );
        assert!(
            took < Duration::from_secs(15),
            "a read with a 2 s deadline was answered after {took:?}"
        );
    }
    // The node is still in control: it answers, Raft did not move, the fault lifts.
    let during = client.cluster_of(&url).await.unwrap();
    assert_eq!(during.term, before.term, "a new term while reads were held");
    client.clear_faults(&url).await.unwrap();
    eventually(Duration::from_secs(20), "reads work again", || async {
        client
            .get("cp", b"k1", capkv_client::Consistency::Serializable)
            .await
            .is_ok()
    })
    .await;
}
