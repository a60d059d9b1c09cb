//! Configuration: a TOML file, then `PIIGUARD_*` environment overrides, then validation into a
//! typed [`Config`]. Nothing here has a secret default: credentials are read from files whose
//! paths the operator gives.
//!
//! Environment overrides name a key path with `__` between levels, e.g.
//! `PIIGUARD_SERVER__LISTEN=0.0.0.0:7443` or `PIIGUARD_VAULT__ADDRESS=https://vault:8200`.
//! Values are read as TOML scalars (numbers, booleans) when they parse as such, else as strings.

pub mod limits;

use std::collections::BTreeMap;
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
    #[serde(default)]
    pub server: RawServer,
    pub tls: RawTls,
    pub vault: RawVault,
    #[serde(default)]
    pub cache: RawCache,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub erasure: RawErasure,
    #[serde(default)]
    pub keyspaces: BTreeMap<String, RawKeyspace>,
    #[serde(default)]
    pub policy: RawPolicyConfig,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub lockout: RawLockout,
    #[serde(default)]
    pub canaries: RawCanaries,
    #[serde(default)]
    pub alarms: RawAlarms,
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
    pub calls: Vec<String>,
    pub revealed_items: Vec<String>,
    pub identity: BTreeMap<String, RawLimitSet>,
}

/// `[lockout]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLockout {
    /// Denied or failed calls within `window_secs` that lock an identity out (0 = off).
    pub max_failures: u32,
    pub window_secs: u64,
    pub cooldown_secs: u64,
}

impl Default for RawLockout {
    fn default() -> Self {
        Self {
            max_failures: 50,
            window_secs: 60,
            cooldown_secs: 900,
        }
    }
}

/// A configured canary subject.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCanarySubject {
    pub keyspace: String,
    pub subject: String,
    #[serde(default)]
    pub label: String,
}

/// `[canaries]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCanaries {
    /// Lock the caller out when it touches a canary.
    pub lockout: bool,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// `sqlite://PATH` (default, one file) or `postgres://…` (several replicas).
    pub url: String,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            url: "sqlite://piiguard.db".into(),
        }
    }
}

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
}

impl Default for RawErasure {
    fn default() -> Self {
        Self {
            reaper_interval_secs: 30,
            eviction_poll_millis: 1000,
            stale_shred_secs: 60,
            backup_retention_days: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// mTLS gRPC listener.
    pub listen: String,
    /// Plaintext listener serving only grpc.health.v1 (for orchestrator probes). Empty = off.
    pub health_listen: String,
    pub handshake_timeout_secs: u64,
    pub max_plaintext_bytes: usize,
    pub max_batch_items: usize,
    /// How often certificate, key, CA and CRL files are checked for changes (0 = only SIGHUP).
    pub tls_reload_interval_secs: u64,
    /// Name of this instance in logs (defaults to the host name).
    pub instance: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7443".into(),
            health_listen: "127.0.0.1:7080".into(),
            handshake_timeout_secs: 5,
            max_plaintext_bytes: 64 * 1024,
            max_batch_items: 10_000,
            tls_reload_interval_secs: 30,
            instance: String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA that issues client certificates. Required: there is no mode without client auth.
    pub client_ca: PathBuf,
    #[serde(default)]
    pub crl: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVault {
    pub address: String,
    /// CA bundle for Vault's HTTPS certificate.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// Allow `http://` to a loopback Vault (dev mode only). Never enable in production.
    #[serde(default)]
    pub allow_insecure_http: bool,
    #[serde(default = "default_transit_mount")]
    pub transit_mount: String,
    #[serde(default = "default_kv_mount")]
    pub kv_mount: String,
    #[serde(default = "default_vault_timeout")]
    pub request_timeout_secs: u64,
    /// Vault namespace (OpenBao / Vault Enterprise), optional.
    #[serde(default)]
    pub namespace: Option<String>,
    pub auth: RawVaultAuth,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "method", rename_all = "snake_case")]
pub enum RawVaultAuth {
    /// AppRole: role id and secret id are read from files.
    Approle {
        role_id_file: PathBuf,
        secret_id_file: PathBuf,
        #[serde(default = "default_approle_mount")]
        mount: String,
    },
    /// A token read from a file (e.g. a Vault Agent sink); re-read when it changes.
    TokenFile { token_file: PathBuf },
}

fn default_approle_mount() -> String {
    "approle".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    pub max_entries: usize,
    pub idle_ttl_secs: u64,
    /// Longest time an unwrapped DEK may stay in memory, used or not.
    pub hard_ttl_secs: u64,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            idle_ttl_secs: 600,
            hard_ttl_secs: 3600,
        }
    }
}

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
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsFiles,
    pub vault: VaultConfig,
    pub cache: CacheConfig,
    pub log: LogConfig,
    pub store: StoreConfig,
    pub erasure: ErasureConfig,
    pub keyspaces: BTreeMap<String, KeyspaceConfig>,
    pub policy: PolicyConfig,
    pub audit: AuditConfig,
    pub metrics_listen: Option<SocketAddr>,
    pub limits: limits::LimitsConfig,
    pub lockout: limits::LockoutConfig,
    pub canaries: CanariesConfig,
    pub alarms: AlarmsConfig,
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub file: PathBuf,
    pub reload_interval: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    pub rotate_bytes: u64,
    pub rotate_interval: Duration,
    pub retention: Duration,
    pub checkpoint_interval: Duration,
    pub fsync_interval: Duration,
    pub queue_capacity: usize,
}

#[derive(Debug, Clone)]
pub struct CanarySubject {
    pub keyspace: String,
    pub subject: String,
    pub label: String,
}

#[derive(Debug, Clone)]
pub struct CanariesConfig {
    pub lockout: bool,
    pub subjects: Vec<CanarySubject>,
    pub tokens: Vec<String>,
    pub refresh: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct AlarmsConfig {
    pub webhook_url: Option<String>,
    pub webhook_ca: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub url: String,
}

#[derive(Debug, Clone)]
pub struct ErasureConfig {
    pub reaper_interval: Duration,
    pub eviction_poll: Duration,
    pub stale_shred: Duration,
    pub backup_retention_days: u64,
}

/// What happens when a shredded subject id is used again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterShred {
    NewKey,
    Refuse,
}

/// Longest shred grace window: ADPP 1.7 requires deletion within 72 hours.
pub const MAX_GRACE_SECS: u64 = 72 * 3600;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub health_listen: Option<SocketAddr>,
    pub handshake_timeout: Duration,
    pub max_plaintext_bytes: usize,
    pub max_batch_items: usize,
    pub tls_reload_interval: Option<Duration>,
    pub instance: String,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct VaultConfig {
    pub address: String,
    pub ca_cert: Option<PathBuf>,
    pub insecure_http: bool,
    pub transit_mount: String,
    pub kv_mount: String,
    pub request_timeout: Duration,
    pub namespace: Option<String>,
    pub auth: VaultAuth,
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
            let loopback = match url.host() {
                Some(url::Host::Domain(d)) => d == "localhost",
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            };
            if !loopback {
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

#[derive(Debug, Clone)]
pub enum VaultAuth {
    Approle {
        role_id_file: PathBuf,
        secret_id_file: PathBuf,
        mount: String,
    },
    TokenFile {
        token_file: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub max_entries: usize,
    pub idle_ttl: Duration,
    pub hard_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub json: bool,
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct KeyspaceConfig {
    pub algorithm: Algorithm,
    pub kek_rotate_days: u64,
    pub grace: Duration,
    pub default_retention: Option<Duration>,
    pub after_shred: AfterShred,
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
            max_plaintext_bytes: s.max_plaintext_bytes,
            max_batch_items: s.max_batch_items,
            tls_reload_interval: (s.tls_reload_interval_secs > 0)
                .then(|| Duration::from_secs(s.tls_reload_interval_secs)),
            instance,
        };

        let tls = TlsFiles {
            cert: self.tls.cert,
            key: self.tls.key,
            client_ca: self.tls.client_ca,
            crl: self.tls.crl,
        };

        let v = self.vault;
        let (address, insecure_http) = vault_address(&v.address, v.allow_insecure_http)?;
        if !insecure_http && v.ca_cert.is_none() {
            return err("vault.ca_cert is required with an https:// Vault address");
        }
        if v.request_timeout_secs == 0 || v.request_timeout_secs > 300 {
            return err("vault.request_timeout_secs must be between 1 and 300");
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
            address,
            ca_cert: v.ca_cert,
            insecure_http,
            transit_mount: mount_name("vault.transit_mount", &v.transit_mount)?,
            kv_mount: mount_name("vault.kv_mount", &v.kv_mount)?,
            request_timeout: Duration::from_secs(v.request_timeout_secs),
            namespace: v.namespace,
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
        let cache = CacheConfig {
            max_entries: c.max_entries,
            idle_ttl: Duration::from_secs(c.idle_ttl_secs),
            hard_ttl: Duration::from_secs(c.hard_ttl_secs),
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
            keyspaces.insert(
                name,
                KeyspaceConfig {
                    algorithm,
                    kek_rotate_days,
                    grace: Duration::from_secs(ks.grace_secs),
                    default_retention: (ks.default_retention_secs > 0)
                        .then(|| Duration::from_secs(ks.default_retention_secs)),
                    after_shred,
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
        if Duration::from_millis(e.eviction_poll_millis) > cache.hard_ttl {
            return err("erasure.eviction_poll_millis must not exceed cache.hard_ttl_secs");
        }
        let erasure = ErasureConfig {
            reaper_interval: Duration::from_secs(e.reaper_interval_secs),
            eviction_poll: Duration::from_millis(e.eviction_poll_millis),
            stale_shred: Duration::from_secs(e.stale_shred_secs),
            backup_retention_days: e.backup_retention_days,
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
        let lockout = limits::LockoutConfig {
            max_failures: self.lockout.max_failures,
            window: Duration::from_secs(self.lockout.window_secs),
            cooldown: Duration::from_secs(self.lockout.cooldown_secs),
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
                u if u.starts_with("https://")
                    || u.starts_with("http://127.0.0.1")
                    || u.starts_with("http://localhost")
                    || u.starts_with("http://[::1]") =>
                {
                    Some(u.to_string())
                }
                u => {
                    return err(format!(
                        "alarms.webhook_url {u:?} must be https:// (plain http only to loopback)"
                    ));
                }
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
    Ok(AuditConfig {
        dir,
        rotate_bytes: a.rotate_bytes,
        rotate_interval: Duration::from_secs(a.rotate_secs),
        retention: Duration::from_secs(a.retention_days * 86_400),
        checkpoint_interval: Duration::from_secs(a.checkpoint_secs),
        fsync_interval: Duration::from_millis(a.fsync_interval_ms),
        queue_capacity: a.queue_capacity,
    })
}

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
    fn client_ca_is_required() {
        let text = MINIMAL.replace("client_ca = \"ca.pem\"\n", "");
        let e = parse(&text, no_env()).unwrap_err();
        assert!(e.0.contains("client_ca"), "{e}");
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
        ] {
            let e = parse(&MINIMAL.replace(from, to), no_env()).unwrap_err();
            assert!(e.0.contains(needle), "{needle}: {e}");
        }
    }
}
