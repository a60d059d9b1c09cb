//! Decrypt: one ciphertext, whose header names its keyspace and key; authorised after the header
//! is parsed.

use std::collections::HashMap;

use zeroize::Zeroizing;

use super::{Engine, envelope_error, observed};
use crate::access::guard::Guard;
use crate::access::policy::Op;
use crate::crypto::envelope;
use crate::domain::names::{Field, parse_context};
use crate::error::{Error, Reason, Result};

/// One decryption request.
pub struct DecryptInput<'a> {
    /// If not empty, the ciphertext must belong to this keyspace.
    pub keyspace: &'a str,
    /// Field name, bound into the ciphertext.
    pub field: &'a str,
    /// The ciphertext, binary or text form.
    pub ciphertext: &'a [u8],
    /// Caller context, bound into the ciphertext.
    pub context: &'a HashMap<String, String>,
}

impl Engine {
    pub(super) fn check_decrypt<'b>(
        &self,
        i: &DecryptInput<'_>,
        parsed: &envelope::Parsed<'b>,
    ) -> Result<()> {
        Field::parse(i.field)?;
        if !i.keyspace.is_empty() && i.keyspace != parsed.header.keyspace {
            return Err(Error::bad_ciphertext(
                Reason::KeyspaceMismatch,
                "the ciphertext belongs to another keyspace",
            ));
        }
        if !self.keys.has_keyspace(parsed.header.keyspace) {
            return Err(Error::bad_ciphertext(
                Reason::UnknownKeyspace,
                "the ciphertext names a keyspace this server does not have",
            ));
        }
        Ok(())
    }

    /// Decrypts one ciphertext.
    pub async fn decrypt(&self, g: &mut Guard, i: &DecryptInput<'_>) -> Result<Zeroizing<Vec<u8>>> {
        let mut scratch = Vec::new();
        let parsed = envelope::parse(i.ciphertext, &mut scratch).map_err(envelope_error)?;
        self.check_decrypt(i, &parsed)?;
        let ctx = parse_context(i.context)?;
        let h = &parsed.header;
        g.authorize(Op::Decrypt, Some(h.keyspace), Some(i.field))?;
        g.reveal(1)?;
        g.note_key(h.keyspace, &h.key_id);
        let key = self
            .keys
            .key_by_id(h.keyspace, h.key_id, h.dek_version, h.alg);
        let key = observed(key).await?;
        if key.keys.algorithm() != h.alg {
            return Err(envelope_error(envelope::EnvelopeError::Authentication));
        }
        parsed
            .open_prepared(&key.prepared().map_err(envelope_error)?, i.field, &ctx)
            .map_err(envelope_error)
    }
}
