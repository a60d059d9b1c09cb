//! A small bounded, sharded map for the token engine's read caches (token rows by token
//! hash, deterministic tokens by value hash): what keeps a warm Detokenize or deterministic
//! Tokenize off the store. It holds no plaintext and no token: only store rows (keyed hashes,
//! values sealed under their subject's DEK), so what it holds is what the store holds.
//!
//! Why a cached row can never be served wrongly is argued where it is used
//! (`ops/tokens.rs`); this file is only the container: bounded in entries, a full shard
//! drops an arbitrary entry (the store answers a miss; no order to keep).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Arc, Mutex};

/// Shards: enough that two cores rarely meet on one lock.
const SHARDS: usize = 16;

/// A bounded map of shared values; `capacity` 0 keeps nothing.
pub struct BoundedMap<K, V> {
    shards: Vec<Mutex<HashMap<K, Arc<V>>>>,
    per_shard: usize,
    hasher: RandomState,
}

impl<K: Hash + Eq + Clone, V> BoundedMap<K, V> {
    /// A map of at most about `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, k: &K) -> std::sync::MutexGuard<'_, HashMap<K, Arc<V>>> {
        // The index is below SHARDS, whatever the hash.
        let i = (self.hasher.hash_one(k) % SHARDS as u64) as usize;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry of `k`, if cached.
    pub fn get(&self, k: &K) -> Option<Arc<V>> {
        if self.per_shard == 0 {
            return None;
        }
        self.shard(k).get(k).cloned()
    }

    /// Caches `v` under `k` (replacing any entry), dropping another entry of the shard when
    /// it is full.
    pub fn insert(&self, k: K, v: V) {
        if self.per_shard == 0 {
            return;
        }
        let mut s = self.shard(&k);
        if s.len() >= self.per_shard
            && !s.contains_key(&k)
            && let Some(victim) = s.keys().next().cloned()
        {
            s.remove(&victim);
        }
        s.insert(k, Arc::new(v));
    }

    /// Forgets `k`.
    pub fn remove(&self, k: &K) {
        if self.per_shard == 0 {
            return;
        }
        self.shard(k).remove(k);
    }

    /// Number of entries (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_replaces() {
        let m = BoundedMap::new(64);
        for i in 0..10_000u32 {
            m.insert(i, i * 2);
        }
        assert!(m.len() <= 64, "{} entries", m.len());
        m.insert(7, 1);
        m.insert(7, 2);
        assert_eq!(m.get(&7).as_deref(), Some(&2));
        m.remove(&7);
        assert!(m.get(&7).is_none());
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let m = BoundedMap::new(0);
        m.insert(1u8, 1u8);
        assert!(m.get(&1).is_none());
    }
}
