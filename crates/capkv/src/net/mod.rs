//! The peer transport: every message between nodes (Raft RPCs, forwarded client
//! requests, pings) goes through one [`Transport`], so one switch, the [`FaultFilter`],
//! partitions all of it at once.
//!
//! Wire format: length-delimited frames over TCP, one multiplexed connection per peer.
//!
//! ```text
//!   frame = len:u32be  kind:u8  id:u64be  body          (len counts kind, id, body)
//!   kind 0 = hello     (id = sender's node id, no body; first frame of a connection)
//!   kind 1 = request   (body = bincode Req)
//!   kind 2 = response  (body = bincode Resp, id = the request's id)
//! ```
//!
//! Failure semantics, which the layers above rely on to tell 503 from 504: an error from
//! [`Transport::call`] says whether the request may have been delivered
//! ([`NetError::maybe_delivered`]). Refused by the fault filter or never connected: it was
//! not. Timed out or the connection broke after sending: it may have been.
//!
//! The fault filter has two switches per peer (see [`FaultFilter`]):
//!
//! - **isolate**: traffic is dropped on both sides: a node refuses to send to an isolated
//!   peer, and silently drops requests and responses arriving from one (no reply, as a
//!   real partition would).
//! - **drop_to** (a one-way partition): a node drops every frame it would *send* to the
//!   peer, requests and replies alike, but still receives and handles what the peer
//!   sends. Its own calls to the peer fail at once as not delivered; the peer's calls are
//!   delivered and handled, and then time out at the peer ([`NetError::Timeout`], which
//!   [`NetError::maybe_delivered`]): "delivered, but the reply was lost".

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

pub type PeerId = u64;

const KIND_HELLO: u8 = 0;
const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;
const HEADER_BYTES: usize = 9;

/// Frames queued for one connection's writer before senders wait.
const SEND_QUEUE_FRAMES: usize = 1024;
/// Requests one inbound connection may have in flight; more wait to be read.
const INBOUND_IN_FLIGHT_MAX: usize = 256;
/// How long a connecting peer has to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connect attempt may take (a dead peer should fail fast).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

/// Why a call failed, and whether the request may have reached the peer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    #[error("isolated from node {0} by fault injection")]
    Isolated(PeerId),
    #[error("frames to node {0} are dropped by fault injection (drop_to)")]
    DropTo(PeerId),
    #[error("unknown peer {0}")]
    UnknownPeer(PeerId),
    #[error("cannot connect to node {0}: {1}")]
    Connect(PeerId, String),
    #[error("no reply from node {0} within {1:?}")]
    Timeout(PeerId, Duration),
    #[error("connection to node {0} lost: {1}")]
    Lost(PeerId, String),
}

impl NetError {
    /// False when the request certainly never left this node.
    pub fn maybe_delivered(&self) -> bool {
        matches!(self, NetError::Timeout(..) | NetError::Lost(..))
    }
}

/// The peer faults in force on one node: replaced whole by each `POST /v1/faults`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerFaults {
    /// Peers cut off both ways: nothing is sent to them, nothing from them is accepted.
    pub isolate: BTreeSet<PeerId>,
    /// Peers cut off one way: nothing is sent to them (requests or replies), but what
    /// they send is received and handled.
    pub drop_to: BTreeSet<PeerId>,
}

/// Which peers this node refuses to talk to, and in which direction. Changed at run time
/// through `/v1/faults`.
///
/// What each side of a one-way fault sees (n1 with `drop_to` n2), so that reachability
/// never lies: a peer is *reachable* only if messages were heard from it recently **and**
/// this node can send to it, i.e. only if a request to it could get an answer.
///
/// - n1 still hears n2 (its pings, Raft messages, forwarded requests), but cannot answer
///   or call it, so n1 counts n2 **unreachable** at once ([`Transport::reachable`]); n1
///   never counts n2 toward a quorum it could not use.
/// - n2 hears nothing from n1 (no replies, no requests), so n2 counts n1 **unreachable**
///   once [`Transport::reachable`]'s window passes, as for a crashed peer. Its requests
///   to n1 still take effect there; n2 sees them time out (outcome unknown).
#[derive(Default)]
pub struct FaultFilter {
    state: RwLock<PeerFaults>,
}

impl FaultFilter {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, PeerFaults> {
        self.state.read().expect("fault filter lock poisoned")
    }

    /// Whether frames arriving from `peer` are dropped (it is isolated).
    pub fn blocks(&self, peer: PeerId) -> bool {
        self.read().isolate.contains(&peer)
    }

    /// Whether frames to `peer` may be sent: not if it is isolated or in `drop_to`.
    pub fn sends_to(&self, peer: PeerId) -> bool {
        let f = self.read();
        !f.isolate.contains(&peer) && !f.drop_to.contains(&peer)
    }

    /// Why a call to `peer` is refused before sending, if it is.
    fn refuse_send(&self, peer: PeerId) -> Option<NetError> {
        let f = self.read();
        if f.isolate.contains(&peer) {
            Some(NetError::Isolated(peer))
        } else if f.drop_to.contains(&peer) {
            Some(NetError::DropTo(peer))
        } else {
            None
        }
    }

    /// Replaces every fault at once.
    pub fn set(&self, faults: PeerFaults) {
        *self.state.write().expect("fault filter lock poisoned") = faults;
    }

    /// Replaces the isolated peers, leaving `drop_to` as it is.
    pub fn isolate(&self, peers: BTreeSet<PeerId>) {
        self.state
            .write()
            .expect("fault filter lock poisoned")
            .isolate = peers;
    }

    pub fn get(&self) -> PeerFaults {
        self.read().clone()
    }

    pub fn isolated(&self) -> BTreeSet<PeerId> {
        self.read().isolate.clone()
    }
}

/// Handles one inbound request.
pub type Handler<Req, Resp> =
    Arc<dyn Fn(PeerId, Req) -> Pin<Box<dyn Future<Output = Resp> + Send>> + Send + Sync>;

struct Conn<Resp> {
    tx: mpsc::Sender<Vec<u8>>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Resp>>>>,
    closed: Arc<AtomicBool>,
}

pub struct Transport<Req, Resp> {
    me: PeerId,
    peers: BTreeMap<PeerId, String>,
    conns: HashMap<PeerId, tokio::sync::Mutex<Option<Arc<Conn<Resp>>>>>,
    faults: Arc<FaultFilter>,
    /// When each peer was last heard from (any accepted request or response).
    contacts: Arc<Contacts>,
    next_id: AtomicU64,
    frame_bytes_max: usize,
    _req: PhantomData<fn(Req)>,
}

fn frame(kind: u8, id: u64, body: &impl Serialize) -> Vec<u8> {
    let size = bincode::serialized_size(body).expect("bincode sizing of our own types") as usize;
    let mut buf = Vec::with_capacity(4 + HEADER_BYTES + size);
    buf.extend_from_slice(&((HEADER_BYTES + size) as u32).to_be_bytes());
    buf.push(kind);
    buf.extend_from_slice(&id.to_be_bytes());
    bincode::serialize_into(&mut buf, body).expect("bincode serialization of our own types");
    buf
}

/// Reads one frame: (kind, id, body). `Ok(None)` on a clean end of stream.
async fn read_frame<R: AsyncReadExt + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<(u8, u64, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if !(HEADER_BYTES..=max).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    let kind = buf[0];
    let id = u64::from_be_bytes(buf[1..9].try_into().expect("8 bytes"));
    buf.drain(..HEADER_BYTES);
    Ok(Some((kind, id, buf)))
}

/// Drains `rx` into the socket to `peer`, flushing whenever the queue is empty.
///
/// This is the last gate of the fault filter on the send side: a request or reply
/// queued before a fault was set, and written after, is dropped here (a request
/// dropped here times out at its caller: it is reported as maybe delivered, which is
/// the safe answer). The hello frame always passes: it carries nothing.
async fn write_loop(
    mut rx: mpsc::Receiver<Vec<u8>>,
    w: tokio::net::tcp::OwnedWriteHalf,
    peer: PeerId,
    faults: Arc<FaultFilter>,
) -> std::io::Result<()> {
    let mut w = BufWriter::new(w);
    let passes = |f: &[u8]| f[4] == KIND_HELLO || faults.sends_to(peer);
    while let Some(f) = rx.recv().await {
        if passes(&f) {
            w.write_all(&f).await?;
        }
        while let Ok(f) = rx.try_recv() {
            if passes(&f) {
                w.write_all(&f).await?;
            }
        }
        w.flush().await?;
    }
    Ok(())
}

impl<Req, Resp> Transport<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Resp: Serialize + DeserializeOwned + Send + 'static,
{
    /// `peers` maps every other node's id to its peer address.
    pub fn new(
        me: PeerId,
        peers: BTreeMap<PeerId, String>,
        faults: Arc<FaultFilter>,
        frame_bytes_max: usize,
    ) -> Self {
        let conns = peers
            .keys()
            .map(|p| (*p, tokio::sync::Mutex::new(None)))
            .collect();
        Transport {
            me,
            peers,
            conns,
            faults,
            contacts: Arc::default(),
            next_id: AtomicU64::new(1),
            frame_bytes_max,
            _req: PhantomData,
        }
    }

    pub fn faults(&self) -> &FaultFilter {
        &self.faults
    }

    /// Whether `peer` can answer a request from here: it was heard from within `window`
    /// and this node may send to it (neither isolated nor in `drop_to`; hearing a peer
    /// we cannot answer does not make it reachable, see [`FaultFilter`]).
    pub fn reachable(&self, peer: PeerId, window: Duration) -> bool {
        self.faults.sends_to(peer) && self.contacts.heard_within(peer, window)
    }

    async fn connection(&self, to: PeerId) -> Result<Arc<Conn<Resp>>, NetError> {
        let slot = self.conns.get(&to).ok_or(NetError::UnknownPeer(to))?;
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.closed.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        let addr = &self.peers[&to];
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| NetError::Connect(to, format!("connect to {addr} timed out")))?
            .map_err(|e| NetError::Connect(to, format!("{addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let (tx, rx) = mpsc::channel(SEND_QUEUE_FRAMES);
        let closed = Arc::new(AtomicBool::new(false));
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Resp>>>> = Arc::default();
        tx.send(frame(KIND_HELLO, self.me, &()))
            .await
            .map_err(|_| NetError::Connect(to, "writer gone".into()))?;
        {
            let (closed, faults) = (closed.clone(), self.faults.clone());
            tokio::spawn(async move {
                if let Err(e) = write_loop(rx, w, to, faults).await {
                    tracing::debug!(peer = to, error = %e, "peer connection write failed");
                }
                closed.store(true, Ordering::Release);
            });
        }
        {
            let (closed, pending) = (closed.clone(), pending.clone());
            let (faults, contacts, max) = (
                self.faults.clone(),
                self.contacts.clone(),
                self.frame_bytes_max,
            );
            tokio::spawn(async move {
                let mut r = BufReader::new(r);
                let end = loop {
                    match read_frame(&mut r, max).await {
                        Ok(Some((KIND_RESPONSE, id, body))) => {
                            if faults.blocks(to) {
                                continue; // dropped on the floor, as a partition would
                            }
                            contacts.touch(to);
                            let waiter = pending.lock().expect("pending lock poisoned").remove(&id);
                            match (waiter, bincode::deserialize::<Resp>(&body)) {
                                (Some(w), Ok(resp)) => {
                                    let _ = w.send(resp);
                                }
                                (_, Err(e)) => break format!("undecodable response: {e}"),
                                (None, Ok(_)) => {} // the caller gave up waiting
                            }
                        }
                        Ok(Some((kind, _, _))) => break format!("unexpected frame kind {kind}"),
                        Ok(None) => break "closed by peer".to_string(),
                        Err(e) => break e.to_string(),
                    }
                };
                tracing::debug!(peer = to, reason = %end, "peer connection ended");
                closed.store(true, Ordering::Release);
                // Dropping the waiters tells every caller the connection was lost.
                pending.lock().expect("pending lock poisoned").clear();
            });
        }
        let conn = Arc::new(Conn {
            tx,
            pending: pending.clone(),
            closed: closed.clone(),
        });
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends `req` to `to` and waits at most `timeout` for the reply.
    pub async fn call(
        self: &Arc<Self>,
        to: PeerId,
        req: Req,
        timeout: Duration,
    ) -> Result<Resp, NetError> {
        if let Some(refused) = self.faults.refuse_send(to) {
            return Err(refused);
        }
        let started = Instant::now();
        let conn = tokio::time::timeout(timeout, self.connection(to))
            .await
            .map_err(|_| NetError::Connect(to, "connect timed out".into()))??;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending
            .lock()
            .expect("pending lock poisoned")
            .insert(id, tx);
        if conn.tx.send(frame(KIND_REQUEST, id, &req)).await.is_err() {
            conn.pending
                .lock()
                .expect("pending lock poisoned")
                .remove(&id);
            return Err(NetError::Connect(
                to,
                "connection closed before sending".into(),
            ));
        }
        let left = timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, rx).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) => Err(NetError::Lost(
                to,
                "connection closed while waiting for the reply".into(),
            )),
            Err(_) => {
                conn.pending
                    .lock()
                    .expect("pending lock poisoned")
                    .remove(&id);
                Err(NetError::Timeout(to, timeout))
            }
        }
    }

    /// Accepts peer connections on `listener` and answers requests with `handler`,
    /// until the listener fails or the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, handler: Handler<Req, Resp>) {
        loop {
            let (stream, addr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                if let Err(e) = this.serve_connection(stream, handler).await {
                    tracing::debug!(%addr, error = %e, "inbound peer connection ended");
                }
            });
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        handler: Handler<Req, Resp>,
    ) -> std::io::Result<()> {
        let (r, w) = stream.into_split();
        let mut r = BufReader::new(r);
        let from =
            match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut r, self.frame_bytes_max))
                .await
            {
                Ok(Ok(Some((KIND_HELLO, id, _)))) if self.peers.contains_key(&id) => id,
                Ok(Ok(Some((KIND_HELLO, id, _)))) => {
                    return Err(std::io::Error::other(format!(
                        "hello from unknown node {id}"
                    )));
                }
                _ => return Err(std::io::Error::other("peer did not say hello")),
            };
        let (tx, rx) = mpsc::channel(SEND_QUEUE_FRAMES);
        let faults = self.faults.clone();
        tokio::spawn(async move {
            let _ = write_loop(rx, w, from, faults).await;
        });
        let in_flight = Arc::new(Semaphore::new(INBOUND_IN_FLIGHT_MAX));
        while let Some((kind, id, body)) = read_frame(&mut r, self.frame_bytes_max).await? {
            if kind != KIND_REQUEST {
                return Err(std::io::Error::other(format!(
                    "unexpected frame kind {kind}"
                )));
            }
            // Isolated: dropped unread. drop_to alone does not stop receiving.
            if self.faults.blocks(from) {
                continue;
            }
            self.contacts.touch(from);
            let req: Req = bincode::deserialize(&body).map_err(std::io::Error::other)?;
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let (this, handler, tx) = (self.clone(), handler.clone(), tx.clone());
            tokio::spawn(async move {
                let resp = handler(from, req).await;
                drop(permit);
                // Isolated or drop_to: the request took effect, the reply is lost, and
                // the caller times out (maybe delivered), as with a real lost reply.
                if this.faults.sends_to(from) {
                    let _ = tx.send(frame(KIND_RESPONSE, id, &resp)).await;
                }
            });
        }
        Ok(())
    }
}

/// Last time each peer was heard from.
#[derive(Default)]
struct Contacts {
    at: Mutex<HashMap<PeerId, Instant>>,
}

impl Contacts {
    fn touch(&self, peer: PeerId) {
        self.at
            .lock()
            .expect("contacts lock poisoned")
            .insert(peer, Instant::now());
    }
    fn heard_within(&self, peer: PeerId, window: Duration) -> bool {
        self.at
            .lock()
            .expect("contacts lock poisoned")
            .get(&peer)
            .is_some_and(|t| t.elapsed() <= window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type T = Transport<String, String>;

    async fn pair() -> (Arc<T>, Arc<T>) {
        let (t1, t2, _) = pair_counted().await;
        (t1, t2)
    }

    /// Two connected transports, and how many requests each has handled.
    async fn pair_counted() -> (Arc<T>, Arc<T>, [Arc<AtomicU64>; 2]) {
        let handled: [Arc<AtomicU64>; 2] = Default::default();
        let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a1 = l1.local_addr().unwrap().to_string();
        let a2 = l2.local_addr().unwrap().to_string();
        let t1 = Arc::new(T::new(
            1,
            BTreeMap::from([(2, a2)]),
            Arc::default(),
            1 << 20,
        ));
        let t2 = Arc::new(T::new(
            2,
            BTreeMap::from([(1, a1)]),
            Arc::default(),
            1 << 20,
        ));
        for (t, l, me, n) in [
            (&t1, l1, "n1", handled[0].clone()),
            (&t2, l2, "n2", handled[1].clone()),
        ] {
            let handler: Handler<String, String> = Arc::new(move |from, req| {
                n.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move { format!("{me} got {req} from {from}") })
            });
            tokio::spawn(t.clone().serve(l, handler));
        }
        (t1, t2, handled)
    }

    #[tokio::test]
    async fn request_and_reply_both_ways() {
        let (t1, t2) = pair().await;
        let d = Duration::from_secs(5);
        assert_eq!(
            t1.call(2, "ping".into(), d).await.unwrap(),
            "n2 got ping from 1"
        );
        assert_eq!(
            t2.call(1, "pong".into(), d).await.unwrap(),
            "n1 got pong from 2"
        );
        assert!(t1.reachable(2, d) && t2.reachable(1, d));
        // Many calls in flight on one connection each get their own reply.
        let calls: Vec<_> = (0..100)
            .map(|i| {
                let t1 = t1.clone();
                tokio::spawn(async move { t1.call(2, format!("m{i}"), d).await.unwrap() })
            })
            .collect();
        for (i, c) in calls.into_iter().enumerate() {
            assert_eq!(c.await.unwrap(), format!("n2 got m{i} from 1"));
        }
    }

    #[tokio::test]
    async fn isolation_on_the_sender_fails_fast_and_is_not_delivered() {
        let (t1, _t2) = pair().await;
        t1.faults().isolate(BTreeSet::from([2]));
        let e = t1
            .call(2, "x".into(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, NetError::Isolated(2)));
        assert!(!e.maybe_delivered());
        assert!(!t1.reachable(2, Duration::from_secs(5)));
        t1.faults().isolate(BTreeSet::new());
        assert!(t1.call(2, "x".into(), Duration::from_secs(5)).await.is_ok());
    }

    #[tokio::test]
    async fn isolation_on_the_receiver_drops_silently() {
        let (t1, t2) = pair().await;
        t2.faults().isolate(BTreeSet::from([1]));
        let e = t1
            .call(2, "x".into(), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, NetError::Timeout(2, _)), "{e}");
        assert!(e.maybe_delivered());
    }

    fn drop_to(peers: impl IntoIterator<Item = PeerId>) -> PeerFaults {
        PeerFaults {
            drop_to: peers.into_iter().collect(),
            ..PeerFaults::default()
        }
    }

    #[tokio::test]
    async fn drop_to_is_one_way_own_calls_not_sent_peer_calls_handled_but_unanswered() {
        let (t1, t2, handled) = pair_counted().await;
        let d = Duration::from_secs(5);
        // Both directions work and both sides count the other reachable.
        t1.call(2, "a".into(), d).await.unwrap();
        t2.call(1, "b".into(), d).await.unwrap();
        assert!(t1.reachable(2, d) && t2.reachable(1, d));
        let before = [0, 1].map(|i| handled[i].load(Ordering::SeqCst));

        t1.faults().set(drop_to([2]));
        assert!(!t1.faults().blocks(2) && !t1.faults().sends_to(2));

        // n1's own calls to n2 are never sent: an immediate not-delivered error.
        let started = Instant::now();
        let e = t1.call(2, "x".into(), d).await.unwrap_err();
        assert!(matches!(e, NetError::DropTo(2)), "{e}");
        assert!(!e.maybe_delivered());
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(
            handled[1].load(Ordering::SeqCst),
            before[1],
            "n2 got nothing"
        );

        // n2's calls reach n1 and are handled there, but the replies never come back:
        // at n2 that is a timeout, outcome unknown.
        let calls = 3;
        for i in 0..calls {
            let e = t2
                .call(1, format!("y{i}"), Duration::from_millis(300))
                .await
                .unwrap_err();
            assert!(matches!(e, NetError::Timeout(1, _)), "{e}");
            assert!(e.maybe_delivered());
        }
        assert_eq!(
            handled[0].load(Ordering::SeqCst),
            before[0] + calls,
            "n1 handled every request n2 sent"
        );

        // Reachability never lies: n1 hears n2 (its requests just arrived) but cannot
        // answer it, so n2 is unreachable from n1; n2 has heard nothing from n1 since
        // its calls began (at least 900 ms ago), so n1 is unreachable from n2.
        assert!(!t1.reachable(2, d));
        assert!(!t2.reachable(1, Duration::from_millis(800)));

        // Healing restores both directions on the same connections.
        t1.faults().set(PeerFaults::default());
        assert_eq!(t1.call(2, "p".into(), d).await.unwrap(), "n2 got p from 1");
        assert_eq!(t2.call(1, "q".into(), d).await.unwrap(), "n1 got q from 2");
        assert!(t1.reachable(2, d) && t2.reachable(1, d));
    }

    #[tokio::test]
    async fn drop_to_on_the_receiver_loses_only_the_reply() {
        // The same fault seen from the caller: n2 drops what it sends to n1, so n1's
        // request is applied at n2 and n1 cannot tell it from a lost reply.
        let (t1, t2, handled) = pair_counted().await;
        t2.faults().set(drop_to([1]));
        let e = t1
            .call(2, "x".into(), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, NetError::Timeout(2, _)), "{e}");
        assert!(e.maybe_delivered());
        assert_eq!(handled[1].load(Ordering::SeqCst), 1);
        // Isolation, unlike drop_to, refuses the request on arrival: never handled.
        t2.faults().set(PeerFaults {
            isolate: BTreeSet::from([1]),
            ..PeerFaults::default()
        });
        let e = t1
            .call(2, "z".into(), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, NetError::Timeout(2, _)), "{e}");
        assert_eq!(handled[1].load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_dead_peer_is_a_connect_error() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let t = Arc::new(T::new(
            1,
            BTreeMap::from([(2, addr)]),
            Arc::default(),
            1 << 20,
        ));
        let e = t
            .call(2, "x".into(), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(e, NetError::Connect(2, _)), "{e}");
        assert!(!e.maybe_delivered());
    }
}
