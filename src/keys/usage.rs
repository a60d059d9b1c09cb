//! Durable DEK usage limits (docs/KEYS.md#usage-limits): what a block of encryptions reserved
//! in the store grants, and when a DEK version must be rotated. Pure arithmetic; the
//! reservations themselves are `Store::reserve_dek_uses`, made by the key manager.
//!
//! Every replica reserves encryptions of a DEK version in blocks, one store round trip each
//! (an upsert that adds the block and returns the new total). The total is the system-wide
//! count of encryptions that may have been made: a block a process did not finish (it
//! stopped, or the entry left its cache) stays counted. So the count never undercounts,
//! across restarts and replicas, and the version is rotated once the total reaches
//! `max_dek_uses`.

use std::time::Duration;

/// A keyspace's limits on one DEK version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UseLimits {
    /// Encryptions one DEK version may make (`keyspaces.<name>.max_dek_uses`).
    pub max_uses: u64,
    /// Encryptions reserved per store round trip (`keyspaces.<name>.dek_use_block`).
    pub block: u64,
    /// Age from the first reserved use after which the version is rotated.
    pub max_age: Option<Duration>,
}

impl UseLimits {
    /// How many of a block of `block` uses, after which the store's total is `total`, may be
    /// used: the part below `max_uses`.
    pub fn granted(&self, total: u64, block: u64) -> u64 {
        let before = total.saturating_sub(block);
        block.min(self.max_uses.saturating_sub(before))
    }

    /// Whether a version whose first block was reserved at `first_at` is past its age limit.
    pub fn too_old(&self, first_at: i64, now: i64) -> bool {
        self.max_age
            .is_some_and(|a| now.saturating_sub(first_at) >= a.as_secs() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_grants_only_what_is_below_the_limit() {
        let l = UseLimits {
            max_uses: 50,
            block: 10,
            max_age: None,
        };
        assert_eq!(l.granted(10, 10), 10);
        assert_eq!(l.granted(50, 10), 10);
        // Two replicas raced past the limit: the later block gets the remainder, then nothing.
        assert_eq!(l.granted(55, 10), 5);
        assert_eq!(l.granted(65, 10), 0);
        assert_eq!(l.granted(u64::MAX, 10), 0);
    }

    #[test]
    fn age_counts_from_the_first_block() {
        let l = UseLimits {
            max_uses: 1,
            block: 1,
            max_age: Some(Duration::from_secs(60)),
        };
        assert!(!l.too_old(100, 159));
        assert!(l.too_old(100, 160));
        let none = UseLimits { max_age: None, ..l };
        assert!(!none.too_old(0, i64::MAX));
    }
}
