//! Microbenchmarks of the pure paths (bench/RESULTS.md): envelope seal/open for 16 B .. 64 KiB,
//! format parsing (binary and text form), key derivation, DEK cache lookups.
//!
//! `cargo bench --bench crypto` measures; `cargo test --all-targets` runs each benchmark once
//! (criterion's test mode), so these stay cheap to keep compiling and running.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use piiguard::crypto::aead::Algorithm;
use piiguard::crypto::envelope::{self, DerivedKeys, KeyId};
use piiguard::keys::cache::{BySubject, DekEntry, ShardedCache, SubjectTag};

const SIZES: &[usize] = &[16, 64, 256, 1024, 4096, 16384, 65536];
/// Entries in the cache benchmarks (a warm working set; the cache itself is sharded).
const CACHED: u32 = 20_000;

fn keys() -> (DerivedKeys, KeyId) {
    let kid = KeyId([0x11; 16]);
    let k = DerivedKeys::derive(Algorithm::Aes256Gcm, &[0x42; 32], "orders", &kid, 1)
        .expect("a 32-byte DEK derives");
    (k, kid)
}

fn envelope_seal_open(c: &mut Criterion) {
    let (k, kid) = keys();
    let ctx: BTreeMap<&str, &str> = BTreeMap::new();
    let mut g = c.benchmark_group("envelope");
    for &n in SIZES {
        let pt = vec![0x61u8; n];
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::new("seal", n), &pt, |b, pt| {
            b.iter(|| envelope::seal(&k, "orders", &kid, 1, "email", &ctx, black_box(pt)))
        });
        let ct = envelope::seal(&k, "orders", &kid, 1, "email", &ctx, &pt).expect("seal");
        g.bench_with_input(BenchmarkId::new("parse+open", n), &ct, |b, ct| {
            b.iter(|| {
                let mut scratch = Vec::new();
                let p = envelope::parse(black_box(ct), &mut scratch).expect("parse");
                p.open(&k, "email", &ctx).expect("open")
            })
        });
    }
    // A context map of two entries, as a shop might bind (order id, tenant).
    let ctx2: BTreeMap<&str, &str> = [("order", "A-1029384"), ("tenant", "eu-1")].into();
    let pt = vec![0x61u8; 64];
    g.throughput(Throughput::Bytes(64));
    g.bench_function("seal/64/context2", |b| {
        b.iter(|| envelope::seal(&k, "orders", &kid, 1, "email", &ctx2, black_box(&pt)))
    });
    g.finish();
}

fn format_parsing(c: &mut Criterion) {
    let (k, kid) = keys();
    let ctx = BTreeMap::new();
    let ct = envelope::seal(&k, "orders", &kid, 1, "email", &ctx, &[0x61; 64]).expect("seal");
    let text = envelope::to_text(&ct);
    let mut g = c.benchmark_group("format");
    g.bench_function("parse/binary/64", |b| {
        b.iter(|| {
            let mut s = Vec::new();
            envelope::parse(black_box(&ct), &mut s)
                .map(|p| p.header.dek_version)
                .expect("parse")
        })
    });
    g.bench_function("parse/text/64", |b| {
        b.iter(|| {
            let mut s = Vec::new();
            envelope::parse(black_box(text.as_bytes()), &mut s)
                .map(|p| p.header.dek_version)
                .expect("parse")
        })
    });
    g.bench_function("to_text/64", |b| {
        b.iter(|| envelope::to_text(black_box(&ct)))
    });
    g.finish();
}

fn key_derivation(c: &mut Criterion) {
    let kid = KeyId([0x22; 16]);
    let mut g = c.benchmark_group("kdf");
    for alg in [Algorithm::Aes256Gcm, Algorithm::Aes128Gcm] {
        let dek = vec![0x42u8; alg.key_len()];
        g.bench_function(BenchmarkId::new("derive", alg.name()), |b| {
            b.iter(|| DerivedKeys::derive(alg, black_box(&dek), "orders", &kid, 1).expect("derive"))
        });
    }
    g.finish();
}

fn subject_key(i: u32) -> SubjectTag {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&i.to_le_bytes());
    k[4..8].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
    SubjectTag(k)
}

fn cache(c: &mut Criterion) {
    let cache: ShardedCache<BySubject> = ShardedCache::new(
        1_000_000,
        Duration::from_secs(600),
        Duration::from_secs(3600),
    );
    let (k, kid) = keys();
    drop(k);
    for i in 0..CACHED {
        let (dk, _) = keys();
        cache.insert(Arc::new(DekEntry::with_subject(
            "orders".into(),
            kid,
            1,
            dk,
            subject_key(i),
        )));
    }
    let mut g = c.benchmark_group("cache");
    g.bench_function("get/hit", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i = (i + 7919) % CACHED;
            cache.get(black_box(&subject_key(i))).expect("cached")
        })
    });
    g.bench_function("get/miss", |b| {
        let mut i = CACHED;
        b.iter(|| {
            i = i.wrapping_add(1).max(CACHED);
            cache.get(black_box(&subject_key(i)))
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    envelope_seal_open,
    format_parsing,
    key_derivation,
    cache
);
criterion_main!(benches);
