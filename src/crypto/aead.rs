//! The AEAD seam: every AES-GCM operation of piiguard goes through these two functions, so a
//! different backend can be measured against this one by changing one file.
//!
//! Backend: aws-lc-rs (the same library that already provides rustls' crypto in this process;
//! constant-time AES-NI/CLMUL code).

use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// Length of the GCM nonce in bytes.
pub const NONCE_LEN: usize = 12;
/// Length of the GCM tag in bytes.
pub const TAG_LEN: usize = 16;

/// Supported data-encryption algorithms. The discriminant is the on-wire algorithm byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Algorithm {
    /// AES-256-GCM, the default.
    Aes256Gcm = 1,
    /// AES-128-GCM, allowed per keyspace.
    Aes128Gcm = 2,
}

impl Algorithm {
    /// Parses the on-wire algorithm byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Aes256Gcm),
            2 => Some(Self::Aes128Gcm),
            _ => None,
        }
    }

    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            Self::Aes256Gcm => 32,
            Self::Aes128Gcm => 16,
        }
    }

    /// The configuration name (`aes-256-gcm`, `aes-128-gcm`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Aes256Gcm => "aes-256-gcm",
            Self::Aes128Gcm => "aes-128-gcm",
        }
    }

    fn backend(self) -> &'static aws_lc_rs::aead::Algorithm {
        match self {
            Self::Aes256Gcm => &AES_256_GCM,
            Self::Aes128Gcm => &AES_128_GCM,
        }
    }
}

/// An algorithm name that is neither `aes-256-gcm` nor `aes-128-gcm`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown algorithm {0:?} (expected aes-256-gcm or aes-128-gcm)")]
pub struct UnknownAlgorithm(pub String);

impl std::str::FromStr for Algorithm {
    type Err = UnknownAlgorithm;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "aes-256-gcm" => Ok(Self::Aes256Gcm),
            "aes-128-gcm" => Ok(Self::Aes128Gcm),
            other => Err(UnknownAlgorithm(other.to_string())),
        }
    }
}

/// The AEAD operation failed: wrong key, nonce, AAD, or modified ciphertext/tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AeadError;

fn key(alg: Algorithm, key: &[u8]) -> Result<LessSafeKey, AeadError> {
    let unbound = UnboundKey::new(alg.backend(), key).map_err(|_| AeadError)?;
    Ok(LessSafeKey::new(unbound))
}

/// An AES-GCM key with its schedule and GHASH table computed once (~0.2 us, more than the
/// encryption of a short field), for several operations with one DEK: the consecutive items
/// of a batch that share a key, or every use of a DEK the cache keeps it for (a bounded number
/// of them: AWS-LC's context is ~600 bytes per key; `keys::cache`). AWS-LC clears the context
/// when it is freed. No `Debug`, no `Clone`.
pub struct PreparedKey(LessSafeKey);

impl PreparedKey {
    /// Expands `key_bytes` for `alg`.
    pub fn new(alg: Algorithm, key_bytes: &[u8]) -> Result<Self, AeadError> {
        key(alg, key_bytes).map(Self)
    }

    /// [`seal_in_place`] with this key.
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadError> {
        let tag = self
            .0
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(aad),
                in_out,
            )
            .map_err(|_| AeadError)?;
        tag.as_ref().try_into().map_err(|_| AeadError)
    }

    /// [`open`] with this key.
    pub fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<usize, AeadError> {
        let pt = self
            .0
            .open_in_place(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), in_out)
            .map_err(|_| AeadError)?;
        Ok(pt.len())
    }
}

/// Encrypts `in_out` in place and appends the tag.
pub fn seal(
    alg: Algorithm,
    key_bytes: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    in_out: &mut Vec<u8>,
) -> Result<(), AeadError> {
    let k = key(alg, key_bytes)?;
    k.seal_in_place_append_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), in_out)
        .map_err(|_| AeadError)
}

/// Encrypts `in_out` in place and returns the tag: lets the caller encrypt inside a buffer it
/// already owns (the envelope) instead of through a separate allocation and copy.
pub fn seal_in_place(
    alg: Algorithm,
    key_bytes: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    in_out: &mut [u8],
) -> Result<[u8; TAG_LEN], AeadError> {
    PreparedKey::new(alg, key_bytes)?.seal_in_place(nonce, aad, in_out)
}

/// Decrypts `in_out` (ciphertext followed by tag) in place; returns the plaintext length.
pub fn open(
    alg: Algorithm,
    key_bytes: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    in_out: &mut [u8],
) -> Result<usize, AeadError> {
    PreparedKey::new(alg, key_bytes)?.open(nonce, aad, in_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // NIST GCM test vector (gcmEncryptExtIV256.rsp, Count = 0 with 128-bit tag, PTlen = 128).
    #[test]
    fn aes256_gcm_known_answer() {
        let key = hex::decode("31bdadd96698c204aa9ce1448ea94ae1fb4a9a0b3c9d773b51bb1822666b8f22")
            .unwrap();
        let nonce: [u8; 12] = hex::decode("0d18e06c7c725ac9e362e1ce")
            .unwrap()
            .try_into()
            .unwrap();
        let mut buf = hex::decode("2db5168e932556f8089a0622981d017d").unwrap();
        seal(Algorithm::Aes256Gcm, &key, &nonce, &[], &mut buf).unwrap();
        assert_eq!(
            hex::encode(&buf),
            "fa4362189661d163fcd6a56d8bf0405ad636ac1bbedd5cc3ee727dc2ab4a9489"
        );
        let n = open(Algorithm::Aes256Gcm, &key, &nonce, &[], &mut buf).unwrap();
        assert_eq!(hex::encode(&buf[..n]), "2db5168e932556f8089a0622981d017d");
    }

    #[test]
    fn separate_tag_matches_appended_tag() {
        let key = [9u8; 32];
        let nonce = [3u8; 12];
        let mut appended = b"sixty-four bytes or so of plaintext".to_vec();
        seal(Algorithm::Aes256Gcm, &key, &nonce, b"ad", &mut appended).unwrap();
        let mut in_place = b"sixty-four bytes or so of plaintext".to_vec();
        let tag = seal_in_place(Algorithm::Aes256Gcm, &key, &nonce, b"ad", &mut in_place).unwrap();
        in_place.extend_from_slice(&tag);
        assert_eq!(in_place, appended);
    }

    #[test]
    fn prepared_key_matches_one_shot_calls() {
        let key = [5u8; 32];
        let k = PreparedKey::new(Algorithm::Aes256Gcm, &key).unwrap();
        for (i, msg) in [&b"a"[..], b"two", b"a longer message of some bytes"]
            .iter()
            .enumerate()
        {
            let nonce = [i as u8; 12];
            let mut one = msg.to_vec();
            let t1 = seal_in_place(Algorithm::Aes256Gcm, &key, &nonce, b"ad", &mut one).unwrap();
            let mut prep = msg.to_vec();
            let t2 = k.seal_in_place(&nonce, b"ad", &mut prep).unwrap();
            assert_eq!((one.clone(), t1), (prep, t2));
            one.extend_from_slice(&t1);
            let n = k.open(&nonce, b"ad", &mut one).unwrap();
            assert_eq!(&one[..n], *msg);
        }
    }

    /// Differential tests against RustCrypto's `aes-gcm` (a dev-dependency only): an
    /// independent implementation (software AES and GHASH/POLYVAL, no AWS-LC code) must open
    /// what aws-lc-rs seals and the reverse, byte for byte, for both key sizes, many lengths
    /// (empty, partial blocks, block edges, several blocks) and AADs; and both must refuse a
    /// ciphertext, tag, AAD or nonce with one bit flipped.
    mod differential {
        use super::*;
        use aes_gcm::aead::{Aead, KeyInit, Payload};

        const ALGS: [Algorithm; 2] = [Algorithm::Aes128Gcm, Algorithm::Aes256Gcm];
        const LENS: [usize; 14] = [0, 1, 12, 15, 16, 17, 31, 32, 33, 63, 64, 255, 1000, 4099];
        const AAD_LENS: [usize; 6] = [0, 1, 13, 16, 17, 200];

        /// Deterministic bytes (xorshift64*), so a failure names a reproducible case.
        fn bytes(seed: u64, n: usize) -> Vec<u8> {
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            (0..n)
                .map(|_| {
                    x ^= x >> 12;
                    x ^= x << 25;
                    x ^= x >> 27;
                    (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
                })
                .collect()
        }

        fn rc_seal(alg: Algorithm, key: &[u8], nonce: &[u8; 12], aad: &[u8], pt: &[u8]) -> Vec<u8> {
            let p = Payload { msg: pt, aad };
            let n = (*nonce).into();
            match alg {
                Algorithm::Aes128Gcm => aes_gcm::Aes128Gcm::new_from_slice(key)
                    .unwrap()
                    .encrypt(&n, p),
                Algorithm::Aes256Gcm => aes_gcm::Aes256Gcm::new_from_slice(key)
                    .unwrap()
                    .encrypt(&n, p),
            }
            .unwrap()
        }

        fn rc_open(
            alg: Algorithm,
            key: &[u8],
            nonce: &[u8; 12],
            aad: &[u8],
            ct: &[u8],
        ) -> Option<Vec<u8>> {
            let p = Payload { msg: ct, aad };
            let n = (*nonce).into();
            match alg {
                Algorithm::Aes128Gcm => aes_gcm::Aes128Gcm::new_from_slice(key)
                    .unwrap()
                    .decrypt(&n, p),
                Algorithm::Aes256Gcm => aes_gcm::Aes256Gcm::new_from_slice(key)
                    .unwrap()
                    .decrypt(&n, p),
            }
            .ok()
        }

        fn ours_open(
            alg: Algorithm,
            key: &[u8],
            nonce: &[u8; 12],
            aad: &[u8],
            ct: &[u8],
        ) -> Option<Vec<u8>> {
            let mut buf = ct.to_vec();
            let n = open(alg, key, nonce, aad, &mut buf).ok()?;
            buf.truncate(n);
            Some(buf)
        }

        /// Every (algorithm, length, AAD length) case: key, nonce, plaintext, AAD.
        fn cases() -> impl Iterator<Item = (Algorithm, Vec<u8>, [u8; 12], Vec<u8>, Vec<u8>)> {
            ALGS.into_iter().flat_map(move |alg| {
                LENS.into_iter().flat_map(move |len| {
                    AAD_LENS.into_iter().map(move |aad_len| {
                        let s = (alg as u64) << 40 | (len as u64) << 16 | aad_len as u64;
                        let key = bytes(s ^ 0xA, alg.key_len());
                        let nonce: [u8; 12] = bytes(s ^ 0xB, 12).try_into().unwrap();
                        (
                            alg,
                            key,
                            nonce,
                            bytes(s ^ 0xC, len),
                            bytes(s ^ 0xD, aad_len),
                        )
                    })
                })
            })
        }

        #[test]
        fn aes_gcm_opens_what_aws_lc_seals() {
            let mut n = 0;
            for (alg, key, nonce, pt, aad) in cases() {
                let mut ours = pt.clone();
                seal(alg, &key, &nonce, &aad, &mut ours).unwrap();
                assert_eq!(ours.len(), pt.len() + TAG_LEN);
                let opened = rc_open(alg, &key, &nonce, &aad, &ours);
                assert_eq!(opened.as_deref(), Some(&pt[..]), "{alg:?} len {}", pt.len());
                // The separate-tag and prepared-key forms make the same bytes.
                let mut in_place = pt.clone();
                let tag = seal_in_place(alg, &key, &nonce, &aad, &mut in_place).unwrap();
                in_place.extend_from_slice(&tag);
                assert_eq!(in_place, ours);
                n += 1;
            }
            assert_eq!(n, ALGS.len() * LENS.len() * AAD_LENS.len());
        }

        #[test]
        fn aws_lc_opens_what_aes_gcm_seals() {
            for (alg, key, nonce, pt, aad) in cases() {
                let theirs = rc_seal(alg, &key, &nonce, &aad, &pt);
                let mut ours = pt.clone();
                seal(alg, &key, &nonce, &aad, &mut ours).unwrap();
                assert_eq!(
                    theirs,
                    ours,
                    "{alg:?} len {}: same ciphertext and tag",
                    pt.len()
                );
                assert_eq!(
                    ours_open(alg, &key, &nonce, &aad, &theirs).as_deref(),
                    Some(&pt[..]),
                    "{alg:?} len {} aad {}",
                    pt.len(),
                    aad.len()
                );
                let k = PreparedKey::new(alg, &key).unwrap();
                let mut buf = theirs.clone();
                let m = k.open(&nonce, &aad, &mut buf).unwrap();
                assert_eq!(&buf[..m], &pt[..]);
            }
        }

        #[test]
        fn a_flipped_bit_is_refused_by_both() {
            for (alg, key, nonce, pt, aad) in cases() {
                let ct = rc_seal(alg, &key, &nonce, &aad, &pt);
                // Ciphertext body (first and last byte, if any) and tag (first and last byte).
                let mut positions = vec![pt.len(), ct.len() - 1];
                if !pt.is_empty() {
                    positions.extend([0, pt.len() - 1]);
                }
                for pos in positions {
                    for bit in [0u8, 7] {
                        let mut bad = ct.clone();
                        bad[pos] ^= 1 << bit;
                        assert_eq!(
                            rc_open(alg, &key, &nonce, &aad, &bad),
                            None,
                            "aes-gcm {pos}"
                        );
                        assert_eq!(
                            ours_open(alg, &key, &nonce, &aad, &bad),
                            None,
                            "aws-lc {pos}"
                        );
                    }
                }
                // AAD, nonce and key.
                let mut bad_aad = aad.clone();
                match bad_aad.first_mut() {
                    Some(b) => *b ^= 0x80,
                    None => bad_aad.push(0),
                }
                let mut bad_nonce = nonce;
                bad_nonce[11] ^= 1;
                let mut bad_key = key.clone();
                bad_key[0] ^= 1;
                for (k, n, a) in [
                    (&key, &nonce, &bad_aad),
                    (&key, &bad_nonce, &aad),
                    (&bad_key, &nonce, &aad),
                ] {
                    assert_eq!(rc_open(alg, k, n, a, &ct), None);
                    assert_eq!(ours_open(alg, k, n, a, &ct), None);
                }
                // A truncated tag.
                if ct.len() > TAG_LEN {
                    let short = &ct[..ct.len() - 1];
                    assert_eq!(rc_open(alg, &key, &nonce, &aad, short), None);
                    assert_eq!(ours_open(alg, &key, &nonce, &aad, short), None);
                }
            }
        }
    }

    #[test]
    fn tampering_is_detected() {
        let key = [7u8; 16];
        let nonce = [1u8; 12];
        let mut buf = b"hello".to_vec();
        seal(Algorithm::Aes128Gcm, &key, &nonce, b"aad", &mut buf).unwrap();
        let mut t = buf.clone();
        t[0] ^= 1;
        assert_eq!(
            open(Algorithm::Aes128Gcm, &key, &nonce, b"aad", &mut t),
            Err(AeadError)
        );
        let mut t = buf.clone();
        assert_eq!(
            open(Algorithm::Aes128Gcm, &key, &nonce, b"aaX", &mut t),
            Err(AeadError)
        );
    }
}
