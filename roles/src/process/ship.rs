//! Shipping one machine's cached batches to its master target: a supervised child per
//! machine. On (re)start it asks the master target for `applied_seq` and resends everything
//! after it from the cache, so a crash anywhere costs a resend, never a loss.
use std::{
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use haven_actors::Backoff;
use haven_transport::{
    codec,
    frame::{self, MAX_CONTROL_FRAME},
    seal::{self, DataKey, SealContext, Sealed},
};

use super::{ProcessState, PsMachine};
use crate::{
    client,
    enroll::resolve,
    faults::{self, Fault, Side},
    node::NodeContext,
    proto::{Applied, BatchBody, Request, Response, ShipFrame, ShipOpen},
};

/// Bytes read from the cache per round.
const READ_BYTES: usize = 16 << 20;

/// Longest a machine that moved away keeps shipping its cache before it is dropped.
const DRAIN_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Reconnect backoff after the master target or the network ended a stream.
const RECONNECT_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const RECONNECT_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a ship stream ended.
///
/// A failure of the peer (master target down, network, peer reset, a batch it refused) is the
/// normal weather of a replication link: the child reconnects on its own, with a backoff, from
/// the master target's applied seq. A failure of this node (its cache, a bug) goes to the
/// supervisor, which restarts the child against its restart budget and escalates when the
/// budget runs out. So a long master-target outage never exhausts the budget that guards
/// against crash loops.
#[derive(Debug)]
enum StreamEnd {
    Peer(String),
    Local(String),
}

impl From<String> for StreamEnd {
    fn from(e: String) -> Self {
        Self::Peer(e)
    }
}

impl StreamEnd {
    fn reason(&self) -> &str {
        match self {
            Self::Peer(e) | Self::Local(e) => e,
        }
    }
}

pub async fn ship(
    ctx: Arc<NodeContext>,
    ps: Arc<ProcessState>,
    m: Arc<PsMachine>,
) -> Result<(), String> {
    let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
    while !m.draining.load(Ordering::SeqCst) {
        backoff.handle_start(Instant::now());
        let target = route(&m);
        match ship_once(&ctx, &ps, &m).await {
            // Returns Ok only once a drain that started meanwhile has shipped everything.
            Ok(()) => {
                if m.reset_cache_if_draining()? {
                    tracing::info!(machine = %m.name, "drained; dropped the machine's cache");
                    ps.space.notify_waiters();
                    ps.freed.notify_waiters();
                }
                return Ok(());
            }
            Err(StreamEnd::Local(e)) => {
                m.set_ship_error(Some(e.clone()));
                return Err(e);
            }
            Err(StreamEnd::Peer(e)) if route(&m) != target => {
                m.ship_restarts.fetch_add(1, Ordering::Relaxed);
                tracing::info!(machine = %m.name, "ship stream ended: {e}; the assignment changed, reconnecting now");
            }
            Err(StreamEnd::Peer(e)) => {
                m.set_ship_error(Some(e.clone()));
                let restarts = m.ship_restarts.fetch_add(1, Ordering::Relaxed) + 1;
                let delay = backoff.handle_failure(Instant::now(), rand::random());
                tracing::warn!(
                    machine = %m.name,
                    restarts,
                    delay_ms = delay.as_millis() as u64,
                    "ship stream ended: {e}; reconnecting from the master target's applied seq"
                );
                // A new assignment (a move, another master target) ends the wait at once.
                let mut assignment = m.assignment.subscribe();
                let _ = tokio::time::timeout(delay, assignment.changed()).await;
            }
        }
    }
    // Draining after a move: best effort. Whatever does not get through, the agent still
    // retains and sends to the new process server; a newer generation fences us anyway.
    let drained = tokio::time::timeout(DRAIN_MAX, ship_once(&ctx, &ps, &m)).await;
    let outcome = match drained {
        Ok(Ok(())) => "drained".to_string(),
        Ok(Err(e)) => format!("drain ended: {}", e.reason()),
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

/// Where and under which identity the machine ships: a change means "reconnect now".
fn route(m: &PsMachine) -> (String, haven_cluster::Epoch, haven_cluster::Generation) {
    let a = m.assignment.borrow();
    (a.master_target_addr.clone(), a.epoch, a.generation)
}

/// Ships until an error, or (when draining) until everything cached is applied.
async fn ship_once(
    ctx: &Arc<NodeContext>,
    ps: &Arc<ProcessState>,
    m: &Arc<PsMachine>,
) -> Result<(), StreamEnd> {
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
        Response::Refused { reason } => {
            return Err(format!("master target refused: {reason}").into())
        }
        other => return Err(format!("unexpected reply to OpenShip: {other:?}").into()),
    };
    tracing::info!(machine = %a.machine, applied, "shipping to master target {}", a.master_target);
    m.set_ship_error(None);
    m.record_applied(applied);
    trim(&ps, &m, applied).await.map_err(StreamEnd::Local)?;

    let mut acks = {
        let (ps, m, epoch) = (ps.clone(), m.clone(), a.epoch);
        tokio::spawn(async move {
            loop {
                let Applied { applied_seq } = frame::expect_msg(&mut recv, MAX_CONTROL_FRAME)
                    .await
                    .map_err(|e| StreamEnd::Peer(e.to_string()))?;
                if m.assignment.borrow().epoch != epoch {
                    return Err(StreamEnd::Peer("protection epoch changed".into()));
                }
                m.record_applied(applied_seq);
                trim(&ps, &m, applied_seq).await.map_err(StreamEnd::Local)?;
            }
        })
    };
    let result = async {
        let mut durable = m.durable.subscribe();
        let mut assignment = m.assignment.subscribe();
        let mut cursor = applied;
        // Debug fault injection fires once per incarnation, after one batch went out.
        let (mut sent, mut fired) = (0u64, false);
        let mut first_sent: Option<Vec<u8>> = None; // kept only while faults are planned
        loop {
            durable.borrow_and_update();
            let records = m
                .with_cache(move |c| c.read_after(cursor, READ_BYTES))
                .await
                .map_err(StreamEnd::Local)?;
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
                            return Err::<(), StreamEnd>("assignment changed; reconnecting".to_string().into());
                        }
                    }
                    r = &mut acks => return Err(ack_end(r)),
                }
                continue;
            }
            for mut r in records {
                if sent > 0 && !fired {
                    if let Some(f) = faults::next(&a.machine, Side::Ship) {
                        fired = true;
                        let original = Original {
                            machine: &a.machine,
                            epoch: a.epoch.0,
                            first_payload: first_sent.as_deref(),
                        };
                        inject(f, &original, &mut send, &mut r.payload)?;
                    }
                }
                frame::write_frame(&mut send, &r.payload).await.map_err(|e| e.to_string())?;
                m.wire_bytes.fetch_add(r.payload.len() as u64, Ordering::Relaxed);
                cursor = r.last_seq;
                if sent == 0 && faults::active() {
                    first_sent = Some(r.payload.clone());
                }
                sent += 1;
            }
        }
    }
    .await;
    acks.abort();
    result
}

fn ack_end(r: Result<Result<(), StreamEnd>, tokio::task::JoinError>) -> StreamEnd {
    match r {
        Ok(Err(StreamEnd::Peer(e))) => StreamEnd::Peer(format!("master target stream: {e}")),
        Ok(Err(StreamEnd::Local(e))) => StreamEnd::Local(e),
        Ok(Ok(())) => StreamEnd::Peer("master target stream ended".into()),
        Err(e) => StreamEnd::Local(format!("ack reader failed: {e}")),
    }
}

/// What a debug fault needs to know about the stream it breaks.
struct Original<'a> {
    machine: &'a str,
    epoch: u32,
    /// The incarnation's first shipped frame (for `ship-replay`).
    first_payload: Option<&'a [u8]>,
}

/// Executes one planned debug fault (see [`crate::faults`]) on the frame about to be sent.
fn inject(
    fault: Fault,
    o: &Original,
    send: &mut quinn::SendStream,
    payload: &mut Vec<u8>,
) -> Result<(), StreamEnd> {
    let machine = o.machine;
    faults::fire(machine, fault);
    // A valid frame with another batch's sealed bytes, under this frame's seq range.
    let relabel = |payload: &mut Vec<u8>, sealed: Sealed| -> Result<(), StreamEnd> {
        let ShipFrame::Sealed {
            first_seq,
            last_seq,
            ..
        } = codec::decode(payload).map_err(|e| StreamEnd::Local(e.to_string()))?;
        *payload = codec::encode(&ShipFrame::Sealed {
            first_seq,
            last_seq,
            sealed,
        })
        .map_err(|e| StreamEnd::Local(e.to_string()))?;
        Ok(())
    };
    match fault {
        Fault::ShipPanic => panic!("{}: ship-panic for machine {machine}", faults::ENV),
        Fault::ShipIo => Err(StreamEnd::Local(format!(
            "cache read for {machine}: injected I/O error ({})",
            faults::ENV
        ))),
        Fault::ShipCorrupt => {
            if let Some(b) = payload.last_mut() {
                *b ^= 0x01;
            }
            Ok(())
        }
        Fault::ShipReset => {
            let _ = send.reset(0u32.into());
            Err(StreamEnd::Peer("ship stream reset (injected)".into()))
        }
        Fault::ShipReplay => {
            let first = o.first_payload.ok_or_else(|| {
                StreamEnd::Local("ship-replay: no earlier batch in this stream".into())
            })?;
            let ShipFrame::Sealed { sealed, .. } =
                codec::decode(first).map_err(|e| StreamEnd::Local(e.to_string()))?;
            relabel(payload, sealed)
        }
        Fault::ShipWrongKey => {
            let ShipFrame::Sealed {
                first_seq,
                last_seq,
                ..
            } = codec::decode(payload).map_err(|e| StreamEnd::Local(e.to_string()))?;
            let ctx = SealContext {
                machine,
                epoch: o.epoch,
                first_seq,
                last_seq,
            };
            let body = codec::encode(&BatchBody::default())
                .map_err(|e| StreamEnd::Local(e.to_string()))?;
            let sealed = seal::seal(&DataKey::generate(), &ctx, &body)
                .map_err(|e| StreamEnd::Local(e.to_string()))?;
            relabel(payload, sealed)
        }
        Fault::ApplyReset | Fault::ApplyPanic | Fault::ApplyAbort => Ok(()),
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
