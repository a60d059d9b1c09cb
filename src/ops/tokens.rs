//! Tokenize / Detokenize: validation, keys, derivation and the store, independent of gRPC.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::hmac;
use futures_util::StreamExt as _;
use zeroize::Zeroizing;

use crate::crypto::envelope;
use crate::crypto::tokens::derive::{self, Scope, Stream};
use crate::crypto::tokens::format::{self, Ff1Params, Format, FormatError, Mode};
use crate::crypto::tokens::locator::LocatorKey;
use crate::domain::names::{Field, SubjectId};
use crate::error::{Error, Reason, Result};
use crate::keys::KeyManager;
use crate::keys::cache::DekEntry;
use crate::keys::manager::{SubjectRef, now_i64, now_ms, truncate_for_message};
use crate::ops::token_cache::BoundedMap;
use crate::store::Store;
use crate::store::token_writer::{GroupWriter, Write};
use crate::store::tokens::{NewToken, TokenState};

/// Draws per token before giving up (a collision needs a full 128-bit match for opaque
/// tokens; only small DIGITS/FF1 spaces ever retry).
const MAX_ATTEMPTS: u32 = 32;
/// Batch items processed concurrently.
const BATCH_CONCURRENCY: usize = 16;
/// Longest subject id and field name (as for Encrypt).
/// Context key binding a sealed value to its token row.
const CTX_TOKEN: &str = "piiguard.token";

/// Which subkey of the subject's DEK gives an FF1 tweak its subject secret.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TweakKey {
    /// [`crate::crypto::envelope::DerivedKeys::subkey`]: every new token.
    Current,
    /// The pre-finding-11 subkey: recognises deterministic FF1 tokens made by older builds.
    LegacyV1,
}

impl TweakKey {
    /// The subkey of new tokens (the old one only under the `ff1-subkey-v1` test flag, to make
    /// tokens as older builds did).
    fn for_new() -> Self {
        if crate::config::failpoint::flag("ff1-subkey-v1") {
            TweakKey::LegacyV1
        } else {
            TweakKey::Current
        }
    }
}

/// One Tokenize request (no `Debug`: it carries the value).
#[derive(Clone, Copy)]
pub struct TokenizeInput<'a> {
    /// Keyspace name.
    pub keyspace: &'a str,
    /// Raw subject id (hashed before use).
    pub subject: &'a str,
    /// Field name.
    pub field: &'a str,
    /// The value to tokenise.
    pub value: &'a str,
    /// Token format.
    pub format: Format,
    /// Random, deterministic or join.
    pub mode: Mode,
    /// Lifetime in seconds; 0 = no expiry.
    pub ttl_secs: u64,
}

/// A token (no `Debug`: tokens are not logged).
pub struct Tokenized {
    /// The token.
    pub token: String,
    /// When it expires (Unix seconds), if it has a TTL.
    pub expires_at: Option<i64>,
}

/// The value behind a token.
pub struct Detokenized {
    /// The value (plaintext: zeroized on drop).
    pub value: Zeroizing<String>,
    /// The field the token stands for.
    pub field: String,
    /// The subject whose value it is (keyed hash), for the audit record; `None` if the store
    /// row names none that parses.
    pub subject_ref: Option<SubjectRef>,
    /// The key id of the DEK that opened the value, for the audit record.
    pub key_id: envelope::KeyId,
}

/// Per-keyspace token keys, derived from the keyspace index key (which lives in Vault).
struct SpaceKeys {
    /// HMAC key of token hashes (the store's lookup key).
    lookup: hmac::Key,
    /// HMAC key of deterministic seeds and value hashes.
    det: hmac::Key,
    /// HMAC key from which each field's FF1 AES-256 key is derived.
    ff1: hmac::Key,
    /// Permutation key of random opaque tokens' locators (`crypto::tokens::locator`).
    locator: LocatorKey,
}

/// A live token row as the store last returned it to Detokenize: the field, the expiry and
/// every holder's value **sealed under the holder's DEK** (no plaintext, no token).
///
/// Why serving it is never wrong (the store is the truth; the row is a copy of it):
/// - **shred** (of this replica or another): a shred destroys the holder's DEK in Vault and
///   evicts it from every replica's key cache (the eviction feed). Every hit opens the
///   sealed value again through [`KeyManager::key_by_id`], so once the DEK is gone the
///   value no longer opens and the call goes to the store, which answers `SUBJECT_SHREDDED`.
///   This is the bound a Decrypt of a ciphertext already has: a replica serves a shredded
///   subject's data at most until the eviction reaches it (or the DEK cache's hard TTL).
/// - **expiry**: the cached expiry is checked at every use; a token past it goes to the store
///   (which expires it). A live token's expiry only ever moves later (Tokenize keeps the
///   later of the two, or none), so the cached one is never later than the store's.
/// - **values added** (another subject's value on a join token): every holder's value is
///   the same value; the cached row may lack the new holder's copy, and then, if none of the
///   cached copies opens any more, the call goes to the store, which has it.
/// - only successes are served from the cache: any failure (nothing opens, expired) drops the
///   entry and the store answers, exactly as without a cache.
struct CachedRow {
    field: String,
    expires_at: Option<i64>,
    /// (sealed value, subject reference hex) of each holder, in the store's order.
    values: Vec<(String, String)>,
}

/// A deterministic token that a subject holds, with no expiry, as the store last confirmed
/// it (written, or read with the subject's value on it): the read-first path of
/// deterministic Tokenize then needs no store read. The token itself is not kept: it is
/// derived again (and checked against `token_hash`) on every hit.
///
/// Why it is never wrong: the entry is keyed by keyspace, value hash and subject reference,
/// and only ever made for a **live token without expiry that holds this subject's value**.
/// Such a row changes in one way only: the subject's shred (its value deleted, the token
/// tombstoned if no one else holds it). A shred evicts the subject's DEK from every
/// replica, and Tokenize looks up the subject's DEK (refusing a shredded subject) before it
/// reads this cache; the entry is also tied to the DEK's key id, so a subject whose key is
/// not the one the entry was made with misses. Expiry cannot apply (none), and added
/// values or expiries leave it a live token without expiry that the subject holds.
struct CachedDet {
    token_hash: String,
    attempt: u32,
    tweak_key: TweakKey,
    key_id: envelope::KeyId,
}

/// The tokenisation engine.
pub struct TokenEngine {
    keys: Arc<KeyManager>,
    store: Arc<Store>,
    /// Group commit of token writes.
    writer: GroupWriter,
    /// Token rows by (keyspace, token hash): Detokenize of a warm token reads no store.
    rows: BoundedMap<(String, String), CachedRow>,
    /// Deterministic tokens by (keyspace, value hash, subject reference).
    det: BoundedMap<(String, String, String), CachedDet>,
    spaces: HashMap<String, SpaceKeys>,
    max_value: usize,
    max_batch: usize,
}

fn format_error(e: FormatError) -> Error {
    match e {
        FormatError::Unsupported(m) => Error::invalid(Reason::UnsupportedFormat, m),
        FormatError::MalformedToken => Error::invalid(
            Reason::MalformedToken,
            "not a piiguard token (empty, too long, or not printable ASCII)",
        ),
    }
}

fn expired() -> Error {
    Error::not_found(Reason::TokenExpired, "the token has expired")
}

impl TokenEngine {
    /// Derives each keyspace's token keys. `max_value` bounds values in bytes;
    /// `cache_entries` bounds each read cache (0: no cache).
    pub fn new(
        keys: Arc<KeyManager>,
        max_value: usize,
        max_batch: usize,
        cache_entries: usize,
    ) -> Result<Self> {
        let mut spaces = HashMap::new();
        for ks in keys.keyspace_names() {
            let k = |p: &str| -> Result<hmac::Key> {
                let raw = keys.keyspace_subkey(ks, p)?;
                Ok(hmac::Key::new(hmac::HMAC_SHA256, &raw[..]))
            };
            spaces.insert(
                ks.to_string(),
                SpaceKeys {
                    lookup: k("tokens/lookup")?,
                    det: k("tokens/deterministic")?,
                    ff1: k("tokens/ff1")?,
                    locator: LocatorKey::new(&*keys.keyspace_subkey(ks, "tokens/locator")?),
                },
            );
        }
        Ok(Self {
            store: keys.store().clone(),
            writer: GroupWriter::new(keys.store().clone()),
            rows: BoundedMap::new(cache_entries),
            det: BoundedMap::new(cache_entries),
            keys,
            spaces,
            max_value,
            max_batch,
        })
    }

    fn space(&self, keyspace: &str) -> Result<&SpaceKeys> {
        self.spaces.get(keyspace).ok_or_else(|| {
            Error::invalid(
                Reason::UnknownKeyspace,
                format!("unknown keyspace {:?}", truncate_for_message(keyspace)),
            )
        })
    }

    /// Validates a Tokenize item (keyspace, names, format and mode, value) before anything
    /// else: the service calls it before authorising (docs/POLICY.md: validated first, then
    /// authorised), the engine again before it tokenises.
    pub fn validate(&self, i: &TokenizeInput<'_>) -> Result<()> {
        self.space(i.keyspace)?;
        SubjectId::parse(i.subject)?;
        Field::parse(i.field)?;
        if i.mode == Mode::DeterministicJoin && i.format == Format::Ff1 {
            return Err(Error::invalid(
                Reason::UnsupportedFormat,
                "FF1 tokens are per subject (the subject's key is in the tweak): \
                 DETERMINISTIC_JOIN does not apply to FF1",
            ));
        }
        format::check_value(i.format, i.value, self.max_value).map_err(format_error)
    }

    /// Renders the token of `i` for one attempt. `stream` is random (random mode) or derived
    /// from the value (deterministic mode); FF1's tweak carries the subject's DEK-derived
    /// secret, plus the attempt (deterministic) or random bytes (random).
    fn render(
        &self,
        i: &TokenizeInput<'_>,
        sp: &SpaceKeys,
        dek: &DekEntry,
        stream: &mut Stream,
        attempt: u32,
        tweak_key: TweakKey,
    ) -> Result<String> {
        let mut ff1_key = Zeroizing::new([0u8; 32]);
        let mut tweak = Zeroizing::new(Vec::new());
        let use_ff1 = i.format == Format::Ff1 && format::ff1_applies(i.value);
        if use_ff1 {
            ff1_key.copy_from_slice(hmac::sign(&sp.ff1, i.field.as_bytes()).as_ref());
            let mut label = b"tokens/ff1-tweak/".to_vec();
            label.extend_from_slice(i.field.as_bytes());
            let subject_secret = match tweak_key {
                TweakKey::Current => dek.keys.subkey(&label),
                TweakKey::LegacyV1 => dek.keys.legacy_subkey_v1(&label),
            };
            tweak.extend_from_slice(&subject_secret[..16]);
            match i.mode {
                Mode::Deterministic | Mode::DeterministicJoin => {
                    tweak.extend_from_slice(&attempt.to_be_bytes());
                }
                Mode::Random => {
                    let mut r = [0u8; 16];
                    stream.fill(&mut r);
                    tweak.extend_from_slice(&r);
                }
            }
        }
        let params = Ff1Params {
            key: &ff1_key,
            tweak: &tweak,
        };
        format::render(i.format, i.value, stream, use_ff1.then_some(&params)).map_err(format_error)
    }

    fn seal(&self, dek: &DekEntry, field: &str, token_hash: &str, value: &str) -> Result<String> {
        if !dek.try_use() {
            return Err(Error::ResourceExhausted {
                reason: Reason::KeyUsageExhausted,
                message: "this subject's data key reached its encryption limit".into(),
            });
        }
        let ctx = BTreeMap::from([(CTX_TOKEN, token_hash)]);
        let ct = envelope::seal(
            &dek.keys,
            &dek.keyspace,
            &dek.id.key_id,
            dek.id.dek_version,
            field,
            &ctx,
            value.as_bytes(),
        )
        .map_err(|_| Error::internal("envelope seal failed"))?;
        Ok(envelope::to_text(&ct))
    }

    /// Tokenises one value.
    pub async fn tokenize(&self, i: &TokenizeInput<'_>) -> Result<Tokenized> {
        self.validate(i)?;
        let sp = self.space(i.keyspace)?;
        let subject_ref = self.keys.subject_ref(i.keyspace, i.subject)?;
        let dek = self
            .keys
            .key_for_subject_ref(i.keyspace, &subject_ref)
            .await?;
        // One use reserved (a token seals its value once; a retry after a collision is rare).
        let dek = self.keys.ensure_uses(dek, 1).await?;
        let sref = subject_ref.to_hex();
        let now = now_i64();
        let expires_at = (i.ttl_secs > 0)
            .then(|| now.saturating_add(i64::try_from(i.ttl_secs).unwrap_or(i64::MAX)));
        match i.mode {
            Mode::Random => {
                self.tokenize_random(i, sp, &dek, &sref, now, expires_at)
                    .await
            }
            Mode::Deterministic | Mode::DeterministicJoin => {
                self.tokenize_deterministic(i, sp, &dek, &sref, now, expires_at)
                    .await
            }
        }
    }

    async fn tokenize_random(
        &self,
        i: &TokenizeInput<'_>,
        sp: &SpaceKeys,
        dek: &DekEntry,
        sref: &str,
        now: i64,
        expires_at: Option<i64>,
    ) -> Result<Tokenized> {
        let tag = i.format.tag();
        for attempt in 0..MAX_ATTEMPTS {
            let mut stream = Stream::random().map_err(|_| Error::internal("CSPRNG failed"))?;
            // An opaque token encrypts its row's locator (the store keeps new tokens in
            // creation order); other formats are stored by their keyed hash.
            let (token, th) = if i.format == Format::Opaque
                && !crate::config::failpoint::flag("hashed-random-tokens")
            {
                let mut r = [0u8; 8];
                stream.fill(&mut r);
                let (bytes, stored) = sp.locator.draw(now_ms(), &r);
                (format::opaque_token(&bytes), stored)
            } else {
                let token = self.render(i, sp, dek, &mut stream, attempt, TweakKey::for_new())?;
                let th = derive::token_hash(&sp.lookup, &token);
                (token, th)
            };
            if token == i.value {
                continue; // never hand out the value itself as its token
            }
            let sealed = self.seal(dek, i.field, &th, i.value)?;
            let row = NewToken {
                keyspace: i.keyspace,
                token_hash: &th,
                field: i.field,
                format: &tag,
                value_hash: None,
                attempt,
                subject_ref: sref,
                sealed: &sealed,
                now,
                expires_at,
            };
            if self.writer.write(Write::insert(&row)).await? {
                return Ok(Tokenized { token, expires_at });
            }
            tracing::debug!(
                keyspace = i.keyspace,
                attempt,
                "token collision; drawing again"
            );
        }
        Err(exhausted())
    }

    async fn tokenize_deterministic(
        &self,
        i: &TokenizeInput<'_>,
        sp: &SpaceKeys,
        dek: &DekEntry,
        sref: &str,
        now: i64,
        expires_at: Option<i64>,
    ) -> Result<Tokenized> {
        let tag = i.format.tag();
        // DETERMINISTIC is per subject (the token dies with its subject); only an explicit
        // DETERMINISTIC_JOIN (policy `tokenize_join`, never FF1: see `check`) is shared across
        // subjects.
        let scope = match i.mode {
            Mode::DeterministicJoin => Scope::Join,
            Mode::Deterministic | Mode::Random => Scope::Subject(sref),
        };
        let vh = derive::value_hash(&sp.det, i.field, &tag, scope, i.value);
        let det_key = (i.keyspace.to_string(), vh, sref.to_string());
        let vh = &det_key.1;
        let token_of = |attempt: u32, tweak_key: TweakKey| -> Result<String> {
            let seed = derive::deterministic_seed(&sp.det, i.field, &tag, scope, i.value, attempt);
            self.render(
                i,
                sp,
                dek,
                &mut Stream::from_seed(&seed),
                attempt,
                tweak_key,
            )
        };
        // A token this subject holds without expiry, confirmed before (see `CachedDet`).
        if let Some(c) = self.det.get(&det_key) {
            if c.key_id == dek.id.key_id {
                let token = token_of(c.attempt, c.tweak_key)?;
                if derive::token_hash(&sp.lookup, &token) == c.token_hash {
                    return Ok(Tokenized {
                        token,
                        expires_at: None,
                    });
                }
            }
            self.det.remove(&det_key);
        }
        let remember = |token_hash: &str, attempt: u32, tweak_key: TweakKey| {
            self.det.insert(
                det_key.clone(),
                CachedDet {
                    token_hash: token_hash.to_string(),
                    attempt,
                    tweak_key,
                    key_id: dek.id.key_id,
                },
            );
        };
        // Rounds: an existing token may be shredded, or a concurrent call may insert the
        // same value's token, between our read and our write; then look again.
        for _round in 0..4 {
            if let Some(row) = self.store.token_by_value(i.keyspace, vh, sref).await? {
                let mut tweak_key = TweakKey::for_new();
                let mut token = token_of(row.attempt, tweak_key)?;
                let mut th = derive::token_hash(&sp.lookup, &token);
                if th != row.token_hash && i.format == Format::Ff1 {
                    // An FF1 token made before finding 11 took its tweak from the old subkey:
                    // it stays the value's token.
                    let old = token_of(row.attempt, TweakKey::LegacyV1)?;
                    let old_th = derive::token_hash(&sp.lookup, &old);
                    if old_th == row.token_hash {
                        tracing::debug!(
                            keyspace = i.keyspace,
                            "deterministic FF1 token of an older build (pre-finding-11 subkey)"
                        );
                        (token, th, tweak_key) = (old, old_th, TweakKey::LegacyV1);
                    }
                }
                if th != row.token_hash {
                    return Err(Error::internal(
                        "deterministic token does not match its stored hash",
                    ));
                }
                let alive =
                    row.state == TokenState::Live && row.expires_at.is_none_or(|e| e >= now);
                // The later expiry wins while the token is alive; a dead one restarts.
                let new_exp = match (alive, row.expires_at, expires_at) {
                    (false, _, e) => e,
                    (true, None, _) | (true, _, None) => None,
                    (true, Some(a), Some(b)) => Some(a.max(b)),
                };
                // Read first: when the token is alive, already holds this subject's value
                // and keeps its expiry, a write would change nothing.
                if alive && row.mine && new_exp == row.expires_at {
                    if new_exp.is_none() {
                        remember(&th, row.attempt, tweak_key);
                    }
                    return Ok(Tokenized {
                        token,
                        expires_at: new_exp,
                    });
                }
                let sealed = self.seal(dek, i.field, &th, i.value)?;
                let add = Write::AddValue {
                    keyspace: i.keyspace.into(),
                    token_hash: th.clone(),
                    subject_ref: sref.into(),
                    sealed,
                    now,
                    expires_at: new_exp,
                };
                if self.writer.write(add).await? {
                    // Committed: live, this subject's value on it, expiry `new_exp`.
                    if new_exp.is_none() {
                        remember(&th, row.attempt, tweak_key);
                    }
                    return Ok(Tokenized {
                        token,
                        expires_at: new_exp,
                    });
                }
                continue;
            }
            let mut raced = false;
            for attempt in 0..MAX_ATTEMPTS {
                let token = token_of(attempt, TweakKey::for_new())?;
                if token == i.value {
                    continue;
                }
                let th = derive::token_hash(&sp.lookup, &token);
                let sealed = self.seal(dek, i.field, &th, i.value)?;
                let row = NewToken {
                    keyspace: i.keyspace,
                    token_hash: &th,
                    field: i.field,
                    format: &tag,
                    value_hash: Some(vh),
                    attempt,
                    subject_ref: sref,
                    sealed: &sealed,
                    now,
                    expires_at,
                };
                if self.writer.write(Write::insert(&row)).await? {
                    if expires_at.is_none() {
                        remember(&th, attempt, TweakKey::for_new());
                    }
                    return Ok(Tokenized { token, expires_at });
                }
                if self
                    .store
                    .token_by_value(i.keyspace, vh, sref)
                    .await?
                    .is_some()
                {
                    raced = true;
                    break;
                }
                tracing::debug!(
                    keyspace = i.keyspace,
                    attempt,
                    "token collision; next attempt"
                );
            }
            if !raced {
                return Err(exhausted());
            }
        }
        Err(Error::internal("deterministic token kept changing"))
    }

    /// Returns the value behind a token.
    pub async fn detokenize(&self, keyspace: &str, token: &str) -> Result<Detokenized> {
        let sp = self.space(keyspace)?;
        format::check_token(token).map_err(format_error)?;
        // A random opaque token names its row's locator; any other token (and one made before
        // locators) is found by its keyed hash.
        if let Some(stored) = format::opaque_bytes(token).and_then(|b| sp.locator.find(&b))
            && let Some(d) = self.detokenize_row(keyspace, stored).await?
        {
            return Ok(d);
        }
        self.detokenize_row(keyspace, derive::token_hash(&sp.lookup, token))
            .await?
            .ok_or_else(|| Error::not_found(Reason::UnknownToken, "no such token"))
    }

    /// The value of the token stored as `th`; `None` when there is no such row.
    async fn detokenize_row(&self, keyspace: &str, th: String) -> Result<Option<Detokenized>> {
        let key = (keyspace.to_string(), th);
        let th = &key.1;
        let now = now_i64();
        // A warm token: only a success is served from the cache (see `CachedRow`).
        if let Some(c) = self.rows.get(&key) {
            if c.expires_at.is_none_or(|e| e >= now)
                && let Ok(d) = self.open_first(keyspace, th, &c).await
            {
                return Ok(Some(d));
            }
            self.rows.remove(&key);
        }
        let Some(row) = self.store.token(keyspace, th).await? else {
            return Ok(None);
        };
        match row.state {
            TokenState::Shredded => return Err(Error::shredded()),
            TokenState::Expired => return Err(expired()),
            TokenState::Live => {}
        }
        if row.expires_at.is_some_and(|e| e < now) {
            // Purge it now rather than at the next sweep.
            if let Err(e) = self
                .store
                .purge_expired_tokens(now, Some((keyspace, th)))
                .await
            {
                tracing::warn!(error = %e, "could not purge an expired token");
            }
            return Err(expired());
        }
        let row = CachedRow {
            field: row.field,
            expires_at: row.expires_at,
            values: row.sealed.into_iter().zip(row.subject_refs).collect(),
        };
        let d = self.open_first(keyspace, th, &row).await?;
        // Opened: the row is live, unexpired and a holder's DEK is alive.
        self.rows.insert(key, row);
        Ok(Some(d))
    }

    /// The value of a token row: the first holder's sealed value that opens, in the store's
    /// order; the last error when none does.
    async fn open_first(&self, keyspace: &str, th: &str, c: &CachedRow) -> Result<Detokenized> {
        let mut last = Error::shredded();
        for (sealed, sref) in &c.values {
            match self.open(keyspace, &c.field, th, sealed).await {
                Ok((value, key_id)) => {
                    return Ok(Detokenized {
                        value,
                        field: c.field.clone(),
                        subject_ref: SubjectRef::from_hex(sref),
                        key_id,
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn open(
        &self,
        keyspace: &str,
        field: &str,
        token_hash: &str,
        sealed: &str,
    ) -> Result<(Zeroizing<String>, envelope::KeyId)> {
        let bad = || Error::internal("stored token value does not open");
        let mut scratch = Vec::new();
        let parsed = envelope::parse(sealed.as_bytes(), &mut scratch).map_err(|_| bad())?;
        let h = &parsed.header;
        if h.keyspace != keyspace {
            return Err(bad());
        }
        let key = self
            .keys
            .key_by_id(h.keyspace, h.key_id, h.dek_version, h.alg)
            .await?;
        let ctx = BTreeMap::from([(CTX_TOKEN, token_hash)]);
        let pt = parsed.open(&key.keys, field, &ctx).map_err(|_| bad())?;
        let s = std::str::from_utf8(&pt).map_err(|_| bad())?;
        Ok((Zeroizing::new(s.to_string()), h.key_id))
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

    /// Tokenises many values; each gets its own result, in order.
    pub async fn tokenize_batch(
        &self,
        items: &[TokenizeInput<'_>],
    ) -> Result<Vec<Result<Tokenized>>> {
        self.check_batch_len(items.len())?;
        // Collected first: a lazy `map` here trips the higher-ranked `Send` check of tonic's
        // boxed futures.
        let calls: Vec<_> = items.iter().map(|i| self.tokenize(i)).collect();
        Ok(futures_util::stream::iter(calls)
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await)
    }

    /// Detokenises many tokens; each gets its own result, in order.
    pub async fn detokenize_batch(
        &self,
        items: &[(&str, &str)],
    ) -> Result<Vec<Result<Detokenized>>> {
        self.check_batch_len(items.len())?;
        let calls: Vec<_> = items.iter().map(|(ks, t)| self.detokenize(ks, t)).collect();
        Ok(futures_util::stream::iter(calls)
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await)
    }

    /// Spawns the periodic purge of expired tokens.
    pub fn spawn_purger(self: &Arc<Self>, every: Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                let Some(m) = me.upgrade() else { return };
                match m.store.purge_expired_tokens(now_i64(), None).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(expired = n, "expired tokens purged"),
                    Err(e) => tracing::warn!(error = %e, "token purge failed; will retry"),
                }
            }
        });
    }
}

fn exhausted() -> Error {
    Error::ResourceExhausted {
        reason: Reason::TokenSpaceExhausted,
        message: "no free token of this format for this value; use a longer format".into(),
    }
}
