//! Pure cryptography: no I/O, no Vault, no clocks.
//!
//! **Architecture Invariant:** nothing under `crypto/` performs I/O or knows about gRPC; it maps
//! bytes to bytes and returns typed errors.

pub mod aead;
pub mod envelope;
