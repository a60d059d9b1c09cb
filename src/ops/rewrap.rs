//! Rewrap: re-encrypts a ciphertext under its subject's current DEK version without returning
//! the plaintext (migrations after a subject key rotation). Inside the engine the ciphertext is
//! opened and sealed again; the plaintext only lives in a zeroized buffer between the two.
//!
//! Authorised by `rewrap` alone (which does not imply `decrypt`, and is not charged to the
//! caller's volume budget: nothing is revealed). Refused like Decrypt for bad input (a
//! ciphertext that does not open under its field and context is never re-sealed), and, like
//! Encrypt, counted against the new version's use limit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{DecryptInput, EncryptInput, Engine, envelope_error, observed, seal_item};
use crate::access::guard::Guard;
use crate::access::policy::Op;
use crate::crypto::envelope::{self, TEXT_PREFIX};
use crate::domain::names::parse_context;
use crate::error::Result;
use crate::keys::cache::DekEntry;

/// One rewrap request.
pub struct RewrapInput<'a> {
    /// If not empty, the ciphertext must belong to this keyspace.
    pub keyspace: &'a str,
    /// Field name the ciphertext was sealed with (the new one keeps it).
    pub field: &'a str,
    /// The ciphertext, binary or text form.
    pub ciphertext: &'a [u8],
    /// Caller context the ciphertext was sealed with (the new one keeps it).
    pub context: &'a HashMap<String, String>,
    /// `Some(true)`: return the text form; `None`: the form of the input.
    pub text: Option<bool>,
}

/// The result of one rewrap.
pub struct Rewrapped {
    /// The ciphertext under the subject's current DEK version (the input's bytes if it already
    /// was, and no other encoding was asked for).
    pub ciphertext: Vec<u8>,
    /// Whether the ciphertext was sealed again (false: it already used the current version).
    pub changed: bool,
}

impl Engine {
    /// Rewraps one ciphertext.
    pub async fn rewrap(&self, g: &mut Guard, i: &RewrapInput<'_>) -> Result<Rewrapped> {
        let mut scratch = Vec::new();
        let parsed = envelope::parse(i.ciphertext, &mut scratch).map_err(envelope_error)?;
        let as_decrypt = DecryptInput {
            keyspace: i.keyspace,
            field: i.field,
            ciphertext: i.ciphertext,
            context: i.context,
        };
        self.check_decrypt(&as_decrypt, &parsed)?;
        let ctx = parse_context(i.context)?;
        let h = &parsed.header;
        g.authorize(Op::Rewrap, Some(h.keyspace), Some(i.field))?;
        g.note_key(h.keyspace, &h.key_id);
        let old = observed(
            self.keys
                .key_by_id(h.keyspace, h.key_id, h.dek_version, h.alg),
        )
        .await?;
        let mut current = observed(self.keys.current_key_of(&old)).await?;
        if current.id != old.id {
            current = self.keys.ensure_uses(current, 1).await?;
        }
        g.note_key(&current.keyspace, &current.id.key_id);
        self.rewrap_with(&old, &current, parsed, i, &ctx)
    }

    /// Rewraps many ciphertexts; each gets its own result. Items of one key share the lookups
    /// through the cache (warm items make no Vault or store call).
    pub async fn rewrap_batch(
        &self,
        g: &mut Guard,
        items: &[RewrapInput<'_>],
    ) -> Result<Vec<Result<Rewrapped>>> {
        self.check_batch_len(items.len())?;
        g.set_items(items.len());
        let mut out = Vec::with_capacity(items.len());
        for i in items {
            let r = self.rewrap(g, i).await;
            g.item_result(&r);
            out.push(r);
        }
        Ok(out)
    }

    fn rewrap_with(
        &self,
        old: &Arc<DekEntry>,
        current: &Arc<DekEntry>,
        parsed: envelope::Parsed<'_>,
        i: &RewrapInput<'_>,
        ctx: &BTreeMap<&str, &str>,
    ) -> Result<Rewrapped> {
        let input_text = i.ciphertext.starts_with(TEXT_PREFIX.as_bytes());
        let text = i.text.unwrap_or(input_text);
        // Opened in every case: a ciphertext that does not authenticate is refused, never
        // passed back as "already current".
        let plaintext = parsed
            .open(&old.keys, i.field, ctx)
            .map_err(envelope_error)?;
        if old.id == current.id && old.keyspace == current.keyspace {
            drop(plaintext);
            let ciphertext = match (input_text, text) {
                (a, b) if a == b => i.ciphertext.to_vec(),
                (false, _) => envelope::to_text(i.ciphertext).into_bytes(),
                (true, _) => {
                    let mut scratch = Vec::new();
                    // Already parsed once: decoding cannot fail now.
                    envelope::parse(i.ciphertext, &mut scratch).map_err(envelope_error)?;
                    scratch
                }
            };
            return Ok(Rewrapped {
                ciphertext,
                changed: false,
            });
        }
        let enc = EncryptInput {
            keyspace: &current.keyspace,
            subject: "",
            field: i.field,
            plaintext: &plaintext,
            context: i.context,
            text,
        };
        let ciphertext = seal_item(current, None, &enc, ctx)?;
        Ok(Rewrapped {
            ciphertext,
            changed: true,
        })
    }
}
