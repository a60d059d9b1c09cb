//! The subject registry's state machine, on SQLite and on a real PostgreSQL server: the same
//! schema, the same queries, the same expectations.

use crate::common::Postgres;
use piiguard::store::tokens::{AddValue, NewToken, TokenState, TokenWrite};
use piiguard::store::{Certified, ShredClaim, Store, SubjectState};

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
    s.register_subject("ks", "a", 1, None, false).await.unwrap();
    assert_eq!(
        s.state("ks", "a").await.unwrap(),
        Some(SubjectState::Active)
    );
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
    s.register_subject("ks", "a", 4, None, true).await.unwrap();
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
    s.register_subject("ks", "a", 7, None, false).await.unwrap();
    assert_eq!(
        s.state("ks", "a").await.unwrap(),
        Some(SubjectState::Shredded)
    );
    // ...a new key after a shred (where the keyspace allows it) does.
    s.register_subject("ks", "a", 7, None, true).await.unwrap();
    assert_eq!(
        s.state("ks", "a").await.unwrap(),
        Some(SubjectState::Active)
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
