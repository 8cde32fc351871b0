//! capkv: a distributed key-value store in which every keyspace picks its side of CAP.
//!
//! Module map (see `docs/architecture.md` for the design):
//!
//! - [`storage`]: the `Engine` trait, fjall and in-memory engines, group commit.
//! - [`net`]: the peer transport and its fault filter; [`rpc`]: the messages it carries.
//! - [`clock`]: the node's wall clock (and its fault-injected skew).
//! - [`ap`]: leaderless replication for ap keyspaces (ring, dotted version vectors).
//! - [`cp`]: the Raft group (openraft): log store, state machine, network adapter.
//! - [`node`]: assembles a node; request paths with deadlines and leader forwarding.
//! - [`api`]: the HTTP API (axum) and its OpenAPI description.
//! - [`server`], [`dev`], [`cli`]: the `serve` and `dev` commands and the client CLI.
//! - [`check`]: `capkv check`, Jepsen-style runs against a cluster (checkers: `capkv-check`).

pub mod ap;
pub mod api;
mod api_doc;
pub mod auth;
pub mod bench;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod cp;
pub mod demo;
pub mod dev;
#[cfg(test)]
mod format_tests;
pub mod http;
pub mod limits;
pub mod net;
pub mod node;
pub mod process;
pub mod rpc;
pub mod rt;
pub mod server;
pub mod sim;
pub mod storage;

/// The TCP transport every node-to-node message of a process goes through.
pub type PeerTransport = net::Transport<rpc::PeerRequest, rpc::PeerResponse>;

/// The network a node sends its peer messages through: [`PeerTransport`], or the
/// simulator's.
pub type PeerNet = dyn net::Peers<rpc::PeerRequest, rpc::PeerResponse>;
