//! Rolling back the master target's undo log (`haven_storage::undo::roll_back`) from an
//! arbitrary log.
//!
//! The first byte picks a mode:
//! - **raw**: the rest is the log file;
//! - **built**: the rest describes records (through `arbitrary`), written with valid
//!   checksums and damaged as described. When nothing was damaged, the images after the
//!   roll-back are compared with a model: every before-image of a batch above the cursor
//!   written back, newest first.
//!
//! Two images exist, `d0.img` and `d1.img`; records may name them or anything else.
use std::fs;
use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use haven_storage::undo::{self, FILE_NAME};

const MAGIC: u32 = 0x4855_4e44;
const HOLE: u8 = 1;

#[derive(Arbitrary, Debug)]
struct Spec {
    epoch: u32,
    applied_seq: u8,
    sizes: [u16; 2],
    records: Vec<RecSpec>,
    tail: Vec<u8>,
    cut: u8,
}

#[derive(Arbitrary, Debug)]
enum Disk {
    Image(bool),
    Named(String),
}

#[derive(Arbitrary, Debug)]
enum Offset {
    Small(u16),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
struct RecSpec {
    other_epoch: Option<u32>,
    first_seq: u8,
    offset: Offset,
    disk: Disk,
    /// None: a hole of `hole_len` bytes.
    data: Option<Vec<u8>>,
    hole_len: u16,
    any_hole_len: Option<u32>,
    /// Flags other than HOLE.
    flags: u8,
    bad_crc: bool,
}

fn record(epoch: u32, r: &RecSpec) -> Vec<u8> {
    let name = match &r.disk {
        Disk::Image(b) => format!("d{}", u8::from(*b)),
        Disk::Named(s) => s.clone(),
    };
    let name = &name.as_bytes()[..name.len().min(255)];
    let offset = match r.offset {
        Offset::Small(o) => u64::from(o),
        Offset::Any(o) => o,
    };
    let (len, flags, data): (u32, u8, &[u8]) = match &r.data {
        Some(d) => (d.len() as u32, r.flags & !HOLE, d),
        None => (
            r.any_hole_len.unwrap_or(u32::from(r.hole_len)),
            r.flags | HOLE,
            &[],
        ),
    };
    let mut rec = Vec::new();
    rec.extend_from_slice(&MAGIC.to_le_bytes());
    rec.extend_from_slice(&r.other_epoch.unwrap_or(epoch).to_le_bytes());
    rec.extend_from_slice(&u64::from(r.first_seq).to_le_bytes());
    rec.extend_from_slice(&offset.to_le_bytes());
    rec.extend_from_slice(&len.to_le_bytes());
    rec.push(flags);
    rec.push(name.len() as u8);
    let crc_at = rec.len();
    rec.extend_from_slice(&[0; 4]);
    rec.extend_from_slice(name);
    rec.extend_from_slice(data);
    let mut crc = crc32c::crc32c_append(crc32c::crc32c(&rec[..crc_at]), &rec[crc_at + 4..]);
    if r.bad_crc {
        crc ^= 1;
    }
    rec[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    rec
}

/// Whether a record is one the model can follow: valid, of a known image, a small range.
fn plain(r: &RecSpec) -> bool {
    !r.bad_crc
        && matches!(r.disk, Disk::Image(_))
        && matches!(r.offset, Offset::Small(_))
        && r.any_hole_len.is_none()
}

fn images(dir: &Path, sizes: [u16; 2]) -> [Vec<u8>; 2] {
    let content = |i: usize| -> Vec<u8> {
        (0..sizes[i] as usize)
            .map(|j| (j as u8).wrapping_mul(7).wrapping_add(i as u8) | 1)
            .collect()
    };
    let imgs = [content(0), content(1)];
    for (i, img) in imgs.iter().enumerate() {
        fs::write(dir.join(format!("d{i}.img")), img).unwrap();
    }
    imgs
}

pub fn fuzz(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tmp = crate::tmp::dir();
    let dir = tmp.path();
    if mode & 1 == 0 {
        images(dir, [4096, 100]);
        fs::write(dir.join(FILE_NAME), rest).unwrap();
        let _ = undo::roll_back(dir, u32::from(mode >> 1), 0);
        return;
    }
    let Ok(spec) = Spec::arbitrary(&mut Unstructured::new(rest)) else {
        return;
    };
    let mut model = images(dir, spec.sizes);
    let records = &spec.records[..spec.records.len().min(16)];
    let mut log: Vec<u8> = records.iter().flat_map(|r| record(spec.epoch, r)).collect();
    log.extend_from_slice(&spec.tail);
    let cut = usize::from(spec.cut).min(log.len());
    log.truncate(log.len() - cut);
    let undamaged = cut == 0 && records.iter().all(plain);
    fs::write(dir.join(FILE_NAME), &log).unwrap();

    let result = undo::roll_back(dir, spec.epoch, u64::from(spec.applied_seq));
    if !undamaged {
        return;
    }
    // The model: newest first, each before-image of this epoch above the cursor.
    let mut restored = 0;
    for r in records.iter().rev() {
        if r.other_epoch.is_some_and(|e| e != spec.epoch) || r.first_seq <= spec.applied_seq {
            continue;
        }
        restored += 1;
        let Disk::Image(which) = r.disk else {
            unreachable!()
        };
        let Offset::Small(off) = r.offset else {
            unreachable!()
        };
        let img = &mut model[usize::from(which)];
        let off = usize::from(off);
        match &r.data {
            Some(d) if d.is_empty() => {}
            Some(d) => {
                if img.len() < off + d.len() {
                    img.resize(off + d.len(), 0);
                }
                img[off..off + d.len()].copy_from_slice(d);
            }
            None => {
                // A hole is punched within the file; it does not grow it.
                let end = (off + usize::from(r.hole_len)).min(img.len());
                if off < end {
                    img[off..end].fill(0);
                }
            }
        }
    }
    assert_eq!(result.expect("a valid log rolls back"), restored);
    for (i, want) in model.iter().enumerate() {
        let got = fs::read(dir.join(format!("d{i}.img"))).unwrap();
        assert!(got == *want, "image d{i} differs from the model");
    }
    let left = fs::metadata(dir.join(FILE_NAME)).unwrap().len();
    assert_eq!(left, 0, "the log is emptied after a roll-back");
}

pub fn seeds() -> Vec<Vec<u8>> {
    let rec = |first_seq: u8, data: Option<Vec<u8>>| RecSpec {
        other_epoch: None,
        first_seq,
        offset: Offset::Small(10),
        disk: Disk::Image(false),
        data,
        hole_len: 50,
        any_hole_len: None,
        flags: 0,
        bad_crc: false,
    };
    let log: Vec<u8> = [
        record(1, &rec(3, Some(b"before".to_vec()))),
        record(1, &rec(5, None)),
        record(1, &rec(7, Some(vec![0; 100]))),
    ]
    .concat();
    let mut seeds = vec![
        [vec![2], log.clone()].concat(),
        [vec![2], log[..log.len() - 7].to_vec()].concat(),
        vec![0],
    ];
    for i in 0..8u8 {
        let mut s = vec![1];
        s.extend((0..96).map(|j: u8| j.wrapping_mul(37).wrapping_add(i * 11)));
        seeds.push(s);
    }
    seeds
}
