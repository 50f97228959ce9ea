//! Bounded polls.

use std::time::{Duration, Instant};

/// Calls `f` every `every` until it returns Some; None once `timeout` has passed since the
/// first call (`f` is called at least once).
pub fn poll<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Polls `f` every 50 ms until it returns Some, or panics after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll(timeout, Duration::from_millis(50), f)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}
