//! The protobuf codec of every generated service and client (`build.rs` names it): prost,
//! except that a message that does not decode (not protobuf, a string that is not UTF-8, nesting
//! past prost's depth limit, a wrong wire type) is `INVALID_ARGUMENT` with the stable reason
//! `MALFORMED_MESSAGE` and an `ErrorInfo`, instead of tonic's `INTERNAL`: the caller sent bad
//! bytes, the server is fine, and an `INTERNAL` would page an operator for a client's bug.
//! The generated clients (the CLI, the load generator) share it, so a response that does not
//! decode is reported to them the same way.
//!
//! Layer 0 beside `pb`: uses only `error`.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

use crate::error::{CorrelationId, Error, Reason};

/// prost encoding; decode errors as `INVALID_ARGUMENT` / `MALFORMED_MESSAGE`.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder(PhantomData)
    }
}

/// Decodes `U`; a decode failure is the caller's bad input (see the module documentation).
#[derive(Debug, Clone)]
pub struct MessageDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for MessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(malformed)
    }
}

/// prost's description names the message, the field path and what is wrong (never the bytes).
fn malformed(e: prost::DecodeError) -> Status {
    let id = CorrelationId::new();
    tracing::debug!(correlation_id = %id, error = %e, "message does not decode");
    Error::InvalidArgument {
        reason: Reason::MalformedMessage,
        message: format!("the message does not decode: {e}"),
    }
    .into_status(id.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_that_does_not_decode_is_invalid_argument_with_a_reason() {
        // Field 1 as a string holding bytes that are not UTF-8.
        let bad = prost::Message::decode(&[0x0a, 0x02, 0xff, 0xfe][..])
            .map(|_: crate::pb::EncryptRequest| ())
            .unwrap_err();
        let s = malformed(bad);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().contains("UTF-8"), "{}", s.message());
        let info = tonic_types::StatusExt::get_error_details(&s)
            .error_info()
            .cloned()
            .unwrap();
        assert_eq!(info.reason, "MALFORMED_MESSAGE");
    }
}
