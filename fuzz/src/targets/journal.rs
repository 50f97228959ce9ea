//! Replaying the agent's applied-hash journal (`haven_roles::agent::journal::Journal::open`)
//! from an arbitrary file.
//!
//! The first byte picks a mode: **raw** (the rest is the journal) or **built** (records
//! described through `arbitrary`, written with valid checksums, then damaged as described).
//! An undamaged journal replays to exactly the updates of the records of the epoch above the
//! cursor; any journal leaves one that takes an append and replays it on the next open.
use std::fs;

use arbitrary::{Arbitrary, Unstructured};
use haven_roles::agent::journal::Journal;

const MAGIC: u32 = u32::from_le_bytes(*b"HVJ1");

#[derive(Arbitrary, Debug)]
struct Spec {
    epoch: u32,
    after_seq: u8,
    records: Vec<RecSpec>,
    tail: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct RecSpec {
    other_epoch: Option<u32>,
    seq: u8,
    updates: Vec<(u16, u32, u64)>,
    /// Replaces the count (a lie).
    count: Option<u32>,
    bad_crc: bool,
}

fn record(epoch: u32, r: &RecSpec) -> Vec<u8> {
    let mut rec = Vec::new();
    rec.extend_from_slice(&MAGIC.to_le_bytes());
    rec.extend_from_slice(&r.other_epoch.unwrap_or(epoch).to_le_bytes());
    rec.extend_from_slice(&u64::from(r.seq).to_le_bytes());
    rec.extend_from_slice(&r.count.unwrap_or(r.updates.len() as u32).to_le_bytes());
    for &(d, b, h) in &r.updates {
        rec.extend_from_slice(&d.to_le_bytes());
        rec.extend_from_slice(&b.to_le_bytes());
        rec.extend_from_slice(&h.to_le_bytes());
    }
    let mut crc = crc32c::crc32c(&rec);
    if r.bad_crc {
        crc ^= 1;
    }
    rec.extend_from_slice(&crc.to_le_bytes());
    rec
}

pub fn fuzz(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tmp = crate::tmp::dir();
    let path = tmp.path().join("journal");
    let (epoch, after_seq, expected) = if mode & 1 == 0 {
        fs::write(&path, rest).unwrap();
        (u32::from(mode >> 1), 0, None)
    } else {
        let Ok(spec) = Spec::arbitrary(&mut Unstructured::new(rest)) else {
            return;
        };
        let records = &spec.records[..spec.records.len().min(16)];
        let mut bytes: Vec<u8> = records.iter().flat_map(|r| record(spec.epoch, r)).collect();
        bytes.extend_from_slice(&spec.tail);
        fs::write(&path, &bytes).unwrap();
        let undamaged =
            spec.tail.is_empty() && records.iter().all(|r| r.count.is_none() && !r.bad_crc);
        let want: Vec<(u16, u32, u64)> = records
            .iter()
            .filter(|r| r.other_epoch.is_none_or(|e| e == spec.epoch) && r.seq > spec.after_seq)
            .flat_map(|r| r.updates.iter().copied())
            .collect();
        (
            spec.epoch,
            u64::from(spec.after_seq),
            undamaged.then_some(want),
        )
    };
    let Ok((mut journal, replay)) = Journal::open(&path, epoch, after_seq) else {
        assert!(expected.is_none(), "an undamaged journal did not open");
        return;
    };
    if let Some(want) = expected {
        assert_eq!(replay.updates, want);
        assert_eq!(replay.torn_bytes, 0);
    }
    assert_eq!(journal.bytes(), fs::metadata(&path).unwrap().len());
    // What replay kept plus one more record replays on the next open, with nothing torn.
    let seq = after_seq + 1;
    journal.append(epoch, seq, &[(1, 2, 3)]).expect("append");
    journal.sync().expect("sync");
    drop(journal);
    let (_, again) = Journal::open(&path, epoch, after_seq).expect("reopen");
    assert_eq!(again.torn_bytes, 0);
    assert_eq!(again.updates.last(), Some(&(1, 2, 3)));
    assert_eq!(again.updates.len(), replay.updates.len() + 1);
}

pub fn seeds() -> Vec<Vec<u8>> {
    let rec = |seq: u8, n: u16| RecSpec {
        other_epoch: None,
        seq,
        updates: (0..n)
            .map(|i| (i % 2, u32::from(i), u64::from(i) << 40))
            .collect(),
        count: None,
        bad_crc: false,
    };
    let log = [
        record(1, &rec(1, 3)),
        record(1, &rec(2, 0)),
        record(1, &rec(3, 5)),
    ]
    .concat();
    let mut seeds = vec![
        [vec![2], log.clone()].concat(),
        [vec![2], log[..log.len() - 5].to_vec()].concat(),
        vec![0],
    ];
    for i in 0..8u8 {
        let mut s = vec![1];
        s.extend((0..96).map(|j: u8| j.wrapping_mul(29).wrapping_add(i * 13)));
        seeds.push(s);
    }
    seeds
}
