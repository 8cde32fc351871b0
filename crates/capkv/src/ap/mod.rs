//! ap keyspaces: leaderless, Dynamo-style replication.
//!
//! [`ring`] places keys, [`dvv`] and [`value`] hold causality, siblings and CRDT state,
//! [`replica`] stores them durably (client writes batched by `local`, copies by `batch`), [`merkle`] keeps the anti-entropy leaves on every write, [`coordinator`] runs reads and writes (sloppy quorum,
//! hinted handoff, read repair), [`anti_entropy`] converges replicas in the background
//! [`scan`] merges every reachable node's keys for scans, and [`tombstones`] collects deletes once every copy in the cluster has them.

pub mod anti_entropy;
mod batch;
mod call;
pub mod coordinator;
pub mod dvv;
mod local;
pub mod merkle;
pub mod page;
pub mod replica;
pub mod ring;
pub mod rpc;
pub mod scan;
pub mod tombstones;
pub mod value;
