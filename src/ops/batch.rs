//! EncryptBatch and DecryptBatch: one result per item; cached keys looked up synchronously,
//! misses loaded concurrently (each distinct key once), one CSPRNG call per batch, and the AES
//! key schedule a cache entry keeps (else one per run of items sharing a key).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt as _;
use zeroize::Zeroizing;

use super::{DecryptInput, EncryptInput, Engine, envelope_error, observed, seal_item};
use crate::access::guard::Guard;
use crate::access::policy::Op;
use crate::crypto::envelope::{self, EnvelopeError};
use crate::domain::names::parse_context;
use crate::error::{Error, Reason, Result};
use crate::keys::cache::{DekEntry, Tick};

/// Cold key loads of one DecryptBatch run at most this many at a time.
const BATCH_KEY_CONCURRENCY: usize = 16;

/// A run of consecutive batch items that need one key (`want`), and that key once found:
/// `None` until looked up or loaded.
struct KeyRun<W> {
    want: W,
    key: Option<Result<Arc<DekEntry>>>,
}

/// The key of run `run`, and its expanded AES key (the one its cache entry keeps, else expanded
/// here): prepared again only when the run changes (a previous run's own expanded key is
/// dropped, and cleared, first).
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
            .prepared()
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

impl Engine {
    pub(super) fn check_batch_len(&self, n: usize) -> Result<()> {
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
        // New subjects (a migration's first encryption) load together: half the Vault
        // admission bound at a time (each load makes one Vault request at a time, so the batch
        // never holds more than half the places), their DEK wraps grouped into transit batch
        // calls by the key manager's wrap batcher.
        let cold = (self.keys.vault().config().admission.max_in_flight / 2).max(1);
        self.load_missing(&mut runs, cold, |(ks, subj)| {
            self.keys.key_for_subject(ks, subj)
        })
        .await;
        // Each run's key must cover the run's items (reserving blocks or rotating if not; a
        // memory-only check when it does).
        let mut per_run = vec![0u64; runs.len()];
        for (_, run) in prepared.iter().flatten() {
            per_run[*run] += 1;
        }
        for (r, n) in runs.iter_mut().zip(per_run) {
            if let Some(Ok(k)) = &r.key {
                r.key = Some(self.keys.ensure_uses(k.clone(), n).await);
            }
        }
        // The audit record lists the keys used (the subjects' DEKs).
        for r in &runs {
            if let Some(Ok(k)) = &r.key {
                g.note_key(&k.keyspace, &k.id.key_id);
            }
        }
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
    /// key that are not adjacent share the load), at most `concurrency` at a time.
    async fn load_missing<W, F, Fut>(&self, runs: &mut [KeyRun<W>], concurrency: usize, load: F)
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
            .buffer_unordered(concurrency.max(1))
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
                    // The audit record lists every key id noted (repeats are counted once);
                    // items that fail later (a key shredded or unknown, a ciphertext that
                    // does not open) are listed too.
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
        self.load_missing(&mut runs, BATCH_KEY_CONCURRENCY, |w: KeyWant<'_>| {
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
