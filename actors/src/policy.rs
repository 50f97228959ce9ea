//! Restart policy as plain data: the restart budget (sliding window) and the per-child
//! exponential backoff.
//!
//! Nothing here knows actix, tokio or a clock: time (`now`) and randomness (`jitter_unit`) are
//! passed in, so the decisions the supervisor takes can be unit-tested exactly, without sleeps.
//! The supervisor actor (`supervisor.rs`) only feeds these structs and executes their verdicts.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Fraction of the base delay added as random jitter (at most), so that children that failed
/// together (e.g. on a shared network partition) do not all restart in lockstep.
pub const JITTER_FRACTION: f64 = 0.25;

/// Exponent cap: `2^31` already overflows any sane backoff, and keeping it small lets the
/// multiplication stay in `u32`.
const MAX_EXPONENT: u32 = 31;

/// What to do about one failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The budget still allows it: restart the child (after its backoff).
    Restart,
    /// More than `max_restarts` restarts within `within`: the supervisor gives up and
    /// escalates to its parent.
    Escalate,
}

/// The restart budget of one supervisor (OTP's "intensity/period"): at most `max_restarts`
/// restarts within any sliding window of length `within`.
///
/// The budget is shared by all children of the supervisor, as in OTP: a group whose members
/// keep failing in turn is as broken as one member failing repeatedly, and the parent should
/// hear about it.
#[derive(Clone, Debug)]
pub struct RestartPolicy {
    max_restarts: u32,
    within: Duration,
    /// Times of the recent failures that counted against the budget, oldest first.
    /// Invariant: `len() <= max_restarts + 1` (bounded memory whatever the failure rate).
    window: VecDeque<Instant>,
}

impl RestartPolicy {
    pub fn new(max_restarts: u32, within: Duration) -> Self {
        let capacity = (max_restarts as usize).saturating_add(1);
        Self {
            max_restarts,
            within,
            window: VecDeque::with_capacity(capacity.min(1024)),
        }
    }

    /// Records one failure at `now` and says whether it may be restarted.
    pub fn handle_failure(&mut self, now: Instant) -> Verdict {
        self.expire(now);
        self.window.push_back(now);
        let verdict = if self.window.len() > self.max_restarts as usize {
            Verdict::Escalate
        } else {
            Verdict::Restart
        };
        // Only reachable if the caller keeps feeding failures after an escalation; keep the
        // bound anyway.
        while self.window.len() > (self.max_restarts as usize).saturating_add(1) {
            self.window.pop_front();
        }
        debug_assert!(self.window.len() <= (self.max_restarts as usize).saturating_add(1));
        verdict
    }

    /// Failures still inside the window as of the last `handle_failure`.
    pub fn failures_in_window(&self) -> usize {
        self.window.len()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&oldest) = self.window.front() {
            // `saturating_duration_since`: a `now` older than a recorded failure (caller
            // mistake) keeps the entry rather than panicking.
            if now.saturating_duration_since(oldest) >= self.within {
                self.window.pop_front();
            } else {
                break;
            }
        }
    }
}

/// Exponential backoff of one child: `min * 2^consecutive`, capped at `max`, plus up to
/// [`JITTER_FRACTION`] of that as jitter. The delay is therefore always within
/// `[min(min, max), max * (1 + JITTER_FRACTION)]`.
///
/// `consecutive` counts failures since the child last ran "long enough": a child that stayed up
/// for longer than `max` is considered healthy again and its next failure restarts quickly.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    consecutive: u32,
    started_at: Option<Instant>,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            consecutive: 0,
            started_at: None,
        }
    }

    /// The child (re)started at `now`.
    pub fn handle_start(&mut self, now: Instant) {
        self.started_at = Some(now);
    }

    /// The child failed at `now`; returns how long to wait before restarting it.
    /// `jitter_unit` is a random number in `[0, 1]` (clamped), drawn by the caller.
    pub fn handle_failure(&mut self, now: Instant, jitter_unit: f64) -> Duration {
        if let Some(started_at) = self.started_at.take() {
            if now.saturating_duration_since(started_at) > self.max {
                self.consecutive = 0;
            }
        }
        let delay = Self::delay(self.min, self.max, self.consecutive, jitter_unit);
        self.consecutive = self.consecutive.saturating_add(1);
        delay
    }

    /// Failures since the child last ran longer than `max`.
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    /// The delay for the `consecutive`-th failure in a row (0-based).
    pub fn delay(min: Duration, max: Duration, consecutive: u32, jitter_unit: f64) -> Duration {
        let factor = 1u32 << consecutive.min(MAX_EXPONENT);
        let base = min.checked_mul(factor).unwrap_or(max).min(max);
        let jitter_unit = if jitter_unit.is_nan() {
            0.0
        } else {
            jitter_unit.clamp(0.0, 1.0)
        };
        base + base.mul_f64(JITTER_FRACTION * jitter_unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn budget_allows_max_restarts_then_escalates() {
        let t0 = Instant::now();
        let mut policy = RestartPolicy::new(3, Duration::from_secs(10));
        assert_eq!(policy.handle_failure(t0), Verdict::Restart);
        assert_eq!(policy.handle_failure(t0 + 1000 * MS), Verdict::Restart);
        assert_eq!(policy.handle_failure(t0 + 2000 * MS), Verdict::Restart);
        assert_eq!(policy.handle_failure(t0 + 3000 * MS), Verdict::Escalate);
    }

    #[test]
    fn budget_window_slides() {
        let t0 = Instant::now();
        let within = Duration::from_secs(10);
        let mut policy = RestartPolicy::new(2, within);
        assert_eq!(policy.handle_failure(t0), Verdict::Restart);
        assert_eq!(policy.handle_failure(t0 + 5000 * MS), Verdict::Restart);
        // The first failure left the window exactly now: only 2 remain counted.
        assert_eq!(policy.handle_failure(t0 + within), Verdict::Restart);
        assert_eq!(policy.failures_in_window(), 2);
        // Three within 10 s again -> escalate.
        assert_eq!(policy.handle_failure(t0 + within + MS), Verdict::Escalate);
    }

    #[test]
    fn budget_failures_spread_out_never_escalate() {
        let t0 = Instant::now();
        let mut policy = RestartPolicy::new(1, Duration::from_secs(1));
        for i in 0..1000u32 {
            assert_eq!(
                policy.handle_failure(t0 + Duration::from_secs(2) * i),
                Verdict::Restart
            );
            assert!(policy.failures_in_window() <= 2);
        }
    }

    #[test]
    fn budget_zero_escalates_on_first_failure() {
        let mut policy = RestartPolicy::new(0, Duration::from_secs(1));
        assert_eq!(policy.handle_failure(Instant::now()), Verdict::Escalate);
    }

    #[test]
    fn budget_window_stays_bounded_after_escalation() {
        let t0 = Instant::now();
        let mut policy = RestartPolicy::new(3, Duration::from_secs(3600));
        for i in 0..100u32 {
            policy.handle_failure(t0 + MS * i);
            assert!(policy.failures_in_window() <= 4);
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let t0 = Instant::now();
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        let delays: Vec<Duration> = (0..7)
            .map(|i| {
                // Each incarnation fails 1 ms after it starts: never "long enough" to reset.
                let start = t0 + MS * (10 * i);
                backoff.handle_start(start);
                backoff.handle_failure(start + MS, 0.0)
            })
            .collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1000, 1000, 1000].map(|ms| ms * MS)
        );
        assert_eq!(backoff.consecutive(), 7);
    }

    #[test]
    fn backoff_jitter_is_bounded_to_a_quarter() {
        let (min, max) = (100 * MS, 1000 * MS);
        assert_eq!(Backoff::delay(min, max, 0, 1.0), 125 * MS);
        assert_eq!(
            Backoff::delay(min, max, 0, 0.5),
            Duration::from_micros(112_500)
        );
        assert_eq!(Backoff::delay(min, max, 10, 1.0), 1250 * MS);
        // Out-of-range randomness is clamped rather than trusted.
        assert_eq!(Backoff::delay(min, max, 10, 7.0), 1250 * MS);
        assert_eq!(Backoff::delay(min, max, 10, -1.0), 1000 * MS);
        assert_eq!(Backoff::delay(min, max, 10, f64::NAN), 1000 * MS);
    }

    #[test]
    fn backoff_never_overflows() {
        let max = Duration::from_secs(5);
        assert_eq!(Backoff::delay(Duration::MAX, max, u32::MAX, 0.0), max);
        assert_eq!(
            Backoff::delay(Duration::from_secs(1), max, u32::MAX, 0.0),
            max
        );
        let mut backoff = Backoff::new(MS, max);
        let t0 = Instant::now();
        for _ in 0..100 {
            assert!(backoff.handle_failure(t0, 1.0) <= max.mul_f64(1.0 + JITTER_FRACTION));
        }
    }

    #[test]
    fn backoff_resets_after_running_longer_than_max() {
        let t0 = Instant::now();
        let (min, max) = (100 * MS, 1000 * MS);
        let mut backoff = Backoff::new(min, max);
        backoff.handle_start(t0);
        assert_eq!(backoff.handle_failure(t0 + MS, 0.0), 100 * MS);
        backoff.handle_start(t0 + 200 * MS);
        assert_eq!(backoff.handle_failure(t0 + 201 * MS, 0.0), 200 * MS);
        // Exactly `max` of uptime is not yet "longer than max".
        backoff.handle_start(t0 + 500 * MS);
        assert_eq!(backoff.handle_failure(t0 + 1500 * MS, 0.0), 400 * MS);
        // Healthy for longer than max: back to the minimum.
        backoff.handle_start(t0 + 2000 * MS);
        assert_eq!(backoff.handle_failure(t0 + 3001 * MS, 0.0), 100 * MS);
        assert_eq!(backoff.consecutive(), 1);
    }
}
