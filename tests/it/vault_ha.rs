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
use std::time::{Duration, Instant};

use crate::common::*;

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

    // Callers 0 and 1 warm Encrypt/Decrypt/Tokenize, 2 and 3 cold Encrypts of new subjects
    // (each a Vault round trip: KV CAS writes and a transit encrypt).
    let load = MixedLoad::start(&cluster.env, &server, "ha", 8).await;

    tokio::time::sleep(Duration::from_secs(3)).await;

    // The active node killed (SIGKILL) under load.
    let leader = cluster.leader_index().await.expect("a leader");
    load.set_phase("after kill");
    let killed_at = Instant::now();
    cluster.kill(leader);
    let mut elected = None;
    let window = loop {
        if elected.is_none() && cluster.leader_index().await.is_some() {
            elected = Some(killed_at.elapsed());
        }
        if load.cold_served_since(killed_at) {
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
    load.set_phase("after rejoin");
    cluster.restart(leader).await;
    cluster.wait_for_voters(3).await;
    let rejoined = Instant::now();
    load.cold_served_after(rejoined, Duration::from_secs(30), "after the rejoin")
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tally = load.finish("vault-ha").await;
    let failovers = metric(
        &scrape(server.metrics_addr.expect("metrics listener")).await,
        "piiguard_vault_failovers_total",
        &[],
    );
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
    tally.check_sound();
    assert!(failovers >= 1.0, "piiguard never failed over");
    assert!(
        server
            .log_text()
            .contains("Vault node failed; switching to the next address")
    );
    assert_ne!(new_leader, Some(leader));

    // Every ciphertext and token made during the run gives back what was given.
    tally.check_made(&cluster.env, &server).await;
}
