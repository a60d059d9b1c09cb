//! Memory cost of cached DEKs, measured the way the server holds them (bench/RESULTS.md):
//! one `Arc<DekEntry>` per subject, indexed twice, by subject tag and by key id, in two
//! `ShardedCache`s (keys/manager.rs), each slot one pointer to the shared entry. Prints the
//! process RSS before and after filling and the bytes per cached DEK.
//!
//! `cargo run --release --example cache_memory -- 1000000`

use std::sync::Arc;
use std::time::Duration;

use piiguard::crypto::aead::Algorithm;
use piiguard::crypto::envelope::{DerivedKeys, KeyId};
use piiguard::keys::cache::{ByKeyId, BySubject, DekEntry, ShardedCache, SubjectTag};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<(), String> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|e| format!("count {a:?}: {e}"))?,
        None => 1_000_000,
    };
    let ttl = Duration::from_secs(3600);
    let by_subject: ShardedCache<BySubject> = ShardedCache::new(n, ttl, ttl);
    let by_key: ShardedCache<ByKeyId> = ShardedCache::new(n, ttl, ttl);
    let keyspace: Arc<str> = "orders".into();
    let before = rss_kib();
    for i in 0..n as u64 {
        let mut sref = [0u8; 32];
        sref[..8].copy_from_slice(&i.to_le_bytes());
        sref[8..16].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
        let mut kid = [0u8; 16];
        kid[..8].copy_from_slice(&i.wrapping_mul(0xC2B2_AE3D_27D4_EB4F).to_le_bytes());
        let kid = KeyId(kid);
        let mut dek = [0u8; 32];
        dek[..8].copy_from_slice(&i.to_le_bytes());
        let keys = DerivedKeys::derive(Algorithm::Aes256Gcm, &dek, &keyspace, &kid, 1)
            .map_err(|e| e.to_string())?;
        let e = Arc::new(DekEntry::with_subject(
            keyspace.clone(),
            kid,
            1,
            keys,
            SubjectTag::of(&sref),
        ));
        by_subject.insert(e.clone());
        by_key.insert(e);
    }
    let after = rss_kib();
    let (s, k) = (by_subject.len(), by_key.len());
    println!(
        "entries: {s} by subject, {k} by key id\nRSS before {:.1} MiB, after {:.1} MiB\n\
         bytes per cached DEK (RSS delta / entries): {:.0}\n\
         size_of::<DekEntry>() = {} (+16 for the Arc header)\n\
         shards x bound per shard: {:?}",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(before) * 1024) as f64 / s.max(1) as f64,
        std::mem::size_of::<DekEntry>(),
        by_subject.layout(),
    );
    Ok(())
}
