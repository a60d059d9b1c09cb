//! The retry policy: which failures are retried (retryable reasons only, and for a call that
//! is not idempotent only a refusal that proves nothing ran), how often, and the pause between
//! attempts (exponential backoff with full jitter), all within the call's one deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::Status;
use tonic_types::StatusExt as _;

use crate::error::{Error, Reason, is_retryable, refused_before_work};

/// Whether repeating a call can duplicate an effect. Each helper of
/// [`Client`](crate::Client) documents which it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idempotency {
    /// A repeat changes nothing more, or makes an independent new result nothing refers to
    /// (Decrypt, Detokenize, BlindIndex, Shred with the same request id, Encrypt: a ciphertext
    /// is not stored). Retried on every retryable failure.
    Idempotent,
    /// A repeat can leave a second stored effect (Tokenize RANDOM stores a token row per call,
    /// key rotations, canaries). Retried only on `RESOURCE_EXHAUSTED` `RATE_LIMITED`, which
    /// the server decides before doing anything; an `UNAVAILABLE` is returned at once, since
    /// the first attempt may have landed.
    NotIdempotent,
}

/// How often and how long to retry. Defaults: 4 attempts, backoff from 50 ms doubling to at
/// most 2 s, full jitter (the pause is uniform in `[0, ceiling)`), as the Python client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: never retry).
    pub max_attempts: u32,
    /// Ceiling of the pause before the first retry; doubles per retry.
    pub base_backoff: Duration,
    /// Largest ceiling of a pause.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            base_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retry.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The ceiling of the pause after failed attempt `attempt` (1-based):
    /// `min(max_backoff, base_backoff * 2^(attempt-1))`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.base_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// The pause after failed attempt `attempt` for a jitter draw `unit` in `[0, 1)`: full
    /// jitter, `ceiling(attempt) * unit`.
    pub fn backoff(&self, attempt: u32, unit: f64) -> Duration {
        self.ceiling(attempt).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Whether a failure of attempt `attempt` with this code and reason is retried (time left
    /// aside).
    pub fn should_retry(
        &self,
        idempotency: Idempotency,
        attempt: u32,
        code: tonic::Code,
        reason: Option<&Reason>,
    ) -> bool {
        attempt < self.max_attempts
            && match idempotency {
                Idempotency::Idempotent => is_retryable(code, reason),
                Idempotency::NotIdempotent => refused_before_work(code, reason),
            }
    }
}

/// Time and randomness of the retry loop: tokio's in the client, a fake in the tests.
pub(crate) trait Clock: Send + Sync {
    /// Time since an arbitrary origin (monotonic).
    fn now(&self) -> Duration;
    /// Waits `d`.
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// A jitter draw, uniform in `[0, 1)` (not for cryptography).
    fn unit(&self) -> f64;
}

/// tokio's clock and a small xorshift generator seeded from std's per-process random keys.
pub(crate) struct TokioClock {
    origin: tokio::time::Instant,
    state: AtomicU64,
}

impl TokioClock {
    pub(crate) fn new() -> Self {
        use std::hash::{BuildHasher as _, Hasher as _};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x9e37_79b9_7f4a_7c15);
        TokioClock {
            origin: tokio::time::Instant::now(),
            state: AtomicU64::new(h.finish() | 1),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(d))
    }

    fn unit(&self) -> f64 {
        let mut x = self.state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Runs `attempt` (given the time left) until it succeeds, fails for good, runs out of
/// attempts, or the next pause would pass the deadline. `retries` counts the retries made.
/// A server's `RetryInfo` delay, if it sends one, is the least pause.
pub(crate) async fn run<T, F, Fut>(
    policy: &RetryPolicy,
    idempotency: Idempotency,
    method: &'static str,
    deadline: Duration,
    clock: &dyn Clock,
    retries: &AtomicU64,
    mut attempt: F,
) -> Result<T, Error>
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let start = clock.now();
    let mut n: u32 = 0;
    loop {
        n += 1;
        let left = deadline.saturating_sub(clock.now().saturating_sub(start));
        let status = match attempt(left).await {
            Ok(v) => return Ok(v),
            Err(s) => s,
        };
        let err = Error::from_status(method, &status, n);
        if !policy.should_retry(idempotency, n, status.code(), err.reason()) {
            return Err(err);
        }
        let server_delay = status
            .get_error_details()
            .retry_info()
            .and_then(|r| r.retry_delay)
            .unwrap_or_default();
        let pause = policy.backoff(n, clock.unit()).max(server_delay);
        if clock.now().saturating_sub(start) + pause >= deadline {
            return Err(err);
        }
        retries.fetch_add(1, Ordering::Relaxed);
        clock.sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use tonic::Code;
    use tonic_types::ErrorDetails;

    use super::*;

    /// Time moves only when the loop sleeps (or an attempt says it took time); draws are fixed.
    struct FakeClock {
        now: Mutex<Duration>,
        pauses: Mutex<Vec<Duration>>,
        unit: f64,
    }

    impl FakeClock {
        fn new(unit: f64) -> Self {
            FakeClock {
                now: Mutex::new(Duration::ZERO),
                pauses: Mutex::new(Vec::new()),
                unit,
            }
        }
        fn advance(&self, d: Duration) {
            *self.now.lock().unwrap() += d;
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            *self.now.lock().unwrap()
        }
        fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            self.pauses.lock().unwrap().push(d);
            self.advance(d);
            Box::pin(async {})
        }
        fn unit(&self) -> f64 {
            self.unit
        }
    }

    fn status(code: Code, reason: &str) -> Status {
        let mut md = HashMap::new();
        md.insert("correlation_id".to_string(), "c".to_string());
        Status::with_error_details(
            code,
            "m",
            ErrorDetails::with_error_info(reason, "piiguard.dev", md),
        )
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(250),
        }
    }

    /// Runs with a fake clock; every attempt fails with `fail` until `ok_at` (1-based).
    fn go(
        idem: Idempotency,
        fail: impl Fn() -> Status,
        ok_at: Option<u32>,
        deadline: Duration,
        clock: &FakeClock,
    ) -> (Result<u32, Error>, u32, u64) {
        let calls = std::cell::Cell::new(0u32);
        let retries = AtomicU64::new(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let r = rt.block_on(run(
            &policy(),
            idem,
            "T/M",
            deadline,
            clock,
            &retries,
            |_left| {
                calls.set(calls.get() + 1);
                let n = calls.get();
                let r = if Some(n) == ok_at { Ok(n) } else { Err(fail()) };
                async move { r }
            },
        ));
        (r, calls.get(), retries.load(Ordering::Relaxed))
    }

    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn a_retryable_failure_is_retried_up_to_max_attempts() {
        let c = FakeClock::new(0.5);
        let (r, calls, retries) = go(
            Idempotency::Idempotent,
            || status(Code::Unavailable, "VAULT_UNAVAILABLE"),
            None,
            LONG,
            &c,
        );
        let e = r.unwrap_err();
        assert_eq!((calls, retries, e.attempts()), (4, 3, 4));
        assert!(e.is_retryable());
        assert_eq!(e.reason(), Some(&Reason::VaultUnavailable));
        // Full jitter at 0.5 of the ceilings 100, 200, 250 (capped) ms.
        assert_eq!(
            *c.pauses.lock().unwrap(),
            [50, 100, 125].map(Duration::from_millis)
        );
    }

    #[test]
    fn success_after_retries_returns_the_value() {
        let c = FakeClock::new(0.0);
        let (r, calls, retries) = go(
            Idempotency::Idempotent,
            || status(Code::Unavailable, "AUDIT_UNAVAILABLE"),
            Some(3),
            LONG,
            &c,
        );
        assert_eq!((r.unwrap(), calls, retries), (3, 3, 2));
    }

    #[test]
    fn a_final_failure_is_not_retried() {
        for (code, reason) in [
            (Code::InvalidArgument, "DECRYPTION_FAILED"),
            (Code::ResourceExhausted, "LOCKED_OUT"),
            (Code::ResourceExhausted, "VOLUME_BUDGET_EXCEEDED"),
            (Code::FailedPrecondition, "SUBJECT_SHREDDED"),
            (Code::PermissionDenied, "POLICY_DENIED"),
        ] {
            let c = FakeClock::new(0.5);
            let (r, calls, retries) = go(
                Idempotency::Idempotent,
                || status(code, reason),
                None,
                LONG,
                &c,
            );
            let e = r.unwrap_err();
            assert_eq!((calls, retries, e.attempts()), (1, 0, 1), "{reason}");
            assert!(!e.is_retryable(), "{reason}");
        }
    }

    #[test]
    fn a_call_that_is_not_idempotent_is_retried_only_when_refused_before_work() {
        let c = FakeClock::new(0.5);
        let (r, calls, _) = go(
            Idempotency::NotIdempotent,
            || status(Code::Unavailable, "VAULT_UNAVAILABLE"),
            None,
            LONG,
            &c,
        );
        assert_eq!(calls, 1);
        assert!(
            r.unwrap_err().is_retryable(),
            "retryable, but not retried here"
        );
        let (r, calls, _) = go(
            Idempotency::NotIdempotent,
            || status(Code::ResourceExhausted, "RATE_LIMITED"),
            Some(2),
            LONG,
            &c,
        );
        assert_eq!((r.unwrap(), calls), (2, 2));
    }

    #[test]
    fn no_pause_runs_past_the_deadline() {
        // Ceilings 100, 200, 250 ms at full draw (just under 1): the second pause would end
        // past 250 ms, so two attempts.
        let c = FakeClock::new(0.999_999);
        let (r, calls, retries) = go(
            Idempotency::Idempotent,
            || status(Code::Unavailable, ""),
            None,
            Duration::from_millis(250),
            &c,
        );
        assert_eq!((calls, retries, r.unwrap_err().attempts()), (2, 1, 2));
        assert!(c.now() < Duration::from_millis(250));
    }

    #[test]
    fn a_server_retry_delay_is_the_least_pause() {
        let c = FakeClock::new(0.0);
        let fail = || {
            let mut d =
                ErrorDetails::with_error_info("RATE_LIMITED", "piiguard.dev", HashMap::new());
            d.set_retry_info(Some(Duration::from_millis(700)));
            Status::with_error_details(Code::ResourceExhausted, "slow down", d)
        };
        let (r, calls, _) = go(Idempotency::Idempotent, fail, Some(2), LONG, &c);
        assert_eq!((r.unwrap(), calls), (2, 2));
        assert_eq!(*c.pauses.lock().unwrap(), [Duration::from_millis(700)]);
    }

    #[test]
    fn backoff_stays_within_its_ceiling() {
        let p = policy();
        for attempt in 1..40 {
            let cap = p.ceiling(attempt);
            assert!(cap <= p.max_backoff);
            assert!(cap >= p.base_backoff.min(p.max_backoff));
            for unit in [0.0, 0.25, 0.5, 0.999_999] {
                assert!(p.backoff(attempt, unit) <= cap);
            }
        }
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(2), Duration::from_millis(200));
        assert_eq!(p.ceiling(3), Duration::from_millis(250));
        // The real generator's draws are in [0, 1) and not all alike.
        let t = TokioClock::new();
        let draws: Vec<f64> = (0..100).map(|_| t.unit()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(draws.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn none_never_retries() {
        let p = RetryPolicy::none();
        assert!(!p.should_retry(Idempotency::Idempotent, 1, Code::Unavailable, None));
    }
}
