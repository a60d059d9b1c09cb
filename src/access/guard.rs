//! The per-call guard: every gRPC handler (crypto, tokens, erasure, admin) starts a
//! [`Guard`] with [`Sentry::begin`], asks it to [`Guard::authorize`] each operation on each
//! keyspace/field, and ends with [`Guard::finish`], which writes the call's one audit record,
//! counts failures towards lockout, updates metrics and maps the error to a status.
//!
//! ```ignore
//! let mut g = self.sentry.begin(&request, "Shred", Op::Shred)?;
//! let r = async { g.authorize(Op::Shred, Some(ks), None)?; /* ... */ Ok(resp) }.await;
//! g.finish(r)
//! ```
//!
//! [`Sentry::begin`] refuses, before any work: a connection whose client certificate no longer
//! verifies against the client CA and CRLs in force (`CLIENT_CERTIFICATE_REJECTED`: revoked by a
//! reloaded CRL, expired; `tls::Peer::recheck`), a sink that cannot write (`AUDIT_UNAVAILABLE`,
//! fail closed), a locked-out caller (`LOCKED_OUT`), a caller over its call-rate limit
//! (`RATE_LIMITED`). A guard dropped without `finish` (the client went away) still writes its
//! record, as `CANCELLED`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::access::alarms::{Alarms, Severity, kinds};
use crate::access::canary::Canaries;
use crate::access::limits::{Exceeded, Limits, Lockouts};
use crate::access::policy::{Op, Policy, RevealMode};
use crate::audit::call::{CallRecord, ItemCounts, Name, Scopes, Touched};
use crate::audit::{Auditor, Record, code_name};
use crate::crypto::envelope::KeyId;
use crate::error::{CorrelationId, Error, Reason, Result};
use crate::keys::manager::SubjectRef;
use crate::metrics::ConnMetrics;
use crate::tls::ConnInfo;

/// Distinct keyspace/field pairs kept per call for the audit record.
const MAX_SCOPES: usize = 32;

/// Everything a guard consults: policy, audit, limits, lockouts, canaries, alarms.
pub struct Sentry {
    /// The access policy in force, published by the reloader (`app::reload`); each call takes
    /// the `Arc` current when it begins and keeps it to the end.
    pub policy: watch::Receiver<Arc<Policy>>,
    /// The audit writer.
    pub audit: Arc<Auditor>,
    /// Where alarms go.
    pub alarms: Alarms,
    /// Call-rate limits and volume budgets.
    pub limits: Limits,
    /// Locked-out identities.
    pub lockouts: Arc<Lockouts>,
    /// Canary subjects, keys and tokens.
    pub canaries: Arc<Canaries>,
}

fn exhausted(reason: Reason, message: String) -> Error {
    Error::ResourceExhausted { reason, message }
}

impl Sentry {
    /// Starts guarding a call: identifies the caller and applies the checks that come before
    /// any work. On refusal the call's audit record is already written.
    #[allow(clippy::result_large_err)]
    pub fn begin<T>(
        self: &Arc<Self>,
        req: &Request<T>,
        method: &'static str,
        op: Op,
    ) -> Result<Guard, Status> {
        self.begin_call(req, method, op, false)
    }

    /// [`begin`](Self::begin) for a call of the Admin service (lockouts, canaries, audit
    /// signing keys): the one service a `lockout.break_glass` identity may still call while
    /// locked out, to lift lockouts. Other calls that need the `admin` operation (Keys:
    /// rotating or retiring the signing and sealing keys) are not lockout recovery.
    pub fn begin_admin<T>(
        self: &Arc<Self>,
        req: &Request<T>,
        method: &'static str,
    ) -> Result<Guard, Status> {
        self.begin_call(req, method, Op::Admin, true)
    }

    fn begin_call<T>(
        self: &Arc<Self>,
        req: &Request<T>,
        method: &'static str,
        op: Op,
        admin_service: bool,
    ) -> Result<Guard, Status> {
        let cid = CorrelationId::new();
        let Some(conn) = req.extensions().get::<ConnInfo>() else {
            return Err(Error::Unauthenticated.into_status(cid.as_str()));
        };
        let mut g = Guard {
            sentry: self.clone(),
            // A short read lock on the watch slot; the call keeps its own `Arc`.
            policy: self.policy.borrow().clone(),
            caller: conn.caller.identity.clone(),
            metrics: conn.metrics.clone(),
            cid,
            method,
            op,
            started: Instant::now(),
            first_scope: None,
            more_scopes: Vec::new(),
            subject_ref: Slot::Empty,
            key_id: Slot::Empty,
            touched: Touched::default(),
            collect: false,
            stream: false,
            items: None,
            failed: 0,
            denied: 0,
            probing: 0,
            canary: false,
            reveal_mode: RevealMode::Full,
            done: false,
        };
        // A connection admitted before its certificate was revoked (CRL reload) or expired is
        // refused from its next call on; the certificate is verified again only when the TLS
        // config in force changed or the last check is older than a few seconds.
        if let Err(e) = conn.peer.recheck() {
            tracing::warn!(caller = &*g.caller, remote = %conn.remote, reason = %e, "call refused: client certificate no longer accepted");
            let e = Error::CertificateRejected {
                message: e.to_string(),
            };
            return Err(g.refuse(e));
        }
        if !self.audit.is_healthy() {
            g.done = true;
            g.metrics
                .call(&g.caller, method, "UNAVAILABLE", g.started.elapsed());
            return Err(Error::AuditUnavailable.into_status(g.cid.as_str()));
        }
        if let Some(until) = self.lockouts.locked_until(&g.caller) {
            // Only a configured break-glass identity gets through, and only to the Admin
            // service; every such call is a critical alarm.
            if admin_service && self.lockouts.is_break_glass(&g.caller) {
                self.alarms.raise(
                    kinds::BREAK_GLASS,
                    Severity::Critical,
                    Some(&g.caller),
                    Some(g.cid.as_str()),
                    format!(
                        "break-glass identity {} used Admin while locked out",
                        g.caller
                    ),
                );
            } else {
                let e = exhausted(
                    Reason::LockedOut,
                    format!(
                        "{} is locked out until {} (repeated denied or failed calls); an administrator can lift it",
                        g.caller,
                        crate::domain::time::rfc3339(until)
                    ),
                );
                return Err(g.refuse(e));
            }
        }
        // Break-glass calls included: every admitted call counts against the rate limit.
        if let Err(x) = self.limits.call(&g.caller) {
            let e = self.exceeded(&g, x);
            return Err(g.refuse(e));
        }
        Ok(g)
    }

    fn exceeded(&self, g: &Guard, x: Exceeded) -> Error {
        let (alarm, why) = match x.what {
            "calls" => (kinds::RATE_LIMIT, Reason::RateLimited),
            _ => (kinds::VOLUME_BUDGET, Reason::VolumeBudgetExceeded),
        };
        let message = format!(
            "{} exceeded its limit of {} {}",
            g.caller,
            x.window.describe(),
            x.what.replace('_', " ")
        );
        if x.first {
            self.alarms.raise(
                alarm,
                Severity::Warning,
                Some(&g.caller),
                Some(g.cid.as_str()),
                message.clone(),
            );
        }
        exhausted(why, message)
    }

    /// Writes a security event record (start, stop, reloads, admin actions, ...).
    pub fn event(&self, event: &'static str, caller: Option<&Arc<str>>, detail: String) {
        let mut r = Record::event(event, detail);
        r.caller = caller.cloned();
        self.audit.record_event(r);
    }
}

/// A failure that counts towards lockout like a denial: a ciphertext that does not open, or a
/// token that does not exist or cannot be one. Both are what guessing looks like (a DIGITS
/// token keeping the last 4 digits leaves 10^12 guesses, fewer for short FF1 values); a caller
/// that holds real ciphertexts and tokens rarely makes them.
fn is_probe(e: &Error) -> bool {
    matches!(e, Error::BadCiphertext { .. })
        || matches!(e.reason(), Reason::UnknownToken | Reason::MalformedToken)
}

/// Pushes `v` onto the list of values a call touched when the call collects them (a batch or
/// a stream), or when `v` is the second distinct value of a unary call (then the first goes
/// in before it: a unary call that touches one subject allocates nothing). Returns whether
/// it pushed.
fn keep<T: PartialEq + Copy>(collect: bool, was: Slot<T>, v: T, list: &mut Vec<T>) -> bool {
    match was {
        _ if collect => list.push(v),
        Slot::One(o) if o != v => {
            list.push(o);
            list.push(v);
        }
        Slot::Many => list.push(v),
        _ => return false,
    }
    true
}

/// A value seen once, or several different ones (then the audit record omits it).
#[derive(Debug, Clone, Copy)]
enum Slot<T> {
    Empty,
    One(T),
    Many,
}

impl<T: PartialEq + Copy> Slot<T> {
    fn note(&mut self, v: T) {
        *self = match *self {
            Slot::Empty => Slot::One(v),
            Slot::One(o) if o == v => Slot::One(o),
            _ => Slot::Many,
        };
    }
    fn get(&self) -> Option<T> {
        match self {
            Slot::One(v) => Some(*v),
            _ => None,
        }
    }
}

/// A keyspace/field pair the call touched, and the operations already allowed on it.
struct Scope {
    keyspace: Name,
    field: Option<Name>,
    /// Bits of the operations the policy allowed on this pair in this call.
    allowed: u16,
}

impl Scope {
    fn is(&self, keyspace: &str, field: Option<&str>) -> bool {
        self.keyspace == *keyspace
            && match (&self.field, field) {
                (None, None) => true,
                (Some(a), Some(b)) => *a == *b,
                _ => false,
            }
    }
}

/// The guard of one call. See the module doc.
pub struct Guard {
    sentry: Arc<Sentry>,
    policy: Arc<Policy>,
    caller: Arc<str>,
    metrics: Arc<ConnMetrics>,
    cid: CorrelationId,
    method: &'static str,
    op: Op,
    started: Instant,
    /// The pairs touched, in order (the first inline: most calls touch one).
    first_scope: Option<Scope>,
    more_scopes: Vec<Scope>,
    subject_ref: Slot<[u8; 32]>,
    key_id: Slot<[u8; crate::crypto::envelope::KEY_ID_LEN]>,
    /// Every subject reference and key id noted, in order, once `collect` is on (a batch or
    /// stream) or the call has touched a second one; empty (no allocation) otherwise.
    touched: Touched,
    /// Set by [`Guard::set_items`] and [`Guard::start_stream`].
    collect: bool,
    /// A stream: `touched` is written out in part records as it fills.
    stream: bool,
    items: Option<u32>,
    failed: u32,
    denied: u32,
    probing: u32,
    canary: bool,
    /// How much the call's reveals return ([`Guard::set_reveal_mode`]).
    reveal_mode: RevealMode,
    done: bool,
}

impl Guard {
    /// Sets how much this call's reveals (decrypt, detokenize) return, before anything is
    /// authorised: a masked call is allowed by masked-only grants, does not count against the
    /// volume budget of revealed items, and its audit record says `"reveal":"masked"`.
    pub fn set_reveal_mode(&mut self, mode: RevealMode) {
        self.reveal_mode = mode;
    }

    /// The reveal mode of this call.
    pub fn reveal_mode(&self) -> RevealMode {
        self.reveal_mode
    }

    /// The caller's identity.
    pub fn caller(&self) -> &Arc<str> {
        &self.caller
    }

    /// This call's correlation id.
    pub fn correlation_id(&self) -> &str {
        self.cid.as_str()
    }

    fn scope(&mut self, keyspace: &str, field: Option<&str>) -> Option<&mut Scope> {
        let first = self.first_scope.as_mut()?;
        if first.is(keyspace, field) {
            return Some(first);
        }
        self.more_scopes.iter_mut().find(|s| s.is(keyspace, field))
    }

    /// Checks `op` on `keyspace` / `field` against the policy in force when the call began.
    /// Pass only validated names (they go into the audit record).
    pub fn authorize(&mut self, op: Op, keyspace: Option<&str>, field: Option<&str>) -> Result<()> {
        self.authorize_scoped(op, keyspace, field, false)
    }

    /// Checks that the caller holds `op` in `keyspace` on at least one field: for a lookup
    /// whose field is known only after it (Detokenize), which is then checked again with
    /// [`Guard::authorize`] on the field.
    pub fn authorize_some_field(&mut self, op: Op, keyspace: &str) -> Result<()> {
        self.authorize_scoped(op, Some(keyspace), None, true)
    }

    fn authorize_scoped(
        &mut self,
        op: Op,
        keyspace: Option<&str>,
        field: Option<&str>,
        some_field: bool,
    ) -> Result<()> {
        let ks = keyspace.unwrap_or_default();
        let bit = op.bit();
        match self.scope(ks, field) {
            Some(s) if s.allowed & bit != 0 => return Ok(()),
            Some(_) => {}
            None => {
                let s = Scope {
                    keyspace: Name::new(ks),
                    field: field.map(Name::new),
                    allowed: 0,
                };
                if self.first_scope.is_none() {
                    self.first_scope = Some(s);
                } else if self.more_scopes.len() + 1 < MAX_SCOPES {
                    self.more_scopes.push(s);
                }
            }
        }
        let checked = if some_field {
            self.policy.check_some_field(&self.caller, op, keyspace)
        } else {
            self.policy
                .check_reveal(&self.caller, op, keyspace, field, self.reveal_mode)
        };
        match checked {
            Ok(()) => {
                // A some-field check proves less than a check of (keyspace, no field): it is
                // not remembered for the scope.
                if !some_field && let Some(s) = self.scope(ks, field) {
                    s.allowed |= bit;
                }
                Ok(())
            }
            Err(e) => {
                self.denied += 1;
                metrics::counter!("piiguard_denied_total", "caller" => self.caller.to_string())
                    .increment(1);
                Err(e)
            }
        }
    }

    /// Counts one item of a stream against the caller's call-rate limit, as if it were a call
    /// of its own (a stream must not be a way around the limit).
    pub fn count_item_as_call(&mut self) -> Result<()> {
        match self.sentry.limits.call(&self.caller) {
            Ok(()) => Ok(()),
            Err(x) => Err(self.sentry.exceeded(self, x)),
        }
    }

    /// Counts `n` items about to be revealed (decrypted / detokenised) against the caller's
    /// volume budget. Masked reveals are not counted (docs/POLICY.md, masked reveals): the
    /// budget bounds how much whole PII one identity can read.
    pub fn reveal(&mut self, n: u64) -> Result<()> {
        if self.reveal_mode == RevealMode::Masked {
            return Ok(());
        }
        match self.sentry.limits.reveal(&self.caller, n) {
            Ok(()) => Ok(()),
            Err(x) => Err(self.sentry.exceeded(self, x)),
        }
    }

    /// Notes the subject of the call (keyed hash only). A batch, a stream or a call that
    /// touches several subjects lists them all in its audit record (bounded, counted and
    /// digested: [`Touched`]).
    pub fn note_subject(&mut self, keyspace: &str, subject: &SubjectRef) {
        let was = self.subject_ref;
        self.subject_ref.note(subject.0);
        if keep(self.collect, was, subject.0, &mut self.touched.subject_refs) {
            self.part_if_full();
        }
        if self.op.reveals() && self.sentry.canaries.is_canary_subject(keyspace, subject) {
            self.canary_touched("subject");
        }
    }

    /// Notes the key a ciphertext names; alarms if it is a canary's and the call reveals. Key
    /// ids are listed like subjects (see [`Guard::note_subject`]).
    pub fn note_key(&mut self, keyspace: &str, key_id: &KeyId) {
        let was = self.key_id;
        self.key_id.note(key_id.0);
        if keep(self.collect, was, key_id.0, &mut self.touched.key_ids) {
            self.part_if_full();
        }
        if self.op.reveals() && self.sentry.canaries.is_canary_key(keyspace, key_id) {
            self.canary_touched("ciphertext");
        }
    }

    /// Marks the call as a stream: it collects subject references and key ids like a batch,
    /// and writes them out in a part record (outcome `progress`) each time one list reaches
    /// `audit.max_refs_per_record`, so a long stream neither holds them all in memory nor
    /// leaves them out of the audit log. Its final record lists the rest.
    pub fn start_stream(&mut self) {
        self.collect = true;
        self.stream = true;
    }

    /// In a stream, writes a part record when a list is full.
    fn part_if_full(&mut self) {
        let max = self.sentry.audit.max_refs_per_record();
        if self.stream
            && (self.touched.subject_refs.len() >= max || self.touched.key_ids.len() >= max)
        {
            let latency = self.started.elapsed();
            let rec = self.call_record("progress", tonic::Code::Ok, None, latency);
            // Like a cancelled call's record, a part is kept even while the sink is failing
            // (the stream's health was checked when it began).
            self.sentry.audit.record_call_event(rec);
        }
    }

    /// Alarms if `token` is a canary token (for the token service).
    pub fn note_token(&mut self, token: &[u8]) {
        if self.op.reveals() && self.sentry.canaries.is_canary_token(token) {
            self.canary_touched("token");
        }
    }

    fn canary_touched(&mut self, what: &str) {
        if self.canary {
            return;
        }
        self.canary = true;
        let s = &self.sentry;
        metrics::counter!("piiguard_canary_access_total").increment(1);
        s.alarms.raise(
            kinds::CANARY,
            Severity::Critical,
            Some(&self.caller),
            Some(self.cid.as_str()),
            format!("{} called {} on a canary {what}", self.caller, self.method),
        );
        if s.canaries.lockout {
            let info = s.lockouts.lock(
                &self.caller,
                format!("canary {what} accessed ({})", self.method),
            );
            s.alarms.raise(
                kinds::LOCKOUT,
                Severity::Critical,
                Some(&self.caller),
                Some(self.cid.as_str()),
                format!(
                    "{} locked out until {}: {}",
                    info.identity,
                    crate::domain::time::rfc3339(info.until),
                    info.reason
                ),
            );
        }
    }

    /// Sets the number of items of a batch call (and has its audit record list every subject
    /// reference and key id the call notes: [`Touched`]).
    pub fn set_items(&mut self, n: usize) {
        self.items = Some(u32::try_from(n).unwrap_or(u32::MAX));
        self.collect = true;
    }

    /// Counts the outcome of one batch item (denials are counted by `authorize`).
    pub fn item_result<T>(&mut self, r: &Result<T>) {
        if let Err(e) = r {
            self.failed += 1;
            if is_probe(e) {
                self.probing += 1;
            }
        }
    }

    /// Ends the call with `e`: its audit record, then its status (through the one mapping,
    /// [`Error::into_status`]).
    pub fn fail(mut self, e: Error) -> Status {
        match self.record(Err(e)) {
            Err(s) => s,
            // `record` maps every error to a status; a refusal is never turned into success.
            Ok(()) => {
                Error::internal("a refusal was recorded as success").into_status(self.cid.as_str())
            }
        }
    }

    fn refuse(self, e: Error) -> Status {
        self.fail(e)
    }

    /// Ends the call: audit record, lockout accounting, metrics, status mapping. A successful
    /// result is released only if its audit record was accepted (fail closed).
    #[allow(clippy::result_large_err)]
    pub fn finish<T>(mut self, r: Result<T>) -> Result<Response<T>, Status> {
        match r {
            Ok(v) => self.record(Ok(())).map(|()| Response::new(v)),
            Err(e) => Err(self.fail(e)),
        }
    }

    #[allow(clippy::result_large_err)]
    fn record(&mut self, r: Result<()>) -> Result<(), Status> {
        self.done = true;
        let latency = self.started.elapsed();
        let (outcome, code, why) = match &r {
            Ok(()) if self.failed > 0 => ("partial", tonic::Code::Ok, None),
            Ok(()) => ("ok", tonic::Code::Ok, None),
            Err(e) => {
                if self.items.is_none() && is_probe(e) {
                    self.probing += 1;
                }
                let outcome = match e {
                    Error::PermissionDenied { .. } | Error::MaskedRevealOnly { .. } => "denied",
                    // A client certificate no longer accepted (revoked by a reloaded CRL,
                    // expired) on a connection opened before: refused, as documented (it was
                    // recorded as `error`: the reason was listed under RESOURCE_EXHAUSTED,
                    // which it never is).
                    Error::CertificateRejected { .. } => "refused",
                    Error::ResourceExhausted { reason: rs, .. }
                        if [
                            Reason::RateLimited,
                            Reason::VolumeBudgetExceeded,
                            Reason::LockedOut,
                        ]
                        .contains(rs) =>
                    {
                        "refused"
                    }
                    _ => "error",
                };
                (outcome, e.code(), Some(e.reason().as_str()))
            }
        };
        self.account(code, outcome, why, latency);
        let rec = self.call_record(outcome, code, why, latency);
        let write = self.sentry.audit.record_call(rec);
        match r {
            Ok(()) => write.map_err(|e| e.into_status(self.cid.as_str())),
            Err(e) => Err(e.into_status(self.cid.as_str())),
        }
    }

    fn account(
        &self,
        code: tonic::Code,
        outcome: &'static str,
        why: Option<&'static str>,
        latency: Duration,
    ) {
        self.metrics
            .call(&self.caller, self.method, code_name(code), latency);
        if let Some(n) = self.items {
            metrics::counter!("piiguard_items_total", "method" => self.method, "outcome" => "ok")
                .increment(u64::from(n - self.failed.min(n)));
            metrics::counter!("piiguard_items_total", "method" => self.method, "outcome" => "failed")
                .increment(u64::from(self.failed));
        }
        tracing::debug!(
            method = self.method,
            caller = &*self.caller,
            micros = latency.as_micros() as u64,
            outcome,
            reason = why,
            correlation_id = self.cid.as_str()
        );
        let failures = self.denied + self.probing;
        if failures > 0
            && let Some(info) = self.sentry.lockouts.failures(&self.caller, failures)
        {
            self.sentry.alarms.raise(
                kinds::LOCKOUT,
                Severity::Critical,
                Some(&self.caller),
                Some(self.cid.as_str()),
                format!(
                    "{} locked out until {}: {}",
                    info.identity,
                    crate::domain::time::rfc3339(info.until),
                    info.reason
                ),
            );
        }
    }

    /// The call's record; takes the subject references and key ids collected so far.
    fn call_record(
        &mut self,
        outcome: &'static str,
        code: tonic::Code,
        why: Option<&'static str>,
        latency: Duration,
    ) -> CallRecord {
        let scopes = match (&self.first_scope, self.more_scopes.as_slice()) {
            (None, _) => Scopes::None,
            (Some(s), []) => Scopes::One {
                keyspace: (!s.keyspace.as_str().is_empty()).then(|| s.keyspace.clone()),
                field: s.field.clone(),
            },
            (Some(first), more) => Scopes::Many(
                std::iter::once(first)
                    .chain(more)
                    .map(|s| match &s.field {
                        Some(f) => format!("{}/{}", s.keyspace.as_str(), f.as_str()),
                        None => s.keyspace.as_str().to_string(),
                    })
                    .collect(),
            ),
        };
        CallRecord {
            at: SystemTime::now(),
            caller: self.caller.clone(),
            method: self.method,
            operation: self.op.as_str(),
            reveal: (self.reveal_mode == RevealMode::Masked).then_some("masked"),
            scopes,
            subject_ref: self.subject_ref.get(),
            key_id: self.key_id.get(),
            touched: (!self.touched.subject_refs.is_empty() || !self.touched.key_ids.is_empty())
                .then(|| {
                    Box::new(Touched {
                        subject_refs: std::mem::take(&mut self.touched.subject_refs),
                        key_ids: std::mem::take(&mut self.touched.key_ids),
                        max_listed: self.sentry.audit.max_refs_per_record(),
                    })
                }),
            items: self
                .items
                .map(|n| -> ItemCounts { [n, self.failed, self.denied] }),
            outcome,
            code: code_name(code),
            reason: why,
            latency_us: latency.as_micros() as u64,
            correlation_id: self.cid,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            // The handler's future was dropped (client cancelled or deadline): still audited.
            self.done = true;
            let latency = self.started.elapsed();
            let rec = self.call_record("cancelled", tonic::Code::Cancelled, None, latency);
            self.sentry.audit.record_call_event(rec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_values_are_kept_for_batches_and_from_a_unary_calls_second_one() {
        // A unary call that touches one value keeps nothing (and allocates nothing).
        let (mut slot, mut list) = (Slot::Empty, Vec::new());
        for v in [1u8, 1] {
            let was = slot;
            slot.note(v);
            assert!(!keep(false, was, v, &mut list));
        }
        assert!(list.is_empty() && list.capacity() == 0);
        // Its second distinct value brings the first in with it.
        let was = slot;
        slot.note(2);
        assert!(keep(false, was, 2, &mut list));
        let was = slot;
        slot.note(1);
        assert!(keep(false, was, 1, &mut list));
        assert_eq!(list, [1, 2, 1]);
        // A batch keeps every value from the first.
        let (mut slot, mut list) = (Slot::Empty, Vec::new());
        for v in [5u8, 5, 6] {
            let was = slot;
            slot.note(v);
            assert!(keep(true, was, v, &mut list));
        }
        assert_eq!(list, [5, 5, 6]);
    }
}
