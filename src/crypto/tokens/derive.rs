//! Keyed derivations of tokenisation (pure): deterministic seeds, value and token hashes, and
//! the byte stream that turns a seed into token characters.
//!
//! Every input is length-prefixed and every use has its own label, so no two distinct
//! (label, field, format, scope, value, attempt) tuples hash the same input. The [`Scope`]
//! decides whose records a deterministic token joins: one subject's, or every subject's.

use aws_lc_rs::hmac;
use zeroize::Zeroizing;

fn lp(ctx: &mut hmac::Context, part: &[u8]) {
    ctx.update(&(part.len() as u32).to_be_bytes());
    ctx.update(part);
}

fn tagged(
    key: &hmac::Key,
    label: &[u8],
    field: &str,
    format: &str,
    scope: &[u8],
    value: &str,
) -> hmac::Context {
    let mut ctx = hmac::Context::with_key(key);
    lp(&mut ctx, label);
    lp(&mut ctx, field.as_bytes());
    lp(&mut ctx, format.as_bytes());
    lp(&mut ctx, scope);
    lp(&mut ctx, value.as_bytes());
    ctx
}

/// Whose records a deterministic token joins: the `scope` input of the seed and of the value
/// hash (docs/TOKENS.md, "Modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// One subject's records (`DETERMINISTIC`, and every deterministic FF1 token): the scope
    /// is the subject reference (hex, never empty), so two subjects never share a token and
    /// a token dies with its subject.
    Subject(&'a str),
    /// Every subject's records in the keyspace (`DETERMINISTIC_JOIN`): the empty scope, which
    /// is also the scope of the deterministic opaque/DIGITS/EMAIL tokens made before
    /// per-subject scope (security review finding 9), so those are found again.
    Join,
}

impl Scope<'_> {
    /// The bytes bound into the derivations.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Scope::Subject(subject_ref) => {
                debug_assert!(!subject_ref.is_empty(), "a subject scope is never empty");
                subject_ref.as_bytes()
            }
            Scope::Join => b"",
        }
    }
}

/// The seed of the `attempt`-th deterministic token of a value in `scope`.
pub fn deterministic_seed(
    key: &hmac::Key,
    field: &str,
    format: &str,
    scope: Scope<'_>,
    value: &str,
    attempt: u32,
) -> Zeroizing<[u8; 32]> {
    let mut ctx = tagged(
        key,
        b"piiguard/v1/token/seed",
        field,
        format,
        scope.bytes(),
        value,
    );
    ctx.update(&attempt.to_be_bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// Keyed hash of a value in `scope`, stored to find a deterministic token again (hex).
pub fn value_hash(
    key: &hmac::Key,
    field: &str,
    format: &str,
    scope: Scope<'_>,
    value: &str,
) -> String {
    hex::encode(
        tagged(
            key,
            b"piiguard/v1/token/value",
            field,
            format,
            scope.bytes(),
            value,
        )
        .sign(),
    )
}

/// Keyed hash of a token: the only form in which a token is stored (hex).
pub fn token_hash(key: &hmac::Key, token: &str) -> String {
    let mut ctx = hmac::Context::with_key(key);
    lp(&mut ctx, b"piiguard/v1/token/lookup");
    ctx.update(token.as_bytes());
    hex::encode(ctx.sign())
}

/// A pseudo-random byte stream: HMAC-SHA256(seed, counter) blocks. From a random seed it is
/// a random stream; from a deterministic seed, a deterministic one.
pub struct Stream {
    key: hmac::Key,
    counter: u64,
    block: Zeroizing<[u8; 32]>,
    pos: usize,
}

impl Stream {
    /// A stream from a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, seed),
            counter: 0,
            block: Zeroizing::new([0u8; 32]),
            pos: 32,
        }
    }

    /// A stream seeded from the OS CSPRNG.
    pub fn random() -> Result<Self, aws_lc_rs::error::Unspecified> {
        let mut seed = Zeroizing::new([0u8; 32]);
        aws_lc_rs::rand::fill(&mut seed[..])?;
        Ok(Self::from_seed(&seed))
    }

    /// The next byte.
    pub fn byte(&mut self) -> u8 {
        if self.pos == 32 {
            let tag = hmac::sign(&self.key, &self.counter.to_be_bytes());
            self.block.copy_from_slice(tag.as_ref());
            self.counter += 1;
            self.pos = 0;
        }
        let b = self.block[self.pos];
        self.pos += 1;
        b
    }

    /// Fills `out`.
    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.byte();
        }
    }

    /// A uniform number below `n` (1..=256), by rejection sampling.
    pub fn below(&mut self, n: u16) -> u16 {
        debug_assert!((1..=256).contains(&n));
        let limit = 256 - (256 % n);
        loop {
            let b = u16::from(self.byte());
            if b < limit {
                return b % n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivations_are_keyed_and_separated() {
        let k1 = hmac::Key::new(hmac::HMAC_SHA256, &[1; 32]);
        let k2 = hmac::Key::new(hmac::HMAC_SHA256, &[2; 32]);
        let s = |k: &hmac::Key, f: &str, v: &str, a: u32| {
            *deterministic_seed(k, f, "opaque", Scope::Join, v, a)
        };
        assert_eq!(s(&k1, "email", "a", 0), s(&k1, "email", "a", 0));
        assert_ne!(s(&k1, "email", "a", 0), s(&k2, "email", "a", 0));
        assert_ne!(s(&k1, "email", "a", 0), s(&k1, "phone", "a", 0));
        assert_ne!(s(&k1, "email", "a", 0), s(&k1, "email", "a", 1));
        // Length prefixes: moving a byte between field and value changes the seed.
        assert_ne!(s(&k1, "ab", "c", 0), s(&k1, "a", "bc", 0));
        assert_ne!(
            value_hash(&k1, "f", "opaque", Scope::Join, "v"),
            value_hash(&k1, "f", "digits:0", Scope::Join, "v")
        );
        assert_ne!(token_hash(&k1, "t"), token_hash(&k2, "t"));
    }

    #[test]
    fn tokens_scope_separates_subjects_and_join_keeps_the_old_derivation() {
        let k = hmac::Key::new(hmac::HMAC_SHA256, &[1; 32]);
        let (a, b) = ("ab".repeat(32), "cd".repeat(32));
        let seed = |scope| hex::encode(*deterministic_seed(&k, "email", "opaque", scope, "a", 0));
        let vh = |scope| value_hash(&k, "email", "opaque", scope, "a");
        // Per subject: one subject's token again, another subject's differs, and neither is
        // the join token.
        assert_eq!(seed(Scope::Subject(&a)), seed(Scope::Subject(&a)));
        assert_ne!(seed(Scope::Subject(&a)), seed(Scope::Subject(&b)));
        assert_ne!(seed(Scope::Subject(&a)), seed(Scope::Join));
        assert_ne!(vh(Scope::Subject(&a)), vh(Scope::Subject(&b)));
        assert_ne!(vh(Scope::Subject(&a)), vh(Scope::Join));
        // Pinned (computed independently): the join scope is the empty scope every
        // deterministic opaque/DIGITS/EMAIL token had before per-subject scope, so those are
        // found again; a subject scope is the subject reference, as FF1 tokens always had.
        assert_eq!(
            seed(Scope::Join),
            "4da67f39aa40956051b46fb539c063435dc7ee3760487fa1626a8df148441266"
        );
        assert_eq!(
            vh(Scope::Join),
            "50e159ea531c1e9ecf16d1b282d33add164ebd75d7a61a96e15697f1f79052a4"
        );
        assert_eq!(
            hex::encode(*deterministic_seed(
                &k,
                "acct",
                "ff1",
                Scope::Subject(&a),
                "ACCT-1",
                0
            )),
            "62932b1d3c5c8be518bea2c960d403c5841b34a84865b59bc86b7db29dde352f"
        );
    }

    #[test]
    fn stream_is_deterministic_and_uniform_enough() {
        let mut a = Stream::from_seed(&[7; 32]);
        let mut b = Stream::from_seed(&[7; 32]);
        let mut counts = [0u32; 10];
        for _ in 0..10_000 {
            let x = a.below(10);
            assert_eq!(x, b.below(10));
            counts[x as usize] += 1;
        }
        // Each digit appears ~1,000 times; a broken sampler (e.g. always 0) fails this.
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
