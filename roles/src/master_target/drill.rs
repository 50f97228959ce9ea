//! Test failover (a DR drill): the view of a machine's disks at a recovery point, served as
//! writable copy-on-write NBD exports at the master target while replication goes on.
//!
//! Writes of the drill go to a scratch overlay per disk (`<data>/drills/<machine>/<disk>.overlay`,
//! sparse, with a bitmap of the 4 KiB blocks written, `<disk>.map`); reads take a block from
//! the overlay where it was written and from the view everywhere else. The replica and its
//! journal are only ever read: a view is a read-only handle that pins its point against
//! pruning, and nothing here opens a replica file for writing.
//!
//! The drill is recorded in `<data>/drills/<machine>/drill` before it is served, so a master
//! target that restarts serves it again (the overlay's bitmap is saved at every flush: like a
//! disk, a drill keeps what was flushed); cleanup deletes the directory last, after the exports
//! are gone, so a crash during cleanup leaves a drill that is cleaned again, never half there.
use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use futures::future::BoxFuture;
use haven_nbd::Backend;
use serde::{Deserialize, Serialize};

use crate::fsutil::{read_optional, write_atomic};
use crate::proto::ReverseMark;

/// Block size of the overlay's bitmap.
pub const BLOCK: u64 = 4096;

/// A point-in-time view of a machine's disks (the replica overlaid with its journal), as
/// the drill reads it.
pub trait DiskView: Send + Sync + 'static {
    fn size(&self, disk: u16) -> io::Result<u64>;
    /// Fills `buf` with the view's bytes at `offset` (within the disk's size).
    fn read_at(&self, disk: u16, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The byte ranges where the replica's image may differ from the view, in order; None if
    /// this is not tracked (then all of the disk may).
    fn changed(&self, _disk: u16) -> io::Result<Option<Vec<(u64, u64)>>> {
        Ok(None)
    }
}

/// The drill's record on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillRecord {
    pub version: u32,
    pub machine: String,
    pub epoch: u32,
    pub point_seq: u64,
    pub point: crate::view::PointView,
    pub disks: Vec<String>,
    pub started_ms: u64,
}

pub const DRILL_VERSION: u32 = 1;

pub fn drill_dir(data_dir: &Path, machine: &str) -> PathBuf {
    data_dir.join("drills").join(machine)
}

pub fn load_record(dir: &Path) -> io::Result<Option<DrillRecord>> {
    let Some(bytes) = read_optional(&dir.join("drill"))? else {
        return Ok(None);
    };
    let r: DrillRecord = haven_transport::codec::decode(&bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("drill record: {e}")))?;
    if r.version > DRILL_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "drill record version {} is newer than this haven's {DRILL_VERSION}",
                r.version
            ),
        ));
    }
    Ok(Some(r))
}

pub fn save_record(dir: &Path, r: &DrillRecord) -> io::Result<()> {
    crate::fsutil::create_private_dir(dir)?;
    let bytes = haven_transport::codec::encode(r).map_err(io::Error::other)?;
    write_atomic(&dir.join("drill"), &bytes)
}

/// One disk of a drill: the view below, the overlay above.
pub struct CowDisk {
    view: Arc<dyn DiskView>,
    disk: u16,
    size: u64,
    overlay: File,
    map_path: PathBuf,
    /// Bit per block: written in the overlay.
    map: Mutex<Vec<u64>>,
    writes: AtomicU64,
    bytes: AtomicU64,
    /// Read-only (a failback quiesced it): writes fail with EPERM. Writes hold it shared, so
    /// once [`quiesce`](Self::quiesce) has it exclusively no write is half done.
    read_only: std::sync::RwLock<bool>,
    /// Names this opening of the overlay in [`ReverseMark`]s: the stamps below are of it
    /// (memory only; a reopened overlay knows no marks of before).
    boot: u64,
    /// The mark a write taken now is stamped with; a [`mark`](Self::mark) moves it on.
    clock: AtomicU32,
    /// Per block, the clock when a write of it last completed (0: not since the opening);
    /// empty until the first write. 4 bytes per 4 KiB, only while a failover is served.
    stamps: Mutex<Vec<u32>>,
}

impl std::fmt::Debug for CowDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CowDisk(#{}, {} bytes)", self.disk, self.size)
    }
}

impl CowDisk {
    /// Opens (or creates) the overlay of `name` in `dir`; an existing bitmap is loaded, so a
    /// restarted drill keeps what was flushed.
    pub fn open(view: Arc<dyn DiskView>, disk: u16, dir: &Path, name: &str) -> io::Result<Self> {
        let size = view.size(disk)?;
        let overlay = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(format!("{name}.overlay")))?;
        overlay.set_len(size)?;
        let words = size.div_ceil(BLOCK).div_ceil(64) as usize;
        let map_path = dir.join(format!("{name}.map"));
        let mut map = vec![0u64; words];
        if let Some(bytes) = read_optional(&map_path)? {
            if bytes.len() == words * 8 {
                for (w, c) in map.iter_mut().zip(bytes.chunks_exact(8)) {
                    *w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                }
            } else {
                tracing::warn!(path = %map_path.display(), "overlay bitmap of another size: the drill's earlier writes are dropped");
            }
        }
        let written = map.iter().map(|w| w.count_ones() as u64).sum::<u64>();
        Ok(Self {
            view,
            disk,
            size,
            overlay,
            map_path,
            map: Mutex::new(map),
            writes: AtomicU64::new(0),
            bytes: AtomicU64::new(written * BLOCK),
            read_only: std::sync::RwLock::new(false),
            boot: rand::random::<u64>() | 1,
            clock: AtomicU32::new(1),
            stamps: Mutex::new(Vec::new()),
        })
    }

    /// A mark of this disk's writes: [`changed_since`](Self::changed_since) it lists every
    /// block whose write completes after it. A reader that reads a block after taking the
    /// mark sees every write the mark does not list: a write is stamped after its data is
    /// in the overlay, with the clock as it is then, so a stamp older than the mark means
    /// the data was there before the mark was taken.
    pub fn mark(&self) -> ReverseMark {
        ReverseMark {
            boot: self.boot,
            mark: self.clock.fetch_add(1, Ordering::SeqCst).saturating_add(1),
        }
    }

    /// The blocks in `first..first + n` written since `since`, ascending; None if `since`
    /// is not of this opening of the overlay.
    pub fn changed_since(&self, since: ReverseMark, first: u64, n: u64) -> Option<Vec<u64>> {
        if since.boot != self.boot {
            return None;
        }
        let stamps = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
        let end = first.saturating_add(n).min(stamps.len() as u64);
        Some(
            (first.min(end)..end)
                .filter(|&b| stamps[b as usize] >= since.mark)
                .collect(),
        )
    }

    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Failback: no write is taken from now on, and every write taken is durable (the
    /// overlay and its bitmap) when this returns.
    pub fn quiesce(&self) -> io::Result<()> {
        let mut ro = self.read_only.write().unwrap_or_else(|p| p.into_inner());
        *ro = true;
        self.sync()
    }

    /// A write, unless read-only.
    fn write_checked(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let ro = self.read_only.read().unwrap_or_else(|p| p.into_inner());
        if *ro {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the recovery disk is read-only: the machine is failing back",
            ));
        }
        self.write_blocks(offset, data)
    }

    /// Bytes of the overlay (blocks written).
    pub fn overlay_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn is_written(map: &[u64], block: u64) -> bool {
        map[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Reads the disk as the drill (or failover) sees it: the overlay where written, the
    /// view elsewhere.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_blocks(offset, buf)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn read_blocks(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Runs of blocks from the same source are read at once.
        let mut at = 0usize;
        while at < buf.len() {
            let pos = offset + at as u64;
            let block = pos / BLOCK;
            let from_overlay = Self::is_written(&map, block);
            let mut end = at;
            while end < buf.len() {
                let b = (offset + end as u64) / BLOCK;
                if Self::is_written(&map, b) != from_overlay {
                    break;
                }
                end = ((b + 1) * BLOCK - offset) as usize;
            }
            let end = end.min(buf.len());
            if from_overlay {
                self.overlay.read_exact_at(&mut buf[at..end], pos)?;
            } else {
                self.view.read_at(self.disk, pos, &mut buf[at..end])?;
            }
            at = end;
        }
        Ok(())
    }

    fn write_blocks(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = offset / BLOCK * BLOCK;
        let end = ((offset + data.len() as u64).div_ceil(BLOCK) * BLOCK).min(self.size);
        // Partial blocks at the edges take the rest of their block from where it is now.
        let mut whole = vec![0u8; (end - start) as usize];
        let head = (offset - start) as usize;
        if head != 0 || (offset + data.len() as u64) < end {
            self.read_blocks(start, &mut whole)?;
        }
        whole[head..head + data.len()].copy_from_slice(data);
        self.overlay.write_all_at(&whole, start)?;
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut fresh = 0;
        for b in start / BLOCK..end.div_ceil(BLOCK) {
            let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            if map[w] & bit == 0 {
                map[w] |= bit;
                fresh += 1;
            }
        }
        drop(map);
        // Stamped once the data is in the overlay (see `mark`).
        let tick = self.clock.load(Ordering::SeqCst);
        let mut stamps = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
        if stamps.is_empty() {
            stamps.resize(self.size.div_ceil(BLOCK) as usize, 0);
        }
        for b in start / BLOCK..end.div_ceil(BLOCK) {
            stamps[b as usize] = tick;
        }
        drop(stamps);
        self.bytes.fetch_add(fresh * BLOCK, Ordering::Relaxed);
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The 4 KiB-aligned ranges where this disk may differ from the replica's image: the
    /// blocks written here (the overlay's bitmap) and those the replica overwrote after the
    /// point (the view's journal records). None where that is not tracked (a resize since
    /// the point): then all of the disk may differ. Outside the ranges both are the point's
    /// bytes, which is what lets a failback compare only them.
    pub fn differs_from_replica(&self) -> io::Result<Option<Vec<(u64, u64)>>> {
        let Some(replica) = self.view.changed(self.disk)? else {
            return Ok(None);
        };
        let mut ranges: Vec<(u64, u64)> = replica
            .into_iter()
            .map(|(s, e)| (s / BLOCK * BLOCK, e.div_ceil(BLOCK) * BLOCK))
            .collect();
        {
            let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            ranges.extend(bit_runs(&map).map(|(s, e)| (s * BLOCK, e * BLOCK)));
        }
        Ok(Some(merge_ranges(ranges, self.size)))
    }

    /// Makes the drill's writes so far durable: the overlay, then its bitmap.
    fn sync(&self) -> io::Result<()> {
        self.overlay.sync_data()?;
        let bytes: Vec<u8> = {
            let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.iter().flat_map(|w| w.to_le_bytes()).collect()
        };
        write_atomic(&self.map_path, &bytes)
    }
}

impl Backend for CowDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, io::Result<Vec<u8>>> {
        Box::pin(async move {
            let mut buf = vec![0u8; len as usize];
            self.read_blocks(offset, &mut buf)?;
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.write_checked(offset, &data)?;
            if fua {
                self.sync()?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move { self.sync() })
    }

    /// Advisory: the drill keeps what it had.
    fn trim(&self, _offset: u64, _len: u32) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let mut at = offset;
            let end = offset + len as u64;
            while at < end {
                let n = (end - at).min(1 << 20) as usize;
                self.write_checked(at, &vec![0u8; n])?;
                at += n as u64;
            }
            if fua {
                self.sync()?;
            }
            Ok(())
        })
    }
}

/// The runs `[first, end)` of set bits in `map`.
fn bit_runs(map: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut b = 0u64;
    let bits = map.len() as u64 * 64;
    std::iter::from_fn(move || {
        while b < bits {
            let w = map[(b / 64) as usize];
            if w == 0 && b % 64 == 0 {
                b += 64;
                continue;
            }
            if w & (1 << (b % 64)) == 0 {
                b += 1;
                continue;
            }
            let start = b;
            while b < bits && map[(b / 64) as usize] & (1 << (b % 64)) != 0 {
                b += 1;
            }
            return Some((start, b));
        }
        None
    })
}

/// `ranges` sorted, overlapping and adjacent ones merged, clipped to `size`.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>, size: u64) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        let (s, e) = (s.min(size), e.min(size));
        if s >= e {
            continue;
        }
        match out.last_mut() {
            Some((_, end)) if *end >= s => *end = (*end).max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Writes `disk` of `view` as a sparse raw image at `path` (all-zero blocks stay holes).
/// Returns the bytes written (not counting holes).
pub fn export_image(view: &dyn DiskView, disk: u16, path: &Path) -> io::Result<u64> {
    const CHUNK: usize = 1 << 20;
    let size = view.size(disk)?;
    let tmp = path.with_extension("img.partial");
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.set_len(size)?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    let mut at = 0u64;
    while at < size {
        let n = ((size - at) as usize).min(CHUNK);
        view.read_at(disk, at, &mut buf[..n])?;
        for (i, block) in buf[..n].chunks(BLOCK as usize).enumerate() {
            if block.iter().any(|&b| b != 0) {
                f.write_all_at(block, at + (i as u64) * BLOCK)?;
                written += block.len() as u64;
            }
        }
        at += n as u64;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view that is a plain buffer per disk.
    struct Mem(Vec<Vec<u8>>);
    impl DiskView for Mem {
        fn size(&self, disk: u16) -> io::Result<u64> {
            Ok(self.0[disk as usize].len() as u64)
        }
        fn read_at(&self, disk: u16, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let d = &self.0[disk as usize];
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    fn base() -> Arc<Mem> {
        let d: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        Arc::new(Mem(vec![d]))
    }

    #[tokio::test]
    async fn writes_go_to_the_overlay_and_reads_merge_it_over_the_view() {
        let dir = tempfile::tempdir().unwrap();
        let view = base();
        let cow = CowDisk::open(view.clone(), 0, dir.path(), "d0").unwrap();
        let mut want = view.0[0].clone();
        // Unaligned, spanning blocks.
        cow.write(5000, vec![0xaa; 6000], false).await.unwrap();
        want[5000..11000].fill(0xaa);
        cow.write(0, vec![0xbb; 10], false).await.unwrap();
        want[..10].fill(0xbb);
        assert_eq!(cow.read(0, 64 * 1024).await.unwrap(), want);
        assert_eq!(cow.read(4090, 20).await.unwrap(), want[4090..4110]);
        assert_eq!(cow.writes(), 2);
        // Blocks 0, 1 and 2 are in the overlay.
        assert_eq!(cow.overlay_bytes(), 3 * BLOCK);
        // The view itself is untouched.
        assert_eq!(view.0[0][5000], (5000 % 251) as u8);

        // Flushed writes survive a reopen (a master-target restart).
        cow.flush().await.unwrap();
        drop(cow);
        let cow = CowDisk::open(view.clone(), 0, dir.path(), "d0").unwrap();
        assert_eq!(cow.read(0, 64 * 1024).await.unwrap(), want);
        assert_eq!(cow.overlay_bytes(), 3 * BLOCK);
    }

    /// A view whose replica changed in `changed` since its point.
    struct Changed(Mem, Option<Vec<(u64, u64)>>);
    impl DiskView for Changed {
        fn size(&self, disk: u16) -> io::Result<u64> {
            self.0.size(disk)
        }
        fn read_at(&self, disk: u16, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.0.read_at(disk, offset, buf)
        }
        fn changed(&self, _disk: u16) -> io::Result<Option<Vec<(u64, u64)>>> {
            Ok(self.1.clone())
        }
    }

    #[tokio::test]
    async fn the_failback_compares_the_overlay_and_the_replica_changes_only() {
        let dir = tempfile::tempdir().unwrap();
        let d: Vec<u8> = vec![1; 64 * 1024];
        // The replica overwrote bytes 100..200 and 20000..20001 after the point.
        let view = Arc::new(Changed(
            Mem(vec![d]),
            Some(vec![(100, 200), (20000, 20001)]),
        ));
        let cow = CowDisk::open(view, 0, dir.path(), "d0").unwrap();
        // Blocks 1 (unaligned), 2, 3 and the last (block 15) written here.
        cow.write(5000, vec![2; 8000], false).await.unwrap();
        cow.write(63 * 1024, vec![2; 1024], false).await.unwrap();
        assert_eq!(
            cow.differs_from_replica().unwrap(),
            Some(vec![(0, 5 * BLOCK), (15 * BLOCK, 16 * BLOCK)])
        );
        // Untracked (a resize since the point): all of the disk.
        let untracked = Arc::new(Changed(Mem(vec![vec![0; 8192]]), None));
        let dir2 = tempfile::tempdir().unwrap();
        let cow = CowDisk::open(untracked, 0, dir2.path(), "d0").unwrap();
        assert_eq!(cow.differs_from_replica().unwrap(), None);
    }

    #[tokio::test]
    async fn a_mark_lists_the_blocks_written_after_it_and_only_for_its_opening() {
        let dir = tempfile::tempdir().unwrap();
        let view = base();
        let cow = CowDisk::open(view.clone(), 0, dir.path(), "d0").unwrap();
        cow.write(0, vec![1; 10], false).await.unwrap();
        let m1 = cow.mark();
        assert_eq!(cow.changed_since(m1, 0, 16), Some(vec![]));
        // Blocks 3 and 4 (unaligned), then 9; asked by range.
        cow.write(3 * 4096 + 100, vec![2; 4096], false)
            .await
            .unwrap();
        let m2 = cow.mark();
        cow.write(9 * 4096, vec![3; 4096], false).await.unwrap();
        assert_eq!(cow.changed_since(m1, 0, 16), Some(vec![3, 4, 9]));
        assert_eq!(cow.changed_since(m1, 4, 5), Some(vec![4]));
        assert_eq!(cow.changed_since(m2, 0, 16), Some(vec![9]));
        assert_eq!(cow.changed_since(m2, 10, 1 << 40), Some(vec![]));
        // Rewriting a block listed before a mark lists it after the mark too.
        let m3 = cow.mark();
        cow.write(3 * 4096, vec![4; 1], false).await.unwrap();
        assert_eq!(cow.changed_since(m3, 0, 16), Some(vec![3]));
        // A reopened overlay (a restarted master target) knows no mark of before.
        cow.flush().await.unwrap();
        drop(cow);
        let cow = CowDisk::open(view, 0, dir.path(), "d0").unwrap();
        assert_eq!(cow.changed_since(m3, 0, 16), None);
    }

    #[test]
    fn bit_runs_and_merged_ranges() {
        let map = [0b1011u64, 0, 1 << 63, 1];
        let runs: Vec<_> = bit_runs(&map).collect();
        assert_eq!(runs, vec![(0, 2), (3, 4), (191, 193)]);
        assert_eq!(
            merge_ranges(vec![(10, 20), (0, 5), (5, 8), (15, 30), (40, 50)], 45),
            vec![(0, 8), (10, 30), (40, 45)]
        );
    }

    #[test]
    fn an_exported_image_equals_the_view_and_is_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = vec![0u8; 1 << 21];
        d[4096 * 3] = 7;
        d[(1 << 21) - 1] = 9;
        let view = Mem(vec![d.clone()]);
        let path = dir.path().join("d0.img");
        let written = export_image(&view, 0, &path).unwrap();
        assert_eq!(written, 2 * BLOCK);
        assert_eq!(std::fs::read(&path).unwrap(), d);
    }

    #[test]
    fn a_drill_record_checks_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = DrillRecord {
            version: DRILL_VERSION,
            machine: "m1".into(),
            epoch: 1,
            point_seq: 9,
            point: Default::default(),
            disks: vec!["d0".into()],
            started_ms: 1,
        };
        save_record(dir.path(), &r).unwrap();
        assert_eq!(load_record(dir.path()).unwrap(), Some(r.clone()));
        r.version = DRILL_VERSION + 1;
        save_record(dir.path(), &r).unwrap();
        let e = load_record(dir.path()).unwrap_err();
        assert!(e.to_string().contains("newer"), "{e}");
    }
}
