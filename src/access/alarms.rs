//! Alarms: an audit record with a severity, a metric (`piiguard_alarms_total{kind,severity}`),
//! a log line, and optionally a webhook POST (JSON) to the security team's endpoint.
//!
//! Alarm texts are written by piiguard (identity, counts, names of keyspaces and fields);
//! they never carry request content.

use std::sync::Arc;
use std::time::SystemTime;

pub use crate::audit::webhook::Webhook;
use crate::audit::{Auditor, Record, kind};

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
    /// New TLS files (certificate, key, client CA, CRLs) were refused; the previous server
    /// config stays in force.
    pub const TLS_RELOAD_FAILED: &str = "tls_reload_failed";
    /// The audit sink cannot write (data calls fail closed).
    pub const AUDIT_UNAVAILABLE: &str = "audit_unavailable";
    /// A break-glass identity called Admin while locked out.
    pub const BREAK_GLASS: &str = "break_glass_used";
}

/// How urgent an alarm is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Worth a look (a limit reached, a refused reload).
    Warning,
    /// Act now (a canary touched, a lockout, the audit sink down).
    Critical,
}

impl Severity {
    /// The audit and metric spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
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
    /// Alarms written to `audit` (and POSTed to `webhook`, if any), naming `instance`.
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
