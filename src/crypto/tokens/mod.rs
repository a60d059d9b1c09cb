//! Token formats, pure (no I/O): opaque, digits, email and FF1 tokens, and the keyed derivation
//! of deterministic tokens (docs/TOKENS.md). `ops::tokens` ties them to the keys and the store.
//!
//! **Architecture Invariant:** the value behind every token exists only sealed under the
//! subject's DEK; tokens are stored only as keyed hashes, or (random opaque tokens) as the
//! locator they encrypt under a keyspace key (`locator`).

pub mod derive;
pub mod ff1;
pub mod format;
pub mod locator;

pub use format::{Format, Mode};
