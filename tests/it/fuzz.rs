//! Fuzzing on the stable toolchain, CI form (issue 13): a bounded, deterministic mutational
//! harness over the targets of `fuzz/targets.rs` (ciphertext envelope, sealed envelope,
//! tokens, policy, config, audit lines), starting from the committed corpus `fuzz/corpus/<target>/`.
//!
//! Each input is a corpus entry with one to four byte-level mutations (bit flips, interesting
//! bytes, arithmetic, deletions, insertions, truncation, extension, duplicated ranges,
//! dictionary tokens, splices of two corpus entries); some mutants join the pool, so mutations
//! stack. A panic is a failure (the input is written to `target/fuzz-failures/`), and so is an
//! input that does not return within [`HANG`] (a hang). The seed is fixed, so a CI failure
//! replays; `PIIGUARD_FUZZ_SEED`, `PIIGUARD_FUZZ_ITERS` (per target) and `PIIGUARD_FUZZ_SECS`
//! (per target, instead of a count) and `PIIGUARD_FUZZ_TARGETS` (a comma list) change the run: `scripts/fuzz.sh` uses them for long runs
//! when cargo-afl is not installed (with it, it runs the AFL++ targets of `fuzz/afl/`).

#[path = "../../fuzz/targets.rs"]
mod targets;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An input that does not return within this is a hang (debug build, loaded machine).
const HANG: Duration = Duration::from_secs(20);
/// Iterations per target in CI.
const CI_ITERS: u64 = 3000;
/// And at most this long per target in CI (the same inputs in the same order, cut short on a
/// loaded machine: the whole test stays under 30 s in a debug build).
const CI_CAP: Duration = Duration::from_secs(4);
/// The default seed.
const SEED: u64 = 0x005e_edf0_2213;

/// Tokens worth inserting: format prefixes, TOML and JSON syntax, numbers at the edges.
const DICT: &[&[u8]] = &[
    b"pg1.",
    b"ps1.",
    b"pgt_",
    b"=",
    b"\"",
    b"'''",
    b"[",
    b"]",
    b"[[grant]]",
    b"{",
    b"}",
    b",",
    b":",
    b"\n",
    b"*",
    b"@",
    b"0",
    b"-1",
    b"4294967296",
    b"18446744073709551616",
    b"1e999",
    b"\"hash\":\"",
    b"\"kind\":\"checkpoint\"",
    b"\\u0000",
    b"\xff\xfe",
    b"\xc3\xa9",
    b"true",
    b"inf",
];

/// splitmix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// One byte-level mutation of `v` (`pool` for splices).
fn mutate_once(rng: &mut Rng, v: &mut Vec<u8>, pool: &[Vec<u8>]) {
    let len = v.len();
    match rng.below(12) {
        // Flip one bit.
        0 if len > 0 => {
            let i = rng.below(len);
            v[i] ^= 1 << rng.below(8);
        }
        // An interesting byte.
        1 if len > 0 => {
            let i = rng.below(len);
            v[i] = [0x00, 0xff, 0x7f, 0x80, 0x01, b'0', b'9', b'"', b'\n'][rng.below(9)];
        }
        // Small arithmetic on a byte.
        2 if len > 0 => {
            let i = rng.below(len);
            v[i] = v[i].wrapping_add((rng.below(33) as u8).wrapping_sub(16));
        }
        // Delete a range.
        3 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(32));
            v.drain(i..i + n);
        }
        // Insert random bytes.
        4 => {
            let i = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            v.splice(i..i, bytes);
        }
        // Truncate.
        5 if len > 0 => v.truncate(rng.below(len)),
        // Extend: random bytes, or the tail repeated.
        6 => {
            if rng.below(2) == 0 || len == 0 {
                let n = 1 + rng.below(64);
                v.extend((0..n).map(|_| rng.byte()));
            } else {
                let from = rng.below(len);
                let tail = v[from..].to_vec();
                v.extend_from_slice(&tail);
            }
        }
        // Duplicate a range in place.
        7 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            let r = v[i..i + n].to_vec();
            let at = rng.below(len + 1);
            v.splice(at..at, r);
        }
        // Insert a dictionary token.
        8 | 9 => {
            let t = DICT[rng.below(DICT.len())];
            let i = rng.below(len + 1);
            v.splice(i..i, t.iter().copied());
        }
        // Splice: our prefix, another entry's suffix.
        10 if !pool.is_empty() => {
            let other = &pool[rng.below(pool.len())];
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            v.truncate(cut);
            v.extend_from_slice(&other[from..]);
        }
        // Overwrite a range with bytes from another entry.
        _ if !pool.is_empty() && len > 0 => {
            let other = &pool[rng.below(pool.len())];
            if !other.is_empty() {
                let i = rng.below(len);
                let j = rng.below(other.len());
                let n = 1 + rng.below((len - i).min(other.len() - j).min(32));
                v[i..i + n].copy_from_slice(&other[j..j + n]);
            }
        }
        _ => v.push(rng.byte()),
    }
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn load_corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// What one target's run found.
struct Outcome {
    target: &'static str,
    runs: u64,
    took: Duration,
    panics: Vec<PathBuf>,
}

/// Runs `f` over the corpus and then up to `iters` mutants for at most `cap`, on a worker
/// thread watched for hangs.
fn run_target(target: &'static str, f: fn(&[u8]), seed: u64, iters: u64, cap: Duration) -> Outcome {
    let corpus = load_corpus(target);
    assert!(!corpus.is_empty(), "fuzz/corpus/{target} is empty");
    let progress = Arc::new(AtomicU64::new(0));
    let current: Arc<Mutex<Vec<u8>>> = Arc::new(Mutex::new(Vec::new()));
    let panics: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let worker = {
        let (progress, current, panics) = (progress.clone(), current.clone(), panics.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(seed ^ fxhash(target.as_bytes()));
            let mut pool = corpus.clone();
            let mut i = 0u64;
            let total = (corpus.len() as u64).saturating_add(iters);
            loop {
                let seeds_done = i >= corpus.len() as u64;
                if i >= total || (seeds_done && started.elapsed() >= cap) {
                    break;
                }
                let input = if (i as usize) < corpus.len() {
                    corpus[i as usize].clone()
                } else {
                    let mut v = pool[rng.below(pool.len())].clone();
                    for _ in 0..1 + rng.below(4) {
                        mutate_once(&mut rng, &mut v, &pool);
                    }
                    v
                };
                *current.lock().unwrap() = input.clone();
                if std::panic::catch_unwind(|| f(&input)).is_err() {
                    panics.lock().unwrap().push(input.clone());
                } else if rng.below(8) == 0 && pool.len() < 512 && input.len() < 1 << 16 {
                    pool.push(input);
                }
                i += 1;
                progress.store(i, Ordering::Relaxed);
            }
        })
    };
    let mut last = (0u64, Instant::now());
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
        let now = progress.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > HANG {
            let input = current.lock().unwrap().clone();
            let p = save_failure(target, "hang", &input);
            panic!(
                "fuzz target {target}: an input did not return within {HANG:?} (saved to {})",
                p.display()
            );
        }
    }
    worker.join().expect("the fuzz worker itself failed");
    let panics = std::mem::take(&mut *panics.lock().unwrap());
    Outcome {
        target,
        runs: progress.load(Ordering::Relaxed),
        took: started.elapsed(),
        panics: panics
            .iter()
            .map(|p| save_failure(target, "panic", p))
            .collect(),
    }
}

fn fxhash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x100_0000_01b3)
    })
}

fn save_failure(target: &str, kind: &str, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{target}-{kind}-{:016x}", fxhash(input)));
    std::fs::write(&p, input).unwrap();
    p
}

/// CI: every target, the corpus plus [`CI_ITERS`] mutants each; no panic, no hang.
#[test]
fn fuzz_targets_survive_mutated_corpus() {
    let seed = env_u64("PIIGUARD_FUZZ_SEED").unwrap_or(SEED);
    let (iters, cap) = match env_u64("PIIGUARD_FUZZ_SECS") {
        Some(secs) => (u64::MAX, Duration::from_secs(secs)),
        None => (
            env_u64("PIIGUARD_FUZZ_ITERS").unwrap_or(CI_ITERS),
            if env_u64("PIIGUARD_FUZZ_ITERS").is_some() {
                Duration::MAX
            } else {
                CI_CAP
            },
        ),
    };
    // A panic inside a target is caught and reported below; keep the default hook's output
    // short (one line per panic is still printed, which names where it happened).
    let only = std::env::var("PIIGUARD_FUZZ_TARGETS").unwrap_or_default();
    let mut failed = Vec::new();
    for (name, f) in targets::TARGETS {
        if !only.is_empty() && !only.split(',').any(|t| t == *name) {
            continue;
        }
        let o = run_target(name, *f, seed, iters, cap);
        println!(
            "fuzz: {:<10} {:>8} inputs in {:>8.2?}, {} panics",
            o.target,
            o.runs,
            o.took,
            o.panics.len()
        );
        failed.extend(
            o.panics
                .into_iter()
                .map(|p| format!("{name}: {}", p.display())),
        );
    }
    assert!(
        failed.is_empty(),
        "inputs that panicked (seed {seed:#x}); add each to fuzz/corpus/<target>/ once fixed:\n{}",
        failed.join("\n")
    );
}

/// The harness itself finds a planted bug: a target that panics on inputs longer than any
/// token seed (which only a mutation makes) is reported, not passed.
#[test]
fn fuzz_harness_reports_a_planted_panic() {
    fn planted(data: &[u8]) {
        if data.len() > 40 && data.contains(&b'_') {
            panic!("planted");
        }
    }
    let o = run_target("token", planted, SEED, 300, Duration::MAX);
    assert!(
        !o.panics.is_empty(),
        "the planted panic was not found in 300 mutants"
    );
    for p in o.panics {
        let input = std::fs::read(&p).unwrap();
        assert!(input.len() > 40, "{}", p.display());
        std::fs::remove_file(p).unwrap();
    }
}

/// Writes the seed corpus with the real code: real ciphertexts and sealed envelopes (binary and
/// text form), real tokens of every format, the example and dev policies and configs, and real
/// audit lines (call records as the writer makes them, chained, with checkpoints). Run by hand
/// (`cargo test --test it fuzz_write_seed_corpus -- --ignored`) when a format changes; the
/// files are committed.
#[test]
#[ignore]
fn fuzz_write_seed_corpus() {
    use std::collections::BTreeMap;
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let d = corpus_dir(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    // Ciphertext envelopes.
    let (keys, kid) = targets::seed_keys();
    let mut ctx = BTreeMap::new();
    let ct = piiguard::crypto::envelope::seal(
        &keys,
        "orders",
        &kid,
        1,
        "email",
        &ctx,
        b"alice@example.com",
    )
    .unwrap();
    write("envelope", "binary", &ct);
    write(
        "envelope",
        "text",
        piiguard::crypto::envelope::to_text(&ct).as_bytes(),
    );
    ctx.insert("tenant", "eu-1");
    let ct =
        piiguard::crypto::envelope::seal(&keys, "orders", &kid, 1, "email", &ctx, b"").unwrap();
    write("envelope", "binary-context-empty", &ct);

    // Sealed envelopes, to the fuzz public key (RSA-2048).
    use piiguard::crypto::sealed::Kind;
    let pk = piiguard::cli::seal::public_key_from_pem(targets::AUDIT_PUBLIC_KEY).unwrap();
    let ctx = BTreeMap::new();
    let direct = piiguard::cli::seal::seal_value(
        &pk,
        1,
        Kind::Direct,
        "orders",
        "email",
        &ctx,
        b"bob@example.com",
    )
    .unwrap();
    write("sealed", "direct-binary", &direct);
    write(
        "sealed",
        "direct-text",
        piiguard::crypto::sealed::to_text(&direct).as_bytes(),
    );
    let hybrid =
        piiguard::cli::seal::seal_value(&pk, 3, Kind::Hybrid, "orders", "note", &ctx, &[b'x'; 300])
            .unwrap();
    write("sealed", "hybrid-binary", &hybrid);
    write(
        "sealed",
        "hybrid-text",
        piiguard::crypto::sealed::to_text(&hybrid).as_bytes(),
    );

    // Tokens of every format, from real values.
    use piiguard::crypto::tokens::derive::Stream;
    use piiguard::crypto::tokens::format::{Ff1Params, Format, render};
    let key = [5u8; 32];
    let ff1 = Ff1Params {
        key: &key,
        tweak: b"seed",
    };
    for (name, f, value) in [
        ("opaque", Format::Opaque, "alice@example.com"),
        (
            "digits",
            Format::Digits { keep_last: 4 },
            "4111111111111111",
        ),
        ("email", Format::Email, "alice@example.com"),
        ("ff1", Format::Ff1, "DE89-3704-0044-0532-0130-00"),
    ] {
        let mut s = Stream::from_seed(&[1u8; 32]);
        let t = render(f, value, &mut s, Some(&ff1)).unwrap();
        write("token", name, t.as_bytes());
        write("token", &format!("{name}-value"), value.as_bytes());
    }

    // Policies: the example policy and the dev policy.
    write(
        "policy",
        "example",
        &std::fs::read(root.join("deploy/policy/policy.example.toml")).unwrap(),
    );
    write("policy", "dev", piiguard::setup::dev::DEV_POLICY.as_bytes());

    // Configs: the example config and a dev config.
    write(
        "config",
        "example",
        &std::fs::read(root.join("piiguard.example.toml")).unwrap(),
    );

    write(
        "config",
        "minimal",
        b"[tls]\ncert = \"s.pem\"\nkey = \"s.key\"\nclient_ca = \"ca.pem\"\n[vault]\n\
          address = \"https://vault:8200\"\nca_cert = \"vault-ca.pem\"\nmax_in_flight = 8\n\
          auth = { method = \"approle\", role_id_file = \"r\", secret_id_file = \"s\" }\n\
          [keyspaces.orders]\n[keyspaces.crm]\nalgorithm = \"aes-128-gcm\"\n\
          [policy]\nfile = \"policy.toml\"\n[audit]\ndir = \"audit\"\n",
    );

    // Audit lines: call records as the writer makes them, chained, with checkpoints.
    use piiguard::audit::call::{CallRecord, Scopes};
    let mut lines = Vec::new();
    let mut prev = [0u8; 32];
    let push = |body: Vec<u8>, lines: &mut Vec<u8>, prev: &mut [u8; 32]| {
        let (line, h) = piiguard::audit::seal_line(&body);
        lines.extend_from_slice(&line);
        lines.push(b'\n');
        *prev = h;
    };
    let json = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    push(
        json(
            serde_json::json!({"seq": 1, "ts": "2026-12-02T08:00:00Z", "instance": "i1",
            "kind": "segment_start", "prev": hex::encode(prev), "prev_clean": true}),
        ),
        &mut lines,
        &mut prev,
    );
    for seq in 2..5u64 {
        let r = CallRecord {
            at: std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000 + seq),
            caller: "spiffe://shop.local/orders".into(),
            method: "Decrypt",
            operation: "decrypt",
            reveal: None,
            scopes: Scopes::Many(vec!["orders/email".into(), "crm/name".into()]),
            subject_ref: Some([seq as u8; 32]),
            key_id: Some([7u8; 16]),
            touched: None,
            items: Some([3, 1, 0]),
            outcome: "partial",
            code: "OK",
            reason: None,
            latency_us: 1234,
            correlation_id: piiguard::error::CorrelationId::new(),
        };
        let mut body = Vec::new();
        r.write_body(&mut body, seq, b"\"i1\"", &prev);
        push(body, &mut lines, &mut prev);
    }
    push(
        json(
            serde_json::json!({"seq": 5, "ts": "2026-12-02T08:00:01Z", "instance": "i1",
            "kind": "checkpoint", "prev": hex::encode(prev), "covers_seq": 4,
            "covers_hash": hex::encode(prev), "key_version": 1,
            "signature": "vault:v1:AAAA", "final_seal": true,
            "message": "piiguard-audit-checkpoint-v2", "prev_checkpoint": 0}),
        ),
        &mut lines,
        &mut prev,
    );
    write("audit_line", "chain", &lines);
    let first = lines.split(|b| *b == b'\n').nth(1).unwrap().to_vec();
    write("audit_line", "call", &first);
}
