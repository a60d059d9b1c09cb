//! The Vault/OpenBao client: exactly the calls piiguard makes, through vaultrs 0.8.
//!
//! - vaultrs: AppRole login, token `lookup-self` and `renew-self`, transit encrypt/decrypt
//!   (wrapping and unwrapping data keys: the one bridge between [`Dek`] and [`WrappedDek`],
//!   see [`crate::secret`]), transit key read (public keys), KV v2 read, check-and-set write
//!   and metadata delete.
//! - Our endpoints on vaultrs' `exec_with_result` ([`endpoints`]): what vaultrs lacks, transit
//!   sign with a PSS `salt_length`, and raw admin requests for bootstrap and dev setup; with
//!   the service's token, transit RSA decrypt in `batch_input` form (sealed envelopes), the
//!   read, rotate and config of the RSA keys, and KEK administration (key info, rotate,
//!   config), batch rewrap and KV list in [`kek`].
//! - Ours around it: the HTTP client (built here and handed to vaultrs: HTTPS with the CA
//!   bundle only, plain HTTP only to loopback with the dev flag, **no redirects**, no proxy),
//!   the token (kept in a [`Session`], wiped on drop), logging in again once on 403, the
//!   renewal task, metrics per call, and the mapping of errors.
//!
//! Secrets in responses: vaultrs parses into plain `String`s; a transit plaintext or a token is
//! moved into a zeroizing owner in the statement that receives it. The response bytes inside
//! rustify/reqwest are not wiped (neither were reqwest's before vaultrs).
//!
//! Redirects (security finding 10): the token travels in `X-Vault-Token`, a header reqwest does
//! not strip when it follows a redirect, so a Vault (or anything at its address) answering 307
//! to another host would receive the token there. The client follows none: a 3xx is an error
//! (with several addresses: "try the next configured node", below).
//!
//! Several nodes (`vault.addresses`, Vault HA, docs/OPERATIONS.md#vault-ha): one HTTP client,
//! one vaultrs client per node, all sending the same token (a Raft cluster replicates tokens).
//! Every request goes to the current node, which sticks until it fails (no round robin). A
//! failure another node may not have, no answer (connection refused or reset, timeout), a 5xx
//! (sealed, not active, forwarding to a lost leader failed) or a redirect (a standby pointing at
//! the active node, possibly a dead one), moves the current node to the next address and the
//! request is sent there (`Vault::on_nodes`): each node at most once per call, and no new
//! attempt once `vault.request_timeout` has passed since the call began, so a call still takes
//! at most twice the request timeout (what KEK retirement's settle time assumes). A redirect is
//! never followed: the token goes only to configured addresses. Login (AppRole), token lookup
//! and renewal, and the raw set-up requests fail over the same way. Switches are counted
//! (`piiguard_vault_failovers_total`, `piiguard_vault_node`) and logged at warn with both
//! addresses, at most once a second.
//!
//! A request retried on another node may have been applied by the first (its answer lost), so
//! every request piiguard sends must be safe to repeat:
//! - transit encrypt (wrap) and sign make a new ciphertext or signature; the first is
//!   discarded unseen. Transit decrypt (unwrap, RSA batch), key reads, KV reads and lists, token
//!   lookup: reads.
//! - transit rewrap: a new ciphertext of the same key; the KV write that stores it is a
//!   check-and-set.
//! - KV check-and-set write: a repeat of an applied write finds the version taken; the version
//!   is then read back and, if it holds exactly the data sent, reported as written
//!   ([`Vault::kv_write_cas`]), never as a lost race (whose loser deletes the record it wrote).
//! - KV metadata delete (shred) and key config: idempotent. Token renewal: extends the same
//!   lease again.
//! - AppRole login: a repeat makes a second token; the first, never used, expires with its TTL
//!   (with a secret id limited in uses, a lost answer costs one use).
//! - transit key rotate (admin): a repeat makes one more version than asked; the newest is used
//!   and older ones keep decrypting until retired, so nothing is lost.
//!
//! Errors: a connection failure, timeout, 5xx, 429 or a sealed Vault is [`Error::Unavailable`]
//! (retryable); anything else unexpected is [`Error::Internal`]. Messages carry Vault's own
//! error texts (which never contain our secrets) but never a response body that could carry a
//! plaintext; they are logged by the caller's correlation id and never returned to a gRPC
//! client.

pub mod admission;
pub mod endpoints;
pub mod kek;
pub mod signer;

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::{Method, StatusCode};
use rustify::endpoint::Endpoint as _;
use serde_json::Value;
use vaultrs::api::EndpointMiddleware;
use vaultrs::api::kv2::requests::{ReadSecretRequest, SetSecretRequestOptions};
use vaultrs::api::transit::responses::ReadKeyData;
use vaultrs::client::{VaultClient, VaultClientSettings};
use vaultrs::error::ClientError;
use zeroize::{Zeroize, Zeroizing};

use crate::config::{VaultAuth, VaultConfig};
use crate::error::{Error, Result};
use crate::secret::{Dek, WrappedDek};

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
    /// The secret's `data` object.
    pub data: Value,
    /// The version read.
    pub version: u32,
}

/// Lease information of the current token.
#[derive(Debug, Clone, Copy)]
struct Lease {
    ttl: Duration,
    renewable: bool,
}

/// One Vault token and the vaultrs client that sends it to one node (in its middleware, as
/// `X-Vault-Token`). The token is wiped when the session is dropped; a session without a
/// token sends none (login, unauthenticated dev calls).
struct Session {
    client: VaultClient,
}

/// One token and a [`Session`] for each configured node (in `vault.addresses` order): the
/// token is replicated in a Raft cluster, so every node takes it.
struct Sessions {
    nodes: Vec<Arc<Session>>,
}

impl Sessions {
    fn node(&self, i: usize) -> Arc<Session> {
        self.nodes[i % self.nodes.len()].clone()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.client.middle.token.zeroize();
        self.client.settings.token.zeroize();
    }
}

/// The client. Cheap to share behind an `Arc`.
pub struct Vault {
    http: reqwest::Client,
    /// The nodes, in `vault.addresses` order.
    nodes: Vec<url::Url>,
    /// The index of the node every request goes to, until it fails ([`Vault::fail_over`]).
    current: AtomicUsize,
    /// Fail-over warnings: at most one a second (a Vault outage under load switches often).
    switch_log: SwitchLog,
    cfg: VaultConfig,
    session: RwLock<Option<Arc<Sessions>>>,
    login_lock: tokio::sync::Mutex<()>,
    /// Made by [`with_token`](Self::with_token): the token is given, never logged in again.
    fixed_token: bool,
    /// The bound on requests in flight (`vault.max_in_flight`), shared by clones.
    admission: admission::Admission,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("addresses", &self.cfg.addresses)
            .finish_non_exhaustive()
    }
}

/// What went wrong in one call, before it becomes an [`Error`]: callers look at the HTTP
/// status first (404 = absent, 400 check-and-set = mismatch).
enum CallError {
    /// vaultrs (or rustify under it) failed or Vault answered an error status.
    Client(ClientError),
    /// Our side failed (login, credentials).
    Local(Error),
    /// Every node tried answered a redirect or failed (several addresses): no node serves.
    NoNode(ClientError),
}

/// The HTTP status of a Vault error answer, if it was one.
fn status_of(e: &ClientError) -> Option<u16> {
    match e {
        ClientError::APIError { code, .. } => Some(*code),
        ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code, .. },
        } => Some(*code),
        _ => None,
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl CallError {
    fn status(&self) -> Option<u16> {
        match self {
            CallError::Client(e) => status_of(e),
            CallError::Local(_) | CallError::NoNode(_) => None,
        }
    }

    /// Vault's error texts (`{"errors": [...]}`), joined.
    fn vault_errors(&self) -> String {
        match self {
            CallError::Client(ClientError::APIError { errors, .. }) => errors.join("; "),
            _ => String::new(),
        }
    }

    /// Our error for a failed `what`. Never includes a response body that is not Vault's error
    /// list (a body that failed to parse may be a plaintext).
    fn into_error(self, what: &str) -> Error {
        let e = match self {
            CallError::Local(e) => return e,
            CallError::NoNode(e) => {
                return Error::unavailable(format!(
                    "Vault {what}: no node served (every address tried; the last answered HTTP {})",
                    status_of(&e).unwrap_or(0)
                ));
            }
            CallError::Client(e) => e,
        };
        if let Some(code) = status_of(&e) {
            let detail = match &e {
                ClientError::APIError { errors, .. } => {
                    truncate(&errors.join("; "), 512).to_string()
                }
                _ if (300..400).contains(&code) => {
                    "a redirect, which piiguard never follows (set vault.address to the node \
                     that serves, e.g. the active node or the load balancer)"
                        .to_string()
                }
                _ => String::new(),
            };
            let msg = format!("Vault {what}: HTTP {code}: {detail}");
            return if code >= 500 || code == 429 {
                Error::unavailable(msg)
            } else {
                Error::internal(msg)
            };
        }
        use rustify::errors::ClientError as Rest;
        match e {
            ClientError::RestClientError {
                source: Rest::RequestError { source, .. } | Rest::ResponseError { source },
            } => Error::unavailable(format!("Vault {what}: {source:#}")),
            ClientError::RestClientError {
                source:
                    Rest::ResponseParseError { .. }
                    | Rest::ResponseConversionError { .. }
                    | Rest::DataParseError { .. },
            }
            | ClientError::JsonParseError { .. } => {
                Error::internal(format!("Vault {what}: unexpected response"))
            }
            ClientError::ResponseEmptyError | ClientError::ResponseDataEmptyError => {
                Error::internal(format!("Vault {what}: empty response"))
            }
            other => Error::internal(format!("Vault {what}: {other}")),
        }
    }
}

/// Rate limit of the fail-over warning: one a second, with the number of switches made since
/// the last one logged (every switch is counted in `piiguard_vault_failovers_total`).
#[derive(Default)]
struct SwitchLog {
    last: std::sync::Mutex<Option<Instant>>,
    unlogged: std::sync::atomic::AtomicU64,
}

impl SwitchLog {
    /// `Some(switches not logged since the last warning)` if this switch is to be logged.
    fn due(&self) -> Option<u64> {
        let mut last = match self.last.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(Instant::now());
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }
}

/// Whether a failed attempt is tried again on the next node: no answer (connection refused
/// or reset, timeout, a broken response), a 5xx (sealed, not active, no leader, forwarding
/// failed, or a proxy in front of a dead node) or a redirect (a standby pointing at the
/// active node: never followed, see the module doc). Anything else is the answer.
fn fails_over(e: &ClientError) -> bool {
    use rustify::errors::ClientError as Rest;
    match status_of(e) {
        Some(code) => code >= 500 || (300..400).contains(&code),
        None => matches!(
            e,
            ClientError::RestClientError {
                source: Rest::RequestError { .. } | Rest::ResponseError { .. }
            }
        ),
    }
}

/// What made a node fail, for the fail-over warning: a status or the kind of transport error
/// (never a response body).
fn failure_kind(e: &ClientError) -> String {
    match status_of(e) {
        Some(code) => format!("HTTP {code}"),
        None => "no answer (connection or timeout)".to_string(),
    }
}

/// Parses and checks one Vault address (again: the config checked it first, and this is
/// where the token goes).
fn node_url(raw: &str, insecure_http: bool) -> Result<url::Url> {
    let (address, insecure) =
        crate::config::vault_address(raw, insecure_http).map_err(|e| Error::internal(e.0))?;
    if insecure != insecure_http {
        return Err(Error::internal(format!(
            "vault address {address:?} does not match vault.insecure_http"
        )));
    }
    url::Url::parse(&address)
        .map_err(|e| Error::internal(format!("vault address {address:?}: {e}")))
}

/// Times one call (one attempt on one node) into the Vault metrics. "ok" = a success or a
/// 4xx answer.
async fn timed<T>(
    op: &'static str,
    fut: impl Future<Output = std::result::Result<T, ClientError>>,
) -> std::result::Result<T, ClientError> {
    let started = Instant::now();
    let r = fut.await;
    // A 4xx is an answer (absent, check-and-set mismatch); a redirect is a node not serving.
    let ok = match &r {
        Ok(_) => true,
        Err(e) => status_of(e).is_some_and(|s| (400..500).contains(&s)),
    };
    crate::metrics::vault_call(op, started.elapsed(), ok);
    r
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
    /// loopback in dev mode; never following redirects). Does not contact Vault.
    pub fn new(cfg: VaultConfig) -> Result<Self> {
        if cfg.addresses.is_empty() {
            return Err(Error::internal("no Vault address"));
        }
        let nodes = cfg
            .addresses
            .iter()
            .map(|a| node_url(a, cfg.insecure_http))
            .collect::<Result<Vec<_>>>()?;
        let insecure = cfg.insecure_http;
        let mut b = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.request_timeout.min(Duration::from_secs(3)))
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if insecure {
            tracing::warn!(
                addresses = ?cfg.addresses,
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
        let cfg_admission = cfg.admission;
        Ok(Self {
            http,
            nodes,
            current: AtomicUsize::new(0),
            switch_log: SwitchLog::default(),
            cfg,
            session: RwLock::new(None),
            login_lock: tokio::sync::Mutex::new(()),
            fixed_token: false,
            admission: admission::Admission::new(cfg_admission),
        })
    }

    /// A client for the same Vault that uses `token` (an operator's, for bootstrap) instead of
    /// logging in; it never logs in again and runs no renewal.
    pub fn with_token(&self, token: &str) -> Self {
        let s = self.new_sessions(Zeroizing::new(token.trim().to_string()));
        Self {
            http: self.http.clone(),
            nodes: self.nodes.clone(),
            current: AtomicUsize::new(self.current_node()),
            switch_log: SwitchLog::default(),
            cfg: self.cfg.clone(),
            session: RwLock::new(Some(Arc::new(s))),
            login_lock: tokio::sync::Mutex::new(()),
            fixed_token: true,
            admission: self.admission.clone(),
        }
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &VaultConfig {
        &self.cfg
    }

    /// A session on every node, each sending `token` (none if empty).
    fn new_sessions(&self, token: Zeroizing<String>) -> Sessions {
        Sessions {
            nodes: (0..self.nodes.len())
                .map(|i| Arc::new(self.new_session(i, token.clone())))
                .collect(),
        }
    }

    /// A vaultrs client of node `node` over our HTTP client, sending `token` (none if empty).
    fn new_session(&self, node: usize, mut token: Zeroizing<String>) -> Session {
        let address = &self.nodes[node];
        let settings = VaultClientSettings {
            address: address.clone(),
            ca_certs: Vec::new(),
            identity: None,
            timeout: Some(self.cfg.request_timeout),
            // The middleware holds the one copy that is sent.
            token: String::new(),
            verify: true,
            version: 1,
            wrapping: false,
            namespace: self.cfg.namespace.clone(),
            proxy: None,
        };
        let middle = EndpointMiddleware {
            // Moves the string out of its zeroizing owner (no copy); `Session` wipes it.
            token: std::mem::take(&mut *token),
            version: "v1".into(),
            wrap: None,
            namespace: self.cfg.namespace.clone(),
        };
        Session {
            client: VaultClient {
                http: rustify::clients::reqwest::Client::new(
                    address.as_str().trim_end_matches('/'),
                    self.http.clone(),
                ),
                middle,
                settings,
            },
        }
    }

    fn current_session(&self) -> Option<Arc<Sessions>> {
        match self.session.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_session(&self, s: Arc<Sessions>) {
        match self.session.write() {
            Ok(mut g) => *g = Some(s),
            Err(p) => *p.into_inner() = Some(s),
        }
    }

    async fn session_or_login(&self) -> Result<Arc<Sessions>> {
        if let Some(s) = self.current_session() {
            return Ok(s);
        }
        if self.fixed_token {
            return Err(Error::internal("Vault client without a token"));
        }
        self.login().await?;
        self.current_session()
            .ok_or_else(|| Error::internal("no Vault token after login"))
    }

    /// An authenticated call: `f` runs with the current session, on the current node (failing
    /// over to the next ones, see [`on_nodes`](Self::on_nodes)); on 403 (token expired or
    /// revoked) logs in again once and retries.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> std::result::Result<T, CallError>
    where
        F: Fn(Arc<Session>) -> Fut,
        Fut: Future<Output = std::result::Result<T, ClientError>>,
    {
        // One place under vault.max_in_flight for the whole call (a login again included).
        let _place = self.admission.enter(op).await.map_err(CallError::Local)?;
        let started = Instant::now();
        let mut relogged = false;
        loop {
            let s = self.session_or_login().await.map_err(CallError::Local)?;
            let r = self
                .on_nodes(started, |node| timed(op, f(s.node(node))))
                .await;
            match r {
                Err(e) if status_of(&e) == Some(403) && !relogged && !self.fixed_token => {
                    relogged = true;
                    tracing::warn!(op, "Vault answered 403; logging in again");
                    self.relogin_if_unchanged(&s)
                        .await
                        .map_err(CallError::Local)?;
                }
                r => return r.map_err(|e| self.failed(e)),
            }
        }
    }

    /// The index of the node requests go to now.
    fn current_node(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.nodes.len()
    }

    /// Runs `attempt` on the current node and, when it fails in a way another node may not
    /// ([`fails_over`]), on the next nodes in `vault.addresses` order: each node at most once,
    /// and no new attempt once `vault.request_timeout` has passed since `started` (so a call
    /// takes at most twice the request timeout, as with one node and a login retry). Returns
    /// the first answer that is not a fail-over, or the last failure.
    async fn on_nodes<T, Fut>(
        &self,
        started: Instant,
        attempt: impl Fn(usize) -> Fut,
    ) -> std::result::Result<T, ClientError>
    where
        Fut: Future<Output = std::result::Result<T, ClientError>>,
    {
        let n = self.nodes.len();
        let mut node = self.current_node();
        let mut tried = 1;
        loop {
            match attempt(node).await {
                Err(e) if n > 1 && fails_over(&e) => {
                    let next = self.fail_over(node, &e);
                    if tried >= n || started.elapsed() >= self.cfg.request_timeout {
                        return Err(e);
                    }
                    node = next;
                    tried += 1;
                }
                r => return r,
            }
        }
    }

    /// Node `from` failed with `e`: moves the current node to the next one, unless another
    /// call already moved it (then only one warning and one count per switch). Returns the
    /// node this call tries next. The address is logged, never the request or the token.
    fn fail_over(&self, from: usize, e: &ClientError) -> usize {
        let to = (from + 1) % self.nodes.len();
        if self
            .current
            .compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            crate::metrics::vault_failover(to);
            if let Some(unlogged) = self.switch_log.due() {
                tracing::warn!(
                    from = %self.nodes[from],
                    to = %self.nodes[to],
                    cause = %failure_kind(e),
                    unlogged_switches = unlogged,
                    "Vault node failed; switching to the next address"
                );
            }
        }
        to
    }

    /// The error of a call that failed on every node it tried: a redirect from the last node
    /// is a node that does not serve (a standby, an old leader), so UNAVAILABLE when there are
    /// several nodes; with one address it stays a configuration error.
    fn failed(&self, e: ClientError) -> CallError {
        match status_of(&e) {
            Some(code) if self.nodes.len() > 1 && (300..400).contains(&code) => {
                CallError::NoNode(e)
            }
            _ => CallError::Client(e),
        }
    }

    async fn relogin_if_unchanged(&self, seen: &Arc<Sessions>) -> Result<()> {
        let _g = self.login_lock.lock().await;
        if let Some(cur) = self.current_session()
            && !Arc::ptr_eq(&cur, seen)
        {
            return Ok(()); // somebody else already logged in again
        }
        self.login_locked().await.map(|_| ())
    }

    /// Logs in with the configured method and stores the token.
    pub async fn login(&self) -> Result<()> {
        if self.fixed_token {
            return Ok(());
        }
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
                let anonymous = self.new_sessions(Zeroizing::default());
                let (role_id, secret_id): (&str, &str) = (&role_id, &secret_id);
                let mut auth = self
                    .on_nodes(Instant::now(), |node| {
                        let s = anonymous.node(node);
                        timed("auth", async move {
                            vaultrs::auth::approle::login(&s.client, mount, role_id, secret_id)
                                .await
                        })
                    })
                    .await
                    .map_err(|e| self.failed(e).into_error("AppRole login"))?;
                let token = Zeroizing::new(std::mem::take(&mut auth.client_token));
                let lease = Lease {
                    ttl: Duration::from_secs(auth.lease_duration),
                    renewable: auth.renewable,
                };
                self.set_session(Arc::new(self.new_sessions(token)));
                tracing::info!(
                    ttl_secs = lease.ttl.as_secs(),
                    "logged in to Vault with AppRole"
                );
                Ok(lease)
            }
            VaultAuth::TokenFile { token_file } => {
                let s = Arc::new(self.new_sessions(read_secret_file(token_file)?));
                let lease = self.lookup_self(&s).await?;
                self.set_session(s);
                tracing::info!(
                    ttl_secs = lease.ttl.as_secs(),
                    "using Vault token from file"
                );
                Ok(lease)
            }
        }
    }

    async fn lookup_self(&self, s: &Sessions) -> Result<Lease> {
        let mut r = self
            .on_nodes(Instant::now(), |node| {
                let s = s.node(node);
                timed("auth", async move {
                    vaultrs::token::lookup_self(&s.client).await
                })
            })
            .await
            .map_err(|e| self.failed(e).into_error("token lookup-self"))?;
        // The answer repeats the token itself.
        r.id.zeroize();
        Ok(Lease {
            ttl: Duration::from_secs(r.ttl),
            renewable: r.renewable.unwrap_or(false),
        })
    }

    async fn renew_self(&self) -> Result<Lease> {
        let mut a = self
            .call("auth", |s| async move {
                vaultrs::token::renew_self(&s.client, None).await
            })
            .await
            .map_err(|e| e.into_error("token renew-self"))?;
        a.client_token.zeroize();
        Ok(Lease {
            ttl: Duration::from_secs(a.lease_duration),
            renewable: a.renewable,
        })
    }

    /// Keeps the token alive: renews at two thirds of its TTL and logs in again when renewal
    /// is impossible (not renewable, max TTL reached, revoked). Retries with backoff while
    /// Vault is down. A token with no TTL (root, dev) needs nothing.
    pub fn spawn_renewal(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let vault = self.clone();
        tokio::spawn(async move {
            if vault.fixed_token {
                return;
            }
            let mut backoff = Duration::from_secs(1);
            let mut lease: Option<Lease> = None;
            loop {
                let current = match lease {
                    Some(l) => l,
                    None => {
                        let r = match vault.current_session() {
                            Some(s) => vault.lookup_self(&s).await,
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

    /// Wraps `dek` with transit key `kek`: the only way a [`WrappedDek`] is made from a
    /// [`Dek`] (see [`crate::secret`]).
    pub async fn wrap_dek(&self, kek: &str, dek: &Dek) -> Result<WrappedDek> {
        let mount = self.cfg.transit_mount.as_str();
        let plaintext = dek.to_transit_plaintext();
        let pt: &str = &plaintext;
        let r = self
            .call("transit_encrypt", |s| async move {
                vaultrs::transit::data::encrypt(&s.client, mount, kek, pt, None).await
            })
            .await
            .map_err(|e| e.into_error(&format!("transit encrypt with {kek}")))?;
        WrappedDek::parse(r.ciphertext)
            .map_err(|e| Error::internal(format!("transit encrypt with {kek}: Vault answered {e}")))
    }

    /// Wraps many DEKs with transit key `kek` in `batch_input` calls (chunks of
    /// [`TRANSIT_BATCH_CHUNK`]), the batch form of [`wrap_dek`](Self::wrap_dek): one result
    /// per DEK, in order. A failed item fails only itself; a failed call fails its chunk.
    /// The request body's plaintexts are wiped after the call.
    pub async fn wrap_deks(&self, kek: &str, deks: &[&Dek]) -> Vec<Result<WrappedDek>> {
        let path = format!("{}/encrypt/{kek}", self.cfg.transit_mount);
        let what = format!("transit encrypt with {kek}");
        let mut out = Vec::with_capacity(deks.len());
        for chunk in deks.chunks(TRANSIT_BATCH_CHUNK) {
            let batch: Vec<Value> = chunk
                .iter()
                .map(|d| {
                    let pt = d.to_transit_plaintext();
                    serde_json::json!({ "plaintext": pt.as_str() })
                })
                .collect();
            let mut body = serde_json::json!({
                "batch_input": batch,
                "partial_failure_response_code": 200,
            });
            let answer = self
                .service_raw(
                    "transit_encrypt_batch",
                    rustify::enums::RequestMethod::POST,
                    &path,
                    Some(&body),
                )
                .await;
            wipe_plaintexts(&mut body);
            let (status, body) = match answer {
                Ok(a) => a,
                Err(e) => {
                    let e = key_call_error(e, &what);
                    out.extend(chunk.iter().map(|_| Err(e.clone())));
                    continue;
                }
            };
            // Vault's own trouble (5xx, 429: sealed, overloaded, restarting) is retryable, as
            // for every other Vault request; any other refusal is not.
            let vault_side = status >= 500 || status == 429;
            let failed = |msg: String| {
                if vault_side {
                    Error::unavailable(msg)
                } else {
                    Error::internal(msg)
                }
            };
            match body["data"]["batch_results"].as_array() {
                Some(results) if results.len() == chunk.len() => {
                    out.extend(results.iter().map(|r| {
                        if let Some(e) = r
                            .get("error")
                            .and_then(Value::as_str)
                            .filter(|e| !e.is_empty())
                        {
                            return Err(failed(format!("{what}: {}", truncate(e, 256))));
                        }
                        r.get("ciphertext")
                            .and_then(Value::as_str)
                            .ok_or_else(|| Error::internal(format!("{what}: no ciphertext")))
                            .and_then(|c| {
                                WrappedDek::parse(c.to_string()).map_err(|e| {
                                    Error::internal(format!("{what}: Vault answered {e}"))
                                })
                            })
                    }));
                }
                _ => {
                    let errors = body["errors"].to_string();
                    let e = if errors.contains("not found") && !vault_side {
                        key_missing(kek)
                    } else {
                        failed(format!("{what}: HTTP {status}: {}", truncate(&errors, 512)))
                    };
                    out.extend(chunk.iter().map(|_| Err(e.clone())));
                }
            }
        }
        out
    }

    /// Unwraps `wrapped` with transit key `kek`: the only way a [`Dek`] is made from a
    /// [`WrappedDek`] (see [`crate::secret`]). The plaintext leaves vaultrs' response in the
    /// statement that receives it.
    pub async fn unwrap_dek(&self, kek: &str, wrapped: &WrappedDek) -> Result<Dek> {
        let mount = self.cfg.transit_mount.as_str();
        let ct = wrapped.as_str();
        let r = self
            .call("transit_decrypt", |s| async move {
                vaultrs::transit::data::decrypt(&s.client, mount, kek, ct, None).await
            })
            .await
            .map_err(|e| e.into_error(&format!("transit decrypt with {kek}")))?;
        Dek::from_transit_plaintext(Zeroizing::new(r.plaintext))
            .map_err(|e| Error::internal(format!("transit decrypt with {kek}: {e}")))
    }

    /// Signs `message` with transit RSA key `key`: RSA-PSS, SHA-256, salt length = hash length
    /// (so `openssl dgst -sha256 -sigopt rsa_padding_mode:pss` verifies it). Returns the key
    /// version and the raw signature bytes. A custom endpoint: vaultrs cannot send
    /// `salt_length`.
    pub async fn transit_sign(&self, key: &str, message: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mount = self.cfg.transit_mount.as_str();
        let input = B64.encode(message);
        let input: &str = &input;
        let what = format!("transit sign with {key}");
        let r = self
            .call("transit_sign", |s| async move {
                let e = endpoints::SignPss::new(mount, key, input.to_string());
                vaultrs::api::exec_with_result(&s.client, e).await
            })
            .await
            .map_err(|e| e.into_error(&what))?;
        parse_vault_blob(&r.signature)
            .ok_or_else(|| Error::internal(format!("{what}: bad signature format")))
    }

    /// The PEM public keys of transit asymmetric key `key`, by key version, oldest first.
    pub async fn transit_public_keys(&self, key: &str) -> Result<Vec<(u32, String)>> {
        let mount = self.cfg.transit_mount.as_str();
        let what = format!("transit key {key}");
        let r = self
            .call("other", |s| async move {
                vaultrs::transit::key::read(&s.client, mount, key).await
            })
            .await
            .map_err(|e| e.into_error(&what))?;
        let mut out: Vec<(u32, String)> = match r.keys {
            ReadKeyData::Asymmetric(m) => m
                .into_iter()
                .filter_map(|(ver, k)| Some((ver.parse().ok()?, k.public_key)))
                .collect(),
            ReadKeyData::Symmetric(_) => Vec::new(),
        };
        out.sort_by_key(|(v, _)| *v);
        if out.is_empty() {
            return Err(Error::internal(format!("{what}: no public key")));
        }
        Ok(out)
    }

    /// A request with the service's token (logging in again once on 403): `method` on `path`
    /// (after `/v1/`). Answers below 500 other than 403, and a 500 that carries transit
    /// `batch_results`, come back as status and JSON body (`Value::Null` if empty); the rest is
    /// an error.
    async fn service_raw(
        &self,
        op: &'static str,
        method: rustify::enums::RequestMethod,
        path: &str,
        body: Option<&Value>,
    ) -> std::result::Result<(u16, Value), CallError> {
        self.call(op, |s| {
            let method = method.clone();
            async move {
                let e = endpoints::Raw { method, path, body };
                let json = |b: &[u8]| serde_json::from_slice(b).unwrap_or(Value::Null);
                match e
                    .with_middleware(&s.client.middle)
                    .exec(&s.client.http)
                    .await
                {
                    Ok(resp) => Ok((resp.response.status().as_u16(), json(resp.response.body()))),
                    // OpenBao answers a transit batch whose every item failed with 400, or
                    // with 500 if they failed in the cipher (a bad RSA ciphertext): per-item
                    // answers all the same.
                    Err(rustify::errors::ClientError::ServerResponseError { code, content })
                        if (code < 500 && code != 403)
                            || (code == 500
                                && content
                                    .as_deref()
                                    .is_some_and(|c| c.contains("\"batch_results\""))) =>
                    {
                        Ok((
                            code,
                            content.map(|c| json(c.as_bytes())).unwrap_or(Value::Null),
                        ))
                    }
                    Err(e) => Err(ClientError::RestClientError { source: e }),
                }
            }
        })
        .await
    }

    /// Versions, validity and public keys of transit asymmetric key `key`; `None` if the key
    /// does not exist.
    pub async fn transit_key_info(&self, key: &str) -> Result<Option<TransitKeyInfo>> {
        let path = format!("{}/keys/{key}", self.cfg.transit_mount);
        let what = format!("transit key read {key}");
        let (status, body) = self
            .service_raw("other", rustify::enums::RequestMethod::GET, &path, None)
            .await
            .map_err(|e| key_call_error(e, &what))?;
        if status == 404 {
            return Ok(None);
        }
        if !(200..300).contains(&status) {
            return Err(Error::internal(format!("{what}: HTTP {status}")));
        }
        let d = &body["data"];
        let num = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        let bad = || Error::internal(format!("{what}: unexpected response"));
        let latest_version = num(&d["latest_version"]).ok_or_else(bad)?;
        let min_decryption_version = num(&d["min_decryption_version"]).ok_or_else(bad)?;
        let mut versions = Vec::new();
        if let Some(m) = d["keys"].as_object() {
            for (ver, k) in m {
                let (Ok(version), Some(pem)) = (ver.parse::<u32>(), k["public_key"].as_str())
                else {
                    continue;
                };
                versions.push(TransitPublicKey {
                    version,
                    public_key_pem: pem.to_string(),
                    creation_time: k["creation_time"].as_str().unwrap_or_default().to_string(),
                });
            }
        }
        versions.sort_by_key(|k| k.version);
        Ok(Some(TransitKeyInfo {
            latest_version,
            min_decryption_version,
            versions,
        }))
    }

    /// Makes a new version of transit key `key`; returns the new latest version.
    pub async fn transit_rotate(&self, key: &str) -> Result<u32> {
        let path = format!("{}/keys/{key}/rotate", self.cfg.transit_mount);
        let what = format!("transit key rotate {key}");
        let (status, _) = self
            .service_raw("other", rustify::enums::RequestMethod::POST, &path, None)
            .await
            .map_err(|e| key_call_error(e, &what))?;
        if status == 404 || status == 400 {
            return Err(key_missing(key));
        }
        if !(200..300).contains(&status) {
            return Err(Error::internal(format!("{what}: HTTP {status}")));
        }
        self.transit_key_info(key)
            .await?
            .map(|i| i.latest_version)
            .ok_or_else(|| key_missing(key))
    }

    /// Sets transit key `key`'s minimum decryption version (retires older versions).
    pub async fn transit_set_min_decryption_version(&self, key: &str, version: u32) -> Result<()> {
        let path = format!("{}/keys/{key}/config", self.cfg.transit_mount);
        let what = format!("transit key config {key}");
        let body = serde_json::json!({ "min_decryption_version": version });
        let (status, body) = self
            .service_raw(
                "other",
                rustify::enums::RequestMethod::POST,
                &path,
                Some(&body),
            )
            .await
            .map_err(|e| key_call_error(e, &what))?;
        if (200..300).contains(&status) {
            return Ok(());
        }
        let errors = body["errors"].to_string();
        if errors.contains("not found") {
            return Err(key_missing(key));
        }
        Err(Error::internal(format!(
            "{what}: HTTP {status}: {}",
            truncate(&errors, 512)
        )))
    }

    /// RSA-OAEP-SHA256 decrypt with transit key `key`, many at once (`batch_input`, chunks of
    /// [`TRANSIT_BATCH_CHUNK`]): `items` are (key version, RSA ciphertext); one result per item.
    /// Always the batch form, even for one item: OpenBao answers a bad RSA ciphertext sent
    /// alone with HTTP 500, in a batch with a per-item error.
    pub async fn transit_rsa_decrypt(
        &self,
        key: &str,
        items: &[(u32, &[u8])],
    ) -> Result<Vec<std::result::Result<Zeroizing<Vec<u8>>, TransitItemError>>> {
        let path = format!("{}/decrypt/{key}", self.cfg.transit_mount);
        let what = format!("transit decrypt with {key}");
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(TRANSIT_BATCH_CHUNK) {
            let batch: Vec<Value> = chunk
                .iter()
                .map(|(v, c)| serde_json::json!({"ciphertext": format!("vault:v{v}:{}", B64.encode(c))}))
                .collect();
            let body = serde_json::json!({
                "batch_input": batch,
                "partial_failure_response_code": 200,
            });
            let (status, mut body) = self
                .service_raw(
                    "transit_decrypt",
                    rustify::enums::RequestMethod::POST,
                    &path,
                    Some(&body),
                )
                .await
                .map_err(|e| key_call_error(e, &what))?;
            let results = body["data"]["batch_results"].as_array_mut();
            let results = match results {
                Some(r) if r.len() == chunk.len() => r,
                _ => {
                    let errors = body["errors"].to_string();
                    if errors.contains("not found") {
                        return Err(key_missing(key));
                    }
                    return Err(Error::internal(format!(
                        "{what}: HTTP {status}: {}",
                        truncate(&errors, 512)
                    )));
                }
            };
            for r in results.iter_mut() {
                let failed = r
                    .get("error")
                    .and_then(Value::as_str)
                    .filter(|e| !e.is_empty())
                    .map(TransitItemError::of);
                let item = match (failed, r.get_mut("plaintext")) {
                    (Some(e), _) => Err(e),
                    (None, Some(Value::String(p))) => {
                        let pt = B64.decode(p.as_bytes()).map(Zeroizing::new);
                        p.zeroize();
                        pt.map_err(|_| TransitItemError::Failed)
                    }
                    _ => Err(TransitItemError::Failed),
                };
                out.push(item);
            }
        }
        Ok(out)
    }

    /// Reads a KV v2 secret (latest or a given version). `None` if it does not exist or that
    /// version was deleted/destroyed.
    pub async fn kv_read(&self, path: &str, version: Option<u32>) -> Result<Option<KvEntry>> {
        let mount = self.cfg.kv_mount.as_str();
        let r = self
            .call("kv_read", |s| async move {
                let e = ReadSecretRequest {
                    mount: mount.to_string(),
                    path: path.to_string(),
                    version: version.map(u64::from),
                };
                vaultrs::api::exec_with_result(&s.client, e).await
            })
            .await;
        let r = match r {
            Ok(r) => r,
            // 404: never written, or this version deleted or destroyed.
            Err(e) if e.status() == Some(404) => return Ok(None),
            Err(e) => return Err(e.into_error(&format!("KV read {mount}/{path}"))),
        };
        if r.data.is_null() {
            return Ok(None);
        }
        let version = u32::try_from(r.metadata.version)
            .map_err(|_| Error::internal(format!("KV read {mount}/{path}: bad version")))?;
        Ok(Some(KvEntry {
            data: r.data,
            version,
        }))
    }

    /// Writes a KV v2 secret if its current version is `cas` (0 = must not exist).
    pub async fn kv_write_cas(&self, path: &str, data: &Value, cas: u32) -> Result<CasOutcome> {
        let mount = self.cfg.kv_mount.as_str();
        let r = self
            .call("kv_write", |s| async move {
                let opts = SetSecretRequestOptions { cas };
                vaultrs::kv2::set_with_options(&s.client, mount, path, data, opts).await
            })
            .await;
        match r {
            Ok(m) => u32::try_from(m.version)
                .map(CasOutcome::Written)
                .map_err(|_| Error::internal(format!("KV write {mount}/{path}: bad version"))),
            Err(e) if e.status() == Some(400) && e.vault_errors().contains("check-and-set") => {
                self.mismatch_or_ours(path, data, cas).await
            }
            Err(e) => Err(e.into_error(&format!("KV write {mount}/{path}"))),
        }
    }

    /// A check-and-set mismatch. With several nodes it may be our own write: the first node
    /// applied it and its answer was lost, and the retry on the next node found the version
    /// taken. So the version we would have made is read back: holding exactly `data`, it is
    /// ours ([`CasOutcome::Written`]); a caller that took it for a lost race would drop it (see
    /// the module doc). One node is never retried: there a mismatch is always another writer.
    async fn mismatch_or_ours(&self, path: &str, data: &Value, cas: u32) -> Result<CasOutcome> {
        if self.nodes.len() > 1
            && let Some(version) = cas.checked_add(1)
            && let Some(e) = self.kv_read(path, Some(version)).await?
            && e.version == version
            && e.data == *data
        {
            tracing::warn!(
                version,
                "a KV check-and-set write retried on another node had been applied by the first"
            );
            return Ok(CasOutcome::Written(version));
        }
        Ok(CasOutcome::Mismatch)
    }

    /// Deletes a KV v2 secret's metadata: every version is destroyed. Idempotent.
    pub async fn kv_delete_metadata(&self, path: &str) -> Result<()> {
        let mount = self.cfg.kv_mount.as_str();
        let r = self
            .call("kv_destroy", |s| async move {
                vaultrs::kv2::delete_metadata(&s.client, mount, path).await
            })
            .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e.into_error(&format!("KV delete {mount}/{path}"))),
        }
    }

    /// A request with an explicit token, or none (bootstrap, dev setup): `method` on `path`
    /// (after `/v1/`). Returns the status and the JSON body (`Value::Null` if empty or not
    /// JSON) whatever the status; an error only if no answer came. With several addresses it
    /// fails over like every call (bootstrap and dev set-up steps are re-runnable), and the
    /// answer of the last node tried is returned.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Result<(StatusCode, Value)> {
        let m = endpoints::request_method(&method)
            .ok_or_else(|| Error::internal(format!("Vault {path}: method {method} not used")))?;
        let s = self.new_sessions(Zeroizing::new(token.unwrap_or("").to_string()));
        let started = Instant::now();
        let r = self
            .on_nodes(started, |node| {
                let (s, method) = (s.node(node), m.clone());
                async move {
                    let e = endpoints::Raw { method, path, body };
                    e.with_middleware(&s.client.middle)
                        .exec(&s.client.http)
                        .await
                        .map_err(|source| ClientError::RestClientError { source })
                }
            })
            .await;
        let json = |b: &[u8]| serde_json::from_slice(b).unwrap_or(Value::Null);
        let out = match r {
            Ok(resp) => Ok((resp.response.status(), json(resp.response.body()))),
            Err(ClientError::RestClientError {
                source: rustify::errors::ClientError::ServerResponseError { code, content },
            }) => Ok((
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                content.map(|c| json(c.as_bytes())).unwrap_or(Value::Null),
            )),
            Err(e) => Err(CallError::Client(e).into_error(path)),
        };
        let ok = out.as_ref().is_ok_and(|(s, _)| !s.is_server_error());
        crate::metrics::vault_call("other", started.elapsed(), ok);
        out
    }
}

/// Wipes every `plaintext` string of a transit `batch_input` request body.
fn wipe_plaintexts(body: &mut Value) {
    if let Some(items) = body["batch_input"].as_array_mut() {
        for i in items {
            if let Some(Value::String(p)) = i.get_mut("plaintext") {
                p.zeroize();
            }
        }
    }
}

/// Most items in one transit `batch_input` call.
pub const TRANSIT_BATCH_CHUNK: usize = 250;

/// Versions and public keys of a transit asymmetric key.
#[derive(Debug, Clone)]
pub struct TransitKeyInfo {
    /// The newest version.
    pub latest_version: u32,
    /// Versions below this are retired (no decryption, no verification).
    pub min_decryption_version: u32,
    /// Every version Vault still has, oldest first.
    pub versions: Vec<TransitPublicKey>,
}

/// One version of a transit asymmetric key.
#[derive(Debug, Clone)]
pub struct TransitPublicKey {
    /// The key version.
    pub version: u32,
    /// SubjectPublicKeyInfo, PEM.
    pub public_key_pem: String,
    /// RFC 3339, as Vault gave it (may be empty).
    pub creation_time: String,
}

/// Why Vault refused one item of a transit decrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitItemError {
    /// The version is below the key's minimum decryption version.
    VersionRetired,
    /// The version does not exist (yet).
    VersionUnknown,
    /// The ciphertext does not decrypt (wrong key, modified bytes).
    Failed,
}

impl TransitItemError {
    fn of(vault_error: &str) -> Self {
        if vault_error.contains("too old") {
            TransitItemError::VersionRetired
        } else if vault_error.contains("too new") || vault_error.contains("invalid key version") {
            TransitItemError::VersionUnknown
        } else {
            TransitItemError::Failed
        }
    }
}

/// The error of a key that bootstrap has not created (or that the policy does not cover).
fn key_missing(key: &str) -> Error {
    Error::FailedPrecondition {
        reason: crate::error::Reason::KeyNotProvisioned,
        message: format!(
            "transit key {key} does not exist or the Vault policy does not cover it; run `piiguard bootstrap` again"
        ),
    }
}

/// A failed key-management call: 403 (after logging in again) means the policy predates the
/// key; the rest as any Vault error.
fn key_call_error(e: CallError, what: &str) -> Error {
    match &e {
        CallError::Client(c) if status_of(c) == Some(403) => {
            tracing::warn!("{what}: Vault answered 403 (policy written by an older bootstrap?)");
            let key = what.rsplit(' ').next().unwrap_or(what);
            key_missing(key)
        }
        _ => e.into_error(what),
    }
}

/// Parses Vault's `vault:vN:<base64>` into the version and the bytes.
pub fn parse_vault_blob(s: &str) -> Option<(u32, Vec<u8>)> {
    let rest = s.strip_prefix("vault:v")?;
    let (ver, b64) = rest.split_once(':')?;
    Some((ver.parse().ok()?, B64.decode(b64).ok()?))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    const TOKEN: &str = "s.redirect-test-token-7f3a9c";
    const SECRET_ID: &str = "secret-id-for-the-redirect-test-41d2";

    /// Reads one request (head and a `Content-Length` body) from a connection.
    async fn read_request(sock: &mut tokio::net::TcpStream) -> String {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return text;
                }
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return String::from_utf8_lossy(&buf).to_string(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// A loopback HTTP listener that records every request it receives and answers each with
    /// `answer(path)`, one request per connection.
    async fn listener(
        answer: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (seen2, answer) = (seen.clone(), Arc::new(answer));
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = l.accept().await {
                let (seen, answer) = (seen2.clone(), answer.clone());
                tokio::spawn(async move {
                    let req = read_request(&mut sock).await;
                    let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                    seen.lock().unwrap().push(req);
                    let _ = sock.write_all(answer(&path).as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        (addr, seen)
    }

    fn test_config(addr: SocketAddr, auth: VaultAuth) -> VaultConfig {
        VaultConfig {
            addresses: vec![format!("http://{addr}")],
            ca_cert: None,
            insecure_http: true,
            transit_mount: "transit".into(),
            kv_mount: "kv".into(),
            request_timeout: Duration::from_secs(5),
            namespace: None,
            admission: Default::default(),
            auth,
        }
    }

    /// Security finding 10: a Vault address answering 307 to another listener must not make
    /// the client send its token (or AppRole secret id) there. Before the fix, reqwest followed
    /// the redirect and resent `X-Vault-Token`, which it does not count as sensitive.
    #[tokio::test]
    async fn redirects_are_not_followed_and_the_token_goes_nowhere_else() {
        let (other, other_seen) = listener(|_| {
            "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n\
             content-length: 19\r\nconnection: close\r\n\r\n{\"errors\":[\"evil\"]}"
                .to_string()
        })
        .await;
        let (vault_addr, vault_seen) = listener(move |path| {
            format!(
                "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{other}{path}\r\n\
                 content-length: 0\r\nconnection: close\r\n\r\n"
            )
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, TOKEN).unwrap();
        let role_id_file = dir.path().join("role-id");
        std::fs::write(&role_id_file, "role").unwrap();
        let secret_id_file = dir.path().join("secret-id");
        std::fs::write(&secret_id_file, SECRET_ID).unwrap();

        // Token file: login looks the token up.
        let v = Vault::new(test_config(vault_addr, VaultAuth::TokenFile { token_file })).unwrap();
        let e = v.login().await.unwrap_err();
        assert!(format!("{e:?}").contains("redirect"), "{e:?}");
        // An authenticated call (it logs in first) and a given token (bootstrap).
        assert!(v.kv_read("x", None).await.is_err());
        let admin = v.with_token(TOKEN);
        assert!(admin.kv_read("x", None).await.is_err());
        let d = Dek::generate(32).unwrap();
        assert!(admin.wrap_dek("kek-x", &d).await.is_err());
        // Raw requests answer the 307 itself.
        let (status, _) = v
            .raw(Method::GET, "sys/mounts", None, Some(TOKEN))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::TEMPORARY_REDIRECT);
        // AppRole: the secret id is in the body, which a 307 would resend.
        let v = Vault::new(test_config(
            vault_addr,
            VaultAuth::Approle {
                role_id_file,
                secret_id_file,
                mount: "approle".into(),
            },
        ))
        .unwrap();
        assert!(v.login().await.is_err());

        let vault_seen = vault_seen.lock().unwrap().clone();
        assert!(vault_seen.len() >= 5, "{vault_seen:?}");
        let with_token = vault_seen
            .iter()
            .filter(|r| {
                r.to_ascii_lowercase()
                    .contains(&format!("x-vault-token: {TOKEN}"))
            })
            .count();
        assert!(
            with_token >= 3,
            "the configured address got the token: {vault_seen:?}"
        );
        assert!(vault_seen.iter().any(|r| r.contains(SECRET_ID)));
        let other_seen = other_seen.lock().unwrap().clone();
        assert!(
            other_seen.is_empty(),
            "the redirect target received {} request(s): {other_seen:?}",
            other_seen.len()
        );
    }

    /// A 200 answer with a JSON body.
    fn ok_json(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// Vault's envelope around `data` (or `auth`).
    fn envelope(field: &str, inner: &str) -> String {
        format!(
            "{{\"request_id\":\"r\",\"lease_id\":\"\",\"lease_duration\":0,\"renewable\":false,\
             \"{field}\":{inner},\"warnings\":null,\"wrap_info\":null}}"
        )
    }

    fn kv_answer(data: &str, version: u32) -> String {
        ok_json(&envelope(
            "data",
            &format!(
                "{{\"data\":{data},\"metadata\":{{\"created_time\":\"\",\"deletion_time\":\"\",\
                 \"custom_metadata\":null,\"destroyed\":false,\"version\":{version}}}}}"
            ),
        ))
    }

    fn multi_config(addrs: &[SocketAddr], auth: VaultAuth) -> VaultConfig {
        let mut cfg = test_config(addrs[0], auth);
        cfg.addresses = addrs.iter().map(|a| format!("http://{a}")).collect();
        cfg
    }

    /// A loopback port on which nothing listens (connection refused).
    fn dead_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    fn with_token_header(reqs: &[String]) -> usize {
        reqs.iter()
            .filter(|r| {
                r.to_ascii_lowercase()
                    .contains(&format!("x-vault-token: {TOKEN}"))
            })
            .count()
    }

    /// Security finding 10 with several Vault addresses: a node answering 307 (a standby
    /// pointing at the active node) makes the client try the next configured node, never the
    /// redirect target; the token and the AppRole secret id go only to configured nodes, and
    /// the node that served stays the current one.
    #[tokio::test]
    async fn a_redirecting_node_sends_the_call_to_the_next_node_never_to_the_target() {
        let (other, other_seen) = listener(|_| ok_json("{}")).await;
        let (a, a_seen) = listener(move |path| {
            format!(
                "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{other}{path}\r\n\
                 content-length: 0\r\nconnection: close\r\n\r\n"
            )
        })
        .await;
        let (b, b_seen) = listener(|path| {
            if path.starts_with("/v1/auth/approle/login") {
                ok_json(&envelope(
                    "auth",
                    "{\"client_token\":\"s.from-b\",\"accessor\":\"x\",\"policies\":[],\
                     \"token_policies\":[],\"metadata\":null,\"lease_duration\":60,\
                     \"renewable\":true,\"entity_id\":\"\",\"token_type\":\"service\",\
                     \"orphan\":true}",
                ))
            } else {
                kv_answer("{\"k\":\"v\"}", 3)
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let role_id_file = dir.path().join("role-id");
        std::fs::write(&role_id_file, "role").unwrap();
        let secret_id_file = dir.path().join("secret-id");
        std::fs::write(&secret_id_file, SECRET_ID).unwrap();
        let token_auth = VaultAuth::TokenFile {
            token_file: dir.path().join("token"),
        };

        let admin = Vault::new(multi_config(&[a, b], token_auth.clone()))
            .unwrap()
            .with_token(TOKEN);
        let e = admin.kv_read("x", None).await.unwrap().unwrap();
        assert_eq!((e.data["k"].as_str(), e.version), (Some("v"), 3));
        assert_eq!(
            admin.current_node(),
            1,
            "the node that served is the current one"
        );
        // The current node sticks: the next call goes to b directly.
        admin.kv_read("x", None).await.unwrap().unwrap();
        assert_eq!(a_seen.lock().unwrap().len(), 1);
        assert_eq!(with_token_header(&b_seen.lock().unwrap()), 2);
        // Raw requests fail over too.
        let admin = Vault::new(multi_config(&[a, b], token_auth.clone()))
            .unwrap()
            .with_token(TOKEN);
        let (status, _) = admin
            .raw(Method::GET, "kv/data/x", None, Some(TOKEN))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        // AppRole login (the secret id is in the body a 307 would resend) goes to b.
        let v = Vault::new(multi_config(
            &[a, b],
            VaultAuth::Approle {
                role_id_file,
                secret_id_file,
                mount: "approle".into(),
            },
        ))
        .unwrap();
        v.login().await.unwrap();
        v.kv_read("x", None).await.unwrap().unwrap();
        assert!(b_seen.lock().unwrap().iter().any(|r| r.contains(SECRET_ID)));
        assert!(
            b_seen
                .lock()
                .unwrap()
                .iter()
                .any(|r| r.to_ascii_lowercase().contains("x-vault-token: s.from-b"))
        );
        // Every node redirecting: UNAVAILABLE (no node serves), not a configuration error.
        let admin = Vault::new(multi_config(&[a, a], token_auth))
            .unwrap()
            .with_token(TOKEN);
        match admin.kv_read("x", None).await {
            Err(Error::Unavailable { detail }) => assert!(detail.contains("no node"), "{detail}"),
            other => panic!("{other:?}"),
        }

        let a_seen = a_seen.lock().unwrap().clone();
        assert!(with_token_header(&a_seen) >= 3, "{a_seen:?}");
        assert!(a_seen.iter().any(|r| r.contains(SECRET_ID)));
        let other_seen = other_seen.lock().unwrap().clone();
        assert!(
            other_seen.is_empty(),
            "the redirect target received {} request(s): {other_seen:?}",
            other_seen.len()
        );
    }

    /// DEK wraps in one transit `batch_input` call: an item Vault refused fails alone and the
    /// others get their wrapped keys, in order; a call that fails as a whole fails its items.
    #[tokio::test]
    async fn a_batch_wrap_failing_part_way_fails_only_its_items() {
        let (addr, seen) = listener(|_| {
            ok_json(
                r#"{"data":{"batch_results":[{"ciphertext":"vault:v1:AAAA"},{"error":"failed to encrypt"},{"ciphertext":"vault:v2:CCCC"}]}}"#,
            )
        })
        .await;
        let auth = VaultAuth::TokenFile {
            token_file: "/nonexistent".into(),
        };
        let v = Vault::new(test_config(addr, auth.clone()))
            .unwrap()
            .with_token(TOKEN);
        let deks: Vec<Dek> = (0..3).map(|_| Dek::generate(32).unwrap()).collect();
        let refs: Vec<&Dek> = deks.iter().collect();
        let r = v.wrap_deks("kek-orders", &refs).await;
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].as_ref().unwrap().as_str(), "vault:v1:AAAA");
        assert!(matches!(r[1], Err(Error::Internal { .. })), "{:?}", r[1]);
        assert_eq!(r[2].as_ref().unwrap().as_str(), "vault:v2:CCCC");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "one request for the three wraps");
        assert!(seen[0].starts_with("POST /v1/transit/encrypt/kek-orders"));
        assert_eq!(seen[0].matches("\"plaintext\"").count(), 3);

        // The whole call refused (a key the policy does not cover): every item fails.
        let (addr, _) = listener(|_| {
            let body = r#"{"errors":["permission denied"]}"#;
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            )
        })
        .await;
        let v = Vault::new(test_config(addr, auth.clone()))
            .unwrap()
            .with_token(TOKEN);
        let r = v.wrap_deks("kek-orders", &refs[..2]).await;
        assert_eq!(r.len(), 2);
        assert!(
            r.iter().all(|r| matches!(r, Err(Error::Internal { .. }))),
            "{r:?}"
        );

        // Vault overloaded (429): retryable, UNAVAILABLE, as for a single wrap.
        let (addr, _) = listener(|_| {
            let body = r#"{"errors":["rate limit quota exceeded"]}"#;
            format!(
                "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            )
        })
        .await;
        let v = Vault::new(test_config(addr, auth))
            .unwrap()
            .with_token(TOKEN);
        let r = v.wrap_deks("kek-orders", &refs[..2]).await;
        assert!(
            r.iter()
                .all(|r| matches!(r, Err(Error::Unavailable { .. }))),
            "{r:?}"
        );
    }

    /// A node that is down (connection refused) or drops the connection without answering:
    /// the call is served by the next node; with every node down it is UNAVAILABLE.
    #[tokio::test]
    async fn a_dead_or_silent_node_fails_over_and_all_down_is_unavailable() {
        let (silent, silent_seen) = listener(|_| String::new()).await;
        let (b, _) = listener(|_| kv_answer("{\"k\":\"v\"}", 1)).await;
        let auth = VaultAuth::TokenFile {
            token_file: "/nonexistent".into(),
        };
        let v = Vault::new(multi_config(&[dead_port(), silent, b], auth.clone()))
            .unwrap()
            .with_token(TOKEN);
        assert!(v.kv_read("x", None).await.unwrap().is_some());
        assert_eq!(v.current_node(), 2);
        assert!(!silent_seen.lock().unwrap().is_empty());
        let v = Vault::new(multi_config(&[dead_port(), silent, dead_port()], auth))
            .unwrap()
            .with_token(TOKEN);
        match v.kv_read("x", None).await {
            Err(Error::Unavailable { .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    /// A check-and-set write applied by a node whose answer was lost, retried on the next
    /// node, meets its own write there ("did not match the current version"): it is read back
    /// and reported as written, not as a lost race (the caller would delete a record in use).
    /// A version holding other data is a real mismatch.
    #[tokio::test]
    async fn a_cas_write_retried_after_a_lost_answer_recognises_its_own_write() {
        let ours = serde_json::json!({"wrapped": "vault:v1:ours", "created_at": 1});
        let ours_text = ours.to_string();
        let (silent, silent_seen) = listener(|_| String::new()).await;
        let b_answer = move |stored: String| {
            move |path: &str| {
                if path.contains("?version=1") {
                    kv_answer(&stored, 1)
                } else {
                    let body = "{\"errors\":[\"check-and-set parameter did not match the current version\"]}";
                    format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                }
            }
        };
        let (b, _) = listener(b_answer(ours_text.clone())).await;
        let (c, _) = listener(b_answer("{\"wrapped\":\"vault:v1:theirs\"}".into())).await;
        let auth = VaultAuth::TokenFile {
            token_file: "/nonexistent".into(),
        };
        let v = Vault::new(multi_config(&[silent, b], auth.clone()))
            .unwrap()
            .with_token(TOKEN);
        assert_eq!(
            v.kv_write_cas("x", &ours, 0).await.unwrap(),
            CasOutcome::Written(1)
        );
        assert!(silent_seen.lock().unwrap()[0].contains("vault:v1:ours"));
        let v = Vault::new(multi_config(&[silent, c], auth))
            .unwrap()
            .with_token(TOKEN);
        assert_eq!(
            v.kv_write_cas("x", &ours, 0).await.unwrap(),
            CasOutcome::Mismatch
        );
    }

    /// The client checks the address itself too (a `VaultConfig` can be built without the
    /// config parser, as dev setup does).
    #[test]
    fn the_client_refuses_a_non_loopback_plain_http_address() {
        for bad in [
            "http://localhost:8200@evil.example",
            "http://127.0.0.1:8200@evil.example",
            "http://10.0.0.1:8200",
        ] {
            let mut cfg = test_config(
                "127.0.0.1:1".parse().unwrap(),
                VaultAuth::TokenFile {
                    token_file: "/nonexistent".into(),
                },
            );
            cfg.addresses = vec![bad.into()];
            assert!(Vault::new(cfg).is_err(), "{bad}");
        }
        let mut cfg = test_config(
            "127.0.0.1:1".parse().unwrap(),
            VaultAuth::TokenFile {
                token_file: "/nonexistent".into(),
            },
        );
        cfg.addresses = vec!["https://vault.example:8200".into()]; // https with insecure_http = true
        assert!(Vault::new(cfg).is_err());
    }

    /// A response that does not parse may hold a plaintext (a transit decrypt answer): its
    /// content never reaches the error message.
    #[test]
    fn unparsable_responses_do_not_leak_into_errors() {
        let secret = "cGxhaW50ZXh0LWRlay1ieXRlcw==";
        let e = CallError::Client(ClientError::RestClientError {
            source: rustify::errors::ClientError::ResponseParseError {
                source: serde_json::from_str::<u8>("x").unwrap_err().into(),
                content: Some(format!("{{\"data\":{{\"plaintext\":\"{secret}\"}}}}")),
            },
        })
        .into_error("transit decrypt with kek-x");
        let text = format!("{e:?} {e}");
        assert!(!text.contains(secret), "{text}");
        assert!(text.contains("unexpected response"), "{text}");
    }

    #[test]
    fn errors_are_mapped_by_status() {
        let api = |code: u16| {
            CallError::Client(ClientError::APIError {
                code,
                errors: vec!["permission denied".into()],
            })
        };
        for code in [500, 502, 503, 429] {
            assert!(matches!(
                api(code).into_error("x"),
                Error::Unavailable { .. }
            ));
        }
        for code in [400, 403, 404] {
            match api(code).into_error("x") {
                Error::Internal { detail } => assert!(detail.contains("permission denied")),
                other => panic!("{other:?}"),
            }
        }
        let redirect = CallError::Client(ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError {
                code: 307,
                content: None,
            },
        });
        assert_eq!(redirect.status(), Some(307));
        match redirect.into_error("x") {
            Error::Internal { detail } => assert!(detail.contains("redirect"), "{detail}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn vault_blobs_parse() {
        assert_eq!(parse_vault_blob("vault:v2:AAEC"), Some((2, vec![0, 1, 2])));
        assert_eq!(parse_vault_blob("vault:2:AAEC"), None);
    }
}
