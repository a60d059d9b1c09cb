//! Groups the DEK wraps of concurrent new subjects into transit `batch_input` calls.
//!
//! One worker task per KEK, started on the first wrap with that KEK. When no wrap of the KEK is
//! in flight, a wrap goes at once, alone (a plain transit encrypt: no added latency when idle);
//! wraps that arrive while one is in flight wait and go together in the next call, at most
//! [`TRANSIT_BATCH_CHUNK`] in one. So a burst of new subjects (concurrent cold Encrypts, the
//! cold items of an EncryptBatch) costs OpenBao one transit request per call in flight instead
//! of one per subject. A failed call fails only the wraps it carried; a failed item fails only
//! itself. A wrap whose caller went away meanwhile is skipped if it has not been sent yet.
//!
//! The DEKs travel to the worker as `Arc<Dek>`: the key is wiped when the last holder (the
//! caller, which derives the subject's keys from it) drops it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::secret::{Dek, WrappedDek};
use crate::vault::{TRANSIT_BATCH_CHUNK, Vault};

struct Job {
    dek: Arc<Dek>,
    reply: oneshot::Sender<Result<WrappedDek>>,
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
        let (reply, answer) = oneshot::channel();
        let job = Job { dek, reply };
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
        answer
            .await
            .map_err(|_| Error::unavailable("DEK wrap worker stopped"))?
    }
}

/// One KEK's worker: takes whatever waits (at most one chunk), wraps it in one call, answers,
/// and goes on until every sender is gone.
async fn run(vault: Arc<Vault>, kek: String, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < TRANSIT_BATCH_CHUNK {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        jobs.retain(|j| !j.reply.is_closed());
        let results = match jobs.as_slice() {
            [] => continue,
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
    }
}
