//! capkv: a distributed key-value store in which every keyspace picks its side of CAP.
//!
//! Module map (see `docs/architecture.md` for the design):
//!
//! - [`rt`]: a node's tasks, monotonic time, randomness and blocking work (the seams the
//!   simulator drives).
//! - [`storage`]: the `Engine` trait, fjall and in-memory engines, group commit;
//!   [`codec`]: the storage format of every record.
//! - [`net`]: the `Peers` trait, the TCP transport and its fault filter.
//! - [`cluster`]: node ids and the bounds both sides share; [`clock`]: the node's wall
//!   clock (and its fault-injected skew).
//! - [`ap`]: leaderless replication for ap keyspaces (ring, dotted version vectors); its
//!   peer messages in `ap::rpc`.
//! - [`cp`]: the Raft group (openraft): log store, state machine, network adapter; its
//!   peer messages in `cp::rpc`. Neither side imports the other, nor `node`.
//! - [`rpc`]: the envelope of every peer message, and `Side`, one side's view of the
//!   network.
//! - [`node`]: assembles a node; request paths with deadlines and leader forwarding; the
//!   peer handler, which hands each side its own messages.
//! - [`sim`]: `capkv sim`, deterministic simulation of a whole cluster in one process.
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
pub mod cluster;
pub mod codec;
pub mod config;
pub mod cp;
pub mod demo;
pub mod dev;
#[cfg(test)]
mod format_tests;
pub mod http;
pub mod limits;
pub mod message;
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
