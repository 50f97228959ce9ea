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
    proto::{AdminCommand, AdminReply, Request, Response},
    view::{ClusterStatus, FailoverView, MachineView, MarkView},
};

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
        loop {
            match self
                .call(AdminCommand::MarkState {
                    machine: machine.into(),
                    id,
                })
                .await?
            {
                AdminReply::MarkState { done: Some(p) } => return Ok(Some(p)),
                AdminReply::MarkState { done: None } => {}
                other => return Err(CtlError::Failed(format!("unexpected reply: {other:?}"))),
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ep.wait_idle()).await;
    }
}
