//! Unit tests of failover orchestration in [`ConfigCore`] (`failover.rs`): every transition
//! and every refusal, what the agent, the process server and the master target are told at
//! each stage, and resuming from the persisted record after a restart. Explicit `now`, exact
//! outcomes, no I/O.
use haven_cluster::{Failback, FailbackStage, Failover, MachineRecord, PointSpec, Recovery};

use crate::configuration::core::failover::FINAL_POINT_NAME;
use crate::proto::{FailbackOrder, FailoverReport, Materialised, RebaseOrder, ReverseDone};
use crate::view::{FailoverView, PointView};

use super::*;

fn tap_stats(captured: u64, applied: u64) -> AgentStats {
    AgentStats {
        capture: "tap".into(),
        ..stats(1, captured, applied)
    }
}

/// `web` protected on ps-a / mt-a with tap capture; nodes and agent reporting at `at`.
fn tap_web() -> Cluster {
    let mut c = protected_web();
    c.agent_poll(Duration::ZERO, "web", tap_stats(40, 40), None);
    c
}

fn failover(c: &mut Cluster, at: Duration, point: PointSpec) -> Outcome {
    c.admin(
        at,
        AdminCommand::Failover {
            machine: "web".into(),
            point,
        },
    )
}

#[track_caller]
fn view(outcome: Outcome) -> (FailoverView, Vec<Persist>) {
    match outcome {
        (Response::Admin(AdminReply::Failover(v)), p) => (*v, p),
        other => panic!("expected a failover view, got {other:?}"),
    }
}

fn state(c: &mut Cluster, at: Duration) -> FailoverView {
    view(c.admin(
        at,
        AdminCommand::FailoverState {
            machine: "web".into(),
        },
    ))
    .0
}

fn recovery(persist: &[Persist]) -> Recovery {
    match persist {
        [Persist::Machine(m)] => m.recovery.clone(),
        other => panic!("expected the machine persisted, got {other:?}"),
    }
}

fn poll_agent(
    c: &mut Cluster,
    at: Duration,
    done: Vec<MarkDone>,
) -> (AgentPollReply, Vec<Persist>) {
    poll_agent_with(c, at, |r| r.marks_done = done)
}

/// The agent's poll at `at`, its report changed by `edit`.
fn poll_agent_with(
    c: &mut Cluster,
    at: Duration,
    edit: impl FnOnce(&mut AgentReport),
) -> (AgentPollReply, Vec<Persist>) {
    let mut report = AgentReport {
        machine: "web".into(),
        hostname: "web-host".into(),
        disks: web_disks(),
        stats: tap_stats(50, 40),
        report_seq: at.as_micros() as u64 + 1,
        ..Default::default()
    };
    edit(&mut report);
    agent_reply(
        c.core
            .handle_agent_poll(c.t0 + at, &agent_id("web"), report),
    )
}

/// The master target's poll: its applied seq and the failover it serves.
fn poll_mt(
    c: &mut Cluster,
    at: Duration,
    applied: u64,
    served: Option<FailoverReport>,
) -> (Vec<Assignment>, Vec<Persist>) {
    let report = NodeMachineReport {
        failover: served,
        ..mt_report("web", applied)
    };
    match c.node_poll(at, "mt-a", vec![report]) {
        (Response::NodePoll(r), p) => (r.assignments, p),
        other => panic!("expected a node poll reply, got {other:?}"),
    }
}

fn served(id: u64, seq: u64) -> FailoverReport {
    FailoverReport {
        id,
        point: Some(PointView {
            point: seq.to_string(),
            seq,
            time_ms: NOW_MS,
            kind: "crash".into(),
            name: None,
        }),
        disks: vec![],
        writes: 0,
        serve_ms: 12,
        error: None,
        quiesced: false,
        materialised: None,
    }
}

fn ps_assignments(c: &mut Cluster, at: Duration) -> Vec<Assignment> {
    assignments(c.node_poll(at, "ps-a", vec![]))
}

#[test]
fn a_planned_failover_quiesces_the_source_drains_then_orders_the_master_target() {
    let mut c = tap_web();
    let (v, p) = view(failover(&mut c, SEC, PointSpec::Latest));
    assert!(v.planned, "{v:?}");
    assert_eq!(v.stage, "quiescing");
    assert_eq!(v.state, "failover-pending");
    let Recovery::FailoverPending(f) = recovery(&p) else {
        panic!("pending")
    };
    let mark = f.final_mark.expect("a final point is asked for");
    assert!(!f.ordered);

    // The agent: read-only and the final point, in the same reply; still its process server
    // (the last writes must reach the master target).
    let (r, _) = poll_agent(&mut c, SEC, vec![]);
    assert!(
        r.read_only
            .as_deref()
            .is_some_and(|w| w.contains("failover-pending")),
        "{r:?}"
    );
    assert_eq!(r.process_server, ps("ps-a"));
    assert_eq!(
        r.marks,
        vec![MarkRequest {
            id: mark,
            app: false,
            name: Some(FINAL_POINT_NAME.into()),
            hold_ms: 0,
        }]
    );
    // Nobody is told to serve yet; the process server still ships.
    let (a, _) = poll_mt(&mut c, SEC, 40, None);
    assert_eq!(a[0].failover, None);
    assert_eq!(ps_assignments(&mut c, SEC).len(), 1);

    // The final point is made at seq 50: draining until the master target applied it.
    let (_, p) = poll_agent(
        &mut c,
        2 * SEC,
        vec![MarkDone {
            request: mark,
            id: 1,
            seq: Some(50),
            kind: Some(PointKind::Crash),
            name: Some(FINAL_POINT_NAME.into()),
            time_ms: NOW_MS,
            ..Default::default()
        }],
    );
    let Recovery::FailoverPending(f) = recovery(&p) else {
        panic!("pending")
    };
    assert_eq!(f.final_seq, Some(50));
    assert_eq!(state(&mut c, 2 * SEC).stage, "draining");
    let (a, p) = poll_mt(&mut c, 2 * SEC, 45, None);
    assert_eq!((a[0].failover.clone(), p), (None, vec![]));

    // Applied: the order goes out for exactly that point; the process server is out.
    let version = c.core.version();
    let (a, p) = poll_mt(&mut c, 3 * SEC, 50, None);
    assert!(
        c.core.version() > version,
        "nodes waiting on the version hear of it"
    );
    let Recovery::FailoverPending(f) = recovery(&p) else {
        panic!("pending")
    };
    assert!(f.ordered);
    let order = a[0].failover.clone().expect("an order");
    assert_eq!(order.point, PointSpec::Seq(50));
    assert!(!order.committed);
    assert_eq!(a[0].process_server, "");
    assert_eq!(ps_assignments(&mut c, 3 * SEC), vec![]);
    assert_eq!(poll_agent(&mut c, 3 * SEC, vec![]).0.process_server, None);
    assert_eq!(state(&mut c, 3 * SEC).stage, "serving");

    // Commit needs the point served; once served, it fixes it.
    refused_with(
        c.admin(
            3 * SEC,
            AdminCommand::FailoverCommit {
                machine: "web".into(),
            },
        ),
        "the master target does not serve the failover of web yet; `ctl failover web` shows what it waits for",
    );
    poll_mt(&mut c, 4 * SEC, 50, Some(served(order.id, 50)));
    let v = state(&mut c, 4 * SEC);
    assert_eq!((v.stage.as_str(), v.serve_ms), ("served", Some(12)));
    assert_eq!(v.point.as_ref().map(|p| p.seq), Some(50));
    let m = c.machine(4 * SEC, "web");
    assert_eq!(
        (m.state.as_str(), m.rpo_seconds),
        ("failover-pending", None)
    );
    let (v, p) = view(c.admin(
        4 * SEC,
        AdminCommand::FailoverCommit {
            machine: "web".into(),
        },
    ));
    assert_eq!(v.state, "failed-over");
    assert!(matches!(recovery(&p), Recovery::FailedOver(_)));
    let (a, _) = poll_mt(&mut c, 5 * SEC, 50, Some(served(order.id, 50)));
    assert!(a[0].failover.as_ref().is_some_and(|o| o.committed));

    // Committed: no cancel, no other point; asking again answers with the failover.
    refused_with(
        c.admin(
            5 * SEC,
            AdminCommand::FailoverCancel {
                machine: "web".into(),
            },
        ),
        "the failover of web is committed: reprotect and failback bring it home",
    );
    refused_with(
        c.admin(
            5 * SEC,
            AdminCommand::FailoverChangePoint {
                machine: "web".into(),
                point: PointSpec::Seq(7),
            },
        ),
        "the failover of web is committed: its point can no longer change",
    );
    let (v, p) = view(failover(&mut c, 5 * SEC, PointSpec::Latest));
    assert_eq!((v.state.as_str(), p), ("failed-over", vec![]));
    refused_with(
        failover(&mut c, 5 * SEC, PointSpec::Seq(3)),
        "web is failed-over at point 50: the point of a committed failover no longer changes",
    );
    let events: Vec<String> = match c.admin(5 * SEC, AdminCommand::Events) {
        (Response::Admin(AdminReply::Events(e)), _) => e.into_iter().map(|e| e.reason).collect(),
        other => panic!("{other:?}"),
    };
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("failover started (planned")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.contains("final point 50 is applied")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.starts_with("failover committed")),
        "{events:?}"
    );
}

#[test]
fn with_the_source_silent_the_failover_is_unplanned_and_ordered_at_once() {
    let mut c = tap_web();
    // The agent last reported at 0; the nodes are alive at 10 s.
    c.all_nodes_poll(10 * SEC);
    let (v, p) = view(failover(&mut c, 10 * SEC, PointSpec::Seq(7)));
    assert!(!v.planned);
    assert_eq!(v.stage, "serving");
    assert_eq!(v.point_asked, "7");
    let Recovery::FailoverPending(f) = recovery(&p) else {
        panic!("pending")
    };
    assert!(f.ordered && f.final_mark.is_none());
    let (a, _) = poll_mt(&mut c, 10 * SEC, 40, None);
    assert_eq!(
        a[0].failover.as_ref().map(|o| o.point.clone()),
        Some(PointSpec::Seq(7))
    );
}

#[test]
fn a_source_that_stops_reporting_before_its_final_point_turns_the_failover_unplanned() {
    let mut c = tap_web();
    view(failover(&mut c, SEC, PointSpec::Latest));
    // Only the master target reports from here; the agent's last report was at 0.
    let (a, p) = poll_mt(&mut c, 10 * SEC, 40, None);
    let Recovery::FailoverPending(f) = recovery(&p) else {
        panic!("pending")
    };
    assert!(!f.planned && f.ordered, "{f:?}");
    assert_eq!(
        a[0].failover.as_ref().map(|o| o.point.clone()),
        Some(PointSpec::Latest)
    );
}

#[test]
fn refusals_change_nothing() {
    let mut c = Cluster::standard();
    c.all_nodes_poll(Duration::ZERO);
    refused_with(
        failover(&mut c, SEC, PointSpec::Latest),
        "web is not protected: there is no replica to fail over to",
    );
    c.core.machines.get_mut("web").unwrap().protected = false;
    let mut c = tap_web();
    refused_with(
        c.admin(
            SEC,
            AdminCommand::Failover {
                machine: "nope".into(),
                point: PointSpec::Latest,
            },
        ),
        "no machine named \"nope\"",
    );
    refused_with(
        c.admin(
            SEC,
            AdminCommand::FailoverCancel {
                machine: "web".into(),
            },
        ),
        "web is not failed over: nothing to cancel",
    );
    refused_with(
        c.admin(
            SEC,
            AdminCommand::FailoverChangePoint {
                machine: "web".into(),
                point: PointSpec::Latest,
            },
        ),
        "web is not failed over: start with `ctl failover web --point P`",
    );
    // The master target silent past the failure timeout: refused, nothing recorded.
    c.node_poll(10 * SEC, "ps-a", vec![]);
    c.agent_poll(10 * SEC, "web", tap_stats(40, 40), None);
    refused_with(
        failover(&mut c, 10 * SEC, PointSpec::Latest),
        "the master target mt-a of web is not reporting: the failover needs it (it holds the replica); start it again, then retry",
    );
    assert_eq!(c.core.machines["web"].recovery, Recovery::Protected);

    // Pending at one point: another is refused (change-point is the way), the same answers.
    c.all_nodes_poll(11 * SEC);
    c.agent_poll(11 * SEC, "web", tap_stats(40, 40), None);
    view(failover(&mut c, 11 * SEC, PointSpec::Latest));
    refused_with(
        failover(&mut c, 11 * SEC, PointSpec::Seq(3)),
        "web is failover-pending (point latest); change the point with `ctl failover-change-point web --point P` or cancel with `ctl failover-cancel web`",
    );
    let (_, p) = view(failover(&mut c, 11 * SEC, PointSpec::Latest));
    assert_eq!(p, vec![], "asking again changes nothing");
    // Planned and still quiescing: the point cannot change yet.
    refused_with(
        c.admin(
            11 * SEC,
            AdminCommand::FailoverChangePoint {
                machine: "web".into(),
                point: PointSpec::Seq(3),
            },
        ),
        "the planned failover of web is still waiting for the source's final point; retry once it is served",
    );
}

#[test]
fn change_point_issues_a_new_order_and_cancel_returns_to_protected() {
    let mut c = tap_web();
    c.all_nodes_poll(10 * SEC);
    view(failover(&mut c, 10 * SEC, PointSpec::Seq(7)));
    let (a, _) = poll_mt(&mut c, 10 * SEC, 40, None);
    let first = a[0].failover.clone().unwrap();
    let (v, p) = view(c.admin(
        11 * SEC,
        AdminCommand::FailoverChangePoint {
            machine: "web".into(),
            point: PointSpec::Seq(9),
        },
    ));
    assert_eq!((v.point_asked.as_str(), v.stage.as_str()), ("9", "serving"));
    let Recovery::FailoverPending(f) = recovery(&p) else {
        panic!("pending")
    };
    assert_ne!(f.id, first.id, "a new order replaces the served one");
    // The report of the earlier order does not make the new one served.
    poll_mt(&mut c, 11 * SEC, 40, Some(served(first.id, 7)));
    assert_eq!(state(&mut c, 11 * SEC).stage, "serving");
    refused_with(
        c.admin(
            11 * SEC,
            AdminCommand::FailoverCommit {
                machine: "web".into(),
            },
        ),
        "the master target does not serve the failover of web yet; `ctl failover web` shows what it waits for",
    );

    let (v, p) = view(c.admin(
        12 * SEC,
        AdminCommand::FailoverCancel {
            machine: "web".into(),
        },
    ));
    assert_eq!(v.stage, "cancelled");
    assert_eq!(recovery(&p), Recovery::Protected);
    // Forward again: the process server is back, the order gone, the tap writable.
    let (a, _) = poll_mt(&mut c, 12 * SEC, 40, None);
    assert_eq!(a[0].failover, None);
    assert_eq!(a[0].process_server, "ps-a");
    let (r, _) = poll_agent(&mut c, 12 * SEC, vec![]);
    assert_eq!((r.read_only, r.process_server), (None, ps("ps-a")));
    assert_eq!(c.machine(12 * SEC, "web").recovery_state, "protected");
}

#[test]
fn a_restarted_configuration_node_resumes_a_planned_failover_from_its_record() {
    let mut c = tap_web();
    let (_, p) = view(failover(&mut c, SEC, PointSpec::Latest));
    let [Persist::Machine(rec)] = &p[..] else {
        panic!("{p:?}")
    };
    // A new core from the persisted records: the mark it asked for is gone with the memory.
    // (Seeded otherwise, as the OS seeds a real restart: mark ids do not repeat.)
    let nodes: Vec<NodeRecord> = c.core.nodes.values().cloned().collect();
    let mut c = Cluster {
        core: ConfigCore::with_seed(meta(), nodes, vec![rec.clone()], 99).with_tokens(tokens()),
        t0: c.t0,
    };
    let (r, p) = poll_agent(&mut c, SEC, vec![]);
    assert!(r.read_only.is_some(), "still read-only after the restart");
    let Recovery::FailoverPending(f) = recovery(&p) else {
        panic!("pending")
    };
    let Failover { final_mark, .. } = *f;
    let asked = final_mark.expect("a new final point is asked for");
    let (r, _) = poll_agent(&mut c, SEC, vec![]);
    assert_eq!(
        r.marks.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![asked]
    );
}

fn reprotect(c: &mut Cluster, at: Duration) -> Outcome {
    c.admin(
        at,
        AdminCommand::Reprotect {
            machine: "web".into(),
        },
    )
}

fn reverse_done(
    c: &mut Cluster,
    at: Duration,
    done: ReverseDone,
) -> (AgentPollReply, Vec<Persist>) {
    poll_agent_with(c, at, |r| r.reverse_done = Some(done))
}

#[test]
fn reprotect_needs_a_commit_and_the_agent_then_asks_it_for_a_pass_until_done() {
    let mut c = tap_web();
    c.all_nodes_poll(10 * SEC);
    refused_with(
        reprotect(&mut c, 10 * SEC),
        "web is not failed over: nothing to reprotect",
    );
    view(failover(&mut c, 10 * SEC, PointSpec::Seq(7)));
    let (a, _) = poll_mt(&mut c, 10 * SEC, 40, None);
    let order = a[0].failover.clone().unwrap();
    refused_with(
        reprotect(&mut c, 10 * SEC),
        "the failover of web is not committed: reprotect rewrites the original disks to the recovery disks, so fix the point first with `ctl failover-commit web` (or cancel the failover)",
    );
    poll_mt(&mut c, 10 * SEC, 40, Some(served(order.id, 7)));
    view(c.admin(
        10 * SEC,
        AdminCommand::FailoverCommit {
            machine: "web".into(),
        },
    ));
    // The agent last reported at 0: it is not connected.
    refused_with(
        reprotect(&mut c, 10 * SEC),
        "the original site's agent for web is not connected: start it again (same --data-dir; its disks stay read-only), then retry",
    );
    let (r, _) = poll_agent(&mut c, 11 * SEC, vec![]);
    assert_eq!(r.reverse, None, "no pass before reprotect");
    assert!(r.read_only.is_some());

    let (v, p) = view(reprotect(&mut c, 11 * SEC));
    assert_eq!(v.state, "reprotecting");
    assert!(matches!(recovery(&p), Recovery::Reprotecting(_)));
    let (r, _) = poll_agent(&mut c, 11 * SEC, vec![]);
    let asked = r.reverse.expect("a pass is asked for");
    assert_eq!(
        (asked.order, asked.pass, asked.master_target.0.as_str()),
        (order.id, 1, "mt-a")
    );
    assert!(r.read_only.is_some(), "still read-only while reprotecting");
    assert_eq!(r.process_server, None);
    // Reprotecting keeps the master target serving, committed.
    let (a, _) = poll_mt(&mut c, 11 * SEC, 40, Some(served(order.id, 7)));
    assert!(a[0]
        .failover
        .as_ref()
        .is_some_and(|o| o.committed && o.id == order.id));
    refused_with(
        c.admin(
            11 * SEC,
            AdminCommand::FailoverCancel {
                machine: "web".into(),
            },
        ),
        "the failover of web is committed: reprotect and failback bring it home",
    );

    // A failed attempt is recorded (the agent retries); a report of another order is ignored.
    let failed = ReverseDone {
        order: order.id,
        pass: 1,
        error: Some("connect: refused".into()),
        ..Default::default()
    };
    let (_, p) = reverse_done(&mut c, 12 * SEC, failed.clone());
    assert!(matches!(recovery(&p), Recovery::Reprotecting(_)));
    let (_, p) = reverse_done(&mut c, 12 * SEC, failed);
    assert_eq!(p, vec![], "the same failure twice changes nothing");
    let (_, p) = reverse_done(
        &mut c,
        12 * SEC,
        ReverseDone {
            order: order.id + 1,
            pass: 1,
            ..Default::default()
        },
    );
    assert_eq!(p, vec![]);

    // Done: reprotected, with the figures; no more pass asked for.
    let (_, p) = reverse_done(
        &mut c,
        13 * SEC,
        ReverseDone {
            order: order.id,
            pass: 1,
            bytes_compared: 1 << 30,
            hash_bytes: 2 << 20,
            bytes_received: 8 << 20,
            blocks_written: 2048,
            error: None,
            tracked: false,
        },
    );
    let Recovery::Reprotected(f) = recovery(&p) else {
        panic!("reprotected: {p:?}")
    };
    let rp = f.reverse.expect("figures");
    assert_eq!(
        (rp.done_pass, rp.blocks_written, rp.bytes_received, rp.error),
        (1, 2048, 8 << 20, None)
    );
    let (r, _) = poll_agent(&mut c, 13 * SEC, vec![]);
    assert_eq!(r.reverse, None);
    assert_eq!(c.machine(13 * SEC, "web").state, "reprotected");
    // Again: a second pass.
    let (v, _) = view(reprotect(&mut c, 14 * SEC));
    assert_eq!(v.reverse.map(|r| (r.pass, r.done_pass)), Some((2, 1)));
}

#[test]
fn a_reprotected_machine_takes_a_reverse_pass_every_period_and_one_at_a_time() {
    use crate::configuration::core::failover::REVERSE_EVERY;
    let (mut c, id) = reprotected_web();
    let t = |c: &mut Cluster, at: Duration| c.core.reverse_tick(c.t0 + at, NOW_MS);
    // The first tick sets the period from now (12 s); nothing is due before it ends.
    assert_eq!(t(&mut c, 12 * SEC), vec![]);
    c.all_nodes_poll(12 * SEC + REVERSE_EVERY - SEC);
    poll_agent(&mut c, 12 * SEC + REVERSE_EVERY - SEC, vec![]);
    assert_eq!(t(&mut c, 12 * SEC + REVERSE_EVERY - SEC), vec![]);
    // Due, both ends up: pass 2 is asked for, persisted, and the machine stays reprotected.
    let due = 12 * SEC + REVERSE_EVERY;
    let p = t(&mut c, due);
    let Recovery::Reprotected(f) = recovery(&p) else {
        panic!("reprotected: {p:?}")
    };
    assert_eq!(
        f.reverse.as_ref().map(|r| (r.pass, r.done_pass)),
        Some((2, 1))
    );
    let (r, _) = poll_agent(&mut c, due, vec![]);
    assert_eq!(r.reverse.map(|o| (o.order, o.pass)), Some((id, 2)));
    // Not done yet: no other pass is asked for, however long it takes.
    assert_eq!(t(&mut c, due + 2 * REVERSE_EVERY), vec![]);
    // Done (tracked): its figures are kept, no event, still reprotected.
    let events = |c: &mut Cluster| match c.admin(due, AdminCommand::Events) {
        (Response::Admin(AdminReply::Events(e)), _) => e.len(),
        other => panic!("{other:?}"),
    };
    let before = events(&mut c);
    let at = due + 2 * REVERSE_EVERY;
    let (_, p) = reverse_done(
        &mut c,
        at,
        ReverseDone {
            order: id,
            pass: 2,
            bytes_compared: 8192,
            blocks_written: 2,
            tracked: true,
            ..Default::default()
        },
    );
    let Recovery::Reprotected(f) = recovery(&p) else {
        panic!("reprotected: {p:?}")
    };
    let r = f.reverse.expect("figures");
    assert_eq!((r.done_pass, r.bytes_compared, r.tracked), (2, 8192, true));
    assert_eq!(events(&mut c), before);
    assert_eq!(c.machine(at, "web").state, "reprotected");
    // The agent gone: no pass is asked for until it is back.
    let later = at + 3 * REVERSE_EVERY;
    c.all_nodes_poll(later);
    assert_eq!(t(&mut c, later), vec![]);
    poll_agent(&mut c, later, vec![]);
    assert!(!t(&mut c, later).is_empty(), "the agent is back: pass 3");
}

// ---- failback ------------------------------------------------------------------------------

fn failback(c: &mut Cluster, at: Duration) -> Outcome {
    c.admin(
        at,
        AdminCommand::Failback {
            machine: "web".into(),
        },
    )
}

/// `web` failed over at seq 7, committed and reprotected (its first reverse pass done) by
/// 12 s, every node and the agent reporting; returns the cluster and the failover's id.
fn reprotected_web() -> (Cluster, u64) {
    let mut c = tap_web();
    c.all_nodes_poll(10 * SEC);
    view(failover(&mut c, 10 * SEC, PointSpec::Seq(7)));
    let (a, _) = poll_mt(&mut c, 10 * SEC, 40, None);
    let id = a[0].failover.as_ref().expect("ordered").id;
    poll_mt(&mut c, 10 * SEC, 40, Some(served(id, 7)));
    view(c.admin(
        10 * SEC,
        AdminCommand::FailoverCommit {
            machine: "web".into(),
        },
    ));
    poll_agent(&mut c, 11 * SEC, vec![]);
    view(reprotect(&mut c, 11 * SEC));
    let (_, p) = reverse_done(
        &mut c,
        12 * SEC,
        ReverseDone {
            order: id,
            pass: 1,
            blocks_written: 130,
            ..Default::default()
        },
    );
    assert!(matches!(recovery(&p), Recovery::Reprotected(_)), "{p:?}");
    (c, id)
}

/// The failback record of a persisted `FailingBack` machine.
#[track_caller]
fn failing_back(persist: &[Persist]) -> (Failover, Failback) {
    match recovery(persist) {
        Recovery::FailingBack(f) => {
            let b = f.failback.clone().expect("a failback record");
            (*f, b)
        }
        other => panic!("expected failing-back, got {other:?}"),
    }
}

fn quiesced(id: u64) -> FailoverReport {
    FailoverReport {
        quiesced: true,
        ..served(id, 7)
    }
}

fn materialised(id: u64, generation: u64) -> FailoverReport {
    FailoverReport {
        materialised: Some(Materialised {
            generation,
            applied_seq: 45,
            bytes_compared: 1 << 30,
            bytes_written: 1 << 20,
        }),
        ..quiesced(id)
    }
}

fn final_pass_done(id: u64) -> ReverseDone {
    ReverseDone {
        order: id,
        pass: 2,
        bytes_compared: 64 << 10,
        hash_bytes: 128,
        bytes_received: 64 << 10,
        blocks_written: 16,
        error: None,
        tracked: true,
    }
}

fn mt_failback_order(
    c: &mut Cluster,
    at: Duration,
    report: FailoverReport,
) -> Option<FailbackOrder> {
    let (a, _) = poll_mt(c, at, 40, Some(report));
    a[0].failover
        .as_ref()
        .expect("still serving")
        .failback
        .clone()
}

#[test]
fn a_failback_quiesces_takes_the_final_pass_materialises_the_replica_then_rebases_the_agent() {
    let (mut c, id) = reprotected_web();
    let before = c.core.machines["web"].generation.0;
    let t = 12 * SEC;

    let (v, p) = view(failback(&mut c, t));
    assert_eq!(
        (v.state.as_str(), v.stage.as_str()),
        ("failing-back", "quiescing")
    );
    let (_, b) = failing_back(&p);
    let rec = &c.core.machines["web"];
    assert_eq!(
        (b.stage, b.generation, rec.failbacks),
        (FailbackStage::Quiescing, before + 1, 1)
    );
    assert_eq!(
        rec.generation.0,
        before + 1,
        "the new generation fences older streams"
    );
    let (v, p) = view(failback(&mut c, t));
    assert_eq!((v.stage.as_str(), p), ("quiescing", vec![]), "idempotent");

    // Quiescing: the master target is told (nothing to materialise yet); the agent stays
    // read-only with no pass and no rebase; no process server has the machine.
    assert_eq!(
        mt_failback_order(&mut c, t, served(id, 7)),
        Some(FailbackOrder { materialise: None })
    );
    let (r, _) = poll_agent(&mut c, t, vec![]);
    assert!(r.read_only.is_some());
    assert_eq!((r.reverse, r.rebase, r.process_server), (None, None, None));
    assert!(ps_assignments(&mut c, t).is_empty());

    // Quiesced: the final reverse pass is asked for.
    let (_, p) = poll_mt(&mut c, t, 40, Some(quiesced(id)));
    let (f, b) = failing_back(&p);
    assert_eq!((b.stage, b.final_pass), (FailbackStage::FinalPass, 2));
    assert_eq!(f.reverse.map(|r| (r.pass, r.done_pass)), Some((2, 1)));
    let (_, p) = poll_mt(&mut c, t, 40, Some(quiesced(id)));
    assert_eq!(p, vec![], "the same report again changes nothing");
    let (r, _) = poll_agent(&mut c, t, vec![]);
    let asked = r.reverse.expect("the final pass is asked for");
    assert_eq!((asked.order, asked.pass), (id, 2));
    assert_eq!(state(&mut c, t).stage, "final-pass");

    // A report of the first pass again, or a failed final pass, is not the final pass done.
    let (_, p) = reverse_done(
        &mut c,
        t,
        ReverseDone {
            order: id,
            pass: 1,
            ..Default::default()
        },
    );
    assert_eq!(p, vec![]);
    let (_, p) = reverse_done(
        &mut c,
        t,
        ReverseDone {
            error: Some("hash: I/O error".into()),
            ..final_pass_done(id)
        },
    );
    assert_eq!(failing_back(&p).1.stage, FailbackStage::FinalPass);

    // The final pass done: the master target materialises the replica under the new generation.
    let (_, p) = reverse_done(&mut c, 13 * SEC, final_pass_done(id));
    let (f, b) = failing_back(&p);
    assert_eq!(b.stage, FailbackStage::Materialising);
    assert_eq!(
        f.reverse.map(|r| (r.done_pass, r.blocks_written)),
        Some((2, 16))
    );
    let (r, _) = poll_agent(&mut c, 13 * SEC, vec![]);
    assert_eq!((r.reverse, r.rebase), (None, None));
    assert_eq!(
        mt_failback_order(&mut c, 13 * SEC, quiesced(id)),
        Some(FailbackOrder {
            materialise: Some(before + 1)
        })
    );
    // A materialisation under another generation (of an earlier failback) is not this one.
    let (_, p) = poll_mt(&mut c, 13 * SEC, 40, Some(materialised(id, before)));
    assert_eq!(p, vec![]);
    let (_, p) = poll_mt(&mut c, 13 * SEC, 40, Some(materialised(id, before + 1)));
    let (_, b) = failing_back(&p);
    assert_eq!(
        (
            b.stage,
            b.materialised_seq,
            b.bytes_compared,
            b.bytes_written
        ),
        (FailbackStage::Rebasing, Some(45), 1 << 30, 1 << 20)
    );

    // Rebasing: the agent takes its disks as the replica at seq 45.
    let (r, _) = poll_agent(&mut c, 13 * SEC, vec![]);
    assert_eq!(
        r.rebase,
        Some(RebaseOrder {
            order: id,
            applied_seq: 45
        })
    );
    assert!(
        r.read_only.is_some(),
        "read-only until the rebase is reported"
    );
    let (r, p) = poll_agent_with(&mut c, 14 * SEC, |r| r.rebased = Some(id + 1));
    assert_eq!(
        (r.rebase.is_some(), p),
        (true, vec![]),
        "another order's rebase"
    );
    let (r, p) = poll_agent_with(&mut c, 14 * SEC, |r| r.rebased = Some(id));
    assert_eq!(recovery(&p), Recovery::Protected);
    assert_eq!((r.read_only, r.rebase, r.reverse), (None, None, None));
    assert_eq!(
        r.generation.0,
        before + 2,
        "a generation newer than the materialisation's"
    );
    assert!(r.process_server.is_some(), "the forward stream resumes");

    // Protected again: the process server has the machine under the failback's counter (it
    // drops its old cache), the master target serves nothing.
    let a = ps_assignments(&mut c, 14 * SEC);
    assert_eq!(
        a.iter()
            .map(|a| (a.machine.as_str(), a.failbacks, a.generation.0))
            .collect::<Vec<_>>(),
        vec![("web", 1, before + 2)]
    );
    let (a, _) = poll_mt(&mut c, 14 * SEC, 45, None);
    assert_eq!(a[0].failover, None);
    assert_eq!(c.machine(14 * SEC, "web").recovery_state, "protected");
    let (v, p) = view(failback(&mut c, 15 * SEC));
    assert_eq!(
        (v.state.as_str(), v.stage.as_str()),
        ("protected", "failed-back")
    );
    assert_eq!(p, vec![]);
    assert_eq!(v.failback.map(|b| b.bytes_written), Some(1 << 20));

    let events: Vec<String> = match c.admin(15 * SEC, AdminCommand::Events) {
        (Response::Admin(AdminReply::Events(e)), _) => e.into_iter().map(|e| e.reason).collect(),
        other => panic!("{other:?}"),
    };
    for e in [
        "failback started",
        "the recovery disks are read-only",
        "and rewrote 16 blocks (64 KiB)",
        "the replica equals the recovery disks at seq 45",
        "failed back",
    ] {
        assert!(events.iter().any(|x| x.contains(e)), "{e:?} in {events:#?}");
    }

    // A new failover cycle starts from protected; the failed-back view is gone.
    view(failover(&mut c, 16 * SEC, PointSpec::Latest));
    refused_with(
        failback(&mut c, 16 * SEC),
        "the failover of web is not committed: cancel it with `ctl failover-cancel web` (forward replication resumes), or commit, reprotect and then fail back",
    );
}

#[test]
fn failback_refusals_change_nothing() {
    let mut c = tap_web();
    c.all_nodes_poll(10 * SEC);
    refused_with(
        c.admin(
            10 * SEC,
            AdminCommand::Failback {
                machine: "nosuch".into(),
            },
        ),
        "no machine named \"nosuch\"",
    );
    refused_with(
        failback(&mut c, 10 * SEC),
        "web is not failed over: nothing to fail back",
    );
    view(failover(&mut c, 10 * SEC, PointSpec::Seq(7)));
    let (a, _) = poll_mt(&mut c, 10 * SEC, 40, None);
    let id = a[0].failover.as_ref().unwrap().id;
    poll_mt(&mut c, 10 * SEC, 40, Some(served(id, 7)));
    refused_with(
        failback(&mut c, 10 * SEC),
        "the failover of web is not committed: cancel it with `ctl failover-cancel web` (forward replication resumes), or commit, reprotect and then fail back",
    );
    view(c.admin(
        10 * SEC,
        AdminCommand::FailoverCommit {
            machine: "web".into(),
        },
    ));
    refused_with(
        failback(&mut c, 10 * SEC),
        "web is not reprotected: run `ctl reprotect web` first, so that the original disks hold the recovery disks' content and only the last changes travel",
    );
    poll_agent(&mut c, 11 * SEC, vec![]);
    view(reprotect(&mut c, 11 * SEC));
    refused_with(
        failback(&mut c, 11 * SEC),
        "the reprotect of web is still running; fail back once it is reprotected",
    );
    reverse_done(
        &mut c,
        12 * SEC,
        ReverseDone {
            order: id,
            pass: 1,
            ..Default::default()
        },
    );
    // Reprotected, but the agent and then the master target are silent.
    let late = 12 * SEC + c.core.failure_timeout;
    poll_mt(&mut c, late, 40, Some(served(id, 7)));
    refused_with(
        failback(&mut c, late),
        "the original site's agent for web is not connected: start it again (same --data-dir; its disks stay read-only), then retry",
    );
    let later = late + c.core.failure_timeout;
    poll_agent(&mut c, later, vec![]);
    refused_with(
        failback(&mut c, later),
        "the master target of web is not reporting: it serves the recovery disks",
    );
    assert_eq!(c.machine(later, "web").recovery_state, "reprotected");
    poll_mt(&mut c, later, 40, Some(served(id, 7)));
    let (v, _) = view(failback(&mut c, later));
    assert_eq!(v.stage, "quiescing");
}

/// A configuration node started again from the persisted record.
fn restarted(c: &Cluster, rec: &MachineRecord) -> Cluster {
    let nodes: Vec<NodeRecord> = c.core.nodes.values().cloned().collect();
    Cluster {
        core: ConfigCore::with_seed(meta(), nodes, vec![rec.clone()], 7).with_tokens(tokens()),
        t0: c.t0,
    }
}

#[track_caller]
fn persisted(p: &[Persist]) -> MachineRecord {
    match p {
        [Persist::Machine(m)] => m.clone(),
        other => panic!("expected the machine persisted, got {other:?}"),
    }
}

#[test]
fn a_failback_resumes_from_its_record_after_a_restart_at_every_stage() {
    let (c, id) = reprotected_web();
    let mut c = c;
    let t = 12 * SEC;
    let (_, p) = view(failback(&mut c, t));
    let generation = failing_back(&p).1.generation;

    // Quiescing, restarted: the master target is still told to fail back.
    let mut c = restarted(&c, &persisted(&p));
    c.all_nodes_poll(t);
    poll_agent(&mut c, t, vec![]);
    assert_eq!(state(&mut c, t).stage, "quiescing");
    let (_, p) = poll_mt(&mut c, t, 40, Some(quiesced(id)));
    assert_eq!(failing_back(&p).1.stage, FailbackStage::FinalPass);

    // The final pass, restarted: the agent is asked for it again.
    let mut c = restarted(&c, &persisted(&p));
    c.all_nodes_poll(t);
    let (r, _) = poll_agent(&mut c, t, vec![]);
    assert_eq!(r.reverse.map(|o| (o.order, o.pass)), Some((id, 2)));
    let (_, p) = reverse_done(&mut c, t, final_pass_done(id));
    assert_eq!(failing_back(&p).1.stage, FailbackStage::Materialising);

    // Materialising, restarted: the master target is told to materialise again (it resumes
    // or reports its persisted result).
    let mut c = restarted(&c, &persisted(&p));
    c.all_nodes_poll(t);
    poll_agent(&mut c, t, vec![]);
    assert_eq!(
        mt_failback_order(&mut c, t, quiesced(id)),
        Some(FailbackOrder {
            materialise: Some(generation)
        })
    );
    let (_, p) = poll_mt(&mut c, t, 40, Some(materialised(id, generation)));
    assert_eq!(failing_back(&p).1.stage, FailbackStage::Rebasing);

    // Rebasing, restarted: the agent is asked to rebase again, or reports it did.
    let mut c = restarted(&c, &persisted(&p));
    c.all_nodes_poll(t);
    let (r, _) = poll_agent(&mut c, t, vec![]);
    assert_eq!(r.rebase.map(|o| (o.order, o.applied_seq)), Some((id, 45)));
    let (_, p) = poll_agent_with(&mut c, t + SEC, |r| r.rebased = Some(id));
    let rec = persisted(&p);
    assert_eq!(
        (&rec.recovery, rec.failbacks, rec.generation.0),
        (&Recovery::Protected, 1, generation + 1)
    );

    // Protected, restarted: nothing of the failback is left to do.
    let mut c = restarted(&c, &rec);
    c.all_nodes_poll(t + SEC);
    let (r, p) = poll_agent_with(&mut c, t + SEC, |r| r.rebased = Some(id));
    assert_eq!((r.read_only, r.rebase, p), (None, None, vec![]));
}
