//! The unwrapped-DEK cache: bounded, with an idle TTL and a hard TTL, sharded to keep lock
//! hold times tiny on the hot path. Entries hold [`DerivedKeys`], which zeroize on drop; an
//! entry leaves memory when it expires, is evicted, or is removed (and the last `Arc` held by
//! a call in flight is dropped).
//!
//! Eviction when full: expired entries first, else the least recently used among a small
//! sample of the shard (as Redis does): O(1) and close to LRU without a linked list.
//!
//! Memory (bench/RESULTS.md, `examples/cache_memory.rs`): one `Arc<DekEntry>` per DEK (the
//! entry carries its own index keys, so each index slot is one pointer), two indexes of
//! 8-byte slots, and a shard count chosen so that a full cache fills its hash tables to
//! ~3/4 instead of just over half.
//!
//! Expanded keys: an entry found in the cache (its second use or later) keeps its AES-GCM key
//! schedule ([`DekEntry::keep_expanded`]), so that its next uses skip the ~0.2 us schedule (6-10%
//! of a 1,000-subject EncryptBatch). It costs ~0.7 KiB in AWS-LC per entry, so only as many
//! entries as an [`ExpandBudget`] allows keep one (`cache.expanded_keys`); the schedule lives
//! and dies with the entry (cleared by AWS-LC when the entry is dropped: evicted, expired or
//! shredded, once the last call holding it is done), and its place goes back to the budget.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use once_cell::race::OnceBox;

use crate::crypto::envelope::{DerivedKeys, EnvelopeError, ExpandedKey, KeyId, PreparedKeys};

/// Shards when the cache is large: enough for two cores' worth of lock traffic.
const TARGET_SHARDS: usize = 64;
const EVICTION_SAMPLE: usize = 8;

/// Length of the subject tag: the subject reference truncated to 128 bits. Collisions among
/// 1 M cached subjects: ~2^-88 (and a hit is also checked against the entry's keyspace).
pub const SUBJECT_TAG_LEN: usize = 16;

/// The index key of the subject index: the first 16 bytes of the subject reference
/// (HMAC-SHA256 of the subject id under the keyspace's secret index key).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubjectTag(pub [u8; SUBJECT_TAG_LEN]);

impl SubjectTag {
    /// The tag of a full 32-byte subject reference.
    pub fn of(subject_ref: &[u8; 32]) -> Self {
        let mut t = [0u8; SUBJECT_TAG_LEN];
        t.copy_from_slice(&subject_ref[..SUBJECT_TAG_LEN]);
        Self(t)
    }
}

/// Milliseconds since this process's cache epoch (the first use of the clock).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct Tick(u64);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Tick {
    /// Now. One clock read: a batch takes it once for all its lookups.
    pub fn now() -> Self {
        let e = epoch();
        Self(
            u64::try_from(Instant::now().saturating_duration_since(e).as_millis())
                .unwrap_or(u64::MAX),
        )
    }

    fn since(self, earlier: u64) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier))
    }
}

/// Which DEK: its key id and version (the key of the key-id index, which holds every cached
/// version of a key: after a rotation the old version keeps decrypting while the new one
/// encrypts, without the two pushing each other out).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct DekId {
    /// Random id of the DEK (the same for every version of one subject's DEK).
    pub key_id: KeyId,
    /// Version of the DEK.
    pub dek_version: u32,
}

/// How many cache entries may keep an expanded AES key schedule at once
/// (`cache.expanded_keys`; 0: none). Shared by both indexes (they share the entries).
pub struct ExpandBudget {
    left: AtomicUsize,
}

impl ExpandBudget {
    /// A budget of `n` expanded keys.
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            left: AtomicUsize::new(n),
        })
    }

    /// Places left.
    pub fn available(&self) -> usize {
        self.left.load(Ordering::Relaxed)
    }

    fn take(&self) -> bool {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| l.checked_sub(1))
            .is_ok()
    }

    fn give(&self) {
        self.left.fetch_add(1, Ordering::AcqRel);
    }
}

/// An entry's kept key schedule and its place in the budget, given back when it is dropped
/// (with the entry).
struct Kept {
    key: ExpandedKey,
    budget: Arc<ExpandBudget>,
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.budget.give();
    }
}

/// One unwrapped DEK, ready to use. 176 bytes (192 with the `Arc` header: mimalloc's 192-byte
/// size class, the one of the 168-byte entry before its kept key schedule was added, so with
/// the binary's allocator a cached DEK costs no more): keep it at most 176. It was 136 until
/// the subkey PRK (security finding 11: subkeys no longer keyed by the AES key) added 32 bytes.
pub struct DekEntry {
    /// Keyspace of the DEK.
    pub keyspace: Arc<str>,
    /// Key id and version of the DEK.
    pub id: DekId,
    /// Keys derived from the DEK (the DEK itself is not kept).
    pub keys: DerivedKeys,
    /// Encryptions this entry may still make: raised by each block reserved in the store for
    /// this DEK version ([`DekEntry::grant`]), lowered by each use; an entry encrypts nothing
    /// before its first block (docs/KEYS.md#usage-limits). Negative after refused attempts.
    left: AtomicI64,
    /// Whether a background reservation of the next block is running (one at a time).
    pub prefetching: AtomicBool,
    /// Subject index key (all zero if the subject is not known, e.g. a key loaded by id whose
    /// record has no readable subject reference).
    subject: SubjectTag,
    /// Creation time: whole seconds since the cache epoch, and the milliseconds past them
    /// (a `u64` of milliseconds would push the entry over 136 bytes).
    created_s: u32,
    created_ms: u16,
    /// Milliseconds since creation of the last use (saturates after ~49 days).
    last_used_ms: AtomicU32,
    /// The AES key schedule of `keys`, once kept ([`DekEntry::keep_expanded`]): one pointer,
    /// set at most once, dropped (and cleared by AWS-LC) with the entry.
    expanded: OnceBox<Kept>,
}

impl std::fmt::Debug for DekEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DekEntry")
            .field("keyspace", &self.keyspace)
            .field("key_id", &self.id.key_id)
            .field("dek_version", &self.id.dek_version)
            .finish_non_exhaustive()
    }
}

impl DekEntry {
    /// An entry not indexed by subject (or whose subject is not known).
    pub fn new(keyspace: Arc<str>, key_id: KeyId, dek_version: u32, keys: DerivedKeys) -> Self {
        Self::with_subject(keyspace, key_id, dek_version, keys, SubjectTag::default())
    }

    /// An entry that also belongs in the subject index under `subject`.
    pub fn with_subject(
        keyspace: Arc<str>,
        key_id: KeyId,
        dek_version: u32,
        keys: DerivedKeys,
        subject: SubjectTag,
    ) -> Self {
        let now = Tick::now().0;
        let id = DekId {
            key_id,
            dek_version,
        };
        Self {
            keyspace,
            id,
            keys,
            // A reload of a DEK this process used before starts from its count, not from 0.
            left: AtomicI64::new(0),
            prefetching: AtomicBool::new(false),
            subject,
            created_s: u32::try_from(now / 1000).unwrap_or(u32::MAX),
            created_ms: (now % 1000) as u16,
            last_used_ms: AtomicU32::new(0),
            expanded: OnceBox::new(),
        }
    }

    /// This DEK's keys ready for AES-GCM: with the key schedule the entry keeps, if any, else
    /// with one computed now for this use.
    pub fn prepared(&self) -> Result<PreparedKeys<'_>, EnvelopeError> {
        self.keys.prepare_with(self.expanded.get().map(|k| &k.key))
    }

    /// Whether the entry keeps its key schedule.
    pub fn is_expanded(&self) -> bool {
        self.expanded.get().is_some()
    }

    /// Computes and keeps the entry's AES key schedule, if it has none and `budget` has a
    /// place; the place goes back when the entry is dropped. Called on a cache hit, so that a
    /// DEK used once (a cold load) never takes one.
    pub fn keep_expanded(&self, budget: &Arc<ExpandBudget>) {
        if self.is_expanded() || !budget.take() {
            return;
        }
        match self.keys.expand() {
            Ok(key) => {
                // Another thread may have kept one meanwhile: then ours is dropped here, and
                // its place given back.
                let _ = self.expanded.set(Box::new(Kept {
                    key,
                    budget: budget.clone(),
                }));
            }
            Err(_) => budget.give(),
        }
    }

    /// Counts one encryption with this DEK; `false` (and nothing may be sealed) once the
    /// blocks reserved in the store for it ([`grant`](Self::grant)) are used up. The durable,
    /// cross-replica count is the sum of the blocks: this only spends them.
    pub fn try_use(&self) -> bool {
        self.left.fetch_sub(1, Ordering::AcqRel) > 0
    }

    /// Encryptions this entry may still make from its reserved blocks.
    pub fn available(&self) -> u64 {
        u64::try_from(self.left.load(Ordering::Acquire)).unwrap_or(0)
    }

    /// Adds `n` encryptions reserved in the store for this DEK version.
    pub fn grant(&self, n: u64) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        // Refused attempts (below zero) used nothing: they are not taken from the new block.
        let _ = self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                Some(l.max(0).saturating_add(n))
            });
    }

    /// The subject tag this entry is indexed under.
    pub fn subject(&self) -> SubjectTag {
        self.subject
    }

    fn created(&self) -> u64 {
        u64::from(self.created_s) * 1000 + u64::from(self.created_ms)
    }

    fn touch(&self, now: Tick) {
        let ms = u32::try_from(now.0.saturating_sub(self.created())).unwrap_or(u32::MAX);
        // A hot entry is read by every core many times per millisecond: store only when the
        // value changes, so that reads do not keep stealing the cache line from each other.
        if self.last_used_ms.load(Ordering::Relaxed) != ms {
            self.last_used_ms.store(ms, Ordering::Relaxed);
        }
    }

    fn last_used(&self) -> u64 {
        self.created() + u64::from(self.last_used_ms.load(Ordering::Relaxed))
    }

    fn expired(&self, now: Tick, idle: Duration, hard: Duration) -> bool {
        now.since(self.created()) >= hard || now.since(self.last_used()) >= idle
    }
}

/// Which of an entry's keys an index uses, and its slot type (the entry, hashed and compared
/// by that key, so that a table holds one pointer per entry rather than a copy of the key).
pub trait IndexKind: Send + Sync + 'static {
    /// The lookup key (a field of [`DekEntry`]).
    type Key: Hash + Eq;
    /// What the table stores.
    type Slot: Hash + Eq + Borrow<Self::Key> + Send + Sync;
    /// The entry's key in this index.
    fn key(e: &DekEntry) -> &Self::Key;
    /// Wraps an entry.
    fn slot(e: Arc<DekEntry>) -> Self::Slot;
    /// The entry of a slot.
    fn entry(s: &Self::Slot) -> &Arc<DekEntry>;
}

/// The subject index: [`SubjectTag`].
pub struct BySubject;
/// The key-id index: [`DekId`] (key id and version: every cached version of a key has its own
/// slot).
pub struct ByKeyId;

/// Defines a slot type whose `Hash`/`Eq` are its entry's key (so that `Borrow<Key>` is
/// consistent: the set can be queried with the key alone).
macro_rules! slot {
    ($slot:ident, $index:ident, $key:ty, $field:ident) => {
        #[doc(hidden)]
        pub struct $slot(Arc<DekEntry>);
        impl Hash for $slot {
            fn hash<H: Hasher>(&self, h: &mut H) {
                self.0.$field.hash(h);
            }
        }
        impl PartialEq for $slot {
            fn eq(&self, o: &Self) -> bool {
                self.0.$field == o.0.$field
            }
        }
        impl Eq for $slot {}
        impl Borrow<$key> for $slot {
            fn borrow(&self) -> &$key {
                &self.0.$field
            }
        }
        impl IndexKind for $index {
            type Key = $key;
            type Slot = $slot;
            fn key(e: &DekEntry) -> &$key {
                &e.$field
            }
            fn slot(e: Arc<DekEntry>) -> $slot {
                $slot(e)
            }
            fn entry(s: &$slot) -> &Arc<DekEntry> {
                &s.0
            }
        }
    };
}
slot!(SubjectSlot, BySubject, SubjectTag, subject);
slot!(KeySlot, ByKeyId, DekId, id);

/// The cache's hasher: a seeded multiply-fold over the key's bytes (a few cycles for 16
/// bytes) instead of SipHash-1-3 (~20 ns, twice per lookup before: shard, then map).
///
/// Why a non-cryptographic hash is safe here: the only keys *inserted* are subject tags (an
/// HMAC under the keyspace's secret index key: callers choose subject ids but cannot predict
/// their tags) and key ids (16 random bytes made by this server). An attacker therefore cannot
/// place entries on chosen buckets, and a lookup of an attacker-chosen key (a forged key id in
/// a ciphertext) only probes a table whose layout it does not control: no hash flooding. The
/// per-process random seed additionally hides which shard and bucket a key lands in. Do not
/// reuse this hasher for keys that callers choose.
#[derive(Clone, Copy)]
struct CacheHasherBuilder {
    seed: u64,
}

impl CacheHasherBuilder {
    fn new() -> Self {
        let mut b = [0u8; 8];
        // The std RandomState is seeded from the OS; fall back to it if AWS-LC's CSPRNG fails.
        let seed = match aws_lc_rs::rand::fill(&mut b) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => std::hash::RandomState::new().hash_one(0u64),
        };
        Self { seed: seed | 1 }
    }
}

const MUL: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let m = u128::from(a) * u128::from(b);
    (m as u64) ^ ((m >> 64) as u64)
}

struct CacheHasher {
    state: u64,
    seed: u64,
}

impl Hasher for CacheHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.state = fold_mul(self.state ^ u64::from_le_bytes(w), MUL);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.state = fold_mul(self.state ^ u64::from_le_bytes(w) ^ rest.len() as u64, MUL);
        }
    }
    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.state = fold_mul(self.state ^ v, MUL);
    }
    #[inline]
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        fold_mul(self.state, self.seed)
    }
}

impl BuildHasher for CacheHasherBuilder {
    type Hasher = CacheHasher;
    fn build_hasher(&self) -> CacheHasher {
        CacheHasher {
            state: self.seed.rotate_left(32),
            seed: self.seed,
        }
    }
}

type Table<I> = HashSet<<I as IndexKind>::Slot, CacheHasherBuilder>;
type Shard<I> = RwLock<Table<I>>;

/// Shard count and per-shard bound for `max_entries`. A std (hashbrown) table of `b` buckets
/// (a power of two) holds 7/8 b items before it doubles. The per-shard bound is set at or just
/// under 3/4 b, so that a full cache does not sit in tables that just doubled (at 1 M entries
/// and a fixed 64 shards, 15,625 per shard needs 32,768 buckets, half empty; 82 shards of
/// <= 12,196 fit 16,384 buckets each), while the 1/8 b left between the bound and 7/8 b absorbs
/// the tombstones that removals leave, so that churn at the bound rehashes a shard only every
/// ~b/8 inserts. The total bound is `max_entries` rounded up to a multiple of the shard count.
fn layout(max_entries: usize) -> (usize, usize) {
    let max_entries = max_entries.max(1);
    let want = max_entries.div_ceil(TARGET_SHARDS);
    let mut buckets = 8usize;
    while (buckets * 2) / 4 * 3 <= want {
        buckets *= 2;
    }
    let cap = if want < 6 { want } else { buckets / 4 * 3 };
    let shards = max_entries.div_ceil(cap);
    (shards, max_entries.div_ceil(shards))
}

/// One index of the cache: a sharded set of entries keyed by `I::Key`, with TTLs and a size
/// bound.
pub struct ShardedCache<I: IndexKind> {
    shards: Box<[Shard<I>]>,
    hasher: CacheHasherBuilder,
    per_shard: usize,
    /// The capacity of a table sized for `per_shard`: a table above it has doubled (see
    /// [`layout`]) and is rehashed back.
    table_cap: usize,
    idle: Duration,
    hard: Duration,
}

impl<I: IndexKind> ShardedCache<I> {
    /// An empty cache of at most `max_entries`, with idle and hard TTLs.
    pub fn new(max_entries: usize, idle: Duration, hard: Duration) -> Self {
        let (n, per_shard) = layout(max_entries);
        let hasher = CacheHasherBuilder::new();
        Self {
            shards: (0..n)
                .map(|_| RwLock::new(HashSet::with_hasher(hasher)))
                .collect(),
            hasher,
            per_shard,
            table_cap: HashSet::<u8>::with_capacity(per_shard).capacity(),
            idle,
            hard,
        }
    }

    /// The number of shards and the bound of each.
    pub fn layout(&self) -> (usize, usize) {
        (self.shards.len(), self.per_shard)
    }

    fn shard(&self, k: &I::Key) -> &Shard<I> {
        let h = self.hasher.hash_one(k);
        // Bits 20..52 pick the shard: the table inside uses the low bits (bucket) and the top
        // 7 (tag), which must stay independent of the shard.
        let mid = (h >> 20) & 0xFFFF_FFFF;
        &self.shards[((mid * self.shards.len() as u64) >> 32) as usize]
    }

    /// A live entry, marked as used; `None` if absent or expired.
    pub fn get(&self, k: &I::Key) -> Option<Arc<DekEntry>> {
        self.get_at(k, Tick::now())
    }

    /// [`get`](Self::get) at a given time (a batch reads the clock once).
    pub fn get_at(&self, k: &I::Key, now: Tick) -> Option<Arc<DekEntry>> {
        let shard = self.shard(k);
        let key = k;
        let e = {
            let g = shard.read().unwrap_or_else(|p| p.into_inner());
            g.get(key).map(|s| I::entry(s).clone())
        }?;
        if e.expired(now, self.idle, self.hard) {
            let mut g = shard.write().unwrap_or_else(|p| p.into_inner());
            if g.get(key).is_some_and(|cur| Arc::ptr_eq(I::entry(cur), &e)) {
                g.remove(key);
            }
            return None;
        }
        e.touch(now);
        Some(e)
    }

    /// Inserts (replacing any entry under the same key), evicting if the shard is full.
    pub fn insert(&self, e: Arc<DekEntry>) {
        let now = Tick::now();
        let shard = self.shard(I::key(&e));
        let mut g = shard.write().unwrap_or_else(|p| p.into_inner());
        if g.len() >= self.per_shard && !g.contains(I::key(&e)) {
            g.retain(|s| !I::entry(s).expired(now, self.idle, self.hard));
            if g.len() >= self.per_shard {
                let victim = g
                    .iter()
                    .take(EVICTION_SAMPLE)
                    .min_by_key(|s| I::entry(s).last_used())
                    .map(|s| I::entry(s).clone());
                if let Some(v) = victim {
                    g.remove(I::key(&v));
                }
            }
        }
        g.replace(I::slot(e));
        // At the bound, tombstones left by removals make the table double although it holds
        // no more entries than before: rehash it into the size the bound needs.
        if g.capacity() > self.table_cap {
            g.shrink_to(self.per_shard);
        }
    }

    /// Removes an entry (shred). Returns whether it was present.
    pub fn remove(&self, k: &I::Key) -> bool {
        let mut g = self.shard(k).write().unwrap_or_else(|p| p.into_inner());
        g.remove(k)
    }

    /// Drops expired entries from every shard; returns how many were dropped.
    pub fn sweep(&self) -> usize {
        let now = Tick::now();
        let mut n = 0;
        for s in self.shards.iter() {
            let mut g = s.write().unwrap_or_else(|p| p.into_inner());
            let before = g.len();
            g.retain(|s| !I::entry(s).expired(now, self.idle, self.hard));
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

    fn entry_n(n: u32) -> Arc<DekEntry> {
        let mut kid = [0u8; 16];
        kid[..4].copy_from_slice(&n.to_le_bytes());
        let kid = KeyId(kid);
        let mut tag = [0u8; 16];
        tag[12..].copy_from_slice(&n.to_be_bytes());
        let keys = DerivedKeys::derive(Algorithm::Aes256Gcm, &[0; 32], "ks", &kid, 1).unwrap();
        Arc::new(DekEntry::with_subject(
            "ks".into(),
            kid,
            1,
            keys,
            SubjectTag(tag),
        ))
    }

    fn tag(n: u32) -> SubjectTag {
        let mut t = [0u8; 16];
        t[12..].copy_from_slice(&n.to_be_bytes());
        SubjectTag(t)
    }

    #[test]
    fn an_entry_seals_only_what_its_reserved_blocks_allow() {
        let kid = KeyId::random().unwrap();
        let keys = DerivedKeys::derive(Algorithm::Aes256Gcm, &[7; 32], "ks", &kid, 1).unwrap();
        let e = DekEntry::new("ks".into(), kid, 1, keys);
        assert!(!e.try_use(), "nothing before a block is granted");
        assert_eq!(e.available(), 0);
        e.grant(2);
        assert_eq!(e.available(), 2);
        assert!(e.try_use() && e.try_use());
        assert!(!e.try_use(), "the block is used up");
        assert!(!e.try_use());
        e.grant(1);
        assert!(e.try_use(), "refused attempts did not eat the next block");
        assert!(!e.try_use());
    }

    #[test]
    fn entry_fits_its_malloc_chunk() {
        assert!(
            std::mem::size_of::<DekEntry>() <= 176,
            "{}",
            std::mem::size_of::<DekEntry>()
        );
    }

    #[test]
    fn expanded_keys_are_bounded_kept_once_and_given_back_when_the_entry_goes() {
        let budget = ExpandBudget::new(2);
        let (a, b, c) = (entry_n(1), entry_n(2), entry_n(3));
        assert!(!a.is_expanded());
        a.keep_expanded(&budget);
        a.keep_expanded(&budget);
        assert!(a.is_expanded());
        assert_eq!(budget.available(), 1, "an entry keeps one schedule");
        b.keep_expanded(&budget);
        c.keep_expanded(&budget);
        assert!(
            b.is_expanded() && !c.is_expanded(),
            "the budget bounds them"
        );
        assert_eq!(budget.available(), 0);
        // Kept or not, an entry seals the same bytes.
        let n = crate::crypto::envelope::random_nonce().unwrap();
        let ctx = std::collections::BTreeMap::new();
        for e in [&a, &c] {
            let with = |p: &PreparedKeys<'_>| {
                crate::crypto::envelope::seal_prepared(
                    p,
                    &e.keyspace,
                    &e.id.key_id,
                    1,
                    "email",
                    &ctx,
                    b"x",
                    &n,
                )
                .unwrap()
            };
            assert_eq!(
                with(&e.prepared().unwrap()),
                with(&e.keys.prepare().unwrap())
            );
        }
        // Removed from the cache (a shred's eviction) and released by the last holder: the
        // schedule is dropped with the entry and its place comes back.
        let cache: ShardedCache<BySubject> =
            ShardedCache::new(10, Duration::from_secs(60), Duration::from_secs(60));
        cache.insert(a.clone());
        drop(a);
        assert!(cache.remove(&tag(1)));
        assert_eq!(budget.available(), 1);
        c.keep_expanded(&budget);
        assert!(c.is_expanded());
        // A budget of 0 turns it off.
        let off = ExpandBudget::new(0);
        let d = entry_n(4);
        d.keep_expanded(&off);
        assert!(!d.is_expanded());
    }

    #[test]
    fn bounded_in_entries() {
        let c: ShardedCache<BySubject> =
            ShardedCache::new(128, Duration::from_secs(60), Duration::from_secs(60));
        for i in 0..10_000 {
            c.insert(entry_n(i));
        }
        assert!(c.len() <= 128, "len {}", c.len());
        assert!(c.len() >= 64);
    }

    #[test]
    fn layout_keeps_about_max_entries_in_tables_filled_to_seven_eighths() {
        for m in [1, 7, 10, 128, 1000, 10_000, 100_000, 1_000_000, 3_000_000] {
            let (n, per) = layout(m);
            assert!(n * per >= m, "{m}: {n} x {per}");
            assert!(n * per < m + n, "{m}: {n} x {per}");
            assert!(n <= 2 * TARGET_SHARDS + 1, "{m}: {n} shards");
        }
        let (n, per) = layout(1_000_000);
        assert_eq!((n, per), (82, 12_196));
        assert!(HashSet::<u8>::with_capacity(per).capacity() < 16_384);
    }

    #[test]
    fn a_full_cache_keeps_nearly_max_entries_without_growing_its_tables() {
        let m = 20_000;
        let c: ShardedCache<ByKeyId> =
            ShardedCache::new(m, Duration::from_secs(60), Duration::from_secs(60));
        for i in 0..m as u32 {
            c.insert(entry_n(i));
        }
        assert!(c.len() >= m * 95 / 100, "kept {} of {m}", c.len());
        // Churn at the bound: evictions and inserts must not double the tables.
        for i in m as u32..(4 * m) as u32 {
            c.insert(entry_n(i));
        }
        let (_, per) = c.layout();
        for s in c.shards.iter() {
            let g = s.read().unwrap();
            assert!(g.len() <= per);
            assert!(g.capacity() < 2 * per, "cap {} for {per}", g.capacity());
        }
    }

    #[test]
    fn hard_ttl_and_idle_ttl_expire_entries() {
        let c: ShardedCache<BySubject> =
            ShardedCache::new(10, Duration::from_millis(30), Duration::from_millis(80));
        c.insert(entry_n(1));
        assert!(c.get(&tag(1)).is_some());
        std::thread::sleep(Duration::from_millis(50));
        assert!(c.get(&tag(1)).is_none(), "idle TTL");
        c.insert(entry_n(2));
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(20));
            let _ = c.get(&tag(2));
        }
        assert!(c.get(&tag(2)).is_none(), "hard TTL despite use");
        c.insert(entry_n(3));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(c.sweep(), 1);
        assert!(c.is_empty());
    }

    #[test]
    fn remove_drops_the_entry() {
        let c: ShardedCache<BySubject> =
            ShardedCache::new(10, Duration::from_secs(60), Duration::from_secs(60));
        let e = entry_n(7);
        c.insert(e.clone());
        assert!(c.get(&tag(7)).is_some());
        assert!(c.remove(&tag(7)));
        assert!(!c.remove(&tag(7)));
        assert!(c.get(&tag(7)).is_none());
        assert_eq!(Arc::strong_count(&e), 1, "cache holds no copy after remove");
    }

    #[test]
    fn both_indexes_find_and_remove_one_shared_entry() {
        let ttl = Duration::from_secs(60);
        let by_subject: ShardedCache<BySubject> = ShardedCache::new(100_000, ttl, ttl);
        let by_key: ShardedCache<ByKeyId> = ShardedCache::new(100_000, ttl, ttl);
        for i in 0..500 {
            let e = entry_n(i);
            by_subject.insert(e.clone());
            by_key.insert(e);
        }
        let e = by_subject.get(&tag(42)).unwrap();
        let k = by_key.get(&e.id).unwrap();
        assert!(Arc::ptr_eq(&e, &k));
        assert!(by_subject.remove(&tag(42)));
        assert!(by_key.remove(&e.id));
        assert!(by_subject.get(&tag(42)).is_none());
        assert!(by_key.get(&e.id).is_none());
        drop(k);
        assert_eq!(Arc::strong_count(&e), 1);
        assert_eq!(by_subject.len(), 499);
        assert_eq!(by_key.len(), 499);
    }

    #[test]
    fn the_key_index_holds_every_version_of_a_key() {
        let ttl = Duration::from_secs(60);
        let c: ShardedCache<ByKeyId> = ShardedCache::new(100, ttl, ttl);
        let kid = KeyId::random().unwrap();
        let v = |n: u32| {
            let keys =
                DerivedKeys::derive(Algorithm::Aes256Gcm, &[n as u8; 32], "ks", &kid, n).unwrap();
            Arc::new(DekEntry::new("ks".into(), kid, n, keys))
        };
        c.insert(v(1));
        c.insert(v(2));
        assert_eq!(c.len(), 2, "a new version does not push the old one out");
        for n in [1, 2] {
            let id = DekId {
                key_id: kid,
                dek_version: n,
            };
            assert_eq!(c.get(&id).unwrap().id.dek_version, n);
        }
        assert!(
            c.get(&DekId {
                key_id: kid,
                dek_version: 3
            })
            .is_none()
        );
    }

    #[test]
    fn insert_replaces_an_entry_with_the_same_key() {
        let ttl = Duration::from_secs(60);
        let c: ShardedCache<BySubject> = ShardedCache::new(10, ttl, ttl);
        let a = entry_n(1);
        let b = entry_n(1);
        c.insert(a.clone());
        c.insert(b.clone());
        assert_eq!(c.len(), 1);
        assert!(Arc::ptr_eq(&c.get(&tag(1)).unwrap(), &b));
        assert_eq!(Arc::strong_count(&a), 1);
    }
}
