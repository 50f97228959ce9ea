use super::*;
use std::collections::BTreeMap;

const DISK: u64 = 1 << 16;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write(u16, u64, Vec<u8>),
    Point(u8),
    Marker,
}

/// Images, a model of them, the journal, and the state at every point and batch end.
struct Sim {
    dir: PathBuf,
    images: Vec<File>,
    model: Vec<Vec<u8>>,
    journal: Option<Journal>,
    next_seq: u64,
    durable: u64,
    at_point: BTreeMap<u64, Vec<Vec<u8>>>,
    at_batch: BTreeMap<u64, Vec<Vec<u8>>>,
    opts: JournalOptions,
}

fn open_images(dir: &Path, n: usize) -> Vec<File> {
    (0..n)
        .map(|i| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(format!("d{i}.img")))
                .unwrap()
        })
        .collect()
}

fn refs(images: &[File]) -> Vec<&File> {
    images.iter().collect()
}

impl Sim {
    fn new(dir: &Path, opts: JournalOptions) -> Self {
        let images = open_images(dir, 2);
        for f in &images {
            f.set_len(DISK).unwrap();
        }
        let (mut journal, _) =
            Journal::open(&dir.join(DIR_NAME), 1, 0, &refs(&images), opts).unwrap();
        journal.set_sizes(&[DISK, DISK]);
        let model = vec![vec![0u8; DISK as usize]; 2];
        let mut at_batch = BTreeMap::new();
        at_batch.insert(0, model.clone());
        Self {
            dir: dir.to_path_buf(),
            images,
            model,
            journal: Some(journal),
            next_seq: 1,
            durable: 0,
            at_point: BTreeMap::new(),
            at_batch,
            opts,
        }
    }

    fn j(&mut self) -> &mut Journal {
        self.journal.as_mut().unwrap()
    }

    /// Journals a batch (synced). Returns its seqs' writes for [`write_images`].
    fn journal_batch(&mut self, time: u64, resizes: &[(u16, u64)], ops: &[Op]) -> Batch {
        let first = self.next_seq;
        let resizes: Vec<Resize> = resizes
            .iter()
            .map(|&(d, to)| Resize {
                disk: d,
                from: self.model[d as usize].len() as u64,
                to,
            })
            .collect();
        let mut writes = Vec::new();
        let mut points = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let seq = first + i as u64;
            match op {
                Op::Write(d, o, data) => writes.push((seq, *d, *o, data.clone())),
                Op::Point(k) => {
                    writes.push((seq, 0, 0, vec![]));
                    points.push(PointEntry {
                        seq,
                        time_ms: time + i as u64,
                        kind: *k,
                        name: (*k == 2).then(|| format!("p{seq}")),
                        journal_ms: 0,
                    });
                }
                Op::Marker => writes.push((seq, 0, 0, vec![])),
            }
        }
        let w: Vec<Write> = writes
            .iter()
            .map(|(seq, disk, offset, data)| Write {
                seq: *seq,
                disk: *disk,
                offset: *offset,
                data,
            })
            .collect();
        let imgs: Vec<&File> = self.images.iter().collect();
        self.journal
            .as_mut()
            .unwrap()
            .append_batch(time, first, &resizes, &w, &points, &imgs)
            .unwrap();
        self.next_seq = first + ops.len() as u64;
        // The model, with the state at every point.
        for r in &resizes {
            self.model[r.disk as usize].resize(r.to as usize, 0);
        }
        for (seq, d, o, data) in &writes {
            let m = &mut self.model[*d as usize];
            m[*o as usize..*o as usize + data.len()].copy_from_slice(data);
            if points.iter().any(|p| p.seq == *seq) {
                self.at_point.insert(*seq, self.model.clone());
            }
        }
        self.at_batch.insert(self.next_seq - 1, self.model.clone());
        Batch {
            last: self.next_seq - 1,
            resizes,
            writes,
        }
    }

    /// The image side of a batch, one step at a time (`step` is called after each).
    fn write_images(&mut self, b: &Batch, mut step: impl FnMut(&Self)) {
        for r in &b.resizes {
            self.images[r.disk as usize].set_len(r.to).unwrap();
            step(self);
        }
        for (_, d, o, data) in &b.writes {
            if !data.is_empty() {
                self.images[*d as usize].write_all_at(data, *o).unwrap();
                step(self);
            }
        }
    }

    fn commit(&mut self, last: u64) {
        for f in &self.images {
            f.sync_all().unwrap();
        }
        std::fs::write(self.dir.join("cursor"), last.to_le_bytes()).unwrap();
        self.durable = last;
        self.j().set_durable(last);
    }

    fn batch(&mut self, time: u64, resizes: &[(u16, u64)], ops: &[Op]) {
        let b = self.journal_batch(time, resizes, ops);
        self.write_images(&b, |_| {});
        self.commit(b.last);
    }

    fn reopen(&mut self) -> OpenReport {
        self.journal = None;
        let (mut j, report) = Journal::open(
            &self.dir.join(DIR_NAME),
            1,
            self.durable,
            &refs(&self.images),
            self.opts,
        )
        .unwrap();
        let sizes: Vec<u64> = self
            .images
            .iter()
            .map(|f| f.metadata().unwrap().len())
            .collect();
        j.set_sizes(&sizes);
        self.journal = Some(j);
        report
    }

    /// Every catalogued point's view equals the model's state at it.
    fn check_views(&self) -> usize {
        check_views(self.journal.as_ref().unwrap(), &self.images, &self.at_point)
    }
}

fn check_views(j: &Journal, images: &[File], at_point: &BTreeMap<u64, Vec<Vec<u8>>>) -> usize {
    let points = j.points();
    for p in &points {
        let want = &at_point[&p.seq];
        let v = j.view(p.seq).unwrap();
        for (d, want) in want.iter().enumerate() {
            assert_eq!(
                v.size(d as u16).unwrap(),
                want.len() as u64,
                "size at {}",
                p.seq
            );
            let mut got = vec![0xeeu8; want.len() + 10];
            let n = v.read(d as u16, 0, &mut got, &images[d]).unwrap();
            assert_eq!(n, want.len());
            assert!(got[..n] == want[..], "disk {d} at point {} differs", p.seq);
            // Outside the ranges `changed` gives, the image holds the point's bytes.
            if let Some(ranges) = v.changed(d as u16).unwrap() {
                let mut image = vec![0u8; want.len()];
                let n = images[d].read_at(&mut image, 0).unwrap_or(0);
                image[n..].fill(0);
                let covered = |at: u64| ranges.iter().any(|&(s, e)| s <= at && at < e);
                for (at, (a, b)) in image.iter().zip(want.iter()).enumerate() {
                    assert!(
                        a == b || covered(at as u64),
                        "disk {d} at point {}: byte {at} changed outside {ranges:?}",
                        p.seq
                    );
                }
                assert!(
                    ranges.windows(2).all(|w| w[0].1 < w[1].0),
                    "merged, in order"
                );
            }
            // A small read in the middle too.
            if want.len() > 100 {
                let mut part = [0u8; 37];
                v.read(d as u16, 50, &mut part, &images[d]).unwrap();
                assert_eq!(&part[..], &want[50..87]);
            }
        }
    }
    points.len()
}

struct Batch {
    last: u64,
    resizes: Vec<Resize>,
    writes: Vec<(u64, u16, u64, Vec<u8>)>,
}

fn random_ops(rng: &mut Rng, n: usize, sizes: [usize; 2]) -> Vec<Op> {
    (0..n)
        .map(|_| match rng.below(10) {
            0..=1 => Op::Point(rng.below(4) as u8),
            2 => Op::Marker,
            _ => {
                let d = rng.below(2) as u16;
                let size = sizes[d as usize] as u64;
                // Few distinct offsets, so ranges overlap often (also within a batch).
                let off = rng.below(16) * 512 + rng.below(3) * 100;
                let len = 1 + rng.below(3000);
                let off = off.min(size.saturating_sub(len));
                let len = len.min(size - off);
                let byte = rng.next() as u8;
                Op::Write(d, off, vec![byte | 1; len as usize])
            }
        })
        .collect()
}

#[test]
fn extents_pieces_fill_and_overwrite() {
    let mut m = Extents::default();
    m.fill_gaps(10, 20, 1);
    m.fill_gaps(0, 30, 2);
    assert_eq!(
        m.pieces(5, 25),
        vec![(5, 10, Some(2)), (10, 20, Some(1)), (20, 25, Some(2))]
    );
    m.overwrite(15, 22, 3);
    assert_eq!(
        m.pieces(0, 40),
        vec![
            (0, 10, Some(2)),
            (10, 15, Some(1)),
            (15, 22, Some(3)),
            (22, 30, Some(2)),
            (30, 40, None)
        ]
    );
    assert!(m.pieces(7, 7).is_empty());
}

#[test]
fn a_point_between_two_writes_of_one_range_in_a_batch_sees_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::new(dir.path(), JournalOptions::default());
    s.batch(100, &[], &[Op::Write(0, 0, b"old!".to_vec()), Op::Point(0)]);
    // seq 3 writes, seq 4 is a point, seq 5 rewrites the same range, seq 6 a point.
    s.batch(
        200,
        &[],
        &[
            Op::Write(0, 0, b"AAAA".to_vec()),
            Op::Point(0),
            Op::Write(0, 2, b"BBBB".to_vec()),
            Op::Point(1),
        ],
    );
    let j = s.journal.as_ref().unwrap();
    let seqs: Vec<u64> = j.points().iter().map(|p| p.seq).collect();
    assert_eq!(seqs, vec![2, 4, 6]);
    let read = |p: u64| {
        let v = j.view(p).unwrap();
        let mut b = [0u8; 6];
        v.read(0, 0, &mut b, &s.images[0]).unwrap();
        b
    };
    assert_eq!(&read(2), b"old!\0\0");
    assert_eq!(&read(4), b"AAAA\0\0");
    assert_eq!(&read(6), b"AABBBB");
    assert_eq!(j.points()[1].journal_ms, 200);
    assert_eq!(s.check_views(), 3);
}

#[test]
fn views_equal_the_oracle_for_random_batches_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let opts = JournalOptions {
        segment_bytes: 32 << 10,
    };
    let mut s = Sim::new(dir.path(), opts);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..60u64 {
        let sizes = [s.model[0].len(), s.model[1].len()];
        let mut resizes = vec![];
        if round % 9 == 4 {
            // Grow or shrink a disk (a shrink journals the cut tail).
            let d = rng.below(2) as u16;
            let to = if sizes[d as usize] as u64 > DISK / 2 {
                DISK / 2 - rng.below(1000)
            } else {
                DISK
            };
            resizes.push((d, to));
        }
        let new_sizes = {
            let mut n = sizes;
            for &(d, to) in &resizes {
                n[d as usize] = to as usize;
            }
            n
        };
        let n = 1 + rng.below(12) as usize;
        let ops = random_ops(&mut rng, n, new_sizes);
        s.batch(round * 1000, &resizes, &ops);
        if round % 15 == 14 {
            s.reopen();
        }
    }
    assert!(s.journal.as_ref().unwrap().stats().segments > 3);
    let n = s.check_views();
    assert!(n > 20, "{n} points");
    s.reopen();
    assert_eq!(s.check_views(), n);
}

#[test]
fn size_changes_are_as_of_the_point() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::new(dir.path(), JournalOptions::default());
    let tail: Vec<u8> = (0..4096).map(|i| (i % 251) as u8 | 1).collect();
    s.batch(
        1,
        &[],
        &[Op::Write(1, DISK - 4096, tail.clone()), Op::Point(0)],
    );
    // Shrink disk 1 to 1000 bytes, then grow it back (its tail reads as zeros then).
    s.batch(2, &[(1, 1000)], &[Op::Point(0)]);
    s.batch(
        3,
        &[(1, DISK * 2)],
        &[Op::Write(1, DISK + 5, b"grown".to_vec()), Op::Point(0)],
    );
    let j = s.journal.as_ref().unwrap();
    let v = j.view(2).unwrap();
    assert_eq!(v.size(1).unwrap(), DISK);
    let mut b = vec![0u8; 4096];
    v.read(1, DISK - 4096, &mut b, &s.images[1]).unwrap();
    assert_eq!(b, tail);
    assert_eq!(j.view(3).unwrap().size(1).unwrap(), 1000);
    assert_eq!(j.view(5).unwrap().size(1).unwrap(), DISK * 2);
    assert_eq!(s.check_views(), 3);
    s.reopen();
    assert_eq!(s.check_views(), 3);
}

#[test]
fn prune_by_window_drops_old_points_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::new(
        dir.path(),
        JournalOptions {
            segment_bytes: 8 << 10,
        },
    );
    for t in 0..40u64 {
        s.batch(
            t * 1000,
            &[],
            &[
                Op::Write(0, (t % 8) * 4096, vec![t as u8 + 1; 4096]),
                Op::Point(0),
            ],
        );
    }
    let before = s.j().points().len();
    // Window 10 s at t = 39 s: points applied before 29 s may go.
    let r = s.j().prune(39_000, 10_000, u64::MAX).unwrap();
    assert!(r.dropped_segments > 0 && r.dropped_points > 0, "{r:?}");
    assert!(!r.cap_reached);
    let pts = s.j().points();
    assert_eq!(pts.len(), before - r.dropped_points);
    assert!(pts.iter().all(|p| p.journal_ms + 10_000 >= 29_000 - 4_000));
    assert!(
        pts.iter().any(|p| p.journal_ms <= 29_000),
        "the window is still covered"
    );
    assert_eq!(r.oldest_point_seq, Some(pts[0].seq));
    assert_eq!(r.held_ms, 39_000 - pts[0].journal_ms);
    s.check_views();
    s.reopen();
    assert_eq!(s.j().points(), pts);
    s.check_views();
}

#[test]
fn prune_by_cap_is_reported_and_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::new(
        dir.path(),
        JournalOptions {
            segment_bytes: 8 << 10,
        },
    );
    for t in 0..40u64 {
        s.batch(
            t * 1000,
            &[],
            &[
                Op::Write(0, (t % 8) * 4096, vec![t as u8 + 1; 4096]),
                Op::Point(0),
            ],
        );
    }
    let r = s.j().prune(40_000, 3_600_000, 40 << 10).unwrap();
    assert!(r.cap_reached && r.dropped_points > 0, "{r:?}");
    assert!(r.bytes <= 40 << 10);
    let st = s.j().stats();
    assert_eq!(st.cap_shortened_since_ms, Some(40_000));
    assert_eq!(st.cap_bytes, 40 << 10);
    s.check_views();
    // Remembered across a restart (the floor record carries it)...
    s.reopen();
    assert_eq!(s.j().stats().cap_shortened_since_ms, Some(40_000));
    // ...until the dropped points would have left the window anyway.
    let r = s
        .j()
        .prune(40_000 + 3_600_000, 3_600_000, u64::MAX)
        .unwrap();
    assert!(!r.cap_reached);
    assert_eq!(s.j().stats().cap_shortened_since_ms, None);
}

#[test]
fn reaching_the_cap_drops_the_oldest_part_of_history_not_all_of_it() {
    // Default (large) segments and a cap far below them: segments follow the cap, so each
    // prune for the cap drops about an eighth of the history.
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::new(dir.path(), JournalOptions::default());
    let cap: u64 = 1 << 20;
    let mut reached = 0;
    for t in 0..600u64 {
        s.batch(
            t * 1000,
            &[],
            &[
                Op::Write(0, (t % 16) * 4096, vec![(t % 250) as u8 + 1; 4096]),
                Op::Point(0),
            ],
        );
        let r = s.j().prune(t * 1000, 24 * 3_600_000, cap).unwrap();
        assert!(r.bytes <= cap, "{r:?}");
        if r.cap_reached {
            reached += 1;
            // What is left is most of the cap: whole segments of at most cap / 8 went.
            assert!(
                r.bytes + cap / SEGMENTS_PER_CAP + (8 << 10) >= cap,
                "the cap dropped too much: {r:?}"
            );
            let held = s.j().points().len() as u64;
            assert!(held * 4096 * 8 >= cap * 6, "only {held} points held: {r:?}");
        }
    }
    assert!(reached >= 5, "the cap was reached {reached} times");
    assert!(s.j().stats().segments >= SEGMENTS_PER_CAP as usize / 2);
    s.check_views();
    s.reopen();
    s.check_views();
}

#[test]
fn a_view_pins_its_point_against_pruning() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::new(
        dir.path(),
        JournalOptions {
            segment_bytes: 8 << 10,
        },
    );
    for t in 0..20u64 {
        s.batch(
            t,
            &[],
            &[
                Op::Point(0),
                Op::Write(0, (t % 4) * 4096, vec![t as u8 + 1; 4096]),
            ],
        );
    }
    let oldest = s.j().points()[0].seq;
    let v = s.j().view(oldest).unwrap();
    assert_eq!(s.j().stats().pinned, 1);
    let r = s.j().prune(100, 10, 1).unwrap();
    assert_eq!(r.pinned_by, Some(oldest));
    assert!(r.cap_reached);
    assert_eq!(r.dropped_segments, 0);
    // Still readable and right, while applies continue.
    s.batch(30, &[], &[Op::Write(0, 0, vec![0xaa; 8192]), Op::Point(0)]);
    let mut b = vec![0u8; DISK as usize];
    v.read(0, 0, &mut b, &s.images[0]).unwrap();
    assert!(b == s.at_point[&oldest][0]);
    drop(v);
    let r = s.j().prune(100, 10, 1).unwrap();
    assert!(r.dropped_segments > 0 && r.pinned_by.is_none());
    assert!(s.j().view(oldest).is_err());
    s.check_views();
}

#[test]
fn a_torn_tail_is_cut_and_an_uncommitted_batch_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::new(dir.path(), JournalOptions::default());
    s.batch(1, &[], &[Op::Write(0, 0, vec![1; 5000]), Op::Point(0)]);
    s.batch(2, &[], &[Op::Write(0, 100, vec![2; 300]), Op::Point(1)]);
    let seg = list_segments(&dir.path().join(DIR_NAME)).unwrap()[0]
        .1
        .clone();
    let committed = std::fs::metadata(&seg).unwrap().len();
    // An uncommitted batch: journaled (synced), images half written.
    let b = s.journal_batch(
        3,
        &[],
        &[
            Op::Write(0, 50, vec![3; 1000]),
            Op::Point(0),
            Op::Write(1, 0, vec![4; 10]),
        ],
    );
    let full = std::fs::read(&seg).unwrap();
    s.journal = None;
    let image0 = std::fs::read(dir.path().join("d0.img")).unwrap();
    // A crash after writing the images (all or part): the whole journal tail is there.
    s.write_images(&b, |_| {});
    s.reopen();
    assert_eq!(s.model_at(s.durable), s.read_images());
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), committed);
    assert_eq!(s.check_views(), 2);
    // A crash while appending: any prefix of the tail (images untouched).
    for cut in (committed..full.len() as u64).step_by(97) {
        std::fs::write(&seg, &full[..cut as usize]).unwrap();
        std::fs::write(dir.path().join("d0.img"), &image0).unwrap();
        s.journal = None;
        let report = s.reopen();
        assert!(report.torn_bytes <= cut - committed);
        assert_eq!(s.model_at(s.durable), s.read_images(), "cut at {cut}");
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), committed);
        assert_eq!(s.check_views(), 2);
    }
    // And it takes the batch again.
    s.next_seq = s.durable + 1;
    s.at_batch.retain(|k, _| *k <= 4);
    s.model = s.model_at(4);
    s.batch(4, &[], &[Op::Write(0, 50, vec![3; 1000]), Op::Point(0)]);
    assert_eq!(s.check_views(), 3);
}

impl Sim {
    fn model_at(&self, seq: u64) -> Vec<Vec<u8>> {
        self.at_batch.range(..=seq).next_back().unwrap().1.clone()
    }
    fn read_images(&self) -> Vec<Vec<u8>> {
        (0..self.images.len())
            .map(|i| std::fs::read(self.dir.join(format!("d{i}.img"))).unwrap())
            .collect()
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Opens a crash snapshot as a restarted replica would: the cursor file, roll back, check.
fn check_snapshot(
    snap: &Path,
    at_batch: &BTreeMap<u64, Vec<Vec<u8>>>,
    at_point: &BTreeMap<u64, Vec<Vec<u8>>>,
) {
    let cursor = std::fs::read(snap.join("cursor"))
        .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()))
        .unwrap_or(0);
    let images = open_images(snap, 2);
    let want = at_batch.range(..=cursor).next_back().unwrap().1;
    let (mut j, _) = Journal::open(
        &snap.join(DIR_NAME),
        1,
        cursor,
        &refs(&images),
        JournalOptions {
            segment_bytes: 8 << 10,
        },
    )
    .unwrap();
    // Images with their committed sizes (the replica's cursor holds them).
    for (f, w) in images.iter().zip(want) {
        f.set_len(w.len() as u64).unwrap();
    }
    j.set_sizes(&want.iter().map(|w| w.len() as u64).collect::<Vec<_>>());
    for (i, w) in want.iter().enumerate() {
        let got = std::fs::read(snap.join(format!("d{i}.img"))).unwrap();
        assert!(
            got == *w,
            "{}: image {i} is not the state at {cursor}",
            snap.display()
        );
    }
    assert!(j.points().iter().all(|p| p.seq <= cursor));
    check_views(&j, &images, at_point);
    // It takes the next batch.
    let w = [Write {
        seq: cursor + 1,
        disk: 0,
        offset: 0,
        data: b"next",
    }];
    j.append_batch(0, cursor + 1, &[], &w, &[], &refs(&images))
        .unwrap();
}

#[test]
fn a_crash_at_every_step_leaves_journal_and_catalogue_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("live");
    std::fs::create_dir_all(&work).unwrap();
    let mut s = Sim::new(
        &work,
        JournalOptions {
            segment_bytes: 8 << 10,
        },
    );
    let mut rng = Rng(77);
    let mut snaps = Vec::new();
    let snap = |s: &Sim, snaps: &mut Vec<PathBuf>| {
        let to = dir.path().join(format!("snap{}", snaps.len()));
        copy_dir(&s.dir, &to);
        snaps.push(to);
    };
    for round in 0..14u64 {
        let resizes = if round == 6 {
            vec![(1u16, DISK / 2)]
        } else {
            vec![]
        };
        let sizes = [
            s.model[0].len(),
            if round >= 6 {
                DISK as usize / 2
            } else {
                s.model[1].len()
            },
        ];
        let n = 2 + rng.below(6) as usize;
        let ops = random_ops(&mut rng, n, sizes);
        let b = s.journal_batch(round * 1000, &resizes, &ops);
        snap(&s, &mut snaps);
        let mut steps = Vec::new();
        s.write_images(&b, |s| {
            let to = dir
                .path()
                .join(format!("snap{}-{}", snaps.len(), steps.len()));
            copy_dir(&s.dir, &to);
            steps.push(to);
        });
        snaps.extend(steps);
        s.commit(b.last);
        snap(&s, &mut snaps);
        if round % 4 == 3 {
            s.j().prune(round * 1000, 2500, 24 << 10).unwrap();
            snap(&s, &mut snaps);
        }
    }
    assert!(snaps.len() > 40);
    for p in &snaps {
        check_snapshot(p, &s.at_batch, &s.at_point);
    }
}

#[test]
fn a_crash_between_the_floor_and_the_deletes_of_a_prune_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("live");
    std::fs::create_dir_all(&work).unwrap();
    let mut s = Sim::new(
        &work,
        JournalOptions {
            segment_bytes: 8 << 10,
        },
    );
    for t in 0..20u64 {
        s.batch(
            t,
            &[],
            &[
                Op::Write(0, (t % 4) * 4096, vec![t as u8 + 1; 4096]),
                Op::Point(0),
            ],
        );
    }
    let jdir = work.join(DIR_NAME);
    let before = dir.path().join("before");
    copy_dir(&jdir, &before);
    let r = s.j().prune(100, 10, 20 << 10).unwrap();
    assert!(r.dropped_segments > 1);
    let kept = s.j().points();
    // The deletes did not happen: the old segments are back, with the floor record.
    for (id, p) in list_segments(&before).unwrap() {
        let to = jdir.join(seg_name(id));
        if !to.exists() {
            std::fs::copy(p, to).unwrap();
        }
    }
    s.reopen();
    assert_eq!(s.j().points(), kept);
    s.check_views();
    // And the next prune finishes the job.
    s.j().prune(100, 10, 20 << 10).unwrap();
    assert!(s.j().stats().bytes <= 20 << 10);
    s.check_views();
}

#[test]
fn another_version_refuses_to_open_and_another_epoch_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::new(dir.path(), JournalOptions::default());
    s.batch(1, &[], &[Op::Write(0, 0, b"x".to_vec()), Op::Point(0)]);
    s.journal = None;
    let jdir = dir.path().join(DIR_NAME);
    let (_, seg) = list_segments(&jdir).unwrap()[0].clone();
    let good = std::fs::read(&seg).unwrap();
    let mut other = good.clone();
    other[..SEG_HEADER].copy_from_slice(&segment_header_version(1, 1, VERSION + 1));
    std::fs::write(&seg, &other).unwrap();
    let err = Journal::open(&jdir, 1, 2, &refs(&s.images), JournalOptions::default())
        .err()
        .unwrap();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("version"), "{err}");
    let mut bad = good.clone();
    bad[9] ^= 1;
    std::fs::write(&seg, &bad).unwrap();
    assert!(Journal::open(&jdir, 1, 2, &refs(&s.images), JournalOptions::default()).is_err());
    std::fs::write(&seg, &good).unwrap();
    let (j, report) =
        Journal::open(&jdir, 2, 0, &refs(&s.images), JournalOptions::default()).unwrap();
    assert!(report.wiped);
    assert!(j.points().is_empty());
    assert!(list_segments(&jdir).unwrap().is_empty());
}

#[test]
fn a_damaged_older_segment_drops_it_and_older_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::new(
        dir.path(),
        JournalOptions {
            segment_bytes: 8 << 10,
        },
    );
    for t in 0..12u64 {
        s.batch(
            t,
            &[],
            &[
                Op::Write(0, (t % 4) * 4096, vec![t as u8 + 1; 4096]),
                Op::Point(0),
            ],
        );
    }
    s.journal = None;
    let jdir = dir.path().join(DIR_NAME);
    let segs = list_segments(&jdir).unwrap();
    assert!(segs.len() >= 4);
    // Corrupt a record header in the second segment.
    let mut b = std::fs::read(&segs[1].1).unwrap();
    b[SEG_HEADER + 10] ^= 0xff;
    std::fs::write(&segs[1].1, &b).unwrap();
    let report = s.reopen();
    assert_eq!(report.damaged_segments, 2);
    let pts = s.j().points();
    assert!(!pts.is_empty());
    assert_eq!(s.check_views(), pts.len());
    s.reopen();
    assert_eq!(s.j().points(), pts);
}

#[test]
fn roll_back_uncommitted_restores_the_cursor_state_and_views_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::new(dir.path(), JournalOptions::default());
    s.batch(1, &[], &[Op::Write(0, 0, vec![1; 3000]), Op::Point(0)]);
    let v = s.j().view(2).unwrap();
    let b = s.journal_batch(
        2,
        &[(1, 100)],
        &[Op::Write(0, 10, vec![9; 100]), Op::Point(0)],
    );
    s.write_images(&b, |_| {});
    let imgs: Vec<File> = s.images.iter().map(|f| f.try_clone().unwrap()).collect();
    assert_eq!(s.j().roll_back_uncommitted(&refs(&imgs)).unwrap(), 3);
    s.images[1].set_len(DISK).unwrap();
    s.j().set_sizes(&[DISK, DISK]);
    assert_eq!(s.read_images(), s.model_at(2));
    assert_eq!(s.j().points().len(), 1);
    let mut got = vec![0u8; 3000];
    v.read(0, 0, &mut got, &s.images[0]).unwrap();
    assert_eq!(got, vec![1; 3000]);
    // The seqs are applied again, differently.
    s.next_seq = 3;
    s.model = s.model_at(2);
    s.at_point.remove(&4);
    s.batch(3, &[], &[Op::Write(0, 0, vec![7; 10]), Op::Point(0)]);
    v.read(0, 0, &mut got, &s.images[0]).unwrap();
    assert_eq!(got, vec![1; 3000]);
    assert_eq!(s.check_views(), 2);
}

#[test]
fn views_read_right_while_batches_apply_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sim::new(dir.path(), JournalOptions::default());
    s.batch(
        0,
        &[],
        &[Op::Write(0, 0, vec![5; DISK as usize]), Op::Point(0)],
    );
    let want = s.at_point[&2][0].clone();
    let view = Arc::new(s.j().view(2).unwrap());
    let image = Arc::new(s.images[0].try_clone().unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (view, image, stop) = (view.clone(), image.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(5);
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads < 100 {
                let off = rng.below(DISK - 1);
                let len = 1 + rng.below((DISK - off).min(20000));
                let mut b = vec![0u8; len as usize];
                let n = view.read(0, off, &mut b, &image).unwrap();
                assert_eq!(n, len as usize);
                assert!(
                    b[..] == want[off as usize..(off + len) as usize],
                    "read at {off}+{len}"
                );
                reads += 1;
            }
            reads
        })
    };
    let mut rng = Rng(11);
    for t in 0..300u64 {
        let ops = random_ops(&mut rng, 6, [DISK as usize; 2]);
        s.batch(t, &[], &ops);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().unwrap();
    assert!(reads >= 100);
}
