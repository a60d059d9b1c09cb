//! Crypto-shredding end to end: real OpenBao, real store, real mTLS, the real binary.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use piiguard::crypto::envelope;
use piiguard::ops::erasure::certificate::Certificate;
use piiguard::pb;
use tonic::Code;

fn key_id(ct: &[u8]) -> [u8; 16] {
    let mut s = Vec::new();
    envelope::parse(ct, &mut s).unwrap().header.key_id.0
}

fn shred_req(subject: &str, keyspace: &str, request_id: &str) -> pb::ShredRequest {
    pb::ShredRequest {
        subject: subject.into(),
        keyspace: keyspace.into(),
        reason: "GDPR art. 17".into(),
        request_id: request_id.into(),
    }
}

fn outcome(k: &pb::KeyspaceShred) -> pb::ShredOutcome {
    pb::ShredOutcome::try_from(k.outcome).unwrap()
}

fn state(s: &pb::SubjectStatus) -> pb::ShredState {
    pb::ShredState::try_from(s.state).unwrap()
}

async fn public_key(env: &TestEnv, server: &Server) -> String {
    let mut e = env.erasure(server).await;
    let keys = e
        .get_verification_keys(pb::GetVerificationKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.key, "piiguard-signing");
    keys.keys.last().unwrap().public_key_pem.clone()
}

async fn encrypt(
    c: &mut pb::crypto_client::CryptoClient<tonic::transport::Channel>,
    ks: &str,
    subject: &str,
    pt: &[u8],
) -> Vec<u8> {
    c.encrypt(enc(ks, subject, "email", pt))
        .await
        .unwrap()
        .into_inner()
        .ciphertext
}

async fn decrypt_err(
    c: &mut pb::crypto_client::CryptoClient<tonic::transport::Channel>,
    ct: &[u8],
) -> Option<tonic::Status> {
    c.decrypt(dec("email", ct)).await.err()
}

/// Waits (at most 10 s: the eviction bound here is 200 ms) until `ct` is refused as shredded.
async fn wait_refused(
    c: &mut pb::crypto_client::CryptoClient<tonic::transport::Channel>,
    ct: &[u8],
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.decrypt(dec("email", ct)).await {
            Err(e) => {
                assert_eq!(
                    (e.code(), reason(&e).as_str()),
                    (Code::FailedPrecondition, "SUBJECT_SHREDDED")
                );
                return;
            }
            Ok(_) => assert!(
                Instant::now() < deadline,
                "a replica still decrypts a shredded subject"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_state(
    env: &TestEnv,
    server: &Server,
    subject: &str,
    ks: &str,
    want: pb::ShredState,
) -> pb::SubjectStatus {
    let mut e = env.erasure(server).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = e
            .get_shred_status(pb::GetShredStatusRequest {
                subject: subject.into(),
                keyspace: ks.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .keyspaces
            .remove(0);
        if state(&st) == want {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{subject}: state {:?}, waiting for {want:?}",
            state(&st)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn shred_makes_data_unreadable_and_certifies_it(env: TestEnv) {
    let server = env.server("s", "").await;
    let mut c = env.client(&server, "orders").await;
    let mut e = env.erasure(&server).await;

    let ct = encrypt(&mut c, "orders", "cust-erase-1", b"erase@example.com").await;
    let ct_crm = encrypt(&mut c, "crm", "cust-erase-1", b"keep me").await;
    assert!(c.decrypt(dec("email", &ct)).await.is_ok());

    // Only identities with the shred grant may shred: the order service may not.
    let mut not_allowed =
        pb::erasure_client::ErasureClient::new(env.channel(&server, "orders").await);
    let err = not_allowed
        .shred(shred_req("cust-erase-1", "orders", "req-0"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::PermissionDenied, "POLICY_DENIED")
    );
    assert!(
        c.decrypt(dec("email", &ct)).await.is_ok(),
        "a denied shred changed nothing"
    );

    // Shred in one keyspace.
    let r = e
        .shred(shred_req("cust-erase-1", "orders", "req-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.request_id, "req-1");
    assert_eq!(r.keyspaces.len(), 1);
    assert_eq!(outcome(&r.keyspaces[0]), pb::ShredOutcome::Shredded);
    let cert_json = r.keyspaces[0].certificate.clone();

    // The old ciphertext is dead, with the stable reason; the other keyspace is untouched.
    let err = decrypt_err(&mut c, &ct)
        .await
        .expect("shredded data must not decrypt");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "SUBJECT_SHREDDED");
    assert_eq!(
        c.decrypt(dec("email", &ct_crm))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        b"keep me"
    );

    // Idempotent: same certificate again.
    let again = e
        .shred(shred_req("cust-erase-1", "orders", "req-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        outcome(&again.keyspaces[0]),
        pb::ShredOutcome::AlreadyShredded
    );
    assert_eq!(again.keyspaces[0].certificate, cert_json);

    // A subject that never existed says so, and stays unknown.
    let none = e
        .shred(shred_req("never-seen", "orders", "req-2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&none.keyspaces[0]), pb::ShredOutcome::NotFound);
    assert!(none.keyspaces[0].certificate.is_empty());
    let st = e
        .get_shred_status(pb::GetShredStatusRequest {
            subject: "never-seen".into(),
            keyspace: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        st.keyspaces
            .iter()
            .all(|k| state(k) == pb::ShredState::Unknown)
    );

    // Status: shredded with the certificate in orders, active in crm.
    let st = e
        .get_shred_status(pb::GetShredStatusRequest {
            subject: "cust-erase-1".into(),
            keyspace: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let by_ks = |k: &str| {
        st.keyspaces
            .iter()
            .find(|s| s.keyspace == k)
            .unwrap()
            .clone()
    };
    assert_eq!(state(&by_ks("orders")), pb::ShredState::Shredded);
    assert_eq!(by_ks("orders").certificate, cert_json);
    assert!(by_ks("orders").shredded_at > 0);
    assert_eq!(state(&by_ks("crm")), pb::ShredState::Active);

    // The key is gone from Vault.
    let kid = hex::encode(key_id(&ct));
    assert!(!env.list_key_ids("orders").await.contains(&kid));
    assert!(
        env.list_key_ids("crm")
            .await
            .contains(&hex::encode(key_id(&ct_crm)))
    );

    // The certificate verifies with our code, names what was destroyed, and holds no raw id.
    let pem = public_key(&env, &server).await;
    let cert = Certificate::parse(&cert_json).unwrap();
    let p = cert.verify(&pem).expect("certificate verifies");
    assert_eq!(p.keyspace, "orders");
    assert_eq!(p.request_id, "req-1");
    assert_eq!(p.reason, "GDPR art. 17");
    assert_eq!(p.destroyed_keys.len(), 1);
    assert_eq!(p.destroyed_keys[0].key_id, kid);
    assert!(
        p.destroyed_vault_paths
            .iter()
            .any(|x| x.ends_with(&format!("deks/orders/{kid}")))
    );
    assert_eq!(p.cache_max_survival_secs, 3600);
    assert_eq!(p.backup_retention_days, 35);
    assert_eq!(p.method, "cryptographic erase, NIST SP 800-88 Rev. 1");
    assert!(!cert_json.contains("cust-erase-1"));

    // ...and with plain OpenSSL, and a tampered one fails both ways.
    let d = env.dir.path();
    std::fs::write(d.join("signing.pem"), &pem).unwrap();
    std::fs::write(d.join("payload.json"), &cert.payload).unwrap();
    std::fs::write(d.join("sig.bin"), cert.signature_bytes().unwrap()).unwrap();
    let tampered_payload = cert.payload.replace("\"orders\"", "\"crm\"");
    assert_ne!(tampered_payload, cert.payload);
    std::fs::write(d.join("tampered.json"), &tampered_payload).unwrap();
    let openssl = |f: &str| {
        Command::new("openssl")
            .args([
                "dgst",
                "-sha256",
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:32",
                "-verify",
            ])
            .arg(d.join("signing.pem"))
            .arg("-signature")
            .arg(d.join("sig.bin"))
            .arg(d.join(f))
            .output()
            .unwrap()
    };
    let ok = openssl("payload.json");
    assert!(ok.status.success() && String::from_utf8_lossy(&ok.stdout).contains("Verified OK"));
    assert!(!openssl("tampered.json").status.success());
    let mut bad = cert.clone();
    bad.payload = tampered_payload;
    assert!(bad.verify(&pem).is_err());

    // The CLI verifies the certificate file, and rejects the tampered one.
    std::fs::write(d.join("cert.json"), &cert_json).unwrap();
    std::fs::write(d.join("bad-cert.json"), bad.to_json()).unwrap();
    let cli = |f: &str| {
        Command::new(env!("CARGO_BIN_EXE_piiguard"))
            .args(["certificate", "verify"])
            .arg(d.join(f))
            .arg("--public-key")
            .arg(d.join("signing.pem"))
            .output()
            .unwrap()
    };
    let out = cli("cert.json");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("verified"));
    assert!(!cli("bad-cert.json").status.success());

    // Default keyspace policy: the same subject id gets a new key; old data stays dead.
    let ct2 = encrypt(&mut c, "orders", "cust-erase-1", b"new@example.com").await;
    assert_ne!(key_id(&ct2), key_id(&ct));
    assert_eq!(
        c.decrypt(dec("email", &ct2))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        b"new@example.com"
    );
    assert_eq!(
        reason(&decrypt_err(&mut c, &ct).await.unwrap()),
        "SUBJECT_SHREDDED"
    );
    // The status is active again and still gives the certificate of that shred (it used to
    // drop it, and its time, at the subject's next key).
    let st = e
        .get_shred_status(pb::GetShredStatusRequest {
            subject: "cust-erase-1".into(),
            keyspace: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&st.keyspaces[0]), pb::ShredState::Active);
    assert_eq!(st.keyspaces[0].certificate, cert_json);
    assert_eq!(st.keyspaces[0].shredded_at, by_ks("orders").shredded_at);

    // `strict` keyspace: a shredded subject id can never be used again.
    let _ = encrypt(&mut c, "strict", "cust-strict", b"x").await;
    let r = e
        .shred(shred_req("cust-strict", "strict", "req-3"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r.keyspaces[0]), pb::ShredOutcome::Shredded);
    let err = c
        .encrypt(enc("strict", "cust-strict", "email", b"y"))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "SUBJECT_SHREDDED")
    );

    // All keyspaces at once.
    let a = encrypt(&mut c, "orders", "cust-all", b"a").await;
    let b = encrypt(&mut c, "crm", "cust-all", b"b").await;
    let r = e
        .shred(shred_req("cust-all", "", "req-4"))
        .await
        .unwrap()
        .into_inner();
    let outcomes: Vec<_> = r
        .keyspaces
        .iter()
        .map(|k| (k.keyspace.as_str(), outcome(k)))
        .collect();
    assert!(
        outcomes.contains(&("orders", pb::ShredOutcome::Shredded)),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&("crm", pb::ShredOutcome::Shredded)),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&("strict", pb::ShredOutcome::NotFound)),
        "{outcomes:?}"
    );
    assert_eq!(
        reason(&decrypt_err(&mut c, &a).await.unwrap()),
        "SUBJECT_SHREDDED"
    );
    assert_eq!(
        reason(&decrypt_err(&mut c, &b).await.unwrap()),
        "SUBJECT_SHREDDED"
    );

    // Bad input changes nothing and gets a stable reason.
    let err = e.shred(shred_req("", "orders", "req-5")).await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::InvalidArgument, "INVALID_REQUEST")
    );
    let err = e.shred(shred_req("x", "nope", "req-6")).await.unwrap_err();
    assert_eq!(reason(&err), "UNKNOWN_KEYSPACE");

    // Every erasure call is audited: the shred with the subject's keyed reference, the denied
    // attempt as denied; no raw subject id in the audit log or the server log.
    let records = server.audit_records();
    let shreds: Vec<_> = records.iter().filter(|r| r["method"] == "Shred").collect();
    assert!(shreds.iter().any(|r| r["outcome"] == "denied"));
    assert!(
        shreds
            .iter()
            .any(|r| r["outcome"] == "ok"
                && r["subject_ref"].as_str().is_some_and(|s| s.len() == 64))
    );
    let audit_text: String = server
        .audit_files()
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let log = server.log_text() + &audit_text;
    for needle in ["cust-erase-1", "cust-strict", "cust-all", "never-seen"] {
        assert!(!log.contains(needle), "{needle} in log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_window_schedule_cancel_and_execution_after_restart() {
    let env = TestEnv::start().await;
    let mut server = env.server("g", "").await;
    let mut c = env.client(&server, "orders").await;
    let mut e = env.erasure(&server).await;
    let ct = encrypt(&mut c, "graced", "cust-g", b"g@example.com").await;

    let r = e
        .shred(shred_req("cust-g", "graced", "req-g1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r.keyspaces[0]), pb::ShredOutcome::Scheduled);
    let now = piiguard::keys::manager::now_i64();
    assert!(
        (now + 1..=now + 4).contains(&r.keyspaces[0].scheduled_for),
        "{}",
        r.keyspaces[0].scheduled_for
    );
    // During the window the data is refused, for encrypt and decrypt.
    let err = decrypt_err(&mut c, &ct).await.unwrap();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "SUBJECT_SHRED_SCHEDULED")
    );
    let err = c
        .encrypt(enc("graced", "cust-g", "email", b"x"))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "SUBJECT_SHRED_SCHEDULED");
    // Repeating the request does not move the deadline.
    let r2 = e
        .shred(shred_req("cust-g", "graced", "req-g1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r2.keyspaces[0].scheduled_for, r.keyspaces[0].scheduled_for);

    // Cancel: data usable again.
    let st = e
        .cancel_shred(pb::CancelShredRequest {
            subject: "cust-g".into(),
            keyspace: "graced".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&st.keyspaces[0]), pb::ShredState::Active);
    assert_eq!(
        c.decrypt(dec("email", &ct))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        b"g@example.com"
    );
    let err = e
        .cancel_shred(pb::CancelShredRequest {
            subject: "cust-g".into(),
            keyspace: "graced".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "SHRED_NOT_SCHEDULED")
    );

    // Schedule again, stop the service before the deadline, start it after: it executes.
    let r = e
        .shred(shred_req("cust-g", "graced", "req-g2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r.keyspaces[0]), pb::ShredOutcome::Scheduled);
    server.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    server.start().await;
    let st = wait_state(&env, &server, "cust-g", "graced", pb::ShredState::Shredded).await;
    let cert = Certificate::parse(&st.certificate).unwrap();
    let p = cert.verify(&public_key(&env, &server).await).unwrap();
    assert_eq!(p.request_id, "req-g2");
    let mut c = env.client(&server, "orders").await;
    assert_eq!(
        reason(&decrypt_err(&mut c, &ct).await.unwrap()),
        "SUBJECT_SHREDDED"
    );
    // The reaper destroyed the keys with no call in flight: its own audit event says when,
    // which subject (by reference) and which certificate (there was none before).
    let events = reaper_shreds(&[&server], 1);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["keyspace"], "graced");
    assert_eq!(events[0]["subject_ref"], p.subject_ref.as_str());
    let detail = events[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("grace window ended") && detail.contains(&p.certificate_id),
        "{detail}"
    );
}

/// The `reaper_shred` audit events of these servers, once there are `want` of them (or after
/// 10 s): the reaper writes its event just after it stores the certificate that a status
/// call may already have seen.
fn reaper_shreds(servers: &[&Server], want: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events: Vec<_> = servers
            .iter()
            .flat_map(|s| s.audit_records())
            .filter(|r| r["kind"] == "event" && r["event"] == "reaper_shred")
            .collect();
        if events.len() >= want || Instant::now() > deadline {
            return events;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn retention_reaper_with_two_replicas_shreds_each_subject_once(env: TestEnv) {
    let a = env.server("a", "").await;
    let b = env.server("b", "").await;
    let mut c = env.client(&a, "orders").await;
    let mut e = env.erasure(&a).await;
    let now = piiguard::keys::manager::now_i64();
    let mut cts = Vec::new();
    for i in 0..5 {
        let s = format!("cust-ret-{i}");
        cts.push(encrypt(&mut c, "orders", &s, b"r").await);
        let st = e
            .set_retention(pb::SetRetentionRequest {
                subject: s,
                keyspace: "orders".into(),
                retain_until: now + 2,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st.keyspaces[0].retain_until, now + 2);
    }
    let keep = encrypt(&mut c, "orders", "cust-keep", b"k").await;
    e.set_retention(pb::SetRetentionRequest {
        subject: "cust-keep".into(),
        keyspace: "orders".into(),
        retain_until: now + 3600,
    })
    .await
    .unwrap();
    for (i, ct) in cts.iter().enumerate() {
        let st = wait_state(
            &env,
            &b,
            &format!("cust-ret-{i}"),
            "orders",
            pb::ShredState::Shredded,
        )
        .await;
        let p = Certificate::parse(&st.certificate)
            .unwrap()
            .verify(&public_key(&env, &b).await)
            .unwrap();
        assert_eq!(p.reason, "retention period expired");
        // Either replica's reaper may have done it: A refuses within its eviction bound.
        wait_refused(&mut c, ct).await;
    }
    assert_eq!(
        c.decrypt(dec("email", &keep))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        b"k"
    );
    // Both reapers ran; each subject got exactly one certificate, and one audit event on
    // the replica that destroyed its keys.
    assert_eq!(
        env.certificate_counts().await,
        (5, 5),
        "certificates per subject"
    );
    let events = reaper_shreds(&[&a, &b], 5);
    let mut refs: Vec<&str> = events
        .iter()
        .map(|r| r["subject_ref"].as_str().unwrap())
        .collect();
    refs.sort();
    refs.dedup();
    assert_eq!((events.len(), refs.len()), (5, 5), "{events:?}");
    assert!(events.iter().all(|r| {
        r["detail"]
            .as_str()
            .unwrap()
            .contains("retention period expired")
    }));
}

async fn shred_on_one_replica_is_refused_by_the_other(env: TestEnv) {
    let a = env.server("a", "").await;
    let b = env.server("b", "").await;
    let mut ca = env.client(&a, "orders").await;
    let mut cb = env.client(&b, "orders").await;
    let ct = encrypt(&mut ca, "orders", "cust-2r", b"two@example.com").await;
    // B caches the key.
    assert!(cb.decrypt(dec("email", &ct)).await.is_ok());
    assert!(
        cb.encrypt(enc("orders", "cust-2r", "email", b"x"))
            .await
            .is_ok()
    );
    let r = env
        .erasure(&a)
        .await
        .shred(shred_req("cust-2r", "orders", "req-2r"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r.keyspaces[0]), pb::ShredOutcome::Shredded);
    // B refuses within its eviction bound (eviction_poll_millis = 200 here; hard TTL otherwise).
    wait_refused(&mut cb, &ct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_shred_then_restart_completes_it() {
    let env = TestEnv::start().await;
    for (i, point) in ["shred-after-intent", "shred-after-vault-delete"]
        .into_iter()
        .enumerate()
    {
        let subject = format!("cust-crash-{i}");
        let mut server = env
            .server_env(
                &format!("crash{i}"),
                "",
                vec![("PIIGUARD_FAILPOINT".into(), point.into())],
            )
            .await;
        let mut c = env.client(&server, "orders").await;
        let ct = encrypt(&mut c, "orders", &subject, b"crash@example.com").await;
        let kid = hex::encode(key_id(&ct));
        let r = env
            .erasure(&server)
            .await
            .shred(shred_req(&subject, "orders", "req-crash"))
            .await;
        assert!(
            r.is_err(),
            "{point}: the process should have died mid-shred"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.exited() {
            assert!(Instant::now() < deadline, "{point}: process did not abort");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let in_vault = env.list_key_ids("orders").await.contains(&kid);
        assert_eq!(in_vault, i == 0, "{point}: DEK in Vault after the crash");

        server.set_env(Vec::new());
        server.start().await;
        let st = wait_state(&env, &server, &subject, "orders", pb::ShredState::Shredded).await;
        let p = Certificate::parse(&st.certificate)
            .unwrap()
            .verify(&public_key(&env, &server).await)
            .unwrap();
        assert_eq!(p.request_id, "req-crash");
        assert_eq!(p.destroyed_keys[0].key_id, kid);
        assert!(
            !env.list_key_ids("orders").await.contains(&kid),
            "{point}: DEK survived"
        );
        let mut c = env.client(&server, "orders").await;
        assert_eq!(
            reason(&decrypt_err(&mut c, &ct).await.unwrap()),
            "SUBJECT_SHREDDED"
        );
        server.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_makes_data_unreadable_and_certifies_it_sqlite() {
    shred_makes_data_unreadable_and_certifies_it(TestEnv::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_makes_data_unreadable_and_certifies_it_postgres() {
    let pg = Postgres::start();
    shred_makes_data_unreadable_and_certifies_it(
        TestEnv::start_with_store(Some(pg.url.clone())).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_reaper_with_two_replicas_shreds_each_subject_once_sqlite() {
    retention_reaper_with_two_replicas_shreds_each_subject_once(TestEnv::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_reaper_with_two_replicas_shreds_each_subject_once_postgres() {
    let pg = Postgres::start();
    retention_reaper_with_two_replicas_shreds_each_subject_once(
        TestEnv::start_with_store(Some(pg.url.clone())).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_on_one_replica_is_refused_by_the_other_sqlite() {
    shred_on_one_replica_is_refused_by_the_other(TestEnv::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_on_one_replica_is_refused_by_the_other_postgres() {
    let pg = Postgres::start();
    shred_on_one_replica_is_refused_by_the_other(
        TestEnv::start_with_store(Some(pg.url.clone())).await,
    )
    .await;
}
