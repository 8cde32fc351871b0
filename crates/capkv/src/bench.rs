//! `capkv bench`: a load generator that records what the cluster did under it (#9 items 3
//! and 5).
//!
//! Clients write values of a fixed size to keys of one keyspace (random keys out of
//! `--keys`, or, with `--grow-gib`, new keys until that many GiB of values were written,
//! then read every key back). Every `--report-every` seconds it prints and records one sample:
//! throughput, latency percentiles, errors by kind, and per node the leader changes it saw,
//! its resident memory and its disk use (from `/metrics`). `--out DIR` writes the samples
//! as `samples.csv` and plots them as `bench.svg`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capkv_client::{Client, ClientError, WriteOptions};
use capkv_core::{KeyspaceSpec, Mode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchMode {
    Cp,
    Ap,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A node of the cluster (the others are learned from it).
    #[arg(long, default_value = "http://127.0.0.1:7001")]
    pub node: String,
    #[arg(long, value_enum, default_value = "cp")]
    pub mode: BenchMode,
    /// The keyspace to load (created if missing). Default: bench-cp or bench-ap.
    #[arg(long)]
    pub keyspace: Option<String>,
    /// Concurrent clients, spread over the nodes.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds of writing (ignored with --grow-gib).
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    #[arg(long, default_value_t = 1024)]
    pub value_bytes: usize,
    /// Writes go to random keys out of this many.
    #[arg(long, default_value_t = 3_000_000)]
    pub keys: u64,
    /// Write new keys until this many GiB of values were written (acknowledged; with 3
    /// nodes and n = 3 every node holds all of it), then read every key back.
    #[arg(long)]
    pub grow_gib: Option<f64>,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10)]
    pub report_every: u64,
    /// ap write quorum.
    #[arg(long)]
    pub w: Option<u32>,
    /// Write samples.csv and bench.svg here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What the clients did in one interval.
#[derive(Default)]
struct Interval {
    latencies_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
}

/// One node's numbers from its `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
struct NodeSample {
    leader_changes: f64,
    rss_bytes: f64,
    disk_bytes: f64,
    /// CPU time the node's process has used since it started (user + system).
    cpu_seconds: f64,
}

#[derive(Debug, Clone)]
struct Sample {
    at_s: f64,
    phase: &'static str,
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    errors: u64,
    nodes: Vec<NodeSample>,
}

/// The sum of a Prometheus metric's samples (over all label sets) in `/metrics` text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn node_sample(http: &reqwest::Client, url: &str) -> NodeSample {
    let text = match http
        .get(format!("{url}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
    {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    NodeSample {
        leader_changes: metric(&text, "capkv_raft_leader_changes_total"),
        rss_bytes: metric(&text, "capkv_process_resident_bytes"),
        disk_bytes: metric(&text, "capkv_storage_disk_bytes"),
        cpu_seconds: metric(&text, "capkv_process_cpu_seconds"),
    }
}

fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::Api { status, .. } => status.to_string(),
        ClientError::Unreachable { .. } => "unreachable".into(),
        ClientError::Lost { .. } => "lost".into(),
        ClientError::Decode(_) => "decode".into(),
        ClientError::Invalid(_) => "invalid".into(),
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

fn key_name(i: u64) -> Vec<u8> {
    format!("b{i:012}").into_bytes()
}

/// Runs the benchmark; returns an error only if it could not start.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    let first = Client::new([args.node.trim_end_matches('/').to_owned()]);
    let cluster = first.cluster().await.map_err(|e| e.to_string())?;
    let urls: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("http://{}", n.http_addr))
        .collect();
    let (mode, default_ks) = match args.mode {
        BenchMode::Cp => (Mode::Cp, "bench-cp"),
        BenchMode::Ap => (Mode::Ap, "bench-ap"),
    };
    let keyspace = args.keyspace.clone().unwrap_or_else(|| default_ks.into());
    let spec = KeyspaceSpec {
        name: keyspace.clone(),
        mode,
        n: None,
        r: None,
        w: None,
        value_type: None,
    };
    match first.create_keyspace(&spec).await {
        Ok(_) => {}
        Err(e) if matches!(&e, ClientError::Api { status: 409, .. }) => {}
        Err(e) => return Err(format!("creating keyspace {keyspace}: {e}")),
    }
    // Every node must know the keyspace before the clients start.
    for url in &urls {
        let c = Client::new([url.clone()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c
            .list_keyspaces_serializable()
            .await
            .is_ok_and(|l| l.iter().any(|k| k.name == keyspace))
        {
            if Instant::now() > deadline {
                return Err(format!("{url} never learned keyspace {keyspace}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!(
        "capkv bench: {} clients, {:?} keyspace {keyspace}, {} B values, nodes {}",
        args.clients,
        args.mode,
        args.value_bytes,
        urls.join(" ")
    );

    let interval = Arc::new(Mutex::new(Interval::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let next_key = Arc::new(AtomicU64::new(0));
    let reading = Arc::new(AtomicBool::new(false));
    let read_next = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    // Keys whose write got no acknowledgement (grow mode), and how many of them were
    // found without their value when read back (not an error).
    let unacked: Arc<Mutex<std::collections::HashSet<u64>>> = Arc::default();
    let unacked_absent = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for i in 0..args.clients {
        // Client i starts at node i mod N and fails over to the others in turn.
        let mut order = urls.clone();
        order.rotate_left(i % urls.len().max(1));
        let client = Client::new(order);
        let (interval, stop, next_key, reading, read_next, written) = (
            interval.clone(),
            stop.clone(),
            next_key.clone(),
            reading.clone(),
            read_next.clone(),
            written.clone(),
        );
        let (unacked, unacked_absent) = (unacked.clone(), unacked_absent.clone());
        let (keyspace, args) = (keyspace.clone(), args.clone());
        clients.push(tokio::spawn(async move {
            // Incompressible values (the store compresses): slices of random bytes.
            let pool: Vec<u8> = (0..args.value_bytes + 4096)
                .map(|_| rand::random::<u8>())
                .collect();
            let opts = WriteOptions::default();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = if reading.load(Ordering::Relaxed) {
                    let i = read_next.fetch_add(1, Ordering::Relaxed);
                    if i >= written.load(Ordering::Relaxed) {
                        break;
                    }
                    match args.mode {
                        BenchMode::Cp => client
                            .get(&keyspace, &key_name(i), capkv_client::Consistency::Linearizable)
                            .await
                            .map(|v| v.is_some_and(|v| v.value.len() == args.value_bytes)),
                        BenchMode::Ap => client
                            .ap_get(&keyspace, &key_name(i), None)
                            .await
                            .map(|v| matches!(v, capkv_client::ApValue::Value { value, .. } if value.len() == args.value_bytes)),
                    }
                    // A key whose write was not acknowledged may hold its value or nothing:
                    // only an acknowledged write read back wrong is an error.
                    .map(|right| {
                        let excused = !right
                            && unacked
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .contains(&i);
                        if excused {
                            unacked_absent.fetch_add(1, Ordering::Relaxed);
                        }
                        right || excused
                    })
                } else {
                    let i = match args.grow_gib {
                        Some(_) => next_key.fetch_add(1, Ordering::Relaxed),
                        None => rand::random::<u64>() % args.keys.max(1),
                    };
                    let at = rand::random::<usize>() % 4096;
                    let value = pool[at..at + args.value_bytes].to_vec();
                    let r = match args.mode {
                        BenchMode::Cp => client
                            .put(&keyspace, &key_name(i), value, &opts)
                            .await
                            .map(|_| true),
                        BenchMode::Ap => client
                            .ap_put(&keyspace, &key_name(i), value, None, args.w)
                            .await
                            .map(|_| true),
                    };
                    if args.grow_gib.is_some() {
                        written.fetch_max(i + 1, Ordering::Relaxed);
                        if r.is_err() {
                            unacked
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(i);
                        }
                    }
                    r
                };
                let us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
                let mut iv = interval.lock().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok(true) => iv.latencies_us.push(us),
                    Ok(false) => *iv.errors.entry("wrong-value".into()).or_default() += 1,
                    Err(e) => *iv.errors.entry(error_kind(&e)).or_default() += 1,
                }
            }
        }));
    }

    let http = reqwest::Client::new();
    let start = Instant::now();
    let base: Vec<NodeSample> = sample_nodes(&http, &urls).await;
    let own_cpu_at_start = crate::process::cpu_seconds().unwrap_or(0.0);
    let mut samples: Vec<Sample> = Vec::new();
    let mut all_latencies: Vec<u32> = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut last = Instant::now();
    let grow_bytes = args.grow_gib.map(|g| g * (1u64 << 30) as f64);
    println!(
        "{:>6} {:>5} {:>9} {:>8} {:>8} {:>9} {:>7} {:>7}  per node: rss MiB / disk MiB / leader changes",
        "t s", "phase", "ops/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
    );
    loop {
        tokio::time::sleep(Duration::from_secs(args.report_every.max(1))).await;
        let phase = if reading.load(Ordering::Relaxed) {
            "read"
        } else {
            "write"
        };
        let taken = std::mem::take(&mut *interval.lock().unwrap_or_else(|p| p.into_inner()));
        let dt = last.elapsed().as_secs_f64();
        last = Instant::now();
        let mut lat = taken.latencies_us;
        lat.sort_unstable();
        let nodes = sample_nodes(&http, &urls).await;
        let n_errors: u64 = taken.errors.values().sum();
        for (k, v) in taken.errors {
            *errors.entry(k).or_default() += v;
        }
        let s = Sample {
            at_s: start.elapsed().as_secs_f64(),
            phase,
            ops_per_s: lat.len() as f64 / dt,
            p50_ms: percentile(&lat, 0.50),
            p99_ms: percentile(&lat, 0.99),
            p999_ms: percentile(&lat, 0.999),
            max_ms: lat.last().map_or(0.0, |m| f64::from(*m) / 1000.0),
            errors: n_errors,
            nodes: nodes
                .iter()
                .zip(&base)
                .map(|(n, b)| NodeSample {
                    leader_changes: n.leader_changes - b.leader_changes,
                    ..*n
                })
                .collect(),
        };
        let mut line = format!(
            "{:>6.0} {:>5} {:>9.0} {:>8.2} {:>8.2} {:>9.2} {:>7.0} {:>7} ",
            s.at_s, s.phase, s.ops_per_s, s.p50_ms, s.p99_ms, s.p999_ms, s.max_ms, s.errors
        );
        for n in &s.nodes {
            let _ = write!(
                line,
                " {:.0}/{:.0}/{:.0}",
                n.rss_bytes / 1048576.0,
                n.disk_bytes / 1048576.0,
                n.leader_changes
            );
        }
        println!("{line}");
        all_latencies.extend_from_slice(&lat);
        samples.push(s);
        let finished = clients.iter().all(|c| c.is_finished());
        match grow_bytes {
            None if start.elapsed() >= Duration::from_secs(args.duration) => break,
            Some(target)
                if !reading.load(Ordering::Relaxed)
                    && (written.load(Ordering::Relaxed) * args.value_bytes as u64) as f64
                        >= target =>
            {
                println!(
                    "{:.1} GiB of values written: reading {} keys back",
                    target / (1u64 << 30) as f64,
                    written.load(Ordering::Relaxed)
                );
                reading.store(true, Ordering::Relaxed);
            }
            Some(_) if finished => break,
            _ => {}
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    all_latencies.sort_unstable();
    let total_errors: u64 = errors.values().sum();
    let leader_changes = samples.last().map_or(0.0, |s| {
        s.nodes.iter().map(|n| n.leader_changes).fold(0.0, f64::max)
    });
    // CPU per operation: the nodes' (all of them, from their gauges) and this process's.
    let ops = all_latencies.len().max(1) as f64;
    let nodes_cpu: f64 = samples.last().map_or(0.0, |s| {
        s.nodes
            .iter()
            .zip(&base)
            .map(|(n, b)| n.cpu_seconds - b.cpu_seconds)
            .sum()
    });
    let own_cpu = crate::process::cpu_seconds().unwrap_or(0.0) - own_cpu_at_start;
    if args.grow_gib.is_some() {
        println!(
            "writes not acknowledged: {}, of which read back without their value: {} (not \
             errors: such a write may or may not have taken effect)",
            unacked.lock().unwrap_or_else(|p| p.into_inner()).len(),
            unacked_absent.load(Ordering::Relaxed)
        );
    }
    println!(
        "cpu per op: nodes {:.1} us, load generator {:.1} us",
        nodes_cpu / ops * 1e6,
        own_cpu / ops * 1e6
    );
    println!(
        "total: {} ops in {:.0} s, p99 {:.2} ms, p99.9 {:.2} ms, max {:.0} ms, errors {} {:?}, leader changes seen by a node (most) {:.0}",
        all_latencies.len(),
        start.elapsed().as_secs_f64(),
        percentile(&all_latencies, 0.99),
        percentile(&all_latencies, 0.999),
        all_latencies.last().map_or(0.0, |m| f64::from(*m) / 1000.0),
        total_errors,
        errors,
        leader_changes
    );
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("samples.csv"), csv(&samples)).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("bench.svg"), svg(&samples, &args)).map_err(|e| e.to_string())?;
        println!("wrote {}/samples.csv and bench.svg", dir.display());
    }
    Ok(())
}

/// Every node's sample, one node after the other.
async fn sample_nodes(http: &reqwest::Client, urls: &[String]) -> Vec<NodeSample> {
    let mut out = Vec::with_capacity(urls.len());
    for url in urls {
        out.push(node_sample(http, url).await);
    }
    out
}

fn csv(samples: &[Sample]) -> String {
    let nodes = samples.first().map_or(0, |s| s.nodes.len());
    let mut out = String::from("t_s,phase,ops_per_s,p50_ms,p99_ms,p999_ms,max_ms,errors");
    for i in 1..=nodes {
        let _ = write!(
            out,
            ",n{i}_rss_bytes,n{i}_disk_bytes,n{i}_leader_changes,n{i}_cpu_s"
        );
    }
    out.push('\n');
    for s in samples {
        let _ = write!(
            out,
            "{:.1},{},{:.1},{:.3},{:.3},{:.3},{:.1},{}",
            s.at_s, s.phase, s.ops_per_s, s.p50_ms, s.p99_ms, s.p999_ms, s.max_ms, s.errors
        );
        for n in &s.nodes {
            let _ = write!(
                out,
                ",{:.0},{:.0},{:.0},{:.2}",
                n.rss_bytes, n.disk_bytes, n.leader_changes, n.cpu_seconds
            );
        }
        out.push('\n');
    }
    out
}

/// A named line of a chart.
type Series = (String, Vec<f64>);

/// Three stacked line charts: throughput, p99 latency, and per node RSS and disk.
fn svg(samples: &[Sample], args: &BenchArgs) -> String {
    let x: Vec<f64> = samples.iter().map(|s| s.at_s).collect();
    let nodes = samples.first().map_or(0, |s| s.nodes.len());
    let mut charts: Vec<(String, Vec<Series>)> = vec![
        (
            "ops/s".into(),
            vec![(
                "ops/s".into(),
                samples.iter().map(|s| s.ops_per_s).collect(),
            )],
        ),
        (
            "latency ms".into(),
            vec![
                ("p99".into(), samples.iter().map(|s| s.p99_ms).collect()),
                ("p99.9".into(), samples.iter().map(|s| s.p999_ms).collect()),
            ],
        ),
    ];
    let mut mem = Vec::new();
    for i in 0..nodes {
        mem.push((
            format!("n{} rss", i + 1),
            samples
                .iter()
                .map(|s| s.nodes[i].rss_bytes / 1048576.0)
                .collect(),
        ));
        mem.push((
            format!("n{} disk", i + 1),
            samples
                .iter()
                .map(|s| s.nodes[i].disk_bytes / 1048576.0)
                .collect(),
        ));
    }
    charts.push(("MiB".into(), mem));
    let (w, h, pad) = (900.0, 220.0, 50.0);
    let colors = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    ];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n<text x=\"{pad}\" y=\"16\">capkv bench: {} clients, {:?}, {} B values</text>\n",
        charts.len() as f64 * (h + 30.0) + 30.0,
        args.clients,
        args.mode,
        args.value_bytes
    );
    let x_max = x.last().copied().unwrap_or(1.0).max(1.0);
    for (c, (title, series)) in charts.iter().enumerate() {
        let top = 30.0 + c as f64 * (h + 30.0);
        let y_max = series
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .fold(0.0, f64::max)
            .max(1e-9);
        let _ = writeln!(
            out,
            "<rect x=\"{pad}\" y=\"{top}\" width=\"{}\" height=\"{h}\" fill=\"none\" stroke=\"#999\"/>\n<text x=\"4\" y=\"{}\">{y_max:.0}</text>\n<text x=\"4\" y=\"{}\">0</text>\n<text x=\"{}\" y=\"{}\">{title} (x: seconds, to {x_max:.0})</text>",
            w - 2.0 * pad,
            top + 10.0,
            top + h,
            pad + 4.0,
            top + 12.0
        );
        for (j, (name, v)) in series.iter().enumerate() {
            let color = colors[j % colors.len()];
            let points: Vec<String> = x
                .iter()
                .zip(v)
                .map(|(xv, yv)| {
                    format!(
                        "{:.1},{:.1}",
                        pad + xv / x_max * (w - 2.0 * pad),
                        top + h - yv / y_max * h
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>",
                points.join(" "),
                w - pad + 4.0,
                top + 12.0 + 13.0 * j as f64
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_rank() {
        let v: Vec<u32> = (1..=1000).map(|i| i * 1000).collect();
        assert_eq!(percentile(&v, 0.5), 500.0);
        assert_eq!(percentile(&v, 0.99), 990.0);
        assert_eq!(percentile(&v, 0.999), 999.0);
        assert_eq!(percentile(&[], 0.99), 0.0);
    }

    #[test]
    fn metrics_are_summed_over_labels() {
        let text = "capkv_raft_leader_changes_total 3\ncapkv_storage_disk_bytes{a=\"x\"} 5\ncapkv_storage_disk_bytes{a=\"y\"} 7\ncapkv_storage_disk_bytes_other 100\n";
        assert_eq!(metric(text, "capkv_raft_leader_changes_total"), 3.0);
        assert_eq!(metric(text, "capkv_storage_disk_bytes"), 12.0);
    }
}
