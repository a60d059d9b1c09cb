//! Test harness, by what each part starts:
//!
//! | module | starts |
//! |---|---|
//! | [`bao`] | an OpenBao process per test (HTTPS, Raft storage), bootstrapped with `piiguard::setup::bootstrap`: [`TestEnv`] |
//! | [`postgres`] | a PostgreSQL server per test from Debian's binaries: [`Postgres`] |
//! | [`server`] | `piiguard serve` processes over mutual TLS on 127.0.0.1: [`Server`] |
//! | [`client`] | mTLS gRPC clients of those servers, and request builders |
//! | [`metrics`] | nothing: scrapes a server's `/metrics` ([`scrape`], [`metric`], [`by_label`]) |
//! | [`mixed_load`] | four callers of a sustained warm and cold load, for the Vault fault suites: [`MixedLoad`] |
//! | [`proxy`] | a loopback TCP proxy that makes Vault slow, stalled or lossy on demand: [`Proxy`] |
//!
//! Everything is re-exported here: a suite says `use crate::common::*;`.

mod bao;
mod client;
mod metrics;
mod mixed_load;
mod postgres;
mod proxy;
mod server;

pub use bao::*;
pub use client::*;
pub use metrics::*;
pub use mixed_load::*;
pub use postgres::*;
pub use proxy::*;
pub use server::*;
