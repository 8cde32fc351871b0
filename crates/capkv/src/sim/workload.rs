//! The simulated clients: the workloads of `capkv check` (cp register, unique-insert and
//! idempotent; ap counter, set and siblings), sent through each node's real HTTP router,
//! and recorded as histories the `capkv-check` checkers read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::Method;
use capkv_check::{Call, History, NemesisEvent, Op, Outcome, Ret, RunInfo};
use capkv_core::{ErrorBody, ScanEntry, Siblings};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cluster::{Answer, Cluster, NoAnswer};
use crate::check::{page_reads, scan_read_op};
use crate::rt::Instant;

/// Members added to one set key before the set workload moves to fresh keys: a set is one
/// object that every add rewrites and copies, so unbounded sets would measure write
/// amplification (and slow the simulation) rather than correctness (as in `capkv check`).
const SET_MEMBERS_PER_KEY: u64 = 100;

/// How long a client waits for an answer before it gives up (outcome unknown): longer
/// than the server's default deadline (2 s), so the server's own answer comes first.
const CLIENT_WAIT: Duration = Duration::from_secs(5);

/// How often `idempotent` retries a write whose outcome is unknown (as `capkv check`).
const IDEMPOTENT_RETRIES_MAX: u32 = 4;

/// Keys one page of the final `unique-insert` scan asks for.
const SCAN_PAGE: usize = 1000;

/// What the clients run: the workloads of `capkv check`, each in a keyspace of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// cp: reads, blind writes and CAS (by value and by version) on a few keys.
    Register,
    /// cp: `if_version=0` inserts of fresh keys, reads of keys tried before, and a final
    /// scan of them all (an insert answered as failed must not exist).
    UniqueInsert,
    /// cp: writes with an `Idempotency-Key`, retried through other nodes while their
    /// outcome is unknown (each must apply at most once); and reads.
    Idempotent,
    /// ap counter: increments and reads.
    Counter,
    /// ap set: unique adds and reads.
    Set,
    /// ap register: read, then write with the read's causal context; concurrent writes
    /// must stay as siblings, never be lost.
    Siblings,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Register,
        Kind::UniqueInsert,
        Kind::Idempotent,
        Kind::Counter,
        Kind::Set,
        Kind::Siblings,
    ];

    /// The workload's name, as `capkv check` and its checkers call it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Register => "register",
            Kind::UniqueInsert => "unique-insert",
            Kind::Idempotent => "idempotent",
            Kind::Counter => "counter",
            Kind::Set => "set",
            Kind::Siblings => "siblings",
        }
    }

    /// A number of its own, mixed into its clients' seeds: fixed per workload, so adding a
    /// workload does not change the schedules the others had (a seed kept as a regression
    /// test replays with the workloads it ran).
    pub fn seed_tag(self) -> u64 {
        match self {
            Kind::Register => 0,
            Kind::Counter => 1,
            Kind::Set => 2,
            Kind::UniqueInsert => 3,
            Kind::Idempotent => 4,
            Kind::Siblings => 5,
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn keyspace(self) -> &'static str {
        match self {
            Kind::Register => "sim_cp",
            Kind::UniqueInsert => "sim_unique",
            Kind::Idempotent => "sim_idem",
            Kind::Counter => "sim_counter",
            Kind::Set => "sim_set",
            Kind::Siblings => "sim_siblings",
        }
    }

    fn is_cp(self) -> bool {
        matches!(self, Kind::Register | Kind::UniqueInsert | Kind::Idempotent)
    }

    /// The body of `POST /v1/keyspaces`.
    fn spec(self) -> serde_json::Value {
        let name = self.keyspace();
        match self {
            _ if self.is_cp() => serde_json::json!({"name": name, "mode": "cp"}),
            Kind::Counter => serde_json::json!({"name": name, "mode": "ap", "type": "counter"}),
            Kind::Set => serde_json::json!({"name": name, "mode": "ap", "type": "set"}),
            _ => serde_json::json!({"name": name, "mode": "ap", "type": "register"}),
        }
    }
}

/// One workload's history as it is recorded.
#[derive(Default)]
struct Recorder {
    ops: Mutex<Vec<Op>>,
    next_id: AtomicU64,
    /// When its last write succeeded (simulated µs).
    last_ok_write_us: AtomicU64,
    final_at_us: Mutex<Option<u64>>,
}

/// Everything the clients share.
pub struct Clients {
    cluster: Arc<Cluster>,
    recorders: BTreeMap<Kind, Recorder>,
    pub stop: AtomicBool,
    keys: u32,
    /// Unique values handed out so far.
    next_value: AtomicU64,
    /// Adds the set workload has sent.
    set_adds: AtomicU64,
    /// Every key `unique-insert` tried to insert.
    inserted: Mutex<Vec<String>>,
}

/// One client's own state.
struct ClientState {
    id: u64,
    rng: StdRng,
    /// register: the last value and version read of each key (for CAS).
    last: BTreeMap<String, (String, u64)>,
    /// siblings: per key, the context its last write returned and the values it covers.
    chained: BTreeMap<String, (String, Vec<String>)>,
}

/// One operation in flight.
struct Pending {
    kind: Kind,
    id: u64,
    client: u64,
    node: usize,
    key: String,
    call: Call,
    invoke_us: u64,
}

/// What an ap register read found: the sorted sibling values (empty: absent), and the
/// context to write with.
struct ApRegister {
    values: Vec<String>,
    context: Option<String>,
}

impl Clients {
    /// The clients of the workloads `kinds`.
    pub fn new(cluster: Arc<Cluster>, keys: u32, kinds: &[Kind]) -> Arc<Clients> {
        Arc::new(Clients {
            cluster,
            recorders: kinds.iter().map(|k| (*k, Recorder::default())).collect(),
            stop: AtomicBool::new(false),
            keys,
            next_value: AtomicU64::new(0),
            set_adds: AtomicU64::new(0),
            inserted: Mutex::new(Vec::new()),
        })
    }

    /// The workloads these clients run.
    pub fn kinds(&self) -> Vec<Kind> {
        self.recorders.keys().copied().collect()
    }

    fn now_us(&self) -> u64 {
        self.cluster.trace.now_us()
    }

    /// Creates every workload's keyspace, through one node after another, retrying until
    /// `deadline`.
    pub async fn create_keyspaces(&self, deadline: Instant) -> Result<(), String> {
        for kind in self.kinds() {
            let body = kind.spec().to_string().into_bytes();
            let mut i = 0;
            loop {
                let r = self
                    .cluster
                    .request(
                        i,
                        Method::POST,
                        "/v1/keyspaces",
                        Some(body.clone()),
                        CLIENT_WAIT,
                    )
                    .await;
                match r {
                    Ok(a) if a.status.is_success() || a.status.as_u16() == 409 => break,
                    other => {
                        if Instant::now() > deadline {
                            return Err(format!(
                                "creating keyspace {}: {}",
                                kind.keyspace(),
                                describe(&other)
                            ));
                        }
                        i = (i + 1) % self.cluster.nodes.len();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
        Ok(())
    }

    fn begin(&self, kind: Kind, client: u64, node: usize, key: String, call: Call) -> Pending {
        let rec = &self.recorders[&kind];
        let id = rec.next_id.fetch_add(1, Ordering::Relaxed);
        let invoke_us = self.now_us();
        self.cluster.trace.event(format_args!(
            "invoke {} #{id} c{client} n{} {key} {}",
            kind.name(),
            node + 1,
            call.describe()
        ));
        Pending {
            kind,
            id,
            client,
            node,
            key,
            call,
            invoke_us,
        }
    }

    /// Records the end of an operation: what the answer (or its absence) means.
    fn end(&self, p: Pending, r: &Result<Answer, NoAnswer>, ret: Option<Ret>) -> Outcome {
        let (mut outcome, status, error) = match r {
            Ok(a) if a.status.is_success() => (Outcome::Ok, None, None),
            Ok(a) => {
                let s = a.status.as_u16();
                let outcome = match s {
                    // capkv's 4xx and 503 promise the operation did not take effect.
                    400..=499 | 503 => Outcome::Fail,
                    _ => Outcome::Unknown,
                };
                let msg = String::from_utf8_lossy(&a.body).chars().take(200).collect();
                (outcome, Some(s), Some(msg))
            }
            Err(NoAnswer::Refused) => (Outcome::Fail, None, Some("connection refused".into())),
            Err(NoAnswer::Lost(why)) => (Outcome::Unknown, None, Some((*why).to_owned())),
        };
        let mut ret = if outcome == Outcome::Ok { ret } else { None };
        let conditional = matches!(
            p.call,
            Call::Put {
                if_version: Some(_),
                ..
            } | Call::Put {
                if_value: Some(_),
                ..
            }
        );
        if status == Some(409) && conditional {
            ret = Some(Ret::Mismatch);
        }
        if outcome == Outcome::Ok && ret.is_none() && !p.call.is_write() {
            // An answer a read cannot be made of (never expected): it tells nothing.
            outcome = Outcome::Unknown;
        }
        let complete_us = self.now_us();
        let rec = &self.recorders[&p.kind];
        if outcome == Outcome::Ok && p.call.is_write() {
            rec.last_ok_write_us
                .fetch_max(complete_us, Ordering::Relaxed);
        }
        let op = Op {
            id: p.id,
            client: p.client,
            node: self.cluster.nodes[p.node].name.clone(),
            key: p.key,
            call: p.call,
            invoke_us: p.invoke_us,
            complete_us: Some(complete_us),
            outcome,
            ret,
            status,
            error,
        };
        self.record(p.kind, op);
        outcome
    }

    fn record(&self, kind: Kind, op: Op) {
        self.cluster
            .trace
            .event(format_args!("complete {} {}", kind.name(), op.describe()));
        let rec = &self.recorders[&kind];
        rec.ops.lock().expect("recorder lock poisoned").push(op);
    }

    /// When `kind` last had a write succeed (simulated µs since the start).
    pub fn last_ok_write_us(&self, kind: Kind) -> u64 {
        self.recorders[&kind]
            .last_ok_write_us
            .load(Ordering::Relaxed)
    }

    fn unique(&self, client: u64) -> String {
        format!(
            "{client}-{}",
            self.next_value.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn nodes(&self) -> usize {
        self.cluster.nodes.len()
    }

    /// Runs one client of `kind` until told to stop.
    pub async fn client_loop(self: Arc<Self>, kind: Kind, client: u64, seed: u64) {
        let mut st = ClientState {
            id: client,
            rng: StdRng::seed_from_u64(seed),
            last: BTreeMap::new(),
            chained: BTreeMap::new(),
        };
        while !self.stop.load(Ordering::Relaxed) {
            let node = st.rng.gen_range(0..self.nodes());
            let outcome = match kind {
                Kind::Register => self.register_op(&mut st, node).await,
                Kind::UniqueInsert => self.unique_insert_op(&mut st, node).await,
                Kind::Idempotent => self.idempotent_op(&mut st, node).await,
                Kind::Counter => self.counter_op(&mut st, node).await,
                Kind::Set => self.set_op(&mut st, node).await,
                Kind::Siblings => self.siblings_op(&mut st, node).await,
            };
            let think = if outcome == Outcome::Ok {
                Duration::from_millis(st.rng.gen_range(0..20))
            } else {
                Duration::from_millis(50)
            };
            tokio::time::sleep(think).await;
        }
    }

    fn path(kind: Kind, key: &str) -> String {
        format!("/v1/kv/{}/{key}", kind.keyspace())
    }

    async fn get(&self, node: usize, path: &str) -> Result<Answer, NoAnswer> {
        self.cluster
            .request(node, Method::GET, path, None, CLIENT_WAIT)
            .await
    }

    /// A linearizable read of a cp key; also returns the value and version it saw.
    async fn cp_read(
        &self,
        kind: Kind,
        client: u64,
        node: usize,
        key: &str,
    ) -> (Outcome, Option<(String, u64)>) {
        let p = self.begin(kind, client, node, key.to_owned(), Call::Read);
        let r = self.get(node, &Self::path(kind, key)).await;
        let seen = match &r {
            Ok(a) if a.status.is_success() => {
                let version = a
                    .headers
                    .get("x-capkv-version")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                version.map(|v| (String::from_utf8_lossy(&a.body).into_owned(), v))
            }
            _ => None,
        };
        let (r, absent) = absent_as_answer(r);
        let ret = if absent {
            Some(Ret::Value {
                value: None,
                version: None,
            })
        } else {
            seen.as_ref().map(|(v, ver)| Ret::Value {
                value: Some(v.clone()),
                version: Some(*ver),
            })
        };
        (self.end(p, &r, ret), seen)
    }

    /// A put to a cp key, recorded as `call` (a `Call::Put`).
    async fn cp_put(
        &self,
        kind: Kind,
        client: u64,
        node: usize,
        key: String,
        call: Call,
    ) -> Outcome {
        let Call::Put {
            value,
            if_version,
            if_value,
            idempotency_key,
        } = &call
        else {
            unreachable!("cp_put records puts only");
        };
        let mut path = Self::path(kind, &key);
        if let Some(v) = if_version {
            path.push_str(&format!("?if_version={v}"));
        } else if let Some(v) = if_value {
            path.push_str(&format!("?if_value={v}"));
        }
        let headers: Vec<(&str, String)> = idempotency_key
            .iter()
            .map(|k| ("idempotency-key", k.clone()))
            .collect();
        let body = value.clone().into_bytes();
        let p = self.begin(kind, client, node, key, call);
        let r = self
            .cluster
            .request_with(node, Method::PUT, &path, Some(body), &headers, CLIENT_WAIT)
            .await;
        let version = r.as_ref().ok().and_then(|a| {
            serde_json::from_slice::<serde_json::Value>(&a.body)
                .ok()?
                .get("version")?
                .as_u64()
        });
        self.end(p, &r, Some(Ret::Written { version }))
    }

    /// register: reads, blind writes, CAS by value and by version on a few keys.
    async fn register_op(&self, st: &mut ClientState, node: usize) -> Outcome {
        let key = format!("r{}", st.rng.gen_range(0..self.keys));
        let dice: f64 = st.rng.gen();
        if dice < 0.5 {
            let (outcome, seen) = self.cp_read(Kind::Register, st.id, node, &key).await;
            if let Some(seen) = seen {
                st.last.insert(key, seen);
            }
            return outcome;
        }
        let value = self.unique(st.id);
        let (if_version, if_value) = match (dice, st.last.get(&key).cloned()) {
            (d, _) if d < 0.75 => (None, None),
            (d, Some((v, _))) if d < 0.9 => (None, Some(v)),
            (_, Some((_, ver))) => (Some(ver), None),
            (_, None) => (Some(0), None),
        };
        let call = Call::Put {
            value,
            if_version,
            if_value,
            idempotency_key: None,
        };
        self.cp_put(Kind::Register, st.id, node, key, call).await
    }

    /// unique-insert: `if_version=0` inserts of fresh keys, and reads of keys tried before.
    async fn unique_insert_op(&self, st: &mut ClientState, node: usize) -> Outcome {
        let earlier = {
            let inserted = self.inserted.lock().expect("inserted lock poisoned");
            (st.rng.gen::<f64>() < 0.2 && !inserted.is_empty())
                .then(|| inserted[st.rng.gen_range(0..inserted.len())].clone())
        };
        if let Some(key) = earlier {
            return self.cp_read(Kind::UniqueInsert, st.id, node, &key).await.0;
        }
        let value = self.unique(st.id);
        let key = format!("u{value}");
        self.inserted
            .lock()
            .expect("inserted lock poisoned")
            .push(key.clone());
        let call = Call::Put {
            value,
            if_version: Some(0),
            if_value: None,
            idempotency_key: None,
        };
        self.cp_put(Kind::UniqueInsert, st.id, node, key, call)
            .await
    }

    /// idempotent: writes with an Idempotency-Key, retried through other nodes while their
    /// outcome is unknown; and reads.
    async fn idempotent_op(&self, st: &mut ClientState, mut node: usize) -> Outcome {
        let key = format!("i{}", st.rng.gen_range(0..self.keys));
        if st.rng.gen::<f64>() < 0.4 {
            return self.cp_read(Kind::Idempotent, st.id, node, &key).await.0;
        }
        let value = self.unique(st.id);
        let idem = format!("sim-{value}");
        let mut outcome = Outcome::Unknown;
        for attempt in 0..=IDEMPOTENT_RETRIES_MAX {
            let call = Call::Put {
                value: value.clone(),
                if_version: None,
                if_value: None,
                idempotency_key: Some(idem.clone()),
            };
            outcome = self
                .cp_put(Kind::Idempotent, st.id, node, key.clone(), call)
                .await;
            if outcome != Outcome::Unknown || self.stop.load(Ordering::Relaxed) {
                break;
            }
            // Retry through another node, as a client that lost its connection would.
            if self.nodes() > 1 {
                node = (node + 1 + st.rng.gen_range(0..self.nodes() - 1)) % self.nodes();
            }
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt + 1))).await;
        }
        outcome
    }

    async fn counter_op(&self, st: &mut ClientState, node: usize) -> Outcome {
        let key = format!("c{}", st.rng.gen_range(0..self.keys));
        if st.rng.gen::<f64>() < 0.1 {
            return self
                .ap_read(Kind::Counter, st.id, node, &key, false)
                .await
                .0;
        }
        let by = st.rng.gen_range(1..=3);
        let p = self.begin(Kind::Counter, st.id, node, key.clone(), Call::Incr { by });
        let path = format!("{}/incr", Self::path(Kind::Counter, &key));
        let body = serde_json::json!({ "by": by }).to_string().into_bytes();
        let r = self
            .cluster
            .request(node, Method::POST, &path, Some(body), CLIENT_WAIT)
            .await;
        self.end(p, &r, None)
    }

    /// The set keys of generation `g` (see [`SET_MEMBERS_PER_KEY`]).
    fn set_key(&self, generation: u64, k: u32) -> String {
        format!("s{generation}-{k}")
    }

    fn set_generation(&self, adds: u64) -> u64 {
        adds / (SET_MEMBERS_PER_KEY * u64::from(self.keys))
    }

    async fn set_op(&self, st: &mut ClientState, node: usize) -> Outcome {
        let adds = self.set_adds.fetch_add(1, Ordering::Relaxed);
        let key = self.set_key(self.set_generation(adds), st.rng.gen_range(0..self.keys));
        if st.rng.gen::<f64>() < 0.1 {
            return self.ap_read(Kind::Set, st.id, node, &key, false).await.0;
        }
        let member = self.unique(st.id);
        let call = Call::SetAdd {
            member: member.clone(),
        };
        let p = self.begin(Kind::Set, st.id, node, key.clone(), call);
        let path = format!("{}/add", Self::path(Kind::Set, &key));
        let body = serde_json::json!({ "members": [member] })
            .to_string()
            .into_bytes();
        let r = self
            .cluster
            .request(node, Method::POST, &path, Some(body), CLIENT_WAIT)
            .await;
        self.end(p, &r, None)
    }

    /// siblings: read a register, then write a new value with the read's context (it
    /// replaces what the read showed); sometimes write again with the context the last
    /// write returned (it replaces what that write's context covered, and that write).
    async fn siblings_op(&self, st: &mut ClientState, node: usize) -> Outcome {
        let key = format!("a{}", st.rng.gen_range(0..self.keys));
        let (context, seen) = match st.chained.remove(&key) {
            Some((context, covered)) if st.rng.gen::<f64>() < 0.3 => (Some(context), covered),
            _ => {
                let (outcome, _, got) =
                    self.ap_read(Kind::Siblings, st.id, node, &key, false).await;
                let Some(got) = got else {
                    return outcome;
                };
                (got.context, got.values)
            }
        };
        let value = self.unique(st.id);
        let mut covered = seen.clone();
        covered.push(value.clone());
        let call = Call::ApWrite {
            value: value.clone(),
            seen,
        };
        let headers: Vec<(&str, String)> = context
            .into_iter()
            .map(|c| ("x-capkv-context", c))
            .collect();
        let p = self.begin(Kind::Siblings, st.id, node, key.clone(), call);
        let r = self
            .cluster
            .request_with(
                node,
                Method::PUT,
                &Self::path(Kind::Siblings, &key),
                Some(value.into_bytes()),
                &headers,
                CLIENT_WAIT,
            )
            .await;
        let written = r
            .as_ref()
            .ok()
            .filter(|a| a.status.is_success())
            .and_then(|a| serde_json::from_slice::<capkv_core::ApWriteResponse>(&a.body).ok());
        if let Some(w) = written {
            st.chained.insert(key, (w.context, covered));
        }
        self.end(p, &r, None)
    }

    /// Reads an ap key of `kind` at node `node` (r = 1, the keyspace's default; or every
    /// replica with `?r=3`). A register's read also returns its context.
    async fn ap_read(
        &self,
        kind: Kind,
        client: u64,
        node: usize,
        key: &str,
        every_replica: bool,
    ) -> (Outcome, Option<Ret>, Option<ApRegister>) {
        let call = match kind {
            Kind::Counter => Call::CounterRead,
            Kind::Set => Call::SetRead,
            _ => Call::ApRead,
        };
        let p = self.begin(kind, client, node, key.to_owned(), call);
        let mut path = Self::path(kind, key);
        if every_replica {
            path.push_str(&format!("?r={}", self.nodes().min(3)));
        }
        let r = self.get(node, &path).await;
        let context = r.as_ref().ok().and_then(|a| {
            a.headers
                .get("x-capkv-context")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        let register = match &r {
            Ok(a) if kind == Kind::Siblings => ap_register(a, context),
            _ => None,
        };
        // 300 (siblings) is an answer too.
        let r = match r {
            Ok(mut a) if a.status.as_u16() == 300 && register.is_some() => {
                a.status = axum::http::StatusCode::OK;
                Ok(a)
            }
            other => other,
        };
        let (r, absent) = absent_as_answer(r);
        let ret = match &r {
            _ if absent => Some(match kind {
                Kind::Counter => Ret::Counter { value: 0 },
                Kind::Set => Ret::Members {
                    members: Vec::new(),
                },
                _ => Ret::Siblings { values: Vec::new() },
            }),
            Ok(a) if a.status.is_success() => match kind {
                Kind::Counter => serde_json::from_slice::<serde_json::Value>(&a.body)
                    .ok()
                    .and_then(|v| v.get("value")?.as_i64())
                    .map(|value| Ret::Counter { value }),
                Kind::Set => serde_json::from_slice::<serde_json::Value>(&a.body)
                    .ok()
                    .and_then(|v| {
                        let mut members: Vec<String> = v
                            .get("members")?
                            .as_array()?
                            .iter()
                            .filter_map(|s| s.as_str().map(str::to_owned))
                            .collect();
                        members.sort();
                        Some(Ret::Members { members })
                    }),
                _ => register.as_ref().map(|g| Ret::Siblings {
                    values: g.values.clone(),
                }),
            },
            _ => None,
        };
        let outcome = self.end(p, &r, ret.clone());
        (outcome, ret, register.filter(|_| outcome == Outcome::Ok))
    }

    /// The final phase: every cp key read (`unique-insert`'s by a scan of them all), then
    /// every ap key read from every node (from every replica, and at r = 1) until all
    /// answers agree and no node holds a hint, or `limit` passes. Returns what failed: a cp
    /// key no node would read (the healed cluster must serve), an unfinished scan, or ap
    /// replicas that did not converge.
    pub async fn final_reads(&self, limit: Duration) -> Vec<String> {
        let at = self.now_us();
        for rec in self.recorders.values() {
            *rec.final_at_us.lock().expect("recorder lock poisoned") = Some(at);
        }
        self.cluster.trace.event(format_args!("final phase"));
        let deadline = Instant::now() + limit;
        let kinds = self.kinds();
        let checker = u64::MAX;
        let mut problems = Vec::new();
        for kind in [Kind::Register, Kind::Idempotent] {
            if !kinds.contains(&kind) {
                continue;
            }
            let prefix = if kind == Kind::Register { "r" } else { "i" };
            for k in 0..self.keys {
                let key = format!("{prefix}{k}");
                // Read at every node; then, until one answers, again (the cluster healed).
                let mut answered = false;
                for node in 0..self.nodes() {
                    answered |= self
                        .cp_read(kind, checker - node as u64, node, &key)
                        .await
                        .0
                        == Outcome::Ok;
                }
                let mut node = 0;
                while !answered && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    node = (node + 1) % self.nodes();
                    answered = self
                        .cp_read(kind, checker - node as u64, node, &key)
                        .await
                        .0
                        == Outcome::Ok;
                }
                if !answered {
                    problems.push(format!(
                        "{}: no node answered a final read of key {key} within {limit:?} of \
                         every fault healed",
                        kind.name()
                    ));
                }
            }
        }
        if kinds.contains(&Kind::UniqueInsert) {
            let mut scanned = self.final_scan().await;
            while !scanned && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                scanned = self.final_scan().await;
            }
            if !scanned {
                problems.push(format!(
                    "unique-insert: the final scan of the keys tried did not complete within \
                     {limit:?} of every fault healed"
                ));
            }
        }
        if !self.ap_converged(deadline).await {
            problems.push(format!(
                "ap replicas did not converge within {limit:?} of every fault healed"
            ));
        }
        problems
    }

    /// Reads every ap key at every node, until all answers agree and no hint is left, or
    /// `deadline`; whether they did.
    async fn ap_converged(&self, deadline: Instant) -> bool {
        let kinds = self.kinds();
        let checker = u64::MAX;
        loop {
            let mut keys: Vec<(Kind, String)> = Vec::new();
            if kinds.contains(&Kind::Counter) {
                keys.extend((0..self.keys).map(|k| (Kind::Counter, format!("c{k}"))));
            }
            if kinds.contains(&Kind::Set) {
                let last = self.set_generation(self.set_adds.load(Ordering::Relaxed));
                for g in 0..=last {
                    keys.extend((0..self.keys).map(|k| (Kind::Set, self.set_key(g, k))));
                }
            }
            if kinds.contains(&Kind::Siblings) {
                keys.extend((0..self.keys).map(|k| (Kind::Siblings, format!("a{k}"))));
            }
            // Agreement is convergence only if no write waited as a hint while the answers
            // were read: reads go to the homes, so a write that a node took while it reached
            // none of them (kept as hints for them, acknowledged at w=1) is in no answer
            // until handed off. Counted before the reads (a handoff during them may come
            // after a key was read) and after.
            let hints_before: Vec<u64> =
                self.cluster.nodes.iter().map(|n| n.hints_held()).collect();
            let mut agree = true;
            for (kind, key) in keys {
                let mut answers = Vec::new();
                for node in 0..self.nodes() {
                    for every in [true, false] {
                        let client = checker - node as u64;
                        answers.push(self.ap_read(kind, client, node, &key, every).await.1);
                    }
                }
                if answers.iter().any(Option::is_none) || answers.windows(2).any(|w| w[0] != w[1]) {
                    agree = false;
                }
            }
            let hints: Vec<u64> = self.cluster.nodes.iter().map(|n| n.hints_held()).collect();
            let hinted: u64 = hints_before.iter().chain(&hints).sum();
            self.cluster.trace.event(format_args!(
                "final round: answers {}, hints held before {hints_before:?}, after {hints:?}",
                if agree { "agree" } else { "differ" }
            ));
            if agree && hinted == 0 {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Scans every key `unique-insert` tried, page by page, and records for each a read:
    /// each page is one linearizable read of every key in its range, so a key in the range
    /// that the page does not list was absent. Returns false if a page failed (the pages
    /// recorded so far stay: each was a correct read).
    async fn final_scan(&self) -> bool {
        let mut tried = self
            .inserted
            .lock()
            .expect("inserted lock poisoned")
            .clone();
        tried.sort();
        let mut after: Option<String> = None;
        let mut i = 0; // the next tried key to account for
        let mut pages = 0usize;
        while i < tried.len() {
            let node = pages % self.nodes();
            pages += 1;
            let mut path = format!(
                "/v1/kv/{}?prefix=u&limit={SCAN_PAGE}",
                Kind::UniqueInsert.keyspace()
            );
            if let Some(a) = &after {
                path.push_str(&format!("&after={a}"));
            }
            let invoke_us = self.now_us();
            let r = self.get(node, &path).await;
            let complete_us = self.now_us();
            let Ok(a) = r.as_ref() else {
                return false;
            };
            let Ok(entries) = serde_json::from_slice::<Vec<ScanEntry>>(&a.body) else {
                return false;
            };
            if !a.status.is_success() {
                return false;
            }
            let more = a.headers.get("x-capkv-more").is_some_and(|v| v == "true");
            let last = entries.last().and_then(|e| e.key.clone());
            let Some(reads) = page_reads(&tried, &mut i, &entries, more) else {
                return false;
            };
            let rec = &self.recorders[&Kind::UniqueInsert];
            for read in reads {
                let id = rec.next_id.fetch_add(1, Ordering::Relaxed);
                let name = self.cluster.nodes[node].name.clone();
                let op = scan_read_op(id, node, name, read, (invoke_us, complete_us));
                self.record(Kind::UniqueInsert, op);
            }
            if !more {
                break;
            }
            after = last;
        }
        true
    }

    /// The history of `kind`, for its checker.
    pub fn history(&self, kind: Kind, seed: u64, nemesis: &[NemesisEvent]) -> History {
        let rec = &self.recorders[&kind];
        let mut ops = rec.ops.lock().expect("recorder lock poisoned").clone();
        ops.sort_by_key(|o| (o.invoke_us, o.id));
        History {
            info: RunInfo {
                workload: kind.name().into(),
                nemesis: Vec::new(),
                seed,
                nodes: self.cluster.names(),
                clients: 0,
                duration_s: 0,
                keyspace: kind.keyspace().into(),
            },
            ops,
            nemesis: nemesis.to_vec(),
            final_at_us: *rec.final_at_us.lock().expect("recorder lock poisoned"),
        }
    }
}

/// A 404 that says the key is absent is an answer (a read of nothing); a 404 for an
/// unknown keyspace is not. Returns the answer as a success if so, and whether it was.
fn absent_as_answer(r: Result<Answer, NoAnswer>) -> (Result<Answer, NoAnswer>, bool) {
    match r {
        Ok(mut a) if a.status.as_u16() == 404 => {
            let absent = serde_json::from_slice::<ErrorBody>(&a.body)
                .is_ok_and(|b| b.error.message.starts_with("key not found"));
            if absent {
                a.status = axum::http::StatusCode::OK;
            }
            (Ok(a), absent)
        }
        other => (other, false),
    }
}

/// What an ap register read answered: 200 one value, 300 siblings, 404 absent (maybe
/// with the context of a delete).
fn ap_register(a: &Answer, context: Option<String>) -> Option<ApRegister> {
    let mut values = match a.status.as_u16() {
        200 => vec![String::from_utf8_lossy(&a.body).into_owned()],
        300 => {
            let s: Siblings = serde_json::from_slice(&a.body).ok()?;
            let mut values: Vec<String> = s
                .siblings
                .iter()
                .map(|v| String::from_utf8_lossy(&v.value_bytes()).into_owned())
                .collect();
            values.sort();
            return Some(ApRegister {
                values,
                context: Some(s.context),
            });
        }
        404 => Vec::new(),
        _ => return None,
    };
    values.sort();
    Some(ApRegister { values, context })
}

fn describe(r: &Result<Answer, NoAnswer>) -> String {
    match r {
        Ok(a) => format!("{} {}", a.status, String::from_utf8_lossy(&a.body)),
        Err(NoAnswer::Refused) => "refused".into(),
        Err(NoAnswer::Lost(why)) => (*why).into(),
    }
}
