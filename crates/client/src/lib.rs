//! A Rust client for capkv's HTTP API.
//!
//! A [`Client`] knows one or more node URLs. The first time it reaches a node it learns
//! the rest of the cluster from `GET /v1/cluster`; when the node it is using does not
//! answer at the connection level, it tries the next one it knows. HTTP errors from a
//! node (404, 409, 503, ...) are answers, not node failures, and are returned as
//! [`ClientError::Api`] without failing over.

use std::sync::Mutex;
use std::time::Duration;

pub use capkv_core::{
    ApWriteResponse, ApiError, ClusterInfo, Consistency, CounterValue, DeleteResponse, ErrorBody,
    ErrorCode, FaultRequest, FaultState, KeyspaceSpec, Mode, PutResponse, ScanEntry, SetMembers,
    Sibling, Siblings, ValueType,
};
use reqwest::{Method, StatusCode};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A node answered with an error. `from_capkv`: the body was capkv's error JSON (so the
    /// status carries the API's promise); false for anything else that answered, such as a
    /// proxy in front of the node.
    #[error("{status} {error}")]
    Api {
        status: u16,
        error: ApiError,
        from_capkv: bool,
    },
    /// No node could be reached: the request was never delivered.
    #[error("no capkv node reachable (tried {tried}): {last}")]
    Unreachable { tried: String, last: String },
    /// The request was sent but no answer came (a timeout, a connection lost): it may
    /// or may not have taken effect.
    #[error("no answer from {node}: {error}")]
    Lost { node: String, error: String },
    /// A node answered with something that is not the API's format.
    #[error("unexpected answer: {0}")]
    Decode(String),
    /// The client's own settings are unusable (a CA file that is not PEM, ...).
    #[error("client settings: {0}")]
    Invalid(String),
}

impl ClientError {
    /// The API error code, if a node answered.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { error, .. } => Some(error.code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// Options of a write.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// CAS on the key's version (`Some(0)`: only if absent).
    pub if_version: Option<u64>,
    /// CAS on the key's current value.
    pub if_value: Option<String>,
    pub idempotency_key: Option<String>,
    pub timeout_ms: Option<u64>,
}

/// A value read from a cp keyspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub version: u64,
}

/// What an ap read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApValue {
    /// No value (never written, or deleted; a deleted key still has a context).
    Absent {
        context: Option<String>,
    },
    Value {
        value: Vec<u8>,
        context: String,
    },
    /// Concurrent values; a write with `context` resolves them.
    Siblings {
        values: Vec<Vec<u8>>,
        context: String,
    },
}

impl ApValue {
    pub fn context(&self) -> Option<&str> {
        match self {
            ApValue::Absent { context } => context.as_deref(),
            ApValue::Value { context, .. } | ApValue::Siblings { context, .. } => Some(context),
        }
    }
}

pub struct Client {
    http: reqwest::Client,
    endpoints: Mutex<Vec<String>>,
    learned: Mutex<bool>,
    answer_wait: Duration,
    security: Security,
}

/// How a client proves who it is and whom it trusts.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// Sent as `Authorization: Bearer TOKEN` with every request.
    pub token: Option<String>,
    /// PEM certificates of the CAs to trust for `https://` nodes (e.g. the cluster's
    /// `ca.pem`).
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and its private key, PEM, one after the other: for nodes that
    /// require client certificates (`serve --tls-client-ca`).
    pub identity_pem: Option<Vec<u8>>,
}

/// How long a client waits for an answer by default: above the longest server deadline
/// (60 s), so the server's own 504 arrives first.
const ANSWER_WAIT_DEFAULT: Duration = Duration::from_secs(70);

/// Percent-encodes a key as one path segment (every byte but unreserved characters).
pub fn encode_segment(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let mut q = String::new();
    for (k, v) in pairs {
        if let Some(v) = v {
            q.push(if q.is_empty() { '?' } else { '&' });
            q.push_str(k);
            q.push('=');
            q.push_str(&encode_segment(v.as_bytes()));
        }
    }
    q
}

impl Client {
    /// A client for the nodes at these base URLs (e.g. `http://127.0.0.1:7001`).
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(nodes: I) -> Client {
        let endpoints = nodes
            .into_iter()
            .map(|s| s.into().trim_end_matches('/').to_owned())
            .collect();
        Client {
            http: Self::http(ANSWER_WAIT_DEFAULT, &Security::default())
                .expect("a client without TLS roots or token always builds"),
            endpoints: Mutex::new(endpoints),
            learned: Mutex::new(false),
            answer_wait: ANSWER_WAIT_DEFAULT,
            security: Security::default(),
        }
    }

    /// This client with a bearer token and trusted CAs. Fails on a CA file that is not
    /// PEM or a token that cannot be a header.
    pub fn with_security(mut self, security: Security) -> Result<Client> {
        self.http = Self::http(self.answer_wait, &security)?;
        self.security = security;
        Ok(self)
    }

    /// How this client proves who it is (for tools that make more clients like it).
    pub fn security(&self) -> &Security {
        &self.security
    }

    /// A client that talks to exactly one node: it never learns other nodes or fails over,
    /// and gives up waiting for an answer after `answer_wait` ([`ClientError::Lost`]).
    /// For tools that must know which node served each request (`capkv check`).
    pub fn pinned(node: &str, answer_wait: Duration) -> Client {
        Client {
            http: Self::http(answer_wait, &Security::default())
                .expect("a client without TLS roots or token always builds"),
            endpoints: Mutex::new(vec![node.trim_end_matches('/').to_owned()]),
            learned: Mutex::new(true),
            answer_wait,
            security: Security::default(),
        }
    }

    fn http(answer_wait: Duration, security: &Security) -> Result<reqwest::Client> {
        let invalid =
            |what: &str, e: &dyn std::fmt::Display| ClientError::Invalid(format!("{what}: {e}"));
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2).min(answer_wait))
            .timeout(answer_wait)
            // Below the server's idle keep-alive (10 s by default), so that this client
            // never sends on a connection the server is closing.
            .pool_idle_timeout(Duration::from_secs(5));
        if let Some(pem) = &security.ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| invalid("the CA file", &e))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        if let Some(pem) = &security.identity_pem {
            b = b.identity(
                reqwest::Identity::from_pem(pem)
                    .map_err(|e| invalid("the client certificate", &e))?,
            );
        }
        if let Some(token) = &security.token {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|e| invalid("the token", &e))?;
            v.set_sensitive(true);
            b = b.default_headers([(reqwest::header::AUTHORIZATION, v)].into_iter().collect());
        }
        b.build().map_err(|e| invalid("the HTTP client", &e))
    }

    /// The node URLs this client knows, in the order it tries them.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.lock().expect("endpoints lock").clone()
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, String)],
    ) -> Result<reqwest::Response> {
        let endpoints = self.endpoints();
        let mut last = String::from("no node URL given");
        for (i, base) in endpoints.iter().enumerate() {
            let mut req = self.http.request(method.clone(), format!("{base}{path}"));
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            match req.send().await {
                Ok(resp) => {
                    if i > 0 {
                        // Prefer the node that answered from now on.
                        let mut eps = self.endpoints.lock().expect("endpoints lock");
                        eps.retain(|e| e != base);
                        eps.insert(0, base.clone());
                    }
                    self.learn(base).await;
                    return Ok(resp);
                }
                Err(e) if e.is_connect() => last = format!("{base}: {e}"),
                Err(e) => {
                    return Err(ClientError::Lost {
                        node: base.clone(),
                        error: e.to_string(),
                    })
                }
            }
        }
        Err(ClientError::Unreachable {
            tried: endpoints.join(", "),
            last,
        })
    }

    /// Learns the cluster's other nodes once, from the first node that answers.
    async fn learn(&self, base: &str) {
        if std::mem::replace(&mut *self.learned.lock().expect("learned lock"), true) {
            return;
        }
        let Ok(resp) = self.http.get(format!("{base}/v1/cluster")).send().await else {
            return;
        };
        let Ok(info) = resp.json::<ClusterInfo>().await else {
            return;
        };
        let scheme = if base.starts_with("https://") {
            "https"
        } else {
            "http"
        };
        let mut eps = self.endpoints.lock().expect("endpoints lock");
        for n in info.nodes {
            let url = format!("{scheme}://{}", n.http_addr);
            if !eps.contains(&url) {
                eps.push(url);
            }
        }
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let (error, from_capkv) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => (b.error, true),
            Err(_) => (
                ApiError::new(ErrorCode::from_http_status(status), text),
                false,
            ),
        };
        Err(ClientError::Api {
            status,
            error,
            from_capkv,
        })
    }

    /// Reads a 404: `Ok` if the key is absent (an answer), the error if the keyspace is
    /// unknown (the Contract answers 404 for both; the message tells them apart).
    async fn absent_key(resp: reqwest::Response) -> Result<()> {
        match Self::check(resp).await {
            Err(ClientError::Api { error, .. }) if error.message.starts_with("key not found") => {
                Ok(())
            }
            Err(e) => Err(e),
            Ok(_) => Err(ClientError::Decode("404 without an error body".into())),
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> Result<T> {
        let resp = Self::check(resp).await?;
        resp.json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// The path and query of a put or delete.
    fn write_path(keyspace: &str, key: &[u8], opts: &WriteOptions) -> String {
        let q = query(&[
            ("if_version", opts.if_version.map(|v| v.to_string())),
            ("if_value", opts.if_value.clone()),
            ("timeout_ms", opts.timeout_ms.map(|v| v.to_string())),
        ]);
        format!(
            "/v1/kv/{}/{}{q}",
            encode_segment(keyspace.as_bytes()),
            encode_segment(key)
        )
    }

    fn write_headers(opts: &WriteOptions) -> Vec<(&'static str, String)> {
        opts.idempotency_key
            .iter()
            .map(|k| ("idempotency-key", k.clone()))
            .collect()
    }

    pub async fn put(
        &self,
        keyspace: &str,
        key: &[u8],
        value: Vec<u8>,
        opts: &WriteOptions,
    ) -> Result<PutResponse> {
        let path = Self::write_path(keyspace, key, opts);
        Self::json(
            self.request(Method::PUT, &path, Some(value), &Self::write_headers(opts))
                .await?,
        )
        .await
    }

    /// Reads a key; `Ok(None)` if it does not exist.
    pub async fn get(
        &self,
        keyspace: &str,
        key: &[u8],
        consistency: Consistency,
    ) -> Result<Option<Versioned>> {
        let c = match consistency {
            Consistency::Linearizable => None,
            Consistency::Serializable => Some("serializable".to_owned()),
        };
        let path = format!(
            "/v1/kv/{}/{}{}",
            encode_segment(keyspace.as_bytes()),
            encode_segment(key),
            query(&[("consistency", c)])
        );
        let resp = self.request(Method::GET, &path, None, &[]).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Self::absent_key(resp).await.map(|()| None);
        }
        let resp = Self::check(resp).await?;
        let version = resp
            .headers()
            .get("x-capkv-version")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ClientError::Decode("missing X-Capkv-Version".into()))?;
        let value = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?
            .to_vec();
        Ok(Some(Versioned { value, version }))
    }

    pub async fn delete(
        &self,
        keyspace: &str,
        key: &[u8],
        opts: &WriteOptions,
    ) -> Result<DeleteResponse> {
        let path = Self::write_path(keyspace, key, opts);
        Self::json(
            self.request(Method::DELETE, &path, None, &Self::write_headers(opts))
                .await?,
        )
        .await
    }

    /// One page of a scan: entries, and whether more remain after the last one.
    pub async fn scan(
        &self,
        keyspace: &str,
        prefix: &str,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<(Vec<ScanEntry>, bool)> {
        let q = query(&[
            ("prefix", Some(prefix.to_owned()).filter(|p| !p.is_empty())),
            ("after", after.map(str::to_owned)),
            ("limit", limit.map(|l| l.to_string())),
        ]);
        let resp = Self::check(
            self.request(
                Method::GET,
                &format!("/v1/kv/{}{q}", encode_segment(keyspace.as_bytes())),
                None,
                &[],
            )
            .await?,
        )
        .await?;
        let more = resp
            .headers()
            .get("x-capkv-more")
            .is_some_and(|v| v == "true");
        let entries = resp
            .json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok((entries, more))
    }

    /// Writes to an ap keyspace. `context` is the one returned by the read (or the write)
    /// this write follows (None: the write is concurrent with whatever is there). Returns
    /// the write's context: what `context` covered plus this write, never a concurrent
    /// sibling this client was not shown.
    pub async fn ap_put(
        &self,
        keyspace: &str,
        key: &[u8],
        value: Vec<u8>,
        context: Option<&str>,
        w: Option<u32>,
    ) -> Result<String> {
        let path = format!(
            "/v1/kv/{}/{}{}",
            encode_segment(keyspace.as_bytes()),
            encode_segment(key),
            query(&[("w", w.map(|w| w.to_string()))])
        );
        let headers: Vec<(&str, String)> = context
            .map(|c| ("x-capkv-context", c.to_owned()))
            .into_iter()
            .collect();
        let r: ApWriteResponse = Self::json(
            self.request(Method::PUT, &path, Some(value), &headers)
                .await?,
        )
        .await?;
        Ok(r.context)
    }

    /// Deletes from an ap keyspace (a tombstone that replaces what `context` saw). Returns
    /// the delete's context: what `context` covered plus the delete.
    pub async fn ap_delete(
        &self,
        keyspace: &str,
        key: &[u8],
        context: Option<&str>,
    ) -> Result<String> {
        let path = format!(
            "/v1/kv/{}/{}",
            encode_segment(keyspace.as_bytes()),
            encode_segment(key)
        );
        let headers: Vec<(&str, String)> = context
            .map(|c| ("x-capkv-context", c.to_owned()))
            .into_iter()
            .collect();
        let r: ApWriteResponse =
            Self::json(self.request(Method::DELETE, &path, None, &headers).await?).await?;
        Ok(r.context)
    }

    /// Reads from an ap keyspace: the value, or every concurrent sibling.
    pub async fn ap_get(&self, keyspace: &str, key: &[u8], r: Option<u32>) -> Result<ApValue> {
        let path = format!(
            "/v1/kv/{}/{}{}",
            encode_segment(keyspace.as_bytes()),
            encode_segment(key),
            query(&[("r", r.map(|r| r.to_string()))])
        );
        let resp = self.request(Method::GET, &path, None, &[]).await?;
        let context = resp
            .headers()
            .get("x-capkv-context")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match resp.status().as_u16() {
            300 => {
                let s: Siblings = resp
                    .json()
                    .await
                    .map_err(|e| ClientError::Decode(e.to_string()))?;
                Ok(ApValue::Siblings {
                    values: s.siblings.iter().map(Sibling::value_bytes).collect(),
                    context: s.context,
                })
            }
            404 if context.is_some() => Ok(ApValue::Absent { context }),
            404 => Self::absent_key(resp)
                .await
                .map(|()| ApValue::Absent { context: None }),
            _ => {
                let resp = Self::check(resp).await?;
                let value = resp
                    .bytes()
                    .await
                    .map_err(|e| ClientError::Decode(e.to_string()))?
                    .to_vec();
                Ok(ApValue::Value {
                    value,
                    context: context.unwrap_or_default(),
                })
            }
        }
    }

    async fn ap_post<T: serde::de::DeserializeOwned>(
        &self,
        keyspace: &str,
        key: &[u8],
        op: &str,
        w: Option<u32>,
        body: serde_json::Value,
    ) -> Result<T> {
        let path = format!(
            "/v1/kv/{}/{}/{op}{}",
            encode_segment(keyspace.as_bytes()),
            encode_segment(key),
            query(&[("w", w.map(|w| w.to_string()))])
        );
        let headers = [("content-type", "application/json".to_owned())];
        Self::json(
            self.request(
                Method::POST,
                &path,
                Some(body.to_string().into_bytes()),
                &headers,
            )
            .await?,
        )
        .await
    }

    async fn set_change(
        &self,
        keyspace: &str,
        key: &[u8],
        op: &str,
        members: &[&str],
        w: Option<u32>,
    ) -> Result<Vec<String>> {
        let v: SetMembers = self
            .ap_post(
                keyspace,
                key,
                op,
                w,
                serde_json::json!({ "members": members }),
            )
            .await?;
        Ok(v.members)
    }

    async fn ap_get_json<T: serde::de::DeserializeOwned>(
        &self,
        keyspace: &str,
        key: &[u8],
        r: Option<u32>,
    ) -> Result<T> {
        let path = format!(
            "/v1/kv/{}/{}{}",
            encode_segment(keyspace.as_bytes()),
            encode_segment(key),
            query(&[("r", r.map(|r| r.to_string()))])
        );
        Self::json(self.request(Method::GET, &path, None, &[]).await?).await
    }

    /// Adds `by` (may be negative) to a counter in an ap keyspace of type `counter`.
    /// Returns the total as the replica that applied it saw it.
    pub async fn incr(&self, keyspace: &str, key: &[u8], by: i64, w: Option<u32>) -> Result<i64> {
        let v: CounterValue = self
            .ap_post(keyspace, key, "incr", w, serde_json::json!({ "by": by }))
            .await?;
        Ok(v.value)
    }

    /// A counter's total, merged from `r` replicas.
    pub async fn counter(&self, keyspace: &str, key: &[u8], r: Option<u32>) -> Result<i64> {
        Ok(self
            .ap_get_json::<CounterValue>(keyspace, key, r)
            .await?
            .value)
    }

    /// Adds members to a set in an ap keyspace of type `set`.
    pub async fn set_add(
        &self,
        keyspace: &str,
        key: &[u8],
        members: &[&str],
        w: Option<u32>,
    ) -> Result<Vec<String>> {
        self.set_change(keyspace, key, "add", members, w).await
    }

    /// Removes members (as observed by the replica that applies it) from a set.
    pub async fn set_remove(
        &self,
        keyspace: &str,
        key: &[u8],
        members: &[&str],
        w: Option<u32>,
    ) -> Result<Vec<String>> {
        self.set_change(keyspace, key, "remove", members, w).await
    }

    /// A set's members, merged from `r` replicas.
    pub async fn set_members(
        &self,
        keyspace: &str,
        key: &[u8],
        r: Option<u32>,
    ) -> Result<Vec<String>> {
        Ok(self
            .ap_get_json::<SetMembers>(keyspace, key, r)
            .await?
            .members)
    }

    pub async fn create_keyspace(&self, spec: &KeyspaceSpec) -> Result<KeyspaceSpec> {
        let body = serde_json::to_vec(spec).expect("specs serialize");
        let headers = [("content-type", "application/json".to_owned())];
        Self::json(
            self.request(Method::POST, "/v1/keyspaces", Some(body), &headers)
                .await?,
        )
        .await
    }

    /// The keyspaces the answering node has applied (no quorum needed; may lag).
    pub async fn list_keyspaces_serializable(&self) -> Result<Vec<KeyspaceSpec>> {
        Self::json(
            self.request(
                Method::GET,
                "/v1/keyspaces?consistency=serializable",
                None,
                &[],
            )
            .await?,
        )
        .await
    }

    pub async fn list_keyspaces(&self) -> Result<Vec<KeyspaceSpec>> {
        Self::json(
            self.request(Method::GET, "/v1/keyspaces", None, &[])
                .await?,
        )
        .await
    }

    /// Creates (or replaces, with a new token) a user; the answer holds its token.
    pub async fn create_user(&self, spec: &capkv_core::UserSpec) -> Result<capkv_core::NewUser> {
        let body = serde_json::to_vec(spec).map_err(|e| ClientError::Decode(e.to_string()))?;
        let headers = [("content-type", "application/json".to_string())];
        Self::json(
            self.request(Method::POST, "/v1/users", Some(body), &headers)
                .await?,
        )
        .await
    }

    pub async fn list_users(&self) -> Result<Vec<capkv_core::UserSpec>> {
        Self::json(self.request(Method::GET, "/v1/users", None, &[]).await?).await
    }

    pub async fn delete_user(&self, name: &str) -> Result<()> {
        let path = format!("/v1/users/{}", encode_segment(name.as_bytes()));
        Self::check(self.request(Method::DELETE, &path, None, &[]).await?).await?;
        Ok(())
    }

    /// The cluster as seen by the first node that answers.
    pub async fn cluster(&self) -> Result<ClusterInfo> {
        Self::json(self.request(Method::GET, "/v1/cluster", None, &[]).await?).await
    }

    /// The cluster as seen by one particular node (no fail-over).
    pub async fn cluster_of(&self, node_url: &str) -> Result<ClusterInfo> {
        let resp = self
            .http
            .get(format!("{node_url}/v1/cluster"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(|e| ClientError::Unreachable {
                tried: node_url.to_owned(),
                last: e.to_string(),
            })?;
        Self::json(resp).await
    }

    /// Isolates one node (by URL) from the named nodes; an empty list heals it (every
    /// fault of that node, as [`Client::clear_faults`]). Like every `POST /v1/faults`, a
    /// non-empty list replaces all of the node's faults (one-way drops, clock skew).
    pub async fn set_faults(
        &self,
        node_url: &str,
        isolate_from: Vec<String>,
    ) -> Result<FaultState> {
        if isolate_from.is_empty() {
            self.clear_faults(node_url).await
        } else {
            self.set_fault_request(node_url, &FaultRequest::isolate(isolate_from))
                .await
        }
    }

    /// Sets one node's (by URL) faults to exactly `req`: isolation, one-way drops
    /// (`drop_to`) and clock skew. Returns the node's fault state after the change.
    pub async fn set_fault_request(
        &self,
        node_url: &str,
        req: &FaultRequest,
    ) -> Result<FaultState> {
        self.faults_call(node_url, Method::POST, Some(req)).await
    }

    /// Removes every fault on one node (by URL).
    pub async fn clear_faults(&self, node_url: &str) -> Result<FaultState> {
        self.faults_call(node_url, Method::DELETE, None).await
    }

    /// The faults active on one node (by URL), and what its wall clock reads.
    pub async fn faults(&self, node_url: &str) -> Result<FaultState> {
        self.faults_call(node_url, Method::GET, None).await
    }

    async fn faults_call(
        &self,
        node_url: &str,
        method: Method,
        body: Option<&FaultRequest>,
    ) -> Result<FaultState> {
        let mut req = self
            .http
            .request(method, format!("{node_url}/v1/faults"))
            .timeout(Duration::from_secs(2));
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            tried: node_url.to_owned(),
            last: e.to_string(),
        })?;
        Self::json(resp).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_encoded_segment() {
        assert_eq!(encode_segment(b"a/b c?d"), "a%2Fb%20c%3Fd");
        assert_eq!(encode_segment(b".."), "%2E%2E");
        assert_eq!(encode_segment(&[0xff]), "%FF");
    }

    #[tokio::test]
    async fn unreachable_nodes_are_reported_not_hung() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let c = Client::new([url.clone()]);
        match c.cluster().await {
            Err(ClientError::Unreachable { tried, .. }) => assert!(tried.contains(&url)),
            other => panic!("expected unreachable, got {other:?}"),
        }
    }
}
