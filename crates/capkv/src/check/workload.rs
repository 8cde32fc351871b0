//! The clients of `capkv check`: each runs one operation at a time against a node it picks
//! at random, and records every operation with its outcome (see `capkv_check::history`).
//!
//! Values are unique (`{client}-{n}`), so a read names the write it saw. Keys carry the
//! run's tag, so runs against a long-lived cluster never read each other's data.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capkv_check::{Call, NemesisEvent, Op, Outcome, Record, Ret};
use capkv_client::{ApValue, Client, ClientError, Consistency, WriteOptions};
use capkv_core::ScanEntry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::Workload;

/// Records operations, in memory and (as JSON lines) in the run's history file.
pub struct Recorder {
    start: Instant,
    next_id: AtomicU64,
    ops: Mutex<Vec<Op>>,
    nemesis: Mutex<Vec<NemesisEvent>>,
    file: Mutex<std::io::BufWriter<std::fs::File>>,
    /// The first error writing the history file.
    write_error: Mutex<Option<String>>,
    /// ok, fail, unknown so far (for progress).
    pub counts: [AtomicU64; 3],
}

impl Recorder {
    pub fn new(file: std::fs::File) -> Recorder {
        Recorder {
            start: Instant::now(),
            next_id: AtomicU64::new(0),
            ops: Mutex::default(),
            nemesis: Mutex::default(),
            file: Mutex::new(std::io::BufWriter::new(file)),
            write_error: Mutex::default(),
            counts: Default::default(),
        }
    }

    /// Microseconds since the run started, on the monotonic clock.
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    pub fn write(&self, record: &Record) {
        let mut f = self.file.lock().expect("history file lock");
        let written = serde_json::to_writer(&mut *f, record)
            .map_err(std::io::Error::from)
            .and_then(|()| f.write_all(b"\n"));
        if let Err(e) = written {
            self.write_error
                .lock()
                .expect("write error lock")
                .get_or_insert(e.to_string());
        }
    }

    /// Flushes what was recorded so far to disk (so an interrupted run leaves its history).
    pub fn flush(&self) {
        if let Err(e) = self.file.lock().expect("history file lock").flush() {
            self.write_error
                .lock()
                .expect("write error lock")
                .get_or_insert(e.to_string());
        }
    }

    /// Flushes the history file; an error in any write so far fails the run (a history on
    /// disk that lacks operations would check as something it is not).
    pub fn finish(&self) -> Result<(), String> {
        let flushed = self.file.lock().expect("history file lock").flush();
        if let Some(e) = self.write_error.lock().expect("write error lock").take() {
            return Err(format!("cannot write the history: {e}"));
        }
        flushed.map_err(|e| format!("cannot write the history: {e}"))
    }

    /// Starts an operation: its id (in invoke order) and invoke time.
    fn invoke(&self) -> (u64, u64) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        (id, self.now_us())
    }

    fn complete(&self, op: Op) {
        let slot = match op.outcome {
            Outcome::Ok => 0,
            Outcome::Fail => 1,
            Outcome::Unknown => 2,
        };
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.write(&Record::Op(op.clone()));
        self.ops.lock().expect("ops lock").push(op);
    }

    pub fn nemesis(&self, event: NemesisEvent) {
        self.write(&Record::Nemesis(event.clone()));
        self.nemesis.lock().expect("nemesis lock").push(event);
    }

    pub fn take(&self) -> (Vec<Op>, Vec<NemesisEvent>) {
        let mut ops = std::mem::take(&mut *self.ops.lock().expect("ops lock"));
        ops.sort_by_key(|o| (o.invoke_us, o.id));
        let nemesis = std::mem::take(&mut *self.nemesis.lock().expect("nemesis lock"));
        (ops, nemesis)
    }
}

/// What an answer (or its absence) means for whether the operation took effect.
fn outcome_of<T>(r: &Result<T, ClientError>) -> (Outcome, Option<u16>, Option<String>) {
    match r {
        Ok(_) => (Outcome::Ok, None, None),
        Err(ClientError::Api {
            status,
            error,
            from_capkv,
        }) => {
            let outcome = match status {
                // capkv's 503 and every 4xx of capkv promise the operation did not take
                // effect; an answer that is not capkv's (a proxy) promises nothing.
                400..=499 | 503 if *from_capkv => Outcome::Fail,
                _ => Outcome::Unknown,
            };
            (outcome, Some(*status), Some(error.message.clone()))
        }
        // Never connected (or never sent): never delivered.
        Err(ClientError::Unreachable { last, .. }) => (Outcome::Fail, None, Some(last.clone())),
        Err(e @ ClientError::Invalid(_)) => (Outcome::Fail, None, Some(e.to_string())),
        Err(e @ (ClientError::Lost { .. } | ClientError::Decode(_))) => {
            (Outcome::Unknown, None, Some(e.to_string()))
        }
    }
}

/// Everything the clients share.
pub struct Ctx {
    pub workload: Workload,
    pub keyspace: String,
    /// Prefix of every key of this run.
    pub tag: String,
    pub keys: u32,
    pub node_ids: Vec<String>,
    /// One pinned client per node, in `node_ids` order.
    pub clients: Vec<Client>,
    pub recorder: Arc<Recorder>,
    pub stop: AtomicBool,
    /// Keys `unique-insert` has tried to insert.
    pub inserted: Mutex<Vec<String>>,
    /// Adds `set` has sent so far (it moves to fresh keys every `SET_MEMBERS_PER_KEY`).
    pub set_adds: AtomicU64,
}

/// Members the `set` workload adds to one key before it moves to fresh keys. A set is one
/// object that every add rewrites (and copies to every replica), so unbounded sets measure
/// write amplification rather than correctness; Jepsen's set workloads use many bounded keys
/// for the same reason.
const SET_MEMBERS_PER_KEY: u64 = 500;

impl Ctx {
    /// The `set` keys in use once `adds` adds were sent: `--keys` per generation.
    fn set_keys(&self, adds: u64) -> Vec<String> {
        let generations = adds / (SET_MEMBERS_PER_KEY * u64::from(self.keys)) + 1;
        (0..generations)
            .flat_map(|g| (0..self.keys).map(move |k| (g, k)))
            .map(|(g, k)| format!("{}s{g}-{k}", self.tag))
            .collect()
    }
}

/// One client's state: its id, its RNG and what it has seen.
pub struct ClientState {
    pub id: u64,
    rng: StdRng,
    n: u64,
    /// The last value and version this client saw per key (for CAS).
    last: HashMap<String, (String, u64)>,
    /// siblings: the context this client's last write of a key returned, and the values it
    /// covers (what that write's context covered, and the write itself).
    chained: HashMap<String, (String, Vec<String>)>,
}

impl ClientState {
    pub fn new(id: u64, seed: u64) -> ClientState {
        ClientState {
            id,
            rng: StdRng::seed_from_u64(seed ^ (id.wrapping_mul(0x9e37_79b9_7f4a_7c15))),
            n: 0,
            last: HashMap::new(),
            chained: HashMap::new(),
        }
    }

    fn unique(&mut self) -> String {
        self.n += 1;
        format!("{}-{}", self.id, self.n)
    }
}

/// One recorded operation in flight.
struct Pending<'a> {
    ctx: &'a Ctx,
    client: u64,
    node: usize,
    key: String,
    call: Call,
    id: u64,
    invoke_us: u64,
}

impl Ctx {
    fn begin(&self, st: &mut ClientState, key: &str, call: Call) -> Pending<'_> {
        let node = st.rng.gen_range(0..self.clients.len());
        self.begin_at(st.id, node, key, call)
    }

    fn begin_at(&self, client: u64, node: usize, key: &str, call: Call) -> Pending<'_> {
        let (id, invoke_us) = self.recorder.invoke();
        Pending {
            ctx: self,
            client,
            node,
            key: key.to_owned(),
            call,
            id,
            invoke_us,
        }
    }

    fn key(&self, prefix: &str, k: u32) -> String {
        format!("{}{prefix}{k}", self.tag)
    }
}

impl Pending<'_> {
    fn client(&self) -> &Client {
        &self.ctx.clients[self.node]
    }

    /// Records the operation; `ret` is what it learned when it succeeded.
    fn end<T>(self, r: &Result<T, ClientError>, ret: impl FnOnce(&T) -> Option<Ret>) -> Outcome {
        let (mut outcome, status, error) = outcome_of(r);
        let mut result = r.as_ref().ok().and_then(ret);
        let conditional = matches!(
            self.call,
            Call::Put {
                if_version: Some(_),
                ..
            } | Call::Put {
                if_value: Some(_),
                ..
            }
        );
        if status == Some(409) && conditional {
            result = Some(Ret::Mismatch);
        }
        if !self.call.is_write() && outcome == Outcome::Fail {
            // A read that failed tells nothing; keep it as fail.
            outcome = Outcome::Fail;
        }
        self.ctx.recorder.complete(Op {
            id: self.id,
            client: self.client,
            node: self.ctx.node_ids[self.node].clone(),
            key: self.key,
            call: self.call,
            invoke_us: self.invoke_us,
            complete_us: Some(self.ctx.recorder.now_us()),
            outcome,
            ret: result,
            status,
            error,
        });
        outcome
    }
}

fn written(version: u64) -> Option<Ret> {
    Some(Ret::Written {
        version: Some(version),
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs one client until the context says stop.
pub async fn client_loop(ctx: Arc<Ctx>, mut st: ClientState) {
    while !ctx.stop.load(Ordering::Relaxed) {
        let outcome = match ctx.workload {
            Workload::Register => register_op(&ctx, &mut st).await,
            Workload::UniqueInsert => unique_insert_op(&ctx, &mut st).await,
            Workload::Idempotent => idempotent_op(&ctx, &mut st).await,
            Workload::Set => set_op(&ctx, &mut st).await,
            Workload::Counter => counter_op(&ctx, &mut st).await,
            Workload::Siblings => siblings_op(&ctx, &mut st).await,
        };
        if outcome != Outcome::Ok {
            // Do not spin against a node that refuses at once.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn read_cp(p: Pending<'_>) -> (Outcome, Option<(String, u64)>) {
    let r = p
        .client()
        .get(&p.ctx.keyspace, p.key.as_bytes(), Consistency::Linearizable)
        .await;
    let seen = match &r {
        Ok(Some(v)) => Some((text(&v.value), v.version)),
        _ => None,
    };
    let outcome = p.end(&r, |v| {
        Some(Ret::Value {
            value: v.as_ref().map(|v| text(&v.value)),
            version: v.as_ref().map(|v| v.version),
        })
    });
    (outcome, seen)
}

async fn put_cp(p: Pending<'_>, value: String, opts: WriteOptions) -> Outcome {
    let r = p
        .client()
        .put(&p.ctx.keyspace, p.key.as_bytes(), value.into_bytes(), &opts)
        .await;
    p.end(&r, |v| written(v.version))
}

/// register: reads, blind writes, CAS by value and by version on a few keys.
async fn register_op(ctx: &Ctx, st: &mut ClientState) -> Outcome {
    let key = ctx.key("r", st.rng.gen_range(0..ctx.keys));
    let dice: f64 = st.rng.gen();
    if dice < 0.5 {
        let p = ctx.begin(st, &key, Call::Read);
        let (outcome, seen) = read_cp(p).await;
        if let Some(seen) = seen {
            st.last.insert(key, seen);
        }
        return outcome;
    }
    let value = st.unique();
    let last = st.last.get(&key).cloned();
    let (if_version, if_value) = match (dice, last) {
        (d, _) if d < 0.75 => (None, None),
        (d, Some((v, _))) if d < 0.9 => (None, Some(v)),
        (_, Some((_, ver))) => (Some(ver), None),
        (_, None) => (Some(0), None),
    };
    let call = Call::Put {
        value: value.clone(),
        if_version,
        if_value: if_value.clone(),
        idempotency_key: None,
    };
    let p = ctx.begin(st, &key, call);
    let opts = WriteOptions {
        if_version,
        if_value,
        ..WriteOptions::default()
    };
    put_cp(p, value, opts).await
}

/// unique-insert: `if_version=0` inserts of fresh keys, and reads of keys tried before.
async fn unique_insert_op(ctx: &Ctx, st: &mut ClientState) -> Outcome {
    let earlier = {
        let inserted = ctx.inserted.lock().expect("inserted lock");
        (st.rng.gen::<f64>() < 0.2 && !inserted.is_empty())
            .then(|| inserted[st.rng.gen_range(0..inserted.len())].clone())
    };
    if let Some(key) = earlier {
        return read_cp(ctx.begin(st, &key, Call::Read)).await.0;
    }
    let value = st.unique();
    let key = format!("{}u{value}", ctx.tag);
    ctx.inserted
        .lock()
        .expect("inserted lock")
        .push(key.clone());
    let call = Call::Put {
        value: value.clone(),
        if_version: Some(0),
        if_value: None,
        idempotency_key: None,
    };
    let p = ctx.begin(st, &key, call);
    let opts = WriteOptions {
        if_version: Some(0),
        ..WriteOptions::default()
    };
    put_cp(p, value, opts).await
}

/// How often `idempotent` retries a write whose outcome is unknown.
const IDEMPOTENT_RETRIES_MAX: u32 = 4;

/// idempotent: writes with an Idempotency-Key, retried through other nodes while their
/// outcome is unknown; and reads.
async fn idempotent_op(ctx: &Ctx, st: &mut ClientState) -> Outcome {
    let key = ctx.key("i", st.rng.gen_range(0..ctx.keys));
    if st.rng.gen::<f64>() < 0.4 {
        return read_cp(ctx.begin(st, &key, Call::Read)).await.0;
    }
    let value = st.unique();
    let idem = format!("{}{}", ctx.tag, value);
    let mut node = st.rng.gen_range(0..ctx.clients.len());
    let mut outcome = Outcome::Unknown;
    for attempt in 0..=IDEMPOTENT_RETRIES_MAX {
        let call = Call::Put {
            value: value.clone(),
            if_version: None,
            if_value: None,
            idempotency_key: Some(idem.clone()),
        };
        let p = ctx.begin_at(st.id, node, &key, call);
        let opts = WriteOptions {
            idempotency_key: Some(idem.clone()),
            ..WriteOptions::default()
        };
        outcome = put_cp(p, value.clone(), opts).await;
        if outcome != Outcome::Unknown || ctx.stop.load(Ordering::Relaxed) {
            break;
        }
        // Retry through another node, as a client that lost its connection would.
        if ctx.clients.len() > 1 {
            node = (node + 1 + st.rng.gen_range(0..ctx.clients.len() - 1)) % ctx.clients.len();
        }
        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt + 1))).await;
    }
    outcome
}

/// set: unique adds to a few sets, and reads.
async fn set_op(ctx: &Ctx, st: &mut ClientState) -> Outcome {
    let adds = ctx.set_adds.fetch_add(1, Ordering::Relaxed);
    let generation = adds / (SET_MEMBERS_PER_KEY * u64::from(ctx.keys));
    let key = format!("{}s{generation}-{}", ctx.tag, st.rng.gen_range(0..ctx.keys));
    if st.rng.gen::<f64>() < 0.1 {
        return read_set(ctx.begin(st, &key, Call::SetRead), None).await.0;
    }
    let member = st.unique();
    let p = ctx.begin(
        st,
        &key,
        Call::SetAdd {
            member: member.clone(),
        },
    );
    let r = p
        .client()
        .set_add(&ctx.keyspace, key.as_bytes(), &[&member], None)
        .await;
    p.end(&r, |_| None)
}

async fn read_set(p: Pending<'_>, r: Option<u32>) -> (Outcome, Option<Ret>) {
    let r = p
        .client()
        .set_members(&p.ctx.keyspace, p.key.as_bytes(), r)
        .await;
    let ret = r.as_ref().ok().map(|m| Ret::Members { members: m.clone() });
    (p.end(&r, |_| ret.clone()), ret)
}

/// counter: increments of one to a few counters, and reads.
async fn counter_op(ctx: &Ctx, st: &mut ClientState) -> Outcome {
    let key = ctx.key("c", st.rng.gen_range(0..ctx.keys));
    if st.rng.gen::<f64>() < 0.1 {
        return read_counter(ctx.begin(st, &key, Call::CounterRead), None)
            .await
            .0;
    }
    let p = ctx.begin(st, &key, Call::Incr { by: 1 });
    let r = p
        .client()
        .incr(&ctx.keyspace, key.as_bytes(), 1, None)
        .await;
    p.end(&r, |_| None)
}

async fn read_counter(p: Pending<'_>, r: Option<u32>) -> (Outcome, Option<Ret>) {
    let r = p
        .client()
        .counter(&p.ctx.keyspace, p.key.as_bytes(), r)
        .await;
    let ret = r.as_ref().ok().map(|v| Ret::Counter { value: *v });
    (p.end(&r, |_| ret.clone()), ret)
}

fn siblings_of(v: &ApValue) -> Vec<String> {
    let mut values: Vec<String> = match v {
        ApValue::Absent { .. } => Vec::new(),
        ApValue::Value { value, .. } => vec![text(value)],
        ApValue::Siblings { values, .. } => values.iter().map(|v| text(v)).collect(),
    };
    values.sort();
    values
}

async fn read_register(p: Pending<'_>, r: Option<u32>) -> (Outcome, Option<ApValue>) {
    let r = p
        .client()
        .ap_get(&p.ctx.keyspace, p.key.as_bytes(), r)
        .await;
    let got = r.as_ref().ok().cloned();
    let outcome = p.end(&r, |v| {
        Some(Ret::Siblings {
            values: siblings_of(v),
        })
    });
    (outcome, got)
}

/// siblings: read a register, then write a new value with the read's context (it replaces
/// what the read showed); sometimes write again with the context the last write returned
/// (it replaces what that write's context covered, and that write: docs/api.md).
async fn siblings_op(ctx: &Ctx, st: &mut ClientState) -> Outcome {
    let key = ctx.key("a", st.rng.gen_range(0..ctx.keys));
    let (context, seen) = match st.chained.remove(&key) {
        Some((context, covered)) if st.rng.gen::<f64>() < 0.3 => (Some(context), covered),
        _ => {
            let (outcome, got) = read_register(ctx.begin(st, &key, Call::ApRead), None).await;
            let Some(got) = got else {
                return outcome;
            };
            (got.context().map(str::to_owned), siblings_of(&got))
        }
    };
    let value = st.unique();
    let mut covered = seen.clone();
    covered.push(value.clone());
    let call = Call::ApWrite {
        value: value.clone(),
        seen,
    };
    let p = ctx.begin(st, &key, call);
    let r = p
        .client()
        .ap_put(
            &ctx.keyspace,
            key.as_bytes(),
            value.clone().into_bytes(),
            context.as_deref(),
            None,
        )
        .await;
    if let Ok(new_context) = &r {
        st.chained.insert(key, (new_context.clone(), covered));
    }
    p.end(&r, |_| None)
}

/// The final phase of an ap workload: reads every key of the run from every node until all
/// nodes answer the same for every key and no node holds a hint, or `limit` passes (then:
/// why the last round did not count). Every read is recorded.
pub async fn final_ap_reads(ctx: &Ctx, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let prefix = match ctx.workload {
        Workload::Set => "s",
        Workload::Counter => "c",
        _ => "a",
    };
    let keys: Vec<String> = match ctx.workload {
        Workload::Set => ctx.set_keys(ctx.set_adds.load(Ordering::Relaxed)),
        _ => (0..ctx.keys).map(|k| ctx.key(prefix, k)).collect(),
    };
    // The checker's own reads: one per node at a time.
    let client = u64::MAX;
    // Each node reads every key twice: from every replica (r = the keyspace's n, by default
    // 3 or the cluster's size) and at r=1. An r=1 read answers with whichever replica
    // replies first, so right after a heal all nodes could agree on a copy that lacked the
    // writes one node took alone while cut off (its hints not yet handed off): a false
    // "lost write" (seen). Agreement of both, on every node, means every replica's writes
    // are in what any read sees.
    let every_replica = Some(ctx.clients.len().min(3) as u32);
    loop {
        // And agreement is convergence only if no node held a hint while the keys were
        // read (counted before and after): a write that a node took while it reached none
        // of its homes is in no answer until handed off (`hints_held`, docs/api.md).
        let hints_before = hints_held(ctx).await;
        let mut agree = true;
        for key in &keys {
            let mut answers: Vec<Option<Ret>> = Vec::new();
            for node in 0..ctx.clients.len() {
                for r in [every_replica, None] {
                    let ret = match ctx.workload {
                        Workload::Set => {
                            let p = ctx.begin_at(client - node as u64, node, key, Call::SetRead);
                            read_set(p, r).await.1
                        }
                        Workload::Counter => {
                            let p =
                                ctx.begin_at(client - node as u64, node, key, Call::CounterRead);
                            read_counter(p, r).await.1
                        }
                        _ => {
                            let p = ctx.begin_at(client - node as u64, node, key, Call::ApRead);
                            read_register(p, r).await.1.map(|g| Ret::Siblings {
                                values: siblings_of(&g),
                            })
                        }
                    };
                    answers.push(ret);
                }
            }
            if answers.iter().any(Option::is_none) || answers.windows(2).any(|w| w[0] != w[1]) {
                agree = false;
            }
        }
        let hints_after = hints_held(ctx).await;
        let why = match (agree, hints_before, hints_after) {
            (false, ..) => "the nodes still answer differently".to_owned(),
            (true, Some(0), Some(0)) => return Ok(()),
            (true, Some(b), Some(a)) => {
                format!(
                    "the answers agree, but {} hinted copies wait for handoff",
                    b.max(a)
                )
            }
            (true, ..) => "the answers agree, but a node did not say what hints it holds \
                           (GET /v1/cluster failed)"
                .to_owned(),
        };
        if Instant::now() > deadline {
            return Err(why);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The hints every node holds, summed; None if a node did not say.
async fn hints_held(ctx: &Ctx) -> Option<u64> {
    let mut sum = 0;
    for c in &ctx.clients {
        sum += c.cluster().await.ok()?.hints_held;
    }
    Some(sum)
}

/// The final phase of a cp workload: reads every key of the run once, linearizably, so a
/// write answered as failed that took effect anyway shows. `unique-insert` reads its many
/// keys with scans; the others read key by key. Returns whether every key was read.
pub async fn final_cp_reads(ctx: &Ctx, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    if ctx.workload == Workload::UniqueInsert {
        loop {
            if final_scan(ctx).await {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let prefix = if ctx.workload == Workload::Register {
        "r"
    } else {
        "i"
    };
    let client = u64::MAX;
    let mut all = true;
    for k in 0..ctx.keys {
        let key = ctx.key(prefix, k);
        // Retry a key until a node answers (the cluster was healed and serves).
        for attempt in 0.. {
            let node = (k as usize + attempt) % ctx.clients.len();
            let p = ctx.begin_at(client - node as u64, node, &key, Call::Read);
            if read_cp(p).await.0 == Outcome::Ok {
                break;
            }
            if Instant::now() > deadline {
                all = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    all
}

/// Scans every `unique-insert` key of the run, page by page, and records for each key it
/// tried a read: each page is one linearizable read of every key in its range, so a key in
/// the range that the page does not list was absent. Returns false if a page failed (the
/// pages recorded so far stay: each was a correct read).
async fn final_scan(ctx: &Ctx) -> bool {
    let mut tried = ctx.inserted.lock().expect("inserted lock").clone();
    tried.sort();
    let prefix = format!("{}u", ctx.tag);
    let mut after: Option<String> = None;
    let mut i = 0; // next tried key to account for
    let mut pages = 0usize;
    while i < tried.len() {
        let node = pages % ctx.clients.len();
        pages += 1;
        let invoke_us = ctx.recorder.now_us();
        let r = ctx.clients[node]
            .scan(&ctx.keyspace, &prefix, after.as_deref(), Some(1000))
            .await;
        let complete_us = ctx.recorder.now_us();
        let Ok((entries, more)) = r else {
            return false;
        };
        let last = entries.last().and_then(|e| e.key.clone());
        let Some(reads) = page_reads(&tried, &mut i, &entries, more) else {
            return false;
        };
        for read in reads {
            let (id, _) = ctx.recorder.invoke();
            let node_id = ctx.node_ids[node].clone();
            let op = scan_read_op(id, node, node_id, read, (invoke_us, complete_us));
            ctx.recorder.complete(op);
        }
        if !more {
            break;
        }
        after = last;
    }
    true
}

/// The operation a final scan's read of one key is recorded as: a read by the checker's
/// own client at node number `node` (named `node_id`), during the page's `(invoke, complete)`.
pub fn scan_read_op(id: u64, node: usize, node_id: String, read: ScanRead, at: (u64, u64)) -> Op {
    let (key, seen) = read;
    Op {
        id,
        client: u64::MAX - node as u64,
        node: node_id,
        key,
        call: Call::Read,
        invoke_us: at.0,
        complete_us: Some(at.1),
        outcome: Outcome::Ok,
        ret: Some(Ret::Value {
            value: seen.as_ref().map(|(v, _)| v.clone()),
            version: seen.map(|(_, v)| v),
        }),
        status: None,
        error: Some("final scan".into()),
    }
}

/// A key a final scan read, and the value and version it found (None: absent).
pub type ScanRead = (String, Option<(String, u64)>);

/// The reads one page of a final scan makes of the keys `tried` (sorted), from
/// `tried[*next]` on, each with the value and version found (None: absent); moves `next`
/// past them. A page covers `(after, last]` when more follow, else everything after: a
/// key in its range that it does not list was absent. None if a page cut short does not
/// name where it stopped.
pub fn page_reads(
    tried: &[String],
    next: &mut usize,
    entries: &[ScanEntry],
    more: bool,
) -> Option<Vec<ScanRead>> {
    let found: HashMap<&str, (&str, u64)> = entries
        .iter()
        .filter_map(|e| Some((e.key.as_deref()?, (e.value.as_deref()?, e.version?))))
        .collect();
    let last = entries.last().and_then(|e| e.key.as_deref());
    if more && last.is_none() {
        return None;
    }
    let mut reads = Vec::new();
    while *next < tried.len() && (!more || last.is_some_and(|l| tried[*next].as_str() <= l)) {
        let key = &tried[*next];
        let seen = found.get(key.as_str()).map(|(v, n)| ((*v).to_owned(), *n));
        reads.push((key.clone(), seen));
        *next += 1;
    }
    Some(reads)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &str, version: u64) -> ScanEntry {
        ScanEntry {
            key: Some(key.into()),
            value: Some(value.into()),
            version: Some(version),
            ..ScanEntry::default()
        }
    }

    #[test]
    fn a_page_reads_every_tried_key_in_its_range_absent_or_found() {
        let tried: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let mut next = 0;
        let page = [entry("a", "1", 4), entry("c", "2", 5)];
        let reads = page_reads(&tried, &mut next, &page, true).unwrap();
        assert_eq!(
            reads,
            vec![
                ("a".into(), Some(("1".into(), 4))),
                ("b".into(), None),
                ("c".into(), Some(("2".into(), 5))),
            ]
        );
        assert_eq!(next, 3);
        // The last page covers everything after: d was absent.
        let reads = page_reads(&tried, &mut next, &[], false).unwrap();
        assert_eq!(reads, vec![("d".into(), None)]);
        assert_eq!(next, 4);
        // A page cut short that names no key tells nothing.
        let mut next = 0;
        assert_eq!(page_reads(&tried, &mut next, &[], true), None);
        assert_eq!(next, 0);
    }
}
