//! The one signer: signatures by the RSA-2048 key held in Vault transit (certificates of
//! destruction, audit checkpoints). Their offline verification is `crypto::signature`.
//!
//! Signing is always done by Vault (the private key never leaves it): RSA-PSS with SHA-256 and
//! salt length = hash length, so plain OpenSSL verifies it:
//! `openssl dgst -sha256 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:32 -verify pub.pem -signature sig msg`.

use std::sync::Arc;

pub use crate::crypto::signature::Signature;
use crate::error::Result;
use crate::vault::Vault;

/// Signs with a transit RSA key.
pub struct Signer {
    vault: Arc<Vault>,
    key: String,
}

impl Signer {
    /// A signer with transit key `key` (piiguard's is `piiguard-signing`, made by bootstrap).
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
