//! The cluster `capkv check` runs against: either its own local `capkv serve` processes,
//! which the nemesis may kill, stop, pause and restart, or a running cluster given by URL,
//! on which only network and clock faults are possible.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capkv_client::Client;
use tokio::process::Child;
use tokio::sync::Mutex;

use crate::dev::{signal, spawn_node};

/// One node as the harness knows it.
pub struct NodeHandle {
    /// `n1`, ...
    pub id: String,
    pub url: String,
}

/// The processes of a local cluster.
struct Local {
    exe: PathBuf,
    cluster: String,
    dir: PathBuf,
    extra: Vec<String>,
    /// One slot per node; None while the node is down.
    children: Vec<Option<Child>>,
}

pub struct Cluster {
    pub nodes: Vec<NodeHandle>,
    local: Option<Mutex<Local>>,
}

/// Ports the OS says are free right now (bound all at once, so distinct).
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot find free ports: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot find free ports: {e}"))
}

impl Cluster {
    /// Starts `size` nodes from this binary with data and logs in `dir`.
    pub async fn start_local(size: u32, dir: &Path, extra: Vec<String>) -> Result<Cluster, String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find the capkv binary: {e}"))?;
        let ports = free_ports(2 * size as usize)?;
        let mut parts = Vec::new();
        let mut nodes = Vec::new();
        for i in 0..size as usize {
            let (http, peer) = (ports[i], ports[size as usize + i]);
            parts.push(format!("n{}=127.0.0.1:{peer}@127.0.0.1:{http}", i + 1));
            nodes.push(NodeHandle {
                id: format!("n{}", i + 1),
                url: format!("http://127.0.0.1:{http}"),
            });
        }
        let cluster = parts.join(",");
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut children = Vec::new();
        for i in 1..=size {
            children.push(Some(spawn_node(
                &exe,
                i,
                &cluster,
                dir,
                &extra,
                libc::SIGKILL,
            )?));
        }
        Ok(Cluster {
            nodes,
            local: Some(Mutex::new(Local {
                exe,
                cluster,
                dir: dir.to_owned(),
                extra,
                children,
            })),
        })
    }

    /// A running cluster: the node ids come from each node's `/v1/cluster`.
    pub async fn remote(urls: &[String]) -> Result<Cluster, String> {
        let probe = Client::new(urls.iter().cloned());
        let mut nodes = Vec::new();
        for url in urls {
            let url = url.trim_end_matches('/').to_owned();
            let info = probe
                .cluster_of(&url)
                .await
                .map_err(|e| format!("cannot reach {url}: {e}"))?;
            nodes.push(NodeHandle { id: info.node, url });
        }
        Ok(Cluster { nodes, local: None })
    }

    /// Checks every node accepts `/v1/faults` (it was started with `--enable-faults`).
    pub async fn check_faults_enabled(&self) -> Result<(), String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("building the HTTP client");
        for n in &self.nodes {
            let resp = http
                .get(format!("{}/v1/faults", n.url))
                .send()
                .await
                .map_err(|e| format!("cannot ask {} for its faults: {e}", n.id))?;
            let enabled = resp.status().is_success()
                && resp
                    .json::<capkv_client::FaultState>()
                    .await
                    .is_ok_and(|f| f.enabled);
            if !enabled {
                return Err(format!(
                    "{} does not accept fault injection: start it with --enable-faults",
                    n.id
                ));
            }
        }
        Ok(())
    }

    /// Whether the harness owns the processes (so it can kill, restart and pause them).
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    fn index(&self, id: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .expect("the nemesis only names nodes of the cluster")
    }

    /// SIGKILL: the node dies at once, losing whatever it had not fsynced.
    pub async fn kill(&self, id: &str) {
        let i = self.index(id);
        if let Some(local) = &self.local {
            let mut l = local.lock().await;
            if let Some(mut c) = l.children[i].take() {
                let _ = c.kill().await;
            }
        }
    }

    /// SIGTERM and wait (up to 10 s, then SIGKILL): a graceful stop.
    pub async fn stop(&self, id: &str) {
        let i = self.index(id);
        if let Some(local) = &self.local {
            let mut l = local.lock().await;
            if let Some(mut c) = l.children[i].take() {
                signal(&c, libc::SIGCONT);
                signal(&c, libc::SIGTERM);
                if tokio::time::timeout(Duration::from_secs(10), c.wait())
                    .await
                    .is_err()
                {
                    let _ = c.kill().await;
                }
            }
        }
    }

    /// Starts a node that is down (no-op if it runs).
    pub async fn start(&self, id: &str) -> Result<(), String> {
        let i = self.index(id);
        if let Some(local) = &self.local {
            let mut l = local.lock().await;
            if l.children[i].is_none() {
                let child = spawn_node(
                    &l.exe,
                    i as u32 + 1,
                    &l.cluster,
                    &l.dir,
                    &l.extra,
                    libc::SIGKILL,
                )?;
                l.children[i] = Some(child);
            }
        }
        Ok(())
    }

    /// SIGSTOP (`pause = true`) or SIGCONT.
    pub async fn pause(&self, id: &str, pause: bool) {
        let i = self.index(id);
        if let Some(local) = &self.local {
            let l = local.lock().await;
            if let Some(c) = &l.children[i] {
                signal(c, if pause { libc::SIGSTOP } else { libc::SIGCONT });
            }
        }
    }

    /// Resumes every paused node and starts every stopped one.
    pub async fn revive_all(&self) -> Result<(), String> {
        let ids: Vec<String> = self.nodes.iter().map(|n| n.id.clone()).collect();
        for id in &ids {
            self.pause(id, false).await;
            self.start(id).await?;
        }
        Ok(())
    }

    /// Stops every local node gracefully.
    pub async fn shutdown(&self) {
        let ids: Vec<String> = self.nodes.iter().map(|n| n.id.clone()).collect();
        for id in &ids {
            self.stop(id).await;
        }
    }

    /// Waits until every node answers `/v1/cluster` and one of them names a leader.
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let probe = Client::new(self.nodes.iter().map(|n| n.url.clone()));
        loop {
            let mut ready = true;
            for n in &self.nodes {
                match probe.cluster_of(&n.url).await {
                    Ok(info) if info.leader.is_some() && info.has_quorum => {}
                    _ => ready = false,
                }
            }
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the cluster did not become ready within {limit:?} (see the node logs)"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
