//! Who may call the HTTP API: bearer tokens, users and their roles.
//!
//! Authentication is on when a node starts with `--root-token-file FILE`. The token in
//! that file is the built-in `root` user, admin on every keyspace; every other user is
//! created through `POST /v1/users` (`capkv user add`) and stored in the cp registry, so
//! every node enforces the same rules. A user's token is made by the node that creates
//! it, shown once, and stored only as its SHA-256; a request carries it as
//! `Authorization: Bearer TOKEN`.
//!
//! What each request needs ([`need`]):
//!
//! ```text
//!   /healthz, /metrics, /v1/openapi.json        nothing (probes and scrapers)
//!   GET /v1/kv/KS/..., GET /v1/kv/KS            read on KS
//!   PUT, DELETE, POST /v1/kv/KS/...             readwrite on KS
//!   POST /v1/keyspaces                          admin on the keyspace it creates
//!   /v1/users, /v1/faults                       admin on every keyspace (*)
//!   anything else (/v1/cluster, GET /v1/keyspaces)  any valid token
//! ```
//!
//! No token, or one no user holds: 401. A valid token without the role: 403.

use std::path::Path;

use axum::http::{header, Method};
use capkv_core::{ApiError, Role, UserSpec};
use ring::rand::SecureRandom;

/// The shortest root token accepted: 128 bits of a random base64 string.
const ROOT_TOKEN_MIN_CHARS: usize = 22;

/// Token lookups in storage at once; more wait (without a thread) for one to finish.
/// A lookup reads the user registry from this node's storage: if storage stalls, each
/// holds a blocking thread, so without this bound requests with any token (even a bogus
/// one) took every thread of the pool and wedged the node (review).
pub const LOOKUPS_MAX: usize = 32;
/// Longest a request waits to have its token checked (or less: its deadline): 503 after it
/// (not applied).
pub const LOOKUP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The node's authentication settings.
pub struct Auth {
    root_sha256: [u8; 32],
    lookups: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Auth {
    /// Reads the root token from `path` (surrounding whitespace ignored).
    pub fn from_root_token_file(path: &Path) -> Result<Auth, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let token = text.trim();
        if token.len() < ROOT_TOKEN_MIN_CHARS {
            return Err(format!(
                "{}: a root token must be at least {ROOT_TOKEN_MIN_CHARS} characters (make one \
                 with `capkv certs init`, or `head -c 32 /dev/urandom | base64`)",
                path.display()
            ));
        }
        Ok(Auth {
            root_sha256: sha256(token),
            lookups: std::sync::Arc::new(tokio::sync::Semaphore::new(LOOKUPS_MAX)),
        })
    }
}

pub fn sha256(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// A new random token: 32 bytes, base64url.
pub fn new_token() -> Result<String, ApiError> {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ApiError::internal("the system random source failed"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// What a request needs.
#[derive(Debug, PartialEq, Eq)]
pub enum Need {
    Nothing,
    /// Any valid token.
    Anyone,
    /// Admin on some keyspace: the handler checks it is the one the request names
    /// (`POST /v1/keyspaces`, whose keyspace is in the body).
    SomeAdmin,
    /// A role on a keyspace (`None`: on every keyspace).
    Role(Role, Option<String>),
}

/// Decodes `%XX` escapes (a keyspace segment could be written escaped).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn need(method: &Method, path: &str) -> Need {
    match path {
        "/healthz" | "/metrics" | "/v1/openapi.json" => return Need::Nothing,
        "/v1/keyspaces" if method == Method::POST => return Need::SomeAdmin,
        _ => {}
    }
    if path == "/v1/users" || path.starts_with("/v1/users/") || path.starts_with("/v1/faults") {
        return Need::Role(Role::Admin, None);
    }
    if let Some(rest) = path.strip_prefix("/v1/kv/") {
        let keyspace = percent_decode(rest.split('/').next().unwrap_or_default());
        let role = if method == Method::GET || method == Method::HEAD {
            Role::Read
        } else {
            Role::Readwrite
        };
        return Need::Role(role, Some(keyspace));
    }
    Need::Anyone
}

/// The user a request's bearer token names, or why there is none (`reader` finds users
/// in the cp state machine).
pub async fn user(
    reader: &crate::cp::state_machine::Reader,
    auth: &Auth,
    authorization: Option<header::HeaderValue>,
    deadline: crate::rt::Instant,
) -> Result<UserSpec, ApiError> {
    let Some(value) = authorization else {
        return Err(ApiError::unauthorized(
            "this node requires a bearer token (Authorization: Bearer TOKEN; capkv: --token \
             or CAPKV_TOKEN)",
        ));
    };
    // The scheme is case-insensitive (RFC 9110 11.1).
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("the Authorization header is not 'Bearer TOKEN'"))?;
    let hash = sha256(token);
    // Hashes are compared, not tokens: how long a comparison takes says nothing useful
    // about a token whose hash would match.
    if hash == auth.root_sha256 {
        return Ok(UserSpec {
            // Not a valid user name, so no user can be taken for it.
            name: "(root token)".into(),
            grants: vec![capkv_core::Grant {
                role: Role::Admin,
                keyspace: capkv_core::ALL_KEYSPACES.into(),
            }],
        });
    }
    let busy = || {
        crate::limits::hit("auth_lookups");
        ApiError::unavailable(
            "this node cannot check the token now (its storage is not answering); not applied",
        )
    };
    let deadline = deadline.min(crate::rt::Instant::now() + LOOKUP_WAIT);
    let place = tokio::time::timeout_at(deadline, auth.lookups.clone().acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(busy)?;
    let reader = reader.clone();
    let lookup = crate::rt::blocking(move || {
        let user = reader.user_by_token(&hash);
        drop(place);
        user
    });
    match tokio::time::timeout_at(deadline, lookup).await {
        Ok(Ok(user)) => user?.ok_or_else(|| ApiError::unauthorized("no user holds this token")),
        Ok(Err(e)) => Err(ApiError::internal(format!("token lookup failed: {e}"))),
        Err(_) => Err(busy()),
    }
}

/// The user a request was authenticated as (absent when authentication is off).
#[derive(Clone)]
pub struct Authenticated(pub UserSpec);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_needs_what_the_table_says() {
        let kv = |m: Method, p: &str| need(&m, p);
        assert_eq!(kv(Method::GET, "/healthz"), Need::Nothing);
        assert_eq!(
            kv(Method::GET, "/v1/kv/cart/k"),
            Need::Role(Role::Read, Some("cart".into()))
        );
        assert_eq!(
            kv(Method::GET, "/v1/kv/cart"),
            Need::Role(Role::Read, Some("cart".into()))
        );
        assert_eq!(
            kv(Method::PUT, "/v1/kv/%63p/k"),
            Need::Role(Role::Readwrite, Some("cp".into()))
        );
        assert_eq!(
            kv(Method::POST, "/v1/kv/c/k"),
            Need::Role(Role::Readwrite, Some("c".into()))
        );
        assert_eq!(kv(Method::POST, "/v1/keyspaces"), Need::SomeAdmin);
        assert_eq!(kv(Method::GET, "/v1/keyspaces"), Need::Anyone);
        assert_eq!(
            kv(Method::DELETE, "/v1/faults"),
            Need::Role(Role::Admin, None)
        );
        assert_eq!(kv(Method::GET, "/v1/users"), Need::Role(Role::Admin, None));
        assert_eq!(
            kv(Method::DELETE, "/v1/users/x"),
            Need::Role(Role::Admin, None)
        );
        assert_eq!(kv(Method::GET, "/v1/cluster"), Need::Anyone);
        assert_eq!(kv(Method::GET, "/nowhere"), Need::Anyone);
    }

    #[test]
    fn roles_include_the_lesser_ones_on_their_keyspace_only() {
        let u = UserSpec {
            name: "u".into(),
            grants: vec!["readwrite:cart".parse().unwrap(), "read".parse().unwrap()],
        };
        assert!(u.allows(Role::Read, Some("cart")));
        assert!(u.allows(Role::Readwrite, Some("cart")));
        assert!(!u.allows(Role::Admin, Some("cart")));
        assert!(u.allows(Role::Read, Some("bank")));
        assert!(!u.allows(Role::Readwrite, Some("bank")));
        assert!(!u.allows(Role::Read, None) || u.grants.iter().any(|g| g.keyspace == "*"));
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_ne!(a, b);
        assert!(a.len() >= ROOT_TOKEN_MIN_CHARS);
        assert_eq!(sha256(&a), sha256(&a));
        assert_ne!(sha256(&a), sha256(&b));
        assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
    }
}
