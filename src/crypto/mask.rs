//! Masked reveals: the part of a value a masked Decrypt or Detokenize returns (docs/SEARCH.md,
//! section Masked reveals). Pure, Unicode-safe (works on `char`s of the NFC form, never splits
//! a UTF-8 sequence), and fails closed: a value that does not look like its kind is masked
//! whole.

use unicode_normalization::UnicodeNormalization as _;

use super::blind_index::FieldKind;

/// What stands for the hidden part (U+2022 BULLET, four of them: the length is not revealed).
pub const HIDDEN: &str = "••••";

/// How a field is masked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mask {
    /// The mask of a field kind: card and phone, the last 4 digits (`•••• 1111`, only if the
    /// value has at least 8 digits); email, the first character and the domain
    /// (`j••••@example.com`); name, the initials (`J. D.`); text, nothing (`••••`).
    Kind(FieldKind),
    /// Keep the first `keep_first` and the last `keep_last` characters, hide the rest; the
    /// value is hidden whole unless it has more characters than the two together.
    Keep {
        /// Characters shown from the start.
        keep_first: u8,
        /// Characters shown from the end.
        keep_last: u8,
    },
}

/// Digits a card or phone number must have before its last four are shown.
const MIN_DIGITS_FOR_LAST4: usize = 8;

/// The masked form of `value` (what a masked reveal returns, as UTF-8 text).
pub fn mask(m: Mask, value: &[u8]) -> String {
    let Ok(s) = std::str::from_utf8(value) else {
        return HIDDEN.to_string();
    };
    let s: String = s.trim().nfc().collect();
    match m {
        Mask::Kind(FieldKind::Card | FieldKind::Phone) => {
            // Only a number (digits and the separators people write) shows its last four:
            // "4111 1111 1111 1111 exp 12/25" would show the expiry date's digits.
            let number_like = s
                .strip_prefix('+')
                .unwrap_or(&s)
                .chars()
                .all(|c| c.is_ascii_digit() || matches!(c, ' ' | '-' | '.' | '(' | ')' | '/'));
            let digits: Vec<char> = s.chars().filter(char::is_ascii_digit).collect();
            if !number_like || digits.len() < MIN_DIGITS_FOR_LAST4 {
                return HIDDEN.to_string();
            }
            let last: String = digits[digits.len() - 4..].iter().collect();
            format!("{HIDDEN} {last}")
        }
        Mask::Kind(FieldKind::Email) => match s.rsplit_once('@') {
            // One `@`, text on both sides (as the email normalisation asks).
            Some((local, domain)) if !domain.is_empty() && !local.contains('@') => {
                match local.chars().next() {
                    Some(first) => format!("{first}{HIDDEN}@{domain}"),
                    None => HIDDEN.to_string(),
                }
            }
            _ => HIDDEN.to_string(),
        },
        Mask::Kind(FieldKind::Name) => {
            let initials: Vec<String> = s
                .split_whitespace()
                .filter_map(|w| w.chars().find(|c| c.is_alphanumeric()))
                .map(|c| format!("{}.", c.to_uppercase()))
                .collect();
            if initials.is_empty() {
                HIDDEN.to_string()
            } else {
                initials.join(" ")
            }
        }
        Mask::Kind(FieldKind::Text) => HIDDEN.to_string(),
        Mask::Keep {
            keep_first,
            keep_last,
        } => {
            let chars: Vec<char> = s.chars().collect();
            let (f, l) = (usize::from(keep_first), usize::from(keep_last));
            if chars.len() <= f + l {
                return HIDDEN.to_string();
            }
            let head: String = chars[..f].iter().collect();
            let tail: String = chars[chars.len() - l..].iter().collect();
            format!("{head}{HIDDEN}{tail}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn k(kind: FieldKind, v: &str) -> String {
        mask(Mask::Kind(kind), v.as_bytes())
    }

    #[test]
    fn each_kind_has_its_mask() {
        assert_eq!(k(FieldKind::Card, "4111 1111 1111 1111"), "•••• 1111");
        assert_eq!(k(FieldKind::Card, "4111"), "••••");
        assert_eq!(k(FieldKind::Phone, "+44 20 7946 0958"), "•••• 0958");
        assert_eq!(k(FieldKind::Phone, "0958"), "••••");
        assert_eq!(k(FieldKind::Phone, "+44 (20) 7946-0958"), "•••• 0958");
        // Not a number, or not one address: hidden whole (exploratory testing: the card
        // showed the expiry date's digits, `•••• 1225`).
        assert_eq!(k(FieldKind::Card, "4111 1111 1111 1111 exp 12/25"), "••••");
        assert_eq!(k(FieldKind::Phone, "call 020 7946 0958 after 6"), "••••");
        assert_eq!(k(FieldKind::Email, "a@b@example.com"), "••••");
        assert_eq!(k(FieldKind::Email, "jane@example.com"), "j••••@example.com");
        assert_eq!(k(FieldKind::Email, "not-an-address"), "••••");
        assert_eq!(k(FieldKind::Email, "@example.com"), "••••");
        assert_eq!(k(FieldKind::Name, "Jane  van Doe"), "J. V. D.");
        assert_eq!(k(FieldKind::Name, "élodie Ørsted"), "É. Ø.");
        assert_eq!(k(FieldKind::Name, "  "), "••••");
        assert_eq!(k(FieldKind::Text, "12 Long Street"), "••••");
        assert_eq!(mask(Mask::Kind(FieldKind::Card), &[0xff, 0x31]), "••••");
        let keep = Mask::Keep {
            keep_first: 2,
            keep_last: 1,
        };
        assert_eq!(mask(keep, "SW1A 2AA".as_bytes()), "SW••••A");
        assert_eq!(mask(keep, "abc".as_bytes()), "••••");
        // Multi-byte characters are kept whole.
        assert_eq!(mask(keep, "ÅÄÖüß".as_bytes()), "ÅÄ••••ß");
    }

    proptest! {
        #[test]
        fn card_and_phone_masks_show_at_most_the_last_four_digits(v in "\\PC{0,30}") {
            for kind in [FieldKind::Card, FieldKind::Phone] {
                let out = k(kind, &v);
                let digits: String = v.trim().nfc().filter(char::is_ascii_digit).collect();
                if out != HIDDEN {
                    let shown = out.strip_prefix("•••• ").unwrap();
                    prop_assert_eq!(shown.chars().count(), 4);
                    prop_assert!(digits.ends_with(shown));
                    prop_assert!(digits.len() >= MIN_DIGITS_FOR_LAST4);
                }
            }
        }

        #[test]
        fn email_mask_shows_one_character_and_the_domain(local in "\\PC{0,12}", domain in "[a-z.]{1,12}") {
            let v = format!("{local}@{domain}");
            let out = k(FieldKind::Email, &v);
            if out != HIDDEN {
                let norm: String = v.trim().nfc().collect();
                let (l, d) = norm.rsplit_once('@').unwrap();
                let first = l.chars().next().unwrap();
                prop_assert_eq!(out, format!("{first}{HIDDEN}@{d}"));
                prop_assert_eq!(d, domain.as_str());
            }
        }

        #[test]
        fn keep_mask_shows_no_more_than_asked(v in "\\PC{0,30}", f in 0u8..6, l in 0u8..6) {
            let out = mask(Mask::Keep { keep_first: f, keep_last: l }, v.as_bytes());
            let norm: Vec<char> = v.trim().nfc().collect();
            let (f, l) = (usize::from(f), usize::from(l));
            if out != HIDDEN {
                prop_assert!(norm.len() > f + l);
                let head: String = norm[..f].iter().collect();
                let tail: String = norm[norm.len() - l..].iter().collect();
                prop_assert_eq!(out, format!("{head}{HIDDEN}{tail}"));
            }
        }

        #[test]
        fn name_mask_shows_one_character_per_word(v in "\\PC{0,30}") {
            let out = k(FieldKind::Name, &v);
            if out != HIDDEN {
                let words = v.split_whitespace().count();
                prop_assert!(out.split(' ').count() <= words);
            }
        }
    }
}
