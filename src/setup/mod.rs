//! Setting piiguard up: `piiguard dev` (local OpenBao, dev PKI, bootstrap, serve), `bootstrap`
//! (Vault mounts, keys, least-privilege policy, AppRole) and the dev PKI.
//!
//! The top layer, beside `cli`: may use every module below it, including `app`.

pub mod bootstrap;
pub mod dev;
pub mod pki;

/// Why a setup step (dev stack, dev PKI) failed: a message for the operator at the terminal,
/// naming the file, command or Vault call and what went wrong. Never holds a key or token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SetupError(pub String);

impl From<String> for SetupError {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<crate::app::StartError> for SetupError {
    fn from(e: crate::app::StartError) -> Self {
        Self(e.0)
    }
}

impl From<&str> for SetupError {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}
