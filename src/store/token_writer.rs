//! Group commit of token writes.
//!
//! Each Tokenize that writes hands its row to a writer task and waits for the outcome. The
//! writer takes every write queued at that moment (up to [`MAX_GROUP`]) and applies them in
//! one store transaction ([`Store::write_tokens`]): one commit, one set of WAL pages and one
//! round of statements for many calls, instead of a transaction per call. No timer: a write
//! that arrives alone is committed at once; writes that arrive while a commit runs form the
//! next group.
//!
//! Guarantees: a caller gets `Ok` only after the transaction holding its row has committed;
//! the transaction is all-or-nothing, so a failure never leaves a half-written mapping. When
//! a group's transaction fails, each of its writes is retried alone, so one bad write fails
//! only its own call; unless the store is unavailable, which fails the whole group at once. A writer that stops (or panics) drops its callers' reply channels:
//! they get an error, never a token.

use std::sync::{Arc, OnceLock};

use sqlx::Any;
use sqlx::pool::PoolConnection;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::{Error, Result};
use crate::store::Store;
use crate::store::tokens::{AddValue, NewToken, TokenWrite};

/// Most writes committed in one transaction.
pub const MAX_GROUP: usize = 64;
/// Writes queued before callers wait for room.
const QUEUE: usize = 1024;

/// An owned token write (it crosses to the writer task).
pub enum Write {
    /// A new token row with its first value.
    Insert {
        /// The keyspace.
        keyspace: String,
        /// Keyed hash of the token (the token itself is never stored).
        token_hash: String,
        /// The field the token stands for.
        field: String,
        /// The token format.
        format: String,
        /// Keyed hash of the value (deterministic tokens only).
        value_hash: Option<String>,
        /// Which draw made the token (deterministic collisions).
        attempt: u32,
        /// Keyed hash of the subject.
        subject_ref: String,
        /// The value sealed under the subject's DEK (text form).
        sealed: String,
        /// Unix seconds of the write.
        now: i64,
        /// Unix seconds of the TTL, if any.
        expires_at: Option<i64>,
    },
    /// A value of another subject added to an existing deterministic token.
    AddValue {
        /// The keyspace.
        keyspace: String,
        /// Keyed hash of the token (the token itself is never stored).
        token_hash: String,
        /// Keyed hash of the subject.
        subject_ref: String,
        /// The value sealed under the subject's DEK (text form).
        sealed: String,
        /// Unix seconds of the write.
        now: i64,
        /// Unix seconds of the TTL, if any.
        expires_at: Option<i64>,
    },
}

impl Write {
    /// An owned copy of a new token row.
    pub fn insert(t: &NewToken<'_>) -> Self {
        Self::Insert {
            keyspace: t.keyspace.into(),
            token_hash: t.token_hash.into(),
            field: t.field.into(),
            format: t.format.into(),
            value_hash: t.value_hash.map(Into::into),
            attempt: t.attempt,
            subject_ref: t.subject_ref.into(),
            sealed: t.sealed.into(),
            now: t.now,
            expires_at: t.expires_at,
        }
    }

    fn as_store(&self) -> TokenWrite<'_> {
        match self {
            Self::Insert {
                keyspace,
                token_hash,
                field,
                format,
                value_hash,
                attempt,
                subject_ref,
                sealed,
                now,
                expires_at,
            } => TokenWrite::Insert(NewToken {
                keyspace,
                token_hash,
                field,
                format,
                value_hash: value_hash.as_deref(),
                attempt: *attempt,
                subject_ref,
                sealed,
                now: *now,
                expires_at: *expires_at,
            }),
            Self::AddValue {
                keyspace,
                token_hash,
                subject_ref,
                sealed,
                now,
                expires_at,
            } => TokenWrite::AddValue(AddValue {
                keyspace,
                token_hash,
                subject_ref,
                sealed,
                now: *now,
                expires_at: *expires_at,
            }),
        }
    }
}

struct Job {
    write: Write,
    done: oneshot::Sender<Result<bool>>,
}

/// The handle callers submit writes through. The writer tasks stop when it is dropped.
pub struct GroupWriter {
    store: Arc<Store>,
    tx: OnceLock<mpsc::Sender<Job>>,
}

fn stopped() -> Error {
    Error::StoreUnavailable {
        detail: "token writer stopped".into(),
    }
}

impl GroupWriter {
    /// A writer on `store`; its tasks start with the first write (inside the runtime).
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            tx: OnceLock::new(),
        }
    }

    fn sender(&self) -> &mpsc::Sender<Job> {
        self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            let rx = Arc::new(Mutex::new(rx));
            let checkpoints = self.store.background_checkpoints().then(|| {
                let (tx, rx) = mpsc::channel(1);
                tokio::spawn(checkpoints(self.store.clone(), rx));
                tx
            });
            for _ in 0..self.store.token_writers().max(1) {
                tokio::spawn(run(self.store.clone(), rx.clone(), checkpoints.clone()));
            }
            tx
        })
    }

    /// Applies one write as part of the next group; returns its outcome once the group's
    /// transaction committed (`false`: it changed nothing, as in [`Store::write_tokens`]).
    pub async fn write(&self, write: Write) -> Result<bool> {
        let (done, rx) = oneshot::channel();
        self.sender()
            .send(Job { write, done })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn run(
    store: Arc<Store>,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    checkpoints: Option<mpsc::Sender<()>>,
) {
    let mut jobs = Vec::with_capacity(MAX_GROUP);
    // The writer's own connection on SQLite (see `Store::write_tokens_with`).
    let mut conn = None;
    loop {
        {
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut jobs, MAX_GROUP).await == 0 {
                return; // every sender is gone
            }
            if jobs.len() > 1 && jobs.len() < MAX_GROUP {
                // Writes are arriving concurrently: let the tasks already woken on this
                // worker (calls about to write) run once, and take their writes too. Each
                // commit has a fixed cost (on SQLite ~40 us of page-cache bookkeeping alone:
                // bench/RESULTS.md), so fuller groups cost less CPU per token. No timer: a
                // lone write is committed at once, and this waits for nothing.
                tokio::task::yield_now().await;
                while jobs.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(job) => jobs.push(job),
                        Err(_) => break,
                    }
                }
            }
        }
        commit_group(&store, &mut conn, &mut jobs).await;
        if let Some(c) = &checkpoints {
            // Full: a checkpoint is already due.
            let _ = c.try_send(());
        }
    }
}

/// Pause between two background checkpoints: each copies the pages committed meanwhile, a
/// page dirtied by several commits once. Short, so that when the writer's own automatic
/// checkpoint comes due (every `SQLITE_WAL_AUTOCHECKPOINT` pages, which lets the WAL start
/// over from its beginning) nearly everything is already copied: that one runs inside a
/// commit, on the writer's thread, and every Tokenize of the next group waits for it. At
/// 250 ms it still copied about two thirds of all pages (a third of the writer thread's time,
/// p99 latency 30-40 ms); at 20 ms about a third (p99 ~20 ms), and more random Tokenize calls
/// per second with the same CPU per call. No pause at all costs more CPU (a checkpoint and
/// two fsyncs per commit, little to share). Measured: bench/RESULTS.md, "Random Tokenize:
/// one statement batch per group".
const CHECKPOINT_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// Checkpoints the SQLite WAL on another connection (its own worker thread) after commits,
/// at most every [`CHECKPOINT_PAUSE`]; ends with the writers. A failed checkpoint costs
/// nothing but time: the writer's automatic one still bounds the WAL.
async fn checkpoints(store: Arc<Store>, mut due: mpsc::Receiver<()>) {
    while due.recv().await.is_some() {
        if let Err(e) = store.checkpoint().await {
            tracing::debug!(error = %e, "background WAL checkpoint failed");
        }
        tokio::time::sleep(CHECKPOINT_PAUSE).await;
    }
}

/// Writes `jobs` in one transaction and answers each; empties `jobs`.
async fn commit_group(store: &Store, conn: &mut Option<PoolConnection<Any>>, jobs: &mut Vec<Job>) {
    crate::metrics::token_write_group(jobs.len());
    let ops: Vec<TokenWrite<'_>> = jobs.iter().map(|j| j.write.as_store()).collect();
    let outcome = store.write_tokens_with(conn, &ops).await;
    drop(ops);
    match outcome {
        Ok(done) => {
            for (job, ok) in jobs.drain(..).zip(done) {
                let _ = job.done.send(Ok(ok));
            }
        }
        Err(e) if jobs.len() == 1 || matches!(e, Error::StoreUnavailable { .. }) => {
            // The store is unreachable (or full, or read-only): it fails every write alike,
            // and writing each alone would wait for it once per write (one pool acquire
            // timeout each, minutes for a group). Nothing was written; all get the error.
            for job in jobs.drain(..) {
                let _ = job.done.send(Err(e.clone()));
            }
        }
        Err(e) => {
            // Nothing of the group was written; find the culprit by writing each alone.
            tracing::debug!(error = %e, writes = jobs.len(), "token group failed; writing one by one");
            for job in jobs.drain(..) {
                let r = store
                    .write_tokens(&[job.write.as_store()])
                    .await
                    .map(|v| v[0]);
                let _ = job.done.send(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Arc<Store>) {
        let d = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", d.path().join("t.db").display());
        (d, Arc::new(Store::open(&url).await.unwrap()))
    }

    fn ins(th: &str, vh: Option<&str>, sref: &str) -> Write {
        Write::insert(&NewToken {
            keyspace: "ks",
            token_hash: th,
            field: "f",
            format: "opaque",
            value_hash: vh,
            attempt: 0,
            subject_ref: sref,
            sealed: "pg1.x",
            now: 1,
            expires_at: None,
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_grouped_and_each_gets_its_own_outcome() {
        let (_d, s) = store().await;
        let w = Arc::new(GroupWriter::new(s.clone()));
        // 200 distinct tokens, 50 writes of one token hash and 50 of one value hash.
        let mut calls = Vec::new();
        for i in 0..300 {
            let w = w.clone();
            calls.push(tokio::spawn(async move {
                let write = match i {
                    0..200 => ins(&format!("t{i}"), None, "a"),
                    200..250 => ins("same-token", None, &format!("s{i}")),
                    _ => ins(&format!("d{i}"), Some("same-value"), "a"),
                };
                (i, w.write(write).await.unwrap())
            }));
        }
        let mut won_token = 0;
        let mut won_value = 0;
        for c in calls {
            let (i, ok) = c.await.unwrap();
            match i {
                0..200 => assert!(ok, "distinct token {i} must be written"),
                200..250 => won_token += usize::from(ok),
                _ => won_value += usize::from(ok),
            }
        }
        assert_eq!(
            (won_token, won_value),
            (1, 1),
            "one winner per token / value"
        );
        assert_eq!(s.token_counts("ks").await.unwrap(), (202, 202));
        // Every reported success is stored, with its sealed value.
        for i in 0..200 {
            let row = s.token("ks", &format!("t{i}")).await.unwrap().unwrap();
            assert_eq!(row.sealed, vec!["pg1.x".to_string()]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_fails_alone_and_leaves_nothing_half_written() {
        let (_d, s) = store().await;
        // A trigger makes the insert of token "bad" fail (and with it its whole group's
        // statement).
        crate::store::tokens::tests::refuse_token(&s, "bad").await;
        let w = Arc::new(GroupWriter::new(s.clone()));
        let mut calls = Vec::new();
        for i in 0..40 {
            let w = w.clone();
            calls.push(tokio::spawn(async move {
                let th = if i == 17 {
                    "bad".to_string()
                } else {
                    format!("t{i}")
                };
                (i, w.write(ins(&th, None, "a")).await)
            }));
        }
        for c in calls {
            let (i, r) = c.await.unwrap();
            if i == 17 {
                assert!(r.is_err(), "the failed write must not report a token");
            } else {
                assert!(r.unwrap(), "write {i} must not fail with its group");
            }
        }
        assert!(s.token("ks", "bad").await.unwrap().is_none());
        assert_eq!(s.token_counts("ks").await.unwrap(), (39, 39));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_store_returns_errors_never_success() {
        let (_d, s) = store().await;
        sqlx::query(
            "CREATE TRIGGER refuse_all BEFORE INSERT ON token_map
             BEGIN SELECT RAISE(ABORT, 'broken'); END",
        )
        .execute(s.pool())
        .await
        .unwrap();
        let w = Arc::new(GroupWriter::new(s.clone()));
        let mut calls = Vec::new();
        for i in 0..20 {
            let w = w.clone();
            calls.push(tokio::spawn(async move {
                w.write(ins(&format!("t{i}"), None, "a")).await
            }));
        }
        for c in calls {
            assert!(c.await.unwrap().is_err());
        }
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM token_map")
            .fetch_one(s.pool())
            .await
            .unwrap();
        assert_eq!(n, 0, "every group rolled back");
    }
}
