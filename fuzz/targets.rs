//! The fuzz targets: one function per parser of untrusted bytes, each taking any input and
//! required never to panic (nor hang). Shared by the in-tree bounded harness
//! (`tests/it/fuzz.rs`, CI) and the AFL++ targets (`fuzz/afl/`, long runs), which both include
//! this file by path. The corpus of each is `fuzz/corpus/<name>/`.

use std::collections::{BTreeMap, BTreeSet};

use piiguard::crypto::aead::Algorithm;
use piiguard::crypto::envelope::{self, DerivedKeys, KeyId};
use piiguard::crypto::sealed;
use piiguard::crypto::tokens::derive::Stream;
use piiguard::crypto::tokens::format::{self, Ff1Params, Format};

/// A target: any bytes in, must not panic or hang.
pub type Target = fn(&[u8]);

/// Every target by name (the name of its corpus folder).
pub const TARGETS: &[(&str, Target)] = &[
    ("envelope", envelope),
    ("sealed", sealed_envelope),
    ("token", token),
    ("policy", policy),
    ("config", config),
    ("audit_line", audit_line),
];

/// The key of the seed ciphertexts (golden vector 1 of docs/FORMAT.md: a test key).
pub const SEED_DEK_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
/// The key id of the seed ciphertexts.
pub const SEED_KEY_ID_HEX: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf";

/// The derived keys the seed ciphertexts were sealed with (keyspace `orders`, DEK version 1).
pub fn seed_keys() -> (DerivedKeys, KeyId) {
    let kid = KeyId::from_hex(SEED_KEY_ID_HEX).expect("key id");
    let dek = hex::decode(SEED_DEK_HEX).expect("dek");
    let keys = DerivedKeys::derive(Algorithm::Aes256Gcm, &dek, "orders", &kid, 1).expect("keys");
    (keys, kid)
}

fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// Ciphertext envelope (`crypto::envelope::parse`, binary and `pg1.` text forms), then an open
/// with the seed key so that mutated bodies reach the commitment check and AEAD.
pub fn envelope(data: &[u8]) {
    let mut scratch = Vec::new();
    if let Ok(p) = envelope::parse(data, &mut scratch) {
        let (keys, _) = seed_keys();
        let mut ctx = BTreeMap::new();
        let _ = p.open(&keys, "email", &ctx);
        ctx.insert("tenant", "eu-1");
        let _ = p.open(&keys, "email", &ctx);
    }
}

/// Sealed envelope (`crypto::sealed::parse`, binary and text forms, size bound), then an open
/// with a wrong RSA plaintext of each plausible length.
pub fn sealed_envelope(data: &[u8]) {
    let mut scratch = Vec::new();
    for max in [0usize, 64, 4096] {
        if let Ok(s) = sealed::parse(data, &mut scratch, max) {
            let ctx = BTreeMap::new();
            for len in [0usize, 32, 64] {
                let _ = s.open(&vec![7u8; len], "orders", "email", &ctx);
            }
        }
        scratch.clear();
    }
}

/// Token strings (`check_token`), and the same bytes as a value for every token format
/// (`check_value`, `ff1_applies`, and `render` when the value fits).
pub fn token(data: &[u8]) {
    let s = text(data);
    let _ = format::check_token(&s);
    let _ = format::ff1_applies(&s);
    let key = [9u8; 32];
    let ff1 = Ff1Params {
        key: &key,
        tweak: b"fuzz",
    };
    for f in [
        Format::Opaque,
        Format::Digits { keep_last: 0 },
        Format::Digits { keep_last: 4 },
        Format::Email,
        Format::Ff1,
    ] {
        if format::check_value(f, &s, 256).is_ok() {
            let mut stream = Stream::from_seed(&[3u8; 32]);
            let _ = format::render(f, &s, &mut stream, Some(&ff1));
        }
    }
}

/// The access policy parser (`access::policy::Policy::parse`), with and without the list of
/// known keyspaces.
pub fn policy(data: &[u8]) {
    let s = text(data);
    let _ = piiguard::access::policy::Policy::parse(&s, None);
    let known: BTreeSet<String> = ["orders", "crm", "graced", "strict"]
        .iter()
        .map(|k| k.to_string())
        .collect();
    let _ = piiguard::access::policy::Policy::parse(&s, Some(&known));
}

/// The config parser (`config::parse`: TOML, environment overrides, validation).
pub fn config(data: &[u8]) {
    let s = text(data);
    let _ = piiguard::config::parse(&s, Vec::new());
    // The same text with one environment override on top (the override path).
    let _ = piiguard::config::parse(
        &s,
        vec![("PIIGUARD_VAULT__MAX_IN_FLIGHT".to_string(), "3".to_string())],
    );
}

/// One audit line (`audit::open_line`), then the whole input as an audit file through the
/// verifier (`audit::verify::verify_files`: chain, record kinds, checkpoints).
pub fn audit_line(data: &[u8]) {
    for line in data.split(|b| *b == b'\n') {
        if let Some((body, _, _)) = piiguard::audit::open_line(line) {
            let _ = serde_json::from_slice::<serde_json::Value>(&body);
        }
    }
    thread_local! {
        static DIR: tempfile::TempDir = tempfile::tempdir().expect("temp dir");
    }
    DIR.with(|d| {
        let f = d.path().join(piiguard::audit::writer::file_name(1));
        std::fs::write(&f, data).expect("write the audit file");
        let opts = piiguard::audit::verify::Options {
            public_keys: Vec::new(),
            no_signature_check: true,
            allow_open_tail: true,
            anchor: None,
        };
        let _ = piiguard::audit::verify::verify_files(std::slice::from_ref(&f), &opts);
        let opts = piiguard::audit::verify::Options {
            public_keys: vec![AUDIT_PUBLIC_KEY.to_string()],
            no_signature_check: false,
            allow_open_tail: false,
            anchor: None,
        };
        let _ = piiguard::audit::verify::verify_files(std::slice::from_ref(&f), &opts);
    });
}

/// An RSA-2048 public key for the verifier's signature path (its private half was thrown
/// away: no fuzzed checkpoint verifies, each is parsed and checked).
pub const AUDIT_PUBLIC_KEY: &str = include_str!("audit-public-key.pem.txt");
