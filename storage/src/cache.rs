//! The process server's durable, segmented, checksummed cache of sealed batches.
//!
//! One [`MachineCache`] per protected machine, in a directory of its own. It stores opaque
//! payloads (encoded sealed batches), each tagged with the seq range `first_seq..=last_seq`
//! it covers. Ranges strictly increase. Appends are buffered in the page cache and become
//! durable together on the next [`MachineCache::sync`] (group commit: one `fdatasync` for
//! everything appended since the previous sync, plus an `fsync` of the directory when a
//! segment was created). Only durable records are ever read back.
//!
//! # On-disk format (version 1)
//!
//! The directory holds a `LOCK` file (held with `flock(LOCK_EX)` while a cache is open, so
//! two processes cannot share a directory) and segment files named
//! `seg-<first seq of the segment's first record, 20 decimal digits>.hvc`. All integers are
//! little-endian.
//!
//! ```text
//! segment = segment header, record*
//! segment header (16 bytes):
//!     0  magic     b"HVCSEG\0\0"
//!     8  version   u32 = 1
//!    12  reserved  u32 = 0
//! record = record header (32 bytes), payload (payload_len bytes)
//! record header:
//!     0  magic        u32 = 0x52435648 (b"HVCR")
//!     4  version      u8  = 1
//!     5  reserved     3 bytes = 0
//!     8  first_seq    u64
//!    16  last_seq     u64  (>= first_seq)
//!    24  payload_len  u32  (<= MAX_PAYLOAD, 64 MiB)
//!    28  crc32c       u32  over header bytes 0..28, then the payload
//! ```
//!
//! A segment's first record starts at its name's seq; every record's `first_seq` is greater
//! than the previous record's `last_seq`, within and across segments. A segment rolls when
//! the next record would take it past [`CacheOptions::segment_bytes`] (a record larger than
//! that gets a segment of its own).
//!
//! # Crash safety
//!
//! * Before the first byte is written to a new segment, the previous segment is
//!   `fdatasync`ed and its directory entry `fsync`ed. So every segment but the last is
//!   complete and durable, and a crash can only leave a torn tail in the **last** segment.
//! * [`MachineCache::open`] verifies every record (header fields and crc32c). In the last
//!   segment, the first invalid record and everything after it is cut (the file is
//!   truncated; a last segment left without records is deleted) and reported in
//!   [`RecoveryReport::truncated_bytes`]. Such bytes were never covered by a completed sync
//!   unless the disk itself corrupted them; either way the agent still holds every record
//!   that is not applied and resends from `applied_seq + 1`. In any other segment, an
//!   invalid record cannot come from a crash, so `open` refuses to start with
//!   [`CacheError::Corrupt`] naming the file and offset.
//! * `open` then `fdatasync`s the last segment, so what it reports as held is durable even
//!   if the previous process died with writes still in the page cache.
//! * A failed write (a full disk: [`CacheError::is_disk_full`]) is rolled back by truncating
//!   the segment; then what was appended before it is synced and the segment is *closed*:
//!   the next append starts a new segment, and [`MachineCache::trim`] may delete the closed
//!   one once it is applied, even though it is the last. So a cache that filled its disk
//!   gets space back as its records are applied, and a caller may simply retry the append.
//! * If the rollback fails too, or if an `fdatasync`/`fsync` fails (the kernel may have
//!   dropped the dirty pages, so retrying could falsely succeed), the cache is *poisoned*:
//!   appends and syncs return [`CacheError::Poisoned`] until [`MachineCache::recover`] (or a
//!   reopen) re-verifies the files; `recover` first cuts every record not covered by a
//!   completed sync. [`MachineCache::clear`] also resets it.
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Segment file magic.
pub const SEGMENT_MAGIC: [u8; 8] = *b"HVCSEG\0\0";
/// Segment format version.
pub const SEGMENT_VERSION: u32 = 1;
/// Length of the segment header.
pub const SEGMENT_HEADER_LEN: u64 = 16;
/// Record header magic (`b"HVCR"` read as a little-endian u32).
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"HVCR");
/// Record format version.
pub const RECORD_VERSION: u8 = 1;
/// Length of a record header.
pub const RECORD_HEADER_LEN: u64 = 32;
/// Largest payload accepted by [`MachineCache::append`] and believed in a record header.
pub const MAX_PAYLOAD: usize = 64 << 20;
// A record header stores `payload_len` as a u32: a larger limit could not be written down.
const _: () = assert!(MAX_PAYLOAD <= u32::MAX as usize);

const LOCK_FILE: &str = "LOCK";
/// Chunk size for checksumming payloads during recovery.
const SCAN_CHUNK: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// Target size of a segment file; segments roll when the next record would exceed it.
    pub segment_bytes: u64,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            segment_bytes: 64 << 20,
        }
    }
}

/// A record read back from the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub first_seq: u64,
    pub last_seq: u64,
    pub payload: Vec<u8>,
}

/// What [`MachineCache::open`] found.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// Segments kept.
    pub segments: usize,
    /// Valid records kept.
    pub records: usize,
    /// Bytes cut from the tail of the last segment (torn or corrupt), including a deleted
    /// last segment that held no valid record.
    pub truncated_bytes: u64,
    /// `last_seq` of the last record kept.
    pub last_seq: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O error: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("corrupt cache segment {} at offset {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "out-of-order append of seqs {first_seq}..={last_seq}: need first_seq <= last_seq and \
         first_seq > the last seq already cached ({previous:?})"
    )]
    OutOfOrder {
        first_seq: u64,
        last_seq: u64,
        previous: Option<u64>,
    },
    #[error("cache record payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("cache directory {} is already open (by this or another process)", path.display())]
    Locked { path: PathBuf },
    #[error(
        "cache {} is unusable after an I/O failure ({reason}); reopen it to recover",
        path.display()
    )]
    Poisoned { path: PathBuf, reason: String },
}

impl CacheError {
    /// Whether the filesystem ran out of space or quota (`ENOSPC`, `EDQUOT`): a condition
    /// that passes once space frees, unlike most other errors.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, CacheError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
    }
}

/// Size in bytes of the filesystem holding `path`, or of its nearest existing ancestor.
pub fn filesystem_bytes(path: &Path) -> io::Result<u64> {
    let mut p = path;
    while !p.exists() {
        p = p
            .parent()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_blocks as u64).saturating_mul(st.f_frsize as u64))
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    first: u64,
    last: u64,
    /// Offset of the record header in its segment.
    offset: u64,
    len: u32,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    len: u64,
    entries: Vec<Entry>,
}

impl Segment {
    fn last_seq(&self) -> Option<u64> {
        self.entries.last().map(|e| e.last)
    }
}

/// The durable cache of one protected machine. See the module docs.
#[derive(Debug)]
pub struct MachineCache {
    dir: PathBuf,
    opts: CacheOptions,
    /// Oldest first; the last one is the segment being written.
    segments: VecDeque<Segment>,
    /// Write handle of the last segment; `None` once it is closed (after a failed write, or
    /// while a roll could not create the next segment).
    active: Option<File>,
    total_bytes: u64,
    last_seq: Option<u64>,
    durable: Option<u64>,
    /// The active segment has writes not yet `fdatasync`ed.
    dirty: bool,
    /// A segment was created or deleted since the directory was last `fsync`ed.
    dir_dirty: bool,
    poisoned: Option<String>,
    _lock: File,
    #[cfg(test)]
    faults: Faults,
}

/// Unit tests fail chosen operations with an OS error number.
#[cfg(test)]
#[derive(Debug, Default)]
struct Faults {
    /// The next record's payload write: half of it is written, then this error.
    write: Option<i32>,
    /// The next `fdatasync` of a segment.
    sync: Option<i32>,
}

fn segment_name(id: u64) -> String {
    format!("seg-{id:020}.hvc")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".hvc")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn encode_record_header(first: u64, last: u64, payload: &[u8]) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    h[4] = RECORD_VERSION;
    h[8..16].copy_from_slice(&first.to_le_bytes());
    h[16..24].copy_from_slice(&last.to_le_bytes());
    h[24..28].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..28]), payload);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

struct RecordHeader {
    first: u64,
    last: u64,
    len: u32,
    crc: u32,
}

/// Checks the fixed fields of a record header (not the crc, which needs the payload).
fn decode_record_header(h: &[u8; 32]) -> Result<RecordHeader, String> {
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap());
    let magic = u32_at(0);
    if magic != RECORD_MAGIC {
        return Err(format!("bad record magic {magic:#010x}"));
    }
    if h[4] != RECORD_VERSION {
        return Err(format!("unsupported record version {}", h[4]));
    }
    if h[5..8] != [0, 0, 0] {
        return Err("non-zero reserved bytes in record header".into());
    }
    let (first, last, len) = (u64_at(8), u64_at(16), u32_at(24));
    if first > last {
        return Err(format!("record first_seq {first} > last_seq {last}"));
    }
    if len as usize > MAX_PAYLOAD {
        return Err(format!(
            "record payload_len {len} exceeds the limit of {MAX_PAYLOAD}"
        ));
    }
    Ok(RecordHeader {
        first,
        last,
        len,
        crc: u32_at(28),
    })
}

/// Result of scanning one segment file.
struct Scan {
    entries: Vec<Entry>,
    /// End of the last valid record (or of the header).
    valid_len: u64,
    file_len: u64,
    /// First invalid spot, if any.
    bad: Option<(u64, String)>,
}

/// Reads and verifies a segment. Only I/O errors are returned as `Err`; invalid content is
/// reported in `Scan::bad`. `prev_last` is the last seq of the previous segment.
fn scan_segment(
    path: &Path,
    prev_last: Option<u64>,
    buf: &mut Vec<u8>,
) -> Result<Scan, CacheError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let file_len = file.metadata().map_err(io_err("stat", path))?.len();
    let mut scan = Scan {
        entries: Vec::new(),
        valid_len: 0,
        file_len,
        bad: None,
    };
    if file_len < SEGMENT_HEADER_LEN {
        scan.bad = Some((0, format!("segment header truncated ({file_len} bytes)")));
        return Ok(scan);
    }
    let mut hdr = [0u8; SEGMENT_HEADER_LEN as usize];
    file.read_exact_at(&mut hdr, 0)
        .map_err(io_err("read", path))?;
    if hdr[0..8] != SEGMENT_MAGIC {
        scan.bad = Some((0, "bad segment magic".into()));
        return Ok(scan);
    }
    let version = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
    if version != SEGMENT_VERSION {
        scan.bad = Some((8, format!("unsupported segment version {version}")));
        return Ok(scan);
    }
    if hdr[12..16] != [0, 0, 0, 0] {
        scan.bad = Some((12, "non-zero reserved bytes in segment header".into()));
        return Ok(scan);
    }
    scan.valid_len = SEGMENT_HEADER_LEN;

    let mut off = SEGMENT_HEADER_LEN;
    let mut prev = prev_last;
    while off < file_len {
        if file_len - off < RECORD_HEADER_LEN {
            scan.bad = Some((
                off,
                format!("record header truncated ({} bytes)", file_len - off),
            ));
            break;
        }
        let mut h = [0u8; RECORD_HEADER_LEN as usize];
        file.read_exact_at(&mut h, off)
            .map_err(io_err("read", path))?;
        let rh = match decode_record_header(&h) {
            Ok(rh) => rh,
            Err(reason) => {
                scan.bad = Some((off, reason));
                break;
            }
        };
        let end = off + RECORD_HEADER_LEN + rh.len as u64;
        if end > file_len {
            scan.bad = Some((
                off,
                format!(
                    "record payload truncated ({} of {} bytes present)",
                    file_len - off - RECORD_HEADER_LEN,
                    rh.len
                ),
            ));
            break;
        }
        let mut crc = crc32c::crc32c(&h[..28]);
        let mut pos = off + RECORD_HEADER_LEN;
        let mut left = rh.len as usize;
        while left > 0 {
            let n = left.min(SCAN_CHUNK);
            buf.resize(n, 0);
            file.read_exact_at(&mut buf[..n], pos)
                .map_err(io_err("read", path))?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            pos += n as u64;
            left -= n;
        }
        if crc != rh.crc {
            scan.bad = Some((
                off,
                format!(
                    "record crc32c mismatch (stored {:#010x}, computed {crc:#010x})",
                    rh.crc
                ),
            ));
            break;
        }
        if let Some(p) = prev {
            if rh.first <= p {
                // A checksummed record in the wrong place is not a torn write: never cut it.
                return Err(CacheError::Corrupt {
                    path: path.to_path_buf(),
                    offset: off,
                    reason: format!(
                        "record seqs {}..={} do not follow the previous last seq {p}",
                        rh.first, rh.last
                    ),
                });
            }
        }
        scan.entries.push(Entry {
            first: rh.first,
            last: rh.last,
            offset: off,
            len: rh.len,
        });
        prev = Some(rh.last);
        off = end;
        scan.valid_len = end;
    }
    Ok(scan)
}

fn lock_dir(dir: &Path) -> Result<File, CacheError> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("open lock file", &path))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(CacheError::Locked {
                path: dir.to_path_buf(),
            });
        }
        return Err(CacheError::Io {
            op: "lock",
            path,
            source: e,
        });
    }
    Ok(f)
}

fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// `create_dir_all`, then `fsync`s the parent of every directory it created, so that a
/// new cache directory (and so what is synced in it) survives a power loss.
fn create_dir_durably(dir: &Path) -> Result<(), CacheError> {
    let mut missing = Vec::new();
    let mut p = Some(dir);
    while let Some(d) = p {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d);
        p = d.parent();
    }
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    for d in missing.iter().rev() {
        match d.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
            _ => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

impl MachineCache {
    /// Opens (creating if needed) the cache in `dir`, verifying every record. See the module
    /// docs for what is cut and what is refused.
    pub fn open(dir: &Path, opts: CacheOptions) -> Result<(Self, RecoveryReport), CacheError> {
        create_dir_durably(dir)?;
        let lock = lock_dir(dir)?;
        Self::load(dir, opts, lock)
    }

    /// Reads and verifies the segments of a directory whose `LOCK` we hold.
    fn load(
        dir: &Path,
        opts: CacheOptions,
        lock: File,
    ) -> Result<(Self, RecoveryReport), CacheError> {
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for ent in fs::read_dir(dir).map_err(io_err("list directory", dir))? {
            let ent = ent.map_err(io_err("list directory", dir))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if name == LOCK_FILE {
                continue;
            }
            match parse_segment_name(name) {
                Some(id) => found.push((id, ent.path())),
                None => {
                    tracing::warn!(dir = %dir.display(), file = name, "ignoring unknown file in cache directory")
                }
            }
        }
        found.sort_by_key(|(id, _)| *id);

        let mut report = RecoveryReport::default();
        let mut segments: VecDeque<Segment> = VecDeque::new();
        let mut dir_dirty = false;
        let mut buf = Vec::new();
        let mut prev_last: Option<u64> = None;
        let n = found.len();
        for (i, (id, path)) in found.into_iter().enumerate() {
            let is_last = i + 1 == n;
            let scan = scan_segment(&path, prev_last, &mut buf)?;
            if let Some((offset, reason)) = &scan.bad {
                if !is_last {
                    return Err(CacheError::Corrupt {
                        path,
                        offset: *offset,
                        reason: format!(
                            "{reason} (not the last segment, so not a torn write; refusing to \
                             start — move the cache directory aside to resync this machine)"
                        ),
                    });
                }
                let cut = scan.file_len
                    - if scan.entries.is_empty() {
                        0
                    } else {
                        scan.valid_len
                    };
                tracing::warn!(
                    path = %path.display(), offset, reason = %reason, cut_bytes = cut,
                    "cutting torn or corrupt tail of the cache's last segment"
                );
                report.truncated_bytes += cut;
            }
            if let Some(first) = scan.entries.first() {
                if first.first != id {
                    return Err(CacheError::Corrupt {
                        path,
                        offset: first.offset,
                        reason: format!(
                            "segment is named for seq {id} but its first record starts at {}",
                            first.first
                        ),
                    });
                }
            }
            if scan.entries.is_empty() {
                // Only a segment created just before a crash can be empty; it holds nothing.
                if scan.bad.is_none() {
                    tracing::warn!(path = %path.display(), "removing empty cache segment");
                }
                fs::remove_file(&path).map_err(io_err("remove empty segment", &path))?;
                dir_dirty = true;
                continue;
            }
            if scan.bad.is_some() {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open for truncation", &path))?;
                f.set_len(scan.valid_len)
                    .map_err(io_err("truncate", &path))?;
                f.sync_all()
                    .map_err(io_err("fsync after truncation", &path))?;
            }
            prev_last = scan.entries.last().map(|e| e.last);
            report.records += scan.entries.len();
            segments.push_back(Segment {
                path,
                len: scan.valid_len,
                entries: scan.entries,
            });
        }

        let mut active = None;
        if let Some(seg) = segments.back() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&seg.path)
                .map_err(io_err("open for append", &seg.path))?;
            // What a crashed predecessor wrote may still be only in the page cache.
            f.sync_data().map_err(io_err("fdatasync", &seg.path))?;
            active = Some(f);
        }
        if dir_dirty || !segments.is_empty() {
            sync_dir(dir)?;
        }

        report.segments = segments.len();
        report.last_seq = prev_last;
        let total_bytes = segments.iter().map(|s| s.len).sum();
        let cache = MachineCache {
            dir: dir.to_path_buf(),
            opts,
            segments,
            active,
            total_bytes,
            last_seq: prev_last,
            durable: prev_last,
            dirty: false,
            dir_dirty: false,
            poisoned: None,
            _lock: lock,
            #[cfg(test)]
            faults: Faults::default(),
        };
        Ok((cache, report))
    }

    fn check_poisoned(&self) -> Result<(), CacheError> {
        match &self.poisoned {
            Some(reason) => Err(CacheError::Poisoned {
                path: self.dir.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison(&mut self, e: CacheError) -> CacheError {
        // The error goes to the caller, who reports it (a caller retrying on a failing disk
        // would otherwise log it again on every attempt).
        tracing::debug!(dir = %self.dir.display(), error = %e, "cache poisoned");
        self.poisoned = Some(e.to_string());
        e
    }

    /// `fdatasync`s the active segment and `fsync`s the directory as needed. Any failure
    /// poisons the cache.
    fn flush(&mut self) -> Result<(), CacheError> {
        if self.dirty {
            if let (Some(f), Some(seg)) = (&self.active, self.segments.back()) {
                #[cfg(test)]
                let injected = self.faults.sync.take().map(io::Error::from_raw_os_error);
                #[cfg(not(test))]
                let injected: Option<io::Error> = None;
                if let Err(e) = injected.map_or_else(|| f.sync_data(), Err) {
                    let e = io_err("fdatasync", &seg.path)(e);
                    return Err(self.poison(e));
                }
            }
            self.dirty = false;
        }
        if self.dir_dirty {
            if let Err(e) = sync_dir(&self.dir) {
                return Err(self.poison(e));
            }
            self.dir_dirty = false;
        }
        self.durable = self.last_seq;
        Ok(())
    }

    /// Appends a record. Not durable (nor readable) until [`sync`](Self::sync). Requires
    /// `first_seq <= last_seq` and `first_seq` above every seq already held.
    pub fn append(
        &mut self,
        first_seq: u64,
        last_seq: u64,
        payload: &[u8],
    ) -> Result<(), CacheError> {
        self.check_poisoned()?;
        if first_seq > last_seq || self.last_seq.is_some_and(|p| first_seq <= p) {
            return Err(CacheError::OutOfOrder {
                first_seq,
                last_seq,
                previous: self.last_seq,
            });
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(CacheError::TooLarge {
                len: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        let rec_len = RECORD_HEADER_LEN + payload.len() as u64;

        let must_roll = match self.segments.back() {
            Some(seg) => !seg.entries.is_empty() && seg.len + rec_len > self.opts.segment_bytes,
            None => true,
        };
        if must_roll || self.active.is_none() {
            if self.active.is_some() {
                // Seal the old segment completely before the new one gets any byte.
                self.flush()?;
                self.active = None;
            }
            self.create_segment(first_seq)?;
        }

        let seg = self.segments.back_mut().expect("active segment exists");
        let f = self.active.as_ref().expect("active segment is open");
        let off = seg.len;
        let header = encode_record_header(first_seq, last_seq, payload);
        #[cfg(test)]
        let injected = self.faults.write.take();
        #[cfg(not(test))]
        let injected: Option<i32> = None;
        let res = f.write_all_at(&header, off).and_then(|()| match injected {
            Some(errno) => f
                .write_all_at(&payload[..payload.len() / 2], off + RECORD_HEADER_LEN)
                .and(Err(io::Error::from_raw_os_error(errno))),
            None => f.write_all_at(payload, off + RECORD_HEADER_LEN),
        });
        if let Err(e) = res {
            let err = io_err("write", &seg.path)(e);
            let path = seg.path.clone();
            // Roll back so that later appends do not sit behind garbage: drop a segment that
            // was created for this record (its name would not match the next record), else
            // cut the partial record.
            let rollback = if seg.entries.is_empty() {
                self.active = None;
                self.segments.pop_back();
                self.total_bytes -= SEGMENT_HEADER_LEN;
                self.dir_dirty = true;
                fs::remove_file(&path)
            } else {
                f.set_len(off)
            };
            if let Err(e2) = rollback {
                tracing::error!(path = %path.display(), error = %e2, "cannot roll back a failed cache write");
                return Err(self.poison(err));
            }
            self.dirty = true;
            // Close the segment: what was appended before this record becomes durable now
            // (a caller retrying later must not find it half-there), and a closed segment can
            // be trimmed once applied, which is what frees a full disk.
            self.flush()?;
            self.active = None;
            return Err(err);
        }
        seg.entries.push(Entry {
            first: first_seq,
            last: last_seq,
            offset: off,
            len: payload.len() as u32,
        });
        seg.len += rec_len;
        self.total_bytes += rec_len;
        self.last_seq = Some(last_seq);
        self.dirty = true;
        Ok(())
    }

    fn create_segment(&mut self, id: u64) -> Result<(), CacheError> {
        let path = self.dir.join(segment_name(id));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create segment", &path))?;
        let mut hdr = [0u8; SEGMENT_HEADER_LEN as usize];
        hdr[0..8].copy_from_slice(&SEGMENT_MAGIC);
        hdr[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        if let Err(e) = f.write_all_at(&hdr, 0) {
            let err = io_err("write segment header", &path)(e);
            if let Err(e2) = fs::remove_file(&path) {
                // Left behind, it would block the next creation under the same name.
                tracing::error!(path = %path.display(), error = %e2, "cannot remove a segment whose creation failed");
                return Err(self.poison(err));
            }
            return Err(err);
        }
        self.segments.push_back(Segment {
            path,
            len: SEGMENT_HEADER_LEN,
            entries: Vec::new(),
        });
        self.total_bytes += SEGMENT_HEADER_LEN;
        self.active = Some(f);
        self.dirty = true;
        self.dir_dirty = true;
        Ok(())
    }

    /// Makes everything appended so far durable: one `fdatasync` (plus a directory `fsync`
    /// if a segment was created). A no-op when nothing was appended since the last sync.
    pub fn sync(&mut self) -> Result<(), CacheError> {
        self.check_poisoned()?;
        self.flush()
    }

    /// Whether an I/O failure made the cache unusable until [`recover`](Self::recover).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Makes a poisoned cache usable again without closing it: cuts every record not covered
    /// by a completed sync (after a failed `fdatasync` the page cache may still show bytes
    /// that never reached the disk, so re-reading them would prove nothing), then re-reads
    /// and re-verifies the directory as [`open`](Self::open) does. The caller still holds
    /// everything it did not see synced and appends it again. On error the cache stays
    /// poisoned and `recover` may be tried again.
    pub fn recover(&mut self) -> Result<RecoveryReport, CacheError> {
        self.active = None;
        let durable = self.durable;
        while let Some(seg) = self.segments.back() {
            let keep = seg
                .entries
                .partition_point(|e| durable.is_some_and(|d| e.last <= d));
            if keep == 0 {
                if let Err(e) = fs::remove_file(&seg.path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        return Err(io_err("remove unsynced segment", &seg.path)(e));
                    }
                }
                self.total_bytes -= seg.len;
                self.segments.pop_back();
                continue;
            }
            let e = seg.entries[keep - 1];
            let end = e.offset + RECORD_HEADER_LEN + e.len as u64;
            let f = OpenOptions::new()
                .write(true)
                .open(&seg.path)
                .map_err(io_err("open for truncation", &seg.path))?;
            let len = f.metadata().map_err(io_err("stat", &seg.path))?.len();
            if len > end {
                f.set_len(end).map_err(io_err("truncate", &seg.path))?;
                f.sync_all()
                    .map_err(io_err("fsync after truncation", &seg.path))?;
            }
            break;
        }
        sync_dir(&self.dir)?;
        let lock = self
            ._lock
            .try_clone()
            .map_err(io_err("duplicate lock", &self.dir))?;
        let (fresh, report) = Self::load(&self.dir, self.opts.clone(), lock)?;
        tracing::debug!(dir = %self.dir.display(), records = report.records, last_seq = ?report.last_seq, "cache recovered after an I/O failure");
        // The old lock descriptor closes; the duplicate keeps the flock.
        *self = fresh;
        Ok(report)
    }

    /// Highest `last_seq` covered by a completed sync.
    pub fn durable_last_seq(&self) -> Option<u64> {
        self.durable
    }

    /// Highest `last_seq` appended, durable or not.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Bytes on disk in all segments (headers included, unsynced appends included).
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Payload bytes of the records with `last_seq > after_seq`: what is still waiting to be
    /// applied. Unlike [`bytes`](Self::bytes) this shrinks record by record, not segment by
    /// segment, so it is what a limit on unapplied data should watch.
    pub fn bytes_after(&self, after_seq: u64) -> u64 {
        self.segments
            .iter()
            .rev()
            .flat_map(|s| s.entries.iter().rev())
            .take_while(|e| e.last > after_seq)
            .map(|e| e.len as u64)
            .sum()
    }

    /// Lowest seq still held (including records not yet synced).
    pub fn first_seq(&self) -> Option<u64> {
        self.segments
            .iter()
            .find_map(|s| s.entries.first())
            .map(|e| e.first)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Deletes every segment whose records all have `last_seq <= applied_seq` and are
    /// durable, oldest first, never the segment being written. (The last segment is not being
    /// written after a failed write closed it: then it goes too once applied, which is how a
    /// full disk gets space back.) Returns the bytes freed.
    pub fn trim(&mut self, applied_seq: u64) -> Result<u64, CacheError> {
        let mut freed = 0;
        let mut result = Ok(());
        let Some(durable) = self.durable else {
            return Ok(0); // nothing was ever synced: nothing can have been applied
        };
        let limit = applied_seq.min(durable);
        while let Some(seg) = self.segments.front() {
            if self.segments.len() == 1 && self.active.is_some() {
                break;
            }
            if seg.last_seq().is_some_and(|l| l > limit) {
                break;
            }
            if let Err(e) = fs::remove_file(&seg.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    result = Err(io_err("remove segment", &seg.path)(e));
                    break;
                }
            }
            freed += seg.len;
            self.total_bytes -= seg.len;
            self.segments.pop_front();
        }
        if freed > 0 {
            // Deletions need not be durable for correctness (a resurrected segment is only
            // re-read), but keep the directory tidy on disk.
            sync_dir(&self.dir)?;
        }
        result.map(|()| freed)
    }

    /// Durable records with `last_seq > after_seq`, in order. Returns at least one record if
    /// any qualifies, then adds records while the payload total stays within `max_bytes`.
    /// Every record is read from its file and its checksum verified.
    pub fn read_after(&self, after_seq: u64, max_bytes: usize) -> Result<Vec<Record>, CacheError> {
        let mut out = Vec::new();
        let Some(durable) = self.durable else {
            return Ok(out);
        };
        let si = self
            .segments
            .partition_point(|s| !matches!(s.last_seq(), Some(l) if l > after_seq));
        let mut total = 0usize;
        'segments: for seg in self.segments.iter().skip(si) {
            let ei = seg.entries.partition_point(|e| e.last <= after_seq);
            let mut file: Option<File> = None;
            for e in &seg.entries[ei..] {
                if e.last > durable {
                    break 'segments;
                }
                let len = e.len as usize;
                if !out.is_empty() && total + len > max_bytes {
                    break 'segments;
                }
                let f = match &file {
                    Some(f) => f,
                    None => file.insert(File::open(&seg.path).map_err(io_err("open", &seg.path))?),
                };
                out.push(read_record(f, &seg.path, e)?);
                total += len;
                if total >= max_bytes {
                    break 'segments;
                }
            }
        }
        Ok(out)
    }

    /// Deletes every segment (used on unprotect). The cache stays open and empty; seq
    /// ordering starts afresh and a poisoned cache becomes usable again.
    pub fn clear(&mut self) -> Result<(), CacheError> {
        self.active = None;
        while let Some(seg) = self.segments.front() {
            if let Err(e) = fs::remove_file(&seg.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    return Err(io_err("remove segment", &seg.path)(e));
                }
            }
            self.total_bytes -= seg.len;
            self.segments.pop_front();
        }
        sync_dir(&self.dir)?;
        self.total_bytes = 0;
        self.last_seq = None;
        self.durable = None;
        self.dirty = false;
        self.dir_dirty = false;
        self.poisoned = None;
        Ok(())
    }
}

fn read_record(f: &File, path: &Path, e: &Entry) -> Result<Record, CacheError> {
    let corrupt = |reason: String| CacheError::Corrupt {
        path: path.to_path_buf(),
        offset: e.offset,
        reason,
    };
    let mut h = [0u8; RECORD_HEADER_LEN as usize];
    f.read_exact_at(&mut h, e.offset)
        .map_err(io_err("read", path))?;
    let rh = decode_record_header(&h).map_err(corrupt)?;
    if (rh.first, rh.last, rh.len) != (e.first, e.last, e.len) {
        return Err(corrupt(format!(
            "record header changed on disk since it was indexed ({}..={} len {}, expected \
             {}..={} len {})",
            rh.first, rh.last, rh.len, e.first, e.last, e.len
        )));
    }
    let mut payload = vec![0u8; e.len as usize];
    f.read_exact_at(&mut payload, e.offset + RECORD_HEADER_LEN)
        .map_err(io_err("read", path))?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..28]), &payload);
    if crc != rh.crc {
        return Err(corrupt(format!(
            "record crc32c mismatch on read (stored {:#010x}, computed {crc:#010x})",
            rh.crc
        )));
    }
    Ok(Record {
        first_seq: e.first,
        last_seq: e.last,
        payload,
    })
}

#[cfg(test)]
mod tests;
