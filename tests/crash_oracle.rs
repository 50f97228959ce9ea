//! Crash consistency with an oracle. One sequential writer of *traceable* blocks (each 4 KiB
//! block says which block it is, which write made it, and a checksum) writes through the
//! agent's tap and flushes every few writes, recording when each flush was sent and answered.
//! Every flush is a recovery point. For 50 points chosen at random, the view at the point —
//! written out with `ctl test-failover --export` and read over NBD from a test failover — must
//! be *exactly* the disk after the writes that completed before that flush: a prefix of the
//! writer's history ending at a flush, found from the blocks themselves and matched against
//! the flush's time window; and a later point's prefix contains an earlier one's.
mod common;

use std::{
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use common::*;
use haven_testkit::wait_until;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::Value;

const BS: usize = 4096;
const BLOCKS: u64 = 2048; // an 8 MiB disk
const SYNC: Duration = Duration::from_secs(120);
const FLUSHES: usize = 300;
const CHECKED: usize = 50;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Block `b` as write `gen` leaves it: header (block, generation, checksum of both), then a
/// filler derived from them, so a block from another write or another place is recognised.
fn traceable(b: u64, gen: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BS);
    out.extend_from_slice(&b.to_le_bytes());
    out.extend_from_slice(&gen.to_le_bytes());
    out.extend_from_slice(&splitmix(b ^ gen.rotate_left(32)).to_le_bytes());
    let mut x = splitmix(b.wrapping_mul(31) ^ gen);
    while out.len() < BS {
        x = splitmix(x);
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Which write left this block (None: never written, still zero). Panics on a block no write
/// of this test could have produced: a torn, misplaced or corrupted block.
fn generation_of(b: u64, block: &[u8], what: &str) -> Option<u64> {
    if block.iter().all(|&x| x == 0) {
        return None;
    }
    let gen = u64::from_le_bytes(block[8..16].try_into().unwrap());
    assert!(
        block == traceable(b, gen).as_slice(),
        "{what}: block {b} is not a block any write made (header says block {}, write {gen})",
        u64::from_le_bytes(block[0..8].try_into().unwrap())
    );
    Some(gen)
}

#[derive(Debug, Clone, Copy)]
struct Write {
    start: u64,
    blocks: u64,
}

#[derive(Debug, Clone, Copy)]
struct Flush {
    /// Writes completed (acknowledged) before this flush was sent.
    writes_before: usize,
    sent_ms: u64,
    answered_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The sequential writer: a few writes of 1-4 blocks, a flush, again, `flushes` times,
/// pausing `pace` after each flush; `progress` counts the flushes done.
fn write_history(
    uri: &str,
    seed: u64,
    flushes_wanted: usize,
    pace: Duration,
    progress: &AtomicUsize,
) -> (Vec<Write>, Vec<Flush>) {
    let mut c = haven_nbd::Client::connect(uri).expect("connect to the tap");
    assert_eq!(c.size(), BLOCKS * BS as u64);
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut writes, mut flushes) = (vec![], vec![]);
    for _ in 0..flushes_wanted {
        for _ in 0..rng.gen_range(1..=5) {
            let blocks = rng.gen_range(1..=4u64);
            let start = rng.gen_range(0..=BLOCKS - blocks);
            let gen = writes.len() as u64;
            let data: Vec<u8> = (start..start + blocks)
                .flat_map(|b| traceable(b, gen))
                .collect();
            c.write_at(&data, start * BS as u64, false).expect("write");
            writes.push(Write { start, blocks });
        }
        let sent_ms = now_ms();
        c.flush().expect("flush");
        flushes.push(Flush {
            writes_before: writes.len(),
            sent_ms,
            answered_ms: now_ms(),
        });
        progress.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(pace);
    }
    c.disconnect().unwrap();
    (writes, flushes)
}

/// The disk after the first `k` writes, as the generation of each block.
fn state_after(writes: &[Write], k: usize) -> Vec<Option<u64>> {
    let mut s = vec![None; BLOCKS as usize];
    for (gen, w) in writes[..k].iter().enumerate() {
        for b in w.start..w.start + w.blocks {
            s[b as usize] = Some(gen as u64);
        }
    }
    s
}

/// Checks an image of the view at `point` against the history; returns its prefix length.
fn check_view(
    image: &[u8],
    point: &Value,
    writes: &[Write],
    flushes: &[Flush],
    what: &str,
) -> usize {
    assert_eq!(image.len(), BLOCKS as usize * BS, "{what}: size");
    let gens: Vec<Option<u64>> = (0..BLOCKS)
        .map(|b| generation_of(b, &image[b as usize * BS..(b as usize + 1) * BS], what))
        .collect();
    // The newest write seen says how long the prefix is; the view must be exactly it.
    let k = gens
        .iter()
        .flatten()
        .max()
        .map(|g| *g as usize + 1)
        .unwrap_or(0);
    let expected = state_after(writes, k);
    if let Some(b) = (0..BLOCKS as usize).find(|&b| gens[b] != expected[b]) {
        panic!(
            "{what}: the view at point {point} is not a prefix of the writes: block {b} holds \
             write {:?}, the first {k} writes leave write {:?}",
            gens[b], expected[b]
        );
    }
    // The prefix ends at a flush, and at the flush whose time window holds the point's time.
    let t = point["time_ms"].as_u64().unwrap();
    let matching: Vec<&Flush> = flushes.iter().filter(|f| f.writes_before == k).collect();
    assert!(
        !matching.is_empty(),
        "{what}: point {point} holds the first {k} writes, which does not end at a flush"
    );
    assert!(
        matching
            .iter()
            .any(|f| f.sent_ms <= t && t <= f.answered_ms + 1),
        "{what}: point {point} holds the writes before a flush sent/answered at {:?}, not at its time",
        matching
            .iter()
            .map(|f| (f.sent_ms, f.answered_ms))
            .collect::<Vec<_>>()
    );
    k
}

/// A cluster with a tap agent `m1` on a zeroed disk, protected so that only flushes make
/// points and history is never cut, initial sync done. Returns the tap's URI.
fn protected_tap(c: &mut Cluster) -> (std::path::PathBuf, String) {
    let disk = c.path("d0.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(BLOCKS * BS as u64)
        .unwrap();
    c.start_tap_agent("m1", &disk, &[]);
    c.ctl(&[
        "protect",
        "m1",
        "--point-every",
        "1h",
        "--journal-size",
        "1GiB",
    ]);
    c.wait_sync("m1", SYNC);
    let uri = c.tap_uri("m1", "d0");
    (disk, uri)
}

/// The points made since `since_ms`: one per flush and nothing else, all crash-consistent.
fn flush_points(c: &Cluster, since_ms: u64, flushes: &[Flush]) -> Vec<Value> {
    let listed = c.ctl(&["recovery-points", "m1"]);
    let points: Vec<Value> = listed["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["time_ms"].as_u64().unwrap() >= since_ms)
        .cloned()
        .collect();
    assert_eq!(
        points.len(),
        flushes.len(),
        "one point per flush: {} points",
        points.len()
    );
    assert!(
        points.iter().all(|p| p["kind"] == "crash"),
        "every flush point is crash-consistent"
    );
    points
}

/// Reads a whole NBD export.
fn read_all(uri: &str) -> Vec<u8> {
    let mut v = haven_nbd::Client::connect(uri).expect("connect to the view");
    let mut out = vec![0u8; v.size() as usize];
    v.read_at(&mut out, 0).unwrap();
    v.disconnect().unwrap();
    out
}

/// The view of `point` via `--export` and via a test failover over NBD (then cleaned):
/// both equal, and exactly a flush-ended prefix of the history. Returns its length.
fn check_point(c: &Cluster, p: &Value, writes: &[Write], flushes: &[Flush]) -> usize {
    let id = p["point"].as_str().unwrap();
    let dir = c.path("export");
    let out = c.ctl(&[
        "test-failover",
        "m1",
        "--point",
        id,
        "--export",
        dir.to_str().unwrap(),
    ]);
    let img = out["disks"][0]["image"].as_str().unwrap().to_string();
    let exported = std::fs::read(Path::new(&img)).unwrap();
    let k = check_view(&exported, p, writes, flushes, "--export");
    let drill = c.ctl(&["test-failover", "m1", "--point", id]);
    let served = read_all(drill["disks"][0]["nbd_uri"].as_str().unwrap());
    assert!(
        served == exported,
        "point {id}: the NBD view and the exported image differ"
    );
    let cleaned = c.ctl(&["test-failover-cleanup", "m1"]);
    assert_eq!(cleaned["overlay_bytes"].as_u64(), Some(0), "{cleaned}");
    k
}

/// `n` of `0..len` chosen at random, in order.
fn choose(len: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut all: Vec<usize> = (0..len).collect();
    for i in 0..n.min(len) {
        let j = rng.gen_range(i..all.len());
        all.swap(i, j);
    }
    all.truncate(n);
    all.sort_unstable();
    all
}

#[test]
fn fifty_random_points_each_hold_exactly_the_writes_before_their_flush() {
    let mut c = Cluster::new();
    c.start_config(&[], vec![]);
    let (disk, uri) = protected_tap(&mut c);

    phase("a traceable sequential writer: 300 flushes through the tap");
    let started_ms = now_ms();
    let (writes, flushes) = write_history(&uri, 7, FLUSHES, Duration::ZERO, &AtomicUsize::new(0));
    eprintln!("{} writes, {} flushes", writes.len(), flushes.len());
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("config", "m1", "d0"));
    let points = flush_points(&c, started_ms, &flushes);

    phase("50 random points: --export and an NBD view each hold exactly their prefix");
    let prefixes: Vec<usize> = choose(points.len(), CHECKED, 8)
        .into_iter()
        .map(|i| check_point(&c, &points[i], &writes, &flushes))
        .collect();
    // Later points contain earlier ones: the prefixes grow with the points.
    assert!(
        prefixes.windows(2).all(|w| w[0] < w[1]),
        "prefixes of later points are longer: {prefixes:?}"
    );
    // The newest point is the disk as the writer left it: every write.
    let last = check_point(&c, points.last().unwrap(), &writes, &flushes);
    assert_eq!(last, writes.len());
    c.assert_no_unexpected_errors(&[]);
}

#[test]
fn sigkill_of_the_process_server_and_the_master_target_during_tap_writes_and_a_drill() {
    let mut c = Cluster::new();
    c.start_config(&["configuration"], vec![]);
    c.start_node("ps1", &["process"], vec![]);
    c.start_node("mt1", &["master-target"], vec![]);
    let (disk, uri) = protected_tap(&mut c);

    let started_ms = now_ms();
    let progress = std::sync::Arc::new(AtomicUsize::new(0));
    let writer = {
        let (uri, progress) = (uri.clone(), progress.clone());
        std::thread::spawn(move || {
            write_history(&uri, 9, 400, Duration::from_millis(15), &progress)
        })
    };
    let reach = |n: usize| {
        wait_until(
            &format!("the writer at {n} flushes"),
            Duration::from_secs(60),
            || (progress.load(Ordering::Relaxed) >= n).then_some(()),
        )
    };
    phase("SIGKILL of the process server while the tap is written; it comes back");
    reach(60);
    c.kill("ps1");
    reach(100); // writes and flushes go on: the tap keeps them until they are applied
    c.restart("ps1");

    phase("a drill of the newest point, then SIGKILL of the master target during it");
    reach(180);
    let listed = c.ctl(&["recovery-points", "m1"]);
    let p = listed["points"].as_array().unwrap().last().unwrap().clone();
    let id = p["point"].as_str().unwrap().to_string();
    let drill = c.ctl(&["test-failover", "m1", "--point", &id]);
    let view_uri = drill["disks"][0]["nbd_uri"].as_str().unwrap().to_string();
    let before = read_all(&view_uri);
    c.kill("mt1");
    reach(240);
    c.restart("mt1");
    wait_until("the drill served again", Duration::from_secs(60), || {
        let m = c.machine("m1")?;
        (m["test_failover"] == id.as_str()).then_some(())
    });
    let after = read_all(&view_uri);
    assert!(
        before == after,
        "the drill's view of point {id} changed across the master target's SIGKILL"
    );

    let (writes, flushes) = writer.join().unwrap();
    eprintln!("{} writes, {} flushes", writes.len(), flushes.len());
    check_view(&before, &p, &writes, &flushes, "drill across the kill");
    let cleaned = c.ctl(&["test-failover-cleanup", "m1"]);
    assert_eq!(cleaned["overlay_bytes"].as_u64(), Some(0), "{cleaned}");

    phase("nothing lost: the replica is the disk, every flush is one point, points are exact");
    c.wait_sync("m1", SYNC);
    c.assert_replica("m1", &disk, &c.replica("mt1", "m1", "d0"));
    let points = flush_points(&c, started_ms, &flushes);
    let prefixes: Vec<usize> = choose(points.len() - 1, 12, 10)
        .into_iter()
        .chain([points.len() - 1])
        .map(|i| check_point(&c, &points[i], &writes, &flushes))
        .collect();
    assert!(
        prefixes.windows(2).all(|w| w[0] < w[1]),
        "prefixes of later points are longer: {prefixes:?}"
    );
    assert_eq!(*prefixes.last().unwrap(), writes.len());
}
