//! The cold path (issue 15): a subject the registry does not know gets its DEK without a Vault
//! read first and with one Vault write (its subject record; the DEK record waits for the
//! first rotation), DEK wraps of concurrent new subjects go to transit together, and
//! EncryptBatch of many new subjects loads them together; still one DEK per subject across
//! processes, also when another replica created the subject meanwhile.

use std::collections::HashMap;

use crate::common::*;
use piiguard::crypto::envelope;
use piiguard::pb;
use piiguard::pb::crypto_client::CryptoClient;
use piiguard::pb::keys_client::KeysClient;
use tonic::transport::Channel;

fn key_id(ct: &[u8]) -> [u8; 16] {
    let mut s = Vec::new();
    envelope::parse(ct, &mut s).unwrap().header.key_id.0
}

/// No background Vault reads during the count: the KEK version poll (which lists and reads
/// records) and the canary refresh wait an hour.
const QUIET: &str = "\n[kek]\npoll_secs = 3600\n[canaries]\nrefresh_secs = 3600\n";

fn metrics_env() -> Vec<(String, String)> {
    vec![("PIIGUARD_METRICS__LISTEN".into(), ANY_PORT.into())]
}

/// Vault requests made so far by kind (`op`), from the server's `/metrics`.
async fn vault_requests(server: &Server) -> HashMap<String, f64> {
    let m = scrape(server.metrics_addr.expect("metrics listener")).await;
    by_label(&m, "piiguard_vault_request_duration_seconds_count", "op")
}

/// [`vault_requests`] once the start-up's background work (KEK version check, canary
/// registry) is over: two scrapes half a second apart agree.
async fn settled_requests(server: &Server) -> HashMap<String, f64> {
    let mut last = vault_requests(server).await;
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let now = vault_requests(server).await;
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("Vault requests never settled: {last:?}");
}

fn delta(after: &HashMap<String, f64>, before: &HashMap<String, f64>, op: &str) -> f64 {
    after.get(op).copied().unwrap_or(0.0) - before.get(op).copied().unwrap_or(0.0)
}

async fn encrypt_batch(
    c: &mut CryptoClient<Channel>,
    items: Vec<pb::EncryptRequest>,
) -> Vec<Vec<u8>> {
    c.encrypt_batch(pb::EncryptBatchRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results
        .into_iter()
        .enumerate()
        .map(|(i, r)| match r.result {
            Some(pb::encrypt_result::Result::Ciphertext(ct)) => ct,
            other => panic!("batch item {i}: {other:?}"),
        })
        .collect()
}

/// A new subject costs a transit wrap and one check-and-set write (its subject record), no KV
/// read: the registry already says the subject is new. (Before: a KV read of the subject record
/// first, and a DEK record written too.) A known subject whose key left the cache is still read
/// from Vault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subject_is_created_without_reading_vault_first() {
    let env = TestEnv::start().await;
    let server = env.server_env("a", QUIET, metrics_env()).await;
    let mut c = env.client(&server, "orders").await;
    let before = settled_requests(&server).await;
    for i in 0..3 {
        c.encrypt(enc(
            "orders",
            &format!("new-{i}"),
            "email",
            b"n@example.com",
        ))
        .await
        .unwrap();
    }
    let after = vault_requests(&server).await;
    assert_eq!(delta(&after, &before, "kv_read"), 0.0, "{after:?}");
    assert_eq!(delta(&after, &before, "kv_write"), 3.0, "{after:?}");
    assert!(env.list_dek_records("orders").await.is_empty());
    let wraps =
        delta(&after, &before, "transit_encrypt") + delta(&after, &before, "transit_encrypt_batch");
    assert_eq!(wraps, 3.0, "one at a time: each wrap goes alone: {after:?}");

    // Another process (same registry, cold cache) reads the record: the subject is known.
    let other = env.server_env("b", QUIET, metrics_env()).await;
    let mut o = env.client(&other, "orders").await;
    let before = settled_requests(&other).await;
    let ct = o
        .encrypt(enc("orders", "new-0", "email", b"n@example.com"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let after = vault_requests(&other).await;
    assert_eq!(delta(&after, &before, "kv_read"), 1.0, "{after:?}");
    assert_eq!(delta(&after, &before, "kv_write"), 0.0, "{after:?}");
    assert_eq!(env.list_key_ids("orders").await.len(), 3);
    let mut c2 = env.client(&server, "orders").await;
    c2.decrypt(dec("email", &ct)).await.unwrap();
}

/// EncryptBatch of many new subjects, the same subjects sent to two processes at once: every
/// subject ends with exactly one DEK (the losers' DEK records are removed), both processes'
/// ciphertexts of a subject name it, duplicates in one batch share it, and the wraps went to
/// transit in batch calls (fewer transit requests than new subjects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_of_new_subjects_make_one_dek_each_across_processes() {
    let env = TestEnv::start().await;
    let a = env.server_env("a", "", metrics_env()).await;
    let b = env.server_env("b", "", metrics_env()).await;
    let (mut ca, mut cb) = (
        env.client(&a, "orders").await,
        env.client(&b, "orders").await,
    );
    const N: usize = 120;
    // Every subject twice in each batch (adjacent and not), in another order on each side.
    let items = |rev: bool| {
        let mut v: Vec<pb::EncryptRequest> = (0..N)
            .chain(0..N)
            .map(|i| {
                enc(
                    "orders",
                    &format!("bulk-{i}"),
                    "email",
                    format!("v{i}").as_bytes(),
                )
            })
            .collect();
        if rev {
            v.reverse();
        }
        v
    };
    let before_a = vault_requests(&a).await;
    let (ra, rb) = tokio::join!(
        encrypt_batch(&mut ca, items(false)),
        encrypt_batch(&mut cb, items(true))
    );
    let after_a = vault_requests(&a).await;
    for i in 0..N {
        let k = key_id(&ra[i]);
        assert_eq!(key_id(&ra[N + i]), k, "subject {i}: two keys in one batch");
        assert_eq!(
            key_id(&rb[N - 1 - i]),
            k,
            "subject {i}: two keys across processes"
        );
        assert_eq!(key_id(&rb[2 * N - 1 - i]), k);
    }
    let mut recs = env.list_key_ids("orders").await;
    recs.sort();
    let mut used: Vec<String> = ra.iter().map(|c| hex::encode(key_id(c))).collect();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), N);
    assert_eq!(
        recs, used,
        "DEK records in Vault are exactly the keys in use"
    );
    // Each ciphertext decrypts on the other process.
    for (i, ct) in ra.iter().enumerate().step_by(7) {
        let pt = cb
            .decrypt(dec("email", ct))
            .await
            .unwrap()
            .into_inner()
            .plaintext;
        assert_eq!(pt, format!("v{}", i % N).as_bytes());
    }
    let transit_calls = delta(&after_a, &before_a, "transit_encrypt")
        + delta(&after_a, &before_a, "transit_encrypt_batch");
    assert!(
        delta(&after_a, &before_a, "transit_encrypt_batch") >= 1.0 && transit_calls < N as f64,
        "wraps were not grouped: {transit_calls} transit calls for {N} subjects: {after_a:?}"
    );
}

/// A subject created by another replica while this one was loading it (this one saw no state
/// in the registry, so it skipped the read): its check-and-set of the subject record fails, it
/// removes the DEK record it wrote and uses the other replica's key. Here inside an
/// EncryptBatch that also carries the subject twice and a second subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_uses_the_key_another_replica_made_meanwhile() {
    const POINT: &str = "load-subject-after-state-check";
    let env = TestEnv::start().await;
    let (a, dir) = env.paused_server("a", POINT, Vec::new()).await;
    let b = env.server("b", "").await;
    let mut ca = env.client(&a, "orders").await;
    let mut cb = env.client(&b, "orders").await;
    let batch = tokio::spawn(async move {
        let items = vec![
            enc("orders", "race-x", "email", b"x1"),
            enc("orders", "race-x", "email", b"x2"),
            enc("orders", "race-y", "email", b"y1"),
            enc("orders", "race-x", "email", b"x3"),
        ];
        encrypt_batch(&mut ca, items).await
    });
    // One of the two subjects' loads on a is held after it saw no registry state; b creates
    // both meanwhile.
    wait_reached(&dir, POINT).await;
    let x = cb
        .encrypt(enc("orders", "race-x", "email", b"bx"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let y = cb
        .encrypt(enc("orders", "race-y", "email", b"by"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    release(&dir, POINT);
    let r = batch.await.unwrap();
    for i in [0, 1, 3] {
        assert_eq!(key_id(&r[i]), key_id(&x), "item {i}");
    }
    assert_eq!(key_id(&r[2]), key_id(&y));
    let mut recs = env.list_key_ids("orders").await;
    recs.sort();
    let mut want = vec![hex::encode(key_id(&x)), hex::encode(key_id(&y))];
    want.sort();
    assert_eq!(recs, want, "the losing DEK record was removed");
    let mut cb = env.client(&b, "orders").await;
    for (ct, pt) in [(&r[0], b"x1"), (&r[3], b"x3")] {
        assert_eq!(
            cb.decrypt(dec("email", ct))
                .await
                .unwrap()
                .into_inner()
                .plaintext,
            pt
        );
    }
}

/// A key administrator (`keys` on orders).
const KEYADMIN: &str = r#"
[[grant]]
identity = "spiffe://shop.local/keyadmin"
operations = ["keys"]
keyspaces = ["orders"]
"#;

async fn keys_client(env: &TestEnv, server: &Server) -> KeysClient<Channel> {
    let id = env.ca().issue_client_now(&spiffe("keyadmin")).unwrap();
    KeysClient::new(
        server
            .channel(Some((&id.cert_pem, &id.key_pem)))
            .await
            .unwrap(),
    )
}

fn rotate_req(subject: &str) -> pb::RotateSubjectKeyRequest {
    pb::RotateSubjectKeyRequest {
        keyspace: "orders".into(),
        subject: subject.into(),
    }
}

fn shred_req(subject: &str) -> pb::ShredRequest {
    pb::ShredRequest {
        subject: subject.into(),
        keyspace: "orders".into(),
        reason: "GDPR art. 17".into(),
        request_id: format!("req-{subject}"),
    }
}

async fn encrypt(c: &mut CryptoClient<Channel>, subject: &str, pt: &[u8]) -> Vec<u8> {
    c.encrypt(enc("orders", subject, "email", pt))
        .await
        .unwrap()
        .into_inner()
        .ciphertext
}

/// `pt` from `ct` on a process started for the call (nothing cached: the key is found by
/// the id the ciphertext names).
async fn decrypt_cold(env: &TestEnv, name: &str, ct: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    let server = env.server(name, "").await;
    let mut c = env.client(&server, "orders").await;
    c.decrypt(dec("email", ct))
        .await
        .map(|r| r.into_inner().plaintext)
}

/// The DEK versions a DEK record holds.
async fn record_versions(env: &TestEnv, kid: &str) -> Vec<String> {
    let rec = env
        .kv_get(&format!("deks/orders/{kid}"))
        .await
        .expect("DEK record");
    let mut v: Vec<String> = rec["versions"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    v.sort();
    v
}

/// The life of a key stored once: made with its subject record only, found by key id on a
/// cold process (through the registry), given its DEK record by its first rotation (both
/// versions decrypt), and destroyed whole by a shred. And the same for a subject made as
/// builds before schema 3 made it (with a DEK record from the start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_stored_once_decrypts_rotates_and_shreds_as_one_with_a_record() {
    let env = TestEnv::start().await;
    env.write_policy(KEYADMIN);
    let mut old = env
        .server_env(
            "old",
            "",
            vec![(
                "PIIGUARD_FAILPOINT".into(),
                "flag:dek-record-at-creation".into(),
            )],
        )
        .await;
    let mut co = env.client(&old, "orders").await;
    let legacy = encrypt(&mut co, "cust-legacy", b"l1").await;
    let legacy_kid = hex::encode(key_id(&legacy));
    assert_eq!(
        env.list_dek_records("orders").await,
        vec![legacy_kid.clone()]
    );
    old.stop();

    let a = env.server("a", "").await;
    let mut ca = env.client(&a, "orders").await;
    let ct1 = encrypt(&mut ca, "cust-once", b"v1").await;
    let kid = hex::encode(key_id(&ct1));
    assert_eq!(
        env.list_dek_records("orders").await,
        vec![legacy_kid.clone()],
        "a new subject has no DEK record"
    );
    let mut ids = vec![kid.clone(), legacy_kid.clone()];
    ids.sort();
    assert_eq!(env.list_key_ids("orders").await, ids);
    assert_eq!(decrypt_cold(&env, "cold-1", &ct1).await.unwrap(), b"v1");
    assert_eq!(decrypt_cold(&env, "cold-2", &legacy).await.unwrap(), b"l1");

    // The first rotation makes the DEK record, with both versions.
    let b = env.server("b", "").await;
    let mut kb = keys_client(&env, &b).await;
    for subject in ["cust-once", "cust-legacy"] {
        kb.rotate_subject_key(rotate_req(subject)).await.unwrap();
    }
    assert_eq!(record_versions(&env, &kid).await, ["1", "2"]);
    assert_eq!(record_versions(&env, &legacy_kid).await, ["1", "2"]);
    let mut cb = env.client(&b, "orders").await;
    let ct2 = encrypt(&mut cb, "cust-once", b"v2").await;
    assert_eq!(hex::encode(key_id(&ct2)), kid);
    for (name, ct, pt) in [("cold-3", &ct1, b"v1"), ("cold-4", &ct2, b"v2")] {
        assert_eq!(decrypt_cold(&env, name, ct).await.unwrap(), pt);
    }

    // A shred destroys both subjects' records; their data is refused as shredded.
    let mut e = env.erasure(&b).await;
    for subject in ["cust-once", "cust-legacy"] {
        e.shred(shred_req(subject)).await.unwrap();
    }
    assert!(env.list_key_ids("orders").await.is_empty());
    for (name, ct) in [("cold-5", &ct1), ("cold-6", &legacy)] {
        let err = decrypt_cold(&env, name, ct).await.unwrap_err();
        assert_eq!(reason(&err), "SUBJECT_SHREDDED", "{err:?}");
    }
}

/// A rotation that makes the DEK record of a subject stored once while a shred of the
/// subject runs elsewhere: the shred deleted the subject's paths before the record was
/// written, so the rotation deletes it again (else a wrapped DEK of a shredded subject would
/// outlive its certificate in Vault).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_racing_a_shred_leaves_no_dek_record() {
    const POINT: &str = "rotate-before-dek-record-write";
    let env = TestEnv::start().await;
    env.write_policy(KEYADMIN);
    let (a, dir) = env.paused_server("a", POINT, Vec::new()).await;
    let b = env.server("b", "").await;
    let mut ca = env.client(&a, "orders").await;
    encrypt(&mut ca, "cust-race", b"r1").await;
    let mut ka = keys_client(&env, &a).await;
    let rotation =
        tokio::spawn(async move { ka.rotate_subject_key(rotate_req("cust-race")).await });
    wait_reached(&dir, POINT).await;
    let mut e = env.erasure(&b).await;
    e.shred(shred_req("cust-race")).await.unwrap();
    assert!(env.list_key_ids("orders").await.is_empty());
    release(&dir, POINT);
    let err = rotation.await.unwrap().unwrap_err();
    assert_eq!(reason(&err), "SUBJECT_SHREDDED", "{err:?}");
    assert!(
        env.list_dek_records("orders").await.is_empty(),
        "the rotation left a DEK record of a shredded subject"
    );
}

/// A Decrypt on a cold cache asks the store first who owns the key: a shredded key costs no
/// Vault read, the current version of a key (never rotated: its subject record holds the only
/// copy) one, an older version of a rotated key two (the subject record names the current
/// version; the DEK record holds them all). Before, the DEK record was read first: two reads
/// (one a 404) for every never-rotated key, one for a shredded one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_decrypt_reads_the_subject_record_of_a_key_never_rotated_once() {
    let env = TestEnv::start().await;
    env.write_policy(KEYADMIN);
    let a = env.server("a", "").await;
    let mut ca = env.client(&a, "orders").await;
    let once = encrypt(&mut ca, "cust-once", b"o1").await;
    let old = encrypt(&mut ca, "cust-rotated", b"r1").await;
    keys_client(&env, &a)
        .await
        .rotate_subject_key(rotate_req("cust-rotated"))
        .await
        .unwrap();
    let new = encrypt(&mut ca, "cust-rotated", b"r2").await;
    let gone = encrypt(&mut ca, "cust-gone", b"g1").await;
    env.erasure(&a)
        .await
        .shred(shred_req("cust-gone"))
        .await
        .unwrap();

    let cold = env.server_env("cold", QUIET, metrics_env()).await;
    let mut c = env.client(&cold, "orders").await;
    for (ct, want, reads) in [
        (&once, Ok(&b"o1"[..]), 1.0),
        (&new, Ok(&b"r2"[..]), 1.0),
        (&old, Ok(&b"r1"[..]), 2.0),
        (&gone, Err("SUBJECT_SHREDDED"), 0.0),
    ] {
        let before = settled_requests(&cold).await;
        let got = c
            .decrypt(dec("email", ct))
            .await
            .map(|r| r.into_inner().plaintext);
        let after = vault_requests(&cold).await;
        match (got, want) {
            (Ok(got), Ok(pt)) => assert_eq!(got, pt),
            (Err(e), Err(why)) => assert_eq!(reason(&e), why, "{e:?}"),
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
        assert_eq!(
            delta(&after, &before, "kv_read"),
            reads,
            "KV reads for the cold Decrypt expecting {want:?}: {after:?}"
        );
    }
}
