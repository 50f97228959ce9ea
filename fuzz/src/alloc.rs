//! A global allocator that counts, per thread, what the code under test allocates: the
//! largest single allocation and the peak of live bytes. The decoders run on the calling
//! thread, so per-thread counts are exact for them, and parallel tests do not disturb each
//! other.
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct Tracking;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn on_alloc(size: usize) {
    let _ = ON.try_with(|on| {
        if on.get() {
            LARGEST.with(|l| l.set(l.get().max(size)));
            LIVE.with(|live| {
                let now = live.get().saturating_add(size as isize);
                live.set(now);
                PEAK.with(|p| p.set(p.get().max(now)));
            });
        }
    });
}

fn on_free(size: usize) {
    let _ = ON.try_with(|on| {
        if on.get() {
            LIVE.with(|live| live.set(live.get().saturating_sub(size as isize)));
        }
    });
}

// SAFETY: every call is forwarded to `System` unchanged; the counters are thread-locals with
// const initialisers and no destructors, so touching them never allocates.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            on_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            on_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        on_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            on_free(layout.size());
            on_alloc(new_size);
        }
        p
    }
}

/// What a measured call allocated.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// The largest single allocation (or reallocation), bytes.
    pub largest: usize,
    /// The most bytes live at once, counting only what was allocated during the call.
    pub peak_live: usize,
}

/// Runs `f` and reports what it allocated on this thread.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    LIVE.with(|c| c.set(0));
    PEAK.with(|c| c.set(0));
    LARGEST.with(|c| c.set(0));
    let was = ON.with(|on| on.replace(true));
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ON.with(|on| on.set(self.0));
        }
    }
    let restore = Restore(was);
    let r = f();
    drop(restore);
    let usage = Usage {
        largest: LARGEST.with(|c| c.get()),
        peak_live: PEAK.with(|c| c.get()).max(0) as usize,
    };
    (r, usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_largest_allocation_and_the_peak() {
        let ((), usage) = measure(|| {
            let a = vec![0u8; 3 << 20];
            let b = vec![0u8; 1 << 20];
            drop((a, b));
            let _c = vec![0u8; 2 << 20];
        });
        assert!(
            usage.largest >= 3 << 20 && usage.largest < 4 << 20,
            "{usage:?}"
        );
        assert!(
            usage.peak_live >= 4 << 20 && usage.peak_live < 5 << 20,
            "{usage:?}"
        );
        let ((), quiet) = measure(|| {});
        assert_eq!(quiet.largest, 0);
    }
}
