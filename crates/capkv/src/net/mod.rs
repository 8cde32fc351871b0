//! The peer transport: every message between nodes (Raft RPCs, forwarded client
//! requests, pings) goes through one [`Transport`], so one switch, the [`FaultFilter`],
//! partitions all of it at once.
//!
//! Wire format: length-delimited frames over TCP (mutual TLS 1.3 unless the node runs with
//! `--insecure-peers`, see [`tls`]), one multiplexed connection per peer.
//!
//! ```text
//!   frame = len:u32be  kind:u8  id:u64be  body          (len counts kind, id, body)
//!   kind 0 = hello     (id = sender's node id, no body; first frame of a connection)
//!   kind 1 = request   (body = bincode Req)
//!   kind 2 = response  (body = bincode Resp, id = the request's id)
//!   kind 3 = refused   (no body, id = the request's id: it was larger than the frame
//!                       limit and was not handled)
//!   kind 4 = too large (no body, id = the request's id: it was handled, but its
//!                       response was larger than the frame limit)
//! ```
//!
//! An oversized frame fails one request, never the connection: the sender refuses to
//! send a request over the limit (not delivered) and answers `too large` in place of a
//! response over it; a receiver skips an oversized frame's body unread (a peer that
//! ignores the limit) and answers or fails that one request. Every await of a call is
//! under its deadline, the send queue included.
//!
//! What a peer can make this node hold is bounded ([`PEER_UNIDENTIFIED_MAX`] connections
//! that have not yet proven who they are, the oldest closed for a newcomer, each reading
//! at most a hello; one inbound
//! connection per identified peer, the newest; per connection at most
//! [`INBOUND_IN_FLIGHT_MAX`] requests and about two frame limits of request bytes in
//! handling, and one frame limit of queued bytes in each direction), and every hit is
//! counted by [`crate::limits::hit`].
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
use std::time::Duration;

use crate::rt::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use crate::limits;

pub mod tls;

pub use tls::PeerTls;

pub type PeerId = u64;

type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

const KIND_HELLO: u8 = 0;
const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;
const KIND_REFUSED: u8 = 3;
const KIND_TOO_LARGE: u8 = 4;
const HEADER_BYTES: usize = 9;
/// How long a handled request's response may wait for room in the send queue before it
/// is dropped (the caller then times out: outcome unknown, which is the truth).
const RESPONSE_QUEUE_WAIT: Duration = Duration::from_secs(5);

/// Frames queued for one connection's writer before senders wait.
const SEND_QUEUE_FRAMES: usize = 1024;
/// Requests one inbound connection may have in flight; more wait to be read.
const INBOUND_IN_FLIGHT_MAX: usize = 256;
/// How long a connecting peer has to finish the TLS handshake and say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Inbound connections that have not yet said (and proven) who they are. Each holds a
/// task, a socket and a TLS handshake's state (tens of KiB), never more than a hello. When
/// all are taken the oldest is closed for the newcomer, so strangers holding connections
/// open cannot lock honest peers out: to close an honest handshake (milliseconds) before it
/// completes, an attacker must open this many connections within those milliseconds.
pub const PEER_UNIDENTIFIED_MAX: usize = 1024;
/// Longest a connect attempt may take (a dead peer should fail fast).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Longest a TLS handshake with a peer may take once connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(2000);

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
    /// The request was over the frame limit: never sent, or refused unhandled.
    #[error("request to node {0} too large: {1}")]
    RequestTooLarge(PeerId, String),
    /// The request was handled, but its response was over the frame limit.
    #[error("the response of node {0} was too large to send")]
    ReplyTooLarge(PeerId),
}

impl NetError {
    /// False when the request certainly never took effect at the peer.
    pub fn maybe_delivered(&self) -> bool {
        matches!(
            self,
            NetError::Timeout(..) | NetError::Lost(..) | NetError::ReplyTooLarge(..)
        )
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

/// What a node needs of its network: call a peer, and know whether it could answer.
/// [`Transport`] (TCP, TLS between peers) is what a process uses; `crate::sim::SimNet`
/// carries the same messages between nodes of one process on a seeded schedule.
pub trait Peers<Req, Resp>: Send + Sync + 'static {
    /// Sends `req` to `to` and waits at most `timeout` for the reply.
    fn call(&self, to: PeerId, req: Req, timeout: Duration) -> CallFuture<'_, Resp>;

    /// Whether `peer` can answer a request from here (see [`Transport::reachable`]).
    fn reachable(&self, peer: PeerId, window: Duration) -> bool;
}

/// The reply of [`Peers::call`], to come.
pub type CallFuture<'a, Resp> = Pin<Box<dyn Future<Output = Result<Resp, NetError>> + Send + 'a>>;

impl<Req, Resp> Peers<Req, Resp> for Transport<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Resp: Serialize + DeserializeOwned + Send + 'static,
{
    fn call(&self, to: PeerId, req: Req, timeout: Duration) -> CallFuture<'_, Resp> {
        Box::pin(Transport::call(self, to, req, timeout))
    }

    fn reachable(&self, peer: PeerId, window: Duration) -> bool {
        Transport::reachable(self, peer, window)
    }
}

/// Callers waiting for a reply, by request id.
type Pending<Resp> = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Resp, NetError>>>>>;

struct Conn<Resp> {
    out: Outbox,
    pending: Pending<Resp>,
    closed: Arc<AtomicBool>,
}

/// Bytes one connection may hold in each of: frames queued to send, replies waiting for
/// room in that queue, and requests read but not yet answered. A larger frame is still
/// queued, alone (it takes the whole budget). With one connection per peer, this and
/// [`INBOUND_IN_FLIGHT_MAX`] bound what a peer that never reads can make a node hold.
pub const PEER_QUEUE_BYTES: usize = 32 << 20;

/// Unidentified connections, oldest first: a serial and a stop signal each.
type Strangers = Arc<Mutex<std::collections::VecDeque<(u64, Arc<Notify>)>>>;

/// An unidentified connection's place among [`PEER_UNIDENTIFIED_MAX`]: given back on drop.
struct StrangerPlace {
    serial: u64,
    stop: Arc<Notify>,
    strangers: Strangers,
}

impl Drop for StrangerPlace {
    fn drop(&mut self) {
        self.strangers
            .lock()
            .expect("strangers lock poisoned")
            .retain(|(s, _)| *s != self.serial);
    }
}

/// A frame queued for a connection's writer, with its share of the queue's byte budget.
struct Queued {
    frame: Vec<u8>,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// The send side of one connection: at most [`SEND_QUEUE_FRAMES`] frames and one frame
/// limit of bytes queued (a peer that reads nothing fills it; senders then wait, under
/// their deadlines).
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<Queued>,
    bytes: Arc<Semaphore>,
    budget: usize,
    /// Bytes of replies made but waiting for room (see [`Outbox::push_reply`]).
    waiting: Arc<AtomicU64>,
}

impl Outbox {
    fn new(frames: usize, budget: usize) -> (Outbox, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(frames);
        let bytes = Arc::new(Semaphore::new(budget));
        let waiting = Arc::default();
        (
            Outbox {
                tx,
                bytes,
                budget,
                waiting,
            },
            rx,
        )
    }

    /// Queues a reply, waiting at most [`RESPONSE_QUEUE_WAIT`] for room. A reply that
    /// finds no room waits only while the replies already waiting hold less than the
    /// budget; past it, or past the wait, it is dropped and its caller times out
    /// (outcome unknown, which is the truth). False: dropped.
    async fn push_reply(&self, frame: Vec<u8>) -> bool {
        let n = frame.len().min(self.budget) as u64;
        if let Ok(permit) = self.bytes.clone().try_acquire_many_owned(n as u32) {
            let q = Queued {
                frame,
                _bytes: Some(permit),
            };
            return tokio::time::timeout(RESPONSE_QUEUE_WAIT, self.tx.send(q))
                .await
                .is_ok_and(|r| r.is_ok());
        }
        if self.waiting.fetch_add(n, Ordering::AcqRel) + n > self.budget as u64 {
            self.waiting.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        let queued = tokio::time::timeout(RESPONSE_QUEUE_WAIT, self.push(frame)).await;
        self.waiting.fetch_sub(n, Ordering::AcqRel);
        queued.is_ok_and(|r| r.is_ok())
    }

    /// Waits until at most half the byte budget is queued: a connection whose peer does
    /// not read its replies stops having requests read.
    async fn drained(&self) {
        let half = (self.budget / 2) as u32;
        let _ = self.bytes.acquire_many(half).await;
    }

    /// Queues `frame`, waiting for room. Err: the connection is gone.
    async fn push(&self, frame: Vec<u8>) -> Result<(), ()> {
        let n = frame.len().min(self.budget) as u32;
        let permit = self
            .bytes
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| ())?;
        self.tx
            .send(Queued {
                frame,
                _bytes: Some(permit),
            })
            .await
            .map_err(|_| ())
    }
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
    send_queue_frames: usize,
    /// Mutual TLS, or `None` with `--insecure-peers`.
    tls: Option<Arc<PeerTls>>,
    /// Inbound connections not yet identified, oldest first, each with its stop signal
    /// ([`PEER_UNIDENTIFIED_MAX`]).
    strangers: Strangers,
    /// The inbound connection of each identified peer (a serial and its stop signal); a
    /// newer connection from the same peer replaces it.
    inbound: Mutex<HashMap<PeerId, (u64, Arc<Notify>)>>,
    _req: PhantomData<fn(Req)>,
}

/// One frame read: whole, or over the limit (its body skipped unread).
enum Frame {
    Whole(u8, u64, Vec<u8>),
    Oversized(u8, u64),
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

/// The length a frame declares (kind, id and body), from its encoding.
fn frame_len(f: &[u8]) -> usize {
    f.len() - 4
}

/// Reads one frame. `Ok(None)` on a clean end of stream. A frame over `max` has its body
/// read and dropped in bounded chunks, so the connection goes on.
async fn read_frame<R: AsyncReadExt + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len < HEADER_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut header = [0u8; HEADER_BYTES];
    r.read_exact(&mut header).await?;
    let kind = header[0];
    let id = u64::from_be_bytes(header[1..].try_into().expect("8 bytes"));
    let body_len = len - HEADER_BYTES;
    if len > max {
        let skipped = tokio::io::copy(&mut r.take(body_len as u64), &mut tokio::io::sink()).await?;
        if skipped < body_len as u64 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        return Ok(Some(Frame::Oversized(kind, id)));
    }
    let mut body = vec![0u8; body_len];
    r.read_exact(&mut body).await?;
    Ok(Some(Frame::Whole(kind, id, body)))
}

/// Drains `rx` into the socket to `peer`, flushing whenever the queue is empty.
///
/// This is the last gate of the fault filter on the send side: a request or reply
/// queued before a fault was set, and written after, is dropped here (a request
/// dropped here times out at its caller: it is reported as maybe delivered, which is
/// the safe answer). The hello frame always passes: it carries nothing.
async fn write_loop(
    mut rx: mpsc::Receiver<Queued>,
    w: WriteHalf,
    peer: PeerId,
    faults: Arc<FaultFilter>,
) -> std::io::Result<()> {
    let mut w = BufWriter::new(w);
    let passes = |f: &[u8]| f[4] == KIND_HELLO || faults.sends_to(peer);
    while let Some(q) = rx.recv().await {
        if passes(&q.frame) {
            w.write_all(&q.frame).await?;
        }
        while let Ok(q) = rx.try_recv() {
            if passes(&q.frame) {
                w.write_all(&q.frame).await?;
            }
        }
        w.flush().await?;
    }
    // A TLS stream is closed with close_notify, so the peer sees a clean end.
    let _ = w.shutdown().await;
    Ok(())
}

fn split_plain(stream: TcpStream) -> (ReadHalf, WriteHalf) {
    let (r, w) = stream.into_split();
    (Box::new(r), Box::new(w))
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
            send_queue_frames: SEND_QUEUE_FRAMES,
            tls: None,
            strangers: Arc::default(),
            inbound: Mutex::default(),
            _req: PhantomData,
        }
    }

    /// Mutual TLS on every connection, both ways.
    pub fn with_tls(mut self, tls: Option<PeerTls>) -> Self {
        self.tls = tls.map(Arc::new);
        self
    }

    /// Bytes one connection may queue in each direction ([`PEER_QUEUE_BYTES`]; less in
    /// tests with a small frame limit).
    fn queue_bytes(&self) -> usize {
        PEER_QUEUE_BYTES.min(4 * (self.frame_bytes_max + 4 + HEADER_BYTES))
    }

    /// A smaller send queue, so tests can fill it.
    #[cfg(test)]
    fn with_send_queue(mut self, frames: usize) -> Self {
        self.send_queue_frames = frames;
        self
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
        let (r, w) = match &self.tls {
            None => split_plain(stream),
            Some(tls) => {
                let name = tls.name(to).ok_or(NetError::UnknownPeer(to))?;
                let s =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.connector().connect(name, stream))
                        .await
                        .map_err(|_| {
                            NetError::Connect(to, format!("TLS handshake with {addr} timed out"))
                        })?
                        .map_err(|e| {
                            NetError::Connect(to, format!("TLS handshake with {addr}: {e}"))
                        })?;
                let (r, w) = tokio::io::split(s);
                (Box::new(r) as ReadHalf, Box::new(w) as WriteHalf)
            }
        };
        let (out, rx) = Outbox::new(self.send_queue_frames, self.queue_bytes());
        let closed = Arc::new(AtomicBool::new(false));
        let pending: Pending<Resp> = Arc::default();
        out.push(frame(KIND_HELLO, self.me, &()))
            .await
            .map_err(|_| NetError::Connect(to, "writer gone".into()))?;
        {
            let (closed, faults) = (closed.clone(), self.faults.clone());
            crate::rt::spawn(async move {
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
            crate::rt::spawn(async move {
                let mut r = BufReader::new(r);
                let end = loop {
                    let (id, outcome) = match read_frame(&mut r, max).await {
                        Ok(Some(Frame::Whole(KIND_RESPONSE, id, body))) => {
                            match bincode::deserialize::<Resp>(&body) {
                                Ok(resp) => (id, Ok(resp)),
                                Err(e) => break format!("undecodable response: {e}"),
                            }
                        }
                        Ok(Some(Frame::Whole(KIND_REFUSED, id, _))) => (
                            id,
                            Err(NetError::RequestTooLarge(
                                to,
                                "refused by the peer: over its frame limit".into(),
                            )),
                        ),
                        Ok(Some(Frame::Whole(KIND_TOO_LARGE, id, _))) => {
                            (id, Err(NetError::ReplyTooLarge(to)))
                        }
                        // A response over our limit: skipped unread; that one call fails.
                        Ok(Some(Frame::Oversized(KIND_RESPONSE, id))) => {
                            (id, Err(NetError::ReplyTooLarge(to)))
                        }
                        Ok(Some(Frame::Whole(kind, _, _) | Frame::Oversized(kind, _))) => {
                            break format!("unexpected frame kind {kind}")
                        }
                        Ok(None) => break "closed by peer".to_string(),
                        Err(e) => break e.to_string(),
                    };
                    if faults.blocks(to) {
                        continue; // dropped on the floor, as a partition would
                    }
                    contacts.touch(to);
                    let waiter = pending.lock().expect("pending lock poisoned").remove(&id);
                    if let Some(w) = waiter {
                        let _ = w.send(outcome);
                    } // else the caller gave up waiting
                };
                tracing::debug!(peer = to, reason = %end, "peer connection ended");
                closed.store(true, Ordering::Release);
                // Dropping the waiters tells every caller the connection was lost.
                pending.lock().expect("pending lock poisoned").clear();
            });
        }
        let conn = Arc::new(Conn {
            out,
            pending: pending.clone(),
            closed: closed.clone(),
        });
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends `req` to `to` and waits at most `timeout` for the reply.
    pub async fn call(&self, to: PeerId, req: Req, timeout: Duration) -> Result<Resp, NetError> {
        if let Some(refused) = self.faults.refuse_send(to) {
            return Err(refused);
        }
        let started = Instant::now();
        let conn = tokio::time::timeout(timeout, self.connection(to))
            .await
            .map_err(|_| NetError::Connect(to, "connect timed out".into()))??;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let f = frame(KIND_REQUEST, id, &req);
        if frame_len(&f) > self.frame_bytes_max {
            return Err(NetError::RequestTooLarge(
                to,
                format!(
                    "{} bytes, the frame limit is {}",
                    frame_len(&f),
                    self.frame_bytes_max
                ),
            ));
        }
        let (tx, rx) = oneshot::channel();
        conn.pending
            .lock()
            .expect("pending lock poisoned")
            .insert(id, tx);
        let forget = || {
            conn.pending
                .lock()
                .expect("pending lock poisoned")
                .remove(&id);
        };
        // A full send queue waits, but never past the deadline; a frame that found no
        // room was never queued, so it was certainly not delivered.
        let left = timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, conn.out.push(f)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                forget();
                return Err(NetError::Connect(
                    to,
                    "connection closed before sending".into(),
                ));
            }
            Err(_) => {
                forget();
                limits::hit("peer_send_queue");
                return Err(NetError::Connect(
                    to,
                    "the send queue stayed full until the deadline".into(),
                ));
            }
        }
        let left = timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(NetError::Lost(
                to,
                "connection closed while waiting for the reply".into(),
            )),
            Err(_) => {
                forget();
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
            // Strangers get a bounded number of places; past it, the oldest stranger is
            // closed to make room. Refusing the newest instead let anyone who keeps 64
            // idle connections open lock honest peers out (review); an honest peer
            // proves itself within milliseconds, so it is never the oldest for long.
            let place = self.stranger_place();
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let handler = handler.clone();
            crate::rt::spawn(async move {
                if let Err(e) = this.serve_connection(stream, place, handler).await {
                    tracing::debug!(%addr, error = %e, "inbound peer connection ended");
                }
            });
        }
    }

    /// Registers a new unidentified connection, closing the oldest one if all places are
    /// taken. The place is given back when the returned guard is dropped.
    fn stranger_place(&self) -> StrangerPlace {
        let serial = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(Notify::new());
        let mut strangers = self.strangers.lock().expect("strangers lock poisoned");
        while strangers.len() >= PEER_UNIDENTIFIED_MAX {
            if let Some((_, oldest)) = strangers.pop_front() {
                limits::hit("peer_unidentified_connections");
                oldest.notify_one();
            }
        }
        strangers.push_back((serial, stop.clone()));
        StrangerPlace {
            serial,
            stop,
            strangers: self.strangers.clone(),
        }
    }

    /// The TLS handshake and the hello, under [`HELLO_TIMEOUT`]: who the connection is
    /// from, proven by its certificate when TLS is on. Reads nothing past the hello.
    async fn identify(
        &self,
        stream: TcpStream,
    ) -> std::io::Result<(PeerId, BufReader<ReadHalf>, WriteHalf)> {
        let (r, w, chain) = match &self.tls {
            None => {
                let (r, w) = split_plain(stream);
                (r, w, None)
            }
            Some(tls) => {
                let s = tls.acceptor().accept(stream).await?;
                let chain: Vec<_> = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .unwrap_or_default()
                    .iter()
                    .map(|c| c.clone().into_owned())
                    .collect();
                let (r, w) = tokio::io::split(s);
                (
                    Box::new(r) as ReadHalf,
                    Box::new(w) as WriteHalf,
                    Some(chain),
                )
            }
        };
        let mut r = BufReader::new(r);
        // A hello has no body: a first frame of any other length is not read at all.
        let mut hello = [0u8; 4 + HEADER_BYTES];
        r.read_exact(&mut hello).await?;
        let len = u32::from_be_bytes(hello[..4].try_into().expect("4 bytes")) as usize;
        if len != HEADER_BYTES || hello[4] != KIND_HELLO {
            return Err(std::io::Error::other("peer did not say hello"));
        }
        let from = u64::from_be_bytes(hello[5..].try_into().expect("8 bytes"));
        if !self.peers.contains_key(&from) {
            return Err(std::io::Error::other(format!(
                "hello from unknown node {from}"
            )));
        }
        if let (Some(tls), Some(chain)) = (&self.tls, chain) {
            if let Err(e) = tls.check_identity(&chain, from) {
                limits::hit("peer_identity");
                tracing::warn!(claimed = from, error = %e, "peer connection refused: identity");
                return Err(std::io::Error::other(format!(
                    "claims to be node {from}, but {e}"
                )));
            }
        }
        Ok((from, r, w))
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        place: StrangerPlace,
        handler: Handler<Req, Resp>,
    ) -> std::io::Result<()> {
        let identified = tokio::select! {
            r = tokio::time::timeout(HELLO_TIMEOUT, self.identify(stream)) => r,
            _ = place.stop.notified() => {
                return Err(std::io::Error::other("closed to make room for newer strangers"));
            }
        };
        let (from, mut r, w) = match identified {
            Ok(x) => x?,
            Err(_) => {
                limits::hit("peer_hello_timeout");
                return Err(std::io::Error::other("no hello within the timeout"));
            }
        };
        drop(place);
        // One inbound connection per peer: an honest peer dials once and redials only
        // when its connection broke, so the newest replaces the rest.
        let serial = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(Notify::new());
        if let Some((_, old)) = self
            .inbound
            .lock()
            .expect("inbound lock poisoned")
            .insert(from, (serial, stop.clone()))
        {
            old.notify_one();
        }
        let result = self.serve_frames(from, &mut r, w, &stop, handler).await;
        let mut inbound = self.inbound.lock().expect("inbound lock poisoned");
        if inbound.get(&from).is_some_and(|(s, _)| *s == serial) {
            inbound.remove(&from);
        }
        result
    }

    async fn serve_frames(
        self: &Arc<Self>,
        from: PeerId,
        r: &mut BufReader<ReadHalf>,
        w: WriteHalf,
        stop: &Notify,
        handler: Handler<Req, Resp>,
    ) -> std::io::Result<()> {
        let (out, rx) = Outbox::new(self.send_queue_frames, self.queue_bytes());
        let faults = self.faults.clone();
        let writer = crate::rt::spawn(async move {
            let _ = write_loop(rx, w, from, faults).await;
        });
        // A writer blocked on a peer that reads nothing must not outlive the connection.
        struct AbortOnDrop(tokio::task::JoinHandle<()>);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _writer = AbortOnDrop(writer);
        let in_flight = Arc::new(Semaphore::new(INBOUND_IN_FLIGHT_MAX));
        // Request bytes in handling: read frames wait for earlier ones to be answered.
        let in_bytes = Arc::new(Semaphore::new(self.queue_bytes()));
        let max = self.frame_bytes_max;
        loop {
            let f = tokio::select! {
                f = async {
                    out.drained().await;
                    read_frame(r, max).await
                } => f?,
                _ = stop.notified() => {
                    return Err(std::io::Error::other("replaced by a newer connection"));
                }
            };
            let Some(f) = f else { return Ok(()) };
            let (id, body) = match f {
                Frame::Whole(KIND_REQUEST, id, body) => (id, Some(body)),
                Frame::Oversized(KIND_REQUEST, id) => (id, None),
                Frame::Whole(kind, _, _) | Frame::Oversized(kind, _) => {
                    return Err(std::io::Error::other(format!(
                        "unexpected frame kind {kind}"
                    )));
                }
            };
            // Isolated: dropped unread. drop_to alone does not stop receiving.
            if self.faults.blocks(from) {
                continue;
            }
            self.contacts.touch(from);
            let Some(body) = body else {
                // Over the limit: refused unhandled, and the connection goes on.
                limits::hit("peer_frame_bytes");
                if self.faults.sends_to(from) {
                    reply(&out, frame(KIND_REFUSED, id, &())).await;
                }
                continue;
            };
            let bytes = in_bytes
                .clone()
                .acquire_many_owned(body.len().min(self.queue_bytes()) as u32)
                .await
                .expect("semaphore never closed");
            let req: Req = bincode::deserialize(&body).map_err(std::io::Error::other)?;
            drop(body);
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let (this, handler, out) = (self.clone(), handler.clone(), out.clone());
            crate::rt::spawn(async move {
                let resp = handler(from, req).await;
                // Isolated or drop_to: the request took effect, the reply is lost, and
                // the caller times out (maybe delivered), as with a real lost reply.
                if this.faults.sends_to(from) {
                    let mut f = frame(KIND_RESPONSE, id, &resp);
                    drop(resp);
                    if frame_len(&f) > this.frame_bytes_max {
                        tracing::warn!(
                            peer = from,
                            bytes = frame_len(&f),
                            "a response over the frame limit was not sent"
                        );
                        limits::hit("peer_frame_bytes");
                        f = frame(KIND_TOO_LARGE, id, &());
                    }
                    reply(&out, f).await;
                }
                // Held until the reply is queued: a peer that never reads its replies
                // stops getting requests read, instead of piling replies up here.
                drop((permit, bytes));
            });
        }
    }
}

/// Queues a reply frame ([`Outbox::push_reply`]); one that finds no room is dropped and
/// counted.
async fn reply(out: &Outbox, f: Vec<u8>) {
    if !out.push_reply(f).await {
        limits::hit("peer_reply_queue");
        tracing::debug!("a reply found the send queue full and was dropped");
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

    /// Two transports with their own frame limits; each answers `big:N` with N bytes.
    async fn pair_limited(max1: usize, max2: usize) -> (Arc<T>, Arc<T>, [Arc<AtomicU64>; 2]) {
        let handled: [Arc<AtomicU64>; 2] = Default::default();
        let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a1 = l1.local_addr().unwrap().to_string();
        let a2 = l2.local_addr().unwrap().to_string();
        let t1 = Arc::new(T::new(1, BTreeMap::from([(2, a2)]), Arc::default(), max1));
        let t2 = Arc::new(T::new(2, BTreeMap::from([(1, a1)]), Arc::default(), max2));
        for (t, l, n) in [(&t1, l1, handled[0].clone()), (&t2, l2, handled[1].clone())] {
            let handler: Handler<String, String> = Arc::new(move |_, req| {
                n.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    match req.strip_prefix("big:") {
                        Some(len) => "x".repeat(len.parse().unwrap()),
                        None => format!("got {}", req.len()),
                    }
                })
            });
            tokio::spawn(t.clone().serve(l, handler));
        }
        (t1, t2, handled)
    }

    /// #8 item 4: a frame over the limit fails its own request, on either side, and the
    /// connection serves the next request.
    #[tokio::test]
    async fn an_oversized_frame_fails_one_request_never_the_connection() {
        let d = Duration::from_secs(5);
        let (t1, _t2, handled) = pair_limited(4096, 4096).await;
        assert_eq!(t1.call(2, "hi".into(), d).await.unwrap(), "got 2");

        // A request over the sender's own limit is never sent.
        let e = t1.call(2, "y".repeat(10_000), d).await.unwrap_err();
        assert!(matches!(e, NetError::RequestTooLarge(2, _)), "{e}");
        assert!(!e.maybe_delivered());
        assert_eq!(handled[1].load(Ordering::SeqCst), 1);

        // A response over the limit: handled, reported too large (outcome unknown).
        let e = t1.call(2, "big:10000".into(), d).await.unwrap_err();
        assert!(matches!(e, NetError::ReplyTooLarge(2)), "{e}");
        assert!(e.maybe_delivered());
        assert_eq!(t1.call(2, "after".into(), d).await.unwrap(), "got 5");

        // A peer with a larger limit (or one that ignores it): its oversized request is
        // skipped unread and refused; its oversized reply is skipped and fails the call.
        let (wide, _narrow, handled) = pair_limited(1 << 20, 4096).await;
        let e = wide.call(2, "z".repeat(10_000), d).await.unwrap_err();
        assert!(matches!(e, NetError::RequestTooLarge(2, _)), "{e}");
        assert!(!e.maybe_delivered());
        assert_eq!(handled[1].load(Ordering::SeqCst), 0, "never handled");
        assert_eq!(wide.call(2, "ok".into(), d).await.unwrap(), "got 2");
        let (narrow, _wide, _) = pair_limited(4096, 1 << 20).await;
        let e = narrow.call(2, "big:10000".into(), d).await.unwrap_err();
        assert!(matches!(e, NetError::ReplyTooLarge(2)), "{e}");
        assert_eq!(narrow.call(2, "ok".into(), d).await.unwrap(), "got 2");
    }

    /// #8 item 8: a peer that stops reading fills the socket and then the send queue;
    /// every call still ends by its deadline, as not delivered when its frame never
    /// found room.
    #[tokio::test]
    async fn a_full_send_queue_does_not_outlive_the_deadline() {
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = silent.accept().await {
                conns.push(c); // accepted, never read
            }
        });
        let t = Arc::new(
            T::new(1, BTreeMap::from([(2, addr)]), Arc::default(), 1 << 22).with_send_queue(2),
        );
        let payload = "p".repeat(1 << 20);
        let mut not_sent = 0;
        for _ in 0..64 {
            let started = Instant::now();
            let call = t.call(2, payload.clone(), Duration::from_millis(100));
            let e = tokio::time::timeout(Duration::from_secs(2), call)
                .await
                .expect("a call outlived its deadline")
                .unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(1), "{e}");
            if !e.maybe_delivered() {
                assert!(matches!(e, NetError::Connect(2, _)), "{e}");
                not_sent += 1;
            }
        }
        assert!(not_sent > 0, "the send queue never filled");
        held.abort();
    }

    /// A peer that sends requests and never reads the replies must not make this node
    /// handle (and hold replies for) an unbounded number of them: a request's in-flight
    /// place is held until its reply is queued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_never_reads_replies_gets_backpressure() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(T::new(
            2,
            BTreeMap::from([(1, "127.0.0.1:9".to_string())]),
            Arc::default(),
            1 << 20,
        ));
        let handled = Arc::new(AtomicU64::new(0));
        let counter = handled.clone();
        let handler: Handler<String, String> = Arc::new(move |_, _req| {
            counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { "r".repeat(64 << 10) })
        });
        tokio::spawn(server.serve(listener, handler));
        let mut raw = TcpStream::connect(addr).await.unwrap();
        let mut out = frame(KIND_HELLO, 1, &());
        for id in 0..5000u64 {
            out.extend(frame(KIND_REQUEST, id, &"ping".to_string()));
        }
        raw.write_all(&out).await.unwrap(); // and never read
        let bound = (INBOUND_IN_FLIGHT_MAX + SEND_QUEUE_FRAMES + 200) as u64;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            assert!(
                handled.load(Ordering::SeqCst) <= bound,
                "{} requests handled for a peer that reads nothing",
                handled.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(handled.load(Ordering::SeqCst) > 0);
    }
}
