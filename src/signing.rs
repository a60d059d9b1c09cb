//! Signatures by the RSA-2048 key held in Vault transit (certificates of destruction, audit
//! checkpoints) and their offline verification.
//!
//! Signing is always done by Vault (the private key never leaves it): RSA-PSS with SHA-256 and
//! salt length = hash length, so plain OpenSSL verifies it:
//! `openssl dgst -sha256 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:32 -verify pub.pem -signature sig msg`.

use std::sync::Arc;

use aws_lc_rs::signature::{RSA_PSS_2048_8192_SHA256, UnparsedPublicKey};
use rustls_pki_types::SubjectPublicKeyInfoDer;
use rustls_pki_types::pem::PemObject as _;

use crate::error::Result;
use crate::vault::Vault;

/// A signature and the version of the transit key that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub key_version: u32,
    pub bytes: Vec<u8>,
}

/// Signs with a transit RSA key.
pub struct Signer {
    vault: Arc<Vault>,
    key: String,
}

impl Signer {
    pub fn new(vault: Arc<Vault>, key: impl Into<String>) -> Self {
        Self {
            vault,
            key: key.into(),
        }
    }

    /// Signs `message` (RSA-PSS-SHA256, salt = 32 bytes).
    pub async fn sign(&self, message: &[u8]) -> Result<Signature> {
        let (key_version, bytes) = self.vault.transit_sign(&self.key, message).await?;
        Ok(Signature { key_version, bytes })
    }

    /// The transit key name.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// PEM public keys by key version, oldest first.
    pub async fn public_keys(&self) -> Result<Vec<(u32, String)>> {
        self.vault.transit_public_keys(&self.key).await
    }
}

/// Verifies an RSA-PSS-SHA256 signature with a PEM (SubjectPublicKeyInfo) public key.
pub fn verify(public_key_pem: &str, message: &[u8], signature: &[u8]) -> Result<(), String> {
    let spki = SubjectPublicKeyInfoDer::from_pem_slice(public_key_pem.as_bytes())
        .map_err(|e| format!("public key: {e}"))?;
    // aws-lc-rs takes the RSAPublicKey inside the SubjectPublicKeyInfo.
    use x509_parser::prelude::FromDer as _;
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki.as_ref())
        .map_err(|e| format!("public key: {e}"))?;
    UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, &info.subject_public_key.data[..])
        .verify(message, signature)
        .map_err(|_| "signature does not verify".to_string())
}
