//! Blind indexes (BlindIndex, BlindIndexBatch, Encrypt's `blind_index`) and masked reveals
//! (the mask of a decrypted or detokenised value). docs/SEARCH.md.
//!
//! An index needs the `index` operation on (keyspace, field), which does not imply `decrypt`:
//! a search service can look up rows without the right to read them. An index is a keyed hash
//! of the value, not of the subject: a shred leaves it valid in the caller's tables (the
//! certificate of destruction says so).

use zeroize::Zeroizing;

use super::{DecryptInput, EncryptInput, Engine};
use crate::access::guard::Guard;
use crate::access::policy::Op;
use crate::crypto::blind_index::{self, NormaliseOptions};
use crate::crypto::envelope;
use crate::crypto::mask;
use crate::domain::names::Field;
use crate::error::{Error, Reason, Result};
use crate::keys::manager::truncate_for_message;

/// One BlindIndex request.
pub struct BlindIndexInput<'a> {
    /// Keyspace name as configured.
    pub keyspace: &'a str,
    /// Field name: picks the field key, kind and index length.
    pub field: &'a str,
    /// The value (UTF-8), normalised for the field's kind before hashing.
    pub value: &'a [u8],
}

/// The index of a value under its field's queryable key versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlindIndexed {
    /// Under the current version: what new rows store.
    pub current: String,
    /// `(version, index)` under every queryable version, current first.
    pub all: Vec<(u32, String)>,
}

impl Engine {
    fn check_index(&self, keyspace: &str, field: &str, len: usize) -> Result<()> {
        if !self.keys.has_keyspace(keyspace) {
            return Err(Error::invalid(
                Reason::UnknownKeyspace,
                format!("unknown keyspace {:?}", truncate_for_message(keyspace)),
            ));
        }
        Field::parse(field)?;
        if len > self.max_plaintext {
            return Err(Error::invalid(
                Reason::PayloadTooLarge,
                format!(
                    "value is {len} bytes; the maximum is {}",
                    self.max_plaintext
                ),
            ));
        }
        Ok(())
    }

    /// The index of `value` (names already checked), under the current version only or under
    /// every queryable one.
    fn index_of(
        &self,
        keyspace: &str,
        field: &str,
        value: &[u8],
        all: bool,
    ) -> Result<BlindIndexed> {
        let cfg = self.index_keys.field(keyspace, field);
        let opts = NormaliseOptions {
            default_country_code: cfg.phone_country_code.as_deref(),
        };
        let normal =
            Zeroizing::new(blind_index::normalise(cfg.kind, value, opts).map_err(|e| {
                Error::invalid(
                    Reason::ValueNotNormalisable,
                    format!("field {field:?} ({}): {e}", cfg.kind.as_str()),
                )
            })?);
        let versions: Vec<u32> = if all {
            cfg.queryable_versions().collect()
        } else {
            vec![cfg.index_version]
        };
        let mut out = Vec::with_capacity(versions.len());
        for v in versions {
            let key = self.index_keys.key(keyspace, field, v)?;
            out.push((v, blind_index::index(&key, v, cfg.index_bits, &normal)));
        }
        Ok(BlindIndexed {
            current: out[0].1.clone(),
            all: out,
        })
    }

    /// The blind index of one value (needs `index` on the keyspace and field).
    pub fn blind_index(&self, g: &mut Guard, i: &BlindIndexInput<'_>) -> Result<BlindIndexed> {
        self.check_index(i.keyspace, i.field, i.value.len())?;
        g.authorize(Op::Index, Some(i.keyspace), Some(i.field))?;
        self.index_of(i.keyspace, i.field, i.value, true)
    }

    /// Many values, each with its own result.
    pub fn blind_index_batch(
        &self,
        g: &mut Guard,
        items: &[BlindIndexInput<'_>],
    ) -> Result<Vec<Result<BlindIndexed>>> {
        if items.len() > self.max_batch {
            return Err(Error::invalid(
                Reason::BatchTooLarge,
                format!(
                    "batch has {} items; the maximum is {}",
                    items.len(),
                    self.max_batch
                ),
            ));
        }
        g.set_items(items.len());
        Ok(items
            .iter()
            .map(|i| {
                let r = self.blind_index(g, i);
                g.item_result(&r);
                r
            })
            .collect())
    }

    /// The current index of a value about to be encrypted with Encrypt's `blind_index`: checks
    /// the names, needs `index` on the field, and refuses a value with no normal form before
    /// anything is sealed (nothing is changed, no key is made).
    pub fn index_for_encrypt(&self, g: &mut Guard, i: &EncryptInput<'_>) -> Result<String> {
        self.check_encrypt(i)?;
        g.authorize(Op::Index, Some(i.keyspace), Some(i.field))?;
        Ok(self
            .index_of(i.keyspace, i.field, i.plaintext, false)?
            .current)
    }

    /// Encrypt with its blind index: the index first (so a bad value seals nothing), then the
    /// ordinary encryption.
    pub async fn encrypt_indexed(
        &self,
        g: &mut Guard,
        i: &EncryptInput<'_>,
    ) -> Result<(Vec<u8>, String)> {
        let index = self.index_for_encrypt(g, i)?;
        let ct = self.encrypt(g, i).await?;
        Ok((ct, index))
    }

    /// The masked form of `value`, a value of `field` in `keyspace` (docs/SEARCH.md).
    pub fn mask(&self, keyspace: &str, field: &str, value: &[u8]) -> String {
        mask::mask(self.index_keys.field(keyspace, field).mask, value)
    }

    /// The masked form of the plaintext of a decryption (whose ciphertext names the keyspace).
    pub fn mask_decrypted(&self, i: &DecryptInput<'_>, plaintext: &[u8]) -> String {
        let mut scratch = Vec::new();
        match envelope::parse(i.ciphertext, &mut scratch) {
            Ok(p) => self.mask(p.header.keyspace, i.field, plaintext),
            // Cannot happen after a successful decryption; hide everything if it does.
            Err(_) => mask::HIDDEN.to_string(),
        }
    }
}
