//! Vault slow or lossy (issue 13): piiguard talks to OpenBao through a loopback TCP proxy
//! ([`Proxy`]) that adds latency, stalls or drops connections, switched while one server runs.
//!
//! What it shows, on one server:
//! - (c) with 300 ms added to every request to Vault, cold calls still succeed (slower);
//! - (a) with Vault stalled, every cold call with a 2 s gRPC deadline ends within the deadline
//!   plus a small margin (DEADLINE_EXCEEDED, CANCELLED or UNAVAILABLE), never hangs; warm calls
//!   are served from the DEK cache;
//! - (b) with Vault stalled and 200 cold callers in flight at once, the calls past the bound
//!   (`vault.max_in_flight`) are refused quickly with RESOURCE_EXHAUSTED / `VAULT_OVERLOADED`
//!   instead of piling up; the server's RSS stays bounded (before / peak / after printed; only
//!   a generous leak guard is asserted); warm calls keep being served meanwhile;
//! - with connections dropped, cold calls fail fast with UNAVAILABLE / `VAULT_UNAVAILABLE`;
//! - after the proxy passes bytes again, everything recovers without a restart and every
//!   ciphertext made decrypts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use piiguard::pb::crypto_client::CryptoClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::*;

/// The bound the test server runs with (small, so 200 callers are well past it).
const MAX_IN_FLIGHT: usize = 8;
/// How long a Vault request waits for a place.
const QUEUE_TIMEOUT: Duration = Duration::from_millis(300);
/// The gRPC deadline every cold caller sets.
const DEADLINE: Duration = Duration::from_secs(2);
/// How late past its deadline a call may end (scheduling on a loaded 2-core machine).
const MARGIN: Duration = Duration::from_millis(1500);

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One Encrypt with a gRPC deadline; panics if it does not end within the deadline plus 10 s
/// (a hang).
async fn encrypt_by(
    c: &mut CryptoClient<Channel>,
    subject: &str,
    deadline: Duration,
) -> (Result<Vec<u8>, tonic::Status>, Duration) {
    let mut req = tonic::Request::new(enc("orders", subject, "email", b"slow@example.com"));
    req.set_timeout(deadline);
    let started = Instant::now();
    let r = tokio::time::timeout(deadline + Duration::from_secs(10), c.encrypt(req))
        .await
        .unwrap_or_else(|_| panic!("Encrypt of {subject} hung past its deadline"));
    (r.map(|r| r.into_inner().ciphertext), started.elapsed())
}

/// A deadline ended the call (the server's grpc-timeout, tonic maps it to CANCELLED; or the
/// client's), or Vault was declared unavailable.
fn is_deadline_or_unavailable(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled)
        || (s.code() == Code::Unavailable && reason(s) == "VAULT_UNAVAILABLE")
}

fn upstream(bao_address: &str) -> SocketAddr {
    bao_address
        .trim_start_matches("https://")
        .parse()
        .expect("OpenBao address is https://127.0.0.1:PORT")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_slow_stalled_and_dropped_calls_end_in_time_and_overload_is_refused() {
    let env = TestEnv::start().await;
    let proxy = Proxy::start(upstream(&env.bao.address)).await;
    let server = env
        .server_env(
            "vs",
            "",
            vec![
                ("PIIGUARD_VAULT__ADDRESS".into(), proxy.url()),
                (
                    "PIIGUARD_VAULT__MAX_IN_FLIGHT".into(),
                    MAX_IN_FLIGHT.to_string(),
                ),
                (
                    "PIIGUARD_VAULT__QUEUE_TIMEOUT_MS".into(),
                    QUEUE_TIMEOUT.as_millis().to_string(),
                ),
                ("PIIGUARD_VAULT__REQUEST_TIMEOUT_SECS".into(), "3".into()),
            ],
        )
        .await;
    let pid = server.pid();
    assert!(
        proxy.accepted() > 0,
        "piiguard does not talk to Vault through the proxy"
    );

    // Warm subjects: a cached DEK and a ciphertext each.
    let mut c = env.client(&server, "orders").await;
    let mut warm = Vec::new();
    for i in 0..8 {
        let (r, _) = encrypt_by(&mut c, &format!("vs-warm-{i}"), Duration::from_secs(10)).await;
        warm.push((format!("vs-warm-{i}"), r.unwrap()));
    }
    let warm = Arc::new(warm);
    let mut made: Vec<(String, Vec<u8>)> = Vec::new();

    // (c) 300 ms per request to Vault: cold calls succeed, slower.
    proxy.set(Mode::Latency(Duration::from_millis(300)));
    for i in 0..3 {
        let subject = format!("vs-latency-{i}");
        let (r, took) = encrypt_by(&mut c, &subject, Duration::from_secs(20)).await;
        let ct = r.unwrap_or_else(|s| panic!("cold Encrypt with 300 ms latency: {s:?}"));
        println!("vault-slow: cold Encrypt with 300 ms per Vault request took {took:?}");
        // The latency was felt (a cold Encrypt makes at least one Vault request).
        assert!(took >= Duration::from_millis(300), "{took:?}");
        made.push((subject, ct));
    }

    // (a) Vault stalled: every cold call ends within its deadline (plus margin).
    proxy.set(Mode::Stall);
    for i in 0..4 {
        let (r, took) = encrypt_by(&mut c, &format!("vs-stall-{i}"), DEADLINE).await;
        let s = r.expect_err("a cold Encrypt cannot succeed with Vault stalled");
        println!(
            "vault-slow: stalled cold Encrypt ended after {took:?}: {:?} {}",
            s.code(),
            reason(&s)
        );
        assert!(is_deadline_or_unavailable(&s), "{s:?}");
        assert!(took <= DEADLINE + MARGIN, "ended after {took:?}");
    }
    for (subject, ct) in warm.iter() {
        let pt = c
            .decrypt(dec("email", ct))
            .await
            .unwrap()
            .into_inner()
            .plaintext;
        assert_eq!(pt, b"slow@example.com", "{subject}");
    }

    // (b) Still stalled: 200 cold callers at once, over 4 connections.
    let rss_before = rss_kib(pid);
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(env.channel(&server, "orders").await);
    }
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for i in 0..200 {
        let mut cc = CryptoClient::new(channels[i % 4].clone());
        callers.spawn(async move {
            let (r, took) = encrypt_by(&mut cc, &format!("vs-burst-{i}"), DEADLINE).await;
            (r.err(), took)
        });
    }
    // Warm calls and RSS samples while the burst is in flight.
    let mut rss_peak = rss_before;
    let mut warm_ok = 0u32;
    let mut wc = CryptoClient::new(env.channel(&server, "orders").await);
    while started.elapsed() < DEADLINE + Duration::from_millis(500) {
        rss_peak = rss_peak.max(rss_kib(pid));
        let (subject, ct) = &warm[warm_ok as usize % warm.len()];
        let mut req = tonic::Request::new(dec("email", ct));
        req.set_timeout(Duration::from_secs(5));
        let pt = wc
            .decrypt(req)
            .await
            .unwrap_or_else(|s| panic!("warm Decrypt of {subject} during the burst: {s:?}"))
            .into_inner()
            .plaintext;
        assert_eq!(pt, b"slow@example.com");
        warm_ok += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut overloaded = Vec::new();
    let mut other = Vec::new();
    let mut slowest = Duration::ZERO;
    while let Some(r) = callers.join_next().await {
        let (err, took) = r.unwrap();
        rss_peak = rss_peak.max(rss_kib(pid));
        slowest = slowest.max(took);
        let s = err.expect("a cold Encrypt cannot succeed with Vault stalled");
        if s.code() == Code::ResourceExhausted {
            assert_eq!(reason(&s), "VAULT_OVERLOADED", "{s:?}");
            overloaded.push(took);
        } else {
            assert!(is_deadline_or_unavailable(&s), "{s:?}");
            other.push(took);
        }
    }
    let burst_took = started.elapsed();
    overloaded.sort();
    let median_refusal = overloaded.get(overloaded.len() / 2).copied();
    println!(
        "vault-slow: 200 cold callers with Vault stalled (max_in_flight {MAX_IN_FLIGHT}, \
         queue {QUEUE_TIMEOUT:?}): {} RESOURCE_EXHAUSTED/VAULT_OVERLOADED (median after \
         {median_refusal:?}, slowest {:?}), {} deadline/unavailable; all ended within \
         {burst_took:?} (slowest call {slowest:?}); {warm_ok} warm Decrypts served meanwhile",
        overloaded.len(),
        overloaded.last().copied().unwrap_or_default(),
        other.len(),
    );
    // Past the bound, callers are refused rather than queued until their deadline.
    assert!(
        overloaded.len() >= 100,
        "only {} of 200 callers were refused with VAULT_OVERLOADED",
        overloaded.len()
    );
    // Refused quickly: after the queue timeout, well before the deadline.
    assert!(
        overloaded.iter().all(|t| *t < QUEUE_TIMEOUT + MARGIN),
        "a refusal took {:?}",
        overloaded.last()
    );
    assert!(slowest <= DEADLINE + MARGIN, "a caller took {slowest:?}");
    assert!(warm_ok > 0, "no warm call was served during the burst");

    // Dropped connections: cold calls fail fast with UNAVAILABLE; warm ones still served.
    proxy.set(Mode::Drop);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..3 {
        let (r, took) = encrypt_by(&mut c, &format!("vs-drop-{i}"), DEADLINE).await;
        let s = r.expect_err("a cold Encrypt cannot succeed with Vault unreachable");
        println!(
            "vault-slow: cold Encrypt with connections dropped ended after {took:?}: {:?} {}",
            s.code(),
            reason(&s)
        );
        assert!(is_deadline_or_unavailable(&s), "{s:?}");
        assert!(took <= DEADLINE + MARGIN, "ended after {took:?}");
    }
    let (subject, ct) = &warm[0];
    let pt = c
        .decrypt(dec("email", ct))
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(pt, b"slow@example.com", "{subject}");

    // Back to pass-through: cold calls succeed again, without a restart.
    proxy.set(Mode::Pass);
    let back = Instant::now();
    let recovered = loop {
        let (r, _) = encrypt_by(&mut c, "vs-after", Duration::from_secs(5)).await;
        match r {
            Ok(ct) => {
                made.push(("vs-after".into(), ct));
                break back.elapsed();
            }
            Err(s) => {
                assert!(
                    back.elapsed() < Duration::from_secs(30),
                    "no recovery within 30 s: {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    for i in 0..20 {
        let subject = format!("vs-after-{i}");
        let (r, _) = encrypt_by(&mut c, &subject, Duration::from_secs(10)).await;
        made.push((subject, r.unwrap()));
    }
    for (subject, ct) in &made {
        let pt = c
            .decrypt(dec("email", ct))
            .await
            .unwrap()
            .into_inner()
            .plaintext;
        assert_eq!(pt, b"slow@example.com", "{subject}");
    }
    let rss_after = rss_kib(pid);
    println!(
        "vault-slow: cold calls served again {recovered:?} after pass-through; RSS before the \
         burst {rss_before} KiB, peak {rss_peak} KiB, after recovery {rss_after} KiB; proxy \
         accepted {} connections, {} open",
        proxy.accepted(),
        proxy.open()
    );
    // A leak or pile-up guard only (a 200-call burst costs a few MiB at most).
    assert!(
        rss_peak < rss_before + 256 * 1024,
        "RSS grew from {rss_before} KiB to {rss_peak} KiB"
    );
}
