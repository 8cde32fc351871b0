//! #10: attacks on a running cluster, each by real processes on real sockets. Every test
//! here failed on the main of before #10 (a forged vote panicked the Raft core of every
//! node, any connection could say "I am n2", ...).

mod harness;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capkv::ap::rpc::{ApRequest, ApScan};
use capkv::cp::rpc::{CpRequest, CpResponse, Forward, ForwardOp};
use capkv::cp::{Command, Op};
use capkv::net::{FaultFilter, PeerTls};
use capkv::rpc::{PeerRequest, PeerResponse};
use capkv::PeerTransport;
use capkv_client::{ClientError, ErrorCode, KeyspaceSpec, Mode, WriteOptions};
use harness::{eventually, metric, Cluster};
use openraft::raft::VoteRequest;
use openraft::Vote;

const D: Duration = Duration::from_secs(5);

/// Every test here takes this lock, so they run one at a time: several flood a node
/// (thousands of connections, squatters reconnecting as fast as they can), and one's load
/// must never starve another's node on a machine of two cores (a CI run saw a handshake
/// take more than 5 s).
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A peer transport that says it is node `claims`, dialing node 1 of `c`, with the
/// certificate of node `cert_of` (or none).
fn attacker(c: &Cluster, claims: u64, cert_of: Option<&str>) -> Arc<PeerTransport> {
    let peers = BTreeMap::from([(1, c.peer[0].clone())]);
    let tls = cert_of.map(|name| {
        PeerTls::load(
            &c.certs_dir(),
            name,
            &BTreeMap::from([(1, "n1".to_string())]),
        )
        .unwrap()
    });
    Arc::new(
        PeerTransport::new(claims, peers, Arc::new(FaultFilter::default()), 1 << 24).with_tls(tls),
    )
}

async fn healthy(c: &Cluster, i: usize) -> bool {
    reqwest::get(format!("{}/healthz", c.url(i)))
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// The cluster still commits writes through every node, and every node is healthy.
async fn still_serves(c: &Cluster, key: &str) {
    for i in 0..c.size() {
        assert!(healthy(c, i).await, "n{} is unhealthy", i + 1);
        let client = c.client(i);
        let k = format!("{key}-{i}");
        eventually(Duration::from_secs(20), "a write commits", || async {
            client
                .put("cp", k.as_bytes(), b"v".to_vec(), &WriteOptions::default())
                .await
                .is_ok()
        })
        .await;
    }
}

/// The review's attack: a vote with term 2^64-1. With a valid certificate (a compromised
/// node) it is refused by the checks on what peers send; the cluster keeps its term and
/// keeps serving, also after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_vote_with_the_largest_term_changes_nothing() {
    let _heavy = HEAVY.lock().await;
    let mut c = Cluster::start(3, &[]).await;
    let n2 = attacker(&c, 2, Some("n2"));
    for vote in [
        Vote::new(u64::MAX, 2),
        Vote::new(5, 3),
        Vote::new(1 << 50, 2),
    ] {
        let reply = n2
            .call(
                1,
                PeerRequest::Cp(CpRequest::Vote(VoteRequest::new(vote, None))),
                D,
            )
            .await
            .unwrap();
        assert!(
            matches!(reply, PeerResponse::Cp(CpResponse::Vote(Err(_)))),
            "{vote:?}: {reply:?}"
        );
    }
    let term = c.client(0).cluster_of(&c.url(0)).await.unwrap().term;
    assert!(term < 1000, "term {term}");
    let refused = metric(&c.metrics(0).await, "capkv_peer_messages_refused_total");
    assert_eq!(refused, 3.0);
    still_serves(&c, "after-vote").await;
    c.stop(0);
    c.restart(0).await;
    still_serves(&c, "after-restart").await;
}

/// The same attack on a cluster run with `--insecure-peers`: anyone can connect and say
/// who they are, and the checks still keep the core alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_a_forged_vote_is_still_refused() {
    let _heavy = HEAVY.lock().await;
    let c = Cluster::start(3, &["--insecure-peers"]).await;
    let stranger = attacker(&c, 2, None);
    let reply = stranger
        .call(
            1,
            PeerRequest::Cp(CpRequest::Vote(VoteRequest::new(
                Vote::new(u64::MAX, 2),
                None,
            ))),
            D,
        )
        .await
        .unwrap();
    assert!(
        matches!(reply, PeerResponse::Cp(CpResponse::Vote(Err(_)))),
        "{reply:?}"
    );
    still_serves(&c, "k").await;
}

/// A certificate names one node: n3's certificate cannot speak as n2, a connection with
/// no certificate or one from another CA gets nowhere, and none of them is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_must_hold_the_certificate_of_the_node_it_claims_to_be() {
    let _heavy = HEAVY.lock().await;
    let c = Cluster::start(3, &[]).await;
    let honest = attacker(&c, 2, Some("n2"));
    assert!(matches!(
        honest.call(1, PeerRequest::Ping, D).await,
        Ok(PeerResponse::Pong)
    ));

    let liar = attacker(&c, 2, Some("n3"));
    let e = liar.call(1, PeerRequest::Ping, D).await.unwrap_err();
    assert!(
        matches!(
            e,
            capkv::net::NetError::Lost(..) | capkv::net::NetError::Timeout(..)
        ),
        "n3's certificate speaking as n2: {e}"
    );
    let identity = |m: &str| {
        m.lines()
            .filter(|l| l.starts_with("capkv_limit_hits_total") && l.contains("peer_identity"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    eventually(D, "n1 counts the refusal", || async {
        identity(&c.metrics(0).await) >= 1.0
    })
    .await;

    // No certificate at all: the TLS handshake fails; nothing is sent.
    let plain = attacker(&c, 2, None);
    let e = plain.call(1, PeerRequest::Ping, D).await.unwrap_err();
    assert!(!matches!(e, capkv::net::NetError::Timeout(..)), "{e}");

    // A certificate for n2 from another CA (trusting ours, so the handshake gets as
    // far as n1 checking it).
    let other = tempfile::tempdir().unwrap();
    capkv::net::tls::init_certs(other.path(), &["n2".into()], &[]).unwrap();
    std::fs::copy(
        capkv::net::tls::ca_path(&c.certs_dir()),
        capkv::net::tls::ca_path(other.path()),
    )
    .unwrap();
    let tls = PeerTls::load(other.path(), "n2", &BTreeMap::from([(1, "n1".to_string())]));
    let forged = Arc::new(
        PeerTransport::new(
            2,
            BTreeMap::from([(1, c.peer[0].clone())]),
            Arc::new(FaultFilter::default()),
            1 << 24,
        )
        .with_tls(Some(tls.unwrap())),
    );
    assert!(forged.call(1, PeerRequest::Ping, D).await.is_err());
    still_serves(&c, "k").await;
}

/// A forwarded write gets a client's checks: a keyspace name with '/', an ap keyspace
/// with n=r=w=0, a value over the limit, and a deadline of 2^64-1 ms are refused or
/// bounded, and the registry is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_forwarded_write_is_checked_like_a_client_request() {
    let _heavy = HEAVY.lock().await;
    let mut c = Cluster::start(3, &[]).await;
    let leader = c.leader().await;
    // The attacker holds the certificate of a node other than the leader.
    let name = if leader == 0 { "n2" } else { "n1" };
    let claims = if leader == 0 { 2 } else { 1 };
    // That node is stopped first: the leader keeps one inbound connection per peer (the
    // newest), so the real node reconnecting would close the attacker's connection in the
    // middle of a call (seen in CI). The leader and the third node are still a majority.
    c.kill9(claims as usize - 1);
    let peers = BTreeMap::from([(leader as u64 + 1, c.peer[leader].clone())]);
    let tls = PeerTls::load(
        &c.certs_dir(),
        name,
        &BTreeMap::from([(leader as u64 + 1, format!("n{}", leader + 1))]),
    )
    .unwrap();
    let t = Arc::new(
        PeerTransport::new(claims, peers, Arc::new(FaultFilter::default()), 1 << 24)
            .with_tls(Some(tls)),
    );
    let to = leader as u64 + 1;
    let write = |op: Op, timeout_ms: u64| {
        PeerRequest::Cp(CpRequest::Forward(Forward {
            op: ForwardOp::Write(Command {
                op,
                idempotency_key: None,
                proposed_at_ms: 0,
            }),
            timeout_ms,
            hops_left: 0,
        }))
    };
    let mut bad_spec = KeyspaceSpec::new("zero", Mode::Ap);
    (bad_spec.n, bad_spec.r, bad_spec.w) = (Some(0), Some(0), Some(0));
    let attempts = [
        write(Op::CreateKeyspace { spec: bad_spec }, 1000),
        write(
            Op::CreateKeyspace {
                spec: KeyspaceSpec::new("a/b", Mode::Cp),
            },
            1000,
        ),
        write(
            Op::Put {
                keyspace: "cp".into(),
                key: b"k".to_vec(),
                value: vec![0; 2 << 20],
                condition: None,
            },
            1000,
        ),
        write(
            Op::Put {
                keyspace: "cp".into(),
                key: Vec::new(),
                value: b"v".to_vec(),
                condition: None,
            },
            1000,
        ),
    ];
    for req in attempts {
        match t.call(to, req, D).await.unwrap() {
            PeerResponse::Cp(CpResponse::Forward(Err(e))) => assert!(
                e.code == ErrorCode::BadRequest || e.code == ErrorCode::TooLarge,
                "{e:?}"
            ),
            other => panic!("accepted: {other:?}"),
        }
    }
    // An endless deadline is bounded, not a panic: the write itself is fine.
    let ok = write(
        Op::Put {
            keyspace: "cp".into(),
            key: b"forwarded".to_vec(),
            value: b"v".to_vec(),
            condition: None,
        },
        u64::MAX,
    );
    assert!(
        matches!(
            t.call(to, ok, D).await.unwrap(),
            PeerResponse::Cp(CpResponse::Forward(Ok(_)))
        ),
        "a valid forwarded write"
    );
    drop(t);
    let impersonated = claims as usize - 1;
    c.spawn(impersonated);
    eventually(
        Duration::from_secs(30),
        "the stopped node serves again",
        || healthy(&c, impersonated),
    )
    .await;
    let names: Vec<String> = c
        .client(leader)
        .list_keyspaces()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec!["cp".to_string()]);
    still_serves(&c, "k").await;
}

/// The resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// A peer that asks and never reads the answers, over several connections, and strangers
/// that send a huge first frame: the node's memory stays bounded and it keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_its_replies_cannot_grow_a_nodes_memory() {
    let _heavy = HEAVY.lock().await;
    use tokio::io::AsyncWriteExt;
    let c = Cluster::start(3, &[]).await;
    // An ap keyspace with enough data that each scan page is large.
    let client = c.client(0);
    client
        .create_keyspace(&KeyspaceSpec::new("ap", Mode::Ap))
        .await
        .or_else(|e| match e {
            ClientError::Api { error, .. } if error.code == ErrorCode::Conflict => {
                Ok(KeyspaceSpec::new("ap", Mode::Ap))
            }
            e => Err(e),
        })
        .unwrap();
    let value = vec![b'x'; 64 << 10];
    eventually(D, "every node knows keyspace ap", || async {
        client
            .ap_put("ap", b"k0000", value.clone(), None, None)
            .await
            .is_ok()
    })
    .await;
    for i in 1..200 {
        client
            .ap_put(
                "ap",
                format!("k{i:04}").as_bytes(),
                value.clone(),
                None,
                None,
            )
            .await
            .unwrap();
    }
    let pid = c.pid(0);
    let before = rss(pid);
    let tls = PeerTls::load(
        &c.certs_dir(),
        "n2",
        &BTreeMap::from([(1, "n1".to_string())]),
    )
    .unwrap();
    let scan = bincode::serialize(&PeerRequest::Ap(ApRequest::ApScan(ApScan {
        keyspace: "ap".into(),
        prefix: Vec::new(),
        after: None,
        limit: 10_000,
    })))
    .unwrap();
    let frame = |kind: u8, id: u64, body: &[u8]| {
        let mut f = ((9 + body.len()) as u32).to_be_bytes().to_vec();
        f.push(kind);
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(body);
        f
    };
    let mut held = Vec::new();
    for round in 0..4 {
        let tcp = tokio::net::TcpStream::connect(&c.peer[0]).await.unwrap();
        let mut s = tls
            .connector()
            .connect(tls.name(1).unwrap(), tcp)
            .await
            .unwrap();
        let mut out = frame(0, 2, &[]);
        for id in 0..400u64 {
            out.extend(frame(1, round * 1000 + id, &scan));
        }
        // Written in the background: the node stops reading once its budget is full.
        held.push(tokio::spawn(async move {
            let _ = s.write_all(&out).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        }));
    }
    // Strangers announcing an 80 MiB first frame.
    for _ in 0..50 {
        let mut tcp = tokio::net::TcpStream::connect(&c.peer[0]).await.unwrap();
        held.push(tokio::spawn(async move {
            let _ = tcp.write_all(&frame(0, 2, &[])[..4]).await;
            let _ = tcp.write_all(&(80u32 << 20).to_be_bytes()).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }));
    }
    let until = Instant::now() + Duration::from_secs(8);
    let mut peak = before;
    while Instant::now() < until {
        peak = peak.max(rss(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("rss {} MiB before, peak {} MiB", before >> 20, peak >> 20);
    // Four connections, each holding at most about two frame limits (~55 MiB each way in
    // a debug build's default config); before #10 this grew past 800 MiB.
    assert!(
        peak < before + (400 << 20),
        "rss grew from {} to {} MiB",
        before >> 20,
        peak >> 20
    );
    still_serves(&c, "k").await;
    for h in held {
        h.abort();
    }
}

/// A Raft core that has stopped is reported: `/healthz` answers 503 with the reason and
/// `/v1/cluster` (what `capkv status` prints) names it. The core is stopped the way a
/// compromised leader could: a snapshot whose bytes are not a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_raft_core_is_reported_by_healthz_and_status() {
    let _heavy = HEAVY.lock().await;
    use openraft::raft::InstallSnapshotRequest;
    use openraft::{CommittedLeaderId, LogId, Membership, SnapshotMeta, StoredMembership};
    let c = Cluster::start(3, &[]).await;
    let leader = c.leader().await;
    let victim = (leader + 1) % 3;
    let info = c.client(victim).cluster_of(&c.url(victim)).await.unwrap();
    let (lid, vid) = (leader as u64 + 1, victim as u64 + 1);
    let tls = PeerTls::load(
        &c.certs_dir(),
        &format!("n{lid}"),
        &BTreeMap::from([(vid, format!("n{vid}"))]),
    )
    .unwrap();
    let t = Arc::new(
        PeerTransport::new(
            lid,
            BTreeMap::from([(vid, c.peer[victim].clone())]),
            Arc::new(FaultFilter::default()),
            1 << 24,
        )
        .with_tls(Some(tls)),
    );
    let last = LogId::new(
        CommittedLeaderId::new(info.term, lid),
        info.last_log_index + 1000,
    );
    let membership = Membership::new(vec![[1, 2, 3].into()], None);
    let req = InstallSnapshotRequest {
        vote: Vote::new_committed(info.term, lid),
        meta: SnapshotMeta {
            last_log_id: Some(last),
            last_membership: StoredMembership::new(Some(last), membership),
            snapshot_id: "forged".into(),
        },
        offset: 0,
        data: b"not a snapshot".to_vec(),
        done: true,
    };
    let _ = t
        .call(vid, PeerRequest::Cp(CpRequest::InstallSnapshot(req)), D)
        .await;
    let url = format!("{}/healthz", c.url(victim));
    let body = harness::eventually_some(Duration::from_secs(10), "healthz says 503", || async {
        let r = reqwest::get(&url).await.ok()?;
        (r.status() == 503).then_some(())?;
        r.text().await.ok()
    })
    .await;
    assert!(body.contains("raft core"), "{body}");
    let info = c.client(victim).cluster_of(&c.url(victim)).await.unwrap();
    assert_eq!(info.role, "stopped");
    assert!(info.raft_stopped.is_some());
}

/// Sends `GET /healthz` on a raw connection and reads the status line.
async fn raw_health(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(D, s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Slowloris: 300 connections that send half a request head, a byte at a time, are all
/// closed by the server once the header timeout passes, and the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_within_the_header_timeout() {
    let _heavy = HEAVY.lock().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = Cluster::start(1, &["--http-header-timeout-ms", "1000"]).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(&c.http[0]).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let _ = s
                .write_all(b"GET /v1/cluster HTTP/1.1\r\nhost: x\r\nx-slow: ")
                .await;
            let mut buf = [0u8; 256];
            loop {
                // One more byte every 200 ms; the server must close the connection.
                tokio::select! {
                    r = s.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return Instant::now(),
                        Ok(_) => {} // an error answer (408); then the close
                    },
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        if s.write_all(b"a").await.is_err() {
                            return Instant::now();
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        let closed = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("a slowloris connection was still open after 10 s")
            .unwrap();
        assert!(closed - started < Duration::from_secs(6));
    }
    let m = c.metrics(0).await;
    let hits = m
        .lines()
        .filter(|l| l.starts_with("capkv_limit_hits_total") && l.contains("http_header_timeout"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(hits >= 300.0, "{hits} header timeouts counted");
    still_serves(&c, "k").await;
}

/// 1000 connections past the cap are refused at once (503 or closed), while a connection
/// opened before keeps being served, and new ones are once the flood is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_refused_and_the_node_keeps_serving() {
    let _heavy = HEAVY.lock().await;
    more_open_files();
    use tokio::io::AsyncReadExt;
    let c = Cluster::start(
        1,
        &[
            "--max-connections",
            "50",
            "--http-header-timeout-ms",
            "60000",
        ],
    )
    .await;
    let mut kept = tokio::net::TcpStream::connect(&c.http[0]).await.unwrap();
    assert!(raw_health(&mut kept).await.contains("200"));
    let mut held = Vec::new();
    for _ in 0..49 {
        held.push(tokio::net::TcpStream::connect(&c.http[0]).await.unwrap());
    }
    // The cap is full of our connections once one more is refused: connections of the
    // harness that the node had not seen close yet may have taken places the held ones
    // were refused; keep any that got a place instead, until the next is refused.
    loop {
        let mut s = tokio::net::TcpStream::connect(&c.http[0]).await.unwrap();
        let mut buf = Vec::new();
        match tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut buf)).await {
            Ok(_) if String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 503") => break,
            Ok(_) => {}
            Err(_) => held.push(s),
        }
    }
    // The cap is full: every further connection is refused.
    // Each is refused (closed, most with a 503) or, if a place came free
    // meanwhile (a connection of the harness the loaded node saw close late), served: a
    // request on it is answered. Never left hanging.
    #[derive(PartialEq)]
    enum Fate {
        Refused503,
        Closed,
        Served,
        Hung,
    }
    let mut flood = Vec::new();
    for _ in 0..1000 {
        let addr = c.http[0].clone();
        flood.push(tokio::spawn(async move {
            let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
                return Fate::Closed;
            };
            let mut buf = Vec::new();
            // 30 s: on a loaded machine part of a burst can wait in the kernel's queue.
            match tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await {
                Ok(_) if String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 503") => {
                    Fate::Refused503
                }
                Ok(_) => Fate::Closed,
                Err(_) => match tokio::time::timeout(D, raw_health(&mut s)).await {
                    Ok(line) if line.contains("200") => Fate::Served,
                    _ => Fate::Hung,
                },
            }
        }));
    }
    let mut fates = Vec::new();
    for f in flood {
        fates.push(f.await.unwrap());
    }
    let count = |f: Fate| fates.iter().filter(|x| **x == f).count();
    let (answered_503, served, hung) = (
        count(Fate::Refused503),
        count(Fate::Served),
        count(Fate::Hung),
    );
    assert_eq!(hung, 0, "a connection past the cap was left hanging");
    assert!(
        served <= 50,
        "{served} connections past the cap were served"
    );
    assert!(answered_503 > 0, "refusals say why");
    assert!(
        raw_health(&mut kept).await.contains("200"),
        "the node serves"
    );
    drop(held);
    // Once the held connections are gone, new ones are served again, and the refusals
    // were counted.
    eventually(
        Duration::from_secs(10),
        "the node counts 1000 refusals",
        || async {
            let Ok(r) = reqwest::get(format!("{}/metrics", c.url(0))).await else {
                return false;
            };
            let m = r.text().await.unwrap_or_default();
            harness::metric(&m, "capkv_limit_hits_total") >= 1000.0
        },
    )
    .await;
    still_serves(&c, "k").await;
}

/// The status a request gets with `token` (or none).
async fn status_with(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
) -> u16 {
    let mut req = http.request(method, url).body("v");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap().status().as_u16()
}

/// With authentication on: no token is 401, a read-only token cannot write (403) on any
/// node (users live in the cp registry), admin endpoints need admin, and a deleted
/// user's token stops working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_are_enforced_on_every_node() {
    let _heavy = HEAVY.lock().await;
    use capkv_core::UserSpec;
    use reqwest::Method;
    let c = Cluster::start(3, &["--auth"]).await;
    let http = c.http_client();
    let key = |i: usize| format!("{}/v1/kv/cp/k", c.url(i));
    // No token, a wrong token: 401 everywhere but the probes.
    assert_eq!(status_with(&http, Method::GET, &key(0), None).await, 401);
    assert_eq!(
        status_with(&http, Method::PUT, &key(1), Some("nope")).await,
        401
    );
    let cluster = format!("{}/v1/cluster", c.url(2));
    assert_eq!(status_with(&http, Method::GET, &cluster, None).await, 401);
    let health = format!("{}/healthz", c.url(2));
    assert_eq!(status_with(&http, Method::GET, &health, None).await, 200);

    let root = c.client(0);
    let reader = root
        .create_user(&UserSpec {
            name: "reader".into(),
            grants: vec!["read:cp".parse().unwrap()],
        })
        .await
        .unwrap();
    let writer = root
        .create_user(&UserSpec {
            name: "writer".into(),
            grants: vec!["readwrite:cp".parse().unwrap()],
        })
        .await
        .unwrap();
    assert_ne!(reader.token, writer.token);
    // Through another node, once the registry entry is applied there.
    let (r, w) = (reader.token.as_str(), writer.token.as_str());
    eventually(D, "n3 knows the writer", || async {
        status_with(&http, Method::PUT, &key(2), Some(w)).await == 200
    })
    .await;
    eventually(D, "n3 knows the reader", || async {
        status_with(&http, Method::GET, &key(2), Some(r)).await == 200
    })
    .await;
    assert_eq!(status_with(&http, Method::PUT, &key(2), Some(r)).await, 403);
    assert_eq!(
        status_with(&http, Method::DELETE, &key(1), Some(r)).await,
        403
    );
    let other = format!("{}/v1/kv/bank/k", c.url(1));
    assert_eq!(status_with(&http, Method::PUT, &other, Some(w)).await, 403);
    assert_eq!(status_with(&http, Method::GET, &other, Some(r)).await, 403);
    let admin_only = [
        (Method::POST, format!("{}/v1/keyspaces", c.url(0))),
        (Method::DELETE, format!("{}/v1/faults", c.url(0))),
        (Method::GET, format!("{}/v1/users", c.url(0))),
    ];
    for (m, url) in &admin_only {
        assert_eq!(
            status_with(&http, m.clone(), url, Some(w)).await,
            403,
            "{url}"
        );
    }
    // The writer's write is there.
    let read = c
        .client(0)
        .get("cp", b"k", Default::default())
        .await
        .unwrap();
    assert_eq!(read.map(|v| v.value), Some(b"v".to_vec()));
    // Users are listed without tokens; deleting one revokes its token on every node.
    let users = root.list_users().await.unwrap();
    assert_eq!(users.len(), 2);
    root.delete_user("reader").await.unwrap();
    for i in 0..3 {
        eventually(D, "the deleted user's token is refused", || async {
            status_with(&http, Method::GET, &key(i), Some(r)).await == 401
        })
        .await;
    }
    assert!(matches!(
        root.delete_user("reader").await,
        Err(ClientError::Api { status: 404, .. })
    ));
    // Admin on one keyspace may create that keyspace, and no other.
    let owner = root
        .create_user(&UserSpec {
            name: "owner".into(),
            grants: vec!["admin:cart".parse().unwrap()],
        })
        .await
        .unwrap();
    let keyspaces = format!("{}/v1/keyspaces", c.url(0));
    let create = |name: &str| {
        http.post(&keyspaces)
            .bearer_auth(&owner.token)
            .body(format!(r#"{{"name":"{name}","mode":"cp"}}"#))
            .send()
    };
    eventually(D, "the owner creates cart", || async {
        create("cart").await.is_ok_and(|r| r.status() == 201)
    })
    .await;
    assert_eq!(create("bank").await.unwrap().status(), 403);
    assert_eq!(
        status_with(
            &http,
            Method::PUT,
            &format!("{}/v1/kv/cart/k", c.url(0)),
            Some(&owner.token)
        )
        .await,
        200
    );
    // The scheme is case-insensitive.
    let lower = http
        .get(format!("{}/v1/kv/cart/k", c.url(0)))
        .header("authorization", format!("bearer {}", owner.token))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200);
}

/// The HTTP API over TLS, with a token: the CLI's client trusts the cluster's CA, learns
/// the other nodes as https://, and a plain-HTTP request gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_over_tls_serves_only_tls() {
    let _heavy = HEAVY.lock().await;
    let c = Cluster::start(3, &["--auth", "--https"]).await;
    let client = capkv_client::Client::new([c.url(0)])
        .with_security(c.security())
        .unwrap();
    client
        .put("cp", b"k", b"v".to_vec(), &WriteOptions::default())
        .await
        .unwrap();
    assert!(client.endpoints().iter().all(|e| e.starts_with("https://")));
    assert_eq!(client.endpoints().len(), 3);
    // Plain HTTP to a TLS port: no HTTP answer.
    let plain = reqwest::get(format!("http://{}/healthz", c.http[1])).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    // Without the CA, the server is not trusted.
    let untrusted = capkv_client::Client::new([c.url(0)]);
    assert!(untrusted.cluster().await.is_err());
}

/// `--tls-client-ca`: a client without a certificate signed by the CA gets no answer;
/// one with it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_can_be_required() {
    let _heavy = HEAVY.lock().await;
    let c = Cluster::start(1, &["--https-client-certs"]).await;
    let with = c.client(0);
    with.put("cp", b"k", b"v".to_vec(), &WriteOptions::default())
        .await
        .unwrap();
    let mut security = c.security();
    security.identity_pem = None;
    let without = capkv_client::Client::new([c.url(0)])
        .with_security(security)
        .unwrap();
    assert!(without.cluster().await.is_err());
}

/// Raises this process's open-file limit to its hard limit (tests that hold thousands of
/// sockets), as a node does at start.
fn more_open_files() {
    capkv::server::raise_open_files_limit();
}

/// Strangers holding more connections open on every peer port than there are places for
/// them, and reopening each one the node closes, do not keep a restarted node from
/// rejoining: the node closes the oldest stranger for a newcomer, and an honest peer
/// proves itself long before it is the oldest (review: 64 idle connections locked
/// honest peers out for as long as they were held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_holding_the_peer_port_do_not_lock_peers_out() {
    let _heavy = HEAVY.lock().await;
    use tokio::io::AsyncReadExt;
    more_open_files();
    let mut c = Cluster::start(3, &[]).await;
    let per_node = 1100;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut squatters = Vec::new();
    for addr in c.peer.clone() {
        for _ in 0..per_node {
            let (addr, stop) = (addr.clone(), stop.clone());
            squatters.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    // Send nothing; wait until the node closes it, then come back.
                    let mut buf = [0u8; 64];
                    let _ = s.read(&mut buf).await;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.stop(0);
    c.restart(0).await;
    still_serves(&c, "squatted").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in squatters {
        s.abort();
    }
}

/// 300 writes whose bodies never arrive do not take the places other requests need: the
/// body is received (by the request's deadline) before a request takes one (review: 256
/// such requests answered every other request 503 for 70 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_never_arrive_do_not_block_other_requests() {
    let _heavy = HEAVY.lock().await;
    use tokio::io::AsyncWriteExt;
    more_open_files();
    let c = Cluster::start(1, &[]).await;
    let mut held = Vec::new();
    // Bodies announced at the value limit, and chunked ones, that never come: a body holds
    // only the bytes that arrived (review: reserving the announced length let 256 of
    // them block every write for a minute).
    for i in 0..300 {
        let mut s = tokio::net::TcpStream::connect(&c.http[0]).await.unwrap();
        let length = if i % 2 == 0 {
            "content-length: 1048577"
        } else {
            "transfer-encoding: chunked"
        };
        let head = format!(
            "PUT /v1/kv/cp/slow{i}?timeout_ms=60000 HTTP/1.1\r\nhost: x\r\n{length}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        held.push(s); // and the body never comes
    }
    // A body announced over the limit is refused before it is sent.
    let mut s = tokio::net::TcpStream::connect(&c.http[0]).await.unwrap();
    s.write_all(b"PUT /v1/kv/cp/big HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000000\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read(&mut s, &mut answer),
    )
    .await
    .expect("answered at once")
    .unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 413"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = c.client(0);
    for i in 0..5 {
        let started = Instant::now();
        client
            .put(
                "cp",
                format!("k{i}").as_bytes(),
                b"v".to_vec(),
                &WriteOptions::default(),
            )
            .await
            .expect("a write while 300 bodies are pending");
        client
            .get("cp", format!("k{i}").as_bytes(), Default::default())
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    drop(held);
}

/// With authentication on and this node's storage reads stalled, 600 requests with a
/// bogus token do not wedge it: token lookups are bounded (in number and time), so the
/// node still answers, the fault can be lifted, and then tokens work again (review: the
/// lookups took every thread and only kill -9 stopped the node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_checks_on_stalled_storage_do_not_wedge_the_node() {
    let _heavy = HEAVY.lock().await;
    use capkv_core::UserSpec;
    more_open_files();
    let c = Cluster::start(1, &["--auth"]).await;
    let root = c.root_token().unwrap();
    let user = c
        .client(0)
        .create_user(&UserSpec {
            name: "reader".into(),
            grants: vec!["read:cp".parse().unwrap()],
        })
        .await
        .unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let faults = format!("{}/v1/faults", c.url(0));
    let r = http
        .post(&faults)
        .bearer_auth(&root)
        .json(&serde_json::json!({"storage_read_stall": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let key = format!("{}/v1/kv/cp/k", c.url(0));
    let flood: Vec<_> = (0..600)
        .map(|i| {
            let (http, key) = (http.clone(), key.clone());
            tokio::spawn(async move {
                let _ = http
                    .get(&key)
                    .bearer_auth(format!("bogus-{i}"))
                    .send()
                    .await;
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The node answers (its health says why it is unwell), and the fault can be lifted.
    let health = http
        .get(format!("{}/healthz", c.url(0)))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("/healthz answers during the flood");
    assert!(health.status() == 200 || health.status() == 503);
    let r = http
        .delete(&faults)
        .bearer_auth(&root)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("the fault can be lifted during the flood");
    assert_eq!(r.status(), 200);
    for f in flood {
        let _ = f.await;
    }
    eventually(D, "the user's token works again", || async {
        http.get(&key)
            .bearer_auth(&user.token)
            .send()
            .await
            .is_ok_and(|r| r.status() == 404 || r.status() == 200)
    })
    .await;
}
