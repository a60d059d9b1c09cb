//! Keys survive restarts, Vault outages are reported and recovered from, and concurrent first
//! use of a subject creates exactly one DEK, also across two piiguard processes.

use std::time::{Duration, Instant};

use crate::common::*;
use piiguard::crypto::envelope;
use tonic::Code;

fn key_id(ct: &[u8]) -> [u8; 16] {
    let mut s = Vec::new();
    envelope::parse(ct, &mut s).unwrap().header.key_id.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_loses_no_key() {
    let env = TestEnv::start().await;
    let mut server = env.server("r", "").await;
    let mut c = env.client(&server, "orders").await;
    let ct = c
        .encrypt(enc("orders", "cust-restart", "email", b"r@example.com"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    server.stop();
    server.start().await;
    let mut c = env.client(&server, "orders").await;
    assert_eq!(
        c.decrypt(dec("email", &ct))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        b"r@example.com"
    );
    // Same subject after restart: same DEK (loaded from Vault, not recreated).
    let ct2 = c
        .encrypt(enc("orders", "cust-restart", "email", b"r2@example.com"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    assert_eq!(key_id(&ct), key_id(&ct2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_outage_gives_unavailable_then_recovers() {
    let mut env = TestEnv::start().await;
    let server = env.server("v", "").await;
    let mut c = env.client(&server, "orders").await;
    let warm = c
        .encrypt(enc("orders", "cust-warm", "email", b"w@example.com"))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;

    env.bao.stop();
    // Cached subjects keep working while Vault is down (bounded by the cache TTLs).
    assert_eq!(
        c.decrypt(dec("email", &warm))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        b"w@example.com"
    );
    assert!(
        c.encrypt(enc("orders", "cust-warm", "email", b"x"))
            .await
            .is_ok()
    );
    // A new subject needs Vault: UNAVAILABLE with a stable reason, nothing leaked.
    let e = c
        .encrypt(enc("orders", "cust-cold", "email", b"c@example.com"))
        .await
        .expect_err("Vault is down");
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(reason(&e), "VAULT_UNAVAILABLE");
    assert!(
        !e.message().contains("127.0.0.1"),
        "internal detail leaked: {}",
        e.message()
    );

    env.bao.restart().await.expect("restart OpenBao");
    let deadline = Instant::now() + Duration::from_secs(60);
    let ct = loop {
        match c
            .encrypt(enc("orders", "cust-cold", "email", b"c@example.com"))
            .await
        {
            Ok(r) => break r.into_inner().ciphertext,
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert!(Instant::now() < deadline, "did not recover: {e:?}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    assert_eq!(
        c.decrypt(dec("email", &ct))
            .await
            .unwrap()
            .into_inner()
            .plaintext,
        b"c@example.com"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_use_creates_one_dek_across_processes() {
    let env = TestEnv::start().await;
    let a = env.server("a", "").await;
    let b = env.server("b", "").await;
    let ca = env.client(&a, "orders").await;
    let cb = env.client(&b, "orders").await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let mut c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        tasks.push(tokio::spawn(async move {
            c.encrypt(enc(
                "orders",
                "cust-race",
                "email",
                format!("v{i}").as_bytes(),
            ))
            .await
            .map(|r| r.into_inner().ciphertext)
        }));
    }
    let mut cts = Vec::new();
    for t in tasks {
        cts.push(t.await.unwrap().expect("encrypt"));
    }
    let first = key_id(&cts[0]);
    assert!(
        cts.iter().all(|c| key_id(c) == first),
        "more than one key id used"
    );
    // Every ciphertext decrypts on either process.
    for (i, ct) in cts.iter().enumerate() {
        let mut c = if i % 2 == 0 { cb.clone() } else { ca.clone() };
        assert_eq!(
            c.decrypt(dec("email", ct))
                .await
                .unwrap()
                .into_inner()
                .plaintext,
            format!("v{i}").as_bytes()
        );
    }
    // Vault holds exactly one DEK record for the keyspace (losers' records were removed).
    let recs = env.list_key_ids("orders").await;
    assert_eq!(
        recs,
        vec![hex::encode(first)],
        "DEK records in Vault: {recs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_auth_is_renewed_before_it_expires() {
    let env = TestEnv::start().await;
    // A renewable token with piiguard's policy and a 6 s TTL, as a Vault Agent sink would
    // write it.
    let admin = env.bao.client().unwrap();
    let (status, v) = admin
        .raw(
            reqwest::Method::POST,
            "auth/token/create",
            Some(&serde_json::json!({
                "policies": ["piiguard"],
                "ttl": "6s",
                "explicit_max_ttl": "10m",
                "renewable": true,
                "no_parent": true,
            })),
            Some(env.bao.root_token()),
        )
        .await
        .unwrap();
    assert!(status.is_success(), "{v}");
    let token_file = env.dir.path().join("vault-token");
    piiguard::setup::pki::write_file(
        &token_file,
        v["auth"]["client_token"].as_str().unwrap().as_bytes(),
        true,
    )
    .unwrap();
    let server = env
        .server_custom("tokenfile", "", Vec::new(), |toml| {
            let start = toml.find("[vault.auth]").unwrap();
            let end = start + toml[start..].find("\n\n").unwrap();
            format!(
                "{}[vault.auth]\nmethod = \"token_file\"\ntoken_file = \"{}\"{}",
                &toml[..start],
                token_file.display(),
                &toml[end..]
            )
        })
        .await;
    let mut c = env.client(&server, "orders").await;
    assert!(
        c.encrypt(enc("orders", "tok-0", "email", b"a"))
            .await
            .is_ok()
    );
    // Past the token's first TTL: a new subject needs Vault, so this works only if the
    // renewal task kept the token alive.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let r = c.encrypt(enc("orders", "tok-1", "email", b"b")).await;
    assert!(
        r.is_ok(),
        "token expired: {:?}\n{}",
        r.err(),
        server.log_text()
    );
    assert!(server.log_text().contains("using Vault token from file"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_on_port_0_are_reported_in_the_ready_file() {
    use piiguard::app::ready::Ready;
    let env = TestEnv::start().await;
    let mut server = env
        .server_env(
            "p",
            "",
            vec![("PIIGUARD_METRICS__LISTEN".into(), ANY_PORT.into())],
        )
        .await;
    let r = Ready::read(&server.ready_file)
        .unwrap()
        .expect("ready file");
    assert_eq!(r.pid, server.pid());
    assert_eq!(r.instance, "dev");
    let metrics = r.metrics_listen.expect("metrics listener reported");
    let health = r.health_listen.expect("health listener reported");
    let ports = [r.listen.port(), health.port(), metrics.port()];
    assert!(ports.iter().all(|p| *p != 0), "{r:?}");
    assert!(
        ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2],
        "{r:?}"
    );
    assert!(r.listen.ip().is_loopback());

    // Each reported address is the listener it names.
    let mut c = env.client(&server, "orders").await;
    c.encrypt(enc("orders", "cust-ready", "email", b"r@example.com"))
        .await
        .unwrap();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{health}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("piiguard_calls_total"), "{text}");
    assert!(server.log_text().contains("ready file written"));

    // Not ready any more once stopped; a restart reports its own pid and ports.
    server.stop();
    assert_eq!(Ready::read(&server.ready_file).unwrap(), None);
    server.start().await;
    let r2 = Ready::read(&server.ready_file).unwrap().unwrap();
    assert_eq!(r2.pid, server.pid());
    assert_ne!(r2.pid, r.pid);
    assert_eq!(server.addr, r2.listen);
    let mut c = env.client(&server, "orders").await;
    c.encrypt(enc("orders", "cust-ready", "email", b"r@example.com"))
        .await
        .unwrap();
}

/// SIGTERM drains calls in flight for at most `server.shutdown_grace_secs`: a call that ends
/// within the grace is answered; one still running at its end is cut, and the process stops
/// anyway with its audit log sealed. Before the bound, a call held in flight (here by a pause
/// failpoint: a stuck Vault or store looks the same) kept the process alive forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_is_bounded_by_the_grace_period() {
    const POINT: &str = "load-subject-after-state-check";
    const GRACE_SECS: u64 = 3;
    let env = TestEnv::start().await;
    for (name, released_in_grace) in [("drain-ok", true), ("drain-cut", false)] {
        let (mut server, dir) = env
            .paused_server(
                name,
                POINT,
                vec![(
                    "PIIGUARD_SERVER__SHUTDOWN_GRACE_SECS".into(),
                    GRACE_SECS.to_string(),
                )],
            )
            .await;
        let mut c = env.client(&server, "orders").await;
        let call = tokio::spawn(async move {
            c.encrypt(enc("orders", "cust-drain", "email", b"d@example.com"))
                .await
        });
        wait_reached(&dir, POINT).await;
        let t0 = Instant::now();
        let pid = server.pid().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        // Draining: a new connection gets no service.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let fresh = tokio::time::timeout(Duration::from_secs(2), async {
            let mut c = env.client_probe(&server).await?;
            c.encrypt(enc("orders", "cust-other", "email", b"o@example.com"))
                .await
                .map_err(|s| s.to_string())
        })
        .await;
        assert!(
            !matches!(fresh, Ok(Ok(_))),
            "{name}: a new call was served while draining"
        );
        if released_in_grace {
            release(&dir, POINT);
        }
        // Bounded wait: the grace plus the audit seal; without the bound the paused call kept
        // the process alive until this deadline.
        let deadline = Instant::now() + Duration::from_secs(GRACE_SECS + 15);
        while !server.exited() {
            assert!(
                Instant::now() < deadline,
                "{name}: still running {:?} after SIGTERM (grace {GRACE_SECS} s); log:\n{}",
                t0.elapsed(),
                server.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stopped_after = t0.elapsed();
        let result = call.await.unwrap();
        if released_in_grace {
            let ct = result.expect("a call that ends within the grace is answered");
            assert!(!ct.into_inner().ciphertext.is_empty());
        } else {
            let e = result.expect_err("a call still running after the grace is cut");
            assert!(
                matches!(
                    e.code(),
                    Code::Unavailable | Code::Cancelled | Code::Unknown
                ),
                "{name}: {e:?}"
            );
            assert!(
                stopped_after >= Duration::from_secs(GRACE_SECS - 1),
                "{name}: cut before the grace was over ({stopped_after:?})"
            );
            assert!(
                server.log_text().contains("shutdown grace period over"),
                "{name}"
            );
        }
        // Either way the audit log is sealed: the `stop` record and a final signed checkpoint.
        let records = server.audit_records();
        assert!(records.iter().any(|r| r["event"] == "stop"), "{name}");
        assert_eq!(records.last().unwrap()["final_seal"], true, "{name}");
    }
}

/// `piiguard dev` prints the address its metrics listener serves, after the `PIIGUARD_*`
/// overrides (exploratory testing: with `PIIGUARD_METRICS__LISTEN` set it still printed the
/// default 127.0.0.1:9464), and says that its config file is written again at every start.
/// A Ctrl-C during its start-up (here: right after the banner, before it serves) stops the
/// OpenBao it started: it used to end piiguard by the signal's default action and leave
/// OpenBao, in its own process group, running on its ports.
#[test]
fn the_dev_banner_names_the_metrics_address_and_an_early_ctrl_c_stops_openbao() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let (dev, pki) = (dir.path().join("dev"), dir.path().join("pki"));
    let bao_config = dev.join("bao").join("bao.hcl");
    let bao_running = || {
        Command::new("pgrep")
            .args(["-f", "--"])
            .arg(format!("-config={}", bao_config.display()))
            .status()
            .is_ok_and(|s| s.success())
    };
    for _ in 0..3 {
        let vault_port = free_port_pair().to_string();
        let mut child = Command::new(env!("CARGO_BIN_EXE_piiguard"))
            .args([
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--health-listen",
                "127.0.0.1:0",
            ])
            .args([
                "--dir".as_ref(),
                dev.as_os_str(),
                "--pki-dir".as_ref(),
                pki.as_os_str(),
            ])
            .args(["--vault-port", vault_port.as_str(), "--bao"])
            .arg(bao_bin())
            .env("PIIGUARD_METRICS__LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The banner (one write, its last line "Load test: ..."), or the end of the output.
        let mut seen = String::new();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        for line in lines.by_ref() {
            let line = line.unwrap_or_default();
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("Load test:") {
                break;
            }
        }
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(child.id().to_string())
            .status();
        // Its last lines, until it exits.
        for line in lines {
            seen.push_str(&line.unwrap_or_default());
            seen.push('\n');
        }
        let _ = child.wait();
        if !seen.contains("Load test:") {
            // OpenBao lost its port pair to another test: try another.
            assert!(seen.contains(BIND_FAILED), "no banner:\n{seen}");
            continue;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while bao_running() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if bao_running() {
            let _ = Command::new("pkill")
                .args(["-f", "--"])
                .arg(format!("-config={}", bao_config.display()))
                .status();
            panic!("a Ctrl-C during the start-up left the dev OpenBao running");
        }
        assert!(
            seen.contains("metrics: http://127.0.0.1:0/metrics"),
            "{seen}"
        );
        assert!(!seen.contains("9464"), "{seen}");
        assert!(seen.contains("written again at every start"), "{seen}");
        return;
    }
    panic!("OpenBao could not get a port pair three times");
}
