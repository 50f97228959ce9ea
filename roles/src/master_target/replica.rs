//! A machine's replica disks and its durable apply cursor.
//!
//! Images are sparse raw files at `<data>/replicas/<machine>/<disk>.img`; the cursor lives
//! in `state` next to them and is replaced atomically *after* the images are fsynced, so on
//! restart the cursor never claims more than the disks hold. Before a batch touches the
//! images, the before-images of the ranges it overwrites, each tagged with the seq of the
//! write that overwrites it, go to the recovery-point journal (`haven_storage::journal`, in
//! `journal/` next to the images), fdatasync'ed. A crash half-way through a batch is rolled
//! back on open: the images are then exactly the state at the cursor, never a torn batch.
//! Re-applying a batch after a crash is harmless: a seq always carries the same bytes.
//!
//! Committed records stay in the journal as history: every recovery point a batch carries
//! (`BatchBody::points`) can be viewed ([`Replica::view`]) as the image overlaid with the
//! oldest journal record after it, while the image itself stays at the latest state (failover
//! to `latest` copies nothing). [`Replica::prune`] keeps history to a retention window and a
//! size cap ([`RetentionPolicy`]); reaching the cap is reported, never silent. An `undo` file
//! left by a previous version is rolled back once on open, then deleted.
//!
//! A disk's size travels in the stream (`BatchBody::disk_sizes`): a batch that grows a disk
//! extends its image (sparse) before its records are applied; one that shrinks it (an
//! operator's `resync` of a shrunk disk) journals the cut-off tail first. The committed sizes
//! are part of the cursor, and opening a replica sets every image to them, so an uncommitted
//! resize is undone like an uncommitted write; a view has the sizes as of its point.
use std::{
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use haven_cluster::DiskInfo;
use serde::{Deserialize, Serialize};

use crate::fsutil::{read_optional, write_atomic};
use crate::proto::{BatchBody, PointKind, PointMark, WriteRecord};

use haven_storage::journal::{self, Journal, JournalOptions, PointEntry, Resize, View, Write};
pub use haven_storage::journal::{JournalStats, PruneReport};
use haven_storage::undo;

/// The block the failback compares by.
const BLOCK: u64 = 4096;

/// Reads `buf.len()` bytes at `offset` of recovery disk `disk` ([`Replica::rewrite_to`]).
pub type ReadDisk<'a> = dyn Fn(u16, u64, &mut [u8]) -> std::io::Result<()> + 'a;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ApplyError {
    #[error("seq gap: applied through {applied}, batch starts at {first}")]
    Gap { applied: u64, first: u64 },
    #[error("invalid batch: {0}")]
    Invalid(String),
    #[error("replica I/O: {0}")]
    Io(String),
    #[error("stale epoch {got}: replica is at epoch {have}")]
    StaleEpoch { got: u32, have: u32 },
    #[error("stale generation {got}: generation {have} has delivered (fenced)")]
    StaleGeneration { got: u64, have: u64 },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct ReplicaState {
    version: u32,
    epoch: u32,
    applied_seq: u64,
    /// Highest assignment generation that has delivered a batch: older ones are fenced.
    #[serde(default)]
    generation: u64,
    /// Committed size of every disk, by index. Absent in cursors of older versions: the
    /// images' lengths then.
    #[serde(default)]
    sizes: Option<Vec<u64>>,
    /// The disks' names, by index (so recovery can find each image's committed size).
    #[serde(default)]
    names: Option<Vec<String>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Applied,
    /// Already applied earlier (a resend); nothing written.
    Duplicate,
}

/// How much history the journal keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Points applied longer ago than this are pruned (default 24 h).
    pub retention_ms: u64,
    /// The journal never grows beyond this; pruning for it shortens history and is reported
    /// (default 10 % of the disks' sizes, at least 64 MiB).
    pub cap_bytes: u64,
}

impl RetentionPolicy {
    pub const DEFAULT_RETENTION_MS: u64 = 24 * 3600 * 1000;
    pub const MIN_CAP_BYTES: u64 = 64 << 20;

    /// The defaults for disks of these sizes.
    pub fn for_disks(sizes: &[u64]) -> Self {
        let total: u64 = sizes.iter().fold(0u64, |a, s| a.saturating_add(*s));
        Self {
            retention_ms: Self::DEFAULT_RETENTION_MS,
            cap_bytes: (total / 10).max(Self::MIN_CAP_BYTES),
        }
    }
}

/// A recovery point in a replica's catalogue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryPoint {
    pub seq: u64,
    /// The source's clock when it was taken (unix ms).
    pub time_ms: u64,
    pub kind: PointKind,
    pub name: Option<String>,
    /// When the master target applied it (unix ms; retention counts from it).
    pub applied_ms: u64,
}

fn kind_code(k: PointKind) -> u8 {
    match k {
        PointKind::Crash => 0,
        PointKind::App => 1,
        PointKind::Named => 2,
        PointKind::NotConsistent => 3,
    }
}

fn kind_of(code: u8) -> PointKind {
    match code {
        0 => PointKind::Crash,
        1 => PointKind::App,
        2 => PointKind::Named,
        // Unknown codes (a newer writer) claim nothing.
        _ => PointKind::NotConsistent,
    }
}

/// The disks of a replica as of a recovery point: cheap, `Send + Sync`, readable while
/// batches keep applying (see `haven_storage::journal::View` for why that stays correct).
/// It pins its point against pruning until dropped; once the replica is closed (reopened,
/// reset) its reads fail.
pub struct ReplicaView {
    view: View,
    images: Vec<Arc<File>>,
}

impl ReplicaView {
    pub fn point_seq(&self) -> u64 {
        self.view.point_seq()
    }

    /// The disk's size as of the point.
    pub fn size(&self, disk: u16) -> Result<u64, ApplyError> {
        self.view
            .size(disk)
            .map_err(|e| ApplyError::Io(format!("view size: {e}")))
    }

    /// The byte ranges of `disk` where the replica may differ from the point (None: all of
    /// it, the disk was resized since); see [`View::changed`].
    pub fn changed(&self, disk: u16) -> Result<Option<Vec<(u64, u64)>>, ApplyError> {
        self.view
            .changed(disk)
            .map_err(|e| ApplyError::Io(format!("view changes: {e}")))
    }

    /// Reads disk `disk` as of the point; fewer bytes than asked at its end.
    pub fn read(&self, disk: u16, offset: u64, buf: &mut [u8]) -> Result<usize, ApplyError> {
        let image = self
            .images
            .get(disk as usize)
            .ok_or_else(|| ApplyError::Invalid(format!("no disk #{disk}")))?;
        self.view
            .read(disk, offset, buf, image)
            .map_err(|e| ApplyError::Io(format!("view read: {e}")))
    }
}

pub struct Replica {
    dir: PathBuf,
    disks: Vec<(DiskInfo, Arc<File>)>,
    state: ReplicaState,
    /// Applied in memory but not yet fsynced and recorded.
    pending_seq: u64,
    pending_generation: u64,
    pending_sizes: Vec<u64>,
    dirty: Vec<bool>,
    journal: Journal,
    /// A failed write could not be rolled back: refuse everything until reopened.
    broken: bool,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> ApplyError {
    ApplyError::Io(format!("{what} {}: {e}", path.display()))
}

impl Replica {
    pub fn image_path(replicas_dir: &Path, machine: &str, disk: &str) -> PathBuf {
        replicas_dir.join(machine).join(format!("{disk}.img"))
    }

    /// Opens (creating as needed) the replica of a machine for `epoch`. A newer epoch is a new
    /// protection: images are emptied (the full resync skips zero blocks, so stale data would
    /// otherwise survive) and the cursor starts at 0.
    pub fn open(
        replicas_dir: &Path,
        machine: &str,
        epoch: u32,
        disks: &[DiskInfo],
    ) -> Result<Self, ApplyError> {
        let dir = replicas_dir.join(machine);
        std::fs::create_dir_all(&dir).map_err(|e| io("create", &dir, e))?;
        let stored = read_state(&dir)?;
        let reset = match &stored {
            Some(s) if s.epoch > epoch => {
                return Err(ApplyError::StaleEpoch {
                    got: epoch,
                    have: s.epoch,
                })
            }
            Some(s) => s.epoch < epoch,
            None => true,
        };
        let journal_dir = dir.join(journal::DIR_NAME);
        if let Some(s) = stored.as_ref().filter(|_| !reset) {
            roll_back_logged(&dir, machine, s)?;
        }
        if reset {
            // A new protection: the history of the old one does not describe these images.
            match std::fs::remove_dir_all(&journal_dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io("remove", &journal_dir, e))
                }
                _ => {}
            }
        }
        // An existing replica keeps the sizes its stream gave it (an assignment may lag a
        // disk that grew); a new one starts at the inventory's.
        let kept = stored
            .as_ref()
            .filter(|_| !reset)
            .and_then(|s| s.sizes.clone())
            .filter(|sizes| sizes.len() == disks.len());
        let mut files = Vec::with_capacity(disks.len());
        let mut sizes = Vec::with_capacity(disks.len());
        for (i, d) in disks.iter().enumerate() {
            let path = Self::image_path(replicas_dir, machine, &d.name);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| io("open", &path, e))?;
            if reset {
                f.set_len(0).map_err(|e| io("truncate", &path, e))?;
            }
            let len = f.metadata().map_err(|e| io("stat", &path, e))?.len();
            let size = match (&kept, reset) {
                (Some(k), _) => k[i],
                // A cursor of an older version: its images were kept at the disk's size.
                (None, false) if stored.is_some() && len > 0 => len,
                _ => d.size_bytes,
            };
            if len != size {
                f.set_len(size).map_err(|e| io("resize", &path, e))?;
            }
            sizes.push(size);
            files.push((d.clone(), Arc::new(f)));
        }
        let stored_names = stored.as_ref().and_then(|s| s.names.clone());
        let names = Some(disks.iter().map(|d| d.name.clone()).collect());
        let state = match stored {
            Some(s) if !reset => ReplicaState {
                sizes: Some(sizes.clone()),
                names,
                ..s
            },
            _ => ReplicaState {
                version: 1,
                epoch,
                applied_seq: 0,
                generation: 0,
                sizes: Some(sizes.clone()),
                names,
            },
        };
        let images: Vec<&File> = files.iter().map(|(_, f)| &**f).collect();
        let (mut journal, report) = Journal::open(
            &journal_dir,
            epoch,
            state.applied_seq,
            &images,
            JournalOptions::default(),
        )
        .map_err(|e| io("open the journal", &journal_dir, e))?;
        let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
        if !reset && stored_names.is_some_and(|n| n != names) {
            // Records name disks by index: with another inventory they would lie.
            tracing::warn!(%machine, "the disks changed: the recovery-point history restarts");
            journal
                .reset(epoch)
                .map_err(|e| io("reset the journal", &journal_dir, e))?;
        }
        if report.damaged_segments > 0 {
            tracing::warn!(%machine, segments = report.damaged_segments, "damaged journal segments: older recovery points are gone");
        }
        journal.set_sizes(&sizes);
        journal.set_durable(state.applied_seq);
        let mut r = Self {
            dir,
            journal,
            broken: false,
            dirty: vec![reset; files.len()],
            disks: files,
            pending_seq: state.applied_seq,
            pending_generation: state.generation,
            pending_sizes: sizes,
            state,
        };
        if reset {
            r.commit()?;
        }
        Ok(r)
    }

    /// Highest seq durably applied.
    pub fn applied_seq(&self) -> u64 {
        self.state.applied_seq
    }

    pub fn epoch(&self) -> u32 {
        self.state.epoch
    }

    /// Size of each disk's image, including resizes not yet committed.
    pub fn sizes(&self) -> &[u64] {
        &self.pending_sizes
    }

    /// Highest generation that has delivered (including not yet committed batches).
    pub fn generation(&self) -> u64 {
        self.pending_generation
    }

    /// Refuses a stream of an older generation than one that has delivered.
    pub fn check_generation(&self, generation: u64) -> Result<(), ApplyError> {
        if generation < self.pending_generation {
            return Err(ApplyError::StaleGeneration {
                got: generation,
                have: self.pending_generation,
            });
        }
        Ok(())
    }

    /// Applies one batch in seq order. Every record is validated before anything is written,
    /// so an invalid batch leaves the disks untouched. `now_ms` (unix ms, injected) is the
    /// batch's time in the journal: retention counts from it.
    pub fn apply(
        &mut self,
        generation: u64,
        first_seq: u64,
        last_seq: u64,
        body: &BatchBody,
        now_ms: u64,
    ) -> Result<Applied, ApplyError> {
        self.check_usable()?;
        self.check_generation(generation)?;
        if last_seq <= self.pending_seq {
            return Ok(Applied::Duplicate);
        }
        if first_seq != self.pending_seq + 1 {
            return Err(ApplyError::Gap {
                applied: self.pending_seq,
                first: first_seq,
            });
        }
        let sizes = self.sizes_after(body)?;
        self.validate(first_seq, last_seq, body, &sizes)?;
        self.journal_batch(first_seq, body, &sizes, now_ms)?;
        self.resize(&sizes)?;
        for r in body.records.iter().filter(|r| !r.data.is_empty()) {
            let (d, f) = &self.disks[r.disk as usize];
            let written = f.write_all_at(&r.data, r.offset);
            self.dirty[r.disk as usize] = true;
            if let Err(e) = written {
                let e = ApplyError::Io(format!("write {}: {e}", d.name));
                return Err(self.undo_uncommitted(e));
            }
        }
        self.pending_seq = last_seq;
        // This generation has delivered: every older one is fenced from now on.
        self.pending_generation = generation;
        Ok(Applied::Applied)
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The disk sizes a batch asks for (its own, or the current ones).
    fn sizes_after(&self, body: &BatchBody) -> Result<Vec<u64>, ApplyError> {
        if body.disk_sizes.is_empty() {
            return Ok(self.pending_sizes.clone());
        }
        if body.disk_sizes.len() != self.disks.len() {
            return Err(ApplyError::Invalid(format!(
                "batch gives {} disk sizes for {} disks",
                body.disk_sizes.len(),
                self.disks.len()
            )));
        }
        Ok(body.disk_sizes.clone())
    }

    /// Grows (sparse) or shrinks images to `sizes` (a shrink's cut tail is journaled by
    /// [`journal_batch`](Self::journal_batch) first, so it rolls back like a write).
    fn resize(&mut self, sizes: &[u64]) -> Result<(), ApplyError> {
        for (i, &to) in sizes.iter().enumerate() {
            let from = self.pending_sizes[i];
            if to == from {
                continue;
            }
            let (d, f) = &self.disks[i];
            if let Err(e) = f.set_len(to) {
                let e = ApplyError::Io(format!("resize {}: {e}", d.name));
                return Err(self.undo_uncommitted(e));
            }
            self.dirty[i] = true;
            self.pending_sizes[i] = to;
            tracing::info!(disk = %d.name, from, to, "replica image resized by the stream");
        }
        Ok(())
    }

    fn check_usable(&self) -> Result<(), ApplyError> {
        if self.broken {
            return Err(ApplyError::Io(format!(
                "replica {} failed a write it could not undo; it must be reopened",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Journals, durably, what the batch is about to overwrite (see `haven_storage::journal`):
    /// the tail a shrink cuts off, the before-image of every write (as of the batch's earlier
    /// writes, tagged with its seq), and its recovery points.
    fn journal_batch(
        &mut self,
        first_seq: u64,
        body: &BatchBody,
        sizes: &[u64],
        now_ms: u64,
    ) -> Result<(), ApplyError> {
        let resizes: Vec<Resize> = sizes
            .iter()
            .enumerate()
            .filter(|(i, to)| self.pending_sizes[*i] != **to)
            .map(|(i, &to)| Resize {
                disk: i as u16,
                from: self.pending_sizes[i],
                to,
            })
            .collect();
        let writes: Vec<Write> = body
            .records
            .iter()
            .map(|r| Write {
                seq: r.seq,
                disk: r.disk,
                offset: r.offset,
                data: &r.data,
            })
            .collect();
        let points: Vec<PointEntry> = body
            .points
            .iter()
            .map(|p| PointEntry {
                seq: p.seq,
                time_ms: p.time_ms,
                kind: kind_code(p.kind),
                name: p.name.clone(),
                journal_ms: now_ms,
            })
            .collect();
        let images: Vec<&File> = self.disks.iter().map(|(_, f)| &**f).collect();
        self.journal
            .append_batch(now_ms, first_seq, &resizes, &writes, &points, &images)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidInput => ApplyError::Invalid(e.to_string()),
                _ => io("write the journal in", &self.dir, e),
            })
    }

    /// A write failed half-way through the uncommitted batches: put the images back to the
    /// durable cursor (the batches are sent again), or refuse everything until reopened.
    fn undo_uncommitted(&mut self, cause: ApplyError) -> ApplyError {
        let images: Vec<Arc<File>> = self.disks.iter().map(|(_, f)| f.clone()).collect();
        let refs: Vec<&File> = images.iter().map(|f| &**f).collect();
        let rolled = self
            .journal
            .roll_back_uncommitted(&refs)
            .and_then(|_| self.restore_sizes());
        match rolled {
            Ok(()) => {
                let sizes = self.pending_sizes.clone();
                self.journal.set_sizes(&sizes);
                self.pending_seq = self.state.applied_seq;
                self.pending_generation = self.state.generation;
                cause
            }
            Err(e) => {
                self.broken = true;
                ApplyError::Io(format!("{cause}; rolling back failed too: {e}"))
            }
        }
    }

    /// Puts every image back to its committed size.
    fn restore_sizes(&mut self) -> std::io::Result<()> {
        let committed = self.state.sizes.clone().unwrap_or_default();
        for (i, (_, f)) in self.disks.iter().enumerate() {
            if let Some(&size) = committed.get(i) {
                if self.pending_sizes[i] != size {
                    f.set_len(size)?;
                    self.pending_sizes[i] = size;
                }
            }
        }
        Ok(())
    }

    /// Debug fault injection (`apply-panic`, `apply-abort`): logs the batch's before-images and
    /// writes the first half of its records, as a crash half-way through would leave them.
    pub(crate) fn write_half_for_fault(
        &mut self,
        first_seq: u64,
        last_seq: u64,
        body: &BatchBody,
        now_ms: u64,
    ) -> Result<(), ApplyError> {
        self.check_usable()?;
        let sizes = self.sizes_after(body)?;
        self.validate(first_seq, last_seq, body, &sizes)?;
        self.journal_batch(first_seq, body, &sizes, now_ms)?;
        for r in body.records.iter().take(body.records.len().div_ceil(2)) {
            let (d, f) = &self.disks[r.disk as usize];
            f.write_all_at(&r.data, r.offset)
                .map_err(|e| ApplyError::Io(format!("write {}: {e}", d.name)))?;
        }
        Ok(())
    }

    /// Every record names a disk, fits in it (at the batch's sizes) and carries a seq of the
    /// batch.
    fn validate(
        &self,
        first_seq: u64,
        last_seq: u64,
        body: &BatchBody,
        sizes: &[u64],
    ) -> Result<(), ApplyError> {
        for r in &body.records {
            let (d, _) = self.disks.get(r.disk as usize).ok_or_else(|| {
                ApplyError::Invalid(format!(
                    "record names disk #{} of {}",
                    r.disk,
                    self.disks.len()
                ))
            })?;
            let size = sizes[r.disk as usize];
            let end = r.offset.checked_add(r.data.len() as u64);
            if end.is_none_or(|end| end > size) {
                return Err(ApplyError::Invalid(format!(
                    "write at {}+{} is beyond disk {} ({size} bytes)",
                    r.offset,
                    r.data.len(),
                    d.name,
                )));
            }
            if r.seq < first_seq || r.seq > last_seq {
                return Err(ApplyError::Invalid(format!(
                    "record seq {} outside batch {first_seq}..={last_seq}",
                    r.seq
                )));
            }
        }
        if body.records.windows(2).any(|w| w[1].seq < w[0].seq) {
            return Err(ApplyError::Invalid("records out of seq order".into()));
        }
        let mut prev = None;
        for p in &body.points {
            if p.seq < first_seq || p.seq > last_seq || prev.is_some_and(|q| q >= p.seq) {
                return Err(ApplyError::Invalid(format!(
                    "recovery point seq {} outside batch {first_seq}..={last_seq} or out of order",
                    p.seq
                )));
            }
            prev = Some(p.seq);
            let marker = body
                .records
                .binary_search_by_key(&p.seq, |r| r.seq)
                .ok()
                .map(|i| &body.records[i]);
            if !marker.is_some_and(|r| r.data.is_empty()) {
                return Err(ApplyError::Invalid(format!(
                    "recovery point seq {} is not a marker record of the batch",
                    p.seq
                )));
            }
            if p.name.as_ref().is_some_and(|n| n.len() > journal::MAX_NAME) {
                return Err(ApplyError::Invalid("recovery point name too long".into()));
            }
        }
        Ok(())
    }

    /// Makes everything applied so far durable: fsync the images, then record the cursor.
    pub fn commit(&mut self) -> Result<u64, ApplyError> {
        self.check_usable()?;
        for (i, (d, f)) in self.disks.iter().enumerate() {
            if self.dirty[i] {
                f.sync_data()
                    .map_err(|e| ApplyError::Io(format!("fsync {}: {e}", d.name)))?;
            }
        }
        self.dirty.iter_mut().for_each(|d| *d = false);
        let sizes = Some(self.pending_sizes.clone());
        let changed = self.pending_seq != self.state.applied_seq
            || self.pending_generation != self.state.generation
            || sizes != self.state.sizes;
        if changed || !self.dir.join("state").exists() {
            let next = ReplicaState {
                applied_seq: self.pending_seq,
                generation: self.pending_generation,
                sizes,
                ..self.state.clone()
            };
            let bytes =
                haven_transport::codec::encode(&next).map_err(|e| ApplyError::Io(e.to_string()))?;
            let path = self.dir.join("state");
            write_atomic(&path, &bytes).map_err(|e| io("write", &path, e))?;
            self.state = next;
        }
        // The cursor covers every journaled batch now: its records are history, its points
        // are in the catalogue.
        self.journal.set_durable(self.state.applied_seq);
        Ok(self.state.applied_seq)
    }

    /// Failback: makes the images equal to the recovery disks (`read(disk, offset, buf)`,
    /// of `sizes`), writing only the 4 KiB blocks that differ, as journaled batches under
    /// `generation` (every older generation is fenced from the first on), each committed;
    /// then a recovery point named `point_name` marks the state the machine came home with.
    /// The history before stays viewable: each batch journals what it overwrites, like a
    /// stream's. A crash half-way leaves committed batches, and running it again finds the
    /// rest. Only `ranges[disk]` (4 KiB-aligned byte ranges, in order) is compared: the
    /// caller knows the disks are equal outside them (see `CowDisk::differs_from_replica`);
    /// `(0, size)` compares all. Returns (bytes compared, bytes written).
    pub fn rewrite_to(
        &mut self,
        generation: u64,
        sizes: &[u64],
        ranges: &[Vec<(u64, u64)>],
        read: &ReadDisk<'_>,
        now_ms: u64,
        point_name: &str,
    ) -> Result<(u64, u64), ApplyError> {
        const CHUNK: u64 = 1 << 20;
        const BATCH_BYTES: usize = 8 << 20;
        self.check_usable()?;
        self.check_generation(generation)?;
        if sizes.len() != self.disks.len() || ranges.len() != sizes.len() {
            return Err(ApplyError::Invalid(format!(
                "{} recovery disks ({} with ranges) for {} replica disks",
                sizes.len(),
                ranges.len(),
                self.disks.len()
            )));
        }
        let (mut compared, mut written) = (0u64, 0u64);
        let mut runs: Vec<WriteRecord> = vec![];
        let mut pending = 0usize;
        let mut theirs = vec![0u8; CHUNK as usize];
        let mut ours = vec![0u8; CHUNK as usize];
        let chunks = sizes
            .iter()
            .zip(ranges)
            .enumerate()
            .flat_map(|(disk, (&size, r))| {
                r.iter().flat_map(move |&(s, e)| {
                    let (s, e) = (s / BLOCK * BLOCK, e.min(size));
                    (s..e)
                        .step_by(CHUNK as usize)
                        .map(move |at| (disk, at, (e - at).min(CHUNK) as usize))
                })
            });
        for (disk, at, len) in chunks {
            read(disk as u16, at, &mut theirs[..len])
                .map_err(|e| ApplyError::Io(format!("read the recovery disk: {e}")))?;
            // The image as it is (beyond its current end: zeros).
            let have = self.pending_sizes[disk].saturating_sub(at).min(len as u64) as usize;
            ours[..len].fill(0);
            let (d, f) = &self.disks[disk];
            f.read_exact_at(&mut ours[..have], at)
                .map_err(|e| ApplyError::Io(format!("read {}: {e}", d.name)))?;
            for (i, (a, b)) in theirs[..len]
                .chunks(BLOCK as usize)
                .zip(ours[..len].chunks(BLOCK as usize))
                .enumerate()
            {
                if a == b {
                    continue;
                }
                let offset = at + (i as u64) * BLOCK;
                match runs.last_mut() {
                    Some(r)
                        if r.disk == disk as u16
                            && r.offset + r.data.len() as u64 == offset
                            && r.data.len() < BATCH_BYTES =>
                    {
                        r.data.extend_from_slice(a)
                    }
                    _ => runs.push(WriteRecord {
                        seq: 0,
                        disk: disk as u16,
                        offset,
                        data: serde_bytes::ByteBuf::from(a.to_vec()),
                    }),
                }
                pending += a.len();
                written += a.len() as u64;
            }
            compared += len as u64;
            if pending >= BATCH_BYTES {
                self.apply_local(generation, std::mem::take(&mut runs), sizes, None, now_ms)?;
                pending = 0;
            }
        }
        if !runs.is_empty() {
            self.apply_local(generation, runs, sizes, None, now_ms)?;
        }
        let point = PointMark {
            seq: 0,
            time_ms: now_ms,
            kind: PointKind::Named,
            name: Some(point_name.to_string()),
        };
        self.apply_local(generation, vec![], sizes, Some(point), now_ms)?;
        Ok((compared, written))
    }

    /// Applies and commits one batch made here (failback): `records` at the next seq, or a
    /// marker carrying `point`.
    fn apply_local(
        &mut self,
        generation: u64,
        mut records: Vec<WriteRecord>,
        sizes: &[u64],
        point: Option<PointMark>,
        now_ms: u64,
    ) -> Result<(), ApplyError> {
        let seq = self.pending_seq + 1;
        records.iter_mut().for_each(|r| r.seq = seq);
        let points = match point {
            Some(p) => {
                records.push(WriteRecord {
                    seq,
                    disk: 0,
                    offset: 0,
                    data: serde_bytes::ByteBuf::new(),
                });
                vec![PointMark { seq, ..p }]
            }
            None => vec![],
        };
        let body = BatchBody {
            records,
            disk_sizes: sizes.to_vec(),
            points,
        };
        self.apply(generation, seq, seq, &body, now_ms)?;
        self.commit()?;
        Ok(())
    }

    /// The catalogue: committed, viewable recovery points, oldest first.
    pub fn points(&self) -> Vec<RecoveryPoint> {
        self.journal
            .points()
            .into_iter()
            .map(|p| RecoveryPoint {
                seq: p.seq,
                time_ms: p.time_ms,
                kind: kind_of(p.kind),
                name: p.name,
                applied_ms: p.journal_ms,
            })
            .collect()
    }

    pub fn journal_stats(&self) -> JournalStats {
        self.journal.stats()
    }

    /// The disks as of the committed recovery point at `point_seq` (see [`ReplicaView`]).
    /// Time to open grows with the journal records after the point, not with the disks.
    pub fn view(&self, point_seq: u64) -> Result<ReplicaView, ApplyError> {
        let view = self.journal.view(point_seq).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ApplyError::Invalid(e.to_string()),
            _ => ApplyError::Io(format!("view: {e}")),
        })?;
        Ok(ReplicaView {
            view,
            images: self.disks.iter().map(|(_, f)| f.clone()).collect(),
        })
    }

    /// The default policy for this replica's disks.
    pub fn default_policy(&self) -> RetentionPolicy {
        RetentionPolicy::for_disks(&self.pending_sizes)
    }

    /// Prunes history to `policy` at `now_ms` (see `haven_storage::journal::Journal::prune`).
    /// A report with `cap_reached` is an event: the cap, not the window, bounds history.
    pub fn prune(
        &mut self,
        now_ms: u64,
        policy: &RetentionPolicy,
    ) -> Result<PruneReport, ApplyError> {
        self.check_usable()?;
        self.journal
            .prune(now_ms, policy.retention_ms, policy.cap_bytes)
            .map_err(|e| io("prune the journal in", &self.dir, e))
    }
}

/// The epoch of the replica in `dir`, if it has a cursor.
pub fn stored_epoch(dir: &Path) -> Result<Option<u32>, ApplyError> {
    Ok(read_state(dir)?.map(|s| s.epoch))
}

fn read_state(dir: &Path) -> Result<Option<ReplicaState>, ApplyError> {
    let state_path = dir.join("state");
    read_optional(&state_path)
        .map_err(|e| io("read", &state_path, e))?
        .map(|b| haven_transport::codec::decode(&b))
        .transpose()
        .map_err(|e| {
            ApplyError::Io(format!(
                "replica state {} is unreadable: {e}",
                state_path.display()
            ))
        })
}

fn roll_back_logged(dir: &Path, machine: &str, s: &ReplicaState) -> Result<usize, ApplyError> {
    let mut n = 0;
    // Upgrade path: the undo log of a previous version is rolled back once, then deleted.
    let undo_path = dir.join(undo::FILE_NAME);
    if undo_path.exists() {
        n += undo::roll_back(dir, s.epoch, s.applied_seq)
            .map_err(|e| io("roll back the undo log of", dir, e))?;
        std::fs::remove_file(&undo_path).map_err(|e| io("remove", &undo_path, e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("fsync", dir, e))?;
    }
    let journal_dir = dir.join(journal::DIR_NAME);
    if let Some(names) = s.names.as_ref().filter(|_| journal_dir.exists()) {
        let images = names
            .iter()
            .map(|name| {
                let path = dir.join(format!("{name}.img"));
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| io("open", &path, e))
            })
            .collect::<Result<Vec<File>, _>>()?;
        let refs: Vec<&File> = images.iter().collect();
        n += Journal::roll_back(&journal_dir, s.epoch, s.applied_seq, &refs)
            .map_err(|e| io("roll back the journal of", dir, e))?;
    }
    // An uncommitted resize rolls back to the sizes in the cursor.
    if let (Some(names), Some(sizes)) = (&s.names, &s.sizes) {
        for (name, &size) in names.iter().zip(sizes) {
            let path = dir.join(format!("{name}.img"));
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| io("open", &path, e))?;
            if f.metadata().map_err(|e| io("stat", &path, e))?.len() != size {
                f.set_len(size).map_err(|e| io("resize", &path, e))?;
                f.sync_all().map_err(|e| io("fsync", &path, e))?;
            }
        }
    }
    if n > 0 {
        tracing::warn!(
            %machine,
            applied_seq = s.applied_seq,
            ranges = n,
            "rolled back a batch that was half applied when the master target stopped; the replica is at its durable cursor"
        );
    }
    Ok(n)
}

/// Rolls every replica under `replicas_dir` back to its durable cursor (see `haven_storage::journal`), so
/// what a restarted master target holds is consistent before any stream arrives.
pub fn recover_all(replicas_dir: &Path) -> Result<(), ApplyError> {
    let entries = match std::fs::read_dir(replicas_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("list", replicas_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io("list", replicas_dir, e))?;
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let machine = entry.file_name().to_string_lossy().into_owned();
        if let Some(s) = read_state(&dir)? {
            roll_back_logged(&dir, &machine, &s)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::WriteRecord;
    use serde_bytes::ByteBuf;

    fn body(seq0: u64, writes: &[(u64, &[u8])]) -> BatchBody {
        BatchBody {
            disk_sizes: vec![],
            points: vec![],
            records: writes
                .iter()
                .enumerate()
                .map(|(i, (off, data))| WriteRecord {
                    seq: seq0 + i as u64,
                    disk: 0,
                    offset: *off,
                    data: ByteBuf::from(data.to_vec()),
                })
                .collect(),
        }
    }

    fn disks() -> Vec<DiskInfo> {
        vec![DiskInfo::new("d0", 1 << 16)]
    }

    fn image(dir: &Path) -> Vec<u8> {
        std::fs::read(Replica::image_path(dir, "m", "d0")).unwrap()
    }

    #[test]
    fn applies_in_order_and_ignores_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        assert_eq!(
            r.apply(1, 1, 2, &body(1, &[(0, b"aa"), (10, b"bb")]), 0)
                .unwrap(),
            Applied::Applied
        );
        assert_eq!(
            r.apply(1, 3, 3, &body(3, &[(0, b"cc")]), 0).unwrap(),
            Applied::Applied
        );
        // A resend of seq 1..2 must not undo seq 3.
        assert_eq!(
            r.apply(1, 1, 2, &body(1, &[(0, b"aa"), (10, b"bb")]), 0)
                .unwrap(),
            Applied::Duplicate
        );
        assert_eq!(r.commit().unwrap(), 3);
        let img = image(dir.path());
        assert_eq!(&img[0..2], b"cc");
        assert_eq!(&img[10..12], b"bb");
        assert_eq!(img.len(), 1 << 16);
    }

    #[test]
    fn an_older_generation_is_fenced_once_a_newer_one_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        r.apply(3, 1, 1, &body(1, &[(0, b"a")]), 0).unwrap();
        // Generation 3 delivered; the old process server (generation 2) is refused.
        assert_eq!(
            r.apply(2, 2, 2, &body(2, &[(0, b"X")]), 0),
            Err(ApplyError::StaleGeneration { got: 2, have: 3 })
        );
        assert_eq!(
            r.check_generation(2),
            Err(ApplyError::StaleGeneration { got: 2, have: 3 })
        );
        r.apply(4, 2, 2, &body(2, &[(0, b"b")]), 0).unwrap();
        r.commit().unwrap();
        drop(r);
        // The fence survives a restart.
        let r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        assert_eq!(r.generation(), 4);
        assert!(r.check_generation(3).is_err());
        assert_eq!(&image(dir.path())[0..1], b"b");
    }

    #[test]
    fn gap_is_refused_and_nothing_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        assert_eq!(
            r.apply(1, 5, 5, &body(5, &[(0, b"zz")]), 0),
            Err(ApplyError::Gap {
                applied: 0,
                first: 5
            })
        );
        assert!(image(dir.path()).iter().all(|b| *b == 0));
    }

    #[test]
    fn invalid_record_leaves_disk_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        // First record valid, second beyond the end: the whole batch is refused.
        let bad = body(1, &[(0, b"xx"), ((1 << 16) - 1, b"yy")]);
        assert!(matches!(
            r.apply(1, 1, 2, &bad, 0),
            Err(ApplyError::Invalid(_))
        ));
        assert!(image(dir.path()).iter().all(|b| *b == 0));
        let mut wrong_disk = body(1, &[(0, b"xx")]);
        wrong_disk.records[0].disk = 3;
        assert!(matches!(
            r.apply(1, 1, 1, &wrong_disk, 0),
            Err(ApplyError::Invalid(_))
        ));
        assert_eq!(r.applied_seq(), 0);
    }

    #[test]
    fn a_batch_torn_by_a_crash_is_rolled_back_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
            r.apply(1, 1, 2, &body(1, &[(0, b"aaaa"), (100, b"bbbb")]), 0)
                .unwrap();
            r.commit().unwrap();
            // Uncommitted: a whole batch, then half of the next one (a crash in between).
            r.apply(1, 3, 3, &body(3, &[(2, b"cc")]), 0).unwrap();
            let torn = body(4, &[(0, b"dd"), (100, b"ee"), (200, b"ff")]);
            r.write_half_for_fault(4, 6, &torn, 0).unwrap();
            let img = image(dir.path());
            assert_eq!((&img[0..4], &img[100..104]), (&b"ddcc"[..], &b"eebb"[..]));
        }
        // Reopening (as a restarted master target does) restores the state at seq 2 exactly.
        let r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        assert_eq!(r.applied_seq(), 2);
        let img = image(dir.path());
        assert_eq!((&img[0..4], &img[100..104]), (&b"aaaa"[..], &b"bbbb"[..]));
        assert!(img[4..100].iter().chain(&img[104..]).all(|b| *b == 0));
        // recover_all (startup) finds nothing left to undo and changes nothing.
        drop(r);
        recover_all(dir.path()).unwrap();
        assert_eq!(image(dir.path()), img);
    }

    #[test]
    fn cursor_survives_reopen_and_new_epoch_resets() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
            r.apply(1, 1, 1, &body(1, &[(0, b"q")]), 0).unwrap();
            r.commit().unwrap();
            // Applied but not committed: must not be claimed after a crash.
            r.apply(1, 2, 2, &body(2, &[(1, b"r")]), 0).unwrap();
        }
        let r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        assert_eq!(r.applied_seq(), 1);
        // ...and its write is rolled back: the image is the state at seq 1.
        assert_eq!(&image(dir.path())[0..2], b"q\0");
        assert!(matches!(
            Replica::open(dir.path(), "m", 0, &disks()),
            Err(ApplyError::StaleEpoch { .. })
        ));
        drop(r);
        let r = Replica::open(dir.path(), "m", 2, &disks()).unwrap();
        assert_eq!(r.applied_seq(), 0);
        assert!(image(dir.path()).iter().all(|b| *b == 0));
    }

    /// A batch of (disk 0) writes and markers; `None` data is a marker carrying a point.
    fn pbody(seq0: u64, ops: &[Option<(u64, &[u8])>]) -> BatchBody {
        let mut b = BatchBody {
            disk_sizes: vec![],
            points: vec![],
            records: vec![],
        };
        for (i, op) in ops.iter().enumerate() {
            let seq = seq0 + i as u64;
            let (offset, data) = op.unwrap_or((0, b""));
            b.records.push(WriteRecord {
                seq,
                disk: 0,
                offset,
                data: ByteBuf::from(data.to_vec()),
            });
            if op.is_none() {
                b.points.push(crate::proto::PointMark {
                    seq,
                    time_ms: 1000 + seq,
                    kind: PointKind::Crash,
                    name: None,
                });
            }
        }
        b
    }

    /// The model: replays every write up to each point.
    fn replay(bodies: &[BatchBody], size: usize) -> std::collections::BTreeMap<u64, Vec<u8>> {
        let mut img = vec![0u8; size];
        let mut at = std::collections::BTreeMap::new();
        for b in bodies {
            for r in &b.records {
                img[r.offset as usize..r.offset as usize + r.data.len()].copy_from_slice(&r.data);
                if b.points.iter().any(|p| p.seq == r.seq) {
                    at.insert(r.seq, img.clone());
                }
            }
        }
        at
    }

    fn read_view(v: &ReplicaView) -> Vec<u8> {
        let mut b = vec![0u8; v.size(0).unwrap() as usize];
        assert_eq!(v.read(0, 0, &mut b).unwrap(), b.len());
        b
    }

    fn random_bodies(seed: u64, n: usize, seq0: u64) -> Vec<BatchBody> {
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut seq = seq0;
        let mut out = vec![];
        let bufs: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i * 31 + 1; 5000]).collect();
        for _ in 0..n {
            let k = 1 + next() % 8;
            let ops: Vec<Option<(u64, &[u8])>> = (0..k)
                .map(|_| {
                    if next() % 4 == 0 {
                        None
                    } else {
                        let off = (next() % 12) * 1000;
                        let len = 1 + (next() % 4000) as usize;
                        Some((off, &bufs[(next() % 8) as usize][..len]))
                    }
                })
                .collect();
            out.push(pbody(seq, &ops));
            seq += k;
        }
        out
    }

    #[test]
    fn every_point_views_the_state_replayed_up_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        // Seq 1 writes, 2 is a point, 3 rewrites the range, 4 a point (one batch).
        let mut bodies = vec![pbody(
            1,
            &[Some((0, b"aaaa")), None, Some((2, b"bbbb")), None],
        )];
        bodies.extend(random_bodies(7, 40, 5));
        let mut seq = 1;
        for (i, b) in bodies.iter().enumerate() {
            let last = b.records.last().unwrap().seq;
            r.apply(1, seq, last, b, 1000 * i as u64).unwrap();
            seq = last + 1;
            if i % 3 == 0 {
                r.commit().unwrap();
            }
        }
        r.commit().unwrap();
        let want = replay(&bodies, 1 << 16);
        let points = r.points();
        assert_eq!(points.len(), want.len());
        assert_eq!(points[0].seq, 2);
        assert_eq!(&read_view(&r.view(2).unwrap())[..6], b"aaaa\0\0");
        assert_eq!(&read_view(&r.view(4).unwrap())[..6], b"aabbbb");
        for p in &points {
            assert!(
                read_view(&r.view(p.seq).unwrap()) == want[&p.seq],
                "point {}",
                p.seq
            );
        }
        // A seq that is no point is refused.
        assert!(matches!(r.view(3), Err(ApplyError::Invalid(_))));
        // The image is the latest state; the history survives a reopen.
        let last = *want.keys().last().unwrap();
        drop(r);
        let r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        assert_eq!(r.points(), points);
        for p in &points {
            assert!(read_view(&r.view(p.seq).unwrap()) == want[&p.seq]);
        }
        assert!(r.journal_stats().bytes > 0);
        let _ = last;
    }

    #[test]
    fn a_failback_rewrite_writes_only_the_differing_blocks_journaled_under_its_generation() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        // The replica at the failover point: 4 KiB of 'a' at block 1, then a point (seq 2).
        let a = vec![b'a'; 4096];
        r.apply(1, 1, 2, &pbody(1, &[Some((4096, &a)), None]), 1000)
            .unwrap();
        r.commit().unwrap();
        let before = image(dir.path());
        // The recovery disk: block 1 rewritten, blocks 9 and 10 written, one byte of block 15.
        let mut theirs = before.clone();
        theirs[4096..8192].fill(b'r');
        theirs[9 * 4096..11 * 4096].fill(b's');
        theirs[(1 << 16) - 1] = 1;
        let read = |disk: u16, offset: u64, buf: &mut [u8]| {
            assert_eq!(disk, 0);
            let o = offset as usize;
            buf.copy_from_slice(&theirs[o..o + buf.len()]);
            Ok(())
        };
        let (compared, written) = r
            .rewrite_to(
                2,
                &[1 << 16],
                &[vec![(0, 1 << 16)]],
                &read,
                5000,
                "failback",
            )
            .unwrap();
        assert_eq!((compared, written), (1 << 16, 4 * 4096));
        assert!(
            image(dir.path()) == theirs,
            "the replica equals the recovery disk"
        );
        // Journaled: the point before still shows the failover point's content; the new point
        // is the state the machine came home with; the old generation is fenced.
        let points = r.points();
        let last = points.last().unwrap();
        assert_eq!(
            (last.kind, last.name.as_deref()),
            (PointKind::Named, Some("failback"))
        );
        assert!(read_view(&r.view(2).unwrap()) == before);
        assert!(read_view(&r.view(last.seq).unwrap()) == theirs);
        assert!(r.check_generation(1).is_err());
        // Run again (a crash after it, the order repeated): nothing differs, nothing is written.
        let (_, again) = r
            .rewrite_to(
                2,
                &[1 << 16],
                &[vec![(0, 1 << 16)]],
                &read,
                6000,
                "failback",
            )
            .unwrap();
        assert_eq!(again, 0);
        // Given ranges, only they are compared (and written where they differ).
        let mut later = theirs.clone();
        later[4096..8192].fill(b'x');
        later[9 * 4096] = b'y';
        let read_later = |_disk: u16, offset: u64, buf: &mut [u8]| {
            let o = offset as usize;
            buf.copy_from_slice(&later[o..o + buf.len()]);
            Ok(())
        };
        let (compared, written) = r
            .rewrite_to(
                3,
                &[1 << 16],
                &[vec![(4096, 8192)]],
                &read_later,
                7000,
                "failback",
            )
            .unwrap();
        assert_eq!((compared, written), (4096, 4096));
        assert_eq!(&image(dir.path())[4096..8192], &later[4096..8192]);
        assert_eq!(image(dir.path())[9 * 4096], b's');
        let (_, written) = r
            .rewrite_to(
                3,
                &[1 << 16],
                &[vec![(0, 1 << 16)]],
                &read,
                8000,
                "failback",
            )
            .unwrap();
        assert_eq!(written, 4096, "back to the recovery disk: block 1");
        drop(r);
        let r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        assert!(image(dir.path()) == theirs);
        assert_eq!(r.generation(), 3);
    }

    #[test]
    fn invalid_points_are_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        // A point on a record that carries data.
        let mut b = pbody(1, &[Some((0, b"xx")), None]);
        b.points[0].seq = 1;
        assert!(matches!(
            r.apply(1, 1, 2, &b, 0),
            Err(ApplyError::Invalid(_))
        ));
        // A point outside the batch.
        let mut b = pbody(1, &[Some((0, b"xx")), None]);
        b.points[0].seq = 9;
        assert!(matches!(
            r.apply(1, 1, 2, &b, 0),
            Err(ApplyError::Invalid(_))
        ));
        // Records out of seq order.
        let mut b = pbody(1, &[Some((0, b"xx")), Some((4, b"yy"))]);
        b.records.swap(0, 1);
        assert!(matches!(
            r.apply(1, 1, 2, &b, 0),
            Err(ApplyError::Invalid(_))
        ));
        assert!(image(dir.path()).iter().all(|b| *b == 0));
        assert_eq!(r.applied_seq(), 0);
        // The valid batch applies.
        r.apply(1, 1, 2, &pbody(1, &[Some((0, b"xx")), None]), 0)
            .unwrap();
        r.commit().unwrap();
        assert_eq!(r.points().len(), 1);
    }

    #[test]
    fn a_view_reads_the_point_while_batches_keep_applying() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        let first = random_bodies(3, 10, 1);
        let mut seq = 1;
        for b in &first {
            let last = b.records.last().unwrap().seq;
            r.apply(1, seq, last, b, 0).unwrap();
            seq = last + 1;
        }
        r.commit().unwrap();
        let want = replay(&first, 1 << 16);
        let (&p, img) = want.iter().next_back().unwrap();
        let img = img.clone();
        let view = std::sync::Arc::new(r.view(p).unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (view, stop) = (view.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 50 {
                    let off = (n * 7919) % 60000;
                    let mut b = vec![0u8; 4096];
                    view.read(0, off, &mut b).unwrap();
                    assert!(
                        b[..] == img[off as usize..off as usize + 4096],
                        "read at {off}"
                    );
                    n += 1;
                }
                n
            })
        };
        for (i, b) in random_bodies(9, 200, seq).iter().enumerate() {
            let last = b.records.last().unwrap().seq;
            r.apply(1, seq, last, b, i as u64).unwrap();
            seq = last + 1;
            if i % 4 == 0 {
                r.commit().unwrap();
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() >= 50);
        // Reopening the replica closes the views of the old one.
        r.commit().unwrap();
        drop(r);
        let mut b = [0u8; 4];
        assert!(view.read(0, 0, &mut b).is_err());
    }

    #[test]
    fn a_torn_batch_rolls_back_and_the_history_stays() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
            r.apply(1, 1, 2, &pbody(1, &[Some((0, b"aaaa")), None]), 5)
                .unwrap();
            r.commit().unwrap();
            r.apply(1, 3, 4, &pbody(3, &[Some((2, b"bb")), None]), 6)
                .unwrap();
            r.commit().unwrap();
            // Uncommitted: a whole batch with a point, then half of the next.
            r.apply(1, 5, 6, &pbody(5, &[Some((0, b"cc")), None]), 7)
                .unwrap();
            let torn = pbody(7, &[Some((0, b"dd")), Some((100, b"ee")), None]);
            r.write_half_for_fault(7, 9, &torn, 8).unwrap();
        }
        let state = read_state(&dir.path().join("m")).unwrap().unwrap();
        assert_eq!(
            roll_back_logged(&dir.path().join("m"), "m", &state).unwrap(),
            3
        );
        let r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        assert_eq!(r.applied_seq(), 4);
        let img = image(dir.path());
        assert_eq!(&img[0..4], b"aabb");
        assert!(img[4..].iter().all(|b| *b == 0));
        let seqs: Vec<u64> = r.points().iter().map(|p| p.seq).collect();
        assert_eq!(seqs, vec![2, 4]);
        assert_eq!(&read_view(&r.view(2).unwrap())[..4], b"aaaa");
        assert_eq!(r.points()[0].applied_ms, 5);
        assert_eq!(r.points()[0].time_ms, 1002);
    }

    #[test]
    fn an_undo_log_of_a_previous_version_is_rolled_back_once_then_deleted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
            r.apply(1, 1, 1, &body(1, &[(0, b"kept")]), 0).unwrap();
            r.commit().unwrap();
        }
        // What the previous version left after a crash half-way through seq 2.
        let mdir = dir.path().join("m");
        std::fs::remove_dir_all(mdir.join(journal::DIR_NAME)).unwrap();
        let img = OpenOptions::new()
            .read(true)
            .write(true)
            .open(Replica::image_path(dir.path(), "m", "d0"))
            .unwrap();
        let mut log = undo::UndoLog::open_empty(&mdir).unwrap();
        log.save(1, 2, "d0", &img, 0, 4).unwrap();
        log.sync().unwrap();
        img.write_all_at(b"TORN", 0).unwrap();
        drop(log);
        let r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        assert_eq!(&image(dir.path())[..4], b"kept");
        assert!(!mdir.join(undo::FILE_NAME).exists());
        assert_eq!(r.applied_seq(), 1);
    }

    #[test]
    fn prune_keeps_the_policy_and_reports_the_cap() {
        let policy = RetentionPolicy::for_disks(&[10 << 30, 0]);
        assert_eq!(policy.cap_bytes, 1 << 30);
        assert_eq!(policy.retention_ms, 24 * 3600 * 1000);
        assert_eq!(RetentionPolicy::for_disks(&[1 << 20]).cap_bytes, 64 << 20);
        let dir = tempfile::tempdir().unwrap();
        let mut r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
        let bodies = random_bodies(5, 30, 1);
        let mut seq = 1;
        for (i, b) in bodies.iter().enumerate() {
            let last = b.records.last().unwrap().seq;
            r.apply(1, seq, last, b, i as u64 * 1000).unwrap();
            r.commit().unwrap();
            seq = last + 1;
        }
        let n = r.points().len();
        let report = r
            .prune(
                30_000,
                &RetentionPolicy {
                    retention_ms: 3_600_000,
                    cap_bytes: 1 << 30,
                },
            )
            .unwrap();
        assert!(!report.cap_reached);
        assert_eq!(r.points().len(), n);
        // A tiny cap: history shrinks, and it says so.
        let report = r
            .prune(
                30_000,
                &RetentionPolicy {
                    retention_ms: 3_600_000,
                    cap_bytes: 1,
                },
            )
            .unwrap();
        assert!(report.cap_reached, "{report:?}");
        assert!(r.journal_stats().cap_shortened_since_ms.is_some());
        let want = replay(&bodies, 1 << 16);
        for p in r.points() {
            assert!(read_view(&r.view(p.seq).unwrap()) == want[&p.seq]);
        }
    }
}
