//! The one seam to FF1 (NIST SP 800-38G) format-preserving encryption: the `fpe` crate over
//! AES-256 (`aes` crate). Pure; pinned by the NIST sample vectors in the tests below.

use aes::Aes256;
use fpe::ff1::{FF1, FlexibleNumeralString};

/// Smallest domain (radix^length) FF1 is used for (NIST SP 800-38G Rev. 1).
pub const MIN_DOMAIN: u64 = 1_000_000;

/// Why FF1 refused an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Ff1Error {
    /// Radix outside 2..=2^16.
    #[error("invalid radix")]
    Radix,
    /// Too short (domain below 10^6), too long, or a numeral not below the radix.
    #[error("invalid numeral string")]
    Numerals,
}

fn cipher(key: &[u8; 32], radix: u32) -> Result<FF1<Aes256>, Ff1Error> {
    // `FF1::new` panics only on a key of the wrong length; `key` is exactly the AES-256 size.
    FF1::<Aes256>::new(key, radix).map_err(|_| Ff1Error::Radix)
}

/// Whether `radix^len` reaches [`MIN_DOMAIN`].
pub fn domain_ok(radix: u32, len: usize) -> bool {
    let mut d: u64 = 1;
    for _ in 0..len {
        d = d.saturating_mul(u64::from(radix));
        if d >= MIN_DOMAIN {
            return true;
        }
    }
    false
}

/// FF1-encrypts numerals (each below `radix`) under an AES-256 key and a tweak.
pub fn encrypt(
    key: &[u8; 32],
    radix: u32,
    tweak: &[u8],
    numerals: &[u16],
) -> Result<Vec<u16>, Ff1Error> {
    let ns = FlexibleNumeralString::from(numerals.to_vec());
    let out = cipher(key, radix)?
        .encrypt(tweak, &ns)
        .map_err(|_| Ff1Error::Numerals)?;
    Ok(out.into())
}

/// Inverse of [`encrypt`].
pub fn decrypt(
    key: &[u8; 32],
    radix: u32,
    tweak: &[u8],
    numerals: &[u16],
) -> Result<Vec<u16>, Ff1Error> {
    let ns = FlexibleNumeralString::from(numerals.to_vec());
    let out = cipher(key, radix)?
        .decrypt(tweak, &ns)
        .map_err(|_| Ff1Error::Numerals)?;
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    // NIST SP 800-38G sample key for AES-256 (FF1samples.pdf, samples 7-9).
    const KEY: [u8; 32] = [
        0x2B, 0x7E, 0x15, 0x16, 0x28, 0xAE, 0xD2, 0xA6, 0xAB, 0xF7, 0x15, 0x88, 0x09, 0xCF, 0x4F,
        0x3C, 0xEF, 0x43, 0x59, 0xD8, 0xD5, 0x80, 0xAA, 0x4F, 0x7F, 0x03, 0x6D, 0x6F, 0x04, 0xFC,
        0x6A, 0x94,
    ];

    fn check(radix: u32, tweak: &[u8], pt: &[u16], ct: &[u16]) {
        assert_eq!(encrypt(&KEY, radix, tweak, pt).unwrap(), ct, "encrypt");
        assert_eq!(decrypt(&KEY, radix, tweak, ct).unwrap(), pt, "decrypt");
    }

    #[test]
    fn nist_sample_7_radix_10_empty_tweak() {
        check(
            10,
            &[],
            &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            &[6, 6, 5, 7, 6, 6, 7, 0, 0, 9],
        );
    }

    #[test]
    fn nist_sample_8_radix_10_with_tweak() {
        check(
            10,
            &[0x39, 0x38, 0x37, 0x36, 0x35, 0x34, 0x33, 0x32, 0x31, 0x30],
            &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            &[1, 0, 0, 1, 6, 2, 3, 4, 6, 3],
        );
    }

    #[test]
    fn nist_sample_9_radix_36() {
        check(
            36,
            &[
                0x37, 0x37, 0x37, 0x37, 0x70, 0x71, 0x72, 0x73, 0x37, 0x37, 0x37,
            ],
            &[
                0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18,
            ],
            &[
                33, 28, 8, 10, 0, 10, 35, 17, 2, 10, 31, 34, 10, 21, 34, 35, 30, 32, 13,
            ],
        );
    }

    #[test]
    fn refuses_small_domains_and_bad_numerals() {
        assert!(domain_ok(10, 6) && !domain_ok(10, 5));
        assert!(domain_ok(62, 4) && !domain_ok(62, 3));
        assert_eq!(
            encrypt(&KEY, 10, &[], &[1, 2, 3, 4, 5]),
            Err(Ff1Error::Numerals)
        );
        assert_eq!(
            encrypt(&KEY, 10, &[], &[1, 2, 3, 4, 5, 10]),
            Err(Ff1Error::Numerals)
        );
        assert_eq!(encrypt(&KEY, 1, &[], &[0; 30]), Err(Ff1Error::Radix));
    }
}
