//! Buffers of a planned step, allocated once when the plan is made and shared by the threads of
//! a region: each thread writes only the parts its share of a step names, and reads a buffer
//! only after the barrier that follows the writes (the discipline every user states).

use crate::quant::QuantizedActs;
use crate::Kernel;
use std::cell::UnsafeCell;

/// A fixed-length f32 buffer addressed by raw pointer (its Vec is never touched after creation,
/// so no reference to the whole buffer exists while threads write parts of it).
pub struct Buf {
    ptr: *mut f32,
    len: usize,
    _own: Vec<f32>,
}

// SAFETY: access follows the region discipline above.
unsafe impl Send for Buf {}
unsafe impl Sync for Buf {}

impl Buf {
    pub fn new(len: usize) -> Buf {
        let mut own = vec![0f32; len];
        Buf {
            ptr: own.as_mut_ptr(),
            len,
            _own: own,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// # Safety
    /// No thread writes the first `n` values until the next barrier.
    pub unsafe fn read(&self, n: usize) -> &[f32] {
        assert!(n <= self.len, "read of {n} from a buffer of {}", self.len);
        std::slice::from_raw_parts(self.ptr, n)
    }

    /// # Safety
    /// No other thread touches `range` until the next barrier.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn part(&self, range: std::ops::Range<usize>) -> &mut [f32] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "part {range:?} of a buffer of {}",
            self.len
        );
        std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len())
    }
}

/// A value one thread changes while the others wait at a barrier.
pub struct Slot<T>(UnsafeCell<T>);
// SAFETY: as for Buf.
unsafe impl<T: Send> Sync for Slot<T> {}

impl<T> Slot<T> {
    pub fn new(v: T) -> Self {
        Slot(UnsafeCell::new(v))
    }

    /// # Safety
    /// No thread holds a reference from [`get_mut`](Self::get_mut) meanwhile.
    pub unsafe fn get(&self) -> &T {
        &*self.0.get()
    }

    /// # Safety
    /// No other thread holds any reference into the slot meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get_mut(&self) -> &mut T {
        &mut *self.0.get()
    }
}

/// Which activation groups the block-quantised matrices reading a vector want (q8_0's 32,
/// q8_K's 256); decided when the plan is made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Groups {
    pub g32: bool,
    pub g256: bool,
}

impl Groups {
    pub fn with(mut self, group: Option<usize>) -> Groups {
        match group {
            Some(32) => self.g32 = true,
            Some(256) => self.g256 = true,
            _ => {}
        }
        self
    }
}

/// An input vector of the step's projections: its f32 values and their int8 forms.
pub struct Vector {
    pub f: Buf,
    /// Values in use (≤ the buffer's length; expert hidden widths differ).
    len: std::sync::atomic::AtomicUsize,
    q32: Slot<QuantizedActs>,
    q256: Slot<QuantizedActs>,
}

impl Vector {
    pub fn new(len: usize) -> Vector {
        Vector {
            f: Buf::new(len),
            len: len.into(),
            q32: Slot::new(QuantizedActs::default()),
            q256: Slot::new(QuantizedActs::default()),
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// # Safety
    /// As [`Buf::read`].
    pub unsafe fn values(&self) -> &[f32] {
        self.f.read(self.len())
    }

    /// Quantise the first `len` values for the groups asked for.
    ///
    /// # Safety
    /// One thread, while no other reads this vector (between two barriers).
    pub unsafe fn quantize(&self, len: usize, groups: Groups) {
        self.len.store(len, std::sync::atomic::Ordering::Relaxed);
        let x = self.f.read(len);
        if groups.g32 && len % 32 == 0 {
            self.q32.get_mut().quantize_into(x, 1, len, 32);
        }
        if groups.g256 && len % 256 == 0 {
            self.q256.get_mut().quantize_into(x, 1, len, 256);
        }
    }

    /// # Safety
    /// After the barrier that follows [`quantize`](Self::quantize).
    pub unsafe fn acts(&self, group: usize) -> &QuantizedActs {
        if group == 32 {
            self.q32.get()
        } else {
            self.q256.get()
        }
    }
}

/// The kernel the step's quantised products use (chosen once).
pub fn kernel() -> Kernel {
    static K: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *K.get_or_init(Kernel::best)
}
