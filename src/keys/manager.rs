//! Finds, creates and unwraps subject DEKs. Warm calls touch only the in-memory cache; cold
//! calls go to Vault, one load per (keyspace, subject) at a time in this process
//! (single-flight) and one DEK per subject across processes (KV check-and-set).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::cache::{DekEntry, ShardedCache};
use crate::config::{CacheConfig, KeyspaceConfig};
use crate::crypto::aead::Algorithm;
use crate::crypto::envelope::{DerivedKeys, KeyId};
use crate::error::{Error, Result, reason};
use crate::vault::{CasOutcome, Vault};

/// GCM with random 96-bit nonces: at most 2^32 encryptions per key.
pub const MAX_USES_PER_DEK: u64 = 1 << 32;

/// Keyed hash of a subject id within a keyspace: the only form in which a subject is stored,
/// logged or used in a Vault path.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubjectRef(pub [u8; 32]);

impl SubjectRef {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
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

/// Owns the keyspaces, the DEK cache and the Vault client.
pub struct KeyManager {
    vault: Arc<Vault>,
    keyspaces: HashMap<String, Keyspace>,
    by_subject: ShardedCache<SubjectKey>,
    by_key: ShardedCache<DekKey>,
    subject_flight: SingleFlight<SubjectKey>,
    key_flight: SingleFlight<DekKey>,
    hard_ttl: Duration,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Name of the transit KEK of a keyspace.
pub fn kek_name(keyspace: &str) -> String {
    format!("kek-{keyspace}")
}

struct DekRecord {
    key_id: KeyId,
    dek_version: u32,
    wrapped: String,
    alg: Algorithm,
}

fn parse_subject_record(v: &Value) -> Result<DekRecord> {
    let bad = || Error::internal("malformed subject record in Vault");
    Ok(DekRecord {
        key_id: KeyId::from_hex(v["key_id"].as_str().ok_or_else(bad)?).ok_or_else(bad)?,
        dek_version: v["dek_version"]
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(bad)?,
        wrapped: v["wrapped"].as_str().ok_or_else(bad)?.to_string(),
        alg: v["alg"]
            .as_str()
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?,
    })
}

impl KeyManager {
    /// Loads (or creates on first start) each keyspace's index key. Fails if Vault is
    /// unreachable or a keyspace's KEK is missing; the caller decides whether to retry.
    pub async fn init(
        vault: Arc<Vault>,
        keyspaces: &std::collections::BTreeMap<String, KeyspaceConfig>,
        cache: &CacheConfig,
    ) -> Result<Self> {
        let mut out = HashMap::new();
        for (i, (name, ks)) in keyspaces.iter().enumerate() {
            let kek = kek_name(name);
            let index_key = Self::load_index_key(&vault, name, &kek).await.map_err(|e| {
                let hint = format!(
                    "keyspace {name:?}: cannot load its index key (is transit key {kek:?} bootstrapped and allowed by the Vault policy?)"
                );
                match e {
                    Error::Unavailable { detail } => Error::unavailable(format!("{hint}: {detail}")),
                    Error::Internal { detail } => Error::internal(format!("{hint}: {detail}")),
                    other => other,
                }
            })?;
            out.insert(
                name.clone(),
                Keyspace {
                    idx: u16::try_from(i).map_err(|_| Error::internal("too many keyspaces"))?,
                    name: name.as_str().into(),
                    alg: ks.algorithm,
                    kek,
                    index_key,
                },
            );
        }
        Ok(Self {
            vault,
            keyspaces: out,
            by_subject: ShardedCache::new(cache.max_entries, cache.idle_ttl, cache.hard_ttl),
            by_key: ShardedCache::new(cache.max_entries, cache.idle_ttl, cache.hard_ttl),
            subject_flight: SingleFlight::new(),
            key_flight: SingleFlight::new(),
            hard_ttl: cache.hard_ttl,
        })
    }

    async fn load_index_key(vault: &Vault, ks: &str, kek: &str) -> Result<hmac::Key> {
        let path = format!("keyspaces/{ks}/index-key");
        for _ in 0..3 {
            if let Some(e) = vault.kv_read(&path, None).await? {
                let wrapped = e.data["wrapped"]
                    .as_str()
                    .ok_or_else(|| Error::internal(format!("{path}: malformed")))?;
                let raw = vault.transit_decrypt(kek, wrapped).await?;
                if raw.len() != 32 {
                    return Err(Error::internal(format!("{path}: wrong key length")));
                }
                return Ok(hmac::Key::new(hmac::HMAC_SHA256, &raw));
            }
            let mut raw = Zeroizing::new([0u8; 32]);
            aws_lc_rs::rand::fill(&mut raw[..]).map_err(|_| Error::internal("CSPRNG failed"))?;
            let wrapped = vault.transit_encrypt(kek, &raw[..]).await?;
            let data = json!({ "wrapped": wrapped, "created_at": now_secs() });
            match vault.kv_write_cas(&path, &data, 0).await? {
                CasOutcome::Written(_) => {
                    tracing::info!(keyspace = ks, "created keyspace index key");
                    return Ok(hmac::Key::new(hmac::HMAC_SHA256, &raw[..]));
                }
                CasOutcome::Mismatch => continue, // another replica won; read theirs
            }
        }
        Err(Error::internal(format!("{path}: could not create or read")))
    }

    /// The longest time an unwrapped DEK can stay in this process's memory.
    pub fn hard_ttl(&self) -> Duration {
        self.hard_ttl
    }

    /// The names of the configured keyspaces.
    pub fn keyspace_names(&self) -> impl Iterator<Item = &str> {
        self.keyspaces.keys().map(String::as_str)
    }

    fn keyspace(&self, name: &str) -> Result<&Keyspace> {
        self.keyspaces.get(name).ok_or_else(|| {
            Error::invalid(
                reason::UNKNOWN_KEYSPACE,
                format!("unknown keyspace {:?}", truncate_for_message(name)),
            )
        })
    }

    /// Whether `name` is a configured keyspace.
    pub fn has_keyspace(&self, name: &str) -> bool {
        self.keyspaces.contains_key(name)
    }

    /// The subject reference of a subject id in a keyspace.
    pub fn subject_ref(&self, keyspace: &str, subject: &str) -> Result<SubjectRef> {
        Ok(self.keyspace(keyspace)?.subject_ref(subject))
    }

    /// The current DEK of a subject, created on first use.
    pub async fn key_for_subject(&self, keyspace: &str, subject: &str) -> Result<Arc<DekEntry>> {
        let ks = self.keyspace(keyspace)?;
        let sref = ks.subject_ref(subject);
        let ck = (ks.idx, sref.0);
        if let Some(e) = self.by_subject.get(&ck) {
            return Ok(e);
        }
        let lock = self.subject_flight.lock_for(&ck);
        let result = {
            let _g = lock.lock().await;
            match self.by_subject.get(&ck) {
                Some(e) => Ok(e),
                None => self.load_or_create(ks, &sref).await,
            }
        };
        self.subject_flight.done(&ck, &lock);
        let e = result?;
        self.by_subject.insert(ck, e.clone());
        self.by_key
            .insert((ks.idx, e.key_id, e.dek_version), e.clone());
        Ok(e)
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
        if let Some(e) = self.by_key.get(&ck) {
            return Ok(e);
        }
        let lock = self.key_flight.lock_for(&ck);
        let result = {
            let _g = lock.lock().await;
            match self.by_key.get(&ck) {
                Some(e) => Ok(e),
                None => self.load_by_id(ks, key_id, dek_version, alg).await,
            }
        };
        self.key_flight.done(&ck, &lock);
        let e = result?;
        self.by_key.insert(ck, e.clone());
        Ok(e)
    }

    async fn load_by_id(
        &self,
        ks: &Keyspace,
        key_id: KeyId,
        dek_version: u32,
        alg: Algorithm,
    ) -> Result<Arc<DekEntry>> {
        let path = format!("deks/{}/{}", ks.name, key_id.to_hex());
        let Some(entry) = self.vault.kv_read(&path, Some(dek_version)).await? else {
            return Err(Error::bad_ciphertext(
                reason::UNKNOWN_KEY,
                "the ciphertext names a key that does not exist",
            ));
        };
        let bad = || Error::internal(format!("{path}: malformed DEK record"));
        let rec_alg: Algorithm = entry.data["alg"]
            .as_str()
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?;
        if rec_alg != alg {
            return Err(Error::bad_ciphertext(
                reason::DECRYPTION_FAILED,
                "ciphertext does not authenticate",
            ));
        }
        let wrapped = entry.data["wrapped"].as_str().ok_or_else(bad)?;
        self.unwrap_entry(ks, key_id, dek_version, rec_alg, wrapped)
            .await
    }

    async fn unwrap_entry(
        &self,
        ks: &Keyspace,
        key_id: KeyId,
        dek_version: u32,
        alg: Algorithm,
        wrapped: &str,
    ) -> Result<Arc<DekEntry>> {
        let dek = self.vault.transit_decrypt(&ks.kek, wrapped).await?;
        let keys = DerivedKeys::derive(alg, &dek, &ks.name, &key_id, dek_version)
            .map_err(|_| Error::internal("stored DEK has the wrong length"))?;
        Ok(Arc::new(DekEntry::new(
            ks.name.clone(),
            key_id,
            dek_version,
            keys,
        )))
    }

    async fn load_or_create(&self, ks: &Keyspace, sref: &SubjectRef) -> Result<Arc<DekEntry>> {
        let spath = format!("subjects/{}/{}", ks.name, sref.to_hex());
        loop {
            if let Some(e) = self.vault.kv_read(&spath, None).await? {
                let rec = parse_subject_record(&e.data)?;
                return self
                    .unwrap_entry(ks, rec.key_id, rec.dek_version, rec.alg, &rec.wrapped)
                    .await;
            }
            // New subject: DEK from the OS CSPRNG, wrapped by the KEK. The DEK record is
            // written first so that a subject record never names a missing DEK; a crash or a
            // lost race leaves at most an orphan DEK record that no ciphertext uses.
            let key_id = KeyId::random().map_err(|_| Error::internal("CSPRNG failed"))?;
            let mut dek = Zeroizing::new(vec![0u8; ks.alg.key_len()]);
            aws_lc_rs::rand::fill(&mut dek).map_err(|_| Error::internal("CSPRNG failed"))?;
            let wrapped = self.vault.transit_encrypt(&ks.kek, &dek).await?;
            let dpath = format!("deks/{}/{}", ks.name, key_id.to_hex());
            let created_at = now_secs();
            let drec = json!({
                "subject_ref": sref.to_hex(),
                "wrapped": wrapped,
                "alg": ks.alg.name(),
                "created_at": created_at,
            });
            let CasOutcome::Written(dek_version) =
                self.vault.kv_write_cas(&dpath, &drec, 0).await?
            else {
                // A random 128-bit key id collided: astronomically unlikely; try again.
                continue;
            };
            let srec = json!({
                "key_id": key_id.to_hex(),
                "dek_version": dek_version,
                "wrapped": wrapped,
                "alg": ks.alg.name(),
                "created_at": created_at,
            });
            match self.vault.kv_write_cas(&spath, &srec, 0).await? {
                CasOutcome::Written(_) => {
                    tracing::debug!(keyspace = %ks.name, subject_ref = ?sref, "created subject DEK");
                    let keys = DerivedKeys::derive(ks.alg, &dek, &ks.name, &key_id, dek_version)
                        .map_err(|_| Error::internal("DEK derivation failed"))?;
                    return Ok(Arc::new(DekEntry::new(
                        ks.name.clone(),
                        key_id,
                        dek_version,
                        keys,
                    )));
                }
                CasOutcome::Mismatch => {
                    // Another process created this subject's DEK first: drop ours, use theirs.
                    if let Err(e) = self.vault.kv_delete_metadata(&dpath).await {
                        tracing::warn!(error = %e, "could not remove an unused DEK record");
                    }
                }
            }
        }
    }

    /// Drops expired cache entries; returns how many.
    pub fn sweep(&self) -> usize {
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
