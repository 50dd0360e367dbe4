//! Splitting the host kernels (quantised matmul, few-row matmul, routed experts) over candle's
//! barrier pool — the `RAYON_NUM_THREADS` − 1 worker threads candle's own ops use, plus the
//! calling thread.
//!
//! Only work large enough to pay for waking the workers is split ([`MIN_SPLIT_WORK`] multiply-adds;
//! below it a call runs on the calling thread). A region never nests: candle's pool runs a nested
//! call from one of its workers inline, but a nested call from the calling thread would wait on
//! the pool's lock it already holds, so a thread-local flag makes every kernel called inside a
//! region run serially. Each output is computed by exactly one thread in the same order as
//! serially, so splitting never changes a result bit.

use std::cell::Cell;
use std::ops::Range;

/// Multiply-adds below which a kernel runs serially: at ~10–20 GFLOP/s a split this size saves
/// ~10 µs, several times the pool's hand-off. An estimate, not tuned by a sweep; with it
/// `fathom bench --batch 16 --threads 2` beat `--threads 1` at one and at 16 sequences.
pub const MIN_SPLIT_WORK: usize = 1 << 16;

thread_local! {
    static IN_REGION: Cell<bool> = const { Cell::new(false) };
}

/// Threads a split region uses (1 when candle's pool has no workers).
pub fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Runs `f` over chunks of `0..n_items`, on the pool when `work` (multiply-adds) reaches
/// [`MIN_SPLIT_WORK`] and the pool has workers, else as one call `f(0..n_items)` here.
pub fn for_chunks<F: Fn(Range<usize>) + Sync>(n_items: usize, work: usize, f: F) {
    if n_items == 0 {
        return;
    }
    if n_items == 1 || work < MIN_SPLIT_WORK || IN_REGION.with(Cell::get) || threads() == 1 {
        f(0..n_items);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(n_items, |range| {
        let outer = IN_REGION.with(|r| r.replace(true));
        f(range);
        IN_REGION.with(|r| r.set(outer));
    });
}

/// A raw output pointer shared by the threads of a region, each writing indices no other thread
/// writes.
pub struct SharedOut<T = f32>(pub *mut T);
impl<T> Clone for SharedOut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedOut<T> {}
// SAFETY: threads write disjoint indices (every user documents its partition).
unsafe impl<T> Send for SharedOut<T> {}
unsafe impl<T> Sync for SharedOut<T> {}
impl<T> SharedOut<T> {
    /// # Safety
    /// `i` lies inside the buffer and no other thread touches it during the region.
    pub unsafe fn at(self, i: usize) -> *mut T {
        self.0.add(i)
    }

    /// Elements i..i + len as a slice.
    ///
    /// # Safety
    /// As [`SharedOut::at`], for every element of the range.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, i: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(i), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_item_runs_once_and_nested_regions_run_inline() {
        let seen: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        for_chunks(1000, usize::MAX, |range| {
            for i in range {
                // A nested region (a kernel called inside another's chunk) must not deadlock.
                for_chunks(3, usize::MAX, |inner| {
                    for _ in inner {
                        seen[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 3));
    }
}
