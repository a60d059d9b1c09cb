//! `piiguard seal`: makes a sealed envelope (docs/FORMAT.md, "Sealed envelope v1") on the
//! producer's side with the sealing public key only. Offline: no server, no Vault, no private
//! key. The RSA-OAEP-SHA256 encryption is the `rsa` crate's public-key operation (its Marvin
//! advisory concerns private-key decryption, which never runs in piiguard).

use std::collections::BTreeMap;
use std::path::Path;

use rsa::pkcs8::DecodePublicKey as _;
use rsa::traits::PublicKeyParts as _;
use zeroize::Zeroizing;

use crate::crypto::sealed::{self, Kind, SealedError};

/// Why sealing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The public key file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no RSA-2048 SubjectPublicKeyInfo PEM.
    #[error(
        "not an RSA-2048 public key (SubjectPublicKeyInfo PEM, from `piiguard keys public-key`)"
    )]
    BadKey,
    /// A `--context` argument is not `KEY=VALUE`.
    #[error("context {0:?}: expected KEY=VALUE")]
    BadContext(String),
    /// Two `--context` arguments name one key (the envelope is bound to one value per key).
    #[error("context key {0:?} given twice")]
    DuplicateContext(String),
    /// The envelope could not be made (value too long for the direct kind, CSPRNG, RSA).
    #[error("{0}")]
    Envelope(#[from] SealedError),
}

/// The CSPRNG of the RSA-OAEP padding: aws-lc-rs's, the one the rest of piiguard uses.
struct AwsLcRng;

impl rsa::rand_core::TryRng for AwsLcRng {
    type Error = aws_lc_rs::error::Unspecified;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        aws_lc_rs::rand::fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        aws_lc_rs::rand::fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        aws_lc_rs::rand::fill(dst)
    }
}

impl rsa::rand_core::TryCryptoRng for AwsLcRng {}

/// An RSA-2048 public key from SubjectPublicKeyInfo PEM (the first PEM block of the text).
pub fn public_key_from_pem(pem: &str) -> Result<rsa::PublicKey, SealError> {
    let k = rsa::PublicKey::from_public_key_pem(pem.trim()).map_err(|_| SealError::BadKey)?;
    if k.size() != sealed::RSA_LEN {
        return Err(SealError::BadKey);
    }
    Ok(k)
}

/// RSA-OAEP with SHA-256 and MGF1-SHA-256, no label: what Vault transit decrypts.
pub fn oaep_encrypt(key: &rsa::PublicKey, msg: &[u8]) -> Result<Vec<u8>, rsa::Error> {
    key.encrypt(&mut AwsLcRng, rsa::Oaep::<rsa::sha2::Sha256>::new(), msg)
}

/// Parses `KEY=VALUE` context arguments.
pub fn parse_context_args(args: &[String]) -> Result<BTreeMap<&str, &str>, SealError> {
    let mut out = BTreeMap::new();
    for a in args {
        let (k, v) = a
            .split_once('=')
            .ok_or_else(|| SealError::BadContext(a.clone()))?;
        // A second value for a key used to replace the first silently: the envelope was then
        // bound to a context the producer did not mean.
        if out.insert(k, v).is_some() {
            return Err(SealError::DuplicateContext(k.to_string()));
        }
    }
    Ok(out)
}

/// Seals `value` for `keyspace` / `field` / `context` to sealing key version `key_version`
/// (whose public key is `key`): the binary envelope.
pub fn seal_value(
    key: &rsa::PublicKey,
    key_version: u32,
    kind: Kind,
    keyspace: &str,
    field: &str,
    context: &BTreeMap<&str, &str>,
    value: &[u8],
) -> Result<Vec<u8>, SealError> {
    Ok(sealed::seal(
        kind,
        key_version,
        keyspace,
        field,
        context,
        value,
        |m| oaep_encrypt(key, m),
    )?)
}

/// `piiguard seal`: reads the value from stdin, prints the text form.
#[allow(clippy::too_many_arguments)]
pub fn run(
    public_key: &Path,
    key_version: u32,
    direct: bool,
    keyspace: &str,
    field: &str,
    context: &[String],
    binary: bool,
) -> Result<(), SealError> {
    use std::io::{Read as _, Write as _};
    let pem = std::fs::read_to_string(public_key).map_err(|source| SealError::Read {
        path: public_key.display().to_string(),
        source,
    })?;
    let key = public_key_from_pem(&pem)?;
    let ctx = parse_context_args(context)?;
    let mut value = Zeroizing::new(Vec::new());
    std::io::stdin()
        .read_to_end(&mut value)
        .map_err(|source| SealError::Read {
            path: "stdin".into(),
            source,
        })?;
    let kind = if direct { Kind::Direct } else { Kind::Hybrid };
    let env = seal_value(&key, key_version, kind, keyspace, field, &ctx, &value)?;
    let mut out = std::io::stdout().lock();
    let w = if binary {
        out.write_all(&env)
    } else {
        out.write_all(sealed::to_text(&env).as_bytes())
            .and_then(|()| out.write_all(b"\n"))
    };
    w.map_err(|source| SealError::Read {
        path: "stdout".into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exploratory testing: `--context k=1 --context k=2` sealed for `k=2` without a word.
    #[test]
    fn a_context_key_given_twice_is_refused() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = args(&["order_id=o-1", "channel=web"]);
        assert_eq!(parse_context_args(&ok).unwrap().len(), 2);
        let twice = args(&["order_id=o-1", "order_id=o-2"]);
        assert!(matches!(
            parse_context_args(&twice),
            Err(SealError::DuplicateContext(k)) if k == "order_id"
        ));
        assert!(matches!(
            parse_context_args(&args(&["order_id"])),
            Err(SealError::BadContext(_))
        ));
    }
}
