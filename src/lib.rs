//! piiguard: field-level encryption of PII with keys in Vault/OpenBao, served over mutual TLS.
//!
//! The crate is layered; a module may use the modules of its own layer and of the layers below,
//! never one above (checked by `tests/it/architecture.rs`). From the bottom up:
//!
//! | layer | modules | what lives there |
//! |---|---|---|
//! | 0 | [`domain`], [`error`], [`codec`], [`secret`], [`pb`] | names, identities, time; errors and their one gRPC mapping; the protobuf codec (bad bytes are `INVALID_ARGUMENT`); key material (`Dek`) and its public twin (`WrappedDek`); generated protobuf |
//! | 1 | [`crypto`] | pure byte transformations: envelope, AEAD seam, token formats, signatures |
//! | 2 | [`config`] | raw (file + environment) configuration, validated into typed sections |
//! | 3 | [`metrics`] | metric names and handles |
//! | 4 | [`vault`], [`store`], [`tls`], [`audit`] | adapters: Vault/OpenBao, the SQL store, rustls, the audit chain |
//! | 5 | [`keys`] | the DEK cache and the key manager |
//! | 6 | [`access`] | policy, limits, lockouts, canaries, alarms, the per-call guard |
//! | 7 | [`ops`] | the operations, one file each, independent of gRPC |
//! | 8 | [`service`] | tonic services: protobuf in, an operation, protobuf out |
//! | 9 | [`app`] | start-up order, listeners, reload, drain |
//! | 10 | [`cli`], [`setup`] | client commands over one mTLS client; dev, bootstrap, dev PKI |
//!
//! See docs/ARCHITECTURE.md for the map of this crate.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod domain;
pub mod error;
pub mod secret;

pub mod crypto;

pub mod config;

pub mod metrics;

pub mod audit;
pub mod store;
pub mod tls;
pub mod vault;

pub mod keys;

pub mod access;

pub mod ops;

pub mod service;

pub mod app;

pub mod cli;
pub mod setup;

/// Generated gRPC code of `piiguard.v1` (services and clients with [`codec::Codec`]), and its
/// message types re-exported from `piiguard_client::pb`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    // Messages and enums: the client crate's (build.rs `extern_path`), one set of types for the
    // server and its callers; the generated services and clients below shadow nothing of it.
    pub use piiguard_client::pb::*;

    tonic::include_proto!("piiguard.v1");

    /// Encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("piiguard_descriptor");
}
