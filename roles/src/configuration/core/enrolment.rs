//! Who may enrol what, and which agent speaks for a machine. Part of the configuration core:
//! plain Rust, no I/O, time passed in.
//!
//! - **Tokens.** `agent` tokens enrol agents only, `node` tokens server nodes only (every
//!   protected machine holds an agent token, so it must never enrol a process server that the
//!   rebalancer would hand other machines' data and keys). Only the SHA-256 of a secret is
//!   recorded; a token may expire (`--ttl`) and be revoked. A refused join changes nothing.
//! - **Machine identity.** A machine name is enrolled once: a second agent claiming it (a
//!   clone with the same host name) is refused at join. The enrolment id in the agent's
//!   certificate binds it to that enrolment, so after `ctl forget` the old certificate speaks
//!   for nothing. Two agent processes reporting at once for one machine (a clone of its whole
//!   data dir) are shown as a conflict that blocks the machine until one stops.
//! - **Disk inventory.** The agent reports its disks' protected geometry and identity; a
//!   grown disk is recorded with an event (the stream grows the replica in seq order).
//! - **Forget.** An unprotected machine's record is removed; the nodes that held its replica
//!   and cache are told (a retirement) until they confirm.
use std::time::Instant;

use haven_cluster::{DiskInfo, Epoch, MachineRecord, RetiredRecord, TokenRecord};
use haven_transport::identity::{secret_digest, token_id, TokenKind};
use rand::Rng;

use super::{refused, valid_name, ConfigCore, Outcome, Persist};
use crate::proto::{AdminReply, AgentReport, JoinKind, JoinRequest, Response, Retirement};
use crate::view::{EventView, TokenView};

/// Agent processes remembered per machine for conflict detection.
const SIGHTINGS_MAX: usize = 4;

/// One agent process (its random instance id) reporting for a machine.
#[derive(Clone, Debug)]
pub struct Sighting {
    instance: u64,
    hostname: String,
    first: Instant,
    last: Instant,
}

/// A token record for a new secret (bootstrap and `ctl token create`).
pub fn new_token(
    kind: TokenKind,
    secret: &str,
    now_ms: u64,
    ttl_ms: Option<u64>,
    description: &str,
) -> TokenRecord {
    TokenRecord {
        id: token_id(secret),
        kind: kind.as_str().to_string(),
        secret_sha256: secret_digest(secret),
        created_ms: now_ms,
        expires_ms: ttl_ms.map(|t| now_ms.saturating_add(t)),
        revoked: false,
        uses: 0,
        description: description.to_string(),
    }
}

/// The refusal for a machine name that is already enrolled.
pub(super) fn name_taken(m: &MachineRecord, joiner_hostname: &str) -> String {
    format!(
        "machine {name} is already enrolled (by the agent on host {host}); nothing was registered. \
         If this host ({joiner_hostname}) is a clone of {name}, start its agent with another --name \
         and its own --data-dir. If {name} itself was reinstalled and lost its agent data dir, \
         run `haven ctl unprotect {name}` and `haven ctl forget {name}` first",
        name = m.name,
        host = m.hostname,
    )
}

fn fmt_ms(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

impl ConfigCore {
    /// The token presented with a join, if it may enrol what the join asks for.
    pub(super) fn check_token(
        &self,
        now_ms: u64,
        req: &JoinRequest,
    ) -> Result<TokenRecord, String> {
        let digest = secret_digest(&req.secret);
        let Some(t) = self.tokens.values().find(|t| t.secret_sha256 == digest) else {
            return Err("invalid join token".into());
        };
        if t.revoked {
            return Err(format!("join token {} was revoked", t.id));
        }
        if let Some(exp) = t.expires_ms.filter(|e| now_ms >= *e) {
            return Err(format!(
                "join token {} expired at {}; create another with `haven ctl token create --kind {}`",
                t.id,
                fmt_ms(exp),
                t.kind
            ));
        }
        let wants = match req.kind {
            JoinKind::Node { .. } => TokenKind::Node,
            JoinKind::Agent { .. } => TokenKind::Agent,
        };
        if TokenKind::parse(&t.kind) != Some(wants) {
            return Err(match wants {
                TokenKind::Node => format!(
                    "token {} is an agent token: it enrols agents (protected machines) only; a server \
                     node needs a node token (`haven ctl token create --kind node`)",
                    t.id
                ),
                _ => format!(
                    "token {} is a {} token: it enrols server nodes only; an agent needs an agent \
                     token (the configuration node's agent-token file, or `haven ctl token create \
                     --kind agent`)",
                    t.id, t.kind
                ),
            });
        }
        Ok(t.clone())
    }

    pub(super) fn create_token(
        &mut self,
        now_ms: u64,
        kind: &str,
        ttl_ms: Option<u64>,
        description: String,
    ) -> Outcome {
        let Some(k) = TokenKind::parse(kind).filter(|k| k.enrols()) else {
            return refused(format!(
                "a token's kind is agent or node, not {kind:?} (the admin token is the configuration \
                 node's admin-token file)"
            ));
        };
        if ttl_ms == Some(0) {
            return refused("a token's --ttl must be longer than zero");
        }
        let secret = hex::encode(self.rng.gen::<[u8; 24]>());
        let t = new_token(k, &secret, now_ms, ttl_ms, &description);
        if self.tokens.contains_key(&t.id) {
            return refused("token id collision; try again");
        }
        self.tokens.insert(t.id.clone(), t.clone());
        let reply = AdminReply::TokenCreated {
            id: t.id.clone(),
            kind: t.kind.clone(),
            secret,
            expires_ms: t.expires_ms,
        };
        (Response::Admin(reply), vec![Persist::Token(t)])
    }

    pub(super) fn token_views(&self, now_ms: u64) -> Vec<TokenView> {
        self.tokens
            .values()
            .map(|t| TokenView {
                id: t.id.clone(),
                kind: t.kind.clone(),
                created_ms: t.created_ms,
                expires_ms: t.expires_ms,
                expired: t.expires_ms.is_some_and(|e| now_ms >= e),
                revoked: t.revoked,
                uses: t.uses,
                description: t.description.clone(),
            })
            .collect()
    }

    pub(super) fn revoke_token(&mut self, id: &str) -> Outcome {
        let Some(t) = self.tokens.get_mut(id) else {
            return refused(format!(
                "no token with id {id:?} (see `haven ctl token list`)"
            ));
        };
        let message = if t.revoked {
            return (
                Response::Admin(AdminReply::Done {
                    message: format!("token {id} was already revoked"),
                }),
                vec![],
            );
        } else {
            t.revoked = true;
            format!("token {id} revoked: it enrols nothing from now on (what it enrolled stays)")
        };
        let persist = vec![Persist::Token(t.clone())];
        (Response::Admin(AdminReply::Done { message }), persist)
    }

    /// Removes an unprotected machine. Its master target moves the replica aside (or deletes
    /// it) and its process server drops the cache when they next poll.
    pub(super) fn forget(
        &mut self,
        now: Instant,
        now_ms: u64,
        machine: &str,
        delete_replica: bool,
    ) -> Outcome {
        let Some(m) = self.machines.get(machine) else {
            return refused(format!("no machine named {machine:?}"));
        };
        if m.protected {
            return refused(format!(
                "{machine} is protected: `haven ctl unprotect {machine}` first (forgetting a \
                 protected machine would leave its replica without an owner)"
            ));
        }
        let m = self.machines.remove(machine).expect("checked above");
        self.agent_reports.remove(machine);
        self.barriers.remove(machine);
        self.sightings.remove(machine);
        self.last_rebalanced.remove(machine);
        let mut pending: Vec<String> = [m.process_server.clone(), m.master_target.clone()]
            .into_iter()
            .flatten()
            .filter(|n| self.nodes.contains_key(n))
            .collect();
        pending.dedup();
        let mut persist = vec![Persist::DeleteMachine(machine.to_string())];
        persist.extend(self.leave_group(machine));
        let replica = m.master_target.clone();
        if m.epoch != Epoch(0) || !pending.is_empty() {
            // A retirement still pending from an earlier forget of the name is merged.
            let mut r = self.retired.remove(machine).unwrap_or(RetiredRecord {
                machine: machine.to_string(),
                epoch: m.epoch,
                delete_replica,
                pending_nodes: vec![],
                retired_ms: now_ms,
            });
            r.epoch = r.epoch.max(m.epoch);
            r.delete_replica = delete_replica;
            r.retired_ms = now_ms;
            for n in pending {
                if !r.pending_nodes.contains(&n) {
                    r.pending_nodes.push(n);
                }
            }
            self.retired.insert(machine.to_string(), r.clone());
            persist.push(Persist::Retired(r));
            self.version += 1;
        }
        let what = match (&replica, delete_replica) {
            (Some(mt), true) => format!("its replica on {mt} is deleted"),
            (Some(mt), false) => format!(
                "its replica on {mt} is kept, moved aside to replicas/{machine}@{}",
                m.epoch.0
            ),
            (None, _) => "it had no replica".to_string(),
        };
        self.record_event(
            now,
            EventView {
                kind: "forget".into(),
                machine: machine.to_string(),
                from: replica,
                generation: m.generation.0,
                reason: format!("forgotten; {what}"),
                ..Default::default()
            },
        );
        let message =
            format!("{machine} forgotten; {what}; the name can be enrolled again by a new agent");
        (Response::Admin(AdminReply::Done { message }), persist)
    }

    pub(super) fn resync(&mut self, now: Instant, machine: &str, disk: &str) -> Outcome {
        let Some(m) = self.machines.get_mut(machine) else {
            return refused(format!("no machine named {machine:?}"));
        };
        if !m.protected {
            return refused(format!(
                "{machine} is not protected; `haven ctl protect {machine}` replicates every disk"
            ));
        }
        if !m.disks.iter().any(|d| d.name == disk) {
            let names: Vec<&str> = m.disks.iter().map(|d| d.name.as_str()).collect();
            return refused(format!(
                "{machine} has no disk {disk:?} (its disks: {})",
                names.join(", ")
            ));
        }
        let next = m.resync.values().max().copied().unwrap_or(0) + 1;
        m.resync.insert(disk.to_string(), next);
        let record = m.clone();
        self.record_event(
            now,
            EventView {
                kind: "resync".into(),
                machine: machine.to_string(),
                generation: record.generation.0,
                reason: format!("resync of disk {disk} requested"),
                ..Default::default()
            },
        );
        let message = format!(
            "resync of {machine} disk {disk} requested: its agent adopts the disk as it is now \
             (size and identity) and sends every block that differs from the replica"
        );
        (
            Response::Admin(AdminReply::Done { message }),
            vec![Persist::Machine(record)],
        )
    }

    pub(super) fn retirements_for(&self, node: &str) -> Vec<Retirement> {
        self.retired
            .values()
            .filter(|r| r.pending_nodes.iter().any(|n| n == node))
            .map(|r| Retirement {
                machine: r.machine.clone(),
                epoch: r.epoch,
                delete_replica: r.delete_replica,
            })
            .collect()
    }

    /// A node confirmed it acted on these retirements.
    pub(super) fn handle_retired_done(&mut self, node: &str, done: &[String]) -> Vec<Persist> {
        let mut persist = vec![];
        for machine in done {
            let Some(r) = self.retired.get_mut(machine) else {
                continue;
            };
            let before = r.pending_nodes.len();
            r.pending_nodes.retain(|n| n != node);
            if r.pending_nodes.len() == before {
                continue;
            }
            if r.pending_nodes.is_empty() && self.machines.contains_key(machine) {
                // Enrolled again meanwhile: the new record carries the epochs on.
                self.retired.remove(machine);
                persist.push(Persist::DeleteRetired(machine.clone()));
            } else {
                // Kept until the name is enrolled again, which continues its epochs (nodes
                // may still hold positions of the forgotten machine in memory).
                persist.push(Persist::Retired(r.clone()));
            }
        }
        persist
    }

    /// Remembers which agent process reported (for [`conflict`](Self::conflict)).
    pub(super) fn sighted(&mut self, now: Instant, machine: &str, report: &AgentReport) {
        if report.instance == 0 {
            return; // an agent of a version without instance ids
        }
        let window = self.failure_timeout;
        let seen = self.sightings.entry(machine.to_string()).or_default();
        seen.retain(|s| now.duration_since(s.last) < window);
        match seen.iter_mut().find(|s| s.instance == report.instance) {
            Some(s) => {
                s.last = now;
                s.hostname.clone_from(&report.hostname);
            }
            None => {
                if seen.len() == SIGHTINGS_MAX {
                    seen.remove(0);
                }
                seen.push(Sighting {
                    instance: report.instance,
                    hostname: report.hostname.clone(),
                    first: now,
                    last: now,
                });
            }
        }
    }

    /// Two agent processes whose reports interleave within the failure timeout are two agents
    /// claiming one machine. (A restarted agent's reports start after its predecessor's end.)
    pub(super) fn conflict(&self, now: Instant, machine: &str) -> Option<String> {
        let seen: Vec<&Sighting> = self
            .sightings
            .get(machine)?
            .iter()
            .filter(|s| now.duration_since(s.last) < self.failure_timeout)
            .collect();
        for (i, a) in seen.iter().enumerate() {
            for b in &seen[i + 1..] {
                if a.first <= b.last && b.first <= a.last {
                    return Some(format!(
                        "two agents report as {machine} (on hosts {} and {}): a cloned machine must \
                         be given its own --name and --data-dir; stop the clone's agent",
                        a.hostname, b.hostname
                    ));
                }
            }
        }
        None
    }

    /// Keeps the inventory's disks current: an unprotected machine takes whatever the agent
    /// reports; a protected one its protected geometry and identity, disk set unchanged (a
    /// changed set is for the agent to refuse).
    pub(super) fn handle_inventory(
        &mut self,
        now: Instant,
        machine: &str,
        report: &AgentReport,
    ) -> Vec<Persist> {
        let Some(m) = self.machines.get(machine) else {
            return vec![];
        };
        let mut changed = m.hostname != report.hostname;
        let same_set = m.disks.len() == report.disks.len()
            && m.disks
                .iter()
                .zip(&report.disks)
                .all(|(a, b)| a.name == b.name);
        let mut events = vec![];
        if m.disks != report.disks && (same_set || !m.protected) {
            if report.disks.iter().any(|d| valid_name(&d.name).is_err()) {
                return vec![];
            }
            if same_set && m.protected {
                for (old, new) in m.disks.iter().zip(&report.disks) {
                    if old.size_bytes != new.size_bytes {
                        events.push(resize_event(machine, m.generation.0, old, new));
                    }
                }
            }
            changed = true;
        }
        if !changed {
            return vec![];
        }
        let m = self.machines.get_mut(machine).expect("checked above");
        m.hostname.clone_from(&report.hostname);
        if same_set || !m.protected {
            m.disks.clone_from(&report.disks);
            // The nodes' assignments carry the disks.
            self.version += 1;
        }
        let record = m.clone();
        for e in events {
            self.record_event(now, e);
        }
        vec![Persist::Machine(record)]
    }
}

fn resize_event(machine: &str, generation: u64, old: &DiskInfo, new: &DiskInfo) -> EventView {
    let verb = if new.size_bytes > old.size_bytes {
        "grew"
    } else {
        "shrank (resync)"
    };
    EventView {
        kind: "disk-resize".into(),
        machine: machine.to_string(),
        generation,
        reason: format!(
            "disk {} {verb} from {} to {} bytes; the replica follows in the stream",
            new.name, old.size_bytes, new.size_bytes
        ),
        ..Default::default()
    }
}
