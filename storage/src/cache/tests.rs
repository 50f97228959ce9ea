use super::*;
use std::io::Write;

fn payload(seq: u64, len: usize) -> Vec<u8> {
    let mut s = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

fn small() -> CacheOptions {
    // Three 3000-byte records per segment (16 + 3 * 3032 = 9112).
    CacheOptions {
        segment_bytes: 10_000,
    }
}

/// Appends records (10*i+1 ..= 10*i+10) for i in `range`, 3000-byte payloads.
fn fill(c: &mut MachineCache, range: std::ops::Range<u64>) {
    for i in range {
        c.append(10 * i + 1, 10 * i + 10, &payload(i, 3000))
            .unwrap();
    }
}

fn check(records: &[Record], range: std::ops::Range<u64>) {
    let expect: Vec<u64> = range.clone().collect();
    let got: Vec<u64> = records.iter().map(|r| (r.last_seq / 10) - 1).collect();
    assert_eq!(got, expect);
    for (r, i) in records.iter().zip(range) {
        assert_eq!(r.first_seq, 10 * i + 1);
        assert_eq!(r.last_seq, 10 * i + 10);
        assert_eq!(r.payload, payload(i, 3000));
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "hvc"))
        .collect();
    v.sort();
    v
}

fn flip_bit(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).unwrap();
}

#[test]
fn append_sync_read_across_rolls() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.segments, 0);
    assert_eq!(rep.last_seq, None);
    assert_eq!(c.first_seq(), None);
    assert!(c.read_after(0, usize::MAX).unwrap().is_empty());

    fill(&mut c, 0..10);
    c.sync().unwrap();
    assert_eq!(c.durable_last_seq(), Some(100));
    assert_eq!(c.first_seq(), Some(1));
    let files = segment_files(tmp.path());
    assert_eq!(files.len(), 4, "{files:?}");
    assert!(files[0].ends_with("seg-00000000000000000001.hvc"));
    assert!(files[1].ends_with("seg-00000000000000000031.hvc"));
    let on_disk: u64 = files.iter().map(|p| fs::metadata(p).unwrap().len()).sum();
    assert_eq!(c.bytes(), on_disk);
    assert_eq!(c.bytes(), 4 * 16 + 10 * (32 + 3000));

    check(&c.read_after(0, usize::MAX).unwrap(), 0..10);
    // Starting in the middle of a segment and of a record's range.
    check(&c.read_after(35, usize::MAX).unwrap(), 3..10);
    check(&c.read_after(40, usize::MAX).unwrap(), 4..10);
    check(&c.read_after(41, usize::MAX).unwrap(), 4..10);
    assert!(c.read_after(100, usize::MAX).unwrap().is_empty());
    assert!(c.read_after(u64::MAX, usize::MAX).unwrap().is_empty());
    // max_bytes: at least one record, never more than max_bytes after the first.
    check(&c.read_after(0, 0).unwrap(), 0..1);
    check(&c.read_after(0, 1).unwrap(), 0..1);
    check(&c.read_after(0, 5999).unwrap(), 0..1);
    check(&c.read_after(0, 6000).unwrap(), 0..2);
    check(&c.read_after(20, 9000).unwrap(), 2..5);
}

#[test]
fn reopen_recovers_everything_synced() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
        fill(&mut c, 0..7);
        c.sync().unwrap();
    }
    let (mut c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.segments, 3);
    assert_eq!(rep.records, 7);
    assert_eq!(rep.truncated_bytes, 0);
    assert_eq!(rep.last_seq, Some(70));
    assert_eq!(c.durable_last_seq(), Some(70));
    check(&c.read_after(0, usize::MAX).unwrap(), 0..7);
    // Ordering survives the reopen, and appends continue in the last segment.
    assert!(matches!(
        c.append(70, 75, b"x"),
        Err(CacheError::OutOfOrder {
            previous: Some(70),
            ..
        })
    ));
    fill(&mut c, 7..12);
    c.sync().unwrap();
    drop(c);
    let (c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.records, 12);
    assert_eq!(rep.segments, 4);
    check(&c.read_after(0, usize::MAX).unwrap(), 0..12);
}

#[test]
fn torn_tail_mid_record_is_cut() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
        fill(&mut c, 0..8);
        c.sync().unwrap();
    }
    let files = segment_files(tmp.path());
    let last = files.last().unwrap();
    let len = fs::metadata(last).unwrap().len();
    assert_eq!(len, 16 + 2 * 3032);
    // Cut in the middle of the last record's payload.
    let f = OpenOptions::new().write(true).open(last).unwrap();
    f.set_len(len - 1000).unwrap();
    drop(f);

    let (mut c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.records, 7);
    assert_eq!(rep.truncated_bytes, 3032 - 1000);
    assert_eq!(rep.last_seq, Some(70));
    assert_eq!(fs::metadata(last).unwrap().len(), 16 + 3032);
    check(&c.read_after(0, usize::MAX).unwrap(), 0..7);
    // Appends continue after the cut: the lost record comes again.
    fill(&mut c, 7..10);
    c.sync().unwrap();
    drop(c);
    let (c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.truncated_bytes, 0);
    check(&c.read_after(0, usize::MAX).unwrap(), 0..10);
}

#[test]
fn torn_tail_in_record_header_is_cut() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
        fill(&mut c, 0..2);
        c.sync().unwrap();
    }
    let last = segment_files(tmp.path()).pop().unwrap();
    let f = OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(16 + 3032 + 20).unwrap();
    drop(f);
    let (c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.records, 1);
    assert_eq!(rep.truncated_bytes, 20);
    check(&c.read_after(0, usize::MAX).unwrap(), 0..1);
}

#[test]
fn garbage_tail_is_cut() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
        fill(&mut c, 0..5);
        c.sync().unwrap();
    }
    let last = segment_files(tmp.path()).pop().unwrap();
    let before = fs::metadata(&last).unwrap().len();
    let mut f = OpenOptions::new().append(true).open(&last).unwrap();
    // Zeros (what a crash often leaves), then random bytes.
    f.write_all(&[0u8; 100]).unwrap();
    f.write_all(&payload(99, 5000)).unwrap();
    drop(f);

    let (mut c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.records, 5);
    assert_eq!(rep.truncated_bytes, 5100);
    assert_eq!(fs::metadata(&last).unwrap().len(), before);
    check(&c.read_after(0, usize::MAX).unwrap(), 0..5);
    fill(&mut c, 5..6);
    c.sync().unwrap();
    check(&c.read_after(0, usize::MAX).unwrap(), 0..6);
}

#[test]
fn huge_payload_len_in_tail_header_does_not_allocate() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
        fill(&mut c, 0..1);
        c.sync().unwrap();
    }
    let last = segment_files(tmp.path()).pop().unwrap();
    let mut h = encode_record_header(11, 20, b"");
    h[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut f = OpenOptions::new().append(true).open(&last).unwrap();
    f.write_all(&h).unwrap();
    drop(f);
    let (_c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.records, 1);
    assert_eq!(rep.truncated_bytes, 32);
}

#[test]
fn flipped_bit_in_last_record_of_last_segment_is_cut() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
        fill(&mut c, 0..5);
        c.sync().unwrap();
    }
    let last = segment_files(tmp.path()).pop().unwrap();
    // Last segment holds records 3 and 4; flip a payload bit of record 4.
    flip_bit(&last, 16 + 3032 + 32 + 1234);
    let (c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.records, 4);
    assert_eq!(rep.truncated_bytes, 3032);
    assert_eq!(rep.last_seq, Some(40));
    check(&c.read_after(0, usize::MAX).unwrap(), 0..4);
}

#[test]
fn flipped_bit_in_header_of_only_record_deletes_last_segment() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
        fill(&mut c, 0..4);
        c.sync().unwrap();
    }
    let files = segment_files(tmp.path());
    assert_eq!(files.len(), 2);
    flip_bit(&files[1], 16 + 9); // first_seq of the only record in the last segment
    let (mut c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.segments, 1);
    assert_eq!(rep.records, 3);
    assert_eq!(rep.truncated_bytes, 16 + 3032);
    assert_eq!(segment_files(tmp.path()).len(), 1);
    // The next append recreates the segment under the same name.
    fill(&mut c, 3..4);
    c.sync().unwrap();
    check(&c.read_after(0, usize::MAX).unwrap(), 0..4);
}

#[test]
fn torn_segment_header_of_new_last_segment_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
        fill(&mut c, 0..3);
        c.sync().unwrap();
    }
    // A crash right after creating the next segment.
    fs::write(tmp.path().join(segment_name(31)), b"HVCSE").unwrap();
    let (c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.records, 3);
    assert_eq!(rep.truncated_bytes, 5);
    assert_eq!(segment_files(tmp.path()).len(), 1);
    check(&c.read_after(0, usize::MAX).unwrap(), 0..3);
}

#[test]
fn flipped_bit_in_earlier_segment_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
        fill(&mut c, 0..7);
        c.sync().unwrap();
    }
    let files = segment_files(tmp.path());
    let off = 16 + 3032 + 32 + 77;
    flip_bit(&files[1], off);
    let err = MachineCache::open(tmp.path(), small()).unwrap_err();
    match &err {
        CacheError::Corrupt { path, offset, .. } => {
            assert_eq!(path, &files[1]);
            assert_eq!(*offset, 16 + 3032);
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("seg-00000000000000000031.hvc"), "{msg}");
    assert!(msg.contains("crc32c"), "{msg}");
    // Nothing was cut.
    assert_eq!(fs::metadata(&files[1]).unwrap().len(), 16 + 3 * 3032);
    // A truncated earlier segment is refused too.
    flip_bit(&files[1], off);
    let f = OpenOptions::new().write(true).open(&files[0]).unwrap();
    f.set_len(100).unwrap();
    drop(f);
    assert!(matches!(
        MachineCache::open(tmp.path(), small()),
        Err(CacheError::Corrupt { .. })
    ));
}

#[test]
fn corruption_after_open_is_detected_on_read() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
    fill(&mut c, 0..4);
    c.sync().unwrap();
    let files = segment_files(tmp.path());
    flip_bit(&files[0], 16 + 3032 + 32 + 5);
    let err = c.read_after(0, usize::MAX).unwrap_err();
    assert!(
        matches!(&err, CacheError::Corrupt { offset, .. } if *offset == 16 + 3032),
        "{err}"
    );
    check(&c.read_after(30, usize::MAX).unwrap(), 3..4);
}

#[test]
fn misordered_records_are_an_error_not_a_cut() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
        fill(&mut c, 0..2);
        c.sync().unwrap();
    }
    // A valid record that goes backwards.
    let last = segment_files(tmp.path()).pop().unwrap();
    let mut f = OpenOptions::new().append(true).open(&last).unwrap();
    f.write_all(&encode_record_header(5, 6, b"abc")).unwrap();
    f.write_all(b"abc").unwrap();
    drop(f);
    assert!(matches!(
        MachineCache::open(tmp.path(), small()),
        Err(CacheError::Corrupt { .. })
    ));
}

#[test]
fn trim_frees_only_fully_applied_segments() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
    fill(&mut c, 0..10); // segments: [0,1,2] [3,4,5] [6,7,8] [9]
    c.sync().unwrap();
    let seg_len = 16 + 3 * 3032;
    assert_eq!(c.trim(0).unwrap(), 0);
    assert_eq!(c.trim(29).unwrap(), 0); // record 2 (21..=30) not fully applied
    assert_eq!(segment_files(tmp.path()).len(), 4);
    assert_eq!(c.trim(30).unwrap(), seg_len);
    assert_eq!(c.first_seq(), Some(31));
    assert_eq!(segment_files(tmp.path()).len(), 3);
    assert_eq!(c.trim(85).unwrap(), seg_len);
    assert_eq!(c.first_seq(), Some(61));
    // Everything applied: all but the segment being written go.
    assert_eq!(c.trim(u64::MAX).unwrap(), seg_len);
    assert_eq!(segment_files(tmp.path()).len(), 1);
    assert_eq!(c.bytes(), 16 + 3032);
    assert_eq!(c.first_seq(), Some(91));
    check(&c.read_after(0, usize::MAX).unwrap(), 9..10);
    // Still appendable, and a reopen agrees.
    fill(&mut c, 10..12);
    c.sync().unwrap();
    drop(c);
    let (c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.records, 3);
    check(&c.read_after(0, usize::MAX).unwrap(), 9..12);
}

#[test]
fn out_of_order_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
    assert!(matches!(
        c.append(5, 4, b"x"),
        Err(CacheError::OutOfOrder {
            first_seq: 5,
            last_seq: 4,
            previous: None
        })
    ));
    c.append(1, 10, b"a").unwrap();
    for (f, l) in [(10, 12), (5, 20), (1, 10), (0, 0)] {
        assert!(
            matches!(
                c.append(f, l, b"x"),
                Err(CacheError::OutOfOrder {
                    previous: Some(10),
                    ..
                })
            ),
            "{f}..={l}"
        );
    }
    c.append(11, 11, b"b").unwrap();
    c.append(20, 30, b"c").unwrap(); // gaps are allowed
    c.sync().unwrap();
    let r = c.read_after(0, usize::MAX).unwrap();
    assert_eq!(
        r.iter()
            .map(|r| (r.first_seq, r.last_seq))
            .collect::<Vec<_>>(),
        vec![(1, 10), (11, 11), (20, 30)]
    );
    assert!(matches!(
        c.append(31, 31, &vec![0u8; MAX_PAYLOAD + 1]),
        Err(CacheError::TooLarge { .. })
    ));
}

#[test]
fn read_after_never_returns_unsynced() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
    fill(&mut c, 0..2);
    assert_eq!(c.durable_last_seq(), None);
    assert!(c.read_after(0, usize::MAX).unwrap().is_empty());
    c.sync().unwrap();
    fill(&mut c, 2..5); // rolls once: the roll makes records 0..3 durable
    assert_eq!(c.durable_last_seq(), Some(30));
    check(&c.read_after(0, usize::MAX).unwrap(), 0..3);
    assert!(c.read_after(30, usize::MAX).unwrap().is_empty());
    c.sync().unwrap();
    assert_eq!(c.durable_last_seq(), Some(50));
    check(&c.read_after(0, usize::MAX).unwrap(), 0..5);
    c.sync().unwrap(); // no-op
    assert_eq!(c.durable_last_seq(), Some(50));
}

#[test]
fn clear_deletes_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
    fill(&mut c, 0..5);
    c.sync().unwrap();
    c.clear().unwrap();
    assert_eq!(c.bytes(), 0);
    assert_eq!(c.first_seq(), None);
    assert_eq!(c.durable_last_seq(), None);
    assert!(segment_files(tmp.path()).is_empty());
    assert!(c.read_after(0, usize::MAX).unwrap().is_empty());
    // A new stream may start anywhere.
    fill(&mut c, 0..2);
    c.sync().unwrap();
    check(&c.read_after(0, usize::MAX).unwrap(), 0..2);
    drop(c);
    let (_c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.records, 2);
}

#[test]
fn large_record_gets_its_own_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
    c.append(1, 1, &payload(1, 100)).unwrap();
    c.append(2, 2, &payload(2, 50_000)).unwrap();
    c.append(3, 3, &payload(3, 100)).unwrap();
    c.sync().unwrap();
    assert_eq!(segment_files(tmp.path()).len(), 3);
    let r = c.read_after(0, usize::MAX).unwrap();
    assert_eq!(r.len(), 3);
    assert_eq!(r[1].payload, payload(2, 50_000));
    drop(c);
    let (_c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.records, 3);
}

#[test]
fn second_open_is_locked() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, _) = MachineCache::open(tmp.path(), small()).unwrap();
    assert!(matches!(
        MachineCache::open(tmp.path(), small()),
        Err(CacheError::Locked { .. })
    ));
    drop(c);
    MachineCache::open(tmp.path(), small()).unwrap();
}

#[test]
fn unknown_files_are_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("notes.txt"), b"hi").unwrap();
    fs::write(tmp.path().join("seg-12.hvc"), b"hi").unwrap();
    let (mut c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.segments, 0);
    fill(&mut c, 0..1);
    c.sync().unwrap();
    assert_eq!(c.read_after(0, 10).unwrap().len(), 1);
}

#[test]
fn empty_payloads_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
    c.append(1, 1, b"").unwrap();
    c.append(2, 2, b"").unwrap();
    c.sync().unwrap();
    assert_eq!(c.read_after(0, 0).unwrap().len(), 1);
    assert_eq!(c.read_after(0, 10).unwrap().len(), 2);
    drop(c);
    let (c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.records, 2);
    assert_eq!(c.read_after(1, 0).unwrap()[0].last_seq, 2);
}

#[test]
fn creates_nested_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/b/machine-1");
    let (mut c, _) = MachineCache::open(&dir, small()).unwrap();
    fill(&mut c, 0..1);
    c.sync().unwrap();
    assert_eq!(segment_files(&dir).len(), 1);
}

#[test]
fn bytes_after_counts_unapplied_payload_record_by_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(c.bytes_after(0), 0);
    fill(&mut c, 0..10);
    assert_eq!(c.bytes_after(0), 10 * 3000);
    assert_eq!(c.bytes_after(30), 7 * 3000);
    assert_eq!(c.bytes_after(35), 7 * 3000); // record 31..=40 is not fully applied
    assert_eq!(c.bytes_after(40), 6 * 3000);
    assert_eq!(c.bytes_after(100), 0);
    // Trimming whole segments does not change what is unapplied.
    c.sync().unwrap();
    c.trim(40).unwrap();
    assert_eq!(c.bytes_after(40), 6 * 3000);
}

const ENOSPC: i32 = libc::ENOSPC;

#[test]
fn failed_write_is_rolled_back_what_came_before_synced_and_the_segment_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
    fill(&mut c, 0..1);
    c.sync().unwrap();
    fill(&mut c, 1..2); // not synced yet
    c.faults.write = Some(ENOSPC);
    let err = c.append(21, 30, &payload(2, 3000)).unwrap_err();
    assert!(err.is_disk_full(), "{err}");
    assert!(!c.is_poisoned());
    // The partial record is gone; the record appended before it is durable now.
    assert_eq!(c.durable_last_seq(), Some(20));
    assert_eq!(c.last_seq(), Some(20));
    let files = segment_files(tmp.path());
    assert_eq!(files.len(), 1);
    assert_eq!(fs::metadata(&files[0]).unwrap().len(), 16 + 2 * 3032);
    assert_eq!(c.bytes(), 16 + 2 * 3032);
    check(&c.read_after(0, usize::MAX).unwrap(), 0..2);
    // The retry goes to a new segment: the closed one takes nothing more.
    fill(&mut c, 2..3);
    c.sync().unwrap();
    let files = segment_files(tmp.path());
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files[1].ends_with("seg-00000000000000000021.hvc"));
    check(&c.read_after(0, usize::MAX).unwrap(), 0..3);
    drop(c);
    let (c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!((rep.records, rep.truncated_bytes), (3, 0));
    check(&c.read_after(0, usize::MAX).unwrap(), 0..3);
}

#[test]
fn a_closed_last_segment_is_trimmed_once_applied_and_appends_continue() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
    fill(&mut c, 0..2);
    c.sync().unwrap();
    // While it is open, the last segment stays, applied or not.
    assert_eq!(c.trim(u64::MAX).unwrap(), 0);
    c.faults.write = Some(ENOSPC);
    assert!(c
        .append(21, 30, &payload(2, 3000))
        .unwrap_err()
        .is_disk_full());
    assert_eq!(c.trim(19).unwrap(), 0, "record 11..=20 is not applied");
    assert_eq!(c.trim(20).unwrap(), 16 + 2 * 3032);
    assert!(segment_files(tmp.path()).is_empty());
    assert_eq!((c.bytes(), c.first_seq()), (0, None));
    assert!(c.read_after(0, usize::MAX).unwrap().is_empty());
    // Ordering survives the empty cache.
    assert_eq!(c.durable_last_seq(), Some(20));
    assert!(matches!(
        c.append(15, 25, b"x"),
        Err(CacheError::OutOfOrder {
            previous: Some(20),
            ..
        })
    ));
    fill(&mut c, 2..4);
    c.sync().unwrap();
    let files = segment_files(tmp.path());
    assert_eq!(files.len(), 1);
    assert!(files[0].ends_with("seg-00000000000000000021.hvc"));
    check(&c.read_after(20, usize::MAX).unwrap(), 2..4);
    drop(c);
    let (c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!(rep.records, 2);
    check(&c.read_after(0, usize::MAX).unwrap(), 2..4);
}

#[test]
fn trim_never_frees_unsynced_records() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
    fill(&mut c, 0..1);
    assert_eq!(c.trim(u64::MAX).unwrap(), 0);
    c.sync().unwrap();
    fill(&mut c, 1..2);
    // A failed write syncs before it closes the segment; when that sync fails too, the
    // cache is poisoned and the segment, holding an unsynced record, stays.
    c.faults.write = Some(ENOSPC);
    c.faults.sync = Some(libc::EIO);
    assert!(c.append(21, 30, &payload(2, 3000)).is_err());
    assert!(c.is_poisoned());
    assert_eq!(c.trim(u64::MAX).unwrap(), 0);
    assert_eq!(segment_files(tmp.path()).len(), 1);
    c.recover().unwrap();
    assert_eq!(c.last_seq(), Some(10));
    check(&c.read_after(0, usize::MAX).unwrap(), 0..1);
}

#[test]
fn failed_fdatasync_poisons_until_recover_cuts_what_was_not_synced() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
    fill(&mut c, 0..1);
    c.sync().unwrap();
    fill(&mut c, 1..2);
    c.faults.sync = Some(libc::EIO);
    let err = c.sync().unwrap_err();
    assert!(!err.is_disk_full(), "{err}");
    assert!(c.is_poisoned());
    assert!(matches!(
        c.append(21, 30, b"x"),
        Err(CacheError::Poisoned { .. })
    ));
    assert!(matches!(c.sync(), Err(CacheError::Poisoned { .. })));
    let rep = c.recover().unwrap();
    assert_eq!((rep.records, rep.last_seq), (1, Some(10)));
    assert!(!c.is_poisoned());
    assert_eq!(c.durable_last_seq(), Some(10));
    assert_eq!(c.last_seq(), Some(10));
    let files = segment_files(tmp.path());
    assert_eq!(fs::metadata(&files[0]).unwrap().len(), 16 + 3032);
    // The caller appends again what it did not see synced.
    fill(&mut c, 1..5);
    c.sync().unwrap();
    check(&c.read_after(0, usize::MAX).unwrap(), 0..5);
    // Still the only holder of the directory, and a reopen agrees.
    assert!(matches!(
        MachineCache::open(tmp.path(), small()),
        Err(CacheError::Locked { .. })
    ));
    drop(c);
    let (c, rep) = MachineCache::open(tmp.path(), small()).unwrap();
    assert_eq!((rep.records, rep.truncated_bytes), (5, 0));
    check(&c.read_after(0, usize::MAX).unwrap(), 0..5);
}

#[test]
fn recover_deletes_a_segment_that_holds_only_unsynced_records() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut c, _) = MachineCache::open(tmp.path(), small()).unwrap();
    fill(&mut c, 0..3);
    c.sync().unwrap();
    fill(&mut c, 3..4); // rolls into seg-31
    assert_eq!(segment_files(tmp.path()).len(), 2);
    c.faults.sync = Some(ENOSPC);
    assert!(c.sync().unwrap_err().is_disk_full());
    c.recover().unwrap();
    assert_eq!(segment_files(tmp.path()).len(), 1);
    assert_eq!(c.last_seq(), Some(30));
    assert_eq!(c.bytes(), 16 + 3 * 3032);
    fill(&mut c, 3..4);
    c.sync().unwrap();
    check(&c.read_after(0, usize::MAX).unwrap(), 0..4);
}

/// A tmpfs of its own, lazily unmounted on drop (before its mount point is removed).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (after saying why) where mounting is not permitted.
    fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!(
                    "skipped: mount -t tmpfs failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A real full disk (a 1 MiB tmpfs), with segments far larger than the disk.
#[test]
fn a_full_disk_is_reported_as_such_and_trimming_makes_room_again() {
    let Some(fs) = Tmpfs::mount(1 << 20) else {
        return;
    };
    let dir = fs.dir.path().join("cache");
    let opts = CacheOptions {
        segment_bytes: 64 << 20,
    };
    let (mut c, _) = MachineCache::open(&dir, opts.clone()).unwrap();
    let rec = |i: u64| payload(i, 60_000);
    let mut i = 0;
    let err = loop {
        match c.append(i + 1, i + 1, &rec(i)).and_then(|()| c.sync()) {
            Ok(()) => i += 1,
            Err(e) => break e,
        }
        assert!(i < 100, "a 1 MiB disk took {i} records of 60 kB");
    };
    assert!(i >= 10, "only {i} records fit");
    assert!(err.is_disk_full(), "{err}");
    assert!(!c.is_poisoned());
    assert_eq!(c.durable_last_seq(), Some(i));
    let files = segment_files(&dir);
    let on_disk: u64 = files.iter().map(|p| fs::metadata(p).unwrap().len()).sum();
    assert_eq!(c.bytes(), on_disk, "the partial record was cut");
    // Everything synced reads back intact.
    let got = c.read_after(0, usize::MAX).unwrap();
    assert_eq!(got.len() as u64, i);
    assert!(got.iter().all(|r| r.payload == rec(r.first_seq - 1)));
    // Still full: a retry cannot even start the new segment, and changes nothing.
    let err = c.append(i + 1, i + 1, &rec(i)).unwrap_err();
    assert!(err.is_disk_full(), "{err}");
    assert!(!c.is_poisoned());
    assert_eq!(segment_files(&dir), files);
    // Applied: the closed segment goes, and the retry succeeds.
    assert_eq!(c.trim(i).unwrap(), on_disk);
    c.append(i + 1, i + 1, &rec(i)).unwrap();
    c.sync().unwrap();
    assert_eq!(c.read_after(0, usize::MAX).unwrap()[0].first_seq, i + 1);
    drop(c);
    let (c, rep) = MachineCache::open(&dir, opts).unwrap();
    assert_eq!((rep.records, rep.last_seq), (1, Some(i + 1)));
    assert_eq!(c.read_after(0, usize::MAX).unwrap()[0].payload, rec(i));
}

#[test]
fn filesystem_bytes_of_a_path_not_yet_created() {
    let tmp = tempfile::tempdir().unwrap();
    let n = filesystem_bytes(&tmp.path().join("not/yet")).unwrap();
    assert!(n > 0);
    assert_eq!(n, filesystem_bytes(tmp.path()).unwrap());
}
