//! Unit tests of [`ConfigCore`]: every input is fed with an explicit `now`, and every test
//! asserts the exact response and the exact records to persist (as openraft's engine tests
//! assert the exact command list). No sockets, no sleeps: "dead" means `now` is moved past
//! `FAILURE_TIMEOUT`.
//!
use std::time::{Duration, Instant};

use haven_cluster::{
    ClusterMeta, DiskInfo, Epoch, Generation, MachineRecord, NodeRecord, ROLE_MASTER_TARGET,
    ROLE_PROCESS,
};
use haven_transport::identity::PeerIdentity;
use serde_json::json;

use super::*;

const JOIN_SECRET: &str = "join-secret-0123456789";
const ADMIN_SECRET: &str = "admin-secret-0123456789";
const KEY: [u8; 32] = [7; 32];
const KEY2: [u8; 32] = [9; 32];
const SEC: Duration = Duration::from_secs(1);
/// A moment at which a node or agent that last reported at `t0` counts as failed.
const DEAD: Duration = Duration::from_secs(FAILURE_TIMEOUT.as_secs() + 1);

// ---- fixtures ------------------------------------------------------------------------------

fn meta() -> ClusterMeta {
    ClusterMeta {
        cluster_id: "c0ffee".into(),
        join_secret: JOIN_SECRET.into(),
        admin_secret: ADMIN_SECRET.into(),
    }
}

fn disk(name: &str, size_bytes: u64) -> DiskInfo {
    DiskInfo {
        name: name.into(),
        size_bytes,
    }
}

fn web_disks() -> Vec<DiskInfo> {
    vec![disk("root", 1 << 30), disk("data", 4 << 30)]
}

fn node_record(name: &str, roles: &[&str], capacity: u32) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        addr: format!("{name}.example:7400"),
        capacity,
        drained: false,
    }
}

/// An enrolled, never protected machine, as `enroll` creates it.
fn discovered(name: &str) -> MachineRecord {
    MachineRecord {
        name: name.into(),
        hostname: format!("{name}-host"),
        disks: web_disks(),
        protected: false,
        epoch: Epoch(0),
        generation: Generation(0),
        process_server: None,
        master_target: None,
        data_key: vec![],
    }
}

/// A machine protected once, placed on `ps` and `mt`, as `protect` leaves it.
fn placed(name: &str, ps: &str, mt: &str) -> MachineRecord {
    MachineRecord {
        protected: true,
        epoch: Epoch(1),
        generation: Generation(1),
        process_server: Some(ps.into()),
        master_target: Some(mt.into()),
        data_key: KEY.to_vec(),
        ..discovered(name)
    }
}

fn node_join(name: &str, roles: &[&str], capacity: u32) -> JoinRequest {
    JoinRequest {
        secret: JOIN_SECRET.into(),
        kind: JoinKind::Node {
            name: name.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            addr: format!("{name}.example:7400"),
            capacity,
        },
    }
}

fn agent_join(machine: &str, hostname: &str, disks: Vec<DiskInfo>) -> JoinRequest {
    JoinRequest {
        secret: JOIN_SECRET.into(),
        kind: JoinKind::Agent {
            machine: machine.into(),
            hostname: hostname.into(),
            disks,
        },
    }
}

fn agent_id(machine: &str) -> PeerIdentity {
    PeerIdentity::Agent {
        machine: machine.into(),
    }
}

fn node_id(name: &str, roles: &[&str]) -> PeerIdentity {
    PeerIdentity::Node {
        name: name.into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
    }
}

fn stats(epoch: u32, captured_seq: u64, applied_seq: u64) -> AgentStats {
    AgentStats {
        epoch,
        captured_seq,
        cached_seq: captured_seq,
        applied_seq,
        ..Default::default()
    }
}

fn mt_report(machine: &str, applied_seq: u64) -> NodeMachineReport {
    NodeMachineReport {
        machine: machine.into(),
        role: ROLE_MASTER_TARGET.into(),
        applied_seq,
        epoch: 1,
        ..Default::default()
    }
}

fn ps_report(machine: &str, cached_seq: u64) -> NodeMachineReport {
    NodeMachineReport {
        machine: machine.into(),
        role: ROLE_PROCESS.into(),
        cached_seq,
        epoch: 1,
        ..Default::default()
    }
}

fn key_never_issued() -> Vec<u8> {
    panic!("no data key may be issued for this command")
}

/// A configuration core with a fixed origin of time; inputs take an offset from `t0`.
struct Cluster {
    core: ConfigCore,
    t0: Instant,
}

impl Cluster {
    fn new(nodes: Vec<NodeRecord>, machines: Vec<MachineRecord>) -> Self {
        Self {
            core: ConfigCore::new(meta(), nodes, machines),
            t0: Instant::now(),
        }
    }

    /// ps-a and ps-b (process, capacity 10), mt-a (master target, capacity 10), and the
    /// discovered machine `web`.
    fn standard() -> Self {
        Self::new(
            vec![
                node_record("ps-a", &[ROLE_PROCESS], 10),
                node_record("ps-b", &[ROLE_PROCESS], 10),
                node_record("mt-a", &[ROLE_MASTER_TARGET], 10),
            ],
            vec![discovered("web")],
        )
    }

    fn node_poll(&mut self, at: Duration, name: &str, machines: Vec<NodeMachineReport>) -> Outcome {
        let who = node_id(name, &[]);
        self.core.handle_node_poll(
            self.t0 + at,
            &who,
            NodeReport {
                name: name.into(),
                machines,
                ..Default::default()
            },
        )
    }

    /// Every node polls at `at` with no machine reports: they are all alive at `at`.
    fn all_nodes_poll(&mut self, at: Duration) {
        let names: Vec<String> = self.core.nodes.keys().cloned().collect();
        for n in names {
            let (r, p) = self.node_poll(at, &n, vec![]);
            assert!(matches!(r, Response::NodePoll(_)), "{n}: {r:?}");
            assert_eq!(p, vec![]);
        }
    }

    fn agent_poll(
        &mut self,
        at: Duration,
        machine: &str,
        stats: AgentStats,
        sync_done: Option<(u64, u64)>,
    ) -> Outcome {
        let report = AgentReport {
            machine: machine.into(),
            hostname: format!("{machine}-host"),
            disks: web_disks(),
            stats,
            sync_done,
            wait_ms: 0,
            report_seq: at.as_micros() as u64,
            ..Default::default()
        };
        self.core
            .handle_agent_poll(self.t0 + at, &agent_id(machine), report)
    }

    fn admin(&mut self, at: Duration, cmd: AdminCommand) -> Outcome {
        self.core
            .handle_admin(self.t0 + at, ADMIN_SECRET, cmd, key_never_issued)
    }

    fn protect(&mut self, at: Duration, machine: &str, key: [u8; 32]) -> Outcome {
        self.core.handle_admin(
            self.t0 + at,
            ADMIN_SECRET,
            AdminCommand::Protect {
                machine: machine.into(),
            },
            move || key.to_vec(),
        )
    }

    fn machines(&mut self, at: Duration) -> Vec<MachineView> {
        match self.admin(at, AdminCommand::Machines) {
            (Response::Admin(AdminReply::Machines(m)), p) if p.is_empty() => m,
            other => panic!("unexpected: {other:?}"),
        }
    }

    fn machine(&mut self, at: Duration, name: &str) -> MachineView {
        self.machines(at)
            .into_iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no machine {name}"))
    }

    fn nodes(&mut self, at: Duration) -> Vec<NodeView> {
        match self.admin(at, AdminCommand::Nodes) {
            (Response::Admin(AdminReply::Nodes(n)), p) if p.is_empty() => n,
            other => panic!("unexpected: {other:?}"),
        }
    }

    fn request_sync(&mut self, at: Duration, machine: &str) -> u64 {
        match self.admin(
            at,
            AdminCommand::RequestSync {
                machine: machine.into(),
            },
        ) {
            (Response::Admin(AdminReply::SyncRequested { id }), p) if p.is_empty() => id,
            other => panic!("unexpected: {other:?}"),
        }
    }

    /// (barrier_seq, applied_seq, done)
    fn sync_state(&mut self, at: Duration, machine: &str, id: u64) -> (Option<u64>, u64, bool) {
        match self.admin(
            at,
            AdminCommand::SyncState {
                machine: machine.into(),
                id,
            },
        ) {
            (
                Response::Admin(AdminReply::SyncState {
                    barrier_seq,
                    applied_seq,
                    done,
                }),
                p,
            ) if p.is_empty() => (barrier_seq, applied_seq, done),
            other => panic!("unexpected: {other:?}"),
        }
    }
}

#[track_caller]
fn refused_with(outcome: Outcome, expected: &str) {
    match outcome {
        (Response::Refused { reason }, persist) => {
            assert_eq!(reason, expected);
            assert_eq!(persist, vec![], "a refusal persists nothing");
        }
        other => panic!("expected a refusal ({expected:?}), got {other:?}"),
    }
}

#[track_caller]
fn done_with(outcome: Outcome, expected_message: &str) -> Vec<Persist> {
    match outcome {
        (Response::Admin(AdminReply::Done { message }), persist) => {
            assert_eq!(message, expected_message);
            persist
        }
        other => panic!("expected Done({expected_message:?}), got {other:?}"),
    }
}

#[track_caller]
fn agent_reply(outcome: Outcome) -> (AgentPollReply, Vec<Persist>) {
    match outcome {
        (Response::AgentPoll(r), p) => (r, p),
        other => panic!("expected an agent poll reply, got {other:?}"),
    }
}

#[track_caller]
fn assignments(outcome: Outcome) -> Vec<Assignment> {
    match outcome {
        (Response::NodePoll(r), p) => {
            assert_eq!(p, vec![], "a node poll persists nothing");
            r.assignments
        }
        other => panic!("expected a node poll reply, got {other:?}"),
    }
}

/// The poll reply as a comparable tuple: (protected, epoch, generation, process server, sync).
fn reply_tuple(
    r: &AgentPollReply,
) -> (bool, u32, Generation, Option<(String, String)>, Option<u64>) {
    (
        r.protected,
        r.epoch,
        r.generation,
        r.process_server.clone(),
        r.sync_request,
    )
}

fn ps(name: &str) -> Option<(String, String)> {
    Some((name.into(), format!("{name}.example:7400")))
}

fn assignment(machine: &MachineRecord, mt_addr: &str) -> Assignment {
    Assignment {
        machine: machine.name.clone(),
        epoch: machine.epoch,
        generation: machine.generation,
        disks: machine.disks.clone(),
        process_server: machine.process_server.clone().expect("placed"),
        master_target: machine.master_target.clone().expect("placed"),
        master_target_addr: mt_addr.into(),
        data_key: serde_bytes::ByteBuf::from(machine.data_key.clone()),
    }
}

// ---- join ----------------------------------------------------------------------------------

#[test]
fn node_join_with_the_join_secret_yields_a_node_identity_and_persists_the_node() {
    let mut c = Cluster::new(vec![], vec![]);
    let (identity, persist) = c
        .core
        .handle_join(&node_join("ps-a", &[ROLE_PROCESS, ROLE_MASTER_TARGET], 50))
        .expect("join");
    assert_eq!(
        identity,
        node_id("ps-a", &[ROLE_PROCESS, ROLE_MASTER_TARGET])
    );
    assert_eq!(
        persist,
        vec![Persist::Node(node_record(
            "ps-a",
            &[ROLE_PROCESS, ROLE_MASTER_TARGET],
            50
        ))]
    );
    // The node is now a member: it may poll.
    assert_eq!(assignments(c.node_poll(SEC, "ps-a", vec![])), vec![]);
}

#[test]
fn node_rejoin_keeps_the_drained_flag() {
    let mut drained = node_record("ps-a", &[ROLE_PROCESS], 10);
    drained.drained = true;
    let mut c = Cluster::new(vec![drained], vec![]);
    let (_, persist) = c
        .core
        .handle_join(&node_join("ps-a", &[ROLE_PROCESS], 20))
        .expect("join");
    assert_eq!(
        persist,
        vec![Persist::Node(NodeRecord {
            capacity: 20,
            drained: true,
            ..node_record("ps-a", &[ROLE_PROCESS], 20)
        })]
    );
}

#[test]
fn agent_join_yields_an_agent_identity_and_persists_a_discovered_machine() {
    let mut c = Cluster::new(vec![], vec![]);
    let (identity, persist) = c
        .core
        .handle_join(&agent_join("web", "web-host", web_disks()))
        .expect("join");
    assert_eq!(identity, agent_id("web"));
    assert_eq!(persist, vec![Persist::Machine(discovered("web"))]);
}

#[test]
fn join_with_a_wrong_secret_is_refused_and_records_nothing() {
    let mut c = Cluster::new(vec![], vec![]);
    let wrong = [
        String::new(),
        "join-secret-0123456788".into(),
        "join-secret-012345678".into(),
        format!("{JOIN_SECRET}0"),
        ADMIN_SECRET.into(),
    ];
    for secret in wrong {
        for mut req in [
            node_join("ps-a", &[ROLE_PROCESS], 10),
            agent_join("web", "web-host", web_disks()),
        ] {
            req.secret = secret.clone();
            assert_eq!(
                c.core.handle_join(&req),
                Err("invalid join token".to_string()),
                "secret {secret:?}"
            );
        }
    }
    // Nothing was recorded in memory either.
    assert_eq!(c.nodes(SEC).len(), 0);
    assert_eq!(c.machines(SEC).len(), 0);
    refused_with(
        c.node_poll(SEC, "ps-a", vec![]),
        "node ps-a is not a member of this cluster",
    );
}

#[test]
fn invalid_names_are_refused() {
    let mut c = Cluster::new(vec![], vec![]);
    let long = "x".repeat(65);
    for bad in [
        "",
        ".",
        "..",
        ".hidden",
        "a/b",
        "../etc",
        "a b",
        "tab\t",
        "é",
        "a:b",
        long.as_str(),
    ] {
        let expected = Err(format!(
            "invalid name {bad:?}: use 1-64 letters, digits, '-', '_' or '.'"
        ));
        assert_eq!(
            c.core.handle_join(&node_join(bad, &[ROLE_PROCESS], 10)),
            expected,
            "node {bad:?}"
        );
        assert_eq!(
            c.core.handle_join(&agent_join(bad, "h", web_disks())),
            expected,
            "machine {bad:?}"
        );
        assert_eq!(
            c.core
                .handle_join(&agent_join("web", "h", vec![disk("root", 1), disk(bad, 1)])),
            expected,
            "disk {bad:?}"
        );
    }
    assert_eq!(c.nodes(SEC).len(), 0);
    assert_eq!(
        c.machines(SEC).len(),
        0,
        "a machine with an invalid disk name is not enrolled"
    );

    // The limits themselves are accepted.
    let longest = "y".repeat(64);
    for good in ["a", "A-z_0.9", longest.as_str()] {
        assert!(
            c.core
                .handle_join(&node_join(good, &[ROLE_PROCESS], 1))
                .is_ok(),
            "{good:?}"
        );
    }
}

#[test]
fn a_node_without_roles_is_refused() {
    let mut c = Cluster::new(vec![], vec![]);
    assert_eq!(
        c.core.handle_join(&node_join("ps-a", &[], 10)),
        Err("a node needs at least one role".to_string())
    );
    assert_eq!(c.nodes(SEC).len(), 0);
}

#[test]
fn reenrolling_an_unchanged_machine_persists_nothing_new() {
    let mut c = Cluster::new(vec![], vec![discovered("web")]);
    // Never protected: the identical record is written again (an idempotent put), nothing new.
    let (_, persist) = c
        .core
        .handle_join(&agent_join("web", "web-host", web_disks()))
        .expect("join");
    assert_eq!(persist, vec![Persist::Machine(discovered("web"))]);

    // Protected (or once protected): nothing at all is written.
    let mut c = Cluster::new(vec![], vec![placed("web", "ps-a", "mt-a")]);
    let (_, persist) = c
        .core
        .handle_join(&agent_join("web", "web-host", web_disks()))
        .expect("join");
    assert_eq!(persist, vec![]);
    let mut unprotected = placed("web", "ps-a", "mt-a");
    unprotected.protected = false;
    let mut c = Cluster::new(vec![], vec![unprotected]);
    let (_, persist) = c
        .core
        .handle_join(&agent_join("web", "web-host", web_disks()))
        .expect("join");
    assert_eq!(persist, vec![]);
}

#[test]
fn reenrolling_with_changed_disks_or_hostname_persists_the_update_and_keeps_the_placement() {
    let mut c = Cluster::new(vec![], vec![placed("web", "ps-a", "mt-a")]);
    let disks = vec![disk("root", 1 << 30), disk("data", 8 << 30)];
    let (_, persist) = c
        .core
        .handle_join(&agent_join("web", "web-host", disks.clone()))
        .expect("join");
    assert_eq!(
        persist,
        vec![Persist::Machine(MachineRecord {
            disks: disks.clone(),
            ..placed("web", "ps-a", "mt-a")
        })]
    );

    let (_, persist) = c
        .core
        .handle_join(&agent_join("web", "web2", disks.clone()))
        .expect("join");
    assert_eq!(
        persist,
        vec![Persist::Machine(MachineRecord {
            hostname: "web2".into(),
            disks,
            ..placed("web", "ps-a", "mt-a")
        })]
    );
}

// ---- agent poll ----------------------------------------------------------------------------

#[test]
fn an_agent_may_only_report_for_its_own_machine() {
    let mut c = Cluster::new(
        vec![node_record("ps-a", &[ROLE_PROCESS], 10)],
        vec![discovered("web"), discovered("db")],
    );
    let report = AgentReport {
        machine: "db".into(),
        hostname: "db-host".into(),
        disks: web_disks(),
        stats: stats(0, 9, 9),
        sync_done: None,
        wait_ms: 0,
        report_seq: 0,
        ..Default::default()
    };
    refused_with(
        c.core
            .handle_agent_poll(c.t0, &agent_id("web"), report.clone()),
        "agent web may not report for db",
    );
    refused_with(
        c.core
            .handle_agent_poll(c.t0, &node_id("ps-a", &[ROLE_PROCESS]), report.clone()),
        "only an agent may poll as an agent",
    );
    refused_with(
        c.core
            .handle_agent_poll(c.t0, &node_id("db", &[ROLE_PROCESS]), report),
        "only an agent may poll as an agent",
    );
    // The refused reports were not recorded as db's.
    let db = c.machine(SEC, "db");
    assert_eq!((db.agent_last_seen_ms_ago, db.captured_seq), (None, 0));
}

#[test]
fn an_unknown_agent_is_enrolled_from_its_poll() {
    let mut c = Cluster::new(vec![], vec![]);
    let (reply, persist) = agent_reply(c.agent_poll(Duration::ZERO, "web", stats(0, 0, 0), None));
    assert_eq!(persist, vec![Persist::Machine(discovered("web"))]);
    assert_eq!(reply_tuple(&reply), (false, 0, Generation(0), None, None));
    // Known from now on: the next poll persists nothing.
    let (_, persist) = agent_reply(c.agent_poll(SEC, "web", stats(0, 0, 0), None));
    assert_eq!(persist, vec![]);
}

#[test]
fn agent_poll_reply_carries_the_protection_and_the_process_server() {
    let mut c = Cluster::standard();
    let (reply, persist) = agent_reply(c.agent_poll(Duration::ZERO, "web", stats(0, 0, 0), None));
    assert_eq!(persist, vec![]);
    assert_eq!(reply_tuple(&reply), (false, 0, Generation(0), None, None));

    c.all_nodes_poll(Duration::ZERO);
    c.protect(SEC, "web", KEY);
    let (reply, persist) = agent_reply(c.agent_poll(SEC, "web", stats(0, 0, 0), None));
    assert_eq!(persist, vec![]);
    // ps-a and ps-b tie on headroom: the name breaks the tie.
    assert_eq!(
        reply_tuple(&reply),
        (true, 1, Generation(1), ps("ps-a"), None)
    );
}

#[test]
fn agent_poll_reply_omits_a_process_server_that_is_not_a_member() {
    let mut c = Cluster::new(vec![], vec![placed("web", "gone", "mt-a")]);
    let (reply, _) = agent_reply(c.agent_poll(Duration::ZERO, "web", stats(1, 0, 0), None));
    assert_eq!(reply_tuple(&reply), (true, 1, Generation(1), None, None));
}

// ---- node poll -----------------------------------------------------------------------------

#[test]
fn node_poll_is_for_members_reporting_for_themselves() {
    let mut c = Cluster::standard();
    let report = NodeReport {
        name: "ps-b".into(),
        machines: vec![],
        ..Default::default()
    };
    refused_with(
        c.core
            .handle_node_poll(c.t0, &node_id("ps-a", &[ROLE_PROCESS]), report.clone()),
        "node ps-a may not report for ps-b",
    );
    refused_with(
        c.core.handle_node_poll(c.t0, &agent_id("ps-b"), report),
        "only a node may poll as a node",
    );
    refused_with(
        c.node_poll(Duration::ZERO, "ghost", vec![]),
        "node ghost is not a member of this cluster",
    );
    // None of the refused polls made a node alive.
    let alive: Vec<(String, bool)> = c
        .nodes(SEC)
        .into_iter()
        .map(|n| (n.name, n.alive))
        .collect();
    assert_eq!(
        alive,
        vec![
            ("mt-a".into(), false),
            ("ps-a".into(), false),
            ("ps-b".into(), false)
        ]
    );
}

#[test]
fn node_poll_assigns_exactly_the_protected_machines_placed_on_the_node() {
    let web = placed("web", "ps-a", "mt-a");
    let db = MachineRecord {
        data_key: KEY2.to_vec(),
        ..placed("db", "ps-b", "mt-a")
    };
    let mut idle = placed("idle", "ps-a", "mt-a");
    idle.protected = false; // unprotected, still carrying its old placement
    let mut c = Cluster::new(
        vec![
            node_record("ps-a", &[ROLE_PROCESS], 10),
            node_record("ps-b", &[ROLE_PROCESS], 10),
            node_record("mt-a", &[ROLE_MASTER_TARGET], 10),
        ],
        vec![web.clone(), db.clone(), idle, discovered("new")],
    );
    let mt_addr = "mt-a.example:7400";
    assert_eq!(
        assignments(c.node_poll(Duration::ZERO, "ps-a", vec![])),
        vec![assignment(&web, mt_addr)]
    );
    assert_eq!(
        assignments(c.node_poll(Duration::ZERO, "ps-b", vec![])),
        vec![assignment(&db, mt_addr)]
    );
    // The master target serves both, in name order.
    assert_eq!(
        assignments(c.node_poll(Duration::ZERO, "mt-a", vec![])),
        vec![assignment(&db, mt_addr), assignment(&web, mt_addr)]
    );

    // Unprotecting web takes it off both of its nodes.
    let persist = done_with(
        c.admin(
            SEC,
            AdminCommand::Unprotect {
                machine: "web".into(),
            },
        ),
        "web unprotected; its replica stays on mt-a",
    );
    assert_eq!(
        persist,
        vec![Persist::Machine(MachineRecord {
            protected: false,
            generation: Generation(2),
            ..web
        })]
    );
    assert_eq!(assignments(c.node_poll(SEC, "ps-a", vec![])), vec![]);
    assert_eq!(
        assignments(c.node_poll(SEC, "mt-a", vec![])),
        vec![assignment(&db, mt_addr)]
    );
}

#[test]
fn an_all_in_one_node_gets_each_machine_once() {
    let web = placed("web", "aio", "aio");
    let mut c = Cluster::new(
        vec![node_record("aio", &[ROLE_PROCESS, ROLE_MASTER_TARGET], 10)],
        vec![web.clone()],
    );
    assert_eq!(
        assignments(c.node_poll(Duration::ZERO, "aio", vec![])),
        vec![assignment(&web, "aio.example:7400")]
    );
}

#[test]
fn a_machine_whose_master_target_left_is_not_assigned() {
    let mut c = Cluster::new(
        vec![node_record("ps-a", &[ROLE_PROCESS], 10)],
        vec![placed("web", "ps-a", "gone")],
    );
    assert_eq!(
        assignments(c.node_poll(Duration::ZERO, "ps-a", vec![])),
        vec![]
    );
}

// ---- protect / unprotect -------------------------------------------------------------------

#[test]
fn protect_places_the_machine_bumps_epoch_and_generation_and_issues_the_key() {
    let mut c = Cluster::standard();
    c.all_nodes_poll(Duration::ZERO);
    let persist = done_with(
        c.protect(SEC, "web", KEY),
        "web protected: process server ps-a, master target mt-a, epoch 1",
    );
    assert_eq!(
        persist,
        vec![Persist::Machine(placed("web", "ps-a", "mt-a"))]
    );
}

#[test]
fn protect_picks_the_process_server_with_most_headroom() {
    // ps-a already serves two machines, ps-b one; ps-c has more capacity but is drained,
    // ps-d has the most capacity but is dead.
    let mut ps_c = node_record("ps-c", &[ROLE_PROCESS], 100);
    ps_c.drained = true;
    let mut c = Cluster::new(
        vec![
            node_record("ps-a", &[ROLE_PROCESS], 10),
            node_record("ps-b", &[ROLE_PROCESS], 10),
            ps_c,
            node_record("ps-d", &[ROLE_PROCESS], 1000),
            node_record("mt-a", &[ROLE_MASTER_TARGET], 10),
            node_record("mt-b", &[ROLE_MASTER_TARGET], 10),
        ],
        vec![
            placed("m1", "ps-a", "mt-a"),
            placed("m2", "ps-a", "mt-a"),
            placed("m3", "ps-b", "mt-b"),
            discovered("web"),
        ],
    );
    c.node_poll(Duration::ZERO, "ps-d", vec![]);
    for n in ["ps-a", "ps-b", "ps-c", "mt-a", "mt-b"] {
        c.node_poll(DEAD, n, vec![]);
    }
    let persist = done_with(
        c.protect(DEAD, "web", KEY),
        "web protected: process server ps-b, master target mt-b, epoch 1",
    );
    assert_eq!(
        persist,
        vec![Persist::Machine(placed("web", "ps-b", "mt-b"))]
    );
}

#[test]
fn protect_refuses_an_unknown_machine() {
    let mut c = Cluster::standard();
    c.all_nodes_poll(Duration::ZERO);
    let o = c.core.handle_admin(
        c.t0,
        ADMIN_SECRET,
        AdminCommand::Protect {
            machine: "zzz".into(),
        },
        key_never_issued,
    );
    refused_with(
        o,
        "no machine named \"zzz\"; enroll it with `haven agent` first",
    );
}

#[test]
fn protect_needs_a_live_process_server_and_master_target() {
    let mut c = Cluster::standard();
    let protect = |c: &mut Cluster, at: Duration| {
        c.core.handle_admin(
            c.t0 + at,
            ADMIN_SECRET,
            AdminCommand::Protect {
                machine: "web".into(),
            },
            key_never_issued,
        )
    };

    // Nobody has polled since this configuration node started.
    refused_with(
        protect(&mut c, Duration::ZERO),
        "no live process server to place the machine on",
    );

    // Only the master target is alive.
    c.node_poll(Duration::ZERO, "mt-a", vec![]);
    refused_with(
        protect(&mut c, SEC),
        "no live process server to place the machine on",
    );

    // Process servers alive, but the master target's last poll is a failure timeout old.
    c.node_poll(FAILURE_TIMEOUT, "ps-a", vec![]);
    c.node_poll(FAILURE_TIMEOUT, "ps-b", vec![]);
    refused_with(
        protect(&mut c, FAILURE_TIMEOUT),
        "no live master target to place the machine on",
    );

    // The refusals changed nothing.
    let (reply, _) = agent_reply(c.agent_poll(FAILURE_TIMEOUT, "web", stats(0, 0, 0), None));
    assert_eq!(reply_tuple(&reply), (false, 0, Generation(0), None, None));

    // Just inside the timeout the master target is alive.
    c.node_poll(FAILURE_TIMEOUT, "mt-a", vec![]);
    let at = FAILURE_TIMEOUT + FAILURE_TIMEOUT - Duration::from_millis(1);
    let persist = done_with(
        c.protect(at, "web", KEY),
        "web protected: process server ps-a, master target mt-a, epoch 1",
    );
    assert_eq!(
        persist,
        vec![Persist::Machine(placed("web", "ps-a", "mt-a"))]
    );
}

#[test]
fn protecting_twice_is_a_no_op() {
    let mut c = Cluster::standard();
    c.all_nodes_poll(Duration::ZERO);
    c.protect(Duration::ZERO, "web", KEY);
    let o = c.core.handle_admin(
        c.t0 + SEC,
        ADMIN_SECRET,
        AdminCommand::Protect {
            machine: "web".into(),
        },
        key_never_issued,
    );
    assert_eq!(done_with(o, "web is already protected"), vec![]);
    let (reply, _) = agent_reply(c.agent_poll(SEC, "web", stats(1, 0, 0), None));
    assert_eq!(
        reply_tuple(&reply),
        (true, 1, Generation(1), ps("ps-a"), None)
    );
}

#[test]
fn unprotect_bumps_the_generation_and_reprotect_starts_a_new_epoch_with_a_new_key() {
    let mut c = Cluster::standard();
    c.all_nodes_poll(Duration::ZERO);
    c.protect(Duration::ZERO, "web", KEY);

    let persist = done_with(
        c.admin(
            SEC,
            AdminCommand::Unprotect {
                machine: "web".into(),
            },
        ),
        "web unprotected; its replica stays on mt-a",
    );
    let unprotected = MachineRecord {
        protected: false,
        generation: Generation(2),
        ..placed("web", "ps-a", "mt-a")
    };
    assert_eq!(persist, vec![Persist::Machine(unprotected)]);
    let (reply, _) = agent_reply(c.agent_poll(SEC, "web", stats(1, 0, 0), None));
    // The old placement stays in the record (and the reply) but protected is false.
    assert_eq!(
        reply_tuple(&reply),
        (false, 1, Generation(2), ps("ps-a"), None)
    );

    assert_eq!(
        done_with(
            c.admin(
                SEC,
                AdminCommand::Unprotect {
                    machine: "web".into()
                }
            ),
            "web is not protected"
        ),
        vec![]
    );
    refused_with(
        c.admin(
            SEC,
            AdminCommand::Unprotect {
                machine: "zzz".into(),
            },
        ),
        "no machine named \"zzz\"",
    );

    let persist = done_with(
        c.protect(2 * SEC, "web", KEY2),
        "web protected: process server ps-a, master target mt-a, epoch 2",
    );
    let reprotected = MachineRecord {
        epoch: Epoch(2),
        generation: Generation(3),
        data_key: KEY2.to_vec(),
        ..placed("web", "ps-a", "mt-a")
    };
    assert_eq!(persist, vec![Persist::Machine(reprotected)]);
}

#[test]
fn admin_commands_need_the_admin_secret() {
    let mut c = Cluster::standard();
    c.all_nodes_poll(Duration::ZERO);
    let commands = || {
        vec![
            AdminCommand::Status,
            AdminCommand::Nodes,
            AdminCommand::Machines,
            AdminCommand::Protect {
                machine: "web".into(),
            },
            AdminCommand::Unprotect {
                machine: "web".into(),
            },
            AdminCommand::RequestSync {
                machine: "web".into(),
            },
            AdminCommand::SyncState {
                machine: "web".into(),
                id: 1,
            },
        ]
    };
    for secret in [
        "",
        JOIN_SECRET,
        "admin-secret-0123456788",
        "admin-secret-01234567890",
    ] {
        for cmd in commands() {
            refused_with(
                c.core.handle_admin(c.t0, secret, cmd, key_never_issued),
                "invalid admin token",
            );
        }
    }
    assert_eq!(c.machine(SEC, "web").state, "discovered");
}

// ---- sync barriers -------------------------------------------------------------------------

/// `web` protected on ps-a / mt-a, every node and the agent reporting at `t0`.
fn protected_web() -> Cluster {
    let mut c = Cluster::standard();
    c.all_nodes_poll(Duration::ZERO);
    c.protect(Duration::ZERO, "web", KEY);
    c.agent_poll(Duration::ZERO, "web", stats(1, 0, 0), None);
    c
}

#[test]
fn request_sync_needs_a_protected_machine() {
    let mut c = Cluster::standard();
    refused_with(
        c.admin(
            Duration::ZERO,
            AdminCommand::RequestSync {
                machine: "web".into(),
            },
        ),
        "web is not protected",
    );
    refused_with(
        c.admin(
            Duration::ZERO,
            AdminCommand::RequestSync {
                machine: "zzz".into(),
            },
        ),
        "no machine named \"zzz\"",
    );
    let (reply, _) = agent_reply(c.agent_poll(Duration::ZERO, "web", stats(0, 0, 0), None));
    assert_eq!(reply.sync_request, None);
}

#[test]
fn a_barrier_is_done_once_the_agent_reports_it_and_its_seq_is_applied() {
    let mut c = protected_web();
    let id = c.request_sync(SEC, "web");
    assert_eq!(c.sync_state(SEC, "web", id), (None, 0, false));

    // The next agent poll asks for the barrier, and keeps asking until it is reported.
    let (reply, _) = agent_reply(c.agent_poll(SEC, "web", stats(1, 10, 10), None));
    assert_eq!(reply.sync_request, Some(id));
    let (reply, _) = agent_reply(c.agent_poll(2 * SEC, "web", stats(1, 30, 10), None));
    assert_eq!(reply.sync_request, Some(id));
    assert_eq!(c.sync_state(2 * SEC, "web", id), (None, 10, false));

    // The agent captured everything through 40.
    let (reply, _) = agent_reply(c.agent_poll(3 * SEC, "web", stats(1, 40, 30), Some((id, 40))));
    assert_eq!(reply.sync_request, None);
    assert_eq!(c.sync_state(3 * SEC, "web", id), (Some(40), 30, false));

    // A later report of the same barrier does not move it.
    c.agent_poll(3 * SEC, "web", stats(1, 45, 30), Some((id, 45)));
    assert_eq!(c.sync_state(3 * SEC, "web", id), (Some(40), 30, false));

    // The agent's own applied seq reaching the barrier completes it.
    c.agent_poll(4 * SEC, "web", stats(1, 45, 40), Some((id, 45)));
    assert_eq!(c.sync_state(4 * SEC, "web", id), (Some(40), 40, true));
}

#[test]
fn the_master_target_report_completes_a_barrier_and_a_process_server_report_does_not() {
    let mut c = protected_web();
    let id = c.request_sync(SEC, "web");
    c.agent_poll(SEC, "web", stats(1, 40, 20), Some((id, 40)));
    assert_eq!(c.sync_state(SEC, "web", id), (Some(40), 20, false));

    // A process server's applied seq is hearsay: it is not counted.
    let mut ps_says = ps_report("web", 40);
    ps_says.applied_seq = 40;
    c.node_poll(SEC, "ps-a", vec![ps_says]);
    assert_eq!(c.sync_state(SEC, "web", id), (Some(40), 20, false));

    c.node_poll(
        2 * SEC,
        "mt-a",
        vec![mt_report("web", 39), mt_report("other", 99)],
    );
    assert_eq!(c.sync_state(2 * SEC, "web", id), (Some(40), 39, false));
    c.node_poll(3 * SEC, "mt-a", vec![mt_report("web", 41)]);
    assert_eq!(c.sync_state(3 * SEC, "web", id), (Some(40), 41, true));
}

#[test]
fn a_stale_barrier_id_is_never_done() {
    let mut c = protected_web();
    let old = c.request_sync(SEC, "web");
    let new = c.request_sync(SEC, "web");
    assert_eq!(new, old + 1);

    // The agent completes the old barrier: it does not count for the new one.
    let (reply, _) = agent_reply(c.agent_poll(2 * SEC, "web", stats(1, 40, 40), Some((old, 40))));
    assert_eq!(reply.sync_request, Some(new));
    assert_eq!(c.sync_state(2 * SEC, "web", old), (None, 40, false));
    assert_eq!(c.sync_state(2 * SEC, "web", new), (None, 40, false));

    c.agent_poll(3 * SEC, "web", stats(1, 50, 50), Some((new, 50)));
    assert_eq!(c.sync_state(3 * SEC, "web", new), (Some(50), 50, true));
    assert_eq!(c.sync_state(3 * SEC, "web", old), (None, 50, false));
    assert_eq!(c.sync_state(3 * SEC, "web", 99), (None, 50, false));
}

#[test]
fn unprotect_clears_the_barrier() {
    let mut c = protected_web();
    let id = c.request_sync(SEC, "web");
    c.admin(
        SEC,
        AdminCommand::Unprotect {
            machine: "web".into(),
        },
    );
    let (reply, _) = agent_reply(c.agent_poll(2 * SEC, "web", stats(1, 40, 40), Some((id, 40))));
    assert_eq!(reply.sync_request, None);
    // Polling a barrier of an unprotected machine is refused (wait-sync fails fast).
    refused_with(
        c.admin(
            2 * SEC,
            AdminCommand::SyncState {
                machine: "web".into(),
                id,
            },
        ),
        "web is not protected",
    );
}

// ---- status and machine views --------------------------------------------------------------

#[test]
fn a_discovered_machine_view() {
    let mut c = Cluster::standard();
    c.agent_poll(
        Duration::ZERO,
        "web",
        AgentStats {
            initial_sync_percent: Some(5.0),
            ..stats(0, 3, 1)
        },
        None,
    );
    let view = c.machine(Duration::from_millis(1500), "web");
    assert_eq!(
        serde_json::to_value(&view).unwrap(),
        json!({
            "name": "web",
            "hostname": "web-host",
            "state": "discovered",
            "initial_sync_percent": null,
            "degraded_reason": null,
            "process_server": null,
            "master_target": null,
            "generation": 0,
            "epoch": 0,
            "captured_seq": 3,
            "cached_seq": 3,
            "applied_seq": 1,
            "rpo_seconds": 0.0,
            "raw_bytes_sent": 0,
            "wire_bytes_sent": 0,
            "throughput_bytes_per_sec": 0,
            "retained_bytes": 0,
            "disks": [{"name": "root", "size_bytes": 1u64 << 30}, {"name": "data", "size_bytes": 4u64 << 30}],
            "agent_last_seen_ms_ago": 1500,
            "stream_restarts": 0,
            "batches_refused": 0,
            "cache_bytes": 0,
        })
    );
}

#[test]
fn initial_sync_then_replicating_with_counters_from_agent_and_nodes() {
    let mut c = protected_web();
    let agent_stats = AgentStats {
        last_move: None,
        epoch: 1,
        captured_seq: 100,
        cached_seq: 90,
        applied_seq: 80,
        oldest_unapplied_ms: 0,
        raw_bytes_sent: 1000,
        raw_bytes_captured: 1200,
        throughput_bps: 500,
        initial_sync_percent: Some(42.5),
        retained_bytes: 300,
        connected: true,
        degraded_reason: None,
        scans: 3,
        stream_restarts: 2,
    };
    c.agent_poll(SEC, "web", agent_stats.clone(), None);
    let ps_says = NodeMachineReport {
        cached_seq: 95,
        wire_bytes: 600,
        restarts: 1,
        ..ps_report("web", 95)
    };
    c.node_poll(SEC, "ps-a", vec![ps_says]);
    let mt_says = NodeMachineReport {
        batches_refused: 4,
        ..mt_report("web", 100)
    };
    c.node_poll(SEC, "mt-a", vec![mt_says]);
    c.node_poll(SEC, "ps-b", vec![]);

    let expected = |state: &str, percent: Option<f64>| {
        json!({
            "name": "web",
            "hostname": "web-host",
            "state": state,
            "initial_sync_percent": percent,
            "degraded_reason": null,
            "process_server": "ps-a",
            "master_target": "mt-a",
            "generation": 1,
            "epoch": 1,
            "captured_seq": 100,
            "cached_seq": 95,
            "applied_seq": 100,
            "rpo_seconds": 0.0,
            "raw_bytes_sent": 1000,
            "wire_bytes_sent": 600,
            "throughput_bytes_per_sec": 500,
            "retained_bytes": 300,
            "disks": [{"name": "root", "size_bytes": 1u64 << 30}, {"name": "data", "size_bytes": 4u64 << 30}],
            "agent_last_seen_ms_ago": 2000,
            "stream_restarts": 3,
            "batches_refused": 4,
            "cache_bytes": 0,
        })
    };
    assert_eq!(
        serde_json::to_value(c.machine(3 * SEC, "web")).unwrap(),
        expected("initial-sync", Some(42.5))
    );

    c.agent_poll(
        SEC,
        "web",
        AgentStats {
            initial_sync_percent: None,
            ..agent_stats
        },
        None,
    );
    assert_eq!(
        serde_json::to_value(c.machine(3 * SEC, "web")).unwrap(),
        expected("replicating", None)
    );
}

#[test]
fn rpo_is_the_age_of_the_oldest_unapplied_write_while_behind() {
    let mut c = protected_web();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let behind = AgentStats {
        oldest_unapplied_ms: now_ms - 3000,
        ..stats(1, 50, 40)
    };
    c.agent_poll(SEC, "web", behind.clone(), None);
    let view = c.machine(SEC, "web");
    assert_eq!(
        (view.state.as_str(), view.captured_seq, view.applied_seq),
        ("replicating", 50, 40)
    );
    // rpo_seconds is read from the wall clock, so only a range can be asserted.
    assert!(
        view.rpo_seconds >= 3.0 && view.rpo_seconds < 60.0,
        "rpo {}",
        view.rpo_seconds
    );

    // Once the master target has applied everything captured, the rpo is 0.
    c.node_poll(SEC, "mt-a", vec![mt_report("web", 50)]);
    assert_eq!(c.machine(SEC, "web").rpo_seconds, 0.0);

    // An unprotected machine has no rpo.
    c.agent_poll(SEC, "web", behind, None);
    c.node_poll(SEC, "mt-a", vec![]);
    assert!(c.machine(SEC, "web").rpo_seconds > 0.0);
    c.admin(
        SEC,
        AdminCommand::Unprotect {
            machine: "web".into(),
        },
    );
    assert_eq!(c.machine(SEC, "web").rpo_seconds, 0.0);
}

/// (state, degraded_reason) of `web` at `at`.
fn state_of(c: &mut Cluster, at: Duration) -> (String, Option<String>) {
    let v = c.machine(at, "web");
    (v.state, v.degraded_reason)
}

fn degraded(reason: &str) -> (String, Option<String>) {
    ("degraded".into(), Some(reason.into()))
}

#[test]
fn degraded_when_the_agent_is_silent() {
    let mut c = Cluster::standard();
    c.all_nodes_poll(Duration::ZERO);
    c.protect(Duration::ZERO, "web", KEY);
    // Never reported since this configuration node started.
    assert_eq!(
        state_of(&mut c, Duration::ZERO),
        degraded("agent is not reporting")
    );

    c.agent_poll(Duration::ZERO, "web", stats(1, 0, 0), None);
    let just_inside = FAILURE_TIMEOUT - Duration::from_millis(1);
    c.all_nodes_poll(just_inside);
    assert_eq!(state_of(&mut c, just_inside), ("replicating".into(), None));

    // Exactly a failure timeout after its last poll the agent counts as silent.
    assert_eq!(
        state_of(&mut c, FAILURE_TIMEOUT),
        degraded("agent is not reporting")
    );
    c.all_nodes_poll(DEAD);
    let view = c.machine(DEAD, "web");
    assert_eq!(
        (view.state.as_str(), view.agent_last_seen_ms_ago),
        ("degraded", Some(DEAD.as_millis() as u64))
    );
}

#[test]
fn degraded_reasons_in_order_of_precedence() {
    let mut c = protected_web();
    assert_eq!(state_of(&mut c, SEC), ("replicating".into(), None));

    // The agent has not switched to the new epoch yet.
    c.agent_poll(SEC, "web", stats(0, 0, 0), None);
    assert_eq!(
        state_of(&mut c, SEC),
        degraded("agent has not picked up the protection yet")
    );

    // The master target stopped reporting (the others keep polling).
    c.agent_poll(DEAD, "web", stats(0, 0, 0), None);
    c.node_poll(DEAD, "ps-a", vec![]);
    assert_eq!(
        state_of(&mut c, DEAD),
        degraded("master target mt-a is not reporting")
    );

    // The process server is silent too: it is named first.
    let later = DEAD + DEAD;
    c.agent_poll(later, "web", stats(0, 0, 0), None);
    assert_eq!(
        state_of(&mut c, later),
        degraded("process server ps-a is not reporting")
    );

    // The agent's own reason comes before the nodes'.
    let reason = "process server ps-a at ps-a.example:7400 unreachable: timed out";
    c.agent_poll(
        later,
        "web",
        AgentStats {
            degraded_reason: Some(reason.into()),
            ..stats(0, 0, 0)
        },
        None,
    );
    assert_eq!(state_of(&mut c, later), degraded(reason));

    // A degraded machine still in initial sync shows as degraded, with its progress.
    c.agent_poll(
        later,
        "web",
        AgentStats {
            initial_sync_percent: Some(10.0),
            ..stats(0, 0, 0)
        },
        None,
    );
    let v = c.machine(later, "web");
    assert_eq!(
        (v.state.as_str(), v.initial_sync_percent),
        ("degraded", Some(10.0))
    );

    // Everyone back: replicating again.
    c.agent_poll(later, "web", stats(1, 0, 0), None);
    c.all_nodes_poll(later);
    assert_eq!(state_of(&mut c, later), ("replicating".into(), None));
}

#[test]
fn node_views_report_liveness_load_and_capacity() {
    let mut ps_b = node_record("ps-b", &[ROLE_PROCESS], 10);
    ps_b.drained = true;
    let mut c = Cluster::new(
        vec![
            node_record("ps-a", &[ROLE_PROCESS], 10),
            ps_b,
            node_record("mt-a", &[ROLE_MASTER_TARGET], 20),
        ],
        vec![
            placed("web", "ps-a", "mt-a"),
            placed("db", "ps-a", "mt-a"),
            MachineRecord {
                protected: false,
                ..placed("old", "ps-a", "mt-a")
            },
        ],
    );
    c.node_poll(Duration::ZERO, "mt-a", vec![]);
    c.node_poll(DEAD, "ps-a", vec![]);
    let views = serde_json::to_value(c.nodes(DEAD + Duration::from_millis(250))).unwrap();
    assert_eq!(
        views,
        json!([
            {"name": "mt-a", "roles": ["master-target"], "addr": "mt-a.example:7400", "alive": false,
             "last_seen_ms_ago": DEAD.as_millis() as u64 + 250, "machines": 2, "capacity": 20, "drained": false,
             "bytes_in_per_sec": 0, "bytes_out_per_sec": 0, "cache_bytes": 0},
            {"name": "ps-a", "roles": ["process"], "addr": "ps-a.example:7400", "alive": true,
             "last_seen_ms_ago": 250, "machines": 2, "capacity": 10, "drained": false,
             "bytes_in_per_sec": 0, "bytes_out_per_sec": 0, "cache_bytes": 0},
            {"name": "ps-b", "roles": ["process"], "addr": "ps-b.example:7400", "alive": false,
             "last_seen_ms_ago": null, "machines": 0, "capacity": 10, "drained": true,
             "bytes_in_per_sec": 0, "bytes_out_per_sec": 0, "cache_bytes": 0},
        ])
    );
}

#[test]
fn status_combines_cluster_id_nodes_and_machines() {
    let mut c = protected_web();
    let status = match c.admin(SEC, AdminCommand::Status) {
        (Response::Admin(AdminReply::Status(s)), p) if p.is_empty() => s,
        other => panic!("unexpected: {other:?}"),
    };
    assert_eq!(status.cluster_id, "c0ffee");
    assert_eq!(
        serde_json::to_value(&status.nodes).unwrap(),
        serde_json::to_value(c.nodes(SEC)).unwrap()
    );
    assert_eq!(
        serde_json::to_value(&status.machines).unwrap(),
        serde_json::to_value(c.machines(SEC)).unwrap()
    );
    let names: Vec<&str> = status.machines.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, vec!["web"]);
}

// ---- regressions of bugs found by these tests ------------------------------------------------------

/// On an all-in-one node the report holds two entries per machine (process, then master
/// target). `machine_view` looks both up by machine name only, so the master target's
/// `batches_refused` is read from the process entry (always 0).
#[test]
fn all_in_one_node_batches_refused_come_from_the_master_target_entry() {
    let mut c = Cluster::new(
        vec![node_record("aio", &[ROLE_PROCESS, ROLE_MASTER_TARGET], 10)],
        vec![placed("web", "aio", "aio")],
    );
    c.agent_poll(Duration::ZERO, "web", stats(1, 10, 10), None);
    let ps_says = NodeMachineReport {
        wire_bytes: 600,
        ..ps_report("web", 10)
    };
    let mt_says = NodeMachineReport {
        batches_refused: 2,
        ..mt_report("web", 10)
    };
    c.node_poll(Duration::ZERO, "aio", vec![ps_says, mt_says]);
    let v = c.machine(SEC, "web");
    assert_eq!((v.wire_bytes_sent, v.batches_refused), (600, 2));
}

/// `applied_seq` is the max over every node's last master-target report for the machine,
/// whether or not that node is still the machine's master target (or alive). After a
/// reprotect onto another master target, the old one's stale applied_seq completes a barrier
/// the new master target has not applied.
#[test]
fn a_former_master_targets_report_does_not_complete_a_barrier() {
    let mut c = Cluster::new(
        vec![
            node_record("ps-a", &[ROLE_PROCESS], 10),
            node_record("mt-a", &[ROLE_MASTER_TARGET], 10),
            node_record("mt-b", &[ROLE_MASTER_TARGET], 5),
        ],
        vec![placed("web", "ps-a", "mt-a")],
    );
    c.node_poll(Duration::ZERO, "mt-a", vec![mt_report("web", 1000)]);
    c.admin(
        Duration::ZERO,
        AdminCommand::Unprotect {
            machine: "web".into(),
        },
    );
    // mt-a fails; web is protected again, onto mt-b, in epoch 2 (seqs start over).
    c.node_poll(DEAD, "ps-a", vec![]);
    c.node_poll(DEAD, "mt-b", vec![]);
    done_with(
        c.protect(DEAD, "web", KEY2),
        "web protected: process server ps-a, master target mt-b, epoch 2",
    );
    c.agent_poll(DEAD, "web", stats(2, 50, 0), None);
    let id = c.request_sync(DEAD, "web");
    c.agent_poll(DEAD, "web", stats(2, 50, 0), Some((id, 50)));
    assert_eq!(c.sync_state(DEAD, "web", id), (Some(50), 0, false));
}

/// Barrier ids restart at 1 with every `ConfigCore` (a configuration node restart), while an
/// agent may still hold `sync_done` for an id of the previous incarnation; that report then
/// completes the new barrier at a seq captured before it was requested.
#[test]
fn barrier_ids_are_not_reused_after_a_restart() {
    let mut before = protected_web();
    let old_id = before.request_sync(SEC, "web");
    let records = vec![placed("web", "ps-a", "mt-a")];
    let mut after = Cluster::new(
        vec![
            node_record("ps-a", &[ROLE_PROCESS], 10),
            node_record("mt-a", &[ROLE_MASTER_TARGET], 10),
        ],
        records,
    );
    let new_id = after.request_sync(SEC, "web");
    assert_ne!(new_id, old_id);
}
#[path = "scaleout_tests.rs"]
mod scaleout_tests;

/// A long poll held by the server and answered late carries an older report than one the
/// agent sent meanwhile: it must not overwrite it.
#[test]
fn a_late_report_does_not_overwrite_a_newer_one() {
    let mut c = protected_web();
    let newer = AgentReport {
        machine: "web".into(),
        hostname: "web-host".into(),
        disks: web_disks(),
        stats: stats(1, 50, 50),
        sync_done: None,
        wait_ms: 0,
        report_seq: 20,
        ..Default::default()
    };
    let older = AgentReport {
        stats: stats(1, 10, 0),
        report_seq: 10,
        ..newer.clone()
    };
    c.core
        .handle_agent_poll(c.t0 + SEC, &agent_id("web"), newer);
    c.core
        .handle_agent_poll(c.t0 + 2 * SEC, &agent_id("web"), older);
    let v = c.machine(2 * SEC, "web");
    assert_eq!((v.captured_seq, v.applied_seq), (50, 50));
}

/// A held node poll answered again does not refresh the node's liveness: a node that died
/// while its poll was held must not look alive for another hold.
#[test]
fn a_held_node_poll_does_not_keep_a_dead_node_alive() {
    let mut c = protected_web();
    let held = NodeReport {
        name: "ps-a".into(),
        held: true,
        ..Default::default()
    };
    let reply = c
        .core
        .handle_node_poll(c.t0 + DEAD, &node_id("ps-a", &[ROLE_PROCESS]), held);
    assert!(matches!(reply, (Response::NodePoll(_), ref p) if p.is_empty()));
    let ps = c
        .nodes(DEAD)
        .into_iter()
        .find(|n| n.name == "ps-a")
        .unwrap();
    assert!(!ps.alive, "a held re-ask is not a sign of life");
}
