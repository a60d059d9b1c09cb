//! The data operations (encrypt, decrypt, rewrap and their batch forms), independent of gRPC: inputs
//! are validated here, keys come from the [`KeyManager`], bytes from [`crate::crypto`].
//!
//! Every operation is authorised through the call's [`Guard`], per item and after validation
//! (so that only valid keyspace and field names reach the policy and the audit record), and
//! before any key is fetched. Decryption names its keyspace in the ciphertext, so it is
//! authorised after the header is parsed; the key id goes to the guard (audit, canaries).

pub mod batch;
pub mod decrypt;
pub mod encrypt;
pub mod erasure;
pub mod rewrap;
pub mod search;
pub mod token_cache;
pub mod tokens;
pub mod unseal;

pub use decrypt::DecryptInput;
pub use encrypt::EncryptInput;
pub use rewrap::{RewrapInput, Rewrapped};
pub use unseal::{UnsealInput, Unsealed};

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::crypto::envelope::{self, EnvelopeError};
use crate::error::{Error, Reason, Result};
use crate::keys::KeyManager;
use crate::keys::cache::DekEntry;
use crate::keys::index_keys::IndexKeys;

/// The data-plane engine.
pub struct Engine {
    /// Where DEKs come from.
    pub keys: Arc<KeyManager>,
    /// Largest plaintext accepted.
    pub max_plaintext: usize,
    /// Most items in one batch.
    pub max_batch: usize,
    /// Blind-index keys and field settings (kinds, masks): [`search`].
    pub index_keys: Arc<IndexKeys>,
}

/// Awaits a key lookup and records whether it was a cache hit (ready at the first poll: no
/// Vault round trip) or a miss (its duration is the Vault-backed load's, and its failure a
/// Vault error), without reaching into the key manager.
pub(crate) async fn observed<F>(f: F) -> Result<Arc<DekEntry>>
where
    F: std::future::Future<Output = Result<Arc<DekEntry>>>,
{
    let mut f = std::pin::pin!(f);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await;
    match first {
        std::task::Poll::Ready(r) => {
            crate::metrics::dek_cache(true);
            r
        }
        std::task::Poll::Pending => {
            let started = std::time::Instant::now();
            let r = f.await;
            crate::metrics::dek_cache(false);
            let vault_failed = matches!(r, Err(Error::Unavailable { .. } | Error::Internal { .. }));
            crate::metrics::vault_call("dek_load", started.elapsed(), !vault_failed);
            r
        }
    }
}

/// Seals one item with its key: with prepared keys and a nonce drawn by the batch, or (unary
/// calls) a fresh nonce and the key schedule the cache entry keeps (else a one-off one:
/// [`DekEntry::prepared`]). `ctx` is the validated context. The key must have been through
/// [`KeyManager::ensure_uses`] (its reserved uses are spent here).
pub(crate) fn seal_item(
    key: &DekEntry,
    batch: Option<(
        &envelope::PreparedKeys<'_>,
        &[u8; crate::crypto::aead::NONCE_LEN],
    )>,
    i: &EncryptInput<'_>,
    ctx: &BTreeMap<&str, &str>,
) -> Result<Vec<u8>> {
    if !key.try_use() {
        return Err(Error::ResourceExhausted {
            reason: Reason::KeyUsageExhausted,
            message: "this subject's data key reached its encryption limit".into(),
        });
    }
    let failed = |_| Error::internal("envelope seal failed");
    let own;
    let (prepared, nonce) = match batch {
        Some((prepared, nonce)) => (prepared, *nonce),
        None => {
            own = key.prepared().map_err(failed)?;
            (&own, envelope::random_nonce().map_err(failed)?)
        }
    };
    let ct = envelope::seal_prepared(
        prepared,
        &key.keyspace,
        &key.id.key_id,
        key.id.dek_version,
        i.field,
        ctx,
        i.plaintext,
        &nonce,
    )
    .map_err(failed)?;
    Ok(if i.text {
        envelope::to_text(&ct).into_bytes()
    } else {
        ct
    })
}

/// The error a caller sees for a ciphertext that does not open.
pub(crate) fn envelope_error(e: EnvelopeError) -> Error {
    match e {
        EnvelopeError::Malformed => Error::bad_ciphertext(
            Reason::MalformedCiphertext,
            "not a piiguard ciphertext, or truncated",
        ),
        EnvelopeError::UnsupportedVersion => Error::bad_ciphertext(
            Reason::UnsupportedVersion,
            "ciphertext format version not supported by this server",
        ),
        EnvelopeError::Authentication => Error::bad_ciphertext(
            Reason::DecryptionFailed,
            "ciphertext does not authenticate (wrong field, context or key, or modified)",
        ),
    }
}
