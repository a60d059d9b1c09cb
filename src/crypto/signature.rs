//! RSA-PSS-SHA256 signatures (salt length = hash length) made by Vault transit, and their
//! offline verification with a PEM public key, as `openssl dgst -sigopt rsa_padding_mode:pss`
//! does.

use aws_lc_rs::signature::{RSA_PSS_2048_8192_SHA256, UnparsedPublicKey};
use rustls_pki_types::SubjectPublicKeyInfoDer;
use rustls_pki_types::pem::PemObject as _;

/// A signature and the version of the transit key that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// Version of the transit key that signed.
    pub key_version: u32,
    /// The RSA-PSS signature.
    pub bytes: Vec<u8>,
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The public key is not a PEM SubjectPublicKeyInfo.
    #[error("public key: {0}")]
    PublicKey(String),
    /// The signature does not verify with that key.
    #[error("signature does not verify")]
    Invalid,
}

/// Verifies an RSA-PSS-SHA256 signature with a PEM (SubjectPublicKeyInfo) public key.
pub fn verify(
    public_key_pem: &str,
    message: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    let spki = SubjectPublicKeyInfoDer::from_pem_slice(public_key_pem.as_bytes())
        .map_err(|e| SignatureError::PublicKey(e.to_string()))?;
    // aws-lc-rs takes the RSAPublicKey inside the SubjectPublicKeyInfo.
    use x509_parser::prelude::FromDer as _;
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki.as_ref())
        .map_err(|e| SignatureError::PublicKey(e.to_string()))?;
    UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, &info.subject_public_key.data[..])
        .verify(message, signature)
        .map_err(|_| SignatureError::Invalid)
}
