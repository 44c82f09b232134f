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
/// for on this thread (0 when the allocator is not [`Tracking`]). Calls
/// nest: an enclosing call's measure includes what `f` allocated.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    /// Gives the enclosing measure (if any) back, with ours in it.
    struct Restore(Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            LARGEST.with(|l| l.set(self.0.map(|outer| outer.max(l.get().unwrap_or(0)))));
        }
    }
    let guard = Restore(LARGEST.with(|l| l.replace(Some(0))));
    let result = f();
    let largest = LARGEST.with(|l| l.get()).unwrap_or(0);
    drop(guard);
    (result, largest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_nest() {
        let ((inner, after), outer) = measure(|| {
            let big = vec![1u8; 3 << 20];
            let (small, inner) = measure(|| vec![2u8; 1 << 10].len());
            assert_eq!(small, 1 << 10);
            // Still measuring for the enclosing call.
            let after = measure(|| ()).1;
            drop(big);
            (inner, after)
        });
        assert_eq!((inner, after), (1 << 10, 0));
        assert_eq!(outer, 3 << 20);
        assert_eq!(LARGEST.with(|l| l.get()), None);
    }
}
