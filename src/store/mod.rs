//! The subject registry: retention, shred state, tombstones, certificates and the eviction
//! feed that tells every replica to drop a shredded subject's keys.
//!
//! One query layer (sqlx `Any`) over SQLite (default: one file, WAL, `secure_delete=ON`) and
//! PostgreSQL (`postgres://…`), with the same schema. Queries use `$N` placeholders, which both
//! engines accept. Nothing stored here lets anyone recover a key: subjects appear only as keyed
//! hashes (`subject_ref`), keys only as their random ids.

pub mod anchor;
pub mod evictions;
pub mod token_writer;
pub mod tokens;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

use crate::error::{Error, Result};

/// Shred state of a subject in a keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectState {
    /// In use.
    Active,
    /// A shred is scheduled (grace window); data calls are refused.
    Scheduled,
    /// A shred is in progress (its intent is recorded; Vault deletion may not be done yet).
    Shredding,
    /// Keys destroyed and certified.
    Shredded,
}

impl FromStr for SubjectState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "active" => Self::Active,
            "scheduled" => Self::Scheduled,
            "shredding" => Self::Shredding,
            "shredded" => Self::Shredded,
            other => return Err(Error::internal(format!("store: unknown state {other:?}"))),
        })
    }
}

impl SubjectState {
    /// The stored name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Scheduled => "scheduled",
            Self::Shredding => "shredding",
            Self::Shredded => "shredded",
        }
    }
}

/// `$first, $first+1, …` (`n` placeholders) for an `IN (…)` list.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A subject's registry row.
#[derive(Debug, Clone)]
pub struct SubjectRow {
    /// Shred state.
    pub state: SubjectState,
    /// When the row was made (Unix seconds).
    pub created_at: i64,
    /// When it last changed (Unix seconds).
    pub updated_at: i64,
    /// Retention end (Unix seconds), after which the reaper shreds.
    pub retain_until: Option<i64>,
    /// When a scheduled shred runs (Unix seconds).
    pub shred_at: Option<i64>,
    /// Request id of the shred.
    pub request_id: Option<String>,
    /// Reason of the shred.
    pub reason: Option<String>,
    /// When the shred was requested (Unix seconds).
    pub requested_at: Option<i64>,
    /// JSON list of the keys the pending shred destroys (`[{"key_id":…,"dek_version":…}]`).
    pub intent: Option<String>,
    /// When the keys were destroyed (Unix seconds).
    pub executed_at: Option<i64>,
    /// The signed certificate of the last shred.
    pub certificate: Option<String>,
}

/// A subject the reaper should process: due scheduled shred, expired retention, or a shred left
/// half-done. Rows come ordered by `due_at`, then keyspace and subject (the paging cursor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueRow {
    /// The keyspace (always one of those the caller configured).
    pub keyspace: String,
    /// The subject reference.
    pub subject_ref: String,
    /// Its state.
    pub state: SubjectState,
    /// When it became due: `shred_at`, `retain_until`, or the last lease renewal of a
    /// `shredding` row.
    pub due_at: i64,
}

/// A "drop these keys" message for every replica.
#[derive(Debug, Clone)]
pub struct Eviction {
    /// Position in the feed.
    pub seq: i64,
    /// The keyspace.
    pub keyspace: String,
    /// Keyed hash of the subject.
    pub subject_ref: String,
    /// Key ids to evict (JSON).
    pub intent: String,
}

/// The certificate that completes a shred.
#[derive(Debug, Clone, Copy)]
pub struct Certified<'a> {
    /// Its id (`cod-…`).
    pub certificate_id: &'a str,
    /// The request id of the shred.
    pub request_id: &'a str,
    /// The signed certificate (JSON).
    pub document: &'a str,
    /// When the shred was executed (Unix seconds).
    pub executed_at: i64,
}

/// What a shred is about to do, recorded before it does it.
#[derive(Debug, Clone)]
pub struct ShredClaim<'a> {
    /// Key ids to destroy (JSON).
    pub intent: &'a str,
    /// Request id of the shred.
    pub request_id: &'a str,
    /// Reason of the shred.
    pub reason: &'a str,
    /// When it was requested (Unix seconds).
    pub requested_at: i64,
}

fn db(e: sqlx::Error) -> Error {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            Error::Unavailable {
                detail: format!("store: {e}"),
            }
        }
        other => Error::internal(format!("store: {other}")),
    }
}

/// A PostgreSQL URL, kept for the eviction listener's own connection. It may hold the
/// database password: never printed.
#[derive(Clone)]
struct PgUrl(String);

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgUrl(***)")
    }
}

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// Set on PostgreSQL (LISTEN/NOTIFY of the eviction feed).
    postgres_url: Option<std::sync::Arc<PgUrl>>,
}

impl Store {
    /// Opens (creating if needed) the store at `url` (`sqlite://path` or `postgres://…`) and
    /// applies the schema.
    pub async fn open(url: &str) -> Result<Self> {
        install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
        } else {
            url.to_string()
        };
        let mut opts = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 16 })
            .acquire_timeout(Duration::from_secs(10))
            // A SQLite connection is a local file: a ping before each use (a round trip to
            // its worker thread) finds nothing the query itself would not.
            .test_before_acquire(!sqlite);
        if sqlite {
            opts = opts.after_connect(|conn, _| {
                Box::pin(async move {
                    use sqlx::Executor as _;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    conn.execute("PRAGMA secure_delete = ON").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    Ok(())
                })
            });
        }
        let pool = opts
            .connect(&url)
            .await
            .map_err(|e| Error::internal(format!("cannot open store: {e}")))?;
        let postgres_url = (url.starts_with("postgres:") || url.starts_with("postgresql:"))
            .then(|| std::sync::Arc::new(PgUrl(url.clone())));
        let store = Self { pool, postgres_url };
        store.migrate(sqlite).await?;
        Ok(store)
    }

    async fn migrate(&self, sqlite: bool) -> Result<()> {
        if sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&self.pool)
                .await
                .map_err(db)?;
        }
        let serial = if sqlite {
            "INTEGER PRIMARY KEY AUTOINCREMENT"
        } else {
            "BIGSERIAL PRIMARY KEY"
        };
        let ddl = [
            "CREATE TABLE IF NOT EXISTS subjects (
                keyspace TEXT NOT NULL,
                subject_ref TEXT NOT NULL,
                state TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                retain_until BIGINT,
                shred_at BIGINT,
                request_id TEXT,
                reason TEXT,
                requested_at BIGINT,
                intent TEXT,
                executed_at BIGINT,
                certificate TEXT,
                PRIMARY KEY (keyspace, subject_ref))"
                .to_string(),
            "CREATE INDEX IF NOT EXISTS subjects_by_state ON subjects (state, shred_at)".into(),
            "CREATE INDEX IF NOT EXISTS subjects_by_retention ON subjects (state, retain_until)"
                .into(),
            "CREATE TABLE IF NOT EXISTS tombstones (
                keyspace TEXT NOT NULL,
                key_id TEXT NOT NULL,
                subject_ref TEXT NOT NULL,
                shredded_at BIGINT NOT NULL,
                PRIMARY KEY (keyspace, key_id))"
                .into(),
            format!(
                "CREATE TABLE IF NOT EXISTS evictions (
                    seq {serial},
                    keyspace TEXT NOT NULL,
                    subject_ref TEXT NOT NULL,
                    intent TEXT NOT NULL,
                    at BIGINT NOT NULL)"
            ),
            "CREATE TABLE IF NOT EXISTS certificates (
                certificate_id TEXT PRIMARY KEY,
                keyspace TEXT NOT NULL,
                subject_ref TEXT NOT NULL,
                request_id TEXT NOT NULL,
                issued_at BIGINT NOT NULL,
                document TEXT NOT NULL)"
                .into(),
        ];
        for stmt in ddl {
            // The only non-literal part is the serial column type chosen above.
            sqlx::query(sqlx::AssertSqlSafe(stmt))
                .execute(&self.pool)
                .await
                .map_err(db)?;
        }
        // Added after the first release: also upgrades an existing database. Reaper backoff
        // (`reap_attempts`, `reap_next_at`) and the owner of a shred's lease (`lease_owner`;
        // the lease runs `erasure.stale_shred_secs` from `updated_at`).
        for (column, ddl) in [
            ("reap_attempts", "BIGINT NOT NULL DEFAULT 0"),
            ("reap_next_at", "BIGINT"),
            ("lease_owner", "TEXT"),
        ] {
            self.add_subjects_column(column, ddl).await?;
        }
        self.migrate_tokens().await?;
        self.migrate_anchors().await
    }

    /// `ALTER TABLE subjects ADD COLUMN`, unless the column exists (SQLite has no `ADD COLUMN IF
    /// NOT EXISTS`). Two replicas upgrading at once: the loser's ALTER fails, the re-check sees
    /// the winner's column.
    async fn add_subjects_column(&self, column: &'static str, ddl: &'static str) -> Result<()> {
        let exists = || async {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {column} FROM subjects WHERE 1 = 0"
            )))
            .fetch_optional(&self.pool)
            .await
            .is_ok()
        };
        if exists().await {
            return Ok(());
        }
        let added = sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE subjects ADD COLUMN {column} {ddl}"
        )))
        .execute(&self.pool)
        .await;
        match added {
            Ok(_) => Ok(()),
            Err(_) if exists().await => Ok(()),
            Err(e) => Err(db(e)),
        }
    }

    /// The registry row of a subject.
    pub async fn subject(&self, keyspace: &str, subject_ref: &str) -> Result<Option<SubjectRow>> {
        let row = sqlx::query(
            "SELECT state, created_at, updated_at, retain_until, shred_at, request_id, reason,
                    requested_at, intent, executed_at, certificate
             FROM subjects WHERE keyspace = $1 AND subject_ref = $2",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(|r| {
            Ok(SubjectRow {
                state: r.try_get::<String, _>("state").map_err(db)?.parse()?,
                created_at: r.try_get("created_at").map_err(db)?,
                updated_at: r.try_get("updated_at").map_err(db)?,
                retain_until: r.try_get("retain_until").map_err(db)?,
                shred_at: r.try_get("shred_at").map_err(db)?,
                request_id: r.try_get("request_id").map_err(db)?,
                reason: r.try_get("reason").map_err(db)?,
                requested_at: r.try_get("requested_at").map_err(db)?,
                intent: r.try_get("intent").map_err(db)?,
                executed_at: r.try_get("executed_at").map_err(db)?,
                certificate: r.try_get("certificate").map_err(db)?,
            })
        })
        .transpose()
    }

    /// Records a subject key (first use, or first use after a shred). An existing row is left
    /// as it is, except that a shredded subject becomes active again when `reactivate` is set:
    /// only when the keyspace allows new keys after a shred (`after_shred = "new_key"`) and the
    /// caller saw the subject shredded before it made the key (so the key cannot be one the
    /// shred listed). The caller reads the state again afterwards: anything but `active` means
    /// the key must not be used.
    pub async fn register_subject(
        &self,
        keyspace: &str,
        subject_ref: &str,
        now: i64,
        retain_until: Option<i64>,
        reactivate: bool,
    ) -> Result<()> {
        let sql = if reactivate {
            "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at, retain_until)
             VALUES ($1, $2, 'active', $3, $3, $4)
             ON CONFLICT (keyspace, subject_ref) DO UPDATE
             SET state = 'active', created_at = $3, updated_at = $3, retain_until = $4,
                 shred_at = NULL, intent = NULL, reap_attempts = 0, reap_next_at = NULL,
                 lease_owner = NULL
             WHERE subjects.state = 'shredded'"
        } else {
            "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at, retain_until)
             VALUES ($1, $2, 'active', $3, $3, $4)
             ON CONFLICT (keyspace, subject_ref) DO NOTHING"
        };
        sqlx::query(sql)
            .bind(keyspace)
            .bind(subject_ref)
            .bind(now)
            .bind(retain_until)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Sets a subject's retention deadline (creating its row if needed).
    pub async fn set_retention(
        &self,
        keyspace: &str,
        subject_ref: &str,
        retain_until: Option<i64>,
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at, retain_until)
             VALUES ($1, $2, 'active', $3, $3, $4)
             ON CONFLICT (keyspace, subject_ref) DO UPDATE SET retain_until = $4, updated_at = $3",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .bind(retain_until)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Schedules a shred at `shred_at` if the subject is active (or unregistered). Returns
    /// whether this call scheduled it.
    pub async fn schedule(
        &self,
        keyspace: &str,
        subject_ref: &str,
        shred_at: i64,
        claim: &ShredClaim<'_>,
        now: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at, shred_at,
                                   request_id, reason, requested_at, intent)
             VALUES ($1, $2, 'scheduled', $3, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (keyspace, subject_ref) DO UPDATE
             SET state = 'scheduled', updated_at = $3, shred_at = $4, request_id = $5,
                 reason = $6, requested_at = $7, intent = $8
             WHERE subjects.state = 'active'",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .bind(shred_at)
        .bind(claim.request_id)
        .bind(claim.reason)
        .bind(claim.requested_at)
        .bind(claim.intent)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Cancels a scheduled shred. Returns whether one was cancelled.
    pub async fn cancel(&self, keyspace: &str, subject_ref: &str, now: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE subjects SET state = 'active', updated_at = $3, shred_at = NULL,
                    request_id = NULL, reason = NULL, requested_at = NULL, intent = NULL,
                    reap_attempts = 0, reap_next_at = NULL
             WHERE keyspace = $1 AND subject_ref = $2 AND state = 'scheduled'",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Claims an immediate shred: records its intent and moves the subject to `shredding`,
    /// atomically, only from `active` (or unregistered), with the lease held by `owner`.
    /// Returns whether this call claimed it.
    pub async fn claim_shred(
        &self,
        keyspace: &str,
        subject_ref: &str,
        claim: &ShredClaim<'_>,
        now: i64,
        owner: &str,
    ) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at,
                                   request_id, reason, requested_at, intent, lease_owner)
             VALUES ($1, $2, 'shredding', $3, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (keyspace, subject_ref) DO UPDATE
             SET state = 'shredding', updated_at = $3, request_id = $4, reason = $5,
                 requested_at = $6, intent = $7, lease_owner = $8
             WHERE subjects.state = 'active'",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .bind(claim.request_id)
        .bind(claim.reason)
        .bind(claim.requested_at)
        .bind(claim.intent)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Moves a due scheduled shred, or a `shredding` row whose lease was not renewed since
    /// `stale_before` (its process died), to `shredding` with the lease held by `owner`, in
    /// one atomic statement. Returns whether the caller won (exactly one caller does).
    pub async fn claim_pending(
        &self,
        keyspace: &str,
        subject_ref: &str,
        now: i64,
        stale_before: i64,
        owner: &str,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE subjects SET state = 'shredding', updated_at = $3, lease_owner = $5
             WHERE keyspace = $1 AND subject_ref = $2
               AND ((state = 'scheduled' AND shred_at <= $3)
                    OR (state = 'shredding' AND updated_at < $4))",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .bind(stale_before)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// One page of the subjects the reaper should process, in the configured `keyspaces` only:
    /// scheduled shreds due at `now`, retentions passed at `now`, and shreds left half-done
    /// (`shredding` with a lease not renewed since `stale_before`); rows in their retry backoff
    /// (`reap_next_at` after `now`) are left out. Ordered by due time, then keyspace and
    /// subject; `after` (the last row of the previous page) resumes the scan.
    pub async fn due(
        &self,
        now: i64,
        stale_before: i64,
        keyspaces: &[&str],
        after: Option<&DueRow>,
        limit: i64,
    ) -> Result<Vec<DueRow>> {
        if keyspaces.is_empty() {
            return Ok(Vec::new());
        }
        let (c_at, c_ks, c_ref) = after
            .map(|r| (r.due_at, r.keyspace.as_str(), r.subject_ref.as_str()))
            .unwrap_or((i64::MIN, "", ""));
        let sql = format!(
            "SELECT keyspace, subject_ref, state, due_at FROM (
                SELECT keyspace, subject_ref, state,
                       CASE state WHEN 'scheduled' THEN shred_at
                                  WHEN 'active' THEN retain_until
                                  ELSE updated_at END AS due_at
                FROM subjects
                WHERE ((state = 'scheduled' AND shred_at <= $1)
                       OR (state = 'active' AND retain_until IS NOT NULL AND retain_until <= $1)
                       OR (state = 'shredding' AND updated_at < $2))
                  AND (reap_next_at IS NULL OR reap_next_at <= $1)
                  AND keyspace IN ({})) d
             WHERE d.due_at > $3 OR (d.due_at = $3 AND (d.keyspace > $4
                   OR (d.keyspace = $4 AND d.subject_ref > $5)))
             ORDER BY d.due_at, d.keyspace, d.subject_ref
             LIMIT $6",
            placeholders(7, keyspaces.len())
        );
        // The only non-literal part is the list of `$N` placeholders.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .bind(stale_before)
            .bind(c_at)
            .bind(c_ks)
            .bind(c_ref)
            .bind(limit);
        for ks in keyspaces {
            q = q.bind(*ks);
        }
        let rows = q.fetch_all(&self.pool).await.map_err(db)?;
        rows.into_iter()
            .map(|r| {
                Ok(DueRow {
                    keyspace: r.try_get("keyspace").map_err(db)?,
                    subject_ref: r.try_get("subject_ref").map_err(db)?,
                    state: r.try_get::<String, _>("state").map_err(db)?.parse()?,
                    due_at: r.try_get("due_at").map_err(db)?,
                })
            })
            .collect()
    }

    /// How many rows would be due now in keyspaces that are not configured (the reaper cannot
    /// process them: their retention promise is not being kept; reported, not deleted).
    pub async fn due_unconfigured(
        &self,
        now: i64,
        stale_before: i64,
        keyspaces: &[&str],
    ) -> Result<i64> {
        let not_in = if keyspaces.is_empty() {
            String::new()
        } else {
            format!("AND keyspace NOT IN ({})", placeholders(3, keyspaces.len()))
        };
        let sql = format!(
            "SELECT COUNT(*) AS n FROM subjects
             WHERE ((state = 'scheduled' AND shred_at <= $1)
                    OR (state = 'active' AND retain_until IS NOT NULL AND retain_until <= $1)
                    OR (state = 'shredding' AND updated_at < $2))
               {not_in}"
        );
        // The only non-literal part is the list of `$N` placeholders.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .bind(stale_before);
        for ks in keyspaces {
            q = q.bind(*ks);
        }
        let r = q.fetch_one(&self.pool).await.map_err(db)?;
        r.try_get("n").map_err(db)
    }

    /// Records a failed reaper attempt at a subject: one more consecutive failure, and no new
    /// attempt before `now + backoff(attempts)`. Returns the number of consecutive failures,
    /// counted atomically (each failure, on any replica, gets its own number).
    pub async fn reap_failed(
        &self,
        keyspace: &str,
        subject_ref: &str,
        now: i64,
        backoff: impl Fn(i64) -> i64,
    ) -> Result<i64> {
        let row = sqlx::query(
            "UPDATE subjects SET reap_attempts = reap_attempts + 1
             WHERE keyspace = $1 AND subject_ref = $2
             RETURNING reap_attempts",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let Some(row) = row else { return Ok(0) };
        let attempts: i64 = row.try_get("reap_attempts").map_err(db)?;
        sqlx::query(
            "UPDATE subjects SET reap_next_at = $3 WHERE keyspace = $1 AND subject_ref = $2",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now.saturating_add(backoff(attempts)))
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(attempts)
    }

    /// How many subjects have failed at least `min_attempts` reaper attempts in a row.
    pub async fn reap_failing(&self, min_attempts: i64) -> Result<i64> {
        let r = sqlx::query("SELECT COUNT(*) AS n FROM subjects WHERE reap_attempts >= $1")
            .bind(min_attempts)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        r.try_get("n").map_err(db)
    }

    /// Replaces the recorded intent (keys to destroy) of a subject in `state`. Returns whether
    /// the row was still in that state.
    pub async fn record_intent(
        &self,
        keyspace: &str,
        subject_ref: &str,
        intent: &str,
        state: SubjectState,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE subjects SET intent = $3
             WHERE keyspace = $1 AND subject_ref = $2 AND state = $4",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(intent)
        .bind(state.as_str())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Records tombstones for destroyed key ids (idempotent).
    pub async fn add_tombstones(
        &self,
        keyspace: &str,
        subject_ref: &str,
        key_ids: &[String],
        now: i64,
    ) -> Result<()> {
        for kid in key_ids {
            sqlx::query(
                "INSERT INTO tombstones (keyspace, key_id, subject_ref, shredded_at)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (keyspace, key_id) DO NOTHING",
            )
            .bind(keyspace)
            .bind(kid)
            .bind(subject_ref)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    /// The tombstone of a key id: (subject_ref, shredded_at).
    pub async fn tombstone(&self, keyspace: &str, key_id: &str) -> Result<Option<(String, i64)>> {
        let r = sqlx::query(
            "SELECT subject_ref, shredded_at FROM tombstones WHERE keyspace = $1 AND key_id = $2",
        )
        .bind(keyspace)
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        r.map(|r| {
            Ok((
                r.try_get("subject_ref").map_err(db)?,
                r.try_get("shredded_at").map_err(db)?,
            ))
        })
        .transpose()
    }

    /// Publishes an eviction for every replica: one transaction that inserts the row and, on
    /// PostgreSQL, notifies the listeners ([`evictions::EVICTIONS_CHANNEL`], delivered at
    /// commit). Readers must use [`next_evictions`](Self::next_evictions): the row's seq is
    /// drawn before the commit, so rows can become visible out of seq order.
    pub async fn publish_eviction(
        &self,
        keyspace: &str,
        subject_ref: &str,
        intent: &str,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query(
            "INSERT INTO evictions (keyspace, subject_ref, intent, at) VALUES ($1, $2, $3, $4)",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(intent)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        crate::config::failpoint::point("publish-eviction-before-commit").await;
        if self.postgres_url.is_some() {
            // A constant statement; the simple query protocol (NOTIFY has no parameters).
            sqlx::raw_sql("NOTIFY piiguard_evictions")
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    /// Evictions after `seq`, oldest first. Only the rows committed when the query runs: a
    /// reader that moves past the highest seq it saw must also ask again for the seqs it
    /// skipped (see [`evictions::EvictionFeed`]).
    pub async fn evictions_since(&self, seq: i64, limit: i64) -> Result<Vec<Eviction>> {
        let rows = sqlx::query(
            "SELECT seq, keyspace, subject_ref, intent FROM evictions WHERE seq > $1
             ORDER BY seq LIMIT $2",
        )
        .bind(seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|r| {
                Ok(Eviction {
                    seq: r.try_get("seq").map_err(db)?,
                    keyspace: r.try_get("keyspace").map_err(db)?,
                    subject_ref: r.try_get("subject_ref").map_err(db)?,
                    intent: r.try_get("intent").map_err(db)?,
                })
            })
            .collect()
    }

    /// Deletes evictions older than `before` (every replica has read them long ago: they are
    /// kept far longer than the poll interval). Returns how many were deleted.
    pub async fn prune_evictions(&self, before: i64) -> Result<u64> {
        let r = sqlx::query("DELETE FROM evictions WHERE at < $1")
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(r.rows_affected())
    }

    /// The newest eviction sequence number (0 if none).
    pub async fn last_eviction_seq(&self) -> Result<i64> {
        let r = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS m FROM evictions")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        r.try_get("m").map_err(db)
    }

    /// Completes a shred: stores the certificate and marks the subject shredded, if it is
    /// still `shredding` and `owner` still holds its lease. Returns whether this call
    /// completed it.
    pub async fn finish_shred(
        &self,
        keyspace: &str,
        subject_ref: &str,
        owner: &str,
        cert: &Certified<'_>,
    ) -> Result<bool> {
        let Certified {
            certificate_id,
            request_id,
            document,
            executed_at,
        } = *cert;
        let mut tx = self.pool.begin().await.map_err(db)?;
        let r = sqlx::query(
            "UPDATE subjects SET state = 'shredded', updated_at = $3, executed_at = $3,
                    certificate = $4, shred_at = NULL, retain_until = NULL,
                    reap_attempts = 0, reap_next_at = NULL, lease_owner = NULL
             WHERE keyspace = $1 AND subject_ref = $2 AND state = 'shredding'
               AND lease_owner = $5",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(executed_at)
        .bind(document)
        .bind(owner)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if r.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO certificates (certificate_id, keyspace, subject_ref, request_id, issued_at, document)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(certificate_id)
        .bind(keyspace)
        .bind(subject_ref)
        .bind(request_id)
        .bind(executed_at)
        .bind(document)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    /// Renews `owner`'s lease on a `shredding` row so that other replicas do not take it over
    /// while this one works on it. Returns false if the lease is lost (taken over, or the
    /// shred finished): the caller must stop.
    pub async fn renew_lease(
        &self,
        keyspace: &str,
        subject_ref: &str,
        owner: &str,
        now: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE subjects SET updated_at = $3
             WHERE keyspace = $1 AND subject_ref = $2 AND state = 'shredding'
               AND lease_owner = $4",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Returns the state of a subject without the rest of the row (cold-path check).
    pub async fn state(&self, keyspace: &str, subject_ref: &str) -> Result<Option<SubjectState>> {
        let r = sqlx::query("SELECT state FROM subjects WHERE keyspace = $1 AND subject_ref = $2")
            .bind(keyspace)
            .bind(subject_ref)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        r.map(|r| r.try_get::<String, _>("state").map_err(db)?.parse())
            .transpose()
    }
}
