//! `capkv check` and `capkv check-history` as a user runs them: real processes, real exit
//! codes, real files. (Longer runs with kills are in `.ci/run`; the runs that found bugs are
//! in docs/checking.md.)

mod harness;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::Cluster;

/// Runs the capkv binary with `args`; kills it after `limit`. Returns (exit code, stdout).
fn capkv(args: &[&str], limit: Duration) -> (i32, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_capkv"))
        .args(args)
        .stdout(Stdio::from(out.reopen().unwrap()))
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("capkv {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(out.path()).unwrap();
    (status.code().unwrap_or(-1), stdout)
}

fn jepsen_file(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../check/testdata/jepsen-etcd")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn check_history_reads_jepsen_logs_and_answers_with_its_exit_code() {
    let limit = Duration::from_secs(30);
    let (code, out) = capkv(
        &[
            "check-history",
            "--format",
            "jepsen",
            &jepsen_file("etcd_048.log"),
        ],
        limit,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("verdict: VALID"), "{out}");
    let (code, out) = capkv(
        &[
            "check-history",
            "--format",
            "jepsen",
            &jepsen_file("etcd_000.log"),
        ],
        limit,
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not-linearizable"), "{out}");
    // A file that is not a history is the harness failing, not a verdict.
    let (code, _) = capkv(
        &[
            "check-history",
            "--format",
            "capkv",
            &jepsen_file("etcd_000.log"),
        ],
        limit,
    );
    assert_eq!(code, 3);
}

#[test]
fn a_short_register_check_with_partitions_is_valid_and_writes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let (code, out) = capkv(
        &[
            "check",
            "--workload",
            "register",
            "--nemesis",
            "partition",
            "--duration",
            "8",
            "--seed",
            "11",
            "--clients",
            "4",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        Duration::from_secs(150),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("verdict: VALID"), "{out}");
    let history = std::fs::read_to_string(out_dir.join("history.jsonl")).unwrap();
    assert!(
        history.lines().count() > 50,
        "the history holds the operations"
    );
    assert!(
        history.contains(r#""type":"nemesis""#),
        "the nemesis is recorded"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["result"]["validity"], "valid", "{summary}");
    let report = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert!(report.contains("<html"), "a report is written");
    // The recorded history checks the same way on its own.
    let (code, again) = capkv(
        &[
            "check-history",
            out_dir.join("history.jsonl").to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(code, 0, "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_targets_a_running_cluster_with_nodes() {
    let cluster = Cluster::start(3, &[]).await;
    let urls: Vec<String> = (0..3).map(|i| cluster.url(i)).collect();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let args = vec![
        "check".to_owned(),
        "--nodes".into(),
        urls.join(","),
        "--workload".into(),
        "set".into(),
        "--nemesis".into(),
        "partition".into(),
        "--duration".into(),
        "6".into(),
        "--clients".into(),
        "4".into(),
        "--out".into(),
        out_dir.display().to_string(),
    ];
    let (code, out) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        capkv(&args, Duration::from_secs(150))
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("set:"), "{out}");
    // Kill needs the processes: refused with --nodes, as a harness failure.
    let args = vec![
        "check".to_owned(),
        "--nodes".into(),
        urls.join(","),
        "--nemesis".into(),
        "kill".into(),
        "--duration".into(),
        "1".into(),
        "--out".into(),
        dir.path().join("refused").display().to_string(),
    ];
    let (code, _) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        capkv(&args, Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert_eq!(code, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_nodes_without_fault_injection_and_bad_command_lines() {
    let cluster = Cluster::start_with(2, &[], false).await;
    let urls: Vec<String> = (0..2).map(|i| cluster.url(i)).collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run").display().to_string();
    let nodes = urls.join(",");
    let (code, _) = tokio::task::spawn_blocking(move || {
        capkv(
            &[
                "check",
                "--nodes",
                &nodes,
                "--nemesis",
                "partition",
                "--duration",
                "3",
                "--out",
                &out,
            ],
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        code, 3,
        "a partition nobody applies must not become a verdict"
    );
    // Command lines check cannot use are harness failures (3), not "unknown" (2).
    for args in [
        &["check", "--nemesis", "foo"][..],
        &["check", "--duration", "0"],
        &["check", "--cluster-size", "1", "--nemesis", "partition"],
        &["check-history", "/nonexistent/history.jsonl"],
    ] {
        let (code, _) = capkv(args, Duration::from_secs(30));
        assert_eq!(code, 3, "{args:?}");
    }
}

/// Runs `capkv check` with `args` into a temporary directory; returns (exit code, stdout).
fn check_run(args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    all.extend(["--out", out.to_str().unwrap()]);
    capkv(&all, Duration::from_secs(240))
}

/// Regression (issue "Every promise kept under faults", item 1): a leader stopped with
/// SIGTERM dropped the answers of writes it had proposed and said 503 "not applied"; the
/// follower that forwarded them proposed them again, so `if_version=0` inserts of fresh
/// keys answered 409 (applied twice). Found by `capkv check --workload unique-insert
/// --nemesis restart` (docs/checking.md).
#[test]
fn unique_inserts_survive_graceful_leader_restarts() {
    let (code, stdout) = check_run(&[
        "--workload",
        "unique-insert",
        "--nemesis",
        "restart",
        "--duration",
        "25",
        "--clients",
        "16",
        "--seed",
        "7",
    ]);
    assert_eq!(code, 0, "{stdout}");
}

/// Regression (issue "Every promise kept under faults", item 10): an ap write that timed
/// out at a paused home was applied again at the next home, and once more by the first
/// when it resumed, so a counter counted increments twice. Found by `capkv check
/// --workload counter --nemesis pause` (docs/checking.md).
#[test]
fn counters_count_each_increment_once_while_nodes_pause() {
    let (code, stdout) = check_run(&[
        "--workload",
        "counter",
        "--nemesis",
        "pause",
        "--duration",
        "25",
        "--seed",
        "3",
    ]);
    assert_eq!(code, 0, "{stdout}");
}

/// Regression (issue "Every promise kept under faults", item 12): the context an ap write
/// returned was the home's whole object context, covering concurrent writes the client
/// had never seen; the workload's clients write again with it (as docs/api.md invites),
/// and those writes vanished (hundreds per key in 30 s, with or without faults). Found by
/// `capkv check --workload siblings` (docs/checking.md); the partitions make writes land
/// on different homes, so contexts name exact dots that replicas learn from each other.
#[test]
fn siblings_written_with_returned_contexts_are_never_silently_replaced() {
    let (code, stdout) = check_run(&[
        "--workload",
        "siblings",
        "--nemesis",
        "partition",
        "--duration",
        "10",
        "--seed",
        "9",
    ]);
    assert_eq!(code, 0, "{stdout}");
}
