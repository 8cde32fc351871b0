//! `capkv serve`: one node, until SIGINT or SIGTERM.
//!
//! Shutdown order: stop accepting HTTP requests and let in-flight ones finish, stop
//! Raft, then fsync, so a clean stop never needs recovery on the next start.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::api::{router, AppState};
use crate::config::NodeConfig;
use crate::node::Node;

/// Latency buckets (seconds) for the request histograms.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

fn install_metrics() -> Option<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .ok()?
        .install_recorder()
        .ok()?;
    let upkeep = handle.clone();
    crate::rt::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Some(handle)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}

/// Connections the kernel may hold for the HTTP listener before it accepts them (capped
/// by `net.core.somaxconn`). A burst past the connection cap is accepted and refused at
/// once; with a short queue the rest of the burst would wait in the kernel's SYN-ACK
/// retries for seconds instead.
const HTTP_BACKLOG: u32 = 4096;

/// Binds `addr` (the first address it resolves to) with [`HTTP_BACKLOG`].
async fn listen(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let addr = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("the address resolves to nothing"))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(HTTP_BACKLOG)
}

/// How long a stopping node waits for HTTP requests in flight to finish.
const HTTP_DRAIN: Duration = Duration::from_secs(30);

/// Raises the soft limit on open files to the hard limit: every connection is a file, and
/// the connection caps (HTTP and peer) should be what bounds them, not a default 1024.
pub fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit write only to the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

pub async fn run(config: NodeConfig) -> Result<(), String> {
    let prometheus = install_metrics();
    let http = listen(&config.http_addr)
        .await
        .map_err(|e| format!("cannot listen for HTTP on {}: {e}", config.http_addr))?;
    let peer = tokio::net::TcpListener::bind(&config.peer_addr)
        .await
        .map_err(|e| format!("cannot listen for peers on {}: {e}", config.peer_addr))?;
    tracing::info!(node = %config.name, http = %config.http_addr, peer = %config.peer_addr,
        data_dir = %config.data_dir.display(), faults = config.enable_faults, "starting");
    raise_open_files_limit();
    let tls = match &config.http_tls {
        Some(t) => Some(tokio_rustls::TlsAcceptor::from(
            crate::net::tls::http_server_config(&t.cert, &t.key, t.client_ca.as_deref())
                .map_err(|e| format!("HTTP TLS: {e}"))?,
        )),
        None => None,
    };
    let limits = config.http_limits;
    let auth = match &config.root_token_file {
        Some(f) => Some(crate::auth::Auth::from_root_token_file(f)?),
        None => None,
    };
    let node = Node::start(config, peer).await.map_err(|e| e.to_string())?;
    let app = router(AppState::new(node.clone(), prometheus).with_auth(auth));
    crate::http::serve(http, app, tls, limits, shutdown_signal(), HTTP_DRAIN).await;
    node.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
