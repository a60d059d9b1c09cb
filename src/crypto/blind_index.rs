//! Blind indexes: a keyed, normalised, truncated hash of a value for equality search over
//! ciphertexts (docs/SEARCH.md).
//!
//! `index = "bi1." version "." hex(truncate(HMAC-SHA256(field key, normalise(kind, value)), bits))`
//!
//! The field key is per (keyspace, field, version); where it comes from is `keys/`'s business
//! (`keys::index_keys`). Here: the normalisation of each field kind, the HMAC, the truncation
//! and the text form. Pure: bytes in, a string or a typed error out.

use aws_lc_rs::hmac;
use unicode_normalization::UnicodeNormalization as _;

/// The kinds of field piiguard knows how to normalise (blind indexes) and mask (reveals).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FieldKind {
    /// An e-mail address.
    Email,
    /// A telephone number.
    Phone,
    /// A payment card number (PAN).
    Card,
    /// A person's name.
    Name,
    /// Anything else: free text.
    Text,
}

impl FieldKind {
    /// Every kind, in config spelling order.
    pub const ALL: [FieldKind; 5] = [
        FieldKind::Email,
        FieldKind::Phone,
        FieldKind::Card,
        FieldKind::Name,
        FieldKind::Text,
    ];

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldKind::Email => "email",
            FieldKind::Phone => "phone",
            FieldKind::Card => "card",
            FieldKind::Name => "name",
            FieldKind::Text => "text",
        }
    }

    /// Parses the config spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The kind a field has when the config does not say: from well-known field names.
    pub fn default_for_field(field: &str) -> Self {
        let f = field.to_ascii_lowercase();
        match f.as_str() {
            "email" | "email_address" | "e_mail" | "mail" => FieldKind::Email,
            "phone" | "phone_number" | "mobile" | "mobile_number" | "tel" | "telephone" => {
                FieldKind::Phone
            }
            "card" | "card_number" | "pan" | "cc_number" | "credit_card" => FieldKind::Card,
            "name" | "full_name" | "first_name" | "last_name" | "given_name" | "family_name" => {
                FieldKind::Name
            }
            _ => FieldKind::Text,
        }
    }
}

/// Why a value has no normal form for its field kind.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NormaliseError {
    /// The value is not UTF-8.
    #[error("the value is not UTF-8")]
    NotUtf8,
    /// The value is empty (after trimming).
    #[error("the value is empty")]
    Empty,
    /// Not an e-mail address (`local@domain`, both parts non-empty).
    #[error("the value is not an e-mail address")]
    NotEmail,
    /// Not a phone number (digits and separators, 2 to 15 digits, a leading `+` or a
    /// configured default country code).
    #[error("the value is not a phone number ({0})")]
    NotPhone(&'static str),
    /// Not a card number (12 to 19 digits with spaces or dashes).
    #[error("the value is not a card number")]
    NotCard,
}

/// Separators a phone or card number may contain besides digits.
fn is_separator(c: char) -> bool {
    matches!(c, ' ' | '-' | '.' | '(' | ')' | '/' | '\u{a0}')
}

/// Normalisation options that come from configuration.
#[derive(Clone, Copy, Debug, Default)]
pub struct NormaliseOptions<'a> {
    /// Country calling code (digits, no `+`) for phone numbers written without `+`; a single
    /// leading trunk `0` is dropped first. `None`: such numbers are refused.
    pub default_country_code: Option<&'a str>,
}

/// The normal form of `value` for `kind` (docs/SEARCH.md):
/// - email: Unicode NFC, trimmed, lower-cased (the whole address, local part included);
///   needs one `@` with text on both sides;
/// - phone: E.164, `+` and digits only (`+44 20 7946 0958` → `+442079460958`);
/// - card: the digits only (12 to 19);
/// - name: NFC, trimmed, inner whitespace runs made one space, lower-cased;
/// - text: NFC, trimmed.
pub fn normalise(
    kind: FieldKind,
    value: &[u8],
    opts: NormaliseOptions<'_>,
) -> Result<String, NormaliseError> {
    let s = std::str::from_utf8(value).map_err(|_| NormaliseError::NotUtf8)?;
    let nfc: String = s.trim().nfc().collect();
    let t = nfc.trim();
    if t.is_empty() {
        return Err(NormaliseError::Empty);
    }
    match kind {
        FieldKind::Text => Ok(t.to_string()),
        FieldKind::Name => Ok(t
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
            .nfc()
            .collect()),
        FieldKind::Email => {
            let lower: String = t.to_lowercase().nfc().collect();
            match lower.split_once('@') {
                Some((local, domain))
                    if !local.is_empty()
                        && !domain.is_empty()
                        && !domain.contains('@')
                        && !lower.chars().any(char::is_whitespace) =>
                {
                    Ok(lower)
                }
                _ => Err(NormaliseError::NotEmail),
            }
        }
        FieldKind::Card => {
            if t.chars()
                .any(|c| !c.is_ascii_digit() && c != ' ' && c != '-')
            {
                return Err(NormaliseError::NotCard);
            }
            let digits: String = t.chars().filter(char::is_ascii_digit).collect();
            if !(12..=19).contains(&digits.len()) {
                return Err(NormaliseError::NotCard);
            }
            Ok(digits)
        }
        FieldKind::Phone => normalise_phone(t, opts.default_country_code),
    }
}

fn normalise_phone(t: &str, country: Option<&str>) -> Result<String, NormaliseError> {
    let (plus, rest) = match t.strip_prefix('+') {
        Some(r) => (true, r),
        None => (false, t),
    };
    if rest
        .chars()
        .any(|c| !c.is_ascii_digit() && !is_separator(c))
    {
        return Err(NormaliseError::NotPhone(
            "only digits, spaces, - . ( ) / and a leading +",
        ));
    }
    let digits: String = rest.chars().filter(char::is_ascii_digit).collect();
    if digits.is_empty() {
        return Err(NormaliseError::NotPhone("no digits"));
    }
    let full = if plus {
        digits
    } else if let Some(stripped) = digits.strip_prefix("00") {
        // The international call prefix used in most of the world.
        stripped.to_string()
    } else {
        let Some(cc) = country else {
            return Err(NormaliseError::NotPhone(
                "no leading + and no default country code configured",
            ));
        };
        let national = digits.strip_prefix('0').unwrap_or(&digits);
        format!("{cc}{national}")
    };
    if !(2..=15).contains(&full.len()) || full.starts_with('0') {
        return Err(NormaliseError::NotPhone(
            "E.164 has 2 to 15 digits, the first not 0",
        ));
    }
    Ok(format!("+{full}"))
}

/// Shortest and longest index, in bits.
pub const MIN_BITS: u16 = 8;
/// See [`MIN_BITS`].
pub const MAX_BITS: u16 = 256;

/// The prefix of every index string (format version 1).
pub const PREFIX: &str = "bi1.";

/// The index of the normalised value `normal` under `key` (the field key of `version`),
/// truncated to `bits` (clamped to [`MIN_BITS`]..=[`MAX_BITS`]): `bi1.<version>.<hex>`, the hex
/// of the first `ceil(bits / 8)` bytes of the HMAC with the bits past `bits` set to zero.
pub fn index(key: &hmac::Key, version: u32, bits: u16, normal: &str) -> String {
    let bits = bits.clamp(MIN_BITS, MAX_BITS);
    let tag = hmac::sign(key, normal.as_bytes());
    let bytes = usize::from(bits.div_ceil(8));
    let mut out = [0u8; 32];
    out[..bytes].copy_from_slice(&tag.as_ref()[..bytes]);
    let spare = bytes * 8 - usize::from(bits);
    if spare > 0 {
        out[bytes - 1] &= 0xFFu8 << spare;
    }
    format!("{PREFIX}{version}.{}", hex::encode(&out[..bytes]))
}

/// The version an index string names, if it is one (`bi1.<version>.<hex>`).
pub fn version_of(index: &str) -> Option<u32> {
    let rest = index.strip_prefix(PREFIX)?;
    let (v, h) = rest.split_once('.')?;
    if h.is_empty() || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    v.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(kind: FieldKind, v: &str) -> Result<String, NormaliseError> {
        normalise(kind, v.as_bytes(), NormaliseOptions::default())
    }

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        assert_eq!(
            n(FieldKind::Email, "  Jane.Doe@Example.COM \n").unwrap(),
            "jane.doe@example.com"
        );
        for bad in [
            "",
            "   ",
            "jane",
            "@example.com",
            "jane@",
            "a@b@c",
            "ja ne@x.org",
        ] {
            assert!(n(FieldKind::Email, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn phones_become_e164() {
        for v in [
            "+44 20 7946 0958",
            "+44 (20) 7946-0958",
            "0044 20 7946 0958",
        ] {
            assert_eq!(n(FieldKind::Phone, v).unwrap(), "+442079460958", "{v}");
        }
        let uk = NormaliseOptions {
            default_country_code: Some("44"),
        };
        assert_eq!(
            normalise(FieldKind::Phone, b"020 7946 0958", uk).unwrap(),
            "+442079460958"
        );
        assert_eq!(
            n(FieldKind::Phone, "020 7946 0958"),
            Err(NormaliseError::NotPhone(
                "no leading + and no default country code configured"
            ))
        );
        for bad in [
            "+",
            "call me",
            "+44 20 7946 0958 ext 1",
            "+1234567890123456",
            "---",
        ] {
            assert!(n(FieldKind::Phone, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cards_names_and_text() {
        assert_eq!(
            n(FieldKind::Card, "4111 1111-1111 1111").unwrap(),
            "4111111111111111"
        );
        assert!(n(FieldKind::Card, "4111").is_err());
        assert!(n(FieldKind::Card, "4111 1111 1111 111x").is_err());
        assert_eq!(n(FieldKind::Name, "  Jane \t  DOE ").unwrap(), "jane doe");
        // NFC: a decomposed é equals the composed one.
        assert_eq!(
            n(FieldKind::Text, " Cafe\u{301} ").unwrap(),
            n(FieldKind::Text, "Caf\u{e9}").unwrap()
        );
        assert_eq!(n(FieldKind::Text, "Case Kept").unwrap(), "Case Kept");
        assert_eq!(
            normalise(FieldKind::Text, &[0xff, 0xfe], NormaliseOptions::default()),
            Err(NormaliseError::NotUtf8)
        );
    }

    #[test]
    fn indexes_are_truncated_and_name_their_version() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &[7u8; 32]);
        let full = index(&key, 3, 256, "x");
        assert_eq!(full.len(), "bi1.3.".len() + 64);
        assert_eq!(version_of(&full), Some(3));
        let i32b = index(&key, 3, 32, "x");
        assert_eq!(i32b.len(), "bi1.3.".len() + 8);
        assert!(full.starts_with(&i32b));
        // 12 bits: two bytes, the last four bits zero.
        let i12 = index(&key, 1, 12, "x");
        let hexpart = i12.rsplit('.').next().unwrap();
        assert_eq!(hexpart.len(), 4);
        assert!(hexpart.ends_with('0'));
        let other = hmac::Key::new(hmac::HMAC_SHA256, &[8u8; 32]);
        assert_ne!(index(&other, 3, 256, "x"), full);
        assert_eq!(version_of("bi1.x.00"), None);
        assert_eq!(version_of("pg1.1.00"), None);
    }

    proptest! {
        #[test]
        fn normalisation_is_idempotent(s in "\\PC{0,40}", k in 0usize..5) {
            let kind = FieldKind::ALL[k];
            let opts = NormaliseOptions { default_country_code: Some("1") };
            if let Ok(once) = normalise(kind, s.as_bytes(), opts) {
                prop_assert_eq!(normalise(kind, once.as_bytes(), opts), Ok(once.clone()));
            }
        }

        #[test]
        fn phone_formats_agree(d in "[1-9][0-9]{6,12}") {
            let spaced: String = d.chars().enumerate().flat_map(|(i, c)| {
                if i % 3 == 2 { vec![c, ' '] } else { vec![c] }
            }).collect();
            let a = n(FieldKind::Phone, &format!("+{d}")).unwrap();
            prop_assert_eq!(n(FieldKind::Phone, &format!("+{}", spaced.trim())).unwrap(), a.clone());
            prop_assert_eq!(n(FieldKind::Phone, &format!("00{d}")).unwrap(), a);
        }
    }
}
