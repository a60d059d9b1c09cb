//! Caller identities as the policy and the limits name them.

/// An identity pattern: exact, or a prefix when it ends in `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityPattern {
    Exact(String),
    Prefix(String),
}

impl IdentityPattern {
    /// Parses `spiffe://shop/orders` or `spiffe://shop/*` (only a trailing `*` is special).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty identity".into());
        }
        if let Some(p) = s.strip_suffix('*') {
            if p.contains('*') {
                return Err(format!("identity {s:?}: `*` is allowed only at the end"));
            }
            return Ok(IdentityPattern::Prefix(p.to_string()));
        }
        if s.contains('*') {
            return Err(format!("identity {s:?}: `*` is allowed only at the end"));
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
