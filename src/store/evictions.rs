//! Reading the eviction feed without missing a late commit (security review finding 5).
//!
//! A row's `seq` is drawn when it is inserted, not when it commits. On PostgreSQL two shreds
//! can insert seq 7 and seq 8 and commit 8 first; a reader that saw 8 and then asked only for
//! `seq > 8` never saw 7, and the shredded key stayed usable in that replica until its hard
//! TTL. (SQLite has one writer at a time, so its seqs commit in order, but the same reader
//! serves both.)
//!
//! [`EvictionFeed`] therefore remembers every seq it skipped over (a *gap*) and asks for the
//! gaps again on every read, until the row shows up or the gap is older than the window
//! (the cache's hard TTL, see [`EvictionFeed::new`]). Rows are delivered once, deduplicated by
//! seq; evicting twice would be harmless anyway.
//!
//! On PostgreSQL the publishing transaction also sends `NOTIFY piiguard_evictions` (delivered
//! when it commits), and [`EvictionWakeups`] listens on a connection of its own, so that the
//! other replicas read the feed at once instead of at their next poll. Polling stays: it is
//! the fallback when the listener's connection is down.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sqlx::Row;

use super::{Eviction, Store, db, placeholders};
use crate::error::Result;

/// The PostgreSQL channel of the eviction feed's wake-ups (no payload).
pub const EVICTIONS_CHANNEL: &str = "piiguard_evictions";

/// Most gaps a feed remembers. A gap comes from a transaction that drew a seq and has not
/// committed yet, or that rolled back (then it never fills and ages out): a handful at a time.
const MAX_GAPS: usize = 10_000;

/// Gaps asked for in one query (`seq IN (…)`).
const GAP_CHUNK: usize = 500;

/// What the next read of the feed must ask for, and what it already delivered.
#[derive(Debug)]
pub struct EvictionFeed {
    /// The highest seq delivered (or the newest at start).
    high: i64,
    /// Seqs below `high` not seen yet, with when the gap was first noticed.
    gaps: BTreeMap<i64, Instant>,
    /// How long a gap is asked for again.
    window: Duration,
}

impl EvictionFeed {
    /// A feed that delivers the rows after `high`. A gap is asked for again for `window`
    /// after it was noticed; pass the cache's hard TTL: the row that fills a gap was drawn
    /// after its shred claimed the subject (claim first, then the eviction), so every key it
    /// names that a replica cached was cached before the gap was noticed, and has expired
    /// `window` later whether or not the row ever commits.
    pub fn new(high: i64, window: Duration) -> Self {
        Self {
            high,
            gaps: BTreeMap::new(),
            window,
        }
    }

    /// The highest seq delivered so far.
    pub fn high(&self) -> i64 {
        self.high
    }

    /// The seqs skipped over and still asked for, oldest first.
    pub fn gaps(&self) -> impl Iterator<Item = i64> + '_ {
        self.gaps.keys().copied()
    }

    /// Records what a read returned: `seqs` (any order, possibly filling gaps or moving past
    /// `high`). Returns the seqs to deliver (not delivered before), ascending.
    fn observe(&mut self, seqs: &[i64], now: Instant) -> Vec<i64> {
        let mut seqs = seqs.to_vec();
        seqs.sort_unstable();
        seqs.dedup();
        let mut out = Vec::with_capacity(seqs.len());
        for s in seqs {
            if s > self.high {
                // Everything strictly between the old high and s was skipped over. Remember
                // at most MAX_GAPS of them, the newest (a jump of the sequence itself, e.g. a
                // `setval`, leaves numbers that will never be used).
                let from = (self.high + 1).max(s - MAX_GAPS as i64);
                for g in from..s {
                    self.gaps.insert(g, now);
                }
                self.high = s;
                out.push(s);
            } else if self.gaps.remove(&s).is_some() {
                out.push(s);
            }
        }
        out.sort_unstable();
        self.expire(now);
        out
    }

    /// Forgets gaps older than the window, and the oldest beyond [`MAX_GAPS`].
    fn expire(&mut self, now: Instant) {
        let window = self.window;
        self.gaps
            .retain(|_, noticed| now.saturating_duration_since(*noticed) < window);
        while self.gaps.len() > MAX_GAPS {
            if let Some((g, _)) = self.gaps.pop_first() {
                tracing::warn!(
                    seq = g,
                    "eviction feed: too many gaps; forgetting the oldest"
                );
            }
        }
    }
}

fn eviction(r: &sqlx::any::AnyRow) -> Result<Eviction> {
    Ok(Eviction {
        seq: r.try_get("seq").map_err(db)?,
        keyspace: r.try_get("keyspace").map_err(db)?,
        subject_ref: r.try_get("subject_ref").map_err(db)?,
        intent: r.try_get("intent").map_err(db)?,
    })
}

impl Store {
    /// A feed positioned after the newest eviction (a starting replica has an empty cache:
    /// what was published before it started concerns it only through the store's states).
    /// `window`: see [`EvictionFeed::new`].
    pub async fn eviction_feed(&self, window: Duration) -> Result<EvictionFeed> {
        Ok(EvictionFeed::new(self.last_eviction_seq().await?, window))
    }

    /// The evictions not yet delivered by `feed`: rows after its high mark (at most `limit`)
    /// and rows that filled one of its gaps, oldest first. Advances the feed.
    pub async fn next_evictions(
        &self,
        feed: &mut EvictionFeed,
        limit: i64,
    ) -> Result<Vec<Eviction>> {
        let mut rows = self.evictions_since(feed.high, limit).await?;
        let gaps: Vec<i64> = feed.gaps().collect();
        for chunk in gaps.chunks(GAP_CHUNK) {
            let sql = format!(
                "SELECT seq, keyspace, subject_ref, intent FROM evictions WHERE seq IN ({})",
                placeholders(1, chunk.len())
            );
            // Only placeholders are formatted in.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for g in chunk {
                q = q.bind(*g);
            }
            for r in q.fetch_all(&self.pool).await.map_err(db)? {
                rows.push(eviction(&r)?);
            }
        }
        let seqs: Vec<i64> = rows.iter().map(|e| e.seq).collect();
        let fresh = feed.observe(&seqs, Instant::now());
        rows.retain(|e| fresh.binary_search(&e.seq).is_ok());
        rows.sort_by_key(|e| e.seq);
        rows.dedup_by_key(|e| e.seq);
        Ok(rows)
    }

    /// Wake-ups on every committed eviction, on PostgreSQL (`None` on SQLite, whose feed is
    /// only polled: one process writes a SQLite file, and its own evictions are immediate).
    /// A separate connection from the store's URL.
    pub async fn eviction_wakeups(&self) -> Result<Option<EvictionWakeups>> {
        let Some(url) = &self.postgres_url else {
            return Ok(None);
        };
        let mut listener = sqlx::postgres::PgListener::connect(url.0.as_str())
            .await
            .map_err(db)?;
        listener.listen(EVICTIONS_CHANNEL).await.map_err(db)?;
        Ok(Some(EvictionWakeups { listener }))
    }
}

/// A PostgreSQL `LISTEN piiguard_evictions` connection (reconnects by itself).
pub struct EvictionWakeups {
    listener: sqlx::postgres::PgListener,
}

impl std::fmt::Debug for EvictionWakeups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvictionWakeups").finish_non_exhaustive()
    }
}

impl EvictionWakeups {
    /// Waits for the next notification, or for the connection to drop (then it reconnects on
    /// the next call; a notification sent meanwhile is lost, which the caller's read of the
    /// feed covers). An error means the database cannot be reached: poll meanwhile.
    pub async fn wait(&mut self) -> Result<()> {
        self.listener.try_recv().await.map_err(db)?;
        // Several commits may have notified: one read of the feed serves them all.
        while self.listener.next_buffered().is_some() {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_commit_below_the_high_mark_is_still_delivered_once() {
        let t0 = Instant::now();
        let mut f = EvictionFeed::new(5, Duration::from_secs(60));
        // 7 and 8 committed; 6 drew its seq first but has not committed yet.
        assert_eq!(f.observe(&[8, 7], t0), vec![7, 8]);
        assert_eq!(f.high(), 8);
        assert_eq!(f.gaps().collect::<Vec<_>>(), vec![6]);
        // Read again: nothing new, 6 still missing.
        assert_eq!(f.observe(&[], t0), Vec::<i64>::new());
        // 6 commits: delivered, and only once.
        assert_eq!(f.observe(&[6, 9], t0), vec![6, 9]);
        assert_eq!(f.gaps().count(), 0);
        assert_eq!(f.observe(&[6, 9], t0), Vec::<i64>::new());
    }

    #[test]
    fn a_gap_that_never_fills_ages_out_after_the_window() {
        let t0 = Instant::now();
        let mut f = EvictionFeed::new(0, Duration::from_secs(10));
        assert_eq!(f.observe(&[3], t0), vec![3]);
        assert_eq!(f.gaps().collect::<Vec<_>>(), vec![1, 2]);
        f.observe(&[], t0 + Duration::from_secs(9));
        assert_eq!(f.gaps().count(), 2);
        f.observe(&[], t0 + Duration::from_secs(10));
        assert_eq!(f.gaps().count(), 0);
        // A row that commits after the window is no longer asked for (moot: see `new`).
        assert_eq!(
            f.observe(&[1], t0 + Duration::from_secs(11)),
            Vec::<i64>::new()
        );
    }

    #[test]
    fn a_jump_of_the_sequence_keeps_a_bounded_number_of_gaps() {
        let t0 = Instant::now();
        let mut f = EvictionFeed::new(0, Duration::from_secs(10));
        f.observe(&[1_000_000], t0);
        assert_eq!(f.gaps().count(), MAX_GAPS);
        assert_eq!(f.gaps().next(), Some(1_000_000 - MAX_GAPS as i64));
    }
}
