//! The configuration node's protocol core: plain Rust, no I/O, time passed in.
//!
//! Every input returns the response and the records to persist; the actor in `mod.rs`
//! writes those to the store *before* it answers, so nothing acknowledged is forgotten.
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use haven_cluster::{
    placement::{self, Candidate},
    ClusterMeta, Epoch, Generation, MachineRecord, NodeRecord, RetiredRecord, TokenRecord,
    ROLE_MASTER_TARGET, ROLE_PROCESS,
};
use haven_transport::identity::PeerIdentity;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::proto::*;
use crate::view::*;

/// A node or agent silent for longer than this is reported as not alive.
pub const FAILURE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the core asks to make durable (the actor writes it, in one transaction, before it
/// answers).
pub use haven_cluster::store::Persist;

struct Observed<T> {
    at: Instant,
    report: T,
}

struct Barrier {
    id: u64,
    barrier_seq: Option<u64>,
}

pub struct ConfigCore {
    meta: ClusterMeta,
    nodes: BTreeMap<String, NodeRecord>,
    machines: BTreeMap<String, MachineRecord>,
    node_reports: HashMap<String, Observed<NodeReport>>,
    /// Previous report of each node: (when, raw bytes in, wire bytes out), for rates.
    node_rates: HashMap<String, (Instant, u64, u64, u64, u64)>,
    agent_reports: HashMap<String, Observed<AgentReport>>,
    barriers: HashMap<String, Barrier>,
    next_barrier: u64,
    /// `ctl mark` requests and outcomes per machine (see `marks.rs`).
    marks: HashMap<String, marks::Marks>,
    next_mark: u64,
    pub(super) failure_timeout: Duration,
    pub(super) policy: scaleout::RebalancePolicy,
    /// When this core started judging liveness (first tick).
    up_since: Option<Instant>,
    /// The last failback of each machine, as it ended (in memory: `ctl failback` shows it).
    failed_back: HashMap<String, FailoverView>,
    events: std::collections::VecDeque<scaleout::Event>,
    recent_moves: std::collections::VecDeque<Instant>,
    last_rebalanced: HashMap<String, Instant>,
    /// Recent moves (when, from, to): the rebalancer does not reverse them.
    recent_pairs: std::collections::VecDeque<(Instant, String, String)>,
    /// Process servers that failed: the rebalancer sends them nothing until they have been
    /// up (see `alive_since`) for a cooldown.
    last_failed: HashMap<String, Instant>,
    /// Since when each node has been reporting without a gap longer than the failure timeout.
    alive_since: HashMap<String, Instant>,
    /// Bumped on every assignment change; nodes long-poll on it.
    version: u64,
    /// Enrolment tokens by id.
    tokens: BTreeMap<String, TokenRecord>,
    /// Forgotten machines whose nodes have not acted yet, by name.
    retired: BTreeMap<String, RetiredRecord>,
    /// Agent processes seen reporting for each machine (see `enrolment::Sighting`).
    sightings: HashMap<String, Vec<enrolment::Sighting>>,
    /// Consistency groups by name, and their cuts under way (see `groups.rs`).
    groups: BTreeMap<String, haven_cluster::GroupRecord>,
    cuts: groups::Cuts,
    /// Something agents wait for changed outside an admin request (a cut's release): the
    /// service wakes the long polls (see [`ConfigCore::take_wake`]).
    wake: bool,
    /// Reprotected machines: when the next periodic reverse pass is due (see `reverse_tick`).
    reverse_due: HashMap<String, Instant>,
    /// The period of those passes (`haven node --reverse-every`).
    reverse_every: Duration,
    /// Secrets, enrolment ids and the initial version/barrier numbers come from here: seeded
    /// from the OS at startup, fixed in tests.
    rng: StdRng,
}

pub mod scaleout;

pub mod enrolment;

pub mod marks;

pub mod failover;

pub mod groups;

pub type Outcome = (Response, Vec<Persist>);

fn refused(reason: impl Into<String>) -> Outcome {
    (
        Response::Refused {
            reason: reason.into(),
        },
        vec![],
    )
}

impl ConfigCore {
    pub fn new(meta: ClusterMeta, nodes: Vec<NodeRecord>, machines: Vec<MachineRecord>) -> Self {
        Self::with_seed(meta, nodes, machines, 0x0068_6176_656e)
    }

    /// A core whose randomness (secrets, enrolment ids, version and barrier numbering) comes
    /// from `seed`. The configuration actor seeds it from the operating system.
    pub fn with_seed(
        meta: ClusterMeta,
        nodes: Vec<NodeRecord>,
        machines: Vec<MachineRecord>,
        seed: u64,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let version = rng.gen::<u32>() as u64;
        // Barrier ids must not repeat across restarts of the configuration node: an agent
        // may still report a barrier id of the previous incarnation as done.
        let next_barrier = (rng.gen::<u32>() as u64) << 24 | 1;
        // Likewise mark ids: an agent makes each id's point once.
        let next_mark = (rng.gen::<u32>() as u64) << 24 | 1;
        // And cut ids: `ctl group mark` polls one by id.
        let cuts = groups::Cuts {
            next_id: (rng.gen::<u32>() as u64) << 24,
            ..Default::default()
        };
        Self {
            meta,
            nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
            machines: machines.into_iter().map(|m| (m.name.clone(), m)).collect(),
            node_reports: HashMap::new(),
            agent_reports: HashMap::new(),
            node_rates: HashMap::new(),
            failure_timeout: FAILURE_TIMEOUT,
            policy: scaleout::RebalancePolicy::default(),
            up_since: None,
            failed_back: HashMap::new(),
            events: Default::default(),
            recent_moves: Default::default(),
            last_rebalanced: HashMap::new(),
            recent_pairs: Default::default(),
            last_failed: HashMap::new(),
            alive_since: HashMap::new(),
            version,
            barriers: HashMap::new(),
            next_barrier,
            marks: HashMap::new(),
            next_mark,
            tokens: BTreeMap::new(),
            retired: BTreeMap::new(),
            sightings: HashMap::new(),
            groups: BTreeMap::new(),
            cuts,
            wake: false,
            reverse_due: HashMap::new(),
            reverse_every: failover::REVERSE_EVERY,
            rng,
        }
    }

    pub fn with_groups(mut self, groups: Vec<haven_cluster::GroupRecord>) -> Self {
        self.groups = groups.into_iter().map(|g| (g.name.clone(), g)).collect();
        self
    }

    /// Whether agents' long polls must be answered again now (a group cut's release was
    /// decided while handling a poll or a tick); cleared by asking.
    pub fn take_wake(&mut self) -> bool {
        std::mem::take(&mut self.wake)
    }

    pub fn with_tokens(mut self, tokens: Vec<TokenRecord>) -> Self {
        self.tokens = tokens.into_iter().map(|t| (t.id.clone(), t)).collect();
        self
    }

    pub fn with_retired(mut self, retired: Vec<RetiredRecord>) -> Self {
        self.retired = retired
            .into_iter()
            .map(|r| (r.machine.clone(), r))
            .collect();
        self
    }

    pub fn with_reverse_every(mut self, every: Duration) -> Self {
        self.reverse_every = every;
        self
    }

    pub fn with_failure_timeout(mut self, t: Duration) -> Self {
        self.failure_timeout = t;
        self
    }

    pub fn with_policy(mut self, p: scaleout::RebalancePolicy) -> Self {
        self.policy = p;
        self
    }

    /// Changes whenever an assignment changes.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn meta(&self) -> &ClusterMeta {
        &self.meta
    }

    /// Validates a join and records the joiner. On success the caller issues a certificate
    /// for the returned identity. A refusal records nothing (the token's use count included).
    pub fn handle_join(
        &mut self,
        now_ms: u64,
        req: &JoinRequest,
    ) -> Result<(PeerIdentity, Vec<Persist>), String> {
        let mut token = self.check_token(now_ms, req)?;
        let (identity, mut persist) = match &req.kind {
            JoinKind::Node {
                name,
                roles,
                addr,
                capacity,
                site,
            } => {
                valid_name(name)?;
                if roles.is_empty() {
                    return Err("a node needs at least one role".into());
                }
                let node = NodeRecord {
                    name: name.clone(),
                    roles: roles.clone(),
                    addr: addr.clone(),
                    capacity: *capacity,
                    drained: self.nodes.get(name).map(|n| n.drained).unwrap_or(false),
                    site: site.clone(),
                };
                self.nodes.insert(name.clone(), node.clone());
                let id = PeerIdentity::Node {
                    name: name.clone(),
                    roles: roles.clone(),
                };
                (id, vec![Persist::Node(node)])
            }
            JoinKind::Agent {
                machine,
                hostname,
                disks,
            } => {
                valid_name(machine)?;
                for d in disks {
                    valid_name(&d.name)?;
                }
                self.enrol(machine, hostname, disks)?
            }
        };
        token.uses += 1;
        self.tokens.insert(token.id.clone(), token.clone());
        persist.push(Persist::Token(token));
        Ok((identity, persist))
    }

    /// A new machine: refused if the name is taken (a clone, or a reinstalled machine whose
    /// old enrolment must be forgotten first). Its epochs continue those of a forgotten
    /// machine of the same name, so an old replica is never taken for the new machine's.
    fn enrol(
        &mut self,
        machine: &str,
        hostname: &str,
        disks: &[haven_cluster::DiskInfo],
    ) -> Result<(PeerIdentity, Vec<Persist>), String> {
        if let Some(m) = self.machines.get(machine) {
            return Err(enrolment::name_taken(m, hostname));
        }
        let mut persist = vec![];
        let epoch = match self.retired.get(machine) {
            Some(r) => {
                // The new machine carries the epochs on; the tombstone is needed no longer
                // once every node has acted on it.
                let epoch = r.epoch;
                if r.pending_nodes.is_empty() {
                    self.retired.remove(machine);
                    persist.push(Persist::DeleteRetired(machine.to_string()));
                }
                epoch
            }
            None => Epoch(0),
        };
        let enrolment = hex::encode(self.rng.gen::<[u8; 6]>());
        let rec = MachineRecord {
            name: machine.to_string(),
            hostname: hostname.to_string(),
            disks: disks.to_vec(),
            protected: false,
            epoch,
            generation: Generation(0),
            process_server: None,
            master_target: None,
            data_key: vec![],
            enrolment: enrolment.clone(),
            resync: Default::default(),
            policy: Default::default(),
            site: haven_cluster::default_site(),
            recovery: Default::default(),
            failbacks: 0,
        };
        self.machines.insert(machine.to_string(), rec.clone());
        let id = PeerIdentity::Agent {
            machine: machine.to_string(),
            enrolment,
        };
        persist.insert(0, Persist::Machine(rec));
        Ok((id, persist))
    }

    pub fn handle_agent_poll(
        &mut self,
        now: Instant,
        who: &PeerIdentity,
        report: AgentReport,
    ) -> Outcome {
        let PeerIdentity::Agent { machine, enrolment } = who else {
            return refused("only an agent may poll as an agent");
        };
        if *machine != report.machine {
            return refused(format!(
                "agent {machine} may not report for {}",
                report.machine
            ));
        }
        let Some(rec) = self.machines.get(machine) else {
            return refused(format!(
                "machine {machine} is not enrolled in this cluster (it was forgotten with `haven ctl forget`?); \
                 enrol it again from a fresh --data-dir"
            ));
        };
        if rec.enrolment != *enrolment {
            return refused(format!(
                "this agent's certificate belongs to an earlier enrolment of {machine}; {machine} has been \
                 enrolled again since (hostname {}). Start this agent with a fresh --data-dir and another --name",
                rec.hostname
            ));
        }
        let mut persist = vec![];
        if !report.held {
            self.sighted(now, machine, &report);
            persist.extend(self.handle_inventory(now, machine, &report));
            if let Some(site) = &report.site {
                // Placement of the next protect uses it; a running protection stays put.
                let m = self.machines.get_mut(machine).expect("checked above");
                if m.site != *site {
                    m.site = site.clone();
                    persist.push(Persist::Machine(m.clone()));
                }
            }
        }
        if let Some(stats) = &report.stats.last_move {
            let stats = stats.clone();
            self.record_move_figures(machine, &stats);
        }
        if !report.marks_done.is_empty() {
            self.handle_marks_done(now, machine, &report.marks_done);
            let (p, woke) = self.advance_cuts(now);
            persist.extend(p);
            self.wake |= woke;
        }
        if let Some(done) = &report.reverse_done {
            persist.extend(self.handle_reverse_done(now, machine, done));
        }
        if let (Some((id, seq)), Some(b)) = (report.sync_done, self.barriers.get_mut(machine)) {
            if b.id == id && b.barrier_seq.is_none() {
                b.barrier_seq = Some(seq);
            }
        }
        let newer = !report.held
            && self
                .agent_reports
                .get(machine)
                .is_none_or(|o| report.report_seq >= o.report.report_seq);
        if newer {
            self.agent_reports
                .insert(machine.clone(), Observed { at: now, report });
        }
        let marks = if self.machines[machine].protected {
            self.pending_marks(now, machine)
        } else {
            vec![]
        };
        persist.extend(self.failover_progress(now));
        let m = &self.machines[machine];
        // Failed over: the forward stream is fenced; the agent sends to nobody.
        let fenced = Self::failover_order(m).is_some();
        let process_server = m
            .process_server
            .as_ref()
            .filter(|_| !fenced)
            .and_then(|ps| self.nodes.get(ps))
            .map(|n| (n.name.clone(), n.addr.clone()));
        let sync_request = self
            .barriers
            .get(machine)
            .filter(|b| b.barrier_seq.is_none())
            .map(|b| b.id);
        let reply = AgentPollReply {
            protected: m.protected,
            epoch: m.epoch.0,
            generation: m.generation,
            process_server,
            sync_request,
            resync: m.resync.clone(),
            point_every_ms: Some(m.policy.point_every_ms()),
            marks,
            app_consistent_every_ms: m.policy.app_consistent_every_ms(),
            read_only: Self::read_only_reason(m),
            reverse: self.reverse_order(m),
            rebase: Self::rebase_order(m),
            release: self.released_for(now, machine),
        };
        (Response::AgentPoll(reply), persist)
    }

    pub fn handle_node_poll(
        &mut self,
        now: Instant,
        who: &PeerIdentity,
        report: NodeReport,
    ) -> Outcome {
        let PeerIdentity::Node { name, .. } = who else {
            return refused("only a node may poll as a node");
        };
        if *name != report.name {
            return refused(format!("node {name} may not report for {}", report.name));
        }
        if !self.nodes.contains_key(name) {
            return refused(format!("node {name} is not a member of this cluster"));
        }
        if report.held {
            // A held poll answered again: only the reply matters; the report is old and must
            // not keep a node that died meanwhile looking alive.
            return (Response::NodePoll(self.assignments_for(name)), vec![]);
        }
        let mut persist = self.handle_retired_done(name, &report.retired_done);
        if let Some(site) = &report.site {
            let n = self.nodes.get_mut(name).expect("checked above");
            if n.site != *site {
                n.site = site.clone();
                persist.push(Persist::Node(n.clone()));
            }
        }
        let (raw, wire) = report
            .machines
            .iter()
            .filter(|r| r.role == ROLE_PROCESS)
            .fold((0u64, 0u64), |(a, b), r| {
                (a + r.raw_bytes, b + r.wire_bytes)
            });
        let rates = match self.node_rates.get(name) {
            Some(&(at, raw0, wire0, ..))
                if now.duration_since(at) >= Duration::from_millis(900) =>
            {
                let secs = now.duration_since(at).as_secs_f64();
                Some((
                    now,
                    raw,
                    wire,
                    (raw.saturating_sub(raw0) as f64 / secs) as u64,
                    (wire.saturating_sub(wire0) as f64 / secs) as u64,
                ))
            }
            Some(_) => None,
            None => Some((now, raw, wire, 0, 0)),
        };
        if let Some(r) = rates {
            self.node_rates.insert(name.clone(), r);
        }
        if !self.alive(now, name) {
            self.alive_since.insert(name.clone(), now);
        }
        self.node_reports
            .insert(name.clone(), Observed { at: now, report });
        persist.extend(self.failover_progress(now));
        (Response::NodePoll(self.assignments_for(name)), persist)
    }

    /// The assignments of the machines `node` serves, as process server or master target.
    fn assignments_for(&self, node: &str) -> NodePollReply {
        let assignments = self
            .machines
            .values()
            .filter(|m| m.protected)
            .filter_map(|m| {
                let failover = Self::failover_order(m);
                // Failed over: the process server is out of the assignment (it ships
                // nothing more; the master target fences whatever still arrives).
                let process_server = match &failover {
                    Some(_) => String::new(),
                    None => m.process_server.clone()?,
                };
                if process_server != node && m.master_target.as_deref() != Some(node) {
                    return None;
                }
                let mt = self.nodes.get(m.master_target.as_deref()?)?;
                Some(Assignment {
                    machine: m.name.clone(),
                    epoch: m.epoch,
                    generation: m.generation,
                    disks: m.disks.clone(),
                    process_server,
                    master_target: mt.name.clone(),
                    master_target_addr: mt.addr.clone(),
                    data_key: serde_bytes::ByteBuf::from(m.data_key.clone()),
                    enrolment: m.enrolment.clone(),
                    policy: m.policy.clone(),
                    failover,
                    failbacks: m.failbacks,
                })
            })
            .collect();
        NodePollReply {
            assignments,
            version: self.version,
            retired: self.retirements_for(node),
        }
    }

    /// A recovery command goes to the master target that holds the machine's replica (the
    /// service forwards it; the core only says where).
    fn forward_recovery(&self, request: RecoveryRequest) -> Outcome {
        let machine = match &request {
            RecoveryRequest::Points { machine }
            | RecoveryRequest::TestFailover { machine, .. }
            | RecoveryRequest::TestFailoverCleanup { machine } => machine,
        };
        let Some(m) = self.machines.get(machine) else {
            return refused(format!("no machine named {machine:?}"));
        };
        let Some(mt) = m.master_target.as_deref().and_then(|n| self.nodes.get(n)) else {
            return refused(format!(
                "{machine} has no replica yet (protect it first: `ctl protect {machine}`)"
            ));
        };
        (
            Response::Admin(AdminReply::Forward {
                node: mt.name.clone(),
                addr: mt.addr.clone(),
                request,
            }),
            vec![],
        )
    }

    pub fn handle_admin(
        &mut self,
        now: Instant,
        now_ms: u64,
        secret: &str,
        cmd: AdminCommand,
        new_key: impl FnOnce() -> Vec<u8>,
    ) -> Outcome {
        if !secret_eq(&self.meta.admin_secret, secret) {
            return refused("invalid admin token");
        }
        let reply = match cmd {
            AdminCommand::Status => AdminReply::Status(ClusterStatus {
                cluster_id: self.meta.cluster_id.clone(),
                nodes: self.node_views(now),
                machines: self.machine_views(now, now_ms),
                groups: self.group_views(),
            }),
            AdminCommand::Nodes => AdminReply::Nodes(self.node_views(now)),
            AdminCommand::Machines => AdminReply::Machines(self.machine_views(now, now_ms)),
            AdminCommand::TokenCreate {
                kind,
                ttl_ms,
                description,
            } => return self.create_token(now_ms, &kind, ttl_ms, description),
            AdminCommand::TokenList => AdminReply::Tokens(self.token_views(now_ms)),
            AdminCommand::TokenRevoke { id } => return self.revoke_token(&id),
            AdminCommand::Forget {
                machine,
                delete_replica,
            } => return self.forget(now, now_ms, &machine, delete_replica),
            AdminCommand::Resync { machine, disk } => return self.resync(now, &machine, &disk),
            AdminCommand::Recovery(request) => return self.forward_recovery(request),
            AdminCommand::Protect { machine, policy } => {
                return self.protect(now, &machine, &policy, new_key)
            }
            AdminCommand::Unprotect { machine } => return self.unprotect(&machine),
            AdminCommand::Mark { machine, app, name } => {
                return self.request_mark(now, &machine, app, name)
            }
            AdminCommand::MarkState { machine, id } => return self.mark_state(now, &machine, id),
            AdminCommand::Failover { machine, point } => {
                return self.start_failover(now, now_ms, &machine, point)
            }
            AdminCommand::FailoverState { machine } => {
                return self.failover_reply(now, now_ms, &machine)
            }
            AdminCommand::FailoverChangePoint { machine, point } => {
                return self.failover_change_point(now, now_ms, &machine, point)
            }
            AdminCommand::FailoverCommit { machine } => {
                return self.failover_commit(now, now_ms, &machine)
            }
            AdminCommand::FailoverCancel { machine } => {
                return self.failover_cancel(now, now_ms, &machine)
            }
            AdminCommand::Reprotect { machine } => return self.reprotect(now, now_ms, &machine),
            AdminCommand::Failback { machine } => return self.failback(now, now_ms, &machine),
            AdminCommand::GroupAdd {
                group,
                members,
                point_every_ms,
            } => return self.group_add(&group, &members, point_every_ms),
            AdminCommand::GroupDelete { group } => return self.group_delete(now, &group),
            AdminCommand::Groups => AdminReply::Groups(self.group_views()),
            AdminCommand::GroupMark { group, name } => {
                return self.request_group_mark(now, &group, name)
            }
            AdminCommand::GroupMarkState { group, id } => return self.group_mark_state(&group, id),
            AdminCommand::GroupPoints { group } => match self.groups.get(&group) {
                None => return refused(format!("no group named {group:?}")),
                Some(g) => AdminReply::GroupPoints(
                    g.points
                        .iter()
                        .map(|p| groups::point_view(&group, p))
                        .collect(),
                ),
            },
            AdminCommand::RequestSync { machine } => {
                match self.machines.get(&machine) {
                    None => return refused(format!("no machine named {machine:?}")),
                    Some(m) if !m.protected => {
                        return refused(format!("{machine} is not protected"))
                    }
                    Some(_) => {}
                }
                let id = self.next_barrier;
                self.next_barrier += 1;
                self.barriers.insert(
                    machine,
                    Barrier {
                        id,
                        barrier_seq: None,
                    },
                );
                AdminReply::SyncRequested { id }
            }
            AdminCommand::Move { machine, to } => match self.handle_move(now, &machine, &to) {
                Ok((p, e)) => {
                    let reply = AdminReply::Moved {
                        machine,
                        from: e.from.unwrap_or_default(),
                        to,
                        generation: e.generation,
                    };
                    return (Response::Admin(reply), vec![p]);
                }
                Err(reason) => return refused(reason),
            },
            AdminCommand::Rebalance => {
                let (persist, moves): (Vec<_>, Vec<_>) =
                    self.rebalance_pass(now).into_iter().unzip();
                return (Response::Admin(AdminReply::Rebalanced { moves }), persist);
            }
            AdminCommand::Drain { node } | AdminCommand::Undrain { node }
                if !self.nodes.contains_key(&node) =>
            {
                return refused(format!("no node named {node:?}"));
            }
            AdminCommand::Drain { node } => {
                let n = self.nodes.get_mut(&node).expect("checked");
                n.drained = true;
                let mut persist = vec![Persist::Node(n.clone())];
                persist.extend(self.handle_tick(now));
                let left = self.machines_on(&node).len();
                let message = format!("{node} drained; {left} machine(s) still to move");
                return (Response::Admin(AdminReply::Done { message }), persist);
            }
            AdminCommand::Undrain { node } => {
                let n = self.nodes.get_mut(&node).expect("checked");
                n.drained = false;
                let persist = vec![Persist::Node(n.clone())];
                return (
                    Response::Admin(AdminReply::Done {
                        message: format!("{node} accepts machines again"),
                    }),
                    persist,
                );
            }
            AdminCommand::Events => AdminReply::Events(self.event_views(now)),
            AdminCommand::SyncState { machine, id } => {
                if !self.machines.get(&machine).is_some_and(|m| m.protected) {
                    return refused(format!("{machine} is not protected"));
                }
                let applied_seq = self.applied_seq(&machine);
                let barrier_seq = self
                    .barriers
                    .get(&machine)
                    .filter(|b| b.id == id)
                    .and_then(|b| b.barrier_seq);
                let view = self.machine_view(now, now_ms, &self.machines[&machine]);
                // What the agent says of its disks counts once it has done the barrier's pass
                // (its report then carries both); until then a report from before the request
                // (an agent since restarted, say) could still show what no longer holds.
                let blocked = match self.conflict(now, &machine) {
                    Some(conflict) => Some(conflict),
                    None => view.blocked_reason.filter(|_| barrier_seq.is_some()),
                };
                // A barrier is done only when nothing keeps the replica from the source.
                let done = barrier_seq.is_some_and(|b| applied_seq >= b) && blocked.is_none();
                AdminReply::SyncState {
                    barrier_seq,
                    applied_seq,
                    done,
                    blocked,
                    degraded: view.degraded_reason,
                }
            }
        };
        (Response::Admin(reply), vec![])
    }

    fn alive(&self, now: Instant, node: &str) -> bool {
        self.node_reports
            .get(node)
            .is_some_and(|o| now.duration_since(o.at) < self.failure_timeout)
    }

    fn protect(
        &mut self,
        now: Instant,
        machine: &str,
        policy: &haven_cluster::ProtectPolicy,
        new_key: impl FnOnce() -> Vec<u8>,
    ) -> Outcome {
        let Some(m) = self.machines.get_mut(machine) else {
            return refused(format!(
                "no machine named {machine:?}; enroll it with `haven agent` first"
            ));
        };
        let merged = m.policy.merged(policy);
        if m.protected {
            if merged == m.policy {
                return (
                    Response::Admin(AdminReply::Done {
                        message: format!("{machine} is already protected"),
                    }),
                    vec![],
                );
            }
            m.policy = merged;
            self.version += 1;
            return (
                Response::Admin(AdminReply::Done {
                    message: format!(
                        "{machine} is already protected; its recovery-point policy is updated"
                    ),
                }),
                vec![Persist::Machine(m.clone())],
            );
        }
        m.policy = merged;
        let pick = |role: &str| {
            let cands: Vec<Candidate> = self
                .nodes
                .values()
                .filter(|n| n.has_role(role))
                .map(|n| Candidate {
                    node: n,
                    // Load per role, as the rebalancer counts it.
                    machines: self
                        .machines
                        .values()
                        .filter(|m| m.protected)
                        .filter(|m| {
                            if role == ROLE_PROCESS {
                                m.process_server.as_deref() == Some(&n.name)
                            } else {
                                m.master_target.as_deref() == Some(&n.name)
                            }
                        })
                        .count() as u32,
                    alive: self.alive(now, &n.name),
                })
                .collect();
            let site = self.machines[machine].site.as_str();
            if role == ROLE_PROCESS {
                placement::pick_preferring(&cands, placement::process_server_site(site))
            } else {
                placement::pick_preferring(&cands, placement::master_target_site(site))
            }
            .map(|n| n.name.clone())
        };
        let Some(ps) = pick(ROLE_PROCESS) else {
            return refused("no live process server to place the machine on");
        };
        let Some(mt) = pick(ROLE_MASTER_TARGET) else {
            return refused("no live master target to place the machine on");
        };
        let m = self.machines.get_mut(machine).expect("checked above");
        m.protected = true;
        m.epoch = Epoch(m.epoch.0 + 1);
        m.generation = Generation(m.generation.0 + 1);
        m.process_server = Some(ps.clone());
        m.master_target = Some(mt.clone());
        m.data_key = new_key();
        self.version += 1;
        let message = format!(
            "{machine} protected: process server {ps}, master target {mt}, epoch {}",
            m.epoch.0
        );
        (
            Response::Admin(AdminReply::Done { message }),
            vec![Persist::Machine(m.clone())],
        )
    }

    fn unprotect(&mut self, machine: &str) -> Outcome {
        let Some(m) = self.machines.get_mut(machine) else {
            return refused(format!("no machine named {machine:?}"));
        };
        if !m.protected {
            return (
                Response::Admin(AdminReply::Done {
                    message: format!("{machine} is not protected"),
                }),
                vec![],
            );
        }
        if m.recovery.failover().is_some() {
            return refused(format!(
                "{machine} is {}: cancel the failover first (`ctl failover-cancel {machine}`),                  or bring it home with reprotect and failback",
                m.recovery.name()
            ));
        }
        m.protected = false;
        m.generation = Generation(m.generation.0 + 1);
        self.version += 1;
        self.barriers.remove(machine);
        let message = format!(
            "{machine} unprotected; its replica stays on {}",
            m.master_target.as_deref().unwrap_or("?")
        );
        let persist = vec![Persist::Machine(m.clone())];
        self.drop_marks(machine);
        (Response::Admin(AdminReply::Done { message }), persist)
    }

    /// What the machine's current master target (or its agent) says is applied in the
    /// current epoch. Reports of other nodes or epochs are stale and ignored.
    fn applied_seq(&self, machine: &str) -> u64 {
        let Some(m) = self.machines.get(machine) else {
            return 0;
        };
        let from_agent = self
            .agent_reports
            .get(machine)
            .filter(|o| o.report.stats.epoch == m.epoch.0)
            .map(|o| o.report.stats.applied_seq)
            .unwrap_or(0);
        let from_mt = m
            .master_target
            .as_ref()
            .and_then(|mt| self.node_reports.get(mt))
            .and_then(|o| {
                o.report.machines.iter().find(|r| {
                    r.machine == machine && r.role == ROLE_MASTER_TARGET && r.epoch == m.epoch.0
                })
            })
            .map(|r| r.applied_seq)
            .unwrap_or(0);
        from_agent.max(from_mt)
    }

    fn node_views(&self, now: Instant) -> Vec<NodeView> {
        self.nodes
            .values()
            .map(|n| NodeView {
                name: n.name.clone(),
                site: n.site.clone(),
                roles: n.roles.clone(),
                addr: n.addr.clone(),
                alive: self.alive(now, &n.name),
                last_seen_ms_ago: self
                    .node_reports
                    .get(&n.name)
                    .map(|o| now.duration_since(o.at).as_millis() as u64),
                machines: self
                    .machines
                    .values()
                    .filter(|m| {
                        m.protected
                            && (m.process_server.as_deref() == Some(&n.name)
                                || m.master_target.as_deref() == Some(&n.name))
                    })
                    .count() as u32,
                capacity: n.capacity,
                drained: n.drained,
                bytes_in_per_sec: self.node_rates.get(&n.name).map(|r| r.3).unwrap_or(0),
                bytes_out_per_sec: self.node_rates.get(&n.name).map(|r| r.4).unwrap_or(0),
                cache_bytes: self
                    .node_reports
                    .get(&n.name)
                    .map(|o| {
                        o.report
                            .machines
                            .iter()
                            .filter(|r| r.role == ROLE_PROCESS)
                            .map(|r| r.cache_bytes)
                            .sum()
                    })
                    .unwrap_or(0),
            })
            .collect()
    }

    fn machine_views(&self, now: Instant, now_ms: u64) -> Vec<MachineView> {
        self.machines
            .values()
            .map(|m| self.machine_view(now, now_ms, m))
            .collect()
    }

    fn machine_view(&self, now: Instant, now_ms: u64, m: &MachineRecord) -> MachineView {
        let agent = self.agent_reports.get(&m.name);
        let stats = agent.map(|o| o.report.stats.clone()).unwrap_or_default();
        // One node may serve a machine in two roles (all-in-one): pick the report by role.
        let node_report = |node: Option<&String>, role: &str| {
            let node = node?;
            self.node_reports.get(node).and_then(|o| {
                o.report
                    .machines
                    .iter()
                    .find(|r| r.machine == m.name && r.role == role)
            })
        };
        let ps = node_report(m.process_server.as_ref(), ROLE_PROCESS);
        let mt = node_report(m.master_target.as_ref(), ROLE_MASTER_TARGET);
        let applied_seq = self.applied_seq(&m.name);
        let points = mt.and_then(|r| r.points.as_ref());
        let agent_age = agent.map(|o| now.duration_since(o.at));
        let agent_live = agent_age.is_some_and(|a| a < self.failure_timeout);
        let current = agent_live && stats.epoch == m.epoch.0;
        // What keeps the replica from the source until the operator decides.
        let blocked = if !m.protected {
            None
        } else if let Some(conflict) = self.conflict(now, &m.name) {
            Some(conflict)
        } else if current && !stats.blocked.is_empty() {
            let reasons: Vec<&str> = stats.blocked.iter().map(|b| b.reason.as_str()).collect();
            Some(reasons.join("; "))
        } else {
            None
        };
        let mut degraded = blocked.clone();
        if m.protected && degraded.is_none() {
            if !agent_live {
                degraded = Some("agent is not reporting".to_string());
            } else if let Some(reason) = &stats.degraded_reason {
                degraded = Some(reason.clone());
            } else if let Some(ps) = m.process_server.as_ref().filter(|ps| !self.alive(now, ps)) {
                degraded = Some(format!("process server {ps} is not reporting"));
            } else if let Some(mt) = m.master_target.as_ref().filter(|mt| !self.alive(now, mt)) {
                degraded = Some(format!("master target {mt} is not reporting"));
            } else if stats.epoch != m.epoch.0 {
                degraded = Some("agent has not picked up the protection yet".to_string());
            } else if let Some(e) = ps.and_then(|r| r.ship_error.as_ref()) {
                degraded = Some(format!(
                    "process server {} cannot ship to master target {}: {e}",
                    m.process_server.as_deref().unwrap_or("?"),
                    m.master_target.as_deref().unwrap_or("?")
                ));
            } else if let Some(e) = mt.and_then(|r| r.refusal.as_ref()) {
                degraded = Some(format!(
                    "master target {} refused a batch: {e}",
                    m.master_target.as_deref().unwrap_or("?")
                ));
            }
        }
        let state = match (m.protected, &degraded, stats.initial_sync_percent) {
            (false, _, _) => "discovered",
            (true, Some(_), _) => "degraded",
            (true, None, Some(_)) => "initial-sync",
            (true, None, None) => "replicating",
        };
        // Failed over, the machine's state is its place in the failover cycle.
        let failover = self.failover_view(now, now_ms, &m.name);
        let state = if failover.is_some() {
            m.recovery.name()
        } else {
            state
        };
        // Nothing is recoverable before the first full pass is applied, and nothing is known
        // of a protection whose agent does not report in it.
        // A blocked disk's changes are not replicated since `since_ms`: the agent counts that
        // in `oldest_unapplied_ms`, whatever the seqs say.
        let in_sync = stats.blocked.is_empty()
            && (stats.captured_seq <= applied_seq || stats.oldest_unapplied_ms == 0);
        let rpo_seconds = if !m.protected
            || !current
            || stats.initial_sync_percent.is_some()
            || failover.is_some()
        {
            None
        } else if in_sync {
            Some(0.0)
        } else {
            Some(now_ms.saturating_sub(stats.oldest_unapplied_ms) as f64 / 1000.0)
        };
        MachineView {
            name: m.name.clone(),
            hostname: m.hostname.clone(),
            site: m.site.clone(),
            state: state.to_string(),
            initial_sync_percent: if m.protected {
                stats.initial_sync_percent
            } else {
                None
            },
            degraded_reason: degraded,
            process_server: m.process_server.clone(),
            master_target: m.master_target.clone(),
            generation: m.generation.0,
            epoch: m.epoch.0,
            captured_seq: stats.captured_seq,
            cached_seq: ps
                .map(|r| r.cached_seq)
                .unwrap_or(stats.cached_seq)
                .max(stats.cached_seq),
            applied_seq,
            rpo_seconds,
            raw_bytes_sent: stats.raw_bytes_sent,
            wire_bytes_sent: ps.map(|r| r.wire_bytes).unwrap_or(0),
            throughput_bytes_per_sec: stats.throughput_bps,
            retained_bytes: stats.retained_bytes,
            disks: m.disks.clone(),
            agent_last_seen_ms_ago: agent_age.map(|a| a.as_millis() as u64),
            stream_restarts: stats.stream_restarts + ps.map(|r| r.restarts).unwrap_or(0),
            batches_refused: mt.map(|r| r.batches_refused).unwrap_or(0),
            cache_bytes: ps.map(|r| r.cache_bytes).unwrap_or(0),
            blocked_reason: blocked,
            blocked_disks: if current {
                stats.blocked.clone()
            } else {
                vec![]
            },
            capture: (current && !stats.capture.is_empty()).then(|| stats.capture.clone()),
            points_not_consistent: stats.not_consistent.clone().filter(|_| current),
            latest_point: points.and_then(|p| p.latest.clone()),
            latest_point_age_seconds: points
                .and_then(|p| p.latest_ms)
                .map(|t| now_ms.saturating_sub(t) as f64 / 1000.0),
            recovery_points: points.map(|p| p.count).unwrap_or(0),
            history_held_seconds: points
                .and_then(|p| p.oldest_ms)
                .map(|t| now_ms.saturating_sub(t) as f64 / 1000.0),
            history_asked_seconds: m.protected.then(|| m.policy.retention_ms() as f64 / 1000.0),
            journal_cap_reached: points.is_some_and(|p| p.cap_reached),
            test_failover: points.and_then(|p| p.test_failover.clone()),
            recovery_state: m.recovery.name().to_string(),
            failover,
            group: self.group_of(&m.name),
        }
    }
}

fn secret_eq(expected: &str, presented: &str) -> bool {
    let (a, b) = (expected.as_bytes(), presented.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn valid_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use 1-64 letters, digits, '-', '_' or '.'"
        ))
    }
}
#[cfg(test)]
mod tests;
