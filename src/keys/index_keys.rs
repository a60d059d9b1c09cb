//! Blind-index keys and field settings (docs/SEARCH.md).
//!
//! The key of (keyspace, field, version) is derived from the keyspace's index key
//! (`keyspaces/<ks>/index-key` in Vault KV, wrapped by the keyspace KEK, made only by
//! `piiguard bootstrap`) with [`KeyManager::keyspace_subkey`] and the purpose
//! `blind-index/<version>/<field>`:
//!
//! `field key = HMAC-SHA256(index key, 0xFF || "piiguard/v1/keyspace-subkey/blind-index/" || version || "/" || field)`
//!
//! So no new secret is stored and `serve` never creates one: a field configured later has its
//! key at once, the same in every replica, and rotation (a new `index_version` in the
//! config) needs no Vault write. The derived keys are cached in memory (at most
//! [`MAX_CACHED`]); HMAC key schedules are held by aws-lc-rs, the derived bytes are wiped as
//! soon as the schedule is made.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use aws_lc_rs::hmac;

use super::KeyManager;
use crate::config::KeyspaceConfig;
use crate::config::fields::FieldConfig;
use crate::error::Result;

/// Most derived field keys kept in memory; past that a key is derived per call.
pub const MAX_CACHED: usize = 4096;

/// The blind-index keys of every keyspace, and every field's settings.
pub struct IndexKeys {
    keys: Arc<KeyManager>,
    fields: BTreeMap<String, BTreeMap<String, FieldConfig>>,
    cache: RwLock<HashMap<(String, String, u32), hmac::Key>>,
}

/// The purpose string of a field key (for [`KeyManager::keyspace_subkey`]); the field name
/// comes last, so no two (version, field) pairs share one.
pub fn purpose(field: &str, version: u32) -> String {
    format!("blind-index/{version}/{field}")
}

impl IndexKeys {
    /// Over the key manager's keyspaces, with the configured field settings.
    pub fn new(keys: Arc<KeyManager>, keyspaces: &BTreeMap<String, KeyspaceConfig>) -> Self {
        Self {
            keys,
            fields: keyspaces
                .iter()
                .map(|(k, c)| (k.clone(), c.fields.clone()))
                .collect(),
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// The settings of `field` in `keyspace` (configured, or the defaults for its name).
    pub fn field(&self, keyspace: &str, field: &str) -> Cow<'_, FieldConfig> {
        match self.fields.get(keyspace).and_then(|f| f.get(field)) {
            Some(f) => Cow::Borrowed(f),
            None => Cow::Owned(FieldConfig::default_for(field)),
        }
    }

    /// The HMAC key of (`keyspace`, `field`, `version`). Fails only for an unknown keyspace.
    pub fn key(&self, keyspace: &str, field: &str, version: u32) -> Result<hmac::Key> {
        {
            let c = self.cache.read().unwrap_or_else(|p| p.into_inner());
            if let Some(k) = c.get(&(keyspace.to_string(), field.to_string(), version)) {
                return Ok(k.clone());
            }
        }
        let sub = self
            .keys
            .keyspace_subkey(keyspace, &purpose(field, version))?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, &sub[..]);
        drop(sub);
        let mut c = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if c.len() < MAX_CACHED {
            c.insert(
                (keyspace.to_string(), field.to_string(), version),
                key.clone(),
            );
        }
        Ok(key)
    }
}
