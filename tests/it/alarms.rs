//! Rate limits, volume budgets, lockout and unlock, canaries, alarms (audit record, metric,
//! log line, webhook), the metrics endpoint, and a full scenario scanned for planted PII.

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use piiguard::pb;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

fn exhausted(r: Result<impl Sized, tonic::Status>, want: &str) -> String {
    match r {
        Ok(_) => panic!("allowed, expected {want}"),
        Err(e) => {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            assert_eq!(reason(&e), want);
            e.message().to_string()
        }
    }
}

fn alarms(server: &Server, kind: &str) -> Vec<Value> {
    server
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "alarm" && r["event"] == kind)
        .collect()
}

const TEST_IDS: &str = r#"
[[grant]]
identity = "spiffe://shop.local/rate"
operations = ["encrypt"]
keyspaces = ["crm"]
fields = ["email"]

[[grant]]
identity = "spiffe://shop.local/prober"
operations = ["decrypt"]
keyspaces = ["orders"]
fields = ["address"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_volume_budget_lockout_and_unlock() {
    let env = TestEnv::start().await;
    env.write_policy(TEST_IDS);
    let server = env
        .server(
            "l",
            r#"
[limits]
calls = ["100000/1d"]
[limits.identity."spiffe://shop.local/rate"]
calls = ["3/1h", "10/1d"]
[limits.identity."spiffe://shop.local/shipping"]
revealed_items = ["4/1h", "100/1d"]

[lockout]
max_failures = 3
window_secs = 3600
cooldown_secs = 3600
"#,
        )
        .await;
    let ca = env.ca();
    let mut orders = env.client(&server, "orders").await;

    // Call-rate limit: 3 per hour for `rate`, then RESOURCE_EXHAUSTED and one alarm.
    let mut rate = server
        .client_issued(&ca.issue_client_now(&spiffe("rate")).unwrap())
        .await
        .unwrap();
    for i in 0..3 {
        rate.encrypt(enc("crm", &format!("cust-l{i}"), "email", b"x"))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let m = exhausted(
            rate.encrypt(enc("crm", "cust-l9", "email", b"x")).await,
            "RATE_LIMITED",
        );
        assert!(m.contains("3/1h calls"), "{m}");
    }
    // Other identities are not affected.
    orders
        .encrypt(enc("crm", "cust-l9", "email", b"x"))
        .await
        .unwrap();
    let a = alarms(&server, "rate_limit");
    assert_eq!(a.len(), 1, "one alarm per window: {a:#?}");
    assert_eq!(a[0]["caller"], "spiffe://shop.local/rate");
    assert_eq!(a[0]["severity"], "warning");

    // Volume budget: shipping may reveal 4 items per hour, counted per item, batches included.
    let mut shipping = env.client(&server, "shipping").await;
    let cts: Vec<Vec<u8>> = {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(
                orders
                    .encrypt(enc("orders", &format!("cust-v{i}"), "address", b"addr"))
                    .await
                    .unwrap()
                    .into_inner()
                    .ciphertext,
            );
        }
        v
    };
    shipping.decrypt(dec("address", &cts[0])).await.unwrap();
    shipping.decrypt(dec("address", &cts[1])).await.unwrap();
    let batch = |n: usize| pb::DecryptBatchRequest {
        items: cts[..n].iter().map(|c| dec("address", c)).collect(),
    };
    let m = exhausted(
        shipping.decrypt_batch(batch(3)).await,
        "VOLUME_BUDGET_EXCEEDED",
    );
    assert!(m.contains("4/1h revealed items"), "{m}");
    let ok = shipping.decrypt_batch(batch(2)).await.unwrap().into_inner();
    assert_eq!(ok.results.len(), 2);
    exhausted(
        shipping.decrypt(dec("address", &cts[3])).await,
        "VOLUME_BUDGET_EXCEEDED",
    );
    assert_eq!(alarms(&server, "volume_budget").len(), 1);

    // Lockout: 3 denied or failed calls lock the identity out, even for allowed calls.
    let mut prober = server
        .client_issued(&ca.issue_client_now(&spiffe("prober")).unwrap())
        .await
        .unwrap();
    let card = orders
        .encrypt(enc("orders", "cust-k", "card_number", b"4111111111111111"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let addr = &cts[0];
    assert!(prober.decrypt(dec("address", addr)).await.is_ok());
    for _ in 0..2 {
        let Err(e) = prober.decrypt(dec("card_number", &card)).await else {
            panic!("allowed")
        };
        assert_eq!(e.code(), Code::PermissionDenied);
    }
    let mut tampered = addr.clone();
    *tampered.last_mut().unwrap() ^= 1;
    let Err(e) = prober.decrypt(dec("address", &tampered)).await else {
        panic!("accepted")
    };
    assert_eq!(reason(&e), "DECRYPTION_FAILED");
    let m = exhausted(prober.decrypt(dec("address", addr)).await, "LOCKED_OUT");
    assert!(
        m.contains("spiffe://shop.local/prober is locked out until"),
        "{m}"
    );
    let lock = alarms(&server, "lockout");
    assert_eq!(lock.len(), 1);
    assert_eq!(lock[0]["severity"], "critical");
    assert_eq!(lock[0]["caller"], "spiffe://shop.local/prober");

    // Admin lists and lifts lockouts (RPC and CLI); others may not.
    let mut admin = env.admin(&server, "admin").await;
    let l = admin
        .list_lockouts(pb::ListLockoutsRequest {})
        .await
        .unwrap()
        .into_inner()
        .lockouts;
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].identity, "spiffe://shop.local/prober");
    assert!(l[0].reason.contains("3 denied or failed calls"));
    let mut not_admin = env.admin(&server, "orders").await;
    let e = not_admin
        .list_lockouts(pb::ListLockoutsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let (cert, key) = env.pki.client("admin");
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_piiguard"))
            .arg("admin")
            .args(["--address", &server.addr.to_string()])
            .arg("--ca")
            .arg(&env.pki.ca)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(cli(&["lockouts"]).contains("spiffe://shop.local/prober"));
    assert!(cli(&["lift", "spiffe://shop.local/prober"]).contains("lifted"));
    assert!(cli(&["lockouts"]).contains("no lockouts"));
    assert!(prober.decrypt(dec("address", addr)).await.is_ok());
    assert!(
        server
            .audit_records()
            .iter()
            .any(|r| r["event"] == "lockout_lifted" && r["caller"] == "spiffe://shop.local/admin")
    );
}

/// A one-shot-per-connection HTTP server collecting POSTed bodies.
/// Exploratory finding: a caller could guess tokens without end (120 unknown and 120
/// malformed tokens in a row never locked it out), while a bad ciphertext counts as probing.
/// A DIGITS token that keeps the last 4 digits leaves 10^12 guesses, a short FF1 value far
/// fewer: unknown and malformed tokens now count towards lockout, unary and per batch item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessed_tokens_count_towards_lockout() {
    let env = TestEnv::start().await;
    let server = env
        .server(
            "t",
            "[lockout]\nmax_failures = 3\nwindow_secs = 3600\ncooldown_secs = 3600\n",
        )
        .await;
    let mut t = pb::tokens_client::TokensClient::new(env.channel(&server, "orders").await);
    let tok = |v: &str| pb::TokenizeRequest {
        keyspace: "orders".into(),
        subject: "cust-guess".into(),
        field: "card_number".into(),
        value: v.into(),
        format: pb::TokenFormat::Digits as i32,
        mode: pb::TokenMode::Random as i32,
        keep_last: 4,
        ttl_seconds: 0,
    };
    let detok = |token: &str| pb::DetokenizeRequest {
        keyspace: "orders".into(),
        token: token.into(),
        reveal: 0,
    };
    let real = t
        .tokenize(tok("4111111111111111"))
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(
        t.detokenize(detok(&real)).await.unwrap().into_inner().value,
        "4111111111111111"
    );
    // Two guesses in a batch (each item counts), then a malformed one: three failures.
    let guesses = pb::DetokenizeBatchRequest {
        items: vec![
            detok("0000000000001111"),
            detok(&real),
            detok("0000000000021111"),
        ],
    };
    let r = t
        .detokenize_batch(guesses)
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(matches!(
        &r[1].result,
        Some(pb::detokenize_result::Result::Value(_))
    ));
    let Err(e) = t.detokenize(detok("caf\u{e9}")).await else {
        panic!("a malformed token was accepted")
    };
    assert_eq!(reason(&e), "MALFORMED_TOKEN");
    // The identity is now locked out, also for the token it really holds.
    exhausted(t.detokenize(detok(&real)).await, "LOCKED_OUT");
    let lock = alarms(&server, "lockout");
    assert_eq!(lock.len(), 1, "{lock:#?}");
    assert_eq!(lock[0]["caller"], "spiffe://shop.local/orders");
}

async fn webhook_sink() -> (u16, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(i) = text.find("\r\n\r\n") {
                        let len = text[..i]
                            .lines()
                            .find_map(|l| {
                                let l = l.to_ascii_lowercase();
                                l.strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if buf.len() >= i + 4 + len {
                            let body: Value =
                                serde_json::from_slice(&buf[i + 4..i + 4 + len]).unwrap();
                            let _ = tx.send(body);
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                                .await;
                            buf.clear();
                        }
                    }
                }
            });
        }
    });
    (port, rx)
}

// PII planted in the scenario below; none of it may reach a log, an audit file or a webhook.
const PLANTED: &[&str] = &[
    "subj-PLANTED-4711",
    "planted.pii@example.com",
    "Zebulon Plantedsson",
    "4929000000006",
    "canary-subject-CONF-9",
    "Decoy Canary Person",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaries_alarm_webhook_metrics_and_no_planted_pii_anywhere() {
    let env = TestEnv::start().await;
    let (hook_port, mut hook) = webhook_sink().await;
    let server = env
        .server_env(
            "c",
            &format!(
                r#"
[alarms]
webhook_url = "http://127.0.0.1:{hook_port}/alarms"

[canaries]
lockout = true
subject = [{{ keyspace = "orders", subject = "canary-subject-CONF-9", label = "configured" }}]

[lockout]
max_failures = 5
window_secs = 3600
cooldown_secs = 3600
"#
            ),
            vec![("PIIGUARD_METRICS__LISTEN".into(), ANY_PORT.into())],
        )
        .await;
    let mut orders = env.client(&server, "orders").await;
    let mut shipping = env.client(&server, "shipping").await;
    let mut admin = env.admin(&server, "admin").await;

    // A full scenario with planted PII: unary and batch, allowed, denied and failed calls.
    let subj = PLANTED[0];
    let email = orders
        .encrypt(enc("orders", subj, "email", PLANTED[1].as_bytes()))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let name = orders
        .encrypt(enc("orders", subj, "name", PLANTED[2].as_bytes()))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let batch = orders
        .encrypt_batch(pb::EncryptBatchRequest {
            items: vec![
                enc("orders", subj, "card_number", PLANTED[3].as_bytes()),
                enc("crm", subj, "email", PLANTED[1].as_bytes()),
                enc("orders", subj, "bad field!", PLANTED[2].as_bytes()),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let Some(pb::encrypt_result::Result::Ciphertext(card)) = batch[0].result.clone() else {
        panic!("batch item 0 failed")
    };
    assert_eq!(
        orders
            .decrypt(dec("email", &email))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        PLANTED[1].as_bytes()
    );
    assert!(shipping.decrypt(dec("name", &name)).await.is_ok());
    assert!(shipping.decrypt(dec("card_number", &card)).await.is_err());
    let mut bad = email.clone();
    bad[12] ^= 4;
    assert!(orders.decrypt(dec("email", &bad)).await.is_err());
    let res = orders
        .decrypt_batch(pb::DecryptBatchRequest {
            items: vec![
                dec("email", &email),
                dec("name", &name),
                dec("card_number", &card),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.results.len(), 3);
    // Encrypting for a canary subject is not an alarm (only revealing is).
    let conf_ct = orders
        .encrypt(enc("orders", PLANTED[4], "name", PLANTED[5].as_bytes()))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    assert!(alarms(&server, "canary_access").is_empty());

    // An admin creates a canary record; any decryption of it raises a critical alarm, returns
    // the decoy (the intruder is not warned) and locks the caller out.
    let canary = admin
        .create_canary(pb::CreateCanaryRequest {
            keyspace: "orders".into(),
            field: "email".into(),
            decoy: b"decoy@example.net".to_vec(),
            label: "orders table row 42".into(),
            encoding: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let pt = orders
        .decrypt(dec("email", &canary.ciphertext))
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(pt, b"decoy@example.net");
    let a = alarms(&server, "canary_access");
    assert_eq!(a.len(), 1);
    assert_eq!(a[0]["severity"], "critical");
    assert_eq!(a[0]["caller"], "spiffe://shop.local/orders");
    exhausted(orders.decrypt(dec("email", &email)).await, "LOCKED_OUT");
    let posted = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let v = hook.recv().await.unwrap();
            if v["kind"] == "canary_access" {
                return v;
            }
        }
    })
    .await
    .expect("canary alarm posted to the webhook");
    assert_eq!(posted["severity"], "critical");
    assert_eq!(posted["caller"], "spiffe://shop.local/orders");

    // The configured canary subject alarms too (after the lockout is lifted).
    assert!(
        admin
            .lift_lockout(pb::LiftLockoutRequest {
                identity: "spiffe://shop.local/orders".into()
            })
            .await
            .unwrap()
            .into_inner()
            .lifted
    );
    orders.decrypt(dec("name", &conf_ct)).await.unwrap();
    assert_eq!(alarms(&server, "canary_access").len(), 2);
    let list = admin
        .list_canaries(pb::ListCanariesRequest {})
        .await
        .unwrap()
        .into_inner()
        .canaries;
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(
        list.iter()
            .any(|c| c.label == "orders table row 42" && c.key_id == canary.key_id)
    );

    // A second server learns the created canary from Vault.
    let other = env.server("c2", "").await;
    let mut o2 = env.client(&other, "orders").await;
    o2.decrypt(dec("email", &canary.ciphertext)).await.unwrap();
    assert_eq!(alarms(&other, "canary_access").len(), 1);

    // Metrics: scraped and parsed.
    let addr = server
        .metrics_addr
        .expect("metrics listener in the ready file");
    assert_ne!(addr.port(), 0);
    let m = scrape(addr).await;
    assert!(
        metric(
            &m,
            "piiguard_calls_total",
            &[
                ("method", "Decrypt"),
                ("code", "OK"),
                ("caller", "spiffe://shop.local/orders")
            ]
        ) >= 2.0
    );
    assert!(
        metric(
            &m,
            "piiguard_calls_total",
            &[
                ("method", "Decrypt"),
                ("code", "PERMISSION_DENIED"),
                ("caller", "spiffe://shop.local/shipping")
            ]
        ) >= 1.0
    );
    assert!(
        metric(
            &m,
            "piiguard_alarms_total",
            &[("kind", "canary_access"), ("severity", "critical")]
        ) >= 2.0
    );
    assert!(metric(&m, "piiguard_alarms_total", &[("kind", "lockout")]) >= 1.0);
    assert!(
        metric(
            &m,
            "piiguard_call_duration_seconds_count",
            &[("method", "Encrypt")]
        ) >= 3.0
    );
    assert!(
        metric(
            &m,
            "piiguard_call_duration_seconds_bucket",
            &[("method", "Encrypt"), ("le", "+Inf")]
        ) >= 3.0
    );
    assert!(
        metric(
            &m,
            "piiguard_items_total",
            &[("method", "EncryptBatch"), ("outcome", "failed")]
        ) >= 1.0
    );
    assert!(metric(&m, "piiguard_audit_records_total", &[]) >= 10.0);
    assert!(metric(&m, "piiguard_dek_cache_entries", &[]) >= 1.0);
    assert!(metric(&m, "piiguard_dek_cache_total", &[("result", "hit")]) >= 1.0);
    assert!(metric(&m, "piiguard_dek_cache_total", &[("result", "miss")]) >= 1.0);
    assert!(
        metric(
            &m,
            "piiguard_vault_request_duration_seconds_count",
            &[("op", "dek_load")]
        ) >= 1.0
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /other HTTP/1.1\r\n\r\n").await.unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).await.unwrap();
    assert!(r.starts_with("HTTP/1.1 404"));

    // No planted PII anywhere: server logs (debug level), audit files, webhook posts.
    drop(other);
    let mut server = server;
    server.stop();
    let mut haystacks = vec![("log".to_string(), server.log_text())];
    for f in server.audit_files() {
        haystacks.push((
            f.display().to_string(),
            std::fs::read_to_string(&f).unwrap(),
        ));
    }
    while let Ok(v) = hook.try_recv() {
        haystacks.push(("webhook".into(), v.to_string()));
    }
    assert!(
        haystacks[0].1.contains("\"method\":\"Decrypt\""),
        "debug call log present"
    );
    assert!(haystacks.len() > 2);
    for (what, text) in &haystacks {
        for needle in PLANTED.iter().chain(["decoy@example.net"].iter()) {
            assert!(!text.contains(needle), "{needle:?} found in {what}");
        }
        // Not in any common encoding either.
        use base64::Engine as _;
        for needle in [PLANTED[1], PLANTED[3]] {
            let b64 = base64::engine::general_purpose::STANDARD.encode(needle);
            assert!(!text.contains(&b64[..16]), "base64 of {needle:?} in {what}");
            assert!(
                !text.contains(&hex::encode(needle)),
                "hex of {needle:?} in {what}"
            );
        }
    }
}
