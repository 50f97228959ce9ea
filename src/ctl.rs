//! `haven ctl`: the operator's command line. Talks to the configuration node with the admin
//! token (the server is verified against the token's CA fingerprint).
use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use haven_roles::{
    client::{self, CallError},
    enroll,
    proto::{AdminCommand, AdminReply, Request, Response},
    view::{ClusterStatus, MachineView, NodeView},
};
use haven_transport::{
    endpoint,
    identity::{Token, TokenKind},
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

    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ep.wait_idle()).await;
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn print_nodes(nodes: &[NodeView]) {
    println!(
        "{:<16} {:<36} {:<22} {:<6} {:>8} {:>8} {:>10} {:>10} {:>10}",
        "NODE", "ROLES", "ADDRESS", "ALIVE", "MACHINES", "CAPACITY", "IN/s", "OUT/s", "CACHE"
    );
    for n in nodes {
        let alive = match (n.alive, n.drained) {
            (true, true) => "drain",
            (true, false) => "yes",
            (false, _) => "no",
        };
        println!(
            "{:<16} {:<36} {:<22} {:<6} {:>8} {:>8} {:>10} {:>10} {:>10}",
            n.name,
            n.roles.join(","),
            n.addr,
            alive,
            n.machines,
            n.capacity,
            human_bytes(n.bytes_in_per_sec),
            human_bytes(n.bytes_out_per_sec),
            human_bytes(n.cache_bytes),
        );
    }
}

pub fn print_machines(machines: &[MachineView]) {
    println!(
        "{:<14} {:<20} {:<12} {:<12} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10}",
        "MACHINE",
        "STATE",
        "PROCESS",
        "TARGET",
        "CAPTURED",
        "APPLIED",
        "RPO(s)",
        "RAW SENT",
        "WIRE SENT",
        "RATE/s"
    );
    for m in machines {
        let state = match (&m.state[..], m.initial_sync_percent, &m.degraded_reason) {
            ("initial-sync", Some(p), _) => format!("initial-sync {p:.0}%"),
            _ => m.state.clone(),
        };
        // No complete replica yet (or nothing known of it): no recovery point to speak of.
        let rpo = m
            .rpo_seconds
            .map(|r| format!("{r:.1}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:<20} {:<12} {:<12} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10}",
            m.name,
            state,
            m.process_server.as_deref().unwrap_or("-"),
            m.master_target.as_deref().unwrap_or("-"),
            m.captured_seq,
            m.applied_seq,
            rpo,
            human_bytes(m.raw_bytes_sent),
            human_bytes(m.wire_bytes_sent),
            human_bytes(m.throughput_bytes_per_sec),
        );
        if let Some(reason) = &m.blocked_reason {
            println!("  blocked (needs you): {reason}");
        } else if let Some(reason) = &m.degraded_reason {
            println!("  degraded: {reason}");
        }
    }
}

fn time_text(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn print_tokens(tokens: &[haven_roles::view::TokenView]) {
    println!(
        "{:<14} {:<6} {:<21} {:<21} {:<8} {:>5}  DESCRIPTION",
        "ID", "KIND", "CREATED", "EXPIRES", "STATE", "USES"
    );
    for t in tokens {
        let state = match (t.revoked, t.expired) {
            (true, _) => "revoked",
            (false, true) => "expired",
            (false, false) => "valid",
        };
        println!(
            "{:<14} {:<6} {:<21} {:<21} {:<8} {:>5}  {}",
            t.id,
            t.kind,
            time_text(t.created_ms),
            t.expires_ms
                .map(time_text)
                .unwrap_or_else(|| "never".into()),
            state,
            t.uses,
            t.description
        );
    }
}

pub fn print_events(events: &[haven_roles::view::EventView]) {
    println!(
        "{:>8} {:<10} {:<14} {:<10} {:<10} {:>4} {:>9} {:>10}  REASON",
        "AGO(s)", "KIND", "MACHINE", "FROM", "TO", "GEN", "PAUSE(ms)", "RESENT"
    );
    for e in events {
        println!(
            "{:>8.1} {:<10} {:<14} {:<10} {:<10} {:>4} {:>9} {:>10}  {}",
            e.age_ms as f64 / 1000.0,
            e.kind,
            e.machine,
            e.from.as_deref().unwrap_or("-"),
            e.to.as_deref().unwrap_or("-"),
            e.generation,
            e.pause_ms
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            e.bytes_resent
                .map(human_bytes)
                .unwrap_or_else(|| "-".into()),
            e.reason
        );
    }
}
