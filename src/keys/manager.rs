//! Finds, creates and unwraps subject DEKs. Warm calls touch only the in-memory cache; cold
//! calls go to Vault, one load per (keyspace, subject) at a time in this process
//! (single-flight) and one DEK per subject across processes (KV check-and-set).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::cache::{
    ByKeyId, BySubject, DekEntry, DekId, ExpandBudget, ShardedCache, SubjectTag, Tick,
};
use super::record::DekRecord;
use crate::config::{AfterShred, CacheConfig, KeyspaceConfig};
use crate::crypto::aead::Algorithm;
use crate::crypto::envelope::{DerivedKeys, KeyId};
use crate::error::{Error, Reason, Result};
use crate::secret::{Dek, WrappedDek};
use crate::store::{Store, SubjectState};
use crate::vault::{CasOutcome, Vault};

/// Keyed hash of a subject id within a keyspace: the only form in which a subject is stored,
/// logged or used in a Vault path.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubjectRef(
    /// HMAC-SHA256(keyspace index key, subject id).
    pub [u8; 32],
);

impl SubjectRef {
    /// Lower-case hex, as in Vault paths and the store.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses [`to_hex`](Self::to_hex)'s form; `None` if it is not 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        Some(Self(hex::decode(s).ok()?.try_into().ok()?))
    }
}

impl std::fmt::Debug for SubjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SubjectRef({})", &self.to_hex()[..16])
    }
}

struct Keyspace {
    idx: u16,
    name: Arc<str>,
    alg: Algorithm,
    kek: String,
    index_key: hmac::Key,
    after_shred: AfterShred,
    default_retention: Option<Duration>,
    limits: super::usage::UseLimits,
}

impl Keyspace {
    fn subject_ref(&self, subject: &str) -> SubjectRef {
        let tag = hmac::sign(&self.index_key, subject.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        SubjectRef(out)
    }
}

type SubjectKey = (u16, [u8; 32]);
type DekKey = (u16, KeyId, u32);

/// Per-key async locks so that concurrent cold requests for one key make one Vault load.
struct SingleFlight<K> {
    locks: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K: Hash + Eq + Clone> SingleFlight<K> {
    fn new() -> Self {
        Self {
            locks: Mutex::new(HashMap::new()),
        }
    }
    fn lock_for(&self, k: &K) -> Arc<tokio::sync::Mutex<()>> {
        let mut g = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        g.entry(k.clone()).or_default().clone()
    }
    fn done(&self, k: &K, lock: &Arc<tokio::sync::Mutex<()>>) {
        let mut g = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Only the last holder removes the entry; the map holds one reference itself.
        if g.get(k).is_some_and(|l| Arc::ptr_eq(l, lock)) && Arc::strong_count(lock) <= 2 {
            g.remove(k);
        }
    }
}

/// What an eviction removed, remembered for a while so that a cold load racing a shred
/// does not put the key back into the cache.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Evicted {
    Subject(SubjectKey),
    Key(u16, KeyId),
}

/// Owns the keyspaces, the DEK cache and the Vault client.
pub struct KeyManager {
    vault: Arc<Vault>,
    store: Arc<Store>,
    evicted: Mutex<HashMap<Evicted, Instant>>,
    /// Sorted by name: a few keyspaces, looked up by binary search (a couple of short string
    /// compares, cheaper than hashing the name on every item of a batch).
    keyspaces: Vec<Keyspace>,
    /// The two indexes share one `Arc<DekEntry>` per DEK: by subject tag (the current key of a
    /// subject, for encryption) and by key id (for decryption).
    by_subject: ShardedCache<BySubject>,
    by_key: ShardedCache<ByKeyId>,
    /// How many cached DEKs may keep their AES key schedule (`cache.expanded_keys`).
    expand_budget: Arc<ExpandBudget>,
    subject_flight: SingleFlight<SubjectKey>,
    key_flight: SingleFlight<DekKey>,
    hard_ttl: Duration,
    /// Groups the DEK wraps of concurrent new subjects into transit batch calls.
    wraps: super::wraps::WrapBatcher,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn now_i64() -> i64 {
    now_secs() as i64
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Transit RSA-2048 key that signs certificates of destruction and audit checkpoints.
pub const SIGNING_KEY: &str = "piiguard-signing";
/// Transit RSA-2048 key producers seal PII to (RSA-OAEP-SHA256); only Vault decrypts with it.
pub const SEALING_KEY: &str = "piiguard-sealing";

/// Name of the transit KEK of a keyspace.
pub fn kek_name(keyspace: &str) -> String {
    format!("kek-{keyspace}")
}

/// KV path of a keyspace's index key (the HMAC key of its subject references), wrapped by the
/// keyspace KEK. Made by `piiguard bootstrap` ([`create_index_key`]) and never by `serve`.
pub fn index_key_path(keyspace: &str) -> String {
    format!("keyspaces/{keyspace}/index-key")
}

/// KV path of a subject record.
pub fn subject_path(keyspace: &str, subject_ref_hex: &str) -> String {
    format!("subjects/{keyspace}/{subject_ref_hex}")
}

/// The version of a subject's first DEK.
pub const FIRST_DEK_VERSION: u32 = 1;

/// KV path of a DEK record ([`DekRecord`]: every version of one subject's DEK).
pub fn dek_path(keyspace: &str, key_id: &KeyId) -> String {
    format!("deks/{keyspace}/{}", key_id.to_hex())
}

/// The key a subject record names: key id and DEK version.
pub fn subject_record_key(v: &Value) -> Result<(KeyId, u32)> {
    let r = parse_subject_record(v)?;
    Ok((r.key_id, r.dek_version))
}

struct SubjectRecord {
    key_id: KeyId,
    dek_version: u32,
    wrapped: WrappedDek,
    alg: Algorithm,
}

fn parse_subject_record(v: &Value) -> Result<SubjectRecord> {
    let bad = || Error::internal("malformed subject record in Vault");
    Ok(SubjectRecord {
        key_id: KeyId::from_hex(v["key_id"].as_str().ok_or_else(bad)?).ok_or_else(bad)?,
        dek_version: v["dek_version"]
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(bad)?,
        wrapped: WrappedDek::parse(v["wrapped"].as_str().ok_or_else(bad)?).map_err(|_| bad())?,
        alg: v["alg"]
            .as_str()
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?,
    })
}

/// Creates the index key of keyspace `keyspace` unless it exists, with the keyspace's KEK.
/// Only `piiguard bootstrap` calls this: `serve` refuses to start without the key (security
/// finding 13: a `serve` that created a missing key would, pointed at a wrong or emptied KV
/// mount, silently give every subject a new reference). Returns whether it was created.
pub async fn create_index_key(vault: &Vault, keyspace: &str) -> Result<bool> {
    let path = index_key_path(keyspace);
    if vault.kv_read(&path, None).await?.is_some() {
        return Ok(false);
    }
    let key = Dek::generate(32).map_err(Error::internal)?;
    let wrapped = vault.wrap_dek(&kek_name(keyspace), &key).await?;
    let data = json!({ "wrapped": wrapped.as_str(), "created_at": now_secs() });
    match vault.kv_write_cas(&path, &data, 0).await? {
        CasOutcome::Written(_) => Ok(true),
        // Another bootstrap made it between our read and our write: keep theirs.
        CasOutcome::Mismatch => Ok(false),
    }
}

impl KeyManager {
    /// Loads each keyspace's index key. Fails if Vault is unreachable, a keyspace's KEK is
    /// missing, or a keyspace has no index key (then `piiguard bootstrap` must run first:
    /// this never creates one, see [`create_index_key`]); the caller decides whether to retry.
    pub async fn init(
        vault: Arc<Vault>,
        store: Arc<Store>,
        keyspaces: &std::collections::BTreeMap<String, KeyspaceConfig>,
        cache: &CacheConfig,
    ) -> Result<Self> {
        let mut out = Vec::new();
        for (i, (name, ks)) in keyspaces.iter().enumerate() {
            let kek = kek_name(name);
            let loaded = Self::load_index_key(&vault, name, &kek).await.map_err(|e| {
                let hint = format!(
                    "keyspace {name:?}: cannot load its index key (is transit key {kek:?} bootstrapped and allowed by the Vault policy?)"
                );
                match e {
                    Error::Unavailable { detail } => Error::unavailable(format!("{hint}: {detail}")),
                    Error::Internal { detail } => Error::internal(format!("{hint}: {detail}")),
                    other => other,
                }
            })?;
            let Some(index_key) = loaded else {
                return Err(Error::internal(format!(
                    "keyspace {name:?} has no index key in Vault (KV mount {kv:?}, path {path:?}). \
                     `piiguard serve` never creates it: pointed at a wrong or emptied KV mount, it \
                     would silently give every subject of {name:?} a new reference. If this is a new \
                     keyspace, run `piiguard bootstrap --config <this config file> --admin-token-file \
                     <file> --credentials-dir <dir>` first; otherwise check vault.kv_mount.",
                    kv = vault.config().kv_mount,
                    path = index_key_path(name),
                )));
            };
            out.push(Keyspace {
                idx: u16::try_from(i).map_err(|_| Error::internal("too many keyspaces"))?,
                name: name.as_str().into(),
                alg: ks.algorithm,
                kek,
                index_key,
                after_shred: ks.after_shred,
                default_retention: ks.default_retention,
                limits: super::usage::UseLimits {
                    max_uses: ks.max_dek_uses,
                    block: ks.dek_use_block,
                    max_age: ks.max_dek_age,
                },
            });
        }
        // `keyspaces` is a BTreeMap: already sorted by name, as `keyspace()` requires.
        debug_assert!(out.windows(2).all(|w| w[0].name < w[1].name));
        Ok(Self {
            wraps: super::wraps::WrapBatcher::new(vault.clone()),
            vault,
            store,
            evicted: Mutex::new(HashMap::new()),
            keyspaces: out,
            by_subject: ShardedCache::new(cache.max_entries, cache.idle_ttl, cache.hard_ttl),
            by_key: ShardedCache::new(cache.max_entries, cache.idle_ttl, cache.hard_ttl),
            expand_budget: ExpandBudget::new(cache.expanded_keys),
            subject_flight: SingleFlight::new(),
            key_flight: SingleFlight::new(),
            hard_ttl: cache.hard_ttl,
        })
    }

    /// The index key of a keyspace; `None` if Vault has none (never created here).
    async fn load_index_key(vault: &Vault, ks: &str, kek: &str) -> Result<Option<hmac::Key>> {
        let path = index_key_path(ks);
        let Some(e) = vault.kv_read(&path, None).await? else {
            return Ok(None);
        };
        let wrapped = e.data["wrapped"]
            .as_str()
            .and_then(|w| WrappedDek::parse(w).ok())
            .ok_or_else(|| Error::internal(format!("{path}: malformed")))?;
        let key = vault.unwrap_dek(kek, &wrapped).await?;
        if key.len() != 32 {
            return Err(Error::internal(format!("{path}: wrong key length")));
        }
        Ok(Some(hmac::Key::new(hmac::HMAC_SHA256, key.expose_secret())))
    }

    /// The longest time an unwrapped DEK can stay in this process's memory.
    pub fn hard_ttl(&self) -> Duration {
        self.hard_ttl
    }

    /// The encryptions one DEK version of `keyspace` may make before it is rotated
    /// (`keyspaces.<name>.max_dek_uses`).
    pub fn dek_use_limit(&self, keyspace: &str) -> Result<u64> {
        Ok(self.keyspace(keyspace)?.limits.max_uses)
    }

    /// The names of the configured keyspaces.
    pub fn keyspace_names(&self) -> impl Iterator<Item = &str> {
        self.keyspaces.iter().map(|k| &*k.name)
    }

    fn find_keyspace(&self, name: &str) -> Option<&Keyspace> {
        self.keyspaces
            .binary_search_by(|k| (*k.name).cmp(name))
            .ok()
            .map(|i| &self.keyspaces[i])
    }

    fn keyspace(&self, name: &str) -> Result<&Keyspace> {
        self.find_keyspace(name).ok_or_else(|| {
            Error::invalid(
                Reason::UnknownKeyspace,
                format!("unknown keyspace {:?}", truncate_for_message(name)),
            )
        })
    }

    /// Whether `name` is a configured keyspace.
    pub fn has_keyspace(&self, name: &str) -> bool {
        self.find_keyspace(name).is_some()
    }

    /// A cached entry of the subject index, if it is this keyspace's. The subject tag is 128
    /// bits of an HMAC under the keyspace's own index key, and all keyspaces share the index:
    /// an entry of another keyspace is treated as a miss (then replaced by the load).
    fn subject_hit(&self, ks: &Keyspace, sref: &SubjectRef, now: Tick) -> Option<Arc<DekEntry>> {
        let e = self.by_subject.get_at(&SubjectTag::of(&sref.0), now)?;
        (Arc::ptr_eq(&e.keyspace, &ks.name) || e.keyspace == ks.name).then(|| self.hit(e))
    }

    /// A cache hit: a DEK used again keeps its AES key schedule, budget permitting.
    fn hit(&self, e: Arc<DekEntry>) -> Arc<DekEntry> {
        e.keep_expanded(&self.expand_budget);
        e
    }

    /// A cached entry of the key-id index, if it is this keyspace's (the index holds every
    /// cached version of a key, each under its (key id, version)).
    fn key_hit(
        &self,
        ks: &Keyspace,
        key_id: &KeyId,
        dek_version: u32,
        now: Tick,
    ) -> Option<Arc<DekEntry>> {
        let id = DekId {
            key_id: *key_id,
            dek_version,
        };
        let e = self.by_key.get_at(&id, now)?;
        (Arc::ptr_eq(&e.keyspace, &ks.name) || e.keyspace == ks.name).then(|| self.hit(e))
    }

    /// The subject's DEK if it is cached, without Vault and without waiting: `Ok(None)` on a
    /// miss (then use [`key_for_subject`](Self::key_for_subject)). Batches look every item up
    /// here first and send only the misses through the async path.
    pub fn cached_key_for_subject(
        &self,
        keyspace: &str,
        subject: &str,
        now: Tick,
    ) -> Result<Option<Arc<DekEntry>>> {
        let ks = self.keyspace(keyspace)?;
        Ok(self.subject_hit(ks, &ks.subject_ref(subject), now))
    }

    /// The DEK a ciphertext names if it is cached: `Ok(None)` on a miss (then use
    /// [`key_by_id`](Self::key_by_id)).
    pub fn cached_key_by_id(
        &self,
        keyspace: &str,
        key_id: &KeyId,
        dek_version: u32,
        now: Tick,
    ) -> Result<Option<Arc<DekEntry>>> {
        let ks = self.keyspace(keyspace)?;
        Ok(self.key_hit(ks, key_id, dek_version, now))
    }

    /// The subject reference of a subject id in a keyspace.
    pub fn subject_ref(&self, keyspace: &str, subject: &str) -> Result<SubjectRef> {
        Ok(self.keyspace(keyspace)?.subject_ref(subject))
    }

    /// A 32-byte secret of a keyspace for `purpose` (e.g. token lookup hashes), derived from
    /// the keyspace's index key, which lives wrapped in Vault:
    /// HMAC-SHA256(index key, 0xFF || "piiguard/v1/keyspace-subkey/" || purpose).
    /// The leading 0xFF byte can never start a subject id (subject ids are UTF-8 and 0xFF
    /// never occurs in UTF-8), so no subject reference can equal a subkey.
    pub fn keyspace_subkey(&self, keyspace: &str, purpose: &str) -> Result<Zeroizing<[u8; 32]>> {
        let ks = self.keyspace(keyspace)?;
        let mut ctx = hmac::Context::with_key(&ks.index_key);
        ctx.update(&[0xFF]);
        ctx.update(b"piiguard/v1/keyspace-subkey/");
        ctx.update(purpose.as_bytes());
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(ctx.sign().as_ref());
        Ok(out)
    }

    /// The current DEK of a subject, created on first use.
    pub async fn key_for_subject(&self, keyspace: &str, subject: &str) -> Result<Arc<DekEntry>> {
        let sref = self.subject_ref(keyspace, subject)?;
        self.key_for_subject_ref(keyspace, &sref).await
    }

    /// [`key_for_subject`](Self::key_for_subject) for a subject reference already computed
    /// (by [`subject_ref`](Self::subject_ref) for this keyspace): saves the caller that also
    /// needs the reference a second HMAC.
    pub async fn key_for_subject_ref(
        &self,
        keyspace: &str,
        sref: &SubjectRef,
    ) -> Result<Arc<DekEntry>> {
        let ks = self.keyspace(keyspace)?;
        let sref = *sref;
        let ck = (ks.idx, sref.0);
        if let Some(e) = self.subject_hit(ks, &sref, Tick::now()) {
            return Ok(e);
        }
        let lock = self.subject_flight.lock_for(&ck);
        let started = Instant::now();
        let result = {
            let _g = lock.lock().await;
            match self.subject_hit(ks, &sref, Tick::now()) {
                Some(e) => Ok(e),
                None => self.load_subject(ks, &sref, started).await,
            }
        };
        self.subject_flight.done(&ck, &lock);
        result
    }

    /// Cold path of [`key_for_subject`](Self::key_for_subject): checks the subject's shred
    /// state, loads or creates its DEK, and caches it unless a shred raced the load.
    async fn load_subject(
        &self,
        ks: &Keyspace,
        sref: &SubjectRef,
        started: Instant,
    ) -> Result<Arc<DekEntry>> {
        let ck = (ks.idx, sref.0);
        let href = sref.to_hex();
        let state = self.store.state(&ks.name, &href).await?;
        match state {
            Some(SubjectState::Scheduled) => return Err(Error::shred_scheduled()),
            Some(SubjectState::Shredding) => return Err(Error::shredded()),
            Some(SubjectState::Shredded) if ks.after_shred == AfterShred::Refuse => {
                return Err(Error::shredded());
            }
            _ => {}
        }
        crate::config::failpoint::point("load-subject-after-state-check").await;
        // A shredded subject comes back only where the keyspace allows new keys, and only with
        // a key made after we saw the shred done (a key of a racing load is not re-activated).
        let reactivate =
            state == Some(SubjectState::Shredded) && ks.after_shred == AfterShred::NewKey;
        // A subject the registry does not know is almost always new: its DEK is created
        // without reading Vault first (the subject record's check-and-set still decides, and a
        // mismatch reads what is there).
        let (e, created) = self
            .load_or_create(
                ks,
                sref,
                state.is_none() || reactivate,
                reactivate,
                state.is_none(),
            )
            .await?;
        // Re-check after loading or creating. A shred claims the subject before it lists the
        // keys to destroy: either it listed this key, or its claim is visible here.
        let now_state = self.store.state(&ks.name, &href).await?;
        if now_state != Some(SubjectState::Active) {
            if let Some(created) = created {
                self.discard_created(ks, &href, &created).await;
            }
            return Err(match now_state {
                Some(SubjectState::Scheduled) => Error::shred_scheduled(),
                _ => Error::shredded(),
            });
        }
        crate::config::failpoint::point("load-subject-before-cache-insert").await;
        let evicted = [Evicted::Subject(ck), Evicted::Key(ks.idx, e.id.key_id)];
        if self.cache_unless_evicted(&evicted, started, &e, true) {
            return Ok(e);
        }
        // A shred or a schedule reached this replica while we loaded: ask the store.
        match self.store.state(&ks.name, &href).await? {
            Some(SubjectState::Scheduled) => Err(Error::shred_scheduled()),
            Some(SubjectState::Shredding | SubjectState::Shredded) => Err(Error::shredded()),
            // Still active (a late echo of an eviction that a cancelled schedule undid): serve
            // this call, cache nothing; the next call loads again.
            _ => Ok(e),
        }
    }

    /// Caches `e` (in the key-id index, and in the subject index if `by_subject`) unless one
    /// of `what` was evicted at or after `since`; returns whether it did. The check and the
    /// insert hold the lock that [`evict`](Self::evict) holds while it removes and records,
    /// so an eviction is either seen here or removes what was inserted (security review
    /// finding 5: checked, then inserted without the lock, a shred landing in between left
    /// the key cached until its hard TTL).
    fn cache_unless_evicted(
        &self,
        what: &[Evicted],
        since: Instant,
        e: &Arc<DekEntry>,
        by_subject: bool,
    ) -> bool {
        let g = self.evicted.lock().unwrap_or_else(|p| p.into_inner());
        if what.iter().any(|w| g.get(w).is_some_and(|t| *t >= since)) {
            return false;
        }
        if by_subject {
            self.by_subject.insert(e.clone());
        }
        self.by_key.insert(e.clone());
        true
    }

    /// Drops a subject's keys from this replica's cache (shred, scheduled shred; with no keys,
    /// a subject key rotation: only the subject's current key is dropped, every version keeps
    /// decrypting). For each key id, every version up to the highest listed is dropped
    /// (versions are numbered from 1 without gaps, and a shred lists up to the current one).
    pub fn evict(&self, keyspace: &str, subject_ref_hex: &str, keys: &[(KeyId, u32)]) {
        let Some(ks) = self.find_keyspace(keyspace) else {
            return;
        };
        let now = Instant::now();
        let mut g = self.evicted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sref) = SubjectRef::from_hex(subject_ref_hex) {
            self.by_subject.remove(&SubjectTag::of(&sref.0));
            g.insert(Evicted::Subject((ks.idx, sref.0)), now);
        }
        for (kid, version) in keys {
            let newest = keys
                .iter()
                .filter(|(k, _)| k == kid)
                .map(|(_, v)| *v)
                .max()
                .unwrap_or(*version);
            if newest == *version {
                for dek_version in 1..=newest {
                    self.by_key.remove(&DekId {
                        key_id: *kid,
                        dek_version,
                    });
                }
            }
            g.insert(Evicted::Key(ks.idx, *kid), now);
        }
    }

    /// The DEK a ciphertext names.
    pub async fn key_by_id(
        &self,
        keyspace: &str,
        key_id: KeyId,
        dek_version: u32,
        alg: Algorithm,
    ) -> Result<Arc<DekEntry>> {
        let ks = self.keyspace(keyspace)?;
        let ck = (ks.idx, key_id, dek_version);
        if let Some(e) = self.key_hit(ks, &key_id, dek_version, Tick::now()) {
            return Ok(e);
        }
        let lock = self.key_flight.lock_for(&ck);
        let started = Instant::now();
        let result = {
            let _g = lock.lock().await;
            match self.key_hit(ks, &key_id, dek_version, Tick::now()) {
                Some(e) => Ok(e),
                None => self.load_by_id(ks, key_id, dek_version, alg).await,
            }
        };
        self.key_flight.done(&ck, &lock);
        let e = result?;
        let evicted = [Evicted::Key(ks.idx, key_id)];
        if self.cache_unless_evicted(&evicted, started, &e, false) {
            return Ok(e);
        }
        // An eviction reached this replica while we loaded: a shred (then the record is gone or
        // the store says so), a scheduled shred, or a late echo of an eviction that a cancelled
        // schedule already undid. Load again: that asks Vault and the store for the current
        // state instead of guessing "shredded".
        let again = Instant::now();
        let e = self.load_by_id(ks, key_id, dek_version, alg).await?;
        if self.cache_unless_evicted(&evicted, again, &e, false) {
            Ok(e)
        } else {
            Err(Error::shredded())
        }
    }

    /// Loads the DEK version a ciphertext names. The store says first (one query) whether the
    /// key is shredded and which subject owns it. The owner's subject record holds its
    /// current DEK version, the one most ciphertexts name, and the only one of a subject never
    /// rotated (which has no DEK record): one Vault read. An older version, or a key the
    /// registry does not name (made before store schema 3 and not yet re-recorded, or a store
    /// restored from an older backup), is read from its DEK record.
    async fn load_by_id(
        &self,
        ks: &Keyspace,
        key_id: KeyId,
        dek_version: u32,
        alg: Algorithm,
    ) -> Result<Arc<DekEntry>> {
        let khex = key_id.to_hex();
        let owner = self.store.key_owner(&ks.name, &khex).await?;
        if owner.shredded {
            return Err(Error::shredded());
        }
        if let Some(href) = owner.subject_ref
            && let Some(e) = self
                .load_from_subject_record(ks, &href, key_id, dek_version, alg)
                .await?
        {
            return Ok(e);
        }
        self.load_from_dek_record(ks, key_id, dek_version, alg)
            .await
    }

    /// The key from the subject record of `href` if that record names this key id and
    /// version; `None` if it names another version (rotated since, or before) or is gone
    /// without a tombstone.
    async fn load_from_subject_record(
        &self,
        ks: &Keyspace,
        href: &str,
        key_id: KeyId,
        dek_version: u32,
        alg: Algorithm,
    ) -> Result<Option<Arc<DekEntry>>> {
        let Some(entry) = self
            .vault
            .kv_read(&subject_path(&ks.name, href), None)
            .await?
        else {
            // Deleted by a shred after the store was asked: its tombstone came first.
            if self.is_tombstoned(ks, &key_id).await? {
                return Err(Error::shredded());
            }
            return Ok(None);
        };
        let srec = parse_subject_record(&entry.data)?;
        if srec.key_id != key_id || srec.dek_version != dek_version {
            return Ok(None);
        }
        self.check_key_state(ks, href, srec.alg, alg).await?;
        let subject = SubjectRef::from_hex(href)
            .map(|r| SubjectTag::of(&r.0))
            .unwrap_or_default();
        self.unwrap_entry(ks, key_id, dek_version, srec.alg, &srec.wrapped, subject)
            .await
            .map(Some)
    }

    /// The key from its DEK record (every version a rotated subject's key has had).
    async fn load_from_dek_record(
        &self,
        ks: &Keyspace,
        key_id: KeyId,
        dek_version: u32,
        alg: Algorithm,
    ) -> Result<Arc<DekEntry>> {
        // The newest KV version holds every DEK version (keys/record.rs).
        let Some(entry) = self
            .vault
            .kv_read(&dek_path(&ks.name, &key_id), None)
            .await?
        else {
            if self.is_tombstoned(ks, &key_id).await? {
                return Err(Error::shredded());
            }
            return Err(Error::bad_ciphertext(
                Reason::UnknownKey,
                "the ciphertext names a key that does not exist",
            ));
        };
        let rec = DekRecord::parse(&entry.data, entry.version)?;
        self.check_key_state(ks, &rec.subject_ref, rec.alg, alg)
            .await?;
        let Some(version) = rec.version(dek_version) else {
            return Err(Error::bad_ciphertext(
                Reason::UnknownKey,
                "the ciphertext names a key version that does not exist",
            ));
        };
        let wrapped = version.wrapped.clone();
        let subject = SubjectRef::from_hex(&rec.subject_ref)
            .map(|r| SubjectTag::of(&r.0))
            .unwrap_or_default();
        self.unwrap_entry(ks, key_id, dek_version, rec.alg, &wrapped, subject)
            .await
    }

    async fn is_tombstoned(&self, ks: &Keyspace, key_id: &KeyId) -> Result<bool> {
        Ok(self
            .store
            .tombstone(&ks.name, &key_id.to_hex())
            .await?
            .is_some())
    }

    /// Refuses a key whose subject is being (or was) shredded, or whose algorithm is not the
    /// ciphertext's.
    async fn check_key_state(
        &self,
        ks: &Keyspace,
        href: &str,
        rec_alg: Algorithm,
        alg: Algorithm,
    ) -> Result<()> {
        match self.store.state(&ks.name, href).await? {
            Some(SubjectState::Scheduled) => return Err(Error::shred_scheduled()),
            // The record still exists only if a shred was interrupted before Vault deletion.
            Some(SubjectState::Shredding | SubjectState::Shredded) => {
                return Err(Error::shredded());
            }
            _ => {}
        }
        if rec_alg != alg {
            return Err(Error::bad_ciphertext(
                Reason::DecryptionFailed,
                "ciphertext does not authenticate",
            ));
        }
        Ok(())
    }

    async fn unwrap_entry(
        &self,
        ks: &Keyspace,
        key_id: KeyId,
        dek_version: u32,
        alg: Algorithm,
        wrapped: &WrappedDek,
        subject: SubjectTag,
    ) -> Result<Arc<DekEntry>> {
        let dek = self.vault.unwrap_dek(&ks.kek, wrapped).await?;
        let keys = DerivedKeys::derive(alg, dek.expose_secret(), &ks.name, &key_id, dek_version)
            .map_err(|_| Error::internal("stored DEK has the wrong length"))?;
        Ok(Arc::new(DekEntry::with_subject(
            ks.name.clone(),
            key_id,
            dek_version,
            keys,
            subject,
        )))
    }

    /// Removes a key this process created but may not use (a shred claimed the subject
    /// meanwhile): no ciphertext was made with it. Best effort; the shred also destroys the
    /// key the subject record names when it runs (or re-runs) its Vault step.
    async fn discard_created(&self, ks: &Keyspace, href: &str, key_id: &KeyId) {
        let spath = subject_path(&ks.name, href);
        let ours = match self.vault.kv_read(&spath, None).await {
            Ok(Some(e)) => subject_record_key(&e.data).is_ok_and(|(k, _)| k == *key_id),
            Ok(None) => false,
            Err(_) => true,
        };
        let mut paths = vec![dek_path(&ks.name, key_id)];
        if ours {
            paths.push(spath);
        }
        for p in &paths {
            if let Err(e) = self.vault.kv_delete_metadata(p).await {
                tracing::warn!(error = %e, "could not remove a key made during a shred");
            }
        }
        tracing::info!(keyspace = %ks.name, "a key made while the subject was shredded was discarded");
    }

    /// After a rotation made a subject's DEK record (the subject had only its subject
    /// record): a shred that claimed the subject meanwhile may have deleted its paths before
    /// the record was written, and would not see it. Seen here (the claim comes before the
    /// deletion), the record is deleted again and the rotation fails as shredded.
    async fn undo_if_shredded(&self, ks: &Keyspace, href: &str, key_id: &KeyId) -> Result<()> {
        let claimed = !matches!(
            self.store.state(&ks.name, href).await?,
            Some(SubjectState::Active)
        ) || self.is_tombstoned(ks, key_id).await?;
        if !claimed {
            return Ok(());
        }
        self.vault
            .kv_delete_metadata(&dek_path(&ks.name, key_id))
            .await?;
        tracing::info!(keyspace = %ks.name, "a DEK record made by a rotation during a shred was deleted");
        Err(Error::shredded())
    }

    /// The subject's key from Vault, or a new one; with the id of the key if this call
    /// created it. `register` records the subject in the store (`reactivate`: see
    /// [`Store::register_subject`]). `presumed_new` (the registry does not know the subject):
    /// skip the first read of the subject record and create at once; if the record exists
    /// after all (made by another replica, or by a process that crashed before registering
    /// it), the check-and-set of the subject record fails (the new DEK was never stored) and
    /// the record is read as usual.
    async fn load_or_create(
        &self,
        ks: &Keyspace,
        sref: &SubjectRef,
        register: bool,
        reactivate: bool,
        presumed_new: bool,
    ) -> Result<(Arc<DekEntry>, Option<KeyId>)> {
        let href = sref.to_hex();
        let spath = subject_path(&ks.name, &href);
        let mut read_first = !presumed_new;
        loop {
            let existing = if read_first {
                self.vault.kv_read(&spath, None).await?
            } else {
                None
            };
            read_first = true;
            if let Some(e) = existing {
                let rec = parse_subject_record(&e.data)?;
                if register {
                    // A key made before the registry knew it (or a crash between the two), or
                    // a new key made after a shred by another process.
                    let created = e.data["created_at"].as_i64().unwrap_or_else(now_i64);
                    self.register(ks, &href, &rec.key_id, created, reactivate)
                        .await?;
                }
                return self
                    .unwrap_entry(
                        ks,
                        rec.key_id,
                        rec.dek_version,
                        rec.alg,
                        &rec.wrapped,
                        SubjectTag::of(&sref.0),
                    )
                    .await
                    .map(|e| (e, None));
            }
            // New subject: DEK from the OS CSPRNG, wrapped by the KEK, in one Vault write: the
            // subject record (check-and-set 0: exactly one DEK per subject across replicas)
            // holds the first DEK version. Its DEK record is made by its first rotation; until
            // then the registry's key id finds the subject record from a ciphertext
            // (`load_by_id`). A 128-bit random key id is not checked for collisions (2^-64
            // after 2^32 keys).
            let key_id = KeyId::random().map_err(|_| Error::internal("CSPRNG failed"))?;
            let dek = Arc::new(Dek::generate(ks.alg.key_len()).map_err(Error::internal)?);
            let wrapped = self.wraps.wrap(&ks.kek, dek.clone()).await?;
            crate::config::failpoint::point("create-after-wrap").await;
            let created_at = now_secs();
            let dek_version = FIRST_DEK_VERSION;
            if crate::config::failpoint::flag("dek-record-at-creation") {
                // As builds before schema 3 did (compatibility tests): the DEK record too.
                let drec = DekRecord::new(
                    href.clone(),
                    ks.alg,
                    dek_version,
                    wrapped.clone(),
                    created_at as i64,
                );
                self.vault
                    .kv_write_cas(&dek_path(&ks.name, &key_id), &drec.to_json(), 0)
                    .await?;
            }
            let srec = json!({
                "key_id": key_id.to_hex(),
                "dek_version": dek_version,
                "wrapped": wrapped.as_str(),
                "alg": ks.alg.name(),
                "created_at": created_at,
            });
            match self.vault.kv_write_cas(&spath, &srec, 0).await? {
                CasOutcome::Written(_) => {
                    tracing::debug!(keyspace = %ks.name, subject_ref = ?sref, "created subject DEK");
                    self.register(ks, &href, &key_id, created_at as i64, reactivate)
                        .await?;
                    let keys = DerivedKeys::derive(
                        ks.alg,
                        dek.expose_secret(),
                        &ks.name,
                        &key_id,
                        dek_version,
                    )
                    .map_err(|_| Error::internal("DEK derivation failed"))?;
                    let entry = Arc::new(DekEntry::with_subject(
                        ks.name.clone(),
                        key_id,
                        dek_version,
                        keys,
                        SubjectTag::of(&sref.0),
                    ));
                    return Ok((entry, Some(key_id)));
                }
                // Another process created this subject's DEK first: ours was never stored (its
                // plaintext is wiped as `dek` drops); read and use theirs.
                CasOutcome::Mismatch => {}
            }
        }
    }

    /// Gives a subject a new DEK version (`Keys.RotateSubjectKey`, or a use or age limit):
    /// a new DEK from the CSPRNG, wrapped by the KEK, added to the DEK record (check-and-set
    /// against the KV version read), then named by the subject record (check-and-set too), so
    /// that a concurrent KEK rewrap of either record and this rotation never lose each other's
    /// change. `only_if_current`: rotate only if the DEK record's current version is still
    /// this one (a limit reached by several replicas at once makes one new version, not one
    /// each). Drops the subject's current key from this replica's cache and publishes a
    /// rotation on the eviction feed for the others (an eviction naming no keys: every
    /// version keeps decrypting). Returns the key id, the current version after the call, and
    /// whether this call made it.
    pub async fn rotate_subject(
        &self,
        keyspace: &str,
        sref: &SubjectRef,
        only_if_current: Option<u32>,
    ) -> Result<(KeyId, u32, bool)> {
        let ks = self.keyspace(keyspace)?;
        let ck = (ks.idx, sref.0);
        let lock = self.subject_flight.lock_for(&ck);
        let result = {
            let _g = lock.lock().await;
            self.rotate_locked(ks, sref, only_if_current).await
        };
        self.subject_flight.done(&ck, &lock);
        let (key_id, version, made) = result?;
        if made {
            let href = sref.to_hex();
            self.evict(&ks.name, &href, &[]);
            self.store
                .publish_eviction(&ks.name, &href, "[]", now_i64())
                .await?;
        }
        Ok((key_id, version, made))
    }

    async fn rotate_locked(
        &self,
        ks: &Keyspace,
        sref: &SubjectRef,
        only_if_current: Option<u32>,
    ) -> Result<(KeyId, u32, bool)> {
        let href = sref.to_hex();
        let check_state = |state: Option<SubjectState>| match state {
            Some(SubjectState::Scheduled) => Err(Error::shred_scheduled()),
            Some(SubjectState::Shredding | SubjectState::Shredded) => Err(Error::shredded()),
            _ => Ok(()),
        };
        check_state(self.store.state(&ks.name, &href).await?)?;
        let spath = subject_path(&ks.name, &href);
        let unknown = || {
            Error::not_found(
                Reason::UnknownSubject,
                "the subject has no key in this keyspace",
            )
        };
        let key_id = {
            let e = self
                .vault
                .kv_read(&spath, None)
                .await?
                .ok_or_else(unknown)?;
            parse_subject_record(&e.data)?.key_id
        };
        let dpath = dek_path(&ks.name, &key_id);
        let mut made: Option<(WrappedDek, i64)> = None;
        // 1. The DEK record gets the new version (CAS; re-read on a mismatch).
        let mut version = None;
        for _ in 0..16 {
            let (mut rec, cas) = match self.vault.kv_read(&dpath, None).await? {
                Some(e) => (DekRecord::parse(&e.data, e.version)?, e.version),
                // Never rotated: the subject record holds the only version; the DEK record
                // is made now, from it (check-and-set 0: one maker across replicas).
                None => {
                    let se = self
                        .vault
                        .kv_read(&spath, None)
                        .await?
                        .ok_or_else(Error::shredded)?;
                    let srec = parse_subject_record(&se.data)?;
                    if srec.key_id != key_id {
                        return Err(Error::unavailable(
                            "subject key rotation: the subject's key changed meanwhile; retry",
                        ));
                    }
                    let created = se.data["created_at"].as_i64().unwrap_or_else(now_i64);
                    let first = DekRecord::new(
                        href.clone(),
                        srec.alg,
                        srec.dek_version,
                        srec.wrapped,
                        created,
                    );
                    (first, 0)
                }
            };
            if let Some(cur) = only_if_current
                && rec.current != cur
            {
                // Another replica (or call) rotated it already: use theirs.
                version = Some((rec.current, false));
                break;
            }
            if made.is_none() {
                let dek = Dek::generate(ks.alg.key_len()).map_err(Error::internal)?;
                let wrapped = self.vault.wrap_dek(&ks.kek, &dek).await?;
                made = Some((wrapped, now_i64()));
            }
            let (wrapped, at) = made.clone().ok_or_else(|| Error::internal("no new DEK"))?;
            let n = rec.push_version(wrapped, at);
            crate::config::failpoint::point("rotate-before-dek-record-write").await;
            if let CasOutcome::Written(_) =
                self.vault.kv_write_cas(&dpath, &rec.to_json(), cas).await?
            {
                if cas == 0 {
                    self.undo_if_shredded(ks, &href, &key_id).await?;
                }
                version = Some((n, true));
                break;
            }
            // The record changed: perhaps the KEK rewrap job rewrote it after a KEK rotation,
            // and our wrap was made with the older KEK version. Wrap again (with the latest)
            // rather than add a value the job has already passed.
            made = None;
        }
        let (n, pushed) = version.ok_or_else(|| {
            Error::unavailable("subject key rotation: the DEK record kept changing; retry")
        })?;
        crate::config::failpoint::point("rotate-between-record-writes").await;
        // 2. The subject record names the DEK record's current version (CAS; re-read on a
        // mismatch). A crash before this leaves the DEK record one version ahead: harmless,
        // the next rotation (or a limit) repairs it from the DEK record.
        for _ in 0..16 {
            let Some(se) = self.vault.kv_read(&spath, None).await? else {
                return Err(Error::shredded());
            };
            let srec = parse_subject_record(&se.data)?;
            if srec.key_id != key_id || srec.dek_version >= n {
                break;
            }
            let Some(de) = self.vault.kv_read(&dpath, None).await? else {
                return Err(Error::shredded());
            };
            let rec = DekRecord::parse(&de.data, de.version)?;
            let Some(cur) = rec.version(n) else {
                return Err(Error::internal("the new DEK version vanished"));
            };
            let mut data = se.data.clone();
            data["dek_version"] = json!(n);
            data["wrapped"] = json!(cur.wrapped.as_str());
            if let CasOutcome::Written(_) =
                self.vault.kv_write_cas(&spath, &data, se.version).await?
            {
                break;
            }
        }
        // A shred that claimed the subject meanwhile destroys the record with every version
        // (KV metadata delete); nothing was sealed with the new one.
        check_state(self.store.state(&ks.name, &href).await?)?;
        if pushed {
            tracing::info!(keyspace = %ks.name, subject_ref = ?sref, dek_version = n, "subject DEK rotated");
        }
        Ok((key_id, n, pushed))
    }

    /// `key` if it may make `n` more encryptions now (a memory-only check on the warm path);
    /// else reserves blocks in the store until it may, and rotates the subject's DEK when the
    /// version reached its use or age limit, returning the new current key. With `n` of at most one block, a reservation leaves
    /// three quarters of a block or more; when fewer than a quarter are left, the next block is
    /// reserved in the background, so a steady stream of encryptions rarely waits for the store.
    pub async fn ensure_uses(
        self: &Arc<Self>,
        key: Arc<DekEntry>,
        n: u64,
    ) -> Result<Arc<DekEntry>> {
        let mut key = key;
        for _ in 0..4 {
            let ks = self.keyspace(&key.keyspace)?;
            let lim = ks.limits;
            let left = key.available();
            if left >= n {
                if left.saturating_sub(n) < lim.block / 4 {
                    self.prefetch(&key);
                }
                return Ok(key);
            }
            if let Some(reason) = self.reserve(ks, &key, n.saturating_sub(left)).await? {
                key = self.rotate_for_limit(ks, &key, reason).await?;
            }
        }
        Err(Error::ResourceExhausted {
            reason: Reason::KeyUsageExhausted,
            message: "this subject's data key reached its encryption limit".into(),
        })
    }

    /// Reserves blocks for at least `want` more uses of `key`; `Some(reason)` if the version
    /// is at its limit instead (what was granted below the limit is still granted).
    async fn reserve(
        &self,
        ks: &Keyspace,
        key: &DekEntry,
        want: u64,
    ) -> Result<Option<crate::metrics::RotationReason>> {
        let lim = ks.limits;
        let block = lim.block.max(want);
        let now = now_i64();
        let (total, first_at) = self
            .store
            .reserve_dek_uses(
                &ks.name,
                &key.id.key_id.to_hex(),
                key.id.dek_version,
                block,
                now,
            )
            .await?;
        crate::metrics::dek_uses_reserved(&ks.name, block);
        let granted = lim.granted(total, block);
        key.grant(granted);
        if lim.too_old(first_at, now) {
            return Ok(Some(crate::metrics::RotationReason::Age));
        }
        Ok((granted < want).then_some(crate::metrics::RotationReason::Uses))
    }

    /// Reserves the next block of `key` in the background (one reservation at a time per
    /// entry), called by [`ensure_uses`](Self::ensure_uses) when less than a quarter block is
    /// left.
    fn prefetch(self: &Arc<Self>, key: &Arc<DekEntry>) {
        if key
            .prefetching
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let me = self.clone();
        let key = key.clone();
        tokio::spawn(async move {
            if let Ok(ks) = me.keyspace(&key.keyspace)
                && let Err(e) = me.reserve(ks, &key, 1).await
            {
                tracing::warn!(error = %e, "could not reserve DEK uses ahead; the next encryption will");
            }
            key.prefetching
                .store(false, std::sync::atomic::Ordering::Release);
        });
    }

    /// Rotates the subject of `key` because its version reached a limit (one new version
    /// across replicas: only if the version is still current), and returns the new current key.
    async fn rotate_for_limit(
        &self,
        ks: &Keyspace,
        key: &DekEntry,
        reason: crate::metrics::RotationReason,
    ) -> Result<Arc<DekEntry>> {
        let Some(sref) = self.subject_of_key(ks, &key.id.key_id).await? else {
            return Err(Error::shredded());
        };
        let (_, _, made) = self
            .rotate_subject(&ks.name, &sref, Some(key.id.dek_version))
            .await?;
        if made {
            crate::metrics::dek_rotation(&ks.name, reason);
        } else {
            // Another replica rotated first; its eviction may not have reached us yet.
            self.evict(&ks.name, &sref.to_hex(), &[]);
        }
        self.key_for_subject_ref(&ks.name, &sref).await
    }

    /// The key that re-encrypts what `old` sealed (Rewrap): the current DEK of `old`'s
    /// subject, as Encrypt would use it. From the subject index if cached; else the DEK
    /// record (or the registry) names the subject, whose current key is then loaded (and
    /// cached) as for Encrypt.
    pub async fn current_key_of(&self, old: &DekEntry) -> Result<Arc<DekEntry>> {
        let ks = self.keyspace(&old.keyspace)?;
        let tag = old.subject();
        if tag != SubjectTag::default()
            && let Some(e) = self.by_subject.get_at(&tag, Tick::now())
            && (Arc::ptr_eq(&e.keyspace, &ks.name) || e.keyspace == ks.name)
        {
            return Ok(e);
        }
        let Some(sref) = self.subject_of_key(ks, &old.id.key_id).await? else {
            return Err(Error::shredded());
        };
        self.key_for_subject_ref(&ks.name, &sref).await
    }

    async fn register(
        &self,
        ks: &Keyspace,
        href: &str,
        key_id: &KeyId,
        created: i64,
        reactivate: bool,
    ) -> Result<()> {
        let retain_until = ks
            .default_retention
            .map(|d| created.saturating_add(d.as_secs() as i64));
        self.store
            .register_subject(
                &ks.name,
                href,
                &key_id.to_hex(),
                created,
                retain_until,
                reactivate,
            )
            .await
    }

    /// The subject a key belongs to: named by its DEK record, or, for a key that has none
    /// (a subject never rotated: its only record is the subject record), by the registry.
    async fn subject_of_key(&self, ks: &Keyspace, key_id: &KeyId) -> Result<Option<SubjectRef>> {
        let href = match self
            .vault
            .kv_read(&dek_path(&ks.name, key_id), None)
            .await?
        {
            Some(e) => DekRecord::parse(&e.data, e.version)?.subject_ref,
            None => match self
                .store
                .subject_of_key(&ks.name, &key_id.to_hex())
                .await?
            {
                Some(h) => h,
                None => return Ok(None),
            },
        };
        SubjectRef::from_hex(&href)
            .map(Some)
            .ok_or_else(|| Error::internal("malformed subject reference of a key"))
    }

    /// The Vault client.
    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    /// The subject registry.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Drops expired cache entries; returns how many.
    pub fn sweep(&self) -> usize {
        let hard = self.hard_ttl;
        self.evicted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, t| t.elapsed() < hard);
        self.by_subject.sweep() + self.by_key.sweep()
    }

    /// Number of cached DEK entries (subject index and key index).
    pub fn cached(&self) -> (usize, usize) {
        (self.by_subject.len(), self.by_key.len())
    }

    /// Spawns the periodic sweep of expired entries.
    pub fn spawn_sweeper(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let every = (self.hard_ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                let Some(m) = me.upgrade() else { return };
                let n = m.sweep();
                if n > 0 {
                    tracing::debug!(dropped = n, "expired DEKs dropped from cache");
                }
            }
        });
    }
}

/// Echoes user input in an error message only in a bounded, printable form.
pub fn truncate_for_message(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
