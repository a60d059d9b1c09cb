//! Per-identity limits and lockout, kept in this process's memory.
//!
//! - Call-rate limits and volume budgets (decrypted / detokenised items) over several fixed
//!   windows each, e.g. `["100/1s", "1000000/1d"]`. A window starts at the identity's first
//!   call after the previous one ended. Refused calls and items do not count.
//! - Lockout: `max_failures` denied or failed calls within `window` lock the identity out for
//!   `cooldown`; an admin can list and lift lockouts; a canary can lock at once.
//!
//! With several replicas each counts on its own (limits per replica): see docs/POLICY.md.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub use crate::config::limits::{LimitSet, LimitsConfig, LockoutConfig, Window};

const SHARDS: usize = 16;

/// What was exceeded.
#[derive(Debug, Clone)]
pub struct Exceeded {
    /// `calls` or `revealed_items`.
    pub what: &'static str,
    /// The window that was exceeded.
    pub window: Window,
    /// True for the first refusal in this window (raise the alarm once per window).
    pub first: bool,
}

#[derive(Debug, Clone, Copy)]
struct Counter {
    start: Instant,
    count: u64,
    alarmed: bool,
}

#[derive(Debug)]
struct IdState {
    set: Arc<LimitSet>,
    calls: Vec<Counter>,
    items: Vec<Counter>,
}

fn shard_of(id: &str) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

/// Applies windows: refuses if adding `n` exceeds any, else counts `n` in all.
fn take(
    windows: &[Window],
    counters: &mut Vec<Counter>,
    n: u64,
    now: Instant,
    what: &'static str,
) -> Result<(), Exceeded> {
    if counters.len() != windows.len() {
        *counters = vec![
            Counter {
                start: now,
                count: 0,
                alarmed: false
            };
            windows.len()
        ];
    }
    for (w, c) in windows.iter().zip(counters.iter_mut()) {
        if now.saturating_duration_since(c.start) >= w.len {
            *c = Counter {
                start: now,
                count: 0,
                alarmed: false,
            };
        }
    }
    for (w, c) in windows.iter().zip(counters.iter_mut()) {
        if c.count.saturating_add(n) > w.max {
            let first = !c.alarmed;
            c.alarmed = true;
            return Err(Exceeded {
                what,
                window: *w,
                first,
            });
        }
    }
    for c in counters.iter_mut() {
        c.count += n;
    }
    Ok(())
}

/// Rate limits and volume budgets.
pub struct Limits {
    cfg: LimitsConfig,
    any: bool,
    shards: Vec<Mutex<HashMap<Arc<str>, IdState>>>,
}

impl Limits {
    /// Limits from their configuration, with empty counters.
    pub fn new(cfg: LimitsConfig) -> Self {
        let any = !cfg.default.is_empty() || cfg.overrides.iter().any(|(_, s)| !s.is_empty());
        Self {
            cfg,
            any,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn set_for(&self, id: &str) -> Arc<LimitSet> {
        Arc::new(
            self.cfg
                .overrides
                .iter()
                .find(|(p, _)| p.matches(id))
                .map(|(_, s)| s.clone())
                .unwrap_or_else(|| self.cfg.default.clone()),
        )
    }

    fn with<R>(&self, id: &Arc<str>, f: impl FnOnce(&mut IdState) -> R) -> R {
        let mut g = self.shards[shard_of(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let st = g.entry(id.clone()).or_insert_with(|| IdState {
            set: self.set_for(id),
            calls: Vec::new(),
            items: Vec::new(),
        });
        f(st)
    }

    /// Counts one call of `id`, or refuses it.
    pub fn call(&self, id: &Arc<str>) -> Result<(), Exceeded> {
        if !self.any {
            return Ok(());
        }
        self.with(id, |st| {
            let set = st.set.clone();
            take(&set.calls, &mut st.calls, 1, Instant::now(), "calls")
        })
    }

    /// Counts `n` revealed (decrypted / detokenised) items of `id`, or refuses them all.
    pub fn reveal(&self, id: &Arc<str>, n: u64) -> Result<(), Exceeded> {
        if !self.any || n == 0 {
            return Ok(());
        }
        self.with(id, |st| {
            let set = st.set.clone();
            take(
                &set.revealed_items,
                &mut st.items,
                n,
                Instant::now(),
                "revealed_items",
            )
        })
    }
}

/// A current lockout.
#[derive(Debug, Clone)]
pub struct LockInfo {
    /// The locked-out identity.
    pub identity: Arc<str>,
    /// When the lockout began.
    pub since: SystemTime,
    /// When it ends by itself.
    pub until: SystemTime,
    /// Why (written by piiguard: counts, or the canary touched).
    pub reason: String,
}

#[derive(Debug)]
struct LockState {
    failures: Vec<Instant>,
    locked: Option<(Instant, LockInfo)>,
}

/// Lockouts.
pub struct Lockouts {
    cfg: LockoutConfig,
    map: Mutex<HashMap<Arc<str>, LockState>>,
    /// Number of identities with a lock (possibly expired): the fast path skips the map at 0.
    locked: AtomicUsize,
}

impl Lockouts {
    /// No lockouts yet.
    pub fn new(cfg: LockoutConfig) -> Self {
        Self {
            cfg,
            map: Mutex::new(HashMap::new()),
            locked: AtomicUsize::new(0),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, LockState>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `id` is a configured break-glass identity (may call Admin while locked out).
    pub fn is_break_glass(&self, id: &str) -> bool {
        self.cfg.break_glass.iter().any(|b| b == id)
    }

    /// If `id` is locked out: until when.
    pub fn locked_until(&self, id: &str) -> Option<SystemTime> {
        if self.locked.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut m = self.map();
        let st = m.get_mut(id)?;
        let (until, info) = st.locked.as_ref()?;
        if Instant::now() < *until {
            return Some(info.until);
        }
        st.locked = None;
        self.locked.fetch_sub(1, Ordering::Relaxed);
        None
    }

    /// Counts `n` denied/failed calls or items; returns the lock if this locked `id` out.
    pub fn failures(&self, id: &Arc<str>, n: u32) -> Option<LockInfo> {
        if self.cfg.max_failures == 0 || n == 0 {
            return None;
        }
        let now = Instant::now();
        let mut m = self.map();
        let st = m.entry(id.clone()).or_insert_with(|| LockState {
            failures: Vec::new(),
            locked: None,
        });
        if st.locked.as_ref().is_some_and(|(u, _)| now < *u) {
            return None;
        }
        let window = self.cfg.window;
        st.failures
            .retain(|t| now.saturating_duration_since(*t) < window);
        let room = (self.cfg.max_failures as usize + 1).saturating_sub(st.failures.len());
        st.failures
            .extend(std::iter::repeat_n(now, (n as usize).min(room)));
        if st.failures.len() >= self.cfg.max_failures as usize {
            st.failures.clear();
            let reason = format!(
                "{} denied or failed calls within {}s",
                self.cfg.max_failures,
                window.as_secs()
            );
            let info = self.lock_state(st, id, self.cfg.cooldown, reason, now);
            return Some(info);
        }
        None
    }

    fn lock_state(
        &self,
        st: &mut LockState,
        id: &Arc<str>,
        cooldown: Duration,
        reason: String,
        now: Instant,
    ) -> LockInfo {
        let since = SystemTime::now();
        let info = LockInfo {
            identity: id.clone(),
            since,
            until: since + cooldown,
            reason,
        };
        if st.locked.is_none() {
            self.locked.fetch_add(1, Ordering::Relaxed);
        }
        st.locked = Some((now + cooldown, info.clone()));
        info
    }

    /// Locks `id` out at once (canary access), for the configured cool-down.
    pub fn lock(&self, id: &Arc<str>, reason: String) -> LockInfo {
        let now = Instant::now();
        let mut m = self.map();
        let st = m.entry(id.clone()).or_insert_with(|| LockState {
            failures: Vec::new(),
            locked: None,
        });
        let cooldown = self.cfg.cooldown;
        self.lock_state(st, id, cooldown, reason, now)
    }

    /// Current lockouts.
    pub fn list(&self) -> Vec<LockInfo> {
        let now = Instant::now();
        let mut v: Vec<LockInfo> = self
            .map()
            .values()
            .filter_map(|s| s.locked.as_ref())
            .filter(|(u, _)| now < *u)
            .map(|(_, i)| i.clone())
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }

    /// Lifts the lockout of `id`; returns whether there was one.
    pub fn lift(&self, id: &str) -> bool {
        let mut m = self.map();
        let Some(st) = m.get_mut(id) else {
            return false;
        };
        st.failures.clear();
        let had_lock = st.locked.is_some();
        let was = st.locked.take().is_some_and(|(u, _)| Instant::now() < u);
        // `take` removed the lock, expired or not: the counter counts both.
        if had_lock {
            self.locked.fetch_sub(1, Ordering::Relaxed);
        }
        was
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse() {
        assert_eq!(
            Window::parse("100/1s").unwrap(),
            Window {
                max: 100,
                len: Duration::from_secs(1)
            }
        );
        assert_eq!(Window::parse("1_000_000/1d").unwrap().len.as_secs(), 86_400);
        assert_eq!(Window::parse("5/m").unwrap().len.as_secs(), 60);
        assert_eq!(Window::parse("5/10m").unwrap().describe(), "5/10m");
        for bad in ["", "5", "x/1s", "5/1w", "0/1s", "5/0s"] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_window_applies_and_refusals_do_not_count() {
        let w = [
            Window {
                max: 3,
                len: Duration::from_secs(3600),
            },
            Window {
                max: 5,
                len: Duration::from_secs(86_400),
            },
        ];
        let mut c = Vec::new();
        let t = Instant::now();
        for _ in 0..3 {
            take(&w, &mut c, 1, t, "calls").unwrap();
        }
        let e = take(&w, &mut c, 1, t, "calls").unwrap_err();
        assert!(e.first);
        assert_eq!(e.window.max, 3);
        assert!(!take(&w, &mut c, 1, t, "calls").unwrap_err().first);
        // The hour passes: the first window resets, the day window still counts 3.
        let later = t + Duration::from_secs(3601);
        take(&w, &mut c, 2, later, "calls").unwrap();
        let e = take(&w, &mut c, 1, later, "calls").unwrap_err();
        assert_eq!(e.window.max, 5);
    }

    #[test]
    fn lockout_after_failures_and_lift() {
        let l = Lockouts::new(LockoutConfig {
            max_failures: 3,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(600),
            break_glass: Vec::new(),
        });
        let id: Arc<str> = "spiffe://x".into();
        assert!(l.failures(&id, 2).is_none());
        assert!(l.locked_until(&id).is_none());
        assert!(l.failures(&id, 1).is_some());
        assert!(l.locked_until(&id).is_some());
        assert_eq!(l.list().len(), 1);
        assert!(l.lift(&id));
        assert!(!l.lift(&id));
        assert!(l.locked_until(&id).is_none());
        assert!(l.list().is_empty());
    }
}
