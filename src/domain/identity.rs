//! Caller identities as the policy and the limits name them.
//!
//! A caller identity is typed: a SPIFFE ID (URI SAN), a DNS name (DNS SAN) or, only where the
//! operator opted in, a subject common name. Each kind has one canonical text form, used by the
//! policy, the limits, lockouts, the audit log, metrics and logs, and the forms of different
//! kinds never collide:
//!
//! | kind | canonical form | example |
//! |---|---|---|
//! | SPIFFE URI SAN | the URI as it is | `spiffe://shop.local/orders` |
//! | DNS SAN | `dns:` + the name in lower case | `dns:reports.shop.local` |
//! | subject CN | `cn:` + the CN as it is | `cn:legacy-batch` |
//!
//! A CN that reads `spiffe://shop.local/admin` is therefore `cn:spiffe://shop.local/admin`, and
//! no `spiffe://` pattern can ever match it. Identity patterns name their kind by the same
//! prefix; a pattern without one is refused.

use std::fmt;

/// The kind of a caller identity: which part of the client certificate named it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdentityKind {
    /// A `spiffe://` URI SAN.
    Spiffe,
    /// A DNS SAN.
    Dns,
    /// The subject common name (only with `tls.allow_cn_identity = true`).
    Cn,
}

impl IdentityKind {
    /// Every kind.
    pub const ALL: [IdentityKind; 3] = [IdentityKind::Spiffe, IdentityKind::Dns, IdentityKind::Cn];

    /// The prefix of the canonical form (and of patterns) of this kind.
    pub const fn prefix(self) -> &'static str {
        match self {
            IdentityKind::Spiffe => "spiffe://",
            IdentityKind::Dns => "dns:",
            IdentityKind::Cn => "cn:",
        }
    }

    /// The kind's name in logs and docs.
    pub const fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Spiffe => "spiffe",
            IdentityKind::Dns => "dns",
            IdentityKind::Cn => "cn",
        }
    }

    /// The kind whose prefix `s` starts with, and the rest.
    fn split(s: &str) -> Option<(IdentityKind, &str)> {
        IdentityKind::ALL
            .into_iter()
            .find_map(|k| s.strip_prefix(k.prefix()).map(|rest| (k, rest)))
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a name from a certificate cannot be an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Nothing after the kind's prefix.
    #[error("empty {0} identity")]
    Empty(IdentityKind),
    /// Control characters (would forge log lines) or, for DNS names, spaces.
    #[error("{0} identity with control characters or spaces")]
    Unprintable(IdentityKind),
}

/// A caller identity: its kind and its canonical text (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    kind: IdentityKind,
    canonical: String,
}

impl Identity {
    /// The identity of a SPIFFE URI SAN (`uri` starts with `spiffe://`).
    pub fn spiffe(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix(IdentityKind::Spiffe.prefix())
            .ok_or(IdentityError::Empty(IdentityKind::Spiffe))?;
        Self::new(IdentityKind::Spiffe, rest, uri.to_string())
    }

    /// The identity of a DNS SAN: `dns:` and the name in lower case (DNS names are
    /// case-insensitive).
    pub fn dns(name: &str) -> Result<Self, IdentityError> {
        let lower = name.to_ascii_lowercase();
        if lower.contains(' ') {
            return Err(IdentityError::Unprintable(IdentityKind::Dns));
        }
        let canonical = format!("{}{lower}", IdentityKind::Dns.prefix());
        Self::new(IdentityKind::Dns, &lower, canonical)
    }

    /// The identity of a subject common name: `cn:` and the CN as it is.
    pub fn cn(cn: &str) -> Result<Self, IdentityError> {
        let canonical = format!("{}{cn}", IdentityKind::Cn.prefix());
        Self::new(IdentityKind::Cn, cn, canonical)
    }

    fn new(kind: IdentityKind, name: &str, canonical: String) -> Result<Self, IdentityError> {
        if name.is_empty() {
            return Err(IdentityError::Empty(kind));
        }
        if name.chars().any(char::is_control) {
            return Err(IdentityError::Unprintable(kind));
        }
        Ok(Self { kind, canonical })
    }

    /// The kind.
    pub fn kind(&self) -> IdentityKind {
        self.kind
    }

    /// The canonical text: what the policy, limits, audit, metrics and logs name.
    pub fn as_str(&self) -> &str {
        &self.canonical
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

/// Why an identity pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The pattern is empty.
    #[error("empty identity")]
    Empty,
    /// A `*` stands somewhere other than at the end.
    #[error("identity {0:?}: `*` is allowed only at the end")]
    MisplacedStar(String),
    /// The pattern does not start with a kind prefix.
    #[error(
        "identity {0:?} does not name its kind: write spiffe://… for a SPIFFE ID, dns:NAME for a DNS SAN, cn:NAME for a subject CN (e.g. dns:reports.shop.local)"
    )]
    NoKind(String),
    /// Only a kind prefix, without a name or `*`.
    #[error("identity {0:?}: a name (or `*`) must follow the kind prefix")]
    NoName(String),
}

/// An identity pattern over canonical identities: exact, or a prefix when it ends in `*`. It
/// always starts with a kind prefix (`spiffe://`, `dns:`, `cn:`), so it matches identities of
/// that kind only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityPattern {
    /// Exactly this identity.
    Exact(String),
    /// Every identity that starts with this text (which starts with a kind prefix).
    Prefix(String),
}

impl IdentityPattern {
    /// Parses `spiffe://shop/orders`, `spiffe://shop/*`, `dns:reports.shop.local`, `cn:legacy`
    /// (only a trailing `*` is special; `dns:` patterns are lower-cased like DNS identities).
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        let Some((kind, rest)) = IdentityKind::split(s) else {
            return Err(PatternError::NoKind(s.to_string()));
        };
        if rest.is_empty() {
            return Err(PatternError::NoName(s.to_string()));
        }
        let text = match kind {
            IdentityKind::Dns => format!("{}{}", kind.prefix(), rest.to_ascii_lowercase()),
            _ => s.to_string(),
        };
        if let Some(p) = text.strip_suffix('*') {
            if p.contains('*') {
                return Err(PatternError::MisplacedStar(s.to_string()));
            }
            return Ok(IdentityPattern::Prefix(p.to_string()));
        }
        if text.contains('*') {
            return Err(PatternError::MisplacedStar(s.to_string()));
        }
        Ok(IdentityPattern::Exact(text))
    }

    /// Whether `identity` (canonical text) matches.
    pub fn matches(&self, identity: &str) -> bool {
        match self {
            IdentityPattern::Exact(e) => e == identity,
            IdentityPattern::Prefix(p) => identity.starts_with(p.as_str()),
        }
    }

    /// The kind a prefix pattern matches every identity of, if it is nothing but the kind's
    /// prefix (`spiffe://*`, `dns:*`, `cn:*`).
    pub fn matches_whole_kind(&self) -> Option<IdentityKind> {
        match self {
            IdentityPattern::Prefix(p) => IdentityKind::ALL.into_iter().find(|k| k.prefix() == p),
            IdentityPattern::Exact(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_never_collide() {
        let cn = Identity::cn("spiffe://shop.local/admin").unwrap();
        assert_eq!(cn.as_str(), "cn:spiffe://shop.local/admin");
        assert_eq!(cn.kind(), IdentityKind::Cn);
        let dns = Identity::dns("Reports.Shop.Local").unwrap();
        assert_eq!(dns.as_str(), "dns:reports.shop.local");
        let s = Identity::spiffe("spiffe://shop.local/admin").unwrap();
        assert_eq!(s.as_str(), "spiffe://shop.local/admin");
        let admin = IdentityPattern::parse("spiffe://shop.local/admin").unwrap();
        let all = IdentityPattern::parse("spiffe://shop.local/*").unwrap();
        assert!(admin.matches(s.as_str()) && all.matches(s.as_str()));
        assert!(!admin.matches(cn.as_str()) && !all.matches(cn.as_str()));
        let d = IdentityPattern::parse("dns:REPORTS.shop.local").unwrap();
        assert!(d.matches(dns.as_str()));
        assert!(
            !IdentityPattern::parse("cn:reports.shop.local")
                .unwrap()
                .matches(dns.as_str())
        );
        assert!(Identity::cn("a\nb").is_err());
        assert!(Identity::cn("").is_err());
        assert!(Identity::dns("a b").is_err());
        assert!(Identity::spiffe("spiffe://").is_err());
    }

    #[test]
    fn patterns_name_their_kind() {
        for bad in ["reports.shop.local", "*", "orders", "spiffe:/x", "DNS:x"] {
            assert!(
                matches!(IdentityPattern::parse(bad), Err(PatternError::NoKind(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            IdentityPattern::parse("dns:"),
            Err(PatternError::NoName(_))
        ));
        assert_eq!(
            IdentityPattern::parse("cn:*").unwrap().matches_whole_kind(),
            Some(IdentityKind::Cn)
        );
        assert_eq!(
            IdentityPattern::parse("spiffe://*")
                .unwrap()
                .matches_whole_kind(),
            Some(IdentityKind::Spiffe)
        );
        assert_eq!(
            IdentityPattern::parse("spiffe://shop/*")
                .unwrap()
                .matches_whole_kind(),
            None
        );
        assert!(matches!(
            IdentityPattern::parse("dns:a*b"),
            Err(PatternError::MisplacedStar(_))
        ));
    }
}
