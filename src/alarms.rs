//! Alarms: an audit record with a severity, a metric (`piiguard_alarms_total{kind,severity}`),
//! a log line, and optionally a webhook POST (JSON) to the security team's endpoint.
//!
//! Alarm texts are written by piiguard (identity, counts, names of keyspaces and fields);
//! they never carry request content.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::audit::{Auditor, Record, kind, rfc3339};
use crate::config::AlarmsConfig;

/// Alarm kinds (stable: dashboards and rules match on them).
pub mod kinds {
    /// An identity was locked out after repeated denied or failed calls.
    pub const LOCKOUT: &str = "lockout";
    /// A per-identity call-rate limit was exceeded.
    pub const RATE_LIMIT: &str = "rate_limit";
    /// A per-identity budget of decrypted / detokenised items was exceeded.
    pub const VOLUME_BUDGET: &str = "volume_budget";
    /// A canary subject, ciphertext or token was decrypted / detokenised.
    pub const CANARY: &str = "canary_access";
    /// A new policy file was refused; the previous policy stays in force.
    pub const POLICY_RELOAD_FAILED: &str = "policy_reload_failed";
    /// The audit sink cannot write (data calls fail closed).
    pub const AUDIT_UNAVAILABLE: &str = "audit_unavailable";
}

/// How urgent an alarm is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// Posts alarms to a webhook from a background task (bounded queue; never blocks a call).
#[derive(Clone)]
pub struct Webhook {
    tx: tokio::sync::mpsc::Sender<serde_json::Value>,
}

impl Webhook {
    /// Starts the posting task. `url` must be https (or http to loopback).
    pub fn start(cfg: &AlarmsConfig, runtime: &tokio::runtime::Handle) -> Result<Self, String> {
        let Some(url) = cfg.webhook_url.clone() else {
            return Err("no webhook configured".into());
        };
        let mut b = reqwest::Client::builder().timeout(Duration::from_secs(5));
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

/// Raises alarms.
pub struct Alarms {
    audit: Arc<Auditor>,
    webhook: Option<Webhook>,
    instance: String,
}

impl Alarms {
    pub fn new(audit: Arc<Auditor>, webhook: Option<Webhook>, instance: String) -> Self {
        Self {
            audit,
            webhook,
            instance,
        }
    }

    /// Raises an alarm: audit record, metric, log line, webhook.
    pub fn raise(
        &self,
        kind_: &'static str,
        severity: Severity,
        caller: Option<&Arc<str>>,
        correlation_id: Option<&str>,
        detail: String,
    ) {
        let sev = severity.as_str();
        metrics::counter!("piiguard_alarms_total", "kind" => kind_, "severity" => sev).increment(1);
        match severity {
            Severity::Critical => tracing::error!(
                alarm = kind_,
                severity = sev,
                caller = caller.map(|c| &**c),
                correlation_id,
                detail = %detail,
                "ALARM"
            ),
            Severity::Warning => tracing::warn!(
                alarm = kind_,
                severity = sev,
                caller = caller.map(|c| &**c),
                correlation_id,
                detail = %detail,
                "ALARM"
            ),
        }
        let r = Record {
            at: Some(SystemTime::now()),
            kind: kind::ALARM,
            event: Some(kind_),
            severity: Some(sev),
            caller: caller.cloned(),
            correlation_id: correlation_id.map(str::to_string),
            detail: Some(detail),
            ..Record::default()
        };
        if let Some(w) = &self.webhook {
            w.send(&r, &self.instance);
        }
        self.audit.record_event(r);
    }
}
