//! Disk identity and geometry: is the disk at `--disk NAME=PATH` still the disk that was
//! protected, and has it changed size?
//!
//! The agent records each protected disk when a protection starts (and when the operator
//! asks for `ctl resync M --disk D`): its path, protected size, and how to recognise it — a
//! stable device id for a block device where the system offers one (`dm:`, `wwid:`,
//! `serial:`, `loop:<backing file>`), else the file's `(device, inode)`, and in every case
//! the content of sampled blocks, compared with what the replica holds (the agent's table of
//! the replica's block hashes): where the path, inode or device id no longer vouch for the
//! disk, at least half of the sampled data blocks must still hold what the replica holds (a
//! disk written while the agent was down keeps most of them; another disk, even one made
//! from the same template, rarely does). Before every pass it looks again ([`judge`]):
//!
//! - **grown**: the stream grows the replica (sparse) in seq order; only the new region and
//!   changed blocks travel;
//! - **shrunk**, or **replaced** (another device id; or another file whose sampled blocks
//!   all differ from the replica): the disk is blocked — nothing of it is sent, the machine
//!   shows degraded with the reason, until the operator decides (`ctl resync`, or
//!   unprotect/protect) or the right disk is back at its path;
//! - the same disk at another path or inode (a renamed or restored image) is adopted.
//!
//! The rules are plain functions of what was recorded and what is observed; the I/O (stat,
//! sysfs, reading sampled blocks) is in [`observe`] and [`check_content`].
use std::{fs::File, io, os::unix::fs::FileExt, path::Path};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::core::{BLOCK_BYTES, UNKNOWN_HASH};
use super::scan::zero_hash;

/// Version of `<data>/agent/disks`.
pub const DISKS_FILE_VERSION: u32 = 1;
/// Blocks sampled to recognise a disk's content.
pub const SAMPLES: usize = 16;

/// A protected disk as the agent recorded it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub name: String,
    pub path: String,
    /// The protected geometry: the size the stream has given (or is giving) the replica.
    pub size_bytes: u64,
    pub device_id: Option<String>,
    /// `(st_dev, st_ino)` of a regular file.
    pub file_id: Option<(u64, u64)>,
    /// A digest of the sampled blocks when the disk was adopted (shown in the inventory).
    pub fingerprint: String,
    /// The last `ctl resync` request for this disk that was carried out.
    pub resync_done: u64,
    /// Unix ms since which the disk is blocked, while it is.
    pub blocked_since_ms: Option<u64>,
}

impl DiskRecord {
    /// How the inventory shows the disk's identity.
    pub fn id_text(&self) -> String {
        let id = match (&self.device_id, self.file_id) {
            (Some(d), _) => d.clone(),
            (None, Some((dev, ino))) => format!("file:{dev}:{ino}"),
            (None, None) => "unknown".into(),
        };
        if self.fingerprint.is_empty() {
            id
        } else {
            format!("{id} fp:{}", self.fingerprint)
        }
    }
}

/// `<data>/agent/disks`: the protected disks of one protection epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisksFile {
    pub version: u32,
    pub epoch: u32,
    pub disks: Vec<DiskRecord>,
}

/// What is at a disk's path now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub path: String,
    pub size_bytes: u64,
    pub device_id: Option<String>,
    pub file_id: Option<(u64, u64)>,
}

/// The sampled blocks of the replica's table, read from the disk now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContentCheck {
    pub sampled: usize,
    pub matched: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The protected disk, at its protected size.
    Same,
    /// The protected disk at another path or inode: adopt them.
    Moved,
    /// The protected disk, larger than the stream has it (`from` is the captured size).
    Grown { from: u64, to: u64 },
    /// Smaller than its protected size: blocked.
    Shrunk { from: u64, to: u64 },
    /// Not the disk that was protected: blocked, with the reason.
    Replaced(String),
}

impl Verdict {
    /// The reason an operator sees for a blocked disk, or None.
    pub fn blocked_reason(&self, disk: &str, machine: &str) -> Option<String> {
        match self {
            Verdict::Shrunk { from, to } => Some(format!(
                "disk {disk} shrank from {} to {}: nothing of it is replicated until you decide: \
                 `haven ctl resync {machine} --disk {disk}` replicates it at its new size (the \
                 replica shrinks), or unprotect and protect {machine} for a full resync",
                size_text(*from),
                size_text(*to)
            )),
            Verdict::Replaced(why) => Some(format!(
                "{why}: nothing of it is replicated until you decide: put the protected disk back, \
                 or `haven ctl resync {machine} --disk {disk}` to replicate this one into the \
                 replica (only blocks that differ travel), or unprotect and protect {machine}"
            )),
            _ => None,
        }
    }
}

pub fn size_text(b: u64) -> String {
    const MIB: u64 = 1 << 20;
    if b % MIB == 0 {
        format!("{} MiB", b / MIB)
    } else {
        format!("{b} bytes")
    }
}

/// Judges what is at the path against the record. `captured_size` is the size the agent's
/// stream has the disk at now (the record's, or less after a restart whose growth was not yet
/// applied). `content` reads the sampled blocks; it is called only when the path, inode or
/// device id no longer vouch for the disk.
pub fn judge(
    rec: &DiskRecord,
    obs: &Observed,
    captured_size: u64,
    content: impl FnOnce() -> ContentCheck,
) -> Verdict {
    let same_path = rec.path == obs.path;
    let moved = match (&rec.device_id, &obs.device_id) {
        (Some(was), Some(is)) if was == is => !same_path,
        (Some(was), Some(is)) => {
            return Verdict::Replaced(format!(
                "disk {} at {} is not the disk that was protected: its device id is {is}, the protected disk's {was}",
                rec.name, obs.path
            ))
        }
        _ if same_path && rec.file_id.is_some() && rec.file_id == obs.file_id => false,
        _ => {
            let c = content();
            if c.sampled > 0 && c.matched * 2 < c.sampled {
                let was = if same_path {
                    String::new()
                } else {
                    format!(" (it was at {})", rec.path)
                };
                return Verdict::Replaced(format!(
                    "disk {} at {} is not the disk that was protected{was}: {} of {} sampled blocks hold what the replica holds",
                    rec.name, obs.path, c.matched, c.sampled
                ));
            }
            !same_path || rec.file_id != obs.file_id || rec.device_id != obs.device_id
        }
    };
    if obs.size_bytes < rec.size_bytes {
        return Verdict::Shrunk {
            from: rec.size_bytes,
            to: obs.size_bytes,
        };
    }
    if obs.size_bytes > captured_size {
        return Verdict::Grown {
            from: captured_size,
            to: obs.size_bytes,
        };
    }
    if moved {
        Verdict::Moved
    } else {
        Verdict::Same
    }
}

/// Block indices to sample: spread over the disk, each the first block holding data (by the
/// table) at or after its spot, never the last block (its hash depends on the size).
pub fn sample_blocks(table: &[u64]) -> Vec<u32> {
    const LOOK: usize = 256;
    let zero = zero_hash(BLOCK_BYTES as usize);
    let usable = table.len().saturating_sub(1);
    let mut out: Vec<u32> = vec![];
    for i in 0..SAMPLES {
        let start = i * usable / SAMPLES;
        let found = (start..usable.min(start + LOOK))
            .find(|&b| table[b] != zero && table[b] != UNKNOWN_HASH);
        if let Some(b) = found {
            if out.last() != Some(&(b as u32)) {
                out.push(b as u32);
            }
        }
    }
    out
}

/// A short digest of the sampled blocks' hashes (for the inventory).
pub fn fingerprint(table: &[u64]) -> String {
    let mut buf = vec![];
    for b in sample_blocks(table) {
        buf.extend_from_slice(&b.to_le_bytes());
        buf.extend_from_slice(&table[b as usize].to_le_bytes());
    }
    if buf.is_empty() {
        return String::new();
    }
    format!("{:016x}", xxh3_64(&buf))
}

/// Reads the sampled blocks at `path` and counts those that hash as in `table`.
pub fn check_content(path: &Path, table: &[u64], size_bytes: u64) -> ContentCheck {
    let Ok(f) = File::open(path) else {
        return ContentCheck::default();
    };
    let mut c = ContentCheck::default();
    let mut buf = vec![0u8; BLOCK_BYTES as usize];
    for b in sample_blocks(table) {
        let off = b as u64 * BLOCK_BYTES;
        if off + BLOCK_BYTES > size_bytes {
            continue;
        }
        c.sampled += 1;
        if f.read_exact_at(&mut buf, off).is_ok() && xxh3_64(&buf) == table[b as usize] {
            c.matched += 1;
        }
    }
    c
}

/// What is at `path`: its size, and a stable id where there is one.
pub fn observe(path: &Path) -> io::Result<Observed> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(path)?;
    let size_bytes = super::scan::disk_size(path)?;
    let (device_id, file_id) = if meta.file_type().is_block_device() {
        (block_device_id(meta.rdev()), None)
    } else {
        (None, Some((meta.dev(), meta.ino())))
    };
    Ok(Observed {
        path: path.display().to_string(),
        size_bytes,
        device_id,
        file_id,
    })
}

/// A stable id of a block device from sysfs, if the system offers one.
fn block_device_id(rdev: u64) -> Option<String> {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    let sys = std::path::PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if let Some(id) = sysfs_id(&sys) {
        return Some(id);
    }
    // A partition: its parent's id and its number.
    let part = std::fs::read_to_string(sys.join("partition")).ok()?;
    let parent = std::fs::canonicalize(&sys).ok()?.parent()?.to_path_buf();
    sysfs_id(&parent).map(|id| format!("{id}:part{}", part.trim()))
}

fn sysfs_id(dir: &Path) -> Option<String> {
    const SOURCES: [(&str, &str); 6] = [
        ("dm/uuid", "dm"),
        ("device/wwid", "wwid"),
        ("wwid", "wwid"),
        ("device/serial", "serial"),
        ("serial", "serial"),
        ("loop/backing_file", "loop"),
    ];
    SOURCES.iter().find_map(|(file, kind)| {
        let v = std::fs::read_to_string(dir.join(file)).ok()?;
        let v = v.trim();
        (!v.is_empty()).then(|| format!("{kind}:{v}"))
    })
}

/// A record of the disk as it is now (a new protection, or a resync).
pub fn adopt(name: &str, obs: &Observed, table: &[u64], resync_done: u64) -> DiskRecord {
    DiskRecord {
        name: name.to_string(),
        path: obs.path.clone(),
        size_bytes: obs.size_bytes,
        device_id: obs.device_id.clone(),
        file_id: obs.file_id,
        fingerprint: fingerprint(table),
        resync_done,
        blocked_since_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn rec() -> DiskRecord {
        DiskRecord {
            name: "d0".into(),
            path: "/img/a.img".into(),
            size_bytes: 64 * MIB,
            file_id: Some((1, 100)),
            ..Default::default()
        }
    }

    fn obs(path: &str, size: u64, file_id: (u64, u64)) -> Observed {
        Observed {
            path: path.into(),
            size_bytes: size,
            device_id: None,
            file_id: Some(file_id),
        }
    }

    fn no_read() -> ContentCheck {
        panic!("the path and inode vouch for the disk: no content check")
    }

    fn content(sampled: usize, matched: usize) -> impl FnOnce() -> ContentCheck {
        move || ContentCheck { sampled, matched }
    }

    #[test]
    fn same_file_same_size_is_the_same_disk() {
        let v = judge(
            &rec(),
            &obs("/img/a.img", 64 * MIB, (1, 100)),
            64 * MIB,
            no_read,
        );
        assert_eq!(v, Verdict::Same);
    }

    #[test]
    fn a_larger_disk_grew_from_the_captured_size() {
        let v = judge(
            &rec(),
            &obs("/img/a.img", 96 * MIB, (1, 100)),
            64 * MIB,
            no_read,
        );
        assert_eq!(
            v,
            Verdict::Grown {
                from: 64 * MIB,
                to: 96 * MIB
            }
        );
        // After a restart whose growth was emitted but not applied, the stream has it at
        // the applied size: the growth is sent again.
        let mut r = rec();
        r.size_bytes = 96 * MIB;
        let v = judge(
            &r,
            &obs("/img/a.img", 96 * MIB, (1, 100)),
            64 * MIB,
            no_read,
        );
        assert_eq!(
            v,
            Verdict::Grown {
                from: 64 * MIB,
                to: 96 * MIB
            }
        );
    }

    #[test]
    fn a_smaller_disk_shrank_from_the_protected_size() {
        let mut r = rec();
        r.size_bytes = 96 * MIB;
        let v = judge(
            &r,
            &obs("/img/a.img", 80 * MIB, (1, 100)),
            64 * MIB,
            no_read,
        );
        assert_eq!(
            v,
            Verdict::Shrunk {
                from: 96 * MIB,
                to: 80 * MIB
            }
        );
        let why = v.blocked_reason("d0", "m1").unwrap();
        assert!(
            why.starts_with("disk d0 shrank from 96 MiB to 80 MiB"),
            "{why}"
        );
        assert!(why.contains("haven ctl resync m1 --disk d0"), "{why}");
    }

    #[test]
    fn another_file_whose_blocks_all_differ_is_replaced() {
        let v = judge(
            &rec(),
            &obs("/img/b.img", 64 * MIB, (1, 200)),
            64 * MIB,
            content(16, 0),
        );
        let Verdict::Replaced(why) = &v else {
            panic!("{v:?}")
        };
        assert_eq!(
            why,
            "disk d0 at /img/b.img is not the disk that was protected (it was at /img/a.img): 0 of 16 sampled blocks hold what the replica holds"
        );
        // Same path, another inode (the image was replaced by another file).
        let v = judge(
            &rec(),
            &obs("/img/a.img", 64 * MIB, (1, 300)),
            64 * MIB,
            content(16, 0),
        );
        assert!(matches!(v, Verdict::Replaced(_)), "{v:?}");
    }

    #[test]
    fn the_same_content_at_another_path_or_inode_is_adopted() {
        // Half the sampled blocks still hold the replica's data: the disk was written while
        // the agent was down, not replaced.
        let v = judge(
            &rec(),
            &obs("/img/moved.img", 64 * MIB, (1, 200)),
            64 * MIB,
            content(16, 8),
        );
        assert_eq!(v, Verdict::Moved);
        // Fewer: a coincidence of common content (two disks of one template), not the disk.
        let v = judge(
            &rec(),
            &obs("/img/moved.img", 64 * MIB, (1, 200)),
            64 * MIB,
            content(16, 7),
        );
        assert!(matches!(v, Verdict::Replaced(_)), "{v:?}");
        // Nothing to compare (an empty replica): accepted, it cannot be told apart.
        let v = judge(
            &rec(),
            &obs("/img/a.img", 64 * MIB, (1, 201)),
            64 * MIB,
            content(0, 0),
        );
        assert_eq!(v, Verdict::Moved);
    }

    #[test]
    fn block_devices_are_judged_by_their_device_id() {
        let mut r = rec();
        r.device_id = Some("wwid:naa.600a".into());
        r.file_id = None;
        let dev = |path: &str, id: &str| Observed {
            path: path.into(),
            size_bytes: 64 * MIB,
            device_id: Some(id.into()),
            file_id: None,
        };
        assert_eq!(
            judge(&r, &dev("/dev/sdc", "wwid:naa.600a"), 64 * MIB, no_read),
            Verdict::Moved,
            "the same device under another name (sdb became sdc)"
        );
        let v = judge(&r, &dev("/img/a.img", "wwid:naa.700b"), 64 * MIB, no_read);
        assert_eq!(
            v,
            Verdict::Replaced("disk d0 at /img/a.img is not the disk that was protected: its device id is wwid:naa.700b, the protected disk's wwid:naa.600a".into())
        );
    }

    #[test]
    fn a_replaced_disk_is_reported_before_its_size() {
        let v = judge(
            &rec(),
            &obs("/img/b.img", 32 * MIB, (1, 200)),
            64 * MIB,
            content(8, 0),
        );
        assert!(matches!(v, Verdict::Replaced(_)), "{v:?}");
    }

    #[test]
    fn samples_are_data_blocks_spread_over_the_disk() {
        let zero = zero_hash(BLOCK_BYTES as usize);
        let mut table = vec![zero; 1000];
        assert!(
            sample_blocks(&table).is_empty(),
            "an all-zero disk has none"
        );
        assert_eq!(fingerprint(&table), "");
        for b in (0..1000).step_by(10) {
            table[b] = b as u64 + 1;
        }
        let s = sample_blocks(&table);
        assert_eq!(s.len(), SAMPLES);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(s.iter().all(|&b| b % 10 == 0 && b < 999));
        assert_eq!(fingerprint(&table).len(), 16);
    }

    #[test]
    fn content_check_reads_the_sampled_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let mut data = vec![0u8; 64 * BLOCK_BYTES as usize];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 7) as u8;
        }
        std::fs::write(&path, &data).unwrap();
        let table: Vec<u64> = data.chunks(BLOCK_BYTES as usize).map(xxh3_64).collect();
        let size = data.len() as u64;
        let c = check_content(&path, &table, size);
        assert_eq!(c.sampled, c.matched);
        assert!(c.sampled >= 8, "{c:?}");
        std::fs::write(&path, vec![0xee; data.len()]).unwrap();
        let c = check_content(&path, &table, size);
        assert_eq!(c.matched, 0);
        assert!(c.sampled >= 8);
    }
}
