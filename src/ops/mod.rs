//! The data operations (encrypt, decrypt and their batch forms), independent of gRPC: inputs
//! are validated here, keys come from the [`KeyManager`], bytes from [`crate::crypto`].
//!
//! Every operation is authorised through the call's [`Guard`], per item and after validation
//! (so that only valid keyspace and field names reach the policy and the audit record), and
//! before any key is fetched. Decryption names its keyspace in the ciphertext, so it is
//! authorised after the header is parsed; the key id goes to the guard (audit, canaries).

pub mod erasure;
pub mod tokens;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt as _;
use zeroize::Zeroizing;

use crate::access::guard::Guard;
use crate::access::policy::Op;
use crate::crypto::envelope::{self, EnvelopeError};
use crate::domain::names::{Field, SubjectId, parse_context};
use crate::error::{Error, Reason, Result};
use crate::keys::KeyManager;
use crate::keys::cache::{DekEntry, Tick};
use crate::keys::manager::{MAX_USES_PER_DEK, truncate_for_message};

/// Cold key loads of one batch run at most this many at a time.
const BATCH_KEY_CONCURRENCY: usize = 16;

/// One encryption request.
pub struct EncryptInput<'a> {
    /// Keyspace name as configured.
    pub keyspace: &'a str,
    /// The raw subject id (hashed before use, never stored or logged).
    pub subject: &'a str,
    /// Field name, bound into the ciphertext.
    pub field: &'a str,
    /// The value to seal.
    pub plaintext: &'a [u8],
    /// Caller context, bound into the ciphertext.
    pub context: &'a HashMap<String, String>,
    /// Return the text form (`pg1.…`) instead of binary.
    pub text: bool,
}

/// One decryption request.
pub struct DecryptInput<'a> {
    /// If not empty, the ciphertext must belong to this keyspace.
    pub keyspace: &'a str,
    /// Field name, bound into the ciphertext.
    pub field: &'a str,
    /// The ciphertext, binary or text form.
    pub ciphertext: &'a [u8],
    /// Caller context, bound into the ciphertext.
    pub context: &'a HashMap<String, String>,
}

/// The data-plane engine.
pub struct Engine {
    /// Where DEKs come from.
    pub keys: Arc<KeyManager>,
    /// Largest plaintext accepted.
    pub max_plaintext: usize,
    /// Most items in one batch.
    pub max_batch: usize,
}

/// Awaits a key lookup and records whether it was a cache hit (ready at the first poll: no
/// Vault round trip) or a miss (its duration is the Vault-backed load's, and its failure a
/// Vault error), without reaching into the key manager.
async fn observed<F>(f: F) -> Result<Arc<DekEntry>>
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

/// A run of consecutive batch items that need one key (`want`), and that key once found:
/// `None` until looked up or loaded.
struct KeyRun<W> {
    want: W,
    key: Option<Result<Arc<DekEntry>>>,
}

/// The key of run `run`, and its expanded AES key: expanded again only when the run changes
/// (the previous run's expanded key is dropped, and cleared, first).
fn run_key<'k, 'p, W>(
    runs: &'k [KeyRun<W>],
    run: usize,
    prep: &'p mut Option<(usize, envelope::PreparedKeys<'k>)>,
) -> Result<(&'k DekEntry, &'p envelope::PreparedKeys<'k>)> {
    let key = match &runs[run].key {
        Some(Ok(k)) => k,
        Some(Err(e)) => return Err(e.clone()),
        None => return Err(Error::internal("batch key missing")),
    };
    if prep.as_ref().is_none_or(|(r, _)| *r != run) {
        *prep = None;
        let pk = key
            .keys
            .prepare()
            .map_err(|_| Error::internal("key preparation failed"))?;
        *prep = Some((run, pk));
    }
    match prep {
        Some((_, pk)) => Ok((key, pk)),
        None => Err(Error::internal("batch key missing")),
    }
}

/// What a decryption item needs: keyspace, key id, DEK version, algorithm byte.
type KeyWant<'a> = (&'a str, envelope::KeyId, u32, u8);

/// Seals one item with its key: with prepared keys and a nonce drawn by the batch, or (unary
/// calls) a fresh nonce and a one-off key schedule. `ctx` is the validated context.
fn seal_item(
    key: &DekEntry,
    batch: Option<(
        &envelope::PreparedKeys<'_>,
        &[u8; crate::crypto::aead::NONCE_LEN],
    )>,
    i: &EncryptInput<'_>,
    ctx: &BTreeMap<&str, &str>,
) -> Result<Vec<u8>> {
    if key.uses.fetch_add(1, Ordering::Relaxed) >= MAX_USES_PER_DEK {
        return Err(Error::ResourceExhausted {
            reason: Reason::KeyUsageExhausted,
            message: "this subject's data key reached its encryption limit".into(),
        });
    }
    let ct = match batch {
        Some((prepared, nonce)) => envelope::seal_prepared(
            prepared,
            &key.keyspace,
            &key.key_id,
            key.dek_version,
            i.field,
            ctx,
            i.plaintext,
            nonce,
        ),
        None => envelope::seal(
            &key.keys,
            &key.keyspace,
            &key.key_id,
            key.dek_version,
            i.field,
            ctx,
            i.plaintext,
        ),
    }
    .map_err(|_| Error::internal("envelope seal failed"))?;
    Ok(if i.text {
        envelope::to_text(&ct).into_bytes()
    } else {
        ct
    })
}

fn envelope_error(e: EnvelopeError) -> Error {
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

impl Engine {
    fn check_encrypt(&self, i: &EncryptInput<'_>) -> Result<()> {
        if !self.keys.has_keyspace(i.keyspace) {
            return Err(Error::invalid(
                Reason::UnknownKeyspace,
                format!("unknown keyspace {:?}", truncate_for_message(i.keyspace)),
            ));
        }
        SubjectId::parse(i.subject)?;
        Field::parse(i.field)?;
        if i.plaintext.len() > self.max_plaintext {
            return Err(Error::invalid(
                Reason::PayloadTooLarge,
                format!(
                    "plaintext is {} bytes; the maximum is {}",
                    i.plaintext.len(),
                    self.max_plaintext
                ),
            ));
        }
        Ok(())
    }

    /// Encrypts one field.
    pub async fn encrypt(&self, g: &mut Guard, i: &EncryptInput<'_>) -> Result<Vec<u8>> {
        self.check_encrypt(i)?;
        let ctx = parse_context(i.context)?;
        g.authorize(Op::Encrypt, Some(i.keyspace), Some(i.field))?;
        let sref = self.keys.subject_ref(i.keyspace, i.subject)?;
        g.note_subject(i.keyspace, &sref);
        let key = observed(self.keys.key_for_subject_ref(i.keyspace, &sref)).await?;
        g.note_key(i.keyspace, &key.key_id);
        seal_item(&key, None, i, &ctx)
    }

    /// Encrypts on piiguard's own behalf (canary records made by an admin call), outside any
    /// caller's grants; returns the ciphertext and the subject's key id.
    pub async fn encrypt_internal(
        &self,
        i: &EncryptInput<'_>,
    ) -> Result<(Vec<u8>, crate::crypto::envelope::KeyId)> {
        self.check_encrypt(i)?;
        let ctx = parse_context(i.context)?;
        let key = self.keys.key_for_subject(i.keyspace, i.subject).await?;
        Ok((seal_item(&key, None, i, &ctx)?, key.key_id))
    }

    fn check_decrypt<'b>(&self, i: &DecryptInput<'_>, parsed: &envelope::Parsed<'b>) -> Result<()> {
        Field::parse(i.field)?;
        if !i.keyspace.is_empty() && i.keyspace != parsed.header.keyspace {
            return Err(Error::bad_ciphertext(
                Reason::KeyspaceMismatch,
                "the ciphertext belongs to another keyspace",
            ));
        }
        if !self.keys.has_keyspace(parsed.header.keyspace) {
            return Err(Error::bad_ciphertext(
                Reason::UnknownKeyspace,
                "the ciphertext names a keyspace this server does not have",
            ));
        }
        Ok(())
    }

    /// Decrypts one ciphertext.
    pub async fn decrypt(&self, g: &mut Guard, i: &DecryptInput<'_>) -> Result<Zeroizing<Vec<u8>>> {
        let mut scratch = Vec::new();
        let parsed = envelope::parse(i.ciphertext, &mut scratch).map_err(envelope_error)?;
        self.check_decrypt(i, &parsed)?;
        let ctx = parse_context(i.context)?;
        let h = &parsed.header;
        g.authorize(Op::Decrypt, Some(h.keyspace), Some(i.field))?;
        g.reveal(1)?;
        g.note_key(h.keyspace, &h.key_id);
        let key = self
            .keys
            .key_by_id(h.keyspace, h.key_id, h.dek_version, h.alg);
        let key = observed(key).await?;
        parsed
            .open(&key.keys, i.field, &ctx)
            .map_err(envelope_error)
    }

    fn check_batch_len(&self, n: usize) -> Result<()> {
        if n > self.max_batch {
            return Err(Error::invalid(
                Reason::BatchTooLarge,
                format!("batch has {n} items; the maximum is {}", self.max_batch),
            ));
        }
        Ok(())
    }

    /// Encrypts many items; each gets its own result. Cached keys are looked up synchronously
    /// (consecutive items of one subject share one lookup); only the misses go through the
    /// async path, distinct subjects' keys loading concurrently, each once. All nonces come
    /// from one CSPRNG call, and consecutive items with one key share its AES key schedule.
    pub async fn encrypt_batch(
        &self,
        g: &mut Guard,
        items: &[EncryptInput<'_>],
    ) -> Result<Vec<Result<Vec<u8>>>> {
        self.check_batch_len(items.len())?;
        g.set_items(items.len());
        let now = Tick::now();
        // Per item: its context (validated once) and the index of its key run, or its error.
        let mut prepared: Vec<Result<(BTreeMap<&str, &str>, usize)>> =
            Vec::with_capacity(items.len());
        // Runs of consecutive valid items of one (keyspace, subject), with their key.
        let mut runs: Vec<KeyRun<(&str, &str)>> = Vec::new();
        let mut hits = 0u64;
        for i in items {
            let p = self.check_encrypt(i).and_then(|()| {
                let ctx = parse_context(i.context)?;
                g.authorize(Op::Encrypt, Some(i.keyspace), Some(i.field))?;
                let want = (i.keyspace, i.subject);
                if runs.last().is_none_or(|r| r.want != want) {
                    let key = self
                        .keys
                        .cached_key_for_subject(i.keyspace, i.subject, now)?;
                    hits += u64::from(key.is_some());
                    runs.push(KeyRun {
                        want,
                        key: key.map(Ok),
                    });
                }
                Ok((ctx, runs.len() - 1))
            });
            prepared.push(p);
        }
        crate::metrics::dek_cache_hits(hits);
        self.load_missing(&mut runs, |(ks, subj)| self.keys.key_for_subject(ks, subj))
            .await;
        let valid = prepared.iter().filter(|p| p.is_ok()).count();
        let nonces =
            envelope::random_nonces(valid).map_err(|_| Error::internal("CSPRNG failed"))?;
        let mut nonces = nonces.iter();
        let mut prep: Option<(usize, envelope::PreparedKeys<'_>)> = None;
        Ok(items
            .iter()
            .zip(prepared)
            .map(|(i, p)| {
                let r = p.and_then(|(ctx, run)| {
                    let nonce = nonces
                        .next()
                        .ok_or_else(|| Error::internal("batch nonce missing"))?;
                    let (key, pk) = run_key(&runs, run, &mut prep)?;
                    seal_item(key, Some((pk, nonce)), i, &ctx)
                });
                g.item_result(&r);
                r
            })
            .collect())
    }

    /// Loads the keys of the runs that missed the cache: each distinct key once (runs of one
    /// key that are not adjacent share the load), at most [`BATCH_KEY_CONCURRENCY`] at a time.
    async fn load_missing<W, F, Fut>(&self, runs: &mut [KeyRun<W>], load: F)
    where
        W: Ord + Copy,
        F: Fn(W) -> Fut,
        Fut: std::future::Future<Output = Result<Arc<DekEntry>>>,
    {
        let mut missing: Vec<(W, usize)> = runs
            .iter()
            .enumerate()
            .filter(|(_, r)| r.key.is_none())
            .map(|(n, r)| (r.want, n))
            .collect();
        if missing.is_empty() {
            return;
        }
        missing.sort_unstable_by_key(|a| a.0);
        let mut wanted: Vec<W> = missing.iter().map(|m| m.0).collect();
        wanted.dedup();
        let loaded: Vec<(W, Result<Arc<DekEntry>>)> = futures_util::stream::iter(wanted)
            .map(|w| {
                let f = load(w);
                async move { (w, observed(f).await) }
            })
            .buffer_unordered(BATCH_KEY_CONCURRENCY)
            .collect()
            .await;
        for (w, r) in loaded {
            let lo = missing.partition_point(|m| m.0 < w);
            for (_, n) in missing[lo..].iter().take_while(|m| m.0 == w) {
                runs[*n].key = Some(r.clone());
            }
        }
    }

    /// Decrypts many items; each gets its own result. Keys are looked up as in
    /// [`encrypt_batch`](Self::encrypt_batch).
    pub async fn decrypt_batch(
        &self,
        g: &mut Guard,
        items: &[DecryptInput<'_>],
    ) -> Result<Vec<Result<Zeroizing<Vec<u8>>>>> {
        self.check_batch_len(items.len())?;
        g.set_items(items.len());
        let mut scratch: Vec<Vec<u8>> = (0..items.len()).map(|_| Vec::new()).collect();
        let parsed: Vec<Result<(envelope::Parsed<'_>, BTreeMap<&str, &str>)>> = items
            .iter()
            .zip(scratch.iter_mut())
            .map(|(i, s)| {
                let p = envelope::parse(i.ciphertext, s).map_err(envelope_error)?;
                self.check_decrypt(i, &p)?;
                let ctx = parse_context(i.context)?;
                g.authorize(Op::Decrypt, Some(p.header.keyspace), Some(i.field))?;
                Ok((p, ctx))
            })
            .collect();
        // The volume budget counts every item that may be revealed, before any is.
        g.reveal(parsed.iter().filter(|p| p.is_ok()).count() as u64)?;
        let now = Tick::now();
        let mut runs: Vec<KeyRun<KeyWant<'_>>> = Vec::new();
        let mut hits = 0u64;
        let run_of: Vec<Result<usize>> = parsed
            .iter()
            .map(|p| {
                let (p, _) = p.as_ref().map_err(Clone::clone)?;
                let h = &p.header;
                let want = (h.keyspace, h.key_id, h.dek_version, h.alg as u8);
                if runs.last().is_none_or(|r| r.want != want) {
                    // Noting a key again right after itself changes nothing in the guard.
                    g.note_key(h.keyspace, &h.key_id);
                    let key =
                        self.keys
                            .cached_key_by_id(h.keyspace, &h.key_id, h.dek_version, now)?;
                    hits += u64::from(key.is_some());
                    runs.push(KeyRun {
                        want,
                        key: key.map(Ok),
                    });
                }
                Ok(runs.len() - 1)
            })
            .collect();
        crate::metrics::dek_cache_hits(hits);
        self.load_missing(&mut runs, |w: KeyWant<'_>| {
            let alg = crate::crypto::aead::Algorithm::from_byte(w.3)
                .unwrap_or(crate::crypto::aead::Algorithm::Aes256Gcm);
            self.keys.key_by_id(w.0, w.1, w.2, alg)
        })
        .await;
        let mut prep: Option<(usize, envelope::PreparedKeys<'_>)> = None;
        Ok(items
            .iter()
            .zip(parsed)
            .zip(run_of)
            .map(|((i, p), run)| {
                let r = p.and_then(|(p, ctx)| {
                    let run = run?;
                    let (key, pk) = run_key(&runs, run, &mut prep)?;
                    if key.keys.algorithm() != p.header.alg {
                        return Err(envelope_error(EnvelopeError::Authentication));
                    }
                    p.open_prepared(pk, i.field, &ctx).map_err(envelope_error)
                });
                g.item_result(&r);
                r
            })
            .collect())
    }
}
