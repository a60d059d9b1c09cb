//! RSA-2048 sealing against a real OpenBao over mTLS (docs/KEYS.md, docs/FORMAT.md "Sealed
//! envelope v1"): envelopes made by `piiguard seal`, by examples/python/seal.py and by
//! examples/openssl/seal.sh open through Crypto.Unseal; every malformed envelope is refused
//! with its reason and stores nothing; UnsealBatch; return_plaintext and its grant; the audit
//! record; public keys, rotation and retirement of the sealing key. One server for all.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use piiguard::crypto::sealed::{self, HEADER_LEN, Kind, RSA_LEN};
use piiguard::pb;
use piiguard::pb::crypto_client::CryptoClient;
use piiguard::pb::keys_client::KeysClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::*;

/// `shipping` may encrypt `email` here but not decrypt it (its dev grant decrypts only
/// `address` and `name`).
const SHIPPING_ENCRYPTS_EMAIL: &str = r#"
[[grant]]
identity = "spiffe://shop.local/shipping"
operations = ["encrypt"]
keyspaces = ["orders"]
fields = ["email"]
"#;

fn unseal_req(
    subject: &str,
    field: &str,
    envelope: &[u8],
    ctx: &[(&str, &str)],
) -> pb::UnsealRequest {
    pb::UnsealRequest {
        keyspace: "orders".into(),
        subject: subject.into(),
        field: field.into(),
        envelope: envelope.to_vec(),
        context: ctx
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        encoding: 0,
        return_plaintext: false,
    }
}

async fn public_keys(k: &mut KeysClient<Channel>, purpose: pb::KeyPurpose) -> Vec<pb::PublicKey> {
    k.get_public_key(pb::GetPublicKeyRequest {
        purpose: purpose as i32,
    })
    .await
    .expect("GetPublicKey")
    .into_inner()
    .keys
}

/// Unseals and decrypts the result: the value that was sealed.
async fn unseal_and_decrypt(
    c: &mut CryptoClient<Channel>,
    subject: &str,
    envelope: &[u8],
    ctx: &[(&str, &str)],
) -> Vec<u8> {
    let ct = c
        .unseal(unseal_req(subject, "email", envelope, ctx))
        .await
        .expect("Unseal")
        .into_inner()
        .ciphertext;
    assert!(ct.starts_with(&[1]), "a piiguard ciphertext");
    let mut d = dec("email", &ct);
    d.context = ctx
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    c.decrypt(d).await.expect("Decrypt").into_inner().plaintext
}

/// The refusal of a call whose answer type has no Debug (it may carry plaintext).
fn refused<T>(r: Result<tonic::Response<T>, tonic::Status>, what: &str) -> tonic::Status {
    match r {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => e,
    }
}

fn run_with_stdin(cmd: &mut Command, stdin: &[u8]) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The Python interpreter with `cryptography`: `$PIIGUARD_PYTHON`, else the repository's
/// `.venv/bin/python`. `None` (skip) only outside CI; under `CI=true` a missing one fails.
fn python() -> Option<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = std::env::var_os("PIIGUARD_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join(".venv/bin/python"));
    let ok = Command::new(&py)
        .args(["-c", "import cryptography"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(py);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} with the `cryptography` package is needed (pip install -r examples/python/requirements.txt)",
        py.display()
    );
    eprintln!(
        "SKIPPED the Python producer: no {} with `cryptography`",
        py.display()
    );
    None
}

/// Waits (bounded) for an audit record of `method` from the server.
async fn audit_record(server: &Server, method: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(r) = server
            .audit_records()
            .into_iter()
            .find(|r| r["method"] == method)
        {
            return r;
        }
        assert!(Instant::now() < deadline, "no {method} audit record");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_envelopes_from_three_producers_open_and_every_bad_one_is_refused() {
    let env = TestEnv::start().await;
    env.write_policy(SHIPPING_ENCRYPTS_EMAIL);
    let mut server = env
        .server_env(
            "a",
            "",
            vec![("PIIGUARD_AUDIT__CHECKPOINT_SECS".into(), "1".into())],
        )
        .await;
    let mut c = env.client(&server, "orders").await;
    let mut keys = KeysClient::new(env.channel(&server, "orders").await);
    let mut admin_keys = KeysClient::new(env.channel(&server, "admin").await);

    // The published sealing key: one version, current, fingerprint = SHA-256 of the DER SPKI.
    let pks = public_keys(&mut keys, pb::KeyPurpose::Sealing).await;
    assert_eq!(pks.len(), 1);
    let pk = &pks[0];
    assert_eq!(
        (pk.version, pk.current, pk.key_name.as_str()),
        (1, true, "piiguard-sealing")
    );
    let der = x509_parser::pem::parse_x509_pem(pk.public_key_pem.as_bytes())
        .unwrap()
        .1
        .contents;
    assert_eq!(
        pk.fingerprint_sha256,
        hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der))
    );
    assert!(!pk.created_at.is_empty());
    let pem_v1 = env.dir.path().join("sealing-v1.pem");
    std::fs::write(&pem_v1, &pk.public_key_pem).unwrap();
    let key_v1 = piiguard::cli::seal::public_key_from_pem(&pk.public_key_pem).unwrap();
    let signing = public_keys(&mut keys, pb::KeyPurpose::Signing).await;
    assert_eq!(signing.len(), 1);
    assert_ne!(signing[0].public_key_pem, pk.public_key_pem);

    // Producer 1: `piiguard seal` (hybrid, text form, with context).
    let value = "Zoë Ünal <zoe@example.com>".as_bytes();
    let ctx = [("order_id", "o-77"), ("channel", "web")];
    let text = run_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_piiguard")).args([
            "seal",
            "--public-key",
            pem_v1.to_str().unwrap(),
            "--key-version",
            "1",
            "--keyspace",
            "orders",
            "--field",
            "email",
            "--context",
            "order_id=o-77",
            "--context",
            "channel=web",
        ]),
        value,
    );
    assert!(
        text.starts_with("ps1.AQE"),
        "text form of a v1 hybrid envelope: {text}"
    );
    assert_eq!(
        unseal_and_decrypt(&mut c, "cust-seal-1", text.as_bytes(), &ctx).await,
        value
    );

    // Producer 2: examples/python/seal.py with `cryptography` (hybrid and direct).
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(py) = python() {
        for direct in [false, true] {
            let mut cmd = Command::new(&py);
            cmd.arg(manifest.join("examples/python/seal.py")).args([
                "--public-key",
                pem_v1.to_str().unwrap(),
                "--key-version",
                "1",
                "--keyspace",
                "orders",
                "--field",
                "email",
                "--context",
                "order_id=o-77",
                "--context",
                "channel=web",
            ]);
            if direct {
                cmd.arg("--direct");
            }
            let text = run_with_stdin(&mut cmd, value);
            assert_eq!(
                unseal_and_decrypt(&mut c, "cust-seal-2", text.as_bytes(), &ctx).await,
                value
            );
        }
    }

    // Producer 3: examples/openssl/seal.sh (direct kind; context sorted by key).
    let text = run_with_stdin(
        Command::new("sh")
            .arg(manifest.join("examples/openssl/seal.sh"))
            .args([
                pem_v1.to_str().unwrap(),
                "1",
                "orders",
                "email",
                "channel=web",
                "order_id=o-77",
            ]),
        value,
    );
    assert!(
        text.starts_with("ps1.AQI"),
        "text form of a v1 direct envelope: {text}"
    );
    assert_eq!(
        unseal_and_decrypt(&mut c, "cust-seal-3", text.as_bytes(), &ctx).await,
        value
    );

    // Refusals. Each goes to a fresh subject: nothing may be stored for any of them.
    let deks_before = env.list_key_ids("orders").await.len();
    let seal = |kind, field: &str, v: &[u8]| {
        piiguard::cli::seal::seal_value(&key_v1, 1, kind, "orders", field, &BTreeMap::new(), v)
            .unwrap()
    };
    let good = seal(Kind::Hybrid, "email", b"refusal@example.com");
    let good_direct = seal(Kind::Direct, "email", b"refusal@example.com");
    let flip = |env: &[u8], i: usize| {
        let mut b = env.to_vec();
        b[i] ^= 0x01;
        b
    };
    let n = good.len();
    let other_key = piiguard::cli::seal::public_key_from_pem(&signing[0].public_key_pem).unwrap();
    let to_other_key = piiguard::cli::seal::seal_value(
        &other_key,
        1,
        Kind::Hybrid,
        "orders",
        "email",
        &BTreeMap::new(),
        b"x",
    )
    .unwrap();
    let oversized = seal(Kind::Hybrid, "email", &vec![b'a'; 64 * 1024 + 1]);
    let mut high_version = good.clone();
    high_version[2] ^= 0x80;
    let cases: Vec<(&str, pb::UnsealRequest, &str)> = vec![
        (
            "truncated header",
            unseal_req("r-1", "email", &good[..4], &[]),
            "MALFORMED_ENVELOPE",
        ),
        (
            "truncated tag",
            unseal_req("r-2", "email", &good[..HEADER_LEN + RSA_LEN + 20], &[]),
            "MALFORMED_ENVELOPE",
        ),
        (
            "one byte short",
            unseal_req("r-3", "email", &good[..n - 1], &[]),
            "DECRYPTION_FAILED",
        ),
        (
            "direct one byte short",
            unseal_req("r-4", "email", &good_direct[..good_direct.len() - 1], &[]),
            "MALFORMED_ENVELOPE",
        ),
        (
            "version bit",
            unseal_req("r-5", "email", &flip(&good, 0), &[]),
            "MALFORMED_ENVELOPE",
        ),
        (
            "kind bit",
            unseal_req("r-6", "email", &flip(&good, 1), &[]),
            "MALFORMED_ENVELOPE",
        ),
        (
            "key version bit (no such version)",
            unseal_req("r-7", "email", &high_version, &[]),
            "UNKNOWN_SEALING_KEY_VERSION",
        ),
        (
            "RSA part bit",
            unseal_req("r-8", "email", &flip(&good, HEADER_LEN + 100), &[]),
            "DECRYPTION_FAILED",
        ),
        (
            "direct RSA part bit",
            unseal_req("r-9", "email", &flip(&good_direct, HEADER_LEN + 7), &[]),
            "DECRYPTION_FAILED",
        ),
        (
            "nonce bit",
            unseal_req("r-10", "email", &flip(&good, HEADER_LEN + RSA_LEN + 3), &[]),
            "DECRYPTION_FAILED",
        ),
        (
            "body bit",
            unseal_req(
                "r-11",
                "email",
                &flip(&good, HEADER_LEN + RSA_LEN + 12),
                &[],
            ),
            "DECRYPTION_FAILED",
        ),
        (
            "tag bit",
            unseal_req("r-12", "email", &flip(&good, n - 1), &[]),
            "DECRYPTION_FAILED",
        ),
        (
            "other field",
            unseal_req("r-13", "name", &good, &[]),
            "DECRYPTION_FAILED",
        ),
        (
            "other field (direct)",
            unseal_req("r-14", "name", &good_direct, &[]),
            "DECRYPTION_FAILED",
        ),
        (
            "other context",
            unseal_req("r-15", "email", &good, &[("order_id", "o-1")]),
            "DECRYPTION_FAILED",
        ),
        (
            "other RSA key",
            unseal_req("r-16", "email", &to_other_key, &[]),
            "DECRYPTION_FAILED",
        ),
        (
            "oversized",
            unseal_req("r-17", "email", &oversized, &[]),
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "garbage",
            unseal_req("r-18", "email", b"not an envelope at all", &[]),
            "MALFORMED_ENVELOPE",
        ),
        (
            "bad text form",
            unseal_req("r-19", "email", b"ps1.***", &[]),
            "MALFORMED_ENVELOPE",
        ),
        (
            "empty",
            unseal_req("r-20", "email", b"", &[]),
            "MALFORMED_ENVELOPE",
        ),
    ];
    // Every DECRYPTION_FAILED carries the same message: which part of a forged envelope did not
    // open (the RSA part, or the AES-GCM part under another keyspace, field or context) is not
    // told (there were two messages).
    let mut failed_messages = std::collections::BTreeSet::new();
    for (what, req, want) in cases {
        let e = refused(c.unseal(req).await, what);
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::InvalidArgument, want),
            "{what}: {}",
            e.message()
        );
        if want == "DECRYPTION_FAILED" {
            failed_messages.insert(e.message().to_string());
        }
    }
    assert_eq!(failed_messages.len(), 1, "{failed_messages:?}");
    // Other keyspace (crm): same refusal.
    let mut r = unseal_req("r-21", "email", &good, &[]);
    r.keyspace = "crm".into();
    let e = refused(c.unseal(r).await, "unseal");
    assert_eq!(reason(&e), "DECRYPTION_FAILED");
    assert_eq!(
        env.list_key_ids("orders").await.len(),
        deks_before,
        "a refused envelope stored a DEK"
    );
    assert!(
        env.list_key_ids("crm").await.is_empty(),
        "a refused envelope stored a DEK"
    );

    // UnsealBatch: good and bad items mixed, one result each, in order.
    let items = vec![
        unseal_req("cust-b1", "email", &good, &[]),
        unseal_req("cust-b2", "email", &flip(&good, n - 1), &[]),
        unseal_req(
            "cust-b3",
            "email",
            &sealed::to_text(&good_direct).into_bytes(),
            &[],
        ),
        unseal_req("cust-b4", "email", b"garbage", &[]),
        unseal_req("cust-b5", "email", &high_version, &[]),
    ];
    let results = c
        .unseal_batch(pb::UnsealBatchRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 5);
    let outcome = |r: &pb::UnsealResult| match r.result.as_ref().unwrap() {
        pb::unseal_result::Result::Value(v) => Ok(v.ciphertext.clone()),
        pb::unseal_result::Result::Error(e) => Err(e.reason.clone()),
    };
    for (i, want) in [
        (1, "DECRYPTION_FAILED"),
        (3, "MALFORMED_ENVELOPE"),
        (4, "UNKNOWN_SEALING_KEY_VERSION"),
    ] {
        assert_eq!(outcome(&results[i]), Err(want.to_string()), "item {i}");
    }
    for i in [0, 2] {
        let ct = outcome(&results[i]).unwrap();
        let pt = c
            .decrypt(dec("email", &ct))
            .await
            .unwrap()
            .into_inner()
            .plaintext;
        assert_eq!(pt, b"refusal@example.com");
    }

    // return_plaintext: with the decrypt grant the value comes back; without it, denied.
    let mut r = unseal_req("cust-p", "email", &good, &[]);
    r.return_plaintext = true;
    let out = c.unseal(r.clone()).await.unwrap().into_inner();
    assert_eq!(
        (out.plaintext.as_slice(), out.ciphertext.len()),
        (b"refusal@example.com".as_slice(), 0)
    );
    let mut shipping = env.client(&server, "shipping").await;
    let e = refused(shipping.unseal(r.clone()).await, "unseal");
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::PermissionDenied, "POLICY_DENIED")
    );
    // The same as a batch item: the plaintext comes back, and the audit record says that the
    // call revealed (it said "encrypt" for an UnsealBatch that returned plaintexts).
    let batch = c
        .unseal_batch(pb::UnsealBatchRequest {
            items: vec![r.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    match &batch.results[0].result {
        Some(pb::unseal_result::Result::Value(v)) => {
            assert_eq!(v.plaintext, b"refusal@example.com");
        }
        _ => panic!("the item did not open"),
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let batches = loop {
        let b: Vec<_> = server
            .audit_records()
            .into_iter()
            .filter(|r| r["method"] == "UnsealBatch")
            .collect();
        if b.len() >= 2 || Instant::now() > deadline {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The first batch above returned ciphertexts only.
    let ops: Vec<&str> = batches
        .iter()
        .map(|r| r["operation"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["encrypt", "decrypt"], "{batches:?}");
    r.return_plaintext = false;
    shipping
        .unseal(r)
        .await
        .expect("encrypt grant suffices without return_plaintext");

    // The audit record of an Unseal names the call, never the value or the subject.
    let rec = audit_record(&server, "Unseal").await;
    let line = rec.to_string();
    for secret in [
        "refusal@example.com",
        "zoe@example.com",
        "cust-seal-1",
        "cust-p",
    ] {
        assert!(
            !line.contains(secret),
            "audit record carries {secret:?}: {line}"
        );
    }
    assert_eq!(rec["outcome"], "ok", "{line}");
    assert!(
        line.contains("orders") && line.contains("email"),
        "scope recorded: {line}"
    );

    // Rotation of the sealing key: admin only; the old version keeps opening until retired.
    let e = keys
        .rotate_public_key(pb::RotatePublicKeyRequest {
            purpose: pb::KeyPurpose::Sealing as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let v2 = admin_keys
        .rotate_public_key(pb::RotatePublicKeyRequest {
            purpose: pb::KeyPurpose::Sealing as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .new_version;
    assert_eq!(v2, 2);
    let pks = public_keys(&mut keys, pb::KeyPurpose::Sealing).await;
    assert_eq!(
        pks.iter()
            .map(|k| (k.version, k.current))
            .collect::<Vec<_>>(),
        [(2, true), (1, false)]
    );
    let key_v2 = piiguard::cli::seal::public_key_from_pem(&pks[0].public_key_pem).unwrap();
    let sealed_v2 = piiguard::cli::seal::seal_value(
        &key_v2,
        2,
        Kind::Hybrid,
        "orders",
        "email",
        &BTreeMap::new(),
        b"v2",
    )
    .unwrap();
    assert_eq!(
        unseal_and_decrypt(&mut c, "cust-r", &sealed_v2, &[]).await,
        b"v2"
    );
    assert_eq!(
        unseal_and_decrypt(&mut c, "cust-r", &good, &[]).await,
        b"refusal@example.com"
    );
    // Sealed to v1's key but labelled v2: Vault's v2 private key does not open it.
    let mut mislabelled = good.clone();
    mislabelled[5] = 2;
    let e = refused(
        c.unseal(unseal_req("cust-r", "email", &mislabelled, &[]))
            .await,
        "unseal",
    );
    assert_eq!(reason(&e), "DECRYPTION_FAILED");

    let e = admin_keys
        .retire_public_key_versions(pb::RetirePublicKeyVersionsRequest {
            purpose: pb::KeyPurpose::Sealing as i32,
            min_version: 3,
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::InvalidArgument,
        "cannot retire the current version"
    );
    admin_keys
        .retire_public_key_versions(pb::RetirePublicKeyVersionsRequest {
            purpose: pb::KeyPurpose::Sealing as i32,
            min_version: 2,
        })
        .await
        .unwrap();
    let e = refused(
        c.unseal(unseal_req("cust-r", "email", &good, &[])).await,
        "unseal",
    );
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "UNKNOWN_SEALING_KEY_VERSION")
    );
    let pks = public_keys(&mut keys, pb::KeyPurpose::Sealing).await;
    assert_eq!(
        pks.iter().map(|k| k.version).collect::<Vec<_>>(),
        [2],
        "retired versions are not published"
    );
    assert_eq!(
        unseal_and_decrypt(&mut c, "cust-r", &sealed_v2, &[]).await,
        b"v2"
    );
    let e = keys
        .get_public_key(pb::GetPublicKeyRequest { purpose: 0 })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::InvalidArgument, "INVALID_REQUEST")
    );

    sealing_key_missing_until_bootstrap_runs_again(&env, &mut c, &mut keys, &sealed_v2).await;
    signing_rotation_keeps_old_certificates_and_checkpoints_verifiable(&env, &mut server).await;
}

/// A deployment bootstrapped before the sealing key existed (simulated: an operator deletes it
/// with the root token): the server keeps serving, the sealing calls answer
/// KEY_NOT_PROVISIONED, and running bootstrap again adds the key.
async fn sealing_key_missing_until_bootstrap_runs_again(
    env: &TestEnv,
    c: &mut CryptoClient<Channel>,
    keys: &mut KeysClient<Channel>,
    envelope: &[u8],
) {
    let admin = env.bao.client().unwrap();
    let root = Some(env.bao.root_token());
    let path = "piiguard-transit/keys/piiguard-sealing";
    let body = serde_json::json!({"deletion_allowed": true});
    let (st, _) = admin
        .raw(
            reqwest::Method::POST,
            &format!("{path}/config"),
            Some(&body),
            root,
        )
        .await
        .unwrap();
    assert!(st.is_success());
    let (st, _) = admin
        .raw(reqwest::Method::DELETE, path, None, root)
        .await
        .unwrap();
    assert!(st.is_success(), "delete {st}");

    let e = keys
        .get_public_key(pb::GetPublicKeyRequest {
            purpose: pb::KeyPurpose::Sealing as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "KEY_NOT_PROVISIONED"),
        "{}",
        e.message()
    );
    assert!(e.message().contains("bootstrap"), "{}", e.message());
    let e = refused(
        c.unseal(unseal_req("cust-m", "email", envelope, &[])).await,
        "no key",
    );
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "KEY_NOT_PROVISIONED"),
        "{}",
        e.message()
    );
    // Everything else keeps working.
    let ct = c
        .encrypt(enc("orders", "cust-m", "email", b"m"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    assert_eq!(
        c.decrypt(dec("email", &ct))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        b"m"
    );

    let cfg = piiguard::config::parse(&env.config_toml(""), Vec::new()).unwrap();
    piiguard::setup::bootstrap::bootstrap(&admin, env.bao.root_token(), &cfg)
        .await
        .expect("bootstrap again");
    let pks = public_keys(keys, pb::KeyPurpose::Sealing).await;
    assert_eq!(
        pks.iter()
            .map(|k| (k.version, k.current))
            .collect::<Vec<_>>(),
        [(1, true)]
    );
    // The new key is another key: the old envelope does not open.
    let e = refused(
        c.unseal(unseal_req("cust-m", "email", envelope, &[])).await,
        "new key",
    );
    assert_eq!(reason(&e), "UNKNOWN_SEALING_KEY_VERSION");
}

fn shred_req(subject: &str, request_id: &str) -> pb::ShredRequest {
    pb::ShredRequest {
        subject: subject.into(),
        keyspace: "orders".into(),
        reason: "GDPR art. 17".into(),
        request_id: request_id.into(),
    }
}

/// Encrypts a value for `subject`, shreds it: the certificate of destruction (JSON).
async fn certificate(env: &TestEnv, server: &Server, subject: &str, request_id: &str) -> String {
    let mut c = env.client(server, "orders").await;
    c.encrypt(enc("orders", subject, "email", b"cert@example.com"))
        .await
        .unwrap();
    let mut e = env.erasure(server).await;
    let r = e
        .shred(shred_req(subject, request_id))
        .await
        .unwrap()
        .into_inner();
    r.keyspaces[0].certificate.clone()
}

/// Waits (bounded) for a checkpoint signed with signing key version `v`.
async fn checkpoint_with_version(server: &Server, v: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server
        .audit_records()
        .iter()
        .any(|r| r["kind"] == "checkpoint" && r["key_version"].as_u64() == Some(v))
    {
        assert!(
            Instant::now() < deadline,
            "no checkpoint signed with version {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A signing-key rotation: certificates and checkpoints signed before it still verify (with
/// openssl, `piiguard certificate verify` and `piiguard audit verify`) with the old version's
/// published key; new ones use the new version.
async fn signing_rotation_keeps_old_certificates_and_checkpoints_verifiable(
    env: &TestEnv,
    server: &mut Server,
) {
    use piiguard::ops::erasure::certificate::Certificate;
    let old = certificate(env, server, "cust-cert-1", "req-c1").await;
    assert_eq!(Certificate::parse(&old).unwrap().signature.key_version, 1);
    checkpoint_with_version(server, 1).await;

    let mut admin_keys = KeysClient::new(env.channel(server, "admin").await);
    let v2 = admin_keys
        .rotate_public_key(pb::RotatePublicKeyRequest {
            purpose: pb::KeyPurpose::Signing as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .new_version;
    assert_eq!(v2, 2);
    let new = certificate(env, server, "cust-cert-2", "req-c2").await;
    assert_eq!(Certificate::parse(&new).unwrap().signature.key_version, 2);
    checkpoint_with_version(server, 2).await;

    // Both versions published (CLI over mTLS), newest first.
    let (cert, key) = env.pki.client("admin");
    let out = Command::new(env!("CARGO_BIN_EXE_piiguard"))
        .args(["keys", "--address", &server.addr.to_string()])
        .arg("--ca")
        .arg(&env.pki.ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["public-key", "--purpose", "signing"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(
        listing.contains("piiguard-signing version 2 (current)"),
        "{listing}"
    );
    assert!(
        listing.contains("piiguard-signing version 1 sha256:"),
        "{listing}"
    );
    let d = env.dir.path();
    let all_keys = d.join("signing-all.pem");
    std::fs::write(&all_keys, &listing).unwrap();
    let mut keys = KeysClient::new(env.channel(server, "orders").await);
    let pks = public_keys(&mut keys, pb::KeyPurpose::Signing).await;
    for k in &pks {
        std::fs::write(
            d.join(format!("signing-v{}.pem", k.version)),
            &k.public_key_pem,
        )
        .unwrap();
    }

    // The old certificate: openssl with the v1 key verifies it, the v2 key does not; the CLI
    // verifies each certificate with its own version's key.
    for (json, v) in [(&old, 1), (&new, 2)] {
        let c = Certificate::parse(json).unwrap();
        std::fs::write(d.join(format!("payload-{v}.json")), &c.payload).unwrap();
        std::fs::write(d.join(format!("sig-{v}.bin")), c.signature_bytes().unwrap()).unwrap();
        std::fs::write(d.join(format!("cert-{v}.json")), json).unwrap();
    }
    let openssl = |cert_v: u32, key_v: u32| {
        Command::new("openssl")
            .args(["dgst", "-sha256", "-sigopt", "rsa_padding_mode:pss"])
            .args(["-sigopt", "rsa_pss_saltlen:auto", "-verify"])
            .arg(d.join(format!("signing-v{key_v}.pem")))
            .arg("-signature")
            .arg(d.join(format!("sig-{cert_v}.bin")))
            .arg(d.join(format!("payload-{cert_v}.json")))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        openssl(1, 1),
        "a certificate signed before the rotation verifies with openssl"
    );
    assert!(!openssl(1, 2));
    assert!(openssl(2, 2));
    let cli = |cert_v: u32, key_v: u32| {
        Command::new(env!("CARGO_BIN_EXE_piiguard"))
            .args(["certificate", "verify"])
            .arg(d.join(format!("cert-{cert_v}.json")))
            .arg("--public-key")
            .arg(d.join(format!("signing-v{key_v}.pem")))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(cli(1, 1) && cli(2, 2) && !cli(1, 2));

    // The whole audit log, checkpoints of both versions, verifies with the published keys.
    server.stop();
    let out = Command::new(env!("CARGO_BIN_EXE_piiguard"))
        .args(["audit", "verify"])
        .arg(env.audit_dir("a"))
        .arg("--public-key")
        .arg(&all_keys)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    let verified: u32 = summary
        .split(" checkpoint signature(s) verified")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(verified >= 2 && summary.contains(": OK"), "{summary}");
    // With only the new key, the checkpoints signed before the rotation do not verify.
    let out = Command::new(env!("CARGO_BIN_EXE_piiguard"))
        .args(["audit", "verify"])
        .arg(env.audit_dir("a"))
        .arg("--public-key")
        .arg(d.join("signing-v2.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}
