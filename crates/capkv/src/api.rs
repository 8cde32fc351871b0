//! The HTTP API (the Contract, `docs/api.md`). Handlers parse and check the request,
//! hand it to the [`Node`], and turn the outcome into a status code and body. Every
//! error leaves as `{"error":{"code","message"}}` with the status of its code; no input
//! reaches a panic (bad paths, bodies and parameters are 400, sizes 413).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::rt::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use capkv_core::validate::{self, MAX_SCAN_LIMIT, MAX_TIMEOUT_MS};
use capkv_core::{
    ApWriteResponse, ApiError, ClusterInfo, Consistency, CounterValue, DeleteResponse, ErrorBody,
    FaultRequest, FaultState, KeyspaceSpec, Mode, NewUser, PutResponse, ScanEntry, SetMembers,
    Sibling, Siblings, UserSpec, ValueType,
};
use metrics_exporter_prometheus::PrometheusHandle;
use utoipa::OpenApi;

use crate::ap::dvv::{
    Context, Dot, Object, VersionVector, CONTEXT_ACTORS_MAX, CONTEXT_ACTOR_BYTES_MAX,
    CONTEXT_COUNTER_MAX, CONTEXT_DOTS_MAX,
};
use crate::ap::value::{ApState, LwwValue, Mutation};
use crate::api_doc::*;
use crate::cp::{Command, Condition, Op, Written};
use crate::net::PeerFaults;
use crate::node::Node;
use crate::rpc::{ForwardOp, ForwardReply};
use crate::storage::Engine as _;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Requests without `timeout_ms` get this deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub prometheus: Option<PrometheusHandle>,
    /// Data requests (keys, scans, keyspaces) being served: see [`bounded`].
    pub data_requests: Arc<tokio::sync::Semaphore>,
    /// Token authentication, when on (`crate::auth`).
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// Request body bytes being received or held ([`BODY_BYTES_IN_FLIGHT`]).
    pub body_bytes: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    pub fn new(node: Arc<Node>, prometheus: Option<PrometheusHandle>) -> AppState {
        AppState {
            node,
            prometheus,
            data_requests: Arc::new(tokio::sync::Semaphore::new(DATA_REQUESTS_MAX)),
            auth: None,
            body_bytes: Arc::new(tokio::sync::Semaphore::new(BODY_BYTES_IN_FLIGHT)),
        }
    }

    pub fn with_auth(mut self, auth: Option<crate::auth::Auth>) -> AppState {
        self.auth = auth.map(Arc::new);
        self
    }
}

/// Data requests served at once by a node; more wait (without a thread) for one to
/// finish, until their deadline. Each may hold a thread while it waits on storage (reads
/// and writes run off the async workers, in threads from tokio's blocking pool of 512),
/// so this keeps HTTP, with peer requests ([`crate::node::PEER_REQUESTS_MAX`]), well below
/// the pool: found by review, 700 reads held by a stalled disk took every thread, and the
/// node could no longer answer `/healthz` or lift the fault.
pub const DATA_REQUESTS_MAX: usize = 256;

/// How long after its own deadline a data request still stuck (in a storage call that
/// does not return) is answered 504 by [`bounded`]: handlers answer at their deadline
/// themselves unless storage holds them.
const STUCK_GRACE: Duration = Duration::from_millis(500);

/// An API error on its way out.
pub struct Failure(pub ApiError);

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Failure {
        Failure(e)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ErrorBody { error: self.0 })).into_response()
    }
}

type ApiResult<T> = Result<T, Failure>;

fn path_error(e: PathRejection) -> Failure {
    Failure(ApiError::bad_request(format!("bad path: {e}")))
}

fn body_error(e: BytesRejection, limit: usize) -> Failure {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Failure(ApiError::too_large(format!(
            "value is larger than the limit of {limit} bytes"
        )))
    } else {
        Failure(ApiError::bad_request(format!("cannot read body: {e}")))
    }
}

/// Query parameters, parsed strictly: unknown names and malformed values are 400, so a
/// typo such as `if_verison` never silently turns a CAS into a blind write.
struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    fn parse(raw: Option<String>, allowed: &[&str]) -> Result<Params, ApiError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))?;
        let mut seen = BTreeSet::new();
        for (k, _) in &pairs {
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter '{k}'; allowed here: {}",
                    allowed.join(", ")
                )));
            }
            if !seen.insert(k.clone()) {
                return Err(ApiError::bad_request(format!(
                    "query parameter '{k}' given twice"
                )));
            }
        }
        let params = Params { pairs };
        // Checked whether or not the handler's path needs them (a serializable read has
        // no deadline to keep): a malformed value is refused wherever it appears.
        params.deadline()?;
        params.consistency()?;
        Ok(params)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn number(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "{name} must be a non-negative integer, got '{v}'"
                    ))
                })
            })
            .transpose()
    }

    /// The request's deadline, from `timeout_ms` (1..=60000) or the default.
    fn deadline(&self) -> Result<Instant, ApiError> {
        let timeout = match self.number("timeout_ms")? {
            None => DEFAULT_TIMEOUT,
            Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Duration::from_millis(ms),
            Some(ms) => {
                return Err(ApiError::bad_request(format!(
                    "timeout_ms must be between 1 and {MAX_TIMEOUT_MS}, got {ms}"
                )))
            }
        };
        Ok(Instant::now() + timeout)
    }

    fn consistency(&self) -> Result<Consistency, ApiError> {
        self.get("consistency")
            .map_or(Ok(Consistency::Linearizable), str::parse)
    }
}

/// Parses a JSON body whatever its Content-Type (so `curl -d '{...}'` works).
fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| ApiError::bad_request(format!("cannot read body: {e}")))?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("bad JSON body: {e}")))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| ApiError::bad_request("Idempotency-Key must be visible ASCII"))?;
    validate::idempotency_key(s)?;
    Ok(Some(s.to_owned()))
}

/// Checks a keyspace name and key from the path; returns the keyspace's spec if this
/// node's registry knows it. The local registry may lag behind a keyspace just created:
/// an unknown keyspace takes the cp path, where the leader decides (404).
fn check_target(node: &Node, keyspace: &str, key: &str) -> Result<Option<KeyspaceSpec>, ApiError> {
    validate::keyspace_name(keyspace)?;
    validate::key(key.as_bytes())?;
    node.reader.keyspace(keyspace)
}

/// A context as a client holds it: JSON, then URL-safe base64 (docs/api.md, "Contexts").
/// A context with no exact dots is a plain map of actor to counter (the only form before
/// contexts named single dots, so contexts clients hold from then keep working); one with
/// exact dots adds them as `[actor, counter]` pairs.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum WireContext {
    Exact(ExactWire),
    Plain(BTreeMap<String, u64>),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExactWire {
    vv: BTreeMap<String, u64>,
    dots: Vec<(String, u64)>,
}

/// The opaque causal context of an ap read or write, as sent in `X-Capkv-Context`.
fn encode_context(c: &Context) -> String {
    let vv = c.vv().0.clone();
    let wire = if c.dots().next().is_none() {
        WireContext::Plain(vv)
    } else {
        WireContext::Exact(ExactWire {
            vv,
            dots: c.dots().map(|d| (d.actor.clone(), d.counter)).collect(),
        })
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&wire).expect("contexts serialize"))
}

fn context_from(headers: &HeaderMap) -> Result<Context, ApiError> {
    let Some(v) = headers.get("x-capkv-context") else {
        return Ok(Context::default());
    };
    let bad = || ApiError::bad_request("X-Capkv-Context is not a context returned by capkv");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(v.as_bytes())
        .map_err(|_| bad())?;
    let (vv, dots) = match serde_json::from_slice(&raw).map_err(|_| bad())? {
        WireContext::Plain(vv) => (vv, Vec::new()),
        WireContext::Exact(ExactWire { vv, dots }) => (vv, dots),
    };
    // A context names dots capkv issued: one per write, so a counter near 2^64 (which would
    // make the next dot of that actor wrap), a dot 0, or an absurd number of actors or
    // dots is forged.
    let actor_ok = |a: &str| !a.is_empty() && a.len() <= CONTEXT_ACTOR_BYTES_MAX;
    let actors: BTreeSet<&str> = vv
        .keys()
        .chain(dots.iter().map(|(a, _)| a))
        .map(String::as_str)
        .collect();
    if actors.len() > CONTEXT_ACTORS_MAX
        || dots.len() > CONTEXT_DOTS_MAX
        || !actors.iter().all(|a| actor_ok(a))
        || vv.values().any(|&n| n > CONTEXT_COUNTER_MAX)
        || dots.iter().any(|&(_, n)| n == 0 || n > CONTEXT_COUNTER_MAX)
    {
        return Err(bad());
    }
    Ok(Context::new(
        VersionVector(vv),
        dots.into_iter()
            .map(|(actor, counter)| Dot { actor, counter }),
    ))
}

/// `r` or `w` from the query (1..=n), or the keyspace's default.
fn quorum(params: &Params, name: &str, default: Option<u32>, n: u32) -> Result<usize, ApiError> {
    match params.number(name)? {
        None => Ok(default.unwrap_or(1) as usize),
        Some(q) if q >= 1 && q <= u64::from(n) => Ok(q as usize),
        Some(q) => Err(ApiError::bad_request(format!(
            "{name} must be between 1 and n={n}, got {q}"
        ))),
    }
}

fn refuse_cp_params(params: &Params) -> Result<(), ApiError> {
    for p in ["if_version", "if_value", "consistency"] {
        if params.get(p).is_some() {
            return Err(ApiError::bad_request(format!(
                "{p} applies to cp keyspaces; ap keyspaces use X-Capkv-Context (see docs/api.md)"
            )));
        }
    }
    Ok(())
}

fn value_type(spec: &KeyspaceSpec) -> ValueType {
    spec.value_type.unwrap_or_default()
}

/// An ap mutation coordinated by this node. Registers answer with their new context.
async fn ap_mutate(
    node: &Node,
    spec: &KeyspaceSpec,
    key: &str,
    mutation: Mutation,
    params: &Params,
) -> ApiResult<Response> {
    refuse_cp_params(params)?;
    let t = value_type(spec);
    if !mutation.applies_to(t) {
        return Err(ApiError::bad_request(format!(
            "keyspace '{}' holds {t:?} values; see docs/api.md for the operations of each type",
            spec.name
        ))
        .into());
    }
    let n = spec.n.unwrap_or(3);
    let w = quorum(params, "w", spec.w, n)?;
    let applied = node
        .ap
        .write(
            &spec.name,
            key.as_bytes(),
            t,
            &mutation,
            n as usize,
            w,
            params.deadline()?,
        )
        .await?;
    let state = applied.state;
    Ok(match state {
        ApState::Register(_) => {
            // What the client's context covered plus this write, never the home's whole
            // object context: that also covers concurrent siblings the client was never
            // shown, which its next write would silently replace (issue #8 item 12).
            let (Mutation::Write { context, .. }, Some(dot)) = (&mutation, &applied.dot) else {
                return Err(
                    ApiError::internal("a register write came back without its dot").into(),
                );
            };
            let ctx = encode_context(&context.after_write(dot));
            let mut resp = Json(ApWriteResponse {
                context: ctx.clone(),
            })
            .into_response();
            resp.headers_mut().insert(
                "x-capkv-context",
                HeaderValue::from_str(&ctx).expect("base64 is a valid header"),
            );
            resp
        }
        // lww writes need no context: the latest stamp wins.
        ApState::Lww(_) => Json(ApWriteResponse {
            context: encode_context(&Context::default()),
        })
        .into_response(),
        // The state of the replica that applied it: other replicas' changes may be missing.
        ApState::Counter(_) => Json(CounterValue {
            value: state.total()?,
        })
        .into_response(),
        ApState::Set(_) => Json(SetMembers {
            members: state.members(),
        })
        .into_response(),
    })
}

/// A register write (value, or `None` for a delete).
async fn ap_write(
    node: &Node,
    spec: &KeyspaceSpec,
    key: &str,
    value: Option<Vec<u8>>,
    params: &Params,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    // Accepted but not needed (docs/api.md); a malformed one is still refused.
    idempotency_key(headers)?;
    let context = context_from(headers)?;
    ap_mutate(node, spec, key, Mutation::Write { context, value }, params).await
}

/// An ap read. Registers: 200 with one value, 300 with siblings, 404 if absent or
/// deleted. Counters: `{"value":N}`. Sets: `{"members":[...]}`.
async fn ap_read(
    node: &Node,
    spec: &KeyspaceSpec,
    key: &str,
    params: &Params,
) -> ApiResult<Response> {
    refuse_cp_params(params)?;
    let n = spec.n.unwrap_or(3);
    let r = quorum(params, "r", spec.r, n)?;
    let state = node
        .ap
        .read(
            &spec.name,
            key.as_bytes(),
            n as usize,
            r,
            params.deadline()?,
        )
        .await?;
    let state = state.unwrap_or_else(|| ApState::empty(value_type(spec)));
    let obj = match state {
        ApState::Register(obj) => obj,
        ApState::Lww(Some(LwwValue { value: Some(v), .. })) => {
            let mut resp = v.into_response();
            resp.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("application/octet-stream"),
            );
            return Ok(resp);
        }
        ApState::Lww(_) => {
            return Err(
                ApiError::not_found(format!("key not found in keyspace '{}'", spec.name)).into(),
            )
        }
        ApState::Counter(_) => {
            return Ok(Json(CounterValue {
                value: state.total()?,
            })
            .into_response())
        }
        ApState::Set(_) => {
            return Ok(Json(SetMembers {
                members: state.members(),
            })
            .into_response())
        }
    };
    if obj.siblings.is_empty() {
        return Err(
            ApiError::not_found(format!("key not found in keyspace '{}'", spec.name)).into(),
        );
    }
    let ctx = encode_context(&obj.context);
    let values = distinct_values(&obj);
    let mut resp = match values.len() {
        0 => Failure(ApiError::not_found(format!(
            "key not found in keyspace '{}' (deleted)",
            spec.name
        )))
        .into_response(),
        1 => {
            let mut resp = values[0].to_vec().into_response();
            resp.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("application/octet-stream"),
            );
            resp
        }
        _ => {
            let siblings = values.iter().map(|v| Sibling::new(v)).collect();
            (
                StatusCode::MULTIPLE_CHOICES,
                Json(Siblings {
                    siblings,
                    context: ctx.clone(),
                }),
            )
                .into_response()
        }
    };
    resp.headers_mut().insert(
        "x-capkv-context",
        HeaderValue::from_str(&ctx).expect("base64 is a valid header"),
    );
    Ok(resp)
}

/// A register's live values, sorted; the same value written twice concurrently is one.
fn distinct_values(obj: &Object) -> Vec<&[u8]> {
    let mut values: Vec<&[u8]> = obj.values();
    values.sort();
    values.dedup();
    values
}

/// A scan of an ap keyspace: the merged copies of every reachable node, deletes left out.
async fn ap_scan(
    node: &Node,
    spec: &KeyspaceSpec,
    params: &Params,
    limit: usize,
) -> ApiResult<Response> {
    refuse_cp_params(params)?;
    let prefix = params.get("prefix").unwrap_or("").as_bytes();
    let after = params.get("after").map(str::as_bytes);
    let (page, more) = node
        .ap
        .scan(&spec.name, prefix, after, limit, params.deadline()?)
        .await?;
    let entries = page
        .iter()
        .map(|(key, state)| {
            let entry = ScanEntry::key(key);
            Ok(match state {
                ApState::Register(obj) => {
                    let values = distinct_values(obj);
                    let context = Some(encode_context(&obj.context));
                    match values.as_slice() {
                        [one] => ScanEntry {
                            context,
                            ..entry.with_value(one)
                        },
                        many => ScanEntry {
                            siblings: Some(many.iter().map(|v| Sibling::new(v)).collect()),
                            context,
                            ..entry
                        },
                    }
                }
                ApState::Lww(v) => entry.with_value(
                    v.as_ref()
                        .and_then(|v| v.value.as_deref())
                        .unwrap_or_default(),
                ),
                ApState::Counter(_) => ScanEntry {
                    counter: Some(state.total()?),
                    ..entry
                },
                ApState::Set(_) => ScanEntry {
                    members: Some(state.members()),
                    ..entry
                },
            })
        })
        .collect::<Result<Vec<ScanEntry>, ApiError>>()?;
    Ok(scan_response(entries, more))
}

fn scan_response(entries: Vec<ScanEntry>, more: bool) -> Response {
    let mut resp = Json(entries).into_response();
    resp.headers_mut().insert(
        "x-capkv-more",
        HeaderValue::from_static(if more { "true" } else { "false" }),
    );
    resp
}

/// The body of `POST .../incr`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
struct IncrRequest {
    by: i64,
}

/// The body of `POST .../add` and `POST .../remove`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
struct MembersRequest {
    members: Vec<String>,
}

/// For a request that did not take the ap path: `r`/`w` are refused (`400`) on a cp
/// keyspace; on a keyspace this node does not know yet, the registry decides (an ap
/// keyspace not learned yet is `503`, retry).
async fn refuse_ap_param(
    node: &Node,
    ks: &str,
    spec: Option<&KeyspaceSpec>,
    params: &Params,
    param: &str,
) -> Result<(), ApiError> {
    if params.get(param).is_none() {
        return Ok(());
    }
    let on_cp = ApiError::bad_request(format!("{param} applies to ap keyspaces only"));
    Err(match spec {
        Some(_) => on_cp,
        None => not_known_here(node, ks, params.deadline()?, on_cp).await,
    })
}

fn not_ap(ks: &str) -> ApiError {
    ApiError::bad_request(format!(
        "keyspace '{ks}' is a cp keyspace; incr, add and remove apply to ap keyspaces"
    ))
}

/// The error for an ap-only request naming a keyspace this node's own registry does not
/// hold yet, decided by the linearizable registry: `503` for an ap keyspace this node
/// has not learned yet (retry), `on_cp` for a cp keyspace, `404` if it does not exist.
async fn not_known_here(
    node: &Node,
    ks: &str,
    deadline: crate::rt::Instant,
    on_cp: ApiError,
) -> ApiError {
    let list = match node
        .linearizable_read(ForwardOp::ListKeyspaces, deadline)
        .await
    {
        Ok(ForwardReply::Keyspaces(list)) => list,
        Ok(other) => return ApiError::internal(format!("unexpected reply {other:?}")),
        Err(e) => return e,
    };
    match list.iter().find(|s| s.name == ks).map(|s| s.mode) {
        Some(Mode::Ap) => ApiError::unavailable(format!(
            "keyspace '{ks}' is an ap keyspace this node has not learned yet; retry"
        )),
        Some(Mode::Cp) => on_cp,
        None => ApiError::not_found(format!("keyspace '{ks}' does not exist")),
    }
}

/// Changes a counter (`{key}/incr`, body `{"by":N}`) or a set (`{key}/add` or
/// `{key}/remove`, body `{"members":[...]}`) in an ap keyspace.
#[utoipa::path(post, path = "/v1/kv/{ks}/{key}/{op}", tag = "kv",
    params(CrdtPath, CrdtQuery),
    request_body(content = CrdtBody, description = "incr: {\"by\":N}; add and remove: {\"members\":[...]}"),
    responses((status = 200, body = CrdtAnswer, description = "the counter's value or the set's members on the replica that applied it"),
        DataErrors, ConflictError))]
async fn crdt_op(
    State(st): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let Path((ks, rest)) = path.map_err(path_error)?;
    let params = Params::parse(q, &["w", "timeout_ms"])?;
    let (key, op) = rest.rsplit_once('/').ok_or_else(|| {
        ApiError::bad_request("POST needs /v1/kv/{ks}/{key}/incr, /add or /remove")
    })?;
    let spec = match check_target(&st.node, &ks, key)? {
        Some(spec) if spec.mode == Mode::Ap => spec,
        Some(_) => return Err(not_ap(&ks).into()),
        None => {
            let e = not_known_here(&st.node, &ks, params.deadline()?, not_ap(&ks)).await;
            return Err(e.into());
        }
    };
    let mutation = match op {
        "incr" => Mutation::Add {
            by: json_body::<IncrRequest>(body)?.by,
        },
        "add" => Mutation::Insert {
            members: json_body::<MembersRequest>(body)?.members,
        },
        "remove" => Mutation::Remove {
            members: json_body::<MembersRequest>(body)?.members,
        },
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown operation '{other}': use incr, add or remove"
            ))
            .into())
        }
    };
    ap_mutate(&st.node, &spec, key, mutation, &params).await
}

/// The CAS condition of a write. `if_value` is bounded like a value (a log entry's size,
/// and so the peer frame limit, is computed from it).
fn condition(params: &Params, max_value_bytes: usize) -> Result<Option<Condition>, ApiError> {
    match (params.number("if_version")?, params.get("if_value")) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "give if_version or if_value, not both",
        )),
        (None, Some(v)) if v.len() > max_value_bytes => Err(ApiError::too_large(format!(
            "if_value is {} bytes; the limit is {max_value_bytes} (--max-value-bytes)",
            v.len()
        ))),
        (Some(v), None) => Ok(Some(Condition::Version(v))),
        (None, Some(v)) => Ok(Some(Condition::Value(v.as_bytes().to_vec()))),
        (None, None) => Ok(None),
    }
}

fn command(op: Op, headers: &HeaderMap) -> Result<Command, ApiError> {
    Ok(Command {
        op,
        idempotency_key: idempotency_key(headers)?,
        // Stamped by the leader's proposer (cluster time), not here.
        proposed_at_ms: 0,
    })
}

/// Writes a value.
#[utoipa::path(put, path = "/v1/kv/{ks}/{key}", tag = "kv",
    params(KeyPath, WriteQuery, WriteHeaders),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = WriteAnswer, description = "cp: the key's new version; ap: the write's context (also in X-Capkv-Context)"),
        DataErrors, ConflictError))]
async fn put_key(
    State(st): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let Path((ks, key)) = path.map_err(path_error)?;
    let params = Params::parse(q, &["if_version", "if_value", "timeout_ms", "w"])?;
    let limit = st.node.config.max_value_bytes;
    let value = body.map_err(|e| body_error(e, limit))?;
    if value.len() > limit {
        return Err(ApiError::too_large(format!(
            "value is {} bytes; the limit is {limit}",
            value.len()
        ))
        .into());
    }
    let spec = check_target(&st.node, &ks, &key)?;
    if let Some(spec) = spec.as_ref().filter(|s| s.mode == Mode::Ap) {
        return ap_write(
            &st.node,
            spec,
            &key,
            Some(value.to_vec()),
            &params,
            &headers,
        )
        .await;
    }
    refuse_ap_param(&st.node, &ks, spec.as_ref(), &params, "w").await?;
    // An ap context means nothing here; a malformed one is still refused.
    context_from(&headers)?;
    let op = Op::Put {
        keyspace: ks,
        key: key.into_bytes(),
        value: value.to_vec(),
        condition: condition(&params, st.node.config.max_value_bytes)?,
    };
    match st
        .node
        .write(command(op, &headers)?, params.deadline()?)
        .await?
    {
        Written::Put { version } => Ok(Json(PutResponse { version }).into_response()),
        other => Err(ApiError::internal(format!("unexpected reply {other:?}")).into()),
    }
}

/// Reads a value: the body is the value's bytes, `X-Capkv-Version` its version.
#[utoipa::path(get, path = "/v1/kv/{ks}/{key}", tag = "kv",
    params(KeyPath, ReadQuery),
    responses((status = 200, description = "the value: its bytes (cp, ap register and lww), or JSON (ap counter and set)",
            content((Vec<u8> = "application/octet-stream"), (CrdtAnswer = "application/json")),
            headers(("X-Capkv-Version" = u64, description = "cp: the key's version"),
                ("X-Capkv-Context" = String, description = "ap: the context to write with"))),
        (status = 300, body = Siblings, description = "ap: concurrent values, and the context that covers them all"),
        DataErrors))]
async fn get_key(
    State(st): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let Path((ks, key)) = path.map_err(path_error)?;
    let params = Params::parse(q, &["consistency", "timeout_ms", "r"])?;
    let spec = check_target(&st.node, &ks, &key)?;
    if let Some(spec) = spec.as_ref().filter(|s| s.mode == Mode::Ap) {
        return ap_read(&st.node, spec, &key, &params).await;
    }
    refuse_ap_param(&st.node, &ks, spec.as_ref(), &params, "r").await?;
    let op = ForwardOp::Get {
        keyspace: ks.clone(),
        key: key.into_bytes(),
    };
    let reply = match params.consistency()? {
        Consistency::Serializable => st.node.read_local(&op)?,
        Consistency::Linearizable => st.node.linearizable_read(op, params.deadline()?).await?,
    };
    match reply {
        ForwardReply::Value(Some((version, value))) => {
            let mut resp = value.into_response();
            let h = resp.headers_mut();
            h.insert("x-capkv-version", HeaderValue::from(version));
            h.insert(
                "content-type",
                HeaderValue::from_static("application/octet-stream"),
            );
            Ok(resp)
        }
        ForwardReply::Value(None) => {
            Err(ApiError::not_found(format!("key not found in keyspace '{ks}'")).into())
        }
        other => Err(ApiError::internal(format!("unexpected reply {other:?}")).into()),
    }
}

/// Deletes a key (200 whether or not it existed; `deleted` tells).
#[utoipa::path(delete, path = "/v1/kv/{ks}/{key}", tag = "kv",
    params(KeyPath, WriteQuery, WriteHeaders),
    responses((status = 200, body = DeleteAnswer, description = "cp: whether it existed, and the version; ap: the delete's context"),
        DataErrors, ConflictError))]
async fn delete_key(
    State(st): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let Path((ks, key)) = path.map_err(path_error)?;
    let params = Params::parse(q, &["if_version", "if_value", "timeout_ms", "w"])?;
    let spec = check_target(&st.node, &ks, &key)?;
    if let Some(spec) = spec.as_ref().filter(|s| s.mode == Mode::Ap) {
        return ap_write(&st.node, spec, &key, None, &params, &headers).await;
    }
    refuse_ap_param(&st.node, &ks, spec.as_ref(), &params, "w").await?;
    // An ap context means nothing here; a malformed one is still refused.
    context_from(&headers)?;
    let op = Op::Delete {
        keyspace: ks,
        key: key.into_bytes(),
        condition: condition(&params, st.node.config.max_value_bytes)?,
    };
    match st
        .node
        .write(command(op, &headers)?, params.deadline()?)
        .await?
    {
        Written::Delete { deleted, version } => {
            Ok(Json(DeleteResponse { deleted, version }).into_response())
        }
        other => Err(ApiError::internal(format!("unexpected reply {other:?}")).into()),
    }
}

/// Lists keys of a keyspace in key order. `X-Capkv-More: true` when `limit` cut the list;
/// continue with `after=` the last key returned.
#[utoipa::path(get, path = "/v1/kv/{ks}", tag = "kv",
    params(KsPath, ScanQuery),
    responses((status = 200, body = Vec<ScanEntry>, headers(("X-Capkv-More" = bool, description = "true when the page was cut short"))),
        DataErrors))]
async fn scan_keys(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let Path(ks) = path.map_err(path_error)?;
    let params = Params::parse(
        q,
        &["prefix", "after", "limit", "consistency", "timeout_ms"],
    )?;
    validate::keyspace_name(&ks)?;
    // A prefix or cursor longer than any key matches nothing; refused like a key (and
    // as a forwarded scan is refused by the leader).
    for name in ["prefix", "after"] {
        if params
            .get(name)
            .is_some_and(|v| v.len() > validate::MAX_KEY_BYTES)
        {
            return Err(ApiError::too_large(format!(
                "{name} is longer than the longest key ({} bytes)",
                validate::MAX_KEY_BYTES
            ))
            .into());
        }
    }
    let limit = match params.number("limit")? {
        None => 1000,
        Some(n) if (1..=MAX_SCAN_LIMIT as u64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "limit must be between 1 and {MAX_SCAN_LIMIT}, got {n}"
            ))
            .into())
        }
    };
    if let Some(spec) = st.node.reader.keyspace(&ks)?.filter(|s| s.mode == Mode::Ap) {
        return ap_scan(&st.node, &spec, &params, limit).await;
    }
    let op = ForwardOp::Scan {
        keyspace: ks,
        prefix: params.get("prefix").unwrap_or("").as_bytes().to_vec(),
        after: params.get("after").map(|a| a.as_bytes().to_vec()),
        limit,
    };
    let reply = match params.consistency()? {
        Consistency::Serializable => st.node.read_local(&op)?,
        Consistency::Linearizable => st.node.linearizable_read(op, params.deadline()?).await?,
    };
    let ForwardReply::Scan { rows, more } = reply else {
        return Err(ApiError::internal("unexpected reply to a scan").into());
    };
    let entries: Vec<ScanEntry> = rows
        .iter()
        .map(|(k, v, val)| ScanEntry::new(k, val, *v))
        .collect();
    Ok(scan_response(entries, more))
}

/// Creates a keyspace (201), or 409 if one with that name exists.
#[utoipa::path(post, path = "/v1/keyspaces", tag = "keyspaces", request_body = KeyspaceSpec,
    params(TimeoutQuery, IdempotencyHeader),
    responses((status = 201, body = KeyspaceSpec), DataErrors, ConflictError))]
async fn create_keyspace(
    State(st): State<AppState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    user: Option<axum::Extension<crate::auth::Authenticated>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<KeyspaceSpec>)> {
    let params = Params::parse(q, &["timeout_ms"])?;
    let mut spec: KeyspaceSpec = json_body(body)?;
    if let Some(axum::Extension(crate::auth::Authenticated(user))) = user {
        if !user.allows(capkv_core::Role::Admin, Some(&spec.name)) {
            return Err(ApiError::forbidden(format!(
                "user '{}' is not admin on keyspace '{}'",
                user.name, spec.name
            ))
            .into());
        }
    }
    // An ap keyspace has as many replicas as asked, at most one per node: the default
    // (3) shrinks to a smaller cluster; an explicit n larger than the cluster is refused
    // (a key cannot have more replicas than nodes, and w=n writes could never succeed).
    let nodes = st.node.config.cluster.len() as u32;
    if spec.mode == capkv_core::Mode::Ap {
        match spec.n {
            Some(n) if n > nodes => {
                return Err(ApiError::bad_request(format!(
                    "n={n} replicas, but the cluster has {nodes} nodes: a key cannot have \
                     more replicas than there are nodes"
                ))
                .into())
            }
            Some(_) => {}
            None => spec.n = Some(nodes.min(capkv_core::validate::DEFAULT_REPLICAS)),
        }
    }
    let spec = spec.normalized()?;
    let op = Op::CreateKeyspace { spec: spec.clone() };
    st.node
        .write(command(op, &headers)?, params.deadline()?)
        .await?;
    Ok((StatusCode::CREATED, Json(spec)))
}

/// Lists keyspaces (linearizable by default).
#[utoipa::path(get, path = "/v1/keyspaces", tag = "keyspaces",
    params(ListQuery),
    responses((status = 200, body = Vec<KeyspaceSpec>), DataErrors))]
async fn list_keyspaces(
    State(st): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Vec<KeyspaceSpec>>> {
    let params = Params::parse(q, &["consistency", "timeout_ms"])?;
    let reply = match params.consistency()? {
        Consistency::Serializable => st.node.read_local(&ForwardOp::ListKeyspaces)?,
        Consistency::Linearizable => {
            st.node
                .linearizable_read(ForwardOp::ListKeyspaces, params.deadline()?)
                .await?
        }
    };
    match reply {
        ForwardReply::Keyspaces(list) => Ok(Json(list)),
        _ => Err(ApiError::internal("unexpected reply to a keyspace list").into()),
    }
}

/// Creates a user, or replaces one (with a new token): admin only. The token is in this
/// answer and nowhere else; the cluster keeps its SHA-256.
#[utoipa::path(post, path = "/v1/users", tag = "users", request_body = UserSpec,
    params(TimeoutQuery),
    responses((status = 201, body = NewUser), DataErrors, ConflictError))]
async fn create_user(
    State(st): State<AppState>,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<NewUser>)> {
    let params = Params::parse(q, &["timeout_ms"])?;
    let spec: UserSpec = json_body(body)?;
    spec.validate()?;
    let token = crate::auth::new_token()?;
    let op = Op::PutUser {
        spec: spec.clone(),
        token_sha256: crate::auth::sha256(&token).to_vec(),
    };
    st.node
        .write(command(op, &HeaderMap::new())?, params.deadline()?)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(NewUser {
            name: spec.name,
            grants: spec.grants,
            token,
        }),
    ))
}

/// Lists users and their grants (never their tokens): admin only. Read from this node's
/// replica.
#[utoipa::path(get, path = "/v1/users", tag = "users",
    responses((status = 200, body = Vec<UserSpec>), OpsErrors))]
async fn list_users(State(st): State<AppState>) -> ApiResult<Json<Vec<UserSpec>>> {
    Ok(Json(st.node.reader.users()?))
}

/// Deletes a user; its token stops working on each node as the deletion is applied there.
#[utoipa::path(delete, path = "/v1/users/{name}", tag = "users",
    params(UserPath, TimeoutQuery),
    responses((status = 204, description = "deleted"), DataErrors, ConflictError))]
async fn delete_user(
    State(st): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> ApiResult<StatusCode> {
    let Path(name) = name.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let params = Params::parse(q, &["timeout_ms"])?;
    validate::keyspace_name(&name)?;
    match st
        .node
        .write(
            command(Op::DeleteUser { name: name.clone() }, &HeaderMap::new())?,
            params.deadline()?,
        )
        .await?
    {
        Written::UserDeleted { deleted: true } => Ok(StatusCode::NO_CONTENT),
        _ => Err(ApiError::not_found(format!("no user '{name}'")).into()),
    }
}

/// This node's view of the cluster: its role, the leader, every node and whether it is reachable.
#[utoipa::path(get, path = "/v1/cluster", tag = "cluster", responses((status = 200, body = ClusterInfo), OpsErrors))]
async fn cluster(State(st): State<AppState>) -> Json<ClusterInfo> {
    Json(st.node.cluster_info().await)
}

fn fault_state(node: &Node) -> FaultState {
    let faults = node.faults.get();
    let names = |ids: BTreeSet<u64>| ids.into_iter().map(|id| node.name_of(id)).collect();
    FaultState {
        enabled: node.config.enable_faults,
        isolate_from: names(faults.isolate),
        drop_to: names(faults.drop_to),
        clock_skew_ms: node.clock.skew_ms(),
        wall_clock_ms: node.clock.now_ms(),
        storage_stall: node.engine.is_stalled(),
        storage_read_stall: node.engine.reads_stalled(),
    }
}

fn require_faults(node: &Node) -> Result<(), ApiError> {
    if node.config.enable_faults {
        Ok(())
    } else {
        Err(ApiError::new(
            capkv_core::ErrorCode::Forbidden,
            "fault injection is disabled; start the node with --enable-faults",
        ))
    }
}

/// The peer ids of the nodes named in `field`: each a cluster member other than this node.
fn fault_peers(node: &Node, field: &str, names: &[String]) -> Result<BTreeSet<u64>, ApiError> {
    let mut ids = BTreeSet::new();
    for name in names {
        let m = node.config.member_by_name(name).ok_or_else(|| {
            let known: Vec<&str> = node
                .config
                .cluster
                .iter()
                .map(|m| m.name.as_str())
                .collect();
            ApiError::bad_request(format!(
                "{field}: unknown node '{name}'; the cluster has {}",
                known.join(", ")
            ))
        })?;
        if m.id == node.id() {
            return Err(ApiError::bad_request(format!(
                "{field}: '{name}' is this node; a node cannot cut itself off from itself"
            )));
        }
        ids.insert(m.id);
    }
    Ok(ids)
}

/// Sets this node's faults, replacing all that were in force (a field left out is "no
/// such fault"). `isolate_from`: all peer traffic to and from these nodes is dropped.
/// `drop_to`: every frame this node would send them (requests and replies) is dropped,
/// while what they send is still received and handled, so their requests here take
/// effect but time out at them (outcome unknown). `clock_skew_ms`: this node's wall
/// clock reads that many ms off (±86400000 at most). `storage_stall`: every storage
/// write and fsync of this node is held until the fault is lifted. `storage_read_stall`:
/// every read of user data (cp keys, ap objects) is held until the fault is lifted.
#[utoipa::path(post, path = "/v1/faults", tag = "faults", request_body = FaultRequest,
    responses((status = 200, body = FaultState), OpsErrors))]
async fn set_faults(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<FaultState>> {
    require_faults(&st.node)?;
    let req: FaultRequest = json_body(body)?;
    let isolate = fault_peers(&st.node, "isolate_from", &req.isolate_from)?;
    let drop_to = fault_peers(&st.node, "drop_to", &req.drop_to)?;
    let skew = req.clock_skew_ms.unwrap_or(0);
    if !(-validate::MAX_CLOCK_SKEW_MS..=validate::MAX_CLOCK_SKEW_MS).contains(&skew) {
        return Err(ApiError::bad_request(format!(
            "clock_skew_ms must be between -{max} and {max} (one day), got {skew}",
            max = validate::MAX_CLOCK_SKEW_MS
        ))
        .into());
    }
    tracing::warn!(
        isolate_from = ?req.isolate_from,
        drop_to = ?req.drop_to,
        clock_skew_ms = skew,
        storage_stall = req.storage_stall,
        storage_read_stall = req.storage_read_stall,
        "fault injection: faults set"
    );
    st.node.faults.set(PeerFaults { isolate, drop_to });
    st.node.clock.set_skew_ms(skew);
    st.node.engine.set_stalled(req.storage_stall);
    st.node.engine.set_reads_stalled(req.storage_read_stall);
    Ok(Json(fault_state(&st.node)))
}

/// Removes every fault on this node (isolation, one-way drops, clock skew, storage stalls).
#[utoipa::path(delete, path = "/v1/faults", tag = "faults",
    responses((status = 200, body = FaultState), OpsErrors))]
async fn clear_faults(State(st): State<AppState>) -> ApiResult<Json<FaultState>> {
    require_faults(&st.node)?;
    tracing::warn!("fault injection: healed");
    st.node.faults.set(PeerFaults::default());
    st.node.clock.set_skew_ms(0);
    st.node.engine.set_stalled(false);
    st.node.engine.set_reads_stalled(false);
    Ok(Json(fault_state(&st.node)))
}

/// The faults active on this node.
#[utoipa::path(get, path = "/v1/faults", tag = "faults", responses((status = 200, body = FaultState), OpsErrors))]
async fn get_faults(State(st): State<AppState>) -> Json<FaultState> {
    Json(fault_state(&st.node))
}

/// Health: 200 while the node serves; 503 with the reason when a part of it has stopped
/// (today: the Raft core, after a fatal error), so a supervisor can tell a node that only
/// answers HTTP from one that works.
/// A storage read, write or fsync waiting this long with none of its kind finishing makes
/// the node unhealthy.
const STORAGE_STALL: std::time::Duration = std::time::Duration::from_secs(5);

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "healthy", body = String, content_type = "text/plain"),
    (status = 503, body = ErrorBody, description = "a part of the node has stopped: the reason")))]
async fn healthz(State(st): State<AppState>) -> ApiResult<&'static str> {
    if let Some(stall) = st.node.engine.stall() {
        if stall >= STORAGE_STALL {
            return Err(ApiError::unavailable(format!(
                "storage: a read, write or fsync has made no progress for {} ms",
                stall.as_millis()
            ))
            .into());
        }
    }
    if let Some(why) = st.node.raft_stopped(true).await {
        return Err(ApiError::unavailable(why).into());
    }
    Ok("ok\n")
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
    (status = 501, body = ErrorBody, description = "a node embedded without the Prometheus recorder")))]
async fn prometheus(State(st): State<AppState>) -> Response {
    st.node.engine.report_gauges();
    match &st.prometheus {
        Some(h) => ([("content-type", "text/plain; version=0.0.4")], h.render()).into_response(),
        None => Failure(ApiError::new(
            capkv_core::ErrorCode::NotImplemented,
            "metrics recorder not installed",
        ))
        .into_response(),
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "capkv",
        description = "A distributed key-value store in which every keyspace picks its side of CAP."
    ),
    paths(
        put_key,
        get_key,
        delete_key,
        scan_keys,
        create_keyspace,
        list_keyspaces,
        cluster,
        set_faults,
        clear_faults,
        get_faults,
        crdt_op,
        create_user,
        list_users,
        delete_user,
        healthz,
        prometheus
    ),
    components(schemas(
        ErrorBody,
        ApiError,
        capkv_core::ErrorCode,
        PutResponse,
        DeleteResponse,
        ScanEntry,
        KeyspaceSpec,
        Mode,
        ClusterInfo,
        capkv_core::ClusterNode,
        FaultRequest,
        FaultState,
        ApWriteResponse,
        Sibling,
        Siblings,
        CounterValue,
        SetMembers,
        capkv_core::ValueType,
        UserSpec,
        NewUser,
        capkv_core::Grant,
        capkv_core::Role
    ))
)]
pub struct ApiDoc;

/// The API's schema. On a node with authentication on, it also says so: a bearer token
/// is required everywhere but on the probes (`crate::auth::need`).
async fn openapi(State(st): State<AppState>) -> Json<utoipa::openapi::OpenApi> {
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
    let mut doc = ApiDoc::openapi();
    if st.auth.is_some() {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        let required = vec![SecurityRequirement::new("bearer", Vec::<String>::new())];
        for (path, item) in doc.paths.paths.iter_mut() {
            let open = crate::auth::need(&Method::GET, path) == crate::auth::Need::Nothing;
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                op.security = Some(if open { Vec::new() } else { required.clone() });
            }
        }
    }
    Json(doc)
}

async fn fallback(method: Method, uri: axum::http::Uri) -> Failure {
    Failure(ApiError::not_found(format!(
        "no such endpoint: {method} {}",
        uri.path()
    )))
}

/// A short operation name per route, the `op` label of the request metrics.
fn op_name(method: &Method, path: Option<&str>) -> &'static str {
    match (method.as_str(), path.unwrap_or("")) {
        ("PUT", "/v1/kv/{ks}/{*key}") => "put",
        ("POST", "/v1/kv/{ks}/{*key}") => "crdt",
        ("GET", "/v1/kv/{ks}/{*key}") => "get",
        ("DELETE", "/v1/kv/{ks}/{*key}") => "delete",
        ("GET", "/v1/kv/{ks}") => "scan",
        ("POST", "/v1/keyspaces") => "keyspace_create",
        ("GET", "/v1/keyspaces") => "keyspace_list",
        ("GET", "/v1/cluster") => "cluster",
        (_, "/v1/faults") => "faults",
        (_, "/metrics") => "metrics",
        (_, "/healthz") => "healthz",
        (_, "/v1/openapi.json") => "openapi",
        _ => "other",
    }
}

async fn record_metrics(req: Request, next: Next) -> Response {
    let op = op_name(
        req.method(),
        req.extensions().get::<MatchedPath>().map(|p| p.as_str()),
    );
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("capkv_http_requests_total", "op" => op, "status" => status).increment(1);
    metrics::histogram!("capkv_http_request_duration_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    resp
}

/// The deadline a data request asked for (`timeout_ms`, else the default), read leniently:
/// a bad value is the handler's to refuse.
pub(crate) fn asked_deadline(query: Option<&str>) -> Instant {
    let asked = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| kv.strip_prefix("timeout_ms="))
        .find_map(|v| v.parse::<u64>().ok())
        .filter(|ms| (1..=MAX_TIMEOUT_MS).contains(ms))
        .map_or(DEFAULT_TIMEOUT, Duration::from_millis);
    Instant::now() + asked
}

/// Serves a data request within bounds: at most [`DATA_REQUESTS_MAX`] at once (one that
/// cannot start by its deadline gets 503, not applied), each in its own task, answered by
/// its deadline even if a storage call holds that task (found by review: with reads held,
/// a read waited 70 s for its client to give up). A request answered that way may still
/// take effect once storage moves: 504, as for any request whose outcome is unknown.
async fn bounded(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let deadline = asked_deadline(req.uri().query());
    // The body first, by the request's deadline, and without a place: a client that sends
    // its body slowly (or never) holds its connection and its share of
    // BODY_BYTES_IN_FLIGHT, never one of the places every request needs (review: 256
    // bodies that never came took every place for 70 s).
    let (req, body_bytes) = match receive_body(&st, req, deadline).await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let permit =
        match tokio::time::timeout_at(deadline, st.data_requests.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            _ => {
                metrics::counter!("capkv_http_requests_shed_total").increment(1);
                return Failure(ApiError::unavailable(format!(
                    "{DATA_REQUESTS_MAX} requests are being served and none finished before this \
                 one's deadline; it was not started"
                )))
                .into_response();
            }
        };
    let served = crate::rt::spawn(async move {
        let resp = next.run(req).await;
        drop((permit, body_bytes));
        resp
    });
    match tokio::time::timeout_at(deadline + STUCK_GRACE, served).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => Failure(ApiError::internal(format!(
            "the request's task failed: {e}"
        )))
        .into_response(),
        Err(_) => Failure(ApiError::timeout(
            "the request did not finish by its deadline (this node's storage is not \
             answering); a write may still take effect",
        ))
        .into_response(),
    }
}

/// Bytes of request bodies received and held by requests in flight, at most. Counted as
/// they arrive (a body that is only announced holds nothing), and never waited for: a
/// request whose bytes do not fit is answered 503 at once. To hold it all, a client must
/// really send this much and keep it pending, renewing it every [`BODY_ARRIVAL_MAX`].
pub const BODY_BYTES_IN_FLIGHT: usize = 256 << 20;

/// Longest a request body may take to arrive, whatever the request's deadline (a 1 MiB
/// value needs 100 KB/s): a client cannot hold received bytes for a minute by choosing a
/// long `timeout_ms` and never finishing its body (review).
pub const BODY_ARRIVAL_MAX: Duration = Duration::from_secs(10);

/// Reads a request's whole body, at most the value limit (+1), by `deadline` and within
/// [`BODY_ARRIVAL_MAX`], counting its bytes against [`BODY_BYTES_IN_FLIGHT`] as they
/// arrive; the request comes back with the body in memory, and the bytes' reservation to
/// hold until it is answered. A declared length over the limit is refused before a byte
/// is read.
async fn receive_body(
    st: &AppState,
    req: Request,
    deadline: Instant,
) -> Result<(Request, Option<tokio::sync::OwnedSemaphorePermit>), Failure> {
    use http_body_util::BodyExt;
    let limit = st.node.config.max_value_bytes + 1;
    let (parts, mut body) = req.into_parts();
    let expected = axum::body::HttpBody::size_hint(&body);
    if expected.exact() == Some(0) {
        return Ok((Request::from_parts(parts, body), None));
    }
    let too_large = || {
        Failure(ApiError::too_large(format!(
            "value is larger than the limit of {} bytes",
            limit - 1
        )))
    };
    if expected.lower() > limit as u64 {
        return Err(too_large());
    }
    let arrive_by = deadline.min(Instant::now() + BODY_ARRIVAL_MAX);
    let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut bytes = Vec::new();
    loop {
        let frame = match tokio::time::timeout_at(arrive_by, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(Failure(ApiError::bad_request(format!(
                    "cannot read body: {e}"
                ))))
            }
            Err(_) => {
                crate::limits::hit("http_body_deadline");
                return Err(Failure(ApiError::bad_request(
                    "the request body did not arrive in time (by the request's deadline, \
                     and within 10 s); it was not applied",
                )));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if bytes.len() + data.len() > limit {
            return Err(too_large());
        }
        let Ok(more) = st
            .body_bytes
            .clone()
            .try_acquire_many_owned(data.len() as u32)
        else {
            crate::limits::hit("http_body_bytes");
            return Err(Failure(ApiError::unavailable(
                "this node holds as many request body bytes as it may; this request was \
                 not applied",
            )));
        };
        match held.as_mut() {
            Some(h) => h.merge(more),
            None => held = Some(more),
        }
        bytes.extend_from_slice(&data);
    }
    Ok((
        Request::from_parts(parts, axum::body::Body::from(bytes)),
        held,
    ))
}

/// The authentication middleware (`crate::auth`): lets a request through if its token's
/// user may make it.
pub async fn authorize(
    State(st): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(auth) = st.auth.clone() else {
        return next.run(req).await;
    };
    let need = crate::auth::need(req.method(), req.uri().path());
    if need == crate::auth::Need::Nothing {
        return next.run(req).await;
    }
    let authorization = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .cloned();
    // Within the request's own deadline too (a request never waits past it).
    let deadline = asked_deadline(req.uri().query());
    let user = match crate::auth::user(&st.node.reader, &auth, authorization, deadline).await {
        Ok(u) => u,
        Err(e) if e.code != capkv_core::ErrorCode::Unauthorized => {
            return Failure(e).into_response()
        }
        Err(e) => {
            metrics::counter!("capkv_auth_refused_total", "status" => "401").increment(1);
            let mut resp = Failure(e).into_response();
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::header::HeaderValue::from_static("Bearer realm=\"capkv\""),
            );
            return resp;
        }
    };
    if need == crate::auth::Need::SomeAdmin
        && !user
            .grants
            .iter()
            .any(|g| g.role == capkv_core::Role::Admin)
    {
        metrics::counter!("capkv_auth_refused_total", "status" => "403").increment(1);
        return Failure(ApiError::forbidden(format!(
            "user '{}' is admin on no keyspace",
            user.name
        )))
        .into_response();
    }
    if let crate::auth::Need::Role(role, keyspace) = &need {
        if !user.allows(*role, keyspace.as_deref()) {
            metrics::counter!("capkv_auth_refused_total", "status" => "403").increment(1);
            let on = keyspace
                .as_deref()
                .map_or("every keyspace".to_owned(), |k| format!("keyspace '{k}'"));
            return Failure(ApiError::forbidden(format!(
                "user '{}' does not hold {role:?} on {on}",
                user.name
            )))
            .into_response();
        }
    }
    let mut req = req;
    req.extensions_mut()
        .insert(crate::auth::Authenticated(user));
    next.run(req).await
}

pub fn router(state: AppState) -> Router {
    // Bodies up to the value limit are read; the handler answers anything larger with
    // 413 before it is buffered whole (the limit bounds memory per request).
    let body_limit = state.node.config.max_value_bytes + 1;
    let data = Router::new()
        .route(
            "/v1/kv/{ks}/{*key}",
            put(put_key).get(get_key).delete(delete_key).post(crdt_op),
        )
        .route("/v1/kv/{ks}", get(scan_keys))
        .route("/v1/keyspaces", post(create_keyspace).get(list_keyspaces))
        .route("/v1/users", post(create_user).get(list_users))
        .route("/v1/users/{name}", axum::routing::delete(delete_user))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), bounded));
    // Status, faults and metrics stay outside the bound: they must answer when data
    // requests are stuck.
    Router::new()
        .merge(data)
        .route("/v1/cluster", get(cluster))
        .route(
            "/v1/faults",
            post(set_faults).delete(clear_faults).get(get_faults),
        )
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(prometheus))
        .route("/healthz", get(healthz))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .layer(axum::middleware::from_fn(record_metrics))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Context, ApiError> {
        let mut h = HeaderMap::new();
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        h.insert("x-capkv-context", HeaderValue::from_str(&token).unwrap());
        context_from(&h)
    }

    fn dot(actor: &str, counter: u64) -> Dot {
        Dot {
            actor: actor.into(),
            counter,
        }
    }

    #[test]
    fn contexts_round_trip_and_plain_ones_from_before_exact_dots_still_parse() {
        let plain = parse(r#"{"n1.a":3,"n2.b":1}"#).unwrap();
        assert_eq!(plain.vv().get("n1.a"), 3);
        assert_eq!(plain.dots().count(), 0);
        let exact = parse(r#"{"vv":{"n1.a":3},"dots":[["n2.b",4],["n1.a",9]]}"#).unwrap();
        assert!(exact.covers(&dot("n2.b", 4)) && !exact.covers(&dot("n2.b", 3)));
        assert!(exact.covers(&dot("n1.a", 9)) && !exact.covers(&dot("n1.a", 8)));
        for c in [plain, exact, Context::default()] {
            let mut h = HeaderMap::new();
            h.insert(
                "x-capkv-context",
                HeaderValue::from_str(&encode_context(&c)).unwrap(),
            );
            assert_eq!(context_from(&h).unwrap(), c);
        }
        // A context without exact dots is encoded as before they existed.
        let c = Context::from(VersionVector([("n1.a".to_string(), 2)].into()));
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encode_context(&c))
            .unwrap();
        assert_eq!(raw, br#"{"n1.a":2}"#);
    }

    #[test]
    fn forged_contexts_are_refused() {
        let too_many_dots: Vec<(String, u64)> = (1..=CONTEXT_DOTS_MAX as u64 + 1)
            .map(|i| ("n1.a".to_string(), 2 * i + 1))
            .collect();
        let too_many_actors: BTreeMap<String, u64> = (0..=CONTEXT_ACTORS_MAX)
            .map(|i| (format!("n{i}"), 1))
            .collect();
        // Actors counted across the vector and the exact dots.
        let split_actors: Vec<(String, u64)> = (0..=CONTEXT_ACTORS_MAX / 2)
            .map(|i| (format!("m{i}"), 5))
            .collect();
        let half: BTreeMap<String, u64> = (0..CONTEXT_ACTORS_MAX / 2)
            .map(|i| (format!("n{i}"), 1))
            .collect();
        for raw in [
            "not json".to_string(),
            r#"{"n1.a":-1}"#.into(),
            format!(r#"{{"n1.a":{}}}"#, CONTEXT_COUNTER_MAX + 1),
            r#"{"":1}"#.into(),
            format!(r#"{{"{}":1}}"#, "a".repeat(CONTEXT_ACTOR_BYTES_MAX + 1)),
            r#"{"vv":{},"dots":[["n1.a",0]]}"#.into(),
            format!(
                r#"{{"vv":{{}},"dots":[["n1.a",{}]]}}"#,
                CONTEXT_COUNTER_MAX + 1
            ),
            r#"{"vv":{},"dots":[["",3]]}"#.into(),
            r#"{"vv":{},"dots":[["n1.a"]]}"#.into(),
            r#"{"vv":{},"dots":[],"extra":1}"#.into(),
            r#"{"vv":{"n1.a":1}}"#.into(),
            serde_json::json!({"vv": {}, "dots": too_many_dots}).to_string(),
            serde_json::to_string(&too_many_actors).unwrap(),
            serde_json::json!({"vv": half, "dots": split_actors}).to_string(),
        ] {
            let e = parse(&raw).unwrap_err();
            assert_eq!(e.code, capkv_core::ErrorCode::BadRequest, "{raw}");
        }
        let mut h = HeaderMap::new();
        h.insert("x-capkv-context", HeaderValue::from_static("***"));
        assert!(context_from(&h).is_err(), "not base64");
    }
}
