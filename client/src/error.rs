//! Typed errors: what a call or a connection attempt reports, with piiguard's stable reason.

use std::fmt;

use tonic::Code;
use tonic_types::StatusExt as _;

use crate::config::ConfigError;

/// piiguard's stable reasons (`google.rpc.ErrorInfo.reason`, the README's errors table and
/// docs/OPERATIONS.md). A reason this version of the crate does not know is kept as
/// [`Reason::Other`], so a newer server never breaks an older client.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[allow(missing_docs)] // each variant is its wire string, documented in docs/OPERATIONS.md
pub enum Reason {
    InvalidRequest,
    UnknownKeyspace,
    PayloadTooLarge,
    BatchTooLarge,
    MalformedCiphertext,
    UnsupportedCiphertextVersion,
    KeyspaceMismatch,
    DecryptionFailed,
    UnknownKey,
    Unauthenticated,
    ClientCertificateRejected,
    KeyUsageExhausted,
    VaultUnavailable,
    VaultOverloaded,
    SubjectShredded,
    SubjectShredScheduled,
    ShredNotScheduled,
    UnknownToken,
    UnknownSubject,
    TokenExpired,
    MalformedToken,
    UnsupportedFormat,
    TokenSpaceExhausted,
    Internal,
    PolicyDenied,
    RateLimited,
    VolumeBudgetExceeded,
    LockedOut,
    AuditUnavailable,
    MalformedMessage,
    StoreUnavailable,
    ValueNotNormalisable,
    MaskedRevealOnly,
    MalformedEnvelope,
    UnknownSealingKeyVersion,
    KeyNotProvisioned,
    KekVersionInUse,
    /// A reason this crate does not know (a newer server).
    Other(String),
}

/// Every known reason with its wire string.
const KNOWN: &[(Reason, &str)] = &[
    (Reason::InvalidRequest, "INVALID_REQUEST"),
    (Reason::UnknownKeyspace, "UNKNOWN_KEYSPACE"),
    (Reason::PayloadTooLarge, "PAYLOAD_TOO_LARGE"),
    (Reason::BatchTooLarge, "BATCH_TOO_LARGE"),
    (Reason::MalformedCiphertext, "MALFORMED_CIPHERTEXT"),
    (
        Reason::UnsupportedCiphertextVersion,
        "UNSUPPORTED_CIPHERTEXT_VERSION",
    ),
    (Reason::KeyspaceMismatch, "KEYSPACE_MISMATCH"),
    (Reason::DecryptionFailed, "DECRYPTION_FAILED"),
    (Reason::UnknownKey, "UNKNOWN_KEY"),
    (Reason::Unauthenticated, "UNAUTHENTICATED"),
    (
        Reason::ClientCertificateRejected,
        "CLIENT_CERTIFICATE_REJECTED",
    ),
    (Reason::KeyUsageExhausted, "KEY_USAGE_EXHAUSTED"),
    (Reason::VaultUnavailable, "VAULT_UNAVAILABLE"),
    (Reason::VaultOverloaded, "VAULT_OVERLOADED"),
    (Reason::SubjectShredded, "SUBJECT_SHREDDED"),
    (Reason::SubjectShredScheduled, "SUBJECT_SHRED_SCHEDULED"),
    (Reason::ShredNotScheduled, "SHRED_NOT_SCHEDULED"),
    (Reason::UnknownToken, "UNKNOWN_TOKEN"),
    (Reason::UnknownSubject, "UNKNOWN_SUBJECT"),
    (Reason::TokenExpired, "TOKEN_EXPIRED"),
    (Reason::MalformedToken, "MALFORMED_TOKEN"),
    (Reason::UnsupportedFormat, "UNSUPPORTED_FORMAT"),
    (Reason::TokenSpaceExhausted, "TOKEN_SPACE_EXHAUSTED"),
    (Reason::Internal, "INTERNAL"),
    (Reason::PolicyDenied, "POLICY_DENIED"),
    (Reason::RateLimited, "RATE_LIMITED"),
    (Reason::VolumeBudgetExceeded, "VOLUME_BUDGET_EXCEEDED"),
    (Reason::LockedOut, "LOCKED_OUT"),
    (Reason::AuditUnavailable, "AUDIT_UNAVAILABLE"),
    (Reason::MalformedMessage, "MALFORMED_MESSAGE"),
    (Reason::StoreUnavailable, "STORE_UNAVAILABLE"),
    (Reason::ValueNotNormalisable, "VALUE_NOT_NORMALISABLE"),
    (Reason::MaskedRevealOnly, "MASKED_REVEAL_ONLY"),
    (Reason::MalformedEnvelope, "MALFORMED_ENVELOPE"),
    (
        Reason::UnknownSealingKeyVersion,
        "UNKNOWN_SEALING_KEY_VERSION",
    ),
    (Reason::KeyNotProvisioned, "KEY_NOT_PROVISIONED"),
    (Reason::KekVersionInUse, "KEK_VERSION_IN_USE"),
];

impl Reason {
    /// The reason of a wire string (never fails: unknown strings are [`Reason::Other`]).
    pub fn parse(s: &str) -> Self {
        KNOWN
            .iter()
            .find(|(_, w)| *w == s)
            .map(|(r, _)| r.clone())
            .unwrap_or_else(|| Reason::Other(s.to_string()))
    }

    /// The wire string.
    pub fn as_str(&self) -> &str {
        match self {
            Reason::Other(s) => s,
            known => KNOWN
                .iter()
                .find(|(r, _)| r == known)
                .map(|(_, w)| *w)
                .unwrap_or("UNKNOWN"),
        }
    }

    /// Every reason this crate knows (not [`Reason::Other`]).
    pub fn known() -> impl Iterator<Item = &'static Reason> {
        KNOWN.iter().map(|(r, _)| r)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a retry can fix a failed call (README, "Calling piiguard from your service"):
/// `UNAVAILABLE` whatever the reason (Vault, store or audit log down, a replica stopping, a
/// dropped connection), `RESOURCE_EXHAUSTED` `RATE_LIMITED` and `RESOURCE_EXHAUSTED`
/// `VAULT_OVERLOADED` (every place for a Vault request was taken: back off). Everything else
/// is final,
/// `RESOURCE_EXHAUSTED` `LOCKED_OUT` / `VOLUME_BUDGET_EXCEEDED` / `KEY_USAGE_EXHAUSTED`
/// included (an alarm was raised or an operator must act), and so is `DEADLINE_EXCEEDED`
/// (the call's deadline is spent).
pub fn is_retryable(code: Code, reason: Option<&Reason>) -> bool {
    match code {
        Code::Unavailable => true,
        Code::ResourceExhausted => {
            matches!(reason, Some(Reason::RateLimited | Reason::VaultOverloaded))
        }
        _ => false,
    }
}

/// Whether a failure proves that the server did nothing: a rate limit is decided by the
/// per-call guard before any work. A non-idempotent call is retried only then.
pub(crate) fn refused_before_work(code: Code, reason: Option<&Reason>) -> bool {
    code == Code::ResourceExhausted && reason == Some(&Reason::RateLimited)
}

/// What to check for a connection failure this crate recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectHint {
    /// The server sent a TLS alert: it refused the client certificate.
    ClientCertificateRefused,
    /// The server certificate is not issued by the configured CA.
    UnknownCa,
    /// The server certificate does not carry the configured server name.
    WrongServerName,
    /// The server certificate has expired or is not yet valid.
    ServerCertificateExpired,
    /// Nothing listens at the endpoint.
    NotListening,
}

impl ConnectHint {
    /// The hint for a failure's text (its chain of causes), if it is one we recognise.
    pub fn for_detail(detail: &str) -> Option<Self> {
        if detail.contains("received fatal alert") {
            Some(ConnectHint::ClientCertificateRefused)
        } else if detail.contains("UnknownIssuer") || detail.contains("BadSignature") {
            Some(ConnectHint::UnknownCa)
        } else if detail.contains("NotValidForName") {
            Some(ConnectHint::WrongServerName)
        } else if detail.contains("Expired") || detail.contains("NotValidYet") {
            Some(ConnectHint::ServerCertificateExpired)
        } else if detail.contains("Connection refused") {
            Some(ConnectHint::NotListening)
        } else {
            None
        }
    }
}

impl fmt::Display for ConnectHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectHint::ClientCertificateRefused => "the server refused the client certificate",
            ConnectHint::UnknownCa => "the server certificate is not issued by the configured CA",
            ConnectHint::WrongServerName => {
                "the server certificate does not carry the configured server name"
            }
            ConnectHint::ServerCertificateExpired => {
                "the server certificate has expired or is not yet valid"
            }
            ConnectHint::NotListening => "is piiguard listening there?",
        })
    }
}

/// Why a call or a connection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot be used (a file cannot be read, a bad endpoint, bad PEM).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TCP connection or the TLS handshake failed.
    #[error("cannot connect to {endpoint}: {detail}{}", hint.map(|h| format!(" ({h})")).unwrap_or_default())]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The chain of causes, outermost first (never key material).
        detail: String,
        /// What to check, for the failures this crate recognises.
        hint: Option<ConnectHint>,
    },
    /// The server (or the transport) answered a call with an error, for good: either the
    /// error is final, or the retries ran out.
    #[error("{method}: {code:?} {}: {message} (correlation_id {}, {attempts} attempt(s))",
        reason.as_ref().map(Reason::as_str).unwrap_or("-"),
        correlation_id.as_deref().unwrap_or("-"))]
    Rpc {
        /// The RPC (`Crypto/Decrypt`).
        method: &'static str,
        /// The gRPC status code.
        code: Code,
        /// The stable reason from the `ErrorInfo` detail (none for a transport error).
        reason: Option<Reason>,
        /// The server's message, for people (never match on it).
        message: String,
        /// The server's correlation id: names its log line and audit record.
        correlation_id: Option<String>,
        /// Whether a retry could help ([`is_retryable`]); true after retries ran out.
        retryable: bool,
        /// Attempts made.
        attempts: u32,
    },
    /// A batch answered with fewer or more results than items sent.
    #[error("{method}: the server answered {answered} of {sent} items")]
    BatchMismatch {
        /// The RPC.
        method: &'static str,
        /// Items sent.
        sent: usize,
        /// Results received.
        answered: usize,
    },
}

impl Error {
    /// The error of a failed attempt of `method`.
    pub fn from_status(method: &'static str, status: &tonic::Status, attempts: u32) -> Self {
        let info = status.get_error_details().error_info().cloned();
        let reason = info.as_ref().map(|i| Reason::parse(&i.reason));
        let correlation_id = info
            .as_ref()
            .and_then(|i| i.metadata.get("correlation_id").cloned())
            .or_else(|| {
                status
                    .metadata()
                    .get("x-correlation-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            });
        Error::Rpc {
            method,
            code: status.code(),
            retryable: is_retryable(status.code(), reason.as_ref()),
            reason,
            message: status.message().to_string(),
            correlation_id,
            attempts,
        }
    }

    /// The stable reason of an [`Error::Rpc`].
    pub fn reason(&self) -> Option<&Reason> {
        match self {
            Error::Rpc { reason, .. } => reason.as_ref(),
            _ => None,
        }
    }

    /// The gRPC code of an [`Error::Rpc`].
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Attempts made by an [`Error::Rpc`] (1 without retries).
    pub fn attempts(&self) -> u32 {
        match self {
            Error::Rpc { attempts, .. } => *attempts,
            _ => 0,
        }
    }

    /// Whether a retry could help (connection failures count as retryable).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Rpc { retryable, .. } => *retryable,
            Error::Connect { .. } => true,
            _ => false,
        }
    }

    /// A connection failure of `endpoint`.
    pub fn connect(endpoint: &str, e: &dyn std::error::Error) -> Self {
        let detail = causes(e);
        Error::Connect {
            endpoint: endpoint.to_string(),
            hint: ConnectHint::for_detail(&detail),
            detail,
        }
    }
}

/// An error and its causes as one line, without repeating a cause its parent already quotes.
pub(crate) fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let m = c.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        next = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tonic_types::ErrorDetails;

    use super::*;

    fn status(code: Code, reason: &str) -> tonic::Status {
        let mut md = HashMap::new();
        md.insert("correlation_id".to_string(), "00ff".to_string());
        tonic::Status::with_error_details(
            code,
            "m",
            ErrorDetails::with_error_info(reason, "piiguard.dev", md),
        )
    }

    #[test]
    fn reasons_round_trip_and_unknown_ones_are_kept() {
        for r in Reason::known() {
            assert_eq!(&Reason::parse(r.as_str()), r);
        }
        assert_eq!(Reason::parse("NEW_ONE"), Reason::Other("NEW_ONE".into()));
        assert_eq!(Reason::parse("NEW_ONE").as_str(), "NEW_ONE");
    }

    #[test]
    fn the_reason_and_correlation_id_come_from_error_info() {
        let e = Error::from_status(
            "Crypto/Decrypt",
            &status(Code::InvalidArgument, "DECRYPTION_FAILED"),
            1,
        );
        assert_eq!(e.reason(), Some(&Reason::DecryptionFailed));
        assert!(!e.is_retryable());
        match &e {
            Error::Rpc { correlation_id, .. } => {
                assert_eq!(correlation_id.as_deref(), Some("00ff"))
            }
            _ => unreachable!(),
        }
        let m = e.to_string();
        assert!(m.contains("DECRYPTION_FAILED") && m.contains("00ff"), "{m}");
    }

    #[test]
    fn the_retryable_set_is_the_readmes() {
        let yes = [
            (Code::Unavailable, Some(Reason::VaultUnavailable)),
            (Code::Unavailable, Some(Reason::StoreUnavailable)),
            (Code::Unavailable, Some(Reason::AuditUnavailable)),
            (Code::Unavailable, None),
            (Code::ResourceExhausted, Some(Reason::RateLimited)),
            (Code::ResourceExhausted, Some(Reason::VaultOverloaded)),
        ];
        for (c, r) in &yes {
            assert!(is_retryable(*c, r.as_ref()), "{c:?} {r:?}");
        }
        let no = [
            (Code::ResourceExhausted, Some(Reason::LockedOut)),
            (Code::ResourceExhausted, Some(Reason::VolumeBudgetExceeded)),
            (Code::ResourceExhausted, Some(Reason::KeyUsageExhausted)),
            (Code::ResourceExhausted, None),
            (Code::InvalidArgument, Some(Reason::DecryptionFailed)),
            (Code::PermissionDenied, Some(Reason::PolicyDenied)),
            (Code::FailedPrecondition, Some(Reason::SubjectShredded)),
            (Code::DeadlineExceeded, None),
            (Code::Internal, Some(Reason::Internal)),
            (Code::Unauthenticated, Some(Reason::Unauthenticated)),
        ];
        for (c, r) in &no {
            assert!(!is_retryable(*c, r.as_ref()), "{c:?} {r:?}");
        }
    }

    #[test]
    fn known_handshake_failures_get_a_hint() {
        assert_eq!(
            ConnectHint::for_detail("invalid peer certificate: UnknownIssuer"),
            Some(ConnectHint::UnknownCa)
        );
        assert_eq!(
            ConnectHint::for_detail("invalid peer certificate: NotValidForName"),
            Some(ConnectHint::WrongServerName)
        );
        assert_eq!(
            ConnectHint::for_detail("received fatal alert: CertificateExpired"),
            Some(ConnectHint::ClientCertificateRefused)
        );
        assert_eq!(ConnectHint::for_detail("something else"), None);
    }
}
