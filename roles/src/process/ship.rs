//! Shipping one machine's cached batches to its master target: the `ship/<machine>` child,
//! a thin driver of [`ShipCore`](super::ship_core::ShipCore). On every stream it asks the
//! master target for `applied_seq` and resends everything after it from the cache, so a crash
//! anywhere costs a resend, never a loss.
//!
//! A failure of the peer (master target down, network, peer reset, a batch it refused) is
//! the normal weather of a replication link: the child reconnects on its own, with a backoff,
//! from the master target's applied seq. A failure of this node (its cache, a bug) goes to the
//! supervisor, which restarts the child against its restart budget and escalates when the
//! budget runs out. So a long master-target outage never exhausts the budget that guards
//! against crash loops.
use std::{
    collections::VecDeque,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use haven_actors::TaskError;
use haven_storage::cache::Record;
use haven_transport::{
    codec,
    frame::{self, MAX_CONTROL_FRAME},
    seal::{self, DataKey, SealContext, Sealed},
};
use quinn::SendStream;

use super::ship_core::{Effect, Ended, Route, ShipCore};
use super::{ProcessService, PsMachine};
use crate::{
    error::StreamError,
    faults::{self, Fault, Side},
    proto::{Applied, BatchBody, Request, Response, ShipFrame, ShipOpen},
};

/// Bytes read from the cache per round.
const READ_BYTES: usize = 16 << 20;

fn route(m: &PsMachine) -> Route {
    let a = m.assignment.borrow();
    Route {
        peer_addr: a.master_target_addr.clone(),
        epoch: a.epoch.0,
        generation: a.generation.0,
    }
}

/// The open stream to the master target.
struct Stream {
    send: SendStream,
    /// Reads the master target's acks into `PsMachine::applied`; ends with the stream.
    acks: tokio::task::JoinHandle<StreamError>,
    _conn: quinn::Connection,
    /// Debug fault injection fires once per incarnation, after one batch went out.
    sent: u64,
    fired: bool,
    first_sent: Option<Vec<u8>>,
}

pub async fn ship(svc: ProcessService, m: Arc<PsMachine>) -> Result<(), TaskError> {
    let mut core = ShipCore::new(route(&m), *m.durable.borrow());
    let mut durable = m.durable.subscribe();
    let mut applied = m.applied.subscribe();
    let mut assignment = m.assignment.subscribe();
    durable.borrow_and_update();
    applied.borrow_and_update();
    assignment.borrow_and_update();
    let mut stream: Option<Stream> = None;
    let mut records: Vec<Record> = vec![];
    let mut timer: Option<(u64, tokio::time::Instant)> = None;
    let mut last_end = String::new();
    let mut effects: VecDeque<Effect> = core.handle_start(Instant::now()).into();
    if m.draining.load(Ordering::SeqCst) {
        effects.extend(core.handle_drain(Instant::now()));
    }
    loop {
        while let Some(effect) = effects.pop_front() {
            match effect {
                Effect::Connect => match connect(&svc, &m).await {
                    Ok((s, at)) => {
                        stream = Some(s);
                        m.set_ship_error(None);
                        m.record_applied(at);
                        applied.borrow_and_update();
                        effects.extend(core.handle_accepted(at));
                    }
                    Err(e) => effects.extend(ended(&mut core, &m, e, &mut last_end)),
                },
                Effect::Reconnect => {
                    if let Some(s) = stream.take() {
                        s.acks.abort();
                    }
                    records.clear();
                    let e = StreamError::Peer("assignment changed; reconnecting".into());
                    effects.extend(ended(&mut core, &m, e, &mut last_end));
                }
                Effect::Trim { applied } => {
                    trim(&svc, &m, applied).await.map_err(TaskError::retry)?
                }
                Effect::Read { after } => {
                    records = m
                        .with_cache(move |c| c.read_after(after, READ_BYTES))
                        .await
                        .map_err(TaskError::retry)?;
                    let lasts: Vec<u64> = records.iter().map(|r| r.last_seq).collect();
                    effects.extend(core.handle_read(&lasts));
                }
                Effect::Send => {
                    let Some(s) = stream.as_mut() else {
                        records.clear();
                        continue;
                    };
                    if let Err(e) = send_records(&m, s, &mut records).await {
                        if let Some(s) = stream.take() {
                            s.acks.abort();
                        }
                        if e.is_local() {
                            return Err(TaskError::Retry(e.to_string()));
                        }
                        effects.clear();
                        effects.extend(ended(&mut core, &m, e, &mut last_end));
                    }
                }
                Effect::Wait => {}
                Effect::Sleep { token, delay } => {
                    timer = Some((token, tokio::time::Instant::now() + delay));
                }
                Effect::Done { drained } => {
                    if let Some(s) = stream.take() {
                        s.acks.abort();
                    }
                    let outcome = if drained {
                        "drained".to_string()
                    } else if last_end.is_empty() {
                        format!("drain timed out after {:?}", super::ship_core::DRAIN_MAX)
                    } else {
                        format!("drain ended: {last_end}")
                    };
                    // The machine may have come back while we drained: then its cache is
                    // live again.
                    if m.reset_cache_if_draining().map_err(TaskError::retry)? {
                        tracing::info!(machine = %m.name, "{outcome}; dropped the machine's cache");
                        svc.state.space.notify_waiters();
                        svc.state.freed.notify_waiters();
                    }
                    return Ok(());
                }
                Effect::Fail => return Err(TaskError::Retry(last_end.clone())),
            }
        }
        // Nothing to do until something happens.
        let acks_ended = async {
            match stream.as_mut() {
                Some(s) => (&mut s.acks).await,
                None => std::future::pending().await,
            }
        };
        let timer_fired = async {
            match timer {
                Some((token, at)) => {
                    tokio::time::sleep_until(at).await;
                    token
                }
                None => std::future::pending().await,
            }
        };
        let tick = tokio::time::sleep(Duration::from_secs(1));
        tokio::select! {
            r = applied.changed() => {
                r.map_err(|_| TaskError::fatal("the machine's state is gone"))?;
                let at = *applied.borrow_and_update();
                effects.extend(core.handle_ack(at));
            }
            r = durable.changed() => {
                r.map_err(|_| TaskError::fatal("the machine's state is gone"))?;
                let seq = *durable.borrow_and_update();
                effects.extend(core.handle_durable(seq));
            }
            r = assignment.changed() => {
                r.map_err(|_| TaskError::fatal("the machine's state is gone"))?;
                assignment.borrow_and_update();
                if m.draining.load(Ordering::SeqCst) {
                    effects.extend(core.handle_drain(Instant::now()));
                } else {
                    effects.extend(core.handle_route(route(&m)));
                }
            }
            r = acks_ended => {
                stream = None;
                records.clear();
                let e = match r {
                    Ok(e) => e,
                    Err(e) => StreamError::local("ack reader", e),
                };
                effects.clear();
                effects.extend(ended(&mut core, &m, e, &mut last_end));
            }
            token = timer_fired => {
                timer = None;
                effects.extend(core.handle_timer(Instant::now(), token));
            }
            _ = tick, if core.draining() => {
                effects.extend(core.handle_tick(Instant::now()));
            }
        }
    }
}

/// A stream ended (or could not open): the core decides; the driver says so.
fn ended(core: &mut ShipCore, m: &PsMachine, e: StreamError, last_end: &mut String) -> Vec<Effect> {
    let kind = if e.is_local() {
        Ended::Local
    } else {
        Ended::Peer
    };
    let before = core.route().clone();
    *last_end = e.to_string();
    if kind == Ended::Peer {
        m.set_ship_error(Some(e.to_string()));
    }
    let effects = core.handle_stream_end(Instant::now(), kind, rand::random());
    match effects.first() {
        Some(Effect::Connect) => {
            m.ship_restarts.fetch_add(1, Ordering::Relaxed);
            tracing::info!(machine = %m.name, "ship stream ended: {e}; the assignment changed, reconnecting now");
        }
        Some(Effect::Sleep { delay, .. }) => {
            let restarts = m.ship_restarts.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                machine = %m.name,
                restarts,
                delay_ms = delay.as_millis() as u64,
                "ship stream ended: {e}; reconnecting from the master target's applied seq"
            );
        }
        Some(Effect::Fail) => m.set_ship_error(Some(e.to_string())),
        _ => {}
    }
    debug_assert!(core.route() == &before || kind == Ended::Peer);
    effects
}

/// Opens a ship stream to the master target; returns it and the seq the master target has
/// applied.
async fn connect(svc: &ProcessService, m: &Arc<PsMachine>) -> Result<(Stream, u64), StreamError> {
    let a = m.assignment.borrow().clone();
    let conn = svc
        .link()
        .dialer
        .connect(
            &a.master_target_addr,
            &format!("process {}", svc.link().name),
        )
        .await
        .map_err(|e| {
            StreamError::Peer(format!(
                "master target {} at {}: {e}",
                a.master_target, a.master_target_addr
            ))
        })?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| StreamError::peer("open a ship stream", e))?;
    let open = ShipOpen {
        machine: a.machine.clone(),
        epoch: a.epoch.0,
        generation: a.generation,
        disks: a.disks.clone(),
    };
    frame::send_msg(&mut send, &Request::OpenShip(open)).await?;
    let applied = match frame::expect_msg::<Response>(&mut recv, MAX_CONTROL_FRAME).await? {
        Response::ShipAccepted { applied_seq } => applied_seq,
        Response::Refused { reason } => {
            return Err(StreamError::Peer(format!(
                "master target refused: {reason}"
            )))
        }
        other => {
            return Err(StreamError::Peer(format!(
                "unexpected reply to OpenShip: {other:?}"
            )))
        }
    };
    tracing::info!(machine = %a.machine, applied, "shipping to master target {}", a.master_target);
    let acks = {
        let m = m.clone();
        tokio::spawn(async move {
            loop {
                match frame::expect_msg::<Applied>(&mut recv, MAX_CONTROL_FRAME).await {
                    Ok(Applied { applied_seq }) => m.record_applied(applied_seq),
                    Err(e) => return StreamError::peer("master target stream", e),
                }
            }
        })
    };
    Ok((
        Stream {
            send,
            acks,
            _conn: conn,
            sent: 0,
            fired: false,
            first_sent: None,
        },
        applied,
    ))
}

/// Sends the records read, in order (with the debug faults planned for this machine).
async fn send_records(
    m: &PsMachine,
    s: &mut Stream,
    records: &mut Vec<Record>,
) -> Result<(), StreamError> {
    let epoch = m.assignment.borrow().epoch.0;
    for mut r in records.drain(..) {
        if s.sent > 0 && !s.fired {
            if let Some(f) = faults::next(&m.name, Side::Ship) {
                s.fired = true;
                let original = Original {
                    machine: &m.name,
                    epoch,
                    first_payload: s.first_sent.as_deref(),
                };
                inject(f, &original, &mut s.send, &mut r.payload)?;
            }
        }
        frame::write_frame(&mut s.send, &r.payload).await?;
        m.wire_bytes
            .fetch_add(r.payload.len() as u64, Ordering::Relaxed);
        if s.sent == 0 && faults::active() {
            s.first_sent = Some(r.payload.clone());
        }
        s.sent += 1;
    }
    Ok(())
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
) -> Result<(), StreamError> {
    let machine = o.machine;
    faults::fire(machine, fault);
    // A valid frame with another batch's sealed bytes, under this frame's seq range.
    let relabel = |payload: &mut Vec<u8>, sealed: Sealed| -> Result<(), StreamError> {
        let ShipFrame::Sealed {
            first_seq,
            last_seq,
            ..
        } = codec::decode(payload).map_err(|e| StreamError::Local(e.to_string()))?;
        *payload = codec::encode(&ShipFrame::Sealed {
            first_seq,
            last_seq,
            sealed,
        })
        .map_err(|e| StreamError::Local(e.to_string()))?;
        Ok(())
    };
    match fault {
        Fault::ShipPanic => panic!("{}: ship-panic for machine {machine}", faults::ENV),
        Fault::ShipIo => Err(StreamError::Local(format!(
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
            Err(StreamError::Peer("ship stream reset (injected)".into()))
        }
        Fault::ShipReplay => {
            let first = o.first_payload.ok_or_else(|| {
                StreamError::Local("ship-replay: no earlier batch in this stream".into())
            })?;
            let ShipFrame::Sealed { sealed, .. } =
                codec::decode(first).map_err(|e| StreamError::Local(e.to_string()))?;
            relabel(payload, sealed)
        }
        Fault::ShipWrongKey => {
            let ShipFrame::Sealed {
                first_seq,
                last_seq,
                ..
            } = codec::decode(payload).map_err(|e| StreamError::Local(e.to_string()))?;
            let ctx = SealContext {
                machine,
                epoch: o.epoch,
                first_seq,
                last_seq,
            };
            let body = codec::encode(&BatchBody::default())
                .map_err(|e| StreamError::Local(e.to_string()))?;
            let sealed = seal::seal(&DataKey::generate(), &ctx, &body)
                .map_err(|e| StreamError::Local(e.to_string()))?;
            relabel(payload, sealed)
        }
        Fault::ApplyReset | Fault::ApplyPanic | Fault::ApplyAbort => Ok(()),
    }
}

async fn trim(svc: &ProcessService, m: &PsMachine, applied: u64) -> Result<(), StreamError> {
    let (freed, bytes, pending) = m
        .with_cache(move |c| Ok((c.trim(applied)?, c.bytes(), c.bytes_after(applied))))
        .await?;
    m.cache_bytes.store(bytes, Ordering::Relaxed);
    let before = m.pending_bytes.swap(pending, Ordering::Relaxed);
    if pending < before {
        svc.state.space.notify_waiters();
    }
    if freed > 0 {
        svc.state.freed.notify_waiters();
    }
    Ok(())
}
