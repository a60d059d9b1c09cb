//! Setting piiguard up: `piiguard dev` (local OpenBao, dev PKI, bootstrap, serve), `bootstrap`
//! (Vault mounts, keys, least-privilege policy, AppRole) and the dev PKI.
//!
//! The top layer, beside `cli`: may use every module below it, including `app`.

pub mod bootstrap;
pub mod dev;
pub mod pki;
