//! JSON bodies of the HTTP API and the keyspace registry's records.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::validate;

/// Which side of CAP a keyspace is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Linearizable, replicated by Raft; the minority side of a partition answers 503.
    Cp,
    /// Leaderless and always writable; concurrent writes become siblings or merge.
    Ap,
}

/// What the values of an ap keyspace are, and so how concurrent writes merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    /// Opaque bytes; concurrent writes are kept as siblings (dotted version vectors).
    #[default]
    Register,
    /// A PN-counter: increments and decrements from every side add up exactly.
    Counter,
    /// An add-wins set of strings: an add concurrent with a remove of the same member wins.
    Set,
    /// Last writer wins, by hybrid-logical-clock timestamp: never siblings, but of two
    /// concurrent writes one is silently lost. Only for values where that is acceptable.
    Lww,
}

/// A keyspace as stored in the registry (which lives in the cp Raft group).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
pub struct KeyspaceSpec {
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub name: String,
    pub mode: Mode,
    /// ap only: replicas per key (at most the cluster's size; default 3, or the cluster's
    /// size if smaller).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<u32>,
    /// ap only: replies a read waits for (at most n; default 1).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 16)]
    pub r: Option<u32>,
    /// ap only: acknowledgements a write waits for (at most n; default 1).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 16)]
    pub w: Option<u32>,
    /// ap only: the value type (default `register`).
    #[serde(default, rename = "type")]
    pub value_type: Option<ValueType>,
}

/// JSON leaves out the ap-only fields of a cp keyspace; compact binary formats (bincode,
/// inside Raft entries and peer messages) cannot skip fields, so they get all five.
impl Serialize for KeyspaceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let skip_none = s.is_human_readable();
        let mut st = s.serialize_struct("KeyspaceSpec", 6)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("mode", &self.mode)?;
        for (field, value) in [("n", self.n), ("r", self.r), ("w", self.w)] {
            if skip_none && value.is_none() {
                st.skip_field(field)?;
            } else {
                st.serialize_field(field, &value)?;
            }
        }
        if skip_none && self.value_type.is_none() {
            st.skip_field("type")?;
        } else {
            st.serialize_field("type", &self.value_type)?;
        }
        st.end()
    }
}

impl KeyspaceSpec {
    /// A spec with only a name and mode; the defaults of the mode apply
    /// (see [`KeyspaceSpec::normalized`]).
    pub fn new(name: impl Into<String>, mode: Mode) -> KeyspaceSpec {
        KeyspaceSpec {
            name: name.into(),
            mode,
            n: None,
            r: None,
            w: None,
            value_type: None,
        }
    }

    /// Checks a spec sent by a client and fills in the defaults of its mode.
    ///
    /// cp keyspaces take no `n`/`r`/`w`: their replication is the Raft group's.
    /// ap keyspaces default to n=3, r=1, w=1 and need 1 <= r,w <= n.
    pub fn normalized(mut self) -> Result<KeyspaceSpec, ApiError> {
        validate::keyspace_name(&self.name)?;
        match self.mode {
            Mode::Cp => {
                if self.n.is_some()
                    || self.r.is_some()
                    || self.w.is_some()
                    || self.value_type.is_some()
                {
                    return Err(ApiError::bad_request(
                        "n, r, w and type apply to ap keyspaces only; a cp keyspace is replicated by Raft on every node",
                    ));
                }
            }
            Mode::Ap => {
                let n = self.n.unwrap_or(validate::DEFAULT_REPLICAS);
                let r = self.r.unwrap_or(1);
                let w = self.w.unwrap_or(1);
                if !(1..=validate::MAX_REPLICAS).contains(&n) {
                    return Err(ApiError::bad_request(format!(
                        "n must be between 1 and {}, got {n}",
                        validate::MAX_REPLICAS
                    )));
                }
                if r == 0 || r > n || w == 0 || w > n {
                    return Err(ApiError::bad_request(format!(
                        "r and w must be between 1 and n={n}, got r={r} w={w}"
                    )));
                }
                self.n = Some(n);
                self.r = Some(r);
                self.w = Some(w);
                self.value_type = Some(self.value_type.unwrap_or_default());
            }
        }
        Ok(self)
    }
}

/// Read consistency of a cp read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Confirmed with a quorum (ReadIndex) before the read: sees every acknowledged write.
    #[default]
    Linearizable,
    /// Served from this node's replica without contacting anyone: may be stale.
    Serializable,
}

impl std::str::FromStr for Consistency {
    type Err = ApiError;
    fn from_str(s: &str) -> Result<Self, ApiError> {
        match s {
            "linearizable" => Ok(Consistency::Linearizable),
            "serializable" => Ok(Consistency::Serializable),
            other => Err(ApiError::bad_request(format!(
                "consistency must be 'linearizable' or 'serializable', got '{other}'"
            ))),
        }
    }
}

/// Answer to a successful `PUT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PutResponse {
    /// The cluster-wide revision of this write; the key's new version.
    pub version: u64,
}

/// Answer to a successful `DELETE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeleteResponse {
    /// False when the key did not exist (the delete is still a success).
    pub deleted: bool,
    /// The cluster-wide revision of the delete (unchanged revision when nothing was deleted).
    pub version: u64,
}

/// One entry of a scan. Keys and values are bytes: when one is not valid UTF-8 it is
/// sent base64-encoded in `key_base64` / `value_base64` instead of `key` / `value`.
///
/// cp entries carry `value` and `version`. ap entries carry, by keyspace type: a
/// register's `value` (or its concurrent `siblings`) and `context`; an `lww` `value`; a
/// counter's `counter`; a set's `members`. Fields that do not apply are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScanEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    /// cp: the key's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// ap register: the concurrent values, when there is more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub siblings: Option<Vec<Sibling>>,
    /// ap register: the causal context to write with (as `X-Capkv-Context`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// ap counter: its total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<i64>,
    /// ap set: its members, sorted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<String>>,
}

/// Splits bytes into (utf8, base64): exactly one of the two is set.
fn text_or_base64(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Some(s.to_owned()), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    }
}

fn bytes_of(text: &Option<String>, b64: &Option<String>) -> Vec<u8> {
    match (text, b64) {
        (Some(s), _) => s.as_bytes().to_vec(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .unwrap_or_default(),
        (None, None) => Vec::new(),
    }
}

impl ScanEntry {
    /// A cp entry.
    pub fn new(key: &[u8], value: &[u8], version: u64) -> ScanEntry {
        ScanEntry {
            version: Some(version),
            ..ScanEntry::key(key).with_value(value)
        }
    }
    /// An entry with only its key; add what the key holds with the `with_*` methods or
    /// the public fields.
    pub fn key(key: &[u8]) -> ScanEntry {
        let (key, key_base64) = text_or_base64(key);
        ScanEntry {
            key,
            key_base64,
            ..ScanEntry::default()
        }
    }
    pub fn with_value(self, value: &[u8]) -> ScanEntry {
        let (value, value_base64) = text_or_base64(value);
        ScanEntry {
            value,
            value_base64,
            ..self
        }
    }
    pub fn key_bytes(&self) -> Vec<u8> {
        bytes_of(&self.key, &self.key_base64)
    }
    pub fn value_bytes(&self) -> Vec<u8> {
        bytes_of(&self.value, &self.value_base64)
    }
}

/// Answer to a successful write or delete in an ap keyspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApWriteResponse {
    /// The write's causal context (also in the `X-Capkv-Context` header): exactly what the
    /// context sent with the write covered, plus this write. It never covers a concurrent
    /// sibling the write kept, so a next write with it replaces only what this client saw.
    pub context: String,
}

/// One concurrent value of an ap key (`value`, or `value_base64` if not UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Sibling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
}

impl Sibling {
    pub fn new(value: &[u8]) -> Sibling {
        let (value, value_base64) = text_or_base64(value);
        Sibling {
            value,
            value_base64,
        }
    }
    pub fn value_bytes(&self) -> Vec<u8> {
        bytes_of(&self.value, &self.value_base64)
    }
}

/// `300 Multiple Choices` body of an ap read with concurrent values. A write carrying
/// `context` (in `X-Capkv-Context`) replaces all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Siblings {
    pub siblings: Vec<Sibling>,
    pub context: String,
}

/// A counter's value (ap keyspaces of type `counter`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CounterValue {
    pub value: i64,
}

/// A set's members, sorted (ap keyspaces of type `set`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SetMembers {
    pub members: Vec<String>,
}

/// A node as `/v1/cluster` describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterNode {
    pub id: String,
    pub peer_addr: String,
    pub http_addr: String,
    /// Whether the answering node has exchanged messages with this node in the last second
    /// (always true for the answering node itself).
    pub reachable: bool,
    /// Fraction of the ap hash ring for which this node is first in the preference list.
    #[serde(default)]
    pub ring_share: f64,
}

/// `GET /v1/cluster`: the answering node's view of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterInfo {
    /// The id of the node that answered.
    pub node: String,
    /// Its Raft role: leader, follower, candidate, learner or shutdown.
    pub role: String,
    /// The leader it knows of, if any.
    pub leader: Option<String>,
    pub term: u64,
    /// Index of the last Raft log entry applied to its state machine.
    pub applied_index: u64,
    /// Index of the last Raft log entry it knows to be committed (when its Raft core is
    /// too busy to say within 200 ms, e.g. waiting on stalled storage: the applied index,
    /// a lower bound).
    pub commit_index: u64,
    /// Index of the last entry in its Raft log.
    pub last_log_index: u64,
    /// Whether it can currently reach a majority of the cp group (itself included).
    pub has_quorum: bool,
    pub nodes: Vec<ClusterNode>,
    /// Nodes it is isolated from by fault injection.
    pub isolated_from: Vec<String>,
    /// ap copies it holds for homes it could not reach (hinted handoff), not yet handed
    /// back. 0 on every node (and ap answers that agree) means the ap replicas converged.
    #[serde(default)]
    pub hints_held: u64,
    /// Why its Raft core is not running, if it is not (it stopped on an error or a
    /// panic, or does not answer): it then serves no cp request, and `/healthz` is 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft_stopped: Option<String>,
}

/// `POST /v1/faults`: the faults the receiving node should have from now on. One request
/// replaces the node's whole fault state: a field left out means "no such fault", so
/// `{}` clears everything (as `DELETE /v1/faults` does). Unknown fields are refused, so a
/// misspelt fault never silently heals the others.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    /// Drop all peer traffic to and from these nodes (a two-way partition).
    #[serde(default)]
    pub isolate_from: Vec<String>,
    /// Drop every frame this node would send to these nodes, requests and replies alike,
    /// but keep receiving and handling what they send (a one-way partition): their
    /// requests here take effect, and they see them time out.
    #[serde(default)]
    pub drop_to: Vec<String>,
    /// Make this node's wall clock read this many ms off (negative: behind), within
    /// ±86400000 (one day). Left out: 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = -86400000, maximum = 86400000)]
    pub clock_skew_ms: Option<i64>,
    /// Hold every storage write and fsync of this node until the fault is lifted (what a
    /// full disk or an engine's write halt does): reads and peer traffic go on. Left
    /// out: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub storage_stall: bool,
    /// Hold every read of user data on this node (cp keys, ap objects and hints; not the
    /// Raft log) until the fault is lifted: a slow read path. Left out: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub storage_read_stall: bool,
}

impl FaultRequest {
    /// Isolation from `nodes` and no other fault (the request body before one-way
    /// partitions and clock skew existed).
    pub fn isolate(nodes: Vec<String>) -> FaultRequest {
        FaultRequest {
            isolate_from: nodes,
            ..FaultRequest::default()
        }
    }
}

/// `GET /v1/faults` (and the answer to `POST`/`DELETE`): the faults active on the
/// answering node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FaultState {
    /// Whether the node accepts faults (`--enable-faults`).
    pub enabled: bool,
    /// Nodes it exchanges no peer traffic with.
    pub isolate_from: Vec<String>,
    /// Nodes it sends nothing to, while still receiving from them.
    pub drop_to: Vec<String>,
    /// How far its wall clock is set off, in ms (0: none).
    pub clock_skew_ms: i64,
    /// What its wall clock reads now, skew included, in ms since the Unix epoch.
    pub wall_clock_ms: u64,
    /// Whether its storage writes are held.
    #[serde(default)]
    pub storage_stall: bool,
    /// Whether its reads of user data are held.
    #[serde(default)]
    pub storage_read_stall: bool,
}

impl FaultState {
    /// The request that sets exactly these faults: change a field of it and post it to
    /// change one fault while keeping the others.
    pub fn request(&self) -> FaultRequest {
        FaultRequest {
            isolate_from: self.isolate_from.clone(),
            drop_to: self.drop_to.clone(),
            clock_skew_ms: (self.clock_skew_ms != 0).then_some(self.clock_skew_ms),
            storage_stall: self.storage_stall,
            storage_read_stall: self.storage_read_stall,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_requests_old_and_new() {
        let old: FaultRequest = serde_json::from_str(r#"{"isolate_from":["n2"]}"#).unwrap();
        assert_eq!(old, FaultRequest::isolate(vec!["n2".into()]));
        let new: FaultRequest =
            serde_json::from_str(r#"{"drop_to":["n3"],"clock_skew_ms":-250}"#).unwrap();
        assert_eq!(
            new,
            FaultRequest {
                isolate_from: vec![],
                drop_to: vec!["n3".into()],
                clock_skew_ms: Some(-250),
                storage_stall: false,
                storage_read_stall: false,
            }
        );
        assert_eq!(
            serde_json::from_str::<FaultRequest>("{}").unwrap(),
            FaultRequest::default()
        );
        assert!(serde_json::from_str::<FaultRequest>(r#"{"drop_too":["n3"]}"#).is_err());
        let state = FaultState {
            enabled: true,
            isolate_from: vec!["n2".into()],
            drop_to: vec!["n3".into()],
            clock_skew_ms: -250,
            wall_clock_ms: 1,
            storage_stall: true,
            storage_read_stall: true,
        };
        assert_eq!(
            state.request(),
            FaultRequest {
                isolate_from: vec!["n2".into()],
                storage_stall: true,
                storage_read_stall: true,
                ..new
            }
        );
    }

    fn spec(json: &str) -> Result<KeyspaceSpec, ApiError> {
        serde_json::from_str::<KeyspaceSpec>(json)
            .unwrap()
            .normalized()
    }

    #[test]
    fn ap_spec_gets_dynamo_defaults() {
        let s = spec(r#"{"name":"cart","mode":"ap"}"#).unwrap();
        assert_eq!((s.n, s.r, s.w), (Some(3), Some(1), Some(1)));
    }

    #[test]
    fn cp_spec_json_omits_ap_fields() {
        let s = spec(r#"{"name":"bank","mode":"cp"}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"name":"bank","mode":"cp"}"#
        );
        let a = spec(r#"{"name":"cart","mode":"ap"}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"name":"cart","mode":"ap","n":3,"r":1,"w":1,"type":"register"}"#
        );
    }

    #[test]
    fn typed_specs() {
        let c = spec(r#"{"name":"stock","mode":"ap","type":"counter"}"#).unwrap();
        assert_eq!(c.value_type, Some(ValueType::Counter));
        assert!(spec(r#"{"name":"bank","mode":"cp","type":"counter"}"#).is_err());
        assert!(
            serde_json::from_str::<KeyspaceSpec>(r#"{"name":"x","mode":"ap","type":"map"}"#)
                .is_err()
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        assert!(spec(r#"{"name":"bank","mode":"cp","n":3}"#).is_err());
        assert!(spec(r#"{"name":"cart","mode":"ap","n":3,"r":4}"#).is_err());
        assert!(spec(r#"{"name":"cart","mode":"ap","w":0}"#).is_err());
        assert!(spec(r#"{"name":"","mode":"cp"}"#).is_err());
        assert!(serde_json::from_str::<KeyspaceSpec>(r#"{"name":"x","mode":"ca"}"#).is_err());
    }

    #[test]
    fn scan_entries_carry_any_bytes() {
        let e = ScanEntry::new(b"k", &[0xff, 0x00], 7);
        assert_eq!(e.key.as_deref(), Some("k"));
        assert!(e.value.is_none());
        assert_eq!(e.value_bytes(), vec![0xff, 0x00]);
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, r#"{"key":"k","value_base64":"/wA=","version":7}"#);
    }
}

/// What a user may do with a keyspace. Each role includes the ones before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read keys, scan, list keyspaces.
    Read,
    /// Also write and delete keys.
    Readwrite,
    /// Also create keyspaces; on every keyspace (`*`), also manage users and faults.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "read" => Ok(Role::Read),
            "readwrite" => Ok(Role::Readwrite),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("unknown role '{s}': read, readwrite or admin")),
        }
    }
}

/// The keyspace name a grant uses for "every keyspace".
pub const ALL_KEYSPACES: &str = "*";

/// A role on one keyspace, or on every keyspace (`*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub role: Role,
    /// A keyspace name, or `*` (the default) for every keyspace.
    #[serde(default = "all_keyspaces")]
    #[schema(pattern = "^([*]|[A-Za-z0-9_-]{1,64})$")]
    pub keyspace: String,
}

fn all_keyspaces() -> String {
    ALL_KEYSPACES.to_owned()
}

impl std::str::FromStr for Grant {
    type Err = String;
    /// `ROLE` (every keyspace) or `ROLE:KEYSPACE`, as `capkv user add --role` takes it.
    fn from_str(s: &str) -> Result<Grant, String> {
        let (role, keyspace) = s.split_once(':').unwrap_or((s, ALL_KEYSPACES));
        Ok(Grant {
            role: role.parse()?,
            keyspace: keyspace.to_owned(),
        })
    }
}

/// `POST /v1/users`: a user to create (or replace, with a new token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub name: String,
    #[schema(min_items = 1, max_items = 64)]
    pub grants: Vec<Grant>,
}

/// Most grants one user may hold.
pub const MAX_GRANTS: usize = 64;

impl UserSpec {
    /// Checks the name (as a keyspace name) and every grant's keyspace.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate::keyspace_name(&self.name)
            .map_err(|e| ApiError::bad_request(format!("user {}", e.message)))?;
        if self.grants.is_empty() || self.grants.len() > MAX_GRANTS {
            return Err(ApiError::bad_request(format!(
                "a user needs 1 to {MAX_GRANTS} grants"
            )));
        }
        for g in &self.grants {
            if g.keyspace != ALL_KEYSPACES {
                validate::keyspace_name(&g.keyspace)?;
            }
        }
        Ok(())
    }

    /// Whether these grants allow `role` on `keyspace` (`None`: on every keyspace).
    pub fn allows(&self, role: Role, keyspace: Option<&str>) -> bool {
        self.grants.iter().any(|g| {
            g.role >= role && (g.keyspace == ALL_KEYSPACES || Some(g.keyspace.as_str()) == keyspace)
        })
    }
}

/// The answer to `POST /v1/users`: the user and its bearer token, shown this once (the
/// cluster keeps only a hash of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewUser {
    pub name: String,
    pub grants: Vec<Grant>,
    pub token: String,
}
