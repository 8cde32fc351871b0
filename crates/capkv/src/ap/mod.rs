//! ap keyspaces: leaderless, Dynamo-style replication (in progress, issue 3).
//!
//! Pure building blocks so far: [`ring`] (placement) and [`dvv`] (causality and
//! siblings). The replica store, coordinator, hinted handoff and repair build on them.

pub mod anti_entropy;
pub mod coordinator;
pub mod dvv;
pub mod replica;
pub mod ring;
pub mod value;
