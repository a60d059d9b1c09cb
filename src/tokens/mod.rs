//! Tokenisation: tokens that stand for PII and die with their subject (docs/TOKENS.md).
//!
//! `format`, `derive` and `ff1` are pure (no I/O); `engine` ties them to the keys (Vault,
//! DEK cache) and the token tables of the store, whose writes `writer` group-commits.
//!
//! **Architecture Invariant:** the value behind every token exists only sealed under the
//! subject's DEK; tokens are stored only as keyed hashes.

pub mod derive;
pub mod engine;
pub mod ff1;
pub mod format;
pub mod writer;

pub use engine::{Detokenized, TokenEngine, TokenizeInput, Tokenized};
pub use format::{Format, Mode};
