//! The access policy: which caller identity may do which operation on which keyspaces and
//! fields. Default deny: a call is allowed only if some grant of the caller's identity names
//! the operation, the keyspace and the field.
//!
//! The policy is a TOML file (docs/POLICY.md):
//!
//! ```toml
//! [[grant]]
//! identity = "spiffe://shop.local/shipping"   # exact, or a prefix ending in `*`; the kind is
//!                                             # named: spiffe://…, dns:NAME or cn:NAME
//! operations = ["decrypt"]
//! keyspaces = ["orders"]                      # required for keyspace operations; "*" = all
//! fields = ["address", "name"]                # default ["*"]
//! reveal = "masked"                           # decrypt/detokenize return masked values
//!                                             # only; default "full"
//! ```
//!
//! The policy in force is an `Arc<Policy>` in a `watch` channel, published by `app::reload`
//! (the one reloader of file-backed values, on file change and SIGHUP): a broken new file keeps
//! the old policy in force and raises an alarm. [`Policy::load`] is what it calls.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::domain::identity::IdentityPattern;
use crate::domain::names::{Field, Keyspace};
use crate::error::Error;

/// Every operation the policy can grant. Services of later features (tokens, erasure) use the
/// same names; the list is deliberately complete before they exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Crypto.Encrypt and EncryptBatch.
    Encrypt,
    /// Crypto.Decrypt and DecryptBatch.
    Decrypt,
    /// Crypto.Rewrap and RewrapBatch: moving ciphertexts to the subject's newest DEK version
    /// without plaintext. Does not imply `decrypt`.
    Rewrap,
    /// Tokens.Tokenize and TokenizeBatch.
    Tokenize,
    /// Tokens.Detokenize and DetokenizeBatch.
    Detokenize,
    /// Erasure.Shred, ShredStream, CancelShred, SetRetention.
    Shred,
    /// Erasure.GetShredStatus.
    ShredStatus,
    /// The Admin service.
    Admin,
    /// Tokenize in `DETERMINISTIC_JOIN` mode: a token shared by every subject with the same
    /// value, which outlives one subject's shred while another subject holds it. Needed in
    /// addition to `tokenize`; never implied by it (docs/TOKENS.md).
    TokenizeJoin,
    /// Crypto.BlindIndex and BlindIndexBatch, and Encrypt's blind index: equality search
    /// without the right to decrypt.
    Index,
    /// The Keys service's keyspace calls (key status, KEK rotation and retirement, subject key
    /// rotation). Public-key rotation and retirement need `admin`.
    Keys,
}

impl Op {
    /// All operations, in policy-file spelling order.
    pub const ALL: [Op; 11] = [
        Op::Encrypt,
        Op::Decrypt,
        Op::Rewrap,
        Op::Index,
        Op::Tokenize,
        Op::TokenizeJoin,
        Op::Detokenize,
        Op::Shred,
        Op::ShredStatus,
        Op::Keys,
        Op::Admin,
    ];

    /// The policy-file and audit spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Rewrap => "rewrap",
            Op::Tokenize => "tokenize",
            Op::TokenizeJoin => "tokenize_join",
            Op::Detokenize => "detokenize",
            Op::Shred => "shred",
            Op::ShredStatus => "shred_status",
            Op::Index => "index",
            Op::Keys => "keys",
            Op::Admin => "admin",
        }
    }

    /// Whether the operation acts on a keyspace (everything but `admin`).
    pub fn keyspaced(self) -> bool {
        !matches!(self, Op::Admin)
    }

    /// Whether the operation releases PII (counted against the volume budget, and what a
    /// canary alarms on).
    pub fn reveals(self) -> bool {
        matches!(self, Op::Decrypt | Op::Detokenize)
    }

    pub(crate) fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Policy text that cannot be used; the message names the grant and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The text is not valid TOML of the policy's shape.
    #[error("TOML: {0}")]
    Toml(#[from] toml::de::Error),
    /// A grant breaks a rule.
    #[error("{0}")]
    Invalid(String),
}

/// An operation name that is not one of [`Op::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown operation {0:?} (expected one of {names})", names = Op::ALL.iter().map(|o| o.as_str()).collect::<Vec<_>>().join(", "))]
pub struct UnknownOp(pub String);

impl FromStr for Op {
    type Err = UnknownOp;
    fn from_str(s: &str) -> Result<Self, UnknownOp> {
        Op::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| UnknownOp(s.to_string()))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default, rename = "grant")]
    grants: Vec<RawGrant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    identities: Vec<String>,
    operations: Vec<String>,
    #[serde(default)]
    keyspaces: Option<Vec<String>>,
    #[serde(default)]
    fields: Option<Vec<String>>,
    /// `full` (default) or `masked`: the grant's reveals (decrypt, detokenize) are masked only.
    #[serde(default)]
    reveal: Option<String>,
    /// Free text for reviewers; ignored.
    #[serde(default)]
    #[allow(dead_code)]
    comment: Option<String>,
}

#[derive(Debug, Clone)]
enum Scope {
    Any,
    Only(Vec<Box<str>>),
}

impl Scope {
    fn parse(
        what: &str,
        items: Vec<String>,
        valid: impl Fn(&str) -> bool,
    ) -> Result<Self, PolicyError> {
        let bad = |m: String| Err(PolicyError::Invalid(m));
        if items.is_empty() {
            return bad(format!("{what} is empty (use [\"*\"] for all)"));
        }
        if items.iter().any(|i| i == "*") {
            if items.len() > 1 {
                return bad(format!("{what}: \"*\" already includes the others"));
            }
            return Ok(Scope::Any);
        }
        for i in &items {
            if !valid(i) {
                return bad(format!("{what}: invalid name {i:?}"));
            }
        }
        Ok(Scope::Only(
            items.into_iter().map(String::into_boxed_str).collect(),
        ))
    }

    /// Fails closed: a scope limited to some names never allows a call that names none (a
    /// shred across every keyspace is not allowed by a grant for one keyspace).
    fn allows(&self, v: Option<&str>) -> bool {
        match (self, v) {
            (Scope::Any, _) => true,
            (Scope::Only(_), None) => false,
            (Scope::Only(list), Some(v)) => list.iter().any(|x| &**x == v),
        }
    }
}

/// Which fields a check is about.
#[derive(Clone, Copy)]
enum FieldCheck<'a> {
    /// This field, or none (`None`: the call names no field).
    One(Option<&'a str>),
    /// At least one field (the field is not known yet).
    Some,
}

#[derive(Debug, Clone)]
struct Grant {
    ops: u16,
    keyspaces: Scope,
    fields: Scope,
    /// `reveal = "masked"`: the grant's reveal operations allow masked reveals only.
    masked_only: bool,
}

/// How much of a value a reveal (decrypt, detokenize) returns; what the policy checks it
/// against (docs/POLICY.md, masked reveals).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RevealMode {
    /// The whole value: needs a grant without `reveal = "masked"`.
    #[default]
    Full,
    /// The masked value: any grant of the operation allows it.
    Masked,
}

impl RevealMode {
    /// The audit spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RevealMode::Full => "full",
            RevealMode::Masked => "masked",
        }
    }
}

/// A validated policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    exact: HashMap<String, Vec<Grant>>,
    prefixes: Vec<(String, Grant)>,
    /// Number of grants (for logs and `policy check`).
    pub grant_count: usize,
    /// Hex SHA-256 of the file text (names the policy version in audit records).
    pub digest: String,
    /// Warnings found while validating (e.g. a grant to every identity).
    pub warnings: Vec<String>,
}

impl Policy {
    /// Parses and validates policy text. `known_keyspaces`, if given, must contain every
    /// keyspace the policy names (a typo would otherwise silently grant nothing).
    pub fn parse(
        text: &str,
        known_keyspaces: Option<&BTreeSet<String>>,
    ) -> Result<Self, PolicyError> {
        let raw: RawPolicy = toml::from_str(text)?;
        let mut p = Policy {
            digest: hex::encode(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                text.as_bytes(),
            )),
            ..Policy::default()
        };
        for (n, g) in raw.grants.into_iter().enumerate() {
            let at = |m: String| PolicyError::Invalid(format!("grant #{}: {m}", n + 1));
            let at_err = |e: &dyn std::fmt::Display| at(e.to_string());
            let mut ids = g.identities;
            if let Some(i) = g.identity {
                ids.push(i);
            }
            if ids.is_empty() {
                return Err(at("needs `identity` or `identities`".into()));
            }
            if g.operations.is_empty() {
                return Err(at("`operations` is empty".into()));
            }
            let mut ops = 0u16;
            let mut keyspaced = false;
            for o in &g.operations {
                let op: Op = o.parse().map_err(|e| at_err(&e))?;
                keyspaced |= op.keyspaced();
                ops |= op.bit();
            }
            let keyspaces = match g.keyspaces {
                Some(k) => {
                    Scope::parse("keyspaces", k, Keyspace::is_valid).map_err(|e| at_err(&e))?
                }
                None if keyspaced => {
                    return Err(at(
                        "`keyspaces` is required for keyspace operations (use [\"*\"] for all)"
                            .into(),
                    ));
                }
                None => Scope::Any,
            };
            if let (Scope::Only(list), Some(known)) = (&keyspaces, known_keyspaces) {
                for k in list {
                    if !known.contains(&**k) {
                        return Err(at(format!("keyspace {k:?} is not configured")));
                    }
                }
            }
            let fields = Scope::parse(
                "fields",
                g.fields.unwrap_or_else(|| vec!["*".into()]),
                Field::is_valid,
            )
            .map_err(|e| at_err(&e))?;
            let masked_only = match g.reveal.as_deref() {
                None | Some("full") => false,
                Some("masked") => {
                    if !Op::ALL.iter().any(|o| o.reveals() && ops & o.bit() != 0) {
                        return Err(at(
                            "`reveal` applies to grants of decrypt or detokenize".into()
                        ));
                    }
                    true
                }
                Some(other) => {
                    return Err(at(format!(
                        "reveal {other:?}: expected \"full\" or \"masked\""
                    )));
                }
            };
            let grant = Grant {
                ops,
                keyspaces,
                fields,
                masked_only,
            };
            for id in ids {
                let pattern = IdentityPattern::parse(&id).map_err(|e| at_err(&e))?;
                if let Some(kind) = pattern.matches_whole_kind() {
                    p.warnings.push(format!(
                        "grant #{}: identity {id:?} matches every client certificate with a {kind} identity",
                        n + 1
                    ));
                }
                match pattern {
                    IdentityPattern::Exact(e) => p.exact.entry(e).or_default().push(grant.clone()),
                    IdentityPattern::Prefix(pre) => p.prefixes.push((pre, grant.clone())),
                }
                p.grant_count += 1;
            }
        }
        Ok(p)
    }

    /// Reads and parses a policy file.
    pub fn load(
        path: &Path,
        known_keyspaces: Option<&BTreeSet<String>>,
    ) -> Result<Self, PolicyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, known_keyspaces).map_err(|problem| PolicyFileError::Invalid {
            path: path.to_path_buf(),
            problem,
        })
    }

    fn grants_of<'a>(&'a self, identity: &'a str) -> impl Iterator<Item = &'a Grant> + 'a {
        self.exact.get(identity).into_iter().flatten().chain(
            self.prefixes
                .iter()
                .filter(move |(p, _)| identity.starts_with(p.as_str()))
                .map(|(_, g)| g),
        )
    }

    /// Whether `identity` may do `op` on `keyspace` / `field`. `None` means the call names no
    /// keyspace or field; only a grant for every keyspace (or field) allows that: the policy
    /// fails closed.
    pub fn allows(
        &self,
        identity: &str,
        op: Op,
        keyspace: Option<&str>,
        field: Option<&str>,
    ) -> bool {
        self.allows_fields(
            identity,
            op,
            keyspace,
            FieldCheck::One(field),
            RevealMode::Full,
        )
    }

    /// Like [`Policy::allows`] for a reveal in `mode`: a masked reveal is allowed by any grant
    /// of the operation, a full one only by a grant without `reveal = "masked"` (for
    /// operations that do not reveal, the mode changes nothing).
    pub fn allows_reveal(
        &self,
        identity: &str,
        op: Op,
        keyspace: Option<&str>,
        field: Option<&str>,
        mode: RevealMode,
    ) -> bool {
        self.allows_fields(identity, op, keyspace, FieldCheck::One(field), mode)
    }

    /// Whether `identity` may do `op` in `keyspace` on at least one field: the check made
    /// before a lookup whose field is not yet known (Detokenize), repeated on the field after.
    /// Masked-only grants count: the field check after the lookup decides the reveal mode.
    pub fn allows_some_field(&self, identity: &str, op: Op, keyspace: Option<&str>) -> bool {
        self.allows_fields(identity, op, keyspace, FieldCheck::Some, RevealMode::Masked)
    }

    fn allows_fields(
        &self,
        identity: &str,
        op: Op,
        keyspace: Option<&str>,
        field: FieldCheck<'_>,
        mode: RevealMode,
    ) -> bool {
        self.grants_of(identity).any(|g| {
            g.ops & op.bit() != 0
                && !(g.masked_only && op.reveals() && mode == RevealMode::Full)
                && g.keyspaces.allows(keyspace)
                && match field {
                    FieldCheck::One(f) => g.fields.allows(f),
                    FieldCheck::Some => true,
                }
        })
    }

    /// Checks a call; the error names what was missing (never request data).
    pub fn check(
        &self,
        identity: &str,
        op: Op,
        keyspace: Option<&str>,
        field: Option<&str>,
    ) -> Result<(), Error> {
        self.check_fields(
            identity,
            op,
            keyspace,
            FieldCheck::One(field),
            RevealMode::Full,
        )
    }

    /// Like [`Policy::check`] for a reveal in `mode` ([`Policy::allows_reveal`]). A full
    /// reveal refused only because the caller's grants of the field are masked-only is
    /// [`Error::MaskedRevealOnly`] (reason `MASKED_REVEAL_ONLY`).
    pub fn check_reveal(
        &self,
        identity: &str,
        op: Op,
        keyspace: Option<&str>,
        field: Option<&str>,
        mode: RevealMode,
    ) -> Result<(), Error> {
        self.check_fields(identity, op, keyspace, FieldCheck::One(field), mode)
    }

    /// Like [`Policy::check`] with [`Policy::allows_some_field`].
    pub fn check_some_field(
        &self,
        identity: &str,
        op: Op,
        keyspace: Option<&str>,
    ) -> Result<(), Error> {
        self.check_fields(identity, op, keyspace, FieldCheck::Some, RevealMode::Masked)
    }

    fn check_fields(
        &self,
        identity: &str,
        op: Op,
        keyspace: Option<&str>,
        field_check: FieldCheck<'_>,
        mode: RevealMode,
    ) -> Result<(), Error> {
        if self.allows_fields(identity, op, keyspace, field_check, mode) {
            return Ok(());
        }
        if mode == RevealMode::Full
            && op.reveals()
            && self.allows_fields(identity, op, keyspace, field_check, RevealMode::Masked)
        {
            let field = match field_check {
                FieldCheck::One(f) => f.unwrap_or_default(),
                FieldCheck::Some => "",
            };
            return Err(Error::MaskedRevealOnly {
                message: format!(
                    "the access policy grants {identity} only masked reveals ({op}) of field {field:?} in keyspace {:?}; ask with REVEAL_MODE_MASKED",
                    keyspace.unwrap_or_default()
                ),
            });
        }
        let field = match field_check {
            FieldCheck::One(f) => f,
            FieldCheck::Some => None,
        };
        let grants: Vec<&Grant> = self.grants_of(identity).collect();
        let with_op: Vec<&&Grant> = grants.iter().filter(|g| g.ops & op.bit() != 0).collect();
        let message = if grants.is_empty() {
            format!("the access policy grants nothing to {identity}")
        } else if with_op.is_empty() {
            format!("the access policy does not grant {op} to {identity}")
        } else if !with_op.iter().any(|g| g.keyspaces.allows(keyspace)) {
            format!(
                "the access policy does not grant {op} in keyspace {:?} to {identity}",
                keyspace.unwrap_or_default()
            )
        } else {
            format!(
                "the access policy does not grant {op} of field {:?} in keyspace {:?} to {identity}",
                field.unwrap_or_default(),
                keyspace.unwrap_or_default()
            )
        };
        Err(Error::PermissionDenied { message })
    }
}

/// Why a policy file cannot be loaded. Names the file and the problem (a policy holds no
/// secrets: a TOML error may quote the offending line).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyFileError {
    /// The file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The policy file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid policy.
    #[error("{}: {problem}", path.display())]
    Invalid {
        /// The policy file.
        path: PathBuf,
        /// What is wrong, as [`Policy::parse`] says it.
        problem: PolicyError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_fail_closed_when_a_call_names_no_keyspace_or_field() {
        let p = Policy::parse(
            "[[grant]]\nidentity = \"cn:a\"\noperations = [\"shred\", \"detokenize\"]\nkeyspaces = [\"orders\"]\nfields = [\"email\"]\n\n[[grant]]\nidentity = \"cn:all\"\noperations = [\"shred\"]\nkeyspaces = [\"*\"]",
            None,
        )
        .unwrap();
        // A grant for one keyspace / one field never covers a call that names none.
        assert!(!p.allows("cn:a", Op::Shred, None, None));
        assert!(!p.allows("cn:a", Op::Detokenize, Some("orders"), None));
        assert!(p.allows("cn:a", Op::Detokenize, Some("orders"), Some("email")));
        // "*" does, and a lookup whose field is not known yet needs some field granted.
        assert!(p.allows("cn:all", Op::Shred, None, None));
        assert!(p.allows_some_field("cn:a", Op::Detokenize, Some("orders")));
        assert!(!p.allows_some_field("cn:a", Op::Detokenize, Some("crm")));
        assert!(p.check_some_field("cn:a", Op::Shred, Some("crm")).is_err());
    }

    #[test]
    fn tokenize_join_is_a_grant_of_its_own() {
        let p = Policy::parse(
            "[[grant]]\nidentity = \"cn:t\"\noperations = [\"tokenize\", \"detokenize\"]\nkeyspaces = [\"*\"]\n\n[[grant]]\nidentity = \"cn:j\"\noperations = [\"tokenize\", \"tokenize_join\"]\nkeyspaces = [\"orders\"]\nfields = [\"city\"]",
            None,
        )
        .unwrap();
        // `tokenize` (even on every keyspace and field) does not imply `tokenize_join`.
        assert!(p.allows("cn:t", Op::Tokenize, Some("orders"), Some("city")));
        assert!(!p.allows("cn:t", Op::TokenizeJoin, Some("orders"), Some("city")));
        match p.check("cn:t", Op::TokenizeJoin, Some("orders"), Some("city")) {
            Err(Error::PermissionDenied { message }) => {
                assert!(
                    message.contains("does not grant tokenize_join"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(p.allows("cn:j", Op::TokenizeJoin, Some("orders"), Some("city")));
        assert!(!p.allows("cn:j", Op::TokenizeJoin, Some("orders"), Some("email")));
        assert!(!p.allows("cn:j", Op::TokenizeJoin, Some("crm"), Some("city")));
        assert_eq!("tokenize_join".parse::<Op>(), Ok(Op::TokenizeJoin));
        assert_eq!(Op::TokenizeJoin.to_string(), "tokenize_join");
        assert!(!Op::TokenizeJoin.reveals() && Op::TokenizeJoin.keyspaced());
    }

    #[test]
    fn masked_only_grants_allow_masked_reveals_only() {
        let p = Policy::parse(
            "[[grant]]\nidentity = \"cn:support\"\noperations = [\"decrypt\", \"detokenize\", \"encrypt\"]\nkeyspaces = [\"orders\"]\nfields = [\"card_number\"]\nreveal = \"masked\"\n\n[[grant]]\nidentity = \"cn:support\"\noperations = [\"decrypt\"]\nkeyspaces = [\"orders\"]\nfields = [\"address\"]",
            None,
        )
        .unwrap();
        let s = "cn:support";
        let (m, f) = (RevealMode::Masked, RevealMode::Full);
        assert!(p.allows_reveal(s, Op::Decrypt, Some("orders"), Some("card_number"), m));
        assert!(!p.allows_reveal(s, Op::Decrypt, Some("orders"), Some("card_number"), f));
        assert!(!p.allows(s, Op::Decrypt, Some("orders"), Some("card_number")));
        // Operations that reveal nothing are not limited by `reveal`.
        assert!(p.allows(s, Op::Encrypt, Some("orders"), Some("card_number")));
        // A full grant of another field allows both.
        assert!(p.allows_reveal(s, Op::Decrypt, Some("orders"), Some("address"), m));
        assert!(p.allows(s, Op::Decrypt, Some("orders"), Some("address")));
        assert!(p.allows_some_field(s, Op::Detokenize, Some("orders")));
        match p.check(s, Op::Detokenize, Some("orders"), Some("card_number")) {
            Err(e @ Error::MaskedRevealOnly { .. }) => {
                assert_eq!(e.reason(), crate::error::Reason::MaskedRevealOnly);
            }
            other => panic!("{other:?}"),
        }
        // Not granted at all: the ordinary denial.
        assert!(matches!(
            p.check_reveal(s, Op::Decrypt, Some("orders"), Some("name"), m),
            Err(Error::PermissionDenied { .. })
        ));
        for bad in [
            "reveal = \"partial\"",
            "reveal = \"masked\"\noperations = [\"encrypt\"]",
        ] {
            let text = format!(
                "[[grant]]\nidentity = \"cn:a\"\nkeyspaces = [\"*\"]\n{bad}\n{}",
                if bad.contains("operations") {
                    ""
                } else {
                    "operations = [\"decrypt\"]"
                }
            );
            assert!(Policy::parse(&text, None).is_err(), "{text}");
        }
    }

    const POLICY: &str = r#"
[[grant]]
identity = "spiffe://shop/orders"
operations = ["encrypt", "decrypt"]
keyspaces = ["orders", "crm"]

[[grant]]
identity = "spiffe://shop/shipping"
operations = ["decrypt"]
keyspaces = ["orders"]
fields = ["address", "name"]

[[grant]]
identity = "spiffe://shop/erasure"
operations = ["shred", "shred_status"]
keyspaces = ["*"]

[[grant]]
identities = ["spiffe://shop/batch/*", "dns:reports.shop.local"]
operations = ["encrypt"]
keyspaces = ["crm"]
fields = ["email"]

[[grant]]
identity = "spiffe://shop/admin"
operations = ["admin"]
"#;

    fn p() -> Policy {
        let known: BTreeSet<String> = ["orders", "crm"].iter().map(|s| s.to_string()).collect();
        Policy::parse(POLICY, Some(&known)).unwrap()
    }

    #[test]
    fn grants_per_operation_keyspace_and_field() {
        let p = p();
        let o = "spiffe://shop/orders";
        assert!(p.allows(o, Op::Encrypt, Some("orders"), Some("email")));
        assert!(p.allows(o, Op::Decrypt, Some("crm"), Some("card_number")));
        assert!(!p.allows(o, Op::Shred, Some("orders"), None));
        assert!(!p.allows(o, Op::Admin, None, None));
        let s = "spiffe://shop/shipping";
        assert!(p.allows(s, Op::Decrypt, Some("orders"), Some("address")));
        assert!(p.allows(s, Op::Decrypt, Some("orders"), Some("name")));
        assert!(!p.allows(s, Op::Decrypt, Some("orders"), Some("card_number")));
        assert!(!p.allows(s, Op::Decrypt, Some("crm"), Some("name")));
        assert!(!p.allows(s, Op::Encrypt, Some("orders"), Some("name")));
        let e = "spiffe://shop/erasure";
        assert!(p.allows(e, Op::Shred, Some("crm"), None));
        assert!(p.allows(e, Op::ShredStatus, Some("orders"), None));
        assert!(!p.allows(e, Op::Decrypt, Some("orders"), Some("name")));
        assert!(p.allows("spiffe://shop/admin", Op::Admin, None, None));
        assert!(!p.allows(
            "spiffe://shop/nobody",
            Op::Encrypt,
            Some("crm"),
            Some("email")
        ));
    }

    #[test]
    fn wildcard_identities_match_prefixes_only() {
        let p = p();
        assert!(p.allows(
            "spiffe://shop/batch/nightly",
            Op::Encrypt,
            Some("crm"),
            Some("email")
        ));
        assert!(p.allows(
            "dns:reports.shop.local",
            Op::Encrypt,
            Some("crm"),
            Some("email")
        ));
        assert!(!p.allows(
            "spiffe://shop/batchx",
            Op::Encrypt,
            Some("crm"),
            Some("email")
        ));
        assert!(!p.allows(
            "spiffe://shop/batch/nightly",
            Op::Encrypt,
            Some("crm"),
            Some("name")
        ));
        assert!(!p.allows(
            "dns:x.reports.shop.local",
            Op::Encrypt,
            Some("crm"),
            Some("email")
        ));
    }

    #[test]
    fn denial_names_what_was_missing() {
        let p = p();
        let msg = |id: &str, op, ks, f| match p.check(id, op, ks, f) {
            Err(Error::PermissionDenied { message }) => message,
            other => panic!("{other:?}"),
        };
        assert!(
            msg("spiffe://x", Op::Encrypt, Some("orders"), Some("a")).contains("grants nothing")
        );
        assert!(
            msg(
                "spiffe://shop/shipping",
                Op::Encrypt,
                Some("orders"),
                Some("name")
            )
            .contains("does not grant encrypt to")
        );
        assert!(
            msg(
                "spiffe://shop/shipping",
                Op::Decrypt,
                Some("crm"),
                Some("name")
            )
            .contains("in keyspace \"crm\"")
        );
        assert!(
            msg(
                "spiffe://shop/shipping",
                Op::Decrypt,
                Some("orders"),
                Some("card_number")
            )
            .contains("of field \"card_number\"")
        );
    }

    #[test]
    fn shipped_example_policies_are_valid() {
        let known: BTreeSet<String> = ["orders", "crm"].iter().map(|s| s.to_string()).collect();
        for text in [
            include_str!("../../deploy/policy/policy.example.toml"),
            crate::setup::dev::DEV_POLICY,
        ] {
            let p = Policy::parse(text, Some(&known)).unwrap();
            assert!(p.warnings.is_empty());
            assert!(!p.allows(
                "spiffe://shop.local/shipping",
                Op::Decrypt,
                Some("orders"),
                Some("card_number")
            ));
            assert!(p.allows(
                "spiffe://shop.local/shipping",
                Op::Decrypt,
                Some("orders"),
                Some("address")
            ));
            assert!(!p.allows(
                "spiffe://shop.local/erasure",
                Op::Decrypt,
                Some("orders"),
                Some("name")
            ));
            assert!(p.allows("spiffe://shop.local/erasure", Op::Shred, Some("crm"), None));
        }
    }

    #[test]
    fn bad_policies_are_refused() {
        let known: BTreeSet<String> = ["orders"].iter().map(|s| s.to_string()).collect();
        for (text, needle) in [
            (
                "[[grant]]\nidentity = \"cn:a\"\noperations = [\"peek\"]\nkeyspaces=[\"*\"]",
                "unknown operation",
            ),
            (
                "[[grant]]\nidentity = \"cn:a\"\noperations = [\"decrypt\"]",
                "`keyspaces` is required",
            ),
            (
                "[[grant]]\nidentity = \"cn:a\"\noperations = [\"decrypt\"]\nkeyspaces=[\"shop\"]",
                "not configured",
            ),
            (
                "[[grant]]\nidentity = \"cn:a*b\"\noperations = [\"admin\"]",
                "only at the end",
            ),
            ("[[grant]]\noperations = [\"admin\"]", "needs `identity`"),
            (
                "[[grant]]\nidentity = \"reports.shop.local\"\noperations = [\"admin\"]",
                "does not name its kind",
            ),
            (
                "[[grant]]\nidentity = \"*\"\noperations = [\"admin\"]",
                "does not name its kind",
            ),
            (
                "[[grant]]\nidentity = \"cn:a\"\noperations = [\"decrypt\"]\nkeyspaces=[\"orders\"]\nfields=[]",
                "fields is empty",
            ),
            (
                "[[grant]]\nidentity = \"cn:a\"\noperations = [\"admin\"]\nextra = 1",
                "extra",
            ),
            ("[[grant]\n", "TOML"),
        ] {
            let e = Policy::parse(text, Some(&known)).unwrap_err();
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
        let p = Policy::parse(
            "[[grant]]\nidentity = \"spiffe://*\"\noperations = [\"admin\"]",
            None,
        )
        .unwrap();
        assert_eq!(p.warnings.len(), 1);
    }
}
