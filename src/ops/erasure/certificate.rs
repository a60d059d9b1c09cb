//! The certificate of destruction: a small canonical JSON document, signed by the RSA-2048
//! key in Vault transit (RSA-PSS, SHA-256, salt length 32), verifiable offline by anyone with
//! the public key and plain OpenSSL.
//!
//! Layout of the file: `{"payload": "<canonical JSON>", "signature": {...}}`. The signature is
//! over the exact bytes of `payload` (a JSON string, so there is nothing to canonicalise when
//! verifying: take the string, verify the bytes).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::crypto::signature::SignatureError;

/// Why a certificate of destruction is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The document is not a certificate's JSON.
    #[error("not a certificate: {0}")]
    NotACertificate(serde_json::Error),
    /// The signature value is not base64.
    #[error("signature is not base64")]
    SignatureEncoding,
    /// The signature algorithm is not the one piiguard uses.
    #[error("unknown signature algorithm {0}")]
    UnknownAlgorithm(String),
    /// The signature does not verify (or the key is unusable).
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The signed payload is not the payload's JSON.
    #[error("payload: {0}")]
    Payload(serde_json::Error),
    /// The payload's format is unknown.
    #[error("unknown certificate format {0}")]
    UnknownFormat(String),
    /// The payload is not in its canonical form (so its bytes could mean two things).
    #[error("payload is not in canonical form")]
    NotCanonical,
}

/// Format tag of v1 certificates.
pub const FORMAT_V1: &str = "piiguard-certificate-of-destruction/v1";
/// The erasure method certified.
pub const METHOD: &str = "cryptographic erase, NIST SP 800-88 Rev. 1";
/// What every certificate lists in `caller_must_delete`.
pub const CALLER_MUST_DELETE: &str = "blind indexes (bi1.…) of this subject's values stored beside its ciphertexts: keyed hashes of the values, which the shred leaves valid and matching";

/// The signature algorithm.
pub const SIGNATURE_ALG: &str = "RSASSA-PSS-SHA256-SALT32";

/// One destroyed key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestroyedKey {
    /// Version of the destroyed DEK.
    pub dek_version: u32,
    /// Hex id of the destroyed DEK.
    pub key_id: String,
}

/// What the certificate states. Fields are in alphabetical order, so the serialisation is
/// canonical (sorted keys, no whitespace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// The backup retention the operator configured: the longest a wrapped copy of a key can
    /// survive in a Vault backup.
    pub backup_retention_days: u64,
    /// The longest an unwrapped copy can survive in a replica that missed the eviction.
    pub cache_max_survival_secs: u64,
    /// What the shred did not destroy and the caller must delete itself: the blind indexes
    /// of the subject's values (keyed hashes of the values, not of the subject: a shred leaves
    /// them valid; docs/SEARCH.md). Absent in certificates made before blind indexes existed,
    /// which verify unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_must_delete: Option<Vec<String>>,
    /// Unique id of this certificate.
    pub certificate_id: String,
    /// Every DEK destroyed.
    pub destroyed_keys: Vec<DestroyedKey>,
    /// Vault paths whose metadata (every version) was deleted.
    pub destroyed_vault_paths: Vec<String>,
    /// When the keys were destroyed (RFC 3339).
    pub executed_at: String,
    /// Payload format name and version.
    pub format: String,
    /// The piiguard instance that executed the shred.
    pub instance: String,
    /// The keyspace.
    pub keyspace: String,
    /// How the data was destroyed (cryptographic erase, NIST SP 800-88).
    pub method: String,
    /// The caller's reason (no personal data).
    pub reason: String,
    /// The caller's request id (no personal data).
    pub request_id: String,
    /// When the shred was requested (RFC 3339).
    pub requested_at: String,
    /// Keyed hash of the subject id (HMAC-SHA256 under the keyspace's index key).
    pub subject_ref: String,
    /// How the destruction was checked before certifying.
    pub verification: String,
}

/// The signature block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureBlock {
    /// Signature algorithm.
    pub algorithm: String,
    /// Transit key name.
    pub key: String,
    /// Version of the transit signing key.
    pub key_version: u32,
    /// Base64 of the raw signature.
    pub value: String,
}

/// A signed certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// The signed payload: canonical JSON of [`Payload`].
    pub payload: String,
    /// Its signature.
    pub signature: SignatureBlock,
}

impl Payload {
    /// The canonical bytes that get signed.
    pub fn canonical(&self) -> String {
        // Serialising a struct of strings, numbers and vectors cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl Certificate {
    /// Assembles a certificate from a payload and its signature.
    pub fn new(payload: String, key: &str, key_version: u32, signature: &[u8]) -> Self {
        Self {
            payload,
            signature: SignatureBlock {
                algorithm: SIGNATURE_ALG.into(),
                key: key.into(),
                key_version,
                value: B64.encode(signature),
            },
        }
    }

    /// The document as stored and returned (pretty-printed JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parses a certificate document.
    pub fn parse(json: &str) -> Result<Self, CertificateError> {
        serde_json::from_str(json).map_err(CertificateError::NotACertificate)
    }

    /// The raw signature bytes.
    pub fn signature_bytes(&self) -> Result<Vec<u8>, CertificateError> {
        B64.decode(&self.signature.value)
            .map_err(|_| CertificateError::SignatureEncoding)
    }

    /// Verifies the signature with a PEM public key and returns the parsed payload.
    pub fn verify(&self, public_key_pem: &str) -> Result<Payload, CertificateError> {
        if self.signature.algorithm != SIGNATURE_ALG {
            return Err(CertificateError::UnknownAlgorithm(
                self.signature.algorithm.clone(),
            ));
        }
        crate::crypto::signature::verify(
            public_key_pem,
            self.payload.as_bytes(),
            &self.signature_bytes()?,
        )?;
        let p: Payload = serde_json::from_str(&self.payload).map_err(CertificateError::Payload)?;
        if p.format != FORMAT_V1 {
            return Err(CertificateError::UnknownFormat(p.format));
        }
        if p.canonical() != self.payload {
            return Err(CertificateError::NotCanonical);
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::time::rfc3339_secs;

    fn payload() -> Payload {
        Payload {
            backup_retention_days: 35,
            cache_max_survival_secs: 3600,
            caller_must_delete: None,
            certificate_id: "cod-1".into(),
            destroyed_keys: vec![DestroyedKey {
                dek_version: 1,
                key_id: "ab".into(),
            }],
            destroyed_vault_paths: vec!["kv/metadata/x".into()],
            executed_at: rfc3339_secs(1_700_000_000),
            format: FORMAT_V1.into(),
            instance: "i".into(),
            keyspace: "orders".into(),
            method: METHOD.into(),
            reason: "gdpr".into(),
            request_id: "r".into(),
            requested_at: rfc3339_secs(1_699_999_999),
            subject_ref: "cd".into(),
            verification: "v".into(),
        }
    }

    #[test]
    fn canonical_form_has_sorted_keys_and_round_trips() {
        let p = payload();
        let c = p.canonical();
        assert!(c.starts_with("{\"backup_retention_days\":35,\"cache_max_survival_secs\""));
        assert!(!c.contains(' ') || c.contains("Rev. 1"));
        let back: Payload = serde_json::from_str(&c).unwrap();
        assert_eq!(back, p);
        // A certificate made before `caller_must_delete` existed keeps its bytes; a new one
        // has the member in its sorted place.
        assert!(!c.contains("caller_must_delete"));
        let mut p2 = p;
        p2.caller_must_delete = Some(vec![CALLER_MUST_DELETE.into()]);
        let c2 = p2.canonical();
        assert!(
            c2.contains("\"cache_max_survival_secs\":3600,\"caller_must_delete\":[\"blind indexes")
        );
        assert_eq!(serde_json::from_str::<Payload>(&c2).unwrap(), p2);
    }
}
