//! Ciphertext format v1 (documented in docs/FORMAT.md, pinned by golden vectors in the tests
//! below and in tests/it/golden_vectors.rs).
//!
//! ```text
//! offset      size  field
//! 0           1     format version (0x01)
//! 1           1     algorithm (0x01 AES-256-GCM, 0x02 AES-128-GCM)
//! 2           1     keyspace name length L (1..=63)
//! 3           L     keyspace name (ASCII)
//! 3+L         16    key id (random; identifies the subject's DEK, never derived from the subject)
//! 19+L        4     DEK version (u32 big-endian, >= 1)
//! 23+L        12    nonce (random)
//! 35+L        32    key commitment
//! 67+L        n+16  AES-GCM ciphertext and tag
//! ```
//!
//! From the DEK, HKDF-SHA256 derives the AES key and a 32-byte key commitment, both bound to
//! the algorithm, keyspace, key id and DEK version. The commitment is checked (constant time)
//! before decryption, so a ciphertext opens under exactly one key. The AAD is the header
//! (bytes 0..35+L) followed by the length-prefixed field name and the canonical (sorted,
//! length-prefixed) context map.

use std::collections::BTreeMap;

use aws_lc_rs::hkdf;
use base64::Engine as _;
use zeroize::{Zeroize, Zeroizing};

use super::aead::{self, Algorithm, NONCE_LEN, TAG_LEN};

/// Format version byte of v1.
pub const VERSION_V1: u8 = 1;
/// Length of a key id.
pub const KEY_ID_LEN: usize = 16;
/// Length of the key commitment.
pub const COMMITMENT_LEN: usize = 32;
/// Longest keyspace name.
pub use crate::domain::names::MAX_KEYSPACE_LEN;
/// Prefix of the text form.
pub const TEXT_PREFIX: &str = "pg1.";

const KDF_SALT: &[u8] = b"piiguard/v1/kdf";
const AAD_LABEL: &[u8] = b"piiguard/v1";
/// HKDF-Expand label of the subkey PRK (beside `enc` and `commit`).
const SUBKEY_LABEL: &[u8] = b"subkey";
/// Info prefix of each subkey expanded from the subkey PRK.
const SUBKEY_INFO_V2: &[u8] = b"piiguard/v2/subkey/";

/// Why a ciphertext was refused. Deliberately coarse: which check failed is not told to the
/// caller beyond "malformed" versus "does not authenticate".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Not a piiguard ciphertext, or truncated.
    #[error("malformed ciphertext")]
    Malformed,
    /// A version byte this build does not know.
    #[error("unsupported ciphertext version")]
    UnsupportedVersion,
    /// Commitment or tag mismatch: wrong key, field, context, or modified bytes.
    #[error("ciphertext does not authenticate")]
    Authentication,
}

/// A 16-byte random key id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl KeyId {
    /// A fresh random key id from the OS CSPRNG.
    pub fn random() -> Result<Self, aws_lc_rs::error::Unspecified> {
        let mut b = [0u8; KEY_ID_LEN];
        aws_lc_rs::rand::fill(&mut b)?;
        Ok(Self(b))
    }

    /// Lower-case hex, as used in Vault paths.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses lower- or upper-case hex.
    pub fn from_hex(s: &str) -> Option<Self> {
        let v = hex::decode(s).ok()?;
        Some(Self(v.try_into().ok()?))
    }
}

/// Keys derived from one DEK: the AES key, the commitment and the subkey PRK, each its own
/// HKDF-Expand output with its own label. Zeroized on drop; no `Debug`, no `Clone`.
pub struct DerivedKeys {
    alg: Algorithm,
    enc: [u8; 32],
    commitment: [u8; COMMITMENT_LEN],
    sub: [u8; 32],
}

impl Drop for DerivedKeys {
    fn drop(&mut self) {
        self.enc.zeroize();
        self.commitment.zeroize();
        self.sub.zeroize();
    }
}

impl std::fmt::Debug for DerivedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DerivedKeys")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

struct HkdfLen(usize);
impl hkdf::KeyType for HkdfLen {
    fn len(&self) -> usize {
        self.0
    }
}

impl DerivedKeys {
    /// Derives the AES key, the commitment and the subkey PRK from a DEK: one HKDF-Extract
    /// (salt `piiguard/v1/kdf`), then one HKDF-Expand per key, whose info is the context
    /// (algorithm, keyspace, key id, DEK version) followed by the key's label (`enc`,
    /// `commit`, `subkey`). No derived key is ever used as the key of another derivation.
    ///
    /// `dek` must be `alg.key_len()` bytes; anything else is refused.
    pub fn derive(
        alg: Algorithm,
        dek: &[u8],
        keyspace: &str,
        key_id: &KeyId,
        dek_version: u32,
    ) -> Result<Self, EnvelopeError> {
        if dek.len() != alg.key_len() || keyspace.is_empty() || keyspace.len() > MAX_KEYSPACE_LEN {
            return Err(EnvelopeError::Malformed);
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT).extract(dek);
        let ks_len = [keyspace.len() as u8];
        let alg_b = [alg as u8];
        let ver = dek_version.to_be_bytes();
        let context: [&[u8]; 6] = [&alg_b, &ks_len, keyspace.as_bytes(), &key_id.0, &ver, b""];
        let mut enc = [0u8; 32];
        let mut commitment = [0u8; COMMITMENT_LEN];
        let mut info_enc = context;
        info_enc[5] = b"enc";
        prk.expand(&info_enc, HkdfLen(alg.key_len()))
            .and_then(|okm| okm.fill(&mut enc[..alg.key_len()]))
            .map_err(|_| EnvelopeError::Malformed)?;
        let mut info_commit = context;
        info_commit[5] = b"commit";
        prk.expand(&info_commit, HkdfLen(COMMITMENT_LEN))
            .and_then(|okm| okm.fill(&mut commitment))
            .map_err(|_| EnvelopeError::Malformed)?;
        let mut sub = [0u8; 32];
        let mut info_sub = context;
        info_sub[5] = SUBKEY_LABEL;
        prk.expand(&info_sub, HkdfLen(32))
            .and_then(|okm| okm.fill(&mut sub))
            .map_err(|_| EnvelopeError::Malformed)?;
        Ok(Self {
            alg,
            enc,
            commitment,
            sub,
        })
    }

    /// The algorithm these keys are for.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// A 32-byte key for another use of this DEK (tokenisation): HKDF-Expand of the subkey PRK
    /// (itself expanded from the DEK's PRK with the label `subkey`, see [`DerivedKeys::derive`])
    /// with info `"piiguard/v2/subkey/" || label`. Independent of the AES key: knowing one
    /// never gives the other. It dies with the DEK: a shred makes it underivable. Callers keep
    /// it zeroized.
    pub fn subkey(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &self.sub);
        let mut out = Zeroizing::new([0u8; 32]);
        // Expanding 32 bytes with SHA-256 cannot fail (the limit is 255 blocks).
        if let Ok(okm) = prk.expand(&[SUBKEY_INFO_V2, label], HkdfLen(32)) {
            let _ = okm.fill(&mut out[..]);
        }
        out
    }

    /// The subkey of builds before the security review (finding 11): HMAC-SHA256 keyed with
    /// the AES key itself, `"piiguard/v1/subkey/" || label`. Only to recognise deterministic
    /// FF1 tokens made then (their tweak came from it); never for anything new.
    pub fn legacy_subkey_v1(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, self.enc_key());
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&k);
        ctx.update(b"piiguard/v1/subkey/");
        ctx.update(label);
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    fn enc_key(&self) -> &[u8] {
        &self.enc[..self.alg.key_len()]
    }

    /// These keys with the AES key schedule computed once, for sealing or opening several
    /// items with one DEK (a run of batch items that share it).
    pub fn prepare(&self) -> Result<PreparedKeys<'_>, EnvelopeError> {
        self.prepare_with(None)
    }

    /// [`prepare`](Self::prepare), using `kept` (made by [`expand`](Self::expand) of these
    /// same keys and kept beside them) instead of a new key schedule. A kept schedule of other
    /// keys is never used: it is recognised by its commitment, and these keys are expanded
    /// afresh instead.
    pub fn prepare_with<'k>(
        &'k self,
        kept: Option<&'k ExpandedKey>,
    ) -> Result<PreparedKeys<'k>, EnvelopeError> {
        let aead = match kept {
            Some(k) if k.commitment == self.commitment => Aead::Kept(&k.aead),
            _ => Aead::Own(
                aead::PreparedKey::new(self.alg, self.enc_key())
                    .map_err(|_| EnvelopeError::Malformed)?,
            ),
        };
        Ok(PreparedKeys { keys: self, aead })
    }

    /// The AES-GCM key schedule of these keys, to keep beside them for as long as they live
    /// (the DEK cache keeps it for hot entries, so that each use skips the ~0.2 us schedule).
    pub fn expand(&self) -> Result<ExpandedKey, EnvelopeError> {
        Ok(ExpandedKey {
            aead: aead::PreparedKey::new(self.alg, self.enc_key())
                .map_err(|_| EnvelopeError::Malformed)?,
            commitment: self.commitment,
        })
    }
}

/// The AES-GCM key schedule of one [`DerivedKeys`] ([`DerivedKeys::expand`]), kept to be used
/// with them ([`DerivedKeys::prepare_with`]). Holds the expanded AES key (AWS-LC clears it when
/// it is freed) and a copy of the keys' commitment (public: every ciphertext carries it), which
/// identifies the keys it belongs to. No `Debug`, no `Clone`.
pub struct ExpandedKey {
    aead: aead::PreparedKey,
    commitment: [u8; COMMITMENT_LEN],
}

/// [`DerivedKeys`] ready for AES-GCM (see [`DerivedKeys::prepare`]): with a key schedule of
/// its own, which lives as long as a batch run, or one kept beside the keys.
pub struct PreparedKeys<'k> {
    keys: &'k DerivedKeys,
    aead: Aead<'k>,
}

/// The key schedule a [`PreparedKeys`] uses.
enum Aead<'k> {
    Own(aead::PreparedKey),
    Kept(&'k aead::PreparedKey),
}

impl PreparedKeys<'_> {
    fn aead(&self) -> &aead::PreparedKey {
        match &self.aead {
            Aead::Own(k) => k,
            Aead::Kept(k) => k,
        }
    }
}

/// One nonce, fresh from the CSPRNG (one call, ~0.4-0.5 us: see [`random_nonces`]).
pub fn random_nonce() -> Result<[u8; NONCE_LEN], EnvelopeError> {
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| EnvelopeError::Malformed)?;
    Ok(nonce)
}

/// `n` random nonces from one call to the CSPRNG. Each CSPRNG call costs ~0.4-0.5 us here
/// (AWS-LC reseeds from RDRAND with prediction resistance and checks its fork/snapshot
/// generation under a lock), more than sealing a short field: a batch draws its nonces once.
/// Each nonce is a distinct 12-byte slice of one output: as random as separate calls. They
/// are used at once, by the call that drew them; nonces are never kept across calls (a kept
/// buffer would outlive AWS-LC's fork / VM-snapshot detection and could replay in a clone).
pub fn random_nonces(n: usize) -> Result<Vec<[u8; NONCE_LEN]>, EnvelopeError> {
    let mut v = vec![[0u8; NONCE_LEN]; n];
    if n > 0 {
        aws_lc_rs::rand::fill(v.as_flattened_mut()).map_err(|_| EnvelopeError::Malformed)?;
    }
    Ok(v)
}

/// Identifies the DEK a ciphertext was made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header<'a> {
    /// Format version byte.
    pub version: u8,
    /// AEAD algorithm.
    pub alg: Algorithm,
    /// Keyspace name.
    pub keyspace: &'a str,
    /// Random id of the DEK (not the subject id).
    pub key_id: KeyId,
    /// Version of the DEK.
    pub dek_version: u32,
}

/// A parsed (not yet authenticated) binary ciphertext.
#[derive(Debug)]
pub struct Parsed<'a> {
    /// The parsed header.
    pub header: Header<'a>,
    header_bytes: &'a [u8],
    nonce: [u8; NONCE_LEN],
    commitment: &'a [u8],
    body: &'a [u8],
}

/// Length of the AAD for this header, field and context.
fn aad_len(header: &[u8], field: &str, context: &BTreeMap<&str, &str>) -> usize {
    let ctx_len: usize = context.iter().map(|(k, v)| 6 + k.len() + v.len()).sum();
    AAD_LABEL.len() + header.len() + 4 + field.len() + ctx_len
}

/// Where the AAD is written: a `Vec` or a stack buffer.
trait AadSink {
    fn put(&mut self, b: &[u8]);
}

impl AadSink for Vec<u8> {
    fn put(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
}

/// Writes the AAD: label, header bytes, field, canonical context.
fn write_aad(out: &mut impl AadSink, header: &[u8], field: &str, context: &BTreeMap<&str, &str>) {
    out.put(AAD_LABEL);
    out.put(header);
    out.put(&(field.len() as u16).to_be_bytes());
    out.put(field.as_bytes());
    out.put(&(context.len() as u16).to_be_bytes());
    for (k, v) in context {
        out.put(&(k.len() as u16).to_be_bytes());
        out.put(k.as_bytes());
        out.put(&(v.len() as u32).to_be_bytes());
        out.put(v.as_bytes());
    }
}

/// AADs up to this size are built on the stack (a header, a field name and a small context:
/// the common case), larger ones on the heap. Saves one allocation per seal/open.
const STACK_AAD: usize = 384;

/// A fixed-capacity byte buffer on the stack.
struct StackBuf {
    buf: [u8; STACK_AAD],
    len: usize,
}

impl AadSink for StackBuf {
    fn put(&mut self, b: &[u8]) {
        // `with_aad` only uses a StackBuf when the computed length fits; were it ever too
        // small, the write is refused (the AAD would then be wrong and nothing would
        // authenticate), never out of bounds.
        if let Some(dst) = self.buf.get_mut(self.len..self.len + b.len()) {
            dst.copy_from_slice(b);
            self.len += b.len();
        }
    }
}

/// Builds the AAD (on the stack when small) and hands it to `f`.
fn with_aad<R>(
    header: &[u8],
    field: &str,
    context: &BTreeMap<&str, &str>,
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    let n = aad_len(header, field, context);
    if n <= STACK_AAD {
        let mut b = StackBuf {
            buf: [0u8; STACK_AAD],
            len: 0,
        };
        write_aad(&mut b, header, field, context);
        f(&b.buf[..b.len])
    } else {
        let mut v = Vec::with_capacity(n);
        write_aad(&mut v, header, field, context);
        f(&v)
    }
}

/// Encrypts `plaintext` with a random nonce.
#[allow(clippy::too_many_arguments)]
pub fn seal(
    keys: &DerivedKeys,
    keyspace: &str,
    key_id: &KeyId,
    dek_version: u32,
    field: &str,
    context: &BTreeMap<&str, &str>,
    plaintext: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    let nonce = random_nonce()?;
    seal_with_nonce(
        keys,
        keyspace,
        key_id,
        dek_version,
        field,
        context,
        plaintext,
        &nonce,
    )
}

/// Encrypts with a given nonce, which must be fresh from the CSPRNG ([`random_nonces`]) and
/// used once: golden vectors, and batches (which draw all their nonces with one call).
#[allow(clippy::too_many_arguments)]
pub fn seal_with_nonce(
    keys: &DerivedKeys,
    keyspace: &str,
    key_id: &KeyId,
    dek_version: u32,
    field: &str,
    context: &BTreeMap<&str, &str>,
    plaintext: &[u8],
    nonce: &[u8; NONCE_LEN],
) -> Result<Vec<u8>, EnvelopeError> {
    seal_prepared(
        &keys.prepare()?,
        keyspace,
        key_id,
        dek_version,
        field,
        context,
        plaintext,
        nonce,
    )
}

/// [`seal_with_nonce`] with prepared keys (same bytes).
#[allow(clippy::too_many_arguments)]
pub fn seal_prepared(
    prepared: &PreparedKeys<'_>,
    keyspace: &str,
    key_id: &KeyId,
    dek_version: u32,
    field: &str,
    context: &BTreeMap<&str, &str>,
    plaintext: &[u8],
    nonce: &[u8; NONCE_LEN],
) -> Result<Vec<u8>, EnvelopeError> {
    let keys = prepared.keys;
    if keyspace.is_empty() || keyspace.len() > MAX_KEYSPACE_LEN || field.len() > u16::MAX as usize {
        return Err(EnvelopeError::Malformed);
    }
    let l = keyspace.len();
    let header_len = 3 + l + KEY_ID_LEN + 4 + NONCE_LEN;
    let total = header_len + COMMITMENT_LEN + plaintext.len() + TAG_LEN;
    let mut out = Vec::with_capacity(total);
    out.push(VERSION_V1);
    out.push(keys.alg as u8);
    out.push(l as u8);
    out.extend_from_slice(keyspace.as_bytes());
    out.extend_from_slice(&key_id.0);
    out.extend_from_slice(&dek_version.to_be_bytes());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&keys.commitment);
    let body_start = out.len();
    out.extend_from_slice(plaintext);
    // Encrypt in place inside `out` (no second buffer, no copy), then append the tag.
    let (head, body) = out.split_at_mut(body_start);
    let sealed = with_aad(&head[..header_len], field, context, |aad| {
        prepared.aead().seal_in_place(nonce, aad, body)
    });
    match sealed {
        Ok(tag) => {
            out.extend_from_slice(&tag);
            Ok(out)
        }
        Err(_) => {
            // Never return (or leave in memory) a buffer holding the plaintext.
            out.zeroize();
            Err(EnvelopeError::Malformed)
        }
    }
}

/// Parses the header of a binary or text-form ciphertext. `scratch` receives the decoded
/// bytes of a text form; the returned value borrows from it or from `input`.
pub fn parse<'a>(input: &'a [u8], scratch: &'a mut Vec<u8>) -> Result<Parsed<'a>, EnvelopeError> {
    let bytes: &'a [u8] = if input.starts_with(TEXT_PREFIX.as_bytes()) {
        *scratch = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&input[TEXT_PREFIX.len()..])
            .map_err(|_| EnvelopeError::Malformed)?;
        scratch
    } else {
        input
    };
    parse_binary(bytes)
}

fn parse_binary(b: &[u8]) -> Result<Parsed<'_>, EnvelopeError> {
    let version = *b.first().ok_or(EnvelopeError::Malformed)?;
    if version != VERSION_V1 {
        return Err(EnvelopeError::UnsupportedVersion);
    }
    if b.len() < 3 {
        return Err(EnvelopeError::Malformed);
    }
    let alg = Algorithm::from_byte(b[1]).ok_or(EnvelopeError::Malformed)?;
    let l = b[2] as usize;
    if l == 0 || l > MAX_KEYSPACE_LEN {
        return Err(EnvelopeError::Malformed);
    }
    let header_len = 3 + l + KEY_ID_LEN + 4 + NONCE_LEN;
    if b.len() < header_len + COMMITMENT_LEN + TAG_LEN {
        return Err(EnvelopeError::Malformed);
    }
    let keyspace = std::str::from_utf8(&b[3..3 + l]).map_err(|_| EnvelopeError::Malformed)?;
    let mut p = 3 + l;
    let key_id = KeyId(
        b[p..p + KEY_ID_LEN]
            .try_into()
            .map_err(|_| EnvelopeError::Malformed)?,
    );
    p += KEY_ID_LEN;
    let dek_version = u32::from_be_bytes(
        b[p..p + 4]
            .try_into()
            .map_err(|_| EnvelopeError::Malformed)?,
    );
    p += 4;
    if dek_version == 0 {
        return Err(EnvelopeError::Malformed);
    }
    let nonce: [u8; NONCE_LEN] = b[p..p + NONCE_LEN]
        .try_into()
        .map_err(|_| EnvelopeError::Malformed)?;
    Ok(Parsed {
        header: Header {
            version,
            alg,
            keyspace,
            key_id,
            dek_version,
        },
        header_bytes: &b[..header_len],
        nonce,
        commitment: &b[header_len..header_len + COMMITMENT_LEN],
        body: &b[header_len + COMMITMENT_LEN..],
    })
}

impl Parsed<'_> {
    /// Checks the commitment and decrypts. The plaintext is zeroized when dropped.
    pub fn open(
        &self,
        keys: &DerivedKeys,
        field: &str,
        context: &BTreeMap<&str, &str>,
    ) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        if keys.alg != self.header.alg {
            return Err(EnvelopeError::Authentication);
        }
        self.open_prepared(&keys.prepare()?, field, context)
    }

    /// [`open`](Self::open) with prepared keys.
    pub fn open_prepared(
        &self,
        prepared: &PreparedKeys<'_>,
        field: &str,
        context: &BTreeMap<&str, &str>,
    ) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        let keys = prepared.keys;
        if keys.alg != self.header.alg {
            return Err(EnvelopeError::Authentication);
        }
        aws_lc_rs::constant_time::verify_slices_are_equal(self.commitment, &keys.commitment)
            .map_err(|_| EnvelopeError::Authentication)?;
        let mut buf = Zeroizing::new(self.body.to_vec());
        let n = with_aad(self.header_bytes, field, context, |aad| {
            prepared.aead().open(&self.nonce, aad, &mut buf)
        })
        .map_err(|_| EnvelopeError::Authentication)?;
        buf.truncate(n);
        Ok(buf)
    }
}

/// The text form of a binary ciphertext: `pg1.` + unpadded base64url.
pub fn to_text(binary: &[u8]) -> String {
    let mut s = String::with_capacity(TEXT_PREFIX.len() + binary.len().div_ceil(3) * 4);
    s.push_str(TEXT_PREFIX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(binary, &mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(alg: Algorithm) -> (DerivedKeys, KeyId) {
        let kid = KeyId([0x11; 16]);
        let dek = vec![0x42; alg.key_len()];
        (
            DerivedKeys::derive(alg, &dek, "orders", &kid, 1).unwrap(),
            kid,
        )
    }

    fn ctx<'a>(pairs: &[(&'a str, &'a str)]) -> BTreeMap<&'a str, &'a str> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn round_trip_both_algorithms_and_text_form() {
        for alg in [Algorithm::Aes256Gcm, Algorithm::Aes128Gcm] {
            let (k, kid) = keys(alg);
            let c = ctx(&[("order", "42")]);
            let ct = seal(
                &k,
                "orders",
                &kid,
                1,
                "email",
                &c,
                "ä@example.com".as_bytes(),
            )
            .unwrap();
            let mut s = Vec::new();
            let p = parse(&ct, &mut s).unwrap();
            assert_eq!(p.header.keyspace, "orders");
            assert_eq!(p.header.alg, alg);
            assert_eq!(
                &p.open(&k, "email", &c).unwrap()[..],
                "ä@example.com".as_bytes()
            );
            let text = to_text(&ct);
            let mut s2 = Vec::new();
            let p2 = parse(text.as_bytes(), &mut s2).unwrap();
            assert_eq!(
                &p2.open(&k, "email", &c).unwrap()[..],
                "ä@example.com".as_bytes()
            );
        }
    }

    #[test]
    fn wrong_field_context_or_any_flipped_bit_fails() {
        let (k, kid) = keys(Algorithm::Aes256Gcm);
        let c = ctx(&[("a", "b")]);
        let ct = seal(&k, "orders", &kid, 1, "email", &c, b"x").unwrap();
        let mut s = Vec::new();
        let p = parse(&ct, &mut s).unwrap();
        assert_eq!(
            p.open(&k, "name", &c).unwrap_err(),
            EnvelopeError::Authentication
        );
        assert_eq!(
            p.open(&k, "email", &ctx(&[("a", "c")])).unwrap_err(),
            EnvelopeError::Authentication
        );
        assert_eq!(
            p.open(&k, "email", &ctx(&[])).unwrap_err(),
            EnvelopeError::Authentication
        );
        // Every single-bit flip anywhere must be refused (malformed or authentication).
        for i in 0..ct.len() {
            for bit in 0..8 {
                let mut t = ct.clone();
                t[i] ^= 1 << bit;
                let mut s = Vec::new();
                let r = parse(&t, &mut s).and_then(|p| p.open(&k, "email", &c));
                assert!(r.is_err(), "flip at byte {i} bit {bit} accepted");
            }
        }
        // Every truncation must be refused.
        for n in 0..ct.len() {
            let mut s = Vec::new();
            let r = parse(&ct[..n], &mut s).and_then(|p| p.open(&k, "email", &c));
            assert!(r.is_err(), "truncation to {n} accepted");
        }
    }

    #[test]
    fn context_is_canonical_and_unambiguous() {
        let (k, kid) = keys(Algorithm::Aes256Gcm);
        let c1 = ctx(&[("ab", "c")]);
        let c2 = ctx(&[("a", "bc")]);
        let ct = seal(&k, "orders", &kid, 1, "f", &c1, b"x").unwrap();
        let mut s = Vec::new();
        let p = parse(&ct, &mut s).unwrap();
        assert!(p.open(&k, "f", &c2).is_err());
    }

    #[test]
    fn large_context_aad_on_the_heap_round_trips_and_binds() {
        let (k, kid) = keys(Algorithm::Aes256Gcm);
        let long = "v".repeat(STACK_AAD);
        let c = ctx(&[("big", long.as_str())]);
        let hdr = [0u8; 3 + 6 + KEY_ID_LEN + 4 + NONCE_LEN];
        assert!(aad_len(&hdr, "f", &c) > STACK_AAD);
        let ct = seal(&k, "orders", &kid, 1, "f", &c, b"x").unwrap();
        let mut s = Vec::new();
        let p = parse(&ct, &mut s).unwrap();
        assert_eq!(&p.open(&k, "f", &c).unwrap()[..], b"x");
        let shorter = long[1..].to_string();
        assert!(p.open(&k, "f", &ctx(&[("big", shorter.as_str())])).is_err());
        // The stack and heap builders write the same bytes.
        let small = ctx(&[("a", "b")]);
        let mut v = Vec::new();
        write_aad(&mut v, &hdr, "f", &small);
        assert_eq!(with_aad(&hdr, "f", &small, |a| a.to_vec()), v);
        assert_eq!(v.len(), aad_len(&hdr, "f", &small));
    }

    #[test]
    fn batch_nonces_are_distinct_and_prepared_keys_give_the_same_bytes() {
        let nonces = random_nonces(1000).unwrap();
        let set: std::collections::HashSet<_> = nonces.iter().collect();
        assert_eq!(set.len(), 1000, "nonces of one draw repeat");
        let again = random_nonces(1000).unwrap();
        assert!(
            again.iter().all(|n| !set.contains(n)),
            "two draws share a nonce"
        );
        assert!(random_nonces(0).unwrap().is_empty());
        let (k, kid) = keys(Algorithm::Aes256Gcm);
        let c = ctx(&[("order", "42")]);
        let p = k.prepare().unwrap();
        for n in &nonces[..4] {
            let a = seal_with_nonce(&k, "orders", &kid, 1, "email", &c, b"x@y", n).unwrap();
            let b = seal_prepared(&p, "orders", &kid, 1, "email", &c, b"x@y", n).unwrap();
            assert_eq!(a, b);
            let mut s = Vec::new();
            let parsed = parse(&b, &mut s).unwrap();
            assert_eq!(&parsed.open_prepared(&p, "email", &c).unwrap()[..], b"x@y");
            assert!(parsed.open_prepared(&p, "name", &c).is_err());
        }
    }

    #[test]
    fn a_kept_key_schedule_gives_the_same_bytes_and_one_of_other_keys_is_never_used() {
        for alg in [Algorithm::Aes256Gcm, Algorithm::Aes128Gcm] {
            let (k, kid) = keys(alg);
            let c = ctx(&[]);
            let kept = k.expand().unwrap();
            let p = k.prepare_with(Some(&kept)).unwrap();
            assert!(matches!(p.aead, Aead::Kept(_)), "the kept schedule is used");
            let n = random_nonce().unwrap();
            let a = seal_with_nonce(&k, "orders", &kid, 1, "email", &c, b"x@y", &n).unwrap();
            let b = seal_prepared(&p, "orders", &kid, 1, "email", &c, b"x@y", &n).unwrap();
            assert_eq!(a, b);
            let mut s = Vec::new();
            assert_eq!(
                &parse(&a, &mut s).unwrap().open(&k, "email", &c).unwrap()[..],
                b"x@y"
            );
            // The schedule of another DEK is recognised and not used.
            let other = DerivedKeys::derive(alg, &vec![0x43; alg.key_len()], "orders", &kid, 1)
                .unwrap()
                .expand()
                .unwrap();
            let p = k.prepare_with(Some(&other)).unwrap();
            assert!(matches!(p.aead, Aead::Own(_)));
            let b = seal_prepared(&p, "orders", &kid, 1, "email", &c, b"x@y", &n).unwrap();
            assert_eq!(a, b, "sealed with these keys' own schedule");
        }
    }

    #[test]
    fn commitment_binds_the_key() {
        let (k, kid) = keys(Algorithm::Aes256Gcm);
        let other =
            DerivedKeys::derive(Algorithm::Aes256Gcm, &[0x43; 32], "orders", &kid, 1).unwrap();
        let ct = seal(&k, "orders", &kid, 1, "f", &ctx(&[]), b"x").unwrap();
        let mut s = Vec::new();
        let p = parse(&ct, &mut s).unwrap();
        assert_eq!(
            p.open(&other, "f", &ctx(&[])).unwrap_err(),
            EnvelopeError::Authentication
        );
    }

    /// HMAC-SHA256, for the by-hand HKDF (RFC 5869) below.
    fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
        let mut c = aws_lc_rs::hmac::Context::with_key(&k);
        for p in parts {
            c.update(p);
        }
        c.sign().as_ref().try_into().unwrap()
    }

    /// Security review finding 11: the subkeys (FF1 tweaks of tokens) came from
    /// HMAC(AES key, ...), one key for two algorithms. They now come from their own HKDF-Expand
    /// of the DEK's PRK: recomputed here by hand from RFC 5869, independent of the AES key.
    #[test]
    fn subkeys_are_expanded_from_the_prk_with_their_own_label_not_keyed_by_the_aes_key() {
        for alg in [Algorithm::Aes128Gcm, Algorithm::Aes256Gcm] {
            let (k, kid) = keys(alg);
            let dek = vec![0x42; alg.key_len()];
            let prk = hmac(KDF_SALT, &[&dek]);
            let ctx: [&[u8]; 5] = [&[alg as u8], &[6], b"orders", &kid.0, &1u32.to_be_bytes()];
            let expand = |label: &[u8]| {
                let mut parts = ctx.to_vec();
                parts.push(label);
                parts.push(&[1]);
                hmac(&prk, &parts)
            };
            // The model is right: it gives the AES key the envelope uses.
            assert_eq!(k.enc_key(), &expand(b"enc")[..alg.key_len()]);
            let sub_prk = expand(b"subkey");
            let label = b"tokens/ff1-tweak/card";
            let want = hmac(&sub_prk, &[b"piiguard/v2/subkey/", label, &[1]]);
            assert_eq!(*k.subkey(label), want);
            assert_ne!(*k.subkey(label), *k.legacy_subkey_v1(label));
            assert_ne!(*k.subkey(label), *k.subkey(b"tokens/ff1-tweak/phone"));
            // Not HMAC keyed with the AES key under any label.
            let old = hmac(k.enc_key(), &[b"piiguard/v1/subkey/", label]);
            assert_eq!(*k.legacy_subkey_v1(label), old);
            assert_ne!(sub_prk[..alg.key_len()], *k.enc_key());
        }
    }

    #[test]
    fn unknown_version_is_reported_as_such() {
        let mut s = Vec::new();
        assert_eq!(
            parse(&[2, 1, 1], &mut s).unwrap_err(),
            EnvelopeError::UnsupportedVersion
        );
        assert_eq!(parse(&[], &mut s).unwrap_err(), EnvelopeError::Malformed);
        assert_eq!(
            parse(b"pg1.!!!", &mut s).unwrap_err(),
            EnvelopeError::Malformed
        );
    }
}
