//! tonic service implementations: protobuf in, domain call, protobuf out.
//!
//! **Architecture Invariant:** only this module (and `pb`) sees protobuf types; errors become
//! statuses only through [`crate::error::Error::into_status`].

pub mod admin;
pub mod crypto;
pub mod erasure;
pub mod tokens;

use crate::error::Error;

/// The per-item error of a batch or stream: the same code and reason a unary call would return.
pub fn item_error(e: &Error) -> crate::pb::ItemError {
    crate::pb::ItemError {
        code: e.code() as i32,
        reason: e.reason().to_string(),
        message: e.public_message(),
    }
}
