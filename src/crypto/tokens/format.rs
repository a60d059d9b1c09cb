//! Token formats (pure): what a value must look like for each format, and how a token of
//! that format is drawn from a [`Stream`] (random or deterministic) or computed with FF1.

use base64::Engine as _;

use super::derive::Stream;
use super::ff1;

/// Prefix of opaque tokens.
pub const OPAQUE_PREFIX: &str = "pgt_";
/// Characters of an opaque token after the prefix (16 bytes, unpadded base64url).
pub const OPAQUE_BODY_LEN: usize = 22;
/// Characters of a tokenised email local part.
pub const EMAIL_LOCAL_LEN: usize = 12;
/// Longest DIGITS value.
pub const MAX_DIGITS: usize = 64;
/// Longest FF1 value.
pub const MAX_FF1_LEN: usize = 256;
/// Longest email address (RFC 5321 path limit).
pub const MAX_EMAIL_LEN: usize = 254;
/// Longest token accepted by Detokenize.
pub const MAX_TOKEN_LEN: usize = 320;

/// The shape of a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `pgt_` + 22 URL-safe characters.
    Opaque,
    /// Digits only, same length, the last `keep_last` digits kept.
    Digits {
        /// How many trailing digits stay as they are.
        keep_last: u8,
    },
    /// Local part tokenised, domain kept.
    Email,
    /// FF1 over the value's letters and digits, other characters kept in place.
    Ff1,
}

/// Random (new token every call) or deterministic (same input, same token), per subject or
/// across subjects (docs/TOKENS.md, "Modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A new token every call.
    Random,
    /// The same token for the same subject, field, format and value: joins within one
    /// subject's records; the token dies with its subject.
    Deterministic,
    /// The same token for the same field, format and value whatever the subject: joins across
    /// subjects; the token lives while any subject holding it is not shredded. Needs the
    /// `tokenize_join` grant; not for FF1.
    DeterministicJoin,
}

/// Why a value or token does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The value cannot be tokenised in this format (message says why, without the value).
    #[error("{0}")]
    Unsupported(&'static str),
    /// The string cannot be a token.
    #[error("not a token")]
    MalformedToken,
}

impl Format {
    /// Stable name, bound into derivations and stored with the token.
    pub fn tag(&self) -> String {
        match self {
            Format::Opaque => "opaque".into(),
            Format::Digits { keep_last } => format!("digits:{keep_last}"),
            Format::Email => "email".into(),
            Format::Ff1 => "ff1".into(),
        }
    }
}

/// FF1 alphabets: digits, lower-case alphanumerics, upper-case alphanumerics, both cases.
const DIGITS: &[u8] = b"0123456789";
const LOWER36: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
const UPPER36: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const ALNUM62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn alphabet_of(value: &str) -> &'static [u8] {
    let has_lower = value.bytes().any(|b| b.is_ascii_lowercase());
    let has_upper = value.bytes().any(|b| b.is_ascii_uppercase());
    match (has_lower, has_upper) {
        (false, false) => DIGITS,
        (true, false) => LOWER36,
        (false, true) => UPPER36,
        (true, true) => ALNUM62,
    }
}

fn check_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 253
        && domain.contains('.')
        && domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Checks that `value` can be tokenised in `format` (before any key is loaded).
pub fn check_value(format: Format, value: &str, max_len: usize) -> Result<(), FormatError> {
    use FormatError::Unsupported as U;
    if value.is_empty() {
        return Err(U("value must not be empty"));
    }
    if value.len() > max_len {
        return Err(U("value is too long"));
    }
    match format {
        Format::Opaque => Ok(()),
        Format::Digits { keep_last } => {
            if value.len() > MAX_DIGITS || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(U("DIGITS values must be 1-64 ASCII digits"));
            }
            if usize::from(keep_last) >= value.len() {
                return Err(U("keep_last must leave at least one digit to tokenise"));
            }
            Ok(())
        }
        Format::Email => {
            let (local, domain) = value
                .rsplit_once('@')
                .ok_or(U("EMAIL values must be an address local@domain"))?;
            if value.len() > MAX_EMAIL_LEN
                || local.is_empty()
                || local.len() > 64
                || local
                    .bytes()
                    .any(|b| b.is_ascii_control() || b == b' ' || b == b'@')
            {
                return Err(U("EMAIL values must be an address local@domain"));
            }
            if !check_domain(domain) {
                return Err(U(
                    "EMAIL domain must be an ASCII host name such as example.com",
                ));
            }
            Ok(())
        }
        Format::Ff1 => {
            if value.len() > MAX_FF1_LEN || !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return Err(U("FF1 values must be 1-256 printable ASCII characters"));
            }
            if !value.bytes().any(|b| b.is_ascii_alphanumeric()) {
                return Err(U("FF1 values must contain letters or digits"));
            }
            Ok(())
        }
    }
}

/// Whether an FF1 value is long enough for FF1 itself (domain >= 10^6); shorter values get
/// a token drawn from the stream instead (and rely on the store for uniqueness).
pub fn ff1_applies(value: &str) -> bool {
    let n = value.bytes().filter(u8::is_ascii_alphanumeric).count();
    ff1::domain_ok(alphabet_of(value).len() as u32, n)
}

/// FF1 key material for one token: AES-256 key (per keyspace and field) and tweak (carrying
/// the subject's secret, so that a shred makes the token impossible to invert).
pub struct Ff1Params<'a> {
    /// FF1 key (AES-256).
    pub key: &'a [u8; 32],
    /// FF1 tweak.
    pub tweak: &'a [u8],
}

/// Renders a token of `value`.
pub fn render(
    format: Format,
    value: &str,
    stream: &mut Stream,
    ff1: Option<&Ff1Params<'_>>,
) -> Result<String, FormatError> {
    // Every indexing and slicing below relies on the shape checked here.
    check_value(format, value, usize::MAX)?;
    match format {
        Format::Opaque => {
            let mut b = [0u8; 16];
            stream.fill(&mut b);
            Ok(opaque_token(&b))
        }
        Format::Digits { keep_last } => {
            let free = value.len() - usize::from(keep_last);
            let mut out = String::with_capacity(value.len());
            for _ in 0..free {
                out.push(char::from(b'0' + stream.below(10) as u8));
            }
            out.push_str(&value[free..]);
            Ok(out)
        }
        Format::Email => {
            let (_, domain) = value
                .rsplit_once('@')
                .ok_or(FormatError::Unsupported("not an address"))?;
            let mut out = String::with_capacity(EMAIL_LOCAL_LEN + 1 + domain.len());
            for _ in 0..EMAIL_LOCAL_LEN {
                out.push(char::from(LOWER36[stream.below(36) as usize]));
            }
            out.push('@');
            out.push_str(domain);
            Ok(out)
        }
        Format::Ff1 => {
            let alphabet = alphabet_of(value);
            let radix = alphabet.len() as u16;
            let numerals: Vec<u16> = value
                .bytes()
                .filter(u8::is_ascii_alphanumeric)
                // Every letter and digit of the value is in its alphabet (`alphabet_of`).
                .map(|b| alphabet.iter().position(|a| *a == b).unwrap_or(0) as u16)
                .collect();
            let out: Vec<u16> = if ff1_applies(value) {
                let p = ff1.ok_or(FormatError::Unsupported("FF1 parameters missing"))?;
                ff1::encrypt(p.key, u32::from(radix), p.tweak, &numerals)
                    .map_err(|_| FormatError::Unsupported("FF1 refused the value"))?
            } else {
                numerals.iter().map(|_| stream.below(radix)).collect()
            };
            let mut it = out.into_iter();
            Ok(value
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() {
                        // FF1 and the stream give one numeral (< radix) per input numeral.
                        char::from(alphabet[usize::from(it.next().unwrap_or(0))])
                    } else {
                        char::from(b)
                    }
                })
                .collect())
        }
    }
}

/// The opaque token of 16 bytes.
pub fn opaque_token(bytes: &[u8; 16]) -> String {
    format!(
        "{OPAQUE_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The 16 bytes of an opaque token; `None` for a token of another format or a malformed one.
pub fn opaque_bytes(token: &str) -> Option<[u8; 16]> {
    let body = token.strip_prefix(OPAQUE_PREFIX)?;
    let mut out = [0u8; 16];
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode_slice(body, &mut out)
        .ok()?;
    (body.len() == OPAQUE_BODY_LEN && n == 16).then_some(out)
}

/// Checks that a string can be a token (before any lookup). The `pgt_` prefix does not make a
/// token opaque: FF1 keeps every character that is not a letter or digit, so the value
/// `joe_smith` can have the token `pgt_xk3vq` (about one in 46,656 values of that shape). Such a
/// token is found by its keyed hash like every token that is not a random opaque one; refusing
/// it as a bad opaque body made its value unreadable for good.
pub fn check_token(token: &str) -> Result<(), FormatError> {
    if token.is_empty()
        || token.len() > MAX_TOKEN_LEN
        || !token.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        return Err(FormatError::MalformedToken);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::tokens::derive::{Scope, deterministic_seed};
    use aws_lc_rs::hmac;

    fn rnd() -> Stream {
        Stream::random().unwrap()
    }

    #[test]
    fn opaque_shape() {
        let t = render(Format::Opaque, "x", &mut rnd(), None).unwrap();
        assert!(t.starts_with("pgt_") && t.len() == 26, "{t}");
        assert!(check_token(&t).is_ok());
        assert_eq!(check_token(""), Err(FormatError::MalformedToken));
        assert_eq!(check_token("pgt_\u{e9}"), Err(FormatError::MalformedToken));
    }

    /// FF1 keeps `_` in place, so some values of the shape `abc_d` get a token that starts
    /// with the opaque prefix; Detokenize must look it up, not refuse it as malformed (an
    /// exploratory test found `joe_aasvb` -> `pgt_tx6sz`, which then answered MALFORMED_TOKEN).
    #[test]
    fn an_ff1_token_with_the_opaque_prefix_is_still_a_token() {
        let key = [7u8; 32];
        let p = Ff1Params {
            key: &key,
            tweak: b"subject-tweak",
        };
        // FF1 permutes the 36^4 values `xyz_w` (lower case and digits): 36 of them give a
        // token `pgt_?`; walk the domain in order until one does.
        let found = (0..36u32.pow(4))
            .map(|i| {
                let d = |k: u32| char::from(LOWER36[(i / 36u32.pow(k) % 36) as usize]);
                format!("{}{}{}_{}", d(3), d(2), d(1), d(0))
            })
            .find_map(|v| {
                let t = render(Format::Ff1, &v, &mut rnd(), Some(&p)).unwrap();
                t.starts_with(OPAQUE_PREFIX).then_some((v, t))
            });
        let (value, token) = found.expect("FF1 is a permutation: some value gives pgt_");
        assert!(ff1_applies(&value));
        assert_eq!(token.len(), value.len(), "{value} -> {token}");
        assert!(opaque_bytes(&token).is_none());
        assert_eq!(check_token(&token), Ok(()), "{value} -> {token}");
    }

    #[test]
    fn digits_keep_length_and_last_digits() {
        let card = "4111111111111111";
        let f = Format::Digits { keep_last: 4 };
        check_value(f, card, 1024).unwrap();
        let t = render(f, card, &mut rnd(), None).unwrap();
        assert_eq!(t.len(), 16);
        assert!(t.bytes().all(|b| b.is_ascii_digit()));
        assert!(t.ends_with("1111"));
        assert!(check_value(f, "41x1", 1024).is_err());
        assert!(check_value(Format::Digits { keep_last: 4 }, "1234", 1024).is_err());
    }

    #[test]
    fn email_keeps_domain_and_stays_valid() {
        let t = render(Format::Email, "alice.smith@example.com", &mut rnd(), None).unwrap();
        let (local, domain) = t.split_once('@').unwrap();
        assert_eq!(domain, "example.com");
        assert_eq!(local.len(), EMAIL_LOCAL_LEN);
        assert!(
            local
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        check_value(Format::Email, &t, 1024).unwrap();
        for bad in [
            "no-at",
            "@example.com",
            "a@",
            "a@localhost",
            "a@exa mple.com",
            "a@-x.com",
            // One `@` (exploratory testing: `a@b@c.com` was taken, its "local part" `a@b`).
            "a@b@c.com",
        ] {
            assert!(check_value(Format::Email, bad, 1024).is_err(), "{bad}");
        }
    }

    #[test]
    fn ff1_preserves_shape_and_inverts() {
        let key = [9u8; 32];
        let p = Ff1Params {
            key: &key,
            tweak: b"subject-tweak",
        };
        for v in [
            "4111-1111-1111-1111",
            "AB12CD34",
            "abc-def-ghi",
            "Mixed1234Case",
        ] {
            check_value(Format::Ff1, v, 1024).unwrap();
            assert!(ff1_applies(v), "{v}");
            let t = render(Format::Ff1, v, &mut rnd(), Some(&p)).unwrap();
            assert_eq!(t.len(), v.len());
            assert_ne!(t, v);
            for (a, b) in t.bytes().zip(v.bytes()) {
                assert_eq!(a.is_ascii_alphanumeric(), b.is_ascii_alphanumeric());
                if !b.is_ascii_alphanumeric() {
                    assert_eq!(a, b);
                }
            }
            // The same key and tweak give the same token (FF1 is deterministic).
            assert_eq!(t, render(Format::Ff1, v, &mut rnd(), Some(&p)).unwrap());
        }
        // Under 10^6: a token of the same shape from the stream, no FF1 needed.
        assert!(!ff1_applies("12345"));
        let t = render(Format::Ff1, "12-345", &mut rnd(), None).unwrap();
        assert!(t.len() == 6 && &t[2..3] == "-");
    }

    /// 100,000 distinct values give 100,000 distinct deterministic tokens (opaque, email, and
    /// FF1 over 16-digit card numbers), and the same value always gives the same token.
    #[test]
    fn hundred_thousand_deterministic_tokens_do_not_collide() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &[3; 32]);
        let ff1_key = [5u8; 32];
        let p = Ff1Params {
            key: &ff1_key,
            tweak: b"t",
        };
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_000u32 {
            let card = format!("4{i:015}");
            let email = format!("user{i}@example.com");
            for (f, v, ff) in [
                (Format::Opaque, card.as_str(), None),
                (Format::Email, email.as_str(), None),
                (Format::Ff1, card.as_str(), Some(&p)),
            ] {
                let seed = deterministic_seed(&key, "f", &f.tag(), Scope::Join, v, 0);
                let t = render(f, v, &mut Stream::from_seed(&seed), ff).unwrap();
                if i % 10_000 == 0 {
                    let again = render(f, v, &mut Stream::from_seed(&seed), ff).unwrap();
                    assert_eq!(t, again, "deterministic");
                }
                assert!(seen.insert(t), "collision at {i} ({f:?})");
            }
        }
        assert_eq!(seen.len(), 300_000);
    }
}
