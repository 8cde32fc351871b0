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
//! The fault filter drops traffic on both sides: a node refuses to send to an isolated
//! peer, and silently drops requests and responses arriving from one (no reply, as a
//! real partition would).

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

/// Which peers this node refuses to talk to. Changed at run time through `/v1/faults`.
#[derive(Default)]
pub struct FaultFilter {
    isolated: RwLock<BTreeSet<PeerId>>,
}

impl FaultFilter {
    pub fn blocks(&self, peer: PeerId) -> bool {
        self.isolated
            .read()
            .expect("fault filter lock poisoned")
            .contains(&peer)
    }
    pub fn isolate(&self, peers: BTreeSet<PeerId>) {
        *self.isolated.write().expect("fault filter lock poisoned") = peers;
    }
    pub fn isolated(&self) -> BTreeSet<PeerId> {
        self.isolated
            .read()
            .expect("fault filter lock poisoned")
            .clone()
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

/// Drains `rx` into the socket, flushing whenever the queue is empty.
async fn write_loop(
    mut rx: mpsc::Receiver<Vec<u8>>,
    w: tokio::net::tcp::OwnedWriteHalf,
) -> std::io::Result<()> {
    let mut w = BufWriter::new(w);
    while let Some(f) = rx.recv().await {
        w.write_all(&f).await?;
        while let Ok(f) = rx.try_recv() {
            w.write_all(&f).await?;
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

    /// Whether `peer` was heard from within `window` and is not isolated.
    pub fn reachable(&self, peer: PeerId, window: Duration) -> bool {
        !self.faults.blocks(peer) && self.contacts.heard_within(peer, window)
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
            let closed = closed.clone();
            tokio::spawn(async move {
                if let Err(e) = write_loop(rx, w).await {
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
        if self.faults.blocks(to) {
            return Err(NetError::Isolated(to));
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
        tokio::spawn(async move {
            let _ = write_loop(rx, w).await;
        });
        let in_flight = Arc::new(Semaphore::new(INBOUND_IN_FLIGHT_MAX));
        while let Some((kind, id, body)) = read_frame(&mut r, self.frame_bytes_max).await? {
            if kind != KIND_REQUEST {
                return Err(std::io::Error::other(format!(
                    "unexpected frame kind {kind}"
                )));
            }
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
                if !this.faults.blocks(from) {
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
        for (t, l, me) in [(&t1, l1, "n1"), (&t2, l2, "n2")] {
            let handler: Handler<String, String> = Arc::new(move |from, req| {
                Box::pin(async move { format!("{me} got {req} from {from}") })
            });
            tokio::spawn(t.clone().serve(l, handler));
        }
        (t1, t2)
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
