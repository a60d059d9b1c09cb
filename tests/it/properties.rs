//! Property tests (proptest) of what parses outside input: the ciphertext envelope (round trip
//! for any sizes and contexts; any single-bit change, truncation or extension refused), token
//! formats (shapes kept, token checks total) and the policy and config parsers (never panic,
//! on arbitrary text and on mutations of the shipped examples).
//!
//! Case counts are bounded so the suite stays quick; `PROPTEST_CASES=<n>` runs more.

use std::collections::BTreeMap;

use piiguard::access::policy::Policy;
use piiguard::crypto::aead::Algorithm;
use piiguard::crypto::envelope::{self, DerivedKeys, EnvelopeError, KeyId};
use piiguard::crypto::tokens::derive::Stream;
use piiguard::crypto::tokens::format::{self, Ff1Params, Format};
use proptest::prelude::*;

fn cases(n: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn alg() -> impl Strategy<Value = Algorithm> {
    prop_oneof![Just(Algorithm::Aes128Gcm), Just(Algorithm::Aes256Gcm)]
}

fn keys(alg: Algorithm, seed: u8, keyspace: &str) -> (DerivedKeys, KeyId) {
    let kid = KeyId([seed ^ 0x5a; 16]);
    let dek = vec![seed; alg.key_len()];
    (
        DerivedKeys::derive(alg, &dek, keyspace, &kid, 1).unwrap(),
        kid,
    )
}

/// Field names and context pairs, including empty and non-ASCII strings.
fn context() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec((".{0,12}", ".{0,40}"), 0..5)
}

fn ctx_map(pairs: &[(String, String)]) -> BTreeMap<&str, &str> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Opens `ct` (binary or text form) as piiguard does.
fn open(
    ct: &[u8],
    keys: &DerivedKeys,
    field: &str,
    ctx: &BTreeMap<&str, &str>,
) -> Result<Vec<u8>, EnvelopeError> {
    let mut scratch = Vec::new();
    let parsed = envelope::parse(ct, &mut scratch)?;
    parsed.open(keys, field, ctx).map(|p| p.to_vec())
}

proptest! {
    #![proptest_config(cases(96))]

    #[test]
    fn envelope_round_trips_any_size_field_and_context(
        alg in alg(),
        seed in any::<u8>(),
        keyspace in "[a-z][a-z0-9_-]{0,40}",
        field in ".{0,24}",
        pairs in context(),
        pt in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let (k, kid) = keys(alg, seed, &keyspace);
        let ctx = ctx_map(&pairs);
        let ct = envelope::seal(&k, &keyspace, &kid, 1, &field, &ctx, &pt).unwrap();
        prop_assert_eq!(open(&ct, &k, &field, &ctx).unwrap(), pt.clone());
        let text = envelope::to_text(&ct);
        prop_assert_eq!(open(text.as_bytes(), &k, &field, &ctx).unwrap(), pt);
        // Another field or another context value does not open it.
        let other_field = format!("{field}x");
        prop_assert!(open(&ct, &k, &other_field, &ctx).is_err());
        let mut more = pairs.clone();
        more.push(("\u{0}extra".into(), "1".into()));
        prop_assert!(open(&ct, &k, &field, &ctx_map(&more)).is_err());
    }

    #[test]
    fn any_single_bit_change_truncation_or_extension_of_a_ciphertext_is_refused(
        alg in alg(),
        field in "[a-z]{1,12}",
        pairs in context(),
        pt in proptest::collection::vec(any::<u8>(), 0..256),
        bit in any::<proptest::sample::Index>(),
        cut in any::<proptest::sample::Index>(),
        extra in proptest::collection::vec(any::<u8>(), 1..24),
    ) {
        let (k, kid) = keys(alg, 7, "orders");
        let ctx = ctx_map(&pairs);
        let ct = envelope::seal(&k, "orders", &kid, 1, &field, &ctx, &pt).unwrap();
        let mut flipped = ct.clone();
        let b = bit.index(ct.len() * 8);
        flipped[b / 8] ^= 1 << (b % 8);
        prop_assert!(open(&flipped, &k, &field, &ctx).is_err(), "bit {} flipped", b);
        let short = &ct[..cut.index(ct.len())];
        prop_assert!(open(short, &k, &field, &ctx).is_err(), "cut to {}", short.len());
        let mut long = ct.clone();
        long.extend_from_slice(&extra);
        prop_assert!(open(&long, &k, &field, &ctx).is_err(), "extended by {}", extra.len());
        // The same in the text form: one character changed, cut or extended.
        let text = envelope::to_text(&ct);
        let i = 4 + cut.index(text.len() - 4);
        let mut t = text.clone().into_bytes();
        t[i] = if t[i] == b'A' { b'B' } else { b'A' };
        prop_assert!(open(&t, &k, &field, &ctx).is_err(), "text char {} changed", i);
        prop_assert!(open(&text.as_bytes()[..i], &k, &field, &ctx).is_err());
        let longer = format!("{text}AA");
        prop_assert!(open(longer.as_bytes(), &k, &field, &ctx).is_err());
    }

    #[test]
    fn the_envelope_parser_is_total_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let (k, _) = keys(Algorithm::Aes256Gcm, 1, "orders");
        // Never panics; random bytes never authenticate.
        prop_assert!(open(&bytes, &k, "f", &BTreeMap::new()).is_err());
        let text = format!("pg1.{}", String::from_utf8_lossy(&bytes));
        prop_assert!(open(text.as_bytes(), &k, "f", &BTreeMap::new()).is_err());
    }

    #[test]
    fn digit_tokens_keep_length_and_the_kept_digits(
        value in "[0-9]{1,64}",
        keep in any::<proptest::sample::Index>(),
        seed in any::<[u8; 32]>(),
    ) {
        let keep_last = keep.index(value.len()) as u8;
        let t = format::render(
            Format::Digits { keep_last },
            &value,
            &mut Stream::from_seed(&seed),
            None,
        )
        .unwrap();
        prop_assert_eq!(t.len(), value.len());
        prop_assert!(t.bytes().all(|b| b.is_ascii_digit()));
        let k = usize::from(keep_last);
        prop_assert_eq!(&t[t.len() - k..], &value[value.len() - k..]);
        prop_assert!(format::check_token(&t).is_ok());
    }

    #[test]
    fn email_and_opaque_tokens_keep_their_shape(
        local in "[a-zA-Z0-9._+-]{1,40}",
        domain in "[a-z][a-z0-9-]{0,20}[a-z0-9]\\.[a-z]{2,10}",
        value in ".{1,200}",
        seed in any::<[u8; 32]>(),
    ) {
        let email = format!("{local}@{domain}");
        let t = format::render(Format::Email, &email, &mut Stream::from_seed(&seed), None).unwrap();
        let (tl, td) = t.rsplit_once('@').unwrap();
        prop_assert_eq!(td, domain.as_str());
        prop_assert_eq!(tl.len(), 12);
        prop_assert!(tl.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        prop_assert!(format::check_value(Format::Email, &t, usize::MAX).is_ok());
        let o = format::render(Format::Opaque, &value, &mut Stream::from_seed(&seed), None).unwrap();
        prop_assert!(o.starts_with("pgt_"));
        prop_assert_eq!(o.len(), 26);
        prop_assert!(o[4..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    }

    #[test]
    fn ff1_tokens_keep_every_separator_and_character_class(
        value in "[ -~]{1,80}",
        key in any::<[u8; 32]>(),
        tweak in proptest::collection::vec(any::<u8>(), 0..32),
        seed in any::<[u8; 32]>(),
    ) {
        prop_assume!(value.bytes().any(|b| b.is_ascii_alphanumeric()));
        let p = Ff1Params { key: &key, tweak: &tweak };
        let t = format::render(Format::Ff1, &value, &mut Stream::from_seed(&seed), Some(&p)).unwrap();
        prop_assert_eq!(t.len(), value.len());
        let class = |b: u8| match b {
            b'0'..=b'9' => 0,
            b'a'..=b'z' | b'A'..=b'Z' => 1,
            _ => 2,
        };
        let digits_only = value.bytes().filter(u8::is_ascii_alphanumeric).all(|b| b.is_ascii_digit());
        for (a, b) in value.bytes().zip(t.bytes()) {
            if class(a) == 2 {
                prop_assert_eq!(a, b, "separator moved or changed");
            } else if digits_only {
                prop_assert!(b.is_ascii_digit());
            } else {
                prop_assert!(class(b) != 2);
            }
        }
        // FF1 is a permutation: the same key and tweak give the same token.
        if format::ff1_applies(&value) {
            let again = format::render(Format::Ff1, &value, &mut Stream::from_seed(&[0; 32]), Some(&p)).unwrap();
            prop_assert_eq!(t, again);
        }
    }

    #[test]
    fn token_and_value_checks_are_total(s in "\\PC{0,400}", bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = format::check_token(&s);
        let lossy = String::from_utf8_lossy(&bytes);
        let _ = format::check_token(&lossy);
        for f in [Format::Opaque, Format::Email, Format::Ff1, Format::Digits { keep_last: 3 }] {
            let _ = format::check_value(f, &s, 1024);
            let _ = format::check_value(f, &lossy, 1024);
        }
    }
}

/// Text mutations of a known-good file: bytes replaced, deleted or inserted at random places.
fn mutated(base: &'static str) -> impl Strategy<Value = String> {
    let len = base.len();
    proptest::collection::vec((0..len, 0u8..3, any::<u8>()), 1..8).prop_map(move |edits| {
        let mut b = base.as_bytes().to_vec();
        for (at, kind, byte) in edits {
            let at = at.min(b.len().saturating_sub(1));
            match kind {
                0 if !b.is_empty() => b[at] = byte,
                1 if !b.is_empty() => {
                    b.remove(at);
                }
                _ => b.insert(at, byte),
            }
        }
        String::from_utf8_lossy(&b).into_owned()
    })
}

const POLICY_EXAMPLE: &str = include_str!("../../deploy/policy/policy.example.toml");
const CONFIG_EXAMPLE: &str = include_str!("../../piiguard.example.toml");

#[test]
fn the_shipped_examples_parse() {
    Policy::parse(POLICY_EXAMPLE, None).unwrap();
    piiguard::config::parse(CONFIG_EXAMPLE, Vec::new()).unwrap();
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn policy_parser_never_panics(text in mutated(POLICY_EXAMPLE), junk in "\\PC{0,300}") {
        let _ = Policy::parse(&text, None);
        let _ = Policy::parse(&junk, None);
    }

    #[test]
    fn config_parser_never_panics(
        text in mutated(CONFIG_EXAMPLE),
        junk in "\\PC{0,300}",
        key in "PIIGUARD_[A-Z_]{1,30}",
        value in "\\PC{0,40}",
    ) {
        let _ = piiguard::config::parse(&text, Vec::new());
        let _ = piiguard::config::parse(&junk, Vec::new());
        let _ = piiguard::config::parse(CONFIG_EXAMPLE, vec![(key, value)]);
    }
}
