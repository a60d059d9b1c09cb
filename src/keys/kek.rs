//! KEK rotation: the background rewrap of every wrapped value of a keyspace to the newest
//! version of its KEK, key status, and retiring old KEK versions. docs/KEYS.md.
//!
//! Wrapped values (`vault:vN:…`, N = KEK version) live in three places of Vault KV, the
//! job's three phases, in this order:
//! 1. `index`: `keyspaces/<ks>/index-key` (`wrapped`);
//! 2. `deks`: `deks/<ks>/<key_id>` (every version's `wrapped`, through [`DekRecord`]);
//! 3. `subjects`: `subjects/<ks>/<subject_ref>` (`wrapped`: the current DEK version's; a
//!    copy of the DEK record's, or, for a subject never rotated, the only copy: such a
//!    subject has no DEK record).
//!
//! The job ([`KekRotation::run_once`]): when the KEK's latest version is newer than the version
//! the job last finished for (after [`KekRotation::rotate`], after Vault's own
//! `auto_rotate_period`, found by polling, or at the first start), one replica takes the
//! keyspace's lease in the store (`store/kek.rs`) and walks the three phases in sorted key
//! order, a batch at a time: read the records (bounded concurrency), rewrap every value below
//! the latest version in one transit `rewrap` `batch_input` call (the plaintext never leaves
//! Vault), and write each record back **with check-and-set against the KV version it read**.
//! On a mismatch (a rotation of the subject key, a new version, a shred) the record is read
//! again and redone, so no concurrent write is lost; a record deleted meanwhile (a shred) is
//! never written back (check-and-set on a deleted path fails). Every field not rewrapped is
//! kept as it was. After each batch the progress (phase and last key, counts) is saved under
//! the lease and the lease renewed; a lost lease stops this replica. A run killed half-way
//! resumes after the saved key, by this replica or (after the lease expires) another; a value
//! already at the latest version is never rewrapped again.
//!
//! Counts: the run tallies every wrapped value it sees (DEK versions and the index key; the
//! subject records' copies are rewrapped but counted as subjects, except the only copy of a
//! subject never rotated, which also counts as a DEK version: its key id is not among the
//! DEK records listed as the run began) and, when it finishes,
//! replaces the stored counts and their scan time; while it runs, each rewrap moves one value
//! from its old version's count to the new. Subjects registered in the store since the scan
//! began, less those the scan saw, are added to the latest version's count by
//! [`KekRotation::status`] (one DEK each; new DEK versions of existing subjects are not, until
//! the next scan). New wraps always use the
//! latest version, so the counts of older versions can only fall between scans.
//!
//! Why nothing fails during a rotation: new wraps use the latest KEK version; every older
//! version keeps decrypting until it is retired; cached DEKs are plaintext in memory and do not
//! notice; a record read while the job rewrites it holds either wrapping of the same DEK.
//!
//! Retiring ([`KekRotation::retire`]) reads every record again (a fresh scan, not the counts)
//! and refuses while any value is below the requested minimum. A value below it cannot appear
//! after that scan: every wrap uses the latest version, and the minimum may not exceed it; the
//! one exception is a wrap that asked Vault before the newest allowed version existed and
//! wrote its record after the scan passed, so the call also refuses until that version is
//! older than [`IN_FLIGHT_MARGIN_SECS`] plus twice the Vault request timeout (the longest a
//! wrap and its KV write can be in flight). For the same reason a run that listed the records
//! within that bound of the version's creation lists again once it has passed, and rewraps the
//! records that appeared (`late_records`), before it reports the run finished.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::{Value, json};

use super::manager::{index_key_path, kek_name, now_i64};
use super::record::DekRecord;
use crate::config::{KekConfig, KeyspaceConfig};
use crate::error::{Error, Reason, Result};
use crate::secret::WrappedDek;
use crate::store::Store;
use crate::store::kek::{KekCounts, KekJob};
use crate::vault::kek::KekInfo;
use crate::vault::{CasOutcome, KvEntry, Vault};

/// Seconds a retired-to version must have existed beyond twice the Vault request timeout
/// (see the module documentation).
pub const IN_FLIGHT_MARGIN_SECS: u64 = 5;

/// How many times one record is redone after check-and-set mismatches before the batch fails
/// (and the run is retried at the next poll).
const CAS_ATTEMPTS: usize = 8;

/// The three places of wrapped values, in the order the job walks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Index,
    Deks,
    Subjects,
}

const PHASES: [Phase; 3] = [Phase::Index, Phase::Deks, Phase::Subjects];

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Index => "index",
            Phase::Deks => "deks",
            Phase::Subjects => "subjects",
        }
    }

    fn position(self) -> usize {
        PHASES.iter().position(|p| *p == self).unwrap_or(0)
    }

    /// The KV paths of this phase, sorted.
    async fn paths(self, vault: &Vault, ks: &str) -> Result<Vec<(String, String)>> {
        match self {
            Phase::Index => Ok(vec![("index-key".into(), index_key_path(ks))]),
            Phase::Deks | Phase::Subjects => {
                let prefix = format!("{}/{ks}", self.name());
                Ok(vault
                    .kv_list(&prefix)
                    .await?
                    .into_iter()
                    .filter(|k| !k.ends_with('/'))
                    .map(|k| {
                        let p = format!("{prefix}/{k}");
                        (k, p)
                    })
                    .collect())
            }
        }
    }

    /// The wrapped values of a record, in a fixed order.
    fn wrapped(self, e: &KvEntry) -> Result<Vec<WrappedDek>> {
        match self {
            Phase::Deks => Ok(DekRecord::parse(&e.data, e.version)?
                .versions
                .into_values()
                .map(|v| v.wrapped)
                .collect()),
            Phase::Index | Phase::Subjects => e.data["wrapped"]
                .as_str()
                .and_then(|w| WrappedDek::parse(w).ok())
                .map(|w| vec![w])
                .ok_or_else(|| Error::internal("malformed wrapped value in Vault")),
        }
    }

    /// The record with its wrapped values replaced by `new` (same order as
    /// [`wrapped`](Self::wrapped)); every other field as it was.
    fn replaced(self, e: &KvEntry, new: &[WrappedDek]) -> Result<Value> {
        match self {
            Phase::Deks => {
                let mut rec = DekRecord::parse(&e.data, e.version)?;
                if rec.versions.len() != new.len() {
                    return Err(Error::internal("DEK record changed under a rewrap"));
                }
                for (v, w) in rec.versions.values_mut().zip(new) {
                    v.wrapped = w.clone();
                }
                Ok(rec.to_json())
            }
            Phase::Index | Phase::Subjects => {
                let mut d = e.data.clone();
                let w = new
                    .first()
                    .ok_or_else(|| Error::internal("no rewrapped value"))?;
                d["wrapped"] = json!(w.as_str());
                Ok(d)
            }
        }
    }

    /// Whether this phase's values count as wrapped DEKs (subject records hold copies).
    fn counted(self) -> bool {
        self != Phase::Subjects
    }
}

/// The outcome of one record in a batch.
#[derive(Default)]
struct RecordOutcome {
    /// KEK versions of its values after the step (empty: the record is gone).
    versions: Vec<u32>,
    /// (old, new) KEK versions of every value rewrapped.
    moved: Vec<(u32, u32)>,
    /// The record's `created_at` (subject records).
    created_at: Option<i64>,
    /// The key id a subject record names, and the record's last path segment (its subject
    /// reference).
    key_id: Option<(String, String)>,
}

impl RecordOutcome {
    fn of(path: &str, entry: &KvEntry, versions: &[WrappedDek], moved: Vec<(u32, u32)>) -> Self {
        let name = path.rsplit('/').next().unwrap_or_default();
        Self {
            versions: versions.iter().map(WrappedDek::kek_version).collect(),
            moved,
            created_at: entry.data["created_at"].as_i64(),
            key_id: entry.data["key_id"]
                .as_str()
                .map(|k| (k.to_owned(), name.to_owned())),
        }
    }
}

/// Key status of a keyspace.
#[derive(Debug, Clone)]
pub struct KeyStatus {
    /// The KEK in Vault.
    pub kek: KekInfo,
    /// The job's row, if the job ever ran.
    pub job: Option<KekJob>,
    /// Subjects registered since the last full scan (each with one DEK, wrapped with the
    /// latest KEK version), less the DEK records the scan saw of them.
    pub new_since_scan: u64,
    /// The same, less the subject records the scan saw of them.
    pub new_subjects_since_scan: u64,
}

impl KeyStatus {
    /// Wrapped DEKs per KEK version: the last full scan adjusted by rewraps since, or, before
    /// the first scan has finished, what the running scan has seen so far.
    pub fn counts(&self) -> KekCounts {
        let mut c = match &self.job {
            Some(j) if j.scanned_at > 0 => j.counts.clone(),
            Some(j) => j.run_counts.clone(),
            None => KekCounts::new(),
        };
        if self.new_since_scan > 0 {
            *c.entry(self.new_subjects_version()).or_default() += self.new_since_scan;
        }
        c
    }

    /// The KEK version the DEKs of subjects registered since the scan are wrapped with: the
    /// job's target, which is the latest version for as long as the job keeps up; between a
    /// rotation and the start of its run they were made before the rotation (a run folds them
    /// into its counts as it begins: see `KekRotation::run_once`).
    fn new_subjects_version(&self) -> u32 {
        match &self.job {
            Some(j) if j.target_version > 0 => j.target_version.min(self.kek.latest_version),
            _ => self.kek.latest_version,
        }
    }

    /// Subjects with a DEK: the last full scan's and those registered since.
    pub fn subjects(&self) -> u64 {
        match &self.job {
            Some(j) if j.scanned_at > 0 => j.subjects + self.new_subjects_since_scan,
            Some(j) => j.run_subjects,
            None => 0,
        }
    }

    /// Whether a rewrap is running or due.
    pub fn running(&self) -> bool {
        self.job
            .as_ref()
            .is_none_or(|j| j.target_version < self.kek.latest_version || j.finished_at == 0)
    }
}

/// One keyspace the job looks after.
struct Ks {
    name: String,
    kek: String,
    rotate_period_secs: u64,
}

/// The KEK rotation job and the key-status and retirement calls of every keyspace.
pub struct KekRotation {
    vault: Arc<Vault>,
    store: Arc<Store>,
    cfg: KekConfig,
    owner: String,
    keyspaces: Vec<Ks>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for KekRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KekRotation")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl KekRotation {
    /// The job for `keyspaces`; `instance` names this replica in the lease (with a random
    /// suffix, so two processes never share one owner id).
    pub fn new(
        vault: Arc<Vault>,
        store: Arc<Store>,
        cfg: KekConfig,
        instance: &str,
        keyspaces: &std::collections::BTreeMap<String, KeyspaceConfig>,
    ) -> Result<Self> {
        let mut suffix = [0u8; 8];
        aws_lc_rs::rand::fill(&mut suffix).map_err(|_| Error::internal("CSPRNG failed"))?;
        Ok(Self {
            vault,
            store,
            cfg,
            owner: format!("{instance}/{}", hex::encode(suffix)),
            keyspaces: keyspaces
                .iter()
                .map(|(n, k)| Ks {
                    name: n.clone(),
                    kek: kek_name(n),
                    rotate_period_secs: k.kek_rotate_days * 86_400,
                })
                .collect(),
            wake: tokio::sync::Notify::new(),
        })
    }

    fn ks(&self, name: &str) -> Result<&Ks> {
        self.keyspaces
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| {
                Error::invalid(
                    Reason::UnknownKeyspace,
                    format!(
                        "unknown keyspace {:?}",
                        super::manager::truncate_for_message(name)
                    ),
                )
            })
    }

    /// The KEK and the job state of `keyspace`.
    pub async fn status(&self, keyspace: &str) -> Result<KeyStatus> {
        let ks = self.ks(keyspace)?;
        let kek = self.vault.kek_info(&ks.kek).await?;
        let job = self.store.kek_job(keyspace).await?;
        let (new_since_scan, new_subjects_since_scan) = match &job {
            Some(j) if j.scanned_at > 0 => {
                let n = self
                    .store
                    .subjects_created_since(keyspace, j.scanned_at)
                    .await?;
                (
                    n.saturating_sub(j.seen_new),
                    n.saturating_sub(j.seen_new_subjects),
                )
            }
            _ => (0, 0),
        };
        Ok(KeyStatus {
            kek,
            job,
            new_since_scan,
            new_subjects_since_scan,
        })
    }

    /// Makes a new KEK version and wakes the job. Returns the new version and how many wrapped
    /// DEKs the counts say are on older versions.
    pub async fn rotate(&self, keyspace: &str) -> Result<(u32, u64)> {
        let ks = self.ks(keyspace)?;
        let before = self.status(keyspace).await?;
        let info = self.vault.rotate_kek(&ks.kek).await?;
        let to_rewrap = before
            .counts()
            .range(..info.latest_version)
            .map(|(_, n)| *n)
            .sum();
        tracing::info!(
            keyspace,
            new_version = info.latest_version,
            to_rewrap,
            "KEK rotated"
        );
        self.wake.notify_one();
        Ok((info.latest_version, to_rewrap))
    }

    /// Sets the KEK's `min_decryption_version` to `min` after a fresh scan found no wrapped
    /// value below it. Refuses (`KEK_VERSION_IN_USE`) while one is, or while version `min` is
    /// too new for wraps in flight to have landed. Returns the minimum in force.
    pub async fn retire(&self, keyspace: &str, min: u32) -> Result<u32> {
        let ks = self.ks(keyspace)?;
        let info = self.vault.kek_info(&ks.kek).await?;
        if min == 0 || min > info.latest_version {
            return Err(Error::invalid(
                Reason::InvalidRequest,
                format!(
                    "min_decryption_version must be between 1 and the latest KEK version ({})",
                    info.latest_version
                ),
            ));
        }
        if min <= info.min_decryption_version {
            return Ok(info.min_decryption_version); // nothing to retire
        }
        let settle = 2 * self.vault.config().request_timeout.as_secs() + IN_FLIGHT_MARGIN_SECS;
        let age = info
            .created_at(min)
            .map_or(i64::MAX, |t| now_i64().saturating_sub(t));
        if age < settle as i64 {
            return Err(in_use(format!(
                "KEK version {min} is {age} s old; wraps made before it may still be in flight: retry in {} s",
                settle as i64 - age
            )));
        }
        let mut below = 0u64;
        for phase in PHASES {
            let paths = phase.paths(&self.vault, keyspace).await?;
            for chunk in paths.chunks(self.cfg.batch) {
                for (_, entry) in self.read_all(chunk).await? {
                    if let Some(e) = entry {
                        below += phase
                            .wrapped(&e)?
                            .iter()
                            .filter(|w| w.kek_version() < min)
                            .count() as u64;
                    }
                }
            }
        }
        if below > 0 {
            return Err(in_use(format!(
                "{below} wrapped DEK(s) still use a KEK version below {min}; wait for the rewrap (piiguard keys status) and retry"
            )));
        }
        self.vault
            .configure_kek(&ks.kek, &json!({ "min_decryption_version": min }))
            .await?;
        tracing::info!(
            keyspace,
            min_decryption_version = min,
            "KEK versions retired"
        );
        Ok(min)
    }

    /// Sets each KEK's `auto_rotate_period` to the configured `kek_rotate_days` where Vault
    /// has another value (so a changed config reaches Vault without a new bootstrap).
    pub async fn apply_rotate_periods(&self) -> Result<()> {
        for ks in &self.keyspaces {
            let info = self.vault.kek_info(&ks.kek).await?;
            if info.auto_rotate_period_secs != ks.rotate_period_secs {
                self.vault
                    .configure_kek(
                        &ks.kek,
                        &json!({ "auto_rotate_period": format!("{}s", ks.rotate_period_secs) }),
                    )
                    .await?;
                tracing::info!(
                    keyspace = %ks.name,
                    auto_rotate_period_secs = ks.rotate_period_secs,
                    "KEK auto-rotation period set from the config"
                );
            }
        }
        Ok(())
    }

    /// Wakes the job now (after a rotation made elsewhere).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Spawns the job: every keyspace at start, then at every poll or wake-up.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.apply_rotate_periods().await {
                tracing::warn!(error = %e, detail = ?e, "could not apply the KEK auto-rotation periods");
            }
            loop {
                for i in 0..me.keyspaces.len() {
                    let name = me.keyspaces[i].name.clone();
                    match me.run_once(&name).await {
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(keyspace = %name, error = %e, detail = ?e, "KEK rewrap step failed; retrying at the next poll");
                        }
                    }
                }
                tokio::select! {
                    () = me.wake.notified() => {}
                    () = tokio::time::sleep(me.cfg.poll) => {}
                }
            }
        })
    }

    fn lease_until(&self, now: i64) -> i64 {
        now + self.cfg.lease.as_secs() as i64
    }

    /// One run of the job on `keyspace`, if one is due and this replica gets the lease.
    /// Returns whether this replica ran it to the end.
    pub async fn run_once(&self, keyspace: &str) -> Result<bool> {
        let ks = self.ks(keyspace)?;
        let info = self.vault.kek_info(&ks.kek).await?;
        let latest = info.latest_version;
        let due = |j: &Option<KekJob>| {
            j.as_ref()
                .is_none_or(|j| j.target_version < latest || j.finished_at == 0)
        };
        if !due(&self.store.kek_job(keyspace).await?) {
            return Ok(false);
        }
        let now = now_i64();
        if !self
            .store
            .kek_lease(keyspace, &self.owner, now, self.lease_until(now))
            .await?
        {
            return Ok(false); // another replica runs it
        }
        let mut job = self.store.kek_job(keyspace).await?.unwrap_or_default();
        job.keyspace = keyspace.to_string();
        if job.target_version == latest && job.finished_at != 0 {
            self.store.kek_release(keyspace, &self.owner).await?;
            return Ok(false); // finished by another replica meanwhile
        }
        if job.target_version != latest {
            // A new run (or one that a newer rotation overtook: it restarts for the newest).
            self.fold_new_subjects(&mut job, now).await?;
            job.target_version = latest;
            job.cursor.clear();
            job.done = 0;
            job.started_at = now;
            job.finished_at = 0;
            job.run_counts.clear();
            job.run_subjects = 0;
            job.run_seen_new = 0;
            job.run_seen_new_subjects = 0;
        }
        tracing::info!(keyspace, target_version = latest, resume_after = %job.cursor, "KEK rewrap run began");
        let result = self.run_locked(ks, &mut job).await;
        if let Err(e) = self.store.kek_release(keyspace, &self.owner).await {
            tracing::warn!(error = %e, "could not release the KEK rewrap lease");
        }
        result
    }

    /// As a run for a new KEK version begins, the subjects registered since the last scan
    /// (counted on the previous target version, the latest when they were made; if several
    /// rotations came before the job ran, some are on a version between) join the counts,
    /// and the scan's start moves to now. Without this they would be counted on the new
    /// version for the whole run, and GetKeyStatus would show the old version empty while it
    /// still held them. The run's rewraps then move them like any other.
    async fn fold_new_subjects(&self, job: &mut KekJob, now: i64) -> Result<()> {
        if job.scanned_at <= 0 || job.target_version == 0 {
            return Ok(());
        }
        let since_scan = self
            .store
            .subjects_created_since(&job.keyspace, job.scanned_at)
            .await?;
        let deks = since_scan.saturating_sub(job.seen_new);
        if deks > 0 {
            *job.counts.entry(job.target_version).or_default() += deks;
        }
        job.subjects += since_scan.saturating_sub(job.seen_new_subjects);
        // Those of this very second are folded already: `seen_new*` keeps them from being
        // counted again from `scanned_at = now` on.
        let this_second = self
            .store
            .subjects_created_since(&job.keyspace, now)
            .await?;
        job.scanned_at = now;
        job.seen_new = this_second;
        job.seen_new_subjects = this_second;
        Ok(())
    }

    async fn run_locked(&self, ks: &Ks, job: &mut KekJob) -> Result<bool> {
        let latest = job.target_version;
        let (resume_phase, resume_key) = match job.cursor.split_once('/') {
            Some((p, k)) => (
                PHASES.iter().position(|x| x.name() == p).unwrap_or(0),
                k.to_string(),
            ),
            None => (0, String::new()),
        };
        let listed_at = now_i64();
        let mut listed = Vec::new();
        for phase in PHASES {
            listed.push(phase.paths(&self.vault, &ks.name).await?);
        }
        job.total = listed.iter().map(|l| l.len() as u64).sum();
        let seen: HashSet<String> = listed.iter().flatten().map(|(_, p)| p.clone()).collect();
        // Key ids with a DEK record: a subject record naming another key holds that key's only
        // wrapped copy (a subject never rotated) and is counted as a DEK too.
        let with_record: HashSet<String> = listed[Phase::Deks.position()]
            .iter()
            .map(|(k, _)| k.clone())
            .collect();
        for (phase, paths) in PHASES.into_iter().zip(listed) {
            if phase.position() < resume_phase {
                continue;
            }
            let todo: Vec<(String, String)> = if phase.position() == resume_phase {
                paths.into_iter().filter(|(k, _)| *k > resume_key).collect()
            } else {
                paths
            };
            for chunk in todo.chunks(self.cfg.batch) {
                let outcomes = self.step(ks, phase, chunk, latest).await?;
                self.tally(ks, job, phase, &outcomes, &with_record).await?;
                job.done += chunk.len() as u64;
                if let Some((k, _)) = chunk.last() {
                    job.cursor = format!("{}/{k}", phase.name());
                }
                if !self.save_progress(ks, job).await? {
                    return Ok(false);
                }
                if phase != Phase::Index {
                    crate::config::failpoint::point("kek-rewrap-after-batch").await;
                }
            }
        }
        if !self
            .late_records(ks, job, listed_at, &seen, &with_record)
            .await?
        {
            return Ok(false);
        }
        job.finished_at = now_i64();
        job.counts = std::mem::take(&mut job.run_counts);
        job.subjects = job.run_subjects;
        job.seen_new = job.run_seen_new;
        job.seen_new_subjects = job.run_seen_new_subjects;
        // The counts are of the records as listed from the run's start on.
        job.scanned_at = job.started_at;
        job.cursor.clear();
        if !self.store.kek_save(job, &self.owner).await? {
            return Ok(false);
        }
        tracing::info!(
            keyspace = %ks.name,
            target_version = latest,
            records = job.done,
            "KEK rewrap run finished"
        );
        Ok(true)
    }

    /// Counts a batch's outcomes into the run (and moves rewrapped values in the current
    /// counts); a batch of subject records also re-records their key ids.
    async fn tally(
        &self,
        ks: &Ks,
        job: &mut KekJob,
        phase: Phase,
        outcomes: &[RecordOutcome],
        with_record: &HashSet<String>,
    ) -> Result<()> {
        for o in outcomes {
            let new_record = o.created_at.is_some_and(|t| t >= job.started_at);
            let sole_copy = phase == Phase::Subjects
                && o.key_id
                    .as_ref()
                    .is_some_and(|(k, _)| !with_record.contains(k));
            if phase.counted() || sole_copy {
                if phase != Phase::Index && new_record {
                    job.run_seen_new += 1;
                }
                for v in &o.versions {
                    *job.run_counts.entry(*v).or_default() += 1;
                }
                for (old, new) in &o.moved {
                    if let Some(n) = job.counts.get_mut(old) {
                        *n = n.saturating_sub(1);
                    }
                    *job.counts.entry(*new).or_default() += 1;
                }
            }
            if phase == Phase::Subjects && !o.versions.is_empty() {
                job.run_subjects += 1;
                if new_record {
                    job.run_seen_new_subjects += 1;
                }
            }
        }
        job.counts.retain(|_, n| *n > 0);
        if phase == Phase::Subjects {
            self.record_key_ids(ks, outcomes).await?;
        }
        Ok(())
    }

    /// Saves the job's progress under the lease and renews it; false if the lease was lost.
    async fn save_progress(&self, ks: &Ks, job: &KekJob) -> Result<bool> {
        let now = now_i64();
        if self
            .store
            .kek_lease(&ks.name, &self.owner, now, self.lease_until(now))
            .await?
            && self.store.kek_save(job, &self.owner).await?
        {
            return Ok(true);
        }
        tracing::warn!(keyspace = %ks.name, "KEK rewrap lease lost; another replica continues");
        Ok(false)
    }

    /// Records written after the run listed them but wrapped with an older KEK version: a
    /// new subject's record (or a DEK record's first write) lands after its wrap, and a wrap
    /// asked for just before the rotation may land after the listing. When the listing came
    /// less than the in-flight bound after the target version was made (2 x the Vault request
    /// timeout + [`IN_FLIGHT_MARGIN_SECS`], as for retiring), the run waits until that bound
    /// has passed (renewing its lease), lists again and rewraps the records it had not seen.
    /// False if the lease was lost.
    async fn late_records(
        &self,
        ks: &Ks,
        job: &mut KekJob,
        listed_at: i64,
        seen: &HashSet<String>,
        with_record: &HashSet<String>,
    ) -> Result<bool> {
        let settle = 2 * self.vault.config().request_timeout.as_secs() + IN_FLIGHT_MARGIN_SECS;
        let info = self.vault.kek_info(&ks.kek).await?;
        let Some(made) = info.created_at(job.target_version) else {
            return Ok(true);
        };
        let until = made.saturating_add(settle as i64);
        if listed_at >= until {
            return Ok(true);
        }
        let step = (self.cfg.lease.as_secs() / 3).max(1);
        loop {
            let now = now_i64();
            if now >= until {
                break;
            }
            tokio::time::sleep(Duration::from_secs(((until - now) as u64).min(step))).await;
            if !self.save_progress(ks, job).await? {
                return Ok(false);
            }
        }
        for phase in [Phase::Deks, Phase::Subjects] {
            let late: Vec<(String, String)> = phase
                .paths(&self.vault, &ks.name)
                .await?
                .into_iter()
                .filter(|(_, p)| !seen.contains(p))
                .collect();
            for chunk in late.chunks(self.cfg.batch) {
                let outcomes = self.step(ks, phase, chunk, job.target_version).await?;
                self.tally(ks, job, phase, &outcomes, with_record).await?;
                job.done += chunk.len() as u64;
                job.total += chunk.len() as u64;
                if !self.save_progress(ks, job).await? {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Re-records in the registry the key ids of the subject records a batch read (see
    /// [`Store::record_key_ids`]).
    async fn record_key_ids(&self, ks: &Ks, outcomes: &[RecordOutcome]) -> Result<()> {
        let seen: Vec<(String, String, i64)> = outcomes
            .iter()
            .filter(|o| !o.versions.is_empty())
            .filter_map(|o| {
                let (key_id, sref) = o.key_id.clone()?;
                Some((sref, key_id, o.created_at.unwrap_or_else(now_i64)))
            })
            .collect();
        let changed = self.store.record_key_ids(&ks.name, &seen).await?;
        if changed > 0 {
            tracing::warn!(
                keyspace = %ks.name,
                subjects = changed,
                "the KEK rewrap scan re-recorded key ids the registry lacked (a store restored from an older backup?)"
            );
        }
        Ok(())
    }

    /// Reads `paths` with bounded concurrency, in order.
    async fn read_all(&self, paths: &[(String, String)]) -> Result<Vec<(String, Option<KvEntry>)>> {
        let vault = &self.vault;
        let futs: Vec<_> = paths
            .iter()
            .map(|(_, p)| {
                let p = p.clone();
                async move {
                    let e = vault.kv_read(&p, None).await?;
                    Ok::<_, Error>((p, e))
                }
            })
            .collect();
        let reads = futures_util::stream::iter(futs)
            .buffered(self.cfg.concurrency)
            .collect::<Vec<_>>()
            .await;
        reads.into_iter().collect()
    }

    /// One batch: read, rewrap what is below `latest` in one transit call, write back with
    /// check-and-set; records that changed meanwhile are redone one by one.
    async fn step(
        &self,
        ks: &Ks,
        phase: Phase,
        chunk: &[(String, String)],
        latest: u32,
    ) -> Result<Vec<RecordOutcome>> {
        let read = self.read_all(chunk).await?;
        let mut outcomes: Vec<RecordOutcome> = Vec::with_capacity(read.len());
        let mut pending: Vec<(String, KvEntry, Vec<WrappedDek>)> = Vec::new();
        for (path, entry) in read {
            let Some(entry) = entry else {
                outcomes.push(RecordOutcome::default());
                continue;
            };
            let values = phase.wrapped(&entry)?;
            if values.iter().all(|w| w.kek_version() >= latest) {
                outcomes.push(RecordOutcome::of(&path, &entry, &values, Vec::new()));
            } else {
                pending.push((path, entry, values));
            }
        }
        if pending.is_empty() {
            return Ok(outcomes);
        }
        // One transit call for the whole batch (only values below `latest` are sent).
        let old: Vec<&WrappedDek> = pending
            .iter()
            .flat_map(|(_, _, v)| v.iter().filter(|w| w.kek_version() < latest))
            .collect();
        let mut fresh = Vec::with_capacity(old.len());
        for part in old.chunks(self.cfg.batch.max(1)) {
            fresh.extend(self.vault.rewrap_batch(&ks.kek, part).await?);
        }
        let mut fresh = fresh.into_iter();
        let mut writes = Vec::with_capacity(pending.len());
        for (path, entry, values) in pending {
            let mut moved = Vec::new();
            let new: Vec<WrappedDek> = values
                .iter()
                .map(|w| {
                    if w.kek_version() < latest {
                        let n = fresh.next().unwrap_or_else(|| w.clone());
                        moved.push((w.kek_version(), n.kek_version()));
                        n
                    } else {
                        w.clone()
                    }
                })
                .collect();
            writes.push((path, entry, new, moved));
        }
        let futs: Vec<_> = writes
            .into_iter()
            .map(|(path, entry, new, moved)| async move {
                let data = phase.replaced(&entry, &new)?;
                match self.vault.kv_write_cas(&path, &data, entry.version).await? {
                    CasOutcome::Written(_) => Ok(RecordOutcome::of(&path, &entry, &new, moved)),
                    CasOutcome::Mismatch => self.redo(ks, phase, &path, latest).await,
                }
            })
            .collect();
        let written = futures_util::stream::iter(futs)
            .buffer_unordered(self.cfg.concurrency)
            .collect::<Vec<Result<RecordOutcome>>>()
            .await;
        for w in written {
            outcomes.push(w?);
        }
        Ok(outcomes)
    }

    /// A record whose check-and-set failed: read it again and rewrap it alone, until a write
    /// lands, it needs nothing, or it is gone.
    async fn redo(&self, ks: &Ks, phase: Phase, path: &str, latest: u32) -> Result<RecordOutcome> {
        for _ in 0..CAS_ATTEMPTS {
            let Some(entry) = self.vault.kv_read(path, None).await? else {
                return Ok(RecordOutcome::default()); // shredded meanwhile
            };
            let values = phase.wrapped(&entry)?;
            let old: Vec<&WrappedDek> =
                values.iter().filter(|w| w.kek_version() < latest).collect();
            if old.is_empty() {
                return Ok(RecordOutcome::of(path, &entry, &values, Vec::new()));
            }
            let mut fresh = self.vault.rewrap_batch(&ks.kek, &old).await?.into_iter();
            let mut moved = Vec::new();
            let new: Vec<WrappedDek> = values
                .iter()
                .map(|w| {
                    if w.kek_version() < latest {
                        let n = fresh.next().unwrap_or_else(|| w.clone());
                        moved.push((w.kek_version(), n.kek_version()));
                        n
                    } else {
                        w.clone()
                    }
                })
                .collect();
            let data = phase.replaced(&entry, &new)?;
            if let CasOutcome::Written(_) =
                self.vault.kv_write_cas(path, &data, entry.version).await?
            {
                return Ok(RecordOutcome::of(path, &entry, &new, moved));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(Error::unavailable(format!(
            "KEK rewrap: {path} kept changing; retried {CAS_ATTEMPTS} times"
        )))
    }
}

fn in_use(message: String) -> Error {
    Error::FailedPrecondition {
        reason: Reason::KekVersionInUse,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::aead::Algorithm;

    fn w(v: u32, b: &str) -> WrappedDek {
        WrappedDek::parse(format!("vault:v{v}:{b}")).unwrap()
    }

    #[test]
    fn a_dek_record_is_rewrapped_version_by_version_and_keeps_every_other_field() {
        let mut rec = DekRecord::new("ab".into(), Algorithm::Aes256Gcm, 1, w(1, "a"), 5);
        rec.push_version(w(2, "b"), 9);
        let e = KvEntry {
            data: rec.to_json(),
            version: 3,
        };
        let vals = Phase::Deks.wrapped(&e).unwrap();
        assert_eq!(
            vals.iter().map(WrappedDek::kek_version).collect::<Vec<_>>(),
            [1, 2]
        );
        let out = Phase::Deks.replaced(&e, &[w(3, "x"), w(3, "y")]).unwrap();
        let back = DekRecord::parse(&out, 4).unwrap();
        assert_eq!(back.current, 2);
        assert_eq!(back.subject_ref, "ab");
        assert_eq!(back.version(1).unwrap().wrapped.as_str(), "vault:v3:x");
        assert_eq!(back.version(2).unwrap().created_at, 9);
        assert!(Phase::Deks.replaced(&e, &[w(3, "x")]).is_err());
    }

    #[test]
    fn a_format_1_dek_record_is_written_back_as_format_2() {
        let e = KvEntry {
            data: json!({"subject_ref": "ab", "wrapped": "vault:v1:AA==", "alg": "aes-256-gcm", "created_at": 5}),
            version: 1,
        };
        let out = Phase::Deks.replaced(&e, &[w(2, "BB==")]).unwrap();
        assert_eq!(out["format"], json!(2));
        assert_eq!(out["versions"]["1"]["wrapped"], json!("vault:v2:BB=="));
    }

    #[test]
    fn a_subject_record_keeps_its_other_fields() {
        let e = KvEntry {
            data: json!({"key_id": "00", "dek_version": 2, "wrapped": "vault:v1:AA==", "alg": "aes-256-gcm", "created_at": 7}),
            version: 2,
        };
        let out = Phase::Subjects.replaced(&e, &[w(2, "BB==")]).unwrap();
        assert_eq!(out["dek_version"], json!(2));
        assert_eq!(out["created_at"], json!(7));
        assert_eq!(out["wrapped"], json!("vault:v2:BB=="));
    }
}
