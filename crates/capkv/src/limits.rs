//! Reporting a limit that was hit. Every limit is defined next to the code it guards, with
//! its reason; docs/security.md lists them all with their defaults.
//!
//! Each hit is answered with a clear error where one can be sent (an HTTP status and
//! message, a refused peer frame, a closed connection) and counted here, so an operator
//! sees which bound a client or a peer ran into: `capkv_limit_hits_total{limit="..."}`.

/// Counts one hit of `limit` (a short stable name, e.g. `http_connections`).
pub fn hit(limit: &'static str) {
    metrics::counter!("capkv_limit_hits_total", "limit" => limit).increment(1);
}
