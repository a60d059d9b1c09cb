//! Key material and its public twin, in the style of rustls' `Tag` / `PublicTag`.
//!
//! - [`Dek`]: a plaintext data key (a subject's DEK, or a keyspace's index key). Secret: no
//!   `Debug`, no `Clone`, no `PartialEq` (a comparison of keys is a timing oracle and a sign
//!   that something compares what it should not), 16 or 32 bytes on the heap (moving a `Dek`
//!   moves a pointer, never copies the key), wiped on drop.
//! - [`WrappedDek`]: the same key encrypted by a Vault transit KEK, as Vault writes it
//!   (`vault:v<N>:<base64>`). Public: it is stored in Vault KV and means nothing without the
//!   KEK, which never leaves Vault; `Debug`, `Clone` and `PartialEq` are fine.
//!
//! **The one bridge.** A `Dek` becomes a `WrappedDek` only by Vault transit *encrypt* and a
//! `WrappedDek` becomes a `Dek` only by Vault transit *decrypt*: `vault::Vault::wrap_dek` and
//! `vault::Vault::unwrap_dek`. Nothing in this module converts one into the other, and the two
//! halves it offers that bridge, [`Dek::to_transit_plaintext`] (what transit encrypt is sent)
//! and [`Dek::from_transit_plaintext`] (what transit decrypt answered), are for those two
//! functions only: `tests/it/architecture.rs` fails if any other file names them. Why it is
//! worth one bridge: every place that turns a wrapped key into a plaintext one is a place
//! where a key can leak, and every place that turns a plaintext key into a wrapped one is a
//! place where a key can be wrapped by the wrong KEK; with one of each, both are reviewed once.
//!
//! That a `Dek` has no `Debug`, `Clone` or `PartialEq` is checked at compile time by the unit
//! tests below (and shown by these examples, which must not compile):
//!
//! ```compile_fail
//! fn leak(d: &piiguard::secret::Dek) -> String { format!("{d:?}") }
//! ```
//! ```compile_fail
//! fn copy(d: &piiguard::secret::Dek) -> piiguard::secret::Dek { d.clone() }
//! ```
//! ```compile_fail
//! fn same(a: &piiguard::secret::Dek, b: &piiguard::secret::Dek) -> bool { a == b }
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use zeroize::{Zeroize, Zeroizing};

/// Why key material was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// A data key must be 16 or 32 bytes; this one was `len` bytes.
    #[error("a data key must be 16 or 32 bytes, not {len}")]
    WrongLength {
        /// The length found.
        len: usize,
    },
    /// What Vault transit decrypt returned is not base64.
    #[error("transit plaintext is not base64")]
    NotBase64,
    /// Not a Vault transit ciphertext (`vault:v<N>:<base64>` with N >= 1).
    #[error("not a Vault transit ciphertext (vault:v<N>:...)")]
    NotTransitCiphertext,
    /// The operating system's CSPRNG failed.
    #[error("the CSPRNG failed")]
    Rng,
}

/// The largest data key: AES-256.
const MAX_LEN: usize = 32;

/// A plaintext data key: 16 or 32 bytes, wiped when dropped. See the module doc for the one
/// way it is wrapped and unwrapped.
pub struct Dek {
    /// Always `MAX_LEN` bytes, the key in the first `len`; on the heap so that moves of a `Dek`
    /// leave no copy of the key behind.
    buf: Box<[u8; MAX_LEN]>,
    len: u8,
}

impl Dek {
    /// A fresh key of `len` bytes (16 or 32) from the OS CSPRNG (through AWS-LC).
    pub fn generate(len: usize) -> Result<Self, SecretError> {
        let mut d = Self::zeroed(len)?;
        aws_lc_rs::rand::fill(&mut d.buf[..len]).map_err(|_| SecretError::Rng)?;
        Ok(d)
    }

    fn zeroed(len: usize) -> Result<Self, SecretError> {
        match len {
            16 | 32 => Ok(Self {
                buf: Box::new([0u8; MAX_LEN]),
                len: len as u8,
            }),
            _ => Err(SecretError::WrongLength { len }),
        }
    }

    /// The key bytes, for the key derivation that turns them into AEAD keys and for the HMAC of
    /// subject references. Do not copy them anywhere that outlives the call.
    pub fn expose_secret(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// Length in bytes: 16 or 32.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Always false: a data key has 16 or 32 bytes (here for the `len` convention).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bridge, wrap half: the base64 plaintext that Vault transit *encrypt* is sent. For
    /// `vault::Vault::wrap_dek` only (see the module doc); the string wipes itself on drop.
    pub fn to_transit_plaintext(&self) -> Zeroizing<String> {
        Zeroizing::new(B64.encode(self.expose_secret()))
    }

    /// Bridge, unwrap half: the key from the base64 plaintext that Vault transit *decrypt*
    /// answered for a [`WrappedDek`]. For `vault::Vault::unwrap_dek` only (see the module doc).
    /// Takes the response's string by value so that it is wiped here, whatever happens.
    pub fn from_transit_plaintext(b64: Zeroizing<String>) -> Result<Self, SecretError> {
        // Decode into a fixed buffer: no intermediate heap copy of the key.
        let mut tmp = Zeroizing::new([0u8; MAX_LEN + 3]);
        let n = B64
            .decode_slice(b64.trim().as_bytes(), &mut tmp[..])
            .map_err(|e| match e {
                base64::DecodeSliceError::OutputSliceTooSmall => {
                    SecretError::WrongLength { len: MAX_LEN + 1 }
                }
                base64::DecodeSliceError::DecodeError(_) => SecretError::NotBase64,
            })?;
        let mut d = Self::zeroed(n)?;
        d.buf[..n].copy_from_slice(&tmp[..n]);
        Ok(d)
    }

    /// What drop does: overwrite the whole buffer with zeros.
    fn wipe(&mut self) {
        self.buf.zeroize();
    }
}

impl Drop for Dek {
    fn drop(&mut self) {
        self.wipe();
    }
}

/// A data key wrapped by a Vault transit KEK: Vault's ciphertext string `vault:v<N>:<base64>`
/// (N is the KEK version). Public; made from a [`Dek`] only by `vault::Vault::wrap_dek`, or
/// parsed from what was stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WrappedDek(String);

impl WrappedDek {
    /// Parses a stored (or just returned) transit ciphertext. Only the `vault:v<N>:` prefix and
    /// a non-empty body are checked: the body is opaque, and Vault checks it when unwrapping.
    pub fn parse(s: impl Into<String>) -> Result<Self, SecretError> {
        let s = s.into();
        Self::kek_version_of(&s).ok_or(SecretError::NotTransitCiphertext)?;
        Ok(Self(s))
    }

    fn kek_version_of(s: &str) -> Option<u32> {
        let (ver, body) = s.strip_prefix("vault:v")?.split_once(':')?;
        let v: u32 = ver.parse().ok().filter(|v| *v >= 1)?;
        (!body.is_empty() && ver.bytes().all(|b| b.is_ascii_digit())).then_some(v)
    }

    /// The text as Vault wrote it (for KV records and for transit decrypt).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The version of the KEK that wrapped it.
    pub fn kek_version(&self) -> u32 {
        // Invariant: `parse` checked the prefix.
        Self::kek_version_of(&self.0).unwrap_or(0)
    }
}

impl std::fmt::Display for WrappedDek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles only if `T` implements none of the traits named in `$trait` (the trick of the
    /// `static_assertions` crate: with the trait implemented, the `_` below is ambiguous).
    macro_rules! assert_not_impl {
        ($t:ty, $trait:path) => {{
            trait AmbiguousIfImpl<A> {
                fn some_item() {}
            }
            impl<T: ?Sized> AmbiguousIfImpl<()> for T {}
            #[allow(dead_code)]
            struct Invalid;
            impl<T: ?Sized + $trait> AmbiguousIfImpl<Invalid> for T {}
            let _ = <$t as AmbiguousIfImpl<_>>::some_item;
        }};
    }

    #[test]
    fn a_dek_has_no_debug_clone_or_eq_at_compile_time() {
        assert_not_impl!(Dek, std::fmt::Debug);
        assert_not_impl!(Dek, Clone);
        assert_not_impl!(Dek, PartialEq);
        assert_not_impl!(Dek, std::fmt::Display);
        assert_not_impl!(Dek, serde::Serialize);
    }

    #[test]
    fn generate_gives_fresh_keys_of_the_asked_length() {
        for len in [16, 32] {
            let a = Dek::generate(len).unwrap();
            let b = Dek::generate(len).unwrap();
            assert_eq!(a.len(), len);
            assert_eq!(a.expose_secret().len(), len);
            assert_ne!(a.expose_secret(), b.expose_secret());
            assert!(a.expose_secret().iter().any(|&x| x != 0));
        }
        for len in [0, 1, 15, 17, 24, 31, 33, 64] {
            assert_eq!(
                Dek::generate(len).err(),
                Some(SecretError::WrongLength { len })
            );
        }
    }

    #[test]
    fn transit_plaintext_round_trip() {
        for len in [16, 32] {
            let d = Dek::generate(len).unwrap();
            let b64 = d.to_transit_plaintext();
            assert_eq!(B64.decode(b64.as_bytes()).unwrap(), d.expose_secret());
            let back = Dek::from_transit_plaintext(b64).unwrap();
            assert_eq!(back.expose_secret(), d.expose_secret());
            assert_eq!(back.len(), len);
        }
    }

    #[test]
    fn transit_plaintext_of_the_wrong_length_or_not_base64_is_refused() {
        let enc = |n: usize| Zeroizing::new(B64.encode(vec![7u8; n]));
        assert_eq!(
            Dek::from_transit_plaintext(enc(24)).err(),
            Some(SecretError::WrongLength { len: 24 })
        );
        assert_eq!(
            Dek::from_transit_plaintext(enc(0)).err(),
            Some(SecretError::WrongLength { len: 0 })
        );
        assert!(matches!(
            Dek::from_transit_plaintext(enc(33)).err(),
            Some(SecretError::WrongLength { .. })
        ));
        assert!(matches!(
            Dek::from_transit_plaintext(enc(4096)).err(),
            Some(SecretError::WrongLength { .. })
        ));
        assert_eq!(
            Dek::from_transit_plaintext(Zeroizing::new("not base64!".into())).err(),
            Some(SecretError::NotBase64)
        );
    }

    /// Reading the memory of a dropped `Dek` would need `unsafe` (forbidden in this crate), so
    /// this checks the function `Drop` calls, on a live key.
    #[test]
    fn wipe_what_drop_runs_zeroes_the_whole_buffer() {
        let mut d = Dek::generate(32).unwrap();
        assert!(d.expose_secret().iter().any(|&x| x != 0));
        d.wipe();
        assert!(d.buf.iter().all(|&x| x == 0));
        // A 16-byte key lives in the same 32-byte buffer: all of it is wiped.
        let mut d = Dek::from_transit_plaintext(Zeroizing::new(B64.encode([0xAB; 16]))).unwrap();
        d.buf[16..].fill(0xCD);
        d.wipe();
        assert!(d.buf.iter().all(|&x| x == 0));
    }

    #[test]
    fn a_moved_dek_keeps_its_key_where_it_was() {
        // Moving a `Dek` moves the box pointer: the key bytes do not move (no stray copy).
        let d = Dek::generate(32).unwrap();
        let at = d.expose_secret().as_ptr();
        let moved = Some(d);
        assert_eq!(moved.as_ref().unwrap().expose_secret().as_ptr(), at);
    }

    #[test]
    fn wrapped_dek_parses_vault_ciphertexts_only() {
        let w = WrappedDek::parse("vault:v3:AbCd==").unwrap();
        assert_eq!(w.kek_version(), 3);
        assert_eq!(w.as_str(), "vault:v3:AbCd==");
        assert_eq!(w.to_string(), "vault:v3:AbCd==");
        assert_eq!(format!("{w:?}"), "WrappedDek(\"vault:v3:AbCd==\")");
        for bad in [
            "",
            "vault:v3:",
            "vault:v0:AAAA",
            "vault:v:AAAA",
            "vault:v+3:AAAA",
            "vault:3:AAAA",
            "AAAA",
            "vault:vx:AAAA",
        ] {
            assert_eq!(
                WrappedDek::parse(bad),
                Err(SecretError::NotTransitCiphertext),
                "{bad:?}"
            );
        }
    }
}
