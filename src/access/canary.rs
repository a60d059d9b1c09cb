//! Canary (honey) subjects and tokens: decoy records planted among real data. Nobody has a
//! reason to decrypt or detokenise one, so any attempt raises a critical alarm and can lock the
//! caller out. The call itself succeeds (returns the decoy) so the intruder is not warned.
//!
//! Sources:
//! - configured subjects (`[[canaries.subject]] keyspace, subject`): their DEK's key id is
//!   looked up (created if new) at start, so ciphertexts of theirs are recognised on decrypt;
//! - configured token values (`canaries.tokens`), kept only as SHA-256 hashes;
//! - canaries created by the admin RPC `CreateCanary`, kept in Vault KV (`canaries/registry`,
//!   written with check-and-set) so that every replica learns them (refreshed periodically).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::crypto::envelope::KeyId;
use crate::error::{Error, Result};
use crate::keys::KeyManager;
use crate::keys::manager::SubjectRef;
use crate::vault::{CasOutcome, Vault};

/// KV path of the registry of admin-created canaries.
pub const REGISTRY_PATH: &str = "canaries/registry";

/// One canary as stored in the registry (no raw subject id: it is random and unused anyway).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CanaryEntry {
    /// Keyspace of the canary subject.
    pub keyspace: String,
    /// Hex key id of the canary subject's DEK.
    pub key_id: String,
    /// Hex subject reference.
    pub subject_ref: String,
    /// Where it was planted.
    #[serde(default)]
    pub label: String,
    /// Unix seconds of creation.
    #[serde(default)]
    pub created_at: u64,
}

#[derive(Default)]
struct Sets {
    /// Key ids are random 128-bit values and subject refs keyed per keyspace: neither needs
    /// the keyspace to be unique (and lookups need no allocation).
    keys: HashSet<[u8; 16]>,
    subjects: HashSet<[u8; 32]>,
    tokens: HashSet<[u8; 32]>,
    entries: Vec<CanaryEntry>,
}

/// The canary registry.
pub struct Canaries {
    sets: RwLock<Sets>,
    any: AtomicBool,
    /// Lock the caller out on canary access.
    pub lockout: bool,
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
    let mut o = [0u8; 32];
    o.copy_from_slice(d.as_ref());
    o
}

impl Canaries {
    /// No canaries yet; `lockout`: touching one locks the caller out.
    pub fn new(lockout: bool) -> Self {
        Self {
            sets: RwLock::new(Sets::default()),
            any: AtomicBool::new(false),
            lockout,
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Sets> {
        self.sets.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Sets> {
        self.sets.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a canary by its DEK and subject reference.
    pub fn add(&self, e: CanaryEntry) {
        let mut s = self.write();
        if let Some(k) = KeyId::from_hex(&e.key_id) {
            s.keys.insert(k.0);
        }
        if let Ok(r) = hex::decode(&e.subject_ref)
            && let Ok(r) = <[u8; 32]>::try_from(r.as_slice())
        {
            s.subjects.insert(r);
        }
        if !s.entries.contains(&e) {
            s.entries.push(e);
        }
        self.any.store(true, Ordering::Relaxed);
    }

    /// Registers a canary token value (only its hash is kept).
    pub fn add_token(&self, token: &[u8]) {
        self.write().tokens.insert(sha256(token));
        self.any.store(true, Ordering::Relaxed);
    }

    /// Whether a ciphertext's key belongs to a canary subject.
    pub fn is_canary_key(&self, _keyspace: &str, key_id: &KeyId) -> bool {
        self.any.load(Ordering::Relaxed) && self.read().keys.contains(&key_id.0)
    }

    /// Whether a subject is a canary.
    pub fn is_canary_subject(&self, _keyspace: &str, subject: &SubjectRef) -> bool {
        self.any.load(Ordering::Relaxed) && self.read().subjects.contains(&subject.0)
    }

    /// Whether a token value is a canary token (for the token service).
    pub fn is_canary_token(&self, token: &[u8]) -> bool {
        self.any.load(Ordering::Relaxed) && self.read().tokens.contains(&sha256(token))
    }

    /// Registered canaries (configured and created).
    pub fn entries(&self) -> Vec<CanaryEntry> {
        self.read().entries.clone()
    }

    /// Registers a configured canary subject: finds (or creates) its DEK.
    pub async fn add_subject(
        &self,
        keys: &KeyManager,
        keyspace: &str,
        subject: &str,
        label: &str,
    ) -> Result<CanaryEntry> {
        let dek = keys.key_for_subject(keyspace, subject).await?;
        let sref = keys.subject_ref(keyspace, subject)?;
        let e = CanaryEntry {
            keyspace: keyspace.to_string(),
            key_id: dek.id.key_id.to_hex(),
            subject_ref: sref.to_hex(),
            label: label.to_string(),
            created_at: 0,
        };
        self.add(e.clone());
        Ok(e)
    }

    /// Loads the registry of created canaries from Vault.
    pub async fn refresh(&self, vault: &Vault) -> Result<usize> {
        let Some(entry) = vault.kv_read(REGISTRY_PATH, None).await? else {
            return Ok(0);
        };
        let list: Vec<CanaryEntry> =
            serde_json::from_value(entry.data["canaries"].clone()).unwrap_or_default();
        let n = list.len();
        for e in list {
            self.add(e);
        }
        Ok(n)
    }

    /// Appends a created canary to the registry in Vault (check-and-set, retried).
    pub async fn persist(&self, vault: &Vault, e: &CanaryEntry) -> Result<()> {
        for _ in 0..5 {
            let (mut list, version) = match vault.kv_read(REGISTRY_PATH, None).await? {
                Some(entry) => (
                    serde_json::from_value::<Vec<CanaryEntry>>(entry.data["canaries"].clone())
                        .unwrap_or_default(),
                    entry.version,
                ),
                None => (Vec::new(), 0),
            };
            if list.contains(e) {
                return Ok(());
            }
            list.push(e.clone());
            match vault
                .kv_write_cas(REGISTRY_PATH, &json!({ "canaries": list }), version)
                .await?
            {
                CasOutcome::Written(_) => return Ok(()),
                CasOutcome::Mismatch => continue,
            }
        }
        Err(Error::internal(
            "canary registry: too many concurrent updates",
        ))
    }

    /// Refreshes the registry from Vault every `every` (other replicas' canaries).
    pub fn spawn_refresh(self: &Arc<Self>, vault: Arc<Vault>, every: Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            t.tick().await;
            loop {
                t.tick().await;
                let Some(c) = me.upgrade() else { return };
                if let Err(e) = c.refresh(&vault).await {
                    tracing::warn!(error = %e, "canary registry refresh failed");
                }
            }
        });
    }
}
