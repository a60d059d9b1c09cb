//! Encrypt: one field of one subject, sealed under the subject's DEK (created on first use).

use std::collections::HashMap;

use super::{Engine, observed, seal_item};
use crate::access::guard::Guard;
use crate::access::policy::Op;
use crate::domain::names::{Field, SubjectId, parse_context};
use crate::error::{Error, Reason, Result};
use crate::keys::manager::truncate_for_message;

/// One encryption request.
pub struct EncryptInput<'a> {
    /// Keyspace name as configured.
    pub keyspace: &'a str,
    /// The raw subject id (hashed before use, never stored or logged).
    pub subject: &'a str,
    /// Field name, bound into the ciphertext.
    pub field: &'a str,
    /// The value to seal.
    pub plaintext: &'a [u8],
    /// Caller context, bound into the ciphertext.
    pub context: &'a HashMap<String, String>,
    /// Return the text form (`pg1.…`) instead of binary.
    pub text: bool,
}

impl Engine {
    pub(super) fn check_encrypt(&self, i: &EncryptInput<'_>) -> Result<()> {
        if !self.keys.has_keyspace(i.keyspace) {
            return Err(Error::invalid(
                Reason::UnknownKeyspace,
                format!("unknown keyspace {:?}", truncate_for_message(i.keyspace)),
            ));
        }
        SubjectId::parse(i.subject)?;
        Field::parse(i.field)?;
        if i.plaintext.len() > self.max_plaintext {
            return Err(Error::invalid(
                Reason::PayloadTooLarge,
                format!(
                    "plaintext is {} bytes; the maximum is {}",
                    i.plaintext.len(),
                    self.max_plaintext
                ),
            ));
        }
        Ok(())
    }

    /// Encrypts one field.
    pub async fn encrypt(&self, g: &mut Guard, i: &EncryptInput<'_>) -> Result<Vec<u8>> {
        self.check_encrypt(i)?;
        let ctx = parse_context(i.context)?;
        g.authorize(Op::Encrypt, Some(i.keyspace), Some(i.field))?;
        let sref = self.keys.subject_ref(i.keyspace, i.subject)?;
        g.note_subject(i.keyspace, &sref);
        let key = observed(self.keys.key_for_subject_ref(i.keyspace, &sref)).await?;
        let key = self.keys.ensure_uses(key, 1).await?;
        g.note_key(i.keyspace, &key.id.key_id);
        seal_item(&key, None, i, &ctx)
    }

    /// Encrypts on piiguard's own behalf (canary records made by an admin call), outside any
    /// caller's grants; returns the ciphertext and the subject's key id.
    pub async fn encrypt_internal(
        &self,
        i: &EncryptInput<'_>,
    ) -> Result<(Vec<u8>, crate::crypto::envelope::KeyId)> {
        self.check_encrypt(i)?;
        let ctx = parse_context(i.context)?;
        let key = self.keys.key_for_subject(i.keyspace, i.subject).await?;
        let key = self.keys.ensure_uses(key, 1).await?;
        Ok((seal_item(&key, None, i, &ctx)?, key.id.key_id))
    }
}
