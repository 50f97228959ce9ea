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

const AGENT_SECRET: &str = "agent-secret-0123456789";
const NODE_SECRET: &str = "node-secret-0123456789";
const ADMIN_SECRET: &str = "admin-secret-0123456789";
/// The configuration node's wall clock in these tests (unix ms).
const NOW_MS: u64 = 1_800_000_000_000;
const KEY: [u8; 32] = [7; 32];
const KEY2: [u8; 32] = [9; 32];
const SEC: Duration = Duration::from_secs(1);
/// A moment at which a node or agent that last reported at `t0` counts as failed.
const DEAD: Duration = Duration::from_secs(FAILURE_TIMEOUT.as_secs() + 1);

// ---- fixtures ------------------------------------------------------------------------------

fn meta() -> ClusterMeta {
    ClusterMeta {
        cluster_id: "c0ffee".into(),
        admin_secret: ADMIN_SECRET.into(),
    }
}

/// The bootstrap tokens: one agent token, one node token, neither expiring.
fn tokens() -> Vec<haven_cluster::TokenRecord> {
    use haven_transport::identity::TokenKind;
    vec![
        enrolment::new_token(TokenKind::Agent, AGENT_SECRET, 0, None, "agents"),
        enrolment::new_token(TokenKind::Node, NODE_SECRET, 0, None, "nodes"),
    ]
}

/// A bootstrap token after `uses` enrolments.
fn token_used(secret: &str, uses: u64) -> Persist {
    let mut t = tokens()
        .into_iter()
        .find(|t| t.id == haven_transport::identity::token_id(secret))
        .expect("a bootstrap token");
    t.uses = uses;
    Persist::Token(t)
}

fn disk(name: &str, size_bytes: u64) -> DiskInfo {
    DiskInfo::new(name, size_bytes)
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
        site: haven_cluster::default_site(),
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
        enrolment: String::new(),
        resync: Default::default(),
        policy: Default::default(),
        site: haven_cluster::default_site(),
        recovery: Default::default(),
        failbacks: 0,
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
        secret: NODE_SECRET.into(),
        kind: JoinKind::Node {
            name: name.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            addr: format!("{name}.example:7400"),
            capacity,
            site: haven_cluster::default_site(),
        },
    }
}

fn agent_join(machine: &str, hostname: &str, disks: Vec<DiskInfo>) -> JoinRequest {
    JoinRequest {
        secret: AGENT_SECRET.into(),
        kind: JoinKind::Agent {
            machine: machine.into(),
            hostname: hostname.into(),
            disks,
        },
    }
}

/// The identity of the agent of a fixture machine (enrolled before enrolment ids existed).
fn agent_id(machine: &str) -> PeerIdentity {
    PeerIdentity::Agent {
        machine: machine.into(),
        enrolment: String::new(),
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
            core: ConfigCore::new(meta(), nodes, machines).with_tokens(tokens()),
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

    /// A poll by an agent holding `who`'s certificate.
    fn agent_poll_as(&mut self, at: Duration, who: &PeerIdentity, stats: AgentStats) -> Outcome {
        let PeerIdentity::Agent { machine, .. } = who else {
            panic!("not an agent: {who:?}")
        };
        let report = AgentReport {
            machine: machine.clone(),
            hostname: format!("{machine}-host"),
            disks: web_disks(),
            stats,
            report_seq: at.as_micros() as u64,
            ..Default::default()
        };
        self.core.handle_agent_poll(self.t0 + at, who, report)
    }

    fn tokens(&mut self, at: Duration) -> Vec<TokenView> {
        match self.admin(at, AdminCommand::TokenList) {
            (Response::Admin(AdminReply::Tokens(t)), p) if p.is_empty() => t,
            other => panic!("unexpected: {other:?}"),
        }
    }

    /// (id, secret) of a new token.
    fn create_token(&mut self, at: Duration, kind: &str, ttl_ms: Option<u64>) -> (String, String) {
        let cmd = AdminCommand::TokenCreate {
            kind: kind.into(),
            ttl_ms,
            description: "test".into(),
        };
        match self.admin(at, cmd) {
            (
                Response::Admin(AdminReply::TokenCreated {
                    id,
                    secret,
                    kind: k,
                    ..
                }),
                p,
            ) => {
                assert_eq!(k, kind);
                assert!(matches!(&p[..], [Persist::Token(t)] if t.id == id));
                (id, secret)
            }
            other => panic!("unexpected: {other:?}"),
        }
    }

    fn admin(&mut self, at: Duration, cmd: AdminCommand) -> Outcome {
        self.core
            .handle_admin(self.t0 + at, NOW_MS, ADMIN_SECRET, cmd, key_never_issued)
    }

    fn protect(&mut self, at: Duration, machine: &str, key: [u8; 32]) -> Outcome {
        self.core.handle_admin(
            self.t0 + at,
            NOW_MS,
            ADMIN_SECRET,
            AdminCommand::Protect {
                machine: machine.into(),
                policy: Default::default(),
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
                    ..
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
        enrolment: machine.enrolment.clone(),
        policy: machine.policy.clone(),
        failover: None,
        failbacks: machine.failbacks,
    }
}

// ---- join ----------------------------------------------------------------------------------

#[test]
fn node_join_with_the_join_secret_yields_a_node_identity_and_persists_the_node() {
    let mut c = Cluster::new(vec![], vec![]);
    let (identity, persist) = c
        .core
        .handle_join(
            NOW_MS,
            &node_join("ps-a", &[ROLE_PROCESS, ROLE_MASTER_TARGET], 50),
        )
        .expect("join");
    assert_eq!(
        identity,
        node_id("ps-a", &[ROLE_PROCESS, ROLE_MASTER_TARGET])
    );
    assert_eq!(
        persist,
        vec![
            Persist::Node(node_record("ps-a", &[ROLE_PROCESS, ROLE_MASTER_TARGET], 50)),
            token_used(NODE_SECRET, 1)
        ]
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
        .handle_join(NOW_MS, &node_join("ps-a", &[ROLE_PROCESS], 20))
        .expect("join");
    assert_eq!(
        persist,
        vec![
            Persist::Node(NodeRecord {
                capacity: 20,
                drained: true,
                ..node_record("ps-a", &[ROLE_PROCESS], 20)
            }),
            token_used(NODE_SECRET, 1)
        ]
    );
}

#[test]
fn agent_join_yields_an_agent_identity_and_persists_a_discovered_machine() {
    let mut c = Cluster::new(vec![], vec![]);
    let (identity, persist) = c
        .core
        .handle_join(NOW_MS, &agent_join("web", "web-host", web_disks()))
        .expect("join");
    let PeerIdentity::Agent { machine, enrolment } = &identity else {
        panic!("{identity:?}")
    };
    assert_eq!((machine.as_str(), enrolment.len()), ("web", 12));
    assert_eq!(
        persist,
        vec![
            Persist::Machine(MachineRecord {
                enrolment: enrolment.clone(),
                ..discovered("web")
            }),
            token_used(AGENT_SECRET, 1)
        ]
    );
    // The certificate's enrolment speaks for the machine; an earlier one's does not.
    let (reply, _) = agent_reply(c.agent_poll_as(SEC, &identity, stats(0, 0, 0)));
    assert!(!reply.protected);
    refused_with(
        c.agent_poll(SEC, "web", stats(0, 0, 0), None),
        "this agent's certificate belongs to an earlier enrolment of web; web has been enrolled \
         again since (hostname web-host). Start this agent with a fresh --data-dir and another --name",
    );
}

#[test]
fn a_token_enrols_only_its_kind() {
    let mut c = Cluster::new(vec![], vec![]);
    let id = |s: &str| haven_transport::identity::token_id(s);
    let mut as_agent = node_join("ps-a", &[ROLE_PROCESS], 10);
    as_agent.secret = AGENT_SECRET.into();
    assert_eq!(
        c.core.handle_join(NOW_MS, &as_agent),
        Err(format!(
            "token {} is an agent token: it enrols agents (protected machines) only; a server \
             node needs a node token (`haven ctl token create --kind node`)",
            id(AGENT_SECRET)
        ))
    );
    let mut as_node = agent_join("web", "web-host", web_disks());
    as_node.secret = NODE_SECRET.into();
    assert_eq!(
        c.core.handle_join(NOW_MS, &as_node),
        Err(format!(
            "token {} is a node token: it enrols server nodes only; an agent needs an agent \
             token (the configuration node's agent-token file, or `haven ctl token create \
             --kind agent`)",
            id(NODE_SECRET)
        ))
    );
    assert_eq!((c.nodes(SEC).len(), c.machines(SEC).len()), (0, 0));
    // The use counts did not move.
    let listed = c.tokens(SEC);
    assert!(listed.iter().all(|t| t.uses == 0), "{listed:?}");
}

#[test]
fn created_tokens_expire_and_revoked_ones_enrol_nothing() {
    let mut c = Cluster::new(vec![], vec![]);
    let hour = 3600 * 1000;
    let (id, secret) = c.create_token(SEC, "node", Some(hour));
    assert_eq!(id, haven_transport::identity::token_id(&secret));
    let views = c.tokens(SEC);
    let view = views.iter().find(|t| t.id == id).expect("listed");
    assert_eq!(
        (
            view.kind.as_str(),
            view.expires_ms,
            view.expired,
            view.revoked
        ),
        ("node", Some(NOW_MS + hour), false, false)
    );
    let mut req = node_join("ps-a", &[ROLE_PROCESS], 10);
    req.secret = secret.clone();
    // Valid until the last millisecond, refused from then on.
    assert!(c.core.handle_join(NOW_MS + hour - 1, &req).is_ok());
    let expired = c.core.handle_join(NOW_MS + hour, &req).unwrap_err();
    assert_eq!(
        expired,
        format!(
            "join token {id} expired at 2027-01-15T09:00:00Z; create another with `haven ctl token create --kind node`"
        )
    );
    // Revoked: refused at once, and saying so; revoking again changes nothing.
    let (_, secret2) = c.create_token(SEC, "agent", None);
    let persist = done_with(
        c.admin(
            SEC,
            AdminCommand::TokenRevoke {
                id: haven_transport::identity::token_id(&secret2),
            },
        ),
        &format!(
            "token {} revoked: it enrols nothing from now on (what it enrolled stays)",
            haven_transport::identity::token_id(&secret2)
        ),
    );
    assert!(matches!(&persist[..], [Persist::Token(t)] if t.revoked));
    let mut req = agent_join("web", "web-host", web_disks());
    req.secret = secret2.clone();
    assert_eq!(
        c.core.handle_join(NOW_MS, &req),
        Err(format!(
            "join token {} was revoked",
            haven_transport::identity::token_id(&secret2)
        ))
    );
    refused_with(
        c.admin(SEC, AdminCommand::TokenRevoke { id: "nope".into() }),
        "no token with id \"nope\" (see `haven ctl token list`)",
    );
    refused_with(
        c.admin(
            SEC,
            AdminCommand::TokenCreate {
                kind: "admin".into(),
                ttl_ms: None,
                description: String::new(),
            },
        ),
        "a token's kind is agent or node, not \"admin\" (the admin token is the configuration node's admin-token file)",
    );
}

#[test]
fn join_with_a_wrong_secret_is_refused_and_records_nothing() {
    let mut c = Cluster::new(vec![], vec![]);
    let wrong = [
        String::new(),
        "agent-secret-0123456788".into(),
        "node-secret-012345678".into(),
        format!("{AGENT_SECRET}0"),
        format!("{NODE_SECRET}0"),
        ADMIN_SECRET.into(),
    ];
    for secret in wrong {
        for mut req in [
            node_join("ps-a", &[ROLE_PROCESS], 10),
            agent_join("web", "web-host", web_disks()),
        ] {
            req.secret = secret.clone();
            assert_eq!(
                c.core.handle_join(NOW_MS, &req),
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
            c.core
                .handle_join(NOW_MS, &node_join(bad, &[ROLE_PROCESS], 10)),
            expected,
            "node {bad:?}"
        );
        assert_eq!(
            c.core
                .handle_join(NOW_MS, &agent_join(bad, "h", web_disks())),
            expected,
            "machine {bad:?}"
        );
        assert_eq!(
            c.core.handle_join(
                NOW_MS,
                &agent_join("web", "h", vec![disk("root", 1), disk(bad, 1)])
            ),
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
                .handle_join(NOW_MS, &node_join(good, &[ROLE_PROCESS], 1))
                .is_ok(),
            "{good:?}"
        );
    }
}

#[test]
fn a_node_without_roles_is_refused() {
    let mut c = Cluster::new(vec![], vec![]);
    assert_eq!(
        c.core.handle_join(NOW_MS, &node_join("ps-a", &[], 10)),
        Err("a node needs at least one role".to_string())
    );
    assert_eq!(c.nodes(SEC).len(), 0);
}

#[test]
fn enrolling_a_name_that_is_taken_is_refused_and_records_nothing() {
    for existing in [
        discovered("web"),
        placed("web", "ps-a", "mt-a"),
        MachineRecord {
            protected: false,
            ..placed("web", "ps-a", "mt-a")
        },
    ] {
        let mut c = Cluster::new(vec![], vec![existing.clone()]);
        let refusal = c
            .core
            .handle_join(
                NOW_MS,
                &agent_join("web", "clone-host", vec![disk("root", 1)]),
            )
            .unwrap_err();
        assert_eq!(
            refusal,
            "machine web is already enrolled (by the agent on host web-host); nothing was registered. \
             If this host (clone-host) is a clone of web, start its agent with another --name and its \
             own --data-dir. If web itself was reinstalled and lost its agent data dir, run \
             `haven ctl unprotect web` and `haven ctl forget web` first"
        );
        let view = c.machine(SEC, "web");
        assert_eq!(
            (view.hostname.as_str(), view.disks.clone()),
            ("web-host", web_disks()),
            "the enrolled machine is untouched"
        );
        assert!(c.tokens(SEC).iter().all(|t| t.uses == 0));
    }
}

#[test]
fn forget_removes_an_unprotected_machine_and_its_nodes_retire_it() {
    let mut c = Cluster::standard();
    c.all_nodes_poll(Duration::ZERO);
    c.protect(SEC, "web", KEY);
    refused_with(
        c.admin(
            SEC,
            AdminCommand::Forget {
                machine: "web".into(),
                delete_replica: false,
            },
        ),
        "web is protected: `haven ctl unprotect web` first (forgetting a protected machine would \
         leave its replica without an owner)",
    );
    c.admin(
        SEC,
        AdminCommand::Unprotect {
            machine: "web".into(),
        },
    );
    let persist = done_with(
        c.admin(
            SEC,
            AdminCommand::Forget {
                machine: "web".into(),
                delete_replica: false,
            },
        ),
        "web forgotten; its replica on mt-a is kept, moved aside to replicas/web@1; the name can \
         be enrolled again by a new agent",
    );
    let retired = haven_cluster::RetiredRecord {
        machine: "web".into(),
        epoch: Epoch(1),
        delete_replica: false,
        pending_nodes: vec!["ps-a".into(), "mt-a".into()],
        retired_ms: NOW_MS,
    };
    assert_eq!(
        persist,
        vec![
            Persist::DeleteMachine("web".into()),
            Persist::Retired(retired.clone())
        ]
    );
    assert!(c.machines(SEC).is_empty());
    // Its old agent speaks for nothing now.
    refused_with(
        c.agent_poll(SEC, "web", stats(1, 0, 0), None),
        "machine web is not enrolled in this cluster (it was forgotten with `haven ctl forget`?); \
         enrol it again from a fresh --data-dir",
    );
    // The nodes are told until they confirm; ps-b never held it.
    let told = |c: &mut Cluster, node: &str| match c.node_poll(2 * SEC, node, vec![]) {
        (Response::NodePoll(r), _) => r.retired,
        other => panic!("{other:?}"),
    };
    let retirement = crate::proto::Retirement {
        machine: "web".into(),
        epoch: Epoch(1),
        delete_replica: false,
    };
    assert_eq!(told(&mut c, "mt-a"), vec![retirement.clone()]);
    assert_eq!(told(&mut c, "ps-b"), vec![]);
    // A new enrolment of the name continues the epochs: its replica can never be mistaken
    // for the forgotten one.
    let (_, persist) = c
        .core
        .handle_join(NOW_MS, &agent_join("web", "new-host", web_disks()))
        .expect("the name is free again");
    let Persist::Machine(m) = &persist[0] else {
        panic!("{persist:?}")
    };
    assert_eq!((m.epoch, m.hostname.as_str()), (Epoch(1), "new-host"));
    assert!(
        !persist.contains(&Persist::DeleteRetired("web".into())),
        "nodes have not acted yet: the retirement stays"
    );
    let done = |c: &mut Cluster, node: &str| {
        c.core.handle_node_poll(
            c.t0 + 3 * SEC,
            &node_id(node, &[]),
            NodeReport {
                name: node.into(),
                retired_done: vec!["web".into()],
                ..Default::default()
            },
        )
    };
    let (_, persist) = done(&mut c, "mt-a");
    assert_eq!(
        persist,
        vec![Persist::Retired(haven_cluster::RetiredRecord {
            pending_nodes: vec!["ps-a".into()],
            ..retired.clone()
        })]
    );
    // Confirmed by every node, the name enrolled again (its record carries the epochs on):
    // the retirement goes.
    let (_, persist) = done(&mut c, "ps-a");
    assert_eq!(persist, vec![Persist::DeleteRetired("web".into())]);
    assert_eq!(told(&mut c, "mt-a"), vec![]);
    let (_, persist) = done(&mut c, "ps-a");
    assert_eq!(persist, vec![], "a repeated confirmation changes nothing");
}

#[test]
fn a_retirement_confirmed_before_the_name_returns_still_continues_its_epochs() {
    let mut c = Cluster::standard();
    c.all_nodes_poll(Duration::ZERO);
    c.protect(SEC, "web", KEY);
    c.admin(
        SEC,
        AdminCommand::Unprotect {
            machine: "web".into(),
        },
    );
    c.admin(
        SEC,
        AdminCommand::Forget {
            machine: "web".into(),
            delete_replica: true,
        },
    );
    for node in ["ps-a", "mt-a"] {
        let (_, persist) = c.core.handle_node_poll(
            c.t0 + 2 * SEC,
            &node_id(node, &[]),
            NodeReport {
                name: node.into(),
                retired_done: vec!["web".into()],
                ..Default::default()
            },
        );
        assert!(matches!(&persist[..], [Persist::Retired(_)]), "{persist:?}");
    }
    let (_, persist) = c
        .core
        .handle_join(NOW_MS, &agent_join("web", "new-host", web_disks()))
        .expect("join");
    let Persist::Machine(m) = &persist[0] else {
        panic!("{persist:?}")
    };
    assert_eq!(m.epoch, Epoch(1));
    assert_eq!(persist[1], Persist::DeleteRetired("web".into()));
}

#[test]
fn forgetting_a_never_protected_machine_leaves_nothing_behind() {
    let mut c = Cluster::standard();
    let persist = done_with(
        c.admin(
            SEC,
            AdminCommand::Forget {
                machine: "web".into(),
                delete_replica: true,
            },
        ),
        "web forgotten; it had no replica; the name can be enrolled again by a new agent",
    );
    assert_eq!(persist, vec![Persist::DeleteMachine("web".into())]);
    refused_with(
        c.admin(
            SEC,
            AdminCommand::Forget {
                machine: "web".into(),
                delete_replica: true,
            },
        ),
        "no machine named \"web\"",
    );
}

#[test]
fn two_agent_processes_reporting_at_once_block_the_machine_until_one_stops() {
    let mut c = protected_web();
    let report = |c: &mut Cluster, at: Duration, instance: u64, host: &str| {
        let r = AgentReport {
            machine: "web".into(),
            hostname: host.into(),
            disks: web_disks(),
            stats: stats(1, 10, 10),
            report_seq: at.as_micros() as u64,
            instance,
            ..Default::default()
        };
        c.core.handle_agent_poll(c.t0 + at, &agent_id("web"), r)
    };
    // A restart: the old process stops, the new one starts. No conflict.
    report(&mut c, SEC, 1, "web-host");
    report(&mut c, 2 * SEC, 1, "web-host");
    report(&mut c, 3 * SEC, 2, "web-host");
    report(&mut c, 4 * SEC, 2, "web-host");
    let v = c.machine(4 * SEC, "web");
    assert_eq!(
        (v.state.as_str(), v.blocked_reason, v.degraded_reason),
        ("replicating", None, None)
    );
    // A clone of the whole data dir reports alongside: blocked, and wait-sync is told so.
    report(&mut c, 5 * SEC, 3, "clone-host");
    report(&mut c, 5 * SEC + Duration::from_millis(500), 2, "web-host");
    let v = c.machine(6 * SEC, "web");
    let why =
        "two agents report as web (on hosts web-host and clone-host): a cloned machine must be \
               given its own --name and --data-dir; stop the clone's agent";
    assert_eq!(
        (
            v.state.as_str(),
            v.blocked_reason.as_deref(),
            v.degraded_reason.as_deref()
        ),
        ("degraded", Some(why), Some(why))
    );
    let id = c.request_sync(6 * SEC, "web");
    match c.admin(
        6 * SEC,
        AdminCommand::SyncState {
            machine: "web".into(),
            id,
        },
    ) {
        (Response::Admin(AdminReply::SyncState { done, blocked, .. }), _) => {
            assert_eq!((done, blocked.as_deref()), (false, Some(why)))
        }
        other => panic!("{other:?}"),
    }
    // The clone stops; past the failure timeout the machine is itself again.
    c.all_nodes_poll(6 * SEC + DEAD);
    report(&mut c, 6 * SEC + DEAD, 2, "web-host");
    let v = c.machine(6 * SEC + DEAD, "web");
    assert_eq!((v.state.as_str(), v.blocked_reason), ("replicating", None));
}

#[test]
fn a_blocked_disk_degrades_the_machine_and_its_rpo_grows_from_the_block() {
    let mut c = protected_web();
    let why = "disk data shrank from 96 MiB to 64 MiB: ...";
    let blocked = AgentStats {
        blocked: vec![crate::proto::DiskBlock {
            disk: "data".into(),
            reason: why.into(),
            since_ms: NOW_MS - 7000,
        }],
        oldest_unapplied_ms: NOW_MS - 7000,
        ..stats(1, 10, 10)
    };
    c.agent_poll(SEC, "web", blocked, None);
    let v = c.machine(SEC, "web");
    assert_eq!(
        (v.state.as_str(), v.blocked_reason.as_deref(), v.rpo_seconds),
        ("degraded", Some(why), Some(7.0)),
        "captured = applied, yet the replica is stale since the block"
    );
    assert_eq!(v.blocked_disks.len(), 1);
    c.agent_poll(2 * SEC, "web", stats(1, 10, 10), None);
    let v = c.machine(2 * SEC, "web");
    assert_eq!(
        (v.state.as_str(), v.rpo_seconds),
        ("replicating", Some(0.0))
    );
}

#[test]
fn a_grown_disk_updates_the_inventory_and_the_assignments_with_an_event() {
    let mut c = protected_web();
    let v0 = c.core.version();
    let mut disks = web_disks();
    disks[1].size_bytes = 6 << 30;
    let report = AgentReport {
        machine: "web".into(),
        hostname: "web-host".into(),
        disks: disks.clone(),
        stats: stats(1, 10, 10),
        report_seq: 1,
        ..Default::default()
    };
    let (_, persist) = agent_reply(
        c.core
            .handle_agent_poll(c.t0 + SEC, &agent_id("web"), report),
    );
    assert_eq!(
        persist,
        vec![Persist::Machine(MachineRecord {
            disks: disks.clone(),
            ..placed("web", "ps-a", "mt-a")
        })]
    );
    assert!(c.core.version() > v0, "nodes hear of the new geometry");
    let events = match c.admin(SEC, AdminCommand::Events) {
        (Response::Admin(AdminReply::Events(e)), _) => e,
        other => panic!("{other:?}"),
    };
    let e = events.last().expect("an event");
    assert_eq!(
        (e.kind.as_str(), e.reason.as_str()),
        (
            "disk-resize",
            "disk data grew from 4294967296 to 6442450944 bytes; the replica follows in the stream"
        )
    );
    // A changed disk set on a protected machine is not taken (the agent refuses it).
    let report = AgentReport {
        machine: "web".into(),
        hostname: "web-host".into(),
        disks: vec![disk("other", 1)],
        stats: stats(1, 10, 10),
        report_seq: 2,
        ..Default::default()
    };
    let (_, persist) = agent_reply(
        c.core
            .handle_agent_poll(c.t0 + SEC, &agent_id("web"), report),
    );
    assert_eq!(persist, vec![]);
}

#[test]
fn resync_is_recorded_for_the_agent_to_carry_out() {
    let mut c = protected_web();
    refused_with(
        c.admin(
            SEC,
            AdminCommand::Resync {
                machine: "web".into(),
                disk: "nope".into(),
            },
        ),
        "web has no disk \"nope\" (its disks: root, data)",
    );
    let persist = done_with(
        c.admin(
            SEC,
            AdminCommand::Resync {
                machine: "web".into(),
                disk: "data".into(),
            },
        ),
        "resync of web disk data requested: its agent adopts the disk as it is now (size and \
         identity) and sends every block that differs from the replica",
    );
    let mut expected = placed("web", "ps-a", "mt-a");
    expected.resync.insert("data".into(), 1);
    assert_eq!(persist, vec![Persist::Machine(expected)]);
    let (reply, _) = agent_reply(c.agent_poll(2 * SEC, "web", stats(1, 0, 0), None));
    assert_eq!(reply.resync.get("data"), Some(&1));
    c.admin(
        SEC,
        AdminCommand::Resync {
            machine: "web".into(),
            disk: "root".into(),
        },
    );
    let (reply, _) = agent_reply(c.agent_poll(3 * SEC, "web", stats(1, 0, 0), None));
    assert_eq!(
        reply.resync.into_iter().collect::<Vec<_>>(),
        vec![("data".into(), 1), ("root".into(), 2)]
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
fn an_unknown_agent_is_refused_not_enrolled_from_its_poll() {
    let mut c = Cluster::new(vec![], vec![]);
    refused_with(
        c.agent_poll(Duration::ZERO, "web", stats(0, 0, 0), None),
        "machine web is not enrolled in this cluster (it was forgotten with `haven ctl forget`?); \
         enrol it again from a fresh --data-dir",
    );
    assert!(c.machines(SEC).is_empty());
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
fn protect_places_the_process_server_at_the_machine_site_and_the_master_target_at_another() {
    let at = |mut n: NodeRecord, site: &str| {
        n.site = site.into();
        n
    };
    // The primary site's nodes have the most headroom; the master target still goes to dr.
    let mut web = discovered("web");
    web.site = "primary".into();
    let mut c = Cluster::new(
        vec![
            at(node_record("ps-p", &[ROLE_PROCESS], 100), "primary"),
            at(node_record("ps-dr", &[ROLE_PROCESS], 10), "dr"),
            at(node_record("mt-p", &[ROLE_MASTER_TARGET], 100), "primary"),
            at(node_record("mt-dr", &[ROLE_MASTER_TARGET], 10), "dr"),
        ],
        vec![web],
    );
    c.all_nodes_poll(Duration::ZERO);
    done_with(
        c.protect(SEC, "web", KEY),
        "web protected: process server ps-p, master target mt-dr, epoch 1",
    );
    // With the dr site's master target dead, one at the machine's own site is better than
    // none.
    let mut db = discovered("db");
    db.site = "primary".into();
    let mut c = Cluster::new(
        vec![
            at(node_record("ps-p", &[ROLE_PROCESS], 10), "primary"),
            at(node_record("mt-p", &[ROLE_MASTER_TARGET], 10), "primary"),
            at(node_record("mt-dr", &[ROLE_MASTER_TARGET], 10), "dr"),
        ],
        vec![db],
    );
    c.node_poll(Duration::ZERO, "mt-dr", vec![]);
    for n in ["ps-p", "mt-p"] {
        c.node_poll(DEAD, n, vec![]);
    }
    done_with(
        c.protect(DEAD, "db", KEY),
        "db protected: process server ps-p, master target mt-p, epoch 1",
    );
}

#[test]
fn protect_refuses_an_unknown_machine() {
    let mut c = Cluster::standard();
    c.all_nodes_poll(Duration::ZERO);
    let o = c.core.handle_admin(
        c.t0,
        NOW_MS,
        ADMIN_SECRET,
        AdminCommand::Protect {
            machine: "zzz".into(),
            policy: Default::default(),
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
            NOW_MS,
            ADMIN_SECRET,
            AdminCommand::Protect {
                machine: "web".into(),
                policy: Default::default(),
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
        NOW_MS,
        ADMIN_SECRET,
        AdminCommand::Protect {
            machine: "web".into(),
            policy: Default::default(),
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
                policy: Default::default(),
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
        AGENT_SECRET,
        NODE_SECRET,
        "admin-secret-0123456788",
        "admin-secret-01234567890",
    ] {
        for cmd in commands() {
            refused_with(
                c.core
                    .handle_admin(c.t0, NOW_MS, secret, cmd, key_never_issued),
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
            "site": "primary",
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
            "rpo_seconds": null,
            "raw_bytes_sent": 0,
            "wire_bytes_sent": 0,
            "throughput_bytes_per_sec": 0,
            "retained_bytes": 0,
            "disks": [{"name": "root", "size_bytes": 1u64 << 30, "path": "", "id": ""}, {"name": "data", "size_bytes": 4u64 << 30, "path": "", "id": ""}],
            "agent_last_seen_ms_ago": 1500,
            "stream_restarts": 0,
            "batches_refused": 0,
            "cache_bytes": 0,
            "blocked_reason": null,
            "blocked_disks": [],
            "capture": null,
            "points_not_consistent": null,
            "latest_point": null,
            "latest_point_age_seconds": null,
            "recovery_points": 0,
            "history_held_seconds": null,
            "history_asked_seconds": null,
            "journal_cap_reached": false,
            "test_failover": null,
            "recovery_state": "protected",
            "failover": null,
            "group": null,
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
        blocked: vec![],
        capture: "scan".into(),
        not_consistent: None,
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

    let expected = |state: &str, percent: Option<f64>, rpo: Option<f64>| {
        json!({
            "name": "web",
            "hostname": "web-host",
            "site": "primary",
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
            "rpo_seconds": rpo,
            "raw_bytes_sent": 1000,
            "wire_bytes_sent": 600,
            "throughput_bytes_per_sec": 500,
            "retained_bytes": 300,
            "disks": [{"name": "root", "size_bytes": 1u64 << 30, "path": "", "id": ""}, {"name": "data", "size_bytes": 4u64 << 30, "path": "", "id": ""}],
            "agent_last_seen_ms_ago": 2000,
            "stream_restarts": 3,
            "batches_refused": 4,
            "cache_bytes": 0,
            "blocked_reason": null,
            "blocked_disks": [],
            "capture": "scan",
            "points_not_consistent": null,
            "latest_point": null,
            "latest_point_age_seconds": null,
            "recovery_points": 0,
            "history_held_seconds": null,
            "history_asked_seconds": 86400.0,
            "journal_cap_reached": false,
            "test_failover": null,
            "recovery_state": "protected",
            "failover": null,
            "group": null,
        })
    };
    assert_eq!(
        serde_json::to_value(c.machine(3 * SEC, "web")).unwrap(),
        expected("initial-sync", Some(42.5), None)
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
        expected("replicating", None, Some(0.0))
    );
}

#[test]
fn rpo_is_the_age_of_the_oldest_unapplied_write_while_behind() {
    let mut c = protected_web();
    let behind = AgentStats {
        oldest_unapplied_ms: NOW_MS - 3000,
        ..stats(1, 50, 40)
    };
    c.agent_poll(SEC, "web", behind.clone(), None);
    let view = c.machine(SEC, "web");
    assert_eq!(
        (view.state.as_str(), view.captured_seq, view.applied_seq),
        ("replicating", 50, 40)
    );
    assert_eq!(view.rpo_seconds, Some(3.0));

    // Once the master target has applied everything captured, the rpo is 0.
    c.node_poll(SEC, "mt-a", vec![mt_report("web", 50)]);
    assert_eq!(c.machine(SEC, "web").rpo_seconds, Some(0.0));

    // An unprotected machine has no rpo (nothing is recoverable from it).
    c.agent_poll(SEC, "web", behind, None);
    c.node_poll(SEC, "mt-a", vec![]);
    assert_eq!(c.machine(SEC, "web").rpo_seconds, Some(3.0));
    c.admin(
        SEC,
        AdminCommand::Unprotect {
            machine: "web".into(),
        },
    );
    assert_eq!(c.machine(SEC, "web").rpo_seconds, None);
}

#[test]
fn rpo_is_unknown_during_the_initial_sync_and_while_the_agent_is_silent() {
    let mut c = protected_web();
    let syncing = AgentStats {
        initial_sync_percent: Some(9.0),
        ..stats(1, 50, 50)
    };
    c.agent_poll(SEC, "web", syncing, None);
    let view = c.machine(SEC, "web");
    assert_eq!(
        (view.state.as_str(), view.rpo_seconds),
        ("initial-sync", None)
    );
    c.agent_poll(SEC, "web", stats(1, 50, 50), None);
    assert_eq!(c.machine(SEC, "web").rpo_seconds, Some(0.0));
    // The agent of another epoch (it has not picked up the protection) says nothing of it.
    c.agent_poll(2 * SEC, "web", stats(0, 50, 50), None);
    assert_eq!(c.machine(2 * SEC, "web").rpo_seconds, None);
    c.agent_poll(3 * SEC, "web", stats(1, 50, 50), None);
    assert_eq!(c.machine(3 * SEC, "web").rpo_seconds, Some(0.0));
    assert_eq!(c.machine(3 * SEC + DEAD, "web").rpo_seconds, None);
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
            {"name": "mt-a", "site": "primary", "roles": ["master-target"], "addr": "mt-a.example:7400", "alive": false,
             "last_seen_ms_ago": DEAD.as_millis() as u64 + 250, "machines": 2, "capacity": 20, "drained": false,
             "bytes_in_per_sec": 0, "bytes_out_per_sec": 0, "cache_bytes": 0},
            {"name": "ps-a", "site": "primary", "roles": ["process"], "addr": "ps-a.example:7400", "alive": true,
             "last_seen_ms_ago": 250, "machines": 2, "capacity": 10, "drained": false,
             "bytes_in_per_sec": 0, "bytes_out_per_sec": 0, "cache_bytes": 0},
            {"name": "ps-b", "site": "primary", "roles": ["process"], "addr": "ps-b.example:7400", "alive": false,
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
    // A restarted configuration node is seeded afresh from the operating system.
    let mut after = Cluster {
        core: ConfigCore::with_seed(
            meta(),
            vec![
                node_record("ps-a", &[ROLE_PROCESS], 10),
                node_record("mt-a", &[ROLE_MASTER_TARGET], 10),
            ],
            records,
            2,
        ),
        t0: Instant::now(),
    };
    let new_id = after.request_sync(SEC, "web");
    assert_ne!(new_id, old_id);
}
mod scaleout;

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
mod failover;
mod groups;
mod marks;
