//! Domain types at the bottom of the crate: the names of keyspaces, fields and subjects and
//! their rules, and time formatting. Everything else may use this; it uses nothing of the crate
//! but `error`.

pub mod identity;
pub mod names;
pub mod time;
