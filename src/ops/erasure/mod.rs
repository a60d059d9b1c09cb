//! Crypto-shredding: destroying a subject's DEKs in Vault so that every ciphertext of that
//! subject, wherever it is stored, becomes unreadable; proving it with a signed certificate.
//!
//! A shred is a small state machine kept in the store (see `store`):
//! `active` → (`scheduled` during a grace window) → `shredding` → `shredded`.
//! 1. The subject is claimed (moved to `shredding`, with a lease held by this process) in one
//!    atomic statement: only one process wins it. Only then are the keys to destroy listed
//!    (the subject record in Vault, plus any recorded before) and recorded as the intent: a
//!    cold load that raced the claim either made its key before the listing (listed) or sees
//!    the claim when it re-checks the state after creating (and discards its key).
//! 2. Tombstones are written for the key ids; this replica's cache is emptied and an
//!    eviction is published for every other replica.
//! 3. The Vault KV metadata of each DEK record and of the subject record is deleted (all
//!    versions destroyed), then read back to check it is gone.
//! 4. A certificate is signed by Vault transit and stored with the `shredded` state.
//!
//! A crash anywhere leaves the subject `shredding` (its intent recorded if the listing ran): data
//! is already refused, and the next start (or another replica, once the lease is stale) completes
//! steps 2-4, which are idempotent and list the keys again. There is never "key destroyed but no record" (the intent is written
//! first) and never "certified but key still in Vault" (step 3 is verified before step 4).

pub mod certificate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::access::alarms::{Alarms, Severity};
use crate::audit::{Auditor, Record};
use crate::config::failpoint::point as fail_point;
use crate::config::{Config, ErasureConfig};
use crate::crypto::envelope::KeyId;
use crate::error::{Error, Reason, Result};
use crate::keys::KeyManager;
use crate::keys::manager::{dek_path, now_i64, subject_path, subject_record_key};
use crate::keys::record::DekRecord;
use crate::store::{Certified, DueRow, ShredClaim, Store, SubjectState};
use crate::vault::signer::Signer;
use certificate::{Certificate, DestroyedKey, Payload};

/// Result of a shred request for one keyspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Destroyed now; the signed certificate.
    Shredded(String),
    /// Destroyed before; the certificate of that shred.
    AlreadyShredded(String),
    /// Will be destroyed at this Unix time unless cancelled.
    Scheduled(i64),
    /// No key ever existed for this subject in this keyspace.
    NotFound,
}

/// Shred state as reported to callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Never seen.
    Unknown,
    /// In use.
    Active,
    /// A shred is scheduled (grace window).
    Scheduled,
    /// A shred is under way (claimed).
    Shredding,
    /// Keys destroyed and certified.
    Shredded,
}

/// Status of a subject in one keyspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The keyspace.
    pub keyspace: String,
    /// Its state.
    pub state: State,
    /// When a scheduled shred runs (Unix seconds).
    pub scheduled_for: Option<i64>,
    /// When the keys were destroyed (Unix seconds).
    pub shredded_at: Option<i64>,
    /// Retention end (Unix seconds), after which the reaper shreds.
    pub retain_until: Option<i64>,
    /// The certificate of destruction (JSON).
    pub certificate: Option<String>,
}

/// Alarm kind: the reaper failed to shred a subject `erasure.reaper_alarm_after_failures`
/// times in a row (raised once per subject; it keeps retrying with a backoff).
pub const REAPER_STUCK: &str = "reaper_stuck";

/// Audit event: the reaper destroyed a subject's keys (`Erasure::with_audit`).
pub const REAPER_SHRED: &str = "reaper_shred";

/// Rows the reaper reads per page.
const REAP_PAGE: i64 = 100;
/// Rows the reaper processes per pass at most; the next pass resumes after the last one.
const REAP_PER_PASS: usize = 1000;

/// The erasure engine.
pub struct Erasure {
    keys: Arc<KeyManager>,
    store: Arc<Store>,
    signer: Signer,
    grace: HashMap<String, Duration>,
    cfg: ErasureConfig,
    instance: String,
    kv_mount: String,
    /// This process's name on the leases of the shreds it executes (instance + random).
    owner: String,
    alarms: Option<Alarms>,
    /// Where the reaper's key destructions are recorded (no call carries them).
    audit: Option<Arc<Auditor>>,
    /// Where the next reaper pass resumes when the last one stopped at its bound.
    reap_cursor: Mutex<Option<DueRow>>,
}

fn parse_intent(intent: &str) -> Result<Vec<(KeyId, u32)>> {
    let v: serde_json::Value =
        serde_json::from_str(intent).map_err(|e| Error::internal(format!("shred intent: {e}")))?;
    let bad = || Error::internal("malformed shred intent");
    v.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|k| {
            Ok((
                KeyId::from_hex(k["key_id"].as_str().ok_or_else(bad)?).ok_or_else(bad)?,
                k["dek_version"]
                    .as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(bad)?,
            ))
        })
        .collect()
}

fn intent_json(keys: &[(KeyId, u32)]) -> String {
    serde_json::Value::Array(
        keys.iter()
            .map(|(k, v)| json!({"key_id": k.to_hex(), "dek_version": v}))
            .collect(),
    )
    .to_string()
}

impl Erasure {
    /// The erasure engine over the key manager and the store, signing with `signer`.
    pub fn new(keys: Arc<KeyManager>, signer: Signer, config: &Config) -> Self {
        let mut nonce = [0u8; 8];
        // A CSPRNG failure leaves zeros: the instance name still tells replicas apart.
        let _ = aws_lc_rs::rand::fill(&mut nonce);
        Self {
            owner: format!("{}:{}", config.server.instance, hex::encode(nonce)),
            alarms: None,
            audit: None,
            reap_cursor: Mutex::new(None),
            store: keys.store().clone(),
            keys,
            signer,
            grace: config
                .keyspaces
                .iter()
                .map(|(k, v)| (k.clone(), v.grace))
                .collect(),
            cfg: config.erasure.clone(),
            instance: config.server.instance.clone(),
            kv_mount: config.vault.kv_mount.clone(),
        }
    }

    /// Raises the reaper's alarms (`REAPER_STUCK`) through `alarms`; without it they are only
    /// logged and counted.
    pub fn with_alarms(mut self, alarms: Alarms) -> Self {
        self.alarms = Some(alarms);
        self
    }

    /// Records every shred the reaper executes (a grace window that ended, a retention that
    /// expired, a shred interrupted by a crash) as a `reaper_shred` event in `audit`: the call
    /// that scheduled it was recorded when it was made, not when the keys were destroyed.
    pub fn with_audit(mut self, audit: Arc<Auditor>) -> Self {
        self.audit = Some(audit);
        self
    }

    /// The keyspaces a request names: one, or all when `keyspace` is empty.
    pub fn keyspaces(&self, keyspace: &str) -> Result<Vec<String>> {
        if keyspace.is_empty() {
            let mut all: Vec<String> = self.keys.keyspace_names().map(str::to_string).collect();
            all.sort();
            Ok(all)
        } else if self.keys.has_keyspace(keyspace) {
            Ok(vec![keyspace.to_string()])
        } else {
            Err(Error::invalid(
                Reason::UnknownKeyspace,
                format!(
                    "unknown keyspace {:?}",
                    crate::keys::manager::truncate_for_message(keyspace)
                ),
            ))
        }
    }

    /// The keyed reference of a subject in a keyspace.
    pub fn subject_ref(&self, keyspace: &str, subject: &str) -> Result<crate::keys::SubjectRef> {
        self.keys.subject_ref(keyspace, subject)
    }

    /// Shreds a subject in one keyspace (grace window applies).
    pub async fn shred(
        &self,
        keyspace: &str,
        subject: &str,
        reason_text: &str,
        request_id: &str,
    ) -> Result<Outcome> {
        let sref = self.keys.subject_ref(keyspace, subject)?.to_hex();
        self.shred_ref(keyspace, &sref, reason_text, request_id, false)
            .await
    }

    async fn shred_ref(
        &self,
        ks: &str,
        sref: &str,
        reason_text: &str,
        request_id: &str,
        immediate: bool,
    ) -> Result<Outcome> {
        let vault = self.keys.vault();
        for _ in 0..5 {
            let row = self.store.subject(ks, sref).await?;
            match row.as_ref().map(|r| r.state) {
                Some(SubjectState::Shredded) => {
                    let cert = row.and_then(|r| r.certificate).unwrap_or_default();
                    return Ok(Outcome::AlreadyShredded(cert));
                }
                Some(SubjectState::Scheduled) if !immediate => {
                    let at = row.and_then(|r| r.shred_at).unwrap_or_default();
                    return Ok(Outcome::Scheduled(at));
                }
                Some(SubjectState::Scheduled) => {
                    let now = now_i64();
                    // Retention ran out during a grace window: execute now.
                    if self
                        .store
                        .claim_pending(ks, sref, i64::MAX, now + 1, &self.owner)
                        .await?
                    {
                        return self.execute(ks, sref).await.map(Outcome::Shredded);
                    }
                    continue;
                }
                Some(SubjectState::Shredding) => {
                    return self.await_or_take_over(ks, sref).await;
                }
                Some(SubjectState::Active) | None => {}
            }
            // Never seen, no key: nothing to shred (a key made after this is not ours to
            // destroy; a registered subject without a key still gets a certificate).
            if row.is_none()
                && vault
                    .kv_read(&subject_path(ks, sref), None)
                    .await?
                    .is_none()
            {
                return Ok(Outcome::NotFound);
            }
            fail_point("shred-before-claim").await;
            // Claim first, list the keys after (in `execute` / `record_keys`): a key made by a
            // racing cold load is either listed or refused by that load's re-check.
            let now = now_i64();
            let claim = ShredClaim {
                intent: "[]",
                request_id,
                reason: reason_text,
                requested_at: now,
            };
            let grace = self.grace.get(ks).copied().unwrap_or_default();
            if !immediate && !grace.is_zero() {
                let at = now + grace.as_secs() as i64;
                if self.store.schedule(ks, sref, at, &claim, now).await? {
                    let (intent, keys) = self
                        .record_keys(ks, sref, "[]", SubjectState::Scheduled)
                        .await?;
                    self.evict_everywhere(ks, sref, &intent, &keys).await?;
                    tracing::info!(
                        keyspace = ks,
                        subject_ref = &sref[..16],
                        shred_at = at,
                        "shred scheduled"
                    );
                    return Ok(Outcome::Scheduled(at));
                }
            } else if self
                .store
                .claim_shred(ks, sref, &claim, now, &self.owner)
                .await?
            {
                return self.execute(ks, sref).await.map(Outcome::Shredded);
            }
            // The state changed under us (another request or replica): look again.
        }
        Err(Error::internal("shred: subject state kept changing"))
    }

    /// A shred of this subject is running (another request or replica holds its lease):
    /// take it over if the lease went stale, else wait for its certificate.
    async fn await_or_take_over(&self, ks: &str, sref: &str) -> Result<Outcome> {
        let deadline = tokio::time::Instant::now() + self.cfg.stale_shred + Duration::from_secs(5);
        loop {
            let now = now_i64();
            let stale_before = now - self.cfg.stale_shred.as_secs() as i64;
            if self
                .store
                .claim_pending(ks, sref, now, stale_before, &self.owner)
                .await?
            {
                return self.execute(ks, sref).await.map(Outcome::Shredded);
            }
            // Done by the holder of the lease: this call destroyed nothing (a repeated or
            // concurrent request, e.g. one subject twice in a ShredStream).
            if let Some(row) = self.store.subject(ks, sref).await?
                && row.state == SubjectState::Shredded
            {
                return Ok(Outcome::AlreadyShredded(
                    row.certificate.unwrap_or_default(),
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::unavailable(
                    "shred: this subject's shred is in progress elsewhere; retry",
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Lists the keys to destroy, after the claim: those `recorded` before plus the key the
    /// subject record in Vault names now; records them as the intent if that adds any.
    async fn record_keys(
        &self,
        ks: &str,
        sref: &str,
        recorded: &str,
        state: SubjectState,
    ) -> Result<(String, Vec<(KeyId, u32)>)> {
        let mut keys = parse_intent(recorded)?;
        let vault = self.keys.vault();
        if let Some(e) = vault.kv_read(&subject_path(ks, sref), None).await? {
            let k = subject_record_key(&e.data)?;
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        // Every version of every key (a rotated subject has several; the DEK record lists
        // them all, the subject record only the current one). The certificate names each.
        let mut ids: Vec<KeyId> = keys.iter().map(|(k, _)| *k).collect();
        ids.sort();
        ids.dedup();
        for id in ids {
            if let Some(e) = vault.kv_read(&dek_path(ks, &id), None).await? {
                let rec = DekRecord::parse(&e.data, e.version)?;
                for v in rec.versions.keys() {
                    if !keys.contains(&(id, *v)) {
                        keys.push((id, *v));
                    }
                }
            }
        }
        keys.sort();
        let intent = intent_json(&keys);
        if intent != recorded && !self.store.record_intent(ks, sref, &intent, state).await? {
            return Err(Error::internal(
                "shred: the subject changed state while its keys were listed",
            ));
        }
        Ok((intent, keys))
    }

    /// Renews this process's lease on a `shredding` subject; fails if it was lost.
    async fn renew(&self, ks: &str, sref: &str) -> Result<()> {
        if self
            .store
            .renew_lease(ks, sref, &self.owner, now_i64())
            .await?
        {
            Ok(())
        } else {
            Err(Error::unavailable(
                "shred: lease lost (another replica took the shred over); it completes there",
            ))
        }
    }

    async fn evict_everywhere(
        &self,
        ks: &str,
        sref: &str,
        intent: &str,
        keys: &[(KeyId, u32)],
    ) -> Result<()> {
        self.keys.evict(ks, sref, keys);
        self.store
            .publish_eviction(ks, sref, intent, now_i64())
            .await
    }

    /// Steps 2-4 of a shred whose intent is recorded (state `shredding`). Idempotent.
    async fn execute(&self, ks: &str, sref: &str) -> Result<String> {
        let row = self
            .store
            .subject(ks, sref)
            .await?
            .ok_or_else(|| Error::internal("shred: subject row vanished"))?;
        match row.state {
            SubjectState::Shredding => {}
            SubjectState::Shredded => return Ok(row.certificate.unwrap_or_default()),
            other => {
                return Err(Error::internal(format!(
                    "shred: unexpected state {other:?}"
                )));
            }
        }
        self.renew(ks, sref).await?;
        let recorded = row.intent.clone().unwrap_or_else(|| "[]".into());
        let (intent, keys) = self
            .record_keys(ks, sref, &recorded, SubjectState::Shredding)
            .await?;
        fail_point("shred-after-intent").await;

        let now = now_i64();
        // One tombstone and one DEK record per key id, whatever its versions.
        let mut key_ids: Vec<KeyId> = keys.iter().map(|(k, _)| *k).collect();
        key_ids.sort();
        key_ids.dedup();
        let key_hex: Vec<String> = key_ids.iter().map(KeyId::to_hex).collect();
        self.store.add_tombstones(ks, sref, &key_hex, now).await?;
        self.evict_everywhere(ks, sref, &intent, &keys).await?;

        let vault = self.keys.vault();
        let mut paths: Vec<String> = key_ids.iter().map(|k| dek_path(ks, k)).collect();
        paths.push(subject_path(ks, sref));
        for p in &paths {
            vault.kv_delete_metadata(p).await?;
        }
        fail_point("shred-after-vault-delete").await;
        for p in &paths {
            if vault.kv_read(p, None).await?.is_some() {
                return Err(Error::internal(format!(
                    "shred: {p} still readable after deletion"
                )));
            }
        }
        self.renew(ks, sref).await?;
        self.store.purge_subject_tokens(ks, sref, now_i64()).await?;

        let executed_at = now_i64();
        let mut id = [0u8; 16];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| Error::internal("CSPRNG failed"))?;
        let certificate_id = format!("cod-{}", hex::encode(id));
        let request_id = row.request_id.clone().unwrap_or_default();
        let payload = Payload {
            backup_retention_days: self.cfg.backup_retention_days,
            cache_max_survival_secs: self.keys.hard_ttl().as_secs(),
            caller_must_delete: Some(vec![certificate::CALLER_MUST_DELETE.into()]),
            certificate_id: certificate_id.clone(),
            destroyed_keys: keys
                .iter()
                .map(|(k, v)| DestroyedKey {
                    dek_version: *v,
                    key_id: k.to_hex(),
                })
                .collect(),
            destroyed_vault_paths: paths
                .iter()
                .map(|p| format!("{}/metadata/{p}", self.kv_mount))
                .collect(),
            executed_at: crate::domain::time::rfc3339_secs(executed_at),
            format: certificate::FORMAT_V1.into(),
            instance: self.instance.clone(),
            keyspace: ks.to_string(),
            method: certificate::METHOD.into(),
            reason: row.reason.clone().unwrap_or_default(),
            request_id: request_id.clone(),
            requested_at: crate::domain::time::rfc3339_secs(
                row.requested_at.unwrap_or(executed_at),
            ),
            subject_ref: sref.to_string(),
            verification: "every destroyed path read back as not found from Vault before signing"
                .into(),
        }
        .canonical();
        let sig = self.signer.sign(payload.as_bytes()).await?;
        let doc =
            Certificate::new(payload, self.signer.key(), sig.key_version, &sig.bytes).to_json();
        if self
            .store
            .finish_shred(
                ks,
                sref,
                &self.owner,
                &Certified {
                    certificate_id: &certificate_id,
                    request_id: &request_id,
                    document: &doc,
                    executed_at,
                },
            )
            .await?
        {
            tracing::info!(
                keyspace = ks,
                subject_ref = &sref[..16.min(sref.len())],
                certificate_id,
                "subject shredded"
            );
            Ok(doc)
        } else {
            // Another process finished first: its certificate is the one.
            let row = self.store.subject(ks, sref).await?;
            row.and_then(|r| r.certificate)
                .ok_or_else(|| Error::internal("shred finished elsewhere without a certificate"))
        }
    }

    /// The transit key that signs certificates and its public keys by version.
    pub async fn verification_keys(&self) -> Result<(String, Vec<(u32, String)>)> {
        Ok((
            self.signer.key().to_string(),
            self.signer.public_keys().await?,
        ))
    }

    /// The shred status of a subject in one keyspace.
    pub async fn status(&self, keyspace: &str, subject: &str) -> Result<Status> {
        let sref = self.keys.subject_ref(keyspace, subject)?.to_hex();
        let row = self.store.subject(keyspace, &sref).await?;
        let mut st = Status {
            keyspace: keyspace.to_string(),
            state: State::Unknown,
            scheduled_for: None,
            shredded_at: None,
            retain_until: None,
            certificate: None,
        };
        match row {
            Some(r) => {
                st.retain_until = r.retain_until;
                // The last completed shred's time and certificate, whatever the state now: a
                // subject that got a new key after its shred (`after_shred = "new_key"`) is
                // active again, and the proof of that shred stays with it.
                if r.certificate.is_some() {
                    st.shredded_at = r.executed_at;
                    st.certificate = r.certificate;
                }
                st.state = match r.state {
                    SubjectState::Active => State::Active,
                    SubjectState::Scheduled => {
                        st.scheduled_for = r.shred_at;
                        State::Scheduled
                    }
                    SubjectState::Shredding => State::Shredding,
                    SubjectState::Shredded => State::Shredded,
                };
            }
            None => {
                let exists = self
                    .keys
                    .vault()
                    .kv_read(&subject_path(keyspace, &sref), None)
                    .await?
                    .is_some();
                if exists {
                    st.state = State::Active;
                }
            }
        }
        Ok(st)
    }

    /// Cancels a scheduled shred.
    pub async fn cancel(&self, keyspace: &str, subject: &str) -> Result<Status> {
        let sref = self.keys.subject_ref(keyspace, subject)?.to_hex();
        if !self.store.cancel(keyspace, &sref, now_i64()).await? {
            return Err(Error::FailedPrecondition {
                reason: Reason::ShredNotScheduled,
                message: "no shred of this subject is scheduled in this keyspace".into(),
            });
        }
        tracing::info!(
            keyspace,
            subject_ref = &sref[..16],
            "scheduled shred cancelled"
        );
        self.status(keyspace, subject).await
    }

    /// Sets (or clears, with `None`) a subject's retention deadline.
    pub async fn set_retention(
        &self,
        keyspace: &str,
        subject: &str,
        retain_until: Option<i64>,
    ) -> Result<Status> {
        let sref = self.keys.subject_ref(keyspace, subject)?.to_hex();
        self.store
            .set_retention(keyspace, &sref, retain_until, now_i64())
            .await?;
        self.status(keyspace, subject).await
    }

    /// One pass of the reaper: due scheduled shreds, expired retentions, interrupted shreds.
    /// `take_over_all` also takes over fresh `shredding` rows (at start-up). Returns how many
    /// subjects were shredded.
    pub async fn reap(&self, take_over_all: bool) -> Result<usize> {
        let now = now_i64();
        let stale_before = if take_over_all {
            now + 1
        } else {
            now - self.cfg.stale_shred.as_secs() as i64
        };
        // Evictions are read within a poll interval; a day (or the hard TTL, if longer) is
        // far past any replica's need.
        let keep = self
            .keys
            .hard_ttl()
            .max(Duration::from_secs(86_400))
            .as_secs() as i64;
        self.store.prune_evictions(now - keep).await?;
        let keyspaces: Vec<&str> = self.keys.keyspace_names().collect();
        let unconfigured = self
            .store
            .due_unconfigured(now, stale_before, &keyspaces)
            .await?;
        metrics::gauge!("piiguard_reaper_unconfigured_due").set(unconfigured as f64);
        if unconfigured > 0 {
            tracing::warn!(
                rows = unconfigured,
                "reaper: subjects are due in keyspaces that are not configured; they are not shredded"
            );
        }
        // Due rows in due-time order, page by page; at most REAP_PER_PASS a pass, the next
        // pass resuming after the last one (then wrapping around to the start once).
        let mut cursor = self
            .reap_cursor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut wrapped = cursor.is_none();
        let (mut seen, mut done) = (0usize, 0usize);
        loop {
            let page = self
                .store
                .due(now, stale_before, &keyspaces, cursor.as_ref(), REAP_PAGE)
                .await?;
            let full = page.len() as i64 == REAP_PAGE;
            for row in page {
                seen += 1;
                if self.reap_one(&row, now, stale_before).await {
                    done += 1;
                }
                cursor = Some(row);
                if seen >= REAP_PER_PASS {
                    break;
                }
            }
            if seen >= REAP_PER_PASS {
                break;
            }
            if !full {
                cursor = None;
                if wrapped {
                    break;
                }
                wrapped = true;
            }
        }
        *self.reap_cursor.lock().unwrap_or_else(|p| p.into_inner()) = cursor;
        let failing = self
            .store
            .reap_failing(i64::from(self.cfg.reaper_alarm_after_failures))
            .await?;
        metrics::gauge!("piiguard_reaper_stuck_subjects").set(failing as f64);
        Ok(done)
    }

    /// Processes one due row; true if it shredded the subject. A failure is recorded on the
    /// row (backoff; the alarm after `reaper_alarm_after_failures` in a row), never returned:
    /// one failing subject does not stop the others.
    async fn reap_one(&self, row: &DueRow, now: i64, stale_before: i64) -> bool {
        let (ks, sref) = (row.keyspace.as_str(), row.subject_ref.as_str());
        let r = match row.state {
            SubjectState::Active => self
                .shred_ref(
                    ks,
                    sref,
                    "retention period expired",
                    &format!("retention-{now}"),
                    true,
                )
                .await
                .map(|o| match o {
                    Outcome::Shredded(cert) => Some(("retention period expired", cert)),
                    _ => None,
                }),
            _ => match self
                .store
                .claim_pending(ks, sref, now, stale_before, &self.owner)
                .await
            {
                // Exactly one replica wins the claim and executes; the others skip the row.
                Ok(true) => {
                    let why = if row.state == SubjectState::Scheduled {
                        "grace window ended"
                    } else {
                        "interrupted shred completed"
                    };
                    self.execute(ks, sref).await.map(|cert| Some((why, cert)))
                }
                Ok(false) => Ok(None),
                Err(e) => Err(e),
            },
        };
        match r {
            Ok(Some((why, cert))) => {
                self.record_reaper_shred(ks, sref, why, &cert);
                true
            }
            Ok(None) => false,
            Err(e) => {
                self.reap_failed(ks, sref, &e).await;
                false
            }
        }
    }

    /// The audit event of a shred the reaper executed: keyspace, subject reference, why, and
    /// the certificate's id (the certificate names the keys).
    fn record_reaper_shred(&self, ks: &str, sref: &str, why: &str, cert: &str) {
        let certificate_id = Certificate::parse(cert)
            .ok()
            .and_then(|c| serde_json::from_str::<serde_json::Value>(&c.payload).ok())
            .and_then(|p| p["certificate_id"].as_str().map(str::to_string))
            .unwrap_or_default();
        tracing::info!(keyspace = %ks, subject_ref = &sref[..16.min(sref.len())], why, certificate_id, "reaper: keys destroyed");
        if let Some(a) = &self.audit {
            let mut r = Record::event(
                REAPER_SHRED,
                format!("keys destroyed: {why}; certificate {certificate_id}"),
            );
            r.keyspace = Some(ks.to_string());
            r.subject_ref = Some(sref.to_string());
            a.record_event(r);
        }
    }

    async fn reap_failed(&self, ks: &str, sref: &str, e: &Error) {
        metrics::counter!("piiguard_reaper_failures_total").increment(1);
        let short = &sref[..16.min(sref.len())];
        let base = self.cfg.reaper_interval.as_secs().max(1) as i64;
        let cap = self.cfg.reaper_max_backoff.as_secs() as i64;
        let backoff = |attempts: i64| {
            let exp = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
            base.saturating_mul(1i64 << exp).min(cap)
        };
        let attempts = match self.store.reap_failed(ks, sref, now_i64(), backoff).await {
            Ok(n) => n,
            Err(se) => {
                tracing::warn!(keyspace = %ks, error = %se, "reaper: cannot record a failure");
                0
            }
        };
        tracing::warn!(keyspace = %ks, subject_ref = short, attempts, error = %e, detail = ?e, "reaper: shred failed; will retry");
        if attempts == i64::from(self.cfg.reaper_alarm_after_failures) {
            let detail = format!(
                "reaper failed {attempts} times in a row to shred subject {short}… in keyspace {ks}: {e}; retrying with backoff"
            );
            match &self.alarms {
                Some(a) => a.raise(REAPER_STUCK, Severity::Critical, None, None, detail),
                None => tracing::error!(alarm = REAPER_STUCK, detail = %detail, "ALARM"),
            }
        }
    }

    /// Runs the reaper (first pass at once, taking over interrupted shreds) and the eviction
    /// feed listener.
    pub fn spawn_background(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut first = true;
            loop {
                match me.reap(first).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(shredded = n, "reaper pass"),
                    Err(e) => tracing::warn!(error = %e, detail = ?e, "reaper pass failed"),
                }
                first = false;
                tokio::time::sleep(me.cfg.reaper_interval).await;
            }
        });
        let me = self.clone();
        tokio::spawn(async move { me.follow_evictions().await });
    }

    /// Follows the eviction feed of the other replicas: reads it every
    /// `erasure.eviction_poll_millis`, and at once when PostgreSQL notifies a committed
    /// eviction. Rows that commit out of seq order are still delivered (the feed asks again
    /// for the seqs it skipped, for the cache's hard TTL: security review finding 5).
    async fn follow_evictions(&self) {
        let poll = self.cfg.eviction_poll;
        let mut feed = loop {
            match self.store.eviction_feed(self.keys.hard_ttl()).await {
                Ok(f) => break f,
                Err(e) => {
                    tracing::warn!(error = %e, "eviction feed: cannot read; retrying");
                    tokio::time::sleep(poll).await;
                }
            }
        };
        let mut wakeups = None;
        let mut listen_retry_at = tokio::time::Instant::now();
        loop {
            if wakeups.is_none() && tokio::time::Instant::now() >= listen_retry_at {
                match self.store.eviction_wakeups().await {
                    Ok(w) => wakeups = w,
                    Err(e) => {
                        tracing::warn!(error = %e, "eviction feed: cannot listen for notifications; polling");
                    }
                }
                // SQLite (no listener) and a failed LISTEN: look again later, not every poll.
                listen_retry_at = tokio::time::Instant::now() + poll.max(Duration::from_secs(5));
            }
            match wakeups.as_mut() {
                Some(w) => {
                    tokio::select! {
                        r = w.wait() => if let Err(e) = r {
                            tracing::warn!(error = %e, "eviction feed: listener failed; polling");
                            wakeups = None;
                            tokio::time::sleep(poll).await;
                        },
                        () = tokio::time::sleep(poll) => {}
                    }
                }
                None => tokio::time::sleep(poll).await,
            }
            match self.store.next_evictions(&mut feed, 1000).await {
                Ok(evs) => {
                    for ev in evs {
                        match parse_intent(&ev.intent) {
                            Ok(keys) => {
                                self.keys.evict(&ev.keyspace, &ev.subject_ref, &keys);
                                tracing::debug!(seq = ev.seq, keyspace = %ev.keyspace, "eviction feed: applied");
                            }
                            Err(e) => tracing::warn!(error = %e, "eviction feed: bad entry"),
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "eviction feed: read failed"),
            }
        }
    }
}
