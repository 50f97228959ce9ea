//! One agent's replication stream into this process server.
//!
//! Nothing is acknowledged as cached before it is fsynced. Batches are sealed in the blocking
//! pool, two at a time, and appended in seq order; everything that arrives while one group is
//! being written is committed by the next single fsync (group commit).
//!
//! A cache write that fails (a full disk, above all) is back-pressure, not a crash: the writer
//! keeps the group, syncs and acknowledges what did get in, and retries with a bounded
//! backoff, at once when cache files are deleted. Meanwhile the stream is not read, so QUIC
//! flow control holds the agent back, and the agent keeps what is not cached. The first
//! failure is logged as an error (at most one a minute per process server), a still-failing
//! writer warns every minute, and the first success after a logged failure says so.
use std::sync::{atomic::Ordering, Arc};
use std::time::{Duration, Instant};

use haven_storage::cache::{CacheError, MachineCache};

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
/// Backoff between attempts to write to a cache whose last write failed.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// A writer whose cache writes keep failing says so again this often.
const STILL_FAILING_EVERY: Duration = Duration::from_secs(60);

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
    conn: quinn::Connection,
    who: Option<PeerIdentity>,
    open: StreamOpen,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), String> {
    let admitted = match admit(&ctx, who.as_ref(), &open).await {
        Ok(m) => admit_instance(&m, &open, &conn).await.map(|()| m),
        Err(e) => Err(e),
    };
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
    // Taken over under the cache lock: a superseded writer appends nothing after this (it
    // checks under the same lock), so what we report as cached is all there will be.
    let owner = m.clone();
    let cached = m
        .with_cache(move |c| {
            owner.ingest_owner.store(id, Ordering::SeqCst);
            Ok(c.durable_last_seq().unwrap_or(0))
        })
        .await?;
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
    let writer = tokio::spawn(write_groups(m.clone(), ps.clone(), id, rx));
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
    let enrolment = match who {
        Some(PeerIdentity::Agent { machine, enrolment }) if *machine == open.machine => enrolment,
        Some(other) => {
            return Err(format!(
                "{} may not send data for machine {}",
                other.common_name(),
                open.machine
            ))
        }
        None => return Err("data streams need a cluster certificate".into()),
    };
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
    if a.enrolment != *enrolment {
        return Err(format!(
            "this agent's certificate is of an earlier enrolment of {}: it may not stream for the machine enrolled now",
            open.machine
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

/// How long the agent of a live stream has to answer a probe before it is taken for dead.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Admits the stream's agent process unless another one is streaming this machine: a stream
/// of the same process (a reconnect) takes over; another process only once the live one does
/// not answer a probe (it died and its connection has not timed out yet). So two agents that
/// claim one machine (a clone of its data dir) are never both accepted for data.
async fn admit_instance(
    m: &Arc<PsMachine>,
    open: &StreamOpen,
    conn: &quinn::Connection,
) -> Result<(), String> {
    let live = m.live.lock().map_err(|_| "poisoned".to_string())?.clone();
    if let Some(live) = live.filter(|l| {
        l.instance != open.instance
            && open.instance != 0
            && l.instance != 0
            && l.conn.close_reason().is_none()
            && l.conn.stable_id() != conn.stable_id()
    }) {
        match probe(&live.conn).await {
            Ok(instance) if instance == live.instance => {
                let reason = format!(
                    "machine {} is already streaming from another agent process (at {}); refused this                      second one (at {}). A cloned machine must be started with its own --name and --data-dir",
                    open.machine,
                    live.conn.remote_address(),
                    conn.remote_address()
                );
                tracing::error!(machine = %open.machine, "{reason}");
                return Err(reason);
            }
            Ok(_) | Err(_) => {
                tracing::info!(machine = %open.machine, old = %live.conn.remote_address(), "the previous agent process does not answer: taking its stream over");
                live.conn
                    .close(0u32.into(), b"superseded by a restarted agent");
            }
        }
    }
    *m.live.lock().map_err(|_| "poisoned".to_string())? = Some(super::LiveAgent {
        instance: open.instance,
        conn: conn.clone(),
    });
    Ok(())
}

/// Asks the agent at the other end of `conn` for its instance id.
async fn probe(conn: &quinn::Connection) -> Result<u64, String> {
    let ask = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        frame::send_msg(&mut send, &crate::proto::Request::Probe)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        match frame::expect_msg::<Response>(&mut recv, frame::MAX_CONTROL_FRAME)
            .await
            .map_err(|e| e.to_string())?
        {
            Response::ProbeAck { instance } => Ok(instance),
            other => Err(format!("unexpected probe reply {other:?}")),
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, ask)
        .await
        .map_err(|_| "no answer".to_string())?
}

/// Appends sealed batches in order; one fsync per group; publishes the durable cursor.
async fn write_groups(
    m: Arc<PsMachine>,
    ps: Arc<super::ProcessState>,
    id: u64,
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
        write_group(&m, &ps, id, group).await?;
    }
    Ok(())
}

/// Why an attempt to write a group stopped short.
enum Failure {
    /// A newer stream from the same agent took over, or the machine moved away (a writer
    /// held back by a full disk can outlive its stream); the agent resends what we did not
    /// cache, to whoever holds the stream now.
    Superseded(&'static str),
    Cache(CacheError),
}

/// One attempt at a group, under the cache lock.
struct Attempt {
    /// What is not durable yet, to try again.
    group: Vec<Sealed>,
    durable: u64,
    cache_bytes: u64,
    pending: u64,
    failure: Option<Failure>,
}

fn attempt(
    m: &PsMachine,
    id: u64,
    c: &mut MachineCache,
    mut group: Vec<Sealed>,
    applied: u64,
) -> Attempt {
    let result = (|| {
        if m.ingest_owner.load(Ordering::SeqCst) != id {
            return Err(Failure::Superseded(
                "superseded by a newer stream from the same agent",
            ));
        }
        if m.draining.load(Ordering::SeqCst) {
            return Err(Failure::Superseded(
                "the machine moved to another process server",
            ));
        }
        if c.is_poisoned() {
            c.recover().map_err(Failure::Cache)?;
        }
        for s in &group {
            c.append(s.first_seq, s.last_seq, &s.payload)
                .map_err(Failure::Cache)?;
        }
        c.sync().map_err(Failure::Cache)
    })();
    let durable = c.durable_last_seq().unwrap_or(0);
    group.retain(|s| s.last_seq > durable);
    Attempt {
        group,
        durable,
        cache_bytes: c.bytes(),
        pending: c.bytes_after(applied),
        failure: result.err(),
    }
}

/// A run of failed attempts at writing the cache, for the log.
struct Trouble {
    since: Instant,
    attempts: u64,
    /// Logged as an error (else at debug level, another having been logged recently).
    loud: bool,
    last_said: Instant,
}

/// Appends a group and makes it durable. While the cache cannot be written, holds on to the
/// group and retries: the stream is not read meanwhile, which holds the agent back.
async fn write_group(
    m: &Arc<PsMachine>,
    ps: &super::ProcessState,
    id: u64,
    mut group: Vec<Sealed>,
) -> Result<(), String> {
    let mut trouble: Option<Trouble> = None;
    let mut backoff = RETRY_MIN;
    loop {
        // Registered before the attempt, so a deletion during it is not missed.
        let freed = ps.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let applied = *m.applied.borrow();
        let m2 = m.clone();
        let a = m
            .with_cache(move |c| Ok(attempt(&m2, id, c, group, applied)))
            .await?;
        m.cache_bytes.store(a.cache_bytes, Ordering::Relaxed);
        m.pending_bytes.store(a.pending, Ordering::Relaxed);
        group = a.group; // what is durable is counted in cache_bytes, no longer in flight
                         // Only on a change: a failed retry is not worth an ack.
        m.durable.send_if_modified(|d| {
            let changed = *d != a.durable;
            *d = a.durable;
            changed
        });
        let e = match a.failure {
            None => {
                if let Some(t) = trouble {
                    let waited_ms = t.since.elapsed().as_millis() as u64;
                    if t.loud {
                        tracing::info!(machine = %m.name, attempts = t.attempts, waited_ms, "cache writable again: taking data from the agent");
                    } else {
                        tracing::debug!(machine = %m.name, attempts = t.attempts, waited_ms, "cache writable again");
                    }
                }
                return Ok(());
            }
            Some(Failure::Superseded(why)) => return Err(why.into()),
            Some(Failure::Cache(e)) => e,
        };
        // Only I/O fails in a way that can pass; anything else is a bug or corruption.
        if !matches!(e, CacheError::Io { .. } | CacheError::Poisoned { .. }) {
            return Err(e.to_string());
        }
        let what = if e.is_disk_full() {
            "cache disk full: holding the agent back until space frees (the agent keeps what is not cached; nothing is lost)"
        } else {
            "cache write failed: holding the agent back and retrying (the agent keeps what is not cached; nothing is lost)"
        };
        match &mut trouble {
            None => {
                let loud = ps.report_write_error();
                // A --cache-size above what the disk holds is the usual cause: show both.
                let disk_bytes = haven_storage::cache::filesystem_bytes(&ps.dir).unwrap_or(0);
                let limit = ps.cache_limit_bytes;
                if loud {
                    tracing::error!(machine = %m.name, error = %e, cache_size = limit, disk_bytes, "{what}");
                } else {
                    tracing::debug!(machine = %m.name, error = %e, cache_size = limit, disk_bytes, "{what}");
                }
                let now = Instant::now();
                trouble = Some(Trouble {
                    since: now,
                    attempts: 1,
                    loud,
                    last_said: now,
                });
            }
            Some(t) => {
                t.attempts += 1;
                if t.last_said.elapsed() >= STILL_FAILING_EVERY {
                    t.last_said = Instant::now();
                    tracing::warn!(
                        machine = %m.name, error = %e, attempts = t.attempts,
                        failing_s = t.since.elapsed().as_secs(),
                        "cache writes still failing; the agent is held back"
                    );
                }
            }
        }
        tokio::select! {
            _ = &mut freed => {}
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}
