//! The recovery-point journal of a replica: the before-image of every range the replication
//! stream overwrites, tagged with the write's own seq and the time it was applied, kept for a
//! retention window after the batch is committed (the undo log of `undo.rs` dropped them at
//! commit). The replica image always holds the latest applied state, so failover to the
//! latest state needs no copying; the state at an older recovery point `P` is the image
//! overlaid, per byte, with the **oldest** journal record whose seq is greater than `P`
//! ([`View`]).
//!
//! It also keeps the undo role: before a batch touches the images its records are appended
//! and fdatasync'ed ([`Journal::append_batch`]); opening the journal rolls back, newest first,
//! every record above the durable cursor and cuts them off, so the images are exactly the
//! state at the cursor, and the records at or below it stay as history.
//!
//! # Layout
//!
//! `<replica dir>/journal/<id:016x>.seg`, ids increasing; records are appended to the newest
//! segment and a new one is started once it holds [`JournalOptions::segment_bytes`], or an
//! eighth of the cap if that is less ([`SEGMENTS_PER_CAP`]). History is pruned
//! ([`Journal::prune`]) a whole oldest segment at a time, so the cap drops the oldest part.
//!
//! ```text
//! segment = header | record*
//! header  = magic "HVRJ" u32 | version u16 | reserved u16 | epoch u32 | reserved u32
//!           | id u64 | crc32c u32 (of the 24 bytes before it)                    (28 bytes)
//! record  = magic "HVRr" u32 | kind u8 | flags u8 | disk u16 | seq u64 | time_ms u64
//!           | a u64 | b u64 | body_len u32 | body_crc u32 (crc32c of body)
//!           | header_crc u32 (crc32c of the 48 bytes before it) | body            (52 + body)
//! ```
//! little endian. `time_ms` is when the master target applied the batch (the injected clock).
//!
//! | kind | a | b | flags | body |
//! |---|---|---|---|---|
//! | 1 before-image | offset | len (≤ 256 KiB) | 1 = hole (reads as zeros) | the bytes, unless a hole |
//! | 2 point | the source's time (unix ms) | 0 | low 4 bits: kind code; 0x10: named; 0x20: carried | name (UTF-8, ≤ 4 KiB) |
//! | 3 disk size | size before | size after | 0 | — |
//! | 4 floor | newest point time the cap dropped | ms since the cap shortens history (0: no) | 0 | — |
//!
//! A before-image carries the seq of the write that overwrote the range; within a batch it is
//! the content *after* the batch's earlier writes (so a point between two writes of the same
//! range in one batch sees the first). A disk size record carries the batch's first seq (a
//! batch resizes before its writes); a shrink is followed by before-images of the cut tail. A
//! point record carries its own seq and sits after every record ≤ it and before every record
//! > it. Before-image and size records are in non-decreasing seq order.
//!
//! A floor record (seq `D`) is written when pruning drops records up to seq `D`: every point
//! with seq `< D` is unviewable from then on and is discarded on open too, even if the crash
//! came before the segments were deleted. Points in the dropped segments with seq `≥ D` are
//! still viewable (they need only records `> D`) and are copied forward first ("carried").
//!
//! # Recovery
//!
//! The header of every segment is checked (magic, crc, **version**: a segment of another
//! version refuses to open; one of another epoch means the replica was reset, and the whole
//! journal is dropped). The records of the last segment are checked whole (header and body
//! crc): a torn tail is cut (its batch had not touched the images, because the journal is
//! synced first). Earlier segments were synced before the next was created; their record
//! headers are checked, and one whose records stop short of its end is damaged: it and every
//! older segment are dropped and a floor is set after them (history is lost, not falsified).
//!
//! # Memory
//!
//! The index holds one 64-byte [`Entry`] per before-image or size record (about 1.6 % of a
//! journal of 4 KiB writes; 64 B per hole record of 52 B on disk, the worst case) and one
//! [`PointEntry`] per point.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use crate::undo::{is_hole, zero_range};

pub const DIR_NAME: &str = "journal";
pub const VERSION: u16 = 1;
const SEG_MAGIC: u32 = u32::from_le_bytes(*b"HVRJ");
const REC_MAGIC: u32 = u32::from_le_bytes(*b"HVRr");
pub const SEG_HEADER: usize = 28;
pub const REC_HEADER: usize = 52;
const KIND_IMAGE: u8 = 1;
const KIND_POINT: u8 = 2;
const KIND_SIZE: u8 = 3;
const KIND_FLOOR: u8 = 4;
const HOLE: u8 = 1;
const POINT_KIND_MASK: u8 = 0x0f;
const POINT_NAMED: u8 = 0x10;
const POINT_CARRIED: u8 = 0x20;
/// Longest range one before-image record holds: a view reads (and checks) a whole record to
/// serve a part of it, so records stay small.
pub const CHUNK: u64 = 256 << 10;
pub const MAX_NAME: usize = 4096;

/// A recovery point in the catalogue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointEntry {
    pub seq: u64,
    /// The source's clock when the point was taken (unix ms).
    pub time_ms: u64,
    /// The point's kind, a code the caller defines (0..=15).
    pub kind: u8,
    pub name: Option<String>,
    /// When the master target applied it (the batch time; retention counts from it).
    pub journal_ms: u64,
}

/// One write of a batch, in the batch's order. `data` empty: a marker (nothing journaled).
#[derive(Clone, Copy, Debug)]
pub struct Write<'a> {
    pub seq: u64,
    pub disk: u16,
    pub offset: u64,
    pub data: &'a [u8],
}

/// A disk resized by a batch (before its writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resize {
    pub disk: u16,
    pub from: u64,
    pub to: u64,
}

#[derive(Clone, Copy, Debug)]
pub struct JournalOptions {
    /// A new segment is started once the newest holds this much (or less under a small cap:
    /// [`SEGMENTS_PER_CAP`]).
    pub segment_bytes: u64,
}

/// Pruning for the cap drops a whole oldest segment at a time, so a segment is at most this
/// fraction of the cap (but at least [`MIN_CAP_SEGMENT_BYTES`]): reaching the cap then drops
/// the oldest eighth or so of history, not all of it. (With 64 MiB segments and the minimum
/// cap of 64 MiB, the first prune for the cap dropped the one full segment, i.e. every point.)
pub const SEGMENTS_PER_CAP: u64 = 8;
/// The smallest segment [`SEGMENTS_PER_CAP`] makes.
pub const MIN_CAP_SEGMENT_BYTES: u64 = 64 << 10;

impl Default for JournalOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
        }
    }
}

/// What opening found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Before-image and size records above the durable cursor written back (and cut).
    pub rolled_back: usize,
    /// Bytes of a torn tail cut from the last segment.
    pub torn_bytes: u64,
    /// Damaged segments dropped (with everything older).
    pub damaged_segments: usize,
    /// The journal was of another epoch (or the replica was reset) and was dropped.
    pub wiped: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub dropped_points: usize,
    pub dropped_segments: usize,
    /// The oldest point still viewable.
    pub oldest_point_seq: Option<u64>,
    /// The cap forced history shorter than the window, or the journal stays above the cap.
    pub cap_reached: bool,
    /// A view's pin kept the journal above the cap (the pinned point's seq).
    pub pinned_by: Option<u64>,
    /// How far back history reaches: now − the oldest point's journal time.
    pub held_ms: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    pub bytes: u64,
    /// The cap of the last prune (0 before any).
    pub cap_bytes: u64,
    pub segments: usize,
    pub records: usize,
    pub points: usize,
    /// Journal (apply) times of the oldest and newest committed point.
    pub oldest_point_ms: Option<u64>,
    pub newest_point_ms: Option<u64>,
    pub newest_point_seq: Option<u64>,
    /// Set while the cap has dropped points the retention window would have kept: since when.
    pub cap_shortened_since_ms: Option<u64>,
    /// Views open.
    pub pinned: usize,
}

/// The header of a before-image or size record, as the index holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub time_ms: u64,
    pub a: u64,
    pub b: u64,
    pub seg: u64,
    /// File offset of the record in its segment.
    pub at: u64,
    pub body_len: u32,
    pub body_crc: u32,
    pub disk: u16,
    pub kind: u8,
    pub flags: u8,
}

#[derive(Clone, Debug)]
struct PointLoc {
    point: PointEntry,
    seg: u64,
}

struct Seg {
    file: Arc<File>,
    bytes: u64,
    /// Index entries in this segment.
    entries: usize,
    max_seq: Option<u64>,
}

struct Index {
    closed: bool,
    /// Bumped when records are cut (uncommitted ones rolled back): views rebuild.
    cut_gen: u64,
    entries: VecDeque<Entry>,
    /// Absolute position of `entries[0]`.
    base: u64,
    segs: BTreeMap<u64, Seg>,
    /// By seq (includes uncommitted ones; `durable` filters them).
    points: Vec<PointLoc>,
    sizes: Vec<u64>,
    durable: u64,
    pins: BTreeMap<u64, usize>,
    /// Points with a smaller seq are gone.
    floor: u64,
    bytes: u64,
    cap_bytes: u64,
    cap_since_ms: Option<u64>,
    cap_lost_newest_ms: u64,
}

impl Index {
    fn end(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    /// Position (in `entries`) of the first entry with seq > `seq`.
    fn first_after(&self, seq: u64) -> usize {
        self.entries.partition_point(|e| e.seq <= seq)
    }
}

struct Shared {
    index: RwLock<Index>,
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }
}

struct Active {
    id: u64,
    file: Arc<File>,
    len: u64,
}

pub struct Journal {
    dir: PathBuf,
    epoch: u32,
    shared: Arc<Shared>,
    active: Option<Active>,
    next_id: u64,
    /// Highest seq appended.
    last_seq: u64,
    opts: JournalOptions,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn seg_name(id: u64) -> String {
    format!("{id:016x}.seg")
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads `buf.len()` bytes at `offset`; what lies beyond the end of the file reads as zeros.
fn read_full_at(f: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match f.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn segment_header(epoch: u32, id: u64) -> [u8; SEG_HEADER] {
    segment_header_version(epoch, id, VERSION)
}

/// A segment header of any version (tests and fuzzing write other versions).
pub fn segment_header_version(epoch: u32, id: u64, version: u16) -> [u8; SEG_HEADER] {
    let mut h = [0u8; SEG_HEADER];
    h[0..4].copy_from_slice(&SEG_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&version.to_le_bytes());
    h[8..12].copy_from_slice(&epoch.to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Appends a record; `body` is filled by `fill` (given the body slice) and checksummed after.
#[allow(clippy::too_many_arguments)]
fn push_record(
    buf: &mut Vec<u8>,
    kind: u8,
    flags: u8,
    disk: u16,
    seq: u64,
    time_ms: u64,
    a: u64,
    b: u64,
    body_len: usize,
    fill: impl FnOnce(&mut [u8]) -> io::Result<()>,
) -> io::Result<(usize, u32)> {
    let at = buf.len();
    buf.resize(at + REC_HEADER + body_len, 0);
    if let Err(e) = fill(&mut buf[at + REC_HEADER..]) {
        buf.truncate(at);
        return Err(e);
    }
    let body_crc = crc32c::crc32c(&buf[at + REC_HEADER..]);
    let h = &mut buf[at..at + REC_HEADER];
    h[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
    h[4] = kind;
    h[5] = flags;
    h[6..8].copy_from_slice(&disk.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&time_ms.to_le_bytes());
    h[24..32].copy_from_slice(&a.to_le_bytes());
    h[32..40].copy_from_slice(&b.to_le_bytes());
    h[40..44].copy_from_slice(&(body_len as u32).to_le_bytes());
    h[44..48].copy_from_slice(&body_crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&h[..48]);
    h[48..52].copy_from_slice(&hcrc.to_le_bytes());
    Ok((at, body_crc))
}

fn point_record(buf: &mut Vec<u8>, p: &PointEntry, carried: bool) -> io::Result<usize> {
    let name = p.name.as_deref().unwrap_or("").as_bytes();
    let mut flags = p.kind & POINT_KIND_MASK;
    if p.name.is_some() {
        flags |= POINT_NAMED;
    }
    if carried {
        flags |= POINT_CARRIED;
    }
    let (at, _) = push_record(
        buf,
        KIND_POINT,
        flags,
        0,
        p.seq,
        p.journal_ms,
        p.time_ms,
        0,
        name.len(),
        |b| {
            b.copy_from_slice(name);
            Ok(())
        },
    )?;
    Ok(at)
}

/// A record read back from a segment.
#[derive(Debug)]
struct Rec {
    entry: Entry,
    /// Point records: the name (if named).
    name: Option<String>,
}

/// Parses one record header at `h` (52 bytes); `None` if it is not a valid record.
fn parse_header(h: &[u8], seg: u64, at: u64) -> Option<Entry> {
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    if u32_at(0) != REC_MAGIC || crc32c::crc32c(&h[..48]) != u32_at(48) {
        return None;
    }
    let e = Entry {
        seq: u64_at(8),
        time_ms: u64_at(16),
        a: u64_at(24),
        b: u64_at(32),
        seg,
        at,
        body_len: u32_at(40),
        body_crc: u32_at(44),
        disk: u16::from_le_bytes([h[6], h[7]]),
        kind: h[4],
        flags: h[5],
    };
    let ok = match e.kind {
        KIND_IMAGE => {
            e.flags & !HOLE == 0
                && e.b <= CHUNK
                && e.a.checked_add(e.b).is_some()
                && u64::from(e.body_len) == if e.flags & HOLE != 0 { 0 } else { e.b }
        }
        KIND_POINT => {
            e.flags & !(POINT_KIND_MASK | POINT_NAMED | POINT_CARRIED) == 0
                && e.body_len as usize <= MAX_NAME
                && (e.flags & POINT_NAMED != 0 || e.body_len == 0)
        }
        KIND_SIZE | KIND_FLOOR => e.flags == 0 && e.body_len == 0,
        _ => false,
    };
    ok.then_some(e)
}

/// Scans the records of a segment from `SEG_HEADER`. Returns them and where the valid part
/// ends. `whole`: the file's bytes (the last segment: every body is checked); otherwise only
/// headers (and point names) are read.
fn scan(file: &File, len: u64, seg: u64, whole: Option<&[u8]>) -> io::Result<(Vec<Rec>, u64)> {
    let mut out = Vec::new();
    let mut at = SEG_HEADER as u64;
    let mut h = [0u8; REC_HEADER];
    let mut last_seq = 0u64;
    while at + REC_HEADER as u64 <= len {
        let header: &[u8] = match whole {
            Some(b) => &b[at as usize..at as usize + REC_HEADER],
            None => {
                file.read_exact_at(&mut h, at)?;
                &h
            }
        };
        let Some(e) = parse_header(header, seg, at) else {
            break;
        };
        let end = at + REC_HEADER as u64 + u64::from(e.body_len);
        if end > len {
            break;
        }
        let body_at = at + REC_HEADER as u64;
        let mut name = None;
        if let Some(b) = whole {
            let body = &b[body_at as usize..end as usize];
            if crc32c::crc32c(body) != e.body_crc {
                break;
            }
        }
        if e.kind == KIND_POINT {
            let mut body = vec![0u8; e.body_len as usize];
            file.read_exact_at(&mut body, body_at)?;
            if crc32c::crc32c(&body) != e.body_crc {
                break;
            }
            let Ok(s) = String::from_utf8(body) else {
                break;
            };
            if e.flags & POINT_NAMED != 0 {
                name = Some(s);
            }
        }
        if matches!(e.kind, KIND_IMAGE | KIND_SIZE) {
            if e.seq < last_seq {
                break;
            }
            last_seq = e.seq;
        }
        out.push(Rec { entry: e, name });
        at = end;
    }
    Ok((out, at))
}

struct SegFile {
    id: u64,
    path: PathBuf,
    file: File,
    len: u64,
}

fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(hex) = name.strip_suffix(".seg") else {
            continue;
        };
        if hex.len() != 16 {
            continue;
        }
        if let Ok(id) = u64::from_str_radix(hex, 16) {
            segs.push((id, entry.path()));
        }
    }
    segs.sort();
    Ok(segs)
}

fn remove_segments(dir: &Path) -> io::Result<bool> {
    let segs = list_segments(dir)?;
    for (_, p) in segs.iter().rev() {
        std::fs::remove_file(p)?;
    }
    if !segs.is_empty() {
        sync_dir(dir)?;
    }
    Ok(!segs.is_empty())
}

/// Writes back, newest first, the before-images of `recs` and the sizes before their
/// resizes; fsyncs what it touched. Returns how many records it restored.
fn restore(recs: &[Entry], files: &HashMap<u64, Arc<File>>, images: &[&File]) -> io::Result<usize> {
    let mut touched = vec![false; images.len()];
    let mut n = 0;
    for e in recs.iter().rev() {
        let img = *images.get(e.disk as usize).ok_or_else(|| {
            invalid(format!(
                "journal record names disk #{} of {}",
                e.disk,
                images.len()
            ))
        })?;
        match e.kind {
            KIND_IMAGE if e.flags & HOLE != 0 => zero_range(img, e.a, e.b)?,
            KIND_IMAGE => {
                let mut body = vec![0u8; e.body_len as usize];
                files[&e.seg].read_exact_at(&mut body, e.at + REC_HEADER as u64)?;
                if crc32c::crc32c(&body) != e.body_crc {
                    return Err(invalid("journal record fails its checksum"));
                }
                img.write_all_at(&body, e.a)?;
            }
            KIND_SIZE => img.set_len(e.a)?,
            _ => continue,
        }
        touched[e.disk as usize] = true;
        n += 1;
    }
    for (i, t) in touched.iter().enumerate() {
        if *t {
            images[i].sync_all()?;
        }
    }
    Ok(n)
}

impl Journal {
    /// Opens the journal in `dir` (created as needed) of a replica at `(epoch, durable_seq)`:
    /// a journal of another epoch is dropped; records above the cursor are rolled back on
    /// `images` (by disk index), newest first, and cut. Call [`set_sizes`](Self::set_sizes)
    /// once the images have their committed sizes.
    pub fn open(
        dir: &Path,
        epoch: u32,
        durable_seq: u64,
        images: &[&File],
        opts: JournalOptions,
    ) -> io::Result<(Self, OpenReport)> {
        std::fs::create_dir_all(dir)?;
        let mut report = OpenReport::default();
        let listed = list_segments(dir)?;
        let mut segs: Vec<SegFile> = Vec::with_capacity(listed.len());
        let last_id = listed.last().map(|(id, _)| *id);
        for (id, path) in listed {
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let len = file.metadata()?.len();
            if len < SEG_HEADER as u64 {
                if Some(id) == last_id {
                    // Torn while being created: it never held a synced record.
                    std::fs::remove_file(&path)?;
                    sync_dir(dir)?;
                    continue;
                }
                return Err(invalid(format!(
                    "journal segment {} is truncated",
                    path.display()
                )));
            }
            let mut h = [0u8; SEG_HEADER];
            file.read_exact_at(&mut h, 0)?;
            let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
            if u32_at(0) != SEG_MAGIC || crc32c::crc32c(&h[..24]) != u32_at(24) {
                return Err(invalid(format!(
                    "journal segment {} has a bad header",
                    path.display()
                )));
            }
            let version = u16::from_le_bytes([h[4], h[5]]);
            if version != VERSION {
                return Err(invalid(format!(
                    "journal segment {} has format version {version}; this build reads {VERSION}",
                    path.display()
                )));
            }
            let seg_id = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
            if seg_id != id {
                return Err(invalid(format!(
                    "journal segment {} says it is segment {seg_id:016x}",
                    path.display()
                )));
            }
            if u32_at(8) != epoch {
                report.wiped = true;
            }
            segs.push(SegFile {
                id,
                path,
                file,
                len,
            });
        }
        if report.wiped {
            drop(segs);
            remove_segments(dir)?;
            segs = Vec::new();
        }
        // Scan: the last segment whole, the others by headers.
        let mut recs: Vec<Vec<Rec>> = Vec::with_capacity(segs.len());
        let mut damaged: Option<usize> = None;
        let nsegs = segs.len();
        for (i, s) in segs.iter_mut().enumerate() {
            if i + 1 == nsegs {
                let bytes = std::fs::read(&s.path)?;
                let (r, end) = scan(&s.file, bytes.len() as u64, s.id, Some(&bytes))?;
                if end < s.len {
                    report.torn_bytes = s.len - end;
                    s.file.set_len(end)?;
                    s.file.sync_all()?;
                    s.len = end;
                }
                recs.push(r);
            } else {
                let (r, end) = scan(&s.file, s.len, s.id, None)?;
                if end < s.len {
                    damaged = Some(i);
                }
                recs.push(r);
            }
        }
        // Records above the durable cursor: roll back and cut (they are a suffix).
        let files: HashMap<u64, Arc<File>> = segs
            .iter()
            .map(|s| Ok((s.id, Arc::new(s.file.try_clone()?))))
            .collect::<io::Result<_>>()?;
        let above = |r: &Rec| match r.entry.kind {
            KIND_IMAGE | KIND_SIZE => r.entry.seq > durable_seq,
            KIND_POINT => r.entry.flags & POINT_CARRIED == 0 && r.entry.seq > durable_seq,
            _ => false,
        };
        let cut = recs
            .iter()
            .enumerate()
            .find_map(|(i, rs)| rs.iter().position(above).map(|j| (i, j, rs[j].entry.at)));
        if let Some((ci, cj, cat)) = cut {
            if damaged.is_some_and(|d| d >= ci) {
                return Err(invalid(
                    "a damaged journal segment holds records above the durable cursor",
                ));
            }
            let undo: Vec<Entry> = recs[ci..]
                .iter()
                .enumerate()
                .flat_map(|(k, rs)| rs[if k == 0 { cj } else { 0 }..].iter().map(|r| r.entry))
                .collect();
            report.rolled_back = restore(&undo, &files, images)?;
            // Cut newest first, so what is left is always a prefix.
            for s in segs.drain(ci + 1..).rev() {
                std::fs::remove_file(&s.path)?;
            }
            recs.truncate(ci + 1);
            recs[ci].truncate(cj);
            let s = &mut segs[ci];
            s.file.set_len(cat)?;
            s.file.sync_all()?;
            s.len = cat;
            sync_dir(dir)?;
        }
        let mut floor = 0u64;
        let mut cap_since_ms = None;
        let mut cap_lost_newest_ms = 0;
        for r in recs.iter().flatten() {
            if r.entry.kind == KIND_FLOOR && r.entry.seq >= floor {
                floor = r.entry.seq;
                cap_lost_newest_ms = r.entry.a;
                cap_since_ms = (r.entry.b != 0).then_some(r.entry.b);
            }
        }
        let mut journal = Self {
            dir: dir.to_path_buf(),
            epoch,
            shared: Arc::new(Shared {
                index: RwLock::new(Index {
                    closed: false,
                    cut_gen: 0,
                    entries: VecDeque::new(),
                    base: 0,
                    segs: BTreeMap::new(),
                    points: Vec::new(),
                    sizes: Vec::new(),
                    durable: durable_seq,
                    pins: BTreeMap::new(),
                    floor,
                    bytes: 0,
                    cap_bytes: 0,
                    cap_since_ms,
                    cap_lost_newest_ms,
                }),
            }),
            active: None,
            next_id: segs.last().map_or(1, |s| s.id + 1),
            last_seq: durable_seq,
            opts,
        };
        if let Some(d) = damaged {
            // Everything up to the damaged segment goes; the first record after it bounds
            // what was lost, so points before it are unviewable.
            let next = recs[d + 1..]
                .iter()
                .flatten()
                .find(|r| matches!(r.entry.kind, KIND_IMAGE | KIND_SIZE))
                .map_or(durable_seq, |r| r.entry.seq);
            floor = floor.max(next);
            tracing::warn!(
                dir = %dir.display(),
                segments = d + 1,
                "damaged recovery-point journal segment: it and older history are dropped"
            );
            report.damaged_segments = d + 1;
            let dropped: Vec<SegFile> = segs.drain(..=d).collect();
            recs.drain(..=d);
            // The floor is durable before the segments go.
            let shared = journal.shared.clone();
            journal.index_segments(&mut shared.write(), &segs, &recs, floor)?;
            journal.write_floor(floor, &[])?;
            for s in dropped {
                std::fs::remove_file(&s.path)?;
            }
            sync_dir(dir)?;
        } else {
            let shared = journal.shared.clone();
            journal.index_segments(&mut shared.write(), &segs, &recs, floor)?;
        }
        Ok((journal, report))
    }

    fn index_segments(
        &mut self,
        idx: &mut Index,
        segs: &[SegFile],
        recs: &[Vec<Rec>],
        floor: u64,
    ) -> io::Result<()> {
        idx.floor = floor;
        let mut points: BTreeMap<u64, PointLoc> = BTreeMap::new();
        for (s, rs) in segs.iter().zip(recs) {
            let file = Arc::new(s.file.try_clone()?);
            let mut seg = Seg {
                file,
                bytes: s.len,
                entries: 0,
                max_seq: None,
            };
            for r in rs {
                let e = r.entry;
                match e.kind {
                    KIND_IMAGE | KIND_SIZE => {
                        if idx.entries.back().is_some_and(|l| l.seq > e.seq) {
                            return Err(invalid("journal records out of seq order"));
                        }
                        idx.entries.push_back(e);
                        seg.entries += 1;
                        seg.max_seq = Some(e.seq);
                        self.last_seq = self.last_seq.max(e.seq);
                    }
                    KIND_POINT if e.seq >= floor => {
                        points.insert(
                            e.seq,
                            PointLoc {
                                point: PointEntry {
                                    seq: e.seq,
                                    time_ms: e.a,
                                    kind: e.flags & POINT_KIND_MASK,
                                    name: r.name.clone(),
                                    journal_ms: e.time_ms,
                                },
                                seg: s.id,
                            },
                        );
                    }
                    _ => {}
                }
            }
            idx.bytes += s.len;
            idx.segs.insert(s.id, seg);
        }
        idx.points = points.into_values().collect();
        if let Some(s) = segs.last() {
            if s.len < self.opts.segment_bytes {
                self.active = Some(Active {
                    id: s.id,
                    file: idx.segs[&s.id].file.clone(),
                    len: s.len,
                });
            }
        }
        Ok(())
    }

    /// Rolls the journal in `dir` back to `(epoch, durable_seq)` (see [`open`](Self::open))
    /// and closes it. Returns how many records were restored.
    pub fn roll_back(
        dir: &Path,
        epoch: u32,
        durable_seq: u64,
        images: &[&File],
    ) -> io::Result<usize> {
        if !dir.exists() {
            return Ok(0);
        }
        let (_, report) = Self::open(dir, epoch, durable_seq, images, JournalOptions::default())?;
        Ok(report.rolled_back)
    }

    /// Drops every record and point: the replica starts over at `epoch` (views of the old
    /// journal fail from now on).
    pub fn reset(&mut self, epoch: u32) -> io::Result<()> {
        self.shared.write().closed = true;
        self.active = None;
        remove_segments(&self.dir)?;
        let sizes = self.shared.read().sizes.clone();
        self.shared = Arc::new(Shared {
            index: RwLock::new(Index {
                closed: false,
                cut_gen: 0,
                entries: VecDeque::new(),
                base: 0,
                segs: BTreeMap::new(),
                points: Vec::new(),
                sizes,
                durable: 0,
                pins: BTreeMap::new(),
                floor: 0,
                bytes: 0,
                cap_bytes: 0,
                cap_since_ms: None,
                cap_lost_newest_ms: 0,
            }),
        });
        self.epoch = epoch;
        self.last_seq = 0;
        Ok(())
    }

    /// The current size of every disk (by index), for views of points no resize followed.
    pub fn set_sizes(&mut self, sizes: &[u64]) {
        self.shared.write().sizes = sizes.to_vec();
    }

    /// Everything through `seq` is durable (the replica's cursor is written): its points are
    /// in the catalogue, its records are history.
    pub fn set_durable(&mut self, seq: u64) {
        self.shared.write().durable = seq;
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    fn new_segment(&mut self, idx: &mut Index) -> io::Result<()> {
        let id = self.next_id;
        let path = self.dir.join(seg_name(id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let made = file
            .write_all_at(&segment_header(self.epoch, id), 0)
            .and_then(|()| file.sync_all())
            .and_then(|()| sync_dir(&self.dir));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        self.next_id += 1;
        let file = Arc::new(file);
        idx.segs.insert(
            id,
            Seg {
                file: file.clone(),
                bytes: SEG_HEADER as u64,
                entries: 0,
                max_seq: None,
            },
        );
        idx.bytes += SEG_HEADER as u64;
        self.active = Some(Active {
            id,
            file,
            len: SEG_HEADER as u64,
        });
        Ok(())
    }

    /// How much a segment holds before the next is started: `segment_bytes`, or a
    /// [`SEGMENTS_PER_CAP`]th of the cap of the last prune if that is smaller.
    fn segment_limit(&self, idx: &Index) -> u64 {
        let by_cap = match idx.cap_bytes {
            0 => u64::MAX, // no prune yet: the cap is not known
            cap => (cap / SEGMENTS_PER_CAP).max(MIN_CAP_SEGMENT_BYTES),
        };
        self.opts.segment_bytes.min(by_cap)
    }

    /// Makes sure there is an active segment with room (a new one if it is full).
    fn ensure_active(&mut self, idx: &mut Index) -> io::Result<()> {
        let limit = self.segment_limit(idx);
        if self.active.as_ref().is_none_or(|a| a.len >= limit) {
            self.active = None;
            self.new_segment(idx)?;
        }
        Ok(())
    }

    /// Appends `buf` (whole records) to the active segment and fdatasyncs it, without the
    /// index lock (readers never look past what is indexed). Returns where `buf` starts. On
    /// failure nothing counts.
    fn write_unlocked(&mut self, buf: &[u8]) -> io::Result<(u64, u64)> {
        let a = self.active.as_mut().expect("an active segment");
        let at = a.len;
        let res = a
            .file
            .write_all_at(buf, at)
            .and_then(|()| a.file.sync_data());
        if let Err(e) = res {
            // Cut what may have reached the file, or stop appending to it.
            if a.file
                .set_len(at)
                .and_then(|()| a.file.sync_data())
                .is_err()
            {
                self.active = None;
            }
            return Err(e);
        }
        a.len += buf.len() as u64;
        Ok((a.id, at))
    }

    fn account(idx: &mut Index, seg: u64, n: u64) {
        idx.segs
            .get_mut(&seg)
            .expect("active segment indexed")
            .bytes += n;
        idx.bytes += n;
    }

    /// [`write_unlocked`](Self::write_unlocked) with the lock held (prune, open).
    fn write_synced(&mut self, idx: &mut Index, buf: &[u8]) -> io::Result<(u64, u64)> {
        self.ensure_active(idx)?;
        let (seg, at) = self.write_unlocked(buf)?;
        Self::account(idx, seg, buf.len() as u64);
        Ok((seg, at))
    }

    /// Journals a batch, durably, before it touches the images: the disk sizes it changes
    /// (with the tail a shrink cuts off), the before-image of every write (against `images`
    /// overlaid with the batch's earlier writes) tagged with the write's seq, and its points
    /// (each after the records up to its seq). Writes are in seq order (non-decreasing), the
    /// first at or after `first_seq`; points by increasing seq.
    pub fn append_batch(
        &mut self,
        time_ms: u64,
        first_seq: u64,
        resizes: &[Resize],
        writes: &[Write<'_>],
        points: &[PointEntry],
        images: &[&File],
    ) -> io::Result<()> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        if first_seq <= self.last_seq {
            return Err(bad(format!(
                "batch at seq {first_seq} after seq {} was journaled",
                self.last_seq
            )));
        }
        let mut last = first_seq;
        for w in writes {
            if w.seq < last || w.disk as usize >= images.len() {
                return Err(bad(format!(
                    "write seq {} out of order or of no disk",
                    w.seq
                )));
            }
            last = w.seq;
        }
        let mut prev = None;
        for p in points {
            if p.seq < first_seq || prev.is_some_and(|q| q >= p.seq) || p.kind > POINT_KIND_MASK {
                return Err(bad(format!("point seq {} out of order", p.seq)));
            }
            if p.name.as_ref().is_some_and(|n| n.len() > MAX_NAME) {
                return Err(bad("point name too long".into()));
            }
            prev = Some(p.seq);
        }
        if resizes.iter().any(|r| r.disk as usize >= images.len()) {
            return Err(bad("resize of no disk".into()));
        }
        let last = last.max(prev.unwrap_or(0));

        // Build the records: (rel offset, entry template, point).
        let mut buf = Vec::new();
        let mut built: Vec<(usize, Entry)> = Vec::new();
        let mut new_points: Vec<(usize, PointEntry)> = Vec::new();
        let image_record = |buf: &mut Vec<u8>,
                            built: &mut Vec<(usize, Entry)>,
                            seq: u64,
                            disk: u16,
                            offset: u64,
                            len: u64,
                            overlay: &[(u64, u64, &[u8])]|
         -> io::Result<()> {
            let img = images[disk as usize];
            let hole = overlay.is_empty() && is_hole(img, offset, len);
            let body = if hole { 0 } else { len as usize };
            let (at, crc) = push_record(
                buf,
                KIND_IMAGE,
                if hole { HOLE } else { 0 },
                disk,
                seq,
                time_ms,
                offset,
                len,
                body,
                |b| {
                    if !hole {
                        read_full_at(img, b, offset)?;
                        for &(s, e, data) in overlay {
                            b[(s - offset) as usize..(e - offset) as usize].copy_from_slice(data);
                        }
                    }
                    Ok(())
                },
            )?;
            built.push((
                at,
                Entry {
                    seq,
                    time_ms,
                    a: offset,
                    b: len,
                    seg: 0,
                    at: 0,
                    body_len: body as u32,
                    body_crc: crc,
                    disk,
                    kind: KIND_IMAGE,
                    flags: if hole { HOLE } else { 0 },
                },
            ));
            Ok(())
        };
        for r in resizes {
            let (at, crc) = push_record(
                &mut buf,
                KIND_SIZE,
                0,
                r.disk,
                first_seq,
                time_ms,
                r.from,
                r.to,
                0,
                |_| Ok(()),
            )?;
            built.push((
                at,
                Entry {
                    seq: first_seq,
                    time_ms,
                    a: r.from,
                    b: r.to,
                    seg: 0,
                    at: 0,
                    body_len: 0,
                    body_crc: crc,
                    disk: r.disk,
                    kind: KIND_SIZE,
                    flags: 0,
                },
            ));
            let mut at = r.to;
            while at < r.from {
                let n = (r.from - at).min(CHUNK);
                image_record(&mut buf, &mut built, first_seq, r.disk, at, n, &[])?;
                at += n;
            }
        }
        let mut overlays: HashMap<u16, Extents> = HashMap::new();
        let mut pi = 0;
        let mut push_point = |buf: &mut Vec<u8>, p: &PointEntry| -> io::Result<()> {
            let p = PointEntry {
                journal_ms: time_ms,
                ..p.clone()
            };
            let at = point_record(buf, &p, false)?;
            new_points.push((at, p));
            Ok(())
        };
        for (wi, w) in writes.iter().enumerate() {
            while pi < points.len() && points[pi].seq < w.seq {
                push_point(&mut buf, &points[pi])?;
                pi += 1;
            }
            if w.data.is_empty() {
                continue;
            }
            let end = w
                .offset
                .checked_add(w.data.len() as u64)
                .ok_or_else(|| bad("write beyond u64".into()))?;
            let map = overlays.entry(w.disk).or_default();
            let mut at = w.offset;
            while at < end {
                let n = (end - at).min(CHUNK);
                let over: Vec<(u64, u64, &[u8])> = map
                    .pieces(at, at + n)
                    .into_iter()
                    .filter_map(|(s, e, v)| {
                        v.map(|j| {
                            let src = &writes[j];
                            let from = (s - src.offset) as usize;
                            (s, e, &src.data[from..from + (e - s) as usize])
                        })
                    })
                    .collect();
                image_record(&mut buf, &mut built, w.seq, w.disk, at, n, &over)?;
                at += n;
            }
            map.overwrite(w.offset, end, wi);
        }
        for p in &points[pi..] {
            push_point(&mut buf, p)?;
        }
        if buf.is_empty() {
            self.last_seq = last;
            return Ok(());
        }
        let shared = self.shared.clone();
        self.ensure_active(&mut shared.write())?;
        // The fdatasync runs without the lock: views keep reading meanwhile.
        let (seg, at0) = self.write_unlocked(&buf)?;
        let mut idx = shared.write();
        Self::account(&mut idx, seg, buf.len() as u64);
        // Durable: index them (views see them from now on, before any image changes).
        for (rel, mut e) in built {
            e.seg = seg;
            e.at = at0 + rel as u64;
            if e.kind == KIND_SIZE {
                let d = e.disk as usize;
                if idx.sizes.len() <= d {
                    idx.sizes.resize(d + 1, 0);
                }
                idx.sizes[d] = e.b;
            }
            idx.entries.push_back(e);
            let s = idx.segs.get_mut(&seg).expect("segment indexed");
            s.entries += 1;
            s.max_seq = Some(e.seq);
        }
        for (_, p) in new_points {
            idx.points.push(PointLoc { point: p, seg });
        }
        self.last_seq = last;
        Ok(())
    }

    /// A write failed half-way through the uncommitted batches: writes their before-images
    /// back (newest first) and cuts them off, so the images are the state at the durable
    /// cursor again. The caller restores the committed sizes. Views stay correct (they
    /// rebuild). Returns how many records were restored.
    pub fn roll_back_uncommitted(&mut self, images: &[&File]) -> io::Result<usize> {
        let shared = self.shared.clone();
        let mut idx = shared.write();
        let durable = idx.durable;
        let pos = idx.first_after(durable);
        let undo: Vec<Entry> = idx.entries.range(pos..).copied().collect();
        let files: HashMap<u64, Arc<File>> =
            idx.segs.iter().map(|(k, s)| (*k, s.file.clone())).collect();
        let n = restore(&undo, &files, images)?;
        // Where the uncommitted records start: the first entry above the cursor, or the
        // first uncommitted point if it comes earlier.
        let first_point = idx
            .points
            .iter()
            .find(|p| p.point.seq > durable)
            .map(|p| p.seg);
        let cut_seg = undo
            .first()
            .map(|e| e.seg)
            .into_iter()
            .chain(first_point)
            .min();
        if let Some(cut_seg) = cut_seg {
            // Find the file offset of the first uncommitted record in `cut_seg` by scanning
            // it (rare path: only after an I/O error).
            let seg = &idx.segs[&cut_seg];
            let len = seg.file.metadata()?.len();
            let (recs, _) = scan(&seg.file, len, cut_seg, None)?;
            let cut_at = recs
                .iter()
                .find(|r| {
                    matches!(r.entry.kind, KIND_IMAGE | KIND_SIZE | KIND_POINT)
                        && r.entry.flags & POINT_CARRIED == 0
                        && r.entry.seq > durable
                })
                .map_or(len, |r| r.entry.at);
            let later: Vec<u64> = idx.segs.range(cut_seg + 1..).map(|(k, _)| *k).collect();
            for id in later.iter().rev() {
                std::fs::remove_file(self.dir.join(seg_name(*id)))?;
                let s = idx.segs.remove(id).expect("listed");
                idx.bytes -= s.bytes;
            }
            let file = idx.segs[&cut_seg].file.clone();
            file.set_len(cut_at)?;
            file.sync_all()?;
            let cut_entries = undo.iter().filter(|e| e.seg == cut_seg).count();
            let seg = idx.segs.get_mut(&cut_seg).expect("listed");
            let freed = seg.bytes - cut_at;
            seg.bytes = cut_at;
            seg.entries -= cut_entries;
            idx.bytes -= freed;
            sync_dir(&self.dir)?;
            idx.entries.truncate(pos);
            let max = idx
                .entries
                .back()
                .filter(|e| e.seg == cut_seg)
                .map(|e| e.seq);
            idx.segs.get_mut(&cut_seg).expect("listed").max_seq = max;
            idx.points.retain(|p| p.point.seq <= durable);
            idx.cut_gen += 1;
            self.active = Some(Active {
                id: cut_seg,
                file,
                len: cut_at,
            });
        }
        self.last_seq = durable;
        Ok(n)
    }

    /// The catalogue: committed, viewable points, oldest first.
    pub fn points(&self) -> Vec<PointEntry> {
        let idx = self.shared.read();
        idx.points
            .iter()
            .filter(|p| p.point.seq <= idx.durable)
            .map(|p| p.point.clone())
            .collect()
    }

    pub fn stats(&self) -> JournalStats {
        let idx = self.shared.read();
        let committed = || idx.points.iter().filter(|p| p.point.seq <= idx.durable);
        JournalStats {
            bytes: idx.bytes,
            cap_bytes: idx.cap_bytes,
            segments: idx.segs.len(),
            records: idx.entries.len(),
            points: committed().count(),
            oldest_point_ms: committed().next().map(|p| p.point.journal_ms),
            newest_point_ms: committed().next_back().map(|p| p.point.journal_ms),
            newest_point_seq: committed().next_back().map(|p| p.point.seq),
            cap_shortened_since_ms: idx.cap_since_ms,
            pinned: idx.pins.values().sum(),
        }
    }

    /// A view of the disks as of the committed point at `point_seq`. Built from the index
    /// only (its cost grows with the records after the point, not with the disks); it pins
    /// the point until dropped.
    pub fn view(&self, point_seq: u64) -> io::Result<View> {
        View::open(self.shared.clone(), point_seq)
    }

    /// Writes a floor record (and carried points), synced. Caller holds no index lock.
    fn write_floor(&mut self, floor: u64, carried: &[PointEntry]) -> io::Result<u64> {
        let shared = self.shared.clone();
        let mut idx = shared.write();
        self.write_floor_locked(&mut idx, floor, carried)
    }

    fn write_floor_locked(
        &mut self,
        idx: &mut Index,
        floor: u64,
        carried: &[PointEntry],
    ) -> io::Result<u64> {
        let mut buf = Vec::new();
        push_record(
            &mut buf,
            KIND_FLOOR,
            0,
            0,
            floor,
            0,
            idx.cap_lost_newest_ms,
            idx.cap_since_ms.unwrap_or(0),
            0,
            |_| Ok(()),
        )?;
        for p in carried {
            point_record(&mut buf, p, true)?;
        }
        let (seg, _) = self.write_synced(idx, &buf)?;
        Ok(seg)
    }

    /// Drops whole oldest segments while the points they make unviewable are all older than
    /// the window (`retention_ms` before `now_ms`, by journal time), or while the journal is
    /// above `cap_bytes` (then history is shorter than the window: reported, and kept in the
    /// stats until those points would have left the window anyway). Never drops records a
    /// view needs (a pinned point) nor uncommitted ones. Crash-safe: a floor record is synced
    /// before any segment is deleted.
    pub fn prune(
        &mut self,
        now_ms: u64,
        retention_ms: u64,
        cap_bytes: u64,
    ) -> io::Result<PruneReport> {
        let shared = self.shared.clone();
        let mut idx = shared.write();
        idx.cap_bytes = cap_bytes;
        let window_start = now_ms.saturating_sub(retention_ms);
        if idx.cap_since_ms.is_some() && idx.cap_lost_newest_ms < window_start {
            idx.cap_since_ms = None;
        }
        let mut report = PruneReport::default();
        let uncommitted = self.last_seq > idx.durable;
        let ids: Vec<u64> = idx.segs.keys().copied().collect();
        let min_pin = idx.pins.keys().next().copied();
        let mut drop_n = 0;
        let mut floor = idx.floor;
        let mut left = idx.bytes;
        let mut cap_cut_newest: Option<u64> = None;
        for (i, id) in ids.iter().enumerate() {
            if uncommitted {
                break;
            }
            let seg = &idx.segs[id];
            let d = seg.max_seq.map_or(floor, |m| m.max(floor));
            let lost = idx.points.iter().take_while(|p| p.point.seq < d);
            let by_window =
                lost.clone().all(|p| p.point.journal_ms < window_start) && i + 1 < ids.len();
            let by_cap = left > cap_bytes;
            if !by_window && !by_cap {
                break;
            }
            if let Some(p) = min_pin.filter(|p| d > *p) {
                if by_cap {
                    report.pinned_by = Some(p);
                }
                break;
            }
            if !by_window {
                let newest = lost
                    .filter(|p| p.point.journal_ms >= window_start)
                    .map(|p| p.point.journal_ms)
                    .max();
                if let Some(n) = newest {
                    cap_cut_newest = Some(cap_cut_newest.map_or(n, |c| c.max(n)));
                }
            }
            drop_n = i + 1;
            floor = d;
            left -= seg.bytes;
        }
        if drop_n > 0 {
            let dropped: Vec<u64> = ids[..drop_n].to_vec();
            let carried: Vec<PointEntry> = idx
                .points
                .iter()
                .filter(|p| p.point.seq >= floor && dropped.contains(&p.seg))
                .map(|p| p.point.clone())
                .collect();
            if let Some(n) = cap_cut_newest {
                idx.cap_lost_newest_ms = idx.cap_lost_newest_ms.max(n);
                idx.cap_since_ms.get_or_insert(now_ms);
            }
            if self
                .active
                .as_ref()
                .is_some_and(|a| dropped.contains(&a.id))
            {
                self.active = None;
            }
            let seg = self.write_floor_locked(&mut idx, floor, &carried)?;
            for id in &dropped {
                std::fs::remove_file(self.dir.join(seg_name(*id)))?;
            }
            sync_dir(&self.dir)?;
            for id in &dropped {
                let s = idx.segs.remove(id).expect("listed");
                idx.bytes -= s.bytes;
                for _ in 0..s.entries {
                    idx.entries.pop_front();
                    idx.base += 1;
                }
            }
            let before = idx.points.len();
            idx.points.retain(|p| p.point.seq >= floor);
            report.dropped_points = before - idx.points.len();
            for p in idx.points.iter_mut() {
                if dropped.contains(&p.seg) {
                    p.seg = seg;
                }
            }
            idx.floor = floor;
            report.dropped_segments = drop_n;
        }
        report.cap_reached = cap_cut_newest.is_some() || idx.bytes > cap_bytes;
        let committed = idx.points.iter().find(|p| p.point.seq <= idx.durable);
        report.oldest_point_seq = committed.map(|p| p.point.seq);
        report.held_ms = committed.map_or(0, |p| now_ms.saturating_sub(p.point.journal_ms));
        report.bytes = idx.bytes;
        Ok(report)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Views of a closed journal would miss what a reopened one appends: they fail.
        self.shared.write().closed = true;
    }
}

/// Disjoint extents `[start, end)` of one disk, each with a value.
#[derive(Default, Debug)]
struct Extents {
    map: BTreeMap<u64, (u64, usize)>,
}

impl Extents {
    /// `[start, end)` cut into pieces, in order: `Some(value)` where an extent covers it.
    fn pieces(&self, start: u64, end: u64) -> Vec<(u64, u64, Option<usize>)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        let first = self
            .map
            .range(..=start)
            .next_back()
            .filter(|(_, (e, _))| *e > start);
        let rest = self.map.range(start + 1..end);
        let mut at = start;
        for (&s, &(e, v)) in first.into_iter().chain(rest) {
            if s > at {
                out.push((at, s, None));
            }
            let e = e.min(end);
            out.push((s.max(start), e, Some(v)));
            at = e;
        }
        if at < end {
            out.push((at, end, None));
        }
        out
    }

    /// The covered ranges, in order, adjacent ones merged.
    fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (&s, &(e, _)) in &self.map {
            match out.last_mut() {
                Some((_, end)) if *end >= s => *end = (*end).max(e),
                _ => out.push((s, e)),
            }
        }
        out
    }

    /// Gives `value` to the parts of `[start, end)` no extent covers (the oldest stays).
    fn fill_gaps(&mut self, start: u64, end: u64, value: usize) {
        for (s, e, v) in self.pieces(start, end) {
            if v.is_none() {
                self.map.insert(s, (e, value));
            }
        }
    }

    /// Gives `value` to all of `[start, end)` (the newest wins).
    fn overwrite(&mut self, start: u64, end: u64, value: usize) {
        if start >= end {
            return;
        }
        let hit: Vec<(u64, (u64, usize))> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, v)| (*s, *v))
            .collect();
        for (s, (e, v)) in hit {
            if e <= start {
                continue;
            }
            self.map.remove(&s);
            if s < start {
                self.map.insert(s, (start, v));
            }
            if e > end {
                self.map.insert(end, (e, v));
            }
        }
        self.map.insert(start, (end, value));
    }
}

/// The disks as of a recovery point: the image overlaid, per range, with the oldest journal
/// record after the point. `Send + Sync`; reads run concurrently with appends.
///
/// **Why a view stays correct while batches apply.** A writer appends (and indexes, under
/// the index's write lock) the before-image of a range *before* it overwrites the range in
/// the image. A view keeps, per disk, the map "byte → oldest record after P" over the records
/// it has seen, and the position up to which it has seen them. To read, it first catches up
/// with the records appended since (under the read lock), reads the covered parts from the
/// journal and the uncovered parts from the image, then catches up **again**: any uncovered
/// byte the image read could have seen changed is covered by a record appended before the
/// change, so the second catch-up finds it, and that record's before-image (the state at P,
/// since no earlier record after P covered the byte) replaces what was read. Records only
/// ever get newer at the end, so folding them into the map in order keeps "oldest after P".
/// If uncommitted records are cut (an I/O error rolled them back), the view rebuilds and
/// reads again. Prune never drops records after a pinned point.
pub struct View {
    shared: Arc<Shared>,
    point: u64,
    state: Mutex<ViewState>,
}

struct ViewState {
    gen: u64,
    /// Absolute position of the next index entry to fold in.
    seen: u64,
    maps: Vec<Extents>,
    entries: Vec<Entry>,
    size_at: Vec<Option<u64>>,
    files: HashMap<u64, Arc<File>>,
}

impl ViewState {
    fn build(idx: &Index, point: u64) -> Self {
        let mut st = Self {
            gen: idx.cut_gen,
            seen: idx.base + idx.first_after(point) as u64,
            maps: Vec::new(),
            entries: Vec::new(),
            size_at: Vec::new(),
            files: HashMap::new(),
        };
        st.catch_up(idx, point);
        st
    }

    fn catch_up(&mut self, idx: &Index, point: u64) {
        if self.gen != idx.cut_gen {
            *self = Self::build(idx, point);
            return;
        }
        let from = (self.seen.max(idx.base) - idx.base) as usize;
        for e in idx.entries.range(from..) {
            debug_assert!(e.seq > point);
            let d = e.disk as usize;
            if self.maps.len() <= d {
                self.maps.resize_with(d + 1, Extents::default);
                self.size_at.resize(d + 1, None);
            }
            match e.kind {
                KIND_IMAGE => {
                    self.maps[d].fill_gaps(e.a, e.a + e.b, self.entries.len());
                    self.entries.push(*e);
                    if let Some(s) = idx.segs.get(&e.seg) {
                        self.files.entry(e.seg).or_insert_with(|| s.file.clone());
                    }
                }
                KIND_SIZE => {
                    self.size_at[d].get_or_insert(e.a);
                }
                _ => {}
            }
        }
        self.seen = idx.end();
    }

    fn size(&self, idx: &Index, disk: usize) -> io::Result<u64> {
        if let Some(Some(s)) = self.size_at.get(disk) {
            return Ok(*s);
        }
        idx.sizes
            .get(disk)
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no disk #{disk}")))
    }

    fn read_entry(&self, v: usize, start: u64, out: &mut [u8]) -> io::Result<()> {
        let e = &self.entries[v];
        if e.flags & HOLE != 0 {
            out.fill(0);
            return Ok(());
        }
        let f = self
            .files
            .get(&e.seg)
            .ok_or_else(|| invalid("journal segment of a view is gone"))?;
        let mut body = vec![0u8; e.body_len as usize];
        f.read_exact_at(&mut body, e.at + REC_HEADER as u64)?;
        if crc32c::crc32c(&body) != e.body_crc {
            return Err(invalid("journal record fails its checksum"));
        }
        let from = (start - e.a) as usize;
        out.copy_from_slice(&body[from..from + out.len()]);
        Ok(())
    }
}

impl View {
    fn open(shared: Arc<Shared>, point: u64) -> io::Result<Self> {
        {
            let mut idx = shared.write();
            if idx.closed {
                return Err(closed());
            }
            let known = point <= idx.durable
                && point >= idx.floor
                && idx
                    .points
                    .binary_search_by_key(&point, |p| p.point.seq)
                    .is_ok();
            if !known {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no recovery point at seq {point}"),
                ));
            }
            *idx.pins.entry(point).or_default() += 1;
        }
        let st = ViewState::build(&shared.read(), point);
        Ok(Self {
            shared,
            point,
            state: Mutex::new(st),
        })
    }

    pub fn point_seq(&self) -> u64 {
        self.point
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ViewState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The disk's size as of the point.
    pub fn size(&self, disk: u16) -> io::Result<u64> {
        let mut st = self.lock();
        let idx = self.shared.read();
        if idx.closed {
            return Err(closed());
        }
        st.catch_up(&idx, self.point);
        st.size(&idx, disk as usize)
    }

    /// The byte ranges of `disk` that records after the point overwrote, in order: outside
    /// them the image holds the point's bytes. None if the disk was resized after the point
    /// (then its end is not covered by records, and all of it must be compared).
    pub fn changed(&self, disk: u16) -> io::Result<Option<Vec<(u64, u64)>>> {
        let mut st = self.lock();
        let idx = self.shared.read();
        if idx.closed {
            return Err(closed());
        }
        st.catch_up(&idx, self.point);
        let d = disk as usize;
        if st.size_at.get(d).is_some_and(|s| s.is_some()) {
            return Ok(None);
        }
        Ok(Some(
            st.maps.get(d).map(Extents::ranges).unwrap_or_default(),
        ))
    }

    /// Reads the disk as of the point at `offset` into `buf` (`image` is the disk's replica
    /// image). Returns how many bytes were read: fewer than asked at the end of the disk.
    pub fn read(&self, disk: u16, offset: u64, buf: &mut [u8], image: &File) -> io::Result<usize> {
        let d = disk as usize;
        let mut st = self.lock();
        for _ in 0..16 {
            let size = {
                let idx = self.shared.read();
                if idx.closed {
                    return Err(closed());
                }
                st.catch_up(&idx, self.point);
                st.size(&idx, d)?
            };
            if offset >= size {
                return Ok(0);
            }
            let n = (buf.len() as u64).min(size - offset) as usize;
            let end = offset + n as u64;
            let gen = st.gen;
            let no_map = Extents::default();
            let pieces = st.maps.get(d).unwrap_or(&no_map).pieces(offset, end);
            let mut failed = None;
            for &(s, e, v) in &pieces {
                let out = &mut buf[(s - offset) as usize..(e - offset) as usize];
                let r = match v {
                    Some(v) => st.read_entry(v, s, out),
                    None => read_full_at(image, out, s),
                };
                if let Err(e) = r {
                    failed = Some(e);
                    break;
                }
            }
            // Re-validate the image parts against records appended meanwhile.
            let idx = self.shared.read();
            st.catch_up(&idx, self.point);
            drop(idx);
            if st.gen != gen {
                continue; // records were cut under us: read again
            }
            if let Some(e) = failed {
                return Err(e);
            }
            let map = st.maps.get(d).unwrap_or(&no_map);
            for &(s, e, v) in &pieces {
                if v.is_some() {
                    continue;
                }
                for (s2, e2, v2) in map.pieces(s, e) {
                    if let Some(v2) = v2 {
                        let out = &mut buf[(s2 - offset) as usize..(e2 - offset) as usize];
                        st.read_entry(v2, s2, out)?;
                    }
                }
            }
            return Ok(n);
        }
        Err(io::Error::other(
            "the journal kept changing under a view read",
        ))
    }
}

fn closed() -> io::Error {
    io::Error::other("the journal was closed (replica reopened or reset): open the view again")
}

impl Drop for View {
    fn drop(&mut self) {
        let mut idx = self.shared.write();
        if let Some(n) = idx.pins.get_mut(&self.point) {
            *n -= 1;
            if *n == 0 {
                idx.pins.remove(&self.point);
            }
        }
    }
}

#[cfg(test)]
mod tests;
