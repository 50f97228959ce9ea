//! Recovery of the process server's cache (`haven_storage::MachineCache::open`) from
//! arbitrary segment files.
//!
//! The first byte picks a mode:
//! - **raw**: the rest is the content of one segment file;
//! - **built**: the rest describes segments of records (through `arbitrary`), written with
//!   valid checksums and then damaged as the description says (flipped bytes, bad headers,
//!   lengths that lie, torn tails, misnamed segments), so recovery is reached past the crc.
//!
//! After a successful open, every record it kept reads back, and an append, a sync and a
//! reopen work (recovery leaves a cache that is good to use). When nothing was damaged, the
//! records read back are exactly the ones written.
use std::fs;

use arbitrary::{Arbitrary, Unstructured};
use haven_storage::cache::{
    CacheOptions, MachineCache, RECORD_MAGIC, RECORD_VERSION, SEGMENT_MAGIC, SEGMENT_VERSION,
};

#[derive(Arbitrary, Debug)]
struct Spec {
    segment_kib: u8,
    segments: Vec<SegSpec>,
}

#[derive(Arbitrary, Debug)]
enum Name {
    /// Named for its first record, as the cache names segments.
    Auto,
    /// Named for another seq.
    Seq(u64),
    /// Not a segment name at all (ignored by recovery).
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct SegSpec {
    name: Name,
    /// Replaces the segment header.
    header: Option<Vec<u8>>,
    records: Vec<RecSpec>,
    tail: Vec<u8>,
    /// Cuts this many bytes off the end of the file.
    cut: u16,
    /// XORs a byte of the file: (position, mask).
    flip: Option<(u32, u8)>,
}

#[derive(Arbitrary, Debug)]
struct RecSpec {
    /// first_seq = previous last_seq + 1 + gap (or, if `raw_seqs`, those seqs).
    gap: u8,
    span: u8,
    raw_seqs: Option<(u64, u64)>,
    payload: Vec<u8>,
    /// Replaces the header's payload length (a lie).
    len: Option<u32>,
    /// Replaces the header's version or reserved byte.
    version: Option<u8>,
    reserved: Option<u8>,
    bad_crc: bool,
}

struct Written {
    first: u64,
    last: u64,
    payload: Vec<u8>,
}

fn record(first: u64, last: u64, payload: &[u8], r: &RecSpec) -> Vec<u8> {
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    h[4] = r.version.unwrap_or(RECORD_VERSION);
    h[5] = r.reserved.unwrap_or(0);
    h[8..16].copy_from_slice(&first.to_le_bytes());
    h[16..24].copy_from_slice(&last.to_le_bytes());
    h[24..28].copy_from_slice(&r.len.unwrap_or(payload.len() as u32).to_le_bytes());
    let mut crc = crc32c::crc32c_append(crc32c::crc32c(&h[..28]), payload);
    if r.bad_crc {
        crc ^= 1;
    }
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    [&h[..], payload].concat()
}

fn segment_header() -> Vec<u8> {
    let mut h = SEGMENT_MAGIC.to_vec();
    h.extend_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    h
}

/// Writes the described segments into `dir`; returns the records written and whether any
/// damage was done.
fn build(dir: &std::path::Path, spec: &Spec) -> (Vec<Written>, bool) {
    let mut written = Vec::new();
    let mut damaged = false;
    let mut prev: Option<u64> = None;
    for seg in spec.segments.iter().take(4) {
        let mut bytes = match &seg.header {
            Some(h) => {
                damaged = true;
                h.clone()
            }
            None => segment_header(),
        };
        let mut first_of_segment = None;
        for r in seg.records.iter().take(8) {
            let (first, last) = match r.raw_seqs {
                Some(s) => {
                    damaged = true;
                    s
                }
                None => {
                    let first = prev.map_or(Some(u64::from(r.gap)), |p| {
                        p.checked_add(1 + u64::from(r.gap))
                    });
                    let Some(first) = first else { break };
                    (first, first.saturating_add(u64::from(r.span)))
                }
            };
            let payload = &r.payload[..r.payload.len().min(4096)];
            damaged |= r.len.is_some() || r.version.is_some() || r.reserved.is_some() || r.bad_crc;
            bytes.extend(record(first, last, payload, r));
            first_of_segment.get_or_insert(first);
            written.push(Written {
                first,
                last,
                payload: payload.to_vec(),
            });
            prev = Some(last);
        }
        bytes.extend_from_slice(&seg.tail);
        let cut = (seg.cut as usize).min(bytes.len());
        bytes.truncate(bytes.len() - cut);
        if let Some((at, mask)) = seg.flip {
            if !bytes.is_empty() && mask != 0 {
                let i = at as usize % bytes.len();
                bytes[i] ^= mask;
                damaged = true;
            }
        }
        damaged |= !seg.tail.is_empty() || cut > 0;
        let name = match &seg.name {
            Name::Auto => format!("seg-{:020}.hvc", first_of_segment.unwrap_or(0)),
            Name::Seq(s) => {
                damaged = true;
                format!("seg-{s:020}.hvc")
            }
            Name::Other(s) => {
                damaged = true;
                let s: String = s.chars().filter(|c| *c != '/' && *c != '\0').collect();
                if s.is_empty() || s == "." || s == ".." || s == "LOCK" {
                    continue;
                }
                s
            }
        };
        // A segment with no record is damage too (recovery removes it).
        damaged |= first_of_segment.is_none();
        if fs::write(dir.join(&name), &bytes).is_err() {
            damaged = true;
        }
    }
    (written, damaged)
}

pub fn fuzz(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tmp = crate::tmp::dir();
    let dir = tmp.path().join("cache");
    fs::create_dir(&dir).unwrap();
    let (expected, opts) = if mode & 1 == 0 {
        let name = format!("seg-{:020}.hvc", u64::from(mode >> 1));
        fs::write(dir.join(name), rest).unwrap();
        (None, CacheOptions::default())
    } else {
        let Ok(spec) = Spec::arbitrary(&mut Unstructured::new(rest)) else {
            return;
        };
        let (written, damaged) = build(&dir, &spec);
        let opts = CacheOptions {
            segment_bytes: (u64::from(spec.segment_kib) + 1) << 10,
        };
        (Some(written).filter(|_| !damaged), opts)
    };

    let Ok((cache, report)) = MachineCache::open(&dir, opts.clone()) else {
        assert!(expected.is_none(), "undamaged segments refused");
        return;
    };
    let records = cache
        .read_after(0, usize::MAX)
        .expect("what recovery kept reads back");
    assert_eq!(report.last_seq, cache.last_seq());
    if let Some(want) = &expected {
        let got: Vec<(u64, u64, &[u8])> = records
            .iter()
            .map(|r| (r.first_seq, r.last_seq, &r.payload[..]))
            .collect();
        // (`read_after(0)` leaves out a record that ends at seq 0.)
        let want: Vec<(u64, u64, &[u8])> = want
            .iter()
            .filter(|w| w.last > 0)
            .map(|w| (w.first, w.last, &w.payload[..]))
            .collect();
        assert_eq!(got, want, "undamaged records changed");
        assert_eq!(report.truncated_bytes, 0);
    }
    for pair in records.windows(2) {
        assert!(pair[0].last_seq < pair[1].first_seq, "records out of order");
    }
    // Recovery leaves a cache that takes appends and reopens cleanly.
    let next = cache.last_seq().map_or(Some(1), |l| l.checked_add(1));
    let mut cache = cache;
    if let Some(next) = next {
        cache.append(next, next, b"after recovery").expect("append");
        cache.sync().expect("sync");
        drop(cache);
        let (cache, again) = MachineCache::open(&dir, opts).expect("reopen after recovery");
        assert_eq!(again.truncated_bytes, 0, "reopen cut something");
        assert_eq!(again.records, report.records + 1);
        let last = cache.read_after(next - 1, usize::MAX).expect("read");
        assert_eq!(
            last.last().map(|r| &r.payload[..]),
            Some(&b"after recovery"[..])
        );
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    // Raw mode: a segment holding two records.
    let ok = |first: u64, last: u64, p: &[u8]| {
        record(
            first,
            last,
            p,
            &RecSpec {
                gap: 0,
                span: 0,
                raw_seqs: None,
                payload: vec![],
                len: None,
                version: None,
                reserved: None,
                bad_crc: false,
            },
        )
    };
    let seg = [segment_header(), ok(0, 3, b"abc"), ok(4, 4, b"")].concat();
    let mut seeds = vec![
        [vec![0], seg.clone()].concat(),
        [vec![0], seg[..seg.len() - 3].to_vec()].concat(),
        [vec![0], segment_header()].concat(),
        vec![0],
    ];
    // Built mode: a few byte strings that `arbitrary` turns into specs.
    for i in 0..8u8 {
        let mut s = vec![1];
        s.extend((0..64).map(|j: u8| j.wrapping_mul(31).wrapping_add(i * 17)));
        seeds.push(s);
    }
    seeds
}
