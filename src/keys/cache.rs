//! The unwrapped-DEK cache: bounded, with an idle TTL and a hard TTL, sharded to keep lock
//! hold times tiny on the hot path. Entries hold [`DerivedKeys`], which zeroize on drop; an
//! entry leaves memory when it expires, is evicted, or is removed.
//!
//! Eviction when full: expired entries first, else the least recently used among a small
//! sample of the shard (as Redis does): O(1) and close to LRU without a linked list.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::crypto::envelope::{DerivedKeys, KeyId};

const SHARDS: usize = 64;
const EVICTION_SAMPLE: usize = 8;

/// One unwrapped DEK, ready to use.
pub struct DekEntry {
    pub keyspace: Arc<str>,
    pub key_id: KeyId,
    pub dek_version: u32,
    pub keys: DerivedKeys,
    /// Encryptions made with this DEK by this process (GCM random-nonce budget: 2^32).
    pub uses: AtomicU64,
    created: Instant,
    /// Milliseconds since `created` of the last use.
    last_used_ms: AtomicU32,
}

impl std::fmt::Debug for DekEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DekEntry")
            .field("keyspace", &self.keyspace)
            .field("key_id", &self.key_id)
            .field("dek_version", &self.dek_version)
            .finish_non_exhaustive()
    }
}

impl DekEntry {
    pub fn new(keyspace: Arc<str>, key_id: KeyId, dek_version: u32, keys: DerivedKeys) -> Self {
        Self {
            keyspace,
            key_id,
            dek_version,
            keys,
            uses: AtomicU64::new(0),
            created: Instant::now(),
            last_used_ms: AtomicU32::new(0),
        }
    }

    fn touch(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.created).as_millis();
        let ms = u32::try_from(ms).unwrap_or(u32::MAX);
        // A hot entry is read by every core many times per millisecond: store only when the
        // value changes, so that reads do not keep stealing the cache line from each other.
        if self.last_used_ms.load(Ordering::Relaxed) != ms {
            self.last_used_ms.store(ms, Ordering::Relaxed);
        }
    }

    fn last_used(&self) -> Instant {
        self.created + Duration::from_millis(u64::from(self.last_used_ms.load(Ordering::Relaxed)))
    }

    fn expired(&self, now: Instant, idle: Duration, hard: Duration) -> bool {
        now.saturating_duration_since(self.created) >= hard
            || now.saturating_duration_since(self.last_used()) >= idle
    }
}

type Shard<K> = RwLock<HashMap<K, Arc<DekEntry>>>;

/// A sharded map from `K` to cached entries with TTLs and a size bound.
pub struct ShardedCache<K> {
    shards: Box<[Shard<K>]>,
    hasher: RandomState,
    per_shard: usize,
    idle: Duration,
    hard: Duration,
}

impl<K: Hash + Eq + Clone> ShardedCache<K> {
    pub fn new(max_entries: usize, idle: Duration, hard: Duration) -> Self {
        let per_shard = max_entries.div_ceil(SHARDS).max(1);
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            per_shard,
            idle,
            hard,
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, k: &Q) -> &Shard<K> {
        let h = self.hasher.hash_one(k) as usize;
        &self.shards[h % SHARDS]
    }

    /// A live entry, marked as used; `None` if absent or expired.
    pub fn get<Q>(&self, k: &Q) -> Option<Arc<DekEntry>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = Instant::now();
        let shard = self.shard(k);
        let hit = {
            let g = shard.read().unwrap_or_else(|p| p.into_inner());
            g.get(k).cloned()
        };
        let e = hit?;
        if e.expired(now, self.idle, self.hard) {
            let mut g = shard.write().unwrap_or_else(|p| p.into_inner());
            if g.get(k).is_some_and(|cur| Arc::ptr_eq(cur, &e)) {
                g.remove(k);
            }
            return None;
        }
        e.touch(now);
        Some(e)
    }

    /// Inserts, evicting if the shard is full.
    pub fn insert(&self, k: K, e: Arc<DekEntry>) {
        let now = Instant::now();
        let shard = self.shard(&k);
        let mut g = shard.write().unwrap_or_else(|p| p.into_inner());
        if g.len() >= self.per_shard && !g.contains_key(&k) {
            g.retain(|_, v| !v.expired(now, self.idle, self.hard));
            if g.len() >= self.per_shard {
                let victim = g
                    .iter()
                    .take(EVICTION_SAMPLE)
                    .min_by_key(|(_, v)| v.last_used())
                    .map(|(k, _)| k.clone());
                if let Some(v) = victim {
                    g.remove(&v);
                }
            }
        }
        g.insert(k, e);
    }

    /// Removes an entry (shred). Returns whether it was present.
    pub fn remove<Q>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut g = self.shard(k).write().unwrap_or_else(|p| p.into_inner());
        g.remove(k).is_some()
    }

    /// Drops expired entries from every shard; returns how many were dropped.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut n = 0;
        for s in self.shards.iter() {
            let mut g = s.write().unwrap_or_else(|p| p.into_inner());
            let before = g.len();
            g.retain(|_, v| !v.expired(now, self.idle, self.hard));
            n += before - g.len();
        }
        n
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::aead::Algorithm;

    fn entry() -> Arc<DekEntry> {
        let kid = KeyId([1; 16]);
        let keys = DerivedKeys::derive(Algorithm::Aes256Gcm, &[0; 32], "ks", &kid, 1).unwrap();
        Arc::new(DekEntry::new("ks".into(), kid, 1, keys))
    }

    #[test]
    fn bounded_in_entries() {
        let c: ShardedCache<u32> =
            ShardedCache::new(128, Duration::from_secs(60), Duration::from_secs(60));
        for i in 0..10_000 {
            c.insert(i, entry());
        }
        assert!(c.len() <= 128, "len {}", c.len());
        assert!(c.len() >= 64);
    }

    #[test]
    fn hard_ttl_and_idle_ttl_expire_entries() {
        let c: ShardedCache<u32> =
            ShardedCache::new(10, Duration::from_millis(30), Duration::from_millis(80));
        c.insert(1, entry());
        assert!(c.get(&1).is_some());
        std::thread::sleep(Duration::from_millis(50));
        assert!(c.get(&1).is_none(), "idle TTL");
        c.insert(2, entry());
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(20));
            let _ = c.get(&2);
        }
        assert!(c.get(&2).is_none(), "hard TTL despite use");
        c.insert(3, entry());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(c.sweep(), 1);
        assert!(c.is_empty());
    }

    #[test]
    fn remove_drops_the_entry() {
        let c: ShardedCache<u32> =
            ShardedCache::new(10, Duration::from_secs(60), Duration::from_secs(60));
        let e = entry();
        c.insert(7, e.clone());
        assert!(c.remove(&7));
        assert!(c.get(&7).is_none());
        assert_eq!(Arc::strong_count(&e), 1, "cache holds no copy after remove");
    }
}
