//! One agent's replication stream into this process server.
//!
//! Nothing is acknowledged as cached before it is fsynced. Batches are sealed in the blocking
//! pool, two at a time, and appended in seq order; everything that arrives while one group is
//! being written is committed by the next single fsync (group commit).
use std::sync::{atomic::Ordering, Arc};
use std::time::Duration;

use haven_transport::{
    codec,
    frame::{self, MAX_DATA_FRAME},
    identity::PeerIdentity,
    seal::{self, DataKey, SealContext, MAX_RAW_LEN},
};
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;

use super::PsMachine;
use crate::node::NodeContext;
use crate::proto::{Ack, AgentFrame, Response, ShipFrame, StreamOpen};

/// Largest group of batches committed by one fsync.
const GROUP_BYTES_MAX: usize = 32 << 20;
/// Sealed batches queued between the reader and the writer.
const SEAL_QUEUE: usize = 3;

struct Sealed {
    first_seq: u64,
    last_seq: u64,
    payload: Vec<u8>,
    /// Counted in `PsMachine::inflight_bytes` until appended or dropped.
    _inflight: Inflight,
}

/// Raw bytes on their way into the cache; uncounted when dropped, whatever the outcome.
struct Inflight {
    m: Arc<PsMachine>,
    bytes: u64,
}

impl Inflight {
    fn new(m: &Arc<PsMachine>, bytes: u64) -> Self {
        m.inflight_bytes.fetch_add(bytes, Ordering::Relaxed);
        Self {
            m: m.clone(),
            bytes,
        }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.m
            .inflight_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

static NEXT_STREAM_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub async fn ingest(
    ctx: Arc<NodeContext>,
    who: Option<PeerIdentity>,
    open: StreamOpen,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), String> {
    let admitted = admit(&ctx, who.as_ref(), &open).await;
    let m = match admitted {
        Ok(m) => m,
        Err(reason) => {
            let _ = frame::send_msg(
                &mut send,
                &Response::Refused {
                    reason: reason.clone(),
                },
            )
            .await;
            let _ = send.finish();
            return Err(reason);
        }
    };
    let ps = ctx.process.clone().ok_or("not a process server")?;
    let id = NEXT_STREAM_ID.fetch_add(1, Ordering::Relaxed);
    m.ingest_owner.store(id, Ordering::SeqCst);
    let cached = *m.durable.borrow();
    let applied = *m.applied.borrow();
    frame::send_msg(
        &mut send,
        &Response::StreamAccepted {
            cached_seq: cached,
            applied_seq: applied,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!(machine = %open.machine, cached, applied, "agent stream accepted");

    // Acks flow back as the durable and applied cursors move.
    let acker = {
        let m = m.clone();
        tokio::spawn(async move {
            let (mut d, mut a) = (m.durable.subscribe(), m.applied.subscribe());
            loop {
                let ack = Ack {
                    cached_seq: *d.borrow_and_update(),
                    applied_seq: *a.borrow_and_update(),
                };
                if frame::send_msg(&mut send, &ack).await.is_err() {
                    return;
                }
                tokio::select! {
                    r = d.changed() => if r.is_err() { return },
                    r = a.changed() => if r.is_err() { return },
                }
            }
        })
    };

    let (tx, rx) = mpsc::channel::<tokio::task::JoinHandle<Result<Sealed, String>>>(SEAL_QUEUE);
    let writer = tokio::spawn(write_groups(m.clone(), ps.clone(), rx));
    let key = {
        let a = m.assignment.borrow();
        DataKey::from_slice(&a.data_key).map_err(|e| e.to_string())?
    };
    let mut next_expected = cached.max(applied) + 1;
    let result = async {
        loop {
            let Some(bytes) = frame::read_frame(&mut recv, MAX_DATA_FRAME)
                .await
                .map_err(|e| e.to_string())?
            else {
                return Ok(());
            };
            if m.ingest_owner.load(Ordering::SeqCst) != id {
                return Err("superseded by a newer stream from the same agent".to_string());
            }
            let AgentFrame::Batch {
                first_seq,
                last_seq,
                body,
            } = codec::decode(&bytes).map_err(|e| format!("malformed batch frame: {e}"))?;
            if first_seq > last_seq || body.len() > MAX_RAW_LEN {
                return Err(format!(
                    "invalid batch {first_seq}..={last_seq} of {} bytes",
                    body.len()
                ));
            }
            if last_seq < next_expected {
                continue; // a resend of something already cached
            }
            // A gap is legal: after moves, the seqs in between were cached by another process
            // server (the master target orders and deduplicates). An overlap is not: batches
            // are immutable units, so a partial overlap means a broken sender.
            if first_seq < next_expected {
                return Err(format!(
                    "batch {first_seq}..={last_seq} overlaps what is cached (through {})",
                    next_expected - 1
                ));
            }
            next_expected = last_seq + 1;
            // Back-pressure: a full cache stops us reading; QUIC flow control slows the agent.
            while ps.pending_bytes() >= ps.cache_limit_bytes {
                let wait = ps.space.notified();
                let _ = tokio::time::timeout(Duration::from_millis(200), wait).await;
            }
            m.raw_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            let inflight = Inflight::new(&m, body.len() as u64);
            let (key, machine, epoch) = (key.clone(), m.name.clone(), open.epoch);
            let job = tokio::task::spawn_blocking(move || {
                let sctx = SealContext {
                    machine: &machine,
                    epoch,
                    first_seq,
                    last_seq,
                };
                let sealed = seal::seal(&key, &sctx, &body).map_err(|e| e.to_string())?;
                let payload = codec::encode(&ShipFrame::Sealed {
                    first_seq,
                    last_seq,
                    sealed,
                })
                .map_err(|e| e.to_string())?;
                Ok(Sealed {
                    first_seq,
                    last_seq,
                    payload,
                    _inflight: inflight,
                })
            });
            if tx.send(job).await.is_err() {
                break;
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| format!("cache writer failed: {e}"))?;
    acker.abort();
    result.and(written)
}

async fn admit(
    ctx: &NodeContext,
    who: Option<&PeerIdentity>,
    open: &StreamOpen,
) -> Result<Arc<PsMachine>, String> {
    let ps = ctx
        .process
        .as_ref()
        .ok_or("this node is not a process server")?;
    match who {
        Some(PeerIdentity::Agent { machine }) if *machine == open.machine => {}
        Some(other) => {
            return Err(format!(
                "{} may not send data for machine {}",
                other.common_name(),
                open.machine
            ))
        }
        None => return Err("data streams need a cluster certificate".into()),
    }
    // The agent may hear of a move before we do: wait briefly for our assignment to catch up.
    let mut assignments = ctx.assignments.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let a = loop {
        let current = ctx
            .assignment(&open.machine)
            .filter(|a| a.process_server == ctx.name);
        match current {
            Some(a) if a.generation >= open.generation => break a,
            _ => {}
        }
        if tokio::time::timeout_at(deadline, assignments.changed())
            .await
            .is_err()
        {
            return Err(format!(
                "machine {} (generation {}) is not assigned to process server {}",
                open.machine, open.generation.0, ctx.name
            ));
        }
    };
    if a.generation > open.generation {
        return Err(format!(
            "stale assignment: the agent streams generation {}, the cluster is at {}",
            open.generation.0, a.generation.0
        ));
    }
    if a.epoch.0 != open.epoch {
        return Err(format!(
            "epoch mismatch: agent streams epoch {}, cluster has {}",
            open.epoch, a.epoch.0
        ));
    }
    let m = {
        let ps = ps.clone();
        tokio::task::spawn_blocking(move || ps.machine(&a))
            .await
            .map_err(|e| e.to_string())??
    };
    // Without cached data, the seq floor comes from the master target: wait for it.
    if m.draining.load(Ordering::SeqCst) {
        return Err(format!(
            "machine {} is draining off process server {}",
            open.machine, ctx.name
        ));
    }
    if *m.durable.borrow() == 0 && !*m.applied_known.borrow() {
        let mut known = m.applied_known.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(10), known.wait_for(|k| *k)).await;
        if !matches!(waited, Ok(Ok(_))) {
            return Err("waiting for the master target to report its applied position".into());
        }
    }
    Ok(m)
}

/// Appends sealed batches in order; one fsync per group; publishes the durable cursor.
async fn write_groups(
    m: Arc<PsMachine>,
    ps: Arc<super::ProcessState>,
    mut rx: mpsc::Receiver<tokio::task::JoinHandle<Result<Sealed, String>>>,
) -> Result<(), String> {
    while let Some(job) = rx.recv().await {
        let first = job.await.map_err(|e| format!("seal task failed: {e}"))??;
        let mut bytes = first.payload.len();
        let mut group = vec![first];
        while bytes < GROUP_BYTES_MAX {
            let Ok(job) = rx.try_recv() else { break };
            let s = job.await.map_err(|e| format!("seal task failed: {e}"))??;
            bytes += s.payload.len();
            group.push(s);
        }
        let applied = *m.applied.borrow();
        let (durable, cache_bytes, pending, group) = m
            .with_cache(move |c| {
                for s in &group {
                    c.append(s.first_seq, s.last_seq, &s.payload)?;
                }
                c.sync()?;
                Ok((
                    c.durable_last_seq().unwrap_or(0),
                    c.bytes(),
                    c.bytes_after(applied),
                    group,
                ))
            })
            .await?;
        m.cache_bytes.store(cache_bytes, Ordering::Relaxed);
        m.pending_bytes.store(pending, Ordering::Relaxed);
        drop(group); // now counted in cache_bytes, no longer in flight
        m.durable.send_replace(durable);
        let _ = &ps;
    }
    Ok(())
}
