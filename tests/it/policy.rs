//! The access policy over real mTLS: default deny, grants per operation x keyspace x field,
//! wildcard identities, hot reload (file change and SIGHUP) and broken-policy fallback.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use piiguard::pb;
use tonic::Code;

fn denied(r: Result<impl Sized, tonic::Status>) -> String {
    match r {
        Ok(_) => panic!("allowed"),
        Err(e) => {
            assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
            assert_eq!(reason(&e), "POLICY_DENIED");
            e.message().to_string()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_per_operation_keyspace_and_field_and_wildcards() {
    let env = TestEnv::start().await;
    env.write_policy(
        r#"
[[grant]]
identity = "spiffe://shop.local/batch/*"
operations = ["encrypt"]
keyspaces = ["crm"]
fields = ["email"]
"#,
    );
    let server = env.server("p", "").await;
    let mut orders = env.client(&server, "orders").await;
    let mut shipping = env.client(&server, "shipping").await;
    let mut erasure = env.client(&server, "erasure").await;
    let mut admin = env.client(&server, "admin").await;

    // orders: encrypt and decrypt everything in orders and crm.
    let addr = orders
        .encrypt(enc("orders", "cust-p1", "address", b"1 Main St"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let card = orders
        .encrypt(enc("orders", "cust-p1", "card_number", b"4111111111111111"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let crm_name = orders
        .encrypt(enc("crm", "cust-p1", "name", b"Ada"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    assert!(orders.decrypt(dec("card_number", &card)).await.is_ok());

    // shipping: decrypt address and name in orders, nothing else.
    let pt = shipping
        .decrypt(dec("address", &addr))
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(pt, b"1 Main St");
    let m = denied(shipping.decrypt(dec("card_number", &card)).await);
    assert!(
        m.contains("decrypt of field \"card_number\" in keyspace \"orders\"")
            && m.contains("spiffe://shop.local/shipping"),
        "{m}"
    );
    assert!(!m.contains("4111"), "{m}");
    let m = denied(shipping.decrypt(dec("name", &crm_name)).await);
    assert!(m.contains("in keyspace \"crm\""), "{m}");
    let m = denied(
        shipping
            .encrypt(enc("orders", "cust-p1", "address", b"x"))
            .await,
    );
    assert!(m.contains("does not grant encrypt"), "{m}");

    // erasure: never decrypts; admin: no data at all.
    let m = denied(erasure.decrypt(dec("address", &addr)).await);
    assert!(m.contains("does not grant decrypt"), "{m}");
    denied(admin.encrypt(enc("orders", "cust-p1", "email", b"x")).await);

    // Batches: each item is authorised on its own.
    let res = shipping
        .decrypt_batch(pb::DecryptBatchRequest {
            items: vec![
                dec("address", &addr),
                dec("card_number", &card),
                dec("name", &crm_name),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    use pb::decrypt_result::Result as DR;
    let got: Vec<Result<Vec<u8>, (i32, String)>> = res
        .into_iter()
        .map(|r| match r.result.unwrap() {
            DR::Plaintext(p) => Ok(p),
            DR::Error(e) => Err((e.code, e.reason)),
        })
        .collect();
    let pd = (Code::PermissionDenied as i32, "POLICY_DENIED".to_string());
    assert_eq!(
        got,
        vec![Ok(b"1 Main St".to_vec()), Err(pd.clone()), Err(pd)]
    );

    // An identity without any grant, and wildcard identities.
    let ca = env.ca();
    let stranger = ca.issue_client_now(&spiffe("stranger")).unwrap();
    let mut s = server.client_issued(&stranger).await.unwrap();
    let m = denied(s.encrypt(enc("crm", "cust-p2", "email", b"x")).await);
    assert!(
        m.contains("grants nothing to spiffe://shop.local/stranger"),
        "{m}"
    );
    let nightly = ca.issue_client_now(&spiffe("batch/nightly")).unwrap();
    let mut n = server.client_issued(&nightly).await.unwrap();
    assert!(
        n.encrypt(enc("crm", "cust-p2", "email", b"x"))
            .await
            .is_ok()
    );
    denied(n.encrypt(enc("crm", "cust-p2", "name", b"x")).await);
    denied(n.encrypt(enc("orders", "cust-p2", "email", b"x")).await);
    let batchx = ca.issue_client_now(&spiffe("batchx")).unwrap();
    let mut bx = server.client_issued(&batchx).await.unwrap();
    denied(bx.encrypt(enc("crm", "cust-p2", "email", b"x")).await);

    // Unknown keyspaces are still reported as such (validation comes before policy).
    let e = orders
        .encrypt(enc("nope", "cust-p1", "email", b"x"))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "UNKNOWN_KEYSPACE");

    // Every denial is in the audit log, naming caller, operation, keyspace and field.
    let recs = server.audit_records();
    let d: Vec<_> = recs
        .iter()
        .filter(|r| r["kind"] == "call" && r["outcome"] == "denied")
        .collect();
    assert_eq!(d.len(), 9, "{d:#?}");
    assert!(
        d.iter()
            .any(|r| r["caller"] == "spiffe://shop.local/shipping"
                && r["operation"] == "decrypt"
                && r["keyspace"] == "orders"
                && r["field"] == "card_number")
    );
    let batch = recs.iter().find(|r| r["method"] == "DecryptBatch").unwrap();
    assert_eq!(batch["outcome"], "partial");
    assert_eq!(batch["items"], 3);
    assert_eq!(batch["denied_items"], 2);
}

async fn wait_until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const STRANGER_GRANT: &str = r#"
[[grant]]
identity = "spiffe://shop.local/stranger"
operations = ["encrypt"]
keyspaces = ["crm"]
fields = ["email"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reloads_on_change_and_sighup_and_keeps_the_old_one_when_broken() {
    let env = TestEnv::start().await;
    let fast = vec![(
        "PIIGUARD_POLICY__RELOAD_INTERVAL_SECS".to_string(),
        "1".to_string(),
    )];
    let server = env.server_env("w", "", fast).await;
    let stranger = env.ca().issue_client_now(&spiffe("stranger")).unwrap();
    // One connection for the whole test: reloads do not drop connections.
    let mut s = server.client_issued(&stranger).await.unwrap();
    assert!(
        s.encrypt(enc("crm", "cust-w", "email", b"x"))
            .await
            .is_err()
    );

    // File change: picked up without restart.
    env.write_policy(STRANGER_GRANT);
    wait_until("the new policy applies", async || {
        s.encrypt(enc("crm", "cust-w", "email", b"x")).await.is_ok()
    })
    .await;
    assert!(
        server
            .audit_records()
            .iter()
            .any(|r| r["event"] == "policy_reload")
    );

    // A broken file: the previous policy stays, an alarm is raised and logged.
    std::fs::write(
        env.policy_path(),
        "[[grant]]\nidentity = \"x\"\noperations = [\"peek\"]\n",
    )
    .unwrap();
    wait_until("the broken policy is refused", async || {
        server
            .audit_records()
            .iter()
            .any(|r| r["kind"] == "alarm" && r["event"] == "policy_reload_failed")
    })
    .await;
    assert!(s.encrypt(enc("crm", "cust-w", "email", b"x")).await.is_ok());
    let log = server.log_text();
    assert!(
        log.contains("policy_reload_failed") && log.contains("unknown operation"),
        "{log}"
    );

    // SIGHUP on a server that does not watch the file.
    env.write_policy("");
    let hup_only = vec![(
        "PIIGUARD_POLICY__RELOAD_INTERVAL_SECS".to_string(),
        "0".to_string(),
    )];
    let server2 = env.server_env("h", "", hup_only).await;
    let mut s2 = server2.client_issued(&stranger).await.unwrap();
    assert!(
        s2.encrypt(enc("crm", "cust-h", "email", b"x"))
            .await
            .is_err()
    );
    env.write_policy(STRANGER_GRANT);
    // Without the signal nothing changes...
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        s2.encrypt(enc("crm", "cust-h", "email", b"x"))
            .await
            .is_err()
    );
    // ... with it, the new policy applies.
    Command::new("kill")
        .args(["-HUP", &server2.pid().to_string()])
        .status()
        .unwrap();
    wait_until("SIGHUP reloads the policy", async || {
        s2.encrypt(enc("crm", "cust-h", "email", b"x"))
            .await
            .is_ok()
    })
    .await;
}

#[test]
fn policy_check_cli() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, piiguard::setup::dev::DEV_POLICY).unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[grant]]\nidentity = \"a\"\noperations = [\"decrypt\"]\n",
    )
    .unwrap();
    let run = |f: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_piiguard"))
            .args(["policy", "check"])
            .arg(f)
            .output()
            .unwrap()
    };
    let ok = run(&good);
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("valid, 5 grant(s)"));
    let no = run(&bad);
    assert_eq!(no.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&no.stderr).contains("`keyspaces` is required"));
}
