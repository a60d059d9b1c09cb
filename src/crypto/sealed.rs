//! Sealed envelope v1 (docs/FORMAT.md, "Sealed envelope v1"): what a producer outside the trust
//! boundary makes with piiguard's RSA-2048 sealing public key, and only piiguard (through Vault
//! transit, which holds the private key) opens. Pure: parsing, the associated data, building
//! with a caller-supplied RSA-OAEP wrap, opening with the RSA plaintext Vault returned.
//!
//! ```text
//! offset  size   field
//! 0       1      format version (0x01)
//! 1       1      kind: 0x01 hybrid, 0x02 direct
//! 2       4      sealing key version (u32 big-endian, >= 1)
//! 6       256    RSA-OAEP-SHA256 (MGF1-SHA256, no label) ciphertext
//!                  hybrid: of a fresh 32-byte AES-256 key
//!                  direct: of SHA-256(AAD) || value (value at most 158 bytes)
//! hybrid only:
//! 262     12     AES-GCM nonce
//! 274     n+16   AES-256-GCM ciphertext of the n-byte value, then the tag (AAD below)
//! ```
//!
//! ```text
//! AAD = "piiguard/sealed/v1" || header (bytes 0..6)
//!       || be16(len(keyspace)) || keyspace || be16(len(field)) || field
//!       || be16(number of context entries)
//!       || for each entry, sorted by key: be16(len(k)) || k || be32(len(v)) || v
//! ```
//!
//! Text form: `ps1.` and the binary form in unpadded base64url.

use std::collections::BTreeMap;

use aws_lc_rs::digest;
use base64::Engine as _;
use zeroize::Zeroizing;

use super::aead::{self, Algorithm, NONCE_LEN, TAG_LEN};

/// Format version byte of sealed envelope v1.
pub const VERSION_V1: u8 = 1;
/// Kind byte: AES-256-GCM value, its key wrapped with RSA-OAEP.
pub const KIND_HYBRID: u8 = 1;
/// Kind byte: the value itself (with the AAD digest) under RSA-OAEP; what openssl alone makes.
pub const KIND_DIRECT: u8 = 2;
/// Length of the header (version, kind, key version).
pub const HEADER_LEN: usize = 6;
/// Length of an RSA-2048 ciphertext.
pub const RSA_LEN: usize = 256;
/// Length of the AES-256 key a hybrid envelope wraps.
pub const AES_KEY_LEN: usize = 32;
/// Length of the AAD digest in a direct envelope's RSA plaintext.
pub const DIGEST_LEN: usize = 32;
/// Largest value of a direct envelope: RSA-2048 OAEP-SHA256 carries 256 - 2*32 - 2 = 190
/// bytes, of which the AAD digest takes 32.
pub const DIRECT_MAX_VALUE: usize = RSA_LEN - 2 * 32 - 2 - DIGEST_LEN;
/// Length of a direct envelope.
pub const DIRECT_LEN: usize = HEADER_LEN + RSA_LEN;
/// Length of a hybrid envelope around an empty value.
pub const HYBRID_OVERHEAD: usize = HEADER_LEN + RSA_LEN + NONCE_LEN + TAG_LEN;
/// Prefix of the text form.
pub const TEXT_PREFIX: &str = "ps1.";

const AAD_LABEL: &[u8] = b"piiguard/sealed/v1";

/// Why an envelope was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealedError {
    /// Not a sealed envelope, truncated, an unknown kind, or a bad text form.
    #[error("malformed sealed envelope")]
    Malformed,
    /// A version byte this build does not know.
    #[error("unsupported sealed envelope version")]
    UnsupportedVersion,
    /// The envelope carries more than the caller allows.
    #[error("sealed value too large")]
    TooLarge,
    /// Tag or AAD digest mismatch, or an RSA plaintext of the wrong shape: another keyspace,
    /// field or context than sealed for, or modified bytes.
    #[error("sealed envelope does not authenticate")]
    Authentication,
    /// The RSA-OAEP wrap or the CSPRNG failed (building only).
    #[error("sealing failed")]
    Seal,
}

/// The two kinds of envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// AES-256-GCM value, its key under RSA-OAEP. Any length.
    Hybrid,
    /// The value under RSA-OAEP with the AAD digest. At most [`DIRECT_MAX_VALUE`] bytes.
    Direct,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Hybrid => KIND_HYBRID,
            Kind::Direct => KIND_DIRECT,
        }
    }
}

/// A parsed (not yet opened) envelope, borrowing the input.
#[derive(Debug)]
pub struct Sealed<'a> {
    /// The envelope's kind.
    pub kind: Kind,
    /// The sealing key version it names.
    pub key_version: u32,
    header: [u8; HEADER_LEN],
    /// The RSA-OAEP ciphertext (256 bytes), for Vault transit decrypt.
    pub rsa_ciphertext: &'a [u8],
    nonce: [u8; NONCE_LEN],
    body: &'a [u8],
}

/// Parses `input` (binary or text form); `scratch` holds the decoded text form.
/// `max_value` bounds the sealed value (checked from the lengths, before anything is opened).
pub fn parse<'a>(
    input: &'a [u8],
    scratch: &'a mut Vec<u8>,
    max_value: usize,
) -> Result<Sealed<'a>, SealedError> {
    let bin: &'a [u8] = if let Some(t) = input.strip_prefix(TEXT_PREFIX.as_bytes()) {
        // Base64 of the largest acceptable binary form, rounded up.
        let max_text = (HYBRID_OVERHEAD + max_value).div_ceil(3) * 4;
        if t.len() > max_text {
            return Err(SealedError::TooLarge);
        }
        *scratch = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(t)
            .map_err(|_| SealedError::Malformed)?;
        scratch
    } else {
        input
    };
    if bin.len() < HEADER_LEN {
        return Err(SealedError::Malformed);
    }
    if bin[0] != VERSION_V1 {
        return Err(SealedError::UnsupportedVersion);
    }
    let kind = match bin[1] {
        KIND_HYBRID => Kind::Hybrid,
        KIND_DIRECT => Kind::Direct,
        _ => return Err(SealedError::Malformed),
    };
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&bin[..HEADER_LEN]);
    let key_version = u32::from_be_bytes([bin[2], bin[3], bin[4], bin[5]]);
    if key_version == 0 {
        return Err(SealedError::Malformed);
    }
    let rest = &bin[HEADER_LEN..];
    match kind {
        Kind::Direct => {
            if rest.len() != RSA_LEN {
                return Err(SealedError::Malformed);
            }
            Ok(Sealed {
                kind,
                key_version,
                header,
                rsa_ciphertext: rest,
                nonce: [0; NONCE_LEN],
                body: &[],
            })
        }
        Kind::Hybrid => {
            if rest.len() < RSA_LEN + NONCE_LEN + TAG_LEN {
                return Err(SealedError::Malformed);
            }
            if rest.len() - (RSA_LEN + NONCE_LEN + TAG_LEN) > max_value {
                return Err(SealedError::TooLarge);
            }
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(&rest[RSA_LEN..RSA_LEN + NONCE_LEN]);
            Ok(Sealed {
                kind,
                key_version,
                header,
                rsa_ciphertext: &rest[..RSA_LEN],
                nonce,
                body: &rest[RSA_LEN + NONCE_LEN..],
            })
        }
    }
}

/// The associated data of an envelope with this header, for this keyspace, field and context.
pub fn aad(
    header: &[u8; HEADER_LEN],
    keyspace: &str,
    field: &str,
    context: &BTreeMap<&str, &str>,
) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(AAD_LABEL.len() + HEADER_LEN + 6 + keyspace.len() + field.len());
    out.extend_from_slice(AAD_LABEL);
    out.extend_from_slice(header);
    out.extend_from_slice(&(keyspace.len() as u16).to_be_bytes());
    out.extend_from_slice(keyspace.as_bytes());
    out.extend_from_slice(&(field.len() as u16).to_be_bytes());
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(&(context.len() as u16).to_be_bytes());
    for (k, v) in context {
        out.extend_from_slice(&(k.len() as u16).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

fn header_of(kind: Kind, key_version: u32) -> [u8; HEADER_LEN] {
    let v = key_version.to_be_bytes();
    [VERSION_V1, kind.byte(), v[0], v[1], v[2], v[3]]
}

fn sha256(b: &[u8]) -> [u8; DIGEST_LEN] {
    let d = digest::digest(&digest::SHA256, b);
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(d.as_ref());
    out
}

impl Sealed<'_> {
    /// Opens the envelope with `rsa_plaintext` (what Vault's RSA-OAEP decrypt of
    /// [`Sealed::rsa_ciphertext`] returned) for this keyspace, field and context.
    pub fn open(
        &self,
        rsa_plaintext: &[u8],
        keyspace: &str,
        field: &str,
        context: &BTreeMap<&str, &str>,
    ) -> Result<Zeroizing<Vec<u8>>, SealedError> {
        let aad = aad(&self.header, keyspace, field, context);
        match self.kind {
            Kind::Hybrid => {
                if rsa_plaintext.len() != AES_KEY_LEN {
                    return Err(SealedError::Authentication);
                }
                let mut buf = Zeroizing::new(self.body.to_vec());
                let n = aead::open(
                    Algorithm::Aes256Gcm,
                    rsa_plaintext,
                    &self.nonce,
                    &aad,
                    &mut buf,
                )
                .map_err(|_| SealedError::Authentication)?;
                buf.truncate(n);
                Ok(buf)
            }
            Kind::Direct => {
                if rsa_plaintext.len() < DIGEST_LEN {
                    return Err(SealedError::Authentication);
                }
                let (d, value) = rsa_plaintext.split_at(DIGEST_LEN);
                let want = sha256(&aad);
                if aws_lc_rs::constant_time::verify_slices_are_equal(d, &want).is_err() {
                    return Err(SealedError::Authentication);
                }
                Ok(Zeroizing::new(value.to_vec()))
            }
        }
    }
}

/// Builds an envelope of `kind` for sealing key `key_version`. `wrap` is RSA-OAEP-SHA256
/// encryption with that version's public key (the caller's RSA implementation); it must return
/// [`RSA_LEN`] bytes.
#[allow(clippy::too_many_arguments)]
pub fn seal<E>(
    kind: Kind,
    key_version: u32,
    keyspace: &str,
    field: &str,
    context: &BTreeMap<&str, &str>,
    value: &[u8],
    wrap: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<Vec<u8>, SealedError> {
    if key_version == 0 {
        return Err(SealedError::Malformed);
    }
    let header = header_of(kind, key_version);
    let aad = aad(&header, keyspace, field, context);
    let mut out = Vec::with_capacity(HYBRID_OVERHEAD + value.len());
    out.extend_from_slice(&header);
    match kind {
        Kind::Direct => {
            if value.len() > DIRECT_MAX_VALUE {
                return Err(SealedError::TooLarge);
            }
            let mut pt = Zeroizing::new(Vec::with_capacity(DIGEST_LEN + value.len()));
            pt.extend_from_slice(&sha256(&aad));
            pt.extend_from_slice(value);
            let c = wrap(&pt).map_err(|_| SealedError::Seal)?;
            if c.len() != RSA_LEN {
                return Err(SealedError::Seal);
            }
            out.extend_from_slice(&c);
        }
        Kind::Hybrid => {
            let mut key = Zeroizing::new([0u8; AES_KEY_LEN]);
            let mut nonce = [0u8; NONCE_LEN];
            aws_lc_rs::rand::fill(&mut key[..]).map_err(|_| SealedError::Seal)?;
            aws_lc_rs::rand::fill(&mut nonce).map_err(|_| SealedError::Seal)?;
            let c = wrap(&key[..]).map_err(|_| SealedError::Seal)?;
            if c.len() != RSA_LEN {
                return Err(SealedError::Seal);
            }
            out.extend_from_slice(&c);
            out.extend_from_slice(&nonce);
            let mut body = value.to_vec();
            aead::seal(Algorithm::Aes256Gcm, &key[..], &nonce, &aad, &mut body)
                .map_err(|_| SealedError::Seal)?;
            out.extend_from_slice(&body);
        }
    }
    Ok(out)
}

/// The text form of a binary envelope.
pub fn to_text(binary: &[u8]) -> String {
    let mut s = String::from(TEXT_PREFIX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(binary, &mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for RSA in these pure tests: "wrapping" pads to 256 bytes with the length in
    /// front, so the opened plaintext can be fed back as Vault would.
    fn fake_wrap(pt: &[u8]) -> Result<Vec<u8>, ()> {
        let mut c = vec![pt.len() as u8];
        c.extend_from_slice(pt);
        c.resize(RSA_LEN, 0);
        Ok(c)
    }

    fn fake_unwrap(c: &[u8]) -> Vec<u8> {
        c[1..1 + c[0] as usize].to_vec()
    }

    fn ctx() -> BTreeMap<&'static str, &'static str> {
        BTreeMap::from([("purpose", "checkout")])
    }

    #[test]
    fn both_kinds_round_trip_and_bind_keyspace_field_context() {
        for kind in [Kind::Hybrid, Kind::Direct] {
            let env = seal(
                kind,
                3,
                "orders",
                "email",
                &ctx(),
                b"a@example.com",
                fake_wrap,
            )
            .unwrap();
            let mut scratch = Vec::new();
            let text = to_text(&env);
            for input in [&env[..], text.as_bytes()] {
                let p = parse(input, &mut scratch, 1024).unwrap();
                assert_eq!((p.kind, p.key_version), (kind, 3));
                let k = fake_unwrap(p.rsa_ciphertext);
                assert_eq!(
                    &p.open(&k, "orders", "email", &ctx()).unwrap()[..],
                    b"a@example.com"
                );
                assert_eq!(
                    p.open(&k, "orders", "phone", &ctx()),
                    Err(SealedError::Authentication)
                );
                assert_eq!(
                    p.open(&k, "other", "email", &ctx()),
                    Err(SealedError::Authentication)
                );
                assert_eq!(
                    p.open(&k, "orders", "email", &BTreeMap::new()),
                    Err(SealedError::Authentication)
                );
            }
        }
    }

    #[test]
    fn every_flipped_header_or_body_bit_is_refused() {
        let env = seal(
            Kind::Hybrid,
            1,
            "orders",
            "email",
            &ctx(),
            b"value",
            fake_wrap,
        )
        .unwrap();
        for i in 0..env.len() {
            if (HEADER_LEN..HEADER_LEN + RSA_LEN).contains(&i) {
                continue; // the RSA part is checked by Vault (tests/it/sealing.rs)
            }
            let mut bad = env.clone();
            bad[i] ^= 1;
            let mut s = Vec::new();
            let opened = parse(&bad, &mut s, 1024).and_then(|p| {
                let k = fake_unwrap(&env[HEADER_LEN..HEADER_LEN + RSA_LEN]);
                p.open(&k, "orders", "email", &ctx())
            });
            assert!(opened.is_err(), "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn malformed_truncated_and_oversized_inputs_are_refused() {
        let env = seal(
            Kind::Hybrid,
            1,
            "orders",
            "email",
            &ctx(),
            &[7u8; 100],
            fake_wrap,
        )
        .unwrap();
        let mut s = Vec::new();
        for n in 0..HYBRID_OVERHEAD {
            assert!(parse(&env[..n], &mut s, 1024).is_err(), "truncated to {n}");
        }
        assert_eq!(parse(&env, &mut s, 99).unwrap_err(), SealedError::TooLarge);
        assert_eq!(
            parse(b"ps1.!!", &mut s, 99).unwrap_err(),
            SealedError::Malformed
        );
        assert_eq!(
            parse(&[2, 1, 0, 0, 0, 1], &mut s, 99).unwrap_err(),
            SealedError::UnsupportedVersion
        );
        assert_eq!(
            parse(&[1, 9, 0, 0, 0, 1], &mut s, 99).unwrap_err(),
            SealedError::Malformed
        );
        let direct = seal(Kind::Direct, 1, "orders", "email", &ctx(), b"x", fake_wrap).unwrap();
        let mut longer = direct.clone();
        longer.push(0);
        assert_eq!(
            parse(&longer, &mut s, 99).unwrap_err(),
            SealedError::Malformed
        );
        assert_eq!(
            seal(
                Kind::Direct,
                1,
                "o",
                "f",
                &ctx(),
                &[0; DIRECT_MAX_VALUE + 1],
                fake_wrap
            )
            .unwrap_err(),
            SealedError::TooLarge
        );
        assert_eq!(DIRECT_MAX_VALUE, 158);
    }
}
