//! The bound on Vault requests in flight (`vault.max_in_flight`, `vault.queue_timeout_ms`).
//!
//! Without it a slow or stalled Vault turns every cold call into one more open request (and
//! reqwest's pool into one more connection): memory and sockets grow with the load until the
//! requests time out. With it, at most `max_in_flight` requests are in flight; a further one
//! waits up to `queue_timeout` for a place and is then refused with RESOURCE_EXHAUSTED /
//! `VAULT_OVERLOADED` ([`Error::vault_overloaded`]), so overload is answered instead of piling
//! up. A caller whose gRPC deadline passes while it waits is dropped by tonic, and so is its
//! place in the queue. Warm calls never come here (they never call Vault).
//!
//! Metrics: `piiguard_vault_admission_wait_seconds` (time spent waiting for a place, admitted
//! calls) and `piiguard_vault_overloaded_total{op}` (refusals), see
//! [`crate::metrics::vault_admission`].

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::VaultAdmission;
use crate::error::{Error, Result};

/// Places for Vault requests. Cheap to share (clones share the places).
#[derive(Debug, Clone)]
pub struct Admission {
    places: Arc<Semaphore>,
    cfg: VaultAdmission,
}

/// A place held for one Vault request; given back on drop.
#[derive(Debug)]
pub struct Place {
    _permit: OwnedSemaphorePermit,
}

impl Admission {
    /// `cfg.max_in_flight` places (at least one).
    pub fn new(cfg: VaultAdmission) -> Self {
        Self {
            places: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
            cfg,
        }
    }

    /// Waits at most `queue_timeout` for a place for a Vault request of kind `op`.
    ///
    /// # Errors
    /// [`Error::vault_overloaded`] when none came free in time.
    pub async fn enter(&self, op: &'static str) -> Result<Place> {
        let started = Instant::now();
        let permit = match self.places.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                tokio::time::timeout(self.cfg.queue_timeout, self.places.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(|r| r.ok())
            }
        };
        crate::metrics::vault_admission(op, started.elapsed(), permit.is_some());
        match permit {
            Some(p) => Ok(Place { _permit: p }),
            None => {
                tracing::warn!(
                    op,
                    max_in_flight = self.cfg.max_in_flight,
                    "Vault request refused: every place stayed taken for vault.queue_timeout_ms"
                );
                Err(Error::vault_overloaded())
            }
        }
    }

    /// Places free now (for tests and diagnostics).
    pub fn available(&self) -> usize {
        self.places.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Reason;
    use std::time::Duration;

    fn admission(n: usize, wait_ms: u64) -> Admission {
        Admission::new(VaultAdmission {
            max_in_flight: n,
            queue_timeout: Duration::from_millis(wait_ms),
        })
    }

    #[tokio::test]
    async fn a_full_bound_refuses_after_the_queue_timeout_and_frees_on_drop() {
        let a = admission(2, 50);
        let p1 = a.enter("kv_read").await.unwrap();
        let _p2 = a.enter("kv_read").await.unwrap();
        assert_eq!(a.available(), 0);
        let started = Instant::now();
        let e = a.enter("kv_read").await.unwrap_err();
        assert_eq!(e.reason(), Reason::VaultOverloaded);
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop(p1);
        assert_eq!(a.available(), 1);
        a.enter("kv_read").await.unwrap();
    }

    #[tokio::test]
    async fn a_waiter_gets_the_place_given_back_within_its_wait() {
        let a = admission(1, 5_000);
        let p = a.enter("kv_read").await.unwrap();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.enter("kv_read").await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(p);
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn zero_wait_refuses_at_once_when_full() {
        let a = admission(1, 0);
        let _p = a.enter("kv_read").await.unwrap();
        assert_eq!(
            a.enter("kv_read").await.unwrap_err().reason(),
            Reason::VaultOverloaded
        );
    }
}
