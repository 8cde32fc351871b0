//! Node configuration: from `capkv serve` flags, a TOML file, or `capkv dev`.

use std::path::PathBuf;

use serde::Deserialize;

use crate::cluster::NodeId;
pub use crate::cp::lost_state::InitialClusterState;

/// One member of the initial cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The node's name, such as `n2`.
    pub name: String,
    /// Its Raft id: the number at the end of its name.
    pub id: NodeId,
    pub peer_addr: String,
    pub http_addr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid --cluster entry '{0}': expected id=peer_addr@http_addr, e.g. n1=127.0.0.1:7101@127.0.0.1:7001")]
    ClusterEntry(String),
    #[error(
        "node id '{0}' must end in a positive number that is unique in the cluster (n1, n2, ...)"
    )]
    NodeName(String),
    #[error("node ids '{0}' and '{1}' have the same number")]
    DuplicateId(String, String),
    #[error("this node '{0}' is not in --cluster")]
    NotAMember(String),
    #[error("missing setting: {0}")]
    Missing(&'static str),
    #[error("config file {0}: {1}")]
    File(PathBuf, String),
    #[error("{0}")]
    Invalid(String),
}

/// The Raft id of a node name: its trailing number (`n3` → 3).
pub fn raft_id(name: &str) -> Result<NodeId, ConfigError> {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let bad = || ConfigError::NodeName(name.to_owned());
    if digits == 0
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(bad());
    }
    match name[name.len() - digits..].parse::<NodeId>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(id) => Ok(id),
    }
}

/// Parses `n1=peer@http,n2=peer@http,...`.
pub fn parse_cluster(spec: &str) -> Result<Vec<Member>, ConfigError> {
    let mut members: Vec<Member> = Vec::new();
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let err = || ConfigError::ClusterEntry(entry.to_owned());
        let (name, addrs) = entry.split_once('=').ok_or_else(err)?;
        let (peer, http) = addrs.split_once('@').ok_or_else(err)?;
        if peer.is_empty() || http.is_empty() {
            return Err(err());
        }
        let id = raft_id(name)?;
        if let Some(other) = members.iter().find(|m| m.id == id) {
            return Err(ConfigError::DuplicateId(
                other.name.clone(),
                name.to_owned(),
            ));
        }
        members.push(Member {
            name: name.to_owned(),
            id,
            peer_addr: peer.to_owned(),
            http_addr: http.to_owned(),
        });
    }
    if members.is_empty() {
        return Err(ConfigError::Missing("--cluster"));
    }
    members.sort_by_key(|m| m.id);
    Ok(members)
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub id: NodeId,
    pub http_addr: String,
    pub peer_addr: String,
    pub data_dir: PathBuf,
    pub cluster: Vec<Member>,
    pub enable_faults: bool,
    pub max_value_bytes: usize,
    /// Take a Raft snapshot (and purge the log) every this many applied entries.
    pub snapshot_every: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// ap: how long a tombstone must stay confirmed on every node before it is collected
    /// (longer than any request deadline; see `ap::tombstones`).
    pub tombstone_grace: std::time::Duration,
    /// What a node that starts without Raft state may do (see [`InitialClusterState`]).
    pub initial_cluster_state: InitialClusterState,
    /// ap: the pause between anti-entropy exchanges (at least; see `Node::anti_entropy_loop`),
    /// or `None`: no exchanges (test clusters only).
    pub anti_entropy_interval: Option<std::time::Duration>,
    /// How peer connections are secured.
    pub peer_security: PeerSecurity,
    /// Bounds on HTTP connections (`--max-connections`, `--http-header-timeout-ms`).
    pub http_limits: crate::http::HttpLimits,
    /// TLS on the HTTP API, if on.
    pub http_tls: Option<HttpTls>,
    /// The root token's file: authentication is on (see `crate::auth`).
    pub root_token_file: Option<PathBuf>,
}

/// TLS for the HTTP API (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// How a node's peer connections are secured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSecurity {
    /// Mutual TLS with the certificates in this directory (`capkv certs init`).
    Certs(PathBuf),
    /// No TLS, no authentication (`--insecure-peers`).
    Insecure,
}

/// The settings a `--config` TOML file may hold (same names as the flags).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    pub id: Option<String>,
    pub http: Option<String>,
    pub peer: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub cluster: Option<String>,
    pub enable_faults: Option<bool>,
    pub max_value_bytes: Option<usize>,
    pub snapshot_every: Option<u64>,
    pub election_timeout_ms: Option<u64>,
    pub tombstone_grace_ms: Option<u64>,
    pub initial_cluster_state: Option<InitialClusterState>,
    pub anti_entropy_ms: Option<u64>,
    pub certs: Option<PathBuf>,
    pub insecure_peers: Option<bool>,
    pub max_connections: Option<usize>,
    pub http_header_timeout_ms: Option<u64>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub root_token_file: Option<PathBuf>,
    pub no_auth: Option<bool>,
}

impl ConfigFile {
    pub fn load(path: &std::path::Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::File(path.to_owned(), e.to_string()))?;
        toml::from_str(&text).map_err(|e| ConfigError::File(path.to_owned(), e.to_string()))
    }
}

pub const DEFAULT_SNAPSHOT_EVERY: u64 = 10_000;

impl NodeConfig {
    /// Builds and checks a config. `http`/`peer` default to this node's addresses in `cluster`.
    pub fn new(
        name: String,
        cluster: Vec<Member>,
        data_dir: PathBuf,
        http: Option<String>,
        peer: Option<String>,
    ) -> Result<NodeConfig, ConfigError> {
        let id = raft_id(&name)?;
        let me = cluster
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| ConfigError::NotAMember(name.clone()))?;
        Ok(NodeConfig {
            http_addr: http.unwrap_or_else(|| me.http_addr.clone()),
            peer_addr: peer.unwrap_or_else(|| me.peer_addr.clone()),
            name,
            id,
            data_dir,
            cluster,
            enable_faults: false,
            max_value_bytes: capkv_core::validate::DEFAULT_MAX_VALUE_BYTES,
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
            heartbeat_ms: 100,
            election_timeout_min_ms: 600,
            election_timeout_max_ms: 1200,
            tombstone_grace: crate::ap::tombstones::DEFAULT_GRACE,
            initial_cluster_state: InitialClusterState::Auto,
            anti_entropy_interval: Some(crate::ap::anti_entropy::AE_INTERVAL),
            peer_security: PeerSecurity::Insecure,
            http_limits: crate::http::HttpLimits::default(),
            http_tls: None,
            root_token_file: None,
        })
    }

    pub fn member(&self, id: NodeId) -> Option<&Member> {
        self.cluster.iter().find(|m| m.id == id)
    }

    pub fn member_by_name(&self, name: &str) -> Option<&Member> {
        self.cluster.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_cluster_syntax() {
        let c = parse_cluster("n2=127.0.0.1:7102@127.0.0.1:7002,n1=127.0.0.1:7101@127.0.0.1:7001")
            .unwrap();
        assert_eq!(c[0].name, "n1");
        assert_eq!(c[0].id, 1);
        assert_eq!(c[1].peer_addr, "127.0.0.1:7102");
        assert_eq!(c[1].http_addr, "127.0.0.1:7002");
    }

    #[test]
    fn refuses_bad_clusters() {
        assert!(parse_cluster("").is_err());
        assert!(parse_cluster("n1=a").is_err());
        assert!(parse_cluster("n1=@b").is_err());
        assert!(parse_cluster("node=a@b").is_err());
        assert!(parse_cluster("n0=a@b").is_err());
        assert!(matches!(
            parse_cluster("n1=a@b,m1=c@d"),
            Err(ConfigError::DuplicateId(..))
        ));
    }

    #[test]
    fn config_files_use_the_flag_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n1.toml");
        std::fs::write(
            &path,
            "id = \"n1\"\ncluster = \"n1=a@b\"\ndata-dir = \"/tmp/x\"\nenable-faults = true\ntombstone-grace-ms = 500\n",
        )
        .unwrap();
        let f = ConfigFile::load(&path).unwrap();
        assert_eq!(f.id.as_deref(), Some("n1"));
        assert_eq!(f.enable_faults, Some(true));
        assert_eq!(f.tombstone_grace_ms, Some(500));
        std::fs::write(&path, "idd = \"n1\"\n").unwrap();
        assert!(
            ConfigFile::load(&path).is_err(),
            "unknown settings are refused"
        );
    }

    #[test]
    fn node_must_be_a_member() {
        let c = parse_cluster("n1=a@b").unwrap();
        assert!(NodeConfig::new("n2".into(), c.clone(), "d".into(), None, None).is_err());
        let cfg = NodeConfig::new("n1".into(), c, "d".into(), None, None).unwrap();
        assert_eq!(cfg.http_addr, "b");
    }
}
