//! Scan-mode capture: read a disk, hash every block (xxh3), and hand over the extents whose
//! hash differs from the table. Blocking I/O: runs in the blocking pool.
use std::{fs::File, os::unix::fs::FileExt, path::Path};

use xxhash_rust::xxh3::xxh3_64;

use super::core::BLOCK_BYTES;

/// Bytes read per I/O (1 MiB keeps the agent's memory small; larger reads gain nothing
/// measurable from the page cache).
const READ_BYTES: usize = 1 << 20;
/// Largest single write record.
pub const EXTENT_BYTES_MAX: usize = 1 << 20;

/// A run of changed blocks, as a capture write.
pub use super::capture::Write as Extent;

/// Hash of an all-zero block of `len` bytes: the initial table value, so an initial scan
/// skips zero blocks (the replica starts sparse, i.e. zero).
pub fn zero_hash(len: usize) -> u64 {
    xxh3_64(&vec![0u8; len])
}

/// The table of a disk whose replica is still all zeros.
pub fn zero_table(size_bytes: u64) -> Vec<u64> {
    let blocks = size_bytes.div_ceil(BLOCK_BYTES) as usize;
    let full = zero_hash(BLOCK_BYTES as usize);
    let mut t = vec![full; blocks];
    let tail = (size_bytes % BLOCK_BYTES) as usize;
    if tail != 0 {
        t[blocks - 1] = zero_hash(tail);
    }
    t
}

/// Size of a file or block device.
pub fn disk_size(path: &Path) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path)?;
    f.seek(SeekFrom::End(0))
}

/// Scans `path` against `table`, updating it, and calls `emit` for each changed extent (in
/// offset order). `progress` is called with bytes scanned so far. `emit` returning false
/// stops the scan (the table is then only updated for emitted extents).
/// The disk is scanned at `size` bytes (its captured size; the disk checks before the pass
/// decide about growth), which `table` describes.
pub fn scan_disk(
    path: &Path,
    disk: u16,
    table: &mut [u64],
    size: u64,
    mut progress: impl FnMut(u64),
    mut emit: impl FnMut(Extent) -> bool,
) -> std::io::Result<bool> {
    let f = File::open(path)?;
    let blocks_expected = size.div_ceil(BLOCK_BYTES) as usize;
    if table.len() != blocks_expected {
        return Err(std::io::Error::other(format!(
            "disk {} is scanned at {size} bytes ({blocks_expected} blocks) but its table has {} blocks",
            path.display(),
            table.len()
        )));
    }
    let mut buf = vec![0u8; READ_BYTES];
    let mut pending: Option<Extent> = None;
    let mut offset = 0u64;
    while offset < size {
        let want = ((size - offset) as usize).min(READ_BYTES);
        let chunk = &mut buf[..want];
        f.read_exact_at(chunk, offset)?;
        for (i, block) in chunk.chunks(BLOCK_BYTES as usize).enumerate() {
            let block_off = offset + i as u64 * BLOCK_BYTES;
            let idx = (block_off / BLOCK_BYTES) as usize;
            let h = xxh3_64(block);
            if h == table[idx] {
                if let Some(e) = pending.take() {
                    if !emit(e) {
                        return Ok(false);
                    }
                }
                continue;
            }
            table[idx] = h;
            let extend = pending.as_ref().is_some_and(|e| {
                e.offset + e.data.len() as u64 == block_off && e.data.len() < EXTENT_BYTES_MAX
            });
            if !extend {
                if let Some(e) = pending.take() {
                    if !emit(e) {
                        return Ok(false);
                    }
                }
                pending = Some(Extent {
                    disk,
                    offset: block_off,
                    data: Vec::with_capacity(64 << 10),
                    updates: vec![],
                });
            }
            let e = pending.as_mut().expect("set above");
            e.data.extend_from_slice(block);
            e.updates.push((disk, idx as u32, h));
        }
        offset += want as u64;
        progress(offset);
    }
    if let Some(e) = pending.take() {
        if !emit(e) {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_are_skipped_and_changes_coalesce() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let size = 10 * BLOCK_BYTES + 100; // a partial tail block
        let mut data = vec![0u8; size as usize];
        data[BLOCK_BYTES as usize..3 * BLOCK_BYTES as usize].fill(7); // blocks 1,2
        data[(10 * BLOCK_BYTES) as usize + 5] = 1; // tail block
        std::fs::write(&path, &data).unwrap();
        let mut table = zero_table(size);
        let mut got = vec![];
        assert!(scan_disk(
            &path,
            0,
            &mut table,
            size,
            |_| {},
            |e| {
                got.push((e.offset, e.data.len()));
                true
            }
        )
        .unwrap());
        assert_eq!(
            got,
            vec![
                (BLOCK_BYTES, 2 * BLOCK_BYTES as usize),
                (10 * BLOCK_BYTES, 100)
            ]
        );
        // A second scan finds nothing; a one-byte change finds one block.
        let mut n = 0;
        scan_disk(
            &path,
            0,
            &mut table,
            size,
            |_| {},
            |_| {
                n += 1;
                true
            },
        )
        .unwrap();
        assert_eq!(n, 0);
        data[5 * BLOCK_BYTES as usize] = 9;
        std::fs::write(&path, &data).unwrap();
        let mut got = vec![];
        scan_disk(
            &path,
            0,
            &mut table,
            size,
            |_| {},
            |e| {
                got.push((e.offset, e.updates.len()));
                true
            },
        )
        .unwrap();
        assert_eq!(got, vec![(5 * BLOCK_BYTES, 1)]);
    }

    #[test]
    fn a_table_of_another_size_is_an_error_and_a_grown_disk_is_scanned_at_its_captured_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let mut table = zero_table(4096);
        assert!(scan_disk(&path, 0, &mut table, 8192, |_| {}, |_| true).is_err());
        // The disk grew to 8 KiB, the stream has it at 4 KiB: only that much is scanned.
        let mut seen = 0;
        assert!(scan_disk(
            &path,
            0,
            &mut table,
            4096,
            |_| {},
            |e| {
                seen += e.data.len();
                true
            }
        )
        .unwrap());
        assert_eq!(seen, 4096);
    }
}
