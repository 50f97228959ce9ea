//! The admin client: what `haven ctl`, the demo and the examples use to drive a cluster
//! through its configuration node, with the admin token (the server is verified against the
//! token's CA fingerprint). Errors say whether the request was refused, the node unreachable,
//! or something else failed, each with its `ctl` exit code.
use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use haven_transport::{
    endpoint,
    identity::{Token, TokenKind},
};

use crate::{
    client::{self, CallError},
    enroll,
    proto::{AdminCommand, AdminReply, RecoveryReply, RecoveryRequest, Request, Response},
    view::{
        ClusterStatus, FailoverView, GroupDrillView, GroupFailoverView, GroupPointView, GroupView,
        MachineView, MarkView,
    },
};
use haven_cluster::PointSpec;

pub struct Admin {
    ep: quinn::Endpoint,
    conn: quinn::Connection,
    token: Token,
}

/// `haven ctl` exit codes (docs/json.md lists them).
pub const EXIT_ERROR: u8 = 1;
/// `wait-sync` (and `move`): not done in time.
pub const EXIT_TIMEOUT: u8 = 3;
/// `wait-sync`: the machine cannot converge without an operator decision (a disk shrank or
/// was replaced, two agents claim it).
pub const EXIT_BLOCKED: u8 = 4;
/// The configuration node refused the request (bad token, unknown machine, not allowed now).
pub const EXIT_REFUSED: u8 = 5;
/// The configuration node could not be reached.
pub const EXIT_UNREACHABLE: u8 = 6;

/// Why a `ctl` command failed; each kind has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Failed(String),
}

impl CtlError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Refused(_) => EXIT_REFUSED,
            CtlError::Unreachable(_) => EXIT_UNREACHABLE,
            CtlError::Failed(_) => EXIT_ERROR,
        }
    }
}

impl From<CtlError> for String {
    fn from(e: CtlError) -> Self {
        e.to_string()
    }
}

/// How a `wait-sync` ended.
pub enum WaitEnd {
    Synced,
    /// Not in time; the machine's degraded reason when it was last asked, if any.
    TimedOut(Option<String>),
    /// It cannot converge without the operator.
    Blocked(String),
}

impl Admin {
    pub async fn connect(cluster: &str, token_file: &Path) -> Result<Self, CtlError> {
        let token = enroll::read_token(token_file, TokenKind::Admin)
            .map_err(|e| CtlError::Failed(e.to_string()))?;
        let addr: SocketAddr =
            enroll::resolve(cluster).map_err(|e| CtlError::Failed(e.to_string()))?;
        let ep = endpoint::client_endpoint().map_err(|e| CtlError::Failed(e.to_string()))?;
        let cfg = endpoint::pinned_client_config(&token.ca_fingerprint)
            .map_err(|e| CtlError::Failed(e.to_string()))?;
        let conn = client::connect(&ep, cfg, addr, "ctl").await.map_err(|e| {
            let msg = format!("cannot reach the configuration node at {cluster}: {e}");
            match e {
                // A server that is not ours (another CA) answers, but is not reachable for us.
                CallError::Endpoint(_) | CallError::Timeout(_) | CallError::Connection(_) => {
                    CtlError::Unreachable(msg)
                }
                _ => CtlError::Failed(msg),
            }
        })?;
        Ok(Self { ep, conn, token })
    }

    pub async fn call(&self, command: AdminCommand) -> Result<AdminReply, CtlError> {
        let req = Request::Admin {
            secret: self.token.secret.clone(),
            command,
        };
        match client::call(&self.conn, &req, Duration::from_secs(30)).await {
            Ok(Response::Admin(r)) => Ok(r),
            Ok(other) => Err(CtlError::Failed(format!("unexpected reply: {other:?}"))),
            Err(CallError::Refused(reason)) => Err(CtlError::Refused(reason)),
            Err(e @ (CallError::Timeout(_) | CallError::Connection(_))) => Err(
                CtlError::Unreachable(format!("the configuration node stopped answering: {e}")),
            ),
            Err(e) => Err(CtlError::Failed(e.to_string())),
        }
    }

    /// The text of an enrolment token the configuration node created (its secret, with this
    /// cluster's id and CA fingerprint, as in the admin token).
    pub fn token_text(&self, kind: TokenKind, secret: &str) -> String {
        Token {
            kind,
            cluster_id: self.token.cluster_id.clone(),
            ca_fingerprint: self.token.ca_fingerprint.clone(),
            secret: secret.to_string(),
        }
        .encode()
    }

    pub async fn status(&self) -> Result<ClusterStatus, CtlError> {
        match self.call(AdminCommand::Status).await? {
            AdminReply::Status(s) => Ok(s),
            other => Err(CtlError::Failed(format!("unexpected reply: {other:?}"))),
        }
    }

    pub async fn machine(&self, name: &str) -> Result<Option<MachineView>, CtlError> {
        Ok(self
            .status()
            .await?
            .machines
            .into_iter()
            .find(|m| m.name == name))
    }

    /// A sync barrier: the agent captures everything written so far, then we wait until the
    /// master target has applied it. Ends early when the machine cannot converge without the
    /// operator; `progress` sees the barrier, the applied seq and why the machine is degraded.
    pub async fn wait_sync(
        &self,
        machine: &str,
        timeout: Duration,
        mut progress: impl FnMut(Option<u64>, u64, Option<&str>),
    ) -> Result<WaitEnd, CtlError> {
        let deadline = Instant::now() + timeout;
        let AdminReply::SyncRequested { id } = self
            .call(AdminCommand::RequestSync {
                machine: machine.into(),
            })
            .await?
        else {
            return Err(CtlError::Failed(
                "unexpected reply to a sync request".into(),
            ));
        };
        loop {
            let degraded = match self
                .call(AdminCommand::SyncState {
                    machine: machine.into(),
                    id,
                })
                .await?
            {
                AdminReply::SyncState { done: true, .. } => return Ok(WaitEnd::Synced),
                AdminReply::SyncState {
                    blocked: Some(reason),
                    ..
                } => return Ok(WaitEnd::Blocked(reason)),
                AdminReply::SyncState {
                    barrier_seq,
                    applied_seq,
                    degraded,
                    ..
                } => {
                    progress(barrier_seq, applied_seq, degraded.as_deref());
                    degraded
                }
                other => return Err(CtlError::Failed(format!("unexpected reply: {other:?}"))),
            };
            if Instant::now() >= deadline {
                return Ok(WaitEnd::TimedOut(degraded));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `ctl mark`: asks for a point now and waits (at most `timeout`) until the machine's
    /// agent reports it inserted. `Ok(None)`: not in time.
    pub async fn mark(
        &self,
        machine: &str,
        app: bool,
        name: Option<String>,
        timeout: Duration,
    ) -> Result<Option<MarkView>, CtlError> {
        let deadline = Instant::now() + timeout;
        let AdminReply::MarkRequested { id } = self
            .call(AdminCommand::Mark {
                machine: machine.into(),
                app,
                name,
            })
            .await?
        else {
            return Err(CtlError::Failed("unexpected reply to a mark".into()));
        };
        let machine = machine.to_string();
        poll_until(deadline, Duration::from_millis(100), || async {
            match self
                .call(AdminCommand::MarkState {
                    machine: machine.clone(),
                    id,
                })
                .await?
            {
                AdminReply::MarkState { done } => Ok(done),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    /// `ctl failover` / `failover-change-point` (`cmd`), then its progress until the master
    /// target serves the point: `Ok(view)` with stage `served`, or `Err(TimedOut)`-like
    /// [`CtlError::Failed`] after `timeout` (the failover goes on). `progress` sees every
    /// view polled.
    pub async fn failover(
        &self,
        machine: &str,
        cmd: AdminCommand,
        timeout: Duration,
        progress: impl FnMut(&FailoverView),
    ) -> Result<FailoverView, CtlError> {
        self.failover_until(machine, cmd, timeout, progress, |v| v.stage == "served")
            .await
    }

    /// `ctl reprotect`: the request, then its progress until the original site's agent has
    /// finished the pass it asked for.
    pub async fn reprotect(
        &self,
        machine: &str,
        timeout: Duration,
        progress: impl FnMut(&FailoverView),
    ) -> Result<FailoverView, CtlError> {
        let cmd = AdminCommand::Reprotect {
            machine: machine.into(),
        };
        self.failover_until(machine, cmd, timeout, progress, |v| {
            v.state == "reprotected" && v.reverse.as_ref().is_some_and(|r| r.done_pass == r.pass)
        })
        .await
    }

    /// `ctl failback`: the request, then its progress until the machine is protected again
    /// from the original site.
    pub async fn failback(
        &self,
        machine: &str,
        timeout: Duration,
        progress: impl FnMut(&FailoverView),
    ) -> Result<FailoverView, CtlError> {
        let cmd = AdminCommand::Failback {
            machine: machine.into(),
        };
        self.failover_until(machine, cmd, timeout, progress, |v| {
            v.stage == "failed-back"
        })
        .await
    }

    async fn failover_until(
        &self,
        machine: &str,
        cmd: AdminCommand,
        timeout: Duration,
        mut progress: impl FnMut(&FailoverView),
        done: impl Fn(&FailoverView) -> bool,
    ) -> Result<FailoverView, CtlError> {
        let deadline = Instant::now() + timeout;
        let mut reply = self.call(cmd).await?;
        loop {
            let AdminReply::Failover(view) = reply else {
                return Err(CtlError::Failed(format!("unexpected reply: {reply:?}")));
            };
            progress(&view);
            if done(&view) {
                return Ok(*view);
            }
            if Instant::now() >= deadline {
                return Err(CtlError::Failed(format!(
                    "{machine} is not there after {}s ({}); it goes on: \
                     `ctl failover {machine}` shows where it stands",
                    timeout.as_secs(),
                    view.error.or(view.waiting_for).unwrap_or(view.stage)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            reply = self
                .call(AdminCommand::FailoverState {
                    machine: machine.into(),
                })
                .await?;
        }
    }

    /// A consistency group.
    pub async fn group(&self, group: &str) -> Result<GroupView, CtlError> {
        match self.call(AdminCommand::Groups).await? {
            AdminReply::Groups(g) => g
                .into_iter()
                .find(|g| g.name == group)
                .ok_or_else(|| CtlError::Refused(format!("no group named {group:?}"))),
            other => Err(unexpected(other)),
        }
    }

    /// `ctl group mark`: a cut across every member now; waits (at most `timeout`) until
    /// every member has placed its point and released its hold. `Ok(None)`: not in time.
    pub async fn group_mark(
        &self,
        group: &str,
        name: Option<String>,
        timeout: Duration,
    ) -> Result<Option<GroupPointView>, CtlError> {
        let deadline = Instant::now() + timeout;
        let AdminReply::GroupMarkRequested { id } = self
            .call(AdminCommand::GroupMark {
                group: group.into(),
                name,
            })
            .await?
        else {
            return Err(CtlError::Failed("unexpected reply to a group mark".into()));
        };
        poll_until(deadline, Duration::from_millis(50), || async {
            match self
                .call(AdminCommand::GroupMarkState {
                    group: group.into(),
                    id,
                })
                .await?
            {
                AdminReply::GroupMarkState { done } => Ok(done),
                other => Err(unexpected(other)),
            }
        })
        .await
    }

    /// `ctl group recovery-points`: every group point kept, oldest first, each marked with
    /// the members whose journal no longer holds their point (those cannot be recovered to).
    pub async fn group_points(&self, group: &str) -> Result<Vec<GroupPointView>, CtlError> {
        let g = self.group(group).await?;
        let mut points = match self
            .call(AdminCommand::GroupPoints {
                group: group.into(),
            })
            .await?
        {
            AdminReply::GroupPoints(p) => p,
            other => return Err(unexpected(other)),
        };
        for m in &g.members {
            let held: std::collections::BTreeSet<u64> = match self
                .call(AdminCommand::Recovery(RecoveryRequest::Points {
                    machine: m.clone(),
                }))
                .await?
            {
                AdminReply::Recovery(RecoveryReply::Points(p)) => {
                    p.points.iter().map(|p| p.seq).collect()
                }
                other => return Err(unexpected(other)),
            };
            for p in &mut points {
                if p.members.get(m).is_none_or(|seq| !held.contains(seq)) {
                    p.pruned.push(m.clone());
                }
            }
        }
        Ok(points)
    }

    /// The group point `point` names (`latest`: the newest every member still holds; an id;
    /// the newest at or before a time).
    pub async fn group_point(
        &self,
        group: &str,
        point: &PointSpec,
    ) -> Result<GroupPointView, CtlError> {
        let points = self.group_points(group).await?;
        let usable = points.iter().rev().filter(|p| p.pruned.is_empty());
        let found = match point {
            PointSpec::Latest => usable.into_iter().next(),
            PointSpec::Seq(id) => {
                let p = points.iter().find(|p| p.id == *id).ok_or_else(|| {
                    CtlError::Refused(format!(
                        "group {group} has no point {id} (`ctl group recovery-points {group}` lists them)"
                    ))
                })?;
                if !p.pruned.is_empty() {
                    return Err(CtlError::Refused(format!(
                        "group point {id} of {group} is no longer held by {}: their journals pruned it",
                        p.pruned.join(", ")
                    )));
                }
                Some(p)
            }
            PointSpec::AtOrBefore { time_ms } => usable.into_iter().find(|p| p.time_ms <= *time_ms),
            PointSpec::LatestApp => return Err(CtlError::Refused(
                "group points are crash-consistent cuts: use `latest`, a group point id or a time"
                    .into(),
            )),
        };
        found.cloned().ok_or_else(|| {
            CtlError::Refused(format!(
                "group {group} has no usable point for {point:?} (`ctl group mark {group}` makes one)"
            ))
        })
    }

    /// `ctl group test-failover`: every member's drill at the group point (`export`: each
    /// member's images in `<export>/<member>/`).
    pub async fn group_test_failover(
        &self,
        group: &str,
        point: &PointSpec,
        export: Option<&str>,
    ) -> Result<GroupDrillView, CtlError> {
        let point = self.group_point(group, point).await?;
        let mut members = vec![];
        for (m, seq) in &point.members {
            let reply = self
                .call(AdminCommand::Recovery(RecoveryRequest::TestFailover {
                    machine: m.clone(),
                    point: PointSpec::Seq(*seq),
                    export_dir: export.map(|d| format!("{d}/{m}")),
                }))
                .await
                .map_err(|e| member_error(m, &names(&members), e))?;
            match reply {
                AdminReply::Recovery(RecoveryReply::TestFailover(t)) => members.push(t),
                other => return Err(unexpected(other)),
            }
        }
        Ok(GroupDrillView {
            group: group.into(),
            point,
            members,
        })
    }

    /// `ctl group test-failover-cleanup`: every member's drill ends (members without one
    /// are skipped); the messages.
    pub async fn group_test_failover_cleanup(&self, group: &str) -> Result<Vec<String>, CtlError> {
        let g = self.group(group).await?;
        let mut said = vec![];
        for m in &g.members {
            match self
                .call(AdminCommand::Recovery(
                    RecoveryRequest::TestFailoverCleanup { machine: m.clone() },
                ))
                .await
            {
                Ok(AdminReply::Recovery(RecoveryReply::Cleaned(c))) => said.push(c.message),
                Ok(other) => return Err(unexpected(other)),
                Err(CtlError::Refused(why)) => said.push(format!("{m}: {why}")),
                Err(e) => return Err(e),
            }
        }
        Ok(said)
    }

    /// `ctl group failover`: every member fails over to one cut. With `latest` and every
    /// member's agent up (tap capture) each failover is planned: every write a member
    /// acknowledged is in its final point, so the final points are one cut and nothing is
    /// lost. Otherwise every member goes to the group point. Should a planned failover turn
    /// unplanned meanwhile (its source stopped), every member is moved to the latest group
    /// point before this returns (the failovers are not committed yet, so that is safe).
    pub async fn group_failover(
        &self,
        group: &str,
        point: &PointSpec,
        timeout: Duration,
    ) -> Result<GroupFailoverView, CtlError> {
        let g = self.group(group).await?;
        let status = self.status().await?;
        let all_up = g.members.iter().all(|m| {
            status.machines.iter().any(|v| {
                &v.name == m
                    && v.capture.as_deref() == Some("tap")
                    && v.agent_last_seen_ms_ago.is_some_and(|ms| ms < 5_000)
            })
        });
        let mut notes = vec![];
        let mut target = None;
        let specs: Vec<(String, PointSpec)> = if *point == PointSpec::Latest && all_up {
            notes.push("every member's agent is up: planned failovers, no write lost".into());
            g.members
                .iter()
                .map(|m| (m.clone(), PointSpec::Latest))
                .collect()
        } else {
            let p = self.group_point(group, point).await?;
            let specs = p
                .members
                .iter()
                .map(|(m, s)| (m.clone(), PointSpec::Seq(*s)))
                .collect();
            target = Some(p);
            specs
        };
        let mut members = self.each_failover(&specs, timeout).await?;
        if target.is_none() && members.iter().any(|v| !v.planned) {
            // One source went away before its final point: the members' points are no
            // longer one cut. Move every member to the newest group point.
            let p = self.group_point(group, &PointSpec::Latest).await?;
            notes.push(format!(
                "{} failed over unplanned: every member moves to group point {}",
                members
                    .iter()
                    .filter(|v| !v.planned)
                    .map(|v| v.machine.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                p.id
            ));
            let mut moved = vec![];
            for (m, s) in &p.members {
                let cmd = AdminCommand::FailoverChangePoint {
                    machine: m.clone(),
                    point: PointSpec::Seq(*s),
                };
                moved.push(self.failover(m, cmd, timeout, |_| {}).await?);
            }
            members = moved;
            target = Some(p);
        }
        Ok(GroupFailoverView {
            group: group.into(),
            point: target,
            members,
            notes,
        })
    }

    async fn each_failover(
        &self,
        specs: &[(String, PointSpec)],
        timeout: Duration,
    ) -> Result<Vec<FailoverView>, CtlError> {
        // Every member's failover is started first, so the members' RTOs overlap.
        for (m, p) in specs {
            self.call(AdminCommand::Failover {
                machine: m.clone(),
                point: p.clone(),
            })
            .await
            .map_err(|e| member_error(m, &[], e))?;
        }
        let mut out = vec![];
        for (m, p) in specs {
            let cmd = AdminCommand::Failover {
                machine: m.clone(),
                point: p.clone(),
            };
            out.push(self.failover(m, cmd, timeout, |_| {}).await?);
        }
        Ok(out)
    }

    /// A group step that is one admin command per member (`failover-commit`,
    /// `failover-cancel`), each reply a failover view.
    pub async fn group_each(
        &self,
        group: &str,
        cmd: impl Fn(String) -> AdminCommand,
    ) -> Result<GroupFailoverView, CtlError> {
        let g = self.group(group).await?;
        let mut members: Vec<FailoverView> = vec![];
        for m in &g.members {
            match self
                .call(cmd(m.clone()))
                .await
                .map_err(|e| member_error(m, &names(&members), e))?
            {
                AdminReply::Failover(v) => members.push(*v),
                other => return Err(unexpected(other)),
            }
        }
        Ok(GroupFailoverView {
            group: group.into(),
            members,
            ..Default::default()
        })
    }

    /// `ctl group reprotect` / `group failback`: started for every member, then each waited
    /// for (they run side by side).
    pub async fn group_reverse(
        &self,
        group: &str,
        failback: bool,
        timeout: Duration,
    ) -> Result<GroupFailoverView, CtlError> {
        let g = self.group(group).await?;
        let cmd = |m: &str| match failback {
            true => AdminCommand::Failback { machine: m.into() },
            false => AdminCommand::Reprotect { machine: m.into() },
        };
        for m in &g.members {
            self.call(cmd(m))
                .await
                .map_err(|e| member_error(m, &[], e))?;
        }
        let mut members = vec![];
        for m in &g.members {
            members.push(match failback {
                true => self.failback(m, timeout, |_| {}).await?,
                false => self.reprotect(m, timeout, |_| {}).await?,
            });
        }
        Ok(GroupFailoverView {
            group: group.into(),
            members,
            ..Default::default()
        })
    }

    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ep.wait_idle()).await;
    }
}

/// Asks `ask` every `pause` until it answers `Some` or `deadline` passes (`Ok(None)`).
async fn poll_until<T, F, Fut>(
    deadline: Instant,
    pause: Duration,
    mut ask: F,
) -> Result<Option<T>, CtlError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, CtlError>>,
{
    loop {
        if let Some(v) = ask().await? {
            return Ok(Some(v));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(pause).await;
    }
}

fn unexpected(reply: AdminReply) -> CtlError {
    CtlError::Failed(format!("unexpected reply: {reply:?}"))
}

/// A group step failed at member `m`: says which members it had reached, keeping the kind.
fn member_error(m: &str, done: &[&str], e: CtlError) -> CtlError {
    let reached = if done.is_empty() {
        String::new()
    } else {
        format!(
            " (done for {}; running the group command again goes on from there)",
            done.join(", ")
        )
    };
    let text = format!("{m}: {e}{reached}");
    match e {
        CtlError::Refused(_) => CtlError::Refused(text),
        CtlError::Unreachable(_) => CtlError::Unreachable(text),
        CtlError::Failed(_) => CtlError::Failed(text),
    }
}

fn names<T: Named>(done: &[T]) -> Vec<&str> {
    done.iter().map(Named::name).collect()
}

trait Named {
    fn name(&self) -> &str;
}

impl Named for FailoverView {
    fn name(&self) -> &str {
        &self.machine
    }
}

impl Named for crate::view::TestFailoverView {
    fn name(&self) -> &str {
        &self.machine
    }
}
