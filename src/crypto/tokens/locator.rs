//! Locators of random opaque tokens (pure): the token is a keyed permutation of where its row
//! is, so the store can keep new random tokens in creation order (docs/TOKENS.md#storage).
//!
//! A random opaque token used to be 16 random bytes, stored as its keyed hash: every new token
//! inserted a random key into the store's token index, one random leaf page per token, which
//! the SQLite WAL, its checkpoints and its page reads all paid for (bench/RESULTS.md). Now the
//! 16 bytes are one AES-256 block encryption, under a keyspace key, of a **locator**:
//!
//! ```text
//! locator = creation time (ms, 6 bytes, big-endian) || "pl" (2 bytes) || 8 random bytes
//! token   = "pgt_" + base64url(AES-256_k(locator))     (the same shape as before)
//! stored  = "r" + hex(locator)                          (33 characters)
//! ```
//!
//! - The stored form sorts by creation time: new tokens append at the end of the index.
//! - Without the key, neither form gives the other: like a keyed hash, the store holds no
//!   token, and a token says nothing of its time or of any other token (the permutation of a
//!   unique block is indistinguishable from random bytes).
//! - Detokenize decrypts the token's 16 bytes; when the result carries the `"pl"` mark and a
//!   time in the window, it looks the row up by the stored form, and otherwise (tokens made
//!   before locators, 1 in ~10^7 of which pass the check by chance) by the keyed hash.
//! - Hex of a keyed hash is `[0-9a-f]{64}`: the two stored forms never collide.

use aes::Aes256;
use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

/// The mark inside every locator (bytes 6..8).
const MARK: [u8; 2] = *b"pl";
/// Locator times are kept within [2020-01-01, 2100-01-01) in ms: a clock outside is clamped
/// when a token is made, and a decrypted block outside is not a locator.
const MIN_MS: u64 = 1_577_836_800_000;
const MAX_MS: u64 = 4_102_444_800_000;
/// First character of a stored locator (a keyed hash is lower-case hex).
const STORED_PREFIX: char = 'r';

/// The keyspace key of the permutation (AES-256; zeroized on drop).
pub struct LocatorKey(Aes256);

impl LocatorKey {
    /// The key from 32 bytes of keyspace key material.
    pub fn new(raw: &[u8; 32]) -> Self {
        Self(Aes256::new(raw.into()))
    }

    /// A new random token's 16 bytes and its stored form, for creation time `now_ms` and 8
    /// random bytes.
    pub fn draw(&self, now_ms: u64, random: &[u8; 8]) -> ([u8; 16], String) {
        let mut loc = [0u8; 16];
        loc[..6].copy_from_slice(&now_ms.clamp(MIN_MS, MAX_MS - 1).to_be_bytes()[2..]);
        loc[6..8].copy_from_slice(&MARK);
        loc[8..].copy_from_slice(random);
        let mut block = loc.into();
        self.0.encrypt_block(&mut block);
        (block.into(), stored(&loc))
    }

    /// The stored form of a token's 16 bytes, if they encrypt a locator; `None` for any other
    /// token (one made before locators: look it up by its keyed hash).
    pub fn find(&self, token_bytes: &[u8; 16]) -> Option<String> {
        let mut block = (*token_bytes).into();
        self.0.decrypt_block(&mut block);
        let loc: [u8; 16] = block.into();
        let mut ms = [0u8; 8];
        ms[2..].copy_from_slice(&loc[..6]);
        let ms = u64::from_be_bytes(ms);
        (loc[6..8] == MARK && (MIN_MS..MAX_MS).contains(&ms)).then(|| stored(&loc))
    }
}

impl std::fmt::Debug for LocatorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocatorKey(..)")
    }
}

fn stored(loc: &[u8; 16]) -> String {
    let mut s = String::with_capacity(33);
    s.push(STORED_PREFIX);
    s.push_str(&hex::encode(loc));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_796_000_000_000; // 2026-12

    #[test]
    fn a_drawn_token_finds_its_stored_form_and_only_with_its_key() {
        let k = LocatorKey::new(&[7; 32]);
        let (t, s) = k.draw(NOW, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(k.find(&t).as_deref(), Some(s.as_str()));
        assert_eq!(s.len(), 33);
        assert!(s.starts_with('r'));
        assert_eq!(
            LocatorKey::new(&[8; 32]).find(&t),
            None,
            "another keyspace's key"
        );
    }

    #[test]
    fn stored_forms_sort_by_creation_time_and_tokens_do_not() {
        let k = LocatorKey::new(&[7; 32]);
        let drawn: Vec<([u8; 16], String)> = (0..64u64)
            .map(|i| {
                k.draw(
                    NOW + i,
                    &i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes(),
                )
            })
            .collect();
        assert!(drawn.windows(2).all(|w| w[0].1 < w[1].1), "appends");
        let tokens_sorted = drawn.windows(2).filter(|w| w[0].0 < w[1].0).count();
        assert!(
            (10..54).contains(&tokens_sorted),
            "{tokens_sorted} of 63 in order"
        );
        // Same millisecond, same random bytes but one: unrelated tokens.
        let (a, _) = k.draw(NOW, &[0; 8]);
        let (b, _) = k.draw(NOW, &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(a.iter().zip(b).filter(|(x, y)| **x != *y).count() > 8);
    }

    #[test]
    fn random_bytes_are_not_taken_for_a_locator() {
        // Tokens made before locators are 16 random bytes: the mark and the time window turn
        // away all but ~1 in 10^7 of them (then the keyed hash is looked up as well).
        let k = LocatorKey::new(&[7; 32]);
        let mut stream = crate::crypto::tokens::derive::Stream::from_seed(&[3; 32]);
        let found = (0..5_000)
            .filter(|_| {
                let mut b = [0u8; 16];
                stream.fill(&mut b);
                k.find(&b).is_some()
            })
            .count();
        assert_eq!(found, 0);
    }

    #[test]
    fn a_clock_outside_the_window_still_makes_a_findable_token() {
        let k = LocatorKey::new(&[7; 32]);
        for ms in [0, MIN_MS - 1, MAX_MS, u64::MAX] {
            let (t, s) = k.draw(ms, &[9; 8]);
            assert_eq!(k.find(&t), Some(s));
        }
    }
}
