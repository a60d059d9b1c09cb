//! What vaultrs costs per Vault call, against the same calls made with a bare reqwest client
//! (what `src/vault/` did before vaultrs), on one local OpenBao.
//!
//! ```sh
//! PIIGUARD_BAO_BIN=... cargo run --example vault_client_overhead -- 300
//! ```
//! Starts OpenBao (dev PKI, HTTPS, Raft) and bootstraps it, then times N rounds of the four
//! calls of a cold encrypt (transit encrypt and decrypt of a DEK, KV read, KV check-and-set
//! write), one call at a time, each round once through `piiguard::vault::Vault` and once
//! through bare reqwest with the same TLS settings and token (order alternating per round, so
//! drift and load hit both alike). Prints the median and p90 of each and their difference.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use piiguard::secret::{Dek, WrappedDek};
use serde_json::{Value, json};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The old client's way: one JSON request with the token header, the whole body read.
struct Bare {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Bare {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Value {
        let mut req = self
            .http
            .request(method, format!("{}/v1/{path}", self.base))
            .header("X-Vault-Token", &self.token);
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(serde_json::to_vec(b).unwrap());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap();
        assert!(status.is_success(), "{path}: {status}");
        serde_json::from_slice(&bytes).unwrap()
    }
}

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(v[v.len() / 2]), us(v[v.len() * 9 / 10]))
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
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
    let toml = piiguard::setup::dev::dev_config_toml(
        &format!("127.0.0.1:{}", free_port()),
        &format!("127.0.0.1:{}", free_port()),
        &pki,
        &bao,
        &rid,
        &sid,
        &format!("sqlite://{}", dir.path().join("p.db").display()),
        "",
    );
    let cfg_path = dir.path().join("piiguard.toml");
    std::fs::write(&cfg_path, &toml).unwrap();
    let cfg = piiguard::config::load(&cfg_path, Vec::new()).unwrap();
    let admin = bao.client().unwrap();
    piiguard::setup::bootstrap::bootstrap(&admin, bao.root_token(), &cfg)
        .await
        .unwrap();

    // Both clients use the root token (no AppRole login in the timed part).
    let vault = admin.with_token(bao.root_token());
    let http = reqwest::Client::builder()
        .tls_certs_only(
            reqwest::Certificate::from_pem_bundle(&std::fs::read(&pki.ca).unwrap()).unwrap(),
        )
        .https_only(true)
        .no_proxy()
        .build()
        .unwrap();
    let bare = Bare {
        http,
        base: cfg.vault.addresses[0].clone(),
        token: bao.root_token().to_string(),
    };
    let (tm, kv) = (&cfg.vault.transit_mount, &cfg.vault.kv_mount);
    let kek = "kek-orders";

    let mut ours: [Vec<Duration>; 4] = Default::default();
    let mut theirs: [Vec<Duration>; 4] = Default::default();
    // Warm up both (connections, OpenBao caches).
    for i in 0..20 {
        let d = Dek::generate(32).unwrap();
        let w = vault.wrap_dek(kek, &d).await.unwrap();
        vault.unwrap_dek(kek, &w).await.unwrap();
        bare.call(
            reqwest::Method::POST,
            &format!("{tm}/decrypt/{kek}"),
            Some(&json!({ "ciphertext": w.as_str() })),
        )
        .await;
        let _ = vault.kv_read(&format!("bench/warm-{i}"), None).await;
    }
    for round in 0..n {
        for side in [round % 2, 1 - round % 2] {
            let dek = Dek::generate(32).unwrap();
            let path = format!("bench/{side}-{round}");
            let rec = json!({ "subject_ref": "00", "wrapped": "x", "alg": "aes-256-gcm" });
            if side == 0 {
                let t = Instant::now();
                let w = vault.wrap_dek(kek, &dek).await.unwrap();
                ours[0].push(t.elapsed());
                let t = Instant::now();
                let back = vault.unwrap_dek(kek, &w).await.unwrap();
                ours[1].push(t.elapsed());
                assert_eq!(back.expose_secret(), dek.expose_secret());
                let t = Instant::now();
                vault.kv_write_cas(&path, &rec, 0).await.unwrap();
                ours[3].push(t.elapsed());
                let t = Instant::now();
                assert!(vault.kv_read(&path, None).await.unwrap().is_some());
                ours[2].push(t.elapsed());
            } else {
                let t = Instant::now();
                let v = bare
                    .call(
                        reqwest::Method::POST,
                        &format!("{tm}/encrypt/{kek}"),
                        Some(&json!({ "plaintext": B64.encode(dek.expose_secret()) })),
                    )
                    .await;
                theirs[0].push(t.elapsed());
                let w = WrappedDek::parse(v["data"]["ciphertext"].as_str().unwrap()).unwrap();
                let t = Instant::now();
                let v = bare
                    .call(
                        reqwest::Method::POST,
                        &format!("{tm}/decrypt/{kek}"),
                        Some(&json!({ "ciphertext": w.as_str() })),
                    )
                    .await;
                theirs[1].push(t.elapsed());
                assert_eq!(
                    B64.decode(v["data"]["plaintext"].as_str().unwrap())
                        .unwrap(),
                    dek.expose_secret()
                );
                let t = Instant::now();
                bare.call(
                    reqwest::Method::POST,
                    &format!("{kv}/data/{path}"),
                    Some(&json!({ "options": { "cas": 0 }, "data": rec })),
                )
                .await;
                theirs[3].push(t.elapsed());
                let t = Instant::now();
                bare.call(reqwest::Method::GET, &format!("{kv}/data/{path}"), None)
                    .await;
                theirs[2].push(t.elapsed());
            }
        }
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!("{n} rounds, one call at a time, {profile} build; microseconds per call");
    println!("| call | vaultrs median | bare median | diff | vaultrs p90 | bare p90 |");
    println!("|---|---|---|---|---|---|");
    let names = [
        "transit encrypt (wrap)",
        "transit decrypt (unwrap)",
        "KV read",
        "KV CAS write",
    ];
    for (i, name) in names.iter().enumerate() {
        let (om, o9) = stats(ours[i].clone());
        let (tm, t9) = stats(theirs[i].clone());
        println!(
            "| {name} | {om:.0} | {tm:.0} | {:+.0} ({:+.1}%) | {o9:.0} | {t9:.0} |",
            om - tm,
            (om / tm - 1.0) * 100.0
        );
    }
}
