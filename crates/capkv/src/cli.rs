//! The command line: `serve` and `dev` run nodes; every other command is a thin
//! front end over `capkv-client`.

use std::path::PathBuf;

use capkv_client::{
    ApValue, Client, ClientError, ClusterInfo, Consistency, FaultRequest, FaultState, KeyspaceSpec,
    Mode, ValueType, WriteOptions,
};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{
    parse_cluster, ConfigError, ConfigFile, HttpTls, InitialClusterState, NodeConfig, PeerSecurity,
};

#[derive(Parser)]
#[command(
    name = "capkv",
    version,
    about = "A distributed key-value store in which every keyspace picks its side of CAP"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Args, Clone)]
pub struct NodeArg {
    /// Node URL(s) to talk to, comma-separated; the client learns the others from the
    /// cluster (https:// for nodes serving TLS).
    #[arg(long, env = "CAPKV_NODE", default_value = "http://127.0.0.1:7001")]
    pub node: String,
    /// Bearer token, for nodes with authentication on.
    #[arg(long, env = "CAPKV_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to trust for https:// nodes, e.g. the cluster's ca.pem.
    #[arg(long, env = "CAPKV_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM), for nodes that require one (serve --tls-client-ca)...
    #[arg(long, env = "CAPKV_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// ...and its private key (PEM).
    #[arg(long, env = "CAPKV_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

impl NodeArg {
    fn client(&self) -> Result<Client, String> {
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let ca_pem = self.cacert.as_ref().map(read).transpose()?;
        let identity_pem = match (&self.client_cert, &self.client_key) {
            (Some(c), Some(k)) => Some([read(c)?, read(k)?].concat()),
            _ => None,
        };
        Client::new(
            self.node
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        )
        .with_security(capkv_client::Security {
            token: self.token.clone(),
            ca_pem,
            identity_pem,
        })
        .map_err(fail)
    }
}

/// The base URL of a node the cluster describes, in the scheme the client uses.
fn node_base(client: &Client, http_addr: &str) -> String {
    let tls = client
        .endpoints()
        .first()
        .is_some_and(|e| e.starts_with("https://"));
    format!("{}://{http_addr}", if tls { "https" } else { "http" })
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run one node.
    Serve(ServeArgs),
    /// Run a local cluster of N nodes in the foreground (Ctrl-C stops it).
    Dev {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 7000)]
        base_port: u16,
        #[arg(long, default_value = "./capkv-data")]
        data_dir: PathBuf,
    },
    /// Write a value.
    Put {
        keyspace: String,
        key: String,
        value: String,
        /// Only if the key's version is V (0: only if absent).
        #[arg(long)]
        if_version: Option<u64>,
        /// Only if the key's current value is X.
        #[arg(long)]
        if_value: Option<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Read a value.
    Get {
        keyspace: String,
        key: String,
        /// Read this node's replica without asking the leader (may be stale).
        #[arg(long)]
        serializable: bool,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Delete a key.
    Del {
        keyspace: String,
        key: String,
        #[arg(long)]
        if_version: Option<u64>,
        #[command(flatten)]
        node: NodeArg,
    },
    /// List keys in key order.
    Scan {
        keyspace: String,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Create or list keyspaces.
    Keyspace {
        #[command(subcommand)]
        cmd: KeyspaceCmd,
    },
    /// Show every node: role, term, applied index, reachable peers.
    Status {
        #[command(flatten)]
        node: NodeArg,
    },
    /// Run a seed scenario (atm, inventory, cart) against a running cluster, with partitions.
    Demo {
        #[arg(value_enum)]
        scenario: crate::demo::Scenario,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Verify a cluster the way Jepsen does: concurrent clients, a nemesis, a recorded
    /// history and a checker. Exit 0 valid, 1 invalid, 2 unknown, 3 the harness failed.
    Check(CheckArgs),
    /// Simulate a whole cluster in one process on a seeded network and clock: real nodes,
    /// a nemesis, the checkers; the same seed replays the same run. Exit 0 valid, 1 not.
    Sim(crate::sim::SimArgs),
    /// Load a cluster and record what it does: throughput, latency percentiles, errors,
    /// leader changes, memory and disk per node (`--grow-gib`: write until every node
    /// holds that much, then read it all back).
    Bench(crate::bench::BenchArgs),
    /// Check a recorded history (capkv's JSON lines or a Jepsen register log); exit codes
    /// as for `check`.
    CheckHistory {
        #[arg(long, value_enum, default_value = "capkv")]
        format: crate::check::HistoryFormat,
        file: PathBuf,
        /// Write report.html in this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seconds the checker may spend before it answers unknown.
        #[arg(long, default_value_t = 120)]
        check_time: u64,
    },
    /// Inject faults: partitions, one-way partitions, clock skew (nodes must run with
    /// --enable-faults).
    Fault {
        #[command(subcommand)]
        cmd: FaultCmd,
    },
    /// Make certificates for a cluster.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Manage users and their tokens (nodes started with --root-token-file).
    User {
        #[command(subcommand)]
        cmd: UserCmd,
    },
}

#[derive(Subcommand)]
pub enum UserCmd {
    /// Create a user (or replace it, with a new token) and print its token.
    Add {
        name: String,
        /// A role: read, readwrite or admin, on every keyspace, or ROLE:KEYSPACE on one.
        /// Repeat for more.
        #[arg(long = "role", required = true)]
        roles: Vec<capkv_core::Grant>,
        #[command(flatten)]
        node: NodeArg,
    },
    /// List users and their roles.
    List {
        #[command(flatten)]
        node: NodeArg,
    },
    /// Delete a user: its token stops working.
    Delete {
        name: String,
        #[command(flatten)]
        node: NodeArg,
    },
}

#[derive(Subcommand)]
pub enum CertsCmd {
    /// Write a cluster CA (ca.pem, ca.key) and a certificate and key per node (n1.pem,
    /// n1.key, ...) into DIR. An existing CA in DIR is reused and existing node
    /// certificates are kept, so the same command adds nodes later.
    Init {
        dir: PathBuf,
        /// Node ids, comma-separated, e.g. n1,n2,n3.
        #[arg(long, required = true, value_delimiter = ',')]
        nodes: Vec<String>,
        /// More names (DNS names or IP addresses) for every new node certificate, so that
        /// it can also serve the HTTP API over TLS, e.g. localhost,127.0.0.1.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
    },
}

/// `capkv certs ...`.
pub fn run_certs(cmd: CertsCmd) -> Result<(), String> {
    match cmd {
        CertsCmd::Init { dir, nodes, hosts } => {
            let written = crate::net::tls::init_certs(&dir, &nodes, &hosts)?;
            if written.is_empty() {
                println!(
                    "nothing to do: {} already holds every certificate",
                    dir.display()
                );
            }
            for f in written {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
    }
}

/// A `--nemesis` value: a fault, or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NemesisArg {
    None,
    Partition,
    Kill,
    Restart,
    Pause,
    Clock,
    Snapshot,
}

impl NemesisArg {
    fn kind(self) -> Option<crate::check::NemesisKind> {
        use crate::check::NemesisKind as K;
        Some(match self {
            NemesisArg::None => return None,
            NemesisArg::Partition => K::Partition,
            NemesisArg::Kill => K::Kill,
            NemesisArg::Restart => K::Restart,
            NemesisArg::Pause => K::Pause,
            NemesisArg::Clock => K::Clock,
            NemesisArg::Snapshot => K::Snapshot,
        })
    }
}

#[derive(Args)]
pub struct CheckArgs {
    #[arg(long, value_enum, default_value = "register")]
    pub workload: crate::check::Workload,
    /// Faults, comma-separated: partition, kill, restart, pause, clock, snapshot; `none`
    /// (or leaving it out): no faults.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub nemesis: Vec<NemesisArg>,
    /// Seconds of the fault phase.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Seeds the clients' choices and the nemesis's schedule (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where the history, report.html, summary.json and node logs go
    /// (default: capkv-check/<workload>-<seed>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Check a running cluster at these URLs (comma-separated) instead of starting one;
    /// only the partition, clock and snapshot nemeses are possible then.
    #[arg(long, value_delimiter = ',')]
    pub nodes: Option<Vec<String>>,
    /// Nodes of the cluster check starts.
    #[arg(long, default_value_t = 3)]
    pub cluster_size: u32,
    /// Concurrent clients.
    #[arg(long, default_value_t = 10)]
    pub clients: u32,
    /// Keys the workload spreads over (unique-insert: ignored).
    #[arg(long, default_value_t = 4)]
    pub keys: u32,
    /// `--snapshot-every` of the nodes when the snapshot nemesis is on.
    #[arg(long, default_value_t = 30)]
    pub snapshot_every: u64,
    /// Seconds the checker may spend before it answers unknown.
    #[arg(long, default_value_t = 120)]
    pub check_time: u64,
}

impl CheckArgs {
    pub fn into_options(self) -> crate::check::CheckOptions {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() % 1_000_000)
                .unwrap_or(0)
        });
        let out = self.out.unwrap_or_else(|| {
            PathBuf::from("capkv-check").join(format!("{}-{seed}", self.workload.name()))
        });
        crate::check::CheckOptions {
            workload: self.workload,
            nemesis: self.nemesis.iter().filter_map(|n| n.kind()).collect(),
            duration: std::time::Duration::from_secs(self.duration),
            seed,
            out,
            nodes: self.nodes,
            cluster_size: self.cluster_size,
            clients: self.clients,
            keys: self.keys,
            snapshot_every: self.snapshot_every,
            check_time: std::time::Duration::from_secs(self.check_time),
        }
    }
}

#[derive(Subcommand)]
pub enum KeyspaceCmd {
    Create {
        name: String,
        #[arg(long, value_enum)]
        mode: ModeArg,
        #[arg(long)]
        n: Option<u32>,
        #[arg(long)]
        r: Option<u32>,
        #[arg(long)]
        w: Option<u32>,
        /// ap only: register (default), counter, set or lww.
        #[arg(long = "type", value_enum)]
        value_type: Option<TypeArg>,
        #[command(flatten)]
        node: NodeArg,
    },
    List {
        #[command(flatten)]
        node: NodeArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum TypeArg {
    Register,
    Counter,
    Set,
    Lww,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Cp,
    Ap,
}

#[derive(Subcommand)]
pub enum FaultCmd {
    /// Split the cluster: each GROUP is comma-separated node ids; nodes in different
    /// groups cannot exchange messages. Nodes in no group are left alone.
    Partition {
        #[arg(required = true, num_args = 2..)]
        groups: Vec<String>,
        #[command(flatten)]
        node: NodeArg,
    },
    /// One-way partition: FROM drops every message it would send to TO (requests and
    /// replies alike) but still receives and handles what TO sends, so TO's requests take
    /// effect on FROM and then time out at TO. Set on FROM only, replacing its one-way
    /// drops and keeping its other faults. TO may be comma-separated node ids.
    #[command(name = "one-way")]
    OneWay {
        from: String,
        to: String,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Set NODE_ID's wall clock SKEW_MS ms off (negative: behind; at most one day,
    /// 86400000, either way; 0 removes the skew). Keeps that node's other faults.
    Clock {
        node_id: String,
        #[arg(allow_negative_numbers = true)]
        skew_ms: i64,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Remove every fault (partitions, one-way drops, clock skew) on every node.
    Heal {
        #[command(flatten)]
        node: NodeArg,
    },
}

#[derive(Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's id, e.g. n1.
    #[arg(long)]
    pub id: Option<String>,
    /// HTTP listen address (default: this node's address in --cluster).
    #[arg(long)]
    pub http: Option<String>,
    /// Peer listen address (default: this node's address in --cluster).
    #[arg(long)]
    pub peer: Option<String>,
    /// Where this node keeps its data (created if absent; the same dir resumes the node).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Every node: id=peer_addr@http_addr,...
    #[arg(long)]
    pub cluster: Option<String>,
    /// Allow /v1/faults (testing only).
    #[arg(long)]
    pub enable_faults: bool,
    /// Directory of the cluster's certificates (`capkv certs init`): ca.pem and this
    /// node's <id>.pem and <id>.key. Peer connections use mutual TLS with them.
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// Peers talk without TLS and are not authenticated: anyone who can reach the peer
    /// port controls the cluster. Only for trusted networks and tests.
    #[arg(long, conflicts_with = "certs")]
    pub insecure_peers: bool,
    /// Most HTTP connections open at once (default 1024); one more is answered 503 and
    /// closed at once.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// How long a client has to send a request's head, in ms; also how long an idle
    /// keep-alive connection is kept (default 10000).
    #[arg(long)]
    pub http_header_timeout_ms: Option<u64>,
    /// Serve the HTTP API over TLS with this certificate (PEM, chain first)...
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// ...and this private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// With --tls-cert: every client must present a certificate signed by this CA.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Turn authentication on: every request needs a bearer token, and the token in this
    /// file is the `root` user (admin on everything). `capkv certs init` writes one.
    #[arg(long)]
    pub root_token_file: Option<PathBuf>,
    /// Serve a non-loopback HTTP address without authentication (anyone who can reach it
    /// can read, write and inject faults).
    #[arg(long, conflicts_with = "root_token_file")]
    pub no_auth: bool,
    /// Largest value accepted, in bytes (default 1 MiB).
    #[arg(long)]
    pub max_value_bytes: Option<usize>,
    /// Snapshot and purge the Raft log every N entries (default 10000).
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// Raft election timeout, lower bound in ms (default 600; the upper bound is twice it).
    /// Lower means faster failover but more spurious elections on a loaded machine.
    #[arg(long)]
    pub election_timeout_ms: Option<u64>,
    /// ap: a delete's tombstone is collected once every node has confirmed holding it
    /// (or nothing) twice, this many ms apart (default 120000; at least 65000, longer than
    /// any request deadline, unless --enable-faults; at most 86400000).
    #[arg(long)]
    pub tombstone_grace_ms: Option<u64>,
    /// For a node that starts without Raft state (a first start or a lost disk): `auto`
    /// forms a new cluster only once every member answers without state, `new` as soon
    /// as a majority does (a new cluster with members missing), `existing` never (a
    /// replaced disk joins the cluster whose members hold its data). Ignored by a node
    /// with state. Default auto.
    #[arg(long, value_enum)]
    pub initial_cluster_state: Option<InitialClusterState>,
    /// ap: pause between anti-entropy exchanges, in ms (default 2000, at most 3600000;
    /// longer after an exchange that took long). 0 turns anti-entropy off, allowed only
    /// with --enable-faults (tests that need a replica left behind).
    #[arg(long)]
    pub anti_entropy_ms: Option<u64>,
}

impl ServeArgs {
    pub fn into_config(self) -> Result<NodeConfig, ConfigError> {
        let file = match &self.config {
            Some(p) => ConfigFile::load(p)?,
            None => ConfigFile::default(),
        };
        let id = self.id.or(file.id).ok_or(ConfigError::Missing("--id"))?;
        let cluster = parse_cluster(
            &self
                .cluster
                .or(file.cluster)
                .ok_or(ConfigError::Missing("--cluster"))?,
        )?;
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .ok_or(ConfigError::Missing("--data-dir"))?;
        let mut cfg = NodeConfig::new(
            id,
            cluster,
            data_dir,
            self.http.or(file.http),
            self.peer.or(file.peer),
        )?;
        cfg.enable_faults = self.enable_faults || file.enable_faults.unwrap_or(false);
        cfg.peer_security = match (
            self.certs.or(file.certs),
            self.insecure_peers || file.insecure_peers.unwrap_or(false),
        ) {
            (Some(_), true) => {
                return Err(ConfigError::Invalid(
                    "--certs and --insecure-peers exclude each other".into(),
                ))
            }
            (Some(dir), false) => PeerSecurity::Certs(dir),
            (None, true) => PeerSecurity::Insecure,
            (None, false) => {
                return Err(ConfigError::Invalid(
                    "peers must authenticate each other: give --certs DIR (make one with \
                     `capkv certs init DIR --nodes n1,n2,n3`), or --insecure-peers to run \
                     without (anyone who can reach the peer port then controls the cluster)"
                        .into(),
                ))
            }
        };
        cfg.initial_cluster_state = self
            .initial_cluster_state
            .or(file.initial_cluster_state)
            .unwrap_or_default();
        if let Some(v) = self.max_value_bytes.or(file.max_value_bytes) {
            if v == 0 || v > 64 * 1024 * 1024 {
                return Err(ConfigError::Invalid(
                    "--max-value-bytes must be between 1 and 67108864".into(),
                ));
            }
            cfg.max_value_bytes = v;
        }
        if let Some(v) = self.election_timeout_ms.or(file.election_timeout_ms) {
            if !(3 * cfg.heartbeat_ms..=60_000).contains(&v) {
                return Err(ConfigError::Invalid(format!(
                    "--election-timeout-ms must be between {} (3 heartbeats) and 60000",
                    3 * cfg.heartbeat_ms
                )));
            }
            cfg.election_timeout_min_ms = v;
            cfg.election_timeout_max_ms = 2 * v;
        }
        if let Some(v) = self.tombstone_grace_ms.or(file.tombstone_grace_ms) {
            if v > 86_400_000 {
                return Err(ConfigError::Invalid(
                    "--tombstone-grace-ms must be at most 86400000 (one day)".into(),
                ));
            }
            // Safety needs the grace to outlast any request still carrying an old
            // version; only test clusters (faults enabled) may trade that for speed.
            if v < MIN_SAFE_GRACE_MS && !cfg.enable_faults {
                return Err(ConfigError::Invalid(format!(
                    "--tombstone-grace-ms must be at least {MIN_SAFE_GRACE_MS} (longer than \
                     the longest request deadline, {} ms), or a write still in flight could \
                     bring a deleted value back; shorter is allowed only on test clusters \
                     started with --enable-faults",
                    capkv_core::validate::MAX_TIMEOUT_MS
                )));
            }
            cfg.tombstone_grace = std::time::Duration::from_millis(v);
        }
        if let Some(v) = self.anti_entropy_ms.or(file.anti_entropy_ms) {
            if v == 0 && !cfg.enable_faults {
                return Err(ConfigError::Invalid(
                    "--anti-entropy-ms 0 (no anti-entropy) is allowed only on test clusters \
                     started with --enable-faults: without it a replica that missed writes \
                     may never get them"
                        .into(),
                ));
            }
            if v > 3_600_000 {
                return Err(ConfigError::Invalid(
                    "--anti-entropy-ms must be at most 3600000 (one hour)".into(),
                ));
            }
            cfg.anti_entropy_interval = (v > 0).then(|| std::time::Duration::from_millis(v));
        }
        if let Some(v) = self.max_connections.or(file.max_connections) {
            if !(1..=1_000_000).contains(&v) {
                return Err(ConfigError::Invalid(
                    "--max-connections must be between 1 and 1000000".into(),
                ));
            }
            cfg.http_limits.max_connections = v;
        }
        if let Some(v) = self.http_header_timeout_ms.or(file.http_header_timeout_ms) {
            if !(100..=600_000).contains(&v) {
                return Err(ConfigError::Invalid(
                    "--http-header-timeout-ms must be between 100 and 600000".into(),
                ));
            }
            cfg.http_limits.header_timeout = std::time::Duration::from_millis(v);
        }
        cfg.http_tls = match (
            self.tls_cert.or(file.tls_cert),
            self.tls_key.or(file.tls_key),
            self.tls_client_ca.or(file.tls_client_ca),
        ) {
            (Some(cert), Some(key), client_ca) => Some(HttpTls {
                cert,
                key,
                client_ca,
            }),
            (None, None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "--tls-cert and --tls-key go together (and --tls-client-ca needs them)".into(),
                ))
            }
        };
        cfg.root_token_file = self.root_token_file.or(file.root_token_file);
        let no_auth = self.no_auth || file.no_auth.unwrap_or(false);
        if cfg.root_token_file.is_some() && no_auth {
            return Err(ConfigError::Invalid(
                "--root-token-file and --no-auth exclude each other".into(),
            ));
        }
        if cfg.root_token_file.is_none() && !no_auth && !is_loopback(&cfg.http_addr) {
            return Err(ConfigError::Invalid(format!(
                "HTTP address {} is reachable from other machines, and authentication is off: \
                 give --root-token-file FILE (`capkv certs init` writes one), or --no-auth to \
                 serve it open anyway",
                cfg.http_addr
            )));
        }
        if let Some(v) = self.snapshot_every.or(file.snapshot_every) {
            if v == 0 {
                return Err(ConfigError::Invalid(
                    "--snapshot-every must be at least 1".into(),
                ));
            }
            cfg.snapshot_every = v;
        }
        Ok(cfg)
    }
}

/// Whether an HTTP listen address only accepts connections from this machine.
fn is_loopback(addr: &str) -> bool {
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The shortest tombstone grace a production cluster accepts: the longest request
/// deadline plus a margin.
const MIN_SAFE_GRACE_MS: u64 = capkv_core::validate::MAX_TIMEOUT_MS + 5_000;

fn print_value(bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => println!("{s}"),
        Err(_) => println!("(binary, {} bytes)", bytes.len()),
    }
}

fn fail(e: ClientError) -> String {
    e.to_string()
}

/// Whether `keyspace` is an ap keyspace (its reads and writes answer differently: a
/// context instead of a version, maybe siblings). Unknown names count as cp: the server
/// then says the keyspace does not exist.
async fn is_ap(client: &Client, keyspace: &str) -> Result<bool, String> {
    let specs = client.list_keyspaces_serializable().await.map_err(fail)?;
    Ok(specs
        .iter()
        .any(|s| s.name == keyspace && s.mode == Mode::Ap))
}

/// Runs a client command; `Err` carries the message to print (the exit status is 1).
/// Client commands print to stdout; when it is a pipe closed early (`capkv scan ap |
/// head`), end quietly as Unix tools do instead of panicking on the failed print.
/// (Rust ignores SIGPIPE by default; sockets are unaffected either way, as Rust sends
/// with `MSG_NOSIGNAL`.)
pub fn exit_quietly_on_closed_stdout() {
    // SAFETY: restores the default action of one signal; no handler code runs in us.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

pub async fn run_client(cmd: Cmd) -> Result<(), String> {
    exit_quietly_on_closed_stdout();
    match cmd {
        Cmd::Serve(_)
        | Cmd::Dev { .. }
        | Cmd::Check(_)
        | Cmd::Sim(_)
        | Cmd::CheckHistory { .. }
        | Cmd::Certs { .. }
        | Cmd::Bench(_) => {
            unreachable!("handled by main")
        }
        Cmd::Put {
            keyspace,
            key,
            value,
            if_version,
            if_value,
            idempotency_key,
            node,
        } => {
            let client = node.client()?;
            if is_ap(&client, &keyspace).await? {
                if if_version.is_some() || if_value.is_some() || idempotency_key.is_some() {
                    return Err(format!(
                        "'{keyspace}' is an ap keyspace: --if-version, --if-value and \
                         --idempotency-key apply to cp keyspaces"
                    ));
                }
                // With the context read just before, so the write replaces what is there
                // (a write without one would stand beside it as a sibling).
                let seen = client
                    .ap_get(&keyspace, key.as_bytes(), None)
                    .await
                    .map_err(fail)?;
                client
                    .ap_put(
                        &keyspace,
                        key.as_bytes(),
                        value.into_bytes(),
                        seen.context(),
                        None,
                    )
                    .await
                    .map_err(fail)?;
                println!("ok");
                return Ok(());
            }
            let opts = WriteOptions {
                if_version,
                if_value,
                idempotency_key,
                timeout_ms: None,
            };
            let r = client
                .put(&keyspace, key.as_bytes(), value.into_bytes(), &opts)
                .await
                .map_err(fail)?;
            println!("ok, version {}", r.version);
        }
        Cmd::Get {
            keyspace,
            key,
            serializable,
            node,
        } => {
            let client = node.client()?;
            if is_ap(&client, &keyspace).await? {
                match client
                    .ap_get(&keyspace, key.as_bytes(), None)
                    .await
                    .map_err(fail)?
                {
                    ApValue::Absent { .. } => return Err(format!("key '{key}' not found")),
                    ApValue::Value { value, .. } => print_value(&value),
                    ApValue::Siblings { values, .. } => {
                        println!("{} siblings (concurrent writes):", values.len());
                        for v in &values {
                            print_value(v);
                        }
                    }
                }
                return Ok(());
            }
            let c = if serializable {
                Consistency::Serializable
            } else {
                Consistency::Linearizable
            };
            match client
                .get(&keyspace, key.as_bytes(), c)
                .await
                .map_err(fail)?
            {
                Some(v) => print_value(&v.value),
                None => return Err(format!("key '{key}' not found")),
            }
        }
        Cmd::Del {
            keyspace,
            key,
            if_version,
            node,
        } => {
            let client = node.client()?;
            if is_ap(&client, &keyspace).await? {
                if if_version.is_some() {
                    return Err(format!(
                        "'{keyspace}' is an ap keyspace: --if-version applies to cp keyspaces"
                    ));
                }
                let seen = client
                    .ap_get(&keyspace, key.as_bytes(), None)
                    .await
                    .map_err(fail)?;
                client
                    .ap_delete(&keyspace, key.as_bytes(), seen.context())
                    .await
                    .map_err(fail)?;
                println!("deleted");
                return Ok(());
            }
            let opts = WriteOptions {
                if_version,
                ..Default::default()
            };
            let r = client
                .delete(&keyspace, key.as_bytes(), &opts)
                .await
                .map_err(fail)?;
            println!(
                "{}",
                if r.deleted {
                    "deleted"
                } else {
                    "not found (nothing deleted)"
                }
            );
        }
        Cmd::Scan {
            keyspace,
            prefix,
            limit,
            node,
        } => {
            let (entries, more) = node
                .client()?
                .scan(&keyspace, &prefix, None, Some(limit))
                .await
                .map_err(fail)?;
            for e in &entries {
                let key = String::from_utf8_lossy(&e.key_bytes()).into_owned();
                let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
                let shown = if let Some(v) = e.version {
                    format!("{}\t(version {v})", text(e.value_bytes()))
                } else if let Some(s) = &e.siblings {
                    let values: Vec<String> = s.iter().map(|s| text(s.value_bytes())).collect();
                    format!("{}\t(siblings)", values.join(" | "))
                } else if let Some(c) = e.counter {
                    c.to_string()
                } else if let Some(m) = &e.members {
                    m.join(",")
                } else {
                    text(e.value_bytes())
                };
                println!("{key}\t{shown}");
            }
            if more {
                println!("... more (raise --limit)");
            }
        }
        Cmd::Keyspace {
            cmd:
                KeyspaceCmd::Create {
                    name,
                    mode,
                    n,
                    r,
                    w,
                    value_type,
                    node,
                },
        } => {
            let mode = match mode {
                ModeArg::Cp => Mode::Cp,
                ModeArg::Ap => Mode::Ap,
            };
            let value_type = value_type.map(|t| match t {
                TypeArg::Register => ValueType::Register,
                TypeArg::Counter => ValueType::Counter,
                TypeArg::Set => ValueType::Set,
                TypeArg::Lww => ValueType::Lww,
            });
            let spec = node
                .client()?
                .create_keyspace(&KeyspaceSpec {
                    name,
                    mode,
                    n,
                    r,
                    w,
                    value_type,
                })
                .await
                .map_err(fail)?;
            println!(
                "created {}",
                serde_json::to_string(&spec).unwrap_or_default()
            );
        }
        Cmd::Keyspace {
            cmd: KeyspaceCmd::List { node },
        } => {
            for ks in node.client()?.list_keyspaces().await.map_err(fail)? {
                println!("{}", serde_json::to_string(&ks).unwrap_or_default());
            }
        }
        Cmd::Status { node } => status(node.client()?).await?,
        Cmd::Demo { scenario, node } => {
            let first = node
                .node
                .split(',')
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned();
            crate::demo::run(scenario, &first).await?
        }
        Cmd::Fault {
            cmd: FaultCmd::Partition { groups, node },
        } => partition(node.client()?, &groups).await?,
        Cmd::Fault {
            cmd: FaultCmd::OneWay { from, to, node },
        } => one_way(node.client()?, &from, &to).await?,
        Cmd::Fault {
            cmd:
                FaultCmd::Clock {
                    node_id,
                    skew_ms,
                    node,
                },
        } => clock(node.client()?, &node_id, skew_ms).await?,
        Cmd::Fault {
            cmd: FaultCmd::Heal { node },
        } => heal(node.client()?).await?,
        Cmd::User {
            cmd: UserCmd::Add { name, roles, node },
        } => {
            let user = node
                .client()?
                .create_user(&capkv_core::UserSpec {
                    name,
                    grants: roles,
                })
                .await
                .map_err(fail)?;
            eprintln!(
                "created user '{}'; its token (shown only now; pass it with --token or CAPKV_TOKEN):",
                user.name
            );
            println!("{}", user.token);
        }
        Cmd::User {
            cmd: UserCmd::List { node },
        } => {
            for u in node.client()?.list_users().await.map_err(fail)? {
                let grants: Vec<String> = u
                    .grants
                    .iter()
                    .map(|g| format!("{}:{}", format!("{:?}", g.role).to_lowercase(), g.keyspace))
                    .collect();
                println!("{:<20} {}", u.name, grants.join(" "));
            }
        }
        Cmd::User {
            cmd: UserCmd::Delete { name, node },
        } => {
            node.client()?.delete_user(&name).await.map_err(fail)?;
            println!("deleted user '{name}'");
        }
    }
    Ok(())
}

async fn status(client: Client) -> Result<(), String> {
    let info = client.cluster().await.map_err(fail)?;
    println!(
        "{:<6} {:<10} {:>6} {:>10} {:>10}  {:<8} {:>6}  reachable peers",
        "node", "role", "term", "applied", "commit", "leader", "ring"
    );
    for n in &info.nodes {
        match client.cluster_of(&node_base(&client, &n.http_addr)).await {
            Ok(v) => {
                let peers: Vec<&str> = v
                    .nodes
                    .iter()
                    .filter(|p| p.reachable && p.id != v.node)
                    .map(|p| p.id.as_str())
                    .collect();
                println!(
                    "{:<6} {:<10} {:>6} {:>10} {:>10}  {:<8} {:>5.1}%  {}",
                    v.node,
                    v.role,
                    v.term,
                    v.applied_index,
                    v.commit_index,
                    v.leader.as_deref().unwrap_or("-"),
                    n.ring_share * 100.0,
                    if peers.is_empty() {
                        "none".to_owned()
                    } else {
                        peers.join(",")
                    }
                );
                if let Some(why) = &v.raft_stopped {
                    println!("       {why}: it serves no cp request");
                }
            }
            Err(e) => println!("{:<6} {:<10} {e}", n.id, "down"),
        }
    }
    Ok(())
}

/// The HTTP URL of node `id`, as the cluster describes it.
fn node_url(client: &Client, info: &ClusterInfo, id: &str) -> Result<String, String> {
    match info.nodes.iter().find(|n| n.id == id) {
        Some(n) => Ok(node_base(client, &n.http_addr)),
        None => Err(format!(
            "unknown node '{id}'; the cluster has {}",
            info.nodes
                .iter()
                .map(|n| n.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Comma-separated node ids, blanks dropped.
fn id_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Changes one fault of the node at `url` and keeps its others (a `POST /v1/faults`
/// replaces them all, so read them first). Not atomic: two commands racing on one node
/// may lose one change.
async fn update_faults(
    client: &Client,
    url: &str,
    change: impl FnOnce(&mut FaultRequest),
) -> Result<FaultState, ClientError> {
    let mut req = client.faults(url).await?.request();
    change(&mut req);
    client.set_fault_request(url, &req).await
}

async fn partition(client: Client, groups: &[String]) -> Result<(), String> {
    let info = client.cluster().await.map_err(fail)?;
    let groups: Vec<Vec<String>> = groups.iter().map(|g| id_list(g)).collect();
    let mut seen = std::collections::BTreeSet::new();
    for id in groups.iter().flatten() {
        node_url(&client, &info, id)?;
        if !seen.insert(id.clone()) {
            return Err(format!("node '{id}' is in more than one group"));
        }
    }
    let mut failed = Vec::new();
    for n in &info.nodes {
        let Some(mine) = groups.iter().find(|g| g.contains(&n.id)) else {
            continue;
        };
        let others: Vec<String> = groups
            .iter()
            .filter(|g| *g != mine)
            .flatten()
            .cloned()
            .collect();
        let url = node_base(&client, &n.http_addr);
        match update_faults(&client, &url, |f| f.isolate_from = others.clone()).await {
            Ok(_) => println!("{}: isolated from {}", n.id, others.join(",")),
            Err(e) => failed.push(format!("{}: {e}", n.id)),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("\n"))
    }
}

async fn one_way(client: Client, from: &str, to: &str) -> Result<(), String> {
    let info = client.cluster().await.map_err(fail)?;
    let url = node_url(&client, &info, from)?;
    let to = id_list(to);
    if to.is_empty() {
        return Err("name at least one node for FROM to drop its messages to".into());
    }
    for id in &to {
        node_url(&client, &info, id)?;
    }
    let state = update_faults(&client, &url, |f| f.drop_to = to)
        .await
        .map_err(fail)?;
    println!(
        "{from}: drops everything it sends to {} (still receives from them)",
        state.drop_to.join(",")
    );
    Ok(())
}

async fn clock(client: Client, id: &str, skew_ms: i64) -> Result<(), String> {
    let info = client.cluster().await.map_err(fail)?;
    let url = node_url(&client, &info, id)?;
    let state = update_faults(&client, &url, |f| {
        f.clock_skew_ms = (skew_ms != 0).then_some(skew_ms)
    })
    .await
    .map_err(fail)?;
    println!(
        "{id}: wall clock skewed by {:+} ms (reads {} ms since the epoch)",
        state.clock_skew_ms, state.wall_clock_ms
    );
    Ok(())
}

async fn heal(client: Client) -> Result<(), String> {
    let info = client.cluster().await.map_err(fail)?;
    let mut failed = Vec::new();
    for n in &info.nodes {
        match client
            .set_faults(&node_base(&client, &n.http_addr), Vec::new())
            .await
        {
            Ok(_) => println!("{}: healed", n.id),
            Err(e) => failed.push(format!("{}: {e}", n.id)),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn serve(extra: &[&str]) -> Result<NodeConfig, ConfigError> {
        let mut args = vec![
            "capkv",
            "serve",
            "--id",
            "n1",
            "--cluster",
            "n1=127.0.0.1:7101@127.0.0.1:7001",
            "--data-dir",
            "/tmp/unused",
        ];
        if !extra.contains(&"--certs") && !extra.contains(&"--no-peer-flag") {
            args.push("--insecure-peers");
        }
        args.extend(extra.iter().filter(|a| **a != "--no-peer-flag"));
        match Cli::try_parse_from(args).unwrap().command {
            Cmd::Serve(a) => a.into_config(),
            _ => unreachable!("parsed a serve command"),
        }
    }

    #[test]
    fn nemesis_none_means_no_faults() {
        let parse = |n: &str| match Cli::try_parse_from(["capkv", "check", "--nemesis", n])
            .unwrap()
            .command
        {
            Cmd::Check(a) => a.into_options().nemesis,
            _ => unreachable!("parsed a check command"),
        };
        assert!(parse("none").is_empty());
        assert_eq!(
            parse("partition,kill"),
            vec![
                crate::check::NemesisKind::Partition,
                crate::check::NemesisKind::Kill
            ]
        );
    }

    /// #8 item 16: a tombstone grace shorter than the longest request deadline is unsafe
    /// (a write still in flight could bring a deleted value back): refused, except on a
    /// test cluster.
    #[test]
    fn a_tombstone_grace_below_the_longest_deadline_is_refused() {
        let e = serve(&["--tombstone-grace-ms", "300"]).unwrap_err();
        assert!(e.to_string().contains("at least 65000"), "{e}");
        assert!(serve(&["--tombstone-grace-ms", "65000"]).is_ok());
        let test = serve(&["--tombstone-grace-ms", "300", "--enable-faults"]).unwrap();
        assert_eq!(test.tombstone_grace.as_millis(), 300);
        assert!(serve(&["--tombstone-grace-ms", "86400001"]).is_err());
    }

    /// #10: peers authenticate each other unless the operator says otherwise.
    #[test]
    fn serve_needs_certs_or_an_explicit_insecure_flag() {
        let e = serve(&["--no-peer-flag"]).unwrap_err();
        assert!(e.to_string().contains("--certs"), "{e}");
        let c = serve(&["--certs", "/etc/capkv"]).unwrap();
        assert_eq!(c.peer_security, PeerSecurity::Certs("/etc/capkv".into()));
        assert_eq!(serve(&[]).unwrap().peer_security, PeerSecurity::Insecure);
    }

    /// #10: like Redis's protected mode, a node reachable from other machines does not
    /// serve without authentication unless told to.
    #[test]
    fn a_public_http_address_needs_auth_or_an_explicit_no_auth() {
        let e = serve(&["--http", "0.0.0.0:7001"]).unwrap_err();
        assert!(e.to_string().contains("--root-token-file"), "{e}");
        assert!(serve(&["--http", "10.1.2.3:7001"]).is_err());
        assert!(serve(&["--http", "0.0.0.0:7001", "--no-auth"]).is_ok());
        let c = serve(&["--http", "0.0.0.0:7001", "--root-token-file", "/t"]).unwrap();
        assert_eq!(c.root_token_file, Some("/t".into()));
        for local in ["127.0.0.1:7001", "[::1]:7001", "localhost:7001"] {
            assert!(serve(&["--http", local]).is_ok(), "{local}");
        }
        let parses = |extra: &[&str]| {
            let mut args = vec!["capkv", "serve", "--id", "n1", "--insecure-peers"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).is_ok()
        };
        assert!(!parses(&["--root-token-file", "/t", "--no-auth"]));
        assert!(
            !parses(&["--tls-cert", "/c"]),
            "a certificate needs its key"
        );
        assert!(parses(&["--tls-cert", "/c", "--tls-key", "/k"]));
    }

    /// Every command's arguments are well formed (clap checks names, conflicts and
    /// requirements only when a command is parsed; this parses none).
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
