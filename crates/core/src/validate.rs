//! Limits and checks on what clients send. Every limit is named here, with its reason.

use crate::error::ApiError;

/// Keys are 1..=1024 bytes: long enough for paths and composite keys, short enough that
/// a key never dominates a log entry or a scan page.
pub const MAX_KEY_BYTES: usize = 1024;

/// Default largest value a node accepts (`--max-value-bytes` changes it). Values travel
/// whole inside Raft log entries, so they must stay small next to a log batch.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;

/// Keyspace names are short identifiers so they can be embedded in paths and storage keys.
pub const MAX_KEYSPACE_NAME_BYTES: usize = 64;

/// Most replicas an ap keyspace may ask for.
pub const MAX_REPLICAS: u32 = 16;

/// Most entries one scan returns; a larger `limit` is refused rather than silently cut.
pub const MAX_SCAN_LIMIT: usize = 10_000;

/// Longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// Longest deadline a request may ask for with `timeout_ms`.
pub const MAX_TIMEOUT_MS: u64 = 60_000;

/// Replicas of an ap key when the keyspace does not say (fewer on a smaller cluster).
pub const DEFAULT_REPLICAS: u32 = 3;

/// Largest clock skew `/v1/faults` accepts, either way: one day, far beyond any skew a
/// real cluster survives unnoticed, yet small enough that no arithmetic on it overflows.
pub const MAX_CLOCK_SKEW_MS: i64 = 86_400_000;

/// A keyspace name: 1..=64 characters of `[A-Za-z0-9_-]`.
pub fn keyspace_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_KEYSPACE_NAME_BYTES {
        return Err(ApiError::bad_request(format!(
            "keyspace name must be 1 to {MAX_KEYSPACE_NAME_BYTES} characters, got {}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(ApiError::bad_request(format!(
            "keyspace name may contain only letters, digits, '_' and '-', found {c:?}"
        )));
    }
    Ok(())
}

/// A key: 1..=1024 bytes. Too long is 413 (it is a size limit), empty is 400.
pub fn key(key: &[u8]) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request("key must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::too_large(format!(
            "key is {} bytes; the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

/// An `Idempotency-Key` header value.
pub fn idempotency_key(k: &str) -> Result<(), ApiError> {
    if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(ApiError::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use proptest::prelude::*;

    #[test]
    fn key_limits() {
        assert_eq!(key(b"").unwrap_err().code, ErrorCode::BadRequest);
        assert!(key(&[b'a'; MAX_KEY_BYTES]).is_ok());
        assert_eq!(
            key(&[b'a'; MAX_KEY_BYTES + 1]).unwrap_err().code,
            ErrorCode::TooLarge
        );
    }

    #[test]
    fn keyspace_names() {
        assert!(keyspace_name("bank-eu_1").is_ok());
        assert!(keyspace_name("a/b").is_err());
        assert!(keyspace_name(&"x".repeat(65)).is_err());
    }

    proptest! {
        #[test]
        fn valid_names_never_contain_separator_bytes(name in "\\PC{0,80}") {
            if keyspace_name(&name).is_ok() {
                prop_assert!(!name.is_empty() && name.len() <= MAX_KEYSPACE_NAME_BYTES);
                prop_assert!(!name.bytes().any(|b| b == 0 || b == b'/'));
            }
        }
    }
}
