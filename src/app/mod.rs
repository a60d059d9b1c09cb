//! Assembles and runs the service: TLS, Vault, keys, gRPC services, health listener.
//!
//! Start-up order: TLS files are loaded and Vault is logged into and every keyspace's index
//! key is loaded *before* any port is bound, so nothing serves before it can answer. Once every
//! listener is bound, the addresses bound are written to `server.ready_file` ([`ready`]). The
//! TLS config and the access policy are then kept current by [`reload`].

pub mod ready;

/// Why the service could not start (or stopped with an error): a message for the operator,
/// naming the listener, file or backend. Vault's own answers are not in it (they are logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

impl From<String> for StartError {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<crate::audit::webhook::WebhookError> for StartError {
    fn from(e: crate::audit::webhook::WebhookError) -> Self {
        Self(e.to_string())
    }
}

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::access::alarms::{Alarms, Webhook};
use crate::access::canary::Canaries;
use crate::access::guard::Sentry;
use crate::access::limits::{Limits, Lockouts};
use crate::access::policy::Policy;
use crate::audit::Auditor;
use crate::config::Config;
use crate::error::Error;
use crate::keys::KeyManager;
use crate::keys::index_keys::IndexKeys;
use crate::keys::manager::{SEALING_KEY, SIGNING_KEY};
use crate::ops::Engine;
use crate::ops::erasure::Erasure;
use crate::ops::tokens::TokenEngine;
use crate::pb;
use crate::service::admin::AdminService;
use crate::service::crypto::CryptoService;
use crate::service::erasure::ErasureService;
use crate::service::keys::KeysService;
use crate::service::tokens::TokensService;
use crate::store::Store;
use crate::tls;
use crate::vault::Vault;
use crate::vault::signer::Signer;

pub mod reload;

use reload::{AuditReport, Reloader};

/// Largest gRPC message accepted (batches of many fields).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How often expired tokens are purged (Detokenize also purges an expired token it meets).
const TOKEN_PURGE_INTERVAL: Duration = Duration::from_secs(30);

/// Connects to Vault and loads the keyspaces, retrying while Vault is unavailable.
/// A permanent error (bad credentials, missing KEK, policy) is returned at once.
async fn connect_keys(
    cfg: &Config,
    vault: Arc<Vault>,
    store: Arc<Store>,
) -> Result<KeyManager, Error> {
    let mut backoff = Duration::from_millis(500);
    loop {
        let attempt = async {
            vault.login().await?;
            KeyManager::init(vault.clone(), store.clone(), &cfg.keyspaces, &cfg.cache).await
        };
        match attempt.await {
            Ok(k) => return Ok(k),
            Err(Error::Unavailable { detail }) => {
                tracing::warn!(detail = %detail, retry_in_ms = backoff.as_millis() as u64, "Vault unavailable at start; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs the server until `shutdown` resolves, then drains in-flight calls.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    tls::install_default_provider();
    // A ready file of a previous run must not be taken for this one's.
    if let Some(path) = &cfg.server.ready_file {
        ready::remove(path).map_err(|e| e.to_string())?;
    }
    let tls_files = cfg.tls.clone();
    let tls_reloader = Reloader::load("tls", tls::files_of(&cfg.tls), move || {
        tls::build_server_config(&tls_files)
    })
    .map_err(|e| format!("TLS: {e}"))?;
    let policy_file = cfg.policy.file.clone();
    let known = cfg.keyspaces.keys().cloned().collect();
    let policy_reloader = Reloader::load("policy", vec![policy_file.clone()], move || {
        Policy::load(&policy_file, Some(&known))
    })
    .map_err(|e| e.to_string())?;
    let vault = Arc::new(Vault::new(cfg.vault.clone()).map_err(|e| detail_of(&e))?);
    let store = Arc::new(
        Store::open(&cfg.store.url)
            .await
            .map_err(|e| format!("cannot start: {}", detail_of(&e)))?,
    );
    let keys = Arc::new(
        connect_keys(&cfg, vault.clone(), store.clone())
            .await
            .map_err(|e| format!("cannot start: {}", detail_of(&e)))?,
    );
    vault.spawn_renewal();
    keys.spawn_sweeper();
    // Sealed envelopes need the sealing key; a deployment bootstrapped before it existed
    // serves everything else (docs/KEYS.md).
    if !matches!(vault.transit_key_info(SEALING_KEY).await, Ok(Some(_))) {
        tracing::warn!(
            key = SEALING_KEY,
            "sealing key missing or not readable: Crypto.Unseal and Keys.GetPublicKey(SEALING) answer KEY_NOT_PROVISIONED until `piiguard bootstrap` is run again"
        );
    }

    let index_keys = Arc::new(IndexKeys::new(keys.clone(), &cfg.keyspaces));
    let engine = Arc::new(Engine {
        keys: keys.clone(),
        max_plaintext: cfg.server.max_plaintext_bytes,
        max_batch: cfg.server.max_batch_items,
        index_keys: index_keys.clone(),
    });

    // Metrics, audit, alarms, limits, canaries: all ready before any port is bound.
    let prometheus = match cfg.metrics_listen {
        Some(_) => Some(crate::metrics::install().map_err(|e| e.to_string())?),
        None => None,
    };
    let runtime = tokio::runtime::Handle::current();
    let webhook = match cfg.alarms.webhook_url {
        Some(_) => Some(Webhook::start(&cfg.alarms, &runtime)?),
        None => None,
    };
    let signer = Arc::new(Signer::new(vault.clone(), SIGNING_KEY));
    let audit = Auditor::start(
        cfg.audit.clone(),
        cfg.server.instance.clone(),
        Some(signer.clone()),
        runtime.clone(),
        webhook.clone(),
        Some(store),
    )
    .map_err(|e| e.to_string())?;
    let lockouts = Arc::new(Lockouts::new(cfg.lockout.clone()));
    let canaries = Arc::new(Canaries::new(cfg.canaries.lockout));
    for c in &cfg.canaries.subjects {
        canaries
            .add_subject(&keys, &c.keyspace, &c.subject, &c.label)
            .await
            .map_err(|e| format!("canary subject in {}: {}", c.keyspace, detail_of(&e)))?;
    }
    for t in &cfg.canaries.tokens {
        canaries.add_token(t.as_bytes());
    }
    match canaries.refresh(&vault).await {
        Ok(n) => tracing::info!(
            created = n,
            configured = cfg.canaries.subjects.len(),
            "canaries loaded"
        ),
        Err(e) => {
            tracing::warn!(error = %detail_of(&e), "canary registry not readable at start; retrying in the background")
        }
    }
    canaries.spawn_refresh(vault.clone(), cfg.canaries.refresh);
    let sentry = Arc::new(Sentry {
        policy: policy_reloader.subscribe(),
        audit: audit.clone(),
        alarms: Alarms::new(audit.clone(), webhook.clone(), cfg.server.instance.clone()),
        limits: Limits::new(cfg.limits.clone()),
        lockouts: lockouts.clone(),
        canaries,
    });
    let tls_config = tls_reloader.subscribe();
    let reloaders = [
        policy_reloader.spawn(cfg.policy.reload_interval, AuditReport::policy(&sentry)),
        tls_reloader.spawn(cfg.server.tls_reload_interval, AuditReport::tls(&sentry)),
    ];
    let p = sentry.policy.borrow().clone();
    sentry.event(
        "start",
        None,
        format!(
            "piiguard {} starting; access policy {} ({} grants, sha256 {})",
            env!("CARGO_PKG_VERSION"),
            cfg.policy.file.display(),
            p.grant_count,
            p.digest
        ),
    );
    for w in &p.warnings {
        tracing::warn!(warning = %w, "access policy");
    }

    let crypto =
        pb::crypto_server::CryptoServer::new(CryptoService::new(engine.clone(), sentry.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = pb::admin_server::AdminServer::new(AdminService::new(
        sentry.clone(),
        engine,
        vault.clone(),
        signer,
    ));

    let token_engine = Arc::new(
        TokenEngine::new(
            keys.clone(),
            cfg.server.max_plaintext_bytes,
            cfg.server.max_batch_items,
            cfg.cache.token_entries,
        )
        .map_err(|e| format!("cannot start: {}", detail_of(&e)))?,
    );
    token_engine.spawn_purger(TOKEN_PURGE_INTERVAL);
    let tokens_svc = pb::tokens_server::TokensServer::new(TokensService::new(
        token_engine,
        keys.clone(),
        sentry.clone(),
        index_keys,
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let erasure = Arc::new(
        Erasure::new(keys.clone(), Signer::new(vault.clone(), SIGNING_KEY), &cfg)
            .with_alarms(Alarms::new(
                audit.clone(),
                webhook,
                cfg.server.instance.clone(),
            ))
            .with_audit(audit.clone()),
    );
    erasure.spawn_background();
    let erasure_svc =
        pb::erasure_server::ErasureServer::new(ErasureService::new(erasure, sentry.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);

    // The KEK rotation job: applies each KEK's auto-rotation period from the config, then
    // rewraps wrapped DEKs after every KEK rotation (one replica at a time, by a store lease).
    let kek = Arc::new(
        crate::keys::kek::KekRotation::new(
            vault.clone(),
            keys.store().clone(),
            cfg.kek.clone(),
            &cfg.server.instance,
            &cfg.keyspaces,
        )
        .map_err(|e| StartError(format!("KEK rotation job: {e}")))?,
    );
    kek.spawn();
    let keys_svc = pb::keys_server::KeysServer::new(KeysService::new(
        sentry.clone(),
        keys.clone(),
        kek.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<pb::crypto_server::CryptoServer<CryptoService>>()
        .await;
    reporter
        .set_serving::<pb::erasure_server::ErasureServer<ErasureService>>()
        .await;
    reporter
        .set_serving::<pb::admin_server::AdminServer<AdminService>>()
        .await;
    reporter
        .set_serving::<pb::tokens_server::TokensServer<TokensService>>()
        .await;
    reporter
        .set_serving::<pb::keys_server::KeysServer<KeysService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| format!("reflection: {e}"))?;

    let listener = TcpListener::bind(cfg.server.listen)
        .await
        .map_err(|e| format!("cannot bind {}: {e}", cfg.server.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut metrics_local = None;
    let metrics_task = match (cfg.metrics_listen, prometheus) {
        (Some(addr), Some(handle)) => {
            let ml = crate::metrics::bind(addr)
                .await
                .map_err(|e| e.to_string())?;
            let maddr = ml.local_addr().map_err(|e| e.to_string())?;
            metrics_local = Some(maddr);
            tracing::info!(address = %maddr, "metrics listener (plaintext, GET /metrics only)");
            let (keys, lockouts) = (keys.clone(), lockouts);
            let refresh: crate::metrics::Refresh = Arc::new(move || {
                let (subjects, _) = keys.cached();
                metrics::gauge!("piiguard_dek_cache_entries").set(subjects as f64);
                metrics::gauge!("piiguard_lockouts_active").set(lockouts.list().len() as f64);
            });
            Some(tokio::spawn(crate::metrics::serve(
                ml,
                handle,
                refresh,
                stop_rx.clone(),
            )))
        }
        _ => None,
    };
    let mut health_local = None;
    let health_task = match cfg.server.health_listen {
        Some(addr) => {
            let hl = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot bind health listener {addr}: {e}"))?;
            let haddr = hl.local_addr().map_err(|e| e.to_string())?;
            health_local = Some(haddr);
            tracing::info!(address = %haddr, "health-only listener (plaintext, grpc.health.v1 only)");
            let mut rx = stop_rx.clone();
            let health = health.clone();
            Some(tokio::spawn(async move {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(hl);
                let _ = Server::builder()
                    .add_service(health)
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = rx.wait_for(|s| *s).await;
                    })
                    .await;
            }))
        }
        None => None,
    };

    // Every listener is bound (port 0 resolved): report the addresses.
    if let Some(path) = &cfg.server.ready_file {
        ready::Ready {
            pid: std::process::id(),
            instance: cfg.server.instance.clone(),
            listen: local,
            health_listen: health_local,
            metrics_listen: metrics_local,
        }
        .write(path)
        .map_err(|e| e.to_string())?;
        tracing::info!(path = %path.display(), "ready file written");
    }
    tracing::info!(
        address = %local,
        instance = %cfg.server.instance,
        keyspaces = ?keys.keyspace_names().collect::<Vec<_>>(),
        cache_hard_ttl_secs = keys.hard_ttl().as_secs(),
        "piiguard serving (mutual TLS 1.2/1.3, client certificate required)"
    );
    let incoming = tls::incoming(listener, tls_config, cfg.server.handshake_timeout);
    let stop_watch = stop_rx.clone();
    let mut rx = stop_rx;
    let serve = Server::builder()
        // A connection is told to go away (GOAWAY) at this age and closed after the grace:
        // the client reconnects through a new handshake against the certificates and CRLs in
        // force. (Every call also re-checks the client certificate: `tls::Peer::recheck`.)
        .max_connection_age(cfg.tls.max_connection_age)
        .max_connection_age_grace(cfg.tls.max_connection_age_grace)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .initial_connection_window_size(Some(4 * 1024 * 1024))
        .initial_stream_window_size(Some(1024 * 1024))
        .add_service(crypto)
        .add_service(erasure_svc)
        .add_service(admin)
        .add_service(tokens_svc)
        .add_service(keys_svc)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = rx.wait_for(|s| *s).await;
        });
    let ready_file = cfg.server.ready_file.clone();
    tokio::spawn(async move {
        shutdown.await;
        // Not ready any more: a script reading the file must not send new work here.
        if let Some(path) = &ready_file
            && let Err(e) = ready::remove(path)
        {
            tracing::warn!(error = %e, "cannot remove the ready file");
        }
        tracing::info!("shutting down: draining in-flight calls");
        reporter
            .set_not_serving::<pb::crypto_server::CryptoServer<CryptoService>>()
            .await;
        reporter
            .set_not_serving::<pb::erasure_server::ErasureServer<ErasureService>>()
            .await;
        reporter
            .set_not_serving::<pb::tokens_server::TokensServer<TokensService>>()
            .await;
        reporter
            .set_not_serving::<pb::keys_server::KeysServer<KeysService>>()
            .await;
        let _ = stop_tx.send(true);
    });
    // The drain is bounded: once stopping, calls in flight get `server.shutdown_grace`; a
    // call still running then is cut (its connection dropped with the server future), so a
    // stuck Vault or a paused client never holds the process (and its audit seal) forever.
    let grace = cfg.server.shutdown_grace;
    let mut stopping = stop_watch;
    let r = tokio::select! {
        r = serve => r.map_err(|e| StartError(format!("server: {e}"))),
        _ = async {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "shutdown grace period over: calls still in flight are cut"
            );
            metrics::counter!("piiguard_shutdown_grace_expired_total").increment(1);
            Ok(())
        }
    };
    for h in reloaders {
        h.abort();
    }
    if let Some(h) = health_task {
        let _ = h.await;
    }
    if let Some(h) = metrics_task {
        let _ = h.await;
    }
    // Last: the `stop` record and the final signed checkpoint.
    audit.shutdown().await;
    tracing::info!("stopped");
    r
}

fn detail_of(e: &Error) -> String {
    e.detail()
}

/// SIGINT and SIGTERM, listened for from the moment this is made (unlike
/// [`shutdown_signal`], which listens only once polled): from then on neither signal ends the
/// process by its default action, and [`recv`](Self::recv) sees one sent at any time since.
/// `piiguard dev` makes it first, so that a Ctrl-C during its start-up still stops the
/// OpenBao it started (which runs in its own process group).
#[cfg(unix)]
pub struct ShutdownSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl ShutdownSignals {
    /// Installs the handlers (inside a Tokio runtime).
    ///
    /// # Errors
    /// When the signal handlers cannot be installed.
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        tokio::select! { _ = self.int.recv() => {}, _ = self.term.recv() => {} }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
