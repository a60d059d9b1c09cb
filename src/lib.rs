//! piiguard: field-level encryption of PII with keys in Vault/OpenBao, served over mutual TLS.
//!
//! See docs/ARCHITECTURE.md for the map of this crate.

#![forbid(unsafe_code)]

pub mod admin_cli;
pub mod alarms;
pub mod audit;
pub mod authz;
pub mod bootstrap;
pub mod canary;
pub mod certs;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod erasure;
pub mod error;
pub mod guard;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod server;
pub mod service;
pub mod signing;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod vault;

/// Generated protobuf and gRPC code of `piiguard.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("piiguard.v1");

    /// Encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("piiguard_descriptor");
}
