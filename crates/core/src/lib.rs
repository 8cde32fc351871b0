//! Types shared by every part of capkv: the server, the Rust client and the CLI.
//!
//! Nothing here does I/O. This crate owns the *shape* of the Contract (see
//! `docs/api.md`): keyspace specs and their validation, the JSON bodies of the HTTP
//! API, and the error codes with their HTTP status and their answer to the question
//! every caller of a distributed system must ask: "did it take effect?".

pub mod error;
pub mod types;
pub mod validate;

pub use error::{ApiError, ErrorBody, ErrorCode};
pub use types::*;
