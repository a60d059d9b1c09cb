//! Tokenisation end to end: real OpenBao, real SQLite store, real `piiguard serve` over mTLS.

use std::time::{Duration, Instant};

use crate::common::*;
use piiguard::pb;
use piiguard::pb::tokens_client::TokensClient;
use piiguard::store::Store;
use tonic::Code;
use tonic::transport::Channel;

type Client = TokensClient<Channel>;

async fn tokens(env: &TestEnv, server: &Server) -> Client {
    TokensClient::new(env.channel(server, "orders").await)
        .max_decoding_message_size(64 * 1024 * 1024)
}

#[allow(clippy::too_many_arguments)]
fn req(
    ks: &str,
    subject: &str,
    field: &str,
    value: &str,
    format: pb::TokenFormat,
    mode: pb::TokenMode,
    keep_last: u32,
    ttl: u64,
) -> pb::TokenizeRequest {
    pb::TokenizeRequest {
        keyspace: ks.into(),
        subject: subject.into(),
        field: field.into(),
        value: value.into(),
        format: format as i32,
        mode: mode as i32,
        keep_last,
        ttl_seconds: ttl,
    }
}

fn det(subject: &str, field: &str, value: &str, format: pb::TokenFormat) -> pb::TokenizeRequest {
    req(
        "orders",
        subject,
        field,
        value,
        format,
        pb::TokenMode::Deterministic,
        0,
        0,
    )
}

fn rnd(subject: &str, field: &str, value: &str, format: pb::TokenFormat) -> pb::TokenizeRequest {
    req(
        "orders",
        subject,
        field,
        value,
        format,
        pb::TokenMode::Random,
        0,
        0,
    )
}

async fn tokenize(c: &mut Client, r: pb::TokenizeRequest) -> String {
    c.tokenize(r).await.unwrap().into_inner().token
}

async fn detokenize(c: &mut Client, token: &str) -> Result<pb::DetokenizeResponse, tonic::Status> {
    c.detokenize(pb::DetokenizeRequest {
        keyspace: "orders".into(),
        token: token.into(),
        reveal: 0,
    })
    .await
    .map(|r| r.into_inner())
}

async fn value_of(c: &mut Client, token: &str) -> String {
    detokenize(c, token).await.unwrap().value
}

/// The error of a call that must fail (responses carry values, so they have no `Debug`).
fn err<T>(r: Result<T, tonic::Status>) -> tonic::Status {
    match r {
        Ok(_) => panic!("the call succeeded; an error was expected"),
        Err(e) => e,
    }
}

async fn store(env: &TestEnv) -> Store {
    let url = format!("sqlite://{}", env.dir.path().join("piiguard.db").display());
    Store::open(&url).await.unwrap()
}

/// Every byte of the store's files (database and WAL).
fn store_bytes(env: &TestEnv) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(env.dir.path()).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("piiguard.db") {
            all.extend(std::fs::read(&p).unwrap());
        }
    }
    all
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The order service may make `DETERMINISTIC_JOIN` tokens of cities (beside its `tokenize`
/// grant on every field).
const JOIN_CITIES: &str = r#"
[[grant]]
identity = "spiffe://shop.local/orders"
operations = ["tokenize_join"]
keyspaces = ["orders"]
fields = ["city"]
"#;

/// A shred of `subject` in `orders` (GDPR erasure), with its idempotency key.
fn shred_req(subject: &str, request_id: &str) -> pb::ShredRequest {
    pb::ShredRequest {
        subject: subject.into(),
        keyspace: "orders".into(),
        reason: "GDPR art. 17".into(),
        request_id: request_id.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formats_round_trip_keep_their_shape_and_modes_hold() {
    use pb::TokenFormat as F;
    let env = TestEnv::start().await;
    let server = env.server("s", "").await;
    let mut c = tokens(&env, &server).await;

    // Opaque.
    let t = tokenize(&mut c, rnd("cust-tok-1", "name", "Alice Smith", F::Opaque)).await;
    assert!(t.starts_with("pgt_") && t.len() == 26, "{t}");
    let back = detokenize(&mut c, &t).await.unwrap();
    assert_eq!(
        (back.value.as_str(), back.field.as_str()),
        ("Alice Smith", "name")
    );
    // Unspecified format is opaque.
    let t0 = tokenize(
        &mut c,
        rnd("cust-tok-1", "name", "Alice Smith", F::Unspecified),
    )
    .await;
    assert!(t0.starts_with("pgt_"));

    // Digits: a 16-digit card keeps its length and last 4.
    let card = "4111111111111111";
    let mut r = rnd("cust-tok-1", "card_number", card, F::Digits);
    r.keep_last = 4;
    let t = tokenize(&mut c, r).await;
    assert_eq!(t.len(), 16);
    assert!(t.bytes().all(|b| b.is_ascii_digit()), "{t}");
    assert!(t.ends_with("1111") && t != card);
    assert_eq!(value_of(&mut c, &t).await, card);
    // A phone number keeps its length.
    let t = tokenize(
        &mut c,
        rnd("cust-tok-1", "phone", "4915112345678", F::Digits),
    )
    .await;
    assert!(t.len() == 13 && t.bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(value_of(&mut c, &t).await, "4915112345678");

    // Email: a valid address with the same domain.
    let t = tokenize(
        &mut c,
        rnd("cust-tok-1", "email", "alice.smith@example.com", F::Email),
    )
    .await;
    let (local, domain) = t.split_once('@').unwrap();
    assert_eq!(domain, "example.com");
    assert!(!local.is_empty() && local.bytes().all(|b| b.is_ascii_alphanumeric()));
    assert_ne!(local, "alice.smith");
    assert_eq!(value_of(&mut c, &t).await, "alice.smith@example.com");

    // FF1: same shape, separators kept; short values get a stored random token of that shape.
    let iban = "DE89-3704-0044-0532-0130-00";
    let t = tokenize(&mut c, rnd("cust-tok-1", "iban", iban, F::Ff1)).await;
    assert_eq!(t.len(), iban.len());
    assert_ne!(t, iban);
    for (a, b) in t.bytes().zip(iban.bytes()) {
        assert_eq!(
            a.is_ascii_digit() || a.is_ascii_uppercase(),
            b.is_ascii_alphanumeric()
        );
        if b == b'-' {
            assert_eq!(a, b'-');
        }
    }
    assert_eq!(value_of(&mut c, &t).await, iban);
    let t = tokenize(&mut c, rnd("cust-tok-1", "pin", "12-34", F::Ff1)).await;
    assert!(t.len() == 5 && &t[2..3] == "-", "{t}");
    assert_eq!(value_of(&mut c, &t).await, "12-34");

    // Deterministic: same keyspace + subject + field + value -> same token; another subject
    // gets its own token (per-subject scope, security review finding 9).
    for f in [F::Opaque, F::Digits, F::Email] {
        let v = if f == F::Email {
            "bob@example.org"
        } else {
            "5500000000000004"
        };
        let a = tokenize(&mut c, det("cust-tok-2", "pii", v, f)).await;
        let b = tokenize(&mut c, det("cust-tok-2", "pii", v, f)).await;
        let other_subject = tokenize(&mut c, det("cust-tok-3", "pii", v, f)).await;
        assert_eq!(a, b, "{f:?}");
        assert_ne!(a, other_subject, "{f:?}");
        assert_eq!(value_of(&mut c, &other_subject).await, v);
        assert_eq!(value_of(&mut c, &a).await, v);
        // Another field, or random mode, gives another token.
        assert_ne!(a, tokenize(&mut c, det("cust-tok-2", "pii2", v, f)).await);
        let r1 = tokenize(&mut c, rnd("cust-tok-2", "pii", v, f)).await;
        let r2 = tokenize(&mut c, rnd("cust-tok-2", "pii", v, f)).await;
        assert_ne!(r1, r2, "{f:?}");
        assert_ne!(r1, a, "{f:?}");
    }
    // FF1 is deterministic per subject (the subject's key is in the tweak).
    let a = tokenize(&mut c, det("cust-tok-2", "acct", "ACCT-00123456", F::Ff1)).await;
    assert_eq!(
        a,
        tokenize(&mut c, det("cust-tok-2", "acct", "ACCT-00123456", F::Ff1)).await
    );
    assert_ne!(
        a,
        tokenize(&mut c, det("cust-tok-3", "acct", "ACCT-00123456", F::Ff1)).await
    );

    // The store holds no value, no raw subject id and no token.
    let bytes = store_bytes(&env);
    assert!(!bytes.is_empty());
    for needle in [
        "Alice Smith",
        "alice.smith",
        card,
        "4915112345678",
        iban,
        "ACCT-00123456",
        "cust-tok-1",
        "cust-tok-2",
        a.as_str(),
        t0.as_str(),
    ] {
        assert!(!contains(&bytes, needle), "store contains {needle:?}");
    }
    // Nor does the server log (debug level here): no value, subject id or token.
    let log = server.log_text();
    assert!(
        log.contains("\"method\":\"Tokenize\""),
        "debug call log present"
    );
    assert!(
        log.contains("\"method\":\"Detokenize\""),
        "debug call log present"
    );
    for needle in [
        "Alice Smith",
        "alice.smith",
        card,
        iban,
        "ACCT-00123456",
        "cust-tok-1",
        a.as_str(),
        t0.as_str(),
    ] {
        assert!(!log.contains(needle), "log contains {needle:?}");
    }
}

/// Deterministic tokens are read first (no write when nothing changes); concurrent calls
/// share group commits and each gets a token whose mapping is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_reads_first_and_concurrent_calls_share_commits() {
    use pb::TokenFormat as F;
    let env = TestEnv::start().await;
    let server = env.server("s", "").await;
    let mut c = tokens(&env, &server).await;
    let counts = || async { store(&env).await.token_counts("orders").await.unwrap() };

    let a = tokenize(
        &mut c,
        det("cust-rf-1", "email", "rf@example.com", F::Opaque),
    )
    .await;
    let after_first = counts().await;
    for _ in 0..5 {
        assert_eq!(
            a,
            tokenize(
                &mut c,
                det("cust-rf-1", "email", "rf@example.com", F::Opaque)
            )
            .await
        );
    }
    // A TTL does not shorten a token without expiry ("none beats any"): still no write.
    let mut r = det("cust-rf-1", "email", "rf@example.com", F::Opaque);
    r.ttl_seconds = 100;
    let t = c.tokenize(r).await.unwrap().into_inner();
    assert_eq!((t.token.as_str(), t.expires_at), (a.as_str(), 0));
    assert_eq!(counts().await, after_first, "repeats wrote no rows");

    // A later expiry is still written: the token keeps the later one.
    let mut r = det("cust-rf-1", "email", "ttl-rf@example.com", F::Opaque);
    r.ttl_seconds = 100;
    let t1 = c.tokenize(r.clone()).await.unwrap().into_inner();
    r.ttl_seconds = 5000;
    let t2 = c.tokenize(r.clone()).await.unwrap().into_inner();
    assert_eq!(t1.token, t2.token);
    assert!(
        t2.expires_at >= t1.expires_at + 4000,
        "{} {}",
        t1.expires_at,
        t2.expires_at
    );
    r.ttl_seconds = 100;
    let t3 = c.tokenize(r).await.unwrap().into_inner();
    assert_eq!(t3.expires_at, t2.expires_at, "the later expiry wins");

    // 40 concurrent calls: one new deterministic value from 10 subjects (two calls each), and
    // 20 random tokens.
    let before = counts().await;
    let mut calls = Vec::new();
    for i in 0..40 {
        let mut c = c.clone();
        calls.push(tokio::spawn(async move {
            let r = if i < 20 {
                det(
                    &format!("cust-rf-{}", i % 10),
                    "email",
                    "burst@example.com",
                    F::Opaque,
                )
            } else {
                rnd(
                    &format!("cust-rf-{i}"),
                    "email",
                    &format!("v{i}@example.com"),
                    F::Opaque,
                )
            };
            (i, c.tokenize(r).await.unwrap().into_inner().token)
        }));
    }
    let mut det_tokens = std::collections::HashSet::new();
    let mut rnd_tokens = Vec::new();
    for call in calls {
        let (i, t) = call.await.unwrap();
        if i < 20 {
            det_tokens.insert(t);
        } else {
            rnd_tokens.push((i, t));
        }
    }
    assert_eq!(
        det_tokens.len(),
        10,
        "one token per subject and deterministic value"
    );
    for burst in &det_tokens {
        assert_eq!(value_of(&mut c, burst).await, "burst@example.com");
    }
    for (i, t) in &rnd_tokens {
        assert_eq!(value_of(&mut c, t).await, format!("v{i}@example.com"));
    }
    let after = counts().await;
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (10 + 20, 10 + 20),
        "one value and one row per token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_service_has_health_and_reflection() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let env = TestEnv::start().await;
    let server = env.server("s", "").await;
    let ch = env.channel(&server, "orders").await;
    let st = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: "piiguard.v1.Tokens".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.status, ServingStatus::Serving as i32);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "piiguard.v1.Tokens".into(),
        )),
    };
    let mut stream = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(fd)) = resp.message_response else {
        panic!("reflection does not know piiguard.v1.Tokens");
    };
    assert!(!fd.file_descriptor_proto.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_malformed_bad_input_and_expired_tokens() {
    use pb::TokenFormat as F;
    let env = TestEnv::start().await;
    let server = env.server("s", "").await;
    let mut c = tokens(&env, &server).await;

    let e = err(detokenize(&mut c, "pgt_AAAAAAAAAAAAAAAAAAAAAA").await);
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::NotFound, "UNKNOWN_TOKEN")
    );
    // Any printable string can be a token of a format-preserving kind, even one that starts
    // like an opaque token (FF1 keeps the `_` of `joe_smith`: `pgt_xk3vq`): looked up, unknown.
    for unknown in ["4111222233334444", "pgt_short", "pgt_!!"] {
        let e = err(detokenize(&mut c, unknown).await);
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::NotFound, "UNKNOWN_TOKEN"),
            "{unknown:?}"
        );
    }
    let long = "x".repeat(400);
    for bad in ["", "tab\there", "caf\u{e9}", long.as_str()] {
        let e = err(detokenize(&mut c, bad).await);
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::InvalidArgument, "MALFORMED_TOKEN"),
            "{bad:?}"
        );
    }
    // A token of another keyspace is unknown here.
    let t = tokenize(&mut c, rnd("cust-x", "name", "Zed", F::Opaque)).await;
    let e = err(c
        .detokenize(pb::DetokenizeRequest {
            keyspace: "crm".into(),
            token: t.clone(),
            reveal: 0,
        })
        .await);
    assert_eq!(reason(&e), "UNKNOWN_TOKEN");

    // Values that do not fit their format are refused and change nothing.
    let before = store(&env).await.token_counts("orders").await.unwrap();
    let mut r = rnd("cust-x", "card", "4111-1111", F::Digits);
    r.keep_last = 0;
    for (r, want) in [
        (r, "UNSUPPORTED_FORMAT"),
        (
            req(
                "orders",
                "cust-x",
                "card",
                "1234",
                F::Digits,
                pb::TokenMode::Random,
                4,
                0,
            ),
            "UNSUPPORTED_FORMAT",
        ),
        (
            rnd("cust-x", "email", "not-an-address", F::Email),
            "UNSUPPORTED_FORMAT",
        ),
        (
            rnd("cust-x", "email", "a@localhost", F::Email),
            "UNSUPPORTED_FORMAT",
        ),
        (rnd("cust-x", "x", "---", F::Ff1), "UNSUPPORTED_FORMAT"),
        (rnd("cust-x", "x", "", F::Opaque), "UNSUPPORTED_FORMAT"),
        (
            req(
                "orders",
                "cust-x",
                "x",
                "v",
                F::Opaque,
                pb::TokenMode::Random,
                2,
                0,
            ),
            "UNSUPPORTED_FORMAT",
        ),
        (rnd("", "x", "v", F::Opaque), "INVALID_REQUEST"),
        (
            rnd("cust-x", "bad field!", "v", F::Opaque),
            "INVALID_REQUEST",
        ),
        (
            req(
                "nope",
                "cust-x",
                "x",
                "v",
                F::Opaque,
                pb::TokenMode::Random,
                0,
                0,
            ),
            "UNKNOWN_KEYSPACE",
        ),
    ] {
        let e = err(c.tokenize(r).await);
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::InvalidArgument, want)
        );
    }
    let mut r = rnd("cust-x", "x", "v", F::Opaque);
    r.format = 99;
    assert_eq!(reason(&err(c.tokenize(r).await)), "UNSUPPORTED_FORMAT");
    assert_eq!(
        store(&env).await.token_counts("orders").await.unwrap(),
        before
    );

    // TTL: the short-lived token expires (NOT_FOUND TOKEN_EXPIRED) and its value is purged;
    // the long-lived one still works.
    let long = c
        .tokenize(req(
            "orders",
            "cust-ttl",
            "email",
            "ttl@example.com",
            F::Email,
            pb::TokenMode::Random,
            0,
            3600,
        ))
        .await
        .unwrap()
        .into_inner();
    // Counted before the short-lived token exists, so whoever purges it (the periodic purge
    // or Detokenize) the count below is the same.
    let (values_before, _) = store(&env).await.token_counts("orders").await.unwrap();
    let short = c
        .tokenize(req(
            "orders",
            "cust-ttl",
            "email",
            "ttl@example.com",
            F::Email,
            pb::TokenMode::Random,
            0,
            1,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(short.expires_at > 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let e = loop {
        match detokenize(&mut c, &short.token).await {
            Ok(v) => assert_eq!(v.value, "ttl@example.com"),
            Err(e) => break e,
        }
        assert!(Instant::now() < deadline, "token never expired");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::NotFound, "TOKEN_EXPIRED")
    );
    let e = err(detokenize(&mut c, &short.token).await);
    assert_eq!(reason(&e), "TOKEN_EXPIRED", "still expired after the purge");
    let (values_after, _) = store(&env).await.token_counts("orders").await.unwrap();
    assert_eq!(values_after, values_before, "the expired value was purged");
    assert_eq!(value_of(&mut c, &long.token).await, "ttl@example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_kills_a_subjects_tokens_and_purges_its_rows() {
    use pb::TokenFormat as F;
    let env = TestEnv::start().await;
    let server = env.server("s", "").await;
    let mut c = tokens(&env, &server).await;
    let mut e = env.erasure(&server).await;

    let mut card = rnd("cust-shred", "card", "4111111111111111", F::Digits);
    card.keep_last = 4;
    let mine = vec![
        tokenize(&mut c, rnd("cust-shred", "name", "Carol", F::Opaque)).await,
        tokenize(&mut c, card).await,
        tokenize(
            &mut c,
            det("cust-shred", "email", "carol@example.com", F::Email),
        )
        .await,
        tokenize(&mut c, rnd("cust-shred", "acct", "ACCT-99887766", F::Ff1)).await,
    ];
    // A deterministic value that another subject has too (each has its own token: per
    // subject), and a token of the other subject only.
    let berlin = tokenize(&mut c, det("cust-shred", "city", "Berlin", F::Opaque)).await;
    let theirs = tokenize(&mut c, det("cust-keep", "city", "Berlin", F::Opaque)).await;
    assert_ne!(berlin, theirs);
    let mine = [mine, vec![berlin]].concat();
    let other = tokenize(&mut c, rnd("cust-keep", "name", "Dave", F::Opaque)).await;
    for t in &mine {
        detokenize(&mut c, t).await.unwrap();
    }
    let (values_before, _) = store(&env).await.token_counts("orders").await.unwrap();

    let r = e
        .shred(shred_req("cust-shred", "tok-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.keyspaces[0].outcome, pb::ShredOutcome::Shredded as i32);

    for t in &mine {
        let err = err(detokenize(&mut c, t).await);
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::FailedPrecondition, "SUBJECT_SHREDDED")
        );
    }
    // Batch answers the same, item by item.
    let b = c
        .detokenize_batch(pb::DetokenizeBatchRequest {
            items: mine
                .iter()
                .map(|t| pb::DetokenizeRequest {
                    keyspace: "orders".into(),
                    token: t.clone(),
                    reveal: 0,
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    for r in b.results {
        match r.result.unwrap() {
            pb::detokenize_result::Result::Error(e) => assert_eq!(e.reason, "SUBJECT_SHREDDED"),
            pb::detokenize_result::Result::Value(_) => panic!("a shredded token detokenised"),
        }
    }
    // The other subject keeps its data, including its token of the same value.
    assert_eq!(value_of(&mut c, &theirs).await, "Berlin");
    assert_eq!(value_of(&mut c, &other).await, "Dave");
    // The shredded subject's five sealed values are gone from the store.
    let (values_after, _) = store(&env).await.token_counts("orders").await.unwrap();
    assert_eq!(values_after, values_before - 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_with_bad_items_and_a_deterministic_batch_without_collisions() {
    use pb::TokenFormat as F;
    let env = TestEnv::start().await;
    let server = env.server("s", "").await;
    let mut c = tokens(&env, &server).await;

    let mut bad_format = rnd("cust-b", "x", "v", F::Opaque);
    bad_format.format = 42;
    let items = vec![
        rnd("cust-b", "name", "Erin", F::Opaque),
        rnd("cust-b", "card", "12ab", F::Digits),
        req(
            "nope",
            "cust-b",
            "name",
            "Erin",
            F::Opaque,
            pb::TokenMode::Random,
            0,
            0,
        ),
        bad_format,
        rnd("cust-b", "email", "erin@example.net", F::Email),
        rnd("", "name", "Erin", F::Opaque),
    ];
    let res = c
        .tokenize_batch(pb::TokenizeBatchRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(res.len(), 6);
    let mut good = Vec::new();
    for (i, want) in [
        None,
        Some("UNSUPPORTED_FORMAT"),
        Some("UNKNOWN_KEYSPACE"),
        Some("UNSUPPORTED_FORMAT"),
        None,
        Some("INVALID_REQUEST"),
    ]
    .into_iter()
    .enumerate()
    {
        match (res[i].result.clone().unwrap(), want) {
            (pb::tokenize_result::Result::Token(t), None) => good.push(t.token),
            (pb::tokenize_result::Result::Error(e), Some(w)) => {
                assert_eq!(e.reason, w, "item {i}");
                assert_eq!(e.code, Code::InvalidArgument as i32);
            }
            _ => panic!("item {i}: unexpected result, wanted {want:?}"),
        }
    }
    let items: Vec<_> = [
        good[0].as_str(),
        "caf\u{e9}",
        "pgt_BBBBBBBBBBBBBBBBBBBBBA",
        good[1].as_str(),
    ]
    .iter()
    .map(|t| pb::DetokenizeRequest {
        keyspace: "orders".into(),
        token: t.to_string(),
        reveal: 0,
    })
    .collect();
    let res = c
        .detokenize_batch(pb::DetokenizeBatchRequest { items })
        .await
        .unwrap()
        .into_inner()
        .results;
    let outcome: Vec<String> = res
        .into_iter()
        .map(|r| match r.result.unwrap() {
            pb::detokenize_result::Result::Value(v) => v.value,
            pb::detokenize_result::Result::Error(e) => e.reason,
        })
        .collect();
    assert_eq!(
        outcome,
        [
            "Erin",
            "MALFORMED_TOKEN",
            "UNKNOWN_TOKEN",
            "erin@example.net"
        ]
    );

    // 1,000 distinct card numbers, deterministic DIGITS keeping the last 4: 1,000 distinct
    // tokens, the same again on a second batch, each detokenising to its own value.
    let cards: Vec<String> = (0..1000).map(|i| format!("4000{:012}", i * 7919)).collect();
    let batch = |subject: &str| pb::TokenizeBatchRequest {
        items: cards
            .iter()
            .map(|v| {
                let mut r = det(subject, "card_number", v, F::Digits);
                r.keep_last = 4;
                r
            })
            .collect(),
    };
    let tokens_of = |res: pb::TokenizeBatchResponse| -> Vec<String> {
        res.results
            .into_iter()
            .map(|r| match r.result.unwrap() {
                pb::tokenize_result::Result::Token(t) => t.token,
                pb::tokenize_result::Result::Error(e) => panic!("{}", e.reason),
            })
            .collect()
    };
    let first = tokens_of(
        c.tokenize_batch(batch("cust-many"))
            .await
            .unwrap()
            .into_inner(),
    );
    let distinct: std::collections::HashSet<_> = first.iter().collect();
    assert_eq!(distinct.len(), 1000, "collision among deterministic tokens");
    for (t, v) in first.iter().zip(&cards) {
        assert_eq!(t.len(), 16);
        assert_eq!(&t[12..], &v[12..]);
    }
    let second = tokens_of(
        c.tokenize_batch(batch("cust-many"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(first, second, "deterministic across calls");
    let res = c
        .detokenize_batch(pb::DetokenizeBatchRequest {
            items: first
                .iter()
                .map(|t| pb::DetokenizeRequest {
                    keyspace: "orders".into(),
                    token: t.clone(),
                    reveal: 0,
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    for (r, v) in res.results.into_iter().zip(&cards) {
        match r.result.unwrap() {
            pb::detokenize_result::Result::Value(d) => assert_eq!(&d.value, v),
            pb::detokenize_result::Result::Error(e) => panic!("{}", e.reason),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_authorised_per_keyspace_and_field_and_audited() {
    let env = TestEnv::start().await;
    // Shipping may detokenise names in orders (and nothing else).
    env.write_policy(
        r#"
[[grant]]
identity = "spiffe://shop.local/shipping"
operations = ["detokenize"]
keyspaces = ["orders"]
fields = ["name"]
"#,
    );
    let server = env.server("tokauth", "").await;
    let mut orders = tokens(&env, &server).await;
    let mut shipping = TokensClient::new(env.channel(&server, "shipping").await);
    let name = orders
        .tokenize(det(
            "cust-auth",
            "name",
            "Zoë Ünal",
            pb::TokenFormat::Opaque,
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let email = orders
        .tokenize(det(
            "cust-auth",
            "email",
            "zoe@example.com",
            pb::TokenFormat::Email,
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let dreq = |t: &str| pb::DetokenizeRequest {
        keyspace: "orders".into(),
        token: t.into(),
        reveal: 0,
    };
    // Allowed field.
    assert_eq!(
        shipping
            .detokenize(dreq(&name))
            .await
            .unwrap()
            .into_inner()
            .value,
        "Zoë Ünal"
    );
    // Other field: denied, value not released.
    let e = shipping
        .detokenize(dreq(&email))
        .await
        .err()
        .expect("denied");
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::PermissionDenied, "POLICY_DENIED")
    );
    assert!(!e.message().contains("zoe@example.com"));
    // Nor the token's field, which the caller did not name (exploratory testing: the message
    // said `field "email"`, read from the token's row).
    assert!(!e.message().contains("email"), "{}", e.message());
    assert!(e.message().contains("not granted"), "{}", e.message());
    // No tokenize grant at all; and the erasure identity cannot probe tokens.
    let e = shipping
        .tokenize(det("cust-auth", "name", "x", pb::TokenFormat::Opaque))
        .await
        .err()
        .expect("denied");
    assert_eq!(reason(&e), "POLICY_DENIED");
    let mut erasure = TokensClient::new(env.channel(&server, "erasure").await);
    let e = erasure
        .detokenize(dreq("pgt_doesnotexist"))
        .await
        .err()
        .expect("denied");
    assert_eq!(
        reason(&e),
        "POLICY_DENIED",
        "a caller without the grant cannot probe tokens"
    );
    // Every call is in the audit log, without values or tokens.
    let records = server.audit_records();
    let outcomes: Vec<_> = records
        .iter()
        .filter(|r| r["method"] == "Detokenize")
        .map(|r| r["outcome"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        outcomes.contains(&"ok".to_string()) && outcomes.contains(&"denied".to_string()),
        "{outcomes:?}"
    );
    let audit: String = server
        .audit_files()
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    for needle in [
        "Zoë Ünal",
        "zoe@example.com",
        name.as_str(),
        email.as_str(),
        "cust-auth",
    ] {
        assert!(!audit.contains(needle), "{needle:?} in the audit log");
    }
}

/// Security review finding 9: a DETERMINISTIC token is per subject, so it dies with its
/// subject's shred even when another subject tokenised the same value (which has a token of
/// its own that keeps working). Written against the API of before the fix, so it can be run
/// on the old code, where it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_token_dies_with_its_subject_when_another_subject_has_the_same_value() {
    use pb::TokenFormat as F;
    let env = TestEnv::start().await;
    let server = env.server("s", "").await;
    let mut c = tokens(&env, &server).await;
    let mut e = env.erasure(&server).await;

    let cases = [
        (F::Opaque, "Hamburg"),
        (F::Digits, "4111111111111111"),
        (F::Email, "shared.box@example.com"),
    ];
    let mut shredded = Vec::new();
    let mut kept = Vec::new();
    for (f, v) in cases {
        let a = tokenize(&mut c, det("cust-f9-a", "pii", v, f)).await;
        let b = tokenize(&mut c, det("cust-f9-b", "pii", v, f)).await;
        assert_eq!(value_of(&mut c, &a).await, v);
        assert_eq!(value_of(&mut c, &b).await, v);
        // Deterministic within one subject's records: the same token again.
        assert_eq!(
            a,
            tokenize(&mut c, det("cust-f9-a", "pii", v, f)).await,
            "{f:?}"
        );
        shredded.push((f, a));
        kept.push((f, b, v));
    }

    let r = e
        .shred(shred_req("cust-f9-a", "f9-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.keyspaces[0].outcome, pb::ShredOutcome::Shredded as i32);

    // The shredded subject's deterministic tokens are dead, whoever else has the value.
    for (f, t) in &shredded {
        let Err(s) = detokenize(&mut c, t).await else {
            panic!("{f:?}: a deterministic token of a shredded subject still detokenises");
        };
        assert_eq!(
            (s.code(), reason(&s).as_str()),
            (Code::FailedPrecondition, "SUBJECT_SHREDDED"),
            "{f:?}"
        );
    }
    // The other subject's tokens of the same values keep working.
    for (f, t, v) in &kept {
        assert_eq!(value_of(&mut c, t).await, *v, "{f:?}");
    }
    // The shredded subject's tokens differ from the other subject's (they are per subject).
    for ((_, a), (f, b, _)) in shredded.iter().zip(&kept) {
        assert_ne!(a, b, "{f:?}");
    }
}

/// `DETERMINISTIC_JOIN` (security review finding 9): refused without the `tokenize_join`
/// grant (a `tokenize` grant is not enough) and for FF1; with it, one token for every subject
/// with the value, which survives one holder's shred (only that subject's sealed value is
/// deleted) and dies with the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_need_their_own_grant_and_live_while_a_holder_is_not_shredded() {
    use pb::TokenFormat as F;
    let env = TestEnv::start().await;
    // The order service (which holds `tokenize` on every field) may join cities only.
    env.write_policy(JOIN_CITIES);
    let server = env.server("join", "").await;
    let mut c = tokens(&env, &server).await;
    let mut e = env.erasure(&server).await;
    let join = |subject: &str, field: &str, value: &str, format: F| {
        let mut r = det(subject, field, value, format);
        r.mode = pb::TokenMode::DeterministicJoin as i32;
        r
    };

    // Without the grant (another field): denied, nothing written.
    let before = store(&env).await.token_counts("orders").await.unwrap();
    let s = err(c
        .tokenize(join("cust-j-a", "email", "j@example.com", F::Email))
        .await);
    assert_eq!(
        (s.code(), reason(&s).as_str()),
        (Code::PermissionDenied, "POLICY_DENIED")
    );
    assert!(s.message().contains("tokenize_join"), "{}", s.message());
    // In a batch, the item fails alone.
    let res = c
        .tokenize_batch(pb::TokenizeBatchRequest {
            items: vec![
                join("cust-j-a", "email", "j@example.com", F::Email),
                det("cust-j-a", "email", "j@example.com", F::Email),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    match (
        res[0].result.clone().unwrap(),
        res[1].result.clone().unwrap(),
    ) {
        (pb::tokenize_result::Result::Error(e), pb::tokenize_result::Result::Token(_)) => {
            assert_eq!(e.reason, "POLICY_DENIED");
        }
        _ => panic!("the join item must fail alone"),
    }
    assert_eq!(
        store(&env).await.token_counts("orders").await.unwrap(),
        (before.0 + 1, before.1 + 1),
        "only the per-subject item was written"
    );
    // FF1 tokens are per subject: no join mode, with the grant or without it (validated
    // before authorised: a caller without the grant was told POLICY_DENIED).
    for field in ["city", "email"] {
        let s = err(c
            .tokenize(join("cust-j-a", field, "BERLIN-10115", F::Ff1))
            .await);
        assert_eq!(
            (s.code(), reason(&s).as_str()),
            (Code::InvalidArgument, "UNSUPPORTED_FORMAT"),
            "{field}"
        );
    }

    // With the grant: one token for every subject with the value, distinct from the
    // per-subject deterministic tokens.
    let ja = tokenize(&mut c, join("cust-j-a", "city", "Berlin", F::Opaque)).await;
    let jb = tokenize(&mut c, join("cust-j-b", "city", "Berlin", F::Opaque)).await;
    assert_eq!(ja, jb, "a join token is shared");
    let pa = tokenize(&mut c, det("cust-j-a", "city", "Berlin", F::Opaque)).await;
    assert_ne!(pa, ja, "DETERMINISTIC is per subject, not the join token");
    assert_eq!(value_of(&mut c, &ja).await, "Berlin");
    let (values_before, _) = store(&env).await.token_counts("orders").await.unwrap();

    // Shred one holder: its per-subject token dies; the join token keeps detokenising for
    // the other holder; the shredded subject's sealed values (the join value, the
    // per-subject value and the email of the batch) are deleted.
    let r = e
        .shred(shred_req("cust-j-a", "j-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.keyspaces[0].outcome, pb::ShredOutcome::Shredded as i32);
    assert_eq!(
        reason(&err(detokenize(&mut c, &pa).await)),
        "SUBJECT_SHREDDED"
    );
    assert_eq!(value_of(&mut c, &ja).await, "Berlin");
    let (values_after, _) = store(&env).await.token_counts("orders").await.unwrap();
    assert_eq!(values_after, values_before - 3);

    // Shred the last holder: the join token dies too, and stays dead (a new holder of the
    // value gets a new join token).
    e.shred(shred_req("cust-j-b", "j-2")).await.unwrap();
    let s = err(detokenize(&mut c, &ja).await);
    assert_eq!(
        (s.code(), reason(&s).as_str()),
        (Code::FailedPrecondition, "SUBJECT_SHREDDED")
    );
    let jc = tokenize(&mut c, join("cust-j-c", "city", "Berlin", F::Opaque)).await;
    assert_ne!(jc, ja);
    assert_eq!(value_of(&mut c, &jc).await, "Berlin");
    assert_eq!(
        reason(&err(detokenize(&mut c, &ja).await)),
        "SUBJECT_SHREDDED"
    );
}

/// A server behaving as an older build did (the failpoint flag `flag`, src/config/failpoint.rs).
async fn older_build(env: &TestEnv, flag: &str) -> Server {
    env.server_env(
        "s",
        "",
        vec![("PIIGUARD_FAILPOINT".into(), format!("flag:{flag}"))],
    )
    .await
}

/// Restarts `server` without flags: this build, on what the older one stored.
async fn restart_as_this_build(server: &mut Server) {
    server.stop();
    server.set_env(Vec::new());
    server.start().await;
}

/// Security review finding 11 moved the FF1 tweak's subject secret off the AES key (its own
/// HKDF label). Deterministic FF1 tokens made by older builds must stay their value's token:
/// a server with the `ff1-subkey-v1` flag makes tokens as those builds did; after a restart
/// without it, the same value gets the same token back, and it detokenises.
#[tokio::test]
async fn deterministic_ff1_tokens_made_before_the_subkey_change_stay_their_values_token() {
    use pb::TokenFormat as F;
    let env = TestEnv::start().await;
    let mut server = older_build(&env, "ff1-subkey-v1").await;
    let mut c = tokens(&env, &server).await;
    let old = tokenize(&mut c, det("cust-ff1", "acct", "ACCT-00123456", F::Ff1)).await;
    restart_as_this_build(&mut server).await;
    let mut c = tokens(&env, &server).await;
    let again = tokenize(&mut c, det("cust-ff1", "acct", "ACCT-00123456", F::Ff1)).await;
    assert_eq!(
        again, old,
        "an old deterministic FF1 token must stay its value's token"
    );
    // ... recognised as an older build's token (so the flag did make one).
    assert!(
        server
            .log_text()
            .contains("deterministic FF1 token of an older build"),
        "the token was not made with the old subkey"
    );
    assert_eq!(value_of(&mut c, &old).await, "ACCT-00123456");
    // A new value of the same subject gets a token from the new subkey, and it round-trips.
    let new = tokenize(&mut c, det("cust-ff1", "acct", "ACCT-00654321", F::Ff1)).await;
    assert_eq!(value_of(&mut c, &new).await, "ACCT-00654321");
}

/// A random opaque token encrypts the locator of its row (`crypto/tokens/locator.rs`): the
/// store keeps such tokens by locator, whose time prefix grows with each new token, so a new
/// token is an append to the token index instead of a random leaf (bench/RESULTS.md). Tokens
/// stored by their keyed hash (made before locators: the `hashed-random-tokens` flag makes
/// them so) still detokenise after a restart without it; other formats keep the keyed hash.
#[tokio::test]
async fn random_opaque_tokens_are_stored_by_locator_in_creation_order_and_older_ones_open() {
    use pb::TokenFormat as F;
    use sqlx::Connection as _;
    let env = TestEnv::start().await;
    let mut server = older_build(&env, "hashed-random-tokens").await;
    let mut c = tokens(&env, &server).await;
    let old = tokenize(&mut c, rnd("cust-loc", "name", "Ada", F::Opaque)).await;
    restart_as_this_build(&mut server).await;
    let mut c = tokens(&env, &server).await;
    let mut made = Vec::new();
    for i in 0..30 {
        let v = format!("Name {i}");
        made.push((
            tokenize(&mut c, rnd("cust-loc", "name", &v, F::Opaque)).await,
            v,
        ));
    }
    let digits = tokenize(
        &mut c,
        rnd("cust-loc", "card", "4111111111111111", F::Digits),
    )
    .await;

    let mut db = sqlx::SqliteConnection::connect(&env.store_url)
        .await
        .unwrap();
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT token_hash FROM token_map WHERE keyspace = 'orders' ORDER BY rowid",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(stored.len(), 32);
    let hashed = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    assert!(
        hashed(&stored[0]),
        "the older build's token: its keyed hash"
    );
    assert!(hashed(&stored[31]), "a DIGITS token: its keyed hash");
    let located = &stored[1..31];
    for s in located {
        assert!(
            s.len() == 33 && s.starts_with('r') && s[1..].bytes().all(|b| b.is_ascii_hexdigit()),
            "a random opaque token is stored by its locator, not {s}"
        );
    }
    // Creation order: the millisecond prefix never goes back (calls within one millisecond
    // share it).
    assert!(
        located.windows(2).all(|w| w[0][..13] <= w[1][..13]),
        "locators in creation order: {located:?}"
    );
    assert!(located[0][..13] < located[29][..13]);
    let all = store_bytes(&env);
    for (token, value) in &made {
        assert!(!contains(&all, token), "the store holds no token");
        assert_eq!(&value_of(&mut c, token).await, value);
    }
    assert_eq!(
        value_of(&mut c, &old).await,
        "Ada",
        "a token made before locators"
    );
    assert_eq!(value_of(&mut c, &digits).await, "4111111111111111");
}

/// The token read caches (`ops/tokens.rs`, `CachedRow` / `CachedDet`): a token Detokenize has
/// opened, and a deterministic token its subject holds without expiry, are served without a
/// store read. Shown by taking the token tables away: the warm calls still answer (the same
/// value, the same token), a cold one fails. Before the caches every call read the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_tokens_are_served_without_a_store_read() {
    use pb::TokenFormat as F;
    use sqlx::Connection as _;
    let env = TestEnv::start().await;
    let server = env.server("s", "").await;
    let mut c = tokens(&env, &server).await;

    let warm = tokenize(&mut c, rnd("cust-c", "name", "Grace", F::Opaque)).await;
    let cold = tokenize(&mut c, rnd("cust-c", "name", "Heidi", F::Opaque)).await;
    let det_token = tokenize(&mut c, det("cust-c", "email", "g@example.com", F::Email)).await;
    assert_eq!(value_of(&mut c, &warm).await, "Grace");

    let mut db = sqlx::SqliteConnection::connect(&env.store_url)
        .await
        .unwrap();
    for (from, to) in [
        ("token_map", "token_map_away"),
        ("token_holders", "token_holders_away"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {from} RENAME TO {to}"
        )))
        .execute(&mut db)
        .await
        .unwrap();
    }
    assert_eq!(value_of(&mut c, &warm).await, "Grace", "warm Detokenize");
    assert_eq!(
        tokenize(&mut c, det("cust-c", "email", "g@example.com", F::Email)).await,
        det_token,
        "warm deterministic Tokenize"
    );
    assert!(
        detokenize(&mut c, &cold).await.is_err(),
        "a token never detokenised needs the store"
    );
    assert!(
        c.tokenize(det("cust-c", "email", "h@example.com", F::Email))
            .await
            .is_err(),
        "a new deterministic value needs the store"
    );
    for (from, to) in [
        ("token_map_away", "token_map"),
        ("token_holders_away", "token_holders"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {from} RENAME TO {to}"
        )))
        .execute(&mut db)
        .await
        .unwrap();
    }
    assert_eq!(value_of(&mut c, &cold).await, "Heidi");
}

/// A join token cached by Detokenize with one holder's value; a second subject's value is
/// added after; the first holder is shredded. The cached copy no longer opens, and the token
/// must still detokenise (the store has the second holder's value), not answer SHREDDED.
/// Then a TTL'd deterministic token whose expiry a later Tokenize extended: the cached
/// expiry is the earlier one, and passing it must not expire the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_token_rows_follow_added_values_shreds_and_extended_expiry() {
    use pb::TokenFormat as F;
    let env = TestEnv::start().await;
    env.write_policy(JOIN_CITIES);
    let server = env.server("join", "").await;
    let mut c = tokens(&env, &server).await;
    let mut e = env.erasure(&server).await;
    let join = |subject: &str| {
        let mut r = det(subject, "city", "Lisbon", F::Opaque);
        r.mode = pb::TokenMode::DeterministicJoin as i32;
        r
    };
    let t = tokenize(&mut c, join("cust-ca")).await;
    assert_eq!(value_of(&mut c, &t).await, "Lisbon"); // cached: cust-ca's value only
    assert_eq!(tokenize(&mut c, join("cust-cb")).await, t); // cust-cb's value added
    let r = e
        .shred(shred_req("cust-ca", "cache-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.keyspaces[0].outcome, pb::ShredOutcome::Shredded as i32);
    assert_eq!(
        value_of(&mut c, &t).await,
        "Lisbon",
        "cust-cb still holds it"
    );
    // `orders` lets a shredded subject come back with a new key (after_shred = new_key):
    // cust-ca's cached entries were made with its old key and must not answer for the new
    // one. Its per-subject token made before the shred stays dead; the value gets a new one.
    let old = tokenize(&mut c, det("cust-ca", "city", "Lisbon", F::Opaque)).await;
    assert_eq!(tokenize(&mut c, join("cust-ca")).await, t, "joins again");
    e.shred(shred_req("cust-ca", "cache-2")).await.unwrap();
    assert_eq!(
        reason(&err(detokenize(&mut c, &old).await)),
        "SUBJECT_SHREDDED"
    );
    let new = tokenize(&mut c, det("cust-ca", "city", "Lisbon", F::Opaque)).await;
    assert_ne!(new, old, "not the cached token of the shredded key");
    assert_eq!(value_of(&mut c, &new).await, "Lisbon");

    // Expiry: a 2 s token, detokenised (cached with its 2 s expiry), extended to an hour.
    let ttl = |secs| {
        req(
            "orders",
            "cust-ttl",
            "email",
            "x@example.com",
            F::Email,
            pb::TokenMode::Deterministic,
            0,
            secs,
        )
    };
    let short = tokenize(&mut c, ttl(2)).await;
    assert_eq!(value_of(&mut c, &short).await, "x@example.com");
    let long = c.tokenize(ttl(3600)).await.unwrap().into_inner();
    assert_eq!(long.token, short);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(long.expires_at > now + 3000, "the later expiry wins");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(value_of(&mut c, &short).await, "x@example.com", "extended");
    // And a short one that really expires, after it was cached.
    let mut r = rnd("cust-ttl", "name", "Judy", F::Opaque);
    r.ttl_seconds = 1;
    let dying = tokenize(&mut c, r).await;
    assert_eq!(value_of(&mut c, &dying).await, "Judy");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = err(detokenize(&mut c, &dying).await);
    assert_eq!(
        (s.code(), reason(&s).as_str()),
        (Code::NotFound, "TOKEN_EXPIRED")
    );
}

/// Two replicas on one PostgreSQL store: B has cached a token row (Detokenize) and a
/// deterministic token (Tokenize) of a subject; A shreds the subject. A refuses at once; B
/// must refuse both calls as SHREDDED once the eviction reaches it (NOTIFY, else the feed's
/// poll: the bound Decrypt has too), never serve the cached row after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shred_on_one_replica_reaches_the_token_caches_of_another_postgres() {
    use pb::TokenFormat as F;
    let pg = Postgres::start();
    let env = TestEnv::start_with_store(Some(pg.url.clone())).await;
    let a = env.server("a", "").await;
    let b = env.server("b", "").await;
    let mut ca = tokens(&env, &a).await;
    let mut cb = tokens(&env, &b).await;

    let rand = tokenize(&mut ca, rnd("cust-r", "name", "Mallory", F::Opaque)).await;
    let dt = tokenize(&mut ca, det("cust-r", "email", "m@example.com", F::Email)).await;
    // B caches both (twice: the second call is a hit).
    for _ in 0..2 {
        assert_eq!(value_of(&mut cb, &rand).await, "Mallory");
        assert_eq!(
            tokenize(&mut cb, det("cust-r", "email", "m@example.com", F::Email)).await,
            dt
        );
    }
    let r = env
        .erasure(&a)
        .await
        .shred(shred_req("cust-r", "cache-pg"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.keyspaces[0].outcome, pb::ShredOutcome::Shredded as i32);
    for t in [&rand, &dt] {
        assert_eq!(
            reason(&err(detokenize(&mut ca, t).await)),
            "SUBJECT_SHREDDED"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match detokenize(&mut cb, &rand).await {
            Err(s) => {
                assert_eq!(reason(&s), "SUBJECT_SHREDDED");
                break;
            }
            Ok(_) => assert!(Instant::now() < deadline, "B serves a shredded token"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once B knows, its cached row and deterministic token are dead, now and later: the old
    // tokens refuse; the subject comes back with a new key (`orders`: after_shred =
    // new_key) and the value gets a new token, not B's cached one of the shredded key.
    for _ in 0..3 {
        for t in [&rand, &dt] {
            assert_eq!(
                reason(&err(detokenize(&mut cb, t).await)),
                "SUBJECT_SHREDDED"
            );
        }
    }
    let again = tokenize(&mut cb, det("cust-r", "email", "m@example.com", F::Email)).await;
    assert_ne!(again, dt, "B served its cached token of the shredded key");
    assert_eq!(value_of(&mut ca, &again).await, "m@example.com");
    assert_eq!(
        reason(&err(detokenize(&mut cb, &dt).await)),
        "SUBJECT_SHREDDED"
    );
}
