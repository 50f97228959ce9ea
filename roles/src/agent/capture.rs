//! Where an agent's writes come from: the seam between capture and the replication stream.
//!
//! A [`CaptureSource`] runs as the agent's `capture` child. It writes what it captures into
//! a [`CaptureSink`], which numbers the writes (one seq per write, all disks of the machine in
//! one sequence), retains them until the master target has applied them (waiting for room:
//! back-pressure), and completes sync barriers. [`ScanCapture`] is the implementation for any
//! file or block device: passes that hash every block against the replica's table and send
//! what changed, after checking each disk's identity and size (see [`super::disks`]). The NBD
//! tap will be another.
//!
//! ```text
//!  CaptureSource::run ──ready()──▶ (protected, seq floor known) ──emit(writes)──▶ AgentCore
//!         │  barrier() / barrier_captured(id)                          numbered, retained
//!         └──────────────────────────────────────────────── stream ──▶ process server
//! ```
use std::{
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use futures::future::BoxFuture;
use haven_actors::TaskError;
use haven_transport::codec;
use serde::Serialize;
use tokio::sync::mpsc;

use super::core;
use super::disks::{self, Verdict};
use super::scan;
use super::state::{lock, Agent, AgentError};
use crate::{
    fsutil::unix_ms,
    proto::{BatchBody, MarkDone, PointKind, PointMark, WriteRecord},
};

/// Raw bytes per batch a scan emits.
const BATCH_BYTES: u64 = 4 << 20;

/// One captured write (a run of changed blocks, for a scan): `updates` are the new hashes of
/// the blocks it covers, folded into the agent's table of the replica once applied (a source
/// without block hashes leaves it empty).
pub struct Write {
    pub disk: u16,
    pub offset: u64,
    pub data: Vec<u8>,
    pub updates: Vec<core::HashUpdate>,
}

impl Write {
    /// A record that writes nothing: the seq a recovery point owns.
    pub fn marker() -> Self {
        Write {
            disk: 0,
            offset: 0,
            data: Vec::new(),
            updates: Vec::new(),
        }
    }
}

/// A recovery point in a batch: the state after the write at `index` (a [`Write::marker`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Point {
    pub index: usize,
    pub kind: PointKind,
    pub name: Option<String>,
    pub time_ms: u64,
}

/// A source of a machine's writes.
pub trait CaptureSource: Send + Sync + 'static {
    /// For logs: `scan`, `tap`, ….
    fn name(&self) -> &'static str;

    /// Whether the source makes recovery points on request (`ctl mark`, app-consistent
    /// points: see [`CaptureSink::next_mark`]). A source that does not has them refused.
    fn takes_marks(&self) -> bool {
        false
    }

    /// Captures into `sink` until it fails; it does not return while the agent runs. An
    /// error restarts it (under the agent's supervisor), so it must rebuild what it needs
    /// from the sink and its own durable state.
    fn run(self: Arc<Self>, sink: CaptureSink) -> BoxFuture<'static, Result<(), TaskError>>;
}

/// Why [`CaptureSink::emit`] did not number a batch.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// The protection changed (a new epoch) since the capture started: what it captured
    /// belongs to the old one. Start over from [`CaptureSink::ready`].
    #[error("the protection was reset")]
    Reset,
    #[error(transparent)]
    Encode(#[from] codec::CodecError),
}

/// What a capture source writes into: the agent's numbering and retention.
#[derive(Clone)]
pub struct CaptureSink {
    pub(super) agent: Arc<Agent>,
}

impl CaptureSink {
    /// The machine's disks: names and paths, in `--disk` order (a write's `disk` indexes it).
    pub fn disks(&self) -> Vec<(String, PathBuf)> {
        self.agent.opts.disks.clone()
    }

    /// Waits until the machine is protected and seqs can be assigned. Returns the protection
    /// generation to pass to [`emit`](Self::emit).
    pub async fn ready(&self) -> u64 {
        let a = &self.agent;
        let mut control = a.control.subscribe();
        loop {
            let protected = control.borrow_and_update().protected;
            if protected && lock(&a.core).seq_ready() {
                return *a.reset.borrow();
            }
            tokio::select! {
                _ = control.changed() => {}
                _ = a.floor_known.notified() => {}
            }
        }
    }

    /// Whether `generation` is still the current protection.
    pub fn current(&self, generation: u64) -> bool {
        *self.agent.reset.borrow() == generation
    }

    /// Numbers and retains one batch of writes, waiting (bounded polls) for room in the
    /// retention buffer.
    pub async fn emit(&self, writes: Vec<Write>, generation: u64) -> Result<(), EmitError> {
        let a = &self.agent;
        let raw: u64 = writes.iter().map(|e| e.data.len() as u64).sum();
        loop {
            if !self.current(generation) {
                return Err(EmitError::Reset);
            }
            if lock(&a.core).has_room(raw) {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), a.room.notified()).await;
        }
        self.number(writes, Vec::new(), generation)
    }

    /// Numbers and retains one batch of writes (and the recovery points among them) if the
    /// retention buffer has room now (taking them out of the vectors); `Ok(false)` if it has
    /// not (nothing was taken). For a
    /// source that must not wait (the tap holds its writers while it decides).
    pub fn try_emit(
        &self,
        writes: &mut Vec<Write>,
        points: &mut Vec<Point>,
        generation: u64,
    ) -> Result<bool, EmitError> {
        if !self.current(generation) {
            return Err(EmitError::Reset);
        }
        let raw: u64 = writes.iter().map(|e| e.data.len() as u64).sum();
        if !lock(&self.agent.core).has_room(raw) {
            return Ok(false);
        }
        self.number(std::mem::take(writes), std::mem::take(points), generation)?;
        Ok(true)
    }

    /// Marks a recovery point after everything emitted so far (a marker batch), waiting for
    /// room like [`emit`](Self::emit).
    pub async fn emit_point(
        &self,
        kind: PointKind,
        name: Option<String>,
        generation: u64,
    ) -> Result<(), EmitError> {
        let mut writes = vec![Write::marker()];
        let mut points = vec![Point {
            index: 0,
            kind,
            name,
            time_ms: unix_ms(),
        }];
        while !self.try_emit(&mut writes, &mut points, generation)? {
            self.room(Duration::from_millis(500)).await;
        }
        Ok(())
    }

    /// Waits (at most `timeout`) until the retention buffer may have room again.
    pub async fn room(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.agent.room.notified()).await;
    }

    /// Numbers `writes` under the core lock. The generation is checked under it too: a reset
    /// (a new epoch, a failback's rebase) renews the core and bumps the generation under the
    /// same lock, so nothing captured for the old core is numbered by the new one.
    fn number(
        &self,
        writes: Vec<Write>,
        points: Vec<Point>,
        generation: u64,
    ) -> Result<(), EmitError> {
        let a = &self.agent;
        let raw: u64 = writes.iter().map(|e| e.data.len() as u64).sum();
        let updates = writes
            .iter()
            .flat_map(|e| e.updates.iter().copied())
            .collect();
        let n = writes.len() as u64;
        let mut encoded: Result<(), codec::CodecError> = Ok(());
        let mut core = lock(&a.core);
        if !self.current(generation) {
            return Err(EmitError::Reset);
        }
        core.emit(n, raw, updates, unix_ms(), |first, sizes| {
            let points = points
                .into_iter()
                .filter(|p| p.index < writes.len())
                .map(|p| PointMark {
                    seq: first + p.index as u64,
                    time_ms: p.time_ms,
                    kind: p.kind,
                    name: p.name,
                })
                .collect();
            let records: Vec<WriteRecord> = writes
                .into_iter()
                .enumerate()
                .map(|(i, e)| WriteRecord {
                    seq: first + i as u64,
                    disk: e.disk,
                    offset: e.offset,
                    data: serde_bytes::ByteBuf::from(e.data),
                })
                .collect();
            // Encoded once, as the frame that goes on the wire; resends reuse it.
            let body = BatchBody {
                records,
                disk_sizes: sizes.to_vec(),
                points,
            };
            batch_frame(first, first + n - 1, &body, raw as usize).unwrap_or_else(|e| {
                encoded = Err(e);
                vec![]
            })
        });
        drop(core);
        encoded?;
        a.new_batch.notify_one();
        Ok(())
    }

    /// How often a source marks a point when there were writes but no flush (the machine's
    /// policy).
    pub fn point_every(&self) -> Duration {
        Duration::from_millis(self.agent.point_every_ms.load(Ordering::Relaxed))
    }

    /// The point to make now (`ctl mark`, or the app-consistent period when due), if any.
    pub fn next_mark(&self) -> Option<super::marks::Job> {
        lock(&self.agent.marks).next(std::time::Instant::now())
    }

    /// Waits until a point may be due: a mark was requested, the period is due, or at most
    /// `max`.
    pub async fn mark_wanted(&self, max: Duration) {
        let a = &self.agent;
        let notified = a.mark_now.notified();
        let wait = {
            let m = lock(&a.marks);
            if m.has_queued() {
                return;
            }
            m.until_due(std::time::Instant::now())
                .map_or(max, |d| d.min(max))
        };
        let _ = tokio::time::timeout(wait, notified).await;
    }

    /// Reports what became of a point (made, or why not); the report goes out at once.
    pub fn mark_done(&self, done: MarkDone) {
        lock(&self.agent.marks).finish(done, unix_ms() * 1000);
        self.agent.report_now.notify_one();
    }

    /// Waits until the configuration node releases group cut `request`'s hold, at most
    /// `max`; false when it did not in time.
    pub async fn released(&self, request: u64, max: Duration) -> bool {
        let mut rx = self.agent.released.subscribe();
        tokio::time::timeout(max, rx.wait_for(|ids| ids.contains(&request)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The agent's freeze and thaw commands, if it has them.
    pub fn hooks(&self) -> Option<super::freeze::Hooks> {
        self.agent.opts.hooks.clone()
    }

    /// Why the points this source marks now are not crash-consistent (shown in status).
    pub fn set_not_consistent(&self, why: Option<String>) {
        *lock(&self.agent.capture_note) = why;
    }

    /// The agent's data directory (a source keeps its own durable state under it).
    pub fn data_dir(&self) -> PathBuf {
        self.agent.opts.data_dir.clone()
    }

    /// Everything the disks held when the capture started has been emitted: the initial copy
    /// is complete (status leaves `initial-sync` once it is applied). A scan says so after
    /// every complete pass.
    pub fn caught_up(&self) {
        lock(&self.agent.core).handle_pass_done();
    }

    /// The sync barrier a pass starting now completes, if one is asked for.
    pub fn barrier(&self) -> Option<u64> {
        lock(&self.agent.core).barrier_for_pass()
    }

    /// Everything written before barrier `id` was asked for is captured (emitted).
    pub fn barrier_captured(&self, id: u64) {
        lock(&self.agent.core).handle_barrier_captured(id);
        self.agent.report_now.notify_one();
    }

    /// Waits until `interval` passes, a pass is asked for (a barrier, a resync), or the
    /// protection is reset.
    pub async fn wait(&self, interval: Duration) {
        let mut reset = self.agent.reset.subscribe();
        reset.borrow_and_update();
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = self.agent.scan_now.notified() => {}
            _ = reset.changed() => {}
        }
    }
}

/// Borrowed twin of `proto::AgentFrame`, to encode a frame without copying its body.
#[derive(Serialize)]
enum AgentFrameRef<'a> {
    Batch {
        first_seq: u64,
        last_seq: u64,
        #[serde(with = "serde_bytes")]
        body: &'a [u8],
    },
}

/// Encodes `AgentFrame::Batch { first_seq, last_seq, body: encode(batch) }` into one buffer
/// sized up front, without first encoding the body on its own: a batch exists once in memory,
/// not twice. The frame header is the codec's own encoding of the frame with an empty body,
/// whose trailing `bin8` length is widened to `bin32` and filled in afterwards (pinned by the
/// `batch_frame_decodes_like_the_codec_encoding` test).
fn batch_frame(
    first_seq: u64,
    last_seq: u64,
    batch: &BatchBody,
    raw_bytes: usize,
) -> Result<Vec<u8>, codec::CodecError> {
    let mut head = codec::encode(&AgentFrameRef::Batch {
        first_seq,
        last_seq,
        body: &[],
    })?;
    debug_assert!(
        head.ends_with(&[0xc4, 0x00]),
        "an empty bin8 ends the frame"
    );
    head.truncate(head.len() - 2);
    // msgpack adds a few dozen bytes per record to the raw data.
    let mut buf = Vec::with_capacity(head.len() + 5 + raw_bytes + 64 + batch.records.len() * 64);
    buf.extend_from_slice(&head);
    buf.push(0xc6); // bin32
    let len_at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    codec::encode_into(&mut buf, batch)?;
    let body_len =
        u32::try_from(buf.len() - len_at - 4).map_err(|_| codec::CodecError::TooLarge)?;
    buf[len_at..len_at + 4].copy_from_slice(&body_len.to_be_bytes());
    Ok(buf)
}

/// Scan capture: periodic (and on demand) passes over every disk, sending the blocks whose
/// hash differs from the agent's table of the replica. Any file or block device.
pub struct ScanCapture {
    pub interval: Duration,
}

impl CaptureSource for ScanCapture {
    fn name(&self) -> &'static str {
        "scan"
    }

    fn run(self: Arc<Self>, sink: CaptureSink) -> BoxFuture<'static, Result<(), TaskError>> {
        Box::pin(async move { scan_loop(&self, &sink).await.map_err(TaskError::retry) })
    }
}

/// Why a scan pass stopped.
#[derive(Debug, thiserror::Error)]
enum ScanError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Emit(#[from] codec::CodecError),
    #[error("scan {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the scanner task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

async fn scan_loop(scan: &ScanCapture, sink: &CaptureSink) -> Result<(), ScanError> {
    let a = &sink.agent;
    loop {
        let generation = sink.ready().await;
        if lock(&a.disks).mismatch.is_some() {
            // Nothing may be captured into a replica of other disks; a new protection ends it.
            // A sync barrier is answered (with nothing captured), so the operator hears why.
            if let Some(id) = sink.barrier() {
                sink.barrier_captured(id);
            }
            sink.wait(Duration::from_secs(3600)).await;
            continue;
        }
        let barrier = sink.barrier();
        let tables = lock(&a.core).captured_tables();
        let before = lock(&a.core).captured_seq();
        let completed = scan_pass(sink, tables, generation).await?;
        a.scans.fetch_add(1, Ordering::Relaxed);
        if completed && lock(&a.core).captured_seq() != before {
            // A pass read blocks at different moments: its point is not crash-consistent.
            match sink
                .emit_point(PointKind::NotConsistent, None, generation)
                .await
            {
                Ok(()) | Err(EmitError::Reset) => {}
                Err(EmitError::Encode(e)) => return Err(e.into()),
            }
        }
        if completed {
            sink.caught_up();
            if let Some(id) = barrier {
                sink.barrier_captured(id);
            }
        }
        if !sink.current(generation) {
            continue;
        }
        sink.wait(scan.interval).await;
    }
}

/// Emits a batch; `Ok(false)` when the protection was reset meanwhile.
async fn emit(sink: &CaptureSink, writes: Vec<Write>, generation: u64) -> Result<bool, ScanError> {
    match sink.emit(writes, generation).await {
        Ok(()) => Ok(true),
        Err(EmitError::Reset) => Ok(false),
        Err(EmitError::Encode(e)) => Err(e.into()),
    }
}

/// One pass over every disk. Returns false if it was abandoned for a reset.
async fn scan_pass(
    sink: &CaptureSink,
    tables: Vec<Vec<u64>>,
    generation: u64,
) -> Result<bool, ScanError> {
    let a = &sink.agent;
    a.pass_scanned.store(0, Ordering::Relaxed);
    let mut base = 0u64;
    for (i, table) in tables.into_iter().enumerate() {
        let Some((mut table, size)) = check_disk(sink, i, table, generation).await? else {
            continue; // blocked: nothing of it is sent
        };
        let (tx, mut rx) = mpsc::channel::<Write>(2);
        let path = a.opts.disks[i].1.clone();
        let a2 = a.clone();
        let scanner = tokio::task::spawn_blocking(move || {
            let r = scan::scan_disk(
                &path,
                i as u16,
                &mut table,
                size,
                |off| a2.pass_scanned.store(base + off, Ordering::Relaxed),
                |e| tx.blocking_send(e).is_ok(),
            );
            r.map_err(|source| ScanError::Read { path, source })
        });
        let mut batch: Vec<Write> = vec![];
        let mut raw = 0u64;
        while let Some(e) = rx.recv().await {
            if !sink.current(generation) {
                drop(rx);
                let _ = scanner.await;
                return Ok(false);
            }
            raw += e.data.len() as u64;
            batch.push(e);
            if raw >= BATCH_BYTES {
                if !emit(sink, std::mem::take(&mut batch), generation).await? {
                    return Ok(false);
                }
                raw = 0;
            }
        }
        if !batch.is_empty() && !emit(sink, batch, generation).await? {
            return Ok(false);
        }
        scanner.await??;
        base += size;
    }
    Ok(true)
}

/// Before a disk is scanned: is it still the protected disk, at its size? Returns the table
/// and size to scan it at, or None if it is blocked. A disk that grew is grown in the stream
/// (a marker batch carrying the new size) before anything of the new region is sent.
async fn check_disk(
    sink: &CaptureSink,
    i: usize,
    table: Vec<u64>,
    generation: u64,
) -> Result<Option<(Vec<u64>, u64)>, ScanError> {
    let a = &sink.agent;
    let (rec, resync_wanted) = {
        let set = lock(&a.disks);
        (set.records[i].clone(), set.resync[i])
    };
    let captured = lock(&a.core).sizes()[i];
    let path = a.opts.disks[i].1.clone();
    let looked = {
        let rec = rec.clone();
        tokio::task::spawn_blocking(move || {
            let obs = disks::observe(&path)?;
            let verdict = disks::judge(&rec, &obs, captured, || {
                disks::check_content(&path, &table, obs.size_bytes)
            });
            Ok::<_, std::io::Error>((obs, verdict, table))
        })
        .await?
    };
    let machine = &a.opts.machine;
    let (obs, verdict, mut table) = match looked {
        Ok(x) => x,
        Err(e) => {
            let reason = format!("cannot read disk {} at {}: {e}", rec.name, rec.path);
            block_disk(a, i, reason)?;
            return Ok(None);
        }
    };
    let epoch = lock(&a.core).epoch;
    // The operator decided: take the disk as it is now.
    if resync_wanted > rec.resync_done {
        let adopted = disks::adopt(&rec.name, &obs, &table, resync_wanted);
        tracing::info!(disk = %rec.name, path = %obs.path, size = obs.size_bytes, "resync: the disk is adopted as it is now; every block that differs from the replica is sent");
        {
            let mut set = lock(&a.disks);
            set.records[i] = adopted;
            set.blocked[i] = None;
        }
        if obs.size_bytes != captured {
            resize(sink, i, &mut table, captured, obs.size_bytes, generation).await?;
        }
        a.save_disks(epoch)?;
        a.report_now.notify_one();
        return Ok(Some((table, obs.size_bytes)));
    }
    if let Some(reason) = verdict.blocked_reason(&rec.name, machine) {
        block_disk(a, i, reason)?;
        return Ok(None);
    }
    let was_blocked = lock(&a.disks).blocked[i].take().is_some();
    if was_blocked {
        tracing::info!(disk = %rec.name, path = %obs.path, "the protected disk is back: replicating it again");
        lock(&a.disks).records[i].blocked_since_ms = None;
        a.report_now.notify_one();
    }
    let mut size = captured;
    let mut changed = was_blocked;
    if verdict != Verdict::Same {
        let mut set = lock(&a.disks);
        let r = &mut set.records[i];
        if r.path != obs.path || r.file_id != obs.file_id || r.device_id != obs.device_id {
            tracing::info!(disk = %rec.name, path = %obs.path, was = %r.path, "the protected disk is at another path or inode now: following it");
            r.path.clone_from(&obs.path);
            r.file_id = obs.file_id;
            r.device_id.clone_from(&obs.device_id);
        }
        changed = true;
    }
    if let Verdict::Grown { from, to } = verdict {
        tracing::info!(
            disk = %rec.name,
            from = %disks::size_text(from),
            to = %disks::size_text(to),
            "disk grew: the replica grows in the stream; only the new region and changed blocks travel"
        );
        lock(&a.disks).records[i].size_bytes = to;
        resize(sink, i, &mut table, from, to, generation).await?;
        size = to;
    }
    if changed {
        a.save_disks(epoch)?;
        a.report_now.notify_one();
    }
    Ok(Some((table, size)))
}

/// Changes a disk's captured size and sends a marker batch that carries it.
async fn resize(
    sink: &CaptureSink,
    i: usize,
    table: &mut Vec<u64>,
    from: u64,
    to: u64,
    generation: u64,
) -> Result<(), ScanError> {
    core::resize_table(table, from, to);
    lock(&sink.agent.core).resize(i, to);
    let marker = Write {
        disk: i as u16,
        offset: 0,
        data: vec![],
        updates: vec![],
    };
    emit(sink, vec![marker], generation).await.map(|_| ())
}

/// Nothing of disk `i` is sent until it is the protected disk again or the operator decides.
fn block_disk(a: &Agent, i: usize, reason: String) -> Result<(), AgentError> {
    let epoch = lock(&a.core).epoch;
    {
        let mut set = lock(&a.disks);
        if set.blocked[i].as_deref() == Some(reason.as_str()) {
            return Ok(()); // said already
        }
        set.blocked[i] = Some(reason.clone());
        set.records[i].blocked_since_ms.get_or_insert_with(unix_ms);
    }
    tracing::error!(disk = %a.opts.disks[i].0, "{reason}");
    a.save_disks(epoch)?;
    a.report_now.notify_one();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::AgentFrame;

    #[test]
    fn batch_frame_decodes_like_the_codec_encoding() {
        for (first, n, size) in [
            (1u64, 1u64, 0usize),
            (70_000, 3, 100),
            (u64::MAX - 10, 2, 70_000),
        ] {
            let records = (0..n)
                .map(|i| WriteRecord {
                    seq: first + i,
                    disk: i as u16,
                    offset: i * 4096,
                    data: serde_bytes::ByteBuf::from(vec![i as u8; size]),
                })
                .collect();
            let batch = BatchBody {
                records,
                disk_sizes: vec![1 << 20, 7],
                points: Vec::new(),
            };
            let frame = batch_frame(first, first + n - 1, &batch, size * n as usize).unwrap();
            let body = codec::encode(&batch).unwrap();
            let AgentFrame::Batch {
                first_seq,
                last_seq,
                body: got,
            } = codec::decode(&frame).unwrap();
            assert_eq!((first_seq, last_seq), (first, first + n - 1));
            assert_eq!(got.into_vec(), body);
            // Sized up front: no doubling reallocation left half the buffer empty.
            assert!(
                frame.capacity() - frame.len() <= 64 + 64 * n as usize,
                "{} of {}",
                frame.len(),
                frame.capacity()
            );
        }
    }
}
