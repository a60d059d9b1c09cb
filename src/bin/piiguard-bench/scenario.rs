//! Scenarios, the load loop, and the report.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use prost::Message as _;
use serde::Serialize;
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use piiguard::pb;

use crate::raw::RawCodec;
use crate::stats::{self, Percentiles};
use crate::{CALL_TIMEOUT, RunArgs, Target};

type CallFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
/// One call of a scenario: (worker index, call sequence number) -> outcome.
type CallFn = Arc<dyn Fn(usize, u64) -> CallFuture + Send + Sync>;
/// Checks a (sampled) response body.
type CheckFn = fn(&Bytes) -> Result<(), String>;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Every scenario name, in the order `all` runs them.
pub const ALL: &[&str] = &[
    "health",
    "encrypt-hot",
    "encrypt-warm",
    "decrypt-hot",
    "decrypt-warm",
    "encrypt-batch",
    "encrypt-batch-hot",
    "decrypt-batch",
    "encrypt-cold",
    "encrypt-batch-cold",
    "bao-encrypt",
    "bao-decrypt",
    "bao-encrypt-batch",
    "bao-decrypt-batch",
    "bao-cold",
    "tokenize-random",
    "tokenize-det",
    "detokenize",
    "blind-index",
    "encrypt-index",
    "bao-hmac",
    "decrypt-masked",
    "unseal",
    "unseal-direct",
    "unseal-batch",
    "bao-rsa-decrypt",
    "bao-rsa-decrypt-batch",
    "rewrap",
    "rewrap-batch",
    "bao-rewrap",
];

fn expand(list: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let group: &[&str] = match s {
            "all" => ALL,
            "all-unary" => &[
                "health",
                "encrypt-hot",
                "encrypt-warm",
                "decrypt-hot",
                "decrypt-warm",
                "bao-encrypt",
                "bao-decrypt",
            ],
            "all-batch" => &[
                "encrypt-batch",
                "encrypt-batch-hot",
                "decrypt-batch",
                "bao-encrypt-batch",
                "bao-decrypt-batch",
            ],
            "all-cold" => &["encrypt-cold", "encrypt-batch-cold", "bao-cold"],
            "all-tokens" => &[
                "health",
                "encrypt-hot",
                "decrypt-hot",
                "tokenize-random",
                "tokenize-det",
                "detokenize",
            ],
            "all-search" => &[
                "health",
                "encrypt-hot",
                "blind-index",
                "encrypt-index",
                "bao-hmac",
                "decrypt-hot",
                "decrypt-masked",
            ],
            "all-keys" => &[
                "health",
                "encrypt-warm",
                "unseal",
                "unseal-direct",
                "unseal-batch",
                "bao-rsa-decrypt",
                "bao-rsa-decrypt-batch",
                "rewrap",
                "rewrap-batch",
                "bao-rewrap",
            ],
            one if ALL.contains(&one) => &[],
            other => return Err(format!("unknown scenario {other:?}; known: {ALL:?}")),
        };
        if group.is_empty() {
            out.push(s.to_string());
        } else {
            out.extend(group.iter().map(|g| g.to_string()));
        }
    }
    if out.is_empty() {
        return Err("no scenario given".into());
    }
    Ok(out)
}

/// A plaintext of `n` bytes (deterministic, printable).
pub fn plaintext(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

pub fn warm_subject(i: usize) -> String {
    format!("bench-warm-{i}")
}

pub const HOT_SUBJECT: &str = "bench-hot";

/// The value of the blind-index scenarios.
pub const BENCH_EMAIL: &str = " Jane.Doe@Example.com";

/// The field and value of `decrypt-masked` (kind `card` by its name: the last 4 digits).
pub const CARD_FIELD: &str = "card";
pub const BENCH_CARD: &str = "4111 1111 1111 1111";

/// Transit key the bao-rewrap and bao-hmac anchors use (created by the bench with the token
/// of --vault-token-file, then rotated once so that there is an older version to rewrap from):
/// the keyspace KEK is not rotated for a benchmark, since that would start piiguard's own
/// rewrap job in the background.
pub const ANCHOR_KEY: &str = "piiguard-bench-anchor";

fn run_id() -> u64 {
    let mut b = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
    }
    u64::from_le_bytes(b)
}

// ---------------------------------------------------------------------------------------------
// Connections

pub async fn connect_grpc(t: &Target, n: usize) -> Result<Vec<Channel>, String> {
    connect_grpc_as(t, &t.cert(), &t.key(), n).await
}

/// `n` channels with the client certificate `cert` / `key`.
pub async fn connect_grpc_as(
    t: &Target,
    cert: &std::path::Path,
    key: &std::path::Path,
    n: usize,
) -> Result<Vec<Channel>, String> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&t.ca())?))
        .identity(Identity::from_pem(read(cert)?, read(key)?))
        .domain_name(t.domain.clone());
    let addrs = t.addrs();
    if addrs.is_empty() {
        return Err("--addr is empty".into());
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n.max(1) {
        let addr = addrs[i % addrs.len()];
        let ch = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| e.to_string())?
            .tls_config(tls.clone())
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true)
            .initial_connection_window_size(Some(4 * 1024 * 1024))
            .initial_stream_window_size(Some(1024 * 1024))
            .connect()
            .await
            .map_err(|e| format!("connect {addr}: {e:?}"))?;
        out.push(ch);
    }
    Ok(out)
}

/// One HTTP client per "connection" (reqwest pools per client; over h2 one client multiplexes
/// on one connection), configured like piiguard's own Vault client.
fn http_clients(t: &Target, n: usize) -> Result<Vec<reqwest::Client>, String> {
    let ca = t.vault_ca();
    let pem = std::fs::read(&ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| e.to_string())?;
    (0..n.max(1))
        .map(|_| {
            reqwest::Client::builder()
                .timeout(CALL_TIMEOUT)
                .pool_max_idle_per_host(256)
                .no_proxy()
                .tls_certs_only(certs.clone())
                .https_only(true)
                .build()
                .map_err(|e| e.to_string())
        })
        .collect()
}

async fn grpc_call(ch: Channel, path: &'static str, body: Bytes) -> Result<Bytes, String> {
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let r = g
        .unary(
            tonic::Request::new(body),
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
        .map_err(|s| format!("{path}: {:?} {}", s.code(), s.message()))?;
    Ok(r.into_inner())
}

pub struct Vault {
    clients: Vec<reqwest::Client>,
    addr: String,
    token: String,
}

impl Vault {
    pub fn new(t: &Target, n: usize) -> Result<Self, String> {
        let tf = t.vault_token_file();
        let token = std::fs::read_to_string(&tf)
            .map_err(|e| {
                format!(
                    "{}: {e} (bao-* scenarios need an OpenBao token)",
                    tf.display()
                )
            })?
            .trim()
            .to_string();
        Ok(Self {
            clients: http_clients(t, n)?,
            addr: t.vault_addr.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// Replaces the token by a child token that has only `policy` (what a real transit
    /// client holds: OpenBao evaluates the policy on every request, the root token skips it).
    async fn use_child_token(&mut self, policy: &str) -> Result<(), String> {
        let body = serde_json::json!({
            "policies": [policy],
            "no_default_policy": true,
            "ttl": "2h",
        });
        let r = self
            .call(
                0,
                reqwest::Method::POST,
                "auth/token/create",
                Some(Bytes::from(body.to_string())),
            )
            .await?;
        let v = ok_json("auth/token/create", r)?;
        self.token = v["auth"]["client_token"]
            .as_str()
            .ok_or("auth/token/create: no client_token")?
            .to_string();
        Ok(())
    }

    pub fn call(
        &self,
        worker: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Bytes>,
    ) -> impl Future<Output = Result<(reqwest::StatusCode, Bytes), String>> + Send + 'static {
        let c = &self.clients[worker % self.clients.len()];
        let mut rb = c
            .request(method, format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", &self.token);
        if let Some(b) = body {
            rb = rb.header("Content-Type", "application/json").body(b);
        }
        async move {
            let r = rb.send().await.map_err(|e| e.to_string())?;
            let s = r.status();
            let b = r.bytes().await.map_err(|e| e.to_string())?;
            Ok((s, b))
        }
    }
}

pub fn ok_json(path: &str, r: (reqwest::StatusCode, Bytes)) -> Result<Value, String> {
    if !r.0.is_success() {
        return Err(format!(
            "{path}: HTTP {} {}",
            r.0,
            String::from_utf8_lossy(&r.1)
                .chars()
                .take(200)
                .collect::<String>()
        ));
    }
    serde_json::from_slice(&r.1).map_err(|e| format!("{path}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Set-up helpers (not measured)

fn enc_req(t: &Target, subject: &str, pt: &[u8]) -> pb::EncryptRequest {
    pb::EncryptRequest {
        keyspace: t.keyspace.clone(),
        subject: subject.to_string(),
        field: t.field.clone(),
        plaintext: pt.to_vec(),
        context: Default::default(),
        encoding: 0,
        blind_index: false,
    }
}

fn dec_req(t: &Target, ct: Vec<u8>) -> pb::DecryptRequest {
    pb::DecryptRequest {
        field: t.field.clone(),
        ciphertext: ct,
        context: Default::default(),
        keyspace: String::new(),
        reveal: 0,
    }
}

fn tok_req(t: &Target, subject: &str, value: &str, deterministic: bool) -> pb::TokenizeRequest {
    pb::TokenizeRequest {
        keyspace: t.keyspace.clone(),
        subject: subject.to_string(),
        field: t.field.clone(),
        value: value.to_string(),
        format: pb::TokenFormat::Opaque as i32,
        mode: if deterministic {
            pb::TokenMode::Deterministic
        } else {
            pb::TokenMode::Random
        } as i32,
        keep_last: 0,
        ttl_seconds: 0,
    }
}

/// Makes `n` random tokens of the hot subject (set-up, not measured).
pub async fn tokenize_all(
    t: &Target,
    ch: &Channel,
    n: usize,
    value: &str,
) -> Result<Vec<String>, String> {
    let mut client = pb::tokens_client::TokensClient::new(ch.clone())
        .max_decoding_message_size(64 * 1024 * 1024);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let k = (n - out.len()).min(1000);
        let items = (0..k)
            .map(|_| tok_req(t, HOT_SUBJECT, value, false))
            .collect();
        let r = client
            .tokenize_batch(pb::TokenizeBatchRequest { items })
            .await
            .map_err(|s| format!("set-up TokenizeBatch: {:?} {}", s.code(), s.message()))?;
        for res in r.into_inner().results {
            match res.result {
                Some(pb::tokenize_result::Result::Token(tok)) => out.push(tok.token),
                Some(pb::tokenize_result::Result::Error(e)) => {
                    return Err(format!("set-up TokenizeBatch item: {}", e.reason));
                }
                None => return Err("set-up TokenizeBatch: empty result".into()),
            }
        }
    }
    Ok(out)
}

/// Encrypts one field per subject through EncryptBatch (which also warms the server's cache)
/// and returns the ciphertexts in order.
pub async fn encrypt_all(
    t: &Target,
    ch: &Channel,
    subjects: &[String],
    pt: &[u8],
) -> Result<Vec<Vec<u8>>, String> {
    let reqs: Vec<pb::EncryptRequest> = subjects.iter().map(|s| enc_req(t, s, pt)).collect();
    encrypt_reqs(ch, &reqs).await
}

/// [`encrypt_all`] through the first connection, after the same Encrypts through one connection
/// to each other replica of --addr, so that every replica has the subjects' keys cached (a warm
/// set is warm everywhere). The ciphertexts of the first.
pub async fn encrypt_all_replicas(
    t: &Target,
    chs: &[Channel],
    subjects: &[String],
    pt: &[u8],
) -> Result<Vec<Vec<u8>>, String> {
    for ch in chs.iter().take(t.addrs().len()).skip(1) {
        encrypt_all(t, ch, subjects, pt).await?;
    }
    encrypt_all(t, &chs[0], subjects, pt).await
}

/// Encrypts every request through EncryptBatch, 1,000 at a time; the ciphertexts in order.
pub async fn encrypt_reqs(
    ch: &Channel,
    reqs: &[pb::EncryptRequest],
) -> Result<Vec<Vec<u8>>, String> {
    let mut client = pb::crypto_client::CryptoClient::new(ch.clone())
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    let mut out = Vec::with_capacity(reqs.len());
    for chunk in reqs.chunks(1000) {
        let items = chunk.to_vec();
        let r = client
            .encrypt_batch(pb::EncryptBatchRequest { items })
            .await
            .map_err(|s| format!("set-up EncryptBatch: {:?} {}", s.code(), s.message()))?;
        for res in r.into_inner().results {
            match res.result {
                Some(pb::encrypt_result::Result::Ciphertext(c)) => out.push(c),
                Some(pb::encrypt_result::Result::Error(e)) => {
                    return Err(format!(
                        "set-up EncryptBatch item: {} {}",
                        e.reason, e.message
                    ));
                }
                None => return Err("set-up EncryptBatch: empty result".into()),
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Scenarios

struct Work {
    /// Items per call (batch size for batches, else 1).
    items: u64,
    /// Served by piiguard (else by OpenBao directly).
    piiguard: bool,
    /// A unary call eligible for the half-rate rerun.
    unary: bool,
    call: CallFn,
    /// Calls in flight, if not --concurrency (the key-management batches).
    concurrency: Option<usize>,
}

fn grpc_work(
    chs: &[Channel],
    path: &'static str,
    bodies: Vec<Bytes>,
    check: Option<CheckFn>,
) -> CallFn {
    let chs: Arc<[Channel]> = chs.into();
    let bodies: Arc<[Bytes]> = bodies.into();
    Arc::new(move |w, seq| {
        let ch = chs[w % chs.len()].clone();
        let body = bodies[(seq % bodies.len() as u64) as usize].clone();
        Box::pin(async move {
            let r = grpc_call(ch, path, body).await?;
            // Batch results are decoded and checked on a sample of calls only, to keep the
            // load generator's CPU (on the same machine as the server) for the load.
            if let Some(check) = check
                && seq % 64 == 0
            {
                check(&r)?;
            }
            Ok(())
        })
    })
}

fn check_encrypt_batch(b: &Bytes) -> Result<(), String> {
    let r = pb::EncryptBatchResponse::decode(b.clone()).map_err(|e| e.to_string())?;
    for res in r.results {
        if let Some(pb::encrypt_result::Result::Error(e)) = res.result {
            return Err(format!("EncryptBatch item: {} {}", e.reason, e.message));
        }
    }
    Ok(())
}

fn check_decrypt_batch(b: &Bytes) -> Result<(), String> {
    let r = pb::DecryptBatchResponse::decode(b.clone()).map_err(|e| e.to_string())?;
    for res in r.results {
        if let Some(pb::decrypt_result::Result::Error(e)) = res.result {
            return Err(format!("DecryptBatch item: {} {}", e.reason, e.message));
        }
    }
    Ok(())
}

fn check_unseal_batch(b: &Bytes) -> Result<(), String> {
    let r = pb::UnsealBatchResponse::decode(b.clone()).map_err(|e| e.to_string())?;
    for res in r.results {
        match res.result {
            Some(pb::unseal_result::Result::Value(v)) if !v.ciphertext.is_empty() => {}
            Some(pb::unseal_result::Result::Error(e)) => {
                return Err(format!("UnsealBatch item: {} {}", e.reason, e.message));
            }
            _ => return Err("UnsealBatch item: no ciphertext".into()),
        }
    }
    Ok(())
}

fn check_rewrap_batch(b: &Bytes) -> Result<(), String> {
    let r = pb::RewrapBatchResponse::decode(b.clone()).map_err(|e| e.to_string())?;
    for res in r.results {
        match res.result {
            Some(pb::rewrap_result::Result::Value(v)) if v.changed => {}
            Some(pb::rewrap_result::Result::Error(e)) => {
                return Err(format!("RewrapBatch item: {} {}", e.reason, e.message));
            }
            _ => return Err("RewrapBatch item: not re-encrypted (changed = false)".into()),
        }
    }
    Ok(())
}

fn check_unseal(b: &Bytes) -> Result<(), String> {
    let r = pb::UnsealResponse::decode(b.clone()).map_err(|e| e.to_string())?;
    if r.ciphertext.is_empty() {
        return Err("Unseal: no ciphertext".into());
    }
    Ok(())
}

fn check_rewrap(b: &Bytes) -> Result<(), String> {
    let r = pb::RewrapResponse::decode(b.clone()).map_err(|e| e.to_string())?;
    if !r.changed {
        return Err("Rewrap: not re-encrypted (changed = false)".into());
    }
    Ok(())
}

fn check_masked(b: &Bytes) -> Result<(), String> {
    let r = pb::DecryptResponse::decode(b.clone()).map_err(|e| e.to_string())?;
    if !r.masked || !r.plaintext.ends_with(b"1111") || r.plaintext.starts_with(b"4111") {
        return Err(format!(
            "Decrypt masked: unexpected answer (masked = {}, {} bytes)",
            r.masked,
            r.plaintext.len()
        ));
    }
    Ok(())
}

/// One call of a piiguard scenario made before the run, so that a missing grant or a wrong
/// set-up fails the scenario with its reason instead of counting errors.
async fn probe(
    ch: &Channel,
    path: &'static str,
    body: &Bytes,
    check: CheckFn,
    hint: &str,
) -> Result<(), String> {
    let r = grpc_call(ch.clone(), path, body.clone())
        .await
        .map_err(|e| format!("set-up probe {e}{hint}"))?;
    check(&r).map_err(|e| format!("set-up probe {path}: {e}"))
}

fn vault_post_work(vault: Arc<Vault>, path: String, bodies: Vec<Bytes>, batch: bool) -> CallFn {
    let bodies: Arc<[Bytes]> = bodies.into();
    let path: Arc<str> = path.into();
    Arc::new(move |w, seq| {
        let body = bodies[(seq % bodies.len() as u64) as usize].clone();
        let fut = vault.call(w, reqwest::Method::POST, &path, Some(body));
        let path = path.clone();
        Box::pin(async move {
            let r = fut.await?;
            if !r.0.is_success() {
                return Err(format!("{path}: HTTP {}", r.0));
            }
            if batch && seq % 64 == 0 {
                let v: Value = serde_json::from_slice(&r.1).map_err(|e| e.to_string())?;
                let results = v["data"]["batch_results"]
                    .as_array()
                    .ok_or("transit batch: no batch_results")?;
                if let Some(e) = results
                    .iter()
                    .filter_map(|x| x["error"].as_str())
                    .find(|e| !e.is_empty())
                {
                    return Err(format!("transit batch item: {e}"));
                }
            }
            Ok(())
        })
    })
}

async fn build(
    name: &str,
    a: &RunArgs,
    chs: &[Channel],
    vault: &mut Option<Arc<Vault>>,
) -> Result<Work, String> {
    let t = &a.target;
    let pt = plaintext(a.size);
    let warm: Vec<String> = (0..a.warm_subjects.max(1)).map(warm_subject).collect();
    let batch_subjects = |i: usize| warm[i % warm.len()].clone();
    if vault.is_none() && name.starts_with("bao-") {
        let mut v = Vault::new(t, a.connections)?;
        if let Some(policy) = &t.vault_policy {
            v.use_child_token(policy).await?;
        }
        *vault = Some(Arc::new(v));
    }
    let vault_handle = || -> Result<Arc<Vault>, String> {
        vault.clone().ok_or_else(|| "no vault client".to_string())
    };
    let transit = |op: &str| format!("{}/{op}/kek-{}", t.transit_mount, t.keyspace);
    let piiguard = |items, unary, call| Work {
        items,
        piiguard: true,
        unary,
        call,
        concurrency: None,
    };
    let anchor = |items, unary, call| Work {
        items,
        piiguard: false,
        unary,
        call,
        concurrency: None,
    };
    // The batches of issue 12 carry 100-1,000 items each: 64 of them in flight (100 RSA-2048
    // decrypts each) would queue longer in OpenBao than the server's Vault timeout.
    let keys_batch = |w: Work| Work {
        concurrency: Some(a.keys_batch_concurrency.max(1)),
        ..w
    };
    Ok(match name {
        "health" => piiguard(
            1,
            true,
            grpc_work(
                chs,
                "/grpc.health.v1.Health/Check",
                vec![Bytes::new()],
                None,
            ),
        ),
        "encrypt-hot" => {
            encrypt_all_replicas(t, chs, &[HOT_SUBJECT.to_string()], &pt).await?;
            let body = Bytes::from(enc_req(t, HOT_SUBJECT, &pt).encode_to_vec());
            piiguard(
                1,
                true,
                grpc_work(chs, "/piiguard.v1.Crypto/Encrypt", vec![body], None),
            )
        }
        // Tokens of a 64-byte value of the hot subject: a random token per call (one store
        // write each), a deterministic one (the same token every time), and detokenising
        // 1,000 tokens made before the run.
        "tokenize-random" | "tokenize-det" => {
            encrypt_all_replicas(t, chs, &[HOT_SUBJECT.to_string()], &pt).await?;
            let value = String::from_utf8_lossy(&pt).into_owned();
            let body = Bytes::from(
                tok_req(t, HOT_SUBJECT, &value, name == "tokenize-det").encode_to_vec(),
            );
            piiguard(
                1,
                true,
                grpc_work(chs, "/piiguard.v1.Tokens/Tokenize", vec![body], None),
            )
        }
        "detokenize" => {
            let value = String::from_utf8_lossy(&pt).into_owned();
            let tokens = tokenize_all(t, &chs[0], 1000, &value).await?;
            let bodies = tokens
                .into_iter()
                .map(|token| {
                    Bytes::from(
                        pb::DetokenizeRequest {
                            keyspace: t.keyspace.clone(),
                            token,
                            reveal: 0,
                        }
                        .encode_to_vec(),
                    )
                })
                .collect();
            piiguard(
                1,
                true,
                grpc_work(chs, "/piiguard.v1.Tokens/Detokenize", bodies, None),
            )
        }
        // Blind indexes (docs/SEARCH.md) of an e-mail address: BlindIndex alone, and Encrypt
        // of the hot subject with `blind_index` (field `email`, whatever `--field` says).
        "blind-index" => {
            let body = Bytes::from(
                pb::BlindIndexRequest {
                    keyspace: t.keyspace.clone(),
                    field: "email".into(),
                    value: BENCH_EMAIL.as_bytes().to_vec(),
                }
                .encode_to_vec(),
            );
            piiguard(
                1,
                true,
                grpc_work(chs, "/piiguard.v1.Crypto/BlindIndex", vec![body], None),
            )
        }
        "encrypt-index" => {
            encrypt_all_replicas(t, chs, &[HOT_SUBJECT.to_string()], &pt).await?;
            let req = pb::EncryptRequest {
                field: "email".into(),
                blind_index: true,
                ..enc_req(t, HOT_SUBJECT, BENCH_EMAIL.as_bytes())
            };
            let body = Bytes::from(req.encode_to_vec());
            piiguard(
                1,
                true,
                grpc_work(chs, "/piiguard.v1.Crypto/Encrypt", vec![body], None),
            )
        }
        "encrypt-warm" => {
            encrypt_all_replicas(t, chs, &warm, &pt).await?;
            let bodies = warm
                .iter()
                .map(|s| Bytes::from(enc_req(t, s, &pt).encode_to_vec()))
                .collect();
            piiguard(
                1,
                true,
                grpc_work(chs, "/piiguard.v1.Crypto/Encrypt", bodies, None),
            )
        }
        "decrypt-hot" => {
            let cts = encrypt_all_replicas(t, chs, &[HOT_SUBJECT.to_string()], &pt).await?;
            let bodies = cts
                .into_iter()
                .map(|c| Bytes::from(dec_req(t, c).encode_to_vec()))
                .collect();
            piiguard(
                1,
                true,
                grpc_work(chs, "/piiguard.v1.Crypto/Decrypt", bodies, None),
            )
        }
        "decrypt-warm" => {
            let cts = encrypt_all_replicas(t, chs, &warm, &pt).await?;
            let bodies = cts
                .into_iter()
                .map(|c| Bytes::from(dec_req(t, c).encode_to_vec()))
                .collect();
            piiguard(
                1,
                true,
                grpc_work(chs, "/piiguard.v1.Crypto/Decrypt", bodies, None),
            )
        }
        "encrypt-batch" | "encrypt-batch-hot" => {
            let hot = name == "encrypt-batch-hot";
            let subjects: Vec<String> = (0..a.batch_size)
                .map(|i| {
                    if hot {
                        HOT_SUBJECT.to_string()
                    } else {
                        batch_subjects(i)
                    }
                })
                .collect();
            encrypt_all_replicas(t, chs, &subjects, &pt).await?;
            let items = subjects.iter().map(|s| enc_req(t, s, &pt)).collect();
            let body = Bytes::from(pb::EncryptBatchRequest { items }.encode_to_vec());
            piiguard(
                a.batch_size as u64,
                false,
                grpc_work(
                    chs,
                    "/piiguard.v1.Crypto/EncryptBatch",
                    vec![body],
                    Some(check_encrypt_batch),
                ),
            )
        }
        "decrypt-batch" => {
            let subjects: Vec<String> = (0..a.batch_size).map(batch_subjects).collect();
            let cts = encrypt_all_replicas(t, chs, &subjects, &pt).await?;
            let items = cts.into_iter().map(|c| dec_req(t, c)).collect();
            let body = Bytes::from(pb::DecryptBatchRequest { items }.encode_to_vec());
            piiguard(
                a.batch_size as u64,
                false,
                grpc_work(
                    chs,
                    "/piiguard.v1.Crypto/DecryptBatch",
                    vec![body],
                    Some(check_decrypt_batch),
                ),
            )
        }
        "encrypt-cold" => {
            let run = run_id();
            let next = Arc::new(AtomicU64::new(0));
            let chs: Arc<[Channel]> = chs.into();
            let t = t.clone();
            let pt = pt.clone();
            piiguard(
                1,
                false,
                Arc::new(move |w, _seq| {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let subject = format!("bench-cold-{run:016x}-{n}");
                    let body = Bytes::from(enc_req(&t, &subject, &pt).encode_to_vec());
                    let ch = chs[w % chs.len()].clone();
                    Box::pin(async move {
                        grpc_call(ch, "/piiguard.v1.Crypto/Encrypt", body)
                            .await
                            .map(|_| ())
                    })
                }),
            )
        }
        // The first encryption of a migration: every item a new subject (items/s = new
        // subjects/s), --cold-batch-concurrency calls in flight.
        "encrypt-batch-cold" => {
            let run = run_id();
            let next = Arc::new(AtomicU64::new(0));
            let chs: Arc<[Channel]> = chs.into();
            let t = t.clone();
            let pt = pt.clone();
            let size = a.batch_size.max(1);
            Work {
                concurrency: Some(a.cold_batch_concurrency.max(1)),
                ..piiguard(
                    size as u64,
                    false,
                    Arc::new(move |w, _seq| {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let items = (0..size)
                            .map(|i| enc_req(&t, &format!("bench-coldb-{run:016x}-{n}-{i}"), &pt))
                            .collect();
                        let body = Bytes::from(pb::EncryptBatchRequest { items }.encode_to_vec());
                        let ch = chs[w % chs.len()].clone();
                        Box::pin(async move {
                            let r = grpc_call(ch, "/piiguard.v1.Crypto/EncryptBatch", body).await?;
                            check_encrypt_batch(&r)
                        })
                    }),
                )
            }
        }
        "bao-encrypt" => {
            let v = vault_handle()?;
            let body = Bytes::from(json!({ "plaintext": B64.encode(&pt) }).to_string());
            anchor(
                1,
                true,
                vault_post_work(v, transit("encrypt"), vec![body], false),
            )
        }
        "bao-decrypt" => {
            let v = vault_handle()?;
            let p = transit("encrypt");
            let body = Bytes::from(json!({ "plaintext": B64.encode(&pt) }).to_string());
            let r = ok_json(&p, v.call(0, reqwest::Method::POST, &p, Some(body)).await?)?;
            let ct = r["data"]["ciphertext"]
                .as_str()
                .ok_or("transit encrypt: no ciphertext")?;
            let body = Bytes::from(json!({ "ciphertext": ct }).to_string());
            anchor(
                1,
                true,
                vault_post_work(v, transit("decrypt"), vec![body], false),
            )
        }
        "bao-encrypt-batch" => {
            let v = vault_handle()?;
            let items: Vec<Value> = (0..a.bao_batch_size)
                .map(|_| json!({ "plaintext": B64.encode(&pt) }))
                .collect();
            let body = Bytes::from(json!({ "batch_input": items }).to_string());
            anchor(
                a.bao_batch_size as u64,
                false,
                vault_post_work(v, transit("encrypt"), vec![body], true),
            )
        }
        "bao-decrypt-batch" => {
            let v = vault_handle()?;
            let p = transit("encrypt");
            let items: Vec<Value> = (0..a.bao_batch_size)
                .map(|_| json!({ "plaintext": B64.encode(&pt) }))
                .collect();
            let body = Bytes::from(json!({ "batch_input": items }).to_string());
            let r = ok_json(&p, v.call(0, reqwest::Method::POST, &p, Some(body)).await?)?;
            let cts: Vec<Value> = r["data"]["batch_results"]
                .as_array()
                .ok_or("transit batch encrypt: no batch_results")?
                .iter()
                .map(|x| json!({ "ciphertext": x["ciphertext"] }))
                .collect();
            let body = Bytes::from(json!({ "batch_input": cts }).to_string());
            anchor(
                a.bao_batch_size as u64,
                false,
                vault_post_work(v, transit("decrypt"), vec![body], true),
            )
        }
        "bao-cold" => {
            let v = vault_handle()?;
            let run = run_id();
            let next = Arc::new(AtomicU64::new(0));
            let kv = t.kv_mount.clone();
            let enc_path: Arc<str> = transit("encrypt").into();
            let dek = B64.encode([7u8; 32]);
            anchor(
                1,
                false,
                Arc::new(move |w, _seq| {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let v = v.clone();
                    let kv = kv.clone();
                    let enc_path = enc_path.clone();
                    let dek = dek.clone();
                    Box::pin(
                        async move { bao_cold_sequence(&v, w, &kv, &enc_path, &dek, run, n).await },
                    )
                }),
            )
        }
        // Masked reveal (docs/SEARCH.md): Decrypt of a card number of the hot subject with
        // REVEAL_MODE_MASKED (`•••• 1111`); compare with decrypt-hot (full reveal).
        "decrypt-masked" => {
            let req = pb::EncryptRequest {
                field: CARD_FIELD.into(),
                ..enc_req(t, HOT_SUBJECT, BENCH_CARD.as_bytes())
            };
            let cts = encrypt_reqs(&chs[0], &[req]).await?;
            let bodies: Vec<Bytes> = cts
                .into_iter()
                .map(|c| {
                    Bytes::from(
                        pb::DecryptRequest {
                            field: CARD_FIELD.into(),
                            reveal: pb::RevealMode::Masked as i32,
                            ..dec_req(t, c)
                        }
                        .encode_to_vec(),
                    )
                })
                .collect();
            let path = "/piiguard.v1.Crypto/Decrypt";
            probe(&chs[0], path, &bodies[0], check_masked, "").await?;
            piiguard(1, true, grpc_work(chs, path, bodies, Some(check_masked)))
        }
        // Sealed envelopes (docs/FORMAT.md) made here with the server's sealing public key
        // (Keys.GetPublicKey), one per warm subject (each with its own RSA-OAEP), opened for the
        // warm subjects (cached: the Unseal's encryption is a warm Encrypt). Every call costs
        // one RSA-2048 private operation in OpenBao transit.
        "unseal" | "unseal-direct" | "unseal-batch" => {
            encrypt_all_replicas(t, chs, &warm, &pt).await?;
            let key = crate::keys::sealing_key(&chs[0]).await?;
            let kind = if name == "unseal-direct" {
                piiguard::crypto::sealed::Kind::Direct
            } else {
                piiguard::crypto::sealed::Kind::Hybrid
            };
            let envs = crate::keys::seal_pool(&key, warm.len(), kind, &t.keyspace, &t.field, &pt)?;
            let req = |i: usize| pb::UnsealRequest {
                keyspace: t.keyspace.clone(),
                subject: warm[i % warm.len()].clone(),
                field: t.field.clone(),
                envelope: envs[i % envs.len()].clone(),
                context: Default::default(),
                encoding: 0,
                return_plaintext: false,
            };
            if name == "unseal-batch" {
                let n = a.unseal_batch_size.max(1);
                // Distinct batches over the pool (the pool cycles through every envelope).
                let batches = envs.len().div_ceil(n).max(1);
                let bodies: Vec<Bytes> = (0..batches)
                    .map(|b| {
                        let items = (0..n).map(|k| req(b * n + k)).collect();
                        Bytes::from(pb::UnsealBatchRequest { items }.encode_to_vec())
                    })
                    .collect();
                let path = "/piiguard.v1.Crypto/UnsealBatch";
                probe(&chs[0], path, &bodies[0], check_unseal_batch, "").await?;
                keys_batch(piiguard(
                    n as u64,
                    false,
                    grpc_work(chs, path, bodies, Some(check_unseal_batch)),
                ))
            } else {
                let bodies: Vec<Bytes> = (0..envs.len())
                    .map(|i| Bytes::from(req(i).encode_to_vec()))
                    .collect();
                let path = "/piiguard.v1.Crypto/Unseal";
                probe(&chs[0], path, &bodies[0], check_unseal, "").await?;
                piiguard(1, true, grpc_work(chs, path, bodies, Some(check_unseal)))
            }
        }
        // The anchor of Unseal: transit decrypt with the same RSA-2048 key of the RSA parts of
        // envelopes like unseal's (32-byte AES keys under RSA-OAEP-SHA256), single and in
        // batch_input form of --unseal-batch-size.
        "bao-rsa-decrypt" | "bao-rsa-decrypt-batch" => {
            let v = vault_handle()?;
            let setup = Vault::new(t, 1)?;
            let p = format!("{}/keys/{}", t.transit_mount, crate::keys::SEALING_KEY);
            let info = ok_json(&p, setup.call(0, reqwest::Method::GET, &p, None).await?)?;
            let key = crate::keys::sealing_key_from_transit(&info)?;
            let n = a.warm_subjects.max(1);
            let envs = crate::keys::seal_pool(
                &key,
                n,
                piiguard::crypto::sealed::Kind::Hybrid,
                &t.keyspace,
                &t.field,
                &pt,
            )?;
            let cts = envs
                .iter()
                .map(|e| crate::keys::transit_rsa_ciphertext(e))
                .collect::<Result<Vec<String>, String>>()?;
            let path = format!("{}/decrypt/{}", t.transit_mount, crate::keys::SEALING_KEY);
            if name == "bao-rsa-decrypt-batch" {
                let b = a.unseal_batch_size.max(1);
                let bodies: Vec<Bytes> = (0..cts.len().div_ceil(b).max(1))
                    .map(|j| {
                        let items: Vec<Value> = (0..b)
                            .map(|k| json!({ "ciphertext": cts[(j * b + k) % cts.len()] }))
                            .collect();
                        Bytes::from(json!({ "batch_input": items }).to_string())
                    })
                    .collect();
                keys_batch(anchor(
                    b as u64,
                    false,
                    vault_post_work(v, path, bodies, true),
                ))
            } else {
                let bodies = cts
                    .iter()
                    .map(|c| Bytes::from(json!({ "ciphertext": c }).to_string()))
                    .collect();
                anchor(1, true, vault_post_work(v, path, bodies, false))
            }
        }
        // Rewrap of ciphertexts of an older DEK version: the warm subjects' fields are
        // encrypted, then every warm subject's key is rotated once (Keys.RotateSubjectKey, as
        // the admin identity), so every call opens with the old version and seals with the new
        // one (`changed = true`, checked). Needs the `rewrap` grant (bench/README.md).
        "rewrap" | "rewrap-batch" => {
            let cts = encrypt_all_replicas(t, chs, &warm, &pt).await?;
            let admin = crate::keys::connect_admin(t).await?;
            crate::keys::rotate_subjects(&admin, &t.keyspace, &warm, 16).await?;
            let req = |i: usize| pb::RewrapRequest {
                field: t.field.clone(),
                ciphertext: cts[i % cts.len()].clone(),
                context: Default::default(),
                keyspace: t.keyspace.clone(),
                encoding: 0,
            };
            let hint = format!("\n{}", crate::keys::rewrap_grant_hint(t));
            if name == "rewrap-batch" {
                let n = a.batch_size.max(1);
                let items = (0..n).map(req).collect();
                let body = Bytes::from(pb::RewrapBatchRequest { items }.encode_to_vec());
                let path = "/piiguard.v1.Crypto/RewrapBatch";
                probe(&chs[0], path, &body, check_rewrap_batch, &hint).await?;
                keys_batch(piiguard(
                    n as u64,
                    false,
                    grpc_work(chs, path, vec![body], Some(check_rewrap_batch)),
                ))
            } else {
                let bodies: Vec<Bytes> = (0..cts.len())
                    .map(|i| Bytes::from(req(i).encode_to_vec()))
                    .collect();
                let path = "/piiguard.v1.Crypto/Rewrap";
                probe(&chs[0], path, &bodies[0], check_rewrap, &hint).await?;
                piiguard(1, true, grpc_work(chs, path, bodies, Some(check_rewrap)))
            }
        }
        // Transit rewrap of a 64-byte value from the previous version of a transit key to its
        // newest (decrypt and encrypt inside OpenBao): the Vault-side twin of Rewrap.
        "bao-rewrap" => {
            let v = vault_handle()?;
            let latest = anchor_key(t).await?;
            let setup = Vault::new(t, 1)?;
            let p = format!("{}/encrypt/{ANCHOR_KEY}", t.transit_mount);
            let items: Vec<Value> = (0..a.bao_batch_size.max(1))
                .map(|_| json!({ "plaintext": B64.encode(&pt), "key_version": latest - 1 }))
                .collect();
            let body = Bytes::from(json!({ "batch_input": items }).to_string());
            let r = ok_json(
                &p,
                setup.call(0, reqwest::Method::POST, &p, Some(body)).await?,
            )?;
            let bodies = r["data"]["batch_results"]
                .as_array()
                .ok_or("transit batch encrypt: no batch_results")?
                .iter()
                .map(|x| {
                    x["ciphertext"]
                        .as_str()
                        .map(|c| Bytes::from(json!({ "ciphertext": c }).to_string()))
                        .ok_or_else(|| format!("transit batch encrypt: {x}"))
                })
                .collect::<Result<Vec<Bytes>, String>>()?;
            let path = format!("{}/rewrap/{ANCHOR_KEY}", t.transit_mount);
            anchor(1, true, vault_post_work(v, path, bodies, false))
        }
        // Transit HMAC-SHA256 of the same e-mail address: the Vault-side twin of BlindIndex
        // (which also normalises the value and truncates the result).
        "bao-hmac" => {
            let v = vault_handle()?;
            anchor_key(t).await?;
            let body = Bytes::from(json!({ "input": B64.encode(BENCH_EMAIL) }).to_string());
            let path = format!("{}/hmac/{ANCHOR_KEY}/sha2-256", t.transit_mount);
            anchor(1, true, vault_post_work(v, path, vec![body], false))
        }
        other => return Err(format!("unknown scenario {other:?}")),
    })
}

/// Makes sure the anchors' transit key exists with at least two versions (created and rotated
/// with the token of --vault-token-file); returns its newest version.
async fn anchor_key(t: &Target) -> Result<u32, String> {
    let v = Vault::new(t, 1)?;
    let p = format!("{}/keys/{ANCHOR_KEY}", t.transit_mount);
    let mut r = v.call(0, reqwest::Method::GET, &p, None).await?;
    if r.0 == reqwest::StatusCode::NOT_FOUND {
        let body = Bytes::from(json!({ "type": "aes256-gcm96" }).to_string());
        let c = v.call(0, reqwest::Method::POST, &p, Some(body)).await?;
        if !c.0.is_success() {
            return Err(format!("{p}: HTTP {}", c.0));
        }
        r = v.call(0, reqwest::Method::GET, &p, None).await?;
    }
    let info = ok_json(&p, r)?;
    let mut latest = info["data"]["latest_version"].as_u64().unwrap_or(0);
    if latest < 2 {
        let rp = format!("{p}/rotate");
        let c = v.call(0, reqwest::Method::POST, &rp, None).await?;
        if !c.0.is_success() {
            return Err(format!("{rp}: HTTP {}", c.0));
        }
        latest = latest.max(1) + 1;
    }
    u32::try_from(latest).map_err(|e| e.to_string())
}

/// The Vault round trips of one piiguard cold encrypt (keys/manager.rs `load_or_create`), made
/// directly: read the subject record (absent), wrap a new DEK with transit, write the DEK
/// record (CAS 0), write the subject record (CAS 0). Paths live under `bench/` in the KV mount,
/// with the same lengths as piiguard's.
async fn bao_cold_sequence(
    v: &Vault,
    w: usize,
    kv: &str,
    enc_path: &str,
    dek_b64: &str,
    run: u64,
    n: u64,
) -> Result<(), String> {
    let sref = format!("{run:016x}{n:048x}");
    let key_id = format!("{run:016x}{n:016x}");
    let spath = format!("{kv}/data/bench/subjects/orders/{sref}");
    let r = v.call(w, reqwest::Method::GET, &spath, None).await?;
    if r.0 != reqwest::StatusCode::NOT_FOUND {
        return Err(format!("{spath}: expected 404, got {}", r.0));
    }
    let body = Bytes::from(json!({ "plaintext": dek_b64 }).to_string());
    let r = ok_json(
        enc_path,
        v.call(w, reqwest::Method::POST, enc_path, Some(body))
            .await?,
    )?;
    let wrapped = r["data"]["ciphertext"]
        .as_str()
        .ok_or("transit encrypt: no ciphertext")?
        .to_string();
    let dpath = format!("{kv}/data/bench/deks/orders/{key_id}");
    let body = json!({ "options": { "cas": 0 }, "data": {
        "subject_ref": sref, "wrapped": wrapped, "alg": "aes-256-gcm", "created_at": 0 } });
    ok_json(
        &dpath,
        v.call(
            w,
            reqwest::Method::POST,
            &dpath,
            Some(Bytes::from(body.to_string())),
        )
        .await?,
    )?;
    let body = json!({ "options": { "cas": 0 }, "data": {
        "key_id": key_id, "dek_version": 1, "wrapped": wrapped, "alg": "aes-256-gcm",
        "created_at": 0 } });
    ok_json(
        &spath,
        v.call(
            w,
            reqwest::Method::POST,
            &spath,
            Some(Bytes::from(body.to_string())),
        )
        .await?,
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The load loop

struct Outcome {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    latencies_ns: Vec<u64>,
    late_sends: u64,
}

async fn drive(
    call: &CallFn,
    concurrency: usize,
    duration: Duration,
    max_calls: u64,
    rate: f64,
) -> Outcome {
    let concurrency = concurrency.max(1);
    let start = Instant::now();
    let deadline = start + duration;
    let claimed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let call = call.clone();
        let claimed = claimed.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u64> = Vec::with_capacity(4096);
            let mut errors = 0u64;
            let mut first_error = None;
            let mut k = 0u64;
            let mut late = 0u64;
            loop {
                let intended = if rate > 0.0 {
                    let at = start
                        + Duration::from_secs_f64(
                            (k * concurrency as u64 + w as u64) as f64 / rate,
                        );
                    if at >= deadline {
                        break;
                    }
                    if Instant::now() < at {
                        // Idle until the slot: the timer wakes us up to ~1 ms late (tokio's
                        // timer resolution), which is the load generator's delay, not the
                        // server's, so latency counts from the actual send.
                        tokio::time::sleep_until(at.into()).await;
                        Instant::now()
                    } else {
                        // Behind schedule because our previous call was slow: count from the
                        // scheduled time, so server stalls are not hidden (coordinated
                        // omission). Many late sends can also mean the load generator itself
                        // was starved of CPU: the report shows how many.
                        if at.elapsed() > Duration::from_millis(1) {
                            late += 1;
                        }
                        at
                    }
                } else {
                    Instant::now()
                };
                if Instant::now() >= deadline {
                    break;
                }
                let seq = claimed.fetch_add(1, Ordering::Relaxed);
                if seq >= max_calls {
                    break;
                }
                match tokio::time::timeout(CALL_TIMEOUT, call(w, seq)).await {
                    Ok(Ok(())) => lat.push(intended.elapsed().as_nanos() as u64),
                    Ok(Err(e)) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                    Err(_) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| "timeout".to_string());
                    }
                }
                k += 1;
            }
            (lat, errors, first_error, late)
        }));
    }
    let mut out = Outcome {
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        latencies_ns: Vec::new(),
        late_sends: 0,
    };
    for t in tasks {
        match t.await {
            Ok((lat, errors, fe, late)) => {
                out.late_sends += late;
                out.ok += lat.len() as u64;
                out.latencies_ns.extend(lat);
                out.errors += errors;
                if out.first_error.is_none() {
                    out.first_error = fe;
                }
            }
            Err(e) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| format!("worker: {e}"));
            }
        }
    }
    out.elapsed = start.elapsed();
    out
}

// ---------------------------------------------------------------------------------------------
// Results and report

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub served_by: &'static str,
    /// "closed" or "rate=<calls/s>".
    pub mode: String,
    pub concurrency: usize,
    pub connections: usize,
    pub calls_ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub calls_per_sec: f64,
    pub items_per_call: u64,
    pub items_per_sec: f64,
    pub latency: Percentiles,
    /// Fixed rate only: calls sent more than 1 ms after their scheduled time (the previous
    /// call of that worker was still running, or the load generator was starved of CPU).
    pub late_sends: u64,
    /// piiguard server CPU (user+system, all threads) per successful call, microseconds.
    pub server_cpu_us_per_call: Option<f64>,
    pub server_cpu_us_per_item: Option<f64>,
    /// piiguard server CPU use during the run, in cores.
    pub server_cores: Option<f64>,
    pub vault_cpu_us_per_call: Option<f64>,
    pub vault_cores: Option<f64>,
    /// PostgreSQL CPU (postmaster and backends) per successful call, with --store-pid.
    pub store_cpu_us_per_call: Option<f64>,
    /// This load generator's CPU per call (it shares the machine).
    pub client_cpu_us_per_call: Option<f64>,
    pub server_rss_kib: Option<u64>,
    pub half_rate: Option<Box<ScenarioResult>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub what: String,
    pub value: f64,
    pub target: Option<String>,
    pub met: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub label: String,
    pub nproc: usize,
    pub plaintext_bytes: usize,
    pub batch_size: usize,
    pub bao_batch_size: usize,
    pub warm_subjects: usize,
    /// Token of the bao-* scenarios: `token file` or `policy <name>` (a child token).
    pub anchor_token: String,
    pub warmup_secs: f64,
    pub scenarios: Vec<ScenarioResult>,
    pub ratios: Vec<Ratio>,
}

struct Meter {
    ticks: u64,
    /// Every replica's pid (CPU and RSS summed).
    servers: Vec<String>,
    vault: Option<String>,
    store: Option<String>,
    me: String,
}

struct Reading {
    server: Option<Duration>,
    vault: Option<Duration>,
    store: Option<Duration>,
    me: Option<Duration>,
}

impl Meter {
    fn read(&self) -> Reading {
        let cpu = |p: &Option<String>| p.as_deref().and_then(|p| stats::process_cpu(p, self.ticks));
        let server = (!self.servers.is_empty())
            .then(|| {
                self.servers
                    .iter()
                    .map(|p| stats::process_cpu(p, self.ticks))
                    .sum::<Option<Duration>>()
            })
            .flatten();
        Reading {
            server,
            vault: cpu(&self.vault),
            store: self
                .store
                .as_deref()
                .and_then(|p| stats::process_tree_cpu(p, self.ticks)),
            me: stats::process_cpu(&self.me, self.ticks),
        }
    }

    fn server_rss_kib(&self) -> Option<u64> {
        (!self.servers.is_empty())
            .then(|| {
                self.servers
                    .iter()
                    .map(|p| stats::process_rss_kib(p))
                    .sum::<Option<u64>>()
            })
            .flatten()
    }
}

fn per(before: Option<Duration>, after: Option<Duration>, n: u64) -> Option<f64> {
    let (b, a) = (before?, after?);
    (n > 0).then(|| a.saturating_sub(b).as_secs_f64() * 1e6 / n as f64)
}

fn cores(before: Option<Duration>, after: Option<Duration>, secs: f64) -> Option<f64> {
    let (b, a) = (before?, after?);
    (secs > 0.0).then(|| a.saturating_sub(b).as_secs_f64() / secs)
}

async fn measure(name: &str, w: &Work, a: &RunArgs, meter: &Meter, rate: f64) -> ScenarioResult {
    let concurrency = w.concurrency.unwrap_or(a.concurrency);
    if a.warmup > 0.0 {
        let _ = drive(
            &w.call,
            concurrency,
            Duration::from_secs_f64(a.warmup),
            a.requests,
            rate,
        )
        .await;
    }
    let before = meter.read();
    let mut o = drive(
        &w.call,
        concurrency,
        Duration::from_secs_f64(a.duration),
        a.requests,
        rate,
    )
    .await;
    let after = meter.read();
    let secs = o.elapsed.as_secs_f64();
    let lat = stats::percentiles(&mut o.latencies_ns);
    ScenarioResult {
        name: name.to_string(),
        served_by: if w.piiguard { "piiguard" } else { "openbao" },
        mode: if rate > 0.0 {
            format!("rate={rate:.0}")
        } else {
            "closed".into()
        },
        concurrency,
        connections: a.connections,
        calls_ok: o.ok,
        errors: o.errors,
        first_error: o.first_error,
        seconds: secs,
        calls_per_sec: o.ok as f64 / secs,
        items_per_call: w.items,
        items_per_sec: (o.ok * w.items) as f64 / secs,
        latency: lat,
        late_sends: o.late_sends,
        server_cpu_us_per_call: per(before.server, after.server, o.ok),
        server_cpu_us_per_item: per(before.server, after.server, o.ok * w.items),
        server_cores: cores(before.server, after.server, secs),
        vault_cpu_us_per_call: per(before.vault, after.vault, o.ok),
        vault_cores: cores(before.vault, after.vault, secs),
        store_cpu_us_per_call: per(before.store, after.store, o.ok),
        client_cpu_us_per_call: per(before.me, after.me, o.ok),
        server_rss_kib: meter.server_rss_kib(),
        half_rate: None,
    }
}

fn find<'a>(rs: &'a [ScenarioResult], name: &str) -> Option<&'a ScenarioResult> {
    rs.iter().find(|r| r.name == name)
}

pub fn ratios(rs: &[ScenarioResult]) -> Vec<Ratio> {
    let mut out = Vec::new();
    let mut push = |what: String, value: f64, target: Option<(&str, bool)>| {
        if value.is_finite() {
            out.push(Ratio {
                what,
                value,
                target: target.map(|t| t.0.to_string()),
                met: target.map(|t| t.1),
            });
        }
    };
    let health = find(rs, "health");
    for name in ["encrypt-hot", "encrypt-warm", "decrypt-hot", "decrypt-warm"] {
        let Some(r) = find(rs, name) else { continue };
        if let Some(h) = health {
            let v = r.calls_per_sec / h.calls_per_sec;
            push(
                format!("{name} / health throughput"),
                v,
                Some((">= 0.85", v >= 0.85)),
            );
            if let (Some(c), Some(hc)) = (r.server_cpu_us_per_call, h.server_cpu_us_per_call) {
                let v = c / hc;
                push(
                    format!("{name} / health server CPU per call"),
                    v,
                    Some(("<= 1.2", v <= 1.2)),
                );
            }
        }
        let anchor = if name.starts_with("encrypt") {
            "bao-encrypt"
        } else {
            "bao-decrypt"
        };
        if let Some(b) = find(rs, anchor) {
            push(
                format!("{name} / {anchor} throughput"),
                r.calls_per_sec / b.calls_per_sec,
                None,
            );
            if let (Some(bc), Some(c)) = (b.vault_cpu_us_per_call, r.server_cpu_us_per_call) {
                let v = bc / c;
                push(
                    format!("{anchor} OpenBao CPU per call / {name} piiguard CPU per call"),
                    v,
                    Some((">= 10", v >= 10.0)),
                );
            }
        }
        if let Some(h) = &r.half_rate {
            let v = h.latency.p99_us;
            push(
                format!("{name} p99 at half of peak rate (us)"),
                v,
                Some(("<= 2000", v <= 2000.0)),
            );
        }
    }
    for (name, anchor) in [
        ("encrypt-batch", "bao-encrypt-batch"),
        ("encrypt-batch-hot", "bao-encrypt-batch"),
        ("decrypt-batch", "bao-decrypt-batch"),
    ] {
        let Some(r) = find(rs, name) else { continue };
        push(
            format!("{name} fields/s (millions)"),
            r.items_per_sec / 1e6,
            Some((">= 1.0", r.items_per_sec >= 1e6)),
        );
        if let Some(b) = find(rs, anchor) {
            push(
                format!("{name} / {anchor} items/s"),
                r.items_per_sec / b.items_per_sec,
                Some((">= 5", r.items_per_sec / b.items_per_sec >= 5.0)),
            );
        }
    }
    keys_and_search_ratios(rs, &mut push);
    if let (Some(c), Some(b)) = (find(rs, "encrypt-cold"), find(rs, "bao-cold")) {
        let v = c.calls_per_sec / b.calls_per_sec;
        push(
            "encrypt-cold / bao-cold (same Vault round trips)".into(),
            v,
            Some((">= 1.5", v >= 1.5)),
        );
    }
    if let (Some(m), Some(c)) = (find(rs, "encrypt-batch-cold"), find(rs, "encrypt-cold")) {
        let v = m.items_per_sec / c.calls_per_sec;
        push(
            "encrypt-batch-cold new subjects/s / encrypt-cold calls/s".into(),
            v,
            Some((">= 5", v >= 5.0)),
        );
    }
    for name in ["encrypt-cold", "encrypt-batch-cold", "bao-cold"] {
        if let Some(r) = find(rs, name)
            && let Some(c) = r.vault_cpu_us_per_call
            && r.items_per_sec > 0.0
        {
            // Per new subject: a batch call carries items_per_sec / calls_per_sec of them.
            push(
                format!("{name} OpenBao CPU us per new subject"),
                c * r.calls_per_sec / r.items_per_sec,
                None,
            );
        }
    }
    out
}

/// The comparisons of issue 12 (Unseal, Rewrap) and issue 14 (BlindIndex, masked reveals).
fn keys_and_search_ratios(
    rs: &[ScenarioResult],
    push: &mut impl FnMut(String, f64, Option<(&str, bool)>),
) {
    let cpu = |r: &ScenarioResult| r.server_cpu_us_per_call;
    // Unseal vs OpenBao's own RSA-2048 decrypt (the private operation bounds both).
    let rsa = find(rs, "bao-rsa-decrypt");
    for name in ["unseal", "unseal-direct"] {
        if let (Some(u), Some(b)) = (find(rs, name), rsa) {
            let v = u.calls_per_sec / b.calls_per_sec;
            push(
                format!("{name} / bao-rsa-decrypt throughput"),
                v,
                Some((">= 0.8", v >= 0.8)),
            );
        }
    }
    if let Some(ub) = find(rs, "unseal-batch") {
        if let Some(u) = find(rs, "unseal") {
            push(
                "unseal-batch envelopes/s / unseal calls/s".into(),
                ub.items_per_sec / u.calls_per_sec,
                None,
            );
        }
        if let Some(b) = rsa {
            push(
                "unseal-batch envelopes/s / bao-rsa-decrypt calls/s".into(),
                ub.items_per_sec / b.calls_per_sec,
                None,
            );
        }
        if let Some(bb) = find(rs, "bao-rsa-decrypt-batch") {
            push(
                "unseal-batch / bao-rsa-decrypt-batch items/s".into(),
                ub.items_per_sec / bb.items_per_sec,
                None,
            );
        }
    }
    // Rewrap: throughput per core the server used; CPU against Encrypt and transit rewrap.
    for name in ["rewrap", "rewrap-batch"] {
        let Some(r) = find(rs, name) else { continue };
        if let Some(c) = r.server_cores.filter(|c| *c > 0.0) {
            push(
                format!("{name} items/s per server core"),
                r.items_per_sec / c,
                None,
            );
        }
    }
    if let (Some(r), Some(e)) = (find(rs, "rewrap"), find(rs, "encrypt-warm"))
        && let (Some(a), Some(b)) = (cpu(r), cpu(e))
    {
        push(
            "rewrap / encrypt-warm server CPU per call".into(),
            a / b,
            None,
        );
    }
    if let (Some(r), Some(b)) = (find(rs, "rewrap"), find(rs, "bao-rewrap")) {
        push(
            "rewrap / bao-rewrap throughput".into(),
            r.calls_per_sec / b.calls_per_sec,
            None,
        );
        if let (Some(bc), Some(c)) = (b.vault_cpu_us_per_call, cpu(r)) {
            push(
                "bao-rewrap OpenBao CPU per call / rewrap piiguard CPU per call".into(),
                bc / c,
                None,
            );
        }
    }
    // Blind indexes: a keyed hash must not cost more than Encrypt.
    let health = find(rs, "health");
    let enc = find(rs, "encrypt-hot");
    for name in ["blind-index", "encrypt-index"] {
        let Some(r) = find(rs, name) else { continue };
        if let Some(h) = health {
            push(
                format!("{name} / health throughput"),
                r.calls_per_sec / h.calls_per_sec,
                None,
            );
        }
        if let Some(e) = enc {
            push(
                format!("{name} / encrypt-hot throughput"),
                r.calls_per_sec / e.calls_per_sec,
                None,
            );
            if let (Some(a), Some(b)) = (cpu(r), cpu(e)) {
                let v = a / b;
                // BlindIndex alone must not cost more than Encrypt; Encrypt with its index
                // is an Encrypt plus a BlindIndex, reported without a target.
                let target = (name == "blind-index").then_some(("<= 1.0", v <= 1.0));
                push(
                    format!("{name} / encrypt-hot server CPU per call"),
                    v,
                    target,
                );
            }
        }
    }
    if let (Some(r), Some(b)) = (find(rs, "blind-index"), find(rs, "bao-hmac"))
        && let (Some(bc), Some(c)) = (b.vault_cpu_us_per_call, cpu(r))
    {
        push(
            "bao-hmac OpenBao CPU per call / blind-index piiguard CPU per call".into(),
            bc / c,
            None,
        );
    }
    if let (Some(m), Some(d)) = (find(rs, "decrypt-masked"), find(rs, "decrypt-hot")) {
        push(
            "decrypt-masked / decrypt-hot throughput".into(),
            m.calls_per_sec / d.calls_per_sec,
            None,
        );
        if let (Some(a), Some(b)) = (cpu(m), cpu(d)) {
            push(
                "decrypt-masked / decrypt-hot server CPU per call".into(),
                a / b,
                None,
            );
        }
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

fn text_line(s: &mut String, r: &ScenarioResult) {
    let _ = writeln!(
        s,
        "{:<18} {:<12} {:>10.0} {:>11.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>9} {:>6} {:>9} {:>9} {:>9} {:>6}",
        r.name,
        r.mode,
        r.calls_per_sec,
        r.items_per_sec,
        r.latency.p50_us,
        r.latency.p90_us,
        r.latency.p99_us,
        r.latency.p999_us,
        r.latency.max_us,
        fmt_opt(r.server_cpu_us_per_call, 1),
        fmt_opt(r.server_cores, 2),
        fmt_opt(r.vault_cpu_us_per_call, 1),
        fmt_opt(r.client_cpu_us_per_call, 1),
        r.server_rss_kib
            .map(|k| format!("{:.1}", k as f64 / 1024.0))
            .unwrap_or_else(|| "-".into()),
        r.errors,
    );
    if let Some(e) = &r.first_error {
        let _ = writeln!(s, "    first error: {e}");
    }
    if r.late_sends > 0 {
        let _ = writeln!(
            s,
            "    {} of {} calls sent > 1 ms late (behind schedule)",
            r.late_sends, r.calls_ok
        );
    }
}

pub fn text_report(rep: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "piiguard-bench {} | nproc {} | plaintext {} B | batch {} (transit batch {}) | warm set {} subjects | OpenBao token: {}",
        rep.label,
        rep.nproc,
        rep.plaintext_bytes,
        rep.batch_size,
        rep.bao_batch_size,
        rep.warm_subjects,
        rep.anchor_token
    );
    let _ = writeln!(
        s,
        "{:<18} {:<12} {:>10} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>9} {:>9} {:>9} {:>6}",
        "scenario",
        "mode",
        "calls/s",
        "items/s",
        "p50 us",
        "p90 us",
        "p99 us",
        "p99.9 us",
        "max us",
        "srvCPU/c",
        "cores",
        "baoCPU/c",
        "cliCPU/c",
        "RSS MiB",
        "errors"
    );
    for r in &rep.scenarios {
        text_line(&mut s, r);
        if let Some(h) = &r.half_rate {
            text_line(&mut s, h);
        }
    }
    let _ = writeln!(s, "(CPU per call in microseconds of user+system time)");
    if !rep.ratios.is_empty() {
        let _ = writeln!(s, "\nratios (same run):");
        for r in &rep.ratios {
            let verdict = match (r.met, &r.target) {
                (Some(true), Some(t)) => format!("target {t}: met"),
                (Some(false), Some(t)) => format!("target {t}: MISSED"),
                _ => String::new(),
            };
            let _ = writeln!(s, "  {:<62} {:>9.3}  {verdict}", r.what, r.value);
        }
    }
    s
}

pub async fn run(a: RunArgs) -> Result<(), String> {
    let names = expand(&a.scenarios)?;
    let needs_grpc = names.iter().any(|n| !n.starts_with("bao-"));
    let chs = if needs_grpc {
        connect_grpc(&a.target, a.connections).await?
    } else {
        Vec::new()
    };
    let meter = Meter {
        ticks: stats::clock_ticks(),
        servers: a.server_pid.iter().map(u32::to_string).collect(),
        vault: a.vault_pid.map(|p| p.to_string()),
        store: a.store_pid.map(|p| p.to_string()),
        me: std::process::id().to_string(),
    };
    let mut vault = None;
    let mut results = Vec::new();
    for name in &names {
        if !a.json {
            eprintln!("running {name} ...");
        }
        let w = build(name, &a, &chs, &mut vault).await?;
        let mut r = measure(name, &w, &a, &meter, a.rate).await;
        if a.half_rate && a.rate == 0.0 && w.unary && w.piiguard && r.calls_per_sec > 0.0 {
            let half = r.calls_per_sec / 2.0;
            let mut h = measure(name, &w, &a, &meter, half).await;
            h.name = format!("{name}@half");
            r.half_rate = Some(Box::new(h));
        }
        results.push(r);
    }
    let rep = Report {
        label: a.label.clone(),
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        plaintext_bytes: a.size,
        batch_size: a.batch_size,
        bao_batch_size: a.bao_batch_size,
        warm_subjects: a.warm_subjects,
        anchor_token: match &a.target.vault_policy {
            Some(p) => format!("policy {p}"),
            None => "token file".into(),
        },
        warmup_secs: a.warmup,
        ratios: ratios(&results),
        scenarios: results,
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rep).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", text_report(&rep));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_groups_expand_and_unknown_names_fail() {
        assert_eq!(expand("health,bao-cold").unwrap(), ["health", "bao-cold"]);
        assert_eq!(expand("all").unwrap().len(), ALL.len());
        assert!(
            expand("all-cold")
                .unwrap()
                .contains(&"bao-cold".to_string())
        );
        assert!(expand("encrypt-lukewarm").is_err());
        assert!(expand(" , ").is_err());
    }

    fn result(name: &str, cps: f64, cpu: f64) -> ScenarioResult {
        ScenarioResult {
            name: name.into(),
            served_by: "piiguard",
            mode: "closed".into(),
            concurrency: 1,
            connections: 1,
            calls_ok: 1,
            errors: 0,
            first_error: None,
            seconds: 1.0,
            calls_per_sec: cps,
            items_per_call: 1,
            items_per_sec: cps,
            latency: Percentiles::default(),
            late_sends: 0,
            server_cpu_us_per_call: Some(cpu),
            server_cpu_us_per_item: Some(cpu),
            server_cores: None,
            vault_cpu_us_per_call: Some(cpu),
            vault_cores: None,
            store_cpu_us_per_call: None,
            client_cpu_us_per_call: None,
            server_rss_kib: None,
            half_rate: None,
        }
    }

    #[test]
    fn ratios_compare_with_health_and_openbao() {
        let rs = vec![
            result("health", 40_000.0, 10.0),
            result("encrypt-hot", 30_000.0, 15.0),
            result("bao-encrypt", 5_000.0, 200.0),
        ];
        let r = ratios(&rs);
        let get = |w: &str| r.iter().find(|x| x.what == w).unwrap();
        let t = get("encrypt-hot / health throughput");
        assert_eq!(t.value, 0.75);
        assert_eq!(t.met, Some(false));
        let c = get("encrypt-hot / health server CPU per call");
        assert_eq!(c.value, 1.5);
        assert_eq!(c.met, Some(false));
        assert_eq!(get("encrypt-hot / bao-encrypt throughput").value, 6.0);
        let b = get("bao-encrypt OpenBao CPU per call / encrypt-hot piiguard CPU per call");
        assert!((b.value - 200.0 / 15.0).abs() < 1e-9);
        assert_eq!(b.met, Some(true));
    }

    #[test]
    fn key_and_search_groups_and_their_ratios() {
        let keys = expand("all-keys").unwrap();
        for n in [
            "unseal",
            "unseal-batch",
            "bao-rsa-decrypt",
            "rewrap",
            "bao-rewrap",
        ] {
            assert!(keys.contains(&n.to_string()), "{n}");
        }
        let search = expand("all-search").unwrap();
        for n in ["blind-index", "encrypt-index", "bao-hmac", "decrypt-masked"] {
            assert!(search.contains(&n.to_string()), "{n}");
        }
        let mut batch = result("unseal-batch", 9.0, 2000.0);
        batch.items_per_call = 100;
        batch.items_per_sec = 900.0;
        let mut rewrap = result("rewrap", 20_000.0, 30.0);
        rewrap.server_cores = Some(0.5);
        let rs = vec![
            result("encrypt-hot", 20_000.0, 30.0),
            result("unseal", 450.0, 200.0),
            result("bao-rsa-decrypt", 600.0, 1700.0),
            batch,
            rewrap,
            result("blind-index", 22_000.0, 33.0),
        ];
        let r = ratios(&rs);
        let get = |w: &str| r.iter().find(|x| x.what == w).unwrap();
        let u = get("unseal / bao-rsa-decrypt throughput");
        assert_eq!((u.value, u.met), (0.75, Some(false)));
        assert_eq!(get("unseal-batch envelopes/s / unseal calls/s").value, 2.0);
        assert_eq!(get("rewrap items/s per server core").value, 40_000.0);
        // A keyed hash must not cost more than Encrypt: 1.1x misses.
        let b = get("blind-index / encrypt-hot server CPU per call");
        assert!((b.value - 1.1).abs() < 1e-9);
        assert_eq!(b.met, Some(false));
    }

    #[test]
    fn text_report_shows_every_scenario_and_verdicts() {
        let rs = vec![
            result("health", 100.0, 1.0),
            result("encrypt-hot", 90.0, 1.1),
        ];
        let rep = Report {
            label: "t".into(),
            nproc: 2,
            plaintext_bytes: 64,
            batch_size: 1000,
            bao_batch_size: 100,
            warm_subjects: 10,
            anchor_token: "token file".into(),
            warmup_secs: 0.0,
            ratios: ratios(&rs),
            scenarios: rs,
        };
        let s = text_report(&rep);
        assert!(s.contains("health"));
        assert!(s.contains("encrypt-hot / health throughput"));
        assert!(s.contains("met"));
    }
}
