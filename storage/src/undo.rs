//! The apply undo log: the before-image of every range that a not-yet-committed batch
//! overwrites in a replica image.
//!
//! The records of a batch are written and fdatasync'ed *before* the batch touches an image,
//! and the log is emptied once the cursor covering the batch is durable. After a crash in the
//! middle of applying (a kill, a panic, a power cut), [`roll_back`] writes back, newest first,
//! every before-image of a batch above the durable cursor, so the images are exactly the
//! state at the durable cursor: a torn batch is never visible, and recovery needs no peer.
//! (It is the seed of DESIGN §5's recovery-point journal, which would keep these records for a
//! retention window instead of dropping them at commit.)
//!
//! Records are tagged with the epoch and the batch's first seq, so a log whose truncation did
//! not reach the disk before a crash is harmless: records at or below the durable cursor are
//! ignored. A torn record at the tail (a crash while appending) fails its checksum; its batch
//! had not touched the images yet, because the log is synced first.
//!
//! ```text
//! record = magic u32 | epoch u32 | first_seq u64 | offset u64 | len u32 | flags u8
//!          | name_len u8 | crc32c u32 (of header before it, name and data) | name | data
//! ```
//! (little endian; `data` is absent for a range that was a hole: it rolls back to zeros.)
use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    os::unix::io::AsRawFd,
    path::{Path, PathBuf},
};

pub const FILE_NAME: &str = "undo";
const MAGIC: u32 = 0x4855_4e44;
const HEADER: usize = 4 + 4 + 8 + 8 + 4 + 1 + 1 + 4;
const HOLE: u8 = 1;
/// Longest disk name a record can carry (names are short; this bounds parsing).
const MAX_NAME: usize = u8::MAX as usize;

pub struct UndoLog {
    path: PathBuf,
    file: File,
    /// Bytes of the log on disk.
    len: u64,
    /// Records built for the batch being applied, not yet written.
    pending: Vec<u8>,
}

impl UndoLog {
    /// Opens the log of the replica in `dir`, emptied. Call only after [`roll_back`] has run
    /// for this replica (or when its images were reset).
    pub fn open_empty(dir: &Path) -> io::Result<Self> {
        let path = dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        Ok(Self {
            path,
            file,
            len: 0,
            pending: Vec::new(),
        })
    }

    /// Saves the current content of `image[offset..offset+len]` (not yet durable: see
    /// [`sync`](Self::sync)).
    pub fn save(
        &mut self,
        epoch: u32,
        first_seq: u64,
        disk: &str,
        image: &File,
        offset: u64,
        len: usize,
    ) -> io::Result<()> {
        let name = disk.as_bytes();
        if name.len() > MAX_NAME || len > u32::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "disk name or write too long for the undo log",
            ));
        }
        let hole = is_hole(image, offset, len as u64);
        let start = self.pending.len();
        self.pending.extend_from_slice(&MAGIC.to_le_bytes());
        self.pending.extend_from_slice(&epoch.to_le_bytes());
        self.pending.extend_from_slice(&first_seq.to_le_bytes());
        self.pending.extend_from_slice(&offset.to_le_bytes());
        self.pending.extend_from_slice(&(len as u32).to_le_bytes());
        self.pending.push(if hole { HOLE } else { 0 });
        self.pending.push(name.len() as u8);
        let crc_at = self.pending.len();
        self.pending.extend_from_slice(&[0; 4]);
        self.pending.extend_from_slice(name);
        if !hole {
            let at = self.pending.len();
            self.pending.resize(at + len, 0);
            if let Err(e) = image.read_exact_at(&mut self.pending[at..], offset) {
                self.pending.truncate(start);
                return Err(e);
            }
        }
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&self.pending[start..crc_at]),
            &self.pending[crc_at + 4..],
        );
        self.pending[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    /// Makes the saved before-images durable; only then may the images be overwritten.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let n = self.pending.len() as u64;
        let res = self
            .file
            .write_all_at(&self.pending, self.len)
            .and_then(|()| self.file.sync_data());
        self.pending.clear();
        res?;
        // Only counted once durable: after a failure the batch is not applied, and the next
        // batch's records overwrite the partial tail.
        self.len += n;
        Ok(())
    }

    /// Everything logged is committed: forget it.
    pub fn clear(&mut self) -> io::Result<()> {
        self.pending.clear();
        if self.len > 0 {
            self.file.set_len(0)?;
            self.len = 0;
        }
        Ok(())
    }

    /// The log was rolled back and emptied on disk behind our back (by [`roll_back`]).
    pub fn forget(&mut self) {
        self.pending.clear();
        self.len = 0;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether `image[offset..offset+len]` holds no data (a hole of the sparse image).
pub(crate) fn is_hole(image: &File, offset: u64, len: u64) -> bool {
    let Ok(off) = libc::off_t::try_from(offset) else {
        return false;
    };
    // SAFETY: lseek on a valid, open descriptor has no memory-safety preconditions.
    let next = unsafe { libc::lseek(image.as_raw_fd(), off, libc::SEEK_DATA) };
    if next < 0 {
        // ENXIO: no data at or after `offset`. Anything else: assume data (read it).
        return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    next as u64 >= offset.saturating_add(len)
}

struct Record<'a> {
    epoch: u32,
    first_seq: u64,
    offset: u64,
    len: u64,
    name: &'a str,
    /// None: the range was a hole.
    data: Option<&'a [u8]>,
}

/// Parses records until the end or the first torn/invalid one.
fn parse(mut buf: &[u8]) -> Vec<Record<'_>> {
    let mut out = Vec::new();
    while buf.len() >= HEADER {
        let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
        if u32_at(0) != MAGIC {
            break;
        }
        let (epoch, first_seq, offset, len) = (u32_at(4), u64_at(8), u64_at(16), u32_at(24));
        let (flags, name_len) = (buf[28], buf[29] as usize);
        let crc = u32_at(30);
        let data_len = if flags & HOLE != 0 { 0 } else { len as usize };
        let total = HEADER + name_len + data_len;
        if buf.len() < total {
            break;
        }
        let computed = crc32c::crc32c_append(crc32c::crc32c(&buf[..30]), &buf[HEADER..total]);
        if computed != crc {
            break;
        }
        let Ok(name) = std::str::from_utf8(&buf[HEADER..HEADER + name_len]) else {
            break;
        };
        out.push(Record {
            epoch,
            first_seq,
            offset,
            len: len as u64,
            name,
            data: (flags & HOLE == 0).then(|| &buf[HEADER + name_len..total]),
        });
        buf = &buf[total..];
    }
    out
}

/// Restores the images in `dir` to the state at `(epoch, applied_seq)`: writes back, newest
/// first, the before-image of every range a batch above the cursor touched, fsyncs the images,
/// then empties the log. Returns how many ranges were restored.
pub fn roll_back(dir: &Path, epoch: u32, applied_seq: u64) -> io::Result<usize> {
    let path = dir.join(FILE_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let records: Vec<Record> = parse(&bytes)
        .into_iter()
        .filter(|r| r.epoch == epoch && r.first_seq > applied_seq)
        .collect();
    let mut images: HashMap<&str, File> = HashMap::new();
    for r in records.iter().rev() {
        if r.name.contains('/') || r.name.starts_with('.') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("undo record names disk {:?}", r.name),
            ));
        }
        if !images.contains_key(r.name) {
            let img = OpenOptions::new()
                .write(true)
                .open(dir.join(format!("{}.img", r.name)))?;
            images.insert(r.name, img);
        }
        let f = &images[r.name];
        match r.data {
            Some(data) => f.write_all_at(data, r.offset)?,
            None => zero_range(f, r.offset, r.len)?,
        }
    }
    for f in images.values() {
        f.sync_data()?;
    }
    if !bytes.is_empty() {
        let log = OpenOptions::new().write(true).open(&path)?;
        log.set_len(0)?;
        log.sync_all()?;
    }
    Ok(records.len())
}

/// Makes a range read as zeros again: punches a hole, or writes zeros where that is refused.
pub(crate) fn zero_range(f: &File, offset: u64, len: u64) -> io::Result<()> {
    if let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
        // SAFETY: fallocate on a valid, open descriptor has no memory-safety preconditions.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut at = offset;
    let end = offset.saturating_add(len);
    while at < end {
        let n = (end - at).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, content: &[u8]) -> File {
        let p = dir.join("d0.img");
        std::fs::write(&p, content).unwrap();
        OpenOptions::new().read(true).write(true).open(p).unwrap()
    }

    #[test]
    fn rolls_back_batches_above_the_cursor_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let f = image(dir.path(), b"0123456789");
        let mut log = UndoLog::open_empty(dir.path()).unwrap();
        // Batch at seq 5 (committed), then seqs 7 and 9 (not), overlapping ranges.
        log.save(1, 5, "d0", &f, 0, 2).unwrap();
        log.sync().unwrap();
        f.write_all_at(b"AA", 0).unwrap();
        log.save(1, 7, "d0", &f, 1, 3).unwrap();
        log.sync().unwrap();
        f.write_all_at(b"BBB", 1).unwrap();
        log.save(1, 9, "d0", &f, 0, 2).unwrap();
        log.sync().unwrap();
        f.write_all_at(b"C", 0).unwrap(); // torn: only half of the batch's write happened
        assert_eq!(
            std::fs::read(dir.path().join("d0.img")).unwrap(),
            b"CBBB456789"
        );
        // Durable cursor 6: batches 7 and 9 are undone, batch 5 stays.
        assert_eq!(roll_back(dir.path(), 1, 6).unwrap(), 2);
        assert_eq!(
            std::fs::read(dir.path().join("d0.img")).unwrap(),
            b"AA23456789"
        );
        assert_eq!(std::fs::metadata(log.path()).unwrap().len(), 0);
        // Idempotent: nothing left to undo.
        assert_eq!(roll_back(dir.path(), 1, 6).unwrap(), 0);
    }

    #[test]
    fn ignores_other_epochs_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let f = image(dir.path(), b"abcdef");
        let mut log = UndoLog::open_empty(dir.path()).unwrap();
        log.save(1, 3, "d0", &f, 0, 1).unwrap();
        log.save(2, 3, "d0", &f, 1, 1).unwrap();
        log.sync().unwrap();
        f.write_all_at(b"XY", 0).unwrap();
        // A torn record at the tail: its batch never touched the image.
        let mut bytes = std::fs::read(log.path()).unwrap();
        let whole = bytes.len();
        log.save(2, 4, "d0", &f, 2, 2).unwrap();
        log.sync().unwrap();
        bytes = std::fs::read(log.path()).unwrap();
        std::fs::write(log.path(), &bytes[..whole + 10]).unwrap();
        assert_eq!(roll_back(dir.path(), 2, 0).unwrap(), 1);
        assert_eq!(std::fs::read(dir.path().join("d0.img")).unwrap(), b"Xbcdef");
    }

    #[test]
    fn a_hole_rolls_back_to_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d0.img");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let mut log = UndoLog::open_empty(dir.path()).unwrap();
        log.save(1, 1, "d0", &f, 4096, 8192).unwrap();
        log.sync().unwrap();
        // A hole is logged without data.
        assert!(std::fs::metadata(log.path()).unwrap().len() < 100);
        f.write_all_at(&[7u8; 8192], 4096).unwrap();
        assert_eq!(roll_back(dir.path(), 1, 0).unwrap(), 1);
        assert!(std::fs::read(&p).unwrap().iter().all(|b| *b == 0));
    }
}
