//! Shred throughput of piiguard against what OpenBao itself allows for the same calls.
//!
//! ```sh
//! cargo build --release && cargo run --release --example shred_rate -- 2000
//! ```
//! Starts a local OpenBao (dev PKI, HTTPS, Raft) and `target/release/piiguard serve`, creates N
//! subjects (not timed), then times (1) the Vault calls one shred makes, issued directly against
//! OpenBao for N other subjects with the same concurrency, and (2) `Erasure.ShredStream` of the N
//! subjects through piiguard. Prints both rates and their ratio.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use piiguard::pb;
use serde_json::json;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const CONCURRENCY: usize = 16;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    piiguard::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = piiguard::setup::pki::generate_dev_pki(
        &dir.path().join("pki"),
        piiguard::setup::pki::DEFAULT_CLIENTS,
    )
    .unwrap();
    let bin = piiguard::setup::dev::find_bao(None).expect("bao (PIIGUARD_BAO_BIN)");
    let mut vport = free_port();
    while std::net::TcpListener::bind(("127.0.0.1", vport + 1)).is_err() {
        vport = free_port();
    }
    let bao = piiguard::setup::dev::Bao::start(&bin, &dir.path().join("bao"), vport, &pki)
        .await
        .unwrap();
    let rid = dir.path().join("role-id");
    let sid = dir.path().join("secret-id");
    let (port, hport) = (free_port(), free_port());
    let store = format!("sqlite://{}", dir.path().join("piiguard.db").display());
    let toml = piiguard::setup::dev::dev_config_toml(
        &format!("127.0.0.1:{port}"),
        &format!("127.0.0.1:{hport}"),
        &pki,
        &bao,
        &rid,
        &sid,
        &store,
        "",
    )
    .replace("level = \"info\"", "level = \"warn\"");
    let cfg_path = dir.path().join("piiguard.toml");
    std::fs::write(&cfg_path, &toml).unwrap();
    let cfg = piiguard::config::load(&cfg_path, Vec::new()).unwrap();
    let admin = bao.client().unwrap();
    let creds = piiguard::setup::bootstrap::bootstrap(&admin, bao.root_token(), &cfg)
        .await
        .unwrap();
    std::fs::write(&rid, creds.role_id.as_bytes()).unwrap();
    std::fs::write(&sid, creds.secret_id.as_bytes()).unwrap();
    piiguard::setup::dev::write_dev_policy(&rid, "").unwrap();
    let mut server = Command::new("target/release/piiguard")
        .args(["serve", "--config"])
        .arg(&cfg_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("target/release/piiguard (cargo build --release)");

    let (c, k) = pki.client("orders");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(c).unwrap(),
            std::fs::read(k).unwrap(),
        ))
        .domain_name("localhost");
    let ep = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ch = loop {
        if let Ok(ch) = ep.connect().await {
            break ch;
        }
        if let Ok(Some(st)) = server.try_wait() {
            panic!("piiguard exited: {st}");
        }
        assert!(Instant::now() < deadline, "piiguard did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut crypto = pb::crypto_client::CryptoClient::new(ch.clone());
    // Setup (not timed): N subjects with a key each.
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let items = chunk
            .iter()
            .map(|i| pb::EncryptRequest {
                keyspace: "orders".into(),
                subject: format!("rate-{i}"),
                field: "email".into(),
                plaintext: b"x@example.com".to_vec(),
                ..Default::default()
            })
            .collect();
        crypto
            .encrypt_batch(pb::EncryptBatchRequest { items })
            .await
            .unwrap();
    }

    // (1) The Vault calls of one shred, straight to OpenBao, with piiguard's own AppRole token.
    let vault = Arc::new(
        piiguard::vault::Vault::new(bao.vault_config(piiguard::config::VaultAuth::Approle {
            role_id_file: rid.clone(),
            secret_id_file: sid.clone(),
            mount: "approle".into(),
        }))
        .unwrap(),
    );
    vault.login().await.unwrap();
    for i in 0..n {
        for p in [
            format!("deks/orders/anchor{i}"),
            format!("subjects/orders/anchor{i}"),
        ] {
            vault.kv_write_cas(&p, &json!({"key_id": "00", "dek_version": 1, "wrapped": "x", "alg": "aes-256-gcm"}), 0).await.unwrap();
        }
    }
    let t = Instant::now();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let v = vault.clone();
            async move {
                let d = format!("deks/orders/anchor{i}");
                let s = format!("subjects/orders/anchor{i}");
                v.kv_read(&s, None).await.unwrap();
                v.kv_delete_metadata(&d).await.unwrap();
                v.kv_delete_metadata(&s).await.unwrap();
                assert!(v.kv_read(&d, None).await.unwrap().is_none());
                assert!(v.kv_read(&s, None).await.unwrap().is_none());
                v.transit_sign("piiguard-signing", format!("cert {i}").as_bytes())
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let vault_rate = n as f64 / t.elapsed().as_secs_f64();

    // (2) ShredStream through piiguard.
    let (c, k) = pki.client("erasure");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(c).unwrap(),
            std::fs::read(k).unwrap(),
        ))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut erasure = pb::erasure_client::ErasureClient::new(ch);
    let reqs: Vec<_> = (0..n)
        .map(|i| pb::ShredRequest {
            subject: format!("rate-{i}"),
            keyspace: "orders".into(),
            reason: "bench".into(),
            request_id: format!("b{i}"),
        })
        .collect();
    let t = Instant::now();
    let mut s = erasure
        .shred_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut done = 0;
    while let Some(r) = s.message().await.unwrap() {
        assert_eq!(r.keyspaces[0].outcome, pb::ShredOutcome::Shredded as i32);
        done += 1;
    }
    assert_eq!(done, n);
    let piiguard_rate = n as f64 / t.elapsed().as_secs_f64();
    println!("subjects: {n}, concurrency {CONCURRENCY}");
    println!(
        "OpenBao, the Vault calls of one shred (read, 2 metadata deletes, 2 read-backs, sign): {vault_rate:.0} subjects/s"
    );
    println!(
        "piiguard ShredStream (same Vault calls + store, tombstones, eviction, certificate): {piiguard_rate:.0} subjects/s"
    );
    println!("ratio: {:.0}%", 100.0 * piiguard_rate / vault_rate);
    let _ = server.kill();
    let _ = server.wait();
    drop(bao);
}
