//! `ctl mark M [--app] [--name NAME]`: an operator-requested recovery point, and the events
//! of app-consistent points (a failed or timed-out freeze gives a crash-consistent point and
//! an event, not an error).
//!
//! ```text
//! ctl ──Mark──▶ core: pending (bounded) ──AgentPollReply.marks──▶ agent (tap): freeze,
//!  │                                                              flush, barrier, thaw
//!  └─MarkState (polls) ◀── done ◀──────── AgentReport.marks_done ◀──┘
//! ```
//! Nothing here is persisted: a mark is a request of the moment. A pending mark the agent
//! has not reported within [`MARK_TTL`] is dropped (the waiting `ctl` gave up by then), and
//! a mark the agent reported stays answerable for [`MARK_TTL`] too.
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{refused, ConfigCore, Outcome};
use crate::proto::{AdminReply, Hold, MarkDone, MarkRequest, Response};
use crate::view::{EventView, MarkView};

/// Marks of one machine waiting for its agent; more are refused.
pub const MARKS_PENDING_MAX: usize = 8;
/// How long a mark waits for the agent, and how long its outcome is kept for `ctl`.
pub const MARK_TTL: Duration = Duration::from_secs(60);
/// Outcomes kept per machine for `ctl mark` to collect.
const MARKS_DONE_MAX: usize = 32;
/// Longest name a mark may carry.
pub const MARK_NAME_MAX: usize = 128;

/// One machine's marks.
#[derive(Default)]
pub(super) struct Marks {
    pending: VecDeque<(Instant, MarkRequest)>,
    /// Outcomes by request id: the point, or why the agent could not make it.
    done: VecDeque<(Instant, u64, Result<MarkView, String>)>,
    /// The newest [`MarkDone::id`] taken (an agent reports an outcome until it sees a reply).
    seen: u64,
}

impl ConfigCore {
    /// `ctl mark`: queued for the machine's agent, answered with its id.
    pub(super) fn request_mark(
        &mut self,
        now: Instant,
        machine: &str,
        app: bool,
        name: Option<String>,
    ) -> Outcome {
        let Some(m) = self.machines.get(machine) else {
            return refused(format!("no machine named {machine:?}"));
        };
        if !m.protected {
            return refused(format!(
                "{machine} is not protected: protect it before marking recovery points"
            ));
        }
        if let Some(n) = &name {
            if n.is_empty() || n.len() > MARK_NAME_MAX || n.chars().any(char::is_control) {
                return refused(format!(
                    "a point's name is 1 to {MARK_NAME_MAX} bytes without control characters"
                ));
            }
        }
        let capture = self
            .agent_reports
            .get(machine)
            .map(|o| o.report.stats.capture.clone());
        match capture.as_deref() {
            None => {
                return refused(format!(
                    "the agent of {machine} has not reported yet; retry once it runs"
                ))
            }
            Some("tap") => {}
            Some(other) => {
                return refused(format!(
                    "ctl mark needs --capture tap: the agent of {machine} captures by {} \
                     (its points are not crash-consistent); restart it with --capture tap",
                    if other.is_empty() { "scan" } else { other }
                ))
            }
        }
        let id = self.next_mark;
        let marks = self.marks.entry(machine.to_string()).or_default();
        marks.expire(now);
        if marks.pending.len() >= MARKS_PENDING_MAX {
            return refused(format!(
                "{MARKS_PENDING_MAX} marks of {machine} already wait for its agent; retry once they are done"
            ));
        }
        self.next_mark += 1;
        marks.pending.push_back((
            now,
            MarkRequest {
                id,
                app,
                name,
                hold_ms: 0,
            },
        ));
        (Response::Admin(AdminReply::MarkRequested { id }), vec![])
    }

    /// A named point for the orchestration (a planned failover's final point), queued like
    /// `ctl mark`; None when the machine's queue is full (the caller asks again later).
    pub(super) fn queue_mark(&mut self, now: Instant, machine: &str, name: &str) -> Option<u64> {
        self.queue_held_mark(now, machine, name, 0)
    }

    /// A named point whose agent then holds write completions up to `hold_ms` (a group cut;
    /// 0: no hold); None when the machine's queue is full.
    pub(super) fn queue_held_mark(
        &mut self,
        now: Instant,
        machine: &str,
        name: &str,
        hold_ms: u32,
    ) -> Option<u64> {
        let id = self.next_mark;
        let marks = self.marks.entry(machine.to_string()).or_default();
        marks.expire(now);
        if marks.pending.len() >= MARKS_PENDING_MAX {
            return None;
        }
        self.next_mark += 1;
        marks.pending.push_back((
            now,
            MarkRequest {
                id,
                app: false,
                name: Some(name.to_string()),
                hold_ms,
            },
        ));
        Some(id)
    }

    /// Where mark `id` of `machine` stands.
    pub(super) fn mark_outcome(&mut self, now: Instant, machine: &str, id: u64) -> MarkOutcome {
        let Some(marks) = self.marks.get_mut(machine) else {
            return MarkOutcome::Unknown;
        };
        marks.expire(now);
        if let Some((_, _, outcome)) = marks.done.iter().find(|(_, r, _)| *r == id) {
            return match outcome {
                Ok(v) => MarkOutcome::Done(v.seq),
                Err(e) => MarkOutcome::Failed(e.clone()),
            };
        }
        if marks.pending.iter().any(|(_, r)| r.id == id) {
            return MarkOutcome::Pending;
        }
        MarkOutcome::Unknown
    }

    /// `ctl mark` polling: the point once the agent reported it; refused when the agent
    /// could not make it, or the mark is unknown (expired).
    pub(super) fn mark_state(&mut self, now: Instant, machine: &str, id: u64) -> Outcome {
        let Some(marks) = self.marks.get_mut(machine) else {
            return refused(format!("no mark {id} of {machine}"));
        };
        marks.expire(now);
        if let Some((_, _, outcome)) = marks.done.iter().find(|(_, r, _)| *r == id) {
            return match outcome {
                Ok(view) => (
                    Response::Admin(AdminReply::MarkState {
                        done: Some(view.clone()),
                    }),
                    vec![],
                ),
                Err(reason) => refused(format!("the agent of {machine} made no point: {reason}")),
            };
        }
        if marks.pending.iter().any(|(_, r)| r.id == id) {
            return (
                Response::Admin(AdminReply::MarkState { done: None }),
                vec![],
            );
        }
        refused(format!(
            "mark {id} of {machine} expired: its agent did not take it within {}s",
            MARK_TTL.as_secs()
        ))
    }

    /// What the agent reports it made: requests completed, events for what went wrong.
    pub(super) fn handle_marks_done(&mut self, now: Instant, machine: &str, done: &[MarkDone]) {
        let generation = self
            .machines
            .get(machine)
            .map(|m| m.generation.0)
            .unwrap_or(0);
        let mut events = vec![];
        // A group cut's reports first (its hold's release is not a new point).
        let seen = self.marks.get(machine).map_or(0, |m| m.seen);
        for d in done.iter().filter(|d| d.id > seen && d.request != 0) {
            self.cut_report(machine, d);
        }
        {
            let marks = self.marks.entry(machine.to_string()).or_default();
            marks.expire(now);
            for d in done {
                if d.id <= marks.seen {
                    continue;
                }
                marks.seen = d.id;
                if matches!(d.hold, Some(Hold::Released | Hold::TimedOut)) {
                    continue;
                }
                let what = match (d.request, &d.name) {
                    (0, _) => "the periodic app-consistent point".to_string(),
                    (_, Some(n)) => format!("point {n:?}"),
                    (_, None) => "the requested point".to_string(),
                };
                let outcome = match (d.seq, d.kind, &d.error) {
                    (Some(seq), Some(kind), None) => Ok(MarkView {
                        machine: machine.to_string(),
                        point: seq.to_string(),
                        seq,
                        kind: kind.as_str().to_string(),
                        name: d.name.clone(),
                        time_ms: d.time_ms,
                        warnings: d.warnings.clone(),
                    }),
                    (_, _, e) => Err(e
                        .clone()
                        .unwrap_or_else(|| "no point was inserted".to_string())),
                };
                for w in &d.warnings {
                    let at = match (d.seq, d.kind) {
                        (Some(seq), Some(kind)) => format!(" ({} point {seq})", kind.as_str()),
                        _ => String::new(),
                    };
                    events.push(EventView {
                        kind: "app-point".into(),
                        machine: machine.to_string(),
                        generation,
                        reason: format!("{what}: {w}{at}"),
                        ..Default::default()
                    });
                }
                if let Err(e) = &outcome {
                    events.push(EventView {
                        kind: "app-point".into(),
                        machine: machine.to_string(),
                        generation,
                        reason: format!("{what} was not made: {e}"),
                        ..Default::default()
                    });
                }
                if d.request != 0 {
                    marks.pending.retain(|(_, r)| r.id != d.request);
                    if marks.done.len() == MARKS_DONE_MAX {
                        marks.done.pop_front();
                    }
                    marks.done.push_back((now, d.request, outcome));
                }
            }
        }
        for e in events {
            self.record_event(now, e);
        }
    }

    /// The marks the agent of `machine` is to make (sent with every poll reply until it
    /// reports them done).
    pub(super) fn pending_marks(&mut self, now: Instant, machine: &str) -> Vec<MarkRequest> {
        let Some(marks) = self.marks.get_mut(machine) else {
            return vec![];
        };
        marks.expire(now);
        marks.pending.iter().map(|(_, r)| r.clone()).collect()
    }

    /// An unprotected (or forgotten) machine's marks are void.
    pub(super) fn drop_marks(&mut self, machine: &str) {
        if let Some(m) = self.marks.get_mut(machine) {
            m.pending.clear();
        }
    }
}

/// Where a mark stands (see [`ConfigCore::mark_outcome`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum MarkOutcome {
    Pending,
    Done(u64),
    Failed(String),
    /// Expired, or never known here (this node restarted since).
    Unknown,
}

impl Marks {
    fn expire(&mut self, now: Instant) {
        let old = |at: &Instant| now.saturating_duration_since(*at) >= MARK_TTL;
        self.pending.retain(|(at, _)| !old(at));
        self.done.retain(|(at, _, _)| !old(at));
    }
}
