//! The simulated clients: the workloads of `capkv check` (cp register, ap counter and
//! set), sent through each node's real HTTP router, and recorded as histories the
//! `capkv-check` checkers read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::Method;
use capkv_check::{Call, History, NemesisEvent, Op, Outcome, Ret, RunInfo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cluster::{Answer, Cluster, NoAnswer};
use crate::rt::Instant;

/// Members added to one set key before the set workload moves to fresh keys: a set is one
/// object that every add rewrites and copies, so unbounded sets would measure write
/// amplification (and slow the simulation) rather than correctness (as in `capkv check`).
const SET_MEMBERS_PER_KEY: u64 = 100;

/// How long a client waits for an answer before it gives up (outcome unknown): longer
/// than the server's default deadline (2 s), so the server's own answer comes first.
const CLIENT_WAIT: Duration = Duration::from_secs(5);

/// What the clients run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// cp: reads, blind writes and CAS (by value and by version) on a few keys.
    Register,
    /// ap counter: increments and reads.
    Counter,
    /// ap set: unique adds and reads.
    Set,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Register, Kind::Counter, Kind::Set];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Register => "register",
            Kind::Counter => "counter",
            Kind::Set => "set",
        }
    }

    pub fn keyspace(self) -> &'static str {
        match self {
            Kind::Register => "sim_cp",
            Kind::Counter => "sim_counter",
            Kind::Set => "sim_set",
        }
    }

    /// The body of `POST /v1/keyspaces`.
    fn spec(self) -> serde_json::Value {
        match self {
            Kind::Register => serde_json::json!({"name": self.keyspace(), "mode": "cp"}),
            Kind::Counter => {
                serde_json::json!({"name": self.keyspace(), "mode": "ap", "type": "counter"})
            }
            Kind::Set => serde_json::json!({"name": self.keyspace(), "mode": "ap", "type": "set"}),
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

impl Clients {
    pub fn new(cluster: Arc<Cluster>, keys: u32) -> Arc<Clients> {
        Arc::new(Clients {
            cluster,
            recorders: Kind::ALL
                .iter()
                .map(|k| (*k, Recorder::default()))
                .collect(),
            stop: AtomicBool::new(false),
            keys,
            next_value: AtomicU64::new(0),
            set_adds: AtomicU64::new(0),
        })
    }

    fn now_us(&self) -> u64 {
        self.cluster.trace.now_us()
    }

    /// Creates every workload's keyspace through node `i`, retrying until `deadline`.
    pub async fn create_keyspaces(&self, deadline: Instant) -> Result<(), String> {
        for kind in Kind::ALL {
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
        self.cluster
            .trace
            .event(format_args!("complete {} {}", p.kind.name(), op.describe()));
        rec.ops.lock().expect("recorder lock poisoned").push(op);
        outcome
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

    /// Runs one client of `kind` until told to stop.
    pub async fn client_loop(self: Arc<Self>, kind: Kind, client: u64, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut last: BTreeMap<String, (String, u64)> = BTreeMap::new();
        while !self.stop.load(Ordering::Relaxed) {
            let node = rng.gen_range(0..self.cluster.nodes.len());
            let outcome = match kind {
                Kind::Register => self.register_op(client, node, &mut rng, &mut last).await,
                Kind::Counter => self.counter_op(client, node, &mut rng).await,
                Kind::Set => self.set_op(client, node, &mut rng).await,
            };
            let think = if outcome == Outcome::Ok {
                Duration::from_millis(rng.gen_range(0..20))
            } else {
                Duration::from_millis(50)
            };
            tokio::time::sleep(think).await;
        }
    }

    async fn get(&self, node: usize, kind: Kind, key: &str) -> Result<Answer, NoAnswer> {
        let path = format!("/v1/kv/{}/{key}", kind.keyspace());
        self.cluster
            .request(node, Method::GET, &path, None, CLIENT_WAIT)
            .await
    }

    async fn cp_read(
        &self,
        client: u64,
        node: usize,
        key: &str,
    ) -> (Outcome, Option<(String, u64)>) {
        let p = self.begin(Kind::Register, client, node, key.to_owned(), Call::Read);
        let r = self.get(node, Kind::Register, key).await;
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
        let ret = match &r {
            Ok(a) if a.status.as_u16() == 404 => Some(Ret::Value {
                value: None,
                version: None,
            }),
            _ => seen.as_ref().map(|(v, ver)| Ret::Value {
                value: Some(v.clone()),
                version: Some(*ver),
            }),
        };
        // A 404 is an answer: the key is absent.
        let r = match r {
            Ok(mut a) if a.status.as_u16() == 404 => {
                a.status = axum::http::StatusCode::OK;
                Ok(a)
            }
            other => other,
        };
        (self.end(p, &r, ret), seen)
    }

    async fn register_op(
        &self,
        client: u64,
        node: usize,
        rng: &mut StdRng,
        last: &mut BTreeMap<String, (String, u64)>,
    ) -> Outcome {
        let key = format!("r{}", rng.gen_range(0..self.keys));
        let dice: f64 = rng.gen();
        if dice < 0.5 {
            let (outcome, seen) = self.cp_read(client, node, &key).await;
            if let Some(seen) = seen {
                last.insert(key, seen);
            }
            return outcome;
        }
        let value = self.unique(client);
        let (if_version, if_value) = match (dice, last.get(&key).cloned()) {
            (d, _) if d < 0.75 => (None, None),
            (d, Some((v, _))) if d < 0.9 => (None, Some(v)),
            (_, Some((_, ver))) => (Some(ver), None),
            (_, None) => (Some(0), None),
        };
        let mut path = format!("/v1/kv/{}/{key}", Kind::Register.keyspace());
        if let Some(v) = if_version {
            path.push_str(&format!("?if_version={v}"));
        } else if let Some(v) = &if_value {
            path.push_str(&format!("?if_value={v}"));
        }
        let call = Call::Put {
            value: value.clone(),
            if_version,
            if_value,
            idempotency_key: None,
        };
        let p = self.begin(Kind::Register, client, node, key, call);
        let r = self
            .cluster
            .request(
                node,
                Method::PUT,
                &path,
                Some(value.into_bytes()),
                CLIENT_WAIT,
            )
            .await;
        let version = r.as_ref().ok().and_then(|a| {
            serde_json::from_slice::<serde_json::Value>(&a.body)
                .ok()?
                .get("version")?
                .as_u64()
        });
        self.end(p, &r, Some(Ret::Written { version }))
    }

    async fn counter_op(&self, client: u64, node: usize, rng: &mut StdRng) -> Outcome {
        let key = format!("c{}", rng.gen_range(0..self.keys));
        if rng.gen::<f64>() < 0.1 {
            return self.ap_read(Kind::Counter, client, node, &key).await.0;
        }
        let by = rng.gen_range(1..=3);
        let p = self.begin(Kind::Counter, client, node, key.clone(), Call::Incr { by });
        let path = format!("/v1/kv/{}/{key}/incr", Kind::Counter.keyspace());
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

    async fn set_op(&self, client: u64, node: usize, rng: &mut StdRng) -> Outcome {
        let adds = self.set_adds.fetch_add(1, Ordering::Relaxed);
        let key = self.set_key(self.set_generation(adds), rng.gen_range(0..self.keys));
        if rng.gen::<f64>() < 0.1 {
            return self.ap_read(Kind::Set, client, node, &key).await.0;
        }
        let member = self.unique(client);
        let call = Call::SetAdd {
            member: member.clone(),
        };
        let p = self.begin(Kind::Set, client, node, key.clone(), call);
        let path = format!("/v1/kv/{}/{key}/add", Kind::Set.keyspace());
        let body = serde_json::json!({ "members": [member] })
            .to_string()
            .into_bytes();
        let r = self
            .cluster
            .request(node, Method::POST, &path, Some(body), CLIENT_WAIT)
            .await;
        self.end(p, &r, None)
    }

    /// Reads an ap counter or set at node `node` (r = 1, the keyspace's default; or
    /// every replica with `?r=3`).
    async fn ap_read_at(
        &self,
        kind: Kind,
        client: u64,
        node: usize,
        key: &str,
        every_replica: bool,
    ) -> (Outcome, Option<Ret>) {
        let call = match kind {
            Kind::Counter => Call::CounterRead,
            _ => Call::SetRead,
        };
        let p = self.begin(kind, client, node, key.to_owned(), call);
        let mut path = format!("/v1/kv/{}/{key}", kind.keyspace());
        if every_replica {
            path.push_str(&format!("?r={}", self.cluster.nodes.len().min(3)));
        }
        let r = self
            .cluster
            .request(node, Method::GET, &path, None, CLIENT_WAIT)
            .await;
        let ret = match &r {
            Ok(a) if a.status.as_u16() == 404 => Some(match kind {
                Kind::Counter => Ret::Counter { value: 0 },
                _ => Ret::Members {
                    members: Vec::new(),
                },
            }),
            Ok(a) if a.status.is_success() => {
                let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_default();
                match kind {
                    Kind::Counter => v
                        .get("value")
                        .and_then(|v| v.as_i64())
                        .map(|value| Ret::Counter { value }),
                    _ => v.get("members").and_then(|m| m.as_array()).map(|m| {
                        let mut members: Vec<String> = m
                            .iter()
                            .filter_map(|s| s.as_str().map(str::to_owned))
                            .collect();
                        members.sort();
                        Ret::Members { members }
                    }),
                }
            }
            _ => None,
        };
        let r = match r {
            Ok(mut a) if a.status.as_u16() == 404 => {
                a.status = axum::http::StatusCode::OK;
                Ok(a)
            }
            other => other,
        };
        (self.end(p, &r, ret.clone()), ret)
    }

    async fn ap_read(
        &self,
        kind: Kind,
        client: u64,
        node: usize,
        key: &str,
    ) -> (Outcome, Option<Ret>) {
        self.ap_read_at(kind, client, node, key, false).await
    }

    /// The final phase: every ap key read from every node (from every replica, and at
    /// r = 1) until all answers agree or `limit` passes; every cp key read once at every
    /// node. Returns whether the ap replicas converged.
    pub async fn final_reads(&self, limit: Duration) -> bool {
        let at = self.now_us();
        for rec in self.recorders.values() {
            *rec.final_at_us.lock().expect("recorder lock poisoned") = Some(at);
        }
        self.cluster.trace.event(format_args!("final phase"));
        let deadline = Instant::now() + limit;
        let nodes = self.cluster.nodes.len();
        let checker = u64::MAX;
        for k in 0..self.keys {
            for node in 0..nodes {
                self.cp_read(checker - node as u64, node, &format!("r{k}"))
                    .await;
            }
        }
        loop {
            let mut agree = true;
            let set_keys = (0..=self.set_generation(self.set_adds.load(Ordering::Relaxed)))
                .flat_map(|g| (0..self.keys).map(move |k| (g, k)))
                .map(|(g, k)| (Kind::Set, self.set_key(g, k)));
            let counter_keys = (0..self.keys).map(|k| (Kind::Counter, format!("c{k}")));
            for (kind, key) in counter_keys.chain(set_keys).collect::<Vec<_>>() {
                {
                    let mut answers = Vec::new();
                    for node in 0..nodes {
                        for every in [true, false] {
                            let client = checker - node as u64;
                            answers.push(self.ap_read_at(kind, client, node, &key, every).await.1);
                        }
                    }
                    if answers.iter().any(Option::is_none)
                        || answers.windows(2).any(|w| w[0] != w[1])
                    {
                        agree = false;
                    }
                }
            }
            if agree {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
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

fn describe(r: &Result<Answer, NoAnswer>) -> String {
    match r {
        Ok(a) => format!("{} {}", a.status, String::from_utf8_lossy(&a.body)),
        Err(NoAnswer::Refused) => "refused".into(),
        Err(NoAnswer::Lost(why)) => (*why).into(),
    }
}
