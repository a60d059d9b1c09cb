//! The subject registry's state machine, on SQLite and on a real PostgreSQL server: the same
//! schema, the same queries, the same expectations. Then the schema set-up under concurrency
//! (replicas starting together, a rolling upgrade, a newer schema) and the store going away
//! under load (docs/RELIABILITY.md).

use std::time::{Duration, Instant};

use crate::common::*;
use piiguard::error::Error;
use piiguard::store::tokens::{AddValue, NewToken, TokenState, TokenWrite};
use piiguard::store::{
    Certified, SCHEMA_COMPATIBLE_FROM, SCHEMA_VERSION, SchemaVersion, ShredClaim, Store,
    SubjectState,
};

fn claim(intent: &str) -> ShredClaim<'_> {
    ShredClaim {
        intent,
        request_id: "r1",
        reason: "gdpr",
        requested_at: 10,
    }
}

fn cert(certificate_id: &str, executed_at: i64) -> Certified<'_> {
    Certified {
        certificate_id,
        request_id: "r1",
        document: "{}",
        executed_at,
    }
}

async fn claims_are_exclusive(s: &Store) {
    s.register_subject("ks", "a", "0a01", 1, None, false)
        .await
        .unwrap();
    assert_eq!(
        s.state("ks", "a").await.unwrap(),
        Some(SubjectState::Active)
    );
    assert_eq!(
        s.subject_of_key("ks", "0a01").await.unwrap().as_deref(),
        Some("a")
    );
    assert_eq!(s.subject_of_key("other", "0a01").await.unwrap(), None);
    assert!(
        s.claim_shred("ks", "a", &claim("[]"), 2, "o1")
            .await
            .unwrap()
    );
    assert!(
        !s.claim_shred("ks", "a", &claim("[]"), 3, "o2")
            .await
            .unwrap(),
        "second claim"
    );
    // Registering again while shredding changes nothing.
    s.register_subject("ks", "a", "0a09", 4, None, true)
        .await
        .unwrap();
    assert_eq!(
        s.state("ks", "a").await.unwrap(),
        Some(SubjectState::Shredding)
    );
    assert!(
        !s.finish_shred("ks", "a", "o2", &cert("c0", 5))
            .await
            .unwrap(),
        "only the lease owner finishes"
    );
    assert!(
        s.finish_shred("ks", "a", "o1", &cert("c1", 5))
            .await
            .unwrap()
    );
    assert!(
        !s.finish_shred("ks", "a", "o1", &cert("c2", 6))
            .await
            .unwrap(),
        "finished once"
    );
    let row = s.subject("ks", "a").await.unwrap().unwrap();
    assert_eq!(row.state, SubjectState::Shredded);
    assert_eq!(row.certificate.as_deref(), Some("{}"));
    assert_eq!(row.executed_at, Some(5));
    // A key made by a load that did not see the shred done does not re-activate it...
    s.register_subject("ks", "a", "0a08", 7, None, false)
        .await
        .unwrap();
    assert_eq!(
        s.state("ks", "a").await.unwrap(),
        Some(SubjectState::Shredded)
    );
    for not_recorded in ["0a08", "0a09"] {
        assert_eq!(s.subject_of_key("ks", not_recorded).await.unwrap(), None);
    }
    // ...a new key after a shred (where the keyspace allows it) does.
    s.register_subject("ks", "a", "0a02", 7, None, true)
        .await
        .unwrap();
    assert_eq!(
        s.state("ks", "a").await.unwrap(),
        Some(SubjectState::Active)
    );
    assert_eq!(
        s.subject_of_key("ks", "0a02").await.unwrap().as_deref(),
        Some("a")
    );
    // A row made before its key (a retention set first) gets the key id at registration.
    s.set_retention("ks-early", "early", None, 8).await.unwrap();
    assert_eq!(s.subject_of_key("ks-early", "0a03").await.unwrap(), None);
    s.register_subject("ks-early", "early", "0a03", 9, None, false)
        .await
        .unwrap();
    assert_eq!(
        s.subject_of_key("ks-early", "0a03")
            .await
            .unwrap()
            .as_deref(),
        Some("early")
    );
    assert_eq!(s.state("ks", "zz").await.unwrap(), None);
}

async fn schedule_cancel_and_due(s: &Store) {
    assert!(s.schedule("ks", "b", 100, &claim("[]"), 50).await.unwrap());
    assert!(!s.schedule("ks", "b", 200, &claim("[]"), 51).await.unwrap());
    let due = |now| s.due(now, 0, &["ks"], None, 10);
    assert!(due(99).await.unwrap().is_empty());
    assert_eq!(due(100).await.unwrap().len(), 1);
    assert!(s.cancel("ks", "b", 60).await.unwrap());
    assert!(!s.cancel("ks", "b", 61).await.unwrap());
    assert!(due(100).await.unwrap().is_empty());
    s.set_retention("ks", "c", Some(80), 60).await.unwrap();
    let rows = due(81).await.unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| (
                r.keyspace.as_str(),
                r.subject_ref.as_str(),
                r.state,
                r.due_at
            ))
            .collect::<Vec<_>>(),
        vec![("ks", "c", SubjectState::Active, 80)]
    );
    assert!(s.schedule("ks", "d", 10, &claim("[]"), 5).await.unwrap());
    assert!(s.claim_pending("ks", "d", 10, 0, "o1").await.unwrap());
    assert!(
        !s.claim_pending("ks", "d", 11, 0, "o2").await.unwrap(),
        "not stale yet"
    );
    assert!(
        s.claim_pending("ks", "d", 30, 20, "o2").await.unwrap(),
        "stale takeover"
    );
}

async fn tombstones_and_eviction_feed(s: &Store) {
    s.add_tombstones("ks", "a", &["k1".into(), "k2".into()], 5)
        .await
        .unwrap();
    s.add_tombstones("ks", "a", &["k1".into()], 6)
        .await
        .unwrap();
    assert_eq!(
        s.tombstone("ks", "k1").await.unwrap(),
        Some(("a".into(), 5))
    );
    assert_eq!(s.tombstone("ks", "zz").await.unwrap(), None);
    assert_eq!(s.last_eviction_seq().await.unwrap(), 0);
    s.publish_eviction("ks", "a", "[]", 1).await.unwrap();
    s.publish_eviction("ks", "b", "[]", 2).await.unwrap();
    let ev = s.evictions_since(0, 10).await.unwrap();
    assert_eq!(ev.len(), 2);
    assert_eq!(
        s.evictions_since(ev[0].seq, 10).await.unwrap()[0].subject_ref,
        "b"
    );
    assert_eq!(s.last_eviction_seq().await.unwrap(), ev[1].seq);
    assert_eq!(s.prune_evictions(2).await.unwrap(), 1);
    let left = s.evictions_since(0, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].subject_ref, "b");
    // Sequence numbers keep growing after a prune.
    assert_eq!(s.last_eviction_seq().await.unwrap(), ev[1].seq);
}

fn token<'a>(th: &'a str, vh: Option<&'a str>, sref: &'a str) -> NewToken<'a> {
    NewToken {
        keyspace: "ks",
        token_hash: th,
        field: "email",
        format: "opaque",
        value_hash: vh,
        attempt: 0,
        subject_ref: sref,
        sealed: "pg1.sealed",
        now: 10,
        expires_at: None,
    }
}

/// Token writes grouped in one transaction (multi-row inserts with RETURNING), read-first
/// lookups, shred and expiry.
async fn token_writes(s: &Store) {
    let names: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
    let mut ops: Vec<TokenWrite<'_>> = names
        .iter()
        .map(|n| TokenWrite::Insert(token(n, None, "a")))
        .collect();
    ops.push(TokenWrite::Insert(token("t1", None, "b"))); // duplicate token hash
    ops.push(TokenWrite::Insert(token("d1", Some("v"), "a")));
    ops.push(TokenWrite::Insert(token("d2", Some("v"), "b"))); // duplicate value hash
    let out = s.write_tokens(&ops).await.unwrap();
    assert!(out[..40].iter().all(|&ok| ok));
    assert_eq!(&out[40..], &[false, true, false]);
    // A second group: a stored token, a stored value, and a value added to a stored token.
    let ops = [
        TokenWrite::Insert(token("t5", None, "c")),
        TokenWrite::Insert(token("d3", Some("v"), "c")),
        TokenWrite::AddValue(AddValue {
            keyspace: "ks",
            token_hash: "d1",
            subject_ref: "b",
            sealed: "pg1.b",
            now: 11,
            expires_at: Some(50),
        }),
    ];
    assert_eq!(
        s.write_tokens(&ops).await.unwrap(),
        vec![false, false, true]
    );
    assert_eq!(s.token_counts("ks").await.unwrap(), (42, 41));
    let d = s.token_by_value("ks", "v", "b").await.unwrap().unwrap();
    assert_eq!((d.token_hash.as_str(), d.mine), ("d1", true));
    assert_eq!(d.expires_at, Some(50));
    assert!(
        !s.token_by_value("ks", "v", "c")
            .await
            .unwrap()
            .unwrap()
            .mine
    );
    assert_eq!(s.token("ks", "d1").await.unwrap().unwrap().sealed.len(), 2);
    // Expiry, then a shred of "a": t* become tombstones.
    assert_eq!(s.purge_expired_tokens(60, None).await.unwrap(), 1);
    assert_eq!(
        s.token("ks", "d1").await.unwrap().unwrap().state,
        TokenState::Expired
    );
    assert_eq!(s.purge_subject_tokens("ks", "a", 70).await.unwrap(), 40);
    assert_eq!(
        s.token("ks", "t7").await.unwrap().unwrap().state,
        TokenState::Shredded
    );
    assert_eq!(s.token_counts("ks").await.unwrap(), (0, 41));
}

async fn exercise(url: &str) {
    let s = Store::open(url).await.expect("open store");
    // Opening twice (a second replica, a restart) keeps the schema and the data.
    claims_are_exclusive(&s).await;
    let s = Store::open(url).await.expect("reopen store");
    assert_eq!(
        s.state("ks", "a").await.unwrap(),
        Some(SubjectState::Active)
    );
    schedule_cancel_and_due(&s).await;
    tombstones_and_eviction_feed(&s).await;
    token_writes(&s).await;
}

#[tokio::test]
async fn sqlite_store() {
    let d = tempfile::tempdir().unwrap();
    exercise(&format!("sqlite://{}", d.path().join("t.db").display())).await;
}

#[tokio::test]
async fn postgres_store() {
    let pg = Postgres::start();
    exercise(&pg.url).await;
}

// ---- Schema set-up: versions, replicas starting together, rolling upgrade (issue 13) ----

async fn set_schema_version(url: &str, version: i64, compatible_from: i64) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.unwrap();
    sqlx::query("UPDATE schema_version SET version = $1, compatible_from = $2 WHERE id = 1")
        .bind(version)
        .bind(compatible_from)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}

/// The schema version is recorded; a newer schema that accepts this binary is used as it is
/// (not downgraded), one that does not is refused with a message saying what to do.
async fn newer_schema_is_used_or_refused(url: &str) {
    let s = Store::open(url).await.expect("open");
    assert_eq!(
        s.schema_version().await.unwrap(),
        Some(SchemaVersion {
            version: SCHEMA_VERSION,
            compatible_from: SCHEMA_COMPATIBLE_FROM
        })
    );
    s.register_subject("ks", "kept", "00", 1, None, false)
        .await
        .unwrap();
    drop(s);
    set_schema_version(url, SCHEMA_VERSION + 5, SCHEMA_VERSION).await;
    let s = Store::open(url)
        .await
        .expect("a compatible newer schema opens");
    assert_eq!(
        s.schema_version().await.unwrap().unwrap().version,
        SCHEMA_VERSION + 5,
        "an older binary does not rewrite a newer schema's version"
    );
    assert_eq!(
        s.state("ks", "kept").await.unwrap(),
        Some(SubjectState::Active)
    );
    drop(s);
    set_schema_version(url, SCHEMA_VERSION + 5, SCHEMA_VERSION + 1).await;
    let e = Store::open(url)
        .await
        .expect_err("an incompatible newer schema is refused");
    let Error::Internal { detail } = &e else {
        panic!("{e:?}")
    };
    assert!(detail.contains("upgrade piiguard"), "{detail}");
}

#[tokio::test]
async fn sqlite_newer_schema_is_used_or_refused() {
    let d = tempfile::tempdir().unwrap();
    newer_schema_is_used_or_refused(&format!("sqlite://{}", d.path().join("t.db").display())).await;
}

#[tokio::test]
async fn postgres_newer_schema_is_used_or_refused() {
    let pg = Postgres::start();
    newer_schema_is_used_or_refused(&pg.url).await;
}

/// A store made by a schema-2 binary (token values in `token_values`), with a random token, a
/// join token held by two subjects, a TTL'd token and two tombstones.
async fn make_schema_2_tokens(url: &str) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.unwrap();
    for stmt in [
        "CREATE TABLE schema_version (id BIGINT PRIMARY KEY, version BIGINT NOT NULL,
            compatible_from BIGINT NOT NULL, updated_at BIGINT NOT NULL)",
        "INSERT INTO schema_version VALUES (1, 2, 1, 1)",
        "CREATE TABLE token_map (keyspace TEXT NOT NULL, token_hash TEXT NOT NULL,
            field TEXT NOT NULL, format TEXT NOT NULL, value_hash TEXT, attempt BIGINT NOT NULL,
            state TEXT NOT NULL, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL,
            expires_at BIGINT, PRIMARY KEY (keyspace, token_hash))",
        "CREATE UNIQUE INDEX token_map_by_value ON token_map (keyspace, value_hash)",
        "CREATE INDEX token_map_by_expiry ON token_map (state, expires_at)",
        "CREATE TABLE token_values (keyspace TEXT NOT NULL, token_hash TEXT NOT NULL,
            subject_ref TEXT NOT NULL, sealed TEXT NOT NULL, created_at BIGINT NOT NULL,
            PRIMARY KEY (keyspace, token_hash, subject_ref))",
        "CREATE INDEX token_values_by_subject ON token_values (keyspace, subject_ref)",
        "INSERT INTO token_map VALUES
            ('ks', 'r1', 'email', 'opaque', NULL, 0, 'live', 1, 1, NULL),
            ('ks', 'j1', 'email', 'opaque', 'vj', 0, 'live', 1, 1, NULL),
            ('ks', 't1', 'email', 'opaque', NULL, 0, 'live', 1, 1, 100),
            ('ks', 'e1', 'email', 'opaque', NULL, 0, 'expired', 1, 1, 5),
            ('ks', 's1', 'email', 'opaque', NULL, 0, 'shredded', 1, 1, NULL)",
        "INSERT INTO token_values VALUES
            ('ks', 'r1', 'a', 'pg1.r1a', 1),
            ('ks', 'j1', 'b', 'pg1.j1b', 1),
            ('ks', 'j1', 'a', 'pg1.j1a', 2),
            ('ks', 't1', 'c', 'pg1.t1c', 1)",
    ] {
        sqlx::query(stmt).execute(&pool).await.unwrap();
    }
    pool.close().await;
}

/// Schema 4 moved each token's first value into its `token_map` row: a schema-2 store opened
/// by this binary is upgraded in place and every token keeps working (Detokenize reads,
/// read-first lookups, shred, expiry, new writes); `token_values` is gone, so a schema-2
/// binary still running against it fails instead of answering from half the values.
async fn schema_2_tokens_survive_the_upgrade(url: &str) {
    make_schema_2_tokens(url).await;
    let s = Store::open(url).await.expect("upgrade");
    assert_eq!(
        s.schema_version().await.unwrap(),
        Some(SchemaVersion {
            version: SCHEMA_VERSION,
            compatible_from: SCHEMA_COMPATIBLE_FROM
        })
    );
    let r1 = s.token("ks", "r1").await.unwrap().unwrap();
    assert_eq!(
        (r1.state, r1.sealed, r1.subject_refs),
        (
            TokenState::Live,
            vec!["pg1.r1a".to_string()],
            vec!["a".to_string()]
        )
    );
    let mut j1 = s.token("ks", "j1").await.unwrap().unwrap().sealed;
    j1.sort();
    assert_eq!(j1, ["pg1.j1a", "pg1.j1b"], "both holders' values kept");
    for (sref, mine) in [("a", true), ("b", true), ("z", false)] {
        let d = s.token_by_value("ks", "vj", sref).await.unwrap().unwrap();
        assert_eq!((d.token_hash.as_str(), d.mine), ("j1", mine), "{sref}");
    }
    assert_eq!(
        s.token("ks", "e1").await.unwrap().unwrap().state,
        TokenState::Expired
    );
    assert_eq!(
        s.token("ks", "s1").await.unwrap().unwrap().state,
        TokenState::Shredded
    );
    assert_eq!(s.token_counts("ks").await.unwrap(), (4, 5));
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.unwrap();
    assert!(
        sqlx::query("SELECT COUNT(*) AS n FROM token_values")
            .fetch_one(&pool)
            .await
            .is_err(),
        "token_values is dropped"
    );
    pool.close().await;
    // Opening again changes nothing.
    let s = Store::open(url).await.expect("reopen");
    assert_eq!(s.token_counts("ks").await.unwrap(), (4, 5));
    // Shred of "a": its random token becomes a tombstone, the join token lives on with b's.
    assert_eq!(s.purge_subject_tokens("ks", "a", 50).await.unwrap(), 2);
    assert_eq!(
        s.token("ks", "r1").await.unwrap().unwrap().state,
        TokenState::Shredded
    );
    let j1 = s.token("ks", "j1").await.unwrap().unwrap();
    assert_eq!(
        (j1.state, j1.sealed),
        (TokenState::Live, vec!["pg1.j1b".to_string()])
    );
    assert!(
        !s.token_by_value("ks", "vj", "a")
            .await
            .unwrap()
            .unwrap()
            .mine
    );
    // Expiry of t1; then b's shred leaves j1 without a holder.
    assert_eq!(s.purge_expired_tokens(101, None).await.unwrap(), 1);
    assert_eq!(s.purge_subject_tokens("ks", "b", 60).await.unwrap(), 1);
    assert_eq!(
        s.token("ks", "j1").await.unwrap().unwrap().state,
        TokenState::Shredded
    );
    assert!(
        s.token_by_value("ks", "vj", "b").await.unwrap().is_none(),
        "value hash dropped"
    );
    assert_eq!(s.token_counts("ks").await.unwrap(), (0, 5));
    // New writes on the upgraded store.
    assert!(s.insert_token(&token("n1", None, "d")).await.unwrap());
    assert!(
        s.add_token_value("ks", "n1", "e", "pg1.n1e", 70, None)
            .await
            .unwrap()
    );
    assert_eq!(s.token("ks", "n1").await.unwrap().unwrap().sealed.len(), 2);
    assert_eq!(s.token_counts("ks").await.unwrap(), (2, 6));
}

#[tokio::test]
async fn sqlite_schema_2_tokens_survive_the_upgrade() {
    let d = tempfile::tempdir().unwrap();
    schema_2_tokens_survive_the_upgrade(&format!(
        "sqlite://{}?mode=rwc",
        d.path().join("t.db").display()
    ))
    .await;
}

#[tokio::test]
async fn postgres_schema_2_tokens_survive_the_upgrade() {
    let pg = Postgres::start();
    schema_2_tokens_survive_the_upgrade(&pg.url).await;
}

/// The token-value move runs before the server listens (health included) and can take
/// minutes on a large store (docs/OPERATIONS.md): the server says when it begins and how long
/// it took, so an operator watching a silent start knows why.
#[tokio::test]
async fn a_server_upgrading_the_token_store_says_so_before_and_after() {
    let env = TestEnv::start().await;
    make_schema_2_tokens(&format!("{}?mode=rwc", env.store_url)).await;
    let server = env.server("s", "").await;
    let log = server.log_text();
    let begins = log
        .find("store upgrade: moving every token value")
        .expect("the move is announced");
    let ends = log
        .find("store upgrade: token values moved")
        .expect("its end is logged");
    assert!(begins < ends);
}

/// Starts `n` `piiguard serve` processes at the same instant (each is spawned at the first
/// poll of its future, before any of them waits), and waits until all are ready.
async fn start_together(env: &TestEnv, stem: &str, n: usize) -> Vec<Server> {
    let names: Vec<String> = (0..n).map(|i| format!("{stem}{i}")).collect();
    futures_util::future::join_all(names.iter().map(|name| env.server(name, ""))).await
}

/// Every replica serves a cold Encrypt (store read and write) and a Decrypt.
async fn all_serve(env: &TestEnv, servers: &[Server], stem: &str) {
    for (i, s) in servers.iter().enumerate() {
        let mut c = env.client(s, "orders").await;
        let subject = format!("cust-{stem}-{i}");
        let ct = c
            .encrypt(enc("orders", &subject, "email", b"a@example.com"))
            .await
            .unwrap()
            .into_inner()
            .ciphertext;
        let pt = c.decrypt(dec("email", &ct)).await.unwrap().into_inner();
        assert_eq!(pt.plaintext, b"a@example.com");
    }
}

/// Issue 13: replicas started together on an empty PostgreSQL raced on the schema set-up and
/// one failed ("duplicate key value violates unique constraint pg_type_typname_nsp_index").
#[tokio::test]
async fn replicas_started_together_on_an_empty_postgres_all_serve() {
    let pg = Postgres::start();
    let env = TestEnv::start_with_store(Some(pg.url.clone())).await;
    let started = Instant::now();
    let servers = start_together(&env, "fresh", 6).await;
    eprintln!(
        "RELIABILITY replicas-together: 6 replicas ready on an empty PostgreSQL in {:?}",
        started.elapsed()
    );
    all_serve(&env, &servers, "fresh").await;
    let s = Store::open(&pg.url).await.unwrap();
    assert_eq!(
        s.schema_version().await.unwrap().map(|v| v.version),
        Some(SCHEMA_VERSION)
    );
}

/// A database made by the first release (before the `ADD COLUMN` upgrades and before schema
/// versions), with a subject in it; three replicas of this binary start on it together.
#[tokio::test]
async fn rolling_upgrade_replicas_start_together_on_an_old_postgres_schema() {
    let pg = Postgres::start();
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&pg.url).await.unwrap();
    for stmt in [
        "CREATE TABLE subjects (
            keyspace TEXT NOT NULL, subject_ref TEXT NOT NULL, state TEXT NOT NULL,
            created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL, retain_until BIGINT,
            shred_at BIGINT, request_id TEXT, reason TEXT, requested_at BIGINT, intent TEXT,
            executed_at BIGINT, certificate TEXT, PRIMARY KEY (keyspace, subject_ref))",
        "CREATE TABLE tombstones (keyspace TEXT NOT NULL, key_id TEXT NOT NULL,
            subject_ref TEXT NOT NULL, shredded_at BIGINT NOT NULL, PRIMARY KEY (keyspace, key_id))",
        "CREATE TABLE evictions (seq BIGSERIAL PRIMARY KEY, keyspace TEXT NOT NULL,
            subject_ref TEXT NOT NULL, intent TEXT NOT NULL, at BIGINT NOT NULL)",
        "CREATE TABLE certificates (certificate_id TEXT PRIMARY KEY, keyspace TEXT NOT NULL,
            subject_ref TEXT NOT NULL, request_id TEXT NOT NULL, issued_at BIGINT NOT NULL,
            document TEXT NOT NULL)",
        "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at)
            VALUES ('ks', 'old-subject', 'active', 1, 1)",
    ] {
        sqlx::query(stmt).execute(&pool).await.unwrap();
    }
    pool.close().await;
    let env = TestEnv::start_with_store(Some(pg.url.clone())).await;
    let servers = start_together(&env, "upgrade", 3).await;
    all_serve(&env, &servers, "upgrade").await;
    let s = Store::open(&pg.url).await.unwrap();
    assert_eq!(
        s.schema_version().await.unwrap().map(|v| v.version),
        Some(SCHEMA_VERSION)
    );
    let old = s.subject("ks", "old-subject").await.unwrap().unwrap();
    assert_eq!(old.state, SubjectState::Active, "old rows are kept");
    // The upgraded columns work on the old row (reaper backoff, lease owner).
    assert!(
        s.claim_shred("ks", "old-subject", &claim("[]"), 2, "o1")
            .await
            .unwrap()
    );
}

// ---- Store unavailable (issue 13) ----

fn is_store_unavailable(e: &tonic::Status) -> bool {
    e.code() == tonic::Code::Unavailable && reason(e) == "STORE_UNAVAILABLE"
}

/// PostgreSQL stopped under load: warm Encrypt/Decrypt keep working (no store on the warm
/// path); calls that need the store fail with UNAVAILABLE / STORE_UNAVAILABLE (never INTERNAL,
/// never a wrong answer) and write nothing (no subject row, no DEK in Vault, no token, no
/// half-done shred); once PostgreSQL is back the same process serves them again.
#[tokio::test]
async fn postgres_stopped_under_load_fails_cleanly_and_recovers() {
    use piiguard::pb;
    use piiguard::pb::tokens_client::TokensClient;

    let pg = Postgres::start();
    let env = TestEnv::start_with_store(Some(pg.url.clone())).await;
    let mut server = env.server("outage", "").await;
    let c = env.client(&server, "orders").await;
    let t = TokensClient::new(env.channel(&server, "orders").await);
    let mut e = env.erasure(&server).await;
    let pt: &[u8] = b"warm@example.com";
    let warm_ct = c
        .clone()
        .encrypt(enc("orders", "cust-warm", "email", pt))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;

    pg.stop();
    let outage = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    // 240 warm calls (half Encrypt, half Decrypt), 24 cold Encrypts of new subjects, 12
    // Tokenizes: 276 calls at once.
    for i in 0..240 {
        let mut c = c.clone();
        let ct = warm_ct.clone();
        tasks.spawn(async move {
            if i % 2 == 0 {
                let r = c.encrypt(enc("orders", "cust-warm", "email", pt)).await;
                let ct = r.map(|r| r.into_inner().ciphertext);
                let back = match ct {
                    Ok(ct) => c.decrypt(dec("email", &ct)).await.map(|r| r.into_inner()),
                    Err(e) => Err(e),
                };
                ("warm", back.map(|r| r.plaintext == pt))
            } else {
                let r = c.decrypt(dec("email", &ct)).await;
                ("warm", r.map(|r| r.into_inner().plaintext == pt))
            }
        });
    }
    for i in 0..24 {
        let mut c = c.clone();
        tasks.spawn(async move {
            let r = c
                .encrypt(enc("orders", &format!("cust-cold-{i}"), "email", pt))
                .await;
            ("cold", r.map(|_| true))
        });
    }
    for i in 0..12 {
        let mut t = t.clone();
        tasks.spawn(async move {
            let r = t
                .tokenize(pb::TokenizeRequest {
                    keyspace: "orders".into(),
                    subject: "cust-warm".into(),
                    field: "email".into(),
                    value: format!("v{i}@example.com"),
                    format: pb::TokenFormat::Opaque as i32,
                    mode: pb::TokenMode::Random as i32,
                    keep_last: 0,
                    ttl_seconds: 0,
                })
                .await;
            ("tokenize", r.map(|_| true))
        });
    }
    let shred = e
        .shred(pb::ShredRequest {
            subject: "cust-warm".into(),
            keyspace: "orders".into(),
            reason: "GDPR art. 17".into(),
            request_id: "outage-1".into(),
        })
        .await;
    let shred_err = shred.expect_err("a shred without the store fails");
    assert!(is_store_unavailable(&shred_err), "shred: {shred_err:?}");
    let mut counts = std::collections::BTreeMap::<(&str, &str), usize>::new();
    while let Some(r) = tasks.join_next().await {
        let (kind, r) = r.unwrap();
        let seen = match (kind, r) {
            ("warm", Ok(true)) => "ok",
            (_, Ok(false)) => panic!("{kind}: a wrong answer during the outage"),
            ("warm", Err(e)) => panic!("warm call failed: {e:?}"),
            (_, Ok(_)) => panic!("{kind} succeeded without the store"),
            (_, Err(e)) if is_store_unavailable(&e) => "STORE_UNAVAILABLE",
            (_, Err(e)) => panic!("{kind}: {e:?}"),
        };
        *counts.entry((kind, seen)).or_default() += 1;
    }
    let window = outage.elapsed();
    assert_eq!(
        counts,
        [
            (("cold", "STORE_UNAVAILABLE"), 24),
            (("tokenize", "STORE_UNAVAILABLE"), 12),
            (("warm", "ok"), 240),
        ]
        .into_iter()
        .collect()
    );
    assert!(!server.exited(), "the server survived the outage");

    pg.restart();
    let back = Instant::now();
    let mut c2 = c.clone();
    let deadline = back + Duration::from_secs(60);
    loop {
        match c2.encrypt(enc("orders", "cust-after", "email", pt)).await {
            Ok(_) => break,
            Err(e) => {
                assert!(is_store_unavailable(&e), "after restart: {e:?}");
                assert!(Instant::now() < deadline, "no recovery in 60 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let recovery = back.elapsed();
    eprintln!(
        "RELIABILITY postgres-stopped: 276 calls during the outage ({counts:?}) answered in {window:?}; first cold Encrypt served {recovery:?} after PostgreSQL accepted connections again"
    );

    // Nothing half-written: only the two subjects that were served exist, in Vault and in the
    // store; no token, no shred claim, no certificate.
    assert_eq!(env.list_key_ids("orders").await.len(), 2);
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&pg.url).await.unwrap();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            use sqlx::Row as _;
            sqlx::query(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
                .get::<i64, _>("n")
        }
    };
    assert_eq!(
        count("SELECT COUNT(*) AS n FROM subjects WHERE state = 'active'").await,
        2
    );
    assert_eq!(count("SELECT COUNT(*) AS n FROM subjects").await, 2);
    assert_eq!(count("SELECT COUNT(*) AS n FROM token_map").await, 0);
    assert_eq!(count("SELECT COUNT(*) AS n FROM certificates").await, 0);
    // The same calls work again: Tokenize, and the shred, which completes.
    t.clone()
        .tokenize(pb::TokenizeRequest {
            keyspace: "orders".into(),
            subject: "cust-warm".into(),
            field: "email".into(),
            value: "v@example.com".into(),
            format: pb::TokenFormat::Opaque as i32,
            mode: pb::TokenMode::Random as i32,
            keep_last: 0,
            ttl_seconds: 0,
        })
        .await
        .unwrap();
    e.shred(pb::ShredRequest {
        subject: "cust-warm".into(),
        keyspace: "orders".into(),
        reason: "GDPR art. 17".into(),
        request_id: "outage-2".into(),
    })
    .await
    .unwrap();
    let err = c2
        .decrypt(dec("email", &warm_ct))
        .await
        .err()
        .expect("shredded");
    assert_eq!(reason(&err), "SUBJECT_SHREDDED");
    assert_eq!(count("SELECT COUNT(*) AS n FROM certificates").await, 1);
    server.stop();
}
