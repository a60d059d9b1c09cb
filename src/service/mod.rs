//! tonic service implementations: protobuf in, domain call, protobuf out.
//!
//! **Architecture Invariant:** only this module (and `pb`) sees protobuf types; errors become
//! statuses only through [`crate::error::Error::into_status`].

pub mod admin;
pub mod crypto;
pub mod erasure;
pub mod tokens;

use tonic::Request;

use crate::error::Error;
use crate::tls::{Caller, ConnInfo};

/// The verified caller of a request (put there by the TLS accept loop).
pub fn caller<T>(req: &Request<T>) -> Result<Caller, Error> {
    req.extensions()
        .get::<ConnInfo>()
        .map(|c| c.caller.clone())
        .ok_or(Error::Unauthenticated)
}

/// The per-item error of a batch or stream: the same code and reason a unary call would return.
pub fn item_error(e: &Error) -> crate::pb::ItemError {
    crate::pb::ItemError {
        code: e.code() as i32,
        reason: e.reason().to_string(),
        message: e.public_message(),
    }
}
