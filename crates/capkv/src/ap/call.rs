//! What a request to a replica can end in, by whether it may have taken effect: the
//! coordinator's rules (at most once, 504 for "maybe"), shared by its direct calls and
//! the batched copies (`ap::batch`).

use capkv_core::ApiError;

/// Why a request to a replica has no good answer, by whether it may have taken effect.
#[derive(Debug, Clone)]
pub(super) enum CallError {
    /// It certainly did not: never delivered, or refused before any change.
    NotApplied(ApiError),
    /// It may have: delivered (or maybe) and no answer, or failed part way.
    Unknown(ApiError),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error().fmt(f)
    }
}

impl CallError {
    pub(super) fn error(&self) -> &ApiError {
        match self {
            CallError::NotApplied(e) | CallError::Unknown(e) => e,
        }
    }
}

pub(super) fn net_err(e: crate::net::NetError) -> CallError {
    if e.maybe_delivered() {
        CallError::Unknown(ApiError::timeout(e.to_string()))
    } else {
        CallError::NotApplied(ApiError::unavailable(e.to_string()))
    }
}

/// Whether a replica's refusal would be the same everywhere: the client's answer, not a
/// reason to try another home.
pub(super) fn is_refusal(e: &ApiError) -> bool {
    matches!(
        e.code,
        capkv_core::ErrorCode::BadRequest | capkv_core::ErrorCode::TooLarge
    )
}

/// A replica's error: refusals and "unavailable" (it refused before changing anything:
/// its hint store is full, the write's deadline passed) were not applied; anything else
/// (storage failed part way) may have been.
pub(super) fn replica_err(e: ApiError) -> CallError {
    if is_refusal(&e) || e.code == capkv_core::ErrorCode::Unavailable {
        CallError::NotApplied(e)
    } else {
        CallError::Unknown(e)
    }
}
