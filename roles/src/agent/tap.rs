//! Tap capture (`haven agent --capture tap`): the agent serves each `--disk NAME=PATH` as the
//! NBD export NAME on `<data dir>/nbd/NAME.sock` (and on `--nbd-listen ADDR`), and the
//! workload writes through it. Every write reaches PATH and is captured into the seq stream
//! **in completion order before it is acknowledged**, so every prefix of the stream is a state
//! the disks really had; a FLUSH puts a flush barrier (a crash-consistent recovery point) into
//! the stream before it is acknowledged.
//!
//! ```text
//!  NBD client ─WRITE─▶ TapDisk ─┐ order lock: pwrite PATH, add to the open batch ─▶ ack
//!  NBD client ─FLUSH─▶ TapDisk ─┤ order lock: marker + point, close the batch; fdatasync ─▶ ack
//!  tap loop (every 10 ms) ──────┘ close an open batch older than 10 ms; periodic points;
//!                                 sync barriers; the sync pass; the overflow resync
//! ```
//!
//! One lock (the *order lock*, a tokio mutex) orders everything that touches a disk and the
//! stream: a write's pwrite and its capture happen under it, so the stream order is the order
//! in which PATH changed. Reads do not take it.
//!
//! - **Sync pass** (the initial sync, and after every restart): the disks are read chunk by
//!   chunk, each chunk read and captured under the order lock, and compared with the agent's
//!   hash table of the replica; what differs is sent. A tap write is therefore never
//!   overwritten at the replica by older data the pass read: the pass read the chunk either
//!   before the write (and its capture precedes the write's) or after (and holds the write).
//!   Points until the pass is done are `not-consistent`. A restarted agent runs the same pass,
//!   so everything that may not have been applied when it was killed is sent again: no
//!   acknowledged write is lost (PATH has it).
//! - **Overflow**: when the retention buffer is full, a write is held back (the writer waits)
//!   up to [`HOLD_MAX`]; then the tap stops capturing writes one by one and marks their 1 MiB
//!   regions dirty instead, and once there is room again it resends those regions (read under
//!   the order lock, like the sync pass). Points in that window are `not-consistent` and
//!   status says why. A write is never dropped and a writer never waits longer than the hold.
//! - **App-consistent and requested points** (`ctl mark`, `ctl protect
//!   --app-consistent-every`; see [`super::marks`]): a mark loop next to the capture runs the
//!   freeze command, then under the order lock fdatasyncs every disk and puts a barrier tagged
//!   `App` (or `Crash`/`Named` when the freeze failed or timed out, or none was asked for),
//!   and always runs the thaw. Writes keep being accepted during the freeze; the barrier
//!   follows every write acknowledged before the lock was taken.
//! - **TRIM** is advisory in NBD: the tap accepts it and changes nothing (so nothing needs
//!   capturing). **WRITE_ZEROES** writes zeros and is captured like a write.
use std::{
    collections::BTreeSet,
    fs::{File, OpenOptions},
    net::SocketAddr,
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use haven_actors::TaskError;
use haven_nbd::{Backend, Exports, Server, ServerHandle};
use tokio::sync::Mutex;
use xxhash_rust::xxh3::xxh3_64;

use super::capture::{CaptureSink, CaptureSource, EmitError, Point, Write};
use super::core::BLOCK_BYTES;
use super::freeze;
use super::marks::{self, Job};
use super::state::lock;
use crate::{
    fsutil::unix_ms,
    proto::{Hold, MarkDone, PointKind},
};

/// An open batch is closed (numbered into the stream) when it holds this many bytes…
const BATCH_BYTES: u64 = 1 << 20;
/// …or when its oldest write is this old: the tap's contribution to the RPO.
const BATCH_AGE: Duration = Duration::from_millis(10);
/// Longest a writer is held back while the retention buffer is full, before the tap switches
/// to dirty regions.
pub const HOLD_MAX: Duration = Duration::from_millis(500);
/// Longest a write waits, after the agent starts, for the configuration node's first answer
/// (which says whether the machine was failed over meanwhile, and the disks are read-only);
/// with the configuration node unreachable longer, the last state it gave (persisted) holds.
pub const STARTUP_HOLD: Duration = Duration::from_secs(10);
/// Granularity of the dirty-region map.
const REGION_BYTES: u64 = 1 << 20;
/// Bytes read (and captured) under the order lock at a time by the sync pass and the
/// overflow resync.
const PASS_CHUNK: u64 = 1 << 20;
/// Largest record the tap emits (bigger writes are split).
const RECORD_MAX: usize = 1 << 20;

/// Tap capture: see the module docs.
pub struct TapCapture {
    /// Also serve every export on this TCP address.
    pub listen: Option<SocketAddr>,
}

impl TapCapture {
    pub fn new(listen: Option<SocketAddr>) -> Self {
        Self { listen }
    }
}

/// The socket the tap serves disk `name` on.
pub fn socket_path(data_dir: &std::path::Path, name: &str) -> PathBuf {
    data_dir.join("nbd").join(format!("{name}.sock"))
}

/// What the order lock protects.
struct Order {
    /// The protection being captured into (None: not protected yet; writes only reach PATH
    /// and the sync pass will pick them up).
    generation: Option<u64>,
    open: Vec<Write>,
    open_raw: u64,
    open_since: Option<Instant>,
    points: Vec<Point>,
    /// Writes since the last point.
    unmarked: bool,
    last_point: Instant,
    /// The sync pass has not completed since the capture (re)started.
    syncing: bool,
    /// Dirty regions (disk, region index) of the overflow, to resend.
    dirty: BTreeSet<(u16, u64)>,
    overflow: bool,
}

impl Order {
    fn consistent(&self) -> bool {
        !self.syncing && !self.overflow && self.dirty.is_empty()
    }

    fn kind(&self, wanted: PointKind) -> PointKind {
        if self.consistent() {
            wanted
        } else {
            PointKind::NotConsistent
        }
    }
}

struct Shared {
    sink: CaptureSink,
    files: Vec<Arc<File>>,
    sizes: Vec<u64>,
    order: Mutex<Order>,
    /// Until then, writes wait for the configuration node's first answer (see
    /// [`STARTUP_HOLD`]); after it, never.
    hold_until: Instant,
}

impl Shared {
    /// Adds a captured write to the open batch, closing it when full. Holds the writer (the
    /// order lock stays held) while there is no room, at most [`HOLD_MAX`]; then marks the
    /// write's regions dirty instead.
    async fn capture(&self, o: &mut Order, w: Write) -> Result<(), EmitError> {
        let Some(generation) = o.generation else {
            return Ok(());
        };
        if o.overflow {
            mark_dirty(o, w.disk, w.offset, w.data.len() as u64);
            return Ok(());
        }
        o.open_raw += w.data.len() as u64;
        o.open.push(w);
        o.unmarked = true;
        o.open_since.get_or_insert_with(Instant::now);
        if o.open_raw >= BATCH_BYTES {
            self.close(o, generation, true).await?;
        }
        Ok(())
    }

    /// Numbers the open batch into the stream. With `hold`, waits for room up to
    /// [`HOLD_MAX`] and then switches to dirty regions; without, leaves the batch open if
    /// there is no room now.
    async fn close(&self, o: &mut Order, generation: u64, hold: bool) -> Result<bool, EmitError> {
        if o.open.is_empty() {
            return Ok(true);
        }
        let deadline = Instant::now() + HOLD_MAX;
        loop {
            if self.sink.try_emit(&mut o.open, &mut o.points, generation)? {
                o.open_raw = 0;
                o.open_since = None;
                return Ok(true);
            }
            let now = Instant::now();
            if !hold {
                return Ok(false);
            }
            if now >= deadline {
                break;
            }
            self.sink.room(deadline - now).await;
        }
        // Overflow: the open batch's writes become dirty regions (their data is on PATH).
        tracing::warn!(
            held_ms = HOLD_MAX.as_millis() as u64,
            "retention buffer full: the tap tracks dirty regions and resends them once there is room; points meanwhile are not crash-consistent"
        );
        for w in std::mem::take(&mut o.open) {
            mark_dirty(o, w.disk, w.offset, w.data.len() as u64);
        }
        o.points.clear();
        o.open_raw = 0;
        o.open_since = None;
        o.overflow = true;
        Ok(false)
    }

    /// Puts a recovery point after everything captured so far, and closes the batch.
    /// Returns the point's seq and kind once numbered (None: not protected, or the buffer
    /// overflowed and the point was dropped with the batch).
    async fn point(
        &self,
        o: &mut Order,
        kind: PointKind,
        name: Option<String>,
    ) -> Result<Option<(u64, PointKind)>, EmitError> {
        let Some(generation) = o.generation else {
            return Ok(None);
        };
        if o.overflow {
            return Ok(None); // no consistent place in the stream to put it
        }
        let kind = o.kind(kind);
        o.points.push(Point {
            index: o.open.len(),
            kind,
            name,
            time_ms: unix_ms(),
        });
        o.open.push(Write::marker());
        o.open_since.get_or_insert_with(Instant::now);
        o.unmarked = false;
        o.last_point = Instant::now();
        if self.close(o, generation, true).await? {
            // Every emission happens under the order lock: the marker is the last seq.
            let seq = lock(&self.sink.agent.core).captured_seq();
            return Ok(Some((seq, kind)));
        }
        Ok(None)
    }

    /// fdatasync of every disk under the order lock: every write acknowledged before is on
    /// PATH (and, being acknowledged, captured).
    async fn sync_all(&self) -> std::io::Result<()> {
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || files.iter().try_for_each(|f| f.sync_data()))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Reads `disk[offset..offset+len]` and captures the blocks whose hash differs from
    /// `table` (updated), or every block without a table. Called under the order lock.
    async fn capture_range(
        &self,
        o: &mut Order,
        disk: u16,
        offset: u64,
        len: u64,
        mut table: Option<&mut [u64]>,
    ) -> Result<(), TapError> {
        let file = self.files[disk as usize].clone();
        let buf = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await
        .map_err(|e| TapError::Io(std::io::Error::other(e)))??;
        let mut run: Option<Write> = None;
        for (i, block) in buf.chunks(BLOCK_BYTES as usize).enumerate() {
            let at = offset + i as u64 * BLOCK_BYTES;
            let idx = (at / BLOCK_BYTES) as usize;
            let h = xxh3_64(block);
            if table.as_ref().is_some_and(|t| t.get(idx) == Some(&h)) {
                if let Some(w) = run.take() {
                    self.capture(o, w).await?;
                }
                continue;
            }
            if let Some(slot) = table.as_mut().and_then(|t| t.get_mut(idx)) {
                *slot = h;
            }
            let w = run.get_or_insert_with(|| Write {
                disk,
                offset: at,
                data: Vec::new(),
                updates: Vec::new(),
            });
            w.data.extend_from_slice(block);
            w.updates.push((disk, idx as u32, h));
            if w.data.len() >= RECORD_MAX {
                let w = run.take().expect("just filled");
                self.capture(o, w).await?;
            }
        }
        if let Some(w) = run.take() {
            self.capture(o, w).await?;
        }
        Ok(())
    }
}

fn mark_dirty(o: &mut Order, disk: u16, offset: u64, len: u64) {
    let first = offset / REGION_BYTES;
    let last = (offset + len.max(1) - 1) / REGION_BYTES;
    for r in first..=last {
        o.dirty.insert((disk, r));
    }
}

#[derive(Debug, thiserror::Error)]
enum TapError {
    #[error(transparent)]
    Emit(#[from] EmitError),
    #[error("tap I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Agent(#[from] super::state::AgentError),
}

/// One disk's export.
struct TapDisk {
    shared: Arc<Shared>,
    disk: u16,
}

impl TapDisk {
    fn file(&self) -> &Arc<File> {
        &self.shared.files[self.disk as usize]
    }

    /// The write as captured: widened to whole blocks (edges read back from PATH after the
    /// write), with the blocks' new hashes, split into records of at most [`RECORD_MAX`].
    fn captured(&self, offset: u64, len: u64) -> std::io::Result<Vec<Write>> {
        let size = self.shared.sizes[self.disk as usize];
        let start = offset / BLOCK_BYTES * BLOCK_BYTES;
        let end = (offset + len).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let end = end.min(size);
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(RECORD_MAX);
            let mut data = vec![0u8; n];
            self.file().read_exact_at(&mut data, at)?;
            let updates = data
                .chunks(BLOCK_BYTES as usize)
                .enumerate()
                .map(|(i, b)| (self.disk, (at / BLOCK_BYTES) as u32 + i as u32, xxh3_64(b)))
                .collect();
            out.push(Write {
                disk: self.disk,
                offset: at,
                data,
                updates,
            });
            at += n as u64;
        }
        Ok(out)
    }

    async fn write_and_capture(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        let agent = &self.shared.sink.agent;
        let left = self
            .shared
            .hold_until
            .saturating_duration_since(Instant::now());
        if !*agent.heard.borrow() && !left.is_zero() {
            let mut heard = agent.heard.subscribe();
            let _ = tokio::time::timeout(left, heard.wait_for(|h| *h)).await;
        }
        let mut o = self.shared.order.lock().await;
        // Checked under the order lock: a point taken after read-only was set follows every
        // write accepted (a planned failover's final point).
        if let Some(why) = self.shared.sink.agent.control.borrow().read_only.as_deref() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                why.to_string(),
            ));
        }
        self.file().write_all_at(data, offset)?;
        if o.generation.is_some() {
            let aligned = offset % BLOCK_BYTES == 0 && data.len() as u64 % BLOCK_BYTES == 0;
            let writes = if aligned && data.len() <= RECORD_MAX {
                let updates = data
                    .chunks(BLOCK_BYTES as usize)
                    .enumerate()
                    .map(|(i, b)| {
                        (
                            self.disk,
                            (offset / BLOCK_BYTES) as u32 + i as u32,
                            xxh3_64(b),
                        )
                    })
                    .collect();
                vec![Write {
                    disk: self.disk,
                    offset,
                    data: data.to_vec(),
                    updates,
                }]
            } else {
                self.captured(offset, data.len() as u64)?
            };
            for w in writes {
                self.shared
                    .capture(&mut o, w)
                    .await
                    .map_err(std::io::Error::other)?;
            }
        }
        drop(o);
        if fua {
            self.file().sync_data()?;
        }
        Ok(())
    }
}

impl Backend for TapDisk {
    fn size(&self) -> u64 {
        self.shared.sizes[self.disk as usize]
    }

    /// A flush puts one barrier into the machine's one stream, covering every connection.
    fn multi_conn(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, std::io::Result<Vec<u8>>> {
        Box::pin(async move {
            let mut buf = vec![0u8; len as usize];
            self.file().read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, std::io::Result<()>> {
        Box::pin(async move { self.write_and_capture(offset, &data, fua).await })
    }

    fn flush(&self) -> BoxFuture<'_, std::io::Result<()>> {
        Box::pin(async move {
            {
                let mut o = self.shared.order.lock().await;
                if o.unmarked {
                    self.shared
                        .point(&mut o, PointKind::Crash, None)
                        .await
                        .map_err(std::io::Error::other)?;
                }
            }
            self.file().sync_data()
        })
    }

    /// Advisory in NBD: nothing changes, so nothing is captured.
    fn trim(&self, _offset: u64, _len: u32) -> BoxFuture<'_, std::io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, std::io::Result<()>> {
        Box::pin(async move {
            let mut at = offset;
            let end = offset + len as u64;
            while at < end {
                let n = ((end - at) as usize).min(RECORD_MAX);
                self.write_and_capture(at, &vec![0u8; n], false).await?;
                at += n as u64;
            }
            if fua {
                self.file().sync_data()?;
            }
            Ok(())
        })
    }
}

impl CaptureSource for TapCapture {
    fn name(&self) -> &'static str {
        "tap"
    }

    fn takes_marks(&self) -> bool {
        true
    }

    fn run(self: Arc<Self>, sink: CaptureSink) -> BoxFuture<'static, Result<(), TaskError>> {
        Box::pin(async move { tap_loop(&self, sink).await.map_err(TaskError::retry) })
    }
}

async fn tap_loop(tap: &TapCapture, sink: CaptureSink) -> Result<(), TapError> {
    let disks = sink.disks();
    let mut files = Vec::new();
    let mut sizes = Vec::new();
    for (_, path) in &disks {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        let size = {
            use std::io::{Seek, SeekFrom};
            let mut g = &f;
            g.seek(SeekFrom::End(0))?
        };
        files.push(Arc::new(f));
        sizes.push(size);
    }
    let shared = Arc::new(Shared {
        hold_until: Instant::now() + STARTUP_HOLD,
        sink: sink.clone(),
        files,
        sizes,
        order: Mutex::new(Order {
            generation: None,
            open: Vec::new(),
            open_raw: 0,
            open_since: None,
            points: Vec::new(),
            unmarked: false,
            last_point: Instant::now(),
            syncing: true,
            dirty: BTreeSet::new(),
            overflow: false,
        }),
    });
    freeze::thaw_after_restart(&sink.data_dir(), sink.hooks().as_ref()).await;
    // Serve at once: writes before the machine is protected reach PATH, and the sync pass
    // that starts with the protection picks them up.
    let _servers = serve(tap, &sink, &shared, &disks).await?;
    loop {
        let generation = sink.ready().await;
        {
            let mut o = shared.order.lock().await;
            o.generation = Some(generation);
            o.syncing = true;
        }
        sink.set_not_consistent(Some(
            "the initial sync (or the resync after a restart) is running".into(),
        ));
        match run_protected(&sink, &shared, generation).await {
            Ok(()) | Err(TapError::Emit(EmitError::Reset)) => {}
            Err(e) => return Err(e),
        }
        // The protection was reset: stop capturing until the next one is ready.
        let mut o = shared.order.lock().await;
        o.generation = None;
        o.open.clear();
        o.points.clear();
        o.open_raw = 0;
        o.open_since = None;
        o.dirty.clear();
        o.overflow = false;
    }
}

/// Starts the NBD servers: one unix socket per disk, and the TCP listener if asked for.
async fn serve(
    tap: &TapCapture,
    sink: &CaptureSink,
    shared: &Arc<Shared>,
    disks: &[(String, PathBuf)],
) -> Result<Vec<ServerHandle>, TapError> {
    let dir = sink.data_dir().join("nbd");
    crate::fsutil::create_private_dir(&dir)?;
    let all = Arc::new(Exports::new());
    let mut handles = Vec::new();
    for (i, (name, _)) in disks.iter().enumerate() {
        let backend: Arc<dyn Backend> = Arc::new(TapDisk {
            shared: shared.clone(),
            disk: i as u16,
        });
        all.insert(name.clone(), backend.clone());
        let one = Arc::new(Exports::new());
        one.insert(name.clone(), backend);
        let path = socket_path(&sink.data_dir(), name);
        let _ = std::fs::remove_file(&path);
        handles.push(Server::new(one).serve_unix(&path).await?);
        tracing::info!(disk = %name, uri = %format!("nbd+unix:///{name}?socket={}", path.display()), "tap: serving the disk over NBD");
    }
    if let Some(addr) = tap.listen {
        let h = Server::new(all).serve_tcp(addr).await?;
        tracing::info!(addr = ?h.tcp_addr(), "tap: serving every disk over NBD on TCP");
        handles.push(h);
    }
    Ok(handles)
}

/// Captures one protection, and makes the points asked for meanwhile, until it is reset.
async fn run_protected(
    sink: &CaptureSink,
    shared: &Arc<Shared>,
    generation: u64,
) -> Result<(), TapError> {
    tokio::select! {
        r = capture_protected(sink, shared, generation) => r,
        r = mark_loop(sink, shared, generation) => r,
    }
}

/// Makes requested (`ctl mark`) and periodic app-consistent points, one at a time. Each runs
/// in a task of its own, so the thaw runs even if the protection is reset meanwhile.
async fn mark_loop(
    sink: &CaptureSink,
    shared: &Arc<Shared>,
    generation: u64,
) -> Result<(), TapError> {
    loop {
        sink.mark_wanted(Duration::from_secs(1)).await;
        if !sink.current(generation) {
            return Err(EmitError::Reset.into());
        }
        let Some(job) = sink.next_mark() else {
            continue;
        };
        let task = tokio::spawn(make_point(sink.clone(), shared.clone(), generation, job));
        if let Some(done) = task
            .await
            .map_err(|e| TapError::Io(std::io::Error::other(e)))?
        {
            sink.mark_done(done);
        }
    }
}

/// One point: for an app-consistent one the freeze command (killed at its timeout), then,
/// under the order lock, an fdatasync of every disk and the barrier (after every write
/// acknowledged so far; writes arriving meanwhile wait for the lock and follow it), then
/// always the thaw command. A freeze that fails or times out gives a crash-consistent (or
/// named) point and a warning, not an error.
async fn make_point(
    sink: CaptureSink,
    shared: Arc<Shared>,
    generation: u64,
    job: Job,
) -> Option<MarkDone> {
    let hooks = sink.hooks();
    if job.request == 0 && hooks.is_none() {
        return None; // the periodic point needs a freeze command (said once, at the policy)
    }
    let frozen = job.app && hooks.is_some();
    let marker = freeze::marker_path(&sink.data_dir());
    let freeze = match (&hooks, job.app) {
        (Some(h), true) => {
            // Durable before the freeze: an agent killed while the application is frozen
            // runs the thaw when it starts again (`freeze::thaw_after_restart`).
            if let Err(e) = freeze::mark_frozen(&marker, job.request) {
                tracing::warn!("cannot record the freeze in {}: {e}", marker.display());
            }
            let r = freeze::run(&h.freeze, h.timeout)
                .await
                .map_err(|e| e.to_string());
            if let Err(e) = &r {
                tracing::warn!(
                    request = job.request,
                    "freeze command failed ({e}): the point is crash-consistent, not app-consistent"
                );
            }
            Some(r)
        }
        _ => None,
    };
    let (kind, warning) = marks::point_kind(&job, freeze.as_ref());
    let mut warnings: Vec<String> = warning.into_iter().collect();
    let time_ms = unix_ms();
    if let Some(d) = crate::faults::mark_delay() {
        tracing::warn!(?d, "fault injection: the point waits");
        tokio::time::sleep(d).await;
    }
    let mut o = shared.order.lock().await;
    let made: Result<Option<(u64, PointKind)>, String> = async {
        if !sink.current(generation) {
            return Err("the protection was reset".to_string());
        }
        // A group cut's point is crash-consistent: the stream carries the data, and the
        // hold (every write completion waits) should be short.
        if job.hold_ms == 0 {
            shared
                .sync_all()
                .await
                .map_err(|e| format!("flushing the disks failed: {e}"))?;
        }
        shared
            .point(&mut o, kind, job.name.clone())
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    let mut hold = None;
    if let (Ok(Some((seq, kind))), true) = (&made, job.hold_ms > 0) {
        // A group cut: say the point is placed, then keep the order lock (no write is
        // acknowledged) until every member has placed its point, or the bound.
        sink.mark_done(MarkDone {
            request: job.request,
            name: job.name.clone(),
            time_ms,
            seq: Some(*seq),
            kind: Some(*kind),
            hold: Some(Hold::Holding),
            ..Default::default()
        });
        let bound = Duration::from_millis(job.hold_ms as u64);
        let released = sink.released(job.request, bound).await;
        if !released {
            tracing::warn!(
                request = job.request,
                "group cut not released within {} ms: writes complete again; the cut is discarded",
                job.hold_ms
            );
        }
        hold = Some(if released {
            Hold::Released
        } else {
            Hold::TimedOut
        });
    }
    drop(o);
    if frozen {
        let h = hooks.as_ref().expect("frozen");
        if let Err(e) = freeze::run(&h.thaw, h.timeout).await {
            tracing::warn!(request = job.request, "thaw command failed: {e}");
            warnings.push(format!("thaw failed ({e})"));
        }
        freeze::clear_frozen(&marker);
    }
    let mut done = MarkDone {
        request: job.request,
        name: job.name,
        time_ms,
        warnings,
        hold,
        ..Default::default()
    };
    match made {
        Ok(Some((seq, kind))) => {
            tracing::info!(seq, kind = kind.as_str(), name = ?done.name, "recovery point inserted");
            done.seq = Some(seq);
            done.kind = Some(kind);
        }
        Ok(None) => {
            done.error = Some(
                "the retention buffer overflowed: there is no consistent place in the stream for a point until the dirty regions are resent; retry".into(),
            )
        }
        Err(e) => done.error = Some(e),
    }
    if let Some(e) = &done.error {
        tracing::warn!(request = done.request, "no recovery point inserted: {e}");
    }
    Some(done)
}

/// Captures one protection: the sync pass, then the steady state, until it is reset.
async fn capture_protected(
    sink: &CaptureSink,
    shared: &Arc<Shared>,
    generation: u64,
) -> Result<(), TapError> {
    // The sync pass: everything that differs from the replica, chunk by chunk under the
    // order lock.
    let mut tables = lock(&sink.agent.core).captured_tables();
    for (i, table) in tables.iter_mut().enumerate() {
        let size = shared.sizes[i];
        let mut at = 0;
        while at < size {
            let n = (size - at).min(PASS_CHUNK);
            let mut o = shared.order.lock().await;
            shared
                .capture_range(&mut o, i as u16, at, n, Some(table))
                .await?;
            drop(o);
            at += n;
            if !sink.current(generation) {
                return Err(EmitError::Reset.into());
            }
        }
    }
    {
        let mut o = shared.order.lock().await;
        shared.close(&mut o, generation, true).await?;
        o.syncing = false;
    }
    sink.caught_up();
    tracing::info!(
        "tap: the sync pass is done; flushes are crash-consistent recovery points from here on"
    );
    let mut tick = tokio::time::interval(BATCH_AGE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !sink.current(generation) {
            return Err(EmitError::Reset.into());
        }
        let barrier = sink.barrier();
        let mut o = shared.order.lock().await;
        if o.overflow && lock(&sink.agent.core).has_room(BATCH_BYTES * 4) {
            o.overflow = false;
            tracing::info!(
                regions = o.dirty.len(),
                "tap: room in the retention buffer again; resending the dirty regions"
            );
        }
        if !o.overflow && !o.dirty.is_empty() {
            resync_dirty(shared, &mut o, generation).await?;
        }
        let why = if o.overflow {
            Some(format!(
                "the retention buffer is full: {} MiB of dirty regions wait to be resent",
                (o.dirty.len() as u64 * REGION_BYTES) >> 20
            ))
        } else {
            None
        };
        sink.set_not_consistent(why);
        if o.unmarked && o.last_point.elapsed() >= sink.point_every() {
            shared.point(&mut o, PointKind::Crash, None).await?;
        }
        if o.open_since.is_some_and(|t| t.elapsed() >= BATCH_AGE) {
            shared.close(&mut o, generation, false).await?;
        }
        if let Some(id) = barrier {
            // Everything written before the barrier was asked for is captured once the open
            // batch is numbered and no dirty region waits.
            if o.dirty.is_empty() && !o.overflow && shared.close(&mut o, generation, true).await? {
                drop(o);
                sink.barrier_captured(id);
            }
        }
    }
}

/// Dirty regions resent per hold of the order lock: writers wait at most for this much to be
/// read and captured (a few milliseconds from the page cache), not for the whole backlog.
const RESYNC_REGIONS_PER_LOCK: usize = 4;

/// Resends some of the dirty regions of an overflow (read and captured under the order lock,
/// [`RESYNC_REGIONS_PER_LOCK`] at a time; the loop calls again on its next tick). A write to a
/// region still dirty is captured as usual and the region is read again later, so the stream
/// ends with the region's newest content either way; points stay `not-consistent` until no
/// region is dirty.
async fn resync_dirty(shared: &Shared, o: &mut Order, generation: u64) -> Result<(), TapError> {
    for _ in 0..RESYNC_REGIONS_PER_LOCK {
        if o.overflow {
            return Ok(());
        }
        let Some((disk, region)) = o.dirty.pop_first() else {
            break;
        };
        let size = shared.sizes[disk as usize];
        let at = region * REGION_BYTES;
        if at >= size {
            continue;
        }
        let n = (size - at).min(REGION_BYTES);
        shared.capture_range(o, disk, at, n, None).await?;
    }
    shared.close(o, generation, false).await?;
    Ok(())
}
