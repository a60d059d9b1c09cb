//! The names a request carries (keyspace, field, subject id, context) and their one set of
//! rules. Each is parsed once, at the edge (`ops` for data calls, `config` and the policy for
//! files), into a borrowed newtype that proves it was checked: code that holds a [`Field`]
//! never checks it again.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::error::{Error, Reason};

/// Longest keyspace name (it is written into every ciphertext header with a one-byte length).
pub const MAX_KEYSPACE_LEN: usize = 63;
/// Longest subject id, in bytes.
pub const MAX_SUBJECT_LEN: usize = 256;
/// Longest field name.
pub const MAX_FIELD_LEN: usize = 64;
/// Most context entries.
pub const MAX_CONTEXT_ENTRIES: usize = 32;
/// Longest context key, in bytes.
pub const MAX_CONTEXT_KEY_LEN: usize = 128;
/// Longest context value, in bytes.
pub const MAX_CONTEXT_VALUE_LEN: usize = 1024;

fn invalid(msg: impl Into<String>) -> Error {
    Error::invalid(Reason::InvalidRequest, msg)
}

/// A keyspace name: 1-63 characters of `a-z 0-9 _ -`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Keyspace<'a>(&'a str);

impl<'a> Keyspace<'a> {
    /// Whether `s` follows the rules of a keyspace name.
    pub fn is_valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= MAX_KEYSPACE_LEN
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    }

    /// Parses a keyspace name (INVALID_ARGUMENT `INVALID_REQUEST` if it breaks the rules).
    pub fn parse(s: &'a str) -> Result<Self, Error> {
        if Self::is_valid(s) {
            Ok(Self(s))
        } else {
            Err(invalid(format!(
                "keyspace must be 1-{MAX_KEYSPACE_LEN} characters of a-z 0-9 _ -"
            )))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

/// A field name: 1-64 characters of `A-Z a-z 0-9 _ - .`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Field<'a>(&'a str);

impl<'a> Field<'a> {
    /// Whether `s` follows the rules of a field name.
    pub fn is_valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= MAX_FIELD_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    }

    /// Parses a field name (INVALID_ARGUMENT `INVALID_REQUEST` if it breaks the rules).
    pub fn parse(s: &'a str) -> Result<Self, Error> {
        if Self::is_valid(s) {
            Ok(Self(s))
        } else {
            Err(invalid(format!(
                "field must be 1-{MAX_FIELD_LEN} characters of A-Z a-z 0-9 _ - ."
            )))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

/// A raw subject id (1-256 bytes). It is personal data: its `Debug` is redacted, and it is
/// only ever stored or logged as a keyed hash (`keys::SubjectRef`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SubjectId<'a>(&'a str);

impl<'a> SubjectId<'a> {
    /// Whether `s` is an acceptable subject id.
    pub fn is_valid(s: &str) -> bool {
        !s.is_empty() && s.len() <= MAX_SUBJECT_LEN
    }

    /// Parses a subject id (INVALID_ARGUMENT `INVALID_REQUEST` if empty or too long).
    pub fn parse(s: &'a str) -> Result<Self, Error> {
        if Self::is_valid(s) {
            Ok(Self(s))
        } else {
            Err(invalid(format!(
                "subject must be 1-{MAX_SUBJECT_LEN} bytes"
            )))
        }
    }

    /// The raw id. Callers hash it; they never log it.
    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

impl fmt::Debug for SubjectId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SubjectId(<redacted>)")
    }
}

/// Longest request id of a shred (it is written into the signed certificate).
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Longest reason of a shred (written into the signed certificate).
pub const MAX_REASON_LEN: usize = 256;

/// Checks the caller's `request_id` and `reason` of a shred. Both are written verbatim into a
/// permanent, signed certificate of destruction, so they are bounded and restricted: the
/// request id to 1-128 characters of `A-Z a-z 0-9 . _ : / -` (or empty), the reason to 256
/// bytes of printable text without control characters. Neither may carry personal data
/// (docs/ERASURE.md): a ticket number, not a customer's name or email.
pub fn check_shred_notes(request_id: &str, reason: &str) -> Result<(), Error> {
    if request_id.len() > MAX_REQUEST_ID_LEN
        || !request_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'))
    {
        return Err(invalid(format!(
            "request_id must be at most {MAX_REQUEST_ID_LEN} characters of A-Z a-z 0-9 . _ : / -"
        )));
    }
    if reason.len() > MAX_REASON_LEN || reason.chars().any(char::is_control) {
        return Err(invalid(format!(
            "reason must be at most {MAX_REASON_LEN} bytes of printable text"
        )));
    }
    Ok(())
}

/// Parses a caller's context map: at most 32 entries, keys 1-128 bytes, values at most 1 KiB.
/// Returns it in canonical (sorted) order, as the ciphertext's AAD binds it.
pub fn parse_context(ctx: &HashMap<String, String>) -> Result<BTreeMap<&str, &str>, Error> {
    if ctx.len() > MAX_CONTEXT_ENTRIES {
        return Err(invalid(format!(
            "context has more than {MAX_CONTEXT_ENTRIES} entries"
        )));
    }
    let mut out = BTreeMap::new();
    for (k, v) in ctx {
        if k.is_empty() || k.len() > MAX_CONTEXT_KEY_LEN || v.len() > MAX_CONTEXT_VALUE_LEN {
            return Err(invalid(format!(
                "context keys must be 1-{MAX_CONTEXT_KEY_LEN} bytes and values at most {MAX_CONTEXT_VALUE_LEN} bytes"
            )));
        }
        out.insert(k.as_str(), v.as_str());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyspace_rules() {
        assert!(Keyspace::parse("orders").is_ok());
        assert!(Keyspace::parse("crm_2-eu").is_ok());
        assert!(Keyspace::parse(&"a".repeat(MAX_KEYSPACE_LEN)).is_ok());
        for bad in ["", "Orders", "a b", "ü", &"a".repeat(MAX_KEYSPACE_LEN + 1)] {
            let e = Keyspace::parse(bad).unwrap_err();
            assert_eq!(e.reason().as_str(), "INVALID_REQUEST", "{bad:?}");
        }
    }

    #[test]
    fn field_rules() {
        assert!(Field::parse("card_number").is_ok());
        assert!(Field::parse("Address.Line-1").is_ok());
        for bad in ["", "a b", "e/mail", &"f".repeat(MAX_FIELD_LEN + 1)] {
            assert!(Field::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn subject_rules_and_redacted_debug() {
        let s = SubjectId::parse("customer-42").unwrap();
        assert!(!format!("{s:?}").contains("customer-42"));
        assert!(SubjectId::parse("").is_err());
        assert!(SubjectId::parse(&"s".repeat(MAX_SUBJECT_LEN + 1)).is_err());
        assert!(SubjectId::parse(&"s".repeat(MAX_SUBJECT_LEN)).is_ok());
    }

    #[test]
    fn shred_notes_are_bounded_and_plain() {
        assert!(check_shred_notes("", "").is_ok());
        assert!(check_shred_notes("TICKET-2024/07:42_a.b", "GDPR art. 17 request").is_ok());
        assert!(check_shred_notes(&"r".repeat(MAX_REQUEST_ID_LEN + 1), "").is_err());
        assert!(check_shred_notes("a b", "").is_err());
        assert!(check_shred_notes("x", &"r".repeat(MAX_REASON_LEN + 1)).is_err());
        assert!(check_shred_notes("x", "line\nbreak").is_err());
        assert!(check_shred_notes("x", "bell\u{7}").is_err());
    }

    #[test]
    fn context_rules() {
        let mut c = HashMap::new();
        c.insert("b".to_string(), "2".to_string());
        c.insert("a".to_string(), "1".to_string());
        let p = parse_context(&c).unwrap();
        assert_eq!(p.keys().copied().collect::<Vec<_>>(), ["a", "b"]);
        c.insert(String::new(), "x".into());
        assert!(parse_context(&c).is_err());
        let many: HashMap<String, String> = (0..=MAX_CONTEXT_ENTRIES)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(parse_context(&many).is_err());
    }
}
