//! Vault HA (issue 13): piiguard configured with the three addresses of an OpenBao Raft
//! cluster; the active node SIGKILLed under a mixed load from four callers; piiguard fails over
//! to the other nodes by itself (never restarted), and the killed node rejoins.
//!
//! What callers must see: zero wrong answers; warm subjects served from the DEK cache the whole
//! time; calls that need Vault answered `UNAVAILABLE` / `VAULT_UNAVAILABLE` (nothing else) while
//! no node serves; cold calls served again once the cluster has a new leader. The error window
//! (kill → first successful cold call started after it) is printed; its bound is a hang guard,
//! not a speed claim (docs/RELIABILITY.md records the measured one).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use piiguard::pb::crypto_client::CryptoClient;
use piiguard::pb::tokens_client::TokensClient;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

use crate::common::*;

#[derive(Default)]
struct Tally {
    /// (phase, kind) -> (ok, failed)
    counts: BTreeMap<(&'static str, &'static str), (u64, u64)>,
    /// Errors other than UNAVAILABLE / VAULT_UNAVAILABLE, or wrong answers.
    wrong: Vec<String>,
    /// Cold Encrypts that succeeded: (ciphertext, plaintext, started at), checked afterwards.
    cold_made: Vec<(Vec<u8>, String, Instant)>,
    /// Tokens made: (token, value), detokenized afterwards.
    tokens: Vec<(String, String)>,
    /// Longest failed call.
    slowest_failure: Duration,
}

/// The value of an unlabelled metric on the server's `/metrics` (0 if absent).
async fn scrape_one(server: &Server, name: &str) -> f64 {
    let addr = server.metrics_addr.expect("metrics listener");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    resp.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_vault_node_killed_under_load_piiguard_follows_the_new_leader() {
    let started = Instant::now();
    let mut cluster = BaoCluster::start(3).await;
    let cluster_up = started.elapsed();
    let server = cluster
        .env
        .server_custom(
            "ha",
            "",
            vec![("PIIGUARD_METRICS__LISTEN".into(), "127.0.0.1:0".into())],
            |t| cluster.use_all_addresses(t),
        )
        .await;

    // The warm set: subjects with a cached DEK, a ciphertext each.
    let mut c = cluster.env.client(&server, "orders").await;
    let mut warm = Vec::new();
    for i in 0..8 {
        let (subject, pt) = (format!("ha-warm-{i}"), format!("warm-{i}@example.com"));
        let ct = c
            .encrypt(enc("orders", &subject, "email", pt.as_bytes()))
            .await
            .unwrap()
            .into_inner()
            .ciphertext;
        warm.push((subject, pt, ct));
    }
    let warm = Arc::new(warm);
    let phase = Arc::new(Mutex::new("before"));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));

    // Four callers: 0 warm Encrypt/Decrypt, 1 Tokenize of warm subjects, 2 and 3 cold Encrypts
    // of new subjects (each a Vault round trip: KV CAS writes and a transit encrypt).
    let mut workers = Vec::new();
    for w in 0..4usize {
        let (warm, phase, tally, stop, seq) = (
            warm.clone(),
            phase.clone(),
            tally.clone(),
            stop.clone(),
            seq.clone(),
        );
        let ch = cluster.env.channel(&server, "orders").await;
        workers.push(tokio::spawn(async move {
            let mut c = CryptoClient::new(ch.clone());
            let mut t = TokensClient::new(ch);
            while !stop.load(Ordering::Relaxed) {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let (subject, pt, ct) = &warm[n as usize % warm.len()];
                let kind = match (w, n % 2) {
                    (0, 0) => "warm decrypt",
                    (0, _) => "warm encrypt",
                    (1, _) => "warm tokenize",
                    _ => "cold encrypt",
                };
                let call_started = Instant::now();
                let cold_pt = format!("cold-{n}@example.com");
                let result: Result<bool, tonic::Status> = match kind {
                    "warm decrypt" => c
                        .decrypt(dec("email", ct))
                        .await
                        .map(|r| r.into_inner().plaintext == pt.as_bytes()),
                    "warm encrypt" => c
                        .encrypt(enc("orders", subject, "email", pt.as_bytes()))
                        .await
                        .map(|_| true),
                    "warm tokenize" => t
                        .tokenize(piiguard::pb::TokenizeRequest {
                            keyspace: "orders".into(),
                            subject: subject.clone(),
                            field: "email".into(),
                            value: pt.clone(),
                            format: 0,
                            mode: 0,
                            keep_last: 0,
                            ttl_seconds: 0,
                        })
                        .await
                        .map(|r| {
                            let token = r.into_inner().token;
                            tally.lock().unwrap().tokens.push((token, pt.clone()));
                            true
                        }),
                    _ => c
                        .encrypt(enc(
                            "orders",
                            &format!("ha-cold-{n}"),
                            "email",
                            cold_pt.as_bytes(),
                        ))
                        .await
                        .map(|r| {
                            let ct = r.into_inner().ciphertext;
                            tally.lock().unwrap().cold_made.push((
                                ct,
                                cold_pt.clone(),
                                call_started,
                            ));
                            true
                        }),
                };
                let ph = *phase.lock().unwrap();
                {
                    let mut g = tally.lock().unwrap();
                    if result.is_err() {
                        g.slowest_failure = g.slowest_failure.max(call_started.elapsed());
                    }
                    let e = g.counts.entry((ph, kind)).or_default();
                    match result {
                        Ok(true) => e.0 += 1,
                        Ok(false) => {
                            e.1 += 1;
                            g.wrong.push(format!("{ph}/{kind}: WRONG PLAINTEXT"));
                        }
                        Err(s) => {
                            e.1 += 1;
                            if s.code() != Code::Unavailable || reason(&s) != "VAULT_UNAVAILABLE" {
                                g.wrong.push(format!(
                                    "{ph}/{kind}: {:?} {} {}",
                                    s.code(),
                                    reason(&s),
                                    s.message()
                                ));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let set_phase = |p: &'static str| *phase.lock().unwrap() = p;
    // The first cold Encrypt that started at or after `since` and succeeded.
    let cold_served_since = |since: Instant| {
        tally
            .lock()
            .unwrap()
            .cold_made
            .iter()
            .any(|(_, _, at)| *at >= since)
    };

    tokio::time::sleep(Duration::from_secs(3)).await;

    // The active node killed (SIGKILL) under load.
    let leader = cluster.leader_index().await.expect("a leader");
    set_phase("after kill");
    let killed_at = Instant::now();
    cluster.kill(leader);
    let mut elected = None;
    let window = loop {
        if elected.is_none() && cluster.leader_index().await.is_some() {
            elected = Some(killed_at.elapsed());
        }
        if cold_served_since(killed_at) {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "hang guard: no cold Encrypt served within 30 s of killing the active node {leader}\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let new_leader = cluster.leader_index().await;
    let elected = elected.unwrap_or_else(|| killed_at.elapsed());
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(killed_at.elapsed())).await;

    // The killed node started again: it rejoins (unsealed, three voters again).
    set_phase("after rejoin");
    cluster.restart(leader).await;
    cluster.wait_for_voters(3).await;
    let rejoined = Instant::now();
    while !cold_served_since(rejoined) {
        assert!(rejoined.elapsed() < Duration::from_secs(30), "hang guard");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let tally = Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap();
    for ((ph, kind), (ok, failed)) in &tally.counts {
        println!("vault-ha: {ph:>12} {kind:<13} ok {ok:>5} failed {failed:>4}");
    }
    let failovers = scrape_one(&server, "piiguard_vault_failovers_total").await;
    println!(
        "vault-ha: cluster of 3 up in {cluster_up:?}; node {leader} (active) killed; new leader \
         {new_leader:?} seen {elected:?} after the kill; first cold Encrypt served {window:?} \
         after the kill; slowest failed call {:?}; {failovers} fail-over(s); whole test {:?}",
        tally.slowest_failure,
        started.elapsed()
    );

    let log = server.log_text();
    let switches: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("switching to the next address"))
        .collect();
    let causes: BTreeMap<&str, usize> = ["HTTP 5", "HTTP 3", "no answer"]
        .into_iter()
        .map(|c| (c, switches.iter().filter(|l| l.contains(c)).count()))
        .collect();
    println!("vault-ha: fail-overs logged by cause: {causes:?}");
    assert!(tally.wrong.is_empty(), "{:#?}", tally.wrong);
    for ((ph, kind), (ok, failed)) in &tally.counts {
        if kind.starts_with("warm") {
            assert_eq!(*failed, 0, "{ph}/{kind} failed {failed} times");
            assert!(*ok > 0, "{ph}/{kind} never ran");
        }
    }
    assert!(failovers >= 1.0, "piiguard never failed over");
    assert!(
        server
            .log_text()
            .contains("Vault node failed; switching to the next address")
    );
    assert_ne!(new_leader, Some(leader));

    // Every ciphertext and token made during the run gives back what was given.
    let mut c = cluster.env.client(&server, "orders").await;
    for (ct, pt, _) in tally.cold_made.iter().step_by(5) {
        let got = c.decrypt(dec("email", ct)).await.unwrap().into_inner();
        assert_eq!(got.plaintext, pt.as_bytes());
    }
    let mut t = TokensClient::new(cluster.env.channel(&server, "orders").await);
    for (token, value) in tally.tokens.iter().step_by(25) {
        let got = t
            .detokenize(piiguard::pb::DetokenizeRequest {
                keyspace: "orders".into(),
                token: token.clone(),
                reveal: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&got.value, value);
    }
}
