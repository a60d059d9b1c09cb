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
use crate::crypto::blind_index::{self, FieldKind, NormaliseOptions};
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
        let versions: Vec<_> = if all {
            cfg.queryable_versions().collect()
        } else {
            vec![cfg.current_version()]
        };
        // Each version with the settings it was made with (a rotation may change the bits or
        // the kind). The value must normalise for the current version; an older version whose
        // kind does not take it is left out of `all` (no row can hold such an index).
        let mut out = Vec::with_capacity(versions.len());
        let mut normal: Option<(FieldKind, Zeroizing<String>)> = None;
        for (i, v) in versions.into_iter().enumerate() {
            if normal.as_ref().is_none_or(|(k, _)| *k != v.kind) {
                match blind_index::normalise(v.kind, value, opts) {
                    Ok(n) => normal = Some((v.kind, Zeroizing::new(n))),
                    Err(e) if i == 0 => {
                        return Err(Error::invalid(
                            Reason::ValueNotNormalisable,
                            format!("field {field:?} ({}): {e}", v.kind.as_str()),
                        ));
                    }
                    Err(_) => {
                        normal = None;
                        continue;
                    }
                }
            }
            let Some((_, n)) = &normal else { continue };
            let key = self.index_keys.key(keyspace, field, v.version)?;
            out.push((
                v.version,
                blind_index::index(&key, v.version, v.index_bits, n),
            ));
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
