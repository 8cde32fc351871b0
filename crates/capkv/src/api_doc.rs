//! The parts of `/v1/openapi.json` that are not a handler's own type: parameters with
//! their bounds, the error answers every operation can give, and the bodies that differ
//! by keyspace mode. CI runs schemathesis against a live cluster with this schema
//! (`.ci/schemathesis.sh`), so what is written here is checked against what the API does.
//!
//! Parameters are declared as the server checks them, so that a request the schema calls
//! valid is one the server can accept; rules JSON Schema cannot state (a parameter valid
//! only on a keyspace of one mode, `r`/`w` at most the keyspace's `n`, `if_version` and
//! `if_value` excluding each other) are listed in `.ci/schemathesis.toml`.

#![allow(dead_code)] // the types only describe; handlers parse with `api::Params`

use capkv_core::{
    ApWriteResponse, Consistency, CounterValue, DeleteResponse, ErrorBody, PutResponse, SetMembers,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, IntoResponses, ToSchema};

/// A keyspace name as the server accepts it.
pub const KEYSPACE_PATTERN: &str = r"^[A-Za-z0-9_-]{1,64}$";

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct KsPath {
    /// The keyspace.
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    ks: String,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct KeyPath {
    /// The keyspace.
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    ks: String,
    /// The key: 1 to 1024 bytes, percent-encoded.
    #[param(min_length = 1, max_length = 1024)]
    key: String,
}

/// A counter or set operation.
#[derive(ToSchema, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrdtOp {
    Incr,
    Add,
    Remove,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct CrdtPath {
    /// The keyspace.
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    ks: String,
    /// The key (1 to 1024 bytes).
    #[param(min_length = 1, max_length = 1024)]
    key: String,
    /// incr (counter keyspaces), add or remove (set keyspaces).
    #[param(inline)]
    op: CrdtOp,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct UserPath {
    /// The user's name.
    #[param(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    name: String,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TimeoutQuery {
    /// The request's deadline in ms (default 2000).
    #[param(minimum = 1, maximum = 60000)]
    timeout_ms: Option<u64>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WriteQuery {
    /// cp: CAS on the key's version (0: only if absent). Not with `if_value`.
    if_version: Option<u64>,
    /// cp: CAS on the key's current value. Not with `if_version`.
    if_value: Option<String>,
    /// ap: replicas that must store the write before it is acknowledged (at most the
    /// keyspace's n; the keyspace's w by default).
    #[param(minimum = 1, maximum = 16)]
    w: Option<u32>,
    /// The request's deadline in ms (default 2000).
    #[param(minimum = 1, maximum = 60000)]
    timeout_ms: Option<u64>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CrdtQuery {
    /// Replicas that must store the change before it is acknowledged.
    #[param(minimum = 1, maximum = 16)]
    w: Option<u32>,
    /// The request's deadline in ms (default 2000).
    #[param(minimum = 1, maximum = 60000)]
    timeout_ms: Option<u64>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// cp: linearizable (default) or serializable (this node's replica, may be stale).
    #[param(inline)]
    consistency: Option<Consistency>,
    /// ap: replicas to read (at most the keyspace's n; the keyspace's r by default).
    #[param(minimum = 1, maximum = 16)]
    r: Option<u32>,
    /// The request's deadline in ms (default 2000).
    #[param(minimum = 1, maximum = 60000)]
    timeout_ms: Option<u64>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ScanQuery {
    /// Only keys that start with this (at most 1024 bytes).
    #[param(max_length = 1024)]
    prefix: Option<String>,
    /// Only keys after this one, the last key of the previous page (at most 1024 bytes).
    #[param(max_length = 1024)]
    after: Option<String>,
    /// Most keys in the page (default 1000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u64>,
    /// cp: linearizable (default) or serializable.
    #[param(inline)]
    consistency: Option<Consistency>,
    /// The request's deadline in ms (default 2000).
    #[param(minimum = 1, maximum = 60000)]
    timeout_ms: Option<u64>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// linearizable (default) or serializable.
    #[param(inline)]
    consistency: Option<Consistency>,
    /// The request's deadline in ms (default 2000).
    #[param(minimum = 1, maximum = 60000)]
    timeout_ms: Option<u64>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct WriteHeaders {
    /// cp: a retry with the same key applies once (1 to 256 characters).
    #[param(
        rename = "Idempotency-Key",
        min_length = 1,
        max_length = 256,
        pattern = r"^[\t -~]+$"
    )]
    idempotency_key: Option<String>,
    /// ap: the context of the read this write follows (what it replaces).
    #[param(
        rename = "X-Capkv-Context",
        pattern = r"^[A-Za-z0-9_-]*$",
        max_length = 4096
    )]
    context: Option<String>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyHeader {
    /// A retry with the same key applies once (1 to 256 characters).
    #[param(
        rename = "Idempotency-Key",
        min_length = 1,
        max_length = 256,
        pattern = r"^[\t -~]+$"
    )]
    idempotency_key: Option<String>,
}

/// What a write answers: cp, the new version; ap, the write's context.
#[derive(ToSchema, Serialize)]
#[serde(untagged)]
pub enum WriteAnswer {
    Cp(PutResponse),
    Ap(ApWriteResponse),
}

/// What a delete answers: cp, whether the key existed and the version; ap, the context.
#[derive(ToSchema, Serialize)]
#[serde(untagged)]
pub enum DeleteAnswer {
    Cp(DeleteResponse),
    Ap(ApWriteResponse),
}

/// A counter's value or a set's members.
#[derive(ToSchema, Serialize)]
#[serde(untagged)]
pub enum CrdtAnswer {
    Counter(CounterValue),
    Set(SetMembers),
}

/// The body of `POST .../incr`.
#[derive(ToSchema, Serialize)]
pub struct IncrBody {
    by: i64,
}

/// The body of `POST .../add` and `POST .../remove`.
#[derive(ToSchema, Serialize)]
pub struct MembersBody {
    #[schema(max_items = 1000)]
    members: Vec<String>,
}

/// The body of a counter or set operation.
#[derive(ToSchema, Serialize)]
#[serde(untagged)]
pub enum CrdtBody {
    Incr(IncrBody),
    Members(MembersBody),
}

/// The errors any request on data (keys, scans, keyspaces) can get.
#[derive(IntoResponses)]
pub enum DataErrors {
    /// A malformed path, parameter, header or body; a parameter the keyspace's mode does
    /// not take.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// Authentication is on and the request has no valid token.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The token's user lacks the role.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// An unknown keyspace, key or user.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// A key, value or object over its limit.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Not applied: no quorum, no replica, too many requests or connections; retry.
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// The deadline passed with the outcome unknown.
    #[response(status = 504)]
    Timeout(ErrorBody),
}

/// The error a write can get beyond [`DataErrors`] (listed beside them).
#[derive(IntoResponses)]
pub enum ConflictError {
    /// A CAS precondition failed; the keyspace or user exists; too many keyspaces; an
    /// Idempotency-Key reused for another request.
    #[response(status = 409)]
    Conflict(ErrorBody),
}

/// The errors of the operations endpoints (cluster, users list, faults).
#[derive(IntoResponses)]
pub enum OpsErrors {
    /// A malformed body.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// Authentication is on and the request has no valid token.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The token's user is not an admin; faults on a node without `--enable-faults`.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// Too many connections; retry.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}
