//! Unit tests of consistency groups in [`ConfigCore`] (`groups.rs`): membership, a cut's
//! two phases (points placed while every member holds, then the release), every way a cut
//! fails (a member releasing on its own, a member making no point or a not-consistent one,
//! a member that never answers), refusals, the period, and the records persisted. Explicit
//! `now`, exact outcomes, no I/O.
use crate::configuration::core::groups::{CUT_GRACE, CUT_HOLD_MS, GROUP_MEMBERS_MAX};
use crate::proto::Hold;
use crate::view::{GroupPointView, GroupView};
use haven_cluster::{GroupPoint, GroupRecord};

use super::*;

fn tap_stats() -> AgentStats {
    AgentStats {
        capture: "tap".into(),
        ..stats(1, 0, 0)
    }
}

/// `web` and `db` protected, their agents reporting tap capture, and group `shop` of both
/// (group points only on request).
fn shop() -> Cluster {
    let mut c = Cluster::new(
        vec![
            node_record("ps-a", &[ROLE_PROCESS], 10),
            node_record("mt-a", &[ROLE_MASTER_TARGET], 10),
        ],
        vec![discovered("web"), discovered("db")],
    );
    c.all_nodes_poll(Duration::ZERO);
    for m in ["web", "db"] {
        c.protect(Duration::ZERO, m, KEY);
        c.agent_poll(Duration::ZERO, m, tap_stats(), None);
    }
    let (r, p) = add(&mut c, "shop", &["web", "db"], Some(0));
    assert!(matches!(r, Response::Admin(AdminReply::Groups(_))), "{r:?}");
    assert_eq!(p.len(), 1);
    c
}

fn add(c: &mut Cluster, group: &str, members: &[&str], every: Option<u64>) -> Outcome {
    c.admin(
        Duration::ZERO,
        AdminCommand::GroupAdd {
            group: group.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            point_every_ms: every,
        },
    )
}

fn group(c: &mut Cluster, at: Duration) -> GroupView {
    match c.admin(at, AdminCommand::Groups) {
        (Response::Admin(AdminReply::Groups(g)), p) if p.is_empty() => g[0].clone(),
        other => panic!("unexpected: {other:?}"),
    }
}

fn cut(c: &mut Cluster, at: Duration) -> u64 {
    match c.admin(
        at,
        AdminCommand::GroupMark {
            group: "shop".into(),
            name: Some("nightly".into()),
        },
    ) {
        (Response::Admin(AdminReply::GroupMarkRequested { id }), p) if p.is_empty() => id,
        other => panic!("expected GroupMarkRequested, got {other:?}"),
    }
}

fn cut_state(c: &mut Cluster, at: Duration, id: u64) -> Outcome {
    c.admin(
        at,
        AdminCommand::GroupMarkState {
            group: "shop".into(),
            id,
        },
    )
}

#[track_caller]
fn refused_containing(o: Outcome, part: &str) {
    match o {
        (Response::Refused { reason }, p) if p.is_empty() => {
            assert!(reason.contains(part), "{reason:?} does not say {part:?}")
        }
        other => panic!("expected a refusal saying {part:?}, got {other:?}"),
    }
}

#[track_caller]
fn pending_or_done(o: Outcome) -> Option<GroupPointView> {
    match o {
        (Response::Admin(AdminReply::GroupMarkState { done }), p) if p.is_empty() => done,
        other => panic!("expected GroupMarkState, got {other:?}"),
    }
}

/// A member's poll carrying `done`; its reply and what it persisted.
fn poll(
    c: &mut Cluster,
    at: Duration,
    machine: &str,
    done: Vec<MarkDone>,
) -> (AgentPollReply, Vec<Persist>) {
    let report = AgentReport {
        machine: machine.into(),
        hostname: format!("{machine}-host"),
        disks: web_disks(),
        stats: tap_stats(),
        report_seq: at.as_micros() as u64 + 1,
        marks_done: done,
        ..Default::default()
    };
    agent_reply(
        c.core
            .handle_agent_poll(c.t0 + at, &agent_id(machine), report),
    )
}

/// The held mark the member's agent is asked for.
#[track_caller]
fn held_mark(reply: &AgentPollReply) -> u64 {
    match &reply.marks[..] {
        [m] if m.hold_ms == CUT_HOLD_MS && m.name.is_some() && !m.app => m.id,
        other => panic!("expected one held mark, got {other:?}"),
    }
}

/// The agent's report: its point placed at `seq`, now holding (`id`: increasing per agent).
fn holding(request: u64, id: u64, seq: u64) -> MarkDone {
    MarkDone {
        request,
        id,
        seq: Some(seq),
        kind: Some(PointKind::Named),
        name: Some("nightly".into()),
        time_ms: NOW_MS + seq,
        hold: Some(Hold::Holding),
        ..Default::default()
    }
}

fn ended(request: u64, id: u64, seq: u64, how: Hold) -> MarkDone {
    MarkDone {
        hold: Some(how),
        ..holding(request, id, seq)
    }
}

#[test]
fn a_cut_releases_the_holds_only_once_every_member_placed_its_point() {
    let mut c = shop();
    let id = cut(&mut c, SEC);
    let (r, _) = poll(&mut c, SEC, "web", vec![]);
    let web = held_mark(&r);
    let (r, _) = poll(&mut c, SEC, "db", vec![]);
    let db = held_mark(&r);
    assert_eq!(group(&mut c, SEC).cut_in_progress, Some(id));

    // web holds; db has not placed its point yet: nobody is released.
    let (r, p) = poll(&mut c, SEC, "web", vec![holding(web, 1, 100)]);
    assert_eq!((r.release, r.marks, p), (vec![], vec![], vec![]));
    assert!(!c.core.take_wake());
    let (r, _) = poll(&mut c, SEC, "db", vec![]);
    assert_eq!(r.release, Vec::<u64>::new());
    assert_eq!(pending_or_done(cut_state(&mut c, SEC, id)), None);

    // db holds too: both are released, and the held polls are woken for it.
    let (r, p) = poll(&mut c, SEC, "db", vec![holding(db, 1, 7)]);
    assert_eq!((r.release, p), (vec![db], vec![]));
    assert!(c.core.take_wake());
    let (r, _) = poll(&mut c, SEC, "web", vec![]);
    assert_eq!(r.release, vec![web]);

    // Both report their release: the group point is made and persisted.
    let (_, p) = poll(&mut c, SEC, "web", vec![ended(web, 2, 100, Hold::Released)]);
    assert_eq!(p, vec![]);
    let (r, p) = poll(&mut c, SEC, "db", vec![ended(db, 2, 7, Hold::Released)]);
    let point = GroupPoint {
        id: 1,
        name: Some("nightly".into()),
        time_ms: NOW_MS + 100,
        seqs: [("db".to_string(), 7), ("web".to_string(), 100)].into(),
    };
    assert_eq!(
        p,
        vec![Persist::Group(GroupRecord {
            name: "shop".into(),
            members: vec!["web".into(), "db".into()],
            point_every_ms: 0,
            points: vec![point.clone()],
            next_point: 2,
        })]
    );
    assert_eq!(
        r.release,
        Vec::<u64>::new(),
        "a hold that ended is not released again"
    );
    let view = GroupPointView {
        group: "shop".into(),
        point: "1".into(),
        id: 1,
        name: Some("nightly".into()),
        time_ms: NOW_MS + 100,
        members: point.seqs.clone(),
        pruned: vec![],
    };
    assert_eq!(
        pending_or_done(cut_state(&mut c, SEC, id)),
        Some(view.clone())
    );
    let g = group(&mut c, SEC);
    assert_eq!(
        (g.points, g.latest_point, g.cut_in_progress),
        (1, Some(view), None)
    );
    assert_eq!(g.state, "protected");
    // Each member's point is also an ordinary mark outcome of its own.
    assert_eq!(
        c.machine(SEC, "web").group.as_deref(),
        Some("shop"),
        "status names the member's group"
    );
}

/// Both members polled once for their held mark; (web's, db's) mark ids.
fn asked(c: &mut Cluster, at: Duration) -> (u64, u64) {
    let (r, _) = poll(c, at, "web", vec![]);
    let web = held_mark(&r);
    let (r, _) = poll(c, at, "db", vec![]);
    (web, held_mark(&r))
}

#[track_caller]
fn failed(c: &mut Cluster, at: Duration, id: u64, why: &str) {
    refused_containing(cut_state(c, at, id), why);
    let g = group(c, at);
    assert_eq!((g.points, g.cut_in_progress), (0, None));
    assert!(
        g.last_error.as_deref().is_some_and(|e| e.contains(why)),
        "{g:?}"
    );
    let events = match c.admin(at, AdminCommand::Events) {
        (Response::Admin(AdminReply::Events(e)), _) => e,
        other => panic!("{other:?}"),
    };
    assert!(
        events
            .iter()
            .any(|e| e.kind == "group-point" && e.machine == "shop" && e.reason.contains(why)),
        "{events:?}"
    );
}

#[test]
fn a_member_that_released_on_its_own_voids_the_cut() {
    let mut c = shop();
    let id = cut(&mut c, SEC);
    let (web, db) = asked(&mut c, SEC);
    poll(&mut c, SEC, "web", vec![holding(web, 1, 100)]);
    // web's poll was lost; it timed out and let writes complete before db placed its
    // point. db's point may follow writes that causally depend on web writes after web's.
    poll(
        &mut c,
        4 * SEC,
        "web",
        vec![ended(web, 2, 100, Hold::TimedOut)],
    );
    let (r, p) = poll(&mut c, 4 * SEC, "db", vec![holding(db, 1, 7)]);
    assert_eq!((r.release, p), (vec![db], vec![]), "db is released at once");
    poll(&mut c, 4 * SEC, "db", vec![ended(db, 2, 7, Hold::Released)]);
    failed(&mut c, 4 * SEC, id, "web released its hold on its own");
}

#[test]
fn a_member_without_a_point_releases_the_others_and_voids_the_cut() {
    let mut c = shop();
    let id = cut(&mut c, SEC);
    let (web, db) = asked(&mut c, SEC);
    poll(&mut c, SEC, "web", vec![holding(web, 1, 100)]);
    let no_point = MarkDone {
        request: db,
        id: 1,
        error: Some("the retention buffer overflowed".into()),
        ..Default::default()
    };
    let (r, _) = poll(&mut c, SEC, "db", vec![no_point]);
    assert_eq!(r.release, Vec::<u64>::new());
    let (r, _) = poll(&mut c, SEC, "web", vec![]);
    assert_eq!(r.release, vec![web], "web stops holding at once");
    poll(&mut c, SEC, "web", vec![ended(web, 2, 100, Hold::Released)]);
    failed(
        &mut c,
        SEC,
        id,
        "db made no point: the retention buffer overflowed",
    );
}

#[test]
fn a_not_consistent_point_voids_the_cut() {
    let mut c = shop();
    let id = cut(&mut c, SEC);
    let (web, db) = asked(&mut c, SEC);
    poll(&mut c, SEC, "web", vec![holding(web, 1, 100)]);
    let initial_sync = MarkDone {
        kind: Some(PointKind::NotConsistent),
        ..holding(db, 1, 7)
    };
    poll(&mut c, SEC, "db", vec![initial_sync]);
    let (r, _) = poll(&mut c, SEC, "web", vec![]);
    assert_eq!(r.release, vec![web]);
    for (m, mark) in [("web", web), ("db", db)] {
        poll(&mut c, SEC, m, vec![ended(mark, 2, 1, Hold::Released)]);
    }
    failed(&mut c, SEC, id, "db's point is not consistent");
}

#[test]
fn a_member_that_never_answers_is_given_up_on_and_the_others_released() {
    let mut c = shop();
    let id = cut(&mut c, SEC);
    let (web, _db) = asked(&mut c, SEC);
    poll(&mut c, SEC, "web", vec![holding(web, 1, 100)]);
    let hold = Duration::from_millis(CUT_HOLD_MS as u64);
    // Before the grace: still waiting for db.
    c.core.handle_tick(c.t0 + SEC + hold + CUT_GRACE - SEC);
    assert_eq!(group(&mut c, SEC).cut_in_progress, Some(id));
    let late = 2 * SEC + hold + CUT_GRACE;
    c.core.handle_tick(c.t0 + late);
    assert!(c.core.take_wake());
    failed(&mut c, late, id, "no answer from the agent of db");
    // web (still holding, as far as we know) is told to release for a while.
    let (r, _) = poll(&mut c, late, "web", vec![]);
    assert_eq!(r.release, vec![web]);
    let (r, _) = poll(&mut c, late + hold + 2 * SEC, "web", vec![]);
    assert_eq!(
        r.release,
        Vec::<u64>::new(),
        "past any hold's bound the release is dropped"
    );
}

#[test]
fn a_cut_is_refused_unless_every_member_can_hold_its_writes() {
    let mut c = shop();
    let scan = AgentStats {
        capture: String::new(),
        ..stats(1, 0, 0)
    };
    c.agent_poll(SEC, "db", scan, None);
    let mark = |c: &mut Cluster| {
        c.admin(
            SEC,
            AdminCommand::GroupMark {
                group: "shop".into(),
                name: None,
            },
        )
    };
    refused_containing(
        mark(&mut c),
        "member db captures by scan: a group point needs --capture tap",
    );
    c.agent_poll(SEC, "db", tap_stats(), None);
    let id = cut(&mut c, SEC);
    refused_containing(
        mark(&mut c),
        &format!("group point {id} of shop is being placed"),
    );
    refused_containing(
        c.admin(
            SEC,
            AdminCommand::GroupMark {
                group: "none".into(),
                name: None,
            },
        ),
        "no group named \"none\"",
    );
}

#[test]
fn membership_is_checked_and_persisted() {
    let mut c = shop();
    refused_containing(
        add(&mut c, "other", &["web"], None),
        "web is a member of group shop",
    );
    refused_containing(
        add(&mut c, "other", &["nope"], None),
        "no machine named \"nope\"",
    );
    refused_containing(
        add(&mut c, "bad name", &["web"], None),
        "is not a group name",
    );
    refused_containing(add(&mut c, "shop", &[], Some(10)), "too short");
    // Adding again is idempotent; the period changes.
    let (r, p) = add(&mut c, "shop", &["db"], Some(5_000));
    let Response::Admin(AdminReply::Groups(g)) = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        (g[0].members.clone(), g[0].point_every_ms),
        (vec!["web".to_string(), "db".to_string()], 5_000)
    );
    assert!(matches!(&p[..], [Persist::Group(g)] if g.point_every_ms == 5_000));
    // A forgotten machine leaves its group.
    c.admin(
        SEC,
        AdminCommand::Unprotect {
            machine: "db".into(),
        },
    );
    let (_, p) = c.admin(
        SEC,
        AdminCommand::Forget {
            machine: "db".into(),
            delete_replica: false,
        },
    );
    assert!(
        p.iter()
            .any(|p| matches!(p, Persist::Group(g) if g.members == vec!["web".to_string()])),
        "{p:?}"
    );
    let (_, p) = c.admin(
        SEC,
        AdminCommand::GroupDelete {
            group: "shop".into(),
        },
    );
    assert_eq!(p, vec![Persist::DeleteGroup("shop".into())]);
    assert_eq!(c.machine(SEC, "web").group, None);
}

#[test]
fn a_group_cuts_itself_on_its_period_and_its_points_survive_a_restart() {
    let mut c = shop();
    add(&mut c, "shop", &[], Some(60_000));
    // The period counts from when the core first sees the group: nothing at once.
    c.core.handle_tick(c.t0);
    let (r, _) = poll(&mut c, SEC, "web", vec![]);
    assert_eq!(r.marks, vec![]);
    c.core.handle_tick(c.t0 + 61 * SEC);
    let (web, db) = asked(&mut c, 61 * SEC);
    let (r, _) = poll(&mut c, 62 * SEC, "web", vec![holding(web, 1, 100)]);
    assert_eq!(r.marks, vec![]);
    poll(&mut c, 62 * SEC, "db", vec![holding(db, 1, 7)]);
    poll(
        &mut c,
        62 * SEC,
        "web",
        vec![ended(web, 2, 100, Hold::Released)],
    );
    let (_, p) = poll(
        &mut c,
        62 * SEC,
        "db",
        vec![ended(db, 2, 7, Hold::Released)],
    );
    // The period counts from the start of the last cut: no second one meanwhile.
    c.core.handle_tick(c.t0 + 90 * SEC);
    assert_eq!(group(&mut c, 90 * SEC).cut_in_progress, None);
    let Some(Persist::Group(record)) = p.first().cloned() else {
        panic!("{p:?}")
    };
    assert_eq!(record.points.len(), 1);
    assert_eq!(record.points[0].name, None);
    c.core.handle_tick(c.t0 + 122 * SEC);
    let (r, _) = poll(&mut c, 122 * SEC, "web", vec![]);
    assert_eq!(r.marks.len(), 1, "the next period's cut");
    assert_eq!(
        r.marks[0].name.as_deref(),
        Some(&*format!(
            "group shop cut {}",
            group(&mut c, 122 * SEC).cut_in_progress.unwrap()
        ))
    );

    // A configuration node that restarts from the store has the points.
    let restarted = ConfigCore::new(meta(), vec![], vec![]).with_groups(vec![record]);
    let mut c2 = Cluster {
        core: restarted,
        t0: c.t0,
    };
    match c2.admin(
        SEC,
        AdminCommand::GroupPoints {
            group: "shop".into(),
        },
    ) {
        (Response::Admin(AdminReply::GroupPoints(p)), _) => {
            assert_eq!(p.len(), 1);
            assert_eq!(
                p[0].members,
                [("db".to_string(), 7), ("web".to_string(), 100)].into()
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_refused_add_leaves_the_group_as_it_was() {
    let names: Vec<String> = (0..=GROUP_MEMBERS_MAX).map(|i| format!("m{i}")).collect();
    let mut c = Cluster::new(vec![], names.iter().map(|n| discovered(n)).collect());
    let first: Vec<&str> = vec![names[0].as_str()];
    assert_eq!(add(&mut c, "big", &first, None).1.len(), 1);
    // One member too many (the first again, and every other): refused, nothing changes.
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    refused_containing(add(&mut c, "big", &all, None), "at most 64 members");
    assert_eq!(group(&mut c, SEC).members, vec![names[0].clone()]);
    // A new group refused is not created.
    refused_containing(add(&mut c, "other", &all[1..], Some(10)), "too short");
    match c.admin(SEC, AdminCommand::Groups) {
        (Response::Admin(AdminReply::Groups(g)), _) => assert_eq!(g.len(), 1),
        other => panic!("{other:?}"),
    }
}
