//! A sustained mixed load from four callers on one server, for the Vault fault suites
//! (`vault_faults`, `vault_ha`): callers 0 and 1 call for warm subjects only (Decrypt, Encrypt
//! and Tokenize in turn), callers 2 and 3 Encrypt for new subjects only (each a Vault round
//! trip), so that a call stuck on Vault never holds back a warm one of the same caller.
//!
//! Every call is counted in the phase in which it ended (what callers saw during it); anything
//! but a right answer or `UNAVAILABLE` / `VAULT_UNAVAILABLE` is recorded as wrong. After the run,
//! [`Tally::check_sound`] asserts the promises every fault suite makes and
//! [`Tally::check_made`] that what was made during the run gives back what was given.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use piiguard::pb::crypto_client::CryptoClient;
use piiguard::pb::tokens_client::TokensClient;
use tonic::Code;

use super::{Server, TestEnv, dec, enc, reason};

/// What the callers saw.
#[derive(Default)]
pub struct Tally {
    /// (phase, kind) -> (ok, failed)
    pub counts: BTreeMap<(&'static str, &'static str), (u64, u64)>,
    /// Errors other than UNAVAILABLE / VAULT_UNAVAILABLE, or wrong answers.
    pub wrong: Vec<String>,
    /// Cold Encrypts that succeeded: (ciphertext, plaintext, started at).
    pub cold_made: Vec<(Vec<u8>, String, Instant)>,
    /// Tokens made: (token, value).
    pub tokens: Vec<(String, String)>,
    /// Longest failed call.
    pub slowest_failure: Duration,
    /// Longest warm call (all succeed).
    pub slowest_warm: Duration,
}

/// The four callers, running until [`finish`](Self::finish).
pub struct MixedLoad {
    phase: Arc<Mutex<&'static str>>,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl MixedLoad {
    /// Encrypts `warm` subjects named `<prefix>-warm-N` (cached DEKs), then starts the callers
    /// in phase "before". New subjects are named `<prefix>-cold-N`.
    pub async fn start(env: &TestEnv, server: &Server, prefix: &str, warm: usize) -> Self {
        let mut c = env.client(server, "orders").await;
        let mut set = Vec::new();
        for i in 0..warm {
            let (subject, pt) = (
                format!("{prefix}-warm-{i}"),
                format!("warm-{i}@example.com"),
            );
            let ct = c
                .encrypt(enc("orders", &subject, "email", pt.as_bytes()))
                .await
                .unwrap()
                .into_inner()
                .ciphertext;
            set.push((subject, pt, ct));
        }
        let set = Arc::new(set);
        let load = Self {
            phase: Arc::new(Mutex::new("before")),
            tally: Arc::new(Mutex::new(Tally::default())),
            stop: Arc::new(AtomicBool::new(false)),
            workers: Vec::new(),
        };
        let seq = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for w in 0..4usize {
            let (set, phase, tally, stop, seq) = (
                set.clone(),
                load.phase.clone(),
                load.tally.clone(),
                load.stop.clone(),
                seq.clone(),
            );
            let prefix = prefix.to_string();
            let ch = env.channel(server, "orders").await;
            workers.push(tokio::spawn(async move {
                let mut c = CryptoClient::new(ch.clone());
                let mut t = TokensClient::new(ch);
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    let (subject, pt, ct) = &set[(i + w) % set.len()];
                    i += 1;
                    let kind = match (w, n % 3) {
                        (2 | 3, _) => "cold encrypt",
                        (_, 0) => "warm decrypt",
                        (_, 1) => "warm encrypt",
                        _ => "warm tokenize",
                    };
                    let started = Instant::now();
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
                                &format!("{prefix}-cold-{n}"),
                                "email",
                                cold_pt.as_bytes(),
                            ))
                            .await
                            .map(|r| {
                                let ct = r.into_inner().ciphertext;
                                tally.lock().unwrap().cold_made.push((
                                    ct,
                                    cold_pt.clone(),
                                    started,
                                ));
                                true
                            }),
                    };
                    let ph = *phase.lock().unwrap();
                    {
                        let mut g = tally.lock().unwrap();
                        let e = g.counts.entry((ph, kind)).or_default();
                        match result {
                            Ok(true) => {
                                e.0 += 1;
                                if kind.starts_with("warm") {
                                    g.slowest_warm = g.slowest_warm.max(started.elapsed());
                                }
                            }
                            Ok(false) => {
                                e.1 += 1;
                                g.wrong.push(format!("{ph}/{kind}: WRONG PLAINTEXT"));
                            }
                            Err(s) => {
                                e.1 += 1;
                                g.slowest_failure = g.slowest_failure.max(started.elapsed());
                                if s.code() != Code::Unavailable
                                    || reason(&s) != "VAULT_UNAVAILABLE"
                                {
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
        Self { workers, ..load }
    }

    /// Calls that end from now on count in phase `p`.
    pub fn set_phase(&self, p: &'static str) {
        *self.phase.lock().unwrap() = p;
    }

    /// Whether a cold Encrypt that started at or after `since` succeeded.
    pub fn cold_served_since(&self, since: Instant) -> bool {
        self.tally
            .lock()
            .unwrap()
            .cold_made
            .iter()
            .any(|(_, _, at)| *at >= since)
    }

    /// Waits until a cold Encrypt started at or after `since` has succeeded; returns the time
    /// since `since`. Panics after `guard` (a hang guard, not a speed claim).
    pub async fn cold_served_after(&self, since: Instant, guard: Duration, what: &str) -> Duration {
        loop {
            if self.cold_served_since(since) {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < guard,
                "hang guard: no cold Encrypt served within {guard:?} {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the callers and returns what they saw, printed with `label`.
    pub async fn finish(self, label: &str) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.unwrap();
        }
        let tally = Arc::try_unwrap(self.tally)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap();
        for ((ph, kind), (ok, failed)) in &tally.counts {
            println!("{label}: {ph:>13} {kind:<13} ok {ok:>5} failed {failed:>4}");
        }
        tally
    }
}

impl Tally {
    /// Zero wrong answers; warm calls ran and never failed, in any phase.
    pub fn check_sound(&self) {
        assert!(self.wrong.is_empty(), "{:#?}", self.wrong);
        for ((ph, kind), (ok, failed)) in &self.counts {
            if kind.starts_with("warm") {
                assert_eq!(*failed, 0, "{ph}/{kind} failed {failed} times");
                assert!(*ok > 0, "{ph}/{kind} never ran");
            }
        }
    }

    /// Cold Encrypts that failed in phase `ph` (the outage was felt where Vault is needed).
    pub fn cold_failures(&self, ph: &str) -> u64 {
        self.counts
            .iter()
            .find(|((p, k), _)| *p == ph && *k == "cold encrypt")
            .map_or(0, |(_, (_, failed))| *failed)
    }

    /// A sample of the ciphertexts and tokens made during the run gives back what was given.
    pub async fn check_made(&self, env: &TestEnv, server: &Server) {
        let mut c = env.client(server, "orders").await;
        for (ct, pt, _) in self.cold_made.iter().step_by(5) {
            let got = c.decrypt(dec("email", ct)).await.unwrap().into_inner();
            assert_eq!(got.plaintext, pt.as_bytes());
        }
        let mut t = TokensClient::new(env.channel(server, "orders").await);
        for (token, value) in self.tokens.iter().step_by(25) {
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
}
