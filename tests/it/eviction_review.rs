//! Security review findings 5 and 16: evictions missed across replicas (a PostgreSQL feed row
//! that commits after a higher seq was read; a cold load caching a key an eviction had just
//! removed), and DEK use counts that restarted at zero on every cache reload.

use std::time::{Duration, Instant};

use crate::common::*;
use piiguard::pb;
use piiguard::store::Store;
use sqlx::Connection as _;
use sqlx::Row as _;
use tonic::Code;

type Crypto = pb::crypto_client::CryptoClient<tonic::transport::Channel>;

fn shred_req(subject: &str, keyspace: &str) -> pb::ShredRequest {
    pb::ShredRequest {
        subject: subject.into(),
        keyspace: keyspace.into(),
        reason: "review".into(),
        request_id: "req-evict".into(),
    }
}

/// No takeover of a paused shred by a reaper (the test config's stale lease is 2 s).
fn long_lease() -> (String, String) {
    ("PIIGUARD_ERASURE__STALE_SHRED_SECS".into(), "600".into())
}

async fn encrypt(c: &mut Crypto, ks: &str, subject: &str) -> Vec<u8> {
    c.encrypt(enc(ks, subject, "email", b"someone@example.com"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext
}

fn assert_shredded(r: Result<impl Sized, tonic::Status>, what: &str) {
    let Err(e) = r else {
        panic!("{what}: succeeded with the key of a shredded subject");
    };
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "SUBJECT_SHREDDED"),
        "{what}"
    );
}

/// Waits (at most `bound`) until `ct` is refused as shredded on `c`.
async fn wait_refused(c: &mut Crypto, ct: &[u8], bound: Duration, what: &str) {
    let deadline = Instant::now() + bound;
    loop {
        match c.decrypt(dec("email", ct)).await {
            Err(e) => {
                assert_eq!(reason(&e), "SUBJECT_SHREDDED", "{what}");
                return;
            }
            Ok(_) => assert!(
                Instant::now() < deadline,
                "{what}: still decrypts a shredded subject after {bound:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Finding 5, the feed itself, on a real PostgreSQL: a row whose seq was drawn first but which
/// commits after a higher seq was read is still delivered (old reader: `evictions_since(the
/// highest seq seen)` skipped it for good), exactly once; and a committed eviction wakes the
/// LISTEN connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_feed_delivers_a_row_that_commits_after_a_higher_seq_postgres() {
    let pg = Postgres::start();
    let store = Store::open(&pg.url).await.unwrap();
    let mut feed = store
        .eviction_feed(Duration::from_secs(3600))
        .await
        .unwrap();
    let mut wakeups = store.eviction_wakeups().await.unwrap().expect("a listener");

    // Another replica's shred: its row has drawn seq 1 and is not committed yet.
    let mut late = sqlx::postgres::PgConnection::connect(&pg.url)
        .await
        .unwrap();
    let mut tx = late.begin().await.unwrap();
    let seq: i64 = sqlx::query(
        "INSERT INTO evictions (keyspace, subject_ref, intent, at)
         VALUES ('orders', 'late', '[]', 1) RETURNING seq",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap()
    .get("seq");

    // A later shred commits seq 2 and notifies.
    store
        .publish_eviction("orders", "early", "[]", 2)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), wakeups.wait())
        .await
        .expect("no notification of a committed eviction")
        .unwrap();
    let got = store.next_evictions(&mut feed, 100).await.unwrap();
    assert_eq!(
        got.iter()
            .map(|e| e.subject_ref.as_str())
            .collect::<Vec<_>>(),
        ["early"]
    );
    assert!(got[0].seq > seq);
    assert_eq!(feed.gaps().collect::<Vec<_>>(), [seq]);
    assert!(
        store
            .next_evictions(&mut feed, 100)
            .await
            .unwrap()
            .is_empty()
    );

    // The late row commits: the old reader, past seq 2, never sees it.
    sqlx::raw_sql("NOTIFY piiguard_evictions")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(
        store
            .evictions_since(feed.high(), 100)
            .await
            .unwrap()
            .is_empty(),
        "the scenario: a reader asking only for seqs above the highest it saw misses the row"
    );
    tokio::time::timeout(Duration::from_secs(10), wakeups.wait())
        .await
        .expect("no notification of the late commit")
        .unwrap();
    let got = store.next_evictions(&mut feed, 100).await.unwrap();
    assert_eq!(
        got.iter()
            .map(|e| (e.seq, e.subject_ref.as_str()))
            .collect::<Vec<_>>(),
        [(seq, "late")]
    );
    assert_eq!(feed.gaps().count(), 0);
    assert!(
        store
            .next_evictions(&mut feed, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Finding 5, end to end on two replicas sharing PostgreSQL: replica A's shred of `s1` draws
/// its eviction seq and pauses before committing it (failpoint
/// `publish-eviction-before-commit`); A's shred of `s2` commits the next seq; B applies it.
/// Once `s1`'s eviction commits, B must stop decrypting `s1` within a few polls (old code:
/// B had moved past that seq and kept the key until its hard TTL, an hour here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_whose_eviction_commits_late_still_reaches_the_other_replica_postgres() {
    const POINT: &str = "publish-eviction-before-commit";
    let pg = Postgres::start();
    let env = TestEnv::start_with_store(Some(pg.url.clone())).await;
    let (a, dir) = env.paused_server("a", POINT, vec![long_lease()]).await;
    let b = env.server_env("b", "", vec![long_lease()]).await;
    let mut ca = env.client(&a, "orders").await;
    let mut cb = env.client(&b, "orders").await;
    let ct1 = encrypt(&mut ca, "orders", "cust-late-1").await;
    let ct2 = encrypt(&mut ca, "orders", "cust-late-2").await;
    // B caches both keys.
    for ct in [&ct1, &ct2] {
        assert!(cb.decrypt(dec("email", ct)).await.is_ok());
    }

    // s1's eviction row is inserted, not committed.
    let mut e1 = env.erasure(&a).await;
    let first = tokio::spawn(async move { e1.shred(shred_req("cust-late-1", "orders")).await });
    wait_reached(&dir, POINT).await;
    // s2's shred goes through and commits the higher seq; B applies it.
    let r = env
        .erasure(&a)
        .await
        .shred(shred_req("cust-late-2", "orders"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.keyspaces[0].outcome, pb::ShredOutcome::Shredded as i32);
    wait_refused(&mut cb, &ct2, Duration::from_secs(10), "s2 on B").await;
    // B is past s2's seq; s1's eviction is not visible yet: B still has s1's key (as it may:
    // the shred is not done).
    assert!(cb.decrypt(dec("email", &ct1)).await.is_ok());

    release(&dir, POINT);
    let r = first.await.unwrap().unwrap().into_inner();
    assert_eq!(r.keyspaces[0].outcome, pb::ShredOutcome::Shredded as i32);
    // Polled every 200 ms and woken by NOTIFY: well within 10 s; the old code never evicted.
    wait_refused(&mut cb, &ct1, Duration::from_secs(10), "s1 on B").await;
}

/// Finding 5, the cache: replica B's cold load of a subject has checked the store (active)
/// and pauses just before it caches the key (failpoint `load-subject-before-cache-insert`);
/// A shreds the subject and B applies the eviction meanwhile. B must not cache the key (old
/// code: the "evicted since?" check and the insert were two steps without the lock `evict`
/// takes, so an eviction between them was lost and B kept using the key until its hard TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_between_a_cold_loads_check_and_its_cache_insert_is_not_lost() {
    const POINT: &str = "load-subject-before-cache-insert";
    let env = TestEnv::start().await;
    let a = env.server_env("a", "", vec![long_lease()]).await;
    let (b, dir) = env.paused_server("b", POINT, vec![long_lease()]).await;
    let mut ca = env.client(&a, "orders").await;
    let ct = encrypt(&mut ca, "strict", "cust-gap").await;

    let mut cb = env.client(&b, "orders").await;
    let racing =
        tokio::spawn(async move { cb.encrypt(enc("strict", "cust-gap", "email", b"x")).await });
    wait_reached(&dir, POINT).await;

    let r = env
        .erasure(&a)
        .await
        .shred(shred_req("cust-gap", "strict"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.keyspaces[0].outcome, pb::ShredOutcome::Shredded as i32);
    // B's feed applies the eviction while its load is paused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.log_text().contains("eviction feed: applied") {
        assert!(Instant::now() < deadline, "B never applied the eviction");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    release(&dir, POINT);
    let raced = racing.await.unwrap();
    // The defect: the key stayed cached on B, so later calls used it.
    let mut cb = env.client(&b, "orders").await;
    assert_shredded(
        cb.encrypt(enc("strict", "cust-gap", "email", b"y")).await,
        "an Encrypt on B after the shred",
    );
    assert_shredded(
        cb.decrypt(dec("email", &ct)).await,
        "a Decrypt on B after the shred",
    );
    // The racing call itself asked the store again after seeing the eviction.
    assert_shredded(raced, "the racing Encrypt");
}

/// Finding 16: the per-process limit of encryptions with one DEK holds across a cache reload
/// of that DEK (old code: the reloaded entry counted from 0 again). The cache holds one entry
/// here, so another subject's Encrypt pushes the first subject's key out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dek_use_limit_holds_across_a_cache_reload() {
    // The limit is durable now (keyspaces.<name>.max_dek_uses, counted in the store): at the
    // limit the next encryption rotates the subject's DEK instead of failing, and a reload of
    // the key from Vault goes on from the stored count.
    let env = TestEnv::start().await;
    let a = env
        .server_custom(
            "a",
            "",
            vec![("PIIGUARD_CACHE__MAX_ENTRIES".into(), "1".into())],
            |cfg| {
                cfg.replacen(
                    "[keyspaces.orders]",
                    "[keyspaces.orders]\nmax_dek_uses = 3\ndek_use_block = 1",
                    1,
                )
            },
        )
        .await;
    let mut c = env.client(&a, "orders").await;
    let version = |ct: &[u8]| {
        let mut s = Vec::new();
        piiguard::crypto::envelope::parse(ct, &mut s)
            .unwrap()
            .header
            .dek_version
    };
    for _ in 0..3 {
        assert_eq!(version(&encrypt(&mut c, "orders", "cust-busy").await), 1);
    }
    assert_eq!(
        version(&encrypt(&mut c, "orders", "cust-busy").await),
        2,
        "the 4th encryption rotates"
    );
    // Another subject takes the only cache slot; the busy key is reloaded from Vault.
    encrypt(&mut c, "orders", "cust-other").await;
    let after: Vec<u32> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(version(&encrypt(&mut c, "orders", "cust-busy").await));
        }
        v
    };
    assert_eq!(
        after,
        vec![2, 2, 3],
        "the reloaded key counted from zero again"
    );
    // The other subject has its own budget.
    encrypt(&mut c, "orders", "cust-other").await;
}
