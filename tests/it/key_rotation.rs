//! Subject key rotation, Rewrap and durable DEK usage limits (docs/KEYS.md): real OpenBao,
//! real store, real mTLS, the real binary.

use crate::common::*;
use piiguard::crypto::envelope;
use piiguard::ops::erasure::certificate::Certificate;
use piiguard::pb;
use piiguard::pb::crypto_client::CryptoClient;
use piiguard::pb::keys_client::KeysClient;
use tonic::Code;
use tonic::transport::Channel;

/// A key administrator (`keys` on orders) and a migration job (`rewrap` only).
const GRANTS: &str = r#"
[[grant]]
identity = "spiffe://shop.local/keyadmin"
operations = ["keys"]
keyspaces = ["orders"]

[[grant]]
identity = "spiffe://shop.local/migrator"
operations = ["rewrap"]
keyspaces = ["orders"]
fields = ["email"]
"#;

/// (key id, DEK version) a ciphertext names.
fn key_of(ct: &[u8]) -> ([u8; 16], u32) {
    let mut s = Vec::new();
    let p = envelope::parse(ct, &mut s).unwrap();
    (p.header.key_id.0, p.header.dek_version)
}

async fn issued_channel(env: &TestEnv, server: &Server, name: &str) -> Channel {
    let id = env.ca().issue_client_now(&spiffe(name)).unwrap();
    server
        .channel(Some((&id.cert_pem, &id.key_pem)))
        .await
        .unwrap()
}

async fn encrypt(c: &mut CryptoClient<Channel>, subject: &str, pt: &[u8], text: bool) -> Vec<u8> {
    let mut r = enc("orders", subject, "email", pt);
    if text {
        r.encoding = pb::CiphertextEncoding::Text as i32;
    }
    c.encrypt(r).await.unwrap().into_inner().ciphertext
}

async fn decrypt(c: &mut CryptoClient<Channel>, ct: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    c.decrypt(dec("email", ct))
        .await
        .map(|r| r.into_inner().plaintext)
}

fn rewrap_req(ct: &[u8], field: &str) -> pb::RewrapRequest {
    pb::RewrapRequest {
        field: field.into(),
        ciphertext: ct.to_vec(),
        context: Default::default(),
        keyspace: String::new(),
        encoding: 0,
    }
}

fn rotate_req(subject: &str) -> pb::RotateSubjectKeyRequest {
    pb::RotateSubjectKeyRequest {
        keyspace: "orders".into(),
        subject: subject.into(),
    }
}

fn assert_reason(e: &tonic::Status, code: Code, r: &str) {
    assert_eq!((e.code(), reason(e).as_str()), (code, r), "{e:?}");
}

/// One server: rotate, decrypt both versions, rewrap (single, batch, encodings, refusals),
/// authorisation of `keys` and `rewrap`, then a shred that destroys and certifies every
/// version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_rewrap_and_shred_of_every_version() {
    let env = TestEnv::start().await;
    env.write_policy(GRANTS);
    let server = env.server("s", "").await;
    let mut orders = env.client(&server, "orders").await;
    let mut keys = KeysClient::new(issued_channel(&env, &server, "keyadmin").await);
    let mut migrator = CryptoClient::new(issued_channel(&env, &server, "migrator").await);

    let s = "cust-rot-1";
    let ct1 = encrypt(&mut orders, s, b"v1@example.com", false).await;
    let ct1_text = encrypt(&mut orders, s, b"v1-text@example.com", true).await;
    let (kid, v1) = key_of(&ct1);
    assert_eq!(v1, 1);

    // Rotation needs `keys`: the order service has no such grant.
    let mut not_admin = KeysClient::new(env.channel(&server, "orders").await);
    let e = not_admin
        .rotate_subject_key(rotate_req(s))
        .await
        .unwrap_err();
    assert_reason(&e, Code::PermissionDenied, "POLICY_DENIED");
    // An unknown subject has nothing to rotate (and gets no key).
    let e = keys
        .rotate_subject_key(rotate_req("cust-never-seen"))
        .await
        .unwrap_err();
    assert_reason(&e, Code::NotFound, "UNKNOWN_SUBJECT");
    assert_eq!(env.list_key_ids("orders").await.len(), 1);

    let r = keys
        .rotate_subject_key(rotate_req(s))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.dek_version, 2);
    assert_eq!(r.key_id, hex::encode(kid));

    // New encryptions use version 2 at once; both versions decrypt.
    let ct2 = encrypt(&mut orders, s, b"v2@example.com", false).await;
    assert_eq!(key_of(&ct2), (kid, 2));
    assert_eq!(decrypt(&mut orders, &ct1).await.unwrap(), b"v1@example.com");
    assert_eq!(decrypt(&mut orders, &ct2).await.unwrap(), b"v2@example.com");
    assert_eq!(
        decrypt(&mut orders, &ct1_text).await.unwrap(),
        b"v1-text@example.com"
    );

    // Rewrap moves the old ciphertext to version 2 without showing the plaintext.
    let rw = migrator
        .rewrap(rewrap_req(&ct1, "email"))
        .await
        .unwrap()
        .into_inner();
    assert!(rw.changed);
    assert_eq!(key_of(&rw.ciphertext), (kid, 2));
    assert!(!rw.ciphertext.starts_with(b"pg1."), "binary stays binary");
    assert_eq!(
        decrypt(&mut orders, &rw.ciphertext).await.unwrap(),
        b"v1@example.com"
    );
    // A text ciphertext stays text.
    let rwt = migrator
        .rewrap(rewrap_req(&ct1_text, "email"))
        .await
        .unwrap()
        .into_inner();
    assert!(rwt.changed && rwt.ciphertext.starts_with(b"pg1."));
    assert_eq!(key_of(&rwt.ciphertext), (kid, 2));
    // Already current: unchanged, the same bytes.
    let same = migrator
        .rewrap(rewrap_req(&ct2, "email"))
        .await
        .unwrap()
        .into_inner();
    assert!(!same.changed);
    assert_eq!(same.ciphertext, ct2);
    // Refused like Decrypt: a field not granted, a context that does not authenticate, garbage.
    let e = migrator
        .rewrap(rewrap_req(&ct1, "address"))
        .await
        .unwrap_err();
    assert_reason(&e, Code::PermissionDenied, "POLICY_DENIED");
    let mut wrong_context = rewrap_req(&ct1, "email");
    wrong_context
        .context
        .insert("tenant".into(), "other".into());
    let e = migrator.rewrap(wrong_context).await.unwrap_err();
    assert_reason(&e, Code::InvalidArgument, "DECRYPTION_FAILED");
    let e = migrator
        .rewrap(rewrap_req(b"pg1.!!!", "email"))
        .await
        .unwrap_err();
    assert_reason(&e, Code::InvalidArgument, "MALFORMED_CIPHERTEXT");
    // `rewrap` does not imply `decrypt`; and the order service may not rewrap.
    let e = decrypt(&mut migrator, &ct1).await.unwrap_err();
    assert_reason(&e, Code::PermissionDenied, "POLICY_DENIED");
    let e = orders.rewrap(rewrap_req(&ct1, "email")).await.unwrap_err();
    assert_reason(&e, Code::PermissionDenied, "POLICY_DENIED");

    // Batch with mixed items: old, current, malformed.
    let b = migrator
        .rewrap_batch(pb::RewrapBatchRequest {
            items: vec![
                rewrap_req(&ct1, "email"),
                rewrap_req(&ct2, "email"),
                rewrap_req(b"pg1.!!!", "email"),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.results.len(), 3);
    match &b.results[0].result {
        Some(pb::rewrap_result::Result::Value(v)) => {
            assert!(v.changed);
            assert_eq!(key_of(&v.ciphertext), (kid, 2));
            assert_eq!(
                decrypt(&mut orders, &v.ciphertext).await.unwrap(),
                b"v1@example.com"
            );
        }
        other => panic!("item 0: {other:?}"),
    }
    match &b.results[1].result {
        Some(pb::rewrap_result::Result::Value(v)) => {
            assert!(!v.changed);
            assert_eq!(v.ciphertext, ct2);
        }
        other => panic!("item 1: {other:?}"),
    }
    match &b.results[2].result {
        Some(pb::rewrap_result::Result::Error(e)) => {
            assert_eq!(e.reason, "MALFORMED_CIPHERTEXT")
        }
        other => panic!("item 2: {other:?}"),
    }

    // The audit names the subject by reference only.
    let audit = server.audit_records();
    let rot = audit
        .iter()
        .find(|r| r["method"] == "RotateSubjectKey" && r["outcome"] == "ok")
        .expect("an audit record of the rotation");
    assert!(!rot.to_string().contains(s), "raw subject id in the audit");

    // `piiguard keys rotate-subject` (client side, mTLS) makes version 3.
    let id = env.ca().issue_client_now(&spiffe("keyadmin")).unwrap();
    let (cert, key) = (env.dir.path().join("ka.pem"), env.dir.path().join("ka.key"));
    std::fs::write(&cert, &id.cert_pem).unwrap();
    std::fs::write(&key, &id.key_pem).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_piiguard"))
        .current_dir(env.dir.path())
        .args(["keys", "--endpoint", &server.addr.to_string(), "--ca"])
        .arg(&env.pki.ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["rotate-subject", "--keyspace", "orders", "--subject", s])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("DEK version 3") && !out.contains(s), "{out}");
    let ct3 = encrypt(&mut orders, s, b"v3@example.com", false).await;
    assert_eq!(key_of(&ct3), (kid, 3));

    // A shred after the rotations destroys every version, and the certificate names them.
    let mut er = env.erasure(&server).await;
    let sh = er
        .shred(pb::ShredRequest {
            subject: s.into(),
            keyspace: "orders".into(),
            reason: "test".into(),
            request_id: "rot-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let pem = er
        .get_verification_keys(pb::GetVerificationKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .last()
        .unwrap()
        .public_key_pem
        .clone();
    let cert = Certificate::parse(&sh.keyspaces[0].certificate).unwrap();
    let p = cert.verify(&pem).expect("the certificate verifies");
    let mut named: Vec<(String, u32)> = p
        .destroyed_keys
        .iter()
        .map(|k| (k.key_id.clone(), k.dek_version))
        .collect();
    named.sort();
    assert_eq!(
        named,
        vec![
            (hex::encode(kid), 1),
            (hex::encode(kid), 2),
            (hex::encode(kid), 3)
        ]
    );
    for ct in [&ct1, &ct2, &ct3, &rw.ciphertext] {
        let e = decrypt(&mut orders, ct).await.unwrap_err();
        assert_reason(&e, Code::FailedPrecondition, "SUBJECT_SHREDDED");
    }
    let e = migrator
        .rewrap(rewrap_req(&ct1, "email"))
        .await
        .unwrap_err();
    assert_reason(&e, Code::FailedPrecondition, "SUBJECT_SHREDDED");
}

/// `orders` with a use limit of 50 encryptions per DEK version, reserved 10 at a time.
fn small_limit(cfg: String) -> String {
    cfg.replacen(
        "[keyspaces.orders]",
        "[keyspaces.orders]\nmax_dek_uses = 50\ndek_use_block = 10",
        1,
    )
}

/// Encryptions per DEK version of one subject, with every ciphertext decrypting on `check`.
async fn encrypt_n(
    c: &mut CryptoClient<Channel>,
    subject: &str,
    n: usize,
    out: &mut Vec<(Vec<u8>, Vec<u8>)>,
) {
    for i in 0..n {
        let pt = format!("{subject}-{}@example.com", out.len() + i).into_bytes();
        let ct = encrypt(c, subject, &pt, false).await;
        out.push((ct, pt));
    }
}

/// The durable use limit holds across two replicas on one PostgreSQL and across a restart:
/// no DEK version seals more than 50 values, each limit makes exactly one new version (no
/// gaps), and the ciphertexts of every version still decrypt on both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_use_limit_rotates_across_replicas_and_restarts() {
    let pg = Postgres::start();
    let env = TestEnv::start_with_store(Some(pg.url.clone())).await;
    let mut a = env.server_custom("a", "", Vec::new(), small_limit).await;
    let b = env.server_custom("b", "", Vec::new(), small_limit).await;
    let mut ca = env.client(&a, "orders").await;
    let mut cb = env.client(&b, "orders").await;
    let s = "cust-limit-1";
    let mut made = Vec::new();
    // Interleaved on both replicas: each holds its own blocks of the same count.
    for _ in 0..6 {
        encrypt_n(&mut ca, s, 7, &mut made).await;
        encrypt_n(&mut cb, s, 7, &mut made).await;
    }
    // A restart loses a's unused block (counted as used) and keeps the count.
    a.stop();
    a.start().await;
    let mut ca = env.client(&a, "orders").await;
    encrypt_n(&mut ca, s, 40, &mut made).await;
    encrypt_n(&mut cb, s, 20, &mut made).await;

    let mut per_version = std::collections::BTreeMap::<u32, usize>::new();
    let kid = key_of(&made[0].0).0;
    for (ct, pt) in &made {
        let (k, v) = key_of(ct);
        assert_eq!(k, kid, "one key id, several versions");
        *per_version.entry(v).or_default() += 1;
        assert_eq!(&decrypt(&mut ca, ct).await.unwrap(), pt);
        assert_eq!(&decrypt(&mut cb, ct).await.unwrap(), pt);
    }
    let versions: Vec<u32> = per_version.keys().copied().collect();
    let top = *versions.last().unwrap();
    assert_eq!(versions, (1..=top).collect::<Vec<_>>(), "{per_version:?}");
    assert!(
        top >= 3,
        "146 encryptions at 50 per version: {per_version:?}"
    );
    for (v, n) in &per_version {
        assert!(*n <= 50, "version {v} sealed {n} values: {per_version:?}");
    }
    // The store's count covers every sealed value.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&pg.url).await.unwrap();
    use sqlx::Row as _;
    let rows = sqlx::query("SELECT dek_version, reserved FROM dek_uses WHERE keyspace = 'orders'")
        .fetch_all(&pool)
        .await
        .unwrap();
    for r in rows {
        let v: i64 = r.get("dek_version");
        let reserved: i64 = r.get("reserved");
        let sealed = per_version.get(&(v as u32)).copied().unwrap_or(0) as i64;
        assert!(
            reserved >= sealed,
            "version {v}: {reserved} reserved, {sealed} sealed"
        );
    }
}
