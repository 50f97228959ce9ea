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
use haven_transport::{endpoint, identity::TokenKind};

pub struct Admin {
    ep: quinn::Endpoint,
    conn: quinn::Connection,
    secret: String,
}

/// Exit code of `wait-sync` when the barrier is not applied in time.
pub const EXIT_TIMEOUT: i32 = 3;

impl Admin {
    pub async fn connect(cluster: &str, token_file: &Path) -> Result<Self, String> {
        let token = enroll::read_token(token_file, TokenKind::Admin)?;
        let addr: SocketAddr = enroll::resolve(cluster)?;
        let ep = endpoint::client_endpoint().map_err(|e| e.to_string())?;
        let cfg =
            endpoint::pinned_client_config(&token.ca_fingerprint).map_err(|e| e.to_string())?;
        let conn = client::connect(&ep, cfg, addr, "ctl")
            .await
            .map_err(|e| format!("cannot reach the configuration node at {cluster}: {e}"))?;
        Ok(Self {
            ep,
            conn,
            secret: token.secret,
        })
    }

    pub async fn call(&self, command: AdminCommand) -> Result<AdminReply, String> {
        let req = Request::Admin {
            secret: self.secret.clone(),
            command,
        };
        match client::call(&self.conn, &req, Duration::from_secs(30)).await {
            Ok(Response::Admin(r)) => Ok(r),
            Ok(other) => Err(format!("unexpected reply: {other:?}")),
            Err(CallError::Refused(reason)) => Err(reason),
            Err(e) => Err(e.to_string()),
        }
    }

    pub async fn status(&self) -> Result<ClusterStatus, String> {
        match self.call(AdminCommand::Status).await? {
            AdminReply::Status(s) => Ok(s),
            other => Err(format!("unexpected reply: {other:?}")),
        }
    }

    pub async fn machine(&self, name: &str) -> Result<Option<MachineView>, String> {
        Ok(self
            .status()
            .await?
            .machines
            .into_iter()
            .find(|m| m.name == name))
    }

    /// A sync barrier: the agent captures everything written so far, then we wait until the
    /// master target has applied it. `Ok(false)` on timeout.
    pub async fn wait_sync(
        &self,
        machine: &str,
        timeout: Duration,
        mut progress: impl FnMut(Option<u64>, u64),
    ) -> Result<bool, String> {
        let deadline = Instant::now() + timeout;
        let AdminReply::SyncRequested { id } = self
            .call(AdminCommand::RequestSync {
                machine: machine.into(),
            })
            .await?
        else {
            return Err("unexpected reply to a sync request".into());
        };
        loop {
            match self
                .call(AdminCommand::SyncState {
                    machine: machine.into(),
                    id,
                })
                .await?
            {
                AdminReply::SyncState { done: true, .. } => return Ok(true),
                AdminReply::SyncState {
                    barrier_seq,
                    applied_seq,
                    ..
                } => progress(barrier_seq, applied_seq),
                other => return Err(format!("unexpected reply: {other:?}")),
            }
            if Instant::now() >= deadline {
                return Ok(false);
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
        println!(
            "{:<14} {:<20} {:<12} {:<12} {:>10} {:>10} {:>8.1} {:>10} {:>10} {:>10}",
            m.name,
            state,
            m.process_server.as_deref().unwrap_or("-"),
            m.master_target.as_deref().unwrap_or("-"),
            m.captured_seq,
            m.applied_seq,
            m.rpo_seconds,
            human_bytes(m.raw_bytes_sent),
            human_bytes(m.wire_bytes_sent),
            human_bytes(m.throughput_bytes_per_sec),
        );
        if let Some(reason) = &m.degraded_reason {
            println!("  degraded: {reason}");
        }
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
