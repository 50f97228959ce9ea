//! Opening the master target's recovery-point journal (`haven_storage::journal::Journal::open`:
//! segment headers, record headers and bodies, roll back above the cursor, the catalogue) and
//! reading views of its points.
//!
//! The first byte picks a mode:
//! - **raw**: the rest is split into two segment files (each given a valid header, so the
//!   record decoder is reached; bit 1 of the mode byte leaves the header bytes raw too);
//! - **built**: the rest describes batches (through `arbitrary`) written with the journal's
//!   own writer on two 4 KiB images, the first `committed` of them committed, then damaged
//!   as described. When nothing was damaged, reopening must give the images of the committed
//!   state (the rest rolled back) and every catalogued point's view must equal a model.
//!
//! After any successful open, every point's view is read (bounded), and the journal takes
//! one more batch that the next open keeps.
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use haven_storage::journal::{self, Journal, JournalOptions, PointEntry, Resize, Write};

const SIZE: usize = 4096;
const OPTS: JournalOptions = JournalOptions {
    segment_bytes: 2048,
};

#[derive(Arbitrary, Debug)]
struct Spec {
    batches: Vec<Vec<Op>>,
    committed: u8,
    /// Bytes cut from the end of the last segment.
    cut: u16,
    /// (segment index, offset, xor) to flip.
    flip: Option<(u8, u16, u8)>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Write {
        disk: bool,
        offset: u16,
        len: u16,
        byte: u8,
    },
    Point {
        kind: u8,
        name: Option<String>,
    },
    Shrink {
        disk: bool,
        to: u16,
    },
}

fn images(dir: &Path) -> Vec<File> {
    (0..2)
        .map(|i| {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(format!("d{i}.img")))
                .unwrap();
            if f.metadata().unwrap().len() == 0 {
                f.set_len(SIZE as u64).unwrap();
            }
            f
        })
        .collect()
}

/// Reads every point's view (at most 64 KiB of each disk); checks it against `model` if given.
fn read_views(j: &Journal, imgs: &[File], model: Option<&BTreeMap<u64, Vec<Vec<u8>>>>) {
    for p in j.points() {
        let Ok(v) = j.view(p.seq) else {
            assert!(model.is_none(), "an undamaged point does not open");
            continue;
        };
        for (d, img) in imgs.iter().enumerate() {
            let size = v.size(d as u16);
            let mut buf = vec![0u8; size.as_ref().map_or(0, |s| (*s).min(1 << 16) as usize)];
            let got = v.read(d as u16, 0, &mut buf, img);
            if let Some(m) = model {
                let want = &m[&p.seq][d];
                assert_eq!(
                    *size.as_ref().unwrap(),
                    want.len() as u64,
                    "size at {}",
                    p.seq
                );
                assert_eq!(got.unwrap(), want.len());
                assert!(buf == *want, "view of disk {d} at {} differs", p.seq);
            }
        }
    }
}

fn takes_another_batch(dir: &Path, mut j: Journal, imgs: &[File], durable: u64) {
    let refs: Vec<&File> = imgs.iter().collect();
    let seq = durable + 1;
    let w = [
        Write {
            seq,
            disk: 0,
            offset: 0,
            data: b"next",
        },
        Write {
            seq: seq + 1,
            disk: 0,
            offset: 0,
            data: b"",
        },
    ];
    let p = [PointEntry {
        seq: seq + 1,
        time_ms: 1,
        kind: 0,
        name: None,
        journal_ms: 0,
    }];
    if j.append_batch(9, seq, &[], &w, &p, &refs).is_err() {
        return; // e.g. a write beyond the file size limit of the scratch directory
    }
    imgs[0].write_all_at(b"next", 0).unwrap();
    j.set_durable(seq + 1);
    drop(j);
    let (j, _) = Journal::open(dir, 1, seq + 1, &refs, OPTS).expect("reopen after an append");
    assert!(
        j.points().iter().any(|q| q.seq == seq + 1),
        "the appended point is kept"
    );
}

pub fn fuzz(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tmp = crate::tmp::dir();
    let root = tmp.path();
    let jdir = root.join(journal::DIR_NAME);
    fs::create_dir_all(&jdir).unwrap();
    let imgs = images(root);
    let refs: Vec<&File> = imgs.iter().collect();
    if mode & 1 == 0 {
        let split = rest
            .first()
            .map_or(0, |b| usize::from(*b) * rest.len() / 256);
        for (i, part) in [&rest[..split], &rest[split..]].iter().enumerate() {
            let mut seg = Vec::new();
            if mode & 2 == 0 {
                seg.extend_from_slice(&journal::segment_header(1, i as u64 + 1));
            }
            seg.extend_from_slice(part);
            fs::write(jdir.join(format!("{:016x}.seg", i + 1)), seg).unwrap();
        }
        let durable = u64::from(mode >> 2);
        if let Ok((mut j, _)) = Journal::open(&jdir, 1, durable, &refs, OPTS) {
            j.set_sizes(&[SIZE as u64, SIZE as u64]);
            read_views(&j, &imgs, None);
            takes_another_batch(&jdir, j, &imgs, durable.max(1 << 20));
        }
        return;
    }
    let Ok(spec) = Spec::arbitrary(&mut Unstructured::new(rest)) else {
        return;
    };
    let (mut j, _) = Journal::open(&jdir, 1, 0, &refs, OPTS).unwrap();
    let mut model = vec![vec![0u8; SIZE]; 2];
    j.set_sizes(&[SIZE as u64, SIZE as u64]);
    let mut at_point = BTreeMap::new();
    let mut at_batch = BTreeMap::from([(0u64, model.clone())]);
    let mut seq = 1u64;
    let batches = &spec.batches[..spec.batches.len().min(12)];
    let committed = usize::from(spec.committed).min(batches.len());
    let mut durable = 0;
    for (bi, ops) in batches.iter().enumerate() {
        let first = seq;
        let ops = &ops[..ops.len().min(8)];
        let mut resizes = Vec::new();
        let mut writes = Vec::new();
        let mut points = Vec::new();
        let sizes: Vec<usize> = model.iter().map(Vec::len).collect();
        let mut new_sizes = sizes.clone();
        for op in ops {
            if let Op::Shrink { disk, to } = op {
                let d = usize::from(*disk);
                if resizes.iter().all(|r: &Resize| r.disk as usize != d) {
                    let to = u64::from(*to) % (SIZE as u64 + 1);
                    resizes.push(Resize {
                        disk: d as u16,
                        from: sizes[d] as u64,
                        to,
                    });
                    new_sizes[d] = to as usize;
                }
            }
        }
        for op in ops {
            match op {
                Op::Write {
                    disk,
                    offset,
                    len,
                    byte,
                } => {
                    let d = usize::from(*disk);
                    let size = new_sizes[d];
                    if size == 0 {
                        continue;
                    }
                    let off = usize::from(*offset) % size;
                    let len = (usize::from(*len) % 1500).min(size - off).max(1);
                    writes.push((seq, d as u16, off as u64, vec![*byte; len]));
                }
                Op::Point { kind, name } => {
                    writes.push((seq, 0, 0, vec![]));
                    points.push(PointEntry {
                        seq,
                        time_ms: seq,
                        kind: kind & 15,
                        name: name.clone().filter(|n| n.len() <= journal::MAX_NAME),
                        journal_ms: 0,
                    });
                }
                Op::Shrink { .. } => continue,
            }
            seq += 1;
        }
        if seq == first {
            seq += 1; // an empty batch still takes a seq
        }
        let w: Vec<Write> = writes
            .iter()
            .map(|(s, d, o, data)| Write {
                seq: *s,
                disk: *d,
                offset: *o,
                data,
            })
            .collect();
        if j.append_batch(bi as u64, first, &resizes, &w, &points, &refs)
            .is_err()
        {
            return;
        }
        for r in &resizes {
            model[r.disk as usize].resize(r.to as usize, 0);
            imgs[r.disk as usize].set_len(r.to).unwrap();
        }
        for (s, d, o, data) in &writes {
            let m = &mut model[*d as usize];
            m[*o as usize..*o as usize + data.len()].copy_from_slice(data);
            imgs[*d as usize].write_all_at(data, *o).unwrap();
            if points.iter().any(|p| p.seq == *s) {
                at_point.insert(*s, model.clone());
            }
        }
        at_batch.insert(seq - 1, model.clone());
        if bi < committed {
            durable = seq - 1;
            j.set_durable(durable);
        }
    }
    drop(j);
    // The replica puts the images back to the committed sizes after the roll back.
    let want = at_batch.range(..=durable).next_back().unwrap().1.clone();
    let mut segs: Vec<_> = fs::read_dir(&jdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    let mut damaged = false;
    if let Some(last) = segs.last() {
        let len = fs::metadata(last).unwrap().len();
        let cut = u64::from(spec.cut).min(len);
        if cut > 0 {
            fs::OpenOptions::new()
                .write(true)
                .open(last)
                .unwrap()
                .set_len(len - cut)
                .unwrap();
            damaged = true;
        }
    }
    if let Some((si, off, x)) = spec.flip.filter(|f| f.2 != 0) {
        if let Some(p) = segs.get(usize::from(si) % segs.len().max(1)) {
            let mut b = fs::read(p).unwrap();
            if !b.is_empty() {
                let i = usize::from(off) % b.len();
                b[i] ^= x;
                fs::write(p, b).unwrap();
                damaged = true;
            }
        }
    }
    let opened = Journal::open(&jdir, 1, durable, &refs, OPTS);
    let Ok((mut j, report)) = opened else {
        assert!(
            damaged,
            "an undamaged journal did not open: {:?}",
            opened.err()
        );
        return;
    };
    for (f, w) in imgs.iter().zip(&want) {
        f.set_len(w.len() as u64).unwrap();
    }
    j.set_sizes(&want.iter().map(|w| w.len() as u64).collect::<Vec<_>>());
    if !damaged {
        assert_eq!(report.torn_bytes, 0);
        for (i, w) in want.iter().enumerate() {
            let got = fs::read(root.join(format!("d{i}.img"))).unwrap();
            assert!(got == *w, "image d{i} is not the committed state");
        }
        let want_points: Vec<u64> = at_point.keys().copied().filter(|s| *s <= durable).collect();
        let got: Vec<u64> = j.points().iter().map(|p| p.seq).collect();
        assert_eq!(got, want_points);
        read_views(&j, &imgs, Some(&at_point));
    } else {
        read_views(&j, &imgs, None);
    }
    takes_another_batch(&jdir, j, &imgs, durable.max(seq));
}

pub fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = vec![vec![0], vec![2]];
    // A raw journal: one valid record (a point) after the header.
    let dir = crate::tmp::dir();
    let jdir = dir.path().join("j");
    let imgs = images(dir.path());
    let refs: Vec<&File> = imgs.iter().collect();
    let (mut j, _) = Journal::open(&jdir, 1, 0, &refs, JournalOptions::default()).unwrap();
    let w = [
        Write {
            seq: 1,
            disk: 0,
            offset: 10,
            data: b"hello",
        },
        Write {
            seq: 2,
            disk: 0,
            offset: 0,
            data: b"",
        },
        Write {
            seq: 3,
            disk: 1,
            offset: 100,
            data: &[7; 300],
        },
    ];
    let p = [PointEntry {
        seq: 2,
        time_ms: 5,
        kind: 2,
        name: Some("n".into()),
        journal_ms: 0,
    }];
    j.append_batch(
        1,
        1,
        &[Resize {
            disk: 1,
            from: 4096,
            to: 2000,
        }],
        &w,
        &p,
        &refs,
    )
    .unwrap();
    drop(j);
    let seg = fs::read(jdir.join(format!("{:016x}.seg", 1))).unwrap();
    seeds.push([vec![0u8], seg[journal::SEG_HEADER..].to_vec()].concat());
    seeds.push([vec![4u8 << 2], seg[journal::SEG_HEADER..].to_vec()].concat());
    for i in 0..8u8 {
        let mut s = vec![1];
        s.extend((0..160).map(|j: u8| j.wrapping_mul(41).wrapping_add(i * 17)));
        seeds.push(s);
    }
    seeds
}
