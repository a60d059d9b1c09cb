//! Groups the DEK wraps of concurrent new subjects into transit `batch_input` calls.
//!
//! One worker task per KEK, started on the first wrap with that KEK, with at most
//! [`calls_in_flight`] transit calls in flight. While fewer are in flight, a wrap goes at once
//! (alone if nothing else waits: a plain transit encrypt, no added latency when idle); wraps
//! that arrive while all are in flight wait and go together in the next call, at most
//! [`TRANSIT_BATCH_CHUNK`] in one. More than one call in flight, so that one slow or stalled
//! call does not hold every new subject behind it. So a burst of new subjects (concurrent cold Encrypts, the
//! cold items of an EncryptBatch) costs OpenBao one transit request per call in flight instead
//! of one per subject. A failed call fails only the wraps it carried; a failed item fails only
//! itself. A wrap whose caller went away meanwhile is skipped if it has not been sent yet.
//!
//! Overload: a wrap that waits here, unsent, for longer than `vault.queue_timeout_ms` (the
//! call before it is stalled on a slow Vault) is refused with `VAULT_OVERLOADED`, as a Vault
//! request that waited that long for a place under `vault.max_in_flight` is
//! ([`crate::vault::admission`]); once sent it waits for its answer. So a stalled Vault turns
//! a burst of new subjects into quick refusals, not into callers held until their deadline.
//!
//! The DEKs travel to the worker as `Arc<Dek>`: the key is wiped when the last holder (the
//! caller, which derives the subject's keys from it) drops it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::{Error, Result};
use crate::secret::{Dek, WrappedDek};
use crate::vault::{TRANSIT_BATCH_CHUNK, Vault};

/// A job's [`Job::state`]: waiting in the queue, taken into a call, or given up by its caller.
const QUEUED: u8 = 0;
const SENT: u8 = 1;
const ABANDONED: u8 = 2;

struct Job {
    dek: Arc<Dek>,
    reply: oneshot::Sender<Result<WrappedDek>>,
    state: Arc<AtomicU8>,
}

/// Transit calls of one KEK's worker in flight at once: an eighth of the Vault admission bound
/// (`vault.max_in_flight`, 8 of the default 64), at least 4 (never more than the bound).
pub fn calls_in_flight(max_in_flight: usize) -> usize {
    (max_in_flight / 8).max(4).min(max_in_flight.max(1))
}

/// The wrap workers, one per KEK.
pub struct WrapBatcher {
    vault: Arc<Vault>,
    workers: Mutex<HashMap<String, mpsc::UnboundedSender<Job>>>,
}

impl WrapBatcher {
    /// No worker yet; each starts with the first wrap of its KEK.
    pub fn new(vault: Arc<Vault>) -> Self {
        Self {
            vault,
            workers: Mutex::new(HashMap::new()),
        }
    }

    /// Wraps `dek` with transit key `kek`, alone or together with the wraps that wait beside it.
    ///
    /// # Errors
    /// What Vault answered for this wrap (or for the call that carried it).
    pub async fn wrap(&self, kek: &str, dek: Arc<Dek>) -> Result<WrappedDek> {
        let (reply, mut answer) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        let job = Job {
            dek,
            reply,
            state: state.clone(),
        };
        let started = Instant::now();
        {
            let mut g = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            let tx = g.entry(kek.to_string()).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(run(self.vault.clone(), kek.to_string(), rx));
                tx
            });
            if let Err(mpsc::error::SendError(job)) = tx.send(job) {
                // The worker ended (its runtime is going away): start another.
                let (tx2, rx) = mpsc::unbounded_channel();
                tokio::spawn(run(self.vault.clone(), kek.to_string(), rx));
                tx2.send(job)
                    .map_err(|_| Error::internal("DEK wrap worker stopped"))?;
                *tx = tx2;
            }
        }
        let queue_timeout = self.vault.config().admission.queue_timeout;
        let stopped = |_| Error::unavailable("DEK wrap worker stopped");
        match tokio::time::timeout(queue_timeout, &mut answer).await {
            Ok(r) => return r.map_err(stopped)?,
            Err(_) => {
                // Still unsent after the queue timeout: give up, unless the worker took it
                // meanwhile (then its answer comes).
                if state
                    .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    crate::metrics::vault_admission("transit_encrypt", started.elapsed(), false);
                    tracing::warn!(
                        "DEK wrap refused: it waited vault.queue_timeout_ms behind a Vault call in flight"
                    );
                    return Err(Error::vault_overloaded());
                }
            }
        }
        answer.await.map_err(stopped)?
    }
}

/// One KEK's worker: takes whatever waits (at most one chunk), wraps it in one call, answers,
/// and goes on until every sender is gone.
async fn run(vault: Arc<Vault>, kek: String, mut rx: mpsc::UnboundedReceiver<Job>) {
    let calls = Arc::new(Semaphore::new(calls_in_flight(
        vault.config().admission.max_in_flight,
    )));
    let kek: Arc<str> = kek.into();
    loop {
        // A place for a call first: while every place is taken, wraps gather in the queue.
        let Ok(place) = calls.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut jobs = vec![first];
        while jobs.len() < TRANSIT_BATCH_CHUNK {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // Skip the wraps given up (overload) or whose caller went away; the rest are sent.
        jobs.retain(|j| {
            !j.reply.is_closed()
                && j.state
                    .compare_exchange(QUEUED, SENT, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
        });
        if jobs.is_empty() {
            continue;
        }
        let (vault, kek) = (vault.clone(), kek.clone());
        tokio::spawn(async move {
            let _place = place;
            let results = match jobs.as_slice() {
                [one] => vec![vault.wrap_dek(&kek, &one.dek).await],
                many => {
                    let deks: Vec<&Dek> = many.iter().map(|j| &*j.dek).collect();
                    vault.wrap_deks(&kek, &deks).await
                }
            };
            crate::metrics::dek_wrap_batch(jobs.len());
            let mut results = results.into_iter();
            for j in jobs {
                let r = results
                    .next()
                    .unwrap_or_else(|| Err(Error::internal("transit answered too few wraps")));
                let _ = j.reply.send(r);
            }
        });
    }
}
