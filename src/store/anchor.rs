//! The audit anchor: the newest signed audit checkpoint of each instance, kept outside the
//! audit files. `piiguard audit verify --anchor-from-config` compares a log with it, so a log
//! cut before its newest checkpoint (the newest file, or the whole audit folder, deleted) is
//! reported as truncated instead of verifying as a shorter, intact chain.
//!
//! The row only moves forward: an update with an older checkpoint seq than the stored one is
//! ignored, so a late write cannot roll the anchor back.

use sqlx::Row;

use super::{Store, db};
use crate::error::{Error, Result};

/// The newest checkpoint of an instance's audit chain, as its writer signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditAnchor {
    /// `server.instance` of the writer (one audit chain per instance).
    pub instance: String,
    /// Seq of the checkpoint record.
    pub checkpoint_seq: u64,
    /// Seq of the record just before it, which it covers.
    pub covers_seq: u64,
    /// Hex line hash of the record at `covers_seq`.
    pub covers_hash: String,
    /// Whether the checkpoint is the final seal of a clean stop.
    pub final_seal: bool,
    /// Seq of the checkpoint before it (0: none).
    pub prev_checkpoint: u64,
    /// Version of the transit signing key.
    pub key_version: u32,
    /// Base64 signature of the v2 checkpoint message (as in the checkpoint record).
    pub signature: String,
    /// When the anchor was written (Unix seconds).
    pub updated_at: i64,
}

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::internal(format!("store: audit anchor {what} too large")))
}

fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::internal(format!("store: audit anchor {what} negative")))
}

impl Store {
    /// The audit anchor table, on the migration transaction's connection.
    pub(super) async fn migrate_anchors(conn: &mut sqlx::AnyConnection) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS audit_anchors (
                instance TEXT PRIMARY KEY,
                checkpoint_seq BIGINT NOT NULL,
                covers_seq BIGINT NOT NULL,
                covers_hash TEXT NOT NULL,
                final_seal BIGINT NOT NULL,
                prev_checkpoint BIGINT NOT NULL,
                key_version BIGINT NOT NULL,
                signature TEXT NOT NULL,
                updated_at BIGINT NOT NULL)",
        )
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Records `a` as the newest checkpoint of its instance, unless the stored one is newer
    /// (or the same). Returns whether the row changed.
    pub async fn put_audit_anchor(&self, a: &AuditAnchor) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO audit_anchors (instance, checkpoint_seq, covers_seq, covers_hash,
                    final_seal, prev_checkpoint, key_version, signature, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (instance) DO UPDATE
             SET checkpoint_seq = $2, covers_seq = $3, covers_hash = $4, final_seal = $5,
                 prev_checkpoint = $6, key_version = $7, signature = $8, updated_at = $9
             WHERE audit_anchors.checkpoint_seq < $2",
        )
        .bind(&a.instance)
        .bind(to_i64(a.checkpoint_seq, "checkpoint_seq")?)
        .bind(to_i64(a.covers_seq, "covers_seq")?)
        .bind(&a.covers_hash)
        .bind(i64::from(a.final_seal))
        .bind(to_i64(a.prev_checkpoint, "prev_checkpoint")?)
        .bind(i64::from(a.key_version))
        .bind(&a.signature)
        .bind(a.updated_at)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// The newest checkpoint recorded for `instance`.
    pub async fn audit_anchor(&self, instance: &str) -> Result<Option<AuditAnchor>> {
        let r = sqlx::query(
            "SELECT instance, checkpoint_seq, covers_seq, covers_hash, final_seal,
                    prev_checkpoint, key_version, signature, updated_at
             FROM audit_anchors WHERE instance = $1",
        )
        .bind(instance)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        r.map(|r| {
            let key_version: i64 = r.try_get("key_version").map_err(db)?;
            Ok(AuditAnchor {
                instance: r.try_get("instance").map_err(db)?,
                checkpoint_seq: to_u64(r.try_get("checkpoint_seq").map_err(db)?, "seq")?,
                covers_seq: to_u64(r.try_get("covers_seq").map_err(db)?, "covers_seq")?,
                covers_hash: r.try_get("covers_hash").map_err(db)?,
                final_seal: r.try_get::<i64, _>("final_seal").map_err(db)? != 0,
                prev_checkpoint: to_u64(r.try_get("prev_checkpoint").map_err(db)?, "prev")?,
                key_version: u32::try_from(key_version)
                    .map_err(|_| Error::internal("store: audit anchor key_version"))?,
                signature: r.try_get("signature").map_err(db)?,
                updated_at: r.try_get("updated_at").map_err(db)?,
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anchor(seq: u64) -> AuditAnchor {
        AuditAnchor {
            instance: "i1".into(),
            checkpoint_seq: seq,
            covers_seq: seq - 1,
            covers_hash: "ab".repeat(32),
            final_seal: seq.is_multiple_of(2),
            prev_checkpoint: seq - 5,
            key_version: 1,
            signature: "c2ln".into(),
            updated_at: 1_700_000_000,
        }
    }

    #[tokio::test]
    async fn audit_anchor_only_moves_forward() {
        let d = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", d.path().join("s.db").display());
        let s = Store::open(&url).await.unwrap();
        assert_eq!(s.audit_anchor("i1").await.unwrap(), None);
        assert!(s.put_audit_anchor(&anchor(10)).await.unwrap());
        assert_eq!(s.audit_anchor("i1").await.unwrap(), Some(anchor(10)));
        // An older (late) checkpoint never rolls it back; the same one changes nothing.
        assert!(!s.put_audit_anchor(&anchor(8)).await.unwrap());
        assert!(!s.put_audit_anchor(&anchor(10)).await.unwrap());
        assert_eq!(s.audit_anchor("i1").await.unwrap(), Some(anchor(10)));
        assert!(s.put_audit_anchor(&anchor(12)).await.unwrap());
        assert_eq!(s.audit_anchor("i1").await.unwrap(), Some(anchor(12)));
        assert_eq!(s.audit_anchor("other").await.unwrap(), None);
    }
}
