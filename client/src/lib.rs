//! Rust client of piiguard: one mutual-TLS channel, a deadline on every call, retries of the
//! retryable reasons only (exponential backoff, full jitter), typed errors with piiguard's
//! stable reasons, and typed helpers for the common calls.
//!
//! ```no_run
//! # async fn demo() -> Result<(), piiguard_client::Error> {
//! use piiguard_client::{Client, ClientConfig};
//! let client = Client::connect(ClientConfig::from_files(
//!     "127.0.0.1:7443",
//!     "certs/dev/ca.pem",
//!     "certs/dev/client-orders.pem",
//!     "certs/dev/client-orders.key",
//! ))
//! .await?;
//! let ct = client.encrypt("orders", "customer-1", "email", b"alice@example.com").await?;
//! let pt = client.decrypt("email", &ct).await?;
//! assert_eq!(&pt[..], b"alice@example.com");
//! # Ok(()) }
//! ```
//!
//! - [`ClientConfig`]: endpoint, mTLS from PEM files or a SPIFFE-style bundle folder, server
//!   name, connect timeout, default deadline, [`RetryPolicy`].
//! - [`Client`]: cheap to clone (one shared [`tonic::transport::Channel`]); typed helpers, and
//!   the generated clients for everything else ([`Client::crypto`], [`Client::tokens`], ...).
//! - [`Error`]: [`Error::Rpc`] carries the gRPC code, the stable [`Reason`], the correlation id
//!   and whether a retry could help; match on the reason, never on the message.
//! - [`pb`]: the message types of `proto/piiguard/v1`; the server uses the same types. Messages
//!   that carry plaintext, values, tokens or raw subject ids do not implement `Debug`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod batch;
mod client;
mod config;
mod error;
mod retry;

pub use batch::{Chunks, chunks};
pub use client::Client;
pub use config::{BUNDLE_CA, BUNDLE_CERT, BUNDLE_KEY, ClientConfig, ConfigError, TlsSource};
pub use error::{ConnectHint, Error, Reason, is_retryable};
pub use retry::{Idempotency, RetryPolicy};

/// Generated protobuf messages of `piiguard.v1` and gRPC client stubs (prost's codec).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("piiguard.v1");
}

#[cfg(test)]
mod tests {
    use std::marker::PhantomData;

    use super::pb;

    /// Autoref specialisation: `has_debug` is `HasDebug`'s when `T: Debug`, else `NoDebug`'s.
    struct Probe<T>(PhantomData<T>);
    trait HasDebug {
        fn has_debug(&self) -> bool {
            true
        }
    }
    impl<T: std::fmt::Debug> HasDebug for Probe<T> {}
    trait NoDebug {
        fn has_debug(&self) -> bool {
            false
        }
    }
    impl<T> NoDebug for &Probe<T> {}
    macro_rules! has_debug {
        ($t:ty) => {
            (&Probe::<$t>(PhantomData)).has_debug()
        };
    }

    #[test]
    fn messages_that_carry_pii_have_no_debug() {
        // A control: a response that carries only a ciphertext may be printed.
        assert!(has_debug!(pb::EncryptResponse));
        assert!(has_debug!(pb::ShredResponse));
        let no_debug = [
            has_debug!(pb::EncryptRequest),
            has_debug!(pb::EncryptBatchRequest),
            has_debug!(pb::DecryptResponse),
            has_debug!(pb::DecryptResult),
            has_debug!(pb::DecryptBatchResponse),
            has_debug!(pb::CreateCanaryRequest),
            has_debug!(pb::TokenizeRequest),
            has_debug!(pb::TokenizeResponse),
            has_debug!(pb::TokenizeResult),
            has_debug!(pb::TokenizeBatchRequest),
            has_debug!(pb::TokenizeBatchResponse),
            has_debug!(pb::DetokenizeRequest),
            has_debug!(pb::DetokenizeResponse),
            has_debug!(pb::DetokenizeResult),
            has_debug!(pb::DetokenizeBatchRequest),
            has_debug!(pb::DetokenizeBatchResponse),
            has_debug!(pb::ShredRequest),
            has_debug!(pb::GetShredStatusRequest),
            has_debug!(pb::CancelShredRequest),
            has_debug!(pb::SetRetentionRequest),
            has_debug!(pb::UnsealRequest),
            has_debug!(pb::UnsealResponse),
            has_debug!(pb::UnsealResult),
            has_debug!(pb::UnsealBatchRequest),
            has_debug!(pb::UnsealBatchResponse),
            has_debug!(pb::BlindIndexRequest),
            has_debug!(pb::BlindIndexBatchRequest),
            has_debug!(pb::RotateSubjectKeyRequest),
        ];
        for (i, d) in no_debug.iter().enumerate() {
            assert!(
                !d,
                "message {i} of the list derives Debug: see client/build.rs skip_debug"
            );
        }
    }
}
