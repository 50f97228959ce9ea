//! `replica/<machine>`: the one owner of a machine's replica at the master target, a task
//! supervised under `master-target`. It holds the [`Replica`] (images, undo log, cursor) and
//! the [`ApplyCore`], and is fed by a bounded mailbox: the ship-stream drivers send it opened
//! batches and it answers through a `watch` of the applied seq (acks, to every stream) and a
//! per-stream end notice. Blocking I/O runs in the blocking pool with the replica moved in
//! and out, so nothing shares it.
//!
//! ```text
//!  ship stream driver ─┐ Open{generation, epoch} ─▶ ┌──────────────────────────┐
//!  ship stream driver ─┤ Batch{stream, opened}   ─▶ │ replica/<m>: ApplyCore    │─▶ images, undo, cursor
//!                      └ Closed{stream}          ─▶ │ + Replica (blocking pool) │
//!       ◀── applied (watch, all streams) ── End{stream} (oneshot) ──┘
//! ```
//!
//! A restart (a panic half-way through a batch, a replica broken by a failed rollback) reopens
//! the replica from disk, which rolls a torn batch back; the streams end and the process
//! servers reconnect from the durable cursor.
use std::{collections::HashMap, path::PathBuf};

use haven_actors::TaskError;
use haven_cluster::DiskInfo;
use tokio::sync::{mpsc, oneshot, watch};

use super::core::{ApplyCore, Effect, Outcome, StreamId};
use super::replica::{self, ApplyError, Replica};
use crate::faults::{self, Fault, Side};
use crate::proto::BatchBody;

/// Batches a replica owner's mailbox holds at most: a stream driver waits beyond that (its
/// process server is then held back by QUIC flow control).
pub const MAILBOX: usize = 8;
/// Opens and closes queued at most (they are served before batches, so a stream of a new
/// process server is admitted without waiting behind another's batches).
const CONTROL: usize = 16;

/// Where ship-stream drivers send to a replica owner: stream control goes ahead of batches.
#[derive(Clone)]
pub struct Mailbox {
    control: mpsc::Sender<Msg>,
    batches: mpsc::Sender<Msg>,
}

/// The owner's end of its [`Mailbox`].
pub struct Inbox {
    control: mpsc::Receiver<Msg>,
    batches: mpsc::Receiver<Msg>,
}

/// A closed mailbox: its owner stopped.
#[derive(Debug)]
pub struct Closed;

pub fn mailbox() -> (Mailbox, Inbox) {
    let (ct, cr) = mpsc::channel(CONTROL);
    let (bt, br) = mpsc::channel(MAILBOX);
    (
        Mailbox {
            control: ct,
            batches: bt,
        },
        Inbox {
            control: cr,
            batches: br,
        },
    )
}

impl Mailbox {
    pub async fn send(&self, msg: Msg) -> Result<(), Closed> {
        let to = match msg {
            Msg::Batch { .. } => &self.batches,
            _ => &self.control,
        };
        to.send(msg).await.map_err(|_| Closed)
    }

    pub fn is_closed(&self) -> bool {
        self.control.is_closed()
    }
}

impl Inbox {
    async fn recv(&mut self) -> Option<Msg> {
        tokio::select! {
            biased;
            Some(m) = self.control.recv() => Some(m),
            Some(m) = self.batches.recv() => Some(m),
            else => None,
        }
    }

    fn try_recv(&mut self) -> Option<Msg> {
        self.control
            .try_recv()
            .ok()
            .or_else(|| self.batches.try_recv().ok())
    }
}
/// Most batches applied before one commit (fsync).
const GROUP_MAX: usize = 16;

/// A batch opened by a stream driver (authenticated, decrypted, decoded).
pub struct Opened {
    pub first_seq: u64,
    pub last_seq: u64,
    pub body: BatchBody,
    pub raw_len: u64,
}

pub enum Msg {
    Open {
        generation: u64,
        epoch: u32,
        disks: Vec<DiskInfo>,
        reply: oneshot::Sender<Result<Admitted, String>>,
    },
    /// A batch of an admitted stream; `Err` when it failed authentication or decoding (a
    /// refusal of the stream, after the valid batches before it).
    Batch {
        stream: StreamId,
        batch: Result<Opened, String>,
    },
    Closed {
        stream: StreamId,
    },
    /// A recovery command's question (see `recovery.rs`). `disks` are the machine's (from
    /// its assignment), to open the replica when no stream has.
    Recovery {
        ask: Ask,
        disks: Vec<DiskInfo>,
        reply: oneshot::Sender<Result<Answer, String>>,
    },
}

/// What a recovery command asks the replica's owner.
#[derive(Debug)]
pub enum Ask {
    /// The points held and the journal's figures.
    Catalogue,
    /// A view pinned at the point `--point` names.
    View(crate::proto::PointSpec),
    /// Fence (true) or unfence the forward stream: once answered, no batch is applied until
    /// unfenced (failover; see `failover.rs`). Persisted at `fence_path` first.
    Fence(bool),
    /// Failback: make the replica equal to these recovery disks (see
    /// [`Replica::rewrite_to`]), under `generation`.
    Materialise {
        generation: u64,
        disks: Vec<std::sync::Arc<super::drill::CowDisk>>,
    },
}

pub enum Answer {
    Catalogue(Catalogue),
    View(Picked),
    Fenced(bool),
    Materialised(crate::proto::Materialised),
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Catalogue(c) => write!(f, "Catalogue({} points)", c.points.len()),
            Answer::View(p) => write!(f, "View({})", p.point.seq),
            Answer::Fenced(on) => write!(f, "Fenced({on})"),
            Answer::Materialised(m) => write!(f, "Materialised({m:?})"),
        }
    }
}

/// A replica's points (oldest first) and its journal.
#[derive(Clone, Debug, Default)]
pub struct Catalogue {
    pub points: Vec<replica::RecoveryPoint>,
    pub retention_ms: u64,
    pub journal_bytes: u64,
    pub journal_cap_bytes: u64,
    pub cap_reached: bool,
    pub applied_seq: u64,
}

/// A view at a point, and what it is of.
pub struct Picked {
    pub point: replica::RecoveryPoint,
    pub view: std::sync::Arc<dyn super::drill::DiskView>,
    pub disks: Vec<String>,
    pub epoch: u32,
}

/// Asks the owner behind `mailbox`.
pub async fn ask(mailbox: &Mailbox, ask: Ask, disks: Vec<DiskInfo>) -> Result<Answer, String> {
    let (tx, rx) = oneshot::channel();
    mailbox
        .send(Msg::Recovery {
            ask,
            disks,
            reply: tx,
        })
        .await
        .map_err(|_| "the replica's owner stopped".to_string())?;
    rx.await
        .map_err(|_| "the replica's owner stopped before answering".to_string())?
}

impl super::drill::DiskView for replica::ReplicaView {
    fn size(&self, disk: u16) -> std::io::Result<u64> {
        replica::ReplicaView::size(self, disk).map_err(std::io::Error::other)
    }

    fn read_at(&self, disk: u16, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let n = self
            .read(disk, offset, buf)
            .map_err(std::io::Error::other)?;
        // Past the end of the disk at the point (the export is its size): zeros.
        buf[n..].fill(0);
        Ok(())
    }

    fn changed(&self, disk: u16) -> std::io::Result<Option<Vec<(u64, u64)>>> {
        replica::ReplicaView::changed(self, disk).map_err(std::io::Error::other)
    }
}

/// Why the owner ended a stream.
#[derive(Debug)]
pub enum End {
    /// A batch was refused (bad frame, gap, stale generation): reset with code 1.
    Refused(String),
    /// The replica failed a write and rolled back; the stream reconnects from the cursor.
    Failed(String),
    /// `apply-reset` (debug fault injection): a peer reset.
    Reset,
}

/// A stream's admission.
pub struct Admitted {
    pub stream: StreamId,
    pub applied: watch::Receiver<u64>,
    pub ended: oneshot::Receiver<End>,
}

/// What a replica owner reports (for the node's poll).
#[derive(Clone, Debug, Default)]
pub struct ReplicaStats {
    pub applied_seq: u64,
    pub epoch: u32,
    pub bytes_applied: u64,
    pub batches_refused: u64,
    /// Why a batch was refused, until a later batch is applied.
    pub refusal: Option<String>,
    /// Set while the recovery-point journal's cap shortens history below the retention
    /// window (the last prune's finding).
    pub history_warning: Option<String>,
    /// The recovery points held (refreshed after every commit).
    pub points: Option<crate::proto::PointsReport>,
}

struct StreamState {
    ended: oneshot::Sender<End>,
    /// Debug fault injection fires once per stream, on its first batch of two or more writes.
    fault_checked: bool,
}

pub struct Owner {
    machine: String,
    replicas_dir: PathBuf,
    core: ApplyCore,
    replica: Option<Replica>,
    disks: Vec<DiskInfo>,
    streams: HashMap<StreamId, StreamState>,
    applied: watch::Sender<u64>,
    stats: watch::Sender<ReplicaStats>,
    /// Applied seq when the current refusal happened.
    refusal_at: u64,
    /// The machine's policy, from its assignment (None: the defaults).
    policy: PolicySource,
    /// Failed over: the forward stream is refused whole (see [`Ask::Fence`]).
    fenced: bool,
    fence_path: PathBuf,
}

/// Where an owner reads its machine's recovery-point policy.
pub type PolicySource =
    std::sync::Arc<dyn Fn() -> Option<haven_cluster::ProtectPolicy> + Send + Sync>;

impl Owner {
    pub fn new(
        machine: String,
        replicas_dir: PathBuf,
        stats: watch::Sender<ReplicaStats>,
        policy: PolicySource,
    ) -> Self {
        let applied = stats.borrow().applied_seq;
        let fence_path = super::failover::fence_path(&replicas_dir, &machine);
        let fenced = fence_path.exists();
        if fenced {
            tracing::info!(%machine, "the forward stream is fenced (the machine is failed over)");
        }
        Self {
            fenced,
            fence_path,
            machine,
            replicas_dir,
            core: ApplyCore::new(),
            replica: None,
            disks: vec![],
            streams: HashMap::new(),
            applied: watch::Sender::new(applied),
            stats,
            refusal_at: 0,
            policy,
        }
    }

    /// Serves the mailbox until every sender is gone.
    pub async fn run(mut self, mut rx: Inbox) -> Result<(), TaskError> {
        while let Some(msg) = rx.recv().await {
            let mut group = vec![];
            self.handle(msg, &mut group).await?;
            // Everything already queued joins this commit (group fsync).
            while group.len() < GROUP_MAX {
                let Some(msg) = rx.try_recv() else { break };
                self.handle(msg, &mut group).await?;
            }
            self.apply_group(group).await?;
        }
        Ok(())
    }

    async fn handle(
        &mut self,
        msg: Msg,
        group: &mut Vec<(StreamId, Opened)>,
    ) -> Result<(), TaskError> {
        match msg {
            Msg::Open {
                generation,
                epoch,
                disks,
                reply,
            } => {
                // Admission is decided with the batches queued before it applied.
                let queued = std::mem::take(group);
                self.apply_group(queued).await?;
                if self.fenced {
                    let _ = reply.send(Err(self.fence_reason()));
                    return Ok(());
                }
                let admitted = self.open(generation, epoch, disks).await?;
                let _ = reply.send(admitted);
            }
            Msg::Batch { stream, .. } if self.fenced => {
                // Admitted before the fence: nothing of it is applied after.
                let reason = self.fence_reason();
                self.stats.send_modify(|s| {
                    s.batches_refused += 1;
                    s.refusal = Some(reason.clone());
                });
                self.end(stream, End::Refused(reason));
            }
            Msg::Batch { stream, batch } => {
                let refused = batch.as_ref().err().cloned();
                for e in self.core.handle_batch(stream, refused) {
                    match e {
                        Effect::Apply { .. } => {
                            if let Ok(b) = batch {
                                group.push((stream, b));
                            }
                            break;
                        }
                        Effect::Drop { .. } => {}
                        other => debug_assert!(false, "unexpected effect {other:?}"),
                    }
                }
            }
            Msg::Closed { stream } => {
                self.core.handle_stream_closed(stream);
                self.streams.remove(&stream);
            }
            Msg::Recovery { ask, disks, reply } => {
                // Asked between batches: what was queued before it is applied first.
                let queued = std::mem::take(group);
                self.apply_group(queued).await?;
                let answer = self.answer(ask, disks).await?;
                let _ = reply.send(answer);
            }
        }
        Ok(())
    }

    async fn open(
        &mut self,
        generation: u64,
        epoch: u32,
        disks: Vec<DiskInfo>,
    ) -> Result<Result<Admitted, String>, TaskError> {
        for _ in 0..2 {
            for e in self.core.handle_open(generation, epoch) {
                match e {
                    Effect::OpenReplica { epoch } => {
                        if let Err(reason) = self.open_replica(epoch, &disks).await? {
                            return Ok(Err(reason));
                        }
                    }
                    Effect::Admit { stream, applied } => {
                        let (tx, ended) = oneshot::channel();
                        self.streams.insert(
                            stream,
                            StreamState {
                                ended: tx,
                                fault_checked: false,
                            },
                        );
                        debug_assert_eq!(applied, *self.applied.borrow());
                        return Ok(Ok(Admitted {
                            stream,
                            applied: self.applied.subscribe(),
                            ended,
                        }));
                    }
                    Effect::RefuseOpen { reason } => return Ok(Err(reason)),
                    Effect::EndStream { stream, reason, .. } => {
                        self.end(stream, End::Failed(reason))
                    }
                    other => debug_assert!(false, "unexpected effect {other:?}"),
                }
            }
        }
        Ok(Err("the replica could not be opened".into()))
    }

    /// Answers a recovery question. The replica is opened at its stored epoch when no stream
    /// has opened it (the source may be gone: that is when recovery matters).
    async fn answer(
        &mut self,
        ask: Ask,
        disks: Vec<DiskInfo>,
    ) -> Result<Result<Answer, String>, TaskError> {
        if let Ask::Fence(on) = ask {
            return Ok(self.fence(on).map(Answer::Fenced));
        }
        if self.replica.is_none() {
            let dir = self.replicas_dir.join(&self.machine);
            let stored = match replica::stored_epoch(&dir) {
                Ok(Some(e)) => e,
                Ok(None) => return Ok(Err(format!("{} has no replica here yet", self.machine))),
                Err(e) => return Ok(Err(e.to_string())),
            };
            if let Err(reason) = self.open_replica(stored, &disks).await? {
                return Ok(Err(reason));
            }
        }
        if let Ask::Materialise { generation, disks } = ask {
            return self.materialise(generation, disks).await;
        }
        let Some(r) = self.replica.as_ref() else {
            return Ok(Err("the replica could not be opened".into()));
        };
        let points = r.points();
        Ok(match ask {
            Ask::Catalogue => {
                let stats = r.journal_stats();
                let policy = self.policy(r);
                Ok(Answer::Catalogue(Catalogue {
                    points,
                    retention_ms: policy.retention_ms,
                    journal_bytes: stats.bytes,
                    journal_cap_bytes: policy.cap_bytes,
                    cap_reached: stats.cap_shortened_since_ms.is_some(),
                    applied_seq: r.applied_seq(),
                }))
            }
            Ask::View(spec) => super::recovery::resolve(&points, &spec).and_then(|i| {
                let point = points[i].clone();
                let view = r.view(point.seq).map_err(|e| e.to_string())?;
                Ok(Answer::View(Picked {
                    point,
                    view: std::sync::Arc::new(view),
                    disks: self.disks.iter().map(|d| d.name.clone()).collect(),
                    epoch: r.epoch(),
                }))
            }),
            Ask::Fence(_) | Ask::Materialise { .. } => unreachable!("answered above"),
        })
    }

    /// Failback: the replica is made equal to the recovery disks in the blocking pool, and
    /// the cursors follow (applied seq, the new generation that fences every older one).
    async fn materialise(
        &mut self,
        generation: u64,
        disks: Vec<std::sync::Arc<super::drill::CowDisk>>,
    ) -> Result<Result<Answer, String>, TaskError> {
        let Some(mut replica) = self.replica.take() else {
            return Ok(Err("the replica could not be opened".into()));
        };
        let sizes: Vec<u64> = disks.iter().map(|d| d.size()).collect();
        let (replica, result) = tokio::task::spawn_blocking(move || {
            let now_ms = crate::fsutil::unix_ms();
            let read = |disk: u16, offset: u64, buf: &mut [u8]| match disks.get(disk as usize) {
                Some(d) => d.read_at(offset, buf),
                None => Err(std::io::Error::other(format!("no recovery disk #{disk}"))),
            };
            // Only where either side changed since the point (untracked: all of the disk).
            let ranges: Result<Vec<_>, _> = disks
                .iter()
                .map(|d| {
                    d.differs_from_replica()
                        .map(|r| r.unwrap_or_else(|| vec![(0, d.size())]))
                })
                .collect();
            let r = match ranges {
                Ok(ranges) => {
                    replica.rewrite_to(generation, &sizes, &ranges, &read, now_ms, "failback")
                }
                Err(e) => Err(replica::ApplyError::Io(format!(
                    "the changes since the point: {e}"
                ))),
            };
            (replica, r)
        })
        .await
        .map_err(TaskError::retry)?;
        let applied = replica.applied_seq();
        self.core
            .handle_opened(replica.epoch(), applied, replica.generation());
        self.applied.send_replace(applied);
        self.stats.send_modify(|s| s.applied_seq = applied);
        // A replica that failed a write it could not undo is opened again next time.
        if !replica.is_broken() {
            self.replica = Some(replica);
        }
        Ok(match result {
            Ok((bytes_compared, bytes_written)) => {
                tracing::info!(machine = %self.machine, applied_seq = applied, bytes_compared, bytes_written, generation, "failback: the replica equals the recovery disks");
                Ok(Answer::Materialised(crate::proto::Materialised {
                    generation,
                    applied_seq: applied,
                    bytes_compared,
                    bytes_written,
                }))
            }
            Err(e) => Err(format!("make the replica equal to the recovery disks: {e}")),
        })
    }

    fn fence_reason(&self) -> String {
        format!(
            "{} is failed over: the forward stream is fenced (no batch of it is applied until the failover is cancelled)",
            self.machine
        )
    }

    /// Persists the fence (or its removal) before acting on it: a restarted owner refuses
    /// the stream as this one did.
    fn fence(&mut self, on: bool) -> Result<bool, String> {
        let path = &self.fence_path;
        let dir = path.parent().expect("the fence lives in a directory");
        let done = if on {
            crate::fsutil::create_private_dir(dir)
                .and_then(|()| crate::fsutil::write_atomic(path, b"fenced\n"))
        } else {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                Err(_) => Ok(()),
                Ok(()) => crate::fsutil::sync_dir(dir),
            }
        };
        done.map_err(|e| {
            format!(
                "{} the fence at {}: {e}",
                if on { "write" } else { "remove" },
                path.display()
            )
        })?;
        if on && !self.fenced {
            let reason = self.fence_reason();
            for stream in self.streams.keys().copied().collect::<Vec<_>>() {
                self.end(stream, End::Refused(reason.clone()));
            }
            tracing::info!(machine = %self.machine, applied_seq = *self.applied.borrow(), "forward stream fenced");
        } else if !on && self.fenced {
            tracing::info!(machine = %self.machine, "forward stream unfenced: replication resumes");
        }
        self.fenced = on;
        Ok(on)
    }

    /// What the node reports of the replica's history.
    fn points_report(&self, r: &Replica) -> crate::proto::PointsReport {
        let st = r.journal_stats();
        let policy = self.policy(r);
        crate::proto::PointsReport {
            count: st.points as u64,
            oldest_ms: st.oldest_point_ms,
            latest_ms: st.newest_point_ms,
            latest: st.newest_point_seq.map(|s| s.to_string()),
            retention_ms: policy.retention_ms,
            journal_bytes: st.bytes,
            journal_cap_bytes: policy.cap_bytes,
            cap_reached: st.cap_shortened_since_ms.is_some(),
            test_failover: None,
        }
    }

    /// The machine's recovery-point policy (`ctl protect --retention --journal-size`).
    fn policy(&self, r: &Replica) -> replica::RetentionPolicy {
        let total: u64 = r.sizes().iter().fold(0u64, |a, s| a.saturating_add(*s));
        match (self.policy)() {
            Some(p) => replica::RetentionPolicy {
                retention_ms: p.retention_ms(),
                cap_bytes: p.journal_cap_bytes(total),
            },
            None => r.default_policy(),
        }
    }

    /// Opens (creating or resetting) the replica for `epoch`. `Ok(Err)` refuses the stream.
    async fn open_replica(
        &mut self,
        epoch: u32,
        disks: &[DiskInfo],
    ) -> Result<Result<(), String>, TaskError> {
        self.replica = None;
        let (dir, machine, d) = (
            self.replicas_dir.clone(),
            self.machine.clone(),
            disks.to_vec(),
        );
        let opened = tokio::task::spawn_blocking(move || Replica::open(&dir, &machine, epoch, &d))
            .await
            .map_err(TaskError::retry)?;
        match opened {
            Ok(r) => {
                self.core
                    .handle_opened(r.epoch(), r.applied_seq(), r.generation());
                self.applied.send_replace(r.applied_seq());
                self.stats.send_modify(|s| {
                    s.applied_seq = r.applied_seq();
                    s.epoch = r.epoch();
                });
                self.disks = disks.to_vec();
                self.replica = Some(r);
                Ok(Ok(()))
            }
            Err(e @ ApplyError::StaleEpoch { .. }) => Ok(Err(e.to_string())),
            Err(e) => Err(TaskError::retry(format!(
                "open replica of {}: {e}",
                self.machine
            ))),
        }
    }

    /// Applies a group of batches in order, commits once, acks and ends refused streams.
    async fn apply_group(&mut self, mut group: Vec<(StreamId, Opened)>) -> Result<(), TaskError> {
        if group.is_empty() && self.core.handle_group_end().is_empty() {
            return Ok(());
        }
        // Debug fault injection: once per stream, on its first batch of two or more writes.
        let mut fault = None;
        for (stream, b) in &group {
            let s = self.streams.get_mut(stream);
            if let Some(s) = s.filter(|s| !s.fault_checked && b.body.records.len() >= 2) {
                s.fault_checked = true;
                if let Some(f) = faults::next(&self.machine, Side::Apply) {
                    fault = Some((*stream, f));
                    break;
                }
            }
        }
        if let Some((stream, Fault::ApplyReset)) = fault {
            faults::fire(&self.machine, Fault::ApplyReset);
            self.end(stream, End::Reset);
            self.core.handle_stream_closed(stream);
            group.retain(|(s, _)| *s != stream);
            fault = None;
        }
        let Some(mut replica) = self.replica.take() else {
            return Ok(());
        };
        let machine = self.machine.clone();
        let stream_gens = self.stream_generations(&group);
        let policy = self.policy(&replica);
        let result = tokio::task::spawn_blocking(move || {
            // The journal's clock: injected here, the driver (the core never reads a clock).
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let mut outcomes = Vec::with_capacity(group.len());
            let mut failed = None;
            let mut bytes = 0u64;
            for ((stream, o), generation) in group.iter().zip(&stream_gens) {
                if let Some((_, f)) = fault.filter(|(fs, _)| fs == stream) {
                    faults::fire(&machine, f);
                    let half = replica.write_half_for_fault(o.first_seq, o.last_seq, &o.body, now_ms);
                    if half.is_ok() && f == Fault::ApplyAbort {
                        std::process::abort();
                    }
                    panic!(
                        "{}: apply-panic half-way through a batch of {machine}",
                        faults::ENV
                    );
                }
                match replica.apply(*generation, o.first_seq, o.last_seq, &o.body, now_ms) {
                    Ok(replica::Applied::Applied) => {
                        bytes += o.raw_len;
                        outcomes.push((*stream, Outcome::Applied));
                    }
                    Ok(replica::Applied::Duplicate) => outcomes.push((*stream, Outcome::Duplicate)),
                    Err(e @ ApplyError::Io(_)) => {
                        failed = Some(e);
                        break;
                    }
                    Err(e @ ApplyError::Invalid(_)) => {
                        outcomes.push((*stream, Outcome::Refused(e.to_string())))
                    }
                    Err(e) => outcomes.push((*stream, Outcome::Rejected(e.to_string()))),
                }
            }
            // Make what was applied before a failure durable, so the cursor stays truthful.
            let committed = replica.commit();
            // History beyond the window or the cap goes; the cap cutting into the window
            // is an event, never silent.
            let pruned = committed
                .is_ok()
                .then(|| replica.prune(now_ms, &policy));
            let history = match pruned {
                Some(Ok(r)) if r.cap_reached => {
                    let msg = format!(
                        "recovery-point journal at its cap ({} bytes): history holds {} s, less than the retention window{}",
                        r.bytes,
                        r.held_ms / 1000,
                        r.pinned_by.map_or(String::new(), |p| format!("; a view pins point {p}"))
                    );
                    tracing::warn!(%machine, dropped_points = r.dropped_points, "{msg}");
                    Some(Some(msg))
                }
                Some(Ok(_)) => Some(None),
                Some(Err(e)) => {
                    tracing::warn!(%machine, "pruning the recovery-point journal: {e}");
                    None
                }
                None => None,
            };
            (replica, outcomes, failed, committed, bytes, history)
        })
        .await;
        let (replica, outcomes, failed, committed, bytes, history) = match result {
            Ok(r) => r,
            // A panic half-way through a batch: the replica in memory is torn; restarting
            // reopens it from disk, which rolls the batch back.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => return Err(TaskError::retry(e)),
        };
        if replica.is_broken() {
            return Err(TaskError::retry(format!(
                "replica of {} failed a write it could not undo",
                self.machine
            )));
        }
        for (stream, outcome) in outcomes {
            self.core.handle_applied(stream, outcome);
        }
        let points = self.points_report(&replica);
        self.stats.send_modify(|s| {
            s.bytes_applied += bytes;
            if let Some(h) = history {
                s.history_warning = h;
            }
            s.points = Some(points);
        });
        self.replica = Some(replica);
        if let Some(e) = failed {
            // Rolled back to the durable cursor: every stream resends from there.
            self.core.handle_rolled_back();
            let streams: Vec<StreamId> = self.streams.keys().copied().collect();
            for s in streams {
                self.core.handle_stream_closed(s);
                self.end(s, End::Failed(e.to_string()));
            }
        }
        let applied = match committed {
            Ok(seq) => seq,
            Err(e) => {
                return Err(TaskError::retry(format!(
                    "commit replica of {}: {e}",
                    self.machine
                )))
            }
        };
        self.core.handle_group_end();
        for e in self.core.handle_committed(applied) {
            match e {
                Effect::Ack { applied } => {
                    self.applied.send_replace(applied);
                    self.stats.send_modify(|s| {
                        s.applied_seq = applied;
                        if s.refusal.is_some() && applied > self.refusal_at {
                            s.refusal = None;
                        }
                    });
                }
                Effect::EndStream {
                    stream,
                    reason,
                    refused: true,
                } => {
                    tracing::error!(machine = %self.machine, "batch refused: {reason}; nothing from it was applied");
                    self.refusal_at = applied;
                    self.stats.send_modify(|s| {
                        s.batches_refused += 1;
                        s.refusal = Some(reason.clone());
                    });
                    self.end(stream, End::Refused(reason));
                }
                Effect::EndStream { stream, reason, .. } => self.end(stream, End::Failed(reason)),
                other => debug_assert!(false, "unexpected effect {other:?}"),
            }
        }
        Ok(())
    }

    fn stream_generations(&self, group: &[(StreamId, Opened)]) -> Vec<u64> {
        group
            .iter()
            .map(|(s, _)| self.core.stream_generation(*s).unwrap_or(0))
            .collect()
    }

    fn end(&mut self, stream: StreamId, why: End) {
        if let Some(s) = self.streams.remove(&stream) {
            let _ = s.ended.send(why);
        }
    }
}
