//! The alarm webhook: every alarm record is also posted as JSON to an operator's URL.

use std::time::{Duration, SystemTime};

use super::Record;
use crate::config::AlarmsConfig;
use crate::domain::time::rfc3339;

/// Posts alarms to a webhook from a background task (bounded queue; never blocks a call).
/// Why the alarm webhook cannot be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("alarm webhook: {0}")]
pub struct WebhookError(pub String);

impl From<String> for WebhookError {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// Posts alarms to the configured webhook.
#[derive(Clone)]
pub struct Webhook {
    tx: tokio::sync::mpsc::Sender<serde_json::Value>,
}

impl Webhook {
    /// Starts the posting task. `url` must be https (or http to loopback).
    pub fn start(
        cfg: &AlarmsConfig,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Self, WebhookError> {
        let Some(url) = cfg.webhook_url.clone() else {
            return Err(WebhookError("no webhook configured".into()));
        };
        // No redirects: the alarm goes to the configured URL or nowhere.
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &cfg.webhook_ca {
            let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            b = b.tls_certs_only(certs);
        }
        let client = b.build().map_err(|e| format!("webhook client: {e}"))?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<serde_json::Value>(1024);
        runtime.spawn(async move {
            while let Some(body) = rx.recv().await {
                match client.post(&url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => {
                        tracing::warn!(
                            status = r.status().as_u16(),
                            "alarm webhook refused the alarm"
                        )
                    }
                    Err(e) => tracing::warn!(error = %e, "alarm webhook unreachable"),
                }
            }
        });
        Ok(Self { tx })
    }

    /// Queues an alarm record for posting (dropped with a log line if the queue is full).
    pub fn send(&self, r: &Record, instance: &str) {
        let body = serde_json::json!({
            "kind": r.event,
            "severity": r.severity,
            "caller": r.caller,
            "detail": r.detail,
            "correlation_id": r.correlation_id,
            "instance": instance,
            "time": rfc3339(r.at.unwrap_or_else(SystemTime::now)),
        });
        if self.tx.try_send(body).is_err() {
            tracing::warn!("alarm webhook queue full: alarm not posted (it is in the audit log)");
        }
    }
}
