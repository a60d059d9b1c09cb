//! State of the KEK rewrap job (`keys/kek.rs`), one row per keyspace in `kek_rewrap`: the KEK
//! version the job rewraps to, its progress and resume cursor, the lease that lets exactly one
//! replica run it, and the wrapped-DEK counts per KEK version from the last full scan (kept
//! current as the job rewraps).
//!
//! Counts are JSON objects `{"<kek version>": n}`: a handful of versions, read and written
//! whole with the row.

use std::collections::BTreeMap;

use sqlx::Row;

use super::{Store, db};
use crate::error::{Error, Result};

/// Wrapped values per KEK version.
pub type KekCounts = BTreeMap<u32, u64>;

/// One keyspace's rewrap job row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KekJob {
    /// The keyspace.
    pub keyspace: String,
    /// The KEK version the job rewraps to (0: never ran).
    pub target_version: u32,
    /// Where a resumed run continues: `<phase>/<last key done>` (empty: from the start).
    pub cursor: String,
    /// Records (DEK records, subject records, the index key) done in this run.
    pub done: u64,
    /// Records listed for this run (0 until listed).
    pub total: u64,
    /// Unix seconds this run began (0: none).
    pub started_at: i64,
    /// Unix seconds the run for `target_version` finished (0: not finished).
    pub finished_at: i64,
    /// Wrapped DEKs per KEK version: the last full scan, adjusted by every rewrap since.
    pub counts: KekCounts,
    /// Unix seconds the last full scan began (0: none finished yet): its counts are of the
    /// records as listed from then on.
    pub scanned_at: i64,
    /// This run's tally so far (becomes `counts` when the run finishes).
    pub run_counts: KekCounts,
    /// Subject records seen by the last full scan.
    pub subjects: u64,
    /// Subject records seen so far in this run.
    pub run_subjects: u64,
    /// DEK records the last full scan saw that were created at or after its start (so that
    /// the subjects the store registered since are not counted twice).
    pub seen_new: u64,
    /// The same, so far in this run.
    pub run_seen_new: u64,
    /// Subject records the last full scan saw that were created at or after its start.
    pub seen_new_subjects: u64,
    /// The same, so far in this run.
    pub run_seen_new_subjects: u64,
}

/// Counts as stored.
pub fn counts_to_json(c: &KekCounts) -> String {
    serde_json::to_string(
        &c.iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect::<BTreeMap<String, u64>>(),
    )
    .unwrap_or_else(|_| "{}".into())
}

/// Counts as read (a malformed value reads as empty: they are statistics, not state).
pub fn counts_from_json(s: &str) -> KekCounts {
    serde_json::from_str::<BTreeMap<String, u64>>(s)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| Some((k.parse().ok()?, v)))
        .collect()
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store {
    /// The `kek_rewrap` table, on the migration transaction's connection.
    pub(super) async fn migrate_kek(conn: &mut sqlx::AnyConnection) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS kek_rewrap (
                keyspace TEXT PRIMARY KEY,
                target_version BIGINT NOT NULL DEFAULT 0,
                resume_key TEXT NOT NULL DEFAULT '',
                done BIGINT NOT NULL DEFAULT 0,
                total BIGINT NOT NULL DEFAULT 0,
                started_at BIGINT NOT NULL DEFAULT 0,
                finished_at BIGINT NOT NULL DEFAULT 0,
                counts TEXT NOT NULL DEFAULT '{}',
                scanned_at BIGINT NOT NULL DEFAULT 0,
                run_counts TEXT NOT NULL DEFAULT '{}',
                subjects BIGINT NOT NULL DEFAULT 0,
                run_subjects BIGINT NOT NULL DEFAULT 0,
                seen_new BIGINT NOT NULL DEFAULT 0,
                run_seen_new BIGINT NOT NULL DEFAULT 0,
                seen_new_subjects BIGINT NOT NULL DEFAULT 0,
                run_seen_new_subjects BIGINT NOT NULL DEFAULT 0,
                lease_owner TEXT,
                lease_until BIGINT NOT NULL DEFAULT 0)",
        )
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// The job row of `keyspace`, if the job ever ran there.
    pub async fn kek_job(&self, keyspace: &str) -> Result<Option<KekJob>> {
        let r = sqlx::query(
            "SELECT target_version, resume_key, done, total, started_at, finished_at, counts,
                    scanned_at, run_counts, subjects, run_subjects, seen_new, run_seen_new,
                    seen_new_subjects, run_seen_new_subjects
             FROM kek_rewrap WHERE keyspace = $1",
        )
        .bind(keyspace)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let Some(r) = r else { return Ok(None) };
        let g = |c: &str| r.try_get::<i64, _>(c).map_err(db);
        Ok(Some(KekJob {
            keyspace: keyspace.to_string(),
            target_version: u32::try_from(g("target_version")?)
                .map_err(|_| Error::internal("store: bad kek_rewrap.target_version"))?,
            cursor: r.try_get("resume_key").map_err(db)?,
            done: u(g("done")?),
            total: u(g("total")?),
            started_at: g("started_at")?,
            finished_at: g("finished_at")?,
            counts: counts_from_json(&r.try_get::<String, _>("counts").map_err(db)?),
            scanned_at: g("scanned_at")?,
            run_counts: counts_from_json(&r.try_get::<String, _>("run_counts").map_err(db)?),
            subjects: u(g("subjects")?),
            run_subjects: u(g("run_subjects")?),
            seen_new: u(g("seen_new")?),
            run_seen_new: u(g("run_seen_new")?),
            seen_new_subjects: u(g("seen_new_subjects")?),
            run_seen_new_subjects: u(g("run_seen_new_subjects")?),
        }))
    }

    /// Takes (or renews) the lease on `keyspace`'s job for `owner` until `until`, if it is
    /// free, expired, or already `owner`'s: one atomic statement, so two replicas never both
    /// hold it. Returns whether `owner` holds it now.
    pub async fn kek_lease(
        &self,
        keyspace: &str,
        owner: &str,
        now: i64,
        until: i64,
    ) -> Result<bool> {
        sqlx::query(
            "INSERT INTO kek_rewrap (keyspace) VALUES ($1) ON CONFLICT (keyspace) DO NOTHING",
        )
        .bind(keyspace)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        let r = sqlx::query(
            "UPDATE kek_rewrap SET lease_owner = $2, lease_until = $4
             WHERE keyspace = $1
               AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < $3)",
        )
        .bind(keyspace)
        .bind(owner)
        .bind(now)
        .bind(until)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Gives `owner`'s lease back (a clean stop, or the job is done).
    pub async fn kek_release(&self, keyspace: &str, owner: &str) -> Result<()> {
        sqlx::query(
            "UPDATE kek_rewrap SET lease_owner = NULL, lease_until = 0
             WHERE keyspace = $1 AND lease_owner = $2",
        )
        .bind(keyspace)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Subjects of `keyspace` registered at or after `t` (Unix seconds).
    pub async fn subjects_created_since(&self, keyspace: &str, t: i64) -> Result<u64> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n FROM subjects WHERE keyspace = $1 AND created_at >= $2",
        )
        .bind(keyspace)
        .bind(t)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(u(r.try_get::<i64, _>("n").map_err(db)?))
    }

    /// Re-records the key id of each `(subject_ref, key_id, created_at)` that the KEK rewrap
    /// scan read from a Vault subject record, in one transaction: an active row without a key
    /// id gets it, a missing row is made (active). A row that names another key is left alone
    /// (the scan's read may predate a shred and a new key). What a registry restored from a
    /// backup older than Vault lacks (docs/KEYS.md, "Vault layout") comes back this way.
    /// Returns the rows changed.
    pub async fn record_key_ids(
        &self,
        keyspace: &str,
        seen: &[(String, String, i64)],
    ) -> Result<u64> {
        if seen.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await.map_err(db)?;
        let mut changed = 0;
        for (sref, key_id, created_at) in seen {
            changed += sqlx::query(
                "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at, key_id)
                 VALUES ($1, $2, 'active', $3, $3, $4)
                 ON CONFLICT (keyspace, subject_ref) DO UPDATE SET key_id = $4
                 WHERE subjects.state = 'active' AND subjects.key_id IS NULL",
            )
            .bind(keyspace)
            .bind(sref)
            .bind(created_at)
            .bind(key_id)
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
        }
        tx.commit().await.map_err(db)?;
        Ok(changed)
    }

    /// Writes the job's state, only while `owner` holds the lease. Returns false if the lease
    /// was lost (the caller stops).
    pub async fn kek_save(&self, job: &KekJob, owner: &str) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE kek_rewrap SET target_version = $3, resume_key = $4, done = $5, total = $6,
                    started_at = $7, finished_at = $8, counts = $9, scanned_at = $10,
                    run_counts = $11, subjects = $12, run_subjects = $13, seen_new = $14,
                    run_seen_new = $15, seen_new_subjects = $16, run_seen_new_subjects = $17
             WHERE keyspace = $1 AND lease_owner = $2",
        )
        .bind(&job.keyspace)
        .bind(owner)
        .bind(i64::from(job.target_version))
        .bind(&job.cursor)
        .bind(i(job.done))
        .bind(i(job.total))
        .bind(job.started_at)
        .bind(job.finished_at)
        .bind(counts_to_json(&job.counts))
        .bind(job.scanned_at)
        .bind(counts_to_json(&job.run_counts))
        .bind(i(job.subjects))
        .bind(i(job.run_subjects))
        .bind(i(job.seen_new))
        .bind(i(job.run_seen_new))
        .bind(i(job.seen_new_subjects))
        .bind(i(job.run_seen_new_subjects))
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip() {
        let c: KekCounts = [(1, 5), (2, 7)].into_iter().collect();
        assert_eq!(counts_from_json(&counts_to_json(&c)), c);
        assert!(counts_from_json("nope").is_empty());
    }

    #[tokio::test]
    async fn one_lease_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let s = Store::open(&url).await.unwrap();
        assert!(s.kek_lease("orders", "a", 100, 130).await.unwrap());
        assert!(!s.kek_lease("orders", "b", 110, 140).await.unwrap());
        assert!(s.kek_lease("orders", "a", 120, 150).await.unwrap());
        // Expired: another replica takes it over, and the old owner can no longer save.
        assert!(s.kek_lease("orders", "b", 151, 180).await.unwrap());
        let mut job = KekJob {
            keyspace: "orders".into(),
            target_version: 2,
            ..KekJob::default()
        };
        job.counts.insert(2, 3);
        assert!(!s.kek_save(&job, "a").await.unwrap());
        assert!(s.kek_save(&job, "b").await.unwrap());
        assert_eq!(s.kek_job("orders").await.unwrap().unwrap(), job);
        s.kek_release("orders", "b").await.unwrap();
        assert!(s.kek_lease("orders", "a", 152, 180).await.unwrap());
    }
}
