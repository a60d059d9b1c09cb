//! Pure cryptography: no I/O, no Vault, no clocks.
//!
//! May use: `domain`, `error`. Nothing above.
//!
//! **Architecture Invariant:** nothing under `crypto/` performs I/O or knows about gRPC; it maps
//! bytes to bytes and returns typed errors.

pub mod aead;
pub mod blind_index;
pub mod envelope;
pub mod mask;
pub mod sealed;
pub mod signature;
pub mod tokens;
