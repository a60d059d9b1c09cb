//! Caller identities as the policy and the limits name them.

/// Why an identity pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The pattern is empty.
    #[error("empty identity")]
    Empty,
    /// A `*` stands somewhere other than at the end.
    #[error("identity {0:?}: `*` is allowed only at the end")]
    MisplacedStar(String),
}

/// An identity pattern: exact, or a prefix when it ends in `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityPattern {
    /// Exactly this identity.
    Exact(String),
    /// Every identity that starts with this text.
    Prefix(String),
}

impl IdentityPattern {
    /// Parses `spiffe://shop/orders` or `spiffe://shop/*` (only a trailing `*` is special).
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if let Some(p) = s.strip_suffix('*') {
            if p.contains('*') {
                return Err(PatternError::MisplacedStar(s.to_string()));
            }
            return Ok(IdentityPattern::Prefix(p.to_string()));
        }
        if s.contains('*') {
            return Err(PatternError::MisplacedStar(s.to_string()));
        }
        Ok(IdentityPattern::Exact(s.to_string()))
    }

    /// Whether `identity` matches.
    pub fn matches(&self, identity: &str) -> bool {
        match self {
            IdentityPattern::Exact(e) => e == identity,
            IdentityPattern::Prefix(p) => identity.starts_with(p.as_str()),
        }
    }
}
