//! Typed errors and the one place where they become gRPC statuses.
//!
//! Every variant carries a stable `reason` (the `google.rpc.ErrorInfo.reason` a caller can match
//! on). Messages are written for the caller and never contain plaintext, keys, tokens or raw
//! subject ids. Internal details (Vault responses, I/O errors) are logged with a correlation id
//! and the caller sees only that id.

use std::fmt;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every error piiguard returns.
pub const ERROR_DOMAIN: &str = "piiguard.dev";

/// Stable reasons. Callers match on these strings; never rename one.
pub mod reason {
    pub const INVALID_REQUEST: &str = "INVALID_REQUEST";
    pub const UNKNOWN_KEYSPACE: &str = "UNKNOWN_KEYSPACE";
    pub const PAYLOAD_TOO_LARGE: &str = "PAYLOAD_TOO_LARGE";
    pub const BATCH_TOO_LARGE: &str = "BATCH_TOO_LARGE";
    pub const MALFORMED_CIPHERTEXT: &str = "MALFORMED_CIPHERTEXT";
    pub const UNSUPPORTED_VERSION: &str = "UNSUPPORTED_CIPHERTEXT_VERSION";
    pub const KEYSPACE_MISMATCH: &str = "KEYSPACE_MISMATCH";
    pub const DECRYPTION_FAILED: &str = "DECRYPTION_FAILED";
    pub const UNKNOWN_KEY: &str = "UNKNOWN_KEY";
    pub const UNAUTHENTICATED: &str = "UNAUTHENTICATED";
    pub const KEY_USAGE_EXHAUSTED: &str = "KEY_USAGE_EXHAUSTED";
    pub const VAULT_UNAVAILABLE: &str = "VAULT_UNAVAILABLE";
    pub const SUBJECT_SHREDDED: &str = "SUBJECT_SHREDDED";
    pub const SUBJECT_SHRED_SCHEDULED: &str = "SUBJECT_SHRED_SCHEDULED";
    pub const SHRED_NOT_SCHEDULED: &str = "SHRED_NOT_SCHEDULED";
    /// NOT_FOUND: no such token in this keyspace.
    pub const UNKNOWN_TOKEN: &str = "UNKNOWN_TOKEN";
    /// NOT_FOUND: the token existed but its TTL has passed.
    pub const TOKEN_EXPIRED: &str = "TOKEN_EXPIRED";
    /// INVALID_ARGUMENT: the string cannot be a piiguard token.
    pub const MALFORMED_TOKEN: &str = "MALFORMED_TOKEN";
    /// INVALID_ARGUMENT: the value does not fit the requested token format.
    pub const UNSUPPORTED_FORMAT: &str = "UNSUPPORTED_FORMAT";
    /// RESOURCE_EXHAUSTED: no free token left in a (small) token space after retries.
    pub const TOKEN_SPACE_EXHAUSTED: &str = "TOKEN_SPACE_EXHAUSTED";
    pub const INTERNAL: &str = "INTERNAL";
    /// The access policy does not grant this caller the operation on this keyspace/field.
    pub const POLICY_DENIED: &str = "POLICY_DENIED";
    /// A per-identity call-rate limit was reached.
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    /// A per-identity budget of decrypted / detokenised items was reached.
    pub const VOLUME_BUDGET_EXCEEDED: &str = "VOLUME_BUDGET_EXCEEDED";
    /// The caller is locked out (repeated denied/failed calls, or a canary was touched).
    pub const LOCKED_OUT: &str = "LOCKED_OUT";
    /// The audit log cannot be written: data calls fail closed.
    pub const AUDIT_UNAVAILABLE: &str = "AUDIT_UNAVAILABLE";
}

/// An error of a piiguard operation.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is malformed (missing field, bad name, ...). `reason` is one of [`reason`].
    #[error("{message}")]
    InvalidArgument {
        reason: &'static str,
        message: String,
    },
    /// A ciphertext could not be opened: tampered, truncated, wrong field/context/keyspace.
    /// Deliberately one reason for every authentication failure so a caller learns nothing
    /// about which part was wrong.
    #[error("{message}")]
    BadCiphertext {
        reason: &'static str,
        message: String,
    },
    /// The subject's data cannot be used in its current state (shredded, shred scheduled).
    #[error("{message}")]
    FailedPrecondition {
        reason: &'static str,
        message: String,
    },
    /// The thing asked for does not exist (unknown or expired token).
    #[error("{message}")]
    NotFound {
        reason: &'static str,
        message: String,
    },
    /// The caller presented no usable identity.
    #[error("caller identity missing")]
    Unauthenticated,
    /// The access policy does not allow the call. `message` names what was missing (identity,
    /// operation, keyspace, field), never request data.
    #[error("{message}")]
    PermissionDenied { message: String },
    /// The audit sink cannot accept records; data calls fail closed. Retryable.
    #[error("audit log unavailable")]
    AuditUnavailable,
    /// A resource limit was reached.
    #[error("{message}")]
    ResourceExhausted {
        reason: &'static str,
        message: String,
    },
    /// Vault (or another backing service) cannot be reached or answered with a server error.
    /// Retryable. `detail` is logged, never sent.
    #[error("key store unavailable")]
    Unavailable { detail: String },
    /// A bug or an unexpected answer. `detail` is logged, never sent.
    #[error("internal error")]
    Internal { detail: String },
}

impl Error {
    pub fn invalid(reason: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            reason,
            message: message.into(),
        }
    }

    pub fn bad_ciphertext(reason: &'static str, message: impl Into<String>) -> Self {
        Error::BadCiphertext {
            reason,
            message: message.into(),
        }
    }

    /// The subject's keys are destroyed.
    pub fn shredded() -> Self {
        Error::FailedPrecondition {
            reason: reason::SUBJECT_SHREDDED,
            message: "the data subject has been shredded; its data is permanently unreadable"
                .into(),
        }
    }

    /// A shred of the subject is scheduled; its data is refused until it is cancelled.
    pub fn shred_scheduled() -> Self {
        Error::FailedPrecondition {
            reason: reason::SUBJECT_SHRED_SCHEDULED,
            message: "a shred of the data subject is scheduled; its data is refused".into(),
        }
    }

    pub fn not_found(reason: &'static str, message: impl Into<String>) -> Self {
        Error::NotFound {
            reason,
            message: message.into(),
        }
    }

    pub fn unavailable(detail: impl fmt::Display) -> Self {
        Error::Unavailable {
            detail: detail.to_string(),
        }
    }

    pub fn internal(detail: impl fmt::Display) -> Self {
        Error::Internal {
            detail: detail.to_string(),
        }
    }

    /// gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } | Error::BadCiphertext { .. } => Code::InvalidArgument,
            Error::FailedPrecondition { .. } => Code::FailedPrecondition,
            Error::NotFound { .. } => Code::NotFound,
            Error::Unauthenticated => Code::Unauthenticated,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::AuditUnavailable => Code::Unavailable,
            Error::ResourceExhausted { .. } => Code::ResourceExhausted,
            Error::Unavailable { .. } => Code::Unavailable,
            Error::Internal { .. } => Code::Internal,
        }
    }

    /// Stable reason string of this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidArgument { reason, .. }
            | Error::BadCiphertext { reason, .. }
            | Error::ResourceExhausted { reason, .. }
            | Error::FailedPrecondition { reason, .. }
            | Error::NotFound { reason, .. } => reason,
            Error::Unauthenticated => reason::UNAUTHENTICATED,
            Error::PermissionDenied { .. } => reason::POLICY_DENIED,
            Error::AuditUnavailable => reason::AUDIT_UNAVAILABLE,
            Error::Unavailable { .. } => reason::VAULT_UNAVAILABLE,
            Error::Internal { .. } => reason::INTERNAL,
        }
    }

    /// The message a caller may see. Internal details are replaced by a generic text.
    pub fn public_message(&self) -> String {
        match self {
            Error::Unavailable { .. } => {
                "key store unavailable, retry later (see correlation_id in the server log)".into()
            }
            Error::Internal { .. } => {
                "internal error (see correlation_id in the server log)".into()
            }
            Error::AuditUnavailable => {
                "audit log unavailable: the call was refused (fail closed); retry later".into()
            }
            other => other.to_string(),
        }
    }

    /// Logs what must be logged and converts into a gRPC status carrying `ErrorInfo`.
    pub fn into_status(self, correlation_id: &str) -> Status {
        match &self {
            Error::Unavailable { detail } => {
                tracing::warn!(correlation_id, reason = self.reason(), detail = %detail, "request failed: backend unavailable");
            }
            Error::Internal { detail } => {
                tracing::error!(correlation_id, reason = self.reason(), detail = %detail, "request failed: internal error");
            }
            _ => {}
        }
        let mut info = std::collections::HashMap::new();
        info.insert("correlation_id".to_string(), correlation_id.to_string());
        let details = ErrorDetails::with_error_info(self.reason(), ERROR_DOMAIN, info);
        let mut status = Status::with_error_details(self.code(), self.public_message(), details);
        if let Ok(v) = correlation_id.parse() {
            status.metadata_mut().insert("x-correlation-id", v);
        }
        status
    }
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A correlation id: 16 lowercase hex characters naming one call in logs, audit records and
/// the error a caller sees. Not a secret: it must only be unique, so it is a counter run
/// through a 64-bit bijection (the murmur3 finaliser) from a random per-process start. Unique
/// for 2^64 calls of a process; replicas start at independent random points. Made without a
/// CSPRNG call or an allocation, because every call gets one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CorrelationId([u8; 16]);

impl CorrelationId {
    pub fn new() -> Self {
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static START: OnceLock<u64> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let start = *START.get_or_init(|| {
            let mut b = [0u8; 8];
            // An RNG failure leaves a zero start: ids stay unique within the process.
            let _ = aws_lc_rs::rand::fill(&mut b);
            u64::from_le_bytes(b)
        });
        let mut x = start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^= x >> 33;
        let mut out = [0u8; 16];
        // 8 bytes into 16 hex digits: the lengths match, so this cannot fail.
        let _ = hex::encode_to_slice(x.to_be_bytes(), &mut out);
        Self(out)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("0000000000000000")
    }
}

impl Default for CorrelationId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_do_not_reach_the_caller() {
        let e = Error::internal("vault said: secret-token-abc");
        let status = e.into_status("cid1");
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret-token-abc"));
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.reason, reason::INTERNAL);
        assert_eq!(
            info.metadata.get("correlation_id").map(String::as_str),
            Some("cid1")
        );
    }

    #[test]
    fn correlation_ids_are_distinct_hex() {
        let ids: std::collections::HashSet<String> = (0..10_000)
            .map(|_| CorrelationId::new().to_string())
            .collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|i| {
            i.len() == 16
                && i.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }));
    }

    #[test]
    fn bad_ciphertext_is_invalid_argument() {
        let s = Error::bad_ciphertext(reason::DECRYPTION_FAILED, "x").into_status("c");
        assert_eq!(s.code(), Code::InvalidArgument);
    }
}
