//! Consistency groups: machines whose recovery points are one cut, so they recover together
//! (`ctl group create G M…`, `ctl protect M… --group G`, `ctl group mark G`, a period).
//!
//! A **cut** places a named point in every member's stream while each member holds its write
//! completions, and releases the holds only once every member has placed its point:
//!
//! ```text
//! core: cut ──MarkRequest{hold_ms}──▶ each member's agent (tap): order lock, point, keep the
//!   ▲                                   lock (no write completes)    │
//!   ├──── MarkDone{seq, Holding} ◀──────────────────────────────────┘
//!   │ all held ⇒ release ──AgentPollReply.release──▶ agent: unlock
//!   └──── MarkDone{Released | TimedOut} ◀──────────┘   all Released ⇒ a group point
//! ```
//!
//! Why that is one cut: say a write b on member B is in B's point and was issued after a
//! write a on member A was acknowledged. If a were not in A's point, A captured it after A's
//! point, so A acknowledged it after A's hold ended, i.e. after every member had placed its
//! point, B's included; b was issued after that, so b follows B's point. Contradiction. A
//! member that releases on its own (`TimedOut`: the configuration node was slow, a poll
//! lost) may have released before another placed its point, so such a cut is discarded; so
//! is one where a member made no point or did not answer within [`CUT_GRACE`]. Each member's
//! point stays in its own journal as an ordinary named point either way.
//!
//! Holds are bounded at the agent ([`CUT_HOLD_MS`]); a group has at most one cut under way.
//! Cuts are in memory (a restarted configuration node drops one under way; its members
//! release on their own); group points are persisted in the group's record.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use haven_cluster::{store::Persist, GroupPoint, GroupRecord, Recovery, GROUP_POINTS_MAX};

use super::{marks::MARK_NAME_MAX, refused, ConfigCore, Outcome};
use crate::proto::{AdminReply, Hold, MarkDone, PointKind, Response};
use crate::view::{EventView, GroupPointView, GroupView};

/// The longest a member holds its write completions for a cut.
pub const CUT_HOLD_MS: u32 = 3_000;
/// A cut not finished this long after the hold bound is abandoned (a member's agent died or
/// cannot reach us).
pub const CUT_GRACE: Duration = Duration::from_secs(10);
/// Outcomes kept for `ctl group mark` to collect.
const OUTCOMES_MAX: usize = 32;
/// Released mark ids kept in members' poll replies after the cut ended (at most this many,
/// for as long as a hold may last), so an agent that missed the reply that ended it still
/// releases at once.
const RELEASED_MAX: usize = 64;
/// Members per group.
pub const GROUP_MEMBERS_MAX: usize = 64;

/// One cut under way.
#[derive(Debug)]
pub(super) struct Cut {
    pub id: u64,
    pub group: String,
    pub name: Option<String>,
    pub started: Instant,
    /// By member: its mark id and what it reported.
    pub members: BTreeMap<String, CutMember>,
    /// Every member placed its point (or the cut failed): the holds are released.
    pub released: bool,
    /// Why the cut failed (it is released and discarded when every member ended).
    pub failed: Option<String>,
}

#[derive(Debug, Default)]
pub(super) struct CutMember {
    pub mark: u64,
    /// Its point's seq and the agent's clock then (unix ms).
    pub point: Option<(u64, u64)>,
    /// How its hold ended.
    pub ended: Option<Hold>,
}

/// Cuts under way, their outcomes, and released holds.
#[derive(Debug, Default)]
pub(super) struct Cuts {
    pub running: BTreeMap<u64, Cut>,
    /// By cut id: the group point, or why there is none.
    pub outcomes: std::collections::VecDeque<(Instant, u64, Result<GroupPointView, String>)>,
    /// (machine, mark id) of holds released by a cut that ended.
    pub released: std::collections::VecDeque<(Instant, String, u64)>,
    pub next_id: u64,
    /// Why each group's last cut failed, until one succeeds.
    pub last_error: BTreeMap<String, String>,
    /// When each group's last cut started (the period counts from it).
    pub last_started: BTreeMap<String, Instant>,
}

/// What a group name may be.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

pub(super) fn point_view(group: &str, p: &GroupPoint) -> GroupPointView {
    GroupPointView {
        group: group.to_string(),
        point: p.id.to_string(),
        id: p.id,
        name: p.name.clone(),
        time_ms: p.time_ms,
        members: p.seqs.clone(),
        pruned: vec![],
    }
}

impl ConfigCore {
    /// `ctl group create G M…`: a new group, or more members for one; `point_every_ms`
    /// (None: unchanged, the default for a new group).
    pub(super) fn group_add(
        &mut self,
        group: &str,
        members: &[String],
        point_every_ms: Option<u64>,
    ) -> Outcome {
        if !valid_name(group) {
            return refused(format!(
                "{group:?} is not a group name: 1 to 64 of letters, digits, '-', '_', '.'"
            ));
        }
        for m in members {
            if !self.machines.contains_key(m) {
                return refused(format!("no machine named {m:?}"));
            }
            if let Some(other) = self.group_of(m).filter(|g| g != group) {
                return refused(format!(
                    "{m} is a member of group {other}; a machine is in one group at most \
                     (`ctl group delete {other}` first)"
                ));
            }
        }
        if let Some(p) = point_every_ms.filter(|&p| p != 0 && p < 1000) {
            return refused(format!(
                "--point-every {p}ms is too short: group points are at least 1s apart"
            ));
        }
        // Changed on a copy: a refusal leaves the group as it was.
        let mut g = self
            .groups
            .get(group)
            .cloned()
            .unwrap_or_else(|| GroupRecord {
                name: group.to_string(),
                point_every_ms: haven_cluster::GROUP_POINT_EVERY_MS,
                next_point: 1,
                ..Default::default()
            });
        for m in members {
            if !g.members.contains(m) {
                g.members.push(m.clone());
            }
        }
        if g.members.len() > GROUP_MEMBERS_MAX {
            return refused(format!(
                "a group has at most {GROUP_MEMBERS_MAX} members ({} asked)",
                g.members.len()
            ));
        }
        if let Some(p) = point_every_ms {
            g.point_every_ms = p;
        }
        self.groups.insert(group.to_string(), g.clone());
        (
            Response::Admin(AdminReply::Groups(vec![self.group_view(group)])),
            vec![Persist::Group(g)],
        )
    }

    /// `ctl group delete G`: its points go; the members stay protected on their own.
    pub(super) fn group_delete(&mut self, now: Instant, group: &str) -> Outcome {
        if self.groups.remove(group).is_none() {
            return refused(format!("no group named {group:?}"));
        }
        let ids: Vec<u64> = self
            .cuts
            .running
            .values()
            .filter(|c| c.group == group)
            .map(|c| c.id)
            .collect();
        for id in ids {
            self.end_cut(now, id, Err("the group was deleted".into()));
        }
        (
            Response::Admin(AdminReply::Done {
                message: format!("group {group} deleted; its members stay protected"),
            }),
            vec![Persist::DeleteGroup(group.to_string())],
        )
    }

    /// A forgotten machine leaves its group.
    pub(super) fn leave_group(&mut self, machine: &str) -> Vec<Persist> {
        let Some(g) = self
            .groups
            .values_mut()
            .find(|g| g.members.iter().any(|m| m == machine))
        else {
            return vec![];
        };
        g.members.retain(|m| m != machine);
        vec![Persist::Group(g.clone())]
    }

    pub(super) fn group_of(&self, machine: &str) -> Option<String> {
        self.groups
            .values()
            .find(|g| g.members.iter().any(|m| m == machine))
            .map(|g| g.name.clone())
    }

    pub(super) fn group_views(&self) -> Vec<GroupView> {
        self.groups.keys().map(|g| self.group_view(g)).collect()
    }

    fn group_view(&self, group: &str) -> GroupView {
        let g = &self.groups[group];
        let states: Vec<(String, &str)> = g
            .members
            .iter()
            .map(|m| {
                let s = self.machines.get(m).map_or("forgotten", |r| {
                    if r.protected {
                        r.recovery.name()
                    } else {
                        "unprotected"
                    }
                });
                (m.clone(), s)
            })
            .collect();
        let state = match states.first() {
            None => "empty".to_string(),
            Some((_, s)) if states.iter().all(|(_, x)| x == s) => s.to_string(),
            Some(_) => format!(
                "mixed: {}",
                states
                    .iter()
                    .map(|(m, s)| format!("{m} {s}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        GroupView {
            name: g.name.clone(),
            members: g.members.clone(),
            state,
            point_every_ms: g.point_every_ms,
            points: g.points.len() as u64,
            latest_point: g.points.last().map(|p| point_view(group, p)),
            cut_in_progress: self
                .cuts
                .running
                .values()
                .find(|c| c.group == group)
                .map(|c| c.id),
            last_error: self.cuts.last_error.get(group).cloned(),
        }
    }

    /// Why a cut of `group` cannot start now (None: it can).
    fn cut_refusal(&self, group: &str) -> Option<String> {
        let Some(g) = self.groups.get(group) else {
            return Some(format!("no group named {group:?}"));
        };
        if g.members.is_empty() {
            return Some(format!("group {group} has no members"));
        }
        if let Some(c) = self.cuts.running.values().find(|c| c.group == group) {
            return Some(format!(
                "group point {} of {group} is being placed; retry once it is done",
                c.id
            ));
        }
        for m in &g.members {
            let Some(r) = self.machines.get(m) else {
                return Some(format!("member {m} was forgotten"));
            };
            if !r.protected {
                return Some(format!("member {m} is not protected"));
            }
            if r.recovery != Recovery::Protected {
                return Some(format!(
                    "member {m} is {}: group points are taken while every member replicates forward",
                    r.recovery.name()
                ));
            }
            match self
                .agent_reports
                .get(m)
                .map(|o| o.report.stats.capture.as_str())
            {
                None => return Some(format!("the agent of member {m} has not reported yet")),
                Some("tap") => {}
                Some(other) => {
                    return Some(format!(
                        "member {m} captures by {}: a group point needs --capture tap (the \
                         tap orders and holds write completions)",
                        if other.is_empty() { "scan" } else { other }
                    ))
                }
            }
        }
        None
    }

    /// Starts a cut of `group`: a held point requested of every member.
    pub(super) fn start_cut(
        &mut self,
        now: Instant,
        group: &str,
        name: Option<String>,
    ) -> Result<u64, String> {
        if let Some(n) = &name {
            if n.is_empty() || n.len() > MARK_NAME_MAX || n.chars().any(char::is_control) {
                return Err(format!(
                    "a point's name is 1 to {MARK_NAME_MAX} bytes without control characters"
                ));
            }
        }
        if let Some(why) = self.cut_refusal(group) {
            return Err(why);
        }
        self.cuts.next_id += 1;
        let id = self.cuts.next_id;
        let point_name = name
            .clone()
            .unwrap_or_else(|| format!("group {group} cut {id}"));
        let members = self.groups[group].members.clone();
        let mut cut = Cut {
            id,
            group: group.to_string(),
            name,
            started: now,
            members: BTreeMap::new(),
            released: false,
            failed: None,
        };
        for m in &members {
            let Some(mark) = self.queue_held_mark(now, m, &point_name, CUT_HOLD_MS) else {
                // Release what was asked already: those members' holds end at once.
                for (m, c) in &cut.members {
                    self.cuts.released.push_back((now, m.clone(), c.mark));
                }
                self.trim_released();
                return Err(format!(
                    "member {m} has {} marks waiting for its agent already; retry once they are done",
                    super::marks::MARKS_PENDING_MAX
                ));
            };
            cut.members.insert(
                m.clone(),
                CutMember {
                    mark,
                    ..Default::default()
                },
            );
        }
        self.cuts.last_started.insert(group.to_string(), now);
        self.cuts.running.insert(id, cut);
        Ok(id)
    }

    /// A member's report of a held mark (`handled`: it was one; the generic mark handling
    /// then skips the release reports).
    pub(super) fn cut_report(&mut self, machine: &str, d: &MarkDone) -> bool {
        let Some(cut) = self
            .cuts
            .running
            .values_mut()
            .find(|c| c.members.get(machine).is_some_and(|m| m.mark == d.request))
        else {
            return false;
        };
        let member = cut.members.get_mut(machine).expect("found above");
        match (d.hold, d.seq, &d.error) {
            (Some(Hold::Holding), Some(_), None) if d.kind == Some(PointKind::NotConsistent) => {
                // Held, but the point is no state the disks had (initial sync, resync): no
                // cut; the holds are released.
                if cut.failed.is_none() {
                    cut.failed = Some(format!(
                        "{machine}'s point is not consistent (an initial sync or a resync is running)"
                    ));
                }
            }
            (Some(Hold::Holding), Some(seq), None) => member.point = Some((seq, d.time_ms)),
            (Some(end @ (Hold::Released | Hold::TimedOut)), _, _) => {
                member.ended = Some(end);
                if end == Hold::TimedOut && cut.failed.is_none() {
                    cut.failed = Some(format!(
                        "{machine} released its hold on its own after {CUT_HOLD_MS} ms, \
                         perhaps before every member had placed its point"
                    ));
                }
            }
            (_, _, e) => {
                // No point: nothing is held there; the others are released.
                member.ended = Some(Hold::Released);
                if cut.failed.is_none() {
                    cut.failed = Some(format!(
                        "{machine} made no point: {}",
                        e.as_deref().unwrap_or("no reason given")
                    ));
                }
            }
        }
        true
    }

    /// Moves cuts on: releases the holds once every member placed its point (or the cut
    /// failed), and ends a cut once every member's hold ended (or after [`CUT_GRACE`]).
    /// Returns the records to persist and whether a release was decided (the agents' long
    /// polls are woken for it).
    pub(super) fn advance_cuts(&mut self, now: Instant) -> (Vec<Persist>, bool) {
        let mut woke = false;
        let mut ended = vec![];
        for cut in self.cuts.running.values_mut() {
            let hold = Duration::from_millis(CUT_HOLD_MS as u64);
            if cut.failed.is_none() && now.duration_since(cut.started) > hold + CUT_GRACE {
                let silent: Vec<&str> = cut
                    .members
                    .iter()
                    .filter(|(_, m)| m.ended.is_none())
                    .map(|(n, _)| n.as_str())
                    .collect();
                cut.failed = Some(format!(
                    "no answer from the agent of {} within {} s",
                    silent.join(", "),
                    (hold + CUT_GRACE).as_secs()
                ));
            }
            if !cut.released
                && (cut.failed.is_some() || cut.members.values().all(|m| m.point.is_some()))
            {
                cut.released = true;
                woke = true;
            }
            let all_ended = cut.members.values().all(|m| m.ended.is_some());
            if all_ended || (cut.failed.is_some() && now.duration_since(cut.started) > hold) {
                ended.push(cut.id);
            }
        }
        let mut persist = vec![];
        for id in ended {
            let cut = &self.cuts.running[&id];
            let outcome = match &cut.failed {
                Some(why) => Err(why.clone()),
                None => Ok(()),
            };
            match outcome {
                Err(why) => self.end_cut(now, id, Err(why)),
                Ok(()) => {
                    let seqs: BTreeMap<String, u64> = cut
                        .members
                        .iter()
                        .map(|(m, c)| (m.clone(), c.point.expect("all placed").0))
                        .collect();
                    let time_ms = cut
                        .members
                        .values()
                        .map(|c| c.point.expect("all placed").1)
                        .max()
                        .unwrap_or(0);
                    let (group, name) = (cut.group.clone(), cut.name.clone());
                    let Some(g) = self.groups.get_mut(&group) else {
                        self.end_cut(now, id, Err("the group was deleted".into()));
                        continue;
                    };
                    let point = GroupPoint {
                        id: g.next_point,
                        name,
                        time_ms,
                        seqs,
                    };
                    g.next_point += 1;
                    if g.points.len() >= GROUP_POINTS_MAX {
                        g.points.remove(0);
                    }
                    g.points.push(point.clone());
                    persist.push(Persist::Group(g.clone()));
                    self.cuts.last_error.remove(&group);
                    self.end_cut(now, id, Ok(point_view(&group, &point)));
                }
            }
        }
        (persist, woke)
    }

    /// Ends cut `id`: every member's hold is released (listed for a while in their poll
    /// replies), its outcome kept for `ctl group mark`, a failure shown and recorded.
    fn end_cut(&mut self, now: Instant, id: u64, outcome: Result<GroupPointView, String>) {
        let Some(cut) = self.cuts.running.remove(&id) else {
            return;
        };
        for (m, c) in &cut.members {
            if c.ended.is_none() {
                self.cuts.released.push_back((now, m.clone(), c.mark));
            }
        }
        self.trim_released();
        if let Err(why) = &outcome {
            self.cuts
                .last_error
                .insert(cut.group.clone(), format!("group point not made: {why}"));
            self.record_event(
                now,
                EventView {
                    kind: "group-point".into(),
                    machine: cut.group.clone(),
                    reason: format!("group {}: point not made: {why}", cut.group),
                    ..Default::default()
                },
            );
        }
        if self.cuts.outcomes.len() == OUTCOMES_MAX {
            self.cuts.outcomes.pop_front();
        }
        self.cuts.outcomes.push_back((now, id, outcome));
    }

    fn trim_released(&mut self) {
        while self.cuts.released.len() > RELEASED_MAX {
            self.cuts.released.pop_front();
        }
    }

    /// The held marks of `machine` whose hold is released.
    pub(super) fn released_for(&mut self, now: Instant, machine: &str) -> Vec<u64> {
        let hold = Duration::from_millis(CUT_HOLD_MS as u64 + 1000);
        self.cuts
            .released
            .retain(|(at, _, _)| now.duration_since(*at) < hold);
        let running = self
            .cuts
            .running
            .values()
            .filter(|c| c.released)
            .filter_map(|c| c.members.get(machine))
            .filter(|m| m.ended.is_none())
            .map(|m| m.mark);
        let ended = self
            .cuts
            .released
            .iter()
            .filter(|(_, m, _)| m == machine)
            .map(|(_, _, id)| *id);
        running.chain(ended).collect()
    }

    /// Periodic group points: a cut of each group whose period is due (a group that cannot
    /// be cut now says why in `last_error`, and is tried again next period).
    pub(super) fn periodic_cuts(&mut self, now: Instant) {
        // The first periodic cut comes one period after this core first sees the group (a
        // new group's members are often still in their initial sync).
        for g in self.groups.keys() {
            if !self.cuts.last_started.contains_key(g) {
                self.cuts.last_started.insert(g.clone(), now);
            }
        }
        let due: Vec<String> = self
            .groups
            .values()
            .filter(|g| g.point_every_ms > 0 && !g.members.is_empty())
            .filter(|g| {
                let last = self.cuts.last_started[&g.name];
                now.duration_since(last) >= Duration::from_millis(g.point_every_ms)
            })
            .map(|g| g.name.clone())
            .collect();
        for g in due {
            if let Err(why) = self.start_cut(now, &g, None) {
                // Counted from now: a failing group is not retried every tick.
                self.cuts.last_started.insert(g.clone(), now);
                self.cuts
                    .last_error
                    .insert(g, format!("periodic group point not taken: {why}"));
            }
        }
    }

    /// `ctl group mark`: answered with the cut's id.
    pub(super) fn request_group_mark(
        &mut self,
        now: Instant,
        group: &str,
        name: Option<String>,
    ) -> Outcome {
        match self.start_cut(now, group, name) {
            Ok(id) => (
                Response::Admin(AdminReply::GroupMarkRequested { id }),
                vec![],
            ),
            Err(why) => refused(why),
        }
    }

    /// `ctl group mark` polling: the group point once every member released; refused when
    /// the cut failed or is unknown.
    pub(super) fn group_mark_state(&self, group: &str, id: u64) -> Outcome {
        if let Some((_, _, outcome)) = self.cuts.outcomes.iter().find(|(_, c, _)| *c == id) {
            return match outcome {
                Ok(v) => (
                    Response::Admin(AdminReply::GroupMarkState {
                        done: Some(v.clone()),
                    }),
                    vec![],
                ),
                Err(why) => refused(format!("group {group}: no group point made: {why}")),
            };
        }
        if self.cuts.running.contains_key(&id) {
            return (
                Response::Admin(AdminReply::GroupMarkState { done: None }),
                vec![],
            );
        }
        refused(format!(
            "group point request {id} of {group} is not known here (the configuration node restarted?)"
        ))
    }
}
