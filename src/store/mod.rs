//! The subject registry: retention, shred state, tombstones, certificates and the eviction
//! feed that tells every replica to drop a shredded subject's keys.
//!
//! One query layer (sqlx `Any`) over SQLite (default: one file, WAL, `secure_delete=ON`) and
//! PostgreSQL (`postgres://…`), with the same schema. Queries use `$N` placeholders, which both
//! engines accept. Nothing stored here lets anyone recover a key: subjects appear only as keyed
//! hashes (`subject_ref`), keys only as their random ids.

pub mod anchor;
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
    Active,
    /// A shred is scheduled (grace window); data calls are refused.
    Scheduled,
    /// A shred is in progress (its intent is recorded; Vault deletion may not be done yet).
    Shredding,
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

/// A subject's registry row.
#[derive(Debug, Clone)]
pub struct SubjectRow {
    pub state: SubjectState,
    pub created_at: i64,
    pub updated_at: i64,
    pub retain_until: Option<i64>,
    pub shred_at: Option<i64>,
    pub request_id: Option<String>,
    pub reason: Option<String>,
    pub requested_at: Option<i64>,
    /// JSON list of the keys the pending shred destroys (`[{"key_id":…,"dek_version":…}]`).
    pub intent: Option<String>,
    pub executed_at: Option<i64>,
    /// The signed certificate of the last shred.
    pub certificate: Option<String>,
}

/// A "drop these keys" message for every replica.
#[derive(Debug, Clone)]
pub struct Eviction {
    pub seq: i64,
    pub keyspace: String,
    pub subject_ref: String,
    pub intent: String,
}

/// What a shred is about to do, recorded before it does it.
#[derive(Debug, Clone)]
pub struct ShredClaim<'a> {
    pub intent: &'a str,
    pub request_id: &'a str,
    pub reason: &'a str,
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

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
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
        let store = Self { pool };
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
        self.migrate_tokens().await?;
        self.migrate_anchors().await
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

    /// Records a new subject key (first use, or first use after a shred). A shredded subject
    /// becomes active again; a scheduled or shredding one is left as it is.
    pub async fn register_subject(
        &self,
        keyspace: &str,
        subject_ref: &str,
        now: i64,
        retain_until: Option<i64>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at, retain_until)
             VALUES ($1, $2, 'active', $3, $3, $4)
             ON CONFLICT (keyspace, subject_ref) DO UPDATE
             SET state = 'active', created_at = $3, updated_at = $3, retain_until = $4,
                 shred_at = NULL, intent = NULL
             WHERE subjects.state = 'shredded'",
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
                    request_id = NULL, reason = NULL, requested_at = NULL, intent = NULL
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
    /// atomically, only from `active` (or unregistered). Returns whether this call claimed it.
    pub async fn claim_shred(
        &self,
        keyspace: &str,
        subject_ref: &str,
        claim: &ShredClaim<'_>,
        now: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at,
                                   request_id, reason, requested_at, intent)
             VALUES ($1, $2, 'shredding', $3, $3, $4, $5, $6, $7)
             ON CONFLICT (keyspace, subject_ref) DO UPDATE
             SET state = 'shredding', updated_at = $3, request_id = $4, reason = $5,
                 requested_at = $6, intent = $7
             WHERE subjects.state = 'active'",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .bind(claim.request_id)
        .bind(claim.reason)
        .bind(claim.requested_at)
        .bind(claim.intent)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Moves a due scheduled shred, or a `shredding` row untouched since `stale_before` (its
    /// process died), to `shredding` owned by the caller. Returns whether the caller won.
    pub async fn claim_pending(
        &self,
        keyspace: &str,
        subject_ref: &str,
        now: i64,
        stale_before: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE subjects SET state = 'shredding', updated_at = $3
             WHERE keyspace = $1 AND subject_ref = $2
               AND ((state = 'scheduled' AND shred_at <= $3)
                    OR (state = 'shredding' AND updated_at < $4))",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .bind(stale_before)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Subjects whose scheduled shred is due, whose retention has passed, or whose shred was
    /// left half-done (`shredding` and untouched since `stale_before`).
    pub async fn due(
        &self,
        now: i64,
        stale_before: i64,
        limit: i64,
    ) -> Result<Vec<(String, String, SubjectState)>> {
        let rows = sqlx::query(
            "SELECT keyspace, subject_ref, state FROM subjects
             WHERE (state = 'scheduled' AND shred_at <= $1)
                OR (state = 'active' AND retain_until IS NOT NULL AND retain_until <= $1)
                OR (state = 'shredding' AND updated_at < $2)
             LIMIT $3",
        )
        .bind(now)
        .bind(stale_before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    r.try_get("keyspace").map_err(db)?,
                    r.try_get("subject_ref").map_err(db)?,
                    r.try_get::<String, _>("state").map_err(db)?.parse()?,
                ))
            })
            .collect()
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

    /// Publishes an eviction for every replica.
    pub async fn publish_eviction(
        &self,
        keyspace: &str,
        subject_ref: &str,
        intent: &str,
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO evictions (keyspace, subject_ref, intent, at) VALUES ($1, $2, $3, $4)",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(intent)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Evictions after `seq`, oldest first.
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
    /// still `shredding`. Returns whether this call completed it.
    pub async fn finish_shred(
        &self,
        keyspace: &str,
        subject_ref: &str,
        certificate_id: &str,
        request_id: &str,
        document: &str,
        executed_at: i64,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let r = sqlx::query(
            "UPDATE subjects SET state = 'shredded', updated_at = $3, executed_at = $3,
                    certificate = $4, shred_at = NULL, retain_until = NULL
             WHERE keyspace = $1 AND subject_ref = $2 AND state = 'shredding'",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(executed_at)
        .bind(document)
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

    /// Touches a `shredding` row so that other replicas do not take it over while this one
    /// works on it.
    pub async fn touch(&self, keyspace: &str, subject_ref: &str, now: i64) -> Result<()> {
        sqlx::query(
            "UPDATE subjects SET updated_at = $3
             WHERE keyspace = $1 AND subject_ref = $2 AND state = 'shredding'",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
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
