//! A team of threads that runs one planned region together: every thread of candle's barrier
//! pool (its `RAYON_NUM_THREADS` − 1 workers plus the calling thread) executes the same closure,
//! takes its share of each step and meets the others at a spin barrier before the next step —
//! ggml's way of running a graph: one pool hand-off per region instead of one per op, and a
//! barrier that costs ~100 ns between two cores (the threads are busy the whole region, so
//! spinning steals nothing).
//!
//! Work inside a step is split into one contiguous block per thread, each taken through its own
//! cursor (`fetch_add`); a thread done with its block steals from the others'. Each thread so
//! streams one long run of weights (hardware prefetchers follow a stream, and lose it at every
//! jump: handing out units round-robin halved V2-Lite decode), while a thread slowed by the OS
//! still does less and nobody waits long for it. A panic on any thread marks the region
//! poisoned: every barrier then panics too (instead of waiting forever for the dead thread), and
//! the region reports the failure once all threads have left.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Steps of one region that share work through a cursor; a region uses them in order.
pub const MAX_STEPS: usize = 64;

/// One region's shared state.
pub struct Team {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    poisoned: AtomicBool,
    cursors: Vec<AtomicUsize>,
}

/// A thread's handle inside a region.
pub struct Member<'a> {
    team: &'a Team,
    /// 0 is the calling thread (the one that owns the caches and calls candle between regions).
    pub tid: usize,
    step: std::cell::Cell<usize>,
}

impl Team {
    pub fn new() -> Team {
        let threads = crate::parallel::threads();
        Team {
            threads,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
            cursors: (0..MAX_STEPS * threads)
                .map(|_| AtomicUsize::new(0))
                .collect(),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f` on every thread; `Err` when any of them panicked (the message of the first).
    pub fn run<F: Fn(&Member) + Sync>(&mut self, f: F) -> Result<(), String> {
        for c in &self.cursors {
            c.store(0, Ordering::Relaxed);
        }
        self.poisoned.store(false, Ordering::Relaxed);
        self.arrived.store(0, Ordering::Relaxed);
        let team = &*self;
        let message = std::sync::Mutex::new(None::<String>);
        let body = |tid: usize| {
            let member = Member {
                team,
                tid,
                step: std::cell::Cell::new(0),
            };
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(&member))) {
                team.poisoned.store(true, Ordering::Release);
                let text = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a planned step panicked".into());
                let mut m = message.lock().unwrap_or_else(|e| e.into_inner());
                if m.is_none() || text != POISON {
                    m.get_or_insert(text);
                }
            }
        };
        if team.threads == 1 {
            body(0);
        } else {
            let pool = candle_core::utils::barrier_pool();
            let workers = pool.n_workers();
            // The pool calls workers 0..n−1 and the caller n: the caller becomes member 0.
            pool.execute(|id| body(if id == workers { 0 } else { id + 1 }));
        }
        match message.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(m) => Err(m),
            None => Ok(()),
        }
    }
}

impl Default for Team {
    fn default() -> Self {
        Team::new()
    }
}

const POISON: &str = "another thread of the planned step panicked";

impl Member<'_> {
    pub fn threads(&self) -> usize {
        self.team.threads
    }

    /// Wait until every thread of the team has arrived here.
    pub fn barrier(&self) {
        let t = self.team;
        if t.threads == 1 {
            return;
        }
        let gen = t.generation.load(Ordering::Acquire);
        if t.arrived.fetch_add(1, Ordering::AcqRel) + 1 == t.threads {
            t.arrived.store(0, Ordering::Relaxed);
            t.generation.store(gen.wrapping_add(1), Ordering::Release);
        } else {
            while t.generation.load(Ordering::Acquire) == gen {
                if t.poisoned.load(Ordering::Relaxed) {
                    panic!("{POISON}");
                }
                std::hint::spin_loop();
            }
        }
    }

    /// Items 0..n of the next step, shared out `chunk` at a time (this thread's block first,
    /// in order, then what is left of the others'); `f` gets each range this thread takes.
    /// Every thread must call this (with the same n and chunk) for every step, and a
    /// [`barrier`](Self::barrier) must follow before anyone reads the step's output.
    pub fn share(&self, n: usize, chunk: usize, mut f: impl FnMut(std::ops::Range<usize>)) {
        let s = self.step.get();
        self.step.set(s + 1);
        let chunk = chunk.max(1);
        let t = self.team.threads;
        for k in 0..t {
            // Own block first, then what the others have not yet taken of theirs.
            let b = (self.tid + k) % t;
            let (lo, hi) = (n * b / t, n * (b + 1) / t);
            let cursor = &self.team.cursors[s * t + b];
            loop {
                let start = lo + cursor.fetch_add(chunk, Ordering::Relaxed);
                if start >= hi {
                    break;
                }
                f(start..hi.min(start + chunk));
            }
        }
    }

    /// Run `f` on member 0 only (small serial work: norms, routing); the others go on to the
    /// barrier that must follow.
    pub fn leader(&self, f: impl FnOnce()) {
        if self.tid == 0 {
            f();
        }
    }
}

/// A raw pointer to a buffer that the members of a region write in disjoint parts.
#[derive(Clone, Copy)]
pub struct Shared<T>(pub *mut T);
// SAFETY: users write disjoint indices between barriers (each documents its partition) and
// read only after the barrier that follows the writes.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub fn new(v: &mut [T]) -> Self {
        Shared(v.as_mut_ptr())
    }

    /// # Safety
    /// `range` lies inside the buffer and no other thread touches it until the next barrier.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, range: std::ops::Range<usize>) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(range.start), range.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_shared_once_and_barriers_order_them() {
        let mut team = Team::new();
        let mut a = vec![0u32; 1000];
        let mut b = vec![0u32; 1000];
        let (sa, sb) = (Shared::new(&mut a), Shared::new(&mut b));
        team.run(|m| {
            m.share(1000, 7, |r| {
                // SAFETY: each range is handed to one thread.
                for v in unsafe { sa.slice(r.clone()) } {
                    *v += 1;
                }
            });
            m.barrier();
            m.share(1000, 13, |r| {
                for i in r {
                    // SAFETY: b's ranges are disjoint; a is only read after the barrier.
                    unsafe { sb.slice(i..i + 1)[0] = sa.slice(999 - i..1000 - i)[0] * 2 };
                }
            });
            m.barrier();
        })
        .unwrap();
        assert!(a.iter().all(|&v| v == 1));
        assert!(b.iter().all(|&v| v == 2));
    }

    #[test]
    fn a_panic_on_one_thread_is_an_error_not_a_hang() {
        let mut team = Team::new();
        let err = team
            .run(|m| {
                if m.tid == m.threads() - 1 {
                    panic!("bad step");
                }
                m.barrier();
                m.barrier();
            })
            .unwrap_err();
        assert!(err.contains("bad step"), "{err}");
        // The team is usable again afterwards.
        team.run(|m| m.barrier()).unwrap();
    }
}
