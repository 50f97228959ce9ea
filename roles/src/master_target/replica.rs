//! A machine's replica disks and its durable apply cursor.
//!
//! Images are sparse raw files at `<data>/replicas/<machine>/<disk>.img`; the cursor lives
//! in `state` next to them and is replaced atomically *after* the images are fsynced, so on
//! restart the cursor never claims more than the disks hold. Before a batch touches the
//! images, the before-images of the ranges it overwrites go to the undo log (`haven_storage::undo`), so a
//! crash half-way through a batch is rolled back on open: the images are then exactly the
//! state at the cursor, never a torn batch. Re-applying a batch after a crash is harmless: a
//! seq always carries the same bytes.
//!
//! A disk's size travels in the stream (`BatchBody::disk_sizes`): a batch that grows a disk
//! extends its image (sparse) before its records are applied; one that shrinks it (an
//! operator's `resync` of a shrunk disk) logs the cut-off tail in the undo log first. The
//! committed sizes are part of the cursor, and opening a replica sets every image to them, so
//! an uncommitted resize is undone like an uncommitted write.
use std::{
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use haven_cluster::DiskInfo;
use serde::{Deserialize, Serialize};

use crate::fsutil::{read_optional, write_atomic};
use crate::proto::BatchBody;
use haven_storage::undo::{self, UndoLog};

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

pub struct Replica {
    dir: PathBuf,
    disks: Vec<(DiskInfo, File)>,
    state: ReplicaState,
    /// Applied in memory but not yet fsynced and recorded.
    pending_seq: u64,
    pending_generation: u64,
    pending_sizes: Vec<u64>,
    dirty: Vec<bool>,
    undo: UndoLog,
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
        if let Some(s) = stored.as_ref().filter(|_| !reset) {
            roll_back_logged(&dir, machine, s)?;
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
            files.push((d.clone(), f));
        }
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
        let undo = UndoLog::open_empty(&dir).map_err(|e| io("open undo log in", &dir, e))?;
        let mut r = Self {
            dir,
            undo,
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
    /// so an invalid batch leaves the disks untouched.
    pub fn apply(
        &mut self,
        generation: u64,
        first_seq: u64,
        last_seq: u64,
        body: &BatchBody,
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
        self.resize(first_seq, &sizes)?;
        self.save_before_images(first_seq, body)?;
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

    /// Grows (sparse) or shrinks images to `sizes`. A shrink first logs the tail it cuts off,
    /// so an uncommitted shrink rolls back like a write.
    fn resize(&mut self, first_seq: u64, sizes: &[u64]) -> Result<(), ApplyError> {
        const CHUNK: u64 = 1 << 20;
        let epoch = self.state.epoch;
        let mut logged = false;
        for (i, &to) in sizes.iter().enumerate() {
            let from = self.pending_sizes[i];
            if to < from {
                let (d, f) = &self.disks[i];
                let mut at = to;
                while at < from {
                    let n = (from - at).min(CHUNK);
                    self.undo
                        .save(epoch, first_seq, &d.name, f, at, n as usize)
                        .map_err(|e| io("write undo log", self.undo.path(), e))?;
                    at += n;
                }
                logged = true;
            }
        }
        if logged {
            self.undo
                .sync()
                .map_err(|e| io("write undo log", self.undo.path(), e))?;
        }
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

    /// Logs, durably, what the batch is about to overwrite (see `haven_storage::undo`).
    fn save_before_images(&mut self, first_seq: u64, body: &BatchBody) -> Result<(), ApplyError> {
        let epoch = self.state.epoch;
        let saved = body.records.iter().try_for_each(|r| {
            let (d, f) = &self.disks[r.disk as usize];
            self.undo
                .save(epoch, first_seq, &d.name, f, r.offset, r.data.len())
        });
        saved
            .and_then(|()| self.undo.sync())
            .map_err(|e| io("write undo log", self.undo.path(), e))
    }

    /// A write failed half-way through the uncommitted batches: put the images back to the
    /// durable cursor (the batches are sent again), or refuse everything until reopened.
    fn undo_uncommitted(&mut self, cause: ApplyError) -> ApplyError {
        let rolled = undo::roll_back(&self.dir, self.state.epoch, self.state.applied_seq)
            .and_then(|_| self.restore_sizes());
        match rolled {
            Ok(()) => {
                self.undo.forget();
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
    ) -> Result<(), ApplyError> {
        self.check_usable()?;
        let sizes = self.sizes_after(body)?;
        self.validate(first_seq, last_seq, body, &sizes)?;
        self.save_before_images(first_seq, body)?;
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
        // The cursor covers every logged batch now. (If this truncation is lost in a crash,
        // the records are at or below the cursor and recovery ignores them.)
        self.undo
            .clear()
            .map_err(|e| io("truncate undo log", self.undo.path(), e))?;
        Ok(self.state.applied_seq)
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

fn roll_back_logged(dir: &Path, machine: &str, s: &ReplicaState) -> Result<(), ApplyError> {
    let n = undo::roll_back(dir, s.epoch, s.applied_seq)
        .map_err(|e| io("roll back the undo log of", dir, e))?;
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
    Ok(())
}

/// Rolls every replica under `replicas_dir` back to its durable cursor (see `haven_storage::undo`), so
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
            r.apply(1, 1, 2, &body(1, &[(0, b"aa"), (10, b"bb")]))
                .unwrap(),
            Applied::Applied
        );
        assert_eq!(
            r.apply(1, 3, 3, &body(3, &[(0, b"cc")])).unwrap(),
            Applied::Applied
        );
        // A resend of seq 1..2 must not undo seq 3.
        assert_eq!(
            r.apply(1, 1, 2, &body(1, &[(0, b"aa"), (10, b"bb")]))
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
        r.apply(3, 1, 1, &body(1, &[(0, b"a")])).unwrap();
        // Generation 3 delivered; the old process server (generation 2) is refused.
        assert_eq!(
            r.apply(2, 2, 2, &body(2, &[(0, b"X")])),
            Err(ApplyError::StaleGeneration { got: 2, have: 3 })
        );
        assert_eq!(
            r.check_generation(2),
            Err(ApplyError::StaleGeneration { got: 2, have: 3 })
        );
        r.apply(4, 2, 2, &body(2, &[(0, b"b")])).unwrap();
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
            r.apply(1, 5, 5, &body(5, &[(0, b"zz")])),
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
            r.apply(1, 1, 2, &bad),
            Err(ApplyError::Invalid(_))
        ));
        assert!(image(dir.path()).iter().all(|b| *b == 0));
        let mut wrong_disk = body(1, &[(0, b"xx")]);
        wrong_disk.records[0].disk = 3;
        assert!(matches!(
            r.apply(1, 1, 1, &wrong_disk),
            Err(ApplyError::Invalid(_))
        ));
        assert_eq!(r.applied_seq(), 0);
    }

    #[test]
    fn a_batch_torn_by_a_crash_is_rolled_back_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut r = Replica::open(dir.path(), "m", 1, &disks()).unwrap();
            r.apply(1, 1, 2, &body(1, &[(0, b"aaaa"), (100, b"bbbb")]))
                .unwrap();
            r.commit().unwrap();
            // Uncommitted: a whole batch, then half of the next one (a crash in between).
            r.apply(1, 3, 3, &body(3, &[(2, b"cc")])).unwrap();
            let torn = body(4, &[(0, b"dd"), (100, b"ee"), (200, b"ff")]);
            r.write_half_for_fault(4, 6, &torn).unwrap();
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
            r.apply(1, 1, 1, &body(1, &[(0, b"q")])).unwrap();
            r.commit().unwrap();
            // Applied but not committed: must not be claimed after a crash.
            r.apply(1, 2, 2, &body(2, &[(1, b"r")])).unwrap();
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
}
