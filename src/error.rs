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

/// Stable reasons (`google.rpc.ErrorInfo.reason`). Callers match on these strings; never rename
/// one. Each names the gRPC code it comes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// INVALID_ARGUMENT: the request is malformed (missing or bad name, bad context, ...).
    InvalidRequest,
    /// INVALID_ARGUMENT: the keyspace is not configured.
    UnknownKeyspace,
    /// INVALID_ARGUMENT: a plaintext or value is over the configured size limit.
    PayloadTooLarge,
    /// INVALID_ARGUMENT: a batch has more items than allowed.
    BatchTooLarge,
    /// INVALID_ARGUMENT: the bytes are not a piiguard ciphertext.
    MalformedCiphertext,
    /// INVALID_ARGUMENT: the ciphertext has a format version this server does not know.
    UnsupportedVersion,
    /// INVALID_ARGUMENT: the ciphertext belongs to another keyspace than the one named.
    KeyspaceMismatch,
    /// INVALID_ARGUMENT: the ciphertext does not open (tampered, or wrong field or context).
    DecryptionFailed,
    /// INVALID_ARGUMENT: the ciphertext names a key that never existed.
    UnknownKey,
    /// UNAUTHENTICATED: the caller presented no usable identity.
    Unauthenticated,
    /// UNAUTHENTICATED: the connection's client certificate no longer verifies against the
    /// certificates and CRLs in force (revoked, expired, or the CRL in force has expired).
    CertificateRejected,
    /// RESOURCE_EXHAUSTED: the DEK reached its safe number of encryptions.
    KeyUsageExhausted,
    /// UNAVAILABLE: Vault or the store cannot be reached; retryable.
    VaultUnavailable,
    /// FAILED_PRECONDITION: the subject has been shredded; its data is permanently unreadable.
    SubjectShredded,
    /// FAILED_PRECONDITION: a shred of the subject is scheduled (grace window).
    SubjectShredScheduled,
    /// FAILED_PRECONDITION: there is no scheduled shred to cancel.
    ShredNotScheduled,
    /// NOT_FOUND: no such token in this keyspace.
    UnknownToken,
    /// NOT_FOUND: the subject has no key in this keyspace (nothing to rotate).
    UnknownSubject,
    /// NOT_FOUND: the token existed but its TTL has passed.
    TokenExpired,
    /// INVALID_ARGUMENT: the string cannot be a piiguard token.
    MalformedToken,
    /// INVALID_ARGUMENT: the value does not fit the requested token format.
    UnsupportedFormat,
    /// RESOURCE_EXHAUSTED: no free token left in a (small) token space after retries.
    TokenSpaceExhausted,
    /// INTERNAL: a bug or an unexpected answer; details only in the server log.
    Internal,
    /// The access policy does not grant this caller the operation on this keyspace/field.
    PolicyDenied,
    /// A per-identity call-rate limit was reached.
    RateLimited,
    /// A per-identity budget of decrypted / detokenised items was reached.
    VolumeBudgetExceeded,
    /// The caller is locked out (repeated denied/failed calls, or a canary was touched).
    LockedOut,
    /// The audit log cannot be written: data calls fail closed.
    AuditUnavailable,
    /// INVALID_ARGUMENT: the request bytes are not a valid protobuf message of the method's
    /// type (a string that is not UTF-8, a wrong wire type, nesting past the depth limit).
    MalformedMessage,
    /// UNAVAILABLE: the SQL store (PostgreSQL or SQLite) cannot be reached or cannot take a
    /// write now (server stopped, connection lost, disk full, read-only file). Nothing was
    /// changed; retry with backoff.
    StoreUnavailable,
    /// INVALID_ARGUMENT: the value has no normal form for its field kind (a blind index of a
    /// phone number with no digits, an e-mail address without `@`, bytes that are not UTF-8).
    ValueNotNormalisable,
    /// PERMISSION_DENIED: the caller's grant of the field allows masked reveals only; ask with
    /// `REVEAL_MODE_MASKED`.
    MaskedRevealOnly,
    /// INVALID_ARGUMENT: the bytes are not a sealed envelope (truncated, unknown kind or
    /// version, bad text form).
    MalformedEnvelope,
    /// INVALID_ARGUMENT: the sealed envelope names a sealing key version that does not exist
    /// or has been retired.
    UnknownSealingKeyVersion,
    /// FAILED_PRECONDITION: a key piiguard needs in Vault (the sealing key) does not exist or
    /// the Vault policy does not cover it: run `piiguard bootstrap` again.
    KeyNotProvisioned,
    /// FAILED_PRECONDITION: a KEK version cannot be retired yet: a wrapped DEK still needs it
    /// (the background rewrap has not finished), or it is too new for wraps in flight to have
    /// landed. Nothing was changed; wait for the rewrap (`piiguard keys status`) and retry.
    KekVersionInUse,
    /// RESOURCE_EXHAUSTED: the call needed Vault and every place for a Vault request
    /// (`vault.max_in_flight`) stayed taken for `vault.queue_timeout_ms` (Vault slow or stalled,
    /// or a burst of cold calls). Nothing was changed; retry with backoff.
    VaultOverloaded,
}

impl Reason {
    /// Every reason, for documentation and tests.
    pub const ALL: &'static [Reason] = &[
        Reason::InvalidRequest,
        Reason::UnknownKeyspace,
        Reason::PayloadTooLarge,
        Reason::BatchTooLarge,
        Reason::MalformedCiphertext,
        Reason::UnsupportedVersion,
        Reason::KeyspaceMismatch,
        Reason::DecryptionFailed,
        Reason::UnknownKey,
        Reason::Unauthenticated,
        Reason::CertificateRejected,
        Reason::KeyUsageExhausted,
        Reason::VaultUnavailable,
        Reason::SubjectShredded,
        Reason::SubjectShredScheduled,
        Reason::ShredNotScheduled,
        Reason::UnknownToken,
        Reason::UnknownSubject,
        Reason::TokenExpired,
        Reason::MalformedToken,
        Reason::UnsupportedFormat,
        Reason::TokenSpaceExhausted,
        Reason::Internal,
        Reason::PolicyDenied,
        Reason::RateLimited,
        Reason::VolumeBudgetExceeded,
        Reason::LockedOut,
        Reason::AuditUnavailable,
        Reason::MalformedMessage,
        Reason::StoreUnavailable,
        Reason::ValueNotNormalisable,
        Reason::MaskedRevealOnly,
        Reason::MalformedEnvelope,
        Reason::UnknownSealingKeyVersion,
        Reason::KeyNotProvisioned,
        Reason::KekVersionInUse,
        Reason::VaultOverloaded,
    ];

    /// The stable string a caller sees.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidRequest => "INVALID_REQUEST",
            Reason::UnknownKeyspace => "UNKNOWN_KEYSPACE",
            Reason::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Reason::BatchTooLarge => "BATCH_TOO_LARGE",
            Reason::MalformedCiphertext => "MALFORMED_CIPHERTEXT",
            Reason::UnsupportedVersion => "UNSUPPORTED_CIPHERTEXT_VERSION",
            Reason::KeyspaceMismatch => "KEYSPACE_MISMATCH",
            Reason::DecryptionFailed => "DECRYPTION_FAILED",
            Reason::UnknownKey => "UNKNOWN_KEY",
            Reason::Unauthenticated => "UNAUTHENTICATED",
            Reason::CertificateRejected => "CLIENT_CERTIFICATE_REJECTED",
            Reason::KeyUsageExhausted => "KEY_USAGE_EXHAUSTED",
            Reason::VaultUnavailable => "VAULT_UNAVAILABLE",
            Reason::SubjectShredded => "SUBJECT_SHREDDED",
            Reason::SubjectShredScheduled => "SUBJECT_SHRED_SCHEDULED",
            Reason::ShredNotScheduled => "SHRED_NOT_SCHEDULED",
            Reason::UnknownToken => "UNKNOWN_TOKEN",
            Reason::UnknownSubject => "UNKNOWN_SUBJECT",
            Reason::TokenExpired => "TOKEN_EXPIRED",
            Reason::MalformedToken => "MALFORMED_TOKEN",
            Reason::UnsupportedFormat => "UNSUPPORTED_FORMAT",
            Reason::TokenSpaceExhausted => "TOKEN_SPACE_EXHAUSTED",
            Reason::Internal => "INTERNAL",
            Reason::PolicyDenied => "POLICY_DENIED",
            Reason::RateLimited => "RATE_LIMITED",
            Reason::VolumeBudgetExceeded => "VOLUME_BUDGET_EXCEEDED",
            Reason::LockedOut => "LOCKED_OUT",
            Reason::AuditUnavailable => "AUDIT_UNAVAILABLE",
            Reason::MalformedMessage => "MALFORMED_MESSAGE",
            Reason::StoreUnavailable => "STORE_UNAVAILABLE",
            Reason::ValueNotNormalisable => "VALUE_NOT_NORMALISABLE",
            Reason::MaskedRevealOnly => "MASKED_REVEAL_ONLY",
            Reason::MalformedEnvelope => "MALFORMED_ENVELOPE",
            Reason::UnknownSealingKeyVersion => "UNKNOWN_SEALING_KEY_VERSION",
            Reason::KeyNotProvisioned => "KEY_NOT_PROVISIONED",
            Reason::KekVersionInUse => "KEK_VERSION_IN_USE",
            Reason::VaultOverloaded => "VAULT_OVERLOADED",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error of a piiguard operation.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is malformed (missing field, bad name, ...). `reason` is one of [`reason`].
    #[error("{message}")]
    InvalidArgument {
        /// The stable reason.
        reason: Reason,
        /// What is wrong, for the caller.
        message: String,
    },
    /// A ciphertext could not be opened: tampered, truncated, wrong field/context/keyspace.
    /// Deliberately one reason for every authentication failure so a caller learns nothing
    /// about which part was wrong.
    #[error("{message}")]
    BadCiphertext {
        /// The stable reason.
        reason: Reason,
        /// What happened, for the caller.
        message: String,
    },
    /// The subject's data cannot be used in its current state (shredded, shred scheduled).
    #[error("{message}")]
    FailedPrecondition {
        /// The stable reason.
        reason: Reason,
        /// What happened, for the caller.
        message: String,
    },
    /// The thing asked for does not exist (unknown or expired token).
    #[error("{message}")]
    NotFound {
        /// The stable reason.
        reason: Reason,
        /// What happened, for the caller.
        message: String,
    },
    /// The caller presented no usable identity.
    #[error("caller identity missing")]
    Unauthenticated,
    /// The connection's client certificate no longer verifies (revoked by a reloaded CRL,
    /// expired, or the CRL in force expired). `message` names why, never certificate bytes.
    #[error("{message}")]
    CertificateRejected {
        /// Why, for the caller.
        message: String,
    },
    /// The access policy does not allow the call. `message` names what was missing (identity,
    /// operation, keyspace, field), never request data.
    #[error("{message}")]
    PermissionDenied {
        /// What was missing (identity, operation, keyspace, field).
        message: String,
    },
    /// The policy grants the caller only masked reveals of the field, and the call asked for
    /// the whole value (PERMISSION_DENIED, reason `MASKED_REVEAL_ONLY`).
    #[error("{message}")]
    MaskedRevealOnly {
        /// Which field and identity, never request data.
        message: String,
    },
    /// The audit sink cannot accept records; data calls fail closed. Retryable.
    #[error("audit log unavailable")]
    AuditUnavailable,
    /// A resource limit was reached.
    #[error("{message}")]
    ResourceExhausted {
        /// The stable reason.
        reason: Reason,
        /// What happened, for the caller.
        message: String,
    },
    /// Vault (or another backing service) cannot be reached or answered with a server error.
    /// Retryable. `detail` is logged, never sent.
    #[error("key store unavailable")]
    Unavailable {
        /// What failed; logged with the correlation id, never sent.
        detail: String,
    },
    /// The SQL store cannot be reached or cannot take the statement now. Retryable; the
    /// statement changed nothing (it ran in no transaction, or in one that did not commit).
    /// `detail` is logged, never sent.
    #[error("store unavailable")]
    StoreUnavailable {
        /// What failed; logged with the correlation id, never sent.
        detail: String,
    },
    /// A bug or an unexpected answer. `detail` is logged, never sent.
    #[error("internal error")]
    Internal {
        /// What failed; logged with the correlation id, never sent.
        detail: String,
    },
}

impl Error {
    /// INVALID_ARGUMENT with `reason`.
    pub fn invalid(reason: Reason, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            reason,
            message: message.into(),
        }
    }

    /// A ciphertext that does not open (INVALID_ARGUMENT).
    pub fn bad_ciphertext(reason: Reason, message: impl Into<String>) -> Self {
        Error::BadCiphertext {
            reason,
            message: message.into(),
        }
    }

    /// The subject's keys are destroyed.
    pub fn shredded() -> Self {
        Error::FailedPrecondition {
            reason: Reason::SubjectShredded,
            message: "the data subject has been shredded; its data is permanently unreadable"
                .into(),
        }
    }

    /// A shred of the subject is scheduled; its data is refused until it is cancelled.
    pub fn shred_scheduled() -> Self {
        Error::FailedPrecondition {
            reason: Reason::SubjectShredScheduled,
            message: "a shred of the data subject is scheduled; its data is refused".into(),
        }
    }

    /// NOT_FOUND with `reason`.
    pub fn not_found(reason: Reason, message: impl Into<String>) -> Self {
        Error::NotFound {
            reason,
            message: message.into(),
        }
    }

    /// UNAVAILABLE (retryable); `detail` is only logged.
    pub fn unavailable(detail: impl fmt::Display) -> Self {
        Error::Unavailable {
            detail: detail.to_string(),
        }
    }

    /// RESOURCE_EXHAUSTED, `VAULT_OVERLOADED`: no place for a Vault request came free in time.
    pub fn vault_overloaded() -> Self {
        Error::ResourceExhausted {
            reason: Reason::VaultOverloaded,
            message: "too many Vault requests in flight (vault.max_in_flight); nothing was \
                      changed, retry with backoff"
                .into(),
        }
    }

    /// INTERNAL; `detail` is only logged.
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
            Error::Unauthenticated | Error::CertificateRejected { .. } => Code::Unauthenticated,
            Error::PermissionDenied { .. } | Error::MaskedRevealOnly { .. } => {
                Code::PermissionDenied
            }
            Error::AuditUnavailable => Code::Unavailable,
            Error::ResourceExhausted { .. } => Code::ResourceExhausted,
            Error::Unavailable { .. } | Error::StoreUnavailable { .. } => Code::Unavailable,
            Error::Internal { .. } => Code::Internal,
        }
    }

    /// Stable reason string of this error.
    pub fn reason(&self) -> Reason {
        match self {
            Error::InvalidArgument { reason, .. }
            | Error::BadCiphertext { reason, .. }
            | Error::ResourceExhausted { reason, .. }
            | Error::FailedPrecondition { reason, .. }
            | Error::NotFound { reason, .. } => *reason,
            Error::Unauthenticated => Reason::Unauthenticated,
            Error::CertificateRejected { .. } => Reason::CertificateRejected,
            Error::PermissionDenied { .. } => Reason::PolicyDenied,
            Error::MaskedRevealOnly { .. } => Reason::MaskedRevealOnly,
            Error::AuditUnavailable => Reason::AuditUnavailable,
            Error::Unavailable { .. } => Reason::VaultUnavailable,
            Error::StoreUnavailable { .. } => Reason::StoreUnavailable,
            Error::Internal { .. } => Reason::Internal,
        }
    }

    /// What the error says, internal details included: for the server log and alarms, never
    /// for a caller (see [`Error::public_message`]).
    pub fn detail(&self) -> String {
        match self {
            Error::Unavailable { detail }
            | Error::StoreUnavailable { detail }
            | Error::Internal { detail } => detail.clone(),
            other => other.to_string(),
        }
    }

    /// The message a caller may see. Internal details are replaced by a generic text.
    pub fn public_message(&self) -> String {
        match self {
            Error::Unavailable { .. } => {
                "key store unavailable, retry later (see correlation_id in the server log)".into()
            }
            Error::StoreUnavailable { .. } => {
                "store unavailable, retry later (see correlation_id in the server log)".into()
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
            Error::Unavailable { detail } | Error::StoreUnavailable { detail } => {
                tracing::warn!(correlation_id, reason = %self.reason(), detail = %detail, "request failed: backend unavailable");
            }
            Error::Internal { detail } => {
                tracing::error!(correlation_id, reason = %self.reason(), detail = %detail, "request failed: internal error");
            }
            _ => {}
        }
        let mut info = std::collections::HashMap::new();
        info.insert("correlation_id".to_string(), correlation_id.to_string());
        let details = ErrorDetails::with_error_info(self.reason().as_str(), ERROR_DOMAIN, info);
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
    /// The next id of this process.
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

    /// The 16 hex digits.
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
        assert_eq!(info.reason, Reason::Internal.as_str());
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
    fn store_unavailable_is_retryable_and_hides_its_detail() {
        let s = Error::StoreUnavailable {
            detail: "store: connection refused postgres://u:pw@db".into(),
        }
        .into_status("c");
        assert_eq!(s.code(), Code::Unavailable);
        assert!(!s.message().contains("pw@db"));
        let info = s.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "STORE_UNAVAILABLE");
    }

    #[test]
    fn bad_ciphertext_is_invalid_argument() {
        let s = Error::bad_ciphertext(Reason::DecryptionFailed, "x").into_status("c");
        assert_eq!(s.code(), Code::InvalidArgument);
    }
}
