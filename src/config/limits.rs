//! The `[limits]` and `[lockout]` sections: call-rate limits and volume budgets over fixed
//! windows, per identity pattern, and the lockout settings.

use std::time::Duration;

use crate::domain::identity::IdentityPattern;

/// Why a limit text such as `100/1s` is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// Not of the form `N/DURATION`.
    #[error("limit {0:?}: expected N/DURATION such as 100/1s, 5000/1m, 1000000/1d")]
    Syntax(String),
    /// A zero count or length.
    #[error("limit {0:?}: must be positive (omit it for no limit)")]
    Zero(String),
}

/// One window: at most `max` per `len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Most calls or items per window.
    pub max: u64,
    /// Length of the window.
    pub len: Duration,
}

impl Window {
    /// Parses `N/1s`, `N/10m`, `N/1h`, `N/1d` (a unit without a number means 1).
    pub fn parse(s: &str) -> Result<Self, WindowError> {
        let bad = || WindowError::Syntax(s.to_string());
        let (n, d) = s.split_once('/').ok_or_else(bad)?;
        let max: u64 = n.trim().replace('_', "").parse().map_err(|_| bad())?;
        let d = d.trim();
        let unit_at = d.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (num, unit) = d.split_at(unit_at);
        let num: u64 = if num.is_empty() {
            1
        } else {
            num.parse().map_err(|_| bad())?
        };
        let secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        if max == 0 || num == 0 {
            return Err(WindowError::Zero(s.to_string()));
        }
        Ok(Window {
            max,
            len: Duration::from_secs(num * secs),
        })
    }

    /// `N/DURATION` in the shortest unit.
    pub fn describe(&self) -> String {
        let s = self.len.as_secs();
        let d = if s.is_multiple_of(86_400) {
            format!("{}d", s / 86_400)
        } else if s.is_multiple_of(3600) {
            format!("{}h", s / 3600)
        } else if s.is_multiple_of(60) {
            format!("{}m", s / 60)
        } else {
            format!("{s}s")
        };
        format!("{}/{d}", self.max)
    }
}

/// The limits of one identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitSet {
    /// Call-rate windows.
    pub calls: Vec<Window>,
    /// Volume budget windows (revealed items).
    pub revealed_items: Vec<Window>,
}

impl LimitSet {
    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty() && self.revealed_items.is_empty()
    }
}

/// Configured limits: a default and overrides by identity pattern (first match wins).
#[derive(Debug, Clone, Default)]
pub struct LimitsConfig {
    /// Limits of every identity without an override.
    pub default: LimitSet,
    /// Overrides, first match wins.
    pub overrides: Vec<(IdentityPattern, LimitSet)>,
}

/// Lockout settings. `max_failures == 0` disables automatic lockout.
#[derive(Debug, Clone)]
pub struct LockoutConfig {
    /// Failures that lock an identity out (0: off).
    pub max_failures: u32,
    /// Window over which failures count.
    pub window: Duration,
    /// How long a lockout lasts.
    pub cooldown: Duration,
    /// Exact identities that may use the Admin service while locked out (alarmed).
    pub break_glass: Vec<String>,
}
