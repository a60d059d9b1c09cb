//! Configuration: a TOML file, then `PIIGUARD_*` environment overrides, then validation into a
//! typed [`Config`]. Nothing here has a secret default: credentials are read from files whose
//! paths the operator gives.
//!
//! Environment overrides name a key path with `__` between levels, e.g.
//! `PIIGUARD_SERVER__LISTEN=0.0.0.0:7443` or `PIIGUARD_VAULT__ADDRESS=https://vault:8200`.
//! Values are read as TOML values (numbers, booleans, arrays) when they parse as such, else as
//! strings. A list may be given as a TOML array or, for `vault.addresses`, comma-separated:
//! `PIIGUARD_VAULT__ADDRESSES=https://a:8200,https://b:8200`.

pub mod failpoint;
pub mod fields;
pub mod limits;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::crypto::aead::Algorithm;
use crate::domain::identity::IdentityPattern;
use crate::domain::names::{Keyspace, MAX_KEYSPACE_LEN, SubjectId};

/// A configuration problem, reported before any port is bound.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Raw file layout. Field docs are the reference for `piiguard.example.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[server]`: listeners, limits of a request, instance name.
    #[serde(default)]
    pub server: RawServer,
    /// `[tls]`: server certificate and the CA of client certificates (required).
    pub tls: RawTls,
    /// `[vault]`: where Vault/OpenBao is and how piiguard logs in.
    pub vault: RawVault,
    /// `[cache]`: the unwrapped-DEK cache.
    #[serde(default)]
    pub cache: RawCache,
    /// `[log]`: log format and level.
    #[serde(default)]
    pub log: RawLog,
    /// `[store]`: the SQL store (subject registry, tokens).
    #[serde(default)]
    pub store: RawStore,
    /// `[erasure]`: reaper, eviction feed, backup retention.
    #[serde(default)]
    pub erasure: RawErasure,
    /// `[keyspaces.NAME]`: one entry per keyspace.
    #[serde(default)]
    pub keyspaces: BTreeMap<String, RawKeyspace>,
    /// `[policy]`: the access policy file.
    #[serde(default)]
    pub policy: RawPolicyConfig,
    /// `[audit]`: the audit log.
    #[serde(default)]
    pub audit: RawAudit,
    /// `[metrics]`: the Prometheus listener.
    #[serde(default)]
    pub metrics: RawMetrics,
    /// `[limits]`: call-rate limits and volume budgets.
    #[serde(default)]
    pub limits: RawLimits,
    /// `[lockout]`: locking out identities after repeated failures.
    #[serde(default)]
    pub lockout: RawLockout,
    /// `[canaries]`: canary (honey) subjects and tokens.
    #[serde(default)]
    pub canaries: RawCanaries,
    /// `[alarms]`: the alarm webhook.
    #[serde(default)]
    pub alarms: RawAlarms,
    /// `[kek]`: the background rewrap of wrapped DEKs after a KEK rotation.
    #[serde(default)]
    pub kek: RawKek,
}

/// `[kek]`: the KEK rewrap job (docs/KEYS.md, "KEK rotation").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawKek {
    /// How often each keyspace's KEK is checked for a version newer than its wrapped DEKs (a
    /// rotation by Vault's `auto_rotate_period` or by another replica).
    pub poll_secs: u64,
    /// Records read, and wrapped values sent in one transit `rewrap` batch, per step.
    pub batch: usize,
    /// Vault requests (KV reads and writes) in flight at once per step.
    pub concurrency: usize,
    /// The job's lease in the store: another replica takes the job over this long after the
    /// replica running it stopped renewing it.
    pub lease_secs: u64,
}

impl Default for RawKek {
    fn default() -> Self {
        Self {
            poll_secs: 60,
            batch: 100,
            concurrency: 4,
            lease_secs: 60,
        }
    }
}

/// The KEK rewrap job's settings (`[kek]`).
#[derive(Debug, Clone)]
pub struct KekConfig {
    /// How often KEK versions are polled.
    pub poll: Duration,
    /// Records per step (and wrapped values per transit batch).
    pub batch: usize,
    /// Vault requests in flight at once.
    pub concurrency: usize,
    /// Lease in the store.
    pub lease: Duration,
}

/// `[policy]`: the access policy file (docs/POLICY.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPolicyConfig {
    /// Policy file (TOML). Required: without a policy every call is denied.
    pub file: Option<PathBuf>,
    /// How often the file is checked for changes (0 = only SIGHUP).
    pub reload_interval_secs: u64,
}

impl Default for RawPolicyConfig {
    fn default() -> Self {
        Self {
            file: None,
            reload_interval_secs: 10,
        }
    }
}

/// `[audit]`: the tamper-evident audit log.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAudit {
    /// Folder of the audit files. Required.
    pub dir: Option<PathBuf>,
    /// Start a new file after this many bytes.
    pub rotate_bytes: u64,
    /// ... or after this many seconds.
    pub rotate_secs: u64,
    /// Files older than this are deleted. At least 90 unless explicitly overridden.
    pub retention_days: u64,
    /// Allow `retention_days` under 90 (e.g. in tests). Never in production (ADPP: 90 days).
    pub allow_retention_under_90_days: bool,
    /// How often the chain head is signed by the transit signing key.
    pub checkpoint_secs: u64,
    /// How often written records are fsynced.
    pub fsync_interval_ms: u64,
    /// Records queued for the writer; when full, data calls fail closed.
    pub queue_capacity: usize,
    /// Subject references (and, apart, key ids) listed by name in one call record of a batch
    /// or stream; the rest are counted and covered by the record's digest.
    pub max_refs_per_record: usize,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            dir: None,
            rotate_bytes: 128 * 1024 * 1024,
            rotate_secs: 86_400,
            retention_days: 90,
            allow_retention_under_90_days: false,
            checkpoint_secs: 60,
            fsync_interval_ms: 1000,
            queue_capacity: 65_536,
            max_refs_per_record: 64,
        }
    }
}

/// `[metrics]`: Prometheus endpoint on its own plaintext listener.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawMetrics {
    /// `IP:PORT` serving `GET /metrics`; empty = off.
    pub listen: String,
}

/// A set of limits, each `N/DURATION` (e.g. `100/1s`, `1000000/1d`).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimitSet {
    /// Calls per identity.
    pub calls: Vec<String>,
    /// Decrypted / detokenised items per identity (the volume budget).
    pub revealed_items: Vec<String>,
}

/// `[limits]`: defaults for every identity, and `[limits.identity."PATTERN"]` overrides.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Call-rate windows, e.g. `["100/1s", "1000000/1d"]`.
    pub calls: Vec<String>,
    /// Volume budget windows of decrypted / detokenised items.
    pub revealed_items: Vec<String>,
    /// Overrides by identity pattern (exact, or a prefix ending in `*`).
    pub identity: BTreeMap<String, RawLimitSet>,
}

/// `[lockout]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLockout {
    /// Denied or failed calls within `window_secs` that lock an identity out (0 = off).
    pub max_failures: u32,
    /// The window over which failures are counted.
    pub window_secs: u64,
    /// How long a lockout lasts.
    pub cooldown_secs: u64,
    /// Exact identities that may still call the Admin service while locked out (to lift a
    /// lockout when every administrator is locked out). Each such call raises a critical
    /// alarm. Empty by default: a locked-out identity is refused everything.
    pub break_glass: Vec<String>,
}

impl Default for RawLockout {
    fn default() -> Self {
        Self {
            max_failures: 50,
            window_secs: 60,
            cooldown_secs: 900,
            break_glass: Vec::new(),
        }
    }
}

/// A configured canary subject.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCanarySubject {
    /// The keyspace.
    pub keyspace: String,
    /// The subject id (kept in memory only as a keyed hash once loaded).
    pub subject: String,
    /// Where the canary was planted (for the alarm text).
    #[serde(default)]
    pub label: String,
}

/// `[canaries]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCanaries {
    /// Lock the caller out when it touches a canary.
    pub lockout: bool,
    /// Canary subjects configured in the file.
    pub subject: Vec<RawCanarySubject>,
    /// Canary token values (decoys; kept in memory only as hashes).
    pub tokens: Vec<String>,
    /// How often the registry of created canaries is re-read from Vault.
    pub refresh_secs: u64,
}

impl Default for RawCanaries {
    fn default() -> Self {
        Self {
            lockout: true,
            subject: Vec::new(),
            tokens: Vec::new(),
            refresh_secs: 60,
        }
    }
}

/// `[alarms]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawAlarms {
    /// Webhook receiving each alarm as a JSON POST; empty = none. https (or http to loopback).
    pub webhook_url: String,
    /// CA bundle for the webhook's certificate (default: the system roots).
    pub webhook_ca: Option<PathBuf>,
}

/// `[store]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// `sqlite://PATH` (default, one file) or `postgres://…` (several replicas). May hold a
    /// database password (from `PIIGUARD_STORE__URL`): never Debug-printed in clear.
    pub url: String,
}

impl fmt::Debug for RawStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawStore")
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

/// A database URL with its password (`user:PASSWORD@`, `password=...`) replaced by `***`, for
/// Debug output and logs.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest_start + colon + 1..rest_start + at, "***");
            }
        }
    }
    let lower = out.to_ascii_lowercase();
    if let Some(i) = lower.find("password=") {
        let start = i + "password=".len();
        let end = out[start..].find('&').map_or(out.len(), |j| start + j);
        out.replace_range(start..end, "***");
    }
    out
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            url: "sqlite://piiguard.db".into(),
        }
    }
}

/// `[erasure]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawErasure {
    /// How often due scheduled shreds, expired retentions and interrupted shreds are processed.
    pub reaper_interval_secs: u64,
    /// How often this replica reads the eviction feed of shreds made by other replicas.
    pub eviction_poll_millis: u64,
    /// A `shredding` subject untouched this long is taken over (its replica died mid-shred).
    pub stale_shred_secs: u64,
    /// The backup retention the operator runs (stated in certificates of destruction: the
    /// longest a wrapped key can survive in a Vault backup).
    pub backup_retention_days: u64,
    /// A subject the reaper failed to shred this many times in a row raises a
    /// `reaper_stuck` alarm (once); it keeps being retried with a growing backoff.
    pub reaper_alarm_after_failures: u32,
    /// Longest backoff between two reaper attempts at a failing subject (the backoff starts at
    /// `reaper_interval_secs` and doubles).
    pub reaper_max_backoff_secs: u64,
}

impl Default for RawErasure {
    fn default() -> Self {
        Self {
            reaper_interval_secs: 30,
            eviction_poll_millis: 1000,
            stale_shred_secs: 60,
            backup_retention_days: 0,
            reaper_alarm_after_failures: 5,
            reaper_max_backoff_secs: 3600,
        }
    }
}

/// `[server]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// mTLS gRPC listener.
    pub listen: String,
    /// Plaintext listener serving only grpc.health.v1 (for orchestrator probes). Empty = off.
    pub health_listen: String,
    /// A TLS handshake not finished in this time is dropped.
    pub handshake_timeout_secs: u64,
    /// On SIGTERM/SIGINT, calls in flight get this long to finish; then they are cut and the
    /// process stops (audit log sealed).
    pub shutdown_grace_secs: u64,
    /// Largest plaintext (or token value) accepted.
    pub max_plaintext_bytes: usize,
    /// Most items in one batch call.
    pub max_batch_items: usize,
    /// How often certificate, key, CA and CRL files are checked for changes (0 = only SIGHUP).
    pub tls_reload_interval_secs: u64,
    /// Name of this instance in logs (defaults to the host name).
    pub instance: String,
    /// File written (atomically) once every listener is bound: JSON with the bound addresses,
    /// for scripts and tests that let the listeners bind port 0. Empty = none.
    pub ready_file: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7443".into(),
            health_listen: "127.0.0.1:7080".into(),
            handshake_timeout_secs: 5,
            shutdown_grace_secs: 20,
            max_plaintext_bytes: 64 * 1024,
            max_batch_items: 10_000,
            tls_reload_interval_secs: 30,
            instance: String::new(),
            ready_file: String::new(),
        }
    }
}

/// `[tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA that issues client certificates. Required: there is no mode without client auth.
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM) checked for client certificates.
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// Accept a client certificate without SPIFFE URI or DNS SAN, naming it by its subject
    /// CN as the identity `cn:<CN>`. Off by default: such a certificate is refused.
    #[serde(default)]
    pub allow_cn_identity: bool,
    /// A connection older than this is told to go away (HTTP/2 GOAWAY); the client reconnects
    /// with a new handshake against the certificates and CRLs in force.
    #[serde(default = "default_max_connection_age")]
    pub max_connection_age_secs: u64,
    /// Calls still in flight on a connection past its age get this long to finish before it
    /// is closed.
    #[serde(default = "default_max_connection_age_grace")]
    pub max_connection_age_grace_secs: u64,
}

fn default_max_connection_age() -> u64 {
    3600
}

fn default_max_connection_age_grace() -> u64 {
    300
}

/// `[vault]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVault {
    /// Vault address, `https://HOST:PORT` (one node, or a load balancer). Exactly one of
    /// `address` and `addresses` is set.
    #[serde(default)]
    pub address: Option<String>,
    /// The addresses of every node of a Vault HA cluster, tried in order on fail-over
    /// (docs/OPERATIONS.md#vault-ha): a TOML array, or (from the environment) one string of
    /// comma-separated addresses.
    #[serde(default)]
    pub addresses: Option<RawAddresses>,
    /// CA bundle for Vault's HTTPS certificate.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// Allow `http://` to a loopback Vault (dev mode only). Never enable in production.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// Mount of the transit engine (KEKs, signing key).
    #[serde(default = "default_transit_mount")]
    pub transit_mount: String,
    /// Mount of the KV v2 engine (wrapped DEKs).
    #[serde(default = "default_kv_mount")]
    pub kv_mount: String,
    /// Timeout of one Vault request.
    #[serde(default = "default_vault_timeout")]
    pub request_timeout_secs: u64,
    /// Vault namespace (OpenBao / Vault Enterprise), optional.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Most Vault requests in flight at once (admission bound, see `vault::admission`).
    #[serde(default = "default_vault_max_in_flight")]
    pub max_in_flight: usize,
    /// How long a Vault request may wait for a place under `max_in_flight` before the call
    /// is refused with `VAULT_OVERLOADED`.
    #[serde(default = "default_vault_queue_timeout_ms")]
    pub queue_timeout_ms: u64,
    /// How piiguard logs in to Vault.
    pub auth: RawVaultAuth,
}

/// `vault.addresses` as written: a TOML array, or a comma-separated string (the form an
/// environment override `PIIGUARD_VAULT__ADDRESSES=https://a:8200,https://b:8200` takes).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawAddresses {
    /// `addresses = ["https://a:8200", "https://b:8200"]`.
    List(Vec<String>),
    /// `"https://a:8200,https://b:8200"`.
    Text(String),
}

impl RawAddresses {
    fn into_list(self) -> Vec<String> {
        match self {
            RawAddresses::List(l) => l,
            RawAddresses::Text(t) => t
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect(),
        }
    }
}

/// Most Vault addresses (`vault.addresses`): a Raft cluster has 3 or 5 voters.
pub const MAX_VAULT_ADDRESSES: usize = 16;

/// Checks `vault.address` / `vault.addresses` (exactly one set; every address as
/// [`vault_address`] checks it; all plain HTTP or all HTTPS; no duplicates). Returns the
/// normalised addresses, in the order given, and whether they are plain HTTP.
fn vault_addresses(
    address: Option<String>,
    addresses: Option<RawAddresses>,
    allow_insecure_http: bool,
) -> Result<(Vec<String>, bool), ConfigError> {
    let raw = match (address, addresses) {
        (Some(_), Some(_)) => {
            return err(
                "vault.address and vault.addresses are both set: use one (vault.addresses for \
                 several Vault nodes)",
            );
        }
        (None, None) => return err("vault.address (or vault.addresses) is required"),
        (Some(a), None) => vec![a],
        (None, Some(l)) => l.into_list(),
    };
    if raw.is_empty() {
        return err("vault.addresses is empty: give at least one Vault address");
    }
    if raw.len() > MAX_VAULT_ADDRESSES {
        return err(format!(
            "vault.addresses has {} addresses; at most {MAX_VAULT_ADDRESSES}",
            raw.len()
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(raw.len());
    let mut insecure = None;
    for a in &raw {
        let (addr, plain) = vault_address(a, allow_insecure_http)?;
        if insecure.is_some_and(|i| i != plain) {
            return err("vault.addresses mixes http:// and https:// addresses");
        }
        insecure = Some(plain);
        if out.contains(&addr) {
            return err(format!("vault.addresses lists {addr:?} twice"));
        }
        out.push(addr);
    }
    Ok((out, insecure.unwrap_or(false)))
}

fn default_vault_max_in_flight() -> usize {
    64
}
fn default_vault_queue_timeout_ms() -> u64 {
    2000
}

fn default_transit_mount() -> String {
    "piiguard-transit".into()
}
fn default_kv_mount() -> String {
    "piiguard-kv".into()
}
fn default_vault_timeout() -> u64 {
    5
}

/// `[vault.auth]`: the login method.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "method", rename_all = "snake_case")]
pub enum RawVaultAuth {
    /// AppRole: role id and secret id are read from files.
    Approle {
        /// File holding the AppRole role id.
        role_id_file: PathBuf,
        /// File holding the AppRole secret id.
        secret_id_file: PathBuf,
        /// Mount of the AppRole auth method.
        #[serde(default = "default_approle_mount")]
        mount: String,
    },
    /// A token read from a file (e.g. a Vault Agent sink); re-read when it changes.
    TokenFile {
        /// The token file.
        token_file: PathBuf,
    },
}

fn default_approle_mount() -> String {
    "approle".into()
}

/// `[cache]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    /// Most cached DEKs.
    pub max_entries: usize,
    /// A cached DEK unused this long is dropped.
    pub idle_ttl_secs: u64,
    /// Longest time an unwrapped DEK may stay in memory, used or not.
    pub hard_ttl_secs: u64,
    /// Most encryptions one process makes with one DEK (GCM random nonces).
    pub max_uses_per_dek: u64,
    /// Most entries of each token read cache (token rows for Detokenize, deterministic
    /// tokens for Tokenize); 0 turns them off.
    pub token_entries: usize,
    /// Most cached DEKs that keep their AES key schedule expanded (~0.7 KiB each); 0 turns
    /// it off.
    pub expanded_keys: usize,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            idle_ttl_secs: 600,
            hard_ttl_secs: 3600,
            max_uses_per_dek: DEFAULT_MAX_USES_PER_DEK,
            token_entries: 65_536,
            expanded_keys: 65_536,
        }
    }
}

/// `[log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// `json` or `text`.
    pub format: String,
    /// tracing filter, e.g. `info` or `piiguard=debug`.
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "json".into(),
            level: "info".into(),
        }
    }
}

/// `[keyspaces.NAME]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawKeyspace {
    /// `aes-256-gcm` (default) or `aes-128-gcm`.
    #[serde(default)]
    pub algorithm: Option<String>,
    /// Transit auto-rotation period of this keyspace's KEK, in days (bootstrap applies it).
    #[serde(default)]
    pub kek_rotate_days: Option<u64>,
    /// Grace window of a shred, in seconds (0 = immediate; at most 259200 = 72 hours).
    #[serde(default)]
    pub grace_secs: u64,
    /// Default retention of a new subject, in seconds from its first encryption (0 = none).
    #[serde(default)]
    pub default_retention_secs: u64,
    /// After a shred, `new_key` (default: the subject id gets a new key; old data stays dead)
    /// or `refuse` (the subject id can never be used again in this keyspace).
    #[serde(default)]
    pub after_shred: Option<String>,
    /// `[keyspaces.NAME.fields.FIELD]`: field kind, blind index and mask settings
    /// (docs/SEARCH.md); a field not named here gets its defaults.
    #[serde(default)]
    pub fields: BTreeMap<String, fields::RawField>,
    /// Encryptions one DEK version may make, counted in the store across replicas and
    /// restarts, before the next encryption rotates it (default 2^30).
    #[serde(default)]
    pub max_dek_uses: Option<u64>,
    /// Encryptions a replica reserves in the store at a time for one DEK version (default 4096).
    #[serde(default)]
    pub dek_use_block: Option<u64>,
    /// Age (seconds since its first reserved use) at which a DEK version is rotated (0 = none).
    #[serde(default)]
    pub max_dek_age_secs: u64,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners and request limits.
    pub server: ServerConfig,
    /// TLS material of the mTLS listener.
    pub tls: TlsFiles,
    /// Vault access.
    pub vault: VaultConfig,
    /// The DEK cache.
    pub cache: CacheConfig,
    /// Logging.
    pub log: LogConfig,
    /// The SQL store.
    pub store: StoreConfig,
    /// Erasure timing.
    pub erasure: ErasureConfig,
    /// Keyspaces by name.
    pub keyspaces: BTreeMap<String, KeyspaceConfig>,
    /// The access policy file.
    pub policy: PolicyConfig,
    /// The audit log.
    pub audit: AuditConfig,
    /// Prometheus listener, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// Call-rate limits and volume budgets.
    pub limits: limits::LimitsConfig,
    /// Lockout settings.
    pub lockout: limits::LockoutConfig,
    /// Canary subjects and tokens.
    pub canaries: CanariesConfig,
    /// Alarm webhook.
    pub alarms: AlarmsConfig,
    /// The KEK rewrap job.
    pub kek: KekConfig,
}

/// The access policy file and how often it is re-read.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// The policy file (TOML).
    pub file: PathBuf,
    /// How often the file is checked for changes (`None`: only on SIGHUP).
    pub reload_interval: Option<Duration>,
}

/// The audit log: folder, rotation, retention, checkpoints.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Folder of the audit files.
    pub dir: PathBuf,
    /// A file is rotated at this size.
    pub rotate_bytes: u64,
    /// A file is rotated at this age.
    pub rotate_interval: Duration,
    /// Files older than this are deleted.
    pub retention: Duration,
    /// How often a signed checkpoint is written.
    pub checkpoint_interval: Duration,
    /// How often the file is synced to disk.
    pub fsync_interval: Duration,
    /// Records waiting for the writer beyond this refuse data calls (fail closed).
    pub queue_capacity: usize,
    /// Subject references and key ids listed by name in one record of a call that touched
    /// several (each list at most this long; the rest counted and covered by a digest). A
    /// stream writes a part record each time it has collected this many.
    pub max_refs_per_record: usize,
}

/// A canary subject from the config file.
#[derive(Debug, Clone)]
pub struct CanarySubject {
    /// The keyspace.
    pub keyspace: String,
    /// The subject id (kept in memory only as a keyed hash once loaded).
    pub subject: String,
    /// Where the canary was planted (for the alarm text).
    pub label: String,
}

/// Canary settings.
#[derive(Debug, Clone)]
pub struct CanariesConfig {
    /// Lock the caller out when it touches a canary.
    pub lockout: bool,
    /// Canary subjects from the file.
    pub subjects: Vec<CanarySubject>,
    /// Canary token values.
    pub tokens: Vec<String>,
    /// How often canaries created with the Admin API are re-read.
    pub refresh: Duration,
}

/// Where alarms go besides the audit log, metrics and logs.
#[derive(Debug, Clone, Default)]
pub struct AlarmsConfig {
    /// Webhook receiving each alarm as a JSON POST.
    pub webhook_url: Option<String>,
    /// CA bundle for the webhook (default: system roots).
    pub webhook_ca: Option<PathBuf>,
}

/// The SQL store.
#[derive(Clone)]
pub struct StoreConfig {
    /// The database URL; may hold a password, so its Debug is redacted ([`redact_url`]).
    pub url: String,
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

/// Erasure timing and what certificates state.
#[derive(Debug, Clone)]
pub struct ErasureConfig {
    /// How often the reaper runs.
    pub reaper_interval: Duration,
    /// How often the eviction feed is read.
    pub eviction_poll: Duration,
    /// An interrupted shred untouched this long is taken over.
    pub stale_shred: Duration,
    /// Backup retention stated in certificates.
    pub backup_retention_days: u64,
    /// Consecutive reaper failures of one subject that raise the `reaper_stuck` alarm.
    pub reaper_alarm_after_failures: u32,
    /// Cap of the reaper's per-subject retry backoff.
    pub reaper_max_backoff: Duration,
}

/// What happens when a shredded subject id is used again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterShred {
    /// A new DEK is made: the old data stays unreadable.
    NewKey,
    /// The subject id is refused for good (`SUBJECT_SHREDDED`).
    Refuse,
}

/// Longest shred grace window: ADPP 1.7 requires deletion within 72 hours.
pub const MAX_GRACE_SECS: u64 = 72 * 3600;

/// NIST SP 800-38D: at most 2^32 encryptions with one AES-GCM key and random 96-bit nonces.
pub const GCM_RANDOM_NONCE_LIMIT: u64 = 1 << 32;

/// Default of `keyspaces.<name>.max_dek_uses`: 2^30, a quarter of [`GCM_RANDOM_NONCE_LIMIT`].
/// Counted durably in the store across replicas and restarts (docs/KEYS.md#usage-limits), so
/// it is the key's whole budget: with 2^30 random 96-bit nonces the chance that two collide
/// is about 2^60 / 2^97 = 2^-37 per DEK version, and the slack below 2^32 absorbs the blocks
/// lost by processes that die holding them.
pub const DEFAULT_MAX_DEK_USES: u64 = 1 << 30;

/// Default of `keyspaces.<name>.dek_use_block`: 4096 encryptions reserved per store round
/// trip. A process that dies loses at most one block per DEK version (counted as used); a
/// version gets at most 2^30 / 4096 = 2^18 reservations over its life.
pub const DEFAULT_DEK_USE_BLOCK: u64 = 4096;

/// Default of `cache.max_uses_per_dek`: 2^24, 1/256 of [`GCM_RANDOM_NONCE_LIMIT`]. Counts are
/// per process (they start at zero in every replica and after every restart, until issue 12
/// makes them durable), so the budget of one process is a fraction of the key's: up to 256
/// process lifetimes (replicas x restarts over the life of a DEK) each exhausting its count
/// still stay within 2^32 (security review finding 16).
pub const DEFAULT_MAX_USES_PER_DEK: u64 = 1 << 24;

/// Listeners and request limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The mTLS gRPC listener.
    pub listen: SocketAddr,
    /// The plaintext health-only listener, if any.
    pub health_listen: Option<SocketAddr>,
    /// Longest TLS handshake.
    pub handshake_timeout: Duration,
    /// How long calls in flight get to finish after a stop signal.
    pub shutdown_grace: Duration,
    /// Largest plaintext (or token value) accepted.
    pub max_plaintext_bytes: usize,
    /// Most items in one batch call.
    pub max_batch_items: usize,
    /// How often TLS files are checked for changes (`None`: only SIGHUP).
    pub tls_reload_interval: Option<Duration>,
    /// Name of this instance in logs, audit records and certificates.
    pub instance: String,
    /// Where the addresses bound are reported once every listener is bound
    /// (`server.ready_file`; see `crate::app::ready`).
    pub ready_file: Option<PathBuf>,
}

/// TLS material of the mTLS listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA of client certificates (required).
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM) checked for client certificates.
    pub crl: Vec<PathBuf>,
    /// Whether a certificate without SPIFFE URI or DNS SAN is named by its CN (`cn:<CN>`).
    pub allow_cn_identity: bool,
    /// Age after which a connection is told to go away (GOAWAY).
    pub max_connection_age: Duration,
    /// How long calls in flight on a connection past its age may still run.
    pub max_connection_age_grace: Duration,
}

/// Vault access.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// Vault addresses, `https://HOST:PORT`, normalised (no trailing slash): one, or every
    /// node of an HA cluster in fail-over order. Never empty.
    pub addresses: Vec<String>,
    /// CA bundle for Vault's HTTPS certificate.
    pub ca_cert: Option<PathBuf>,
    /// Plain HTTP to a loopback Vault allowed (dev only).
    pub insecure_http: bool,
    /// Mount of the transit engine (KEKs, signing key).
    pub transit_mount: String,
    /// Mount of the KV v2 engine (wrapped DEKs).
    pub kv_mount: String,
    /// Timeout of one Vault request.
    pub request_timeout: Duration,
    /// Vault namespace, if any.
    pub namespace: Option<String>,
    /// The bound on Vault requests in flight.
    pub admission: VaultAdmission,
    /// How piiguard logs in.
    pub auth: VaultAuth,
}

/// The bound on concurrent Vault requests (`vault.max_in_flight`, `vault.queue_timeout_ms`):
/// a request waits at most `queue_timeout` for one of `max_in_flight` places, else the call is
/// refused (RESOURCE_EXHAUSTED, `VAULT_OVERLOADED`) instead of piling up on a slow Vault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaultAdmission {
    /// Most Vault requests in flight at once.
    pub max_in_flight: usize,
    /// Longest wait for a place.
    pub queue_timeout: Duration,
}

impl Default for VaultAdmission {
    fn default() -> Self {
        Self {
            max_in_flight: default_vault_max_in_flight(),
            queue_timeout: Duration::from_millis(default_vault_queue_timeout_ms()),
        }
    }
}

/// Parses and checks `vault.address`; returns it normalised (no trailing slash) and whether it
/// is plain HTTP. The address is parsed as a URL, never split by hand: in
/// `http://localhost:8200@evil.example` the host is `evil.example` (`localhost:8200` is a user
/// name and password), so a textual "starts with localhost" check would send the Vault token
/// there. Refused: anything but `https://`, except `http://` to a loopback host (`localhost`,
/// 127.0.0.0/8, `[::1]`) with `allow_insecure_http`; user info (`user:pass@`); a path (the
/// client puts `/v1/` right after the host), a query or a fragment.
pub fn vault_address(raw: &str, allow_insecure_http: bool) -> Result<(String, bool), ConfigError> {
    let url = url::Url::parse(raw.trim())
        .map_err(|e| ConfigError(format!("vault.address {raw:?} is not a URL: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return err(format!(
            "vault.address {raw:?} must not carry user info (user:password@host); \
             its host would be {:?}",
            url.host_str().unwrap_or("")
        ));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return err(format!(
            "vault.address {raw:?} must be scheme://host[:port], without a path, query or fragment"
        ));
    }
    let insecure = match url.scheme() {
        "https" => false,
        "http" => {
            if !allow_insecure_http {
                return err(format!(
                    "vault.address {raw:?} is plain HTTP; use https:// with vault.ca_cert \
                     (plain HTTP is allowed only with vault.allow_insecure_http = true on loopback, for dev)"
                ));
            }
            if !is_loopback_host(&url) {
                return err(format!(
                    "vault.address {raw:?}: plain HTTP is allowed only to a loopback address, \
                     and its host is {:?}",
                    url.host_str().unwrap_or("")
                ));
            }
            true
        }
        _ => return err(format!("vault.address {raw:?} must start with https://")),
    };
    if url.host_str().is_none_or(str::is_empty) {
        return err(format!("vault.address {raw:?} has no host"));
    }
    Ok((url.as_str().trim_end_matches('/').to_string(), insecure))
}

/// Whether a parsed URL's host is loopback (`localhost`, 127.0.0.0/8, `[::1]`). Always on the
/// parsed host, never on the text: `http://localhost@evil.example` has the host `evil.example`.
fn is_loopback_host(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Parses and checks `alarms.webhook_url`: `https://`, or `http://` to a loopback host; no
/// user info. Parsed as a URL before the loopback check, as [`vault_address`] is.
pub fn webhook_url(raw: &str) -> Result<String, ConfigError> {
    let url = url::Url::parse(raw.trim())
        .map_err(|e| ConfigError(format!("alarms.webhook_url {raw:?} is not a URL: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return err(format!(
            "alarms.webhook_url {raw:?} must not carry user info (user:password@host); \
             its host would be {:?}",
            url.host_str().unwrap_or("")
        ));
    }
    let ok = match url.scheme() {
        "https" => url.host_str().is_some_and(|h| !h.is_empty()),
        "http" => is_loopback_host(&url),
        _ => false,
    };
    if !ok {
        return err(format!(
            "alarms.webhook_url {raw:?} must be https:// (plain http only to a loopback host; \
             its host is {:?})",
            url.host_str().unwrap_or("")
        ));
    }
    Ok(url.to_string())
}

/// How piiguard logs in to Vault.
#[derive(Debug, Clone)]
pub enum VaultAuth {
    /// AppRole with role id and secret id from files.
    Approle {
        /// File holding the AppRole role id.
        role_id_file: PathBuf,
        /// File holding the AppRole secret id.
        secret_id_file: PathBuf,
        /// Mount of the AppRole auth method.
        mount: String,
    },
    /// A token from a file (Vault Agent sink), re-read when it changes.
    TokenFile {
        /// The token file.
        token_file: PathBuf,
    },
}

/// The unwrapped-DEK cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Most cached DEKs.
    pub max_entries: usize,
    /// Unused this long: dropped.
    pub idle_ttl: Duration,
    /// Longest any DEK stays cached (bounds a missed eviction).
    pub hard_ttl: Duration,
    /// Most encryptions this process makes with one DEK, across cache reloads.
    pub max_uses_per_dek: u64,
    /// Most entries of each token read cache (0: none).
    pub token_entries: usize,
    /// Most cached DEKs that keep their AES key schedule expanded (0: none).
    pub expanded_keys: usize,
}

/// Logging.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// JSON lines instead of text.
    pub json: bool,
    /// tracing filter.
    pub level: String,
}

/// One keyspace.
#[derive(Debug, Clone)]
pub struct KeyspaceConfig {
    /// AEAD of its ciphertexts.
    pub algorithm: Algorithm,
    /// Vault `auto_rotate_period` of its KEK, in days (0: off).
    pub kek_rotate_days: u64,
    /// Grace window of its shreds (at most 72 hours).
    pub grace: Duration,
    /// Retention set on new subjects, if any.
    pub default_retention: Option<Duration>,
    /// What a shredded subject id gets when used again.
    pub after_shred: AfterShred,
    /// Fields with settings of their own (blind indexes, masks); others get
    /// [`fields::FieldConfig::default_for`].
    pub fields: BTreeMap<String, fields::FieldConfig>,
    /// Encryptions per DEK version, durably counted across replicas, before a rotation.
    pub max_dek_uses: u64,
    /// Encryptions reserved in the store at a time.
    pub dek_use_block: u64,
    /// Age of a DEK version (from its first reserved use) at which it is rotated.
    pub max_dek_age: Option<Duration>,
}

impl KeyspaceConfig {
    /// The settings of `field` (its own, or the defaults for its name).
    pub fn field(&self, field: &str) -> std::borrow::Cow<'_, fields::FieldConfig> {
        match self.fields.get(field) {
            Some(f) => std::borrow::Cow::Borrowed(f),
            None => std::borrow::Cow::Owned(fields::FieldConfig::default_for(field)),
        }
    }
}

/// Reads and validates a config file, applying `PIIGUARD_*` overrides from `env`.
pub fn load(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    parse(&text, env)
}

/// Parses and validates config text, applying `PIIGUARD_*` overrides from `env`.
pub fn parse(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut value: toml::Table =
        toml::from_str(text).map_err(|e| ConfigError(format!("TOML: {e}")))?;
    apply_env(&mut value, env)?;
    let raw: RawConfig = toml::Value::Table(value)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError(e.message().to_string()))?;
    raw.validate()
}

fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (k, v) in env {
        let Some(rest) = k.strip_prefix("PIIGUARD_") else {
            continue;
        };
        if !rest.contains("__") {
            // Variables such as PIIGUARD_CONFIG are not key paths.
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if path.iter().any(String::is_empty) {
            return err(format!("environment variable {k}: empty key path segment"));
        }
        let scalar = match toml::from_str::<toml::Table>(&format!("v = {v}")) {
            Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(v.clone())),
            Err(_) => toml::Value::String(v.clone()),
        };
        let mut cur = &mut *table;
        for seg in &path[..path.len() - 1] {
            let entry = cur
                .entry(seg.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cur = match entry {
                toml::Value::Table(t) => t,
                _ => return err(format!("environment variable {k}: {seg} is not a table")),
            };
        }
        cur.insert(path[path.len() - 1].clone(), scalar);
    }
    Ok(())
}

fn socket(name: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|e| ConfigError(format!("{name} = {s:?}: {e} (expected IP:PORT)")))
}

fn mount_name(name: &str, s: &str) -> Result<String, ConfigError> {
    if s.is_empty() || s.starts_with('/') || s.ends_with('/') || s.contains("..") {
        return err(format!("{name} = {s:?}: not a valid Vault mount path"));
    }
    Ok(s.to_string())
}

impl RawConfig {
    /// Validates into a typed [`Config`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        let s = self.server;
        let listen = socket("server.listen", &s.listen)?;
        let health_listen = if s.health_listen.is_empty() {
            None
        } else {
            Some(socket("server.health_listen", &s.health_listen)?)
        };
        if s.handshake_timeout_secs == 0 || s.handshake_timeout_secs > 120 {
            return err("server.handshake_timeout_secs must be between 1 and 120");
        }
        if s.shutdown_grace_secs == 0 || s.shutdown_grace_secs > 3600 {
            return err("server.shutdown_grace_secs must be between 1 and 3600");
        }
        if s.max_plaintext_bytes == 0 || s.max_plaintext_bytes > 4 * 1024 * 1024 {
            return err("server.max_plaintext_bytes must be between 1 and 4194304");
        }
        if s.max_batch_items == 0 || s.max_batch_items > 100_000 {
            return err("server.max_batch_items must be between 1 and 100000");
        }
        let instance = if s.instance.is_empty() {
            std::env::var("HOSTNAME").unwrap_or_else(|_| "piiguard".into())
        } else {
            s.instance
        };
        let server = ServerConfig {
            listen,
            health_listen,
            handshake_timeout: Duration::from_secs(s.handshake_timeout_secs),
            shutdown_grace: Duration::from_secs(s.shutdown_grace_secs),
            max_plaintext_bytes: s.max_plaintext_bytes,
            max_batch_items: s.max_batch_items,
            tls_reload_interval: (s.tls_reload_interval_secs > 0)
                .then(|| Duration::from_secs(s.tls_reload_interval_secs)),
            instance,
            ready_file: (!s.ready_file.is_empty()).then(|| PathBuf::from(s.ready_file)),
        };

        let tls = TlsFiles {
            cert: self.tls.cert,
            key: self.tls.key,
            client_ca: self.tls.client_ca,
            crl: self.tls.crl,
            allow_cn_identity: self.tls.allow_cn_identity,
            max_connection_age: Duration::from_secs(self.tls.max_connection_age_secs),
            max_connection_age_grace: Duration::from_secs(self.tls.max_connection_age_grace_secs),
        };
        if tls.max_connection_age.is_zero() || tls.max_connection_age.as_secs() > 86_400 {
            return err("tls.max_connection_age_secs must be between 1 and 86400");
        }
        if tls.max_connection_age_grace.as_secs() > 3600 {
            return err("tls.max_connection_age_grace_secs must be at most 3600");
        }

        let v = self.vault;
        let (addresses, insecure_http) =
            vault_addresses(v.address, v.addresses, v.allow_insecure_http)?;
        if !insecure_http && v.ca_cert.is_none() {
            return err("vault.ca_cert is required with an https:// Vault address");
        }
        if v.request_timeout_secs == 0 || v.request_timeout_secs > 300 {
            return err("vault.request_timeout_secs must be between 1 and 300");
        }
        if v.max_in_flight == 0 || v.max_in_flight > 10_000 {
            return err("vault.max_in_flight must be between 1 and 10000");
        }
        if v.queue_timeout_ms > 300_000 {
            return err("vault.queue_timeout_ms must be at most 300000");
        }
        let auth = match v.auth {
            RawVaultAuth::Approle {
                role_id_file,
                secret_id_file,
                mount,
            } => VaultAuth::Approle {
                role_id_file,
                secret_id_file,
                mount: mount_name("vault.auth.mount", &mount)?,
            },
            RawVaultAuth::TokenFile { token_file } => VaultAuth::TokenFile { token_file },
        };
        let vault = VaultConfig {
            addresses,
            ca_cert: v.ca_cert,
            insecure_http,
            transit_mount: mount_name("vault.transit_mount", &v.transit_mount)?,
            kv_mount: mount_name("vault.kv_mount", &v.kv_mount)?,
            request_timeout: Duration::from_secs(v.request_timeout_secs),
            namespace: v.namespace,
            admission: VaultAdmission {
                max_in_flight: v.max_in_flight,
                queue_timeout: Duration::from_millis(v.queue_timeout_ms),
            },
            auth,
        };

        let c = self.cache;
        if c.max_entries == 0 {
            return err("cache.max_entries must be at least 1");
        }
        if c.hard_ttl_secs == 0 || c.idle_ttl_secs == 0 {
            return err("cache.idle_ttl_secs and cache.hard_ttl_secs must be at least 1");
        }
        if c.idle_ttl_secs > c.hard_ttl_secs {
            return err("cache.idle_ttl_secs must not exceed cache.hard_ttl_secs");
        }
        if c.hard_ttl_secs > 24 * 3600 {
            return err(
                "cache.hard_ttl_secs must not exceed 86400 (it bounds how long a shredded key can survive)",
            );
        }
        if c.max_uses_per_dek == 0 || c.max_uses_per_dek > GCM_RANDOM_NONCE_LIMIT {
            return err(format!(
                "cache.max_uses_per_dek must be between 1 and {GCM_RANDOM_NONCE_LIMIT} (2^32, the GCM limit of one key with random nonces)"
            ));
        }
        if c.token_entries > 10_000_000 {
            return err("cache.token_entries must not exceed 10000000");
        }
        if c.expanded_keys > 1_000_000 {
            return err(
                "cache.expanded_keys must not exceed 1000000 (each costs ~0.7 KiB of memory)",
            );
        }
        let cache = CacheConfig {
            token_entries: c.token_entries,
            expanded_keys: c.expanded_keys,
            max_entries: c.max_entries,
            idle_ttl: Duration::from_secs(c.idle_ttl_secs),
            hard_ttl: Duration::from_secs(c.hard_ttl_secs),
            max_uses_per_dek: c.max_uses_per_dek,
        };

        let log = LogConfig {
            json: match self.log.format.as_str() {
                "json" => true,
                "text" => false,
                other => return err(format!("log.format {other:?}: expected json or text")),
            },
            level: self.log.level,
        };

        if self.keyspaces.is_empty() {
            return err("at least one [keyspaces.NAME] table is required");
        }
        let mut keyspaces = BTreeMap::new();
        for (name, ks) in self.keyspaces {
            if !Keyspace::is_valid(&name) {
                return err(format!(
                    "keyspace name {name:?}: use 1-{MAX_KEYSPACE_LEN} characters of a-z 0-9 _ -"
                ));
            }
            let algorithm = match ks.algorithm.as_deref() {
                None => Algorithm::Aes256Gcm,
                Some(a) => a
                    .parse()
                    .map_err(|e| ConfigError(format!("keyspaces.{name}.algorithm: {e}")))?,
            };
            let kek_rotate_days = ks.kek_rotate_days.unwrap_or(90);
            if kek_rotate_days == 0 || kek_rotate_days > 3650 {
                return err(format!(
                    "keyspaces.{name}.kek_rotate_days must be between 1 and 3650"
                ));
            }
            if ks.grace_secs > MAX_GRACE_SECS {
                return err(format!(
                    "keyspaces.{name}.grace_secs must not exceed {MAX_GRACE_SECS} (72 hours)"
                ));
            }
            let after_shred = match ks.after_shred.as_deref() {
                None | Some("new_key") => AfterShred::NewKey,
                Some("refuse") => AfterShred::Refuse,
                Some(other) => {
                    return err(format!(
                        "keyspaces.{name}.after_shred {other:?}: expected new_key or refuse"
                    ));
                }
            };
            let mut field_cfgs = BTreeMap::new();
            for (field, raw) in ks.fields {
                let f = fields::FieldConfig::from_raw(&name, &field, raw)?;
                field_cfgs.insert(field, f);
            }
            let max_dek_uses = ks.max_dek_uses.unwrap_or(DEFAULT_MAX_DEK_USES);
            if max_dek_uses == 0 || max_dek_uses > GCM_RANDOM_NONCE_LIMIT {
                return err(format!(
                    "keyspaces.{name}.max_dek_uses must be between 1 and 2^32 (NIST SP 800-38D)"
                ));
            }
            let dek_use_block = ks
                .dek_use_block
                .unwrap_or(DEFAULT_DEK_USE_BLOCK)
                .min(max_dek_uses);
            if dek_use_block == 0 {
                return err(format!("keyspaces.{name}.dek_use_block must be at least 1"));
            }
            keyspaces.insert(
                name,
                KeyspaceConfig {
                    algorithm,
                    kek_rotate_days,
                    grace: Duration::from_secs(ks.grace_secs),
                    default_retention: (ks.default_retention_secs > 0)
                        .then(|| Duration::from_secs(ks.default_retention_secs)),
                    after_shred,
                    fields: field_cfgs,
                    max_dek_uses,
                    dek_use_block,
                    max_dek_age: (ks.max_dek_age_secs > 0)
                        .then(|| Duration::from_secs(ks.max_dek_age_secs)),
                },
            );
        }
        let st = self.store;
        if !(st.url.starts_with("sqlite:")
            || st.url.starts_with("postgres://")
            || st.url.starts_with("postgresql://"))
        {
            return err("store.url must start with sqlite: or postgres://");
        }
        let e = self.erasure;
        if e.reaper_interval_secs == 0 || e.eviction_poll_millis == 0 || e.stale_shred_secs == 0 {
            return err("erasure intervals must be at least 1");
        }
        if e.reaper_alarm_after_failures == 0 || e.reaper_max_backoff_secs == 0 {
            return err(
                "erasure.reaper_alarm_after_failures and erasure.reaper_max_backoff_secs must be at least 1",
            );
        }
        if Duration::from_millis(e.eviction_poll_millis) > cache.hard_ttl {
            return err("erasure.eviction_poll_millis must not exceed cache.hard_ttl_secs");
        }
        let k = &self.kek;
        if k.poll_secs == 0
            || k.batch == 0
            || k.batch > 1000
            || k.concurrency == 0
            || k.concurrency > 64
        {
            return err("kek: poll_secs must be at least 1, batch 1..=1000, concurrency 1..=64");
        }
        if k.lease_secs < 2 {
            return err("kek.lease_secs must be at least 2");
        }
        let kek = KekConfig {
            poll: Duration::from_secs(k.poll_secs),
            batch: k.batch,
            concurrency: k.concurrency,
            lease: Duration::from_secs(k.lease_secs),
        };
        let erasure = ErasureConfig {
            reaper_interval: Duration::from_secs(e.reaper_interval_secs),
            eviction_poll: Duration::from_millis(e.eviction_poll_millis),
            stale_shred: Duration::from_secs(e.stale_shred_secs),
            backup_retention_days: e.backup_retention_days,
            reaper_alarm_after_failures: e.reaper_alarm_after_failures,
            reaper_max_backoff: Duration::from_secs(e.reaper_max_backoff_secs),
        };
        let policy = PolicyConfig {
            file: self.policy.file.ok_or_else(|| {
                ConfigError(
                    "policy.file is required: the access policy (default deny; see docs/POLICY.md)"
                        .into(),
                )
            })?,
            reload_interval: (self.policy.reload_interval_secs > 0)
                .then(|| Duration::from_secs(self.policy.reload_interval_secs)),
        };
        let audit = validate_audit(self.audit)?;
        let metrics_listen = if self.metrics.listen.is_empty() {
            None
        } else {
            Some(socket("metrics.listen", &self.metrics.listen)?)
        };
        let limits = validate_limits(self.limits)?;
        let mut break_glass = Vec::new();
        for b in &self.lockout.break_glass {
            match IdentityPattern::parse(b) {
                Ok(IdentityPattern::Exact(e)) => break_glass.push(e),
                Ok(IdentityPattern::Prefix(_)) => {
                    return err(format!(
                        "lockout.break_glass: {b:?}: exact identities only (no `*`)"
                    ));
                }
                Err(e) => return err(format!("lockout.break_glass: {e}")),
            }
        }
        let lockout = limits::LockoutConfig {
            max_failures: self.lockout.max_failures,
            window: Duration::from_secs(self.lockout.window_secs),
            cooldown: Duration::from_secs(self.lockout.cooldown_secs),
            break_glass,
        };
        if lockout.max_failures > 0
            && (self.lockout.window_secs == 0 || self.lockout.cooldown_secs == 0)
        {
            return err("lockout.window_secs and lockout.cooldown_secs must be at least 1");
        }
        let mut subjects = Vec::new();
        for c in self.canaries.subject {
            if !keyspaces.contains_key(&c.keyspace) {
                return err(format!(
                    "canaries.subject: keyspace {:?} is not configured",
                    c.keyspace
                ));
            }
            if !SubjectId::is_valid(&c.subject) {
                return err("canaries.subject: subject must be 1-256 bytes");
            }
            subjects.push(CanarySubject {
                keyspace: c.keyspace,
                subject: c.subject,
                label: c.label,
            });
        }
        let canaries = CanariesConfig {
            lockout: self.canaries.lockout,
            subjects,
            tokens: self.canaries.tokens,
            refresh: Duration::from_secs(self.canaries.refresh_secs.max(1)),
        };
        let alarms = AlarmsConfig {
            webhook_url: match self.alarms.webhook_url.as_str() {
                "" => None,
                u => Some(webhook_url(u)?),
            },
            webhook_ca: self.alarms.webhook_ca,
        };
        Ok(Config {
            server,
            tls,
            vault,
            cache,
            log,
            store: StoreConfig { url: st.url },
            erasure,
            keyspaces,
            policy,
            audit,
            metrics_listen,
            limits,
            lockout,
            canaries,
            alarms,
            kek,
        })
    }
}

fn validate_audit(a: RawAudit) -> Result<AuditConfig, ConfigError> {
    let dir = a
        .dir
        .ok_or_else(|| ConfigError("audit.dir is required: the folder of the audit log".into()))?;
    if a.retention_days == 0 {
        return err("audit.retention_days must be at least 1");
    }
    if a.retention_days < 90 && !a.allow_retention_under_90_days {
        return err(format!(
            "audit.retention_days = {} is under the 90 days the data-protection policy requires; \
             set audit.allow_retention_under_90_days = true to override",
            a.retention_days
        ));
    }
    if a.retention_days > 36_500 {
        return err("audit.retention_days must not exceed 36500");
    }
    if a.rotate_bytes < 1024 || a.rotate_secs == 0 {
        return err("audit.rotate_bytes must be at least 1024 and audit.rotate_secs at least 1");
    }
    if a.checkpoint_secs == 0 || a.fsync_interval_ms == 0 {
        return err("audit.checkpoint_secs and audit.fsync_interval_ms must be at least 1");
    }
    if a.queue_capacity < 16 {
        return err("audit.queue_capacity must be at least 16");
    }
    if !(1..=MAX_REFS_PER_RECORD).contains(&a.max_refs_per_record) {
        return err(format!(
            "audit.max_refs_per_record must be between 1 and {MAX_REFS_PER_RECORD}"
        ));
    }
    Ok(AuditConfig {
        dir,
        rotate_bytes: a.rotate_bytes,
        rotate_interval: Duration::from_secs(a.rotate_secs),
        retention: Duration::from_secs(a.retention_days * 86_400),
        checkpoint_interval: Duration::from_secs(a.checkpoint_secs),
        fsync_interval: Duration::from_millis(a.fsync_interval_ms),
        queue_capacity: a.queue_capacity,
        max_refs_per_record: a.max_refs_per_record,
    })
}

/// Largest `audit.max_refs_per_record` (a record listing more would be a very long line).
pub const MAX_REFS_PER_RECORD: usize = 10_000;

fn limit_set(
    what: &str,
    calls: &[String],
    items: &[String],
) -> Result<limits::LimitSet, ConfigError> {
    let parse = |v: &[String], key: &str| -> Result<Vec<limits::Window>, ConfigError> {
        v.iter()
            .map(|s| {
                limits::Window::parse(s).map_err(|e| ConfigError(format!("{what}.{key}: {e}")))
            })
            .collect()
    };
    Ok(limits::LimitSet {
        calls: parse(calls, "calls")?,
        revealed_items: parse(items, "revealed_items")?,
    })
}

fn validate_limits(l: RawLimits) -> Result<limits::LimitsConfig, ConfigError> {
    let default = limit_set("limits", &l.calls, &l.revealed_items)?;
    let mut overrides = Vec::new();
    for (pat, set) in l.identity {
        let p = IdentityPattern::parse(&pat)
            .map_err(|e| ConfigError(format!("limits.identity: {e}")))?;
        overrides.push((
            p,
            limit_set(
                &format!("limits.identity.{pat:?}"),
                &set.calls,
                &set.revealed_items,
            )?,
        ));
    }
    // Exact identities win over prefixes, longer prefixes over shorter ones.
    overrides.sort_by_key(|(p, _)| match p {
        IdentityPattern::Exact(_) => (0, 0),
        IdentityPattern::Prefix(s) => (1, usize::MAX - s.len()),
    });
    Ok(limits::LimitsConfig { default, overrides })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[tls]
cert = "s.pem"
key = "s.key"
client_ca = "ca.pem"
[vault]
address = "https://vault:8200"
ca_cert = "vault-ca.pem"
auth = { method = "approle", role_id_file = "r", secret_id_file = "s" }
[keyspaces.orders]
[keyspaces.crm]
algorithm = "aes-128-gcm"
[policy]
file = "policy.toml"
[audit]
dir = "audit"
"#;

    #[test]
    fn debug_output_never_shows_the_database_password() {
        let env = vec![(
            "PIIGUARD_STORE__URL".to_string(),
            "postgres://piiguard:s3cr3t-pw@db.internal:5432/piiguard?sslmode=verify-full"
                .to_string(),
        )];
        let c = parse(include_str!("../../piiguard.example.toml"), env).unwrap();
        assert!(
            c.store.url.contains("s3cr3t-pw"),
            "the real URL is kept for use"
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        assert!(shown.contains("postgres://piiguard:***@db.internal:5432/piiguard"));
        assert_eq!(
            redact_url("postgres://db/x?user=a&password=hunter2&sslmode=require"),
            "postgres://db/x?user=a&password=***&sslmode=require"
        );
        assert_eq!(redact_url("sqlite://piiguard.db"), "sqlite://piiguard.db");
        assert_eq!(redact_url("postgres://u@h/d"), "postgres://u@h/d");
    }

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(MINIMAL, no_env()).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:7443");
        assert_eq!(c.keyspaces["orders"].algorithm, Algorithm::Aes256Gcm);
        assert_eq!(c.keyspaces["crm"].algorithm, Algorithm::Aes128Gcm);
        assert_eq!(c.cache.hard_ttl, Duration::from_secs(3600));
        assert!(!c.vault.insecure_http);
    }

    #[test]
    fn the_annotated_example_config_is_valid() {
        let c = parse(include_str!("../../piiguard.example.toml"), no_env()).unwrap();
        assert_eq!(c.keyspaces.len(), 2);
        assert!(matches!(c.vault.auth, VaultAuth::Approle { .. }));
    }

    #[test]
    fn the_kubernetes_config_map_is_valid() {
        let yaml = include_str!("../../deploy/kubernetes/configmap.yaml");
        let (_, block) = yaml.split_once("piiguard.toml: |\n").unwrap();
        let block = block.split("\n---").next().unwrap();
        let toml: String = block
            .lines()
            .map(|l| l.strip_prefix("    ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let c = parse(&toml, no_env()).unwrap();
        assert!(c.store.url.starts_with("postgres://"));
        let (_, policy) = yaml.split_once("policy.toml: |\n").unwrap();
        let policy: String = policy
            .lines()
            .map(|l| l.strip_prefix("    ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let known = c.keyspaces.keys().cloned().collect();
        crate::access::policy::Policy::parse(&policy, Some(&known)).unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:7443");
    }

    #[test]
    fn dek_use_limit_defaults_to_a_fraction_of_the_gcm_bound_and_is_bounded() {
        let c = parse(MINIMAL, Vec::new()).unwrap();
        assert_eq!(c.cache.max_uses_per_dek, 1 << 24);
        let with = |v: &str| {
            parse(
                MINIMAL,
                vec![(
                    "PIIGUARD_CACHE__MAX_USES_PER_DEK".to_string(),
                    v.to_string(),
                )],
            )
        };
        assert_eq!(with("1000").unwrap().cache.max_uses_per_dek, 1000);
        assert_eq!(with("4294967296").unwrap().cache.max_uses_per_dek, 1 << 32);
        for bad in ["0", "4294967297"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("cache.max_uses_per_dek"), "{bad}: {e}");
        }
    }

    #[test]
    fn expanded_keys_default_on_can_be_off_and_are_bounded() {
        let c = parse(MINIMAL, Vec::new()).unwrap();
        assert_eq!(c.cache.expanded_keys, 65_536);
        let with = |v: &str| {
            parse(
                MINIMAL,
                vec![("PIIGUARD_CACHE__EXPANDED_KEYS".to_string(), v.to_string())],
            )
        };
        assert_eq!(with("0").unwrap().cache.expanded_keys, 0);
        let e = with("1000001").unwrap_err().to_string();
        assert!(e.contains("cache.expanded_keys"), "{e}");
    }

    #[test]
    fn token_caches_default_on_can_be_off_and_are_bounded() {
        let c = parse(MINIMAL, Vec::new()).unwrap();
        assert_eq!(c.cache.token_entries, 65_536);
        let with = |v: &str| {
            parse(
                MINIMAL,
                vec![("PIIGUARD_CACHE__TOKEN_ENTRIES".to_string(), v.to_string())],
            )
        };
        assert_eq!(with("0").unwrap().cache.token_entries, 0);
        let e = with("10000001").unwrap_err().to_string();
        assert!(e.contains("cache.token_entries"), "{e}");
    }

    #[test]
    fn env_overrides_apply() {
        let env = vec![
            (
                "PIIGUARD_SERVER__LISTEN".to_string(),
                "0.0.0.0:9443".to_string(),
            ),
            ("PIIGUARD_CACHE__MAX_ENTRIES".to_string(), "42".to_string()),
            ("PIIGUARD_CONFIG".to_string(), "ignored".to_string()),
            ("OTHER__X".to_string(), "ignored".to_string()),
        ];
        let c = parse(MINIMAL, env).unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:9443");
        assert_eq!(c.cache.max_entries, 42);
    }

    #[test]
    fn audit_policy_limits_sections() {
        let c = parse(MINIMAL, no_env()).unwrap();
        assert_eq!(c.audit.retention, Duration::from_secs(90 * 86_400));
        assert_eq!(c.policy.reload_interval, Some(Duration::from_secs(10)));
        assert!(c.metrics_listen.is_none());
        assert_eq!(c.lockout.max_failures, 50);
        assert_eq!(c.audit.max_refs_per_record, 64);
        for (from, to, needle) in [
            ("[audit]\ndir = \"audit\"\n", "", "audit.dir is required"),
            (
                "[policy]\nfile = \"policy.toml\"\n",
                "",
                "policy.file is required",
            ),
            (
                "dir = \"audit\"",
                "dir = \"a\"\nretention_days = 30",
                "under the 90 days",
            ),
            (
                "dir = \"audit\"",
                "dir = \"a\"\n[limits]\ncalls = [\"10/1w\"]",
                "limits.calls",
            ),
            (
                "dir = \"audit\"",
                "dir = \"a\"\nmax_refs_per_record = 0",
                "audit.max_refs_per_record",
            ),
            (
                "dir = \"audit\"",
                "dir = \"a\"\nmax_refs_per_record = 10001",
                "audit.max_refs_per_record",
            ),
        ] {
            let e = parse(&MINIMAL.replace(from, to), no_env()).unwrap_err();
            assert!(e.0.contains(needle), "{needle}: {e}");
        }
        let short = MINIMAL.replace(
            "dir = \"audit\"",
            "dir = \"a\"\nretention_days = 1\nallow_retention_under_90_days = true\n\
             [limits]\ncalls = [\"10/1s\", \"1000/1d\"]\nrevealed_items = [\"5/1m\"]\n\
             [limits.identity.\"spiffe://shop/*\"]\ncalls = [\"1/1s\"]",
        );
        let c = parse(&short, no_env()).unwrap();
        assert_eq!(c.audit.retention, Duration::from_secs(86_400));
        assert_eq!(c.limits.default.calls.len(), 2);
        assert_eq!(c.limits.overrides.len(), 1);
    }

    #[test]
    fn port_zero_listeners_and_a_ready_file() {
        let c = parse(MINIMAL, no_env()).unwrap();
        assert_eq!(c.server.ready_file, None);
        let env = vec![
            (
                "PIIGUARD_SERVER__LISTEN".to_string(),
                "127.0.0.1:0".to_string(),
            ),
            (
                "PIIGUARD_SERVER__HEALTH_LISTEN".to_string(),
                "127.0.0.1:0".to_string(),
            ),
            (
                "PIIGUARD_METRICS__LISTEN".to_string(),
                "127.0.0.1:0".to_string(),
            ),
            (
                "PIIGUARD_SERVER__READY_FILE".to_string(),
                "/run/piiguard/ready.json".to_string(),
            ),
        ];
        let c = parse(MINIMAL, env).unwrap();
        assert_eq!(c.server.listen.port(), 0);
        assert_eq!(c.server.health_listen.map(|a| a.port()), Some(0));
        assert_eq!(c.metrics_listen.map(|a| a.port()), Some(0));
        assert_eq!(
            c.server.ready_file.as_deref(),
            Some(Path::new("/run/piiguard/ready.json"))
        );
    }

    #[test]
    fn vault_admission_has_defaults_and_bounds() {
        let c = parse(MINIMAL, no_env()).unwrap();
        assert_eq!(c.vault.admission, VaultAdmission::default());
        assert_eq!(c.vault.admission.max_in_flight, 64);
        assert_eq!(c.vault.admission.queue_timeout, Duration::from_millis(2000));
        let set = |extra: &str| MINIMAL.replace("[vault]\n", &format!("[vault]\n{extra}\n"));
        let c = parse(&set("max_in_flight = 8\nqueue_timeout_ms = 0"), no_env()).unwrap();
        assert_eq!(c.vault.admission.max_in_flight, 8);
        assert!(c.vault.admission.queue_timeout.is_zero());
        for bad in ["max_in_flight = 0", "queue_timeout_ms = 300001"] {
            let e = parse(&set(bad), no_env()).unwrap_err();
            assert!(e.0.contains("vault."), "{bad}: {e}");
        }
    }

    #[test]
    fn client_ca_is_required() {
        let text = MINIMAL.replace("client_ca = \"ca.pem\"\n", "");
        let e = parse(&text, no_env()).unwrap_err();
        assert!(e.0.contains("client_ca"), "{e}");
    }

    /// Security review finding 10, second half: the webhook URL was checked on its text, so
    /// `http://localhost@evil.example` (host `evil.example`) passed as loopback.
    #[test]
    fn webhook_url_is_parsed_before_the_loopback_check() {
        for ok in [
            "https://alerts.example/hook",
            "http://127.0.0.1:9000/hook",
            "http://localhost/hook",
            "http://[::1]:8080/",
            "http://127.9.9.9/x",
        ] {
            assert!(webhook_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://localhost@evil.example/hook",
            "http://127.0.0.1:9000@evil.example/",
            "http://localhost.evil.example/",
            "http://127.0.0.1.evil.example/",
            "http://[::1].evil.example/",
            "https://user:pw@alerts.example/",
            "http://evil.example/",
            "ftp://127.0.0.1/",
            "localhost/hook",
        ] {
            assert!(webhook_url(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn plain_http_vault_needs_explicit_dev_flag_and_loopback() {
        let text = MINIMAL.replace("https://vault:8200", "http://127.0.0.1:8200");
        assert!(parse(&text, no_env()).unwrap_err().0.contains("plain HTTP"));
        let text2 = text.replace("[vault]\n", "[vault]\nallow_insecure_http = true\n");
        assert!(parse(&text2, no_env()).unwrap().vault.insecure_http);
        let text3 = text2.replace("127.0.0.1", "10.0.0.1");
        assert!(parse(&text3, no_env()).unwrap_err().0.contains("loopback"));
    }

    /// `vault.addresses`: a list (TOML array, or comma-separated from the environment), each
    /// address checked like `vault.address`; `vault.address` is a one-element list; both set,
    /// neither, an empty list, a duplicate or mixed schemes are refused.
    #[test]
    fn vault_addresses_are_a_list_and_address_is_one_of_them() {
        let one = parse(MINIMAL, no_env()).unwrap();
        assert_eq!(one.vault.addresses, vec!["https://vault:8200".to_string()]);
        let list = |v: &str| MINIMAL.replace("address = \"https://vault:8200\"", v);
        let three = parse(
            &list(r#"addresses = ["https://a:8200/", "https://b:8200", "https://c:8200"]"#),
            no_env(),
        )
        .unwrap();
        assert_eq!(
            three.vault.addresses,
            ["https://a:8200", "https://b:8200", "https://c:8200"]
        );
        let no_address = list("");
        for form in [
            " https://a:8200, https://b:8200 ",
            r#"["https://a:8200", "https://b:8200"]"#,
        ] {
            let env = vec![("PIIGUARD_VAULT__ADDRESSES".to_string(), form.to_string())];
            let c = parse(&no_address, env).unwrap();
            assert_eq!(
                c.vault.addresses,
                ["https://a:8200", "https://b:8200"],
                "{form}"
            );
        }
        let refused = [
            (list(r#"addresses = []"#), "empty"),
            (list(r#"addresses = "" "#), "empty"),
            (no_address.clone(), "required"),
            (
                list("address = \"https://a:8200\"\naddresses = [\"https://b:8200\"]"),
                "both set",
            ),
            (
                list(r#"addresses = ["https://a:8200", "https://a:8200/"]"#),
                "twice",
            ),
            (
                list(r#"addresses = ["https://a:8200", "http://10.0.0.1:8200"]"#),
                "plain HTTP",
            ),
            (
                list(
                    "addresses = [\"https://a:8200\", \"http://127.0.0.1:8200\"]\nallow_insecure_http = true",
                ),
                "mixes",
            ),
            (
                list(r#"addresses = ["https://a:8200", "https://u:p@b:8200"]"#),
                "user info",
            ),
        ];
        for (text, why) in refused {
            let e = parse(&text, no_env()).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
        let many: Vec<String> = (0..=MAX_VAULT_ADDRESSES)
            .map(|i| format!("\"https://v{i}:8200\""))
            .collect();
        let e = parse(
            &list(&format!("addresses = [{}]", many.join(","))),
            no_env(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
    }

    /// Security finding 10: the old check split the address by hand and took
    /// `http://localhost:8200@evil.example` for a loopback address.
    #[test]
    fn vault_address_is_parsed_before_the_loopback_check() {
        for bad in [
            "http://localhost:8200@evil.example",
            "http://localhost:8200@evil.example:8200",
            "http://127.0.0.1:8200@evil.example",
            "http://127.0.0.1@evil.example",
            "http://[::1]:8200@evil.example",
            "http://localhost@10.0.0.1:8200",
            "http://localhost.evil.example:8200",
            "http://127.0.0.1.evil.example:8200",
            "http://evil.example#@127.0.0.1:8200",
            "http://evil.example?@127.0.0.1:8200",
            "http://evil.example/@localhost:8200",
            "http://10.0.0.1:8200",
            "http://0.0.0.0:8200",
        ] {
            assert!(vault_address(bad, true).is_err(), "{bad} accepted");
            let text = MINIMAL
                .replace("https://vault:8200", bad)
                .replace("[vault]\n", "[vault]\nallow_insecure_http = true\n");
            let e = parse(&text, no_env()).expect_err(bad);
            assert!(e.0.contains("vault.address"), "{bad}: {e}");
        }
        // User info is refused on https too (credentials do not belong in the address).
        assert!(vault_address("https://user:pw@vault:8200", false).is_err());
        assert!(vault_address("https://vault:8200/prefix", false).is_err());
        assert!(vault_address("ftp://vault:8200", false).is_err());
        for (good, norm) in [
            ("http://localhost:8200", "http://localhost:8200"),
            ("http://LOCALHOST:8200/", "http://localhost:8200"),
            ("http://127.0.0.1:8200", "http://127.0.0.1:8200"),
            ("http://127.1.2.3:8200", "http://127.1.2.3:8200"),
            ("http://[::1]:8200", "http://[::1]:8200"),
        ] {
            assert_eq!(vault_address(good, true).unwrap(), (norm.to_string(), true));
            assert!(
                vault_address(good, false)
                    .unwrap_err()
                    .0
                    .contains("plain HTTP")
            );
        }
        assert_eq!(
            vault_address("https://vault.example:8200/", false).unwrap(),
            ("https://vault.example:8200".to_string(), false)
        );
    }

    #[test]
    fn bad_values_are_refused_with_a_clear_message() {
        for (from, to, needle) in [
            ("[keyspaces.orders]", "[keyspaces.Orders]", "keyspace name"),
            ("aes-128-gcm", "des", "unknown algorithm"),
            (
                "[tls]",
                "[server]\nlisten = \"nope\"\n[tls]",
                "server.listen",
            ),
            ("[tls]", "[server]\nbogus = 1\n[tls]", "bogus"),
            (
                "[tls]",
                "[lockout]\nbreak_glass = [\"admin.shop.local\"]\n[tls]",
                "does not name its kind",
            ),
            (
                "[tls]",
                "[lockout]\nbreak_glass = [\"spiffe://shop/*\"]\n[tls]",
                "exact identities only",
            ),
            (
                "[tls]",
                "[limits.identity.\"reports.shop.local\"]\ncalls = [\"1/1s\"]\n[tls]",
                "does not name its kind",
            ),
            (
                "client_ca = \"ca.pem\"",
                "client_ca = \"ca.pem\"\nmax_connection_age_secs = 0",
                "tls.max_connection_age_secs",
            ),
        ] {
            let e = parse(&MINIMAL.replace(from, to), no_env()).unwrap_err();
            assert!(e.0.contains(needle), "{needle}: {e}");
        }
    }
}
