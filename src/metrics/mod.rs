//! Prometheus metrics, served on a separate plaintext listener (`metrics.listen`, `GET
//! /metrics`) that carries no data RPCs. Labels hold method names, codes, caller identities,
//! alarm kinds: never request content.
//!
//! Metric names:
//! - `piiguard_calls_total{method,code,caller}`, `piiguard_call_duration_seconds{method}`
//! - `piiguard_items_total{method,outcome}` (batch items), `piiguard_denied_total{caller}`
//! - `piiguard_alarms_total{kind,severity}`, `piiguard_lockouts_active`
//! - `piiguard_audit_records_total`, `piiguard_audit_write_errors_total`,
//!   `piiguard_audit_lost_records_total`
//! - `piiguard_dek_cache_entries`, `piiguard_dek_cache_total{result}` (hit / miss, fed by
//!   `ops/mod.rs` through [`dek_cache`])
//! - `piiguard_vault_request_duration_seconds{op}`, `piiguard_vault_errors_total{op}` ([`vault_call`]:
//!   `dek_load` for cache misses, `sign` for audit checkpoints)
//! - `piiguard_dek_wrap_batch_size` ([`dek_wrap_batch`]: wraps per transit call of the wrap
//!   batcher, `keys/wraps.rs`)
//! - `piiguard_token_write_group_size` ([`token_write_group`]: token writes per group commit,
//!   `store/token_writer.rs`)
//! - `piiguard_vault_failovers_total`, `piiguard_vault_node` (the index in `vault.addresses`
//!   of the node requests go to; [`vault_failover`], docs/OPERATIONS.md#vault-ha)
//! - `piiguard_vault_admission_wait_seconds`, `piiguard_vault_overloaded_total{op}`
//!   ([`vault_admission`]: the bound on Vault requests in flight, `vault.max_in_flight`)
//! - `piiguard_shreds_total{outcome}` ([`shred`], for the erasure service)
//! - `piiguard_dek_rotations_total{keyspace,reason}` ([`dek_rotation`]: `requested`, `uses`,
//!   `age`), `piiguard_dek_uses_reserved_total{keyspace}` ([`dek_uses_reserved`]: encryptions
//!   reserved in the store in blocks, docs/KEYS.md#usage-limits)

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::{Counter, Histogram};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The Prometheus recorder could not be built or installed.
    #[error("metrics: {0}")]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
    /// The metrics listener could not be bound.
    #[error("cannot bind metrics listener {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Installs the process-wide Prometheus recorder.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .install_recorder()?;
    let _ = DEK_CACHE.set([
        metrics::counter!("piiguard_dek_cache_total", "result" => "miss"),
        metrics::counter!("piiguard_dek_cache_total", "result" => "hit"),
    ]);
    Ok(handle)
}

/// The hit/miss counters, registered once when the recorder is installed.
static DEK_CACHE: OnceLock<[Counter; 2]> = OnceLock::new();

/// Metric handles of one connection (one caller), registered on first use instead of on
/// every call: looking a labelled metric up in the registry costs an allocation and a hash
/// per call, which matters at tens of thousands of calls a second.
#[derive(Default)]
pub struct ConnMetrics {
    handles: Mutex<ConnHandles>,
}

#[derive(Default)]
struct ConnHandles {
    calls: Vec<(&'static str, &'static str, Counter)>,
    durations: Vec<(&'static str, Histogram)>,
}

impl std::fmt::Debug for ConnMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnMetrics").finish_non_exhaustive()
    }
}

impl ConnMetrics {
    /// Counts one call of `caller` (`piiguard_calls_total`) and records its duration
    /// (`piiguard_call_duration_seconds`).
    pub fn call(&self, caller: &str, method: &'static str, code: &'static str, latency: Duration) {
        let mut h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        match h.calls.iter().find(|(m, c, _)| *m == method && *c == code) {
            Some((_, _, counter)) => counter.increment(1),
            None => {
                let counter = metrics::counter!("piiguard_calls_total", "method" => method, "code" => code, "caller" => caller.to_string());
                counter.increment(1);
                h.calls.push((method, code, counter));
            }
        }
        let secs = latency.as_secs_f64();
        match h.durations.iter().find(|(m, _)| *m == method) {
            Some((_, hist)) => hist.record(secs),
            None => {
                let hist =
                    metrics::histogram!("piiguard_call_duration_seconds", "method" => method);
                hist.record(secs);
                h.durations.push((method, hist));
            }
        }
    }
}

/// Refreshes gauges that are read rather than counted (cache size, active lockouts), called
/// at each scrape. Given by the app, which owns the things read.
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `stop` resolves, calling `refresh` before each
/// scrape.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    refresh: Refresh,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let upkeep = handle.clone();
    let upkeep_task = tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(5));
        loop {
            t.tick().await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Ok((mut sock, _)) = accepted else {
            continue;
        };
        let handle = handle.clone();
        let refresh = refresh.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    let m = sock.read(&mut buf[n..]).await?;
                    if m == 0 {
                        break;
                    }
                    n += m;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, ctype, body) =
                if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?") {
                    refresh();
                    (
                        "200 OK",
                        "text/plain; version=0.0.4; charset=utf-8",
                        handle.render(),
                    )
                } else {
                    ("404 Not Found", "text/plain", "only GET /metrics\n".into())
                };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
    upkeep_task.abort();
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Records one DEK cache lookup.
pub fn dek_cache(hit: bool) {
    dek_cache_count(hit, 1);
}

/// Records one transit call of the DEK wrap batcher (`keys::wraps`) carrying `n` wraps.
pub fn dek_wrap_batch(n: usize) {
    metrics::histogram!("piiguard_dek_wrap_batch_size").record(n as f64);
}

/// Records one group commit of the token writer (`store::token_writer`) carrying `n` writes.
pub fn token_write_group(n: usize) {
    metrics::histogram!("piiguard_token_write_group_size").record(n as f64);
}

/// Records `n` DEK cache hits (a batch counts its hits with one call).
pub fn dek_cache_hits(n: u64) {
    if n > 0 {
        dek_cache_count(true, n);
    }
}

fn dek_cache_count(hit: bool, n: u64) {
    match DEK_CACHE.get() {
        Some(c) => c[usize::from(hit)].increment(n),
        None => {
            let result = if hit { "hit" } else { "miss" };
            metrics::counter!("piiguard_dek_cache_total", "result" => result).increment(n);
        }
    }
}

/// Records one Vault-backed operation.
pub fn vault_call(op: &'static str, elapsed: Duration, ok: bool) {
    metrics::histogram!("piiguard_vault_request_duration_seconds", "op" => op)
        .record(elapsed.as_secs_f64());
    if !ok {
        metrics::counter!("piiguard_vault_errors_total", "op" => op).increment(1);
    }
}

/// Records a Vault fail-over: the client moved to node `to` (its index in `vault.addresses`)
/// after the current node failed.
pub fn vault_failover(to: usize) {
    metrics::counter!("piiguard_vault_failovers_total").increment(1);
    metrics::gauge!("piiguard_vault_node").set(to as f64);
}

/// Records one admission to the Vault request bound (`vault::admission`): the wait for a
/// place, and a refusal (`VAULT_OVERLOADED`) when none came free in time.
pub fn vault_admission(op: &'static str, waited: Duration, admitted: bool) {
    if admitted {
        metrics::histogram!("piiguard_vault_admission_wait_seconds").record(waited.as_secs_f64());
    } else {
        metrics::counter!("piiguard_vault_overloaded_total", "op" => op).increment(1);
    }
}

/// Records one shred (for the erasure service).
pub fn shred(outcome: &'static str) {
    metrics::counter!("piiguard_shreds_total", "outcome" => outcome).increment(1);
}

/// Why a subject's DEK got a new version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationReason {
    /// `Keys.RotateSubjectKey`.
    Requested,
    /// The version reached the keyspace's `max_dek_uses`.
    Uses,
    /// The version reached the keyspace's `max_dek_age_secs`.
    Age,
}

impl RotationReason {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            RotationReason::Requested => "requested",
            RotationReason::Uses => "uses",
            RotationReason::Age => "age",
        }
    }
}

/// Records one subject DEK rotation made by this replica.
pub fn dek_rotation(keyspace: &str, reason: RotationReason) {
    metrics::counter!("piiguard_dek_rotations_total", "keyspace" => keyspace.to_string(), "reason" => reason.as_str())
        .increment(1);
}

/// Records `n` encryptions reserved in the store for one DEK version of `keyspace`.
pub fn dek_uses_reserved(keyspace: &str, n: u64) {
    metrics::counter!("piiguard_dek_uses_reserved_total", "keyspace" => keyspace.to_string())
        .increment(n);
}
