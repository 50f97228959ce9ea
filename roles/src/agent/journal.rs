//! The agent's applied-hash journal: makes the applied hash tables durable incrementally, so
//! that after a crash only the last fraction of a second of applied writes is captured again.
//!
//! On disk, next to the snapshot `tables`:
//! ```text
//! journal := record*
//! record  := magic u32 "HVJ1" | epoch u32 | applied_seq u64 | count u32 | (disk u16, block u32, hash u64) * count | crc32c u32
//! ```
//! all little-endian; the crc covers everything before it in the record. Replay stops at
//! the first torn or corrupt record: what follows can only be a tail written during a crash.
//! The caller applies only records of the snapshot's epoch above the snapshot's seq, so a
//! crash between writing a snapshot and truncating the journal is harmless.
use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    path::{Path, PathBuf},
};

use super::core::HashUpdate;

const MAGIC: u32 = u32::from_le_bytes(*b"HVJ1");
/// Most updates one record may carry: bounds what replay allocates.
const MAX_COUNT: u32 = 1 << 22;
const ENTRY: usize = 2 + 4 + 8;
const HEADER: usize = 4 + 4 + 8 + 4;

pub struct Journal {
    path: PathBuf,
    file: File,
    bytes: u64,
}

/// What replaying found.
#[derive(Debug, Default, PartialEq)]
pub struct Replay {
    pub records: usize,
    /// Highest applied seq among the records kept.
    pub applied_seq: u64,
    /// Updates of the records of `epoch` with a seq above `after_seq`, in order.
    pub updates: Vec<HashUpdate>,
    /// Bytes after the last good record (a torn tail), cut on open.
    pub torn_bytes: u64,
}

impl Journal {
    /// Opens the journal, replays it, and cuts any torn tail so appends continue cleanly.
    pub fn open(path: &Path, epoch: u32, after_seq: u64) -> std::io::Result<(Self, Replay)> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut buf = vec![];
        file.read_to_end(&mut buf)?;
        let mut replay = Replay::default();
        let mut pos = 0usize;
        while let Some((len, rec_epoch, seq, updates)) = parse(&buf[pos..]) {
            if rec_epoch == epoch && seq > after_seq {
                replay.records += 1;
                replay.applied_seq = replay.applied_seq.max(seq);
                replay.updates.extend(updates);
            }
            pos += len;
        }
        replay.torn_bytes = (buf.len() - pos) as u64;
        if replay.torn_bytes > 0 {
            file.set_len(pos as u64)?;
            file.sync_all()?;
        }
        Ok((
            Self {
                path: path.to_path_buf(),
                file,
                bytes: pos as u64,
            },
            replay,
        ))
    }

    /// Appends one record (not yet durable: call [`Journal::sync`]).
    pub fn append(
        &mut self,
        epoch: u32,
        applied_seq: u64,
        updates: &[HashUpdate],
    ) -> std::io::Result<()> {
        for chunk in updates
            .chunks(MAX_COUNT as usize)
            .chain(updates.is_empty().then_some(&[][..]))
        {
            let mut rec = Vec::with_capacity(HEADER + chunk.len() * ENTRY + 4);
            rec.extend_from_slice(&MAGIC.to_le_bytes());
            rec.extend_from_slice(&epoch.to_le_bytes());
            rec.extend_from_slice(&applied_seq.to_le_bytes());
            rec.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            for &(d, b, h) in chunk {
                rec.extend_from_slice(&d.to_le_bytes());
                rec.extend_from_slice(&b.to_le_bytes());
                rec.extend_from_slice(&h.to_le_bytes());
            }
            let crc = crc32c::crc32c(&rec);
            rec.extend_from_slice(&crc.to_le_bytes());
            self.file.write_all(&rec)?;
            self.bytes += rec.len() as u64;
        }
        Ok(())
    }

    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Empties the journal after its content went into a durable snapshot.
    pub fn truncate(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.bytes = 0;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One record at the start of `b`: (its length, epoch, applied_seq, updates), or None if torn.
fn parse(b: &[u8]) -> Option<(usize, u32, u64, Vec<HashUpdate>)> {
    let head = b.get(..HEADER)?;
    let u32_at = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    if u32_at(0) != MAGIC {
        return None;
    }
    let epoch = u32_at(4);
    let seq = u64::from_le_bytes(head[8..16].try_into().ok()?);
    let count = u32_at(16);
    if count > MAX_COUNT {
        return None;
    }
    let len = HEADER + count as usize * ENTRY + 4;
    let rec = b.get(..len)?;
    let crc = u32::from_le_bytes(rec[len - 4..].try_into().ok()?);
    if crc32c::crc32c(&rec[..len - 4]) != crc {
        return None;
    }
    let updates = rec[HEADER..len - 4]
        .chunks_exact(ENTRY)
        .map(|e| {
            let d = u16::from_le_bytes([e[0], e[1]]);
            let blk = u32::from_le_bytes([e[2], e[3], e[4], e[5]]);
            let h = u64::from_le_bytes(e[6..14].try_into().expect("8 bytes"));
            (d, blk, h)
        })
        .collect();
    Some((len, epoch, seq, updates))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_in_order_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let (mut j, r) = Journal::open(&path, 1, 0).unwrap();
            assert_eq!(r, Replay::default());
            j.append(1, 5, &[(0, 1, 11), (1, 2, 22)]).unwrap();
            j.append(1, 9, &[(0, 1, 33)]).unwrap();
            j.sync().unwrap();
        }
        // A crash in the middle of a third record.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&MAGIC.to_le_bytes()).unwrap();
        f.write_all(&[1, 2, 3]).unwrap();
        drop(f);
        let (mut j, r) = Journal::open(&path, 1, 0).unwrap();
        assert_eq!(r.records, 2);
        assert_eq!(r.applied_seq, 9);
        assert_eq!(r.updates, vec![(0, 1, 11), (1, 2, 22), (0, 1, 33)]);
        assert_eq!(r.torn_bytes, 7);
        // Appends continue after the cut.
        j.append(1, 12, &[(0, 7, 77)]).unwrap();
        drop(j);
        let (_, r) = Journal::open(&path, 1, 0).unwrap();
        assert_eq!((r.records, r.applied_seq, r.torn_bytes), (3, 12, 0));
        // Records already in a snapshot at seq 9, or of another epoch, are skipped.
        let (_, r) = Journal::open(&path, 1, 9).unwrap();
        assert_eq!((r.records, r.updates.clone()), (1, vec![(0, 7, 77)]));
        let (_, r) = Journal::open(&path, 2, 0).unwrap();
        assert_eq!(r.records, 0);
    }

    #[test]
    fn a_flipped_bit_ends_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (mut j, _) = Journal::open(&path, 1, 0).unwrap();
        j.append(1, 1, &[(0, 0, 1)]).unwrap();
        j.append(1, 2, &[(0, 0, 2)]).unwrap();
        drop(j);
        let mut bytes = std::fs::read(&path).unwrap();
        let second = HEADER + ENTRY + 4;
        bytes[second + 20] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let (_, r) = Journal::open(&path, 1, 0).unwrap();
        assert_eq!((r.records, r.applied_seq), (1, 1));
    }
}
