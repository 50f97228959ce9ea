//! Recovery points the agent makes on request (`ctl mark`, through the poll) and on the
//! machine's app-consistent period: which point to make next, what kind it is, and what is
//! reported back. Plain Rust, no I/O: time is passed in. The tap (`tap.rs`) makes the points,
//! running the freeze and thaw commands of [`super::freeze`].
//!
//! ```text
//! poll reply .marks ──offer──▶ MarkBox ──next(now)──▶ tap: freeze → flush + barrier → thaw
//! app period ─set_app_every──▶    │                              │
//! AgentReport.marks_done ◀─report─┴◀──────────── finish(MarkDone) ┘
//! ```
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::proto::{MarkDone, MarkRequest, PointKind};

/// Requested marks queued at the agent; more wait at the configuration node (which bounds
/// them too).
pub const QUEUE_MAX: usize = 8;
/// Request ids remembered, so a mark still listed in a poll reply is not made twice.
const TAKEN_MAX: usize = 64;
/// Outcomes kept until a poll reply shows the configuration node has them (oldest dropped).
const UNREPORTED_MAX: usize = 32;

/// A point to make now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// The request's id, or 0 for the periodic app-consistent point.
    pub request: u64,
    pub app: bool,
    pub name: Option<String>,
    /// A group cut: hold write completions after the point until released, at most this
    /// long (ms; 0: no hold).
    pub hold_ms: u32,
}

/// The marks of one agent process.
#[derive(Debug, Default)]
pub struct MarkBox {
    queue: VecDeque<MarkRequest>,
    taken: VecDeque<u64>,
    unreported: VecDeque<MarkDone>,
    last_id: u64,
    app_every: Option<Duration>,
    /// When the last app-consistent point was started (the period counts from it).
    last_app: Option<Instant>,
}

impl MarkBox {
    /// A request from a poll reply: queued unless it was seen before. `Err` when the queue is
    /// full (the caller reports it as not made; it is not offered again).
    pub fn offer(&mut self, req: MarkRequest) -> Result<bool, MarkRequest> {
        if !self.take(req.id) {
            return Ok(false);
        }
        if self.queue.len() >= QUEUE_MAX {
            return Err(req);
        }
        self.queue.push_back(req);
        Ok(true)
    }

    /// Remembers request `id` as handled; false if it was already.
    pub fn take(&mut self, id: u64) -> bool {
        if self.taken.contains(&id) {
            return false;
        }
        if self.taken.len() == TAKEN_MAX {
            self.taken.pop_front();
        }
        self.taken.push_back(id);
        true
    }

    /// The machine's app-consistent period (None: off). The first periodic point comes one
    /// period after it is turned on.
    pub fn set_app_every(&mut self, every: Option<Duration>, now: Instant) {
        if every.is_some() && self.app_every.is_none() {
            self.last_app = Some(now);
        }
        self.app_every = every;
    }

    /// The point to make now: a requested one first, else the periodic one when it is due.
    pub fn next(&mut self, now: Instant) -> Option<Job> {
        if let Some(r) = self.queue.pop_front() {
            if r.app {
                self.last_app = Some(now);
            }
            return Some(Job {
                request: r.id,
                app: r.app,
                name: r.name,
                hold_ms: r.hold_ms,
            });
        }
        if self.until_due(now) == Some(Duration::ZERO) {
            self.last_app = Some(now);
            return Some(Job {
                request: 0,
                app: true,
                name: None,
                hold_ms: 0,
            });
        }
        None
    }

    /// How long until the periodic point is due (None: no period, or a request waits).
    pub fn until_due(&self, now: Instant) -> Option<Duration> {
        let every = self.app_every?;
        let last = self.last_app.unwrap_or(now);
        Some((last + every).saturating_duration_since(now))
    }

    /// Whether a requested mark waits.
    pub fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// An outcome to report; its `id` is set here (increasing, and above `now_us`, the
    /// agent's clock in µs, so a restarted agent's ids are newer than its previous run's).
    pub fn finish(&mut self, mut done: MarkDone, now_us: u64) -> u64 {
        self.last_id = self.last_id.max(now_us) + 1;
        done.id = self.last_id;
        if self.unreported.len() == UNREPORTED_MAX {
            self.unreported.pop_front();
        }
        self.unreported.push_back(done);
        self.last_id
    }

    /// What the next report carries.
    pub fn report(&self) -> Vec<MarkDone> {
        self.unreported.iter().cloned().collect()
    }

    /// A poll reply came back for a report that carried outcomes up to `id`.
    pub fn reported(&mut self, id: u64) {
        self.unreported.retain(|d| d.id > id);
    }
}

/// The kind of point a job gives, given how its freeze went (`None`: no freeze was asked
/// for), and the warning to report. A freeze that failed gives a crash-consistent point (or a
/// named one), never no point.
pub fn point_kind(job: &Job, freeze: Option<&Result<(), String>>) -> (PointKind, Option<String>) {
    let crash = if job.name.is_some() {
        PointKind::Named
    } else {
        PointKind::Crash
    };
    match (job.app, freeze) {
        (true, Some(Ok(()))) => (PointKind::App, None),
        (true, Some(Err(e))) => (
            crash,
            Some(format!(
                "freeze failed ({e}); the point is crash-consistent, not app-consistent"
            )),
        ),
        (true, None) => (
            crash,
            Some("the agent has no --freeze-cmd; the point is crash-consistent".into()),
        ),
        (false, _) => (crash, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: u64, app: bool, name: Option<&str>) -> MarkRequest {
        MarkRequest {
            id,
            app,
            name: name.map(String::from),
            hold_ms: 0,
        }
    }

    #[test]
    fn a_request_is_made_once_even_while_it_is_still_listed() {
        let t0 = Instant::now();
        let mut b = MarkBox::default();
        assert_eq!(b.offer(req(7, true, Some("x"))), Ok(true));
        assert_eq!(b.offer(req(7, true, Some("x"))), Ok(false));
        assert_eq!(
            b.next(t0),
            Some(Job {
                request: 7,
                app: true,
                name: Some("x".into()),
                hold_ms: 0,
            })
        );
        // Still in the next poll reply (not reported yet): not made again.
        assert_eq!(b.offer(req(7, true, Some("x"))), Ok(false));
        assert_eq!(b.next(t0), None);
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut b = MarkBox::default();
        for id in 1..=QUEUE_MAX as u64 {
            assert_eq!(b.offer(req(id, false, None)), Ok(true));
        }
        let extra = req(99, false, None);
        assert_eq!(b.offer(extra.clone()), Err(extra.clone()));
        assert!(b.has_queued());
        // Refused once, not offered again.
        b.next(Instant::now());
        assert_eq!(b.offer(extra), Ok(false));
    }

    #[test]
    fn the_periodic_point_comes_every_period_after_it_is_turned_on() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut b = MarkBox::default();
        assert_eq!(b.until_due(t0), None);
        assert_eq!(b.next(t0), None);
        b.set_app_every(Some(2 * s), t0);
        assert_eq!(b.until_due(t0 + s), Some(s));
        assert_eq!(b.next(t0 + s), None);
        let periodic = Job {
            request: 0,
            app: true,
            name: None,
            hold_ms: 0,
        };
        assert_eq!(b.next(t0 + 2 * s), Some(periodic.clone()));
        assert_eq!(b.next(t0 + 3 * s), None);
        // A requested app point restarts the period.
        b.offer(req(1, true, None)).unwrap();
        assert_eq!(b.next(t0 + 3 * s).map(|j| j.request), Some(1));
        assert_eq!(b.next(t0 + 4 * s), None);
        assert_eq!(b.next(t0 + 5 * s), Some(periodic));
        // Turned off: nothing more.
        b.set_app_every(None, t0 + 5 * s);
        assert_eq!(b.next(t0 + 60 * s), None);
    }

    #[test]
    fn outcomes_are_reported_until_a_reply_shows_they_were_taken() {
        let mut b = MarkBox::default();
        let a = b.finish(
            MarkDone {
                request: 1,
                seq: Some(10),
                ..Default::default()
            },
            1_000,
        );
        assert_eq!(a, 1_001);
        // Ids increase even if the clock does not.
        let c = b.finish(
            MarkDone {
                request: 2,
                ..Default::default()
            },
            500,
        );
        assert_eq!(c, 1_002);
        assert_eq!(
            b.report().iter().map(|d| d.request).collect::<Vec<_>>(),
            [1, 2]
        );
        b.reported(a);
        assert_eq!(b.report().iter().map(|d| d.id).collect::<Vec<_>>(), [1_002]);
        for i in 0..(UNREPORTED_MAX as u64 + 5) {
            b.finish(MarkDone::default(), 2_000 + i);
        }
        assert_eq!(b.report().len(), UNREPORTED_MAX);
    }

    #[test]
    fn a_failed_freeze_gives_a_crash_or_named_point_with_a_warning() {
        let app = Job {
            request: 1,
            app: true,
            name: None,
            hold_ms: 0,
        };
        let named_app = Job {
            name: Some("before-upgrade".into()),
            ..app.clone()
        };
        assert_eq!(point_kind(&app, Some(&Ok(()))), (PointKind::App, None));
        assert_eq!(
            point_kind(&named_app, Some(&Ok(()))),
            (PointKind::App, None)
        );
        let failed = Err("exit status 1".to_string());
        let (k, w) = point_kind(&app, Some(&failed));
        assert_eq!(k, PointKind::Crash);
        assert!(w.unwrap().contains("freeze failed (exit status 1)"));
        let (k, w) = point_kind(&named_app, Some(&failed));
        assert_eq!(k, PointKind::Named);
        assert!(w.is_some());
        let (k, w) = point_kind(&app, None);
        assert_eq!(k, PointKind::Crash);
        assert!(w.unwrap().contains("--freeze-cmd"));
        let plain = Job {
            app: false,
            ..named_app
        };
        assert_eq!(point_kind(&plain, None), (PointKind::Named, None));
        let plain = Job {
            name: None,
            ..plain
        };
        assert_eq!(point_kind(&plain, None), (PointKind::Crash, None));
    }
}
