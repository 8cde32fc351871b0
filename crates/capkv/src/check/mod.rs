//! `capkv check`: Jepsen-style verification of a capkv cluster, built in.
//!
//! ```text
//!   start a local cluster (or use --nodes)      create the workload's keyspace
//!        │
//!        ├── clients (concurrent, one op at a time, random nodes) ──► history.jsonl
//!        ├── nemesis (seeded: partition, kill, restart, pause, clock, snapshot) ──► history
//!        │         fault phase: --duration seconds
//!        ├── heal everything; the cluster must serve again (else: a failed run, with why)
//!        ├── final phase: read every key from every node (ap: until they agree)
//!        ▼
//!   capkv_check::check(history) ──► summary.json, report.html, exit code
//!                                    0 valid, 1 invalid, 2 unknown, 3 the harness failed
//! ```
//!
//! The checkers live in the `capkv-check` crate; this module runs the experiment. A harness
//! failure (a cluster that would not start, a history that could not be written) is exit 3,
//! never a verdict on the system.

mod cluster;
mod nemesis;
mod workload;

pub(crate) use workload::{page_reads, scan_read_op};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capkv_check::{Anomaly, CheckResult, History, Limits, Record, RunInfo, Validity};
use capkv_client::{Client, ClientError, ErrorCode, KeyspaceSpec, Mode, ValueType};
use clap::ValueEnum;

use cluster::Cluster;
use nemesis::Nemesis;
use workload::{ClientState, Ctx, Recorder};

/// What the clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// cp: read, write, CAS by value and by version on a few keys; linearizable.
    Register,
    /// cp: `if_version=0` inserts of fresh keys; a failed insert must stay invisible.
    UniqueInsert,
    /// cp: writes with an Idempotency-Key retried through other nodes; applied once.
    Idempotent,
    /// ap (type=set): unique adds; none lost, none invented, all replicas converge.
    Set,
    /// ap (type=counter): increments; the converged total is exact.
    Counter,
    /// ap register: read-then-write with contexts; no acknowledged write silently lost.
    Siblings,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Register => "register",
            Workload::UniqueInsert => "unique-insert",
            Workload::Idempotent => "idempotent",
            Workload::Set => "set",
            Workload::Counter => "counter",
            Workload::Siblings => "siblings",
        }
    }

    fn is_cp(self) -> bool {
        matches!(
            self,
            Workload::Register | Workload::UniqueInsert | Workload::Idempotent
        )
    }

    /// The keyspace the workload uses and how to create it.
    fn keyspace(self) -> KeyspaceSpec {
        let (name, mode, value_type) = match self {
            Workload::Register | Workload::UniqueInsert | Workload::Idempotent => {
                ("check_cp", Mode::Cp, None)
            }
            Workload::Set => ("check_set", Mode::Ap, Some(ValueType::Set)),
            Workload::Counter => ("check_counter", Mode::Ap, Some(ValueType::Counter)),
            Workload::Siblings => ("check_ap", Mode::Ap, Some(ValueType::Register)),
        };
        let mut spec = KeyspaceSpec::new(name, mode);
        spec.value_type = value_type;
        spec
    }
}

/// What breaks the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NemesisKind {
    Partition,
    Kill,
    Restart,
    Pause,
    Clock,
    Snapshot,
}

impl NemesisKind {
    fn needs_processes(self) -> bool {
        matches!(
            self,
            NemesisKind::Kill | NemesisKind::Restart | NemesisKind::Pause
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            NemesisKind::Partition => "partition",
            NemesisKind::Kill => "kill",
            NemesisKind::Restart => "restart",
            NemesisKind::Pause => "pause",
            NemesisKind::Clock => "clock",
            NemesisKind::Snapshot => "snapshot",
        }
    }
}

pub struct CheckOptions {
    pub workload: Workload,
    pub nemesis: Vec<NemesisKind>,
    pub duration: Duration,
    pub seed: u64,
    pub out: PathBuf,
    /// A running cluster to check instead of starting one.
    pub nodes: Option<Vec<String>>,
    /// Nodes of the local cluster.
    pub cluster_size: u32,
    pub clients: u32,
    pub keys: u32,
    /// `--snapshot-every` of the local nodes with the snapshot nemesis.
    pub snapshot_every: u64,
    /// Time the checker may spend.
    pub check_time: Duration,
}

/// How long the client waits for an answer before calling the outcome unknown: above the
/// server's default 2 s deadline, so a live node's own 504 comes first.
const ANSWER_WAIT: Duration = Duration::from_secs(5);
/// How long a healed cluster may take to serve again before the run fails.
const RECOVERY_LIMIT: Duration = Duration::from_secs(60);
/// How long ap replicas may take to converge after the heal.
const CONVERGENCE_LIMIT: Duration = Duration::from_secs(60);

/// Runs `capkv check`; returns the exit code (0 valid, 1 invalid, 2 unknown, 3 harness).
pub async fn run(opts: CheckOptions) -> i32 {
    match run_inner(&opts).await {
        Ok(v) => v.exit_code(),
        Err(e) => {
            eprintln!("check: the harness failed: {e}");
            3
        }
    }
}

async fn run_inner(opts: &CheckOptions) -> Result<Validity, String> {
    if opts.clients == 0 || opts.keys == 0 {
        return Err("--clients and --keys must be at least 1".into());
    }
    if opts.duration.is_zero() {
        return Err("--duration must be at least 1 second".into());
    }
    let size = opts
        .nodes
        .as_ref()
        .map_or(opts.cluster_size as usize, Vec::len);
    if let Some(k) = opts
        .nemesis
        .iter()
        .find(|k| matches!(k, NemesisKind::Partition | NemesisKind::Snapshot))
    {
        if size < 2 {
            return Err(format!("the {} nemesis needs at least 2 nodes", k.name()));
        }
    }
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| format!("cannot create {}: {e}", opts.out.display()))?;
    let cluster = match &opts.nodes {
        Some(urls) => {
            if let Some(k) = opts.nemesis.iter().find(|k| k.needs_processes()) {
                return Err(format!(
                    "the {} nemesis needs the processes: run without --nodes so check starts its own cluster",
                    k.name()
                ));
            }
            Cluster::remote(urls).await?
        }
        None => {
            if !(1..=9).contains(&opts.cluster_size) {
                return Err("--cluster-size must be between 1 and 9".into());
            }
            let mut extra = Vec::new();
            if opts.nemesis.contains(&NemesisKind::Snapshot) {
                extra.push("--snapshot-every".to_owned());
                extra.push(opts.snapshot_every.to_string());
            }
            eprintln!(
                "check: starting {} nodes (data and logs in {})",
                opts.cluster_size,
                opts.out.join("nodes").display()
            );
            Cluster::start_local(opts.cluster_size, &opts.out.join("nodes"), extra).await?
        }
    };
    let cluster = Arc::new(cluster);
    // Ctrl-C or SIGTERM ends the run early: the cluster is still stopped (paused nodes
    // resumed first), and the history written so far stays on disk.
    let result = tokio::select! {
        r = experiment(opts, &cluster) => r,
        why = interrupted() => Err(format!("interrupted by {why}; the partial history is in {}", opts.out.display())),
    };
    if cluster.is_local() {
        cluster.revive_all().await.ok();
        cluster.shutdown().await;
    }
    let (history, mut recovery) = result?;

    eprintln!("check: checking {} operations...", history.ops.len());
    let h = history;
    let mut result = capkv_check::check(
        &h,
        Limits {
            time: opts.check_time,
            ..Limits::default()
        },
    );
    if let Some(why) = recovery.take() {
        result.add(Anomaly {
            kind: "no-recovery".into(),
            key: String::new(),
            message: why,
            ops: Vec::new(),
            stuck: None,
        });
    }
    write_outputs(&opts.out, &h, &result)?;
    print_verdict(Some(&opts.out), &result);
    Ok(result.validity)
}

/// Runs the workload and the nemesis; returns the history and, if the healed cluster did
/// not serve again, why.
/// Resolves on Ctrl-C or SIGTERM, naming which.
async fn interrupted() -> &'static str {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = term.recv() => "SIGTERM",
    }
}

async fn experiment(
    opts: &CheckOptions,
    cluster: &Arc<Cluster>,
) -> Result<(History, Option<String>), String> {
    cluster.wait_ready(Duration::from_secs(30)).await?;
    if opts.nemesis.iter().any(|k| !k.needs_processes()) {
        cluster.check_faults_enabled().await?;
    }
    let spec = opts.workload.keyspace();
    create_keyspace(cluster, &spec).await?;

    let file = std::fs::File::create(opts.out.join("history.jsonl"))
        .map_err(|e| format!("cannot write the history: {e}"))?;
    let recorder = Arc::new(Recorder::new(file));
    let info = RunInfo {
        workload: opts.workload.name().into(),
        nemesis: opts.nemesis.iter().map(|k| k.name().to_owned()).collect(),
        seed: opts.seed,
        nodes: cluster.nodes.iter().map(|n| n.id.clone()).collect(),
        clients: u64::from(opts.clients),
        duration_s: opts.duration.as_secs(),
        keyspace: spec.name.clone(),
    };
    recorder.write(&Record::Run(info.clone()));
    let ctx = Arc::new(Ctx {
        workload: opts.workload,
        keyspace: spec.name.clone(),
        tag: format!("{:x}-", opts.seed ^ now_nanos()),
        keys: opts.keys,
        node_ids: cluster.nodes.iter().map(|n| n.id.clone()).collect(),
        clients: cluster
            .nodes
            .iter()
            .map(|n| Client::pinned(&n.url, ANSWER_WAIT))
            .collect(),
        recorder: recorder.clone(),
        stop: AtomicBool::new(false),
        inserted: Default::default(),
        set_adds: Default::default(),
    });

    eprintln!(
        "check: {} with nemesis [{}] for {:?}, {} clients, seed {}",
        opts.workload.name(),
        info.nemesis.join(","),
        opts.duration,
        opts.clients,
        opts.seed
    );
    let mut tasks = Vec::new();
    for c in 0..opts.clients {
        let st = ClientState::new(u64::from(c), opts.seed);
        tasks.push(tokio::spawn(workload::client_loop(ctx.clone(), st)));
    }
    let nemesis_stop = Arc::new(AtomicBool::new(false));
    let nemesis = Nemesis::new(
        cluster.clone(),
        recorder.clone(),
        opts.nemesis.clone(),
        opts.seed,
    );
    let current = nemesis.current();
    let nemesis_task = tokio::spawn(nemesis.run(nemesis_stop.clone()));

    // The fault phase, with progress.
    let started = Instant::now();
    while started.elapsed() < opts.duration {
        tokio::time::sleep(Duration::from_secs(2).min(opts.duration - started.elapsed())).await;
        recorder.flush();
        let c = |i: usize| recorder.counts[i].load(Ordering::Relaxed);
        let now = current
            .lock()
            .expect("current lock")
            .values()
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        eprintln!(
            "[{:>4}s] ops {:>7}  ok {:>7}  fail {:>6}  unknown {:>5}  {}",
            started.elapsed().as_secs(),
            c(0) + c(1) + c(2),
            c(0),
            c(1),
            c(2),
            if now.is_empty() { "-".to_owned() } else { now }
        );
    }
    nemesis_stop.store(true, Ordering::Relaxed);
    let nemesis_result = nemesis_task
        .await
        .map_err(|e| format!("the nemesis panicked: {e}"))?;
    ctx.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.map_err(|e| format!("a client panicked: {e}"))?;
    }
    nemesis_result?;

    // Heal everything; the cluster must serve again.
    eprintln!("check: healing; waiting for the cluster to serve again");
    cluster.revive_all().await?;
    let healer = Nemesis::new(cluster.clone(), recorder.clone(), Vec::new(), 0);
    healer.heal_network().await;
    let mut recovery = wait_serving(cluster, &spec).await.err();
    if let Some(why) = &recovery {
        eprintln!("check: {why}");
    }

    // The final phase.
    let final_at = recorder.now_us();
    recorder.write(&Record::Phase {
        name: "final".into(),
        at_us: final_at,
    });
    if recovery.is_none() {
        eprintln!("check: final reads");
        if opts.workload.is_cp() {
            if !workload::final_cp_reads(&ctx, CONVERGENCE_LIMIT).await {
                // The healed cluster stopped serving: as if it had not recovered.
                let why = format!(
                    "some final reads got no answer within {CONVERGENCE_LIMIT:?} of every \
                     fault healed"
                );
                eprintln!("check: {why}");
                recovery = Some(why);
            }
        } else if let Err(why) = workload::final_ap_reads(&ctx, CONVERGENCE_LIMIT).await {
            eprintln!("check: not converged after {CONVERGENCE_LIMIT:?}: {why}");
        }
    }
    recorder.finish()?;
    let (ops, nemesis) = recorder.take();
    let history = History {
        info,
        ops,
        nemesis,
        final_at_us: Some(final_at),
    };
    Ok((history, recovery))
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Creates the keyspace (an existing one with the same spec is fine) and waits until every
/// node has learned it.
async fn create_keyspace(cluster: &Cluster, spec: &KeyspaceSpec) -> Result<(), String> {
    let client = Client::new(cluster.nodes.iter().map(|n| n.url.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.create_keyspace(spec).await {
            Ok(_) => break,
            Err(ClientError::Api { error, .. }) if error.code == ErrorCode::Conflict => {
                let existing = client
                    .list_keyspaces()
                    .await
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .find(|k| k.name == spec.name);
                match existing {
                    Some(k) if k.mode == spec.mode && k.value_type == spec.value_type => break,
                    Some(k) => {
                        return Err(format!(
                            "keyspace {} exists with another spec ({k:?}); check needs {spec:?}",
                            spec.name
                        ))
                    }
                    None => {}
                }
            }
            Err(e) if Instant::now() > deadline => {
                return Err(format!("cannot create keyspace {}: {e}", spec.name))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    for n in &cluster.nodes {
        let c = Client::pinned(&n.url, ANSWER_WAIT);
        loop {
            match c.list_keyspaces_serializable().await {
                Ok(list) if list.iter().any(|k| k.name == spec.name) => break,
                _ if Instant::now() > deadline => {
                    return Err(format!("{} never learned keyspace {}", n.id, spec.name))
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(())
}

/// After the heal: every node must answer a write and a read of a probe key.
async fn wait_serving(cluster: &Cluster, spec: &KeyspaceSpec) -> Result<(), String> {
    let deadline = Instant::now() + RECOVERY_LIMIT;
    for n in &cluster.nodes {
        let c = Client::pinned(&n.url, ANSWER_WAIT);
        let key = format!("probe-{}", n.id);
        let mut last = String::new();
        loop {
            let ok = match spec.mode {
                Mode::Cp => {
                    let w = c
                        .put(
                            &spec.name,
                            key.as_bytes(),
                            b"1".to_vec(),
                            &Default::default(),
                        )
                        .await;
                    let r = c
                        .get(
                            &spec.name,
                            key.as_bytes(),
                            capkv_client::Consistency::Linearizable,
                        )
                        .await;
                    match (w, r) {
                        (Ok(_), Ok(_)) => true,
                        (Err(e), _) | (_, Err(e)) => {
                            last = e.to_string();
                            false
                        }
                    }
                }
                // A write and a read of a probe key (outside the workload's keys).
                Mode::Ap => {
                    let k = key.as_bytes();
                    let (w, r) = match spec.value_type {
                        Some(ValueType::Counter) => (
                            c.incr(&spec.name, k, 1, None).await.err(),
                            c.counter(&spec.name, k, None).await.err(),
                        ),
                        Some(ValueType::Set) => (
                            c.set_add(&spec.name, k, &["probe"], None).await.err(),
                            c.set_members(&spec.name, k, None).await.err(),
                        ),
                        _ => (
                            c.ap_put(&spec.name, k, b"1".to_vec(), None, None)
                                .await
                                .err(),
                            c.ap_get(&spec.name, k, None).await.err(),
                        ),
                    };
                    match w.or(r) {
                        None => true,
                        Some(e) => {
                            last = e.to_string();
                            false
                        }
                    }
                }
            };
            if ok {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the cluster stopped serving: {} did not serve {} within {RECOVERY_LIMIT:?} \
                     of the heal (last error: {last})",
                    n.id, spec.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

fn write_outputs(out: &Path, h: &History, result: &CheckResult) -> Result<(), String> {
    let summary = capkv_check::report::summary_json(h, result);
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_vec_pretty(&summary).expect("json values serialize"),
    )
    .map_err(|e| format!("cannot write summary.json: {e}"))?;
    std::fs::write(
        out.join("report.html"),
        capkv_check::report::html(h, result),
    )
    .map_err(|e| format!("cannot write report.html: {e}"))
}

fn print_verdict(out: Option<&Path>, result: &CheckResult) {
    println!(
        "{}: {} operations (ok {}, fail {}, unknown {}) on {} keys, checked in {} ms",
        result.workload,
        result.ops,
        result.ok,
        result.fail,
        result.unknown,
        result.keys,
        result.check_ms
    );
    for a in result.anomalies.iter().take(10) {
        println!("  {} [{}]: {}", a.kind, a.key, a.message);
    }
    if result.anomalies.len() > 10 {
        println!("  ... and {} more", result.anomalies.len() - 10);
    }
    for u in result.undecided.iter().take(5) {
        println!("  undecided: {u}");
    }
    let verdict = match result.validity {
        Validity::Valid => "VALID",
        Validity::Invalid => "INVALID",
        Validity::Unknown => "UNKNOWN",
    };
    match out {
        Some(out) => println!(
            "verdict: {verdict}  (report: {})",
            out.join("report.html").display()
        ),
        None => println!("verdict: {verdict}"),
    }
}

/// `capkv check-history`: checks a recorded history; returns the exit code.
pub fn check_history(
    format: HistoryFormat,
    file: &Path,
    out: Option<&Path>,
    check_time: Duration,
) -> i32 {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("check-history: cannot read {}: {e}", file.display());
            return 3;
        }
    };
    let parsed = match format {
        HistoryFormat::Jepsen => capkv_check::jepsen::parse(&text),
        HistoryFormat::Capkv => History::read_jsonl(text.as_bytes()),
    };
    let h = match parsed {
        Ok(h) => h,
        Err(e) => {
            eprintln!("check-history: {}: {e}", file.display());
            return 3;
        }
    };
    if !capkv_check::WORKLOADS.contains(&h.info.workload.as_str()) {
        eprintln!(
            "check-history: {}: no checker for workload {:?} (known: {})",
            file.display(),
            h.info.workload,
            capkv_check::WORKLOADS.join(", ")
        );
        return 3;
    }
    let result = capkv_check::check(
        &h,
        Limits {
            time: check_time,
            ..Limits::default()
        },
    );
    if let Some(out) = out {
        let written = std::fs::create_dir_all(out).and_then(|()| {
            std::fs::write(
                out.join("report.html"),
                capkv_check::report::html(&h, &result),
            )
        });
        if let Err(e) = written {
            eprintln!(
                "check-history: cannot write the report in {}: {e}",
                out.display()
            );
            return 3;
        }
    }
    print_verdict(out, &result);
    result.validity.exit_code()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HistoryFormat {
    Jepsen,
    Capkv,
}
