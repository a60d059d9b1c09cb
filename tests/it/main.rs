//! The one integration test binary: real OpenBao (HTTPS, Raft), real PostgreSQL and real
//! `piiguard serve` processes over mutual TLS on 127.0.0.1, plus the architecture check.
//! Each suite is a module; `common` starts the parts they share.

mod common;

mod abuse;
mod alarms;
mod architecture;
mod audit;
mod cli;
mod client_crate;
mod cold_path;
mod crash_loop;
mod crypto_api;
mod erasure;
mod erasure_review;
mod eviction_review;
mod fuzz;
mod golden_vectors;
mod kek_rotation;
mod key_rotation;
mod known_answers;
mod lifecycle;
mod mtls;
mod policy;
mod properties;
mod reload;
mod review;
mod sealing;
mod search;
mod shred_stream;
mod signing;
mod store;
mod tokens;
mod vault;
mod vault_faults;
mod vault_ha;
mod vault_slow;
