//! ghz data files that cannot be checked in: warm working sets and 1,000-item batches (large),
//! and ciphertexts to decrypt (they name DEKs of the running dev server). bench/ghz/*.json
//! point at them under `bench/out/`, which git ignores.

use base64::Engine as _;
use serde_json::{Value, json};

use crate::scenario::{self, BENCH_CARD, CARD_FIELD, HOT_SUBJECT, warm_subject};
use crate::{GhzDataArgs, Target};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn enc_item(t: &Target, subject: &str, pt: &[u8]) -> Value {
    // proto3 JSON mapping: bytes are standard base64.
    json!({
        "keyspace": t.keyspace,
        "subject": subject,
        "field": t.field,
        "plaintext": B64.encode(pt),
    })
}

fn dec_item(t: &Target, ct: &[u8]) -> Value {
    json!({ "field": t.field, "ciphertext": B64.encode(ct) })
}

/// Generated data of the key-management and masked-reveal configs (issues 12, 14).
#[derive(Debug, Clone, Default)]
pub struct KeysData {
    /// Hybrid sealed envelopes of the plaintext for keyspace / field (one per warm subject).
    pub envelopes: Vec<Vec<u8>>,
    /// Envelopes per UnsealBatch.
    pub unseal_batch: usize,
    /// Ciphertexts of an older DEK version, one per warm subject (their keys were rotated).
    pub old_cts: Vec<Vec<u8>>,
    /// A ciphertext of [`BENCH_CARD`] (field [`CARD_FIELD`]) of the hot subject.
    pub card_ct: Vec<u8>,
    /// Random opaque tokens of the hot subject, to detokenise.
    pub tokens: Vec<String>,
}

/// The generated files' contents. `hot_ct` is a ciphertext of the hot subject and `warm_cts`
/// one ciphertext per warm subject, in order.
pub fn generate(
    t: &Target,
    batch: usize,
    size: usize,
    hot_ct: &[u8],
    warm_cts: &[Vec<u8>],
    k: &KeysData,
) -> Vec<(&'static str, Value)> {
    let pt = scenario::plaintext(size);
    let n = warm_cts.len().max(1);
    let warm: Vec<Value> = (0..n).map(|i| enc_item(t, &warm_subject(i), &pt)).collect();
    let batch_warm: Vec<Value> = (0..batch)
        .map(|i| enc_item(t, &warm_subject(i % n), &pt))
        .collect();
    let batch_hot: Vec<Value> = (0..batch).map(|_| enc_item(t, HOT_SUBJECT, &pt)).collect();
    // Templated: every item of every call gets a new subject (cold path). Run without
    // --disable-template-* flags.
    let batch_cold: Vec<Value> = (0..batch)
        .map(|_| enc_item(t, "bench-cold-{{newUUID}}", &pt))
        .collect();
    let dec_warm: Vec<Value> = warm_cts.iter().map(|c| dec_item(t, c)).collect();
    let dec_batch: Vec<Value> = (0..batch)
        .filter_map(|i| warm_cts.get(i % n).map(|c| dec_item(t, c)))
        .collect();
    let unseal_item = |i: usize| {
        json!({
            "keyspace": t.keyspace,
            "subject": warm_subject(i % n),
            "field": t.field,
            "envelope": B64.encode(k.envelopes.get(i % k.envelopes.len().max(1)).map_or(&[][..], |e| &e[..])),
        })
    };
    let unseal: Vec<Value> = (0..k.envelopes.len().max(1)).map(unseal_item).collect();
    let unseal_batch: Vec<Value> = (0..k.unseal_batch.max(1)).map(unseal_item).collect();
    let rewrap_item = |c: &Vec<u8>| json!({ "keyspace": t.keyspace, "field": t.field, "ciphertext": B64.encode(c) });
    let rewrap: Vec<Value> = k.old_cts.iter().map(rewrap_item).collect();
    let rewrap_batch: Vec<Value> = (0..batch)
        .filter_map(|i| k.old_cts.get(i % k.old_cts.len().max(1)).map(rewrap_item))
        .collect();
    let masked = json!({
        "field": CARD_FIELD,
        "ciphertext": B64.encode(&k.card_ct),
        "reveal": "REVEAL_MODE_MASKED",
    });
    let detokenize: Vec<Value> = k
        .tokens
        .iter()
        .map(|tok| json!({ "keyspace": t.keyspace, "token": tok }))
        .collect();
    vec![
        ("encrypt-warm.json", Value::Array(warm)),
        ("encrypt-batch-hot.json", json!({ "items": batch_hot })),
        ("encrypt-batch-warm.json", json!({ "items": batch_warm })),
        ("encrypt-batch-cold.json", json!({ "items": batch_cold })),
        ("decrypt-hot.json", dec_item(t, hot_ct)),
        ("decrypt-warm.json", Value::Array(dec_warm)),
        ("decrypt-batch.json", json!({ "items": dec_batch })),
        ("unseal.json", Value::Array(unseal)),
        ("unseal-batch.json", json!({ "items": unseal_batch })),
        ("rewrap.json", Value::Array(rewrap)),
        ("rewrap-batch.json", json!({ "items": rewrap_batch })),
        ("decrypt-masked.json", masked),
        ("detokenize.json", Value::Array(detokenize)),
    ]
}

/// `piiguard-bench ghz-data`: encrypts the hot subject and the warm set through the running
/// server (which also warms its cache) and writes every generated file.
pub async fn write_data(a: GhzDataArgs) -> Result<(), String> {
    let t = &a.target;
    let chs = scenario::connect_grpc(t, 1).await?;
    let pt = scenario::plaintext(a.size);
    let hot = scenario::encrypt_all(t, &chs[0], &[HOT_SUBJECT.to_string()], &pt).await?;
    let subjects: Vec<String> = (0..a.warm_subjects.max(1)).map(warm_subject).collect();
    let warm = scenario::encrypt_all(t, &chs[0], &subjects, &pt).await?;
    let hot_ct = hot.first().ok_or("no ciphertext for the hot subject")?;
    // Masked reveal: a card number of the hot subject.
    let card = scenario::encrypt_reqs(
        &chs[0],
        &[piiguard::pb::EncryptRequest {
            keyspace: t.keyspace.clone(),
            subject: HOT_SUBJECT.into(),
            field: CARD_FIELD.into(),
            plaintext: BENCH_CARD.as_bytes().to_vec(),
            context: Default::default(),
            encoding: 0,
            blind_index: false,
        }],
    )
    .await?;
    // Unseal: envelopes sealed here with the server's current sealing public key.
    let key = crate::keys::sealing_key(&chs[0]).await?;
    let envelopes = crate::keys::seal_pool(
        &key,
        subjects.len(),
        piiguard::crypto::sealed::Kind::Hybrid,
        &t.keyspace,
        &t.field,
        &pt,
    )?;
    // Rewrap: the warm ciphertexts above become of an older DEK version once every warm
    // subject's key is rotated (admin identity); they still decrypt (decrypt-warm.json).
    let admin = crate::keys::connect_admin(t).await?;
    crate::keys::rotate_subjects(&admin, &t.keyspace, &subjects, 16).await?;
    // Detokenize: random opaque tokens of the same value as the Tokenize configs'.
    let value = String::from_utf8_lossy(&pt).into_owned();
    let tokens = scenario::tokenize_all(t, &chs[0], subjects.len(), &value).await?;
    let k = KeysData {
        envelopes,
        unseal_batch: a.unseal_batch_size,
        old_cts: warm.clone(),
        card_ct: card.into_iter().next().ok_or("no card ciphertext")?,
        tokens,
    };
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    for (name, v) in generate(t, a.batch_size, a.size, hot_ct, &warm, &k) {
        let p = a.out.join(name);
        let text = serde_json::to_string(&v).map_err(|e| e.to_string())?;
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Every ghz config in bench/ghz must name an existing method and carry data that parses
    //! as that method's request message (proto3 JSON mapping, unknown fields refused).

    use std::path::PathBuf;

    use clap::Parser as _;
    use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

    use super::*;

    fn pool() -> DescriptorPool {
        let mut p = DescriptorPool::decode(piiguard::pb::FILE_DESCRIPTOR_SET).unwrap();
        p.decode_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .unwrap();
        p
    }

    fn target() -> Target {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            t: Target,
        }
        T::parse_from(["t"]).t
    }

    /// `piiguard.v1.Crypto.Encrypt` or `piiguard.v1.Crypto/Encrypt` -> request descriptor.
    fn request_of(pool: &DescriptorPool, call: &str) -> Option<MessageDescriptor> {
        let (svc, method) = call.rsplit_once('/').or_else(|| call.rsplit_once('.'))?;
        let s = pool.get_service_by_name(svc)?;
        s.methods().find(|m| m.name() == method).map(|m| m.input())
    }

    /// What ghz's template step produces from a templated string (values are strings here).
    fn untemplate(v: &Value) -> Value {
        match v {
            Value::String(s) if s.contains("{{") => {
                let mut out = String::new();
                let mut rest = s.as_str();
                while let Some(i) = rest.find("{{") {
                    out.push_str(&rest[..i]);
                    let j = rest[i..].find("}}").expect("unclosed template") + i;
                    out.push_str("00000000-0000-4000-8000-000000000000");
                    rest = &rest[j + 2..];
                }
                out.push_str(rest);
                Value::String(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(untemplate).collect()),
            Value::Object(o) => {
                Value::Object(o.iter().map(|(k, v)| (k.clone(), untemplate(v))).collect())
            }
            other => other.clone(),
        }
    }

    fn has_template(v: &Value) -> bool {
        v.to_string().contains("{{")
    }

    /// Parses `data` (one message, or an array of messages sent round-robin) as `desc`.
    fn parse_data(desc: &MessageDescriptor, data: &Value, what: &str) -> usize {
        let msgs: Vec<&Value> = match data {
            Value::Array(a) => {
                assert!(!a.is_empty(), "{what}: empty data array");
                a.iter().collect()
            }
            one => vec![one],
        };
        for m in &msgs {
            DynamicMessage::deserialize(desc.clone(), untemplate(m))
                .unwrap_or_else(|e| panic!("{what}: data is not a {}: {e}", desc.full_name()));
        }
        msgs.len()
    }

    /// Names of the generated files, relative to the output folder.
    const GENERATED: &[&str] = &[
        "encrypt-warm.json",
        "encrypt-batch-hot.json",
        "encrypt-batch-warm.json",
        "encrypt-batch-cold.json",
        "decrypt-hot.json",
        "decrypt-warm.json",
        "decrypt-batch.json",
        "unseal.json",
        "unseal-batch.json",
        "rewrap.json",
        "rewrap-batch.json",
        "decrypt-masked.json",
        "detokenize.json",
    ];

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    fn configs() -> Vec<(PathBuf, Value)> {
        let dir = repo().join("bench/ghz");
        let mut out: Vec<(PathBuf, Value)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|p| {
                let v = serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                (p, v)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn every_ghz_config_calls_a_real_method_with_valid_data() {
        let pool = pool();
        let t = target();
        let fake_ct = vec![1u8; 153];
        let k = KeysData {
            envelopes: vec![vec![1u8; 354]; 1000],
            unseal_batch: 100,
            old_cts: vec![fake_ct.clone(); 1000],
            card_ct: fake_ct.clone(),
            tokens: vec!["pgt_AAAAAAAAAAAAAAAAAAAAAA".into(); 1000],
        };
        let generated: Vec<(&str, Value)> =
            generate(&t, 1000, 64, &fake_ct, &vec![fake_ct.clone(); 1000], &k);
        let cfgs = configs();
        assert!(
            cfgs.len() >= 10,
            "expected the ghz kit, found {}",
            cfgs.len()
        );
        let mut methods = std::collections::BTreeSet::new();
        for (path, cfg) in &cfgs {
            let what = path.file_name().unwrap().to_string_lossy().to_string();
            let call = cfg["call"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: no call"));
            let desc = request_of(&pool, call)
                .unwrap_or_else(|| panic!("{what}: {call} is not a method of the server"));
            methods.insert(call.to_string());
            // mTLS with the dev PKI, through reflection (no proto/protoset given).
            for k in ["cacert", "cert", "key"] {
                let p = cfg[k].as_str().unwrap_or_else(|| panic!("{what}: no {k}"));
                assert!(p.starts_with("certs/dev/"), "{what}: {k} = {p}");
            }
            assert!(cfg.get("proto").is_none() && cfg.get("protoset").is_none());
            assert!(cfg.get("insecure").is_none_or(|v| v == false), "{what}");
            assert!(cfg["host"].as_str().is_some(), "{what}: no host");
            // ghz's default at the end of a timed run closes the connections under the calls
            // still in flight and counts each as `Unavailable` ("use of closed network
            // connection"): up to `concurrency` false errors. "wait" lets them finish.
            if cfg.get("duration").is_some() {
                assert_eq!(cfg["duration-stop"], "wait", "{what}: duration-stop");
            }
            let data = match (cfg.get("data"), cfg.get("data-file")) {
                (Some(d), None) => d.clone(),
                (None, Some(f)) => {
                    let f = f.as_str().unwrap();
                    let name = f
                        .strip_prefix("bench/out/")
                        .unwrap_or_else(|| panic!("{what}: data-file {f} is not generated"));
                    generated
                        .iter()
                        .find(|(n, _)| *n == name)
                        .unwrap_or_else(|| panic!("{what}: ghz-data does not write {name}"))
                        .1
                        .clone()
                }
                _ => panic!("{what}: exactly one of data / data-file"),
            };
            let n = parse_data(&desc, &data, &what);
            // Variants: cold configs template a new subject per call; the others are fixed
            // data, to be run with --disable-template-functions --disable-template-data.
            let templated = has_template(&data);
            if what.contains("cold") {
                assert!(templated, "{what}: a cold config must template its subject");
                assert!(data.to_string().contains("{{newUUID}}"), "{what}");
            } else if !what.contains("templated") {
                assert!(!templated, "{what}: warm/hot configs use fixed data");
                let note = cfg["tags"]["run-with"].as_str().unwrap_or_default();
                assert!(
                    note.contains("--disable-template-functions")
                        && note.contains("--disable-template-data"),
                    "{what}: tags.run-with must give the flags"
                );
            }
            if what.contains("batch") {
                let items = data["items"].as_array().map(Vec::len).unwrap_or(0);
                // UnsealBatch: one RSA-2048 decrypt in OpenBao per envelope, batches of 100
                // like its anchor's transit batch_input; every other batch: 1,000 items.
                let want = if what.contains("unseal") { 100 } else { 1000 };
                assert_eq!(items, want, "{what}: {want}-item batches");
            }
            if what.contains("warm") && !what.contains("batch") && !what.contains("templated") {
                assert!(n >= 100, "{what}: a warm set of {n} messages");
            }
        }
        for m in [
            "piiguard.v1.Crypto.Encrypt",
            "piiguard.v1.Crypto.Decrypt",
            "piiguard.v1.Crypto.EncryptBatch",
            "piiguard.v1.Crypto.DecryptBatch",
            "grpc.health.v1.Health.Check",
            "piiguard.v1.Crypto.Unseal",
            "piiguard.v1.Crypto.UnsealBatch",
            "piiguard.v1.Crypto.Rewrap",
            "piiguard.v1.Crypto.RewrapBatch",
            "piiguard.v1.Crypto.BlindIndex",
            "piiguard.v1.Tokens.Tokenize",
            "piiguard.v1.Tokens.Detokenize",
        ] {
            assert!(methods.contains(m), "no ghz config calls {m}");
        }
    }

    #[test]
    fn the_checker_refuses_bad_data() {
        let pool = pool();
        let enc = request_of(&pool, "piiguard.v1.Crypto.Encrypt").unwrap();
        assert!(request_of(&pool, "piiguard.v1.Crypto.Encrypts").is_none());
        assert!(request_of(&pool, "piiguard.v1.Crypto/Decrypt").is_some());
        let ok = json!({"keyspace": "orders", "subject": "s", "plaintext": "YWJj"});
        assert!(DynamicMessage::deserialize(enc.clone(), ok).is_ok());
        for bad in [
            json!({"keyspace": "orders", "subjekt": "s"}),
            json!({"plaintext": "not base64!"}),
            json!({"keyspace": 7}),
        ] {
            assert!(
                DynamicMessage::deserialize(enc.clone(), bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn generated_files_match_the_names_the_configs_use() {
        let t = target();
        let k = KeysData {
            envelopes: vec![b"e1".to_vec(), b"e2".to_vec(), b"e3".to_vec()],
            unseal_batch: 4,
            old_cts: vec![b"o1".to_vec(), b"o2".to_vec()],
            card_ct: b"c".to_vec(),
            tokens: vec!["pgt_a".into(), "pgt_b".into()],
        };
        let g = generate(&t, 10, 64, b"x", &[b"y".to_vec(), b"z".to_vec()], &k);
        let names: Vec<&str> = g.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, GENERATED);
        // Batches cycle through the warm set; the decrypt batch holds real ciphertexts.
        let b = &g[2].1["items"];
        assert_eq!(b.as_array().unwrap().len(), 10);
        assert_eq!(b[0]["subject"], "bench-warm-0");
        assert_eq!(b[3]["subject"], "bench-warm-1");
        assert_eq!(g[6].1["items"][1]["ciphertext"], "eg==");
        // Unseal: one request per envelope over the warm subjects; batches cycle the pool.
        let get = |n: &str| &g.iter().find(|(x, _)| *x == n).unwrap().1;
        assert_eq!(get("unseal.json").as_array().unwrap().len(), 3);
        assert_eq!(get("unseal.json")[2]["subject"], "bench-warm-0");
        let ub = get("unseal-batch.json")["items"].as_array().unwrap();
        assert_eq!(ub.len(), 4);
        assert_eq!(ub[3]["envelope"], ub[0]["envelope"]);
        // Rewrap: the older-version ciphertexts; masked: the card field, masked.
        assert_eq!(get("rewrap.json")[1]["ciphertext"], "bzI=");
        assert_eq!(
            get("rewrap-batch.json")["items"].as_array().unwrap().len(),
            10
        );
        assert_eq!(get("decrypt-masked.json")["field"], "card");
        assert_eq!(get("decrypt-masked.json")["reveal"], "REVEAL_MODE_MASKED");
        // Detokenize: one request per token made by ghz-data, in the bench keyspace.
        let d = get("detokenize.json").as_array().unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[1]["token"], "pgt_b");
        assert_eq!(d[1]["keyspace"], t.keyspace);
    }
}
