//! Starts real `capkv serve` processes for tests and always cleans them up.

#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capkv_client::{Client, ClientError, ErrorCode, KeyspaceSpec, Mode};

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub http: Vec<String>,
    pub peer: Vec<String>,
    children: Vec<Option<Child>>,
    extra: Vec<String>,
    /// `--auth` given: nodes run with the root token of the certificate directory, and
    /// this harness's clients use it.
    auth: bool,
    /// `--https` given: nodes serve HTTPS with their node certificates.
    https: bool,
    /// `--https-client-certs` given: also require client certificates signed by the CA.
    client_certs: bool,
}

/// Ports the OS says are free right now. Bound all at once so they are distinct.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Polls `cond` until it is true; panics with `what` after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `f` until it returns `Some`; panics with `what` after `limit`.
pub async fn eventually_some<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A metric's value in Prometheus text (summed over label sets), 0 if absent.
#[allow(unused_imports)] // not every test binary reads metrics
pub use capkv::bench::metric;

impl Cluster {
    /// Starts `n` nodes (n1..), waits until they serve, and creates the cp keyspace `cp`.
    pub async fn start(n: usize, extra: &[&str]) -> Cluster {
        Cluster::start_with(n, extra, true).await
    }

    pub async fn start_with(n: usize, extra: &[&str], faults: bool) -> Cluster {
        Cluster::start_only(n, &(0..n).collect::<Vec<_>>(), extra, faults).await
    }

    /// A cluster of `n` nodes of which only `up` (indexes) are started; the first of
    /// them creates keyspace cp once a leader is elected.
    pub async fn start_only(n: usize, up: &[usize], extra: &[&str], faults: bool) -> Cluster {
        let ports = free_ports(2 * n);
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if faults {
            extra.push("--enable-faults".into());
        }
        let auth = extra.iter().any(|a| a == "--auth");
        let client_certs = extra.iter().any(|a| a == "--https-client-certs");
        let https = client_certs || extra.iter().any(|a| a == "--https");
        extra.retain(|a| a != "--auth" && a != "--https" && a != "--https-client-certs");
        let mut c = Cluster {
            auth,
            https,
            client_certs,
            dir: tempfile::tempdir().unwrap(),
            http: ports[..n]
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect(),
            peer: ports[n..]
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect(),
            children: (0..n).map(|_| None).collect(),
            extra,
        };
        for &i in up {
            c.spawn(i);
        }
        c.wait_healthy().await;
        let spec = KeyspaceSpec::new("cp", Mode::Cp);
        let client = c.client(up[0]);
        eventually(
            Duration::from_secs(20),
            "the cluster elects a leader and creates keyspace cp",
            || async {
                match client.create_keyspace(&spec).await {
                    Ok(_) => true,
                    Err(ClientError::Api { error, .. }) => error.code == ErrorCode::Conflict,
                    Err(_) => false,
                }
            },
        )
        .await;
        c
    }

    /// How many nodes the cluster has (running or not).
    pub fn size(&self) -> usize {
        self.http.len()
    }

    /// Replaces the extra `serve` flags used by later starts.
    pub fn set_flags(&mut self, extra: &[&str], faults: bool) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        if faults {
            self.extra.push("--enable-faults".into());
        }
    }

    pub fn cluster_spec(&self) -> String {
        (0..self.http.len())
            .map(|i| format!("n{}={}@{}", i + 1, self.peer[i], self.http[i]))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The cluster's CA and node certificates (made as nodes are first started).
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{}", i + 1))
    }

    /// Starts node i (index from 0, named n{i+1}).
    pub fn spawn(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "n{} is already running", i + 1);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("n{}.log", i + 1)))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capkv"));
        cmd.arg("serve")
            .args(["--id", &format!("n{}", i + 1)])
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--cluster", &self.cluster_spec()])
            .args(&self.extra);
        // Node certificates also name 127.0.0.1, so that they can serve HTTPS.
        let hosts = ["localhost".to_string(), "127.0.0.1".to_string()];
        capkv::net::tls::init_certs(&self.certs_dir(), &[format!("n{}", i + 1)], &hosts).unwrap();
        if !self.extra.iter().any(|a| a == "--insecure-peers") {
            cmd.arg("--certs").arg(self.certs_dir());
        }
        if self.auth {
            cmd.arg("--root-token-file")
                .arg(self.certs_dir().join("root.token"));
        }
        if self.https {
            let name = format!("n{}", i + 1);
            cmd.arg("--tls-cert")
                .arg(capkv::net::tls::cert_path(&self.certs_dir(), &name))
                .arg("--tls-key")
                .arg(capkv::net::tls::key_path(&self.certs_dir(), &name));
            if self.client_certs {
                cmd.arg("--tls-client-ca")
                    .arg(capkv::net::tls::ca_path(&self.certs_dir()));
            }
        }
        let child = cmd
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting capkv serve");
        self.children[i] = Some(child);
    }

    /// The process id of node i (running).
    pub fn pid(&self, i: usize) -> u32 {
        self.children[i].as_ref().expect("node is running").id()
    }

    /// `kill -9` node i and reap it.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops node i gracefully (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("n{} did not stop within 20 s of SIGTERM", i + 1);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn wipe(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "wipe a stopped node only");
        let _ = std::fs::remove_dir_all(self.data_dir(i));
    }

    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_healthy().await;
    }

    pub fn url(&self, i: usize) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.http[i])
    }

    /// The root token (`--auth` clusters).
    pub fn root_token(&self) -> Option<String> {
        self.auth.then(|| {
            std::fs::read_to_string(self.certs_dir().join("root.token"))
                .unwrap()
                .trim()
                .to_string()
        })
    }

    /// What a client of this cluster needs: the root token, the CA.
    pub fn security(&self) -> capkv_client::Security {
        capkv_client::Security {
            token: self.root_token(),
            ca_pem: self
                .https
                .then(|| std::fs::read(capkv::net::tls::ca_path(&self.certs_dir())).unwrap()),
            // Node certificates are client certificates too.
            identity_pem: self.client_certs.then(|| {
                let dir = self.certs_dir();
                [
                    std::fs::read(capkv::net::tls::cert_path(&dir, "n1")).unwrap(),
                    std::fs::read(capkv::net::tls::key_path(&dir, "n1")).unwrap(),
                ]
                .concat()
            }),
        }
    }

    /// A plain HTTP client that trusts this cluster's CA (no token).
    pub fn http_client(&self) -> reqwest::Client {
        let mut b = reqwest::Client::builder();
        if self.https {
            let ca = std::fs::read(capkv::net::tls::ca_path(&self.certs_dir())).unwrap();
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
        }
        if let Some(pem) = self.security().identity_pem {
            b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        b.build().unwrap()
    }

    /// A client that talks to node i only (no fail-over), so tests know who served.
    pub fn client(&self, i: usize) -> Client {
        Client::new([self.url(i)])
            .with_security(self.security())
            .unwrap()
    }

    pub async fn wait_healthy(&self) {
        for i in 0..self.http.len() {
            if self.children[i].is_none() {
                continue;
            }
            let url = format!("{}/healthz", self.url(i));
            let http = self.http_client();
            eventually(
                Duration::from_secs(20),
                &format!("n{} serves /healthz", i + 1),
                || async {
                    http.get(&url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                },
            )
            .await;
        }
    }

    /// The index of the current leader, as the running nodes agree on it.
    pub async fn leader(&self) -> usize {
        eventually_some(Duration::from_secs(15), "a leader is known", || async {
            for i in 0..self.http.len() {
                if self.children[i].is_none() {
                    continue;
                }
                if let Ok(info) = self.client(i).cluster_of(&self.url(i)).await {
                    if info.role == "leader" {
                        return Some(i);
                    }
                }
            }
            None
        })
        .await
    }

    /// Isolates groups of nodes (indexes) from each other, on every node.
    pub async fn partition(&self, groups: &[&[usize]]) {
        for (g, members) in groups.iter().enumerate() {
            let others: Vec<String> = groups
                .iter()
                .enumerate()
                .filter(|(o, _)| *o != g)
                .flat_map(|(_, m)| m.iter().map(|i| format!("n{}", i + 1)))
                .collect();
            for &i in *members {
                self.client(i)
                    .set_faults(&self.url(i), others.clone())
                    .await
                    .unwrap();
            }
        }
    }

    /// Waits until node i reports that it cannot reach a majority.
    pub async fn wait_cut_off(&self, i: usize) {
        let client = self.client(i);
        let url = self.url(i);
        eventually(
            Duration::from_secs(10),
            &format!("n{} notices it is cut off", i + 1),
            || async { client.cluster_of(&url).await.is_ok_and(|c| !c.has_quorum) },
        )
        .await;
    }

    pub async fn heal(&self) {
        for i in 0..self.http.len() {
            if self.children[i].is_some() {
                self.client(i)
                    .set_faults(&self.url(i), Vec::new())
                    .await
                    .unwrap();
            }
        }
    }

    pub async fn metrics(&self, i: usize) -> String {
        self.http_client()
            .get(format!("{}/metrics", self.url(i)))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill9(i);
        }
        // CAPKV_TEST_LOGS=DIR keeps every node's log after the test, for debugging.
        if let Ok(keep) = std::env::var("CAPKV_TEST_LOGS") {
            let dest = std::path::Path::new(&keep).join(format!("{}", std::process::id()));
            let _ = std::fs::create_dir_all(&dest);
            for i in 0..self.children.len() {
                let name = format!("n{}.log", i + 1);
                let _ = std::fs::copy(self.dir.path().join(&name), dest.join(&name));
            }
        }
        // A node that panicked is a bug whatever the test checked: fail it.
        if !std::thread::panicking() {
            for i in 0..self.children.len() {
                let log = std::fs::read_to_string(self.dir.path().join(format!("n{}.log", i + 1)))
                    .unwrap_or_default();
                if let Some(at) = log.find("panicked at") {
                    panic!(
                        "n{} panicked:\n{}",
                        i + 1,
                        &log[at..(at + 600).min(log.len())]
                    );
                }
            }
        }
        if std::thread::panicking() {
            // Keep the node logs of a failed test visible.
            for i in 0..self.children.len() {
                let path = self.dir.path().join(format!("n{}.log", i + 1));
                if let Ok(log) = std::fs::read_to_string(&path) {
                    let lines: Vec<&str> = log.lines().collect();
                    for (at, line) in lines.iter().enumerate() {
                        if line.contains("panicked at") {
                            eprintln!("--- n{} panicked ---", i + 1);
                            for l in &lines[at..(at + 6).min(lines.len())] {
                                eprintln!("{l}");
                            }
                        }
                    }
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    eprintln!("--- last lines of n{} log ---", i + 1);
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}
