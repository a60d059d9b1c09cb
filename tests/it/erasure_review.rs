//! Security review findings 4 and 6: a shred racing a cold load (interleaved exactly with the
//! `pause:` failpoints), and a reaper that a pile of unprocessable or failing rows cannot stall.

use std::time::{Duration, Instant};

use crate::common::*;
use piiguard::crypto::envelope;
use piiguard::ops::erasure::certificate::{Certificate, Payload};
use piiguard::pb;
use sqlx::Row as _;
use tonic::Code;

fn key_id(ct: &[u8]) -> String {
    let mut s = Vec::new();
    hex::encode(envelope::parse(ct, &mut s).unwrap().header.key_id.0)
}

fn shred_req(subject: &str, keyspace: &str) -> pb::ShredRequest {
    pb::ShredRequest {
        subject: subject.into(),
        keyspace: keyspace.into(),
        reason: "review".into(),
        request_id: "req-review".into(),
    }
}

async fn certified(env: &TestEnv, server: &Server, cert: &str) -> Payload {
    let mut e = env.erasure(server).await;
    let keys = e
        .get_verification_keys(pb::GetVerificationKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    let pem = &keys.keys.last().unwrap().public_key_pem;
    Certificate::parse(cert).unwrap().verify(pem).unwrap()
}

/// Finding 4: a cold Encrypt that read the state before a shred and makes its key after the
/// shred finished must not bring a subject of a `refuse` keyspace back (old code: the
/// registration flipped `shredded` to `active` and the Encrypt succeeded with a new key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_load_paused_across_a_shred_cannot_revive_a_refuse_subject() {
    const POINT: &str = "load-subject-after-state-check";
    let env = TestEnv::start().await;
    let a = env.server("a", "").await;
    let (b, dir) = env.paused_server("b", POINT, Vec::new()).await;
    let mut ca = env.client(&a, "orders").await;
    let ct = ca
        .encrypt(enc("strict", "cust-r4", "email", b"r4@example.com"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let kid = key_id(&ct);

    // B's cold load reads `active`, then pauses.
    let mut cb = env.client(&b, "orders").await;
    let racing =
        tokio::spawn(async move { cb.encrypt(enc("strict", "cust-r4", "email", b"late")).await });
    wait_reached(&dir, POINT).await;

    // The whole shred runs on A meanwhile.
    let r = env
        .erasure(&a)
        .await
        .shred(shred_req("cust-r4", "strict"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.keyspaces[0].outcome, pb::ShredOutcome::Shredded as i32);
    let p = certified(&env, &a, &r.keyspaces[0].certificate).await;
    assert_eq!(
        p.destroyed_keys
            .iter()
            .map(|k| k.key_id.as_str())
            .collect::<Vec<_>>(),
        vec![kid.as_str()]
    );

    // B goes on: it must refuse, and leave no key behind.
    release(&dir, POINT);
    let err = racing
        .await
        .unwrap()
        .expect_err("a refuse keyspace got a new key after a shred");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "SUBJECT_SHREDDED")
    );
    assert_eq!(env.kv_list("deks/strict").await, Vec::<String>::new());
    assert_eq!(env.kv_list("subjects/strict").await, Vec::<String>::new());
    let st = env
        .erasure(&a)
        .await
        .get_shred_status(pb::GetShredStatusRequest {
            subject: "cust-r4".into(),
            keyspace: "strict".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.keyspaces[0].state, pb::ShredState::Shredded as i32);
    for c in [&mut ca, &mut env.client(&b, "orders").await] {
        let err = c
            .encrypt(enc("strict", "cust-r4", "email", b"again"))
            .await
            .unwrap_err();
        assert_eq!(reason(&err), "SUBJECT_SHREDDED");
    }
}

/// Finding 4: a key made after the shred looked for keys but before it claimed the subject
/// (old code: listed first, claimed after) must be destroyed and named in the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_made_just_before_the_claim_is_destroyed_and_certified() {
    const POINT: &str = "shred-before-claim";
    let env = TestEnv::start().await;
    let (a, dir) = env.paused_server("a", POINT, Vec::new()).await;
    let mut e = env.erasure(&a).await;
    // Registered (a retention), no key yet.
    e.set_retention(pb::SetRetentionRequest {
        subject: "cust-b4".into(),
        keyspace: "orders".into(),
        retain_until: piiguard::keys::manager::now_i64() + 86_400,
    })
    .await
    .unwrap();

    let mut e2 = env.erasure(&a).await;
    let shred = tokio::spawn(async move { e2.shred(shred_req("cust-b4", "orders")).await });
    wait_reached(&dir, POINT).await;

    // A cold Encrypt makes the subject's first key now.
    let mut c = env.client(&a, "orders").await;
    let ct = c
        .encrypt(enc("orders", "cust-b4", "email", b"b4@example.com"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let kid = key_id(&ct);

    release(&dir, POINT);
    let r = shred.await.unwrap().unwrap().into_inner();
    assert_eq!(r.keyspaces[0].outcome, pb::ShredOutcome::Shredded as i32);
    let p = certified(&env, &a, &r.keyspaces[0].certificate).await;
    assert!(
        p.destroyed_keys.iter().any(|k| k.key_id == kid),
        "the certificate must list the key made before the claim: {:?}",
        p.destroyed_keys
    );
    assert!(
        !env.kv_list("deks/orders").await.contains(&kid),
        "the key survived the shred"
    );
    let err = c
        .decrypt(dec("email", &ct))
        .await
        .err()
        .expect("shredded data must not decrypt");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "SUBJECT_SHREDDED")
    );
}

/// Exploratory finding: a shred that waited for a concurrent shred of the same subject (two
/// calls at once, or one subject twice in a ShredStream) answered SHREDDED, "keys destroyed
/// by this call", with the other call's certificate. It destroyed nothing: ALREADY_SHREDDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shred_that_waited_for_another_answers_already_shredded() {
    const POINT: &str = "shred-after-intent";
    let env = TestEnv::start().await;
    let (a, dir) = env.paused_server("a", POINT, Vec::new()).await;
    let mut c = env.client(&a, "orders").await;
    c.encrypt(enc("orders", "cust-twice", "email", b"t@example.com"))
        .await
        .unwrap();
    let mut e1 = env.erasure(&a).await;
    let first = tokio::spawn(async move { e1.shred(shred_req("cust-twice", "orders")).await });
    wait_reached(&dir, POINT).await;
    // The second finds the subject being shredded and waits for the first.
    let mut e2 = env.erasure(&a).await;
    let second = tokio::spawn(async move { e2.shred(shred_req("cust-twice", "orders")).await });
    tokio::time::sleep(Duration::from_millis(600)).await;
    release(&dir, POINT);
    let first = first.await.unwrap().unwrap().into_inner().keyspaces;
    let second = second.await.unwrap().unwrap().into_inner().keyspaces;
    assert_eq!(first[0].outcome, pb::ShredOutcome::Shredded as i32);
    assert_eq!(
        second[0].outcome,
        pb::ShredOutcome::AlreadyShredded as i32,
        "the second call destroyed nothing"
    );
    assert_eq!(second[0].certificate, first[0].certificate);
    assert_eq!(env.certificate_counts().await, (1, 1));
}

/// Rows written straight into the store, as an old release or a removed keyspace leaves them.
async fn seed_store(url: &str, unconfigured: usize, failing: usize) {
    // Creates (or upgrades) the schema.
    piiguard::store::Store::open(url).await.unwrap();
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    for i in 0..unconfigured {
        // Due since t=1, in a keyspace no longer configured.
        sqlx::query(
            "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at, retain_until)
             VALUES ('gone', $1, 'active', 1, 1, 1)",
        )
        .bind(format!("{i:064x}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    for i in 0..failing {
        // A half-done shred whose recorded intent cannot be read: every attempt fails.
        sqlx::query(
            "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at, intent)
             VALUES ('orders', $1, 'shredding', 1, 1, 'not json')",
        )
        .bind(format!("bad{i:061x}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
}

/// Finding 6: 600 due rows in an unconfigured keyspace and rows that keep failing do not keep
/// the reaper from a due subject of a configured keyspace (old code: `due()` took 500 rows in
/// no order and skipped them, so the subject was never reached).
async fn reaper_is_not_stalled_by_unconfigured_or_failing_rows(store: Option<String>) {
    let env = TestEnv::start_with_store(store).await;
    seed_store(&env.store_url, 600, 3).await;
    let server = env.server("r", "").await;
    let mut c = env.client(&server, "orders").await;
    let mut e = env.erasure(&server).await;
    let ct = c
        .encrypt(enc("orders", "cust-reap", "email", b"r@example.com"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    e.set_retention(pb::SetRetentionRequest {
        subject: "cust-reap".into(),
        keyspace: "orders".into(),
        retain_until: piiguard::keys::manager::now_i64() + 1,
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = e
            .get_shred_status(pb::GetShredStatusRequest {
                subject: "cust-reap".into(),
                keyspace: "orders".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if st.keyspaces[0].state == pb::ShredState::Shredded as i32 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reaper never shredded a due subject"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let err = c
        .decrypt(dec("email", &ct))
        .await
        .err()
        .expect("shredded data must not decrypt");
    assert_eq!(reason(&err), "SUBJECT_SHREDDED");
    assert!(!env.kv_list("deks/orders").await.contains(&key_id(&ct)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaper_is_not_stalled_by_unconfigured_or_failing_rows_sqlite() {
    reaper_is_not_stalled_by_unconfigured_or_failing_rows(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaper_is_not_stalled_by_unconfigured_or_failing_rows_postgres() {
    let pg = Postgres::start();
    reaper_is_not_stalled_by_unconfigured_or_failing_rows(Some(pg.url.clone())).await;
}

/// Finding 6: a row that keeps failing is retried with a backoff and raises the
/// `reaper_stuck` alarm once (after `reaper_alarm_after_failures`), not at every pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaper_row_that_keeps_failing_raises_the_alarm_once() {
    let env = TestEnv::start().await;
    seed_store(&env.store_url, 0, 1).await;
    let server = env
        .server_env(
            "f",
            "",
            vec![(
                "PIIGUARD_ERASURE__REAPER_ALARM_AFTER_FAILURES".into(),
                "2".into(),
            )],
        )
        .await;
    let pool = sqlx::AnyPool::connect(&env.store_url).await.unwrap();
    let attempts = || async {
        sqlx::query("SELECT reap_attempts, reap_next_at FROM subjects WHERE keyspace = 'orders'")
            .fetch_one(&pool)
            .await
            .map(|r| (r.get::<i64, _>(0), r.get::<Option<i64>, _>(1)))
            .unwrap()
    };
    // Backoff 1 s, 2 s, 4 s: the fourth attempt comes about 7 s after the first.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (n, next) = loop {
        let (n, next) = attempts().await;
        if n >= 4 {
            break (n, next);
        }
        assert!(Instant::now() < deadline, "only {n} attempts");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let now = piiguard::keys::manager::now_i64();
    assert!(
        next.is_some_and(|t| t > now),
        "attempt {n} set no backoff: {next:?}"
    );
    let alarms: Vec<_> = server
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "alarm" && r["event"] == "reaper_stuck")
        .collect();
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(alarms[0]["severity"], "critical");
}
