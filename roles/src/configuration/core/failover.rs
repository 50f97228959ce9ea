//! Failover orchestration (`ctl failover`, `failover-change-point`, `failover-commit`,
//! `failover-cancel`): the persisted [`Recovery`] state of a machine and what the agent and
//! the master target are told, without I/O.
//!
//! ```text
//!              ctl failover M (agent up, --point latest, tap)         agent down / older point
//!  protected ─────────────────────────────────────────▶ quiescing ─────────────┐
//!      ▲          agent: tap read-only, final point (a mark)  │ final point made │
//!      │                                                      ▼                  │
//!      │                               draining: until the MT applied it         │
//!      │                                                      │                  ▼
//!      │ failover-cancel            serving: Assignment.failover = order, the PS is out of
//!      └──────────────────────────── the assignment; the MT fences and serves the point
//!                                    │  failover-change-point: a new order id, same stage
//!                                    ▼  failover-commit (once served)
//!                                failed-over
//! ```
//! The intent is persisted on the machine's record before anyone acts on it, and every
//! process converges on it by polling (the agent's tap turns read-only, the process server
//! drops the machine, the master target fences and serves): a SIGKILL of any process at any
//! moment resumes where it was. Nothing in the path needs the source's site once the point is
//! chosen: an unplanned failover needs only this node and the master target.
use std::time::Instant;

use haven_cluster::{Failback, FailbackStage, Failover, PointSpec, Recovery, ReversePass};
use rand::Rng;

use super::Persist;
use super::{refused, ConfigCore, Outcome};
use crate::proto::{
    AdminReply, FailbackOrder, FailoverOrder, RebaseOrder, Response, ReverseDone, ReverseOrder,
};
use crate::view::{EventView, FailoverView};

/// The name of the final point a planned failover asks the source for.
pub const FINAL_POINT_NAME: &str = "planned failover";

/// How often a reprotected machine's agent takes another (tracked) reverse pass, by default.
pub const REVERSE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl ConfigCore {
    /// `ctl failover M [--point P]`. Idempotent: asking again for the same point answers with
    /// the failover under way.
    pub(super) fn start_failover(
        &mut self,
        now: Instant,
        now_ms: u64,
        machine: &str,
        point: PointSpec,
    ) -> Outcome {
        let Some(m) = self.machines.get(machine) else {
            return refused(format!("no machine named {machine:?}"));
        };
        if let Some(f) = m.recovery.failover() {
            // Asking again shows the failover: for its own point, for `latest` when planned
            // (its final point was the latest), and for `latest` once committed (the point
            // is fixed: `ctl failover M` is how one looks at it).
            let committed = m.recovery.committed();
            if f.point == point || ((f.planned || committed) && point == PointSpec::Latest) {
                return self.failover_reply(now, now_ms, machine);
            }
            if committed {
                return refused(format!(
                    "{machine} is {} at point {}: the point of a committed failover no longer changes",
                    m.recovery.name(),
                    spec_text(&f.point)
                ));
            }
            return refused(format!(
                "{machine} is {} (point {}); change the point with `ctl failover-change-point {machine} --point P`{}",
                m.recovery.name(),
                spec_text(&f.point),
                if matches!(m.recovery, Recovery::FailoverPending(_)) {
                    format!(" or cancel with `ctl failover-cancel {machine}`")
                } else {
                    String::new()
                }
            ));
        }
        if !m.protected {
            return refused(format!(
                "{machine} is not protected: there is no replica to fail over to"
            ));
        }
        let Some(mt) = m.master_target.clone() else {
            return refused(format!("{machine} has no master target yet"));
        };
        if !self.alive(now, &mt) {
            return refused(format!(
                "the master target {mt} of {machine} is not reporting: the failover needs it \
                 (it holds the replica); start it again, then retry"
            ));
        }
        // Planned when the source is up and the newest state is asked for: its tap stops
        // taking writes and puts a final point, applied before the failover (zero loss).
        let source_up = self.agent_alive(now, machine);
        let tap = self
            .agent_reports
            .get(machine)
            .is_some_and(|o| o.report.stats.capture == "tap");
        let planned = source_up && tap && point == PointSpec::Latest;
        let mut f = Failover {
            id: self.rng.gen::<u64>() | 1,
            point: point.clone(),
            planned,
            final_mark: None,
            final_seq: None,
            started_ms: now_ms,
            ordered: !planned,
            reverse: None,
            failback: None,
        };
        let how = if planned {
            "planned: the source's tap stops taking writes; its final point is applied first"
                .to_string()
        } else if source_up && !tap {
            format!(
                "unplanned: the source captures by scan, which cannot hold its writes; failing over to {}",
                spec_text(&point)
            )
        } else if source_up {
            format!(
                "the source is up; its tap stops taking writes; failing over to {}",
                spec_text(&point)
            )
        } else {
            format!(
                "unplanned: the source is not reporting; failing over to {}",
                spec_text(&point)
            )
        };
        if planned {
            f.final_mark = self.final_mark(now, machine);
        }
        self.failed_back.remove(machine);
        let m = self.machines.get_mut(machine).expect("checked above");
        m.recovery = Recovery::FailoverPending(Box::new(f));
        self.recorded(now, now_ms, machine, format!("failover started ({how})"))
    }

    /// `ctl failover-change-point M --point P2`: before commit, the master target serves P2
    /// instead (the writes made through the exports at the earlier point are discarded).
    pub(super) fn failover_change_point(
        &mut self,
        now: Instant,
        now_ms: u64,
        machine: &str,
        point: PointSpec,
    ) -> Outcome {
        let Some(m) = self.machines.get_mut(machine) else {
            return refused(format!("no machine named {machine:?}"));
        };
        let f = match &mut m.recovery {
            Recovery::FailoverPending(f) => f,
            Recovery::FailedOver(_)
            | Recovery::Reprotecting(_)
            | Recovery::Reprotected(_)
            | Recovery::FailingBack(_) => {
                return refused(format!(
                    "the failover of {machine} is committed: its point can no longer change"
                ))
            }
            Recovery::Protected => {
                return refused(format!(
                    "{machine} is not failed over: start with `ctl failover {machine} --point P`"
                ))
            }
        };
        if !f.ordered {
            return refused(format!(
                "the planned failover of {machine} is still waiting for the source's final point; \
                 retry once it is served"
            ));
        }
        if f.point == point {
            return self.failover_reply(now, now_ms, machine);
        }
        let from = spec_text(&f.point);
        f.point = point.clone();
        f.id = self.rng.gen::<u64>() | 1;
        let event = format!(
            "failover point changed from {from} to {}",
            spec_text(&point)
        );
        self.recorded(now, now_ms, machine, event)
    }

    /// `ctl failover-commit M`: fixes the point served (once the master target serves it).
    pub(super) fn failover_commit(&mut self, now: Instant, now_ms: u64, machine: &str) -> Outcome {
        let served = self.failover_report(machine).cloned();
        let Some(m) = self.machines.get_mut(machine) else {
            return refused(format!("no machine named {machine:?}"));
        };
        let f = match &m.recovery {
            Recovery::FailoverPending(f) => f.clone(),
            Recovery::FailedOver(_)
            | Recovery::Reprotecting(_)
            | Recovery::Reprotected(_)
            | Recovery::FailingBack(_) => return self.failover_reply(now, now_ms, machine),
            Recovery::Protected => return refused(format!("{machine} is not failed over")),
        };
        match served {
            Some(r) if r.id == f.id && r.point.is_some() => {}
            _ => {
                return refused(format!(
                    "the master target does not serve the failover of {machine} yet; \
                     `ctl failover {machine}` shows what it waits for"
                ))
            }
        }
        m.recovery = Recovery::FailedOver(Box::new(*f));
        self.recorded(
            now,
            now_ms,
            machine,
            "failover committed: the recovery site runs it".into(),
        )
    }

    /// `ctl failover-cancel M`: back to protected before commit. The replica and its journal
    /// were only read (the exports wrote to an overlay), the source's retained data is
    /// intact: forward replication resumes where it was.
    pub(super) fn failover_cancel(&mut self, now: Instant, now_ms: u64, machine: &str) -> Outcome {
        let Some(m) = self.machines.get_mut(machine) else {
            return refused(format!("no machine named {machine:?}"));
        };
        match &m.recovery {
            Recovery::FailoverPending(_) => {}
            Recovery::FailedOver(_)
            | Recovery::Reprotecting(_)
            | Recovery::Reprotected(_)
            | Recovery::FailingBack(_) => {
                return refused(format!(
                    "the failover of {machine} is committed: reprotect and failback bring it home"
                ))
            }
            Recovery::Protected => {
                return refused(format!("{machine} is not failed over: nothing to cancel"))
            }
        }
        // The view as it stood, then the cancel.
        let mut view = self.failover_view(now, now_ms, machine).unwrap_or_default();
        view.stage = "cancelled".into();
        view.state = Recovery::Protected.name().into();
        view.waiting_for = None;
        let m = self.machines.get_mut(machine).expect("checked above");
        m.recovery = Recovery::Protected;
        let record = m.clone();
        self.version += 1;
        self.failover_event(
            now,
            machine,
            "failover cancelled: the writes made at the recovery site are discarded; forward replication resumes".into(),
        );
        (
            Response::Admin(AdminReply::Failover(Box::new(view))),
            vec![Persist::Machine(record)],
        )
    }

    /// `ctl reprotect M`: once the failover is committed and the original site's agent is
    /// back, it makes its disks equal to the recovery disks, comparing every block's hash with
    /// the master target's and receiving only the blocks that differ (a full hash comparison:
    /// nothing is trusted, nothing identical travels). Again once reprotected: another pass.
    pub(super) fn reprotect(&mut self, now: Instant, now_ms: u64, machine: &str) -> Outcome {
        let Some(m) = self.machines.get(machine) else {
            return refused(format!("no machine named {machine:?}"));
        };
        let f = match &m.recovery {
            Recovery::Protected => {
                return refused(format!("{machine} is not failed over: nothing to reprotect"))
            }
            Recovery::FailoverPending(_) => {
                return refused(format!(
                    "the failover of {machine} is not committed: reprotect rewrites the original disks \
                     to the recovery disks, so fix the point first with `ctl failover-commit {machine}` \
                     (or cancel the failover)"
                ))
            }
            Recovery::Reprotecting(_) => return self.failover_reply(now, now_ms, machine),
            Recovery::FailingBack(_) => {
                return refused(format!(
                    "{machine} is failing back: its final reverse pass is part of it; `ctl failback {machine}` shows it"
                ))
            }
            Recovery::FailedOver(f) | Recovery::Reprotected(f) => f.clone(),
        };
        if let Some(why) = self.reverse_peers_missing(now, m) {
            return refused(why);
        }
        let mut f = f;
        let pass = f.reverse.as_ref().map(|r| r.pass).unwrap_or(0) + 1;
        let done_pass = f.reverse.as_ref().map(|r| r.done_pass).unwrap_or(0);
        f.reverse = Some(ReversePass {
            pass,
            done_pass,
            started_ms: now_ms,
            ..Default::default()
        });
        let m = self.machines.get_mut(machine).expect("checked above");
        m.recovery = Recovery::Reprotecting(f);
        self.recorded(
            now,
            now_ms,
            machine,
            format!(
                "reprotect: pass {pass}: the original disks are compared with the recovery disks block by block; only the blocks that differ travel"
            ),
        )
    }

    /// While reprotected, the agent takes another reverse pass every `reverse_every`
    /// ([`REVERSE_EVERY`] unless `haven node --reverse-every` says otherwise)
    /// once the last is done (when both ends are up): each compares only the blocks the
    /// recovery site wrote since the one before (see `agent/reverse.rs`), so the original
    /// disks follow the recovery disks at a lag of about a period plus a pass, and the
    /// failback's final pass carries only the last seconds of writes.
    pub fn reverse_tick(&mut self, now: Instant, now_ms: u64) -> Vec<Persist> {
        let reprotected: Vec<String> = self
            .machines
            .values()
            .filter(|m| matches!(m.recovery, Recovery::Reprotected(_)))
            .map(|m| m.name.clone())
            .collect();
        self.reverse_due.retain(|m, _| reprotected.contains(m));
        let mut persist = vec![];
        for machine in reprotected {
            let due = *self
                .reverse_due
                .entry(machine.clone())
                .or_insert(now + self.reverse_every);
            let m = &self.machines[&machine];
            if now < due || self.reverse_peers_missing(now, m).is_some() {
                continue;
            }
            let m = self.machines.get_mut(&machine).expect("listed above");
            let Recovery::Reprotected(f) = &mut m.recovery else {
                continue;
            };
            let Some(r) = f.reverse.as_mut().filter(|r| r.done_pass == r.pass) else {
                continue;
            };
            r.pass += 1;
            r.started_ms = now_ms;
            persist.push(Persist::Machine(m.clone()));
            self.reverse_due.insert(machine, now + self.reverse_every);
            self.version += 1;
            self.wake = true;
        }
        persist
    }

    /// The agent's report of a reverse pass.
    pub(super) fn handle_reverse_done(
        &mut self,
        now: Instant,
        machine: &str,
        done: &ReverseDone,
    ) -> Vec<Persist> {
        let Some(m) = self.machines.get_mut(machine) else {
            return vec![];
        };
        let failing_back = matches!(&m.recovery, Recovery::FailingBack(f)
            if f.failback.as_ref().is_some_and(|b| b.stage == FailbackStage::FinalPass));
        let reprotected = matches!(m.recovery, Recovery::Reprotected(_));
        let f = match &mut m.recovery {
            Recovery::Reprotecting(f) | Recovery::Reprotected(f) => f,
            Recovery::FailingBack(f) if failing_back => f,
            _ => return vec![],
        };
        let Some(r) = f.reverse.as_mut() else {
            return vec![];
        };
        if f.id != done.order || r.pass != done.pass || r.done_pass >= done.pass {
            return vec![];
        }
        if let Some(e) = &done.error {
            if r.error.as_ref() == Some(e) {
                return vec![];
            }
            r.error = Some(e.clone());
            let record = m.clone();
            self.failover_event(
                now,
                machine,
                format!(
                    "reprotect pass {} failed (the agent retries): {e}",
                    done.pass
                ),
            );
            return vec![Persist::Machine(record)];
        }
        r.done_pass = done.pass;
        r.bytes_compared = done.bytes_compared;
        r.hash_bytes = done.hash_bytes;
        r.bytes_received = done.bytes_received;
        r.blocks_written = done.blocks_written;
        r.tracked = done.tracked;
        r.error = None;
        if failing_back {
            let b = f.failback.as_mut().expect("checked above");
            b.stage = FailbackStage::Materialising;
            let record = m.clone();
            self.version += 1;
            self.failover_event(
                now,
                machine,
                format!(
                    "failback: the final reverse pass compared {} KiB{} and rewrote {} blocks ({} KiB); the master target makes the replica equal to the recovery disks",
                    done.bytes_compared >> 10,
                    if done.tracked { " (the blocks written since the last pass)" } else { " (every block)" },
                    done.blocks_written,
                    done.bytes_received >> 10
                ),
            );
            return vec![Persist::Machine(record)];
        }
        if reprotected {
            // A periodic pass: its figures are the machine's; no event for each.
            return vec![Persist::Machine(m.clone())];
        }
        let reason = format!(
            "reprotected: pass {} compared {} MiB of the original disks by hash ({} KiB of hashes) and rewrote {} blocks ({} KiB) to the recovery disks' content",
            done.pass,
            done.bytes_compared >> 20,
            done.hash_bytes >> 10,
            done.blocks_written,
            done.bytes_received >> 10
        );
        let f = f.clone();
        m.recovery = Recovery::Reprotected(f);
        let record = m.clone();
        self.failover_event(now, machine, reason);
        vec![Persist::Machine(record)]
    }

    /// What the agent is to do for a reprotect (its poll reply's `reverse`).
    pub(super) fn reverse_order(&self, m: &haven_cluster::MachineRecord) -> Option<ReverseOrder> {
        let f = match &m.recovery {
            Recovery::Reprotecting(f) | Recovery::Reprotected(f) => f,
            Recovery::FailingBack(f)
                if f.failback.as_ref().map(|b| b.stage) == Some(FailbackStage::FinalPass) =>
            {
                f
            }
            _ => return None,
        };
        let r = f.reverse.as_ref().filter(|r| r.pass > r.done_pass)?;
        let mt = self.nodes.get(m.master_target.as_deref()?)?;
        Some(ReverseOrder {
            order: f.id,
            pass: r.pass,
            master_target: (mt.name.clone(), mt.addr.clone()),
        })
    }

    /// `ctl failback M`: once reprotected (the original disks equal the recovery disks), the
    /// machine comes home. The master target quiesces the recovery disks (flush, then
    /// read-only); the agent takes the last differences (a final reverse pass); the master
    /// target makes the replica equal to the recovery disks, journaled and under a new
    /// generation (nothing older is applied after); the agent takes its disks' hashes as the
    /// replica's and drops what it retained; then the machine is protected again, forward,
    /// with no full resync: both sides are identical.
    pub(super) fn failback(&mut self, now: Instant, now_ms: u64, machine: &str) -> Outcome {
        let Some(m) = self.machines.get(machine) else {
            return refused(format!("no machine named {machine:?}"));
        };
        let f = match &m.recovery {
            Recovery::Protected => {
                if let Some(v) = self.failed_back.get(machine) {
                    return (Response::Admin(AdminReply::Failover(Box::new(v.clone()))), vec![]);
                }
                return refused(format!("{machine} is not failed over: nothing to fail back"));
            }
            Recovery::FailoverPending(_) => {
                return refused(format!(
                    "the failover of {machine} is not committed: cancel it with `ctl failover-cancel {machine}` \
                     (forward replication resumes), or commit, reprotect and then fail back"
                ))
            }
            Recovery::FailedOver(_) => {
                return refused(format!(
                    "{machine} is not reprotected: run `ctl reprotect {machine}` first, so that the \
                     original disks hold the recovery disks' content and only the last changes travel"
                ))
            }
            Recovery::Reprotecting(_) => {
                return refused(format!(
                    "the reprotect of {machine} is still running; fail back once it is reprotected"
                ))
            }
            Recovery::FailingBack(_) => return self.failover_reply(now, now_ms, machine),
            Recovery::Reprotected(f) => f.clone(),
        };
        if let Some(why) = self.reverse_peers_missing(now, m) {
            return refused(why);
        }
        let mut f = f;
        let m = self.machines.get_mut(machine).expect("checked above");
        // The new generation fences every stream of before the failback at the master target
        // (its materialisation is applied under it).
        m.generation = haven_cluster::Generation(m.generation.0 + 1);
        m.failbacks += 1;
        f.failback = Some(Failback {
            stage: FailbackStage::Quiescing,
            generation: m.generation.0,
            started_ms: now_ms,
            final_pass: 0,
            materialised_seq: None,
            bytes_compared: 0,
            bytes_written: 0,
        });
        m.recovery = Recovery::FailingBack(f);
        self.failed_back.remove(machine);
        self.recorded(
            now,
            now_ms,
            machine,
            "failback started: the recovery disks are flushed and made read-only".into(),
        )
    }

    /// Why a step that needs both ends of the reverse path (the original site's agent and
    /// the master target serving the recovery disks) cannot run now, if it cannot.
    fn reverse_peers_missing(
        &self,
        now: Instant,
        m: &haven_cluster::MachineRecord,
    ) -> Option<String> {
        let machine = &m.name;
        if !self.agent_alive(now, machine) {
            return Some(format!(
                "the original site's agent for {machine} is not connected: start it again \
                 (same --data-dir; its disks stay read-only), then retry"
            ));
        }
        let mt_alive = m
            .master_target
            .as_deref()
            .is_some_and(|n| self.alive(now, n));
        (!mt_alive).then(|| {
            format!("the master target of {machine} is not reporting: it serves the recovery disks")
        })
    }

    /// After an operator's step changed `machine`'s recovery state: the change is seen by
    /// every held poll, listed as an event, persisted, and answered with the new view.
    fn recorded(&mut self, now: Instant, now_ms: u64, machine: &str, event: String) -> Outcome {
        let record = self.machines[machine].clone();
        self.version += 1;
        self.failover_event(now, machine, event);
        let (reply, _) = self.failover_reply(now, now_ms, machine);
        (reply, vec![Persist::Machine(record)])
    }

    /// Moves failbacks on, step by step, as the master target and the agent report theirs
    /// done (the final reverse pass is taken in [`handle_reverse_done`](Self::handle_reverse_done)).
    fn failback_progress(&mut self, now: Instant) -> Vec<Persist> {
        let going: Vec<String> = self
            .machines
            .values()
            .filter(|m| matches!(m.recovery, Recovery::FailingBack(_)))
            .map(|m| m.name.clone())
            .collect();
        let mut persist = vec![];
        for machine in going {
            let Recovery::FailingBack(mut f) = self.machines[&machine].recovery.clone() else {
                continue;
            };
            let Some(mut b) = f.failback.clone() else {
                continue;
            };
            let report = self
                .failover_report(&machine)
                .filter(|r| r.id == f.id)
                .cloned();
            let reason;
            match b.stage {
                FailbackStage::Quiescing if report.as_ref().is_some_and(|r| r.quiesced) => {
                    let r = f.reverse.get_or_insert_with(Default::default);
                    r.pass += 1;
                    r.started_ms = b.started_ms;
                    r.error = None;
                    b.final_pass = r.pass;
                    b.stage = FailbackStage::FinalPass;
                    reason = format!(
                        "failback: the recovery disks are read-only; the original site takes the last differences (reverse pass {})",
                        b.final_pass
                    );
                }
                FailbackStage::Materialising => {
                    let Some(done) = report
                        .and_then(|r| r.materialised)
                        .filter(|d| d.generation == b.generation)
                    else {
                        continue;
                    };
                    b.materialised_seq = Some(done.applied_seq);
                    b.bytes_compared = done.bytes_compared;
                    b.bytes_written = done.bytes_written;
                    b.stage = FailbackStage::Rebasing;
                    reason = format!(
                        "failback: the replica equals the recovery disks at seq {} ({} MiB compared, {} KiB rewritten); the agent takes its disks as the replica",
                        done.applied_seq,
                        done.bytes_compared >> 20,
                        done.bytes_written >> 10
                    );
                }
                FailbackStage::Rebasing
                    if self
                        .agent_reports
                        .get(&machine)
                        .is_some_and(|o| o.report.rebased == Some(f.id)) =>
                {
                    // Polls carry no wall clock: the view's elapsed time is left to `ctl`.
                    let mut view = self
                        .failover_view(now, b.started_ms, &machine)
                        .unwrap_or_default();
                    view.stage = "failed-back".into();
                    view.state = Recovery::Protected.name().into();
                    view.waiting_for = None;
                    let m = self.machines.get_mut(&machine).expect("listed above");
                    m.recovery = Recovery::Protected;
                    // The forward stream resumes under a generation of its own, newer than
                    // the materialisation's: an order to materialise replayed by a node
                    // from a stale assignment is then refused as stale at the replica.
                    m.generation = haven_cluster::Generation(m.generation.0 + 1);
                    persist.push(Persist::Machine(m.clone()));
                    self.version += 1;
                    self.failed_back.insert(machine.clone(), view);
                    self.failover_event(
                        now,
                        &machine,
                        format!(
                            "failed back: the original disks equal the recovery disks and the replica; forward protection resumes after seq {} with no full resync",
                            b.materialised_seq.unwrap_or(0)
                        ),
                    );
                    continue;
                }
                _ => continue,
            }
            f.failback = Some(b);
            let m = self.machines.get_mut(&machine).expect("listed above");
            m.recovery = Recovery::FailingBack(f);
            persist.push(Persist::Machine(m.clone()));
            self.version += 1;
            self.failover_event(now, &machine, reason);
        }
        persist
    }

    /// What the agent is to do for a failback's last step (its poll reply's `rebase`).
    pub(super) fn rebase_order(m: &haven_cluster::MachineRecord) -> Option<RebaseOrder> {
        let Recovery::FailingBack(f) = &m.recovery else {
            return None;
        };
        let b = f.failback.as_ref()?;
        (b.stage == FailbackStage::Rebasing).then_some(RebaseOrder {
            order: f.id,
            applied_seq: b.materialised_seq?,
        })
    }

    /// Moves planned failovers on: the final point made → its seq; applied at the master
    /// target → the order goes out. A source that stops reporting meanwhile turns the
    /// failover unplanned (to the newest point held). Called on every poll.
    pub(super) fn failover_progress(&mut self, now: Instant) -> Vec<Persist> {
        let waiting: Vec<String> = self
            .machines
            .values()
            .filter(|m| matches!(&m.recovery, Recovery::FailoverPending(f) if !f.ordered))
            .map(|m| m.name.clone())
            .collect();
        let mut persist = vec![];
        // Liveness is judged only once this core has been up for a failure timeout: a
        // restarted configuration node has heard from no agent yet.
        let up_since = *self.up_since.get_or_insert(now);
        let judging = now.duration_since(up_since) >= self.failure_timeout;
        for machine in waiting {
            let Recovery::FailoverPending(mut f) = self.machines[&machine].recovery.clone() else {
                continue;
            };
            let before = f.clone();
            let mut reason = None;
            if f.final_seq.is_none() {
                match f.final_mark.map(|id| self.mark_outcome(now, &machine, id)) {
                    Some(super::marks::MarkOutcome::Done(seq)) => f.final_seq = Some(seq),
                    Some(super::marks::MarkOutcome::Pending) => {}
                    Some(super::marks::MarkOutcome::Failed(e)) => {
                        reason = Some(format!(
                            "the source's final point failed ({e}); asking again"
                        ));
                        f.final_mark = self.final_mark(now, &machine);
                    }
                    // Unknown: this node restarted since (marks live in memory). The tap is
                    // read-only, so a new final point is as good.
                    Some(super::marks::MarkOutcome::Unknown) | None => {
                        f.final_mark = self.final_mark(now, &machine);
                    }
                }
            }
            if judging && !self.agent_alive(now, &machine) && f.final_seq.is_none() {
                f.planned = false;
                f.ordered = true;
                reason = Some(
                    "the source stopped reporting before its final point: failing over unplanned to the latest point held".into(),
                );
            }
            if let Some(seq) = f.final_seq {
                if self.applied_seq(&machine) >= seq {
                    f.point = PointSpec::Seq(seq);
                    f.ordered = true;
                    reason = Some(format!(
                        "the source's final point {seq} is applied: the master target serves it (no write lost)"
                    ));
                }
            }
            if f == before {
                continue;
            }
            let ordered = f.ordered;
            let m = self.machines.get_mut(&machine).expect("listed above");
            m.recovery = Recovery::FailoverPending(f);
            persist.push(Persist::Machine(m.clone()));
            if ordered {
                self.version += 1;
            }
            if let Some(r) = reason {
                self.failover_event(now, &machine, r);
            }
        }
        persist.extend(self.failback_progress(now));
        persist
    }

    /// What the master target is to serve for `m` (the Assignment's `failover`).
    pub(super) fn failover_order(m: &haven_cluster::MachineRecord) -> Option<FailoverOrder> {
        let f = m.recovery.failover()?;
        let committed = m.recovery.committed();
        f.ordered.then(|| FailoverOrder {
            id: f.id,
            point: f.point.clone(),
            committed,
            failback: f.failback.as_ref().map(|b| FailbackOrder {
                materialise: (b.stage >= FailbackStage::Materialising).then_some(b.generation),
            }),
        })
    }

    /// Why the source's tap takes no writes (the agent poll's `read_only`).
    pub(super) fn read_only_reason(m: &haven_cluster::MachineRecord) -> Option<String> {
        m.recovery.failover().map(|_| {
            format!(
                "{} is {} to the recovery site: the original disks take no writes until it is protected from here again",
                m.name,
                m.recovery.name()
            )
        })
    }

    pub(super) fn failover_view(
        &self,
        now: Instant,
        now_ms: u64,
        machine: &str,
    ) -> Option<FailoverView> {
        let m = self.machines.get(machine)?;
        let f = m.recovery.failover()?;
        let report = self.failover_report(machine).filter(|r| r.id == f.id);
        let served = report.is_some_and(|r| r.point.is_some());
        let stage = if let Some(b) = &f.failback {
            b.stage.name()
        } else if !f.ordered && f.final_seq.is_none() {
            "quiescing"
        } else if !f.ordered {
            "draining"
        } else if served {
            "served"
        } else {
            "serving"
        };
        let mt = m.master_target.clone();
        let reversing = matches!(m.recovery, Recovery::Reprotecting(_));
        let agent_note = if self.agent_alive(now, machine) {
            ""
        } else {
            " (it is not reporting)"
        };
        let mt_note = if mt.as_deref().is_some_and(|n| self.alive(now, n)) {
            ""
        } else {
            " (it is not reporting)"
        };
        let waiting_for = match (stage, &f.failback) {
            (_, Some(b)) => Some(match b.stage {
                FailbackStage::Quiescing => format!(
                    "the master target {} to flush the recovery disks and make them read-only{mt_note}",
                    mt.as_deref().unwrap_or("?")
                ),
                FailbackStage::FinalPass => format!(
                    "the original site's agent to take the last differences (reverse pass {}){agent_note}",
                    b.final_pass
                ),
                FailbackStage::Materialising => format!(
                    "the master target {} to make the replica equal to the recovery disks{mt_note}",
                    mt.as_deref().unwrap_or("?")
                ),
                FailbackStage::Rebasing => format!(
                    "the original site's agent to take its disks as the replica (seq {}){agent_note}",
                    b.materialised_seq.unwrap_or(0)
                ),
            }),
            _ if reversing => Some(format!(
                "the original site's agent to compare its disks with the recovery disks{agent_note}"
            )),
            ("quiescing", _) => Some(format!(
                "the source's tap to stop taking writes and make its final point{}",
                if agent_note.is_empty() {
                    ""
                } else {
                    " (the agent is not reporting)"
                }
            )),
            ("draining", _) => Some(format!(
                "the master target to apply the final point {} (applied {})",
                f.final_seq.unwrap_or(0),
                self.applied_seq(machine)
            )),
            ("serving", _) => Some(format!(
                "the master target {} to fence the forward stream and serve the point{mt_note}",
                mt.as_deref().unwrap_or("?"),
            )),
            _ => None,
        };
        Some(FailoverView {
            machine: machine.to_string(),
            state: m.recovery.name().to_string(),
            stage: stage.to_string(),
            planned: f.planned,
            point_asked: spec_text(&f.point),
            point: report.and_then(|r| r.point.clone()),
            disks: report.map(|r| r.disks.clone()).unwrap_or_default(),
            writes: report.map(|r| r.writes).unwrap_or(0),
            waiting_for,
            error: report.and_then(|r| r.error.clone()),
            master_target: mt,
            elapsed_ms: now_ms.saturating_sub(f.started_ms),
            serve_ms: report.filter(|r| r.point.is_some()).map(|r| r.serve_ms),
            reverse: f.reverse.clone(),
            failback: f.failback.clone(),
        })
    }

    /// `ctl failover` polling.
    pub(super) fn failover_reply(&self, now: Instant, now_ms: u64, machine: &str) -> Outcome {
        match self.failover_view(now, now_ms, machine) {
            Some(v) => (Response::Admin(AdminReply::Failover(Box::new(v))), vec![]),
            // Failed back: how the last failback ended, while this node remembers it.
            None => match self.failed_back.get(machine) {
                Some(v) => (
                    Response::Admin(AdminReply::Failover(Box::new(v.clone()))),
                    vec![],
                ),
                None => refused(format!("{machine} is not failed over")),
            },
        }
    }

    /// The failover the machine's master target reports serving.
    fn failover_report(&self, machine: &str) -> Option<&crate::proto::FailoverReport> {
        let mt = self.machines.get(machine)?.master_target.as_deref()?;
        self.node_reports
            .get(mt)?
            .report
            .machines
            .iter()
            .find(|r| r.machine == machine && r.role == haven_cluster::ROLE_MASTER_TARGET)?
            .failover
            .as_ref()
    }

    fn final_mark(&mut self, now: Instant, machine: &str) -> Option<u64> {
        self.queue_mark(now, machine, FINAL_POINT_NAME)
    }

    fn agent_alive(&self, now: Instant, machine: &str) -> bool {
        self.agent_reports
            .get(machine)
            .is_some_and(|o| now.duration_since(o.at) < self.failure_timeout)
    }

    fn failover_event(&mut self, now: Instant, machine: &str, reason: String) {
        let generation = self
            .machines
            .get(machine)
            .map(|m| m.generation.0)
            .unwrap_or(0);
        self.record_event(
            now,
            EventView {
                kind: "recovery".into(),
                machine: machine.to_string(),
                generation,
                reason,
                ..Default::default()
            },
        );
    }
}

/// A point as `--point` takes it.
pub fn spec_text(p: &PointSpec) -> String {
    match p {
        PointSpec::Latest => "latest".into(),
        PointSpec::LatestApp => "latest-app".into(),
        PointSpec::Seq(s) => s.to_string(),
        PointSpec::AtOrBefore { time_ms } => format!("the newest point at or before {time_ms} ms"),
    }
}
