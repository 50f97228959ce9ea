//! Unit tests of the scale-out half of [`ConfigCore`] (`scaleout.rs`): live moves, agent move
//! figures, failover, draining, rebalancing (budget, cooldown, no flapping) and the event log.
//! Same rules as `core_tests.rs`: every input gets an explicit `now`, outcomes are asserted
//! exactly, no I/O, no sleeps.
use std::collections::BTreeMap;

use crate::configuration::core::scaleout::{RebalancePolicy, EVENTS_MAX};

use super::*;

const MT_ADDR: &str = "mt-a.example:7400";

// ---- fixtures ------------------------------------------------------------------------------

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn process(name: &str, capacity: u32) -> NodeRecord {
    node_record(name, &[ROLE_PROCESS], capacity)
}

fn drained(mut n: NodeRecord) -> NodeRecord {
    n.drained = true;
    n
}

fn mt() -> NodeRecord {
    node_record("mt-a", &[ROLE_MASTER_TARGET], 100)
}

/// Machines placed (generation 1) on process server `ps` and master target mt-a.
fn on(ps: &str, names: &[&str]) -> Vec<MachineRecord> {
    names.iter().map(|n| placed(n, ps, "mt-a")).collect()
}

/// `name` as a placement leaves it: on `ps` at `generation`, everything else as `placed`.
fn at_gen(name: &str, ps: &str, generation: u64) -> MachineRecord {
    MachineRecord {
        generation: Generation(generation),
        ..placed(name, ps, "mt-a")
    }
}

fn machine_persist(name: &str, ps: &str, generation: u64) -> Persist {
    Persist::Machine(at_gen(name, ps, generation))
}

fn manual() -> RebalancePolicy {
    RebalancePolicy {
        auto: false,
        ..Default::default()
    }
}

fn with_policy(
    policy: RebalancePolicy,
    nodes: Vec<NodeRecord>,
    machines: Vec<MachineRecord>,
) -> Cluster {
    let mut c = Cluster::new(nodes, machines);
    c.core = c.core.with_policy(policy);
    c
}

fn ev(
    age_ms: u64,
    kind: &str,
    machine: &str,
    from: &str,
    to: &str,
    generation: u64,
    reason: &str,
) -> EventView {
    EventView {
        age_ms,
        kind: kind.into(),
        machine: machine.into(),
        from: Some(from.into()),
        to: Some(to.into()),
        generation,
        reason: reason.into(),
        pause_ms: None,
        bytes_resent: None,
    }
}

fn failover_reason(node: &str) -> String {
    format!("process server {node} silent for more than 5s")
}

fn rebalance_reason(full: &str, full_headroom: i64, empty: &str, empty_headroom: i64) -> String {
    format!("rebalance: {full} has {full_headroom} headroom, {empty} has {empty_headroom}")
}

impl Cluster {
    fn tick(&mut self, at: Duration) -> Vec<Persist> {
        self.core.handle_tick(self.t0 + at)
    }

    /// `nodes` poll at `at`, then the core ticks at `at`.
    fn poll_tick(&mut self, at: Duration, nodes: &[&str]) -> Vec<Persist> {
        for n in nodes {
            let (r, _) = self.node_poll(at, n, vec![]);
            assert!(matches!(r, Response::NodePoll(_)), "{n}: {r:?}");
        }
        self.tick(at)
    }

    /// Every node polls at `at`, then the core ticks at `at`.
    fn all_poll_tick(&mut self, at: Duration) -> Vec<Persist> {
        self.all_nodes_poll(at);
        self.tick(at)
    }

    fn record(&self, machine: &str) -> MachineRecord {
        self.core.machines[machine].clone()
    }

    /// Process server -> protected machines on it, by name.
    fn layout(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for m in self.core.machines.values().filter(|m| m.protected) {
            out.entry(m.process_server.clone().unwrap_or_default())
                .or_default()
                .push(m.name.clone());
        }
        out
    }

    fn events(&mut self, at: Duration) -> Vec<EventView> {
        match self.admin(at, AdminCommand::Events) {
            (Response::Admin(AdminReply::Events(e)), p) if p.is_empty() => e,
            other => panic!("unexpected: {other:?}"),
        }
    }

    fn move_to(&mut self, at: Duration, machine: &str, to: &str) -> Outcome {
        self.admin(
            at,
            AdminCommand::Move {
                machine: machine.into(),
                to: to.into(),
            },
        )
    }

    fn agent_reports_move(
        &mut self,
        at: Duration,
        machine: &str,
        generation: u64,
        pause_ms: u64,
        bytes_resent: u64,
    ) {
        let s = AgentStats {
            last_move: Some(MoveStats {
                generation,
                pause_ms,
                bytes_resent,
            }),
            ..stats(1, 0, 0)
        };
        let (_, persist) = agent_reply(self.agent_poll(at, machine, s, None));
        assert_eq!(persist, vec![]);
    }
}

fn layout(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    entries
        .iter()
        .map(|(ps, ms)| (ps.to_string(), ms.iter().map(|m| m.to_string()).collect()))
        .collect()
}

/// (machine, from, to, generation) of a `Moved` reply, and the records to persist.
#[track_caller]
fn moved(outcome: Outcome) -> ((String, String, String, u64), Vec<Persist>) {
    match outcome {
        (
            Response::Admin(AdminReply::Moved {
                machine,
                from,
                to,
                generation,
            }),
            p,
        ) => ((machine, from, to, generation), p),
        other => panic!("expected Moved, got {other:?}"),
    }
}

#[track_caller]
fn rebalanced(outcome: Outcome) -> (Vec<EventView>, Vec<Persist>) {
    match outcome {
        (Response::Admin(AdminReply::Rebalanced { moves }), p) => (moves, p),
        other => panic!("expected Rebalanced, got {other:?}"),
    }
}

/// A `Moved` reply as `moved` returns it.
fn mv(machine: &str, from: &str, to: &str, generation: u64) -> (String, String, String, u64) {
    (machine.into(), from.into(), to.into(), generation)
}

// ---- move ----------------------------------------------------------------------------------

#[test]
fn move_refusals_change_nothing() {
    let mut c = Cluster::new(
        vec![
            process("ps-a", 10),
            process("ps-b", 10),
            drained(process("ps-c", 10)),
            process("ps-d", 10),
            process("ps-e", 10),
            mt(),
        ],
        vec![placed("web", "ps-a", "mt-a"), discovered("db")],
    );
    // Everyone but ps-e reports at t0; at DEAD everyone but ps-d and ps-e again.
    for n in ["ps-a", "ps-b", "ps-c", "ps-d", "mt-a"] {
        c.node_poll(Duration::ZERO, n, vec![]);
    }
    for n in ["ps-a", "ps-b", "ps-c", "mt-a"] {
        c.node_poll(DEAD, n, vec![]);
    }
    let v0 = c.core.version();
    refused_with(c.move_to(DEAD, "web", "ps-zz"), "no node named \"ps-zz\"");
    refused_with(
        c.move_to(DEAD, "web", "mt-a"),
        "mt-a is not a process server",
    );
    refused_with(
        c.move_to(DEAD, "web", "ps-c"),
        "ps-c is drained; undrain it first",
    );
    // ps-d was alive at t0 but has been silent for longer than the failure timeout.
    refused_with(c.move_to(DEAD, "web", "ps-d"), "ps-d is not reporting");
    // ps-e never reported.
    refused_with(c.move_to(DEAD, "web", "ps-e"), "ps-e is not reporting");
    refused_with(c.move_to(DEAD, "web", "ps-a"), "web is already on ps-a");
    refused_with(c.move_to(DEAD, "db", "ps-b"), "db is not protected");
    refused_with(
        c.move_to(DEAD, "nosuch", "ps-b"),
        "no machine named \"nosuch\"",
    );
    // Nothing changed: no generation, no record, no event, no version bump.
    assert_eq!(c.core.version(), v0);
    assert_eq!(c.record("web"), placed("web", "ps-a", "mt-a"));
    assert_eq!(c.record("db"), discovered("db"));
    assert_eq!(c.events(DEAD), vec![]);
}

#[test]
fn move_bumps_the_generation_persists_the_record_and_records_an_event() {
    let mut c = Cluster::new(
        vec![process("ps-a", 10), process("ps-b", 10), mt()],
        vec![placed("web", "ps-a", "mt-a")],
    );
    c.all_nodes_poll(Duration::ZERO);
    c.agent_poll(Duration::ZERO, "web", stats(1, 0, 0), None);
    let v0 = c.core.version();

    let (reply, persist) = moved(c.move_to(SEC, "web", "ps-b"));
    assert_eq!(reply, mv("web", "ps-a", "ps-b", 2));
    let expected = at_gen("web", "ps-b", 2);
    assert_eq!(persist, vec![Persist::Machine(expected.clone())]);
    assert_eq!(c.record("web"), expected);
    assert_eq!(c.core.version(), v0 + 1);
    assert_eq!(
        c.events(3 * SEC),
        vec![ev(
            2000,
            "move",
            "web",
            "ps-a",
            "ps-b",
            2,
            "operator request"
        )]
    );

    // The new process server gets the assignment, the old one no longer does, and the master
    // target learns the new process server.
    assert_eq!(
        assignments(c.node_poll(2 * SEC, "ps-b", vec![])),
        vec![assignment(&expected, MT_ADDR)]
    );
    assert_eq!(assignments(c.node_poll(2 * SEC, "ps-a", vec![])), vec![]);
    assert_eq!(
        assignments(c.node_poll(2 * SEC, "mt-a", vec![])),
        vec![assignment(&expected, MT_ADDR)]
    );
    match c.node_poll(2 * SEC, "ps-b", vec![]) {
        (Response::NodePoll(r), _) => assert_eq!(r.version, v0 + 1),
        other => panic!("{other:?}"),
    }

    // The agent is told to go to ps-b under generation 2.
    let (r, p) = agent_reply(c.agent_poll(2 * SEC, "web", stats(1, 0, 0), None));
    assert_eq!(reply_tuple(&r), (true, 1, Generation(2), ps("ps-b"), None));
    assert_eq!(p, vec![]);

    // And back again: generation 3, a second event, in order.
    let (reply, persist) = moved(c.move_to(4 * SEC, "web", "ps-a"));
    assert_eq!(reply, mv("web", "ps-b", "ps-a", 3));
    assert_eq!(persist, vec![machine_persist("web", "ps-a", 3)]);
    assert_eq!(c.core.version(), v0 + 2);
    assert_eq!(
        c.events(5 * SEC),
        vec![
            ev(4000, "move", "web", "ps-a", "ps-b", 2, "operator request"),
            ev(1000, "move", "web", "ps-b", "ps-a", 3, "operator request"),
        ]
    );
}

#[test]
fn a_machine_can_be_moved_off_a_dead_process_server() {
    let mut c = Cluster::new(
        vec![process("ps-a", 10), process("ps-b", 10), mt()],
        vec![placed("web", "ps-a", "mt-a")],
    );
    c.node_poll(DEAD, "ps-b", vec![]);
    let (reply, persist) = moved(c.move_to(DEAD, "web", "ps-b"));
    assert_eq!(reply, mv("web", "ps-a", "ps-b", 2));
    assert_eq!(persist, vec![machine_persist("web", "ps-b", 2)]);
}

// ---- move figures reported by the agent ----------------------------------------------------

#[test]
fn the_agents_move_figures_attach_to_the_event_of_that_generation_only() {
    let mut c = Cluster::new(
        vec![process("ps-a", 10), process("ps-b", 10), mt()],
        vec![placed("web", "ps-a", "mt-a"), placed("db", "ps-a", "mt-a")],
    );
    c.all_nodes_poll(Duration::ZERO);
    moved(c.move_to(SEC, "web", "ps-b"));
    let mut expected = vec![ev(0, "move", "web", "ps-a", "ps-b", 2, "operator request")];

    // Figures of another generation (the previous one, a future one) change nothing, nor do
    // figures another machine reports for the same generation.
    c.agent_reports_move(2 * SEC, "web", 1, 10, 20);
    c.agent_reports_move(2 * SEC, "web", 3, 10, 20);
    c.agent_reports_move(2 * SEC, "db", 2, 10, 20);
    assert_eq!(c.events(SEC), expected);

    // The agent reports its move to generation 2.
    c.agent_reports_move(3 * SEC, "web", 2, 350, 4096);
    expected[0].pause_ms = Some(350);
    expected[0].bytes_resent = Some(4096);
    assert_eq!(c.events(SEC), expected);

    // The agent repeats its last move in every poll: the first figures stay.
    c.agent_reports_move(4 * SEC, "web", 2, 999, 1);
    assert_eq!(c.events(SEC), expected);

    // A second move: its figures go to the second event, the first keeps its own.
    c.all_nodes_poll(5 * SEC);
    moved(c.move_to(5 * SEC, "web", "ps-a"));
    c.agent_reports_move(6 * SEC, "web", 3, 120, 0);
    let mut second = ev(0, "move", "web", "ps-b", "ps-a", 3, "operator request");
    second.pause_ms = Some(120);
    second.bytes_resent = Some(0);
    expected[0].age_ms = 4000;
    expected.push(second);
    assert_eq!(c.events(5 * SEC), expected);
}

// ---- failover ------------------------------------------------------------------------------

#[test]
fn failover_moves_the_machines_of_a_silent_process_server_to_the_live_ones_with_most_headroom() {
    // Headroom: ps-a 5 (cap 7, 2 machines), ps-b 5, ps-c 6: balanced, nothing to rebalance.
    let mut machines = on("ps-a", &["m1", "m2"]);
    machines.extend(on("ps-b", &["b0", "b1", "b2", "b3", "b4"]));
    machines.extend(on("ps-c", &["c0", "c1", "c2", "c3"]));
    let mut c = Cluster::new(
        vec![
            process("ps-a", 7),
            process("ps-b", 10),
            process("ps-c", 10),
            mt(),
        ],
        machines,
    );
    assert_eq!(c.all_poll_tick(Duration::ZERO), vec![]);
    assert_eq!(c.all_poll_tick(SEC), vec![]);
    let v0 = c.core.version();

    // ps-a last reported at 1 s; at 5.999 s it is still alive.
    assert_eq!(
        c.poll_tick(Duration::from_millis(5999), &["ps-b", "ps-c", "mt-a"]),
        vec![]
    );
    // At 6 s (= DEAD) it has been silent for the failure timeout: m1 goes to ps-c (headroom
    // 6 > 5), then m2 to ps-b (5 = 5, ties by name).
    assert_eq!(
        c.poll_tick(DEAD, &["ps-b", "ps-c", "mt-a"]),
        vec![
            machine_persist("m1", "ps-c", 2),
            machine_persist("m2", "ps-b", 2)
        ]
    );
    assert_eq!(c.record("m1"), at_gen("m1", "ps-c", 2));
    assert_eq!(c.record("m2"), at_gen("m2", "ps-b", 2));
    assert_eq!(c.core.version(), v0 + 2);
    let reason = failover_reason("ps-a");
    assert_eq!(
        c.events(DEAD),
        vec![
            ev(0, "failover", "m1", "ps-a", "ps-c", 2, &reason),
            ev(0, "failover", "m2", "ps-a", "ps-b", 2, &reason),
        ]
    );
    // Nothing left to fail over, and the rest stays balanced.
    assert_eq!(c.poll_tick(DEAD + SEC, &["ps-b", "ps-c", "mt-a"]), vec![]);
    assert_eq!(c.events(DEAD).len(), 2);
    // The agent of m1 is sent to ps-c.
    let (r, _) = agent_reply(c.agent_poll(DEAD + SEC, "m1", stats(1, 0, 0), None));
    assert_eq!(reply_tuple(&r), (true, 1, Generation(2), ps("ps-c"), None));
    // ps-a's own poll no longer lists them.
    assert_eq!(assignments(c.node_poll(DEAD + SEC, "ps-a", vec![])), vec![]);
}

#[test]
fn failover_of_a_process_server_prefers_one_at_the_machines_site() {
    // ps-a and ps-b at the primary site, ps-dr (most headroom) at the recovery site: the
    // rebalancer, within each site too, moves nothing across.
    let mut ps_dr = process("ps-dr", 50);
    ps_dr.site = "dr".into();
    let mut c = Cluster::new(
        vec![process("ps-a", 10), process("ps-b", 9), ps_dr, mt()],
        on("ps-a", &["m1", "m2"]),
    );
    assert_eq!(c.all_poll_tick(Duration::ZERO), vec![]);
    assert_eq!(c.all_poll_tick(SEC), vec![]);
    // ps-a dies: both go to ps-b, at their site, not to the roomier ps-dr across the sites.
    assert_eq!(
        c.poll_tick(DEAD, &["ps-b", "ps-dr", "mt-a"]),
        vec![
            machine_persist("m1", "ps-b", 2),
            machine_persist("m2", "ps-b", 2)
        ]
    );
    // With no live process server left at the site, one elsewhere beats none.
    assert_eq!(
        c.poll_tick(DEAD + DEAD, &["ps-dr", "mt-a"]),
        vec![
            machine_persist("m1", "ps-dr", 3),
            machine_persist("m2", "ps-dr", 3)
        ]
    );
}

#[test]
fn no_failover_before_the_core_has_been_up_for_a_failure_timeout() {
    // ps-a never reports to this (just restarted) configuration node.
    let mut c = Cluster::new(
        vec![process("ps-a", 10), process("ps-b", 10), mt()],
        vec![placed("web", "ps-a", "mt-a")],
    );
    // The first tick comes 10 s after t0: that is when the core starts judging.
    assert_eq!(c.poll_tick(secs(10), &["ps-b", "mt-a"]), vec![]);
    for s in 11..15 {
        assert_eq!(
            c.poll_tick(secs(s), &["ps-b", "mt-a"]),
            vec![],
            "tick at {s}s"
        );
    }
    assert_eq!(c.record("web"), placed("web", "ps-a", "mt-a"));
    assert_eq!(c.events(secs(14)), vec![]);
    // Five seconds after the first tick.
    assert_eq!(
        c.poll_tick(secs(15), &["ps-b", "mt-a"]),
        vec![machine_persist("web", "ps-b", 2)]
    );
    assert_eq!(
        c.events(secs(15)),
        vec![ev(
            0,
            "failover",
            "web",
            "ps-a",
            "ps-b",
            2,
            &failover_reason("ps-a")
        )]
    );
}

#[test]
fn a_machine_with_nowhere_to_go_stays_put_until_a_process_server_is_available() {
    // ps-b is drained, ps-c goes silent together with ps-a.
    let mut c = Cluster::new(
        vec![
            process("ps-a", 10),
            drained(process("ps-b", 10)),
            process("ps-c", 10),
            mt(),
        ],
        vec![placed("web", "ps-a", "mt-a")],
    );
    assert_eq!(c.all_poll_tick(Duration::ZERO), vec![]);
    let v0 = c.core.version();
    for s in DEAD.as_secs()..DEAD.as_secs() + 5 {
        assert_eq!(
            c.poll_tick(secs(s), &["ps-b", "mt-a"]),
            vec![],
            "tick at {s}s"
        );
    }
    assert_eq!(c.record("web"), placed("web", "ps-a", "mt-a"));
    assert_eq!(c.core.version(), v0);
    assert_eq!(c.events(secs(20)), vec![]);
    let (r, _) = agent_reply(c.agent_poll(secs(20), "web", stats(1, 0, 0), None));
    assert_eq!(reply_tuple(&r), (true, 1, Generation(1), ps("ps-a"), None));

    // ps-c comes back: web fails over to it.
    assert_eq!(
        c.poll_tick(secs(20), &["ps-b", "ps-c", "mt-a"]),
        vec![machine_persist("web", "ps-c", 2)]
    );
    assert_eq!(
        c.events(secs(20)),
        vec![ev(
            0,
            "failover",
            "web",
            "ps-a",
            "ps-c",
            2,
            &failover_reason("ps-a")
        )]
    );
}

#[test]
fn a_silent_master_target_does_not_move_machines_between_process_servers() {
    let mut machines = on("ps-a", &["db", "web"]);
    machines.extend(on("ps-b", &["app"]));
    let mut c = Cluster::new(
        vec![process("ps-a", 10), process("ps-b", 10), mt()],
        machines.clone(),
    );
    assert_eq!(c.all_poll_tick(Duration::ZERO), vec![]);
    let v0 = c.core.version();
    for s in 1..60 {
        assert_eq!(
            c.poll_tick(secs(s), &["ps-a", "ps-b"]),
            vec![],
            "tick at {s}s"
        );
    }
    for m in &machines {
        assert_eq!(&c.record(&m.name), m);
    }
    assert_eq!(c.core.version(), v0);
    assert_eq!(c.events(secs(60)), vec![]);
}

// ---- drain ---------------------------------------------------------------------------------

#[test]
fn drain_moves_every_machine_off_at_once_regardless_of_the_move_budget() {
    let policy = RebalancePolicy {
        max_moves_per_minute: 1,
        ..Default::default()
    };
    let mut c = with_policy(
        policy,
        vec![
            process("ps-a", 10),
            process("ps-b", 10),
            process("ps-c", 10),
            mt(),
        ],
        on("ps-a", &["m1", "m2", "m3", "m4"]),
    );
    // The first tick spends the whole budget: m1 to ps-c (most headroom, the later name wins
    // a tie as the rebalancer's destination).
    assert_eq!(
        c.all_poll_tick(Duration::ZERO),
        vec![machine_persist("m1", "ps-c", 2)]
    );
    assert_eq!(c.all_poll_tick(SEC), vec![], "budget spent");
    let v0 = c.core.version();

    let persist = done_with(
        c.admin(
            2 * SEC,
            AdminCommand::Drain {
                node: "ps-a".into(),
            },
        ),
        "ps-a drained; 0 machine(s) still to move",
    );
    assert_eq!(
        persist,
        vec![
            Persist::Node(drained(process("ps-a", 10))),
            machine_persist("m2", "ps-b", 2),
            machine_persist("m3", "ps-b", 2),
            machine_persist("m4", "ps-c", 2),
        ]
    );
    assert_eq!(c.core.version(), v0 + 3);
    assert_eq!(
        c.layout(),
        layout(&[("ps-b", &["m2", "m3"]), ("ps-c", &["m1", "m4"])])
    );
    let reason = "ps-a is drained";
    assert_eq!(
        c.events(2 * SEC),
        vec![
            ev(
                2000,
                "rebalance",
                "m1",
                "ps-a",
                "ps-c",
                2,
                &rebalance_reason("ps-a", 6, "ps-c", 10)
            ),
            ev(0, "drain", "m2", "ps-a", "ps-b", 2, reason),
            ev(0, "drain", "m3", "ps-a", "ps-b", 2, reason),
            ev(0, "drain", "m4", "ps-a", "ps-c", 2, reason),
        ]
    );
    assert!(c
        .nodes(2 * SEC)
        .iter()
        .any(|n| n.name == "ps-a" && n.drained));
    assert_eq!(assignments(c.node_poll(2 * SEC, "ps-a", vec![])), vec![]);
    assert_eq!(c.all_poll_tick(3 * SEC), vec![]);
}

#[test]
fn a_drain_with_nowhere_to_go_completes_once_a_process_server_reports() {
    let mut c = Cluster::new(
        vec![process("ps-a", 10), process("ps-b", 10), mt()],
        vec![placed("web", "ps-a", "mt-a")],
    );
    c.node_poll(Duration::ZERO, "ps-b", vec![]);
    for n in ["ps-a", "mt-a"] {
        c.node_poll(DEAD, n, vec![]);
    }
    let persist = done_with(
        c.admin(
            DEAD,
            AdminCommand::Drain {
                node: "ps-a".into(),
            },
        ),
        "ps-a drained; 1 machine(s) still to move",
    );
    assert_eq!(persist, vec![Persist::Node(drained(process("ps-a", 10)))]);
    assert_eq!(c.record("web"), placed("web", "ps-a", "mt-a"));
    assert_eq!(c.poll_tick(DEAD + SEC, &["ps-a", "mt-a"]), vec![]);
    assert_eq!(
        c.poll_tick(DEAD + 2 * SEC, &["ps-a", "ps-b", "mt-a"]),
        vec![machine_persist("web", "ps-b", 2)]
    );
    assert_eq!(
        c.events(DEAD + 2 * SEC),
        vec![ev(0, "drain", "web", "ps-a", "ps-b", 2, "ps-a is drained")]
    );
}

#[test]
fn drain_and_undrain_of_an_unknown_node_are_refused() {
    let mut c = Cluster::standard();
    refused_with(
        c.admin(
            SEC,
            AdminCommand::Drain {
                node: "ps-zz".into(),
            },
        ),
        "no node named \"ps-zz\"",
    );
    refused_with(
        c.admin(
            SEC,
            AdminCommand::Undrain {
                node: "ps-zz".into(),
            },
        ),
        "no node named \"ps-zz\"",
    );
}

#[test]
fn a_drained_node_gets_no_machines_from_protect_or_rebalance_until_undrained() {
    let mut c = Cluster::new(
        vec![process("ps-a", 10), drained(process("ps-b", 10)), mt()],
        {
            let mut m = on("ps-a", &["a1", "a2", "a3", "a4"]);
            m.push(discovered("web"));
            m
        },
    );
    assert_eq!(c.all_poll_tick(Duration::ZERO), vec![]);
    // ps-b has headroom 10 against ps-a's 6, but it is drained.
    let persist = done_with(
        c.protect(SEC, "web", KEY),
        "web protected: process server ps-a, master target mt-a, epoch 1",
    );
    assert_eq!(persist.len(), 1);
    assert_eq!(c.record("web").process_server.as_deref(), Some("ps-a"));
    for s in 2..70 {
        assert_eq!(c.all_poll_tick(secs(s)), vec![], "tick at {s}s");
    }
    let (moves, persist) = rebalanced(c.admin(secs(70), AdminCommand::Rebalance));
    assert_eq!((moves, persist), (vec![], vec![]));

    // Undrain: persisted, and the next tick rebalances onto it (5 vs 0: two moves, 3 vs 2).
    let persist = done_with(
        c.admin(
            secs(71),
            AdminCommand::Undrain {
                node: "ps-b".into(),
            },
        ),
        "ps-b accepts machines again",
    );
    assert_eq!(persist, vec![Persist::Node(process("ps-b", 10))]);
    assert_eq!(
        c.all_poll_tick(secs(72)),
        vec![
            machine_persist("a1", "ps-b", 2),
            machine_persist("a2", "ps-b", 2)
        ]
    );
    assert_eq!(
        c.layout(),
        layout(&[("ps-a", &["a3", "a4", "web"]), ("ps-b", &["a1", "a2"])])
    );
}

#[test]
fn protect_after_undrain_may_pick_the_node_again() {
    let mut c = Cluster::new(
        vec![process("ps-a", 10), drained(process("ps-b", 10)), mt()],
        vec![placed("a1", "ps-a", "mt-a"), discovered("web")],
    );
    c.all_nodes_poll(Duration::ZERO);
    done_with(
        c.admin(
            SEC,
            AdminCommand::Undrain {
                node: "ps-b".into(),
            },
        ),
        "ps-b accepts machines again",
    );
    done_with(
        c.protect(SEC, "web", KEY),
        "web protected: process server ps-b, master target mt-a, epoch 1",
    );
}

// ---- rebalancing ---------------------------------------------------------------------------

const SIX: [&str; 6] = ["m0", "m1", "m2", "m3", "m4", "m5"];

/// ps-a with six machines (capacity 10) and mt-a, both reporting and ticked at t0; then ps-b
/// (capacity 10, empty) joins at 1 s and reports at 2 s. Returns the cluster; nothing has been
/// ticked since ps-b joined.
fn six_on_a_then_b_joins(policy: RebalancePolicy) -> Cluster {
    let mut c = with_policy(policy, vec![process("ps-a", 10), mt()], on("ps-a", &SIX));
    assert_eq!(c.all_poll_tick(Duration::ZERO), vec![]);
    let (id, persist) = c
        .core
        .handle_join(NOW_MS, &node_join("ps-b", &[ROLE_PROCESS], 10))
        .expect("join");
    assert_eq!(id, node_id("ps-b", &[ROLE_PROCESS]));
    assert_eq!(
        persist,
        vec![
            Persist::Node(process("ps-b", 10)),
            token_used(NODE_SECRET, 1)
        ]
    );
    c.node_poll(2 * SEC, "ps-b", vec![]);
    c
}

#[test]
fn a_new_empty_process_server_attracts_machines_until_balanced() {
    let mut c = six_on_a_then_b_joins(RebalancePolicy::default());
    let v0 = c.core.version();
    assert_eq!(
        c.poll_tick(2 * SEC, &["ps-a", "mt-a"]),
        vec![
            machine_persist("m0", "ps-b", 2),
            machine_persist("m1", "ps-b", 2),
            machine_persist("m2", "ps-b", 2),
        ]
    );
    assert_eq!(c.core.version(), v0 + 3);
    assert_eq!(
        c.layout(),
        layout(&[("ps-a", &["m3", "m4", "m5"]), ("ps-b", &["m0", "m1", "m2"])])
    );
    assert_eq!(
        c.events(2 * SEC),
        vec![
            ev(
                0,
                "rebalance",
                "m0",
                "ps-a",
                "ps-b",
                2,
                &rebalance_reason("ps-a", 4, "ps-b", 10)
            ),
            ev(
                0,
                "rebalance",
                "m1",
                "ps-a",
                "ps-b",
                2,
                &rebalance_reason("ps-a", 5, "ps-b", 9)
            ),
            ev(
                0,
                "rebalance",
                "m2",
                "ps-a",
                "ps-b",
                2,
                &rebalance_reason("ps-a", 6, "ps-b", 8)
            ),
        ]
    );
    let got: Vec<String> = assignments(c.node_poll(2 * SEC, "ps-b", vec![]))
        .into_iter()
        .map(|a| a.machine)
        .collect();
    assert_eq!(got, vec!["m0", "m1", "m2"]);
    // Balanced: no more moves, minutes later either.
    for s in 3..200 {
        assert_eq!(c.all_poll_tick(secs(s)), vec![], "tick at {s}s");
    }
}

#[test]
fn the_skew_threshold_decides_when_balanced_is_balanced() {
    let mut c = six_on_a_then_b_joins(RebalancePolicy {
        skew_threshold: 4,
        ..Default::default()
    });
    // 6/0 -> 5/1 (gap 4) -> 4/2 (gap 2 < 4): two moves.
    assert_eq!(
        c.poll_tick(2 * SEC, &["ps-a", "mt-a"]),
        vec![
            machine_persist("m0", "ps-b", 2),
            machine_persist("m1", "ps-b", 2)
        ]
    );
    assert_eq!(c.all_poll_tick(3 * SEC), vec![]);
}

#[test]
fn capacity_not_count_decides_the_direction() {
    // ps-a: capacity 20, 8 machines (headroom 12); ps-b: capacity 4, 2 machines (headroom 2).
    let mut machines = on("ps-a", &["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7"]);
    machines.extend(on("ps-b", &["b0", "b1"]));
    let mut c = Cluster::new(
        vec![process("ps-a", 20), process("ps-b", 4), mt()],
        machines,
    );
    // Headroom 12 vs 2: b0 to ps-a (11 vs 3), b1 to ps-a (10 vs 4); still skewed, but ps-b
    // has nothing left to give. The node with more machines is the one that receives them.
    assert_eq!(
        c.all_poll_tick(Duration::ZERO),
        vec![
            machine_persist("b0", "ps-a", 2),
            machine_persist("b1", "ps-a", 2)
        ]
    );
    assert_eq!(c.all_poll_tick(SEC), vec![]);
}

#[test]
fn dead_process_servers_neither_attract_nor_shed_machines_by_rebalancing() {
    // ps-c is empty but never reports; ps-a and ps-b are balanced among themselves.
    let mut machines = on("ps-a", &["a0", "a1", "a2"]);
    machines.extend(on("ps-b", &["b0", "b1", "b2"]));
    let mut c = with_policy(
        RebalancePolicy::default(),
        vec![
            process("ps-a", 10),
            process("ps-b", 10),
            process("ps-c", 10),
            mt(),
        ],
        machines,
    );
    for s in 0..30 {
        assert_eq!(
            c.poll_tick(secs(s), &["ps-a", "ps-b", "mt-a"]),
            vec![],
            "tick at {s}s"
        );
    }
}

#[test]
fn rebalancing_respects_the_move_budget_and_resumes_after_a_minute() {
    let mut c = six_on_a_then_b_joins(RebalancePolicy {
        max_moves_per_minute: 2,
        ..Default::default()
    });
    let t = 2 * SEC;
    assert_eq!(
        c.poll_tick(t, &["ps-a", "mt-a"]),
        vec![
            machine_persist("m0", "ps-b", 2),
            machine_persist("m1", "ps-b", 2)
        ]
    );
    // 4 vs 2 is still skewed, but the budget is spent for the minute.
    for s in 1..60 {
        assert_eq!(c.all_poll_tick(t + secs(s)), vec![], "tick at +{s}s");
    }
    let (moves, persist) = rebalanced(c.admin(t + secs(59), AdminCommand::Rebalance));
    assert_eq!(
        (moves, persist),
        (vec![], vec![]),
        "an explicit rebalance has the same budget"
    );
    assert_eq!(c.all_poll_tick(t + Duration::from_millis(59_999)), vec![]);
    // A minute after the first two moves.
    assert_eq!(
        c.all_poll_tick(t + secs(60)),
        vec![machine_persist("m2", "ps-b", 2)]
    );
    assert_eq!(
        c.layout(),
        layout(&[("ps-a", &["m3", "m4", "m5"]), ("ps-b", &["m0", "m1", "m2"])])
    );
    for s in 61..200 {
        assert_eq!(c.all_poll_tick(t + secs(s)), vec![], "tick at +{s}s");
    }
}

#[test]
fn a_zero_budget_never_rebalances() {
    let mut c = six_on_a_then_b_joins(RebalancePolicy {
        max_moves_per_minute: 0,
        ..Default::default()
    });
    for s in 2..200 {
        assert_eq!(c.all_poll_tick(secs(s)), vec![], "tick at {s}s");
    }
}

#[test]
fn cooldown_keeps_a_just_rebalanced_machine_in_place() {
    let cooldown = secs(120);
    let mut c = six_on_a_then_b_joins(RebalancePolicy {
        cooldown,
        ..Default::default()
    });
    let t = 2 * SEC;
    assert_eq!(c.poll_tick(t, &["ps-a", "mt-a"]).len(), 3);
    // Two machines leave ps-a: 1 vs 3, so ps-b should give one back, but all three of its
    // machines were just moved there.
    for m in ["m3", "m4"] {
        done_with(
            c.admin(t + SEC, AdminCommand::Unprotect { machine: m.into() }),
            &format!("{m} unprotected; its replica stays on mt-a"),
        );
    }
    // The budget (10 a minute) is not what holds it back: only the cooldown.
    for s in 1..120 {
        assert_eq!(c.all_poll_tick(t + secs(s)), vec![], "tick at +{s}s");
    }
    assert_eq!(
        c.all_poll_tick(t + cooldown),
        vec![machine_persist("m0", "ps-a", 3)]
    );
    let events = c.events(t + cooldown);
    assert_eq!(
        events.last(),
        Some(&ev(
            0,
            "rebalance",
            "m0",
            "ps-b",
            "ps-a",
            3,
            &rebalance_reason("ps-b", 7, "ps-a", 9)
        ))
    );
}

#[test]
fn the_rebalancer_skips_machines_in_cooldown_and_takes_another() {
    // ps-a: 8 machines, ps-b: z0. 2 vs 9 -> m0, m1, m2 move to ps-b (5 vs 6).
    let mut machines = on("ps-a", &["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7"]);
    machines.extend(on("ps-b", &["z0"]));
    let mut c = Cluster::new(
        vec![process("ps-a", 10), process("ps-b", 10), mt()],
        machines,
    );
    assert_eq!(
        c.all_poll_tick(Duration::ZERO),
        vec![
            machine_persist("m0", "ps-b", 2),
            machine_persist("m1", "ps-b", 2),
            machine_persist("m2", "ps-b", 2),
        ]
    );
    // Three leave ps-a: headroom 8 vs 6. Moving z0 (not cooling down) to ps-a would reverse
    // the ps-a -> ps-b moves of a second ago, so nothing moves within the cooldown...
    for m in ["m3", "m4", "m5"] {
        c.admin(SEC, AdminCommand::Unprotect { machine: m.into() });
    }
    assert_eq!(c.all_poll_tick(SEC), vec![]);
    // ...and after it, the machine that is not cooling down goes.
    let after = secs(61);
    let moved = c.all_poll_tick(after);
    assert_eq!(moved.len(), 1, "{moved:?}");
    let l = c.layout();
    assert_eq!((l["ps-a"].len(), l["ps-b"].len()), (3, 3), "{l:?}");
}

#[test]
fn with_auto_off_ticks_do_not_rebalance_but_the_rebalance_command_does() {
    let mut c = six_on_a_then_b_joins(manual());
    for s in 2..200 {
        assert_eq!(c.all_poll_tick(secs(s)), vec![], "tick at {s}s");
    }
    let v0 = c.core.version();
    let (moves, persist) = rebalanced(c.admin(secs(200), AdminCommand::Rebalance));
    assert_eq!(
        moves,
        vec![
            ev(
                0,
                "rebalance",
                "m0",
                "ps-a",
                "ps-b",
                2,
                &rebalance_reason("ps-a", 4, "ps-b", 10)
            ),
            ev(
                0,
                "rebalance",
                "m1",
                "ps-a",
                "ps-b",
                2,
                &rebalance_reason("ps-a", 5, "ps-b", 9)
            ),
            ev(
                0,
                "rebalance",
                "m2",
                "ps-a",
                "ps-b",
                2,
                &rebalance_reason("ps-a", 6, "ps-b", 8)
            ),
        ]
    );
    assert_eq!(
        persist,
        vec![
            machine_persist("m0", "ps-b", 2),
            machine_persist("m1", "ps-b", 2),
            machine_persist("m2", "ps-b", 2),
        ]
    );
    assert_eq!(c.core.version(), v0 + 3);
    assert_eq!(
        c.events(secs(201))
            .iter()
            .map(|e| e.age_ms)
            .collect::<Vec<_>>(),
        vec![1000; 3]
    );
    // Balanced now: another pass does nothing.
    let (moves, persist) = rebalanced(c.admin(secs(201), AdminCommand::Rebalance));
    assert_eq!((moves, persist), (vec![], vec![]));
    // Auto off still fails over and drains.
    assert_eq!(
        c.poll_tick(secs(210), &["ps-a", "mt-a"]).len(),
        3,
        "failover of ps-b"
    );
}

// ---- no flapping ---------------------------------------------------------------------------

/// Every move event with the second (since t0) it happened at.
fn moves_at(c: &mut Cluster, now: Duration) -> Vec<(u64, EventView)> {
    c.events(now)
        .into_iter()
        .map(|e| ((now.as_millis() as u64 - e.age_ms) / 1000, e))
        .collect()
}

/// No machine is moved twice (by an event of one of `kinds`) less than `cooldown` apart.
#[track_caller]
fn assert_no_machine_moved_twice_within(moves: &[(u64, EventView)], kinds: &[&str], cooldown: u64) {
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    for (at, e) in moves
        .iter()
        .filter(|(_, e)| kinds.contains(&e.kind.as_str()))
    {
        if let Some(prev) = last.insert(&e.machine, *at) {
            assert!(
                at - prev >= cooldown,
                "{} moved at {prev}s and again at {at}s ({} {:?} -> {:?}); moves: {:#?}",
                e.machine,
                e.kind,
                e.from,
                e.to,
                moves
                    .iter()
                    .map(|(t, e)| format!("{t}s {} {} {:?}->{:?}", e.kind, e.machine, e.from, e.to))
                    .collect::<Vec<_>>()
            );
        }
    }
}

/// At most `budget` rebalancing moves in any 60 s window.
#[track_caller]
fn assert_within_budget(moves: &[(u64, EventView)], budget: usize) {
    let times: Vec<u64> = moves
        .iter()
        .filter(|(_, e)| e.kind == "rebalance")
        .map(|(t, _)| *t)
        .collect();
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|u| **u < t + 60).count();
        assert!(
            in_window <= budget,
            "{in_window} rebalancing moves in the minute from {t}s"
        );
    }
}

#[test]
fn a_machine_count_oscillating_by_one_moves_at_most_once() {
    // ps-a: 5 machines plus zx, which is protected and unprotected on alternate ticks (the
    // record is flipped directly: a protect would place it anew); ps-b: 4. With zx, headroom
    // 4 vs 6: one move. Without, 4/5 machines; with, 5/5: never a move again.
    let mut machines = on("ps-a", &["a0", "a1", "a2", "a3", "a4", "zx"]);
    machines.extend(on("ps-b", &["b0", "b1", "b2", "b3"]));
    let mut c = Cluster::new(
        vec![process("ps-a", 10), process("ps-b", 10), mt()],
        machines,
    );
    for s in 0..600 {
        c.core.machines.get_mut("zx").unwrap().protected = s % 2 == 0;
        c.all_poll_tick(secs(s));
    }
    let moves = moves_at(&mut c, secs(600));
    assert_eq!(
        moves,
        vec![(
            0,
            ev(
                600_000,
                "rebalance",
                "a0",
                "ps-a",
                "ps-b",
                2,
                &rebalance_reason("ps-a", 4, "ps-b", 6)
            )
        )]
    );
}

/// ps-a: a0..a4 and zx; ps-b: b0..b3 and zy. zx is protected on even ticks, zy on odd ones:
/// every tick the headroom gap swings between +2 and -2. Ten minutes of one-second ticks.
fn antiphase_load() -> Vec<(u64, EventView)> {
    let mut machines = on("ps-a", &["a0", "a1", "a2", "a3", "a4", "zx"]);
    machines.extend(on("ps-b", &["b0", "b1", "b2", "b3", "zy"]));
    let mut c = Cluster::new(
        vec![process("ps-a", 10), process("ps-b", 10), mt()],
        machines,
    );
    for s in 0..600 {
        c.core.machines.get_mut("zx").unwrap().protected = s % 2 == 0;
        c.core.machines.get_mut("zy").unwrap().protected = s % 2 == 1;
        c.all_poll_tick(secs(s));
    }
    moves_at(&mut c, secs(600))
}

#[test]
fn oscillating_load_never_moves_a_machine_twice_within_the_cooldown() {
    let moves = antiphase_load();
    assert!(
        moves.iter().all(|(_, e)| e.kind == "rebalance"),
        "{moves:?}"
    );
    assert_no_machine_moved_twice_within(&moves, &["rebalance"], 60);
    assert_within_budget(&moves, 10);
    // Exactly: the rebalancer never reverses a move within the cooldown, so a load that swings
    // every tick moves one machine once a cooldown (60 s) at most.
    let got: Vec<(u64, &str, &str)> = moves
        .iter()
        .map(|(t, e)| (*t, e.machine.as_str(), e.to.as_deref().unwrap()))
        .collect();
    assert!(got.len() <= 10, "{got:?}");
    for w in got.windows(2) {
        assert!(
            w[1].0 - w[0].0 >= 60,
            "two moves within a cooldown: {got:?}"
        );
    }
}

/// A node-level view of flapping: once the rebalancer moved a machine from ps-a to ps-b, it
/// does not move one from ps-b to ps-a within the cooldown just because the load swung back.
#[test]
fn oscillating_load_does_not_ping_pong_between_two_nodes() {
    let moves = antiphase_load();
    let mut last_direction: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (at, e) in &moves {
        let (from, to) = (e.from.clone().unwrap(), e.to.clone().unwrap());
        if let Some(prev) = last_direction.get(&(to.clone(), from.clone())) {
            assert!(
                at - prev >= 60,
                "{} moved {from} -> {to} at {at}s, {}s after a move {to} -> {from}; {} moves in 10 minutes",
                e.machine,
                at - prev,
                moves.len()
            );
        }
        last_direction.insert((from, to), *at);
    }
}

/// ps-a: m3, m4, m5; ps-b: m0, m1, m2. ps-b reports for 6 s, then is silent for 6 s (dead in
/// the last two ticks of each 12 s cycle), over and over, for ten minutes of one-second ticks.
fn flapping_ps_b() -> Vec<(u64, EventView)> {
    let mut machines = on("ps-a", &["m3", "m4", "m5"]);
    machines.extend(on("ps-b", &["m0", "m1", "m2"]));
    let mut c = Cluster::new(
        vec![process("ps-a", 10), process("ps-b", 10), mt()],
        machines,
    );
    for s in 0..600 {
        if s % 12 < 6 {
            c.poll_tick(secs(s), &["ps-a", "ps-b", "mt-a"]);
        } else {
            c.poll_tick(secs(s), &["ps-a", "mt-a"]);
        }
    }
    moves_at(&mut c, secs(600))
}

#[test]
fn flapping_liveness_of_a_process_server_keeps_moves_bounded() {
    let moves = flapping_ps_b();
    let count = |kind: &str| moves.iter().filter(|(_, e)| e.kind == kind).count();
    assert_eq!(
        count("rebalance") + count("failover"),
        moves.len(),
        "{moves:?}"
    );
    // Failover only ever takes machines off ps-b, onto ps-a, while ps-b is silent.
    for (at, e) in moves.iter().filter(|(_, e)| e.kind == "failover") {
        assert_eq!(
            (e.from.as_deref(), e.to.as_deref()),
            (Some("ps-b"), Some("ps-a")),
            "at {at}s"
        );
        assert!(at % 12 >= 10, "failover at {at}s while ps-b was alive");
    }
    // The rebalancer only sends machines to the node that came back, within its budget, and
    // never moves one machine twice within the cooldown.
    for (at, e) in moves.iter().filter(|(_, e)| e.kind == "rebalance") {
        assert_eq!(
            (e.from.as_deref(), e.to.as_deref()),
            (Some("ps-a"), Some("ps-b")),
            "at {at}s"
        );
    }
    assert_within_budget(&moves, 10);
    assert_no_machine_moved_twice_within(&moves, &["rebalance"], 60);
    // Bounded: each failover undoes a rebalancing move (or moves one of the three machines
    // that started on ps-b); the cooldown lets each machine go to ps-b once a minute.
    assert!(count("failover") <= count("rebalance") + 3);
    assert!(count("rebalance") <= 6 * 10, "{}", count("rebalance"));
}

/// The brief's "no flapping" for a process server whose liveness toggles: no machine goes
/// back and forth (X -> Y, then Y -> X) within the cooldown, whatever moved it.
#[test]
fn a_flapping_process_server_does_not_bounce_machines_back_and_forth() {
    let moves = flapping_ps_b();
    let mut last: BTreeMap<&str, (u64, &EventView)> = BTreeMap::new();
    for (at, e) in &moves {
        if let Some((prev_at, prev)) = last.get(e.machine.as_str()) {
            if prev.from == e.to {
                assert!(
                    at - prev_at >= 60,
                    "{} moved by {} {:?} -> {:?} at {prev_at}s and back by {} at {at}s; {} moves in 10 minutes",
                    e.machine,
                    prev.kind,
                    prev.from,
                    prev.to,
                    e.kind,
                    moves.len()
                );
            }
        }
        last.insert(&e.machine, (*at, e));
    }
}

#[test]
fn an_operator_move_is_not_undone_by_the_next_tick() {
    let mut machines = on("ps-a", &["app"]);
    machines.extend(on("ps-b", &["db"]));
    let mut c = Cluster::new(
        vec![process("ps-a", 10), process("ps-b", 10), mt()],
        machines,
    );
    assert_eq!(c.all_poll_tick(Duration::ZERO), vec![]);
    let (reply, _) = moved(c.move_to(SEC, "app", "ps-b"));
    assert_eq!(reply, mv("app", "ps-a", "ps-b", 2));
    // ps-a 0, ps-b 2: skewed by the threshold. The rebalancer may even the load, but not by
    // moving the machine the operator placed a second ago: app stays, db goes.
    let persist = c.all_poll_tick(2 * SEC);
    assert!(persist.len() <= 1, "events: {:?}", c.events(2 * SEC));
    for t in 3..120 {
        c.all_poll_tick(secs(t));
        assert_eq!(
            c.record("app").process_server.as_deref(),
            Some("ps-b"),
            "at {t}s"
        );
    }
}

// ---- events --------------------------------------------------------------------------------

#[test]
fn events_are_listed_in_order_with_their_age() {
    let mut c = Cluster::new(
        vec![process("ps-a", 10), process("ps-b", 10), mt()],
        vec![placed("web", "ps-a", "mt-a")],
    );
    assert_eq!(c.all_poll_tick(Duration::ZERO), vec![]);
    assert_eq!(c.events(Duration::ZERO), vec![]);
    moved(c.move_to(SEC, "web", "ps-b"));
    moved(c.move_to(Duration::from_millis(3500), "web", "ps-a"));
    // ps-a falls silent after t0: failover back to ps-b at 6 s.
    assert_eq!(
        c.poll_tick(DEAD, &["ps-b", "mt-a"]),
        vec![machine_persist("web", "ps-b", 4)]
    );
    let now = secs(10);
    assert_eq!(
        c.events(now),
        vec![
            ev(9000, "move", "web", "ps-a", "ps-b", 2, "operator request"),
            ev(6500, "move", "web", "ps-b", "ps-a", 3, "operator request"),
            ev(
                4000,
                "failover",
                "web",
                "ps-a",
                "ps-b",
                4,
                &failover_reason("ps-a")
            ),
        ]
    );
    // Listing is read-only and ages with the clock.
    let later: Vec<u64> = c.events(now + SEC).into_iter().map(|e| e.age_ms).collect();
    assert_eq!(later, vec![10_000, 7500, 5000]);
}

#[test]
fn at_most_events_max_events_are_kept_oldest_dropped_first() {
    let mut c = Cluster::new(
        vec![process("ps-a", 10), process("ps-b", 10), mt()],
        vec![placed("web", "ps-a", "mt-a")],
    );
    c.all_nodes_poll(Duration::ZERO);
    let n = EVENTS_MAX as u64 + 5;
    for i in 0..n {
        let to = if i % 2 == 0 { "ps-b" } else { "ps-a" };
        let (reply, _) = moved(c.move_to(Duration::from_millis(i), "web", to));
        assert_eq!(reply.3, i + 2);
    }
    let events = c.events(secs(2));
    assert_eq!(events.len(), EVENTS_MAX);
    // Moves 0..=4 (generations 2..=6) were dropped.
    let gens: Vec<u64> = events.iter().map(|e| e.generation).collect();
    assert_eq!(gens, (7..=n + 1).collect::<Vec<_>>());
    assert_eq!(events[0].age_ms, 2000 - 5);
    assert_eq!(events.last().unwrap().age_ms, 2000 - (n - 1));
}
