//! The simulated network: peer messages between the nodes of one process, each one
//! encoded as the TCP transport would (bincode), delayed, dropped, duplicated or cut off
//! as the seeded nemesis says, and delivered to the receiving node's handler inside that
//! node's scope (so a paused node does not answer and a crashed one never hears it).
//!
//! What it keeps of the TCP transport's promises, and what it does not:
//! - a request is delivered at most once, unless it is one whose handler must bear
//!   duplicates anyway (Raft's messages, merges and reads: [`may_duplicate`]); client
//!   writes (`ApUpdate`, `Forward`) rely on the transport's at-most-once delivery, which
//!   TCP gives, so they are never duplicated;
//! - messages between two nodes may be reordered (each has its own delay): nothing in
//!   capkv may rely on the order of two requests in flight;
//! - a node's fault filter (`POST /v1/faults`) applies as in the transport, beside the
//!   network's own cuts, which may be one-way.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::trace::Trace;
use crate::ap::rpc::ApRequest;
use crate::cp::rpc::CpRequest;
use crate::cp::NodeId;
use crate::net::{CallFuture, FaultFilter, Handler, NetError, Peers};
use crate::rpc::{PeerRequest, PeerResponse};
use crate::rt::{Instant, NodeScope};

/// How the links behave now (the nemesis changes it; the liveness phase restores
/// [`LinkWeather::calm`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkWeather {
    /// One-way delay: uniform in [min, max].
    pub delay_min: Duration,
    pub delay_max: Duration,
    /// Chance a message (request or reply) is lost.
    pub drop: f64,
    /// Chance a request that may be duplicated is delivered twice.
    pub duplicate: f64,
}

impl LinkWeather {
    /// A healthy LAN: 0.1 to 2 ms, nothing lost.
    pub fn calm() -> LinkWeather {
        LinkWeather {
            delay_min: Duration::from_micros(100),
            delay_max: Duration::from_millis(2),
            drop: 0.0,
            duplicate: 0.0,
        }
    }
}

/// A node as the network knows it: where its requests go, while it is up.
struct Endpoint {
    handler: Handler<PeerRequest, PeerResponse>,
    scope: Arc<NodeScope>,
    faults: Arc<FaultFilter>,
}

struct State {
    endpoints: BTreeMap<NodeId, Endpoint>,
    /// Directed links that carry nothing: (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
    weather: LinkWeather,
    rng: StdRng,
    /// When each node last heard from each peer: (listener, speaker).
    heard: BTreeMap<(NodeId, NodeId), Instant>,
    /// Frame limit, as the transport's.
    frame_bytes_max: usize,
}

/// The network every simulated node is attached to.
pub struct Network {
    state: Mutex<State>,
    trace: Arc<Trace>,
}

/// What happens to one message in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Lost,
    After(Duration),
}

impl Network {
    pub fn new(seed: u64, trace: Arc<Trace>, frame_bytes_max: usize) -> Arc<Network> {
        Arc::new(Network {
            state: Mutex::new(State {
                endpoints: BTreeMap::new(),
                cut: BTreeSet::new(),
                weather: LinkWeather::calm(),
                rng: StdRng::seed_from_u64(seed),
                heard: BTreeMap::new(),
                frame_bytes_max,
            }),
            trace,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("network lock poisoned")
    }

    /// The network interface of node `me`.
    pub fn attach(self: &Arc<Self>, me: NodeId) -> Arc<SimNet> {
        Arc::new(SimNet {
            me,
            net: self.clone(),
        })
    }

    /// Node `id` is up: what it is sent goes to `handler`, run in `scope`.
    pub fn up(
        &self,
        id: NodeId,
        handler: Handler<PeerRequest, PeerResponse>,
        scope: Arc<NodeScope>,
        faults: Arc<FaultFilter>,
    ) {
        self.state().endpoints.insert(
            id,
            Endpoint {
                handler,
                scope,
                faults,
            },
        );
    }

    /// Node `id` is down: what is sent to it is lost, and what it heard of its peers is
    /// forgotten (a restarted process starts hearing from nobody, as the transport does).
    pub fn down(&self, id: NodeId) {
        let mut st = self.state();
        st.endpoints.remove(&id);
        st.heard.retain(|(listener, _), _| *listener != id);
    }

    /// Cuts these directed links (from, to), in addition to those cut already.
    pub fn cut(&self, links: impl IntoIterator<Item = (NodeId, NodeId)>) {
        self.state().cut.extend(links);
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.state().cut.clear();
    }

    pub fn set_weather(&self, weather: LinkWeather) {
        self.state().weather = weather;
    }

    pub fn weather(&self) -> LinkWeather {
        self.state().weather
    }

    /// The fate of one message from `from` to `to` sent now.
    fn fate(&self, from: NodeId, to: NodeId) -> Fate {
        let mut st = self.state();
        let w = st.weather;
        if st.cut.contains(&(from, to)) || (w.drop > 0.0 && st.rng.gen_bool(w.drop)) {
            return Fate::Lost;
        }
        let span = w.delay_max.saturating_sub(w.delay_min).as_micros() as u64;
        Fate::After(w.delay_min + Duration::from_micros(st.rng.gen_range(0..=span)))
    }

    fn duplicates(&self) -> bool {
        let mut st = self.state();
        let p = st.weather.duplicate;
        p > 0.0 && st.rng.gen_bool(p)
    }

    /// The receiving end of a message that arrives now from `from`, if it is heard: the
    /// node is up, the link was not cut meanwhile, and its fault filter lets it in.
    fn arrive(
        &self,
        from: NodeId,
        to: NodeId,
    ) -> Option<(Handler<PeerRequest, PeerResponse>, Arc<NodeScope>)> {
        let mut st = self.state();
        if st.cut.contains(&(from, to)) {
            return None;
        }
        let e = st.endpoints.get(&to)?;
        if e.faults.blocks(from) {
            return None;
        }
        let got = (e.handler.clone(), e.scope.clone());
        st.heard.insert((to, from), Instant::now());
        Some(got)
    }

    /// Whether node `to` may send to `from` now (its fault filter), if it is up.
    fn may_answer(&self, to: NodeId, from: NodeId) -> bool {
        self.state()
            .endpoints
            .get(&to)
            .is_some_and(|e| e.faults.sends_to(from))
    }

    /// A reply arrives at `to` from `from`: heard, unless cut or filtered.
    fn reply_heard(&self, from: NodeId, to: NodeId, faults: &FaultFilter) -> bool {
        let mut st = self.state();
        if st.cut.contains(&(from, to)) || faults.blocks(from) {
            return false;
        }
        st.heard.insert((to, from), Instant::now());
        true
    }

    fn heard_within(&self, listener: NodeId, speaker: NodeId, window: Duration) -> bool {
        self.state()
            .heard
            .get(&(listener, speaker))
            .is_some_and(|t| t.elapsed() <= window)
    }

    fn frame_bytes_max(&self) -> usize {
        self.state().frame_bytes_max
    }

    fn faults_of(&self, id: NodeId) -> Option<Arc<FaultFilter>> {
        self.state().endpoints.get(&id).map(|e| e.faults.clone())
    }
}

/// Whether a copy of this request may be delivered twice (see the module docs).
fn may_duplicate(req: &PeerRequest) -> bool {
    !matches!(
        req,
        PeerRequest::Ap(ApRequest::ApUpdate(_)) | PeerRequest::Cp(CpRequest::Forward(_))
    )
}

/// A short name for traces: the message's.
pub fn request_kind(req: &PeerRequest) -> &'static str {
    match req {
        PeerRequest::Ping => "Ping",
        PeerRequest::Cp(c) => c.name(),
        PeerRequest::Ap(a) => a.name(),
    }
}

/// One node's side of the simulated network.
pub struct SimNet {
    me: NodeId,
    net: Arc<Network>,
}

impl SimNet {
    async fn call_inner(
        &self,
        to: PeerId,
        req: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, NetError> {
        let (me, net) = (self.me, self.net.clone());
        // A node that died in the middle of a poll sends nothing more.
        if crate::rt::current_scope().is_some_and(|s| s.is_killed()) {
            return Err(NetError::Lost(to, "this node crashed".into()));
        }
        let my_faults = net.faults_of(me).unwrap_or_default();
        if my_faults.blocks(to) {
            return Err(NetError::Isolated(to));
        }
        if !my_faults.sends_to(to) {
            return Err(NetError::DropTo(to));
        }
        let kind = request_kind(&req);
        let copies = if may_duplicate(&req) && net.duplicates() {
            2
        } else {
            1
        };
        let body = bincode::serialize(&req).expect("bincode serialization of our own types");
        drop(req);
        if body.len() > net.frame_bytes_max() {
            return Err(NetError::RequestTooLarge(
                to,
                format!("{} bytes", body.len()),
            ));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let body = Arc::new(body);
        for copy in 0..copies {
            let fate = net.fate(me, to);
            net.trace.event(format_args!(
                "send {me}->{to} {kind} {}B copy {copy} {fate:?}",
                body.len()
            ));
            let Fate::After(delay) = fate else {
                continue;
            };
            let (net, body, tx) = (net.clone(), body.clone(), tx.clone());
            // The message is on the wire: it belongs to no node, and a crash of the
            // sender does not take it back.
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let Some((handler, scope)) = net.arrive(me, to) else {
                    net.trace
                        .event(format_args!("lost {me}->{to} {kind} (unheard)"));
                    return;
                };
                let req: PeerRequest =
                    bincode::deserialize(&body).expect("decoding what was just encoded");
                net.trace.event(format_args!("deliver {me}->{to} {kind}"));
                let Ok(resp) = scope.spawn(async move { handler(me, req).await }).await else {
                    net.trace
                        .event(format_args!("unanswered {me}->{to} {kind} (crashed)"));
                    return;
                };
                if !net.may_answer(to, me) {
                    return;
                }
                let reply = bincode::serialize(&resp).expect("bincode serialization");
                drop(resp);
                let fate = net.fate(to, me);
                net.trace.event(format_args!(
                    "reply {to}->{me} {kind} {}B {fate:?}",
                    reply.len()
                ));
                let Fate::After(delay) = fate else {
                    return;
                };
                tokio::time::sleep(delay).await;
                let Some(faults) = net.faults_of(me) else {
                    return; // the caller is down
                };
                if !net.reply_heard(to, me, &faults) {
                    return;
                }
                let resp: PeerResponse =
                    bincode::deserialize(&reply).expect("decoding what was just encoded");
                if let Some(tx) = tx.lock().expect("reply slot lock poisoned").take() {
                    let _ = tx.send(resp);
                }
            });
        }
        drop(tx);
        let deadline = Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(resp)) => Ok(resp),
            // Every copy was lost and its reply slot dropped: the caller cannot tell
            // whether the request took effect, and waits out its deadline, as a caller
            // of the transport would.
            Ok(Err(_)) => {
                tokio::time::sleep_until(deadline).await;
                Err(NetError::Timeout(to, timeout))
            }
            Err(_) => Err(NetError::Timeout(to, timeout)),
        }
    }
}

type PeerId = NodeId;

impl Peers<PeerRequest, PeerResponse> for SimNet {
    fn call(
        &self,
        to: PeerId,
        req: PeerRequest,
        timeout: Duration,
    ) -> CallFuture<'_, PeerResponse> {
        Box::pin(self.call_inner(to, req, timeout))
    }

    fn reachable(&self, peer: PeerId, window: Duration) -> bool {
        let sends = self.net.faults_of(self.me).is_none_or(|f| f.sends_to(peer));
        sends && self.net.heard_within(self.me, peer, window)
    }
}
