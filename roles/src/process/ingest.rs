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

use super::ingest_core::{self, Failure, IngestCore, Next, Say, Verdict, Writer};
use super::{ProcessService, PsMachine};
use crate::error::StreamError;
use crate::proto::{Ack, AgentFrame, Response, ShipFrame, StreamOpen};

/// Largest group of batches committed by one fsync.
const GROUP_BYTES_MAX: usize = 32 << 20;
/// Sealed batches queued between the reader and the writer.
const SEAL_QUEUE: usize = 3;

struct SealedBatch {
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
    svc: &ProcessService,
    conn: quinn::Connection,
    who: Option<PeerIdentity>,
    open: StreamOpen,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), StreamError> {
    let admitted = match admit(svc, who.as_ref(), &open).await {
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
            return Err(StreamError::Refused(reason));
        }
    };
    let ps = svc.state.clone();
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
    .await?;
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

    let (tx, rx) =
        mpsc::channel::<tokio::task::JoinHandle<Result<SealedBatch, StreamError>>>(SEAL_QUEUE);
    let writer = tokio::spawn(write_groups(m.clone(), ps.clone(), id, rx));
    let key = {
        let a = m.assignment.borrow();
        DataKey::from_slice(&a.data_key).map_err(|e| StreamError::local("the data key", e))?
    };
    let mut core = IngestCore::new(cached, applied);
    let result = async {
        loop {
            let Some(bytes) = frame::read_frame(&mut recv, MAX_DATA_FRAME).await? else {
                return Ok(());
            };
            if m.ingest_owner.load(Ordering::SeqCst) != id {
                return Err(StreamError::Superseded(
                    "a newer stream from the same agent took over".into(),
                ));
            }
            let AgentFrame::Batch {
                first_seq,
                last_seq,
                body,
            } = codec::decode(&bytes)
                .map_err(|e| StreamError::Refused(format!("malformed batch frame: {e}")))?;
            match core.handle_batch(first_seq, last_seq, body.len(), MAX_RAW_LEN) {
                Verdict::Take => {}
                Verdict::Skip => continue,
                Verdict::Refuse(reason) => return Err(StreamError::Refused(reason)),
            }
            while ingest_core::holds_back(ps.pending_bytes(), ps.cache_limit_bytes) {
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
                let sealed = seal::seal(&key, &sctx, &body)
                    .map_err(|e| StreamError::local("seal a batch", e))?;
                let payload = codec::encode(&ShipFrame::Sealed {
                    first_seq,
                    last_seq,
                    sealed,
                })
                .map_err(|e| StreamError::local("encode a sealed batch", e))?;
                Ok(SealedBatch {
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
        .map_err(|e| StreamError::local("cache writer", e))?;
    acker.abort();
    result.and(written)
}

async fn admit(
    svc: &ProcessService,
    who: Option<&PeerIdentity>,
    open: &StreamOpen,
) -> Result<Arc<PsMachine>, String> {
    let ps = &svc.state;
    let link = svc.link();
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
    let mut assignments = link.assignments();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let a = loop {
        let current = link
            .assignment(&open.machine)
            .filter(|a| a.process_server == link.name);
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
                open.machine, open.generation.0, link.name
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
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
    };
    // Without cached data, the seq floor comes from the master target: wait for it.
    if m.draining.load(Ordering::SeqCst) {
        return Err(format!(
            "machine {} is draining off process server {}",
            open.machine, link.name
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
    let live = super::lock(&m.live).map_err(|e| e.to_string())?.clone();
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
    *super::lock(&m.live).map_err(|e| e.to_string())? = Some(super::LiveAgent {
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
    mut rx: mpsc::Receiver<tokio::task::JoinHandle<Result<SealedBatch, StreamError>>>,
) -> Result<(), StreamError> {
    let sealed = |r: Result<Result<SealedBatch, StreamError>, tokio::task::JoinError>| {
        r.map_err(|e| StreamError::local("seal task", e))?
    };
    while let Some(job) = rx.recv().await {
        let first = sealed(job.await)?;
        let mut bytes = first.payload.len();
        let mut group = vec![first];
        while bytes < GROUP_BYTES_MAX {
            let Ok(job) = rx.try_recv() else { break };
            let s = sealed(job.await)?;
            bytes += s.payload.len();
            group.push(s);
        }
        write_group(&m, &ps, id, group).await?;
    }
    Ok(())
}

/// Why an attempt to write a group stopped short.
enum Stop {
    /// A newer stream from the same agent took over, or the machine moved away (a writer
    /// held back by a full disk can outlive its stream); the agent resends what we did not
    /// cache, to whoever holds the stream now.
    Superseded(&'static str),
    Cache(CacheError),
}

/// One attempt at a group, under the cache lock.
struct Attempt {
    /// What is not durable yet, to try again.
    group: Vec<SealedBatch>,
    durable: u64,
    cache_bytes: u64,
    pending: u64,
    stop: Option<Stop>,
}

fn attempt(
    m: &PsMachine,
    id: u64,
    c: &mut MachineCache,
    mut group: Vec<SealedBatch>,
    applied: u64,
) -> Attempt {
    let result = (|| {
        if m.ingest_owner.load(Ordering::SeqCst) != id {
            return Err(Stop::Superseded(
                "superseded by a newer stream from the same agent",
            ));
        }
        if m.draining.load(Ordering::SeqCst) {
            return Err(Stop::Superseded(
                "the machine moved to another process server",
            ));
        }
        if c.is_poisoned() {
            c.recover().map_err(Stop::Cache)?;
        }
        for s in &group {
            c.append(s.first_seq, s.last_seq, &s.payload)
                .map_err(Stop::Cache)?;
        }
        c.sync().map_err(Stop::Cache)
    })();
    let durable = c.durable_last_seq().unwrap_or(0);
    group.retain(|s| s.last_seq > durable);
    Attempt {
        group,
        durable,
        cache_bytes: c.bytes(),
        pending: c.bytes_after(applied),
        stop: result.err(),
    }
}

/// Which failures of the cache can pass: I/O (a full disk, above all), and a cache poisoned
/// by a failed fsync (recovered on the next attempt). Anything else is corruption or a bug.
fn failure(e: &CacheError) -> Failure {
    match e {
        CacheError::Io { .. } | CacheError::Poisoned { .. } => Failure::Transient {
            disk_full: e.is_disk_full(),
        },
        _ => Failure::Fatal,
    }
}

/// Appends a group and makes it durable. While the cache cannot be written, holds on to the
/// group and retries: the stream is not read meanwhile, which holds the agent back.
async fn write_group(
    m: &Arc<PsMachine>,
    ps: &super::ProcessState,
    id: u64,
    mut group: Vec<SealedBatch>,
) -> Result<(), StreamError> {
    let mut writer = Writer::default();
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
        let e = match a.stop {
            None => {
                if let Some(said) = writer.handle_success(Instant::now()) {
                    say(m, ps, &said, None);
                }
                return Ok(());
            }
            Some(Stop::Superseded(why)) => return Err(StreamError::Superseded(why.into())),
            Some(Stop::Cache(e)) => e,
        };
        let f = failure(&e);
        // The process server's once-a-minute error slot is asked for on a run's first
        // failure only.
        let loud_allowed = !writer.in_trouble()
            && matches!(f, Failure::Transient { .. })
            && ps.report_write_error();
        let (said, next) = writer.handle_failure(Instant::now(), f, loud_allowed);
        if let Some(said) = said {
            say(m, ps, &said, Some(&e));
        }
        match next {
            Next::End => return Err(e.into()),
            Next::RetryAfter(delay) => {
                tokio::select! {
                    _ = &mut freed => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Logs what the writer says about its trouble.
fn say(m: &PsMachine, ps: &super::ProcessState, said: &Say, e: Option<&CacheError>) {
    let error = e.map(|e| e.to_string()).unwrap_or_default();
    match *said {
        Say::Failing { loud, disk_full } => {
            let what = if disk_full {
                "cache disk full: holding the agent back until space frees (the agent keeps what is not cached; nothing is lost)"
            } else {
                "cache write failed: holding the agent back and retrying (the agent keeps what is not cached; nothing is lost)"
            };
            // A --cache-size above what the disk holds is the usual cause: show both.
            let disk_bytes = haven_storage::cache::filesystem_bytes(&ps.dir).unwrap_or(0);
            let limit = ps.cache_limit_bytes;
            if loud {
                tracing::error!(machine = %m.name, %error, cache_size = limit, disk_bytes, "{what}");
            } else {
                tracing::debug!(machine = %m.name, %error, cache_size = limit, disk_bytes, "{what}");
            }
        }
        Say::StillFailing {
            attempts,
            failing_s,
        } => tracing::warn!(
            machine = %m.name, %error, attempts, failing_s,
            "cache writes still failing; the agent is held back"
        ),
        Say::Recovered {
            loud,
            attempts,
            waited_ms,
        } => {
            if loud {
                tracing::info!(machine = %m.name, attempts, waited_ms, "cache writable again: taking data from the agent");
            } else {
                tracing::debug!(machine = %m.name, attempts, waited_ms, "cache writable again");
            }
        }
    }
}
