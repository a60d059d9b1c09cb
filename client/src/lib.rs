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
