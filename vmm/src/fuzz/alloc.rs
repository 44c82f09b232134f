//! The largest single allocation a fuzz input causes.
//!
//! [`Tracking`] is the global allocator of the `pmivmm` binary and of the
//! unit tests: it forwards to the system allocator and, only on a thread
//! that armed it with [`measure`], remembers the largest request. Unarmed,
//! it costs one thread-local read per allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// `None`: not measuring; `Some(n)`: the largest request so far.
    static LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The system allocator, measuring on armed threads.
pub struct Tracking;

fn note(size: usize) {
    // try_with: allocations during thread teardown find no thread-local.
    let _ = LARGEST.try_with(|l| {
        if let Some(largest) = l.get() {
            l.set(Some(largest.max(size)));
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments, so
// `System`'s guarantees hold; `note` does not allocate.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` (every allocation goes through it).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as in `dealloc`; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` and returns its result with the largest allocation it asked
/// for on this thread (0 when the allocator is not [`Tracking`]).
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    struct Disarm;
    impl Drop for Disarm {
        fn drop(&mut self) {
            LARGEST.with(|l| l.set(None));
        }
    }
    LARGEST.with(|l| l.set(Some(0)));
    let guard = Disarm;
    let result = f();
    let largest = LARGEST.with(|l| l.get()).unwrap_or(0);
    drop(guard);
    (result, largest)
}
