//! Shipping one machine's cached batches to its master target: a supervised child per
//! machine. On (re)start it asks the master target for `applied_seq` and resends everything
//! after it from the cache, so a crash anywhere costs a resend, never a loss.
use std::sync::{atomic::Ordering, Arc};

use haven_transport::frame::{self, MAX_CONTROL_FRAME};

use super::{ProcessState, PsMachine};
use crate::{
    client,
    enroll::resolve,
    node::NodeContext,
    proto::{Applied, Request, Response, ShipOpen},
};

/// Bytes read from the cache per round.
const READ_BYTES: usize = 16 << 20;

/// Debug fault injection: `HAVEN_FAULT_CORRUPT_SHIP=N` flips one bit in the N-th batch this
/// process ships (counting from 1), to prove the master target refuses it.
static SHIPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn corrupt_this_one() -> bool {
    let n = SHIPPED.fetch_add(1, Ordering::Relaxed) + 1;
    std::env::var("HAVEN_FAULT_CORRUPT_SHIP")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        == Some(n)
}

/// Longest a machine that moved away keeps shipping its cache before it is dropped.
const DRAIN_MAX: std::time::Duration = std::time::Duration::from_secs(30);

pub async fn ship(
    ctx: Arc<NodeContext>,
    ps: Arc<ProcessState>,
    m: Arc<PsMachine>,
) -> Result<(), String> {
    if !m.draining.load(Ordering::SeqCst) {
        // Returns Ok only once a drain that started meanwhile has shipped everything.
        ship_once(&ctx, &ps, &m).await?;
        if m.reset_cache_if_draining()? {
            tracing::info!(machine = %m.name, "drained; dropped the machine's cache");
            ps.space.notify_waiters();
            ps.freed.notify_waiters();
        }
        return Ok(());
    }
    // Draining after a move: best effort. Whatever does not get through, the agent still
    // retains and sends to the new process server; a newer generation fences us anyway.
    let drained = tokio::time::timeout(DRAIN_MAX, ship_once(&ctx, &ps, &m)).await;
    let outcome = match drained {
        Ok(Ok(())) => "drained".to_string(),
        Ok(Err(e)) => format!("drain ended: {e}"),
        Err(_) => format!("drain timed out after {DRAIN_MAX:?}"),
    };
    // The machine may have come back while we drained: then its cache is live again.
    if m.reset_cache_if_draining()? {
        tracing::info!(machine = %m.name, "{outcome}; dropped the machine's cache");
        ps.space.notify_waiters();
        ps.freed.notify_waiters();
    }
    Ok(())
}

/// Ships until an error, or (when draining) until everything cached is applied.
async fn ship_once(
    ctx: &Arc<NodeContext>,
    ps: &Arc<ProcessState>,
    m: &Arc<PsMachine>,
) -> Result<(), String> {
    let (ctx, ps, m) = (ctx.clone(), ps.clone(), m.clone());
    let a = m.assignment.borrow().clone();
    let addr = resolve(&a.master_target_addr)?;
    let conn = client::connect(
        &ctx.endpoint,
        ctx.client_cfg.clone(),
        addr,
        &format!("process {}", ctx.name),
    )
    .await
    .map_err(|e| format!("master target {} at {addr}: {e}", a.master_target))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let open = ShipOpen {
        machine: a.machine.clone(),
        epoch: a.epoch.0,
        generation: a.generation,
        disks: a.disks.clone(),
    };
    frame::send_msg(&mut send, &Request::OpenShip(open))
        .await
        .map_err(|e| e.to_string())?;
    let applied = match frame::expect_msg::<Response>(&mut recv, MAX_CONTROL_FRAME)
        .await
        .map_err(|e| e.to_string())?
    {
        Response::ShipAccepted { applied_seq } => applied_seq,
        Response::Refused { reason } => return Err(format!("master target refused: {reason}")),
        other => return Err(format!("unexpected reply to OpenShip: {other:?}")),
    };
    tracing::info!(machine = %a.machine, applied, "shipping to master target {}", a.master_target);
    m.record_applied(applied);
    trim(&ps, &m, applied).await?;

    let mut acks = {
        let (ps, m, epoch) = (ps.clone(), m.clone(), a.epoch);
        tokio::spawn(async move {
            loop {
                let Applied { applied_seq } = frame::expect_msg(&mut recv, MAX_CONTROL_FRAME)
                    .await
                    .map_err(|e| e.to_string())?;
                if m.assignment.borrow().epoch != epoch {
                    return Err("protection epoch changed".to_string());
                }
                m.record_applied(applied_seq);
                trim(&ps, &m, applied_seq).await?;
            }
        })
    };
    let result = async {
        let mut durable = m.durable.subscribe();
        let mut assignment = m.assignment.subscribe();
        let mut cursor = applied;
        loop {
            durable.borrow_and_update();
            let records = m.with_cache(move |c| c.read_after(cursor, READ_BYTES)).await?;
            if records.is_empty() {
                if m.draining.load(Ordering::SeqCst) && *m.applied.borrow() >= *m.durable.borrow() {
                    return Ok(());
                }
                let mut applied = m.applied.subscribe();
                tokio::select! {
                    r = applied.changed() => r.map_err(|_| "machine dropped".to_string())?,
                    r = durable.changed() => r.map_err(|_| "machine dropped".to_string())?,
                    r = assignment.changed() => {
                        r.map_err(|_| "machine dropped".to_string())?;
                        let now = assignment.borrow_and_update().clone();
                        if m.draining.load(Ordering::SeqCst) {
                            continue; // ship what is left under the old generation
                        }
                        if now.master_target_addr != a.master_target_addr || now.epoch != a.epoch || now.generation != a.generation {
                            return Err::<(), String>("assignment changed; reconnecting".into());
                        }
                    }
                    r = &mut acks => return Err(ack_end(r)),
                }
                continue;
            }
            for mut r in records {
                if corrupt_this_one() {
                    tracing::warn!(machine = %a.machine, first = r.first_seq, "HAVEN_FAULT_CORRUPT_SHIP: corrupting this batch on purpose");
                    if let Some(b) = r.payload.last_mut() {
                        *b ^= 0x01;
                    }
                }
                frame::write_frame(&mut send, &r.payload).await.map_err(|e| e.to_string())?;
                m.wire_bytes.fetch_add(r.payload.len() as u64, Ordering::Relaxed);
                cursor = r.last_seq;
            }
        }
    }
    .await;
    acks.abort();
    result
}

fn ack_end(r: Result<Result<(), String>, tokio::task::JoinError>) -> String {
    match r {
        Ok(Err(e)) => format!("master target stream: {e}"),
        Ok(Ok(())) => "master target stream ended".into(),
        Err(e) => format!("ack reader failed: {e}"),
    }
}

async fn trim(ps: &ProcessState, m: &PsMachine, applied: u64) -> Result<(), String> {
    let (freed, bytes, pending) = m
        .with_cache(move |c| Ok((c.trim(applied)?, c.bytes(), c.bytes_after(applied))))
        .await?;
    m.cache_bytes.store(bytes, Ordering::Relaxed);
    let before = m.pending_bytes.swap(pending, Ordering::Relaxed);
    if pending < before {
        ps.space.notify_waiters();
    }
    if freed > 0 {
        ps.freed.notify_waiters();
    }
    Ok(())
}
