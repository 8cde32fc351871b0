//! `capkv dev`: a local cluster of `capkv serve` child processes in one command.
//!
//! Node `n{i}` serves HTTP on `127.0.0.1:{base+i}` and peers on `127.0.0.1:{base+100+i}`,
//! keeps its data in `{data-dir}/n{i}` and its log in `{data-dir}/n{i}.log`. Peers use
//! mutual TLS with certificates made in `{data-dir}/certs` on first start. Faults are
//! enabled. The same data dir again resumes the same cluster. Ctrl-C (or SIGTERM) stops
//! every child with SIGTERM and waits for it; children also die with this process
//! (Linux parent-death signal), so a killed `dev` leaves no orphans holding ports.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use capkv_client::{Client, ClientError, ErrorCode, KeyspaceSpec, Mode};
use tokio::process::{Child, Command};

pub struct DevOptions {
    pub nodes: u32,
    pub base_port: u16,
    pub data_dir: PathBuf,
}

fn cluster_spec(nodes: u32, base: u16) -> Result<String, String> {
    let mut parts = Vec::new();
    for i in 1..=nodes {
        let http = base.checked_add(i as u16).ok_or("base port too high")?;
        let peer = base
            .checked_add(100 + i as u16)
            .ok_or("base port too high")?;
        parts.push(format!("n{i}=127.0.0.1:{peer}@127.0.0.1:{http}"));
    }
    Ok(parts.join(","))
}

/// Starts `capkv serve` for node `n{i}` with faults enabled, its data in `{data_dir}/n{i}`
/// and its output appended to `{data_dir}/n{i}.log`; `extra` are more `serve` flags. The
/// child gets `death_signal` if this process dies (SIGKILL reaches a stopped child too).
pub(crate) fn spawn_node(
    exe: &Path,
    i: u32,
    cluster: &str,
    data_dir: &Path,
    extra: &[String],
    death_signal: libc::c_int,
) -> Result<Child, String> {
    let log_path = data_dir.join(format!("n{i}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg("--id")
        .arg(format!("n{i}"))
        .arg("--data-dir")
        .arg(data_dir.join(format!("n{i}")))
        .arg("--cluster")
        .arg(cluster)
        .arg("--enable-faults")
        .args(extra);
    if !extra.iter().any(|a| a == "--insecure-peers") {
        // The secure path is the default path: the cluster's CA lives beside its data,
        // made on first start and reused after.
        let certs = data_dir.join("certs");
        crate::net::tls::init_certs(&certs, &[format!("n{i}")], &[])?;
        cmd.arg("--certs").arg(certs);
    }
    cmd.stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .kill_on_drop(true);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it only
    // asks the kernel to send `death_signal` to the child when its parent dies.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("cannot start node n{i}: {e}"))
}

async fn create_keyspaces(client: &Client) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, mode) in [("cp", Mode::Cp), ("ap", Mode::Ap)] {
        let spec = KeyspaceSpec::new(name, mode);
        loop {
            match client.create_keyspace(&spec).await {
                Ok(_) => {
                    println!("created keyspace '{name}' ({mode:?})");
                    break;
                }
                Err(ClientError::Api { error, .. }) if error.code == ErrorCode::Conflict => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "cluster not ready yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(format!("cannot create keyspace '{name}': {e}")),
            }
        }
    }
    Ok(())
}

/// Sends `signal` to a child process (if it has not been reaped).
pub(crate) fn signal(child: &Child, signal: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: sending a signal to our own child process by pid.
        unsafe {
            libc::kill(pid as libc::pid_t, signal);
        }
    }
}

fn terminate(child: &Child) {
    signal(child, libc::SIGTERM);
}

pub async fn run(opts: DevOptions) -> Result<(), String> {
    if opts.nodes == 0 || opts.nodes > 99 {
        return Err("--nodes must be between 1 and 99".into());
    }
    let cluster = cluster_spec(opts.nodes, opts.base_port)?;
    std::fs::create_dir_all(&opts.data_dir)
        .map_err(|e| format!("cannot create {}: {e}", opts.data_dir.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the capkv binary: {e}"))?;
    let mut children = Vec::new();
    for i in 1..=opts.nodes {
        children.push(spawn_node(
            &exe,
            i,
            &cluster,
            &opts.data_dir,
            &[],
            libc::SIGTERM,
        )?);
    }
    let urls: Vec<String> = (1..=opts.nodes)
        .map(|i| format!("http://127.0.0.1:{}", opts.base_port + i as u16))
        .collect();
    let client = Client::new(urls.clone());
    let setup = create_keyspaces(&client).await;

    println!();
    println!(
        "capkv dev cluster: {} nodes, data in {}",
        opts.nodes,
        opts.data_dir.display()
    );
    for (i, url) in urls.iter().enumerate() {
        println!(
            "  n{}  http {url}  peer 127.0.0.1:{}  log {}",
            i + 1,
            opts.base_port + 101 + i as u16,
            opts.data_dir.join(format!("n{}.log", i + 1)).display()
        );
    }
    let n1 = &urls[0];
    println!();
    println!("try:");
    println!("  capkv put cp greeting hello --node {n1}");
    println!("  curl -s {}/v1/kv/cp/greeting", urls.last().unwrap_or(n1));
    println!("  capkv status --node {n1}");
    if opts.nodes >= 3 {
        println!("  capkv fault partition n1 n2,n3 --node {n1}   # n1 now answers 503 for cp");
        println!("  capkv fault heal --node {n1}");
    }
    println!();
    println!("Ctrl-C stops every node.");
    if let Err(e) = setup {
        eprintln!("warning: {e}");
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    println!("stopping {} nodes...", children.len());
    for c in &children {
        terminate(c);
    }
    for (i, c) in children.iter_mut().enumerate() {
        match tokio::time::timeout(Duration::from_secs(10), c.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("n{} did not stop in 10 s; killing it", i + 1);
                let _ = c.kill().await;
            }
        }
    }
    println!("stopped.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_follow_the_contract() {
        assert_eq!(
            cluster_spec(2, 7000).unwrap(),
            "n1=127.0.0.1:7101@127.0.0.1:7001,n2=127.0.0.1:7102@127.0.0.1:7002"
        );
        assert!(cluster_spec(3, 65500).is_err());
    }
}
