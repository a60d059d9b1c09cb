//! tonic service implementations: protobuf in, domain call, protobuf out.
//!
//! **Architecture Invariant:** only this module (and `pb`) sees protobuf types; errors become
//! statuses only through [`crate::error::Error::into_status`].

pub mod admin;
pub mod crypto;
pub mod erasure;
pub mod keys;
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

#[cfg(test)]
mod tests {
    use crate::pb;

    /// Autoref probe: `Probe(x).has_debug()` resolves to the inherent method when the type is
    /// `Debug` and to the trait's fallback otherwise (checked at compile time of the test).
    struct Probe<T>(T);
    trait NoDebug {
        fn has_debug(&self) -> bool {
            false
        }
    }
    impl<T> NoDebug for Probe<T> {}
    impl<T: std::fmt::Debug> Probe<T> {
        fn has_debug(&self) -> bool {
            true
        }
    }

    #[test]
    fn messages_with_plaintext_or_raw_subject_ids_have_no_debug() {
        // Raw subject ids are personal data (security review finding 15).
        assert!(!Probe(pb::ShredRequest::default()).has_debug());
        assert!(!Probe(pb::GetShredStatusRequest::default()).has_debug());
        assert!(!Probe(pb::CancelShredRequest::default()).has_debug());
        assert!(!Probe(pb::SetRetentionRequest::default()).has_debug());
        assert!(!Probe(pb::EncryptRequest::default()).has_debug());
        assert!(!Probe(pb::TokenizeRequest::default()).has_debug());
        assert!(!Probe(pb::DecryptResponse::default()).has_debug());
        // The probe does see Debug where it is derived.
        assert!(Probe(pb::ShredResponse::default()).has_debug());
    }
}
