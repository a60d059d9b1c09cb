//! Vault paused, then killed and restarted (Raft storage, unsealed again), under a sustained
//! mixed load from several callers; piiguard is never restarted (issue 13).
//!
//! What callers must see: zero wrong answers; warm subjects served from the DEK cache the whole
//! time; calls that need Vault answered `UNAVAILABLE` / `VAULT_UNAVAILABLE` (nothing else) within
//! the Vault request timeout; recovery by itself once Vault is back; and an audit log whose
//! chain and signed checkpoints verify across the outage (checkpoint signing resumes).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use piiguard::pb::tokens_client::TokensClient;
use tonic::Code;

#[derive(Default)]
struct Tally {
    /// (phase, kind) -> (ok, failed)
    counts: BTreeMap<(&'static str, &'static str), (u64, u64)>,
    /// Errors other than UNAVAILABLE / VAULT_UNAVAILABLE, or wrong answers.
    wrong: Vec<String>,
    /// Cold Encrypts that succeeded: (subject, ciphertext), checked after the run.
    cold_made: Vec<(String, Vec<u8>)>,
    /// Longest failed call.
    slowest_failure: Duration,
    /// Longest warm call (all succeed).
    slowest_warm: Duration,
}

fn signal(pid: u32, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_paused_then_killed_and_restarted_under_mixed_load() {
    let mut env = TestEnv::start().await;
    let mut server = env
        .server_env(
            "vf",
            "",
            vec![
                // A checkpoint every second, so that some fall in the outage.
                ("PIIGUARD_AUDIT__CHECKPOINT_SECS".into(), "1".into()),
            ],
        )
        .await;

    // The warm set: subjects with a cached DEK, a ciphertext each.
    let mut c = env.client(&server, "orders").await;
    let mut warm = Vec::new();
    for i in 0..16 {
        let pt = format!("warm-{i}@example.com");
        let ct = c
            .encrypt(enc(
                "orders",
                &format!("vf-warm-{i}"),
                "email",
                pt.as_bytes(),
            ))
            .await
            .unwrap()
            .into_inner()
            .ciphertext;
        warm.push((format!("vf-warm-{i}"), pt, ct));
    }
    let warm = Arc::new(warm);
    let phase = Arc::new(Mutex::new("before"));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));

    let mut workers = Vec::new();
    for w in 0..4u64 {
        let (warm, phase, tally, stop, seq) = (
            warm.clone(),
            phase.clone(),
            tally.clone(),
            stop.clone(),
            seq.clone(),
        );
        let ch = env.channel(&server, "orders").await;
        workers.push(tokio::spawn(async move {
            let mut c = piiguard::pb::crypto_client::CryptoClient::new(ch.clone());
            let mut t = TokensClient::new(ch);
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let (subject, pt, ct) = &warm[(i + w as usize) % warm.len()];
                i += 1;
                // Workers 0 and 1 call for warm subjects only, 2 and 3 for new subjects only,
                // so a call stuck on Vault never holds back a warm one of the same worker.
                let kind = match (w, n % 3) {
                    (2 | 3, _) => "cold encrypt",
                    (_, 0) => "warm decrypt",
                    (_, 1) => "warm encrypt",
                    _ => "warm tokenize",
                };
                let started = Instant::now();
                let cold_subject = format!("vf-cold-{n}");
                let result: Result<Option<Vec<u8>>, tonic::Status> = match kind {
                    "warm decrypt" => c.decrypt(dec("email", ct)).await.map(|r| {
                        let got = r.into_inner().plaintext;
                        (got != pt.as_bytes()).then_some(got)
                    }),
                    "warm encrypt" => c
                        .encrypt(enc("orders", subject, "email", pt.as_bytes()))
                        .await
                        .map(|_| None),
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
                        .map(|_| None),
                    _ => c
                        .encrypt(enc("orders", &cold_subject, "email", b"cold@example.com"))
                        .await
                        .map(|r| {
                            let ct = r.into_inner().ciphertext;
                            tally
                                .lock()
                                .unwrap()
                                .cold_made
                                .push((cold_subject.clone(), ct));
                            None
                        }),
                };
                // A call counts in the phase in which it ended: what callers saw during it.
                let ph = *phase.lock().unwrap();
                {
                    let mut g = tally.lock().unwrap();
                    let e = g.counts.entry((ph, kind)).or_default();
                    match result {
                        Ok(None) => {
                            e.0 += 1;
                            if kind.starts_with("warm") {
                                g.slowest_warm = g.slowest_warm.max(started.elapsed());
                            }
                        }
                        Ok(Some(_)) => {
                            e.1 += 1;
                            g.wrong.push(format!("{ph}/{kind}: WRONG PLAINTEXT"));
                        }
                        Err(s) => {
                            e.1 += 1;
                            g.slowest_failure = g.slowest_failure.max(started.elapsed());
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
    let first_cold_ok_after = |since: Instant, label: &'static str| {
        let tally = tally.clone();
        async move {
            let n0 = tally.lock().unwrap().cold_made.len();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if tally.lock().unwrap().cold_made.len() > n0 {
                    return since.elapsed();
                }
                assert!(
                    Instant::now() < deadline,
                    "{label}: no cold Encrypt succeeded within 60 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1. Vault paused (SIGSTOP): its sockets accept, nothing answers.
    let pid = env.bao.pid().expect("OpenBao runs");
    set_phase("paused");
    signal(pid, "-STOP");
    tokio::time::sleep(Duration::from_secs(8)).await;
    signal(pid, "-CONT");
    set_phase("after pause");
    let resumed = Instant::now();
    let pause_recovery = first_cold_ok_after(resumed, "after the pause").await;

    // 2. Vault killed (SIGKILL) for 5 s, then started again on its Raft data and unsealed.
    set_phase("killed");
    env.bao.stop();
    tokio::time::sleep(Duration::from_secs(5)).await;
    env.bao.restart().await.expect("restart OpenBao");
    set_phase("after restart");
    let restarted = Instant::now();
    let restart_recovery = first_cold_ok_after(restarted, "after the restart").await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let tally = Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap();
    for ((ph, kind), (ok, failed)) in &tally.counts {
        println!("vault-faults: {ph:>13} {kind:<13} ok {ok:>5} failed {failed:>4}");
    }
    println!(
        "vault-faults: cold Encrypt served again {pause_recovery:?} after SIGCONT, \
         {restart_recovery:?} after the restarted Vault was unsealed; slowest failed call {:?}; \
         slowest warm call {:?}",
        tally.slowest_failure, tally.slowest_warm
    );
    assert!(tally.wrong.is_empty(), "{:#?}", tally.wrong);
    // Warm subjects never failed, in any phase.
    for ((ph, kind), (ok, failed)) in &tally.counts {
        if kind.starts_with("warm") {
            assert_eq!(*failed, 0, "{ph}/{kind} failed {failed} times");
            assert!(*ok > 0, "{ph}/{kind} never ran");
        }
    }
    // The outages were felt where Vault is needed (the test shows something).
    for ph in ["paused", "killed"] {
        let (_, failed) = tally
            .counts
            .get(&(ph, "cold encrypt"))
            .copied()
            .unwrap_or_default();
        assert!(failed > 0, "no cold Encrypt failed while Vault was {ph}");
    }
    // Every ciphertext made during the run decrypts to what was encrypted.
    let mut c = env.client(&server, "orders").await;
    for (subject, ct) in tally.cold_made.iter().step_by(7) {
        let pt = c
            .decrypt(dec("email", ct))
            .await
            .unwrap()
            .into_inner()
            .plaintext;
        assert_eq!(pt, b"cold@example.com", "{subject}");
    }

    // The audit log: stop cleanly, then the chain and every signed checkpoint verify with the
    // signing key's public keys, checkpoints signed after the outage included.
    server.stop();
    let pem = env.dir.path().join("vf-signing.pem");
    std::fs::write(&pem, env.signing_public_keys().await.join("\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_piiguard"))
        .args(["audit", "verify", "--public-key"])
        .arg(&pem)
        .args(server.audit_files())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = server.audit_records();
    let last_outage_end = records
        .iter()
        .rposition(|r| r["reason"] == "VAULT_UNAVAILABLE")
        .expect("the outage is in the audit log");
    assert!(
        records[last_outage_end..]
            .iter()
            .any(|r| r["kind"] == "checkpoint" && r["final_seal"] != true),
        "no periodic signed checkpoint after the outage (only the final seal)"
    );
}
