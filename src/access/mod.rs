//! Access control, tonic-free: the policy (who may do which operation on which keyspace and
//! field), call-rate limits and volume budgets, lockouts, canary subjects and tokens, alarms,
//! and the per-call [`guard::Guard`] that applies them all and writes the call's audit record.
//!
//! May use: `domain`, `error`, `crypto`, `config`, `metrics`, the adapters (`audit`, `vault`,
//! `store`, `tls`) and `keys`. Never `ops`, `service`, `app`, `cli`, `setup`.

pub mod alarms;
pub mod canary;
pub mod guard;
pub mod limits;
pub mod policy;
