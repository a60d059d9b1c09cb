//! Unseal and UnsealBatch: open sealed envelopes (docs/FORMAT.md, "Sealed envelope v1") made by
//! producers with piiguard's RSA-2048 sealing public key, and re-encrypt the value for a
//! subject as a normal piiguard ciphertext, so the plaintext never leaves piiguard (or, with
//! the decrypt grant, return it).
//!
//! Order: every check that needs no key (names, size, envelope shape) first, then the policy
//! (`encrypt`, and `decrypt` plus the volume budget for `return_plaintext`), then one Vault
//! transit RSA decrypt (`batch_input` for a batch), then the AES-GCM or digest check against
//! keyspace, field and context, and only then the normal encryption (which may create the
//! subject's DEK). A refused envelope stores nothing.

use std::collections::{BTreeMap, HashMap};

use zeroize::Zeroizing;

use super::{EncryptInput, Engine};
use crate::access::guard::Guard;
use crate::access::policy::Op;
use crate::crypto::sealed::{self, Sealed, SealedError};
use crate::domain::names::parse_context;
use crate::error::{Error, Reason, Result};
use crate::keys::manager::SEALING_KEY;
use crate::vault::TransitItemError;

/// One envelope to open.
pub struct UnsealInput<'a> {
    /// Keyspace the envelope was sealed for (and of the resulting ciphertext).
    pub keyspace: &'a str,
    /// The raw subject id of the resulting ciphertext (hashed before use, never stored).
    pub subject: &'a str,
    /// Field the envelope was sealed for.
    pub field: &'a str,
    /// The envelope, binary or text form.
    pub envelope: &'a [u8],
    /// Context the envelope was sealed with (also bound into the resulting ciphertext).
    pub context: &'a HashMap<String, String>,
    /// Return the ciphertext's text form.
    pub text: bool,
    /// Return the plaintext instead of a ciphertext (needs `decrypt` too; counts as a reveal).
    pub return_plaintext: bool,
}

/// What an opened envelope became.
pub enum Unsealed {
    /// A piiguard ciphertext of the value for the subject.
    Ciphertext(Vec<u8>),
    /// The value itself (`return_plaintext`).
    Plaintext(Zeroizing<Vec<u8>>),
}

/// The error a caller sees for an envelope that is refused.
fn sealed_error(e: SealedError, max: usize) -> Error {
    match e {
        SealedError::Malformed => Error::bad_ciphertext(
            Reason::MalformedEnvelope,
            "not a sealed envelope, or truncated",
        ),
        SealedError::UnsupportedVersion => Error::bad_ciphertext(
            Reason::MalformedEnvelope,
            "sealed envelope format version not supported by this server",
        ),
        SealedError::TooLarge => Error::invalid(
            Reason::PayloadTooLarge,
            format!("the sealed value is over the maximum of {max} bytes"),
        ),
        SealedError::Authentication => envelope_does_not_open(),
        SealedError::Seal => Error::internal("sealing failed"),
    }
}

fn transit_error(e: TransitItemError) -> Error {
    match e {
        TransitItemError::VersionRetired => Error::bad_ciphertext(
            Reason::UnknownSealingKeyVersion,
            "the envelope was sealed with a retired sealing key version; seal again with a \
             current public key (Keys.GetPublicKey)",
        ),
        TransitItemError::VersionUnknown => Error::bad_ciphertext(
            Reason::UnknownSealingKeyVersion,
            "the envelope names a sealing key version that does not exist",
        ),
        TransitItemError::Failed => envelope_does_not_open(),
    }
}

/// One answer, reason and message, for an envelope whose RSA part does not open and for one
/// whose AES-GCM part does not authenticate (another keyspace, field or context, or modified):
/// telling them apart would tell a prober which part of a forged envelope it got right
/// (docs/FORMAT.md; exploratory testing found two messages).
fn envelope_does_not_open() -> Error {
    Error::bad_ciphertext(
        Reason::DecryptionFailed,
        "sealed envelope does not open (another key, keyspace, field or context than sealed \
         for, or modified)",
    )
}

impl Engine {
    /// Checks an item without any key, then authorises it.
    fn check_unseal<'a>(
        &self,
        g: &mut Guard,
        i: &'a UnsealInput<'a>,
        scratch: &'a mut Vec<u8>,
    ) -> Result<(Sealed<'a>, BTreeMap<&'a str, &'a str>)> {
        self.check_encrypt(&EncryptInput {
            keyspace: i.keyspace,
            subject: i.subject,
            field: i.field,
            plaintext: &[],
            context: i.context,
            text: i.text,
        })?;
        let s = sealed::parse(i.envelope, scratch, self.max_plaintext)
            .map_err(|e| sealed_error(e, self.max_plaintext))?;
        let ctx = parse_context(i.context)?;
        g.authorize(Op::Encrypt, Some(i.keyspace), Some(i.field))?;
        if i.return_plaintext {
            g.authorize(Op::Decrypt, Some(i.keyspace), Some(i.field))?;
        }
        Ok((s, ctx))
    }

    /// Opens `s` with the RSA plaintext Vault returned.
    fn open_sealed(
        &self,
        i: &UnsealInput<'_>,
        s: &Sealed<'_>,
        ctx: &BTreeMap<&str, &str>,
        rsa: std::result::Result<Zeroizing<Vec<u8>>, TransitItemError>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let rsa = rsa.map_err(transit_error)?;
        let v = s
            .open(&rsa, i.keyspace, i.field, ctx)
            .map_err(|e| sealed_error(e, self.max_plaintext))?;
        if v.len() > self.max_plaintext {
            return Err(sealed_error(SealedError::TooLarge, self.max_plaintext));
        }
        Ok(v)
    }

    /// Opens one sealed envelope.
    pub async fn unseal(&self, g: &mut Guard, i: &UnsealInput<'_>) -> Result<Unsealed> {
        let mut scratch = Vec::new();
        let (s, ctx) = self.check_unseal(g, i, &mut scratch)?;
        if i.return_plaintext {
            g.reveal(1)?;
        }
        let rsa = self
            .keys
            .vault()
            .transit_rsa_decrypt(SEALING_KEY, &[(s.key_version, s.rsa_ciphertext)])
            .await?
            .pop()
            .ok_or_else(|| Error::internal("transit decrypt: no result"))?;
        let value = self.open_sealed(i, &s, &ctx, rsa)?;
        if i.return_plaintext {
            return Ok(Unsealed::Plaintext(value));
        }
        let ct = self
            .encrypt(
                g,
                &EncryptInput {
                    keyspace: i.keyspace,
                    subject: i.subject,
                    field: i.field,
                    plaintext: &value,
                    context: i.context,
                    text: i.text,
                },
            )
            .await?;
        Ok(Unsealed::Ciphertext(ct))
    }

    /// Opens many envelopes; each gets its own result. One Vault call (`batch_input`, in
    /// chunks) decrypts every valid item's RSA part; the values to re-encrypt go through
    /// [`Engine::encrypt_batch`].
    pub async fn unseal_batch(
        &self,
        g: &mut Guard,
        items: &[UnsealInput<'_>],
    ) -> Result<Vec<Result<Unsealed>>> {
        self.check_batch_len(items.len())?;
        g.set_items(items.len());
        let mut scratch: Vec<Vec<u8>> = (0..items.len()).map(|_| Vec::new()).collect();
        let checked: Vec<Result<(Sealed<'_>, BTreeMap<&str, &str>)>> = items
            .iter()
            .zip(scratch.iter_mut())
            .map(|(i, s)| self.check_unseal(g, i, s))
            .collect();
        // The volume budget counts every item that may be revealed, before any is.
        let reveals = items
            .iter()
            .zip(&checked)
            .filter(|(i, c)| i.return_plaintext && c.is_ok())
            .count();
        if reveals > 0 {
            g.reveal(reveals as u64)?;
        }
        let wanted: Vec<(u32, &[u8])> = checked
            .iter()
            .filter_map(|c| c.as_ref().ok())
            .map(|(s, _)| (s.key_version, s.rsa_ciphertext))
            .collect();
        let mut rsa = if wanted.is_empty() {
            Vec::new()
        } else {
            self.keys
                .vault()
                .transit_rsa_decrypt(SEALING_KEY, &wanted)
                .await?
        }
        .into_iter();
        let opened: Vec<Result<Zeroizing<Vec<u8>>>> = items
            .iter()
            .zip(checked)
            .map(|(i, c)| {
                let (s, ctx) = c?;
                let r = rsa
                    .next()
                    .ok_or_else(|| Error::internal("transit decrypt: result missing"))?;
                self.open_sealed(i, &s, &ctx, r)
            })
            .collect();
        // The values to re-encrypt, as one encryption batch.
        let to_encrypt: Vec<EncryptInput<'_>> = items
            .iter()
            .zip(&opened)
            .filter(|(i, o)| !i.return_plaintext && o.is_ok())
            .filter_map(|(i, o)| {
                o.as_ref().ok().map(|v| EncryptInput {
                    keyspace: i.keyspace,
                    subject: i.subject,
                    field: i.field,
                    plaintext: v,
                    context: i.context,
                    text: i.text,
                })
            })
            .collect();
        let mut encrypted = if to_encrypt.is_empty() {
            Vec::new()
        } else {
            self.encrypt_batch(g, &to_encrypt).await?
        }
        .into_iter();
        drop(to_encrypt);
        g.set_items(items.len());
        let out = items
            .iter()
            .zip(opened)
            .map(|(i, o)| {
                match o {
                    Err(e) => {
                        let r = Err(e);
                        g.item_result::<Unsealed>(&r);
                        r
                    }
                    Ok(v) if i.return_plaintext => Ok(Unsealed::Plaintext(v)),
                    // Counted by encrypt_batch.
                    Ok(_) => encrypted
                        .next()
                        .unwrap_or_else(|| Err(Error::internal("batch result missing")))
                        .map(Unsealed::Ciphertext),
                }
            })
            .collect();
        Ok(out)
    }
}
