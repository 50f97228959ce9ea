//! Scale-out decisions of the configuration core: live moves, process-server failover,
//! draining and automatic rebalancing. Plain Rust, no I/O, time passed in.
//!
//! Every decision writes a new assignment with a higher generation; the master target fences
//! older generations once a newer one has delivered, so a failed process server that comes
//! back cannot ship stale data.
//!
//! Rebalancing policy (why it cannot flap):
//! - load is the number of machines against `--capacity`; a move goes from the node with the
//!   least headroom to the one with the most, and only while their headroom differs by at
//!   least `skew_threshold` (2 by default), so a move can never make the reverse move
//!   worthwhile (it narrows the gap by exactly 2);
//! - a machine that moved for any reason (operator, failover, drain, rebalance) is left alone
//!   by the rebalancer for `cooldown`;
//! - the rebalancer never reverses a move (Y→X right after X→Y) within `cooldown`, and sends
//!   nothing to a process server that failed until it has been up for `cooldown` (a flapping
//!   server would otherwise pull machines back each time it reappears);
//! - at most `max_moves_per_minute` rebalancing moves; failover and drain are not limited
//!   (they restore service rather than optimise it).
use std::time::{Duration, Instant};

use haven_cluster::{placement, Generation, ROLE_PROCESS};

use super::{ConfigCore, Persist};
use crate::view::EventView;

#[derive(Clone, Debug)]
pub struct RebalancePolicy {
    pub auto: bool,
    pub skew_threshold: u32,
    pub max_moves_per_minute: u32,
    pub cooldown: Duration,
}

impl Default for RebalancePolicy {
    fn default() -> Self {
        Self {
            auto: true,
            skew_threshold: 2,
            max_moves_per_minute: 10,
            cooldown: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Event {
    pub at: Instant,
    pub view: EventView,
}

/// Events kept for `ctl events`.
pub const EVENTS_MAX: usize = 1000;

impl ConfigCore {
    pub(super) fn record_event(&mut self, now: Instant, view: EventView) {
        if self.events.len() == EVENTS_MAX {
            self.events.pop_front();
        }
        tracing::info!(kind = %view.kind, machine = %view.machine, from = ?view.from, to = ?view.to, generation = view.generation, "{}", view.reason);
        self.events.push_back(Event { at: now, view });
    }

    pub(super) fn event_views(&self, now: Instant) -> Vec<EventView> {
        self.events
            .iter()
            .map(|e| EventView {
                age_ms: now.duration_since(e.at).as_millis() as u64,
                ..e.view.clone()
            })
            .collect()
    }

    /// The agent reported what its move to `generation` cost: attach it to the event.
    pub(super) fn record_move_figures(&mut self, machine: &str, stats: &crate::proto::MoveStats) {
        if let Some(e) = self
            .events
            .iter_mut()
            .rev()
            .find(|e| e.view.machine == machine && e.view.generation == stats.generation)
        {
            if e.view.pause_ms.is_none() {
                e.view.pause_ms = Some(stats.pause_ms);
                e.view.bytes_resent = Some(stats.bytes_resent);
            }
        }
    }

    /// Machines placed on `node` as process server (a failed-over machine sends nothing
    /// through it, so it is neither load nor moved).
    pub(super) fn machines_on(&self, node: &str) -> Vec<String> {
        self.machines
            .values()
            .filter(|m| m.protected && m.process_server.as_deref() == Some(node))
            .filter(|m| m.recovery.failover().is_none())
            .map(|m| m.name.clone())
            .collect()
    }

    /// The process server `machine` should go to, other than `exclude`: one at the
    /// machine's site when one is live (its data should not cross sites twice), else any.
    fn pick_process_server(
        &self,
        now: Instant,
        machine: &str,
        exclude: Option<&str>,
    ) -> Option<String> {
        let site = self
            .machines
            .get(machine)
            .map(|m| m.site.as_str())
            .unwrap_or(haven_cluster::DEFAULT_SITE);
        let cands: Vec<placement::Candidate> = self
            .nodes
            .values()
            .filter(|n| n.has_role(ROLE_PROCESS) && Some(n.name.as_str()) != exclude)
            .map(|n| placement::Candidate {
                node: n,
                machines: self.machines_on(&n.name).len() as u32,
                alive: self.alive(now, &n.name),
            })
            .collect();
        placement::pick_preferring(&cands, placement::process_server_site(site))
            .map(|n| n.name.clone())
    }

    /// Reassigns `machine` to process server `to` with the next generation.
    pub(super) fn reassign(
        &mut self,
        now: Instant,
        machine: &str,
        to: &str,
        kind: &str,
        reason: String,
    ) -> Result<(Persist, EventView), String> {
        let m = self
            .machines
            .get_mut(machine)
            .ok_or_else(|| format!("no machine named {machine:?}"))?;
        if !m.protected {
            return Err(format!("{machine} is not protected"));
        }
        if m.recovery.failover().is_some() {
            return Err(format!(
                "{machine} is {}: it has no forward stream to move",
                m.recovery.name()
            ));
        }
        let from = m.process_server.clone();
        if from.as_deref() == Some(to) {
            return Err(format!("{machine} is already on {to}"));
        }
        m.generation = Generation(m.generation.0 + 1);
        m.process_server = Some(to.to_string());
        let view = EventView {
            age_ms: 0,
            kind: kind.into(),
            machine: machine.into(),
            from,
            to: Some(to.into()),
            generation: m.generation.0,
            reason,
            pause_ms: None,
            bytes_resent: None,
        };
        let persist = Persist::Machine(m.clone());
        self.version += 1;
        self.last_rebalanced.insert(machine.to_string(), now);
        // Only balancing decisions are not to be reversed; forced moves (failover, drain) and
        // the operator's are not balancing decisions.
        if let (Some(from), "rebalance") = (&view.from, kind) {
            self.recent_pairs
                .push_back((now, from.clone(), to.to_string()));
        }
        self.record_event(now, view.clone());
        Ok((persist, view))
    }

    /// `ctl move M --to NODE`.
    pub(super) fn handle_move(
        &mut self,
        now: Instant,
        machine: &str,
        to: &str,
    ) -> Result<(Persist, EventView), String> {
        let node = self
            .nodes
            .get(to)
            .ok_or_else(|| format!("no node named {to:?}"))?;
        if !node.has_role(ROLE_PROCESS) {
            return Err(format!("{to} is not a process server"));
        }
        if node.drained {
            return Err(format!("{to} is drained; undrain it first"));
        }
        if !self.alive(now, to) {
            return Err(format!("{to} is not reporting"));
        }
        self.reassign(now, machine, to, "move", "operator request".into())
    }

    /// Periodic work: failover of silent process servers, draining, automatic rebalancing.
    pub fn handle_tick(&mut self, now: Instant) -> Vec<Persist> {
        let up_since = *self.up_since.get_or_insert(now);
        let mut persist = vec![];
        // Nodes had a full failure timeout to report since we started before we judge them.
        if now.duration_since(up_since) >= self.failure_timeout {
            persist.extend(self.failover(now));
        }
        persist.extend(self.drain_pass(now));
        if self.policy.auto {
            persist.extend(self.rebalance_pass(now).into_iter().map(|(p, _)| p));
        }
        self.periodic_cuts(now);
        let (p, woke) = self.advance_cuts(now);
        persist.extend(p);
        self.wake |= woke;
        persist
    }

    fn failover(&mut self, now: Instant) -> Vec<Persist> {
        let dead: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.has_role(ROLE_PROCESS) && !self.alive(now, &n.name))
            .map(|n| n.name.clone())
            .collect();
        let mut persist = vec![];
        for node in dead {
            let machines = self.machines_on(&node);
            if !machines.is_empty() {
                self.last_failed.insert(node.clone(), now);
            }
            for machine in machines {
                let Some(to) = self.pick_process_server(now, &machine, Some(&node)) else {
                    continue; // nowhere to go; the machine shows as degraded
                };
                let secs = self.failure_timeout.as_secs_f64();
                if let Ok((p, _)) = self.reassign(
                    now,
                    &machine,
                    &to,
                    "failover",
                    format!("process server {node} silent for more than {secs:.0}s"),
                ) {
                    persist.push(p);
                }
            }
        }
        persist
    }

    fn drain_pass(&mut self, now: Instant) -> Vec<Persist> {
        let drained: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.drained && n.has_role(ROLE_PROCESS))
            .map(|n| n.name.clone())
            .collect();
        let mut persist = vec![];
        for node in drained {
            for machine in self.machines_on(&node) {
                let Some(to) = self.pick_process_server(now, &machine, Some(&node)) else {
                    continue;
                };
                if let Ok((p, _)) =
                    self.reassign(now, &machine, &to, "drain", format!("{node} is drained"))
                {
                    persist.push(p);
                }
            }
        }
        persist
    }

    /// Moves machines from the fullest to the emptiest live process server while their
    /// headroom differs by at least the threshold, within the move budget.
    pub(super) fn rebalance_pass(&mut self, now: Instant) -> Vec<(Persist, EventView)> {
        while self
            .recent_moves
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            self.recent_moves.pop_front();
        }
        let cooldown = self.policy.cooldown;
        while self
            .recent_pairs
            .front()
            .is_some_and(|(t, ..)| now.duration_since(*t) >= cooldown)
        {
            self.recent_pairs.pop_front();
        }
        // A process server that failed is quarantined until it has been up for a cooldown.
        let stable = |core: &ConfigCore, n: &str| {
            core.alive_since
                .get(n)
                .is_some_and(|t| now.duration_since(*t) >= cooldown)
        };
        let recovered: Vec<String> = self
            .last_failed
            .keys()
            .filter(|n| stable(self, n))
            .cloned()
            .collect();
        for n in recovered {
            self.last_failed.remove(&n);
        }
        let mut out = vec![];
        // Within each site only: a machine's data should not cross sites to reach its
        // process server.
        let sites: std::collections::BTreeSet<String> = self
            .nodes
            .values()
            .filter(|n| n.has_role(ROLE_PROCESS))
            .map(|n| n.site.clone())
            .collect();
        for site in sites {
            self.rebalance_site(now, &site, &mut out);
        }
        out
    }

    fn rebalance_site(&mut self, now: Instant, site: &str, out: &mut Vec<(Persist, EventView)>) {
        let cooldown = self.policy.cooldown;
        loop {
            if self.recent_moves.len() >= self.policy.max_moves_per_minute as usize {
                break;
            }
            let mut loads: Vec<(String, i64)> = self
                .nodes
                .values()
                .filter(|n| n.site == site)
                .filter(|n| n.has_role(ROLE_PROCESS) && !n.drained && self.alive(now, &n.name))
                .filter(|n| !self.last_failed.contains_key(&n.name))
                .map(|n| {
                    (
                        n.name.clone(),
                        n.capacity as i64 - self.machines_on(&n.name).len() as i64,
                    )
                })
                .collect();
            if loads.len() < 2 {
                break;
            }
            loads.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
            let (full, full_headroom) = loads.first().cloned().expect("two or more");
            let (empty, empty_headroom) = loads.last().cloned().expect("two or more");
            if empty_headroom - full_headroom < self.policy.skew_threshold as i64 {
                break;
            }
            if self
                .recent_pairs
                .iter()
                .any(|(_, from, to)| *from == empty && *to == full)
            {
                break; // that would undo a recent move
            }
            let candidate = self.machines_on(&full).into_iter().find(|m| {
                self.last_rebalanced
                    .get(m)
                    .is_none_or(|t| now.duration_since(*t) >= cooldown)
            });
            let Some(machine) = candidate else { break };
            let reason = format!(
                "rebalance: {full} has {full_headroom} headroom, {empty} has {empty_headroom}"
            );
            match self.reassign(now, &machine, &empty, "rebalance", reason) {
                Ok(x) => {
                    self.recent_moves.push_back(now);
                    self.last_rebalanced.insert(machine, now);
                    out.push(x);
                }
                Err(_) => break,
            }
        }
    }
}
