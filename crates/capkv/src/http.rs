//! The HTTP listener: connections accepted within bounds, optionally over TLS, each
//! served by hyper (HTTP/1.1) with the router of [`crate::api`].
//!
//! `axum::serve` has no connection cap and no header, body or write timeouts, so a
//! client could hold connections open forever by sending half a header (slowloris) or by
//! never reading its answers. Here every connection is bounded:
//!
//! - at most `max_connections` at once ([`HttpLimits`]); one past the cap gets a
//!   `503` (plain HTTP) or is closed (TLS) at once, and the node goes on serving the
//!   connections it has;
//! - a request's head must arrive within `header_timeout` of the connection starting to
//!   wait for it; that wait also bounds an idle keep-alive connection;
//! - a request's body must arrive whole within [`BODY_TIMEOUT`];
//! - a write that makes no progress for [`WRITE_TIMEOUT`] (a client that reads nothing)
//!   ends the connection;
//! - a TLS handshake must finish within `header_timeout`.
//!
//! Every hit is counted by [`crate::limits::hit`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::limits;

/// Default cap on open HTTP connections (`--max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default wait for a request's head, and idle keep-alive (`--http-header-timeout-ms`).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a request body may take to arrive, from the moment its head was read: longer
/// than the longest request deadline, so an honest client is never cut off.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(70);
/// Longest a write to a client may make no progress.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head (request line, query string and headers) read: over it, hyper
/// answers 431 (or 414) and closes. Each connection may buffer this much while its head
/// arrives, so it bounds the heads of `max_connections` connections (64 MiB at the
/// default). An `if_value` (in the query string) is thereby bounded to about this size.
pub const HEAD_BYTES_MAX: usize = 64 << 10;
/// Connections over the cap that are answered `503` at once; more are closed unanswered
/// (answering costs a task and a socket for up to a second each).
const REFUSALS_IN_FLIGHT_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting, lets every
/// connection finish its request in flight (each closes after it), and returns once all
/// have closed (or after `drain`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let places = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT_MAX));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, _addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and the like: wait for connections to close.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            limits::hit("http_connections");
            if tls.is_none() {
                if let Ok(r) = refusals.clone().try_acquire_owned() {
                    crate::rt::spawn(async move {
                        refuse(stream, limits.max_connections).await;
                        drop(r);
                    });
                }
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (app, tls, stop) = (app.clone(), tls.clone(), stop_rx.clone());
        crate::rt::spawn(async move {
            serve_connection(stream, app, tls, limits, stop).await;
            drop(place);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let all = limits.max_connections as u32;
    let _ = tokio::time::timeout(drain, places.acquire_many(all)).await;
}

/// Answers a connection over the cap with a `503` and closes it.
async fn refuse(mut stream: TcpStream, cap: usize) {
    let body = format!(
        "{{\"error\":{{\"code\":\"unavailable\",\"message\":\"this node already serves {cap} \
         connections (--max-connections); try again or another node\"}}}}"
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: HttpLimits,
    stop: watch::Receiver<bool>,
) {
    match tls {
        None => serve_io(WriteTimeout::new(stream), app, limits, stop).await,
        Some(acceptor) => {
            match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => serve_io(WriteTimeout::new(s), app, limits, stop).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => {
                    limits::hit("http_tls_handshake_timeout");
                }
            }
        }
    }
}

async fn serve_io<S>(
    io: WriteTimeout<S>,
    app: Router,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let req = req.map(|b| Body::new(BodyDeadline::new(b, BODY_TIMEOUT)));
        app.clone().oneshot(req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(HEAD_BYTES_MAX)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let outcome = tokio::select! {
        r = conn.as_mut() => r,
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = outcome {
        if e.is_timeout() {
            limits::hit("http_header_timeout");
        }
        tracing::debug!(error = %e, "HTTP connection ended");
    }
}

/// Resolves once the server is stopping.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _closed = stop.wait_for(|s| *s).await.is_err();
}

/// A request body that must arrive whole by a deadline.
struct BodyDeadline {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
}

impl BodyDeadline {
    fn new(inner: Incoming, within: Duration) -> Self {
        BodyDeadline {
            inner,
            deadline: Box::pin(tokio::time::sleep(within)),
        }
    }
}

impl hyper::body::Body for BodyDeadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(f) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(f.map(|r| r.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            limits::hit("http_body_timeout");
            return Poll::Ready(Some(Err(format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            )
            .into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A stream whose writes fail once one has made no progress for [`WRITE_TIMEOUT`].
struct WriteTimeout<S> {
    inner: S,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteTimeout<S> {
    fn new(inner: S) -> Self {
        WriteTimeout {
            inner,
            stalled: None,
        }
    }

    /// Called when a write is pending: errors once it has been for too long.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        if timer.as_mut().poll(cx).is_ready() {
            limits::hit("http_write_timeout");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for too long",
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.check(cx).map(|r| r.map(|_| 0)),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.check(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.check(cx).map(|r| r.map(|_| 0)),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
