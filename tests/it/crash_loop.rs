//! kill -9 at random moments of a mixed workload, again and again (issue 13): cold and warm
//! Encrypt, Tokenize, Shred, ShredStream and retention expiry from concurrent callers, then
//! SIGKILL and a restart on the same Vault, store and audit folder. After every restart:
//! - every acknowledged write is there: acknowledged ciphertexts decrypt, acknowledged tokens
//!   detokenise, acknowledged shreds are SHREDDED with their data unreadable;
//! - a shred that was in flight is either complete or not started, never half (SHREDDED and
//!   unreadable, or ACTIVE and readable), after at most the reaper's resume;
//! - the audit log verifies (chain and signatures); the crash shows as an open tail, not as
//!   tampering.
//!
//! At the end, every subject whose retention expired is shredded.
//!
//! `PIIGUARD_CRASH_LOOPS` sets the number of crashes (50 by default, the CI form;
//! `scripts/crash-loop.sh` runs more).

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::*;
use piiguard::pb;
use piiguard::pb::erasure_client::ErasureClient;
use piiguard::pb::tokens_client::TokensClient;
use tonic::Code;

#[derive(Default)]
struct Acked {
    /// (subject, plaintext, ciphertext) of subjects never shredded.
    cts: Vec<(String, Vec<u8>, Vec<u8>)>,
    /// (token, value).
    tokens: Vec<(String, String)>,
    /// Subjects whose shred was acknowledged, with a ciphertext of theirs.
    shreds: Vec<(String, Vec<u8>)>,
    /// Subjects whose shred was sent but not acknowledged (the crash came first).
    shreds_in_flight: Vec<(String, Vec<u8>)>,
    /// Subjects whose (already expired) retention was acknowledged, with a ciphertext.
    retained: Vec<(String, Vec<u8>)>,
    /// Answers that are wrong (not a refusal: a wrong value).
    wrong: Vec<String>,
}

/// A small deterministic generator (the seed is printed: a failing run can be replayed).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn shred_req(subject: &str, id: &str) -> pb::ShredRequest {
    pb::ShredRequest {
        subject: subject.into(),
        keyspace: "orders".into(),
        reason: "crash loop".into(),
        request_id: id.into(),
    }
}

async fn status(e: &mut ErasureClient<tonic::transport::Channel>, subject: &str) -> i32 {
    e.get_shred_status(pb::GetShredStatusRequest {
        subject: subject.into(),
        keyspace: "orders".into(),
    })
    .await
    .unwrap()
    .into_inner()
    .keyspaces[0]
        .state
}

/// Waits until the subject is SHREDDED or ACTIVE (a shred in flight at the crash resumes or
/// never started); returns which.
async fn settled(
    e: &mut ErasureClient<tonic::transport::Channel>,
    subject: &str,
) -> pb::ShredState {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = pb::ShredState::try_from(status(e, subject).await).unwrap();
        if matches!(s, pb::ShredState::Shredded | pb::ShredState::Active) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{subject}: still {s:?} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One round of load from one caller until the process dies under it.
async fn load(
    worker: u64,
    round: usize,
    ch: tonic::transport::Channel,
    erasure: tonic::transport::Channel,
    acked: Arc<Mutex<Acked>>,
) {
    let mut c = pb::crypto_client::CryptoClient::new(ch.clone());
    let mut t = TokensClient::new(ch);
    let mut e = ErasureClient::new(erasure);
    for n in 0.. {
        let subject = format!("cl-{round}-{worker}-{n}");
        let pt = format!("{subject}@example.com").into_bytes();
        // Cold Encrypt: a new subject.
        let Ok(r) = c.encrypt(enc("orders", &subject, "email", &pt)).await else {
            return;
        };
        let ct = r.into_inner().ciphertext;
        match (worker, n % 3) {
            // Tokenize + warm Encrypt of the same subject.
            (0, _) => {
                let value = format!("tok-{subject}");
                let Ok(tok) = t
                    .tokenize(pb::TokenizeRequest {
                        keyspace: "orders".into(),
                        subject: subject.clone(),
                        field: "email".into(),
                        value: value.clone(),
                        format: 0,
                        mode: 0,
                        keep_last: 0,
                        ttl_seconds: 0,
                    })
                    .await
                else {
                    return;
                };
                acked
                    .lock()
                    .unwrap()
                    .tokens
                    .push((tok.into_inner().token, value));
                if c.encrypt(enc("orders", &subject, "email", &pt))
                    .await
                    .is_err()
                {
                    return;
                }
                acked.lock().unwrap().cts.push((subject, pt, ct));
            }
            // Shred, unary or as a one-item stream.
            (1, k) => {
                acked
                    .lock()
                    .unwrap()
                    .shreds_in_flight
                    .push((subject.clone(), ct.clone()));
                let resp = if k == 0 {
                    let req = shred_req(&subject, &format!("s-{subject}"));
                    match e.shred_stream(tokio_stream::iter(vec![req])).await {
                        Ok(resp) => {
                            use tokio_stream::StreamExt;
                            let mut s = resp.into_inner();
                            s.next().await.and_then(Result::ok)
                        }
                        Err(_) => None,
                    }
                } else {
                    e.shred(shred_req(&subject, &format!("u-{subject}")))
                        .await
                        .ok()
                        .map(|r| r.into_inner())
                };
                // Acknowledged: every keyspace says SHREDDED (or already was).
                let ok = resp.is_some_and(|r| {
                    !r.keyspaces.is_empty()
                        && r.keyspaces.iter().all(|k| {
                            matches!(
                                pb::ShredOutcome::try_from(k.outcome),
                                Ok(pb::ShredOutcome::Shredded | pb::ShredOutcome::AlreadyShredded)
                            )
                        })
                });
                if !ok {
                    return;
                }
                let mut a = acked.lock().unwrap();
                a.shreds_in_flight.retain(|(s, _)| *s != subject);
                a.shreds.push((subject, ct));
            }
            // Retention that has already expired: the reaper shreds it.
            (2, 0) => {
                let r = e
                    .set_retention(pb::SetRetentionRequest {
                        subject: subject.clone(),
                        keyspace: "orders".into(),
                        retain_until: now() - 1,
                    })
                    .await;
                if r.is_err() {
                    return;
                }
                acked.lock().unwrap().retained.push((subject, ct));
            }
            // Plain cold Encrypts, with a decrypt check.
            _ => {
                match c.decrypt(dec("email", &ct)).await {
                    Ok(r) if r.get_ref().plaintext == pt => {}
                    Ok(_) => acked
                        .lock()
                        .unwrap()
                        .wrong
                        .push(format!("{subject}: wrong plaintext")),
                    Err(_) => return,
                }
                acked.lock().unwrap().cts.push((subject, pt, ct));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_of_a_mixed_workload_loses_nothing() {
    let loops: usize = std::env::var("PIIGUARD_CRASH_LOOPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let seed = std::env::var("PIIGUARD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now() as u64);
    println!("crash-loop: {loops} crashes, seed {seed} (PIIGUARD_CRASH_SEED to replay)");
    let mut rng = Lcg(seed);
    let env = TestEnv::start().await;
    let mut server = env
        .server_env(
            "crash",
            "",
            vec![
                ("PIIGUARD_ERASURE__REAPER_INTERVAL_SECS".into(), "1".into()),
                ("PIIGUARD_ERASURE__STALE_SHRED_SECS".into(), "1".into()),
            ],
        )
        .await;
    let acked = Arc::new(Mutex::new(Acked::default()));
    let pem = env.dir.path().join("crash-signing.pem");
    let (mut checked_cts, mut checked_tokens, mut checked_shreds) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    for round in 0..loops {
        let mut tasks = Vec::new();
        for w in 0..3u64 {
            let ch = env.channel(&server, "orders").await;
            let ech = env.channel(&server, "erasure").await;
            tasks.push(tokio::spawn(load(w, round, ch, ech, acked.clone())));
        }
        // Let the first round warm up; then kill at a random moment.
        let wait = if round == 0 { 800 } else { 50 + rng.next(700) };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        server.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        server.start().await;

        // What was acknowledged before the crash is there.
        let mut c = env.client(&server, "orders").await;
        let mut t = TokensClient::new(env.channel(&server, "orders").await);
        let mut e = env.erasure(&server).await;
        let (cts, tokens, shreds, in_flight) = {
            let mut a = acked.lock().unwrap();
            assert!(a.wrong.is_empty(), "round {round}: {:?}", a.wrong);
            let in_flight = std::mem::take(&mut a.shreds_in_flight);
            (
                a.cts[checked_cts..].to_vec(),
                a.tokens[checked_tokens..].to_vec(),
                a.shreds[checked_shreds..].to_vec(),
                in_flight,
            )
        };
        for (subject, pt, ct) in &cts {
            let got = c.decrypt(dec("email", ct)).await;
            assert_eq!(
                got.map(|r| r.into_inner().plaintext)
                    .map_err(|s| s.to_string()),
                Ok(pt.clone()),
                "round {round}: acknowledged ciphertext of {subject}"
            );
        }
        for (token, value) in &tokens {
            let got = t
                .detokenize(pb::DetokenizeRequest {
                    keyspace: "orders".into(),
                    token: token.clone(),
                    reveal: 0,
                })
                .await;
            assert_eq!(
                got.map(|r| r.into_inner().value).map_err(|s| s.to_string()),
                Ok(value.clone()),
                "round {round}: acknowledged token"
            );
        }
        for (subject, ct) in &shreds {
            assert_eq!(
                settled(&mut e, subject).await,
                pb::ShredState::Shredded,
                "round {round}: acknowledged shred of {subject}"
            );
            let err = c.decrypt(dec("email", ct)).await.err().expect("shredded");
            assert_eq!(reason(&err), "SUBJECT_SHREDDED", "round {round}: {subject}");
        }
        // A shred cut by the crash: complete (resumed) or never started, never half.
        for (subject, ct) in &in_flight {
            let got = c.decrypt(dec("email", ct)).await;
            match settled(&mut e, subject).await {
                pb::ShredState::Shredded => {
                    let err = got.err().expect("shredded subject readable");
                    assert_eq!(reason(&err), "SUBJECT_SHREDDED", "round {round}: {subject}");
                }
                _ => assert!(
                    got.is_ok(),
                    "round {round}: {subject} ACTIVE but unreadable: {:?}",
                    got.err()
                ),
            }
        }
        checked_cts += cts.len();
        checked_tokens += tokens.len();
        checked_shreds += shreds.len();

        // The audit log verifies; the crash is an open tail, not tampering.
        std::fs::write(&pem, env.signing_public_keys().await.join("\n")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_piiguard"))
            .args(["audit", "verify", "--public-key"])
            .arg(&pem)
            .args(server.audit_files())
            .output()
            .unwrap();
        // Exit 3 (OPEN TAIL): the restarted server is running, its newest records are not
        // signed yet. Exit 1 (FAILED) would be a break in the chain or a bad signature.
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            matches!(out.status.code(), Some(0 | 3)) && !text.contains("FAILED"),
            "round {round}: audit verify after a crash ({:?}):\n{text}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("ended without a final checkpoint"),
            "round {round}: the crash is not reported:\n{text}"
        );
    }

    // Every expired retention ends shredded (the reaper, across all the crashes).
    let retained = acked.lock().unwrap().retained.clone();
    let mut e = env.erasure(&server).await;
    let mut c = env.client(&server, "orders").await;
    for (subject, ct) in &retained {
        let deadline = Instant::now() + Duration::from_secs(60);
        while pb::ShredState::try_from(status(&mut e, subject).await).unwrap()
            != pb::ShredState::Shredded
        {
            assert!(
                Instant::now() < deadline,
                "{subject}: retention expired, never shredded"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let err = c.decrypt(dec("email", ct)).await.err().expect("shredded");
        assert_eq!(err.code(), Code::FailedPrecondition);
    }
    println!(
        "crash-loop: {loops} crashes in {:?}; checked {checked_cts} ciphertexts, {checked_tokens} tokens, \
         {checked_shreds} acknowledged shreds, {} expired retentions",
        started.elapsed(),
        retained.len()
    );
    assert!(checked_cts > 0 && checked_tokens > 0 && checked_shreds > 0 && !retained.is_empty());
    server.stop();
}
