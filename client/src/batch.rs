//! Splitting a large batch into server-sized chunks: the server refuses a batch over its
//! `limits.max_batch_items` (INVALID_ARGUMENT `BATCH_TOO_LARGE`, nothing done) and tonic a
//! message over 4 MiB; a chunk stays under both.

use std::ops::Range;

/// The largest chunk: items and encoded bytes (approximately: the sum of the items' sizes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunks {
    /// Items per chunk at most (default 1000; the server's default limit is 10 000).
    pub max_items: usize,
    /// Bytes per chunk at most (default 3 MiB, under tonic's default 4 MiB message limit). A
    /// single item larger than this is a chunk of its own.
    pub max_bytes: usize,
}

impl Default for Chunks {
    fn default() -> Self {
        Chunks {
            max_items: 1000,
            max_bytes: 3 * 1024 * 1024,
        }
    }
}

/// The ranges of consecutive items, in order, that make chunks within `limits`, given each
/// item's size in bytes. Every item is in exactly one range; no range is empty.
pub fn chunks(sizes: impl IntoIterator<Item = usize>, limits: Chunks) -> Vec<Range<usize>> {
    let max_items = limits.max_items.max(1);
    let mut out = Vec::new();
    let (mut start, mut bytes, mut n) = (0usize, 0usize, 0usize);
    for (i, size) in sizes.into_iter().enumerate() {
        if i > start && (i - start >= max_items || bytes.saturating_add(size) > limits.max_bytes) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
        n = i + 1;
    }
    if n > start {
        out.push(start..n);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_item_once_within_the_limits() {
        let limits = Chunks {
            max_items: 3,
            max_bytes: 10,
        };
        let sizes = [4, 4, 4, 1, 1, 1, 1, 20, 2];
        let c = chunks(sizes, limits);
        assert_eq!(c, vec![0..2, 2..5, 5..7, 7..8, 8..9]);
        let covered: Vec<usize> = c.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(covered, (0..sizes.len()).collect::<Vec<_>>());
        for r in &c {
            assert!(r.len() <= 3);
            let b: usize = sizes[r.clone()].iter().sum();
            assert!(b <= 10 || r.len() == 1);
        }
        assert!(chunks([], limits).is_empty());
        assert_eq!(chunks([1; 2500], Chunks::default()).len(), 3);
    }
}
