//! What the fuzz targets share: an allocator that counts, so that a
//! target can check what one call allocated (the decoders must never
//! allocate in proportion to a length read from their input).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
};

/// The system allocator, counting the bytes asked for (a reallocation
/// counts its new size).
pub struct Counting;

static BYTES: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn note(size: usize) {
    BYTES.fetch_add(size, Relaxed);
    LARGEST.fetch_max(size, Relaxed);
}

// SAFETY: every call is passed on to `System` unchanged.
unsafe impl GlobalAlloc for Counting {
    /// # Safety
    /// As [`GlobalAlloc::alloc`]: the system allocator's contract, unchanged.
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    /// # Safety
    /// As [`GlobalAlloc::alloc_zeroed`]: the system allocator's contract, unchanged.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    /// # Safety
    /// As [`GlobalAlloc::realloc`]: the system allocator's contract, unchanged.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    /// # Safety
    /// As [`GlobalAlloc::dealloc`]: the system allocator's contract, unchanged.
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// What was allocated since the last [`reset`].
#[derive(Clone, Copy, Debug)]
pub struct Allocated {
    /// Bytes asked for in all.
    pub bytes: usize,
    /// The largest single request.
    pub largest: usize,
}

pub fn reset() {
    BYTES.store(0, Relaxed);
    LARGEST.store(0, Relaxed);
}

pub fn allocated() -> Allocated {
    Allocated {
        bytes: BYTES.load(Relaxed),
        largest: LARGEST.load(Relaxed),
    }
}
