//! The Rust client crate (`client/`, `piiguard-client`) against a real server over real mTLS:
//! round trips through its typed helpers (a SPIFFE-style bundle folder for the order service),
//! a final error with its stable reason and no retry, a non-idempotent call not retried on
//! `UNAVAILABLE`, and a retry that succeeds once a stopped Vault is back. One server.

use std::time::Duration;

use piiguard_client::{Chunks, Client, ClientConfig, Error, Reason, RetryPolicy, pb};
use tonic::Code;

use crate::common::*;

/// Every reason the server can send is one the client crate knows by name.
#[test]
fn the_client_knows_every_server_reason() {
    for r in piiguard::error::Reason::ALL {
        let parsed = Reason::parse(r.as_str());
        assert!(
            !matches!(parsed, Reason::Other(_)),
            "piiguard-client does not know the reason {r}: add it to client/src/error.rs"
        );
        assert_eq!(parsed.as_str(), r.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_crate_round_trips_maps_errors_and_retries_only_what_it_may() {
    let mut env = TestEnv::start().await;
    let server = env.server("client-crate", "").await;
    let endpoint = server.addr.to_string();

    // The order service from a bundle folder (bundle.pem, svid.pem, svid_key.pem).
    let bundle = tempfile::tempdir().unwrap();
    let (cert, key) = env.pki.client("orders");
    std::fs::copy(&env.pki.ca, bundle.path().join(piiguard_client::BUNDLE_CA)).unwrap();
    std::fs::copy(&cert, bundle.path().join(piiguard_client::BUNDLE_CERT)).unwrap();
    std::fs::copy(&key, bundle.path().join(piiguard_client::BUNDLE_KEY)).unwrap();
    let retry = RetryPolicy {
        max_attempts: 200,
        base_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
    };
    let orders = Client::connect(
        ClientConfig::from_bundle_dir(&endpoint, bundle.path())
            .with_deadline(Duration::from_secs(90))
            .with_retry(retry),
    )
    .await
    .expect("connect with the bundle folder");
    let (ecert, ekey) = env.pki.client("erasure");
    let erasure = Client::connect(ClientConfig::from_files(
        &endpoint,
        &env.pki.ca,
        ecert,
        ekey,
    ))
    .await
    .expect("connect as erasure");

    // Round trips.
    let ct = orders
        .encrypt("orders", "cc-1", "email", b"alice@example.com")
        .await
        .unwrap();
    assert!(ct.starts_with(b"pg1."), "text form");
    assert_eq!(
        &orders.decrypt("email", &ct).await.unwrap()[..],
        b"alice@example.com"
    );
    let token = orders
        .tokenize(
            "orders",
            "cc-1",
            "email",
            "alice@example.com",
            pb::TokenMode::Deterministic,
        )
        .await
        .unwrap();
    assert_eq!(
        orders.detokenize("orders", &token).await.unwrap().as_str(),
        "alice@example.com"
    );
    let r = orders
        .encrypt_with(pb::EncryptRequest {
            keyspace: "orders".into(),
            subject: "cc-1".into(),
            field: "email".into(),
            plaintext: b"alice@example.com".to_vec(),
            blind_index: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let indexes = orders
        .blind_indexes("orders", "email", b" Alice@Example.COM")
        .await
        .unwrap();
    assert!(
        indexes.contains(&r.blind_index),
        "normalised lookup finds the row"
    );

    // A batch split into chunks of 2: 5 items, 3 calls, results in order.
    let small = orders.reconfigured(
        Duration::from_secs(30),
        RetryPolicy::default(),
        Chunks {
            max_items: 2,
            max_bytes: 1 << 20,
        },
    );
    let items: Vec<pb::EncryptRequest> = (0..5)
        .map(|i| {
            enc(
                "orders",
                &format!("cc-b{i}"),
                "email",
                format!("b{i}@example.com").as_bytes(),
            )
        })
        .collect();
    let results = small.encrypt_batch(items).await.unwrap();
    assert_eq!(results.len(), 5);
    let decs: Vec<pb::DecryptRequest> = results
        .iter()
        .map(|r| match &r.result {
            Some(pb::encrypt_result::Result::Ciphertext(c)) => dec("email", c),
            _ => panic!("an item failed"),
        })
        .collect();
    for (i, d) in small.decrypt_batch(decs).await.unwrap().iter().enumerate() {
        match &d.result {
            Some(pb::decrypt_result::Result::Plaintext(p)) => {
                assert_eq!(p, format!("b{i}@example.com").as_bytes())
            }
            _ => panic!("item {i} did not decrypt"),
        }
    }

    // A tampered ciphertext: a final error with its stable reason, one attempt, no retry.
    let before = orders.retries();
    let mut bad = orders
        .encrypt_with(enc("orders", "cc-1", "email", b"alice@example.com"))
        .await
        .unwrap()
        .ciphertext;
    *bad.last_mut().unwrap() ^= 1;
    let e = orders.decrypt("email", &bad).await.unwrap_err();
    match &e {
        Error::Rpc {
            code,
            reason,
            retryable,
            attempts,
            correlation_id,
            ..
        } => {
            assert_eq!(*code, Code::InvalidArgument);
            assert_eq!(reason.as_ref(), Some(&Reason::DecryptionFailed));
            assert!(!retryable);
            assert_eq!(*attempts, 1);
            assert!(
                correlation_id.as_deref().is_some_and(|c| c.len() == 16),
                "{e}"
            );
        }
        other => panic!("expected an RPC error: {other}"),
    }
    assert_eq!(orders.retries(), before, "a final error is not retried");

    // Shred as the deletion workflow; the shredded subject's data is refused for good.
    let r = erasure
        .shred("cc-1", "orders", "gdpr-client-1", "erasure request")
        .await
        .unwrap();
    assert_eq!(r.request_id, "gdpr-client-1");
    let st = erasure.shred_status("cc-1", "orders").await.unwrap();
    assert_eq!(st.keyspaces[0].state, pb::ShredState::Shredded as i32);
    let e = orders.decrypt("email", &ct).await.unwrap_err();
    assert_eq!(e.reason(), Some(&Reason::SubjectShredded));
    assert_eq!(e.attempts(), 1);

    // Vault stopped: a cold subject's random Tokenize is not idempotent (a repeat after a lost
    // answer would store a second token row), so its UNAVAILABLE comes back at once ...
    env.bao.stop();
    let before = orders.retries();
    let e = orders
        .tokenize(
            "orders",
            "cc-cold-t",
            "email",
            "c@example.com",
            pb::TokenMode::Random,
        )
        .await
        .unwrap_err();
    assert_eq!(e.reason(), Some(&Reason::VaultUnavailable), "{e}");
    assert!(e.is_retryable() && e.attempts() == 1, "{e}");
    assert_eq!(orders.retries(), before);

    // ... while a cold Encrypt is retried until Vault is back (restarted 2 s after the first
    // attempt failed), within its one deadline.
    let restart = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        env.bao.restart().await.expect("restart OpenBao");
    };
    let (ct, ()) = tokio::join!(
        orders.encrypt("orders", "cc-cold", "email", b"cold@example.com"),
        restart
    );
    let ct = ct.expect("a cold Encrypt succeeds once Vault is back");
    let retried = orders.retries() - before;
    println!("client-crate: cold Encrypt succeeded after {retried} retries");
    assert!(
        retried >= 1,
        "the first attempt failed while Vault was stopped"
    );
    assert_eq!(
        &orders.decrypt("email", &ct).await.unwrap()[..],
        b"cold@example.com"
    );
}
