//! A counting global allocator: every thread measures what the code it runs allocates, so the
//! fuzz loop can fail an input whose peak live bytes pass the limit the target sets for it.
//!
//! Counts are per thread (a thread-local `Cell`, which never allocates), so several targets can
//! run at once in one test binary. Memory freed on another thread than it was allocated on
//! only skews that thread's count down, never the peak up. A single request above
//! [`HARD_LIMIT`] is refused outright (the process then aborts on the allocation error): no
//! legitimate input of a fuzz run asks for that much, and serving it could take the machine
//! down before the input is reported.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// No single allocation above this is served.
pub const HARD_LIMIT: usize = 2 << 30;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

/// The allocator; installed as the global one by this crate.
pub struct Counting;

fn add(n: usize) {
    let _ = LIVE.try_with(|live| {
        let v = live.get() + n as i64;
        live.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

fn sub(n: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get() - n as i64));
}

// SAFETY: every call forwards to the system allocator with the caller's layout; the counting
// touches only thread-local cells, which neither allocate nor unwind.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > HARD_LIMIT {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > HARD_LIMIT {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > HARD_LIMIT {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            sub(layout.size());
            add(new_size);
        }
        p
    }
}

/// Starts measuring this thread afresh: the peak becomes what is live from now on.
pub fn reset() {
    let _ = LIVE.try_with(|l| l.set(0));
    let _ = PEAK.try_with(|p| p.set(0));
}

/// The most bytes live at once on this thread since the last [`reset`].
pub fn peak() -> u64 {
    PEAK.try_with(|p| p.get().max(0) as u64).unwrap_or(0)
}
