//! `capkv sim`: deterministic simulation of a whole cluster in one process.
//!
//! ```text
//!   seed ──► one thread: tokio current-thread runtime, paused clock, seeded select! order
//!             │  rt::simulate_on_this_thread(seed): seeded RNG (openraft's too), no threads
//!             ├── N real Nodes (Node::assemble), each in its NodeScope, on a MemoryEngine
//!             │   with the fsync line, attached to the simulated Network
//!             ├── clients (the workloads of `capkv check`) through each node's router
//!             ├── safety phase: the nemesis injects faults for `faults` simulated seconds
//!             ├── liveness phase: everything healed; every workload must write again
//!             ├── final reads: ap replicas must converge
//!             ▼
//!   capkv-check checkers ──► verdict, and `trace <hash>` of every event
//! ```
//!
//! The same seed gives the same trace, bit for bit, on the same build: every source of
//! choice is seeded or ordered (see docs/simulation.md for what is and what is not
//! simulated, and why).

pub mod cluster;
pub mod nemesis;
pub mod net;
pub mod trace;
pub mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capkv_check::{Limits, Validity};

use cluster::Cluster;
use nemesis::{Fault, Nemesis};
use net::Network;
use trace::Trace;
use workload::{Clients, Kind};

use crate::rt::Instant;

/// What one simulated run does.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    pub seed: u64,
    pub nodes: u32,
    /// Simulated length of the safety phase (faults on).
    pub faults_for: Duration,
    /// Longest the liveness phase may take to show progress and convergence.
    pub liveness_within: Duration,
    /// Clients per workload.
    pub clients: u32,
    /// Keys per workload.
    pub keys: u32,
    /// The workloads the clients run.
    pub workloads: Vec<Kind>,
    pub faults: Vec<Fault>,
    /// Keep the trace as text (for `--trace`).
    pub keep_trace: bool,
    /// A fix of issue 8 taken back for this run (see [`crate::rt::Revert`]).
    pub revert: Option<crate::rt::Revert>,
}

impl SimOptions {
    pub fn new(seed: u64) -> SimOptions {
        SimOptions {
            seed,
            nodes: 3,
            faults_for: Duration::from_secs(20),
            liveness_within: Duration::from_secs(40),
            clients: 3,
            keys: 3,
            workloads: Kind::ALL.to_vec(),
            faults: Fault::ALL.to_vec(),
            keep_trace: false,
            revert: None,
        }
    }
}

impl SimOptions {
    /// The flags of `capkv sim` that give these options, beside `--seed` (defaults left
    /// out): with them, `capkv sim --seed S` replays the run.
    pub fn flags(&self) -> String {
        let d = SimOptions::new(self.seed);
        let mut f = String::new();
        if self.nodes != d.nodes {
            f.push_str(&format!(" --nodes {}", self.nodes));
        }
        if self.faults_for != d.faults_for {
            f.push_str(&format!(" --faults-secs {}", self.faults_for.as_secs()));
        }
        if self.liveness_within != d.liveness_within {
            f.push_str(&format!(
                " --liveness-secs {}",
                self.liveness_within.as_secs()
            ));
        }
        if self.clients != d.clients {
            f.push_str(&format!(" --clients {}", self.clients));
        }
        if self.keys != d.keys {
            f.push_str(&format!(" --keys {}", self.keys));
        }
        if self.workloads != d.workloads {
            let names: Vec<&str> = self.workloads.iter().map(|k| k.name()).collect();
            f.push_str(&format!(" --workloads {}", names.join(",")));
        }
        if self.faults != d.faults {
            let names: Vec<&str> = self.faults.iter().map(|k| k.name()).collect();
            let names = if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(",")
            };
            f.push_str(&format!(" --faults {names}"));
        }
        if let Some(r) = self.revert {
            f.push_str(&format!(" --revert {}", revert_name(r)));
        }
        f
    }
}

/// What one run found.
#[derive(Debug, Clone)]
pub struct SimReport {
    pub seed: u64,
    /// Every broken promise, in words; empty if the run was valid.
    pub problems: Vec<String>,
    /// What a checker could not decide within its budget (then the verdict is unknown).
    pub undecided: Vec<String>,
    pub trace_hash: u64,
    pub events: u64,
    pub ops: usize,
    pub simulated: Duration,
    pub wall: Duration,
    /// The trace as text, if kept.
    pub trace: Option<String>,
    /// The histories, as JSON lines per workload.
    pub histories: Vec<(String, String)>,
    pub revert: Option<crate::rt::Revert>,
    /// The flags that replay it beside `--seed` ([`SimOptions::flags`]).
    pub flags: String,
}

/// The command-line name of a fix taken back.
pub fn revert_name(r: crate::rt::Revert) -> String {
    use clap::ValueEnum;
    r.to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

impl SimReport {
    pub fn valid(&self) -> bool {
        self.problems.is_empty() && self.undecided.is_empty()
    }

    /// 0 valid, 1 some promise broken, 2 undecided.
    pub fn exit_code(&self) -> i32 {
        if !self.problems.is_empty() {
            1
        } else if !self.undecided.is_empty() {
            2
        } else {
            0
        }
    }

    /// `seed 7: VALID trace 1f0c...` (and each problem on its own line).
    pub fn summary(&self) -> String {
        let verdict = ["VALID", "INVALID", "UNKNOWN"][self.exit_code() as usize];
        let reverted = self
            .revert
            .map(|r| format!(" (reverted: {})", revert_name(r)))
            .unwrap_or_default();
        let mut s = format!(
            "seed {}{reverted}: {verdict} trace {:016x} ({} events, {} ops, {:.1} simulated s, {:.2} wall s)",
            self.seed,
            self.trace_hash,
            self.events,
            self.ops,
            self.simulated.as_secs_f64(),
            self.wall.as_secs_f64()
        );
        for p in self.problems.iter().chain(&self.undecided) {
            s.push_str(&format!("\n  {p}"));
        }
        if !self.valid() {
            s.push_str(&format!(
                "\n  replay: capkv sim --seed {}{}",
                self.seed, self.flags
            ));
        }
        s
    }
}

/// Runs one seed on this thread, in a runtime of its own.
pub fn run(opts: &SimOptions) -> SimReport {
    let wall = std::time::Instant::now();
    // A loop that never waits on a timer would stop simulated time for good: no run may
    // take longer than this in wall time.
    let (finished, watch) = std::sync::mpsc::channel::<()>();
    let seed = opts.seed;
    let flags = opts.flags();
    // Long runs asked for get as long again, at one simulated second per wall second (a
    // release build runs 25 to 70 times faster than that).
    let limit = WALL_LIMIT + opts.faults_for + opts.liveness_within;
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watch.recv_timeout(limit) {
            eprintln!(
                "seed {seed}: no verdict after {limit:?} of wall time (a task that never \
                 waits?); replay: capkv sim --seed {seed}{flags}"
            );
            std::process::exit(3);
        }
    });
    crate::rt::simulate_on_this_thread(Some(opts.seed));
    crate::rt::revert_on_this_thread(opts.revert);
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time().start_paused(true);
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(
        &opts.seed.to_le_bytes(),
    ));
    let runtime = builder.build().expect("building the simulation's runtime");
    let dir = run_dir(opts.seed);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(simulate(opts.clone(), dir.clone()))
    }));
    // Ends every task still running (nodes, messages in flight) before the next seed.
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
    let panics = crate::rt::take_panics();
    crate::rt::simulate_on_this_thread(None);
    crate::rt::revert_on_this_thread(None);
    let mut report = outcome.unwrap_or_else(|_| SimReport::broken(opts));
    report
        .problems
        .extend(panics.into_iter().map(|p| format!("a task panicked: {p}")));
    report.wall = wall.elapsed();
    drop(finished);
    report
}

/// The longest one seed may run in wall time (a debug build runs about 20 times slower
/// than a release one).
const WALL_LIMIT: Duration = Duration::from_secs(600);

impl SimReport {
    /// The report of a run whose harness itself panicked (the panic is added by `run`).
    fn broken(opts: &SimOptions) -> SimReport {
        SimReport {
            seed: opts.seed,
            problems: vec!["the simulation stopped on a panic".into()],
            undecided: Vec::new(),
            trace_hash: 0,
            events: 0,
            ops: 0,
            simulated: Duration::ZERO,
            wall: Duration::ZERO,
            trace: None,
            histories: Vec::new(),
            revert: opts.revert,
            flags: opts.flags(),
        }
    }
}

/// A directory for the snapshot files of one run, unique in this machine: in memory
/// (`/dev/shm`) where there is one, since their fsyncs only cost time here.
fn run_dir(seed: u64) -> PathBuf {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    };
    base.join(format!(
        "capkv-sim-{}-{seed}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn simulate(opts: SimOptions, dir: PathBuf) -> SimReport {
    let start = Instant::now();
    let trace = Arc::new(Trace::new(opts.keep_trace));
    let frame = crate::node::frame_bytes_max(capkv_core::validate::DEFAULT_MAX_VALUE_BYTES);
    let net = Network::new(opts.seed ^ 0x6e65_7477_6f72_6b00, trace.clone(), frame);
    let cluster = Arc::new(Cluster::new(opts.nodes, net, trace.clone(), dir));
    let mut problems = Vec::new();
    let clients = Clients::new(cluster.clone(), opts.keys, &opts.workloads);
    let mut nemesis = Nemesis::new(
        cluster.clone(),
        opts.seed ^ 0x6e65_6d65_7369_7300,
        opts.faults.clone(),
    );

    let setup = async {
        for i in 0..cluster.nodes.len() {
            cluster.start(i).await?;
        }
        clients
            .create_keyspaces(Instant::now() + Duration::from_secs(30))
            .await
    };
    if let Err(e) = setup.await {
        problems.push(format!("setup: {e}"));
    } else {
        let mut running = Vec::new();
        for &kind in &opts.workloads {
            for c in 0..opts.clients {
                let client = u64::from(c) + 1;
                let seed = opts.seed ^ (client << 8) ^ kind.seed_tag() << 4;
                running.push(tokio::spawn(
                    clients.clone().client_loop(kind, client, seed),
                ));
            }
        }
        // Safety phase.
        nemesis.run(Instant::now() + opts.faults_for).await;
        // Liveness phase: no fault from here on.
        nemesis.heal_all().await;
        for n in cluster.nodes.iter().filter(|n| !n.is_up()) {
            problems.push(format!("{} is down after every fault healed", n.name));
        }
        let healed_us = trace.now_us();
        trace.event(format_args!("liveness phase"));
        let deadline = Instant::now() + opts.liveness_within;
        let progressed = |k: Kind| clients.last_ok_write_us(k) > healed_us;
        while !opts.workloads.iter().all(|k| progressed(*k)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for &k in opts.workloads.iter().filter(|k| !progressed(**k)) {
            problems.push(format!(
                "no progress: {} made no write in the {:?} after every fault healed",
                k.name(),
                opts.liveness_within
            ));
        }
        clients.stop.store(true, Ordering::Relaxed);
        for r in running {
            let _ = r.await;
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(20));
        problems.extend(clients.final_reads(left).await);
        // Quiet: no client writes any more, so every proposal has been answered by its
        // deadline (or given up on after its grace); one held for ever holds one of the
        // proposer's few slots for ever (#8 item 2).
        let quiet_by = Instant::now() + Duration::from_secs(10);
        while cluster.nodes.iter().any(|n| n.proposals_in_flight() > 0) && Instant::now() < quiet_by
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for n in cluster.nodes.iter().filter(|n| n.proposals_in_flight() > 0) {
            problems.push(format!(
                "{} still waits for {} proposed batches 10 s after the clients stopped: \
                 proposals nobody answers hold the proposer's slots",
                n.name,
                n.proposals_in_flight()
            ));
        }
        // A live node serves: every node's health says so once every fault healed.
        for i in 0..cluster.nodes.len() {
            let health = cluster
                .request(
                    i,
                    axum::http::Method::GET,
                    "/healthz",
                    None,
                    Duration::from_secs(5),
                )
                .await;
            match health {
                Ok(a) if a.status.is_success() => {}
                Ok(a) => problems.push(format!(
                    "{} is unhealthy after every fault healed: {} {}",
                    cluster.node(i).name,
                    a.status,
                    String::from_utf8_lossy(&a.body)
                )),
                Err(e) => problems.push(format!(
                    "{} does not answer /healthz after every fault healed: {e:?}",
                    cluster.node(i).name
                )),
            }
        }
    }

    let mut histories = Vec::new();
    let mut undecided = Vec::new();
    let mut ops = 0;
    for &kind in &opts.workloads {
        let h = clients.history(kind, opts.seed, &nemesis.events);
        ops += h.ops.len();
        let result = capkv_check::check(
            &h,
            Limits {
                time: Duration::from_secs(60),
                memory_bytes: 512 << 20,
            },
        );
        match result.validity {
            Validity::Valid => {}
            Validity::Invalid => {
                problems.push(format!("{} checker: invalid", kind.name()));
                for a in result.anomalies.iter().take(5) {
                    problems.push(format!("  {} on key {}: {}", a.kind, a.key, a.message));
                }
            }
            // Not decided within the checker's budget (which is wall time): never read
            // as valid, but not a broken promise either.
            Validity::Unknown => {
                for u in result.undecided.iter().take(3) {
                    undecided.push(format!("{} checker: {u}", kind.name()));
                }
            }
        }
        let mut jsonl = Vec::new();
        if h.write_jsonl(&mut jsonl).is_ok() {
            histories.push((
                kind.name().to_owned(),
                String::from_utf8_lossy(&jsonl).into_owned(),
            ));
        }
    }
    problems.extend(cluster.start_failures());
    cluster.remove_files();
    let (trace_hash, events) = trace.digest();
    SimReport {
        seed: opts.seed,
        problems,
        undecided,
        trace_hash,
        events,
        ops,
        simulated: start.elapsed(),
        wall: Duration::ZERO,
        trace: trace.lines(),
        histories,
        revert: opts.revert,
        flags: opts.flags(),
    }
}

/// Runs seeds `first..first + count` on `jobs` threads; `each` sees every report as it
/// comes (in completion order). With `until_failure`, no seed is begun once one failed.
/// Returns the reports in seed order.
pub fn run_many(
    base: &SimOptions,
    first: u64,
    count: u64,
    jobs: usize,
    until_failure: bool,
    each: &(dyn Fn(&SimReport) + Sync),
) -> Vec<SimReport> {
    let next = AtomicU64::new(0); // the index of the next seed, from `first`
    let failed = std::sync::atomic::AtomicBool::new(false);
    let reports = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || (until_failure && failed.load(Ordering::Relaxed)) {
                    break;
                }
                let seed = first + i; // checked by `options`: first + count - 1 fits
                let mut opts = base.clone();
                opts.seed = seed;
                let report = run(&opts);
                if !report.valid() {
                    failed.store(true, Ordering::Relaxed);
                }
                each(&report);
                reports.lock().expect("reports lock poisoned").push(report);
            });
        }
    });
    let mut reports = reports.into_inner().expect("reports lock poisoned");
    reports.sort_by_key(|r| r.seed);
    reports
}

/// `capkv sim`: simulate one seed, or many.
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Simulate this seed (prints its verdict and `trace <hash>`).
    #[arg(long, conflicts_with = "seeds")]
    pub seed: Option<u64>,
    /// Simulate this many seeds, from --first on, on --jobs threads; exit 1 if any fails.
    #[arg(long)]
    pub seeds: Option<u64>,
    /// The first seed of --seeds.
    #[arg(long, default_value_t = 1)]
    pub first: u64,
    /// With --seeds: begin no seed once one has failed (a search for the first failure).
    #[arg(long, requires = "seeds")]
    pub until_failure: bool,
    /// Threads for --seeds (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub jobs: Option<u64>,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=7))]
    pub nodes: u32,
    /// Simulated seconds of the safety phase (faults on).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub faults_secs: u64,
    /// Simulated seconds the liveness phase may take.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub liveness_secs: u64,
    /// Clients per workload.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub clients: u32,
    /// Keys per workload.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub keys: u32,
    /// The workloads to run (comma-separated): register, unique-insert, idempotent,
    /// counter, set, siblings. Default: all of them.
    #[arg(long, value_delimiter = ',')]
    pub workloads: Option<Vec<String>>,
    /// The faults to inject (comma-separated): partition, one-way, lossy, crash,
    /// crash-at-write, restart, pause, skew; or none. Default: all of them.
    #[arg(long, value_delimiter = ',')]
    pub faults: Option<Vec<String>>,
    /// Write the trace of --seed to this file, one event a line.
    #[arg(long, requires = "seed")]
    pub trace: Option<PathBuf>,
    /// For every failing seed, write its report, histories and trace under this directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Take back one fix of issue 8, to see the simulator find the bug it fixed.
    #[arg(long, value_enum)]
    pub revert: Option<crate::rt::Revert>,
}

/// The options `args` ask for (the first seed's, with --seeds).
pub fn options(args: &SimArgs) -> Result<SimOptions, String> {
    if args.seeds == Some(0) {
        return Err("--seeds must be at least 1".into());
    }
    if args
        .first
        .checked_add(args.seeds.unwrap_or(1).saturating_sub(1))
        .is_none()
    {
        return Err("--first plus --seeds is past the last seed (2^64 - 1)".into());
    }
    let mut faults = Vec::new();
    let all = Fault::ALL.map(|f| f.name().to_owned()).to_vec();
    for f in args
        .faults
        .as_ref()
        .unwrap_or(&all)
        .iter()
        .filter(|f| *f != "none")
    {
        // Their order is part of the schedule (the nemesis draws from the list), so it is
        // kept; a repeat is dropped.
        match Fault::parse(f) {
            Some(f) if faults.contains(&f) => {}
            Some(f) => faults.push(f),
            None => {
                return Err(format!(
                    "unknown fault {f:?}; known: {}, none",
                    Fault::ALL.map(Fault::name).join(", ")
                ));
            }
        }
    }
    let mut workloads = Vec::new();
    for w in args.workloads.iter().flatten() {
        match Kind::parse(w) {
            Some(k) if !workloads.contains(&k) => workloads.push(k),
            Some(_) => {}
            None => {
                return Err(format!(
                    "unknown workload {w:?}; known: {}",
                    Kind::ALL.map(Kind::name).join(", ")
                ));
            }
        }
    }
    if args.workloads.is_some() && workloads.is_empty() {
        return Err("--workloads names none".into());
    }
    let mut base = SimOptions::new(args.seed.unwrap_or(args.first));
    if !workloads.is_empty() {
        workloads.sort();
        base.workloads = workloads;
    }
    base.nodes = args.nodes;
    base.faults_for = Duration::from_secs(args.faults_secs);
    base.liveness_within = Duration::from_secs(args.liveness_secs);
    base.clients = args.clients;
    base.keys = args.keys;
    base.faults = faults;
    base.keep_trace = args.trace.is_some();
    base.revert = args.revert;
    Ok(base)
}

/// Runs `capkv sim`; returns the exit code (0: every seed valid, 1: some broke a promise,
/// 2: none did but some could not be decided, 3: bad arguments or files).
pub fn main(args: SimArgs) -> i32 {
    let mut base = match options(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return 3;
        }
    };
    let write_out = |r: &SimReport| {
        if let Some(dir) = &args.out {
            if let Err(e) = write_report(dir, r) {
                eprintln!("error: writing the report of seed {}: {e}", r.seed);
            }
        }
    };
    if args.seed.is_some() {
        base.keep_trace |= args.out.is_some();
        let report = run(&base);
        // Files first: a reader of the summary that goes away (`| head`) must not lose them.
        if !report.valid() {
            write_out(&report);
        }
        if let (Some(file), Some(trace)) = (&args.trace, &report.trace) {
            if let Err(e) = std::fs::write(file, trace) {
                eprintln!("error: writing {}: {e}", file.display());
                return 3;
            }
        }
        println!("{}", report.summary());
        return report.exit_code();
    }
    let count = args.seeds.unwrap_or(1);
    let jobs = args.jobs.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |j| j as usize,
    );
    let wall = std::time::Instant::now();
    let reports = run_many(&base, args.first, count, jobs, args.until_failure, &|r| {
        // Files first: a reader of the summaries that goes away must not lose them.
        if !r.valid() && args.out.is_some() {
            // Run again with the trace kept, for the report (same seed, same run).
            let mut again = base.clone();
            again.seed = r.seed;
            again.keep_trace = true;
            write_out(&run(&again));
        }
        println!("{}", r.summary());
    });
    let failed: Vec<u64> = reports
        .iter()
        .filter(|r| r.exit_code() == 1)
        .map(|r| r.seed)
        .collect();
    let undecided: Vec<u64> = reports
        .iter()
        .filter(|r| r.exit_code() == 2)
        .map(|r| r.seed)
        .collect();
    let simulated: f64 = reports.iter().map(|r| r.simulated.as_secs_f64()).sum();
    let wall = wall.elapsed().as_secs_f64();
    println!(
        "{} seeds, {} failed, {} undecided; {simulated:.0} simulated cluster-seconds in \
         {wall:.1} s on {jobs} threads ({:.0} per wall minute)",
        reports.len(),
        failed.len(),
        undecided.len(),
        simulated / wall * 60.0
    );
    if !failed.is_empty() {
        println!(
            "failing seeds: {failed:?} (replay one: capkv sim --seed S{})",
            base.flags()
        );
    }
    if !failed.is_empty() {
        1
    } else {
        2 * i32::from(!undecided.is_empty())
    }
}

/// Writes a failing seed's report, histories and trace to `dir/seed-S/`.
fn write_report(dir: &std::path::Path, r: &SimReport) -> std::io::Result<()> {
    let d = dir.join(format!("seed-{}", r.seed));
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("report.txt"), r.summary() + "\n")?;
    for (name, jsonl) in &r.histories {
        std::fs::write(d.join(format!("history-{name}.jsonl")), jsonl)?;
    }
    if let Some(t) = &r.trace {
        std::fs::write(d.join("trace.txt"), t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Cmd};
    use crate::rt::Revert;
    use clap::Parser;

    fn parse(line: &str) -> Result<SimOptions, String> {
        let cli = Cli::try_parse_from(line.split_whitespace()).map_err(|e| e.to_string())?;
        match cli.command {
            Cmd::Sim(args) => options(&args),
            _ => unreachable!("a sim command line"),
        }
    }

    #[test]
    fn the_replay_flags_give_back_the_options_of_the_run() {
        assert_eq!(SimOptions::new(7).flags(), "");
        let mut o = SimOptions::new(7);
        o.nodes = 5;
        o.faults_for = Duration::from_secs(3);
        o.liveness_within = Duration::from_secs(9);
        o.clients = 2;
        o.keys = 4;
        o.workloads = vec![Kind::Register, Kind::Siblings];
        o.faults = vec![Fault::Pause, Fault::Partition];
        o.revert = Some(Revert::PurgeDeletesFirst);
        let line = format!("capkv sim --seed 7{}", o.flags());
        assert_eq!(parse(&line), Ok(o.clone()), "{line}");
        o.faults.clear();
        let line = format!("capkv sim --seed 7{}", o.flags());
        assert!(line.contains("--faults none"), "{line}");
        assert_eq!(parse(&line), Ok(o), "{line}");
    }

    #[test]
    fn workloads_are_named_as_capkv_check_names_them() {
        for k in Kind::ALL {
            assert!(capkv_check::WORKLOADS.contains(&k.name()), "{}", k.name());
            assert_eq!(Kind::parse(k.name()), Some(k));
        }
        let o = parse("capkv sim --seed 1 --workloads set,register,set").unwrap();
        assert_eq!(o.workloads, vec![Kind::Register, Kind::Set]);
        // Faults keep their order (it is part of the schedule), without repeats.
        let o = parse("capkv sim --seed 1 --faults crash,partition,crash").unwrap();
        assert_eq!(o.faults, vec![Fault::Crash, Fault::Partition]);
        assert!(parse(&format!("capkv sim --first {} --seeds 1", u64::MAX)).is_ok());
        assert!(parse(&format!("capkv sim --first {} --seeds 2", u64::MAX)).is_err());
        for bad in [
            "--workloads bank",
            "--workloads ,",
            "--faults fire",
            "--seeds 0",
        ] {
            let err = parse(&format!("capkv sim {bad}")).unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
    }
}
