//! Vault paused, then killed and restarted (Raft storage, unsealed again), under a sustained
//! mixed load from several callers; piiguard is never restarted (issue 13).
//!
//! What callers must see: zero wrong answers; warm subjects served from the DEK cache the whole
//! time; calls that need Vault answered `UNAVAILABLE` / `VAULT_UNAVAILABLE` (nothing else) within
//! the Vault request timeout; recovery by itself once Vault is back; and an audit log whose
//! chain and signed checkpoints verify across the outage (checkpoint signing resumes).

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

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

    let load = MixedLoad::start(&env, &server, "vf", 16).await;

    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1. Vault paused (SIGSTOP): its sockets accept, nothing answers.
    let pid = env.bao.pid().expect("OpenBao runs");
    load.set_phase("paused");
    signal(pid, "-STOP");
    tokio::time::sleep(Duration::from_secs(8)).await;
    signal(pid, "-CONT");
    load.set_phase("after pause");
    let resumed = Instant::now();
    let pause_recovery = load
        .cold_served_after(resumed, Duration::from_secs(60), "after the pause")
        .await;

    // 2. Vault killed (SIGKILL) for 5 s, then started again on its Raft data and unsealed.
    load.set_phase("killed");
    env.bao.stop();
    tokio::time::sleep(Duration::from_secs(5)).await;
    env.bao.restart().await.expect("restart OpenBao");
    load.set_phase("after restart");
    let restarted = Instant::now();
    let restart_recovery = load
        .cold_served_after(restarted, Duration::from_secs(60), "after the restart")
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let tally = load.finish("vault-faults").await;
    println!(
        "vault-faults: cold Encrypt served again {pause_recovery:?} after SIGCONT, \
         {restart_recovery:?} after the restarted Vault was unsealed; slowest failed call {:?}; \
         slowest warm call {:?}",
        tally.slowest_failure, tally.slowest_warm
    );
    tally.check_sound();
    // The outages were felt where Vault is needed (the test shows something).
    for ph in ["paused", "killed"] {
        assert!(
            tally.cold_failures(ph) > 0,
            "no cold Encrypt failed while Vault was {ph}"
        );
    }
    // Everything made during the run gives back what was given.
    tally.check_made(&env, &server).await;

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
