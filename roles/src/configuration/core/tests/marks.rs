//! Unit tests of `ctl mark` in [`ConfigCore`] (`marks.rs`): requests reach the agent through
//! its poll until it reports them, the outcome answers `MarkState`, failed freezes become
//! events, scan capture is refused, the queue is bounded and stale marks expire. Explicit
//! `now`, exact outcomes, no I/O.
use crate::configuration::core::marks::{MARKS_PENDING_MAX, MARK_TTL};

use super::*;

fn tap_stats() -> AgentStats {
    AgentStats {
        capture: "tap".into(),
        ..stats(1, 0, 0)
    }
}

/// `web` protected, its agent reporting tap capture.
fn tap_web() -> Cluster {
    let mut c = protected_web();
    c.agent_poll(Duration::ZERO, "web", tap_stats(), None);
    c
}

fn mark(c: &mut Cluster, at: Duration, app: bool, name: Option<&str>) -> Outcome {
    c.admin(
        at,
        AdminCommand::Mark {
            machine: "web".into(),
            app,
            name: name.map(String::from),
        },
    )
}

#[track_caller]
fn mark_id(outcome: Outcome) -> u64 {
    match outcome {
        (Response::Admin(AdminReply::MarkRequested { id }), p) if p.is_empty() => id,
        other => panic!("expected MarkRequested, got {other:?}"),
    }
}

fn state(c: &mut Cluster, at: Duration, id: u64) -> Outcome {
    c.admin(
        at,
        AdminCommand::MarkState {
            machine: "web".into(),
            id,
        },
    )
}

/// An agent poll carrying outcomes.
fn poll_done(c: &mut Cluster, at: Duration, done: Vec<MarkDone>) -> AgentPollReply {
    let report = AgentReport {
        machine: "web".into(),
        hostname: "web-host".into(),
        disks: web_disks(),
        stats: tap_stats(),
        report_seq: at.as_micros() as u64 + 1,
        marks_done: done,
        ..Default::default()
    };
    agent_reply(
        c.core
            .handle_agent_poll(c.t0 + at, &agent_id("web"), report),
    )
    .0
}

#[test]
fn a_mark_reaches_the_agent_until_it_reports_the_point() {
    let mut c = tap_web();
    let id = mark_id(mark(&mut c, SEC, true, Some("before-upgrade")));
    let expected = vec![MarkRequest {
        id,
        app: true,
        name: Some("before-upgrade".into()),
        hold_ms: 0,
    }];
    let (reply, _) = agent_reply(c.agent_poll(SEC, "web", tap_stats(), None));
    assert_eq!(reply.marks, expected);
    assert!(matches!(
        state(&mut c, SEC, id),
        (Response::Admin(AdminReply::MarkState { done: None }), _)
    ));
    // Still asked for until reported.
    let (reply, _) = agent_reply(c.agent_poll(2 * SEC, "web", tap_stats(), None));
    assert_eq!(reply.marks, expected);

    let reply = poll_done(
        &mut c,
        3 * SEC,
        vec![MarkDone {
            request: id,
            id: 100,
            seq: Some(42),
            kind: Some(PointKind::App),
            name: Some("before-upgrade".into()),
            time_ms: NOW_MS,
            ..Default::default()
        }],
    );
    assert_eq!(reply.marks, vec![]);
    let view = MarkView {
        machine: "web".into(),
        point: "42".into(),
        seq: 42,
        kind: "app".into(),
        name: Some("before-upgrade".into()),
        time_ms: NOW_MS,
        warnings: vec![],
    };
    match state(&mut c, 3 * SEC, id) {
        (Response::Admin(AdminReply::MarkState { done: Some(v) }), p) => {
            assert_eq!(v, view);
            assert_eq!(p, vec![]);
        }
        other => panic!("{other:?}"),
    }
    // A clean app point is no event.
    assert_eq!(c.core.event_views(c.t0 + 3 * SEC), vec![]);
}

#[test]
fn a_failed_freeze_is_an_event_and_the_point_is_still_answered() {
    let mut c = tap_web();
    let id = mark_id(mark(&mut c, SEC, true, None));
    let done = MarkDone {
        request: id,
        id: 7,
        seq: Some(9),
        kind: Some(PointKind::Crash),
        time_ms: NOW_MS,
        warnings: vec!["freeze failed (exit status: 1)".into()],
        ..Default::default()
    };
    poll_done(&mut c, 2 * SEC, vec![done.clone()]);
    // Reported again (the reply was lost): taken once.
    poll_done(&mut c, 3 * SEC, vec![done]);
    let events = c.core.event_views(c.t0 + 3 * SEC);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, "app-point");
    assert_eq!(events[0].machine, "web");
    assert_eq!(
        events[0].reason,
        "the requested point: freeze failed (exit status: 1) (crash point 9)"
    );
    match state(&mut c, 3 * SEC, id) {
        (Response::Admin(AdminReply::MarkState { done: Some(v) }), _) => {
            assert_eq!((v.seq, v.kind.as_str()), (9, "crash"));
            assert_eq!(v.warnings.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    // A periodic point's failed freeze is an event too.
    poll_done(
        &mut c,
        4 * SEC,
        vec![MarkDone {
            request: 0,
            id: 8,
            seq: Some(12),
            kind: Some(PointKind::Crash),
            warnings: vec!["freeze failed (timed out after 1s; killed)".into()],
            ..Default::default()
        }],
    );
    let events = c.core.event_views(c.t0 + 4 * SEC);
    assert_eq!(events.len(), 2);
    assert!(events[1]
        .reason
        .starts_with("the periodic app-consistent point: freeze failed (timed out"));
}

#[test]
fn a_point_the_agent_could_not_make_refuses_the_waiting_mark() {
    let mut c = tap_web();
    let id = mark_id(mark(&mut c, SEC, false, Some("x")));
    poll_done(
        &mut c,
        2 * SEC,
        vec![MarkDone {
            request: id,
            id: 3,
            name: Some("x".into()),
            error: Some("the protection was reset".into()),
            ..Default::default()
        }],
    );
    refused_with(
        state(&mut c, 2 * SEC, id),
        "the agent of web made no point: the protection was reset",
    );
}

#[test]
fn marks_are_refused_without_tap_capture_or_protection() {
    let mut c = protected_web();
    // The agent reported scan capture (stats' default: "" from an older agent is scan too).
    c.agent_poll(
        SEC,
        "web",
        AgentStats {
            capture: "scan".into(),
            ..stats(1, 0, 0)
        },
        None,
    );
    refused_with(
        mark(&mut c, SEC, true, None),
        "ctl mark needs --capture tap: the agent of web captures by scan (its points are not \
         crash-consistent); restart it with --capture tap",
    );
    let mut c = Cluster::standard();
    refused_with(
        mark(&mut c, SEC, false, None),
        "web is not protected: protect it before marking recovery points",
    );
    refused_with(
        c.admin(
            SEC,
            AdminCommand::Mark {
                machine: "zzz".into(),
                app: false,
                name: None,
            },
        ),
        "no machine named \"zzz\"",
    );
    let mut c = tap_web();
    refused_with(
        mark(&mut c, SEC, false, Some("")),
        "a point's name is 1 to 128 bytes without control characters",
    );
}

#[test]
fn pending_marks_are_bounded_and_expire() {
    let mut c = tap_web();
    let ids: Vec<u64> = (0..MARKS_PENDING_MAX)
        .map(|_| mark_id(mark(&mut c, SEC, false, None)))
        .collect();
    refused_with(
        mark(&mut c, SEC, false, None),
        "8 marks of web already wait for its agent; retry once they are done",
    );
    let (reply, _) = agent_reply(c.agent_poll(SEC, "web", tap_stats(), None));
    assert_eq!(reply.marks.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
    // Nobody took them: they expire, the waiting ctl is told.
    let late = SEC + MARK_TTL;
    let (reply, _) = agent_reply(c.agent_poll(late, "web", tap_stats(), None));
    assert_eq!(reply.marks, vec![]);
    refused_with(
        state(&mut c, late, ids[0]),
        &format!(
            "mark {} of web expired: its agent did not take it within 60s",
            ids[0]
        ),
    );
    mark_id(mark(&mut c, late, false, None));
}

#[test]
fn the_policy_carries_the_app_consistent_period_and_unprotect_drops_marks() {
    let mut c = tap_web();
    let (reply, _) = agent_reply(c.agent_poll(SEC, "web", tap_stats(), None));
    assert_eq!(reply.app_consistent_every_ms, None);
    let persist = done_with(
        c.admin(
            SEC,
            AdminCommand::Protect {
                machine: "web".into(),
                policy: haven_cluster::ProtectPolicy {
                    app_consistent_every_ms: Some(2_000),
                    ..Default::default()
                },
            },
        ),
        "web is already protected; its recovery-point policy is updated",
    );
    assert!(
        matches!(&persist[..], [Persist::Machine(m)] if m.policy.app_consistent_every_ms == Some(2_000))
    );
    let (reply, _) = agent_reply(c.agent_poll(2 * SEC, "web", tap_stats(), None));
    assert_eq!(reply.app_consistent_every_ms, Some(2_000));
    // 0s turns it off.
    c.admin(
        2 * SEC,
        AdminCommand::Protect {
            machine: "web".into(),
            policy: haven_cluster::ProtectPolicy {
                app_consistent_every_ms: Some(0),
                ..Default::default()
            },
        },
    );
    let (reply, _) = agent_reply(c.agent_poll(3 * SEC, "web", tap_stats(), None));
    assert_eq!(reply.app_consistent_every_ms, None);

    mark_id(mark(&mut c, 3 * SEC, true, None));
    c.admin(
        3 * SEC,
        AdminCommand::Unprotect {
            machine: "web".into(),
        },
    );
    let (reply, _) = agent_reply(c.agent_poll(4 * SEC, "web", tap_stats(), None));
    assert_eq!(reply.marks, vec![]);
}
