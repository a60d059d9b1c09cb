//! A small Vault/OpenBao HTTP client for exactly the calls piiguard makes: AppRole and
//! token-file auth with a renewal task, transit encrypt/decrypt (single and `batch_input`), and
//! KV v2 read / check-and-set write / metadata delete.
//!
//! Why not vaultrs: half of the calls piiguard needs (transit `batch_input`, KV CAS outcome as a
//! value, PSS `salt_length`) are missing there, and it returns plaintexts as plain `String`s.
//! Every call here is one JSON request; secrets are kept in `Zeroizing` buffers on our side.
//!
//! Errors: a connection failure, timeout, 5xx or a sealed Vault is [`Error::Unavailable`]
//! (retryable); anything else unexpected is [`Error::Internal`]. Vault's own error text is
//! logged by the caller's correlation id and never returned to a gRPC client.

pub mod signer;

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::config::{VaultAuth, VaultConfig};
use crate::error::{Error, Result};

/// A Vault token. No `Debug` output of its value, zeroized on drop.
struct Token(Zeroizing<String>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Outcome of a check-and-set write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written as this version.
    Written(u32),
    /// The current version was not the expected one; nothing was written.
    Mismatch,
}

/// A KV v2 secret as read.
#[derive(Debug)]
pub struct KvEntry {
    pub data: Value,
    pub version: u32,
}

/// Lease information of the current token.
#[derive(Debug, Clone, Copy)]
struct Lease {
    ttl: Duration,
    renewable: bool,
}

/// The client. Cheap to share behind an `Arc`.
pub struct Vault {
    http: reqwest::Client,
    cfg: VaultConfig,
    token: RwLock<Option<Arc<Token>>>,
    login_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("address", &self.cfg.address)
            .finish_non_exhaustive()
    }
}

/// Request bodies that carry secrets borrow them: the only serialised copy is the
/// zeroizing request buffer.
#[derive(Serialize)]
struct ApproleLogin<'a> {
    role_id: &'a str,
    secret_id: &'a str,
}

#[derive(Serialize)]
struct TransitPlaintext<'a> {
    plaintext: &'a str,
}

#[derive(Deserialize)]
struct AuthBody {
    auth: AuthInfo,
}
#[derive(Deserialize)]
struct AuthInfo {
    client_token: Zeroizing<String>,
    lease_duration: u64,
    renewable: bool,
}

fn read_secret_file(path: &Path) -> Result<Zeroizing<String>> {
    let s = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        Error::internal(format!(
            "cannot read credential file {}: {e}",
            path.display()
        ))
    })?);
    let t = Zeroizing::new(s.trim().to_string());
    if t.is_empty() {
        return Err(Error::internal(format!(
            "credential file {} is empty",
            path.display()
        )));
    }
    Ok(t)
}

impl Vault {
    /// Builds the HTTP client (HTTPS with the configured CA bundle only, or plain HTTP to
    /// loopback in dev mode). Does not contact Vault.
    pub fn new(cfg: VaultConfig) -> Result<Self> {
        let mut b = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.request_timeout.min(Duration::from_secs(3)))
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .no_proxy();
        if cfg.insecure_http {
            tracing::warn!(
                address = %cfg.address,
                "DEV MODE: talking to Vault over plain HTTP on loopback; never do this in production"
            );
        } else {
            let ca_path = cfg
                .ca_cert
                .as_ref()
                .ok_or_else(|| Error::internal("vault.ca_cert is required for https"))?;
            let pem = std::fs::read(ca_path)
                .map_err(|e| Error::internal(format!("{}: {e}", ca_path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::internal(format!("{}: {e}", ca_path.display())))?;
            b = b.tls_certs_only(certs).https_only(true);
        }
        let http = b
            .build()
            .map_err(|e| Error::internal(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            cfg,
            token: RwLock::new(None),
            login_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &VaultConfig {
        &self.cfg
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{}", self.cfg.address, path)
    }

    fn current_token(&self) -> Option<Arc<Token>> {
        match self.token.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_token(&self, t: Token) {
        let t = Some(Arc::new(t));
        match self.token.write() {
            Ok(mut g) => *g = t,
            Err(p) => *p.into_inner() = t,
        }
    }

    /// Sends one request; returns status and body bytes (kept in a zeroizing buffer).
    async fn send<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        token: Option<&Token>,
    ) -> Result<(StatusCode, Zeroizing<Vec<u8>>)> {
        let mut req = self.http.request(method.clone(), self.url(path));
        if let Some(t) = token {
            let mut hv = reqwest::header::HeaderValue::from_str(&t.0)
                .map_err(|_| Error::internal("Vault token contains invalid characters"))?;
            hv.set_sensitive(true);
            req = req.header("X-Vault-Token", hv);
        }
        if let Some(ns) = &self.cfg.namespace {
            req = req.header("X-Vault-Namespace", ns.as_str());
        }
        if let Some(b) = body {
            let bytes = Zeroizing::new(
                serde_json::to_vec(b).map_err(|e| Error::internal(format!("encode: {e}")))?,
            );
            req = req
                .header("Content-Type", "application/json")
                .body(bytes.to_vec());
        }
        let op = op_label(&method, path, &self.cfg);
        let started = std::time::Instant::now();
        let sent = req.send().await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                crate::metrics::vault_call(op, started.elapsed(), false);
                return Err(Error::unavailable(format!("Vault request {path}: {e}")));
            }
        };
        let status = resp.status();
        let bytes = resp.bytes().await;
        crate::metrics::vault_call(
            op,
            started.elapsed(),
            bytes.is_ok() && !status.is_server_error(),
        );
        let bytes = bytes.map_err(|e| Error::unavailable(format!("Vault response {path}: {e}")))?;
        Ok((status, Zeroizing::new(Vec::from(bytes))))
    }

    fn vault_error(path: &str, status: StatusCode, body: &[u8]) -> Error {
        // Vault error bodies are {"errors":[...]} and carry no secrets of ours.
        let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Error::unavailable(format!("Vault {path}: HTTP {status}: {text}"))
        } else {
            Error::internal(format!("Vault {path}: HTTP {status}: {text}"))
        }
    }

    /// An authenticated request. On 403 (token expired or revoked) logs in again once and
    /// retries. Returns `None` for 404.
    async fn call<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(StatusCode, Zeroizing<Vec<u8>>)> {
        let mut relogged = false;
        loop {
            let token = match self.current_token() {
                Some(t) => t,
                None => {
                    self.login().await?;
                    self.current_token()
                        .ok_or_else(|| Error::internal("no Vault token after login"))?
                }
            };
            let (status, bytes) = self.send(method.clone(), path, body, Some(&token)).await?;
            if status == StatusCode::FORBIDDEN && !relogged {
                relogged = true;
                tracing::warn!(path, "Vault answered 403; logging in again");
                self.relogin_if_unchanged(&token).await?;
                continue;
            }
            return Ok((status, bytes));
        }
    }

    async fn relogin_if_unchanged(&self, seen: &Arc<Token>) -> Result<()> {
        let _g = self.login_lock.lock().await;
        if let Some(cur) = self.current_token()
            && !Arc::ptr_eq(&cur, seen)
        {
            return Ok(()); // somebody else already logged in again
        }
        self.login_locked().await.map(|_| ())
    }

    /// Logs in with the configured method and stores the token.
    pub async fn login(&self) -> Result<()> {
        let _g = self.login_lock.lock().await;
        self.login_locked().await.map(|_| ())
    }

    async fn login_locked(&self) -> Result<Lease> {
        match &self.cfg.auth {
            VaultAuth::Approle {
                role_id_file,
                secret_id_file,
                mount,
            } => {
                let role_id = read_secret_file(role_id_file)?;
                let secret_id = read_secret_file(secret_id_file)?;
                let body = ApproleLogin {
                    role_id: &role_id,
                    secret_id: &secret_id,
                };
                let path = format!("auth/{mount}/login");
                let (status, bytes) = self.send(Method::POST, &path, Some(&body), None).await?;
                if !status.is_success() {
                    return Err(Self::vault_error(&path, status, &bytes));
                }
                let a: AuthBody = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::internal(format!("AppRole login response: {e}")))?;
                let lease = Lease {
                    ttl: Duration::from_secs(a.auth.lease_duration),
                    renewable: a.auth.renewable,
                };
                self.set_token(Token(a.auth.client_token));
                tracing::info!(
                    ttl_secs = lease.ttl.as_secs(),
                    "logged in to Vault with AppRole"
                );
                Ok(lease)
            }
            VaultAuth::TokenFile { token_file } => {
                let t = Token(read_secret_file(token_file)?);
                let lease = self.lookup_self(&t).await?;
                self.set_token(t);
                tracing::info!(
                    ttl_secs = lease.ttl.as_secs(),
                    "using Vault token from file"
                );
                Ok(lease)
            }
        }
    }

    async fn lookup_self(&self, t: &Token) -> Result<Lease> {
        let path = "auth/token/lookup-self";
        let (status, bytes) = self.send::<Value>(Method::GET, path, None, Some(t)).await?;
        if !status.is_success() {
            return Err(Self::vault_error(path, status, &bytes));
        }
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::internal(format!("lookup-self: {e}")))?;
        Ok(Lease {
            ttl: Duration::from_secs(v["data"]["ttl"].as_u64().unwrap_or(0)),
            renewable: v["data"]["renewable"].as_bool().unwrap_or(false),
        })
    }

    async fn renew_self(&self) -> Result<Lease> {
        let path = "auth/token/renew-self";
        let (status, bytes) = self.call(Method::POST, path, Some(&json!({}))).await?;
        if !status.is_success() {
            return Err(Self::vault_error(path, status, &bytes));
        }
        let a: AuthBody = serde_json::from_slice(&bytes)
            .map_err(|e| Error::internal(format!("renew-self: {e}")))?;
        Ok(Lease {
            ttl: Duration::from_secs(a.auth.lease_duration),
            renewable: a.auth.renewable,
        })
    }

    /// Keeps the token alive: renews at two thirds of its TTL and logs in again when renewal
    /// is impossible (not renewable, max TTL reached, revoked). Retries with backoff while
    /// Vault is down. A token with no TTL (root, dev) needs nothing.
    pub fn spawn_renewal(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let vault = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            let mut lease: Option<Lease> = None;
            loop {
                let current = match lease {
                    Some(l) => l,
                    None => {
                        let r = match vault.current_token() {
                            Some(t) => vault.lookup_self(&t).await,
                            None => {
                                let _g = vault.login_lock.lock().await;
                                vault.login_locked().await
                            }
                        };
                        match r {
                            Ok(l) => l,
                            Err(e) => {
                                tracing::warn!(error = %e, detail = ?e, "Vault token lookup failed; retrying");
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(30));
                                continue;
                            }
                        }
                    }
                };
                if current.ttl.is_zero() {
                    return; // non-expiring token
                }
                tokio::time::sleep((current.ttl * 2 / 3).max(Duration::from_secs(1))).await;
                let next = if current.renewable {
                    match vault.renew_self().await {
                        // Renewal that gives back much less than asked means max TTL is near.
                        Ok(l) if l.ttl >= current.ttl / 2 => Ok(l),
                        Ok(_) | Err(_) => {
                            let _g = vault.login_lock.lock().await;
                            vault.login_locked().await
                        }
                    }
                } else {
                    let _g = vault.login_lock.lock().await;
                    vault.login_locked().await
                };
                match next {
                    Ok(l) => {
                        backoff = Duration::from_secs(1);
                        lease = Some(l);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, detail = ?e, "Vault token renewal failed; retrying");
                        lease = None;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        })
    }

    /// Wraps `plaintext` with transit key `key`; returns Vault's `vault:vN:...` ciphertext.
    pub async fn transit_encrypt(&self, key: &str, plaintext: &[u8]) -> Result<String> {
        let path = format!("{}/encrypt/{key}", self.cfg.transit_mount);
        let b64 = Zeroizing::new(B64.encode(plaintext));
        let body = TransitPlaintext { plaintext: &b64 };
        let (status, bytes) = self.call(Method::POST, &path, Some(&body)).await?;
        if !status.is_success() {
            return Err(Self::vault_error(&path, status, &bytes));
        }
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::internal(format!("{path}: {e}")))?;
        v["data"]["ciphertext"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::internal(format!("{path}: no ciphertext in response")))
    }

    /// Signs `message` with transit RSA key `key`: RSA-PSS, SHA-256, salt length = hash length
    /// (so `openssl dgst -sha256 -sigopt rsa_padding_mode:pss` verifies it). Returns the key
    /// version and the raw signature bytes.
    pub async fn transit_sign(&self, key: &str, message: &[u8]) -> Result<(u32, Vec<u8>)> {
        let path = format!("{}/sign/{key}", self.cfg.transit_mount);
        let body = json!({
            "input": B64.encode(message),
            "hash_algorithm": "sha2-256",
            "signature_algorithm": "pss",
            "salt_length": "hash",
        });
        let (status, bytes) = self.call(Method::POST, &path, Some(&body)).await?;
        if !status.is_success() {
            return Err(Self::vault_error(&path, status, &bytes));
        }
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::internal(format!("{path}: {e}")))?;
        let sig = v["data"]["signature"]
            .as_str()
            .ok_or_else(|| Error::internal(format!("{path}: no signature")))?;
        parse_vault_blob(sig)
            .ok_or_else(|| Error::internal(format!("{path}: bad signature format")))
    }

    /// The PEM public keys of transit asymmetric key `key`, by key version.
    pub async fn transit_public_keys(&self, key: &str) -> Result<Vec<(u32, String)>> {
        let path = format!("{}/keys/{key}", self.cfg.transit_mount);
        let (status, bytes) = self.call::<Value>(Method::GET, &path, None).await?;
        if !status.is_success() {
            return Err(Self::vault_error(&path, status, &bytes));
        }
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::internal(format!("{path}: {e}")))?;
        let mut out: Vec<(u32, String)> = v["data"]["keys"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(ver, k)| {
                        Some((ver.parse().ok()?, k["public_key"].as_str()?.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|(v, _)| *v);
        if out.is_empty() {
            return Err(Error::internal(format!("{path}: no public key")));
        }
        Ok(out)
    }

    /// Unwraps a transit ciphertext. The result is zeroized on drop.
    pub async fn transit_decrypt(&self, key: &str, ciphertext: &str) -> Result<Zeroizing<Vec<u8>>> {
        #[derive(Deserialize)]
        struct Body {
            data: Data,
        }
        #[derive(Deserialize)]
        struct Data {
            plaintext: Zeroizing<String>,
        }
        let path = format!("{}/decrypt/{key}", self.cfg.transit_mount);
        let body = json!({ "ciphertext": ciphertext });
        let (status, bytes) = self.call(Method::POST, &path, Some(&body)).await?;
        if !status.is_success() {
            return Err(Self::vault_error(&path, status, &bytes));
        }
        let b: Body = serde_json::from_slice(&bytes)
            .map_err(|_| Error::internal(format!("{path}: unexpected response")))?;
        let mut out = Zeroizing::new(Vec::with_capacity(64));
        B64.decode_vec(b.data.plaintext.as_bytes(), &mut out)
            .map_err(|_| Error::internal(format!("{path}: plaintext is not base64")))?;
        Ok(out)
    }

    /// Reads a KV v2 secret (latest or a given version). `None` if it does not exist or that
    /// version was deleted/destroyed.
    pub async fn kv_read(&self, path: &str, version: Option<u32>) -> Result<Option<KvEntry>> {
        let mut p = format!("{}/data/{path}", self.cfg.kv_mount);
        if let Some(v) = version {
            p.push_str(&format!("?version={v}"));
        }
        let (status, bytes) = self.call::<Value>(Method::GET, &p, None).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Self::vault_error(&p, status, &bytes));
        }
        let mut v: Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::internal(format!("{p}: {e}")))?;
        let data = v["data"]["data"].take();
        if data.is_null() {
            return Ok(None);
        }
        let version = v["data"]["metadata"]["version"]
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| Error::internal(format!("{p}: no version in response")))?;
        Ok(Some(KvEntry { data, version }))
    }

    /// Writes a KV v2 secret if its current version is `cas` (0 = must not exist).
    pub async fn kv_write_cas(&self, path: &str, data: &Value, cas: u32) -> Result<CasOutcome> {
        let p = format!("{}/data/{path}", self.cfg.kv_mount);
        let body = json!({ "options": { "cas": cas }, "data": data });
        let (status, bytes) = self.call(Method::POST, &p, Some(&body)).await?;
        if status == StatusCode::BAD_REQUEST {
            let text = String::from_utf8_lossy(&bytes);
            if text.contains("check-and-set") {
                return Ok(CasOutcome::Mismatch);
            }
        }
        if !status.is_success() {
            return Err(Self::vault_error(&p, status, &bytes));
        }
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::internal(format!("{p}: {e}")))?;
        let version = v["data"]["version"]
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| Error::internal(format!("{p}: no version in response")))?;
        Ok(CasOutcome::Written(version))
    }

    /// Deletes a KV v2 secret's metadata: every version is destroyed. Idempotent.
    pub async fn kv_delete_metadata(&self, path: &str) -> Result<()> {
        let p = format!("{}/metadata/{path}", self.cfg.kv_mount);
        let (status, bytes) = self.call::<Value>(Method::DELETE, &p, None).await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(Self::vault_error(&p, status, &bytes))
        }
    }

    /// A request with an explicit token (bootstrap, dev setup). Returns status and JSON body
    /// (`Value::Null` for an empty body).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Result<(StatusCode, Value)> {
        let t = token.map(|t| Token(Zeroizing::new(t.to_string())));
        let (status, bytes) = self.send(method, path, body, t.as_ref()).await?;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Ok((status, v))
    }
}

/// A low-cardinality label for the metrics of one Vault request.
fn op_label(method: &Method, path: &str, cfg: &VaultConfig) -> &'static str {
    let under = |mount: &str, sub: &str| {
        path.strip_prefix(mount)
            .and_then(|r| r.strip_prefix('/'))
            .is_some_and(|r| r.starts_with(sub))
    };
    if path.starts_with("auth/") {
        "auth"
    } else if under(&cfg.transit_mount, "encrypt/") {
        "transit_encrypt"
    } else if under(&cfg.transit_mount, "decrypt/") {
        "transit_decrypt"
    } else if under(&cfg.transit_mount, "sign/") {
        "transit_sign"
    } else if under(&cfg.kv_mount, "metadata/") && *method == Method::DELETE {
        "kv_destroy"
    } else if under(&cfg.kv_mount, "data/") && *method == Method::GET {
        "kv_read"
    } else if under(&cfg.kv_mount, "data/") {
        "kv_write"
    } else {
        "other"
    }
}

/// Parses Vault's `vault:vN:<base64>` into the version and the bytes.
pub fn parse_vault_blob(s: &str) -> Option<(u32, Vec<u8>)> {
    let rest = s.strip_prefix("vault:v")?;
    let (ver, b64) = rest.split_once(':')?;
    Some((ver.parse().ok()?, B64.decode(b64).ok()?))
}
