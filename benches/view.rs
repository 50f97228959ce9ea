//! Recovery-point views and the journal's cost, at the master target's replica (no cluster:
//! the clock is injected, so an hour of history takes seconds to build).
//!
//! 1. **Time to the first byte of a test failover of a point an hour old**, on a 1 GiB and a
//!    10 GiB disk with the same history: an hour of one batch per second (16 random 4 KiB
//!    writes into a 256 MiB working set, then a point), then for the oldest, a 30-minute-old
//!    and the newest point: `Replica::view`, the drill's copy-on-write overlay
//!    (`CowDisk::open`), an NBD server on a unix socket, a client's handshake and its first
//!    4 KiB read — what `ctl test-failover` does after its request reaches the master target.
//!    The first reads are checked against the working set as it was at the point.
//! 2. **Apply throughput with the journal on vs off**: 1 MiB batches of 64 KiB writes that
//!    overwrite data (every before-image carries data), applied and committed, with history
//!    kept (default retention) vs pruned to nothing after every commit; and a same-run
//!    baseline of the bare writes (pwrite + fdatasync per batch, no before-images).
//!
//! `cargo bench --bench view` (env: `HAVEN_BENCH_DIR`, default a temp dir under /tmp;
//! `HAVEN_BENCH_SECONDS` of history, default 3600).
use std::{
    os::unix::fs::FileExt,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use haven_cluster::DiskInfo;
use haven_roles::master_target::{
    drill::{CowDisk, DiskView},
    replica::{Replica, RetentionPolicy},
};
use haven_roles::proto::{BatchBody, PointKind, PointMark, WriteRecord};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_bytes::ByteBuf;

const GIB: u64 = 1 << 30;
const HOT: u64 = 256 << 20;
const T0: u64 = 1_700_000_000_000;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn prefill_byte(off: u64) -> u8 {
    ((off / 4096) as u8).wrapping_mul(37) | 1
}

/// Writes `records` as one batch at `now_ms`, with a point after them when `point`.
fn batch(seq: &mut u64, writes: Vec<(u64, Vec<u8>)>, point: Option<u64>) -> (u64, u64, BatchBody) {
    let first = *seq;
    let mut body = BatchBody {
        disk_sizes: vec![],
        points: vec![],
        records: vec![],
    };
    for (offset, data) in writes {
        body.records.push(WriteRecord {
            seq: *seq,
            disk: 0,
            offset,
            data: ByteBuf::from(data),
        });
        *seq += 1;
    }
    if let Some(time_ms) = point {
        body.records.push(WriteRecord {
            seq: *seq,
            disk: 0,
            offset: 0,
            data: ByteBuf::new(),
        });
        body.points.push(PointMark {
            seq: *seq,
            time_ms,
            kind: PointKind::Crash,
            name: None,
        });
        *seq += 1;
    }
    (first, *seq - 1, body)
}

/// A replica of `size` with the working set filled, then `seconds` of history.
fn build(dir: &Path, size: u64, seconds: u64) -> Res<Replica> {
    let mut r = Replica::open(dir, "m", 1, &[DiskInfo::new("d0", size)])?;
    let mut seq = 1;
    for mib in 0..HOT >> 20 {
        let off = mib << 20;
        let data: Vec<u8> = (0..1u64 << 20).map(|i| prefill_byte(off + i)).collect();
        let (a, b, body) = batch(&mut seq, vec![(off, data)], None);
        r.apply(1, a, b, &body, T0)?;
    }
    let (a, b, body) = batch(&mut seq, vec![], Some(T0));
    r.apply(1, a, b, &body, T0)?;
    r.commit()?;
    let mut rng = StdRng::seed_from_u64(1);
    for s in 1..=seconds {
        let now = T0 + s * 1000;
        let writes = (0..16)
            .map(|_| {
                let off = rng.gen_range(0..HOT / 4096) * 4096;
                let mut d = vec![0u8; 4096];
                rng.fill(&mut d[..]);
                (off, d)
            })
            .collect();
        let (a, b, body) = batch(&mut seq, writes, Some(now));
        r.apply(1, a, b, &body, now)?;
        if s % 10 == 0 {
            r.commit()?;
        }
    }
    r.commit()?;
    Ok(r)
}

/// Checks bytes a drill read at an offset.
type Check = dyn Fn(u64, &[u8]);

struct Ttfb {
    view: Duration,
    overlay: Duration,
    first_byte: Duration,
}

/// The drill path for the point at `seq`: view, overlay, NBD server, client, first read.
fn drill_first_byte(
    rt: &tokio::runtime::Runtime,
    r: &Replica,
    seq: u64,
    dir: &Path,
    check: Option<&Check>,
) -> Res<Ttfb> {
    let t = Instant::now();
    let view: Arc<dyn DiskView> = Arc::new(r.view(seq)?);
    let view_t = t.elapsed();
    let ddir = dir.join(format!("drill-{seq}"));
    std::fs::create_dir_all(&ddir)?;
    let cow = CowDisk::open(view, 0, &ddir, "d0")?;
    let overlay_t = t.elapsed() - view_t;
    let exports = Arc::new(haven_nbd::Exports::new());
    exports.insert("d0", Arc::new(cow));
    let sock = ddir.join("d0.sock");
    let handle = rt.block_on(haven_nbd::Server::new(exports).serve_unix(&sock))?;
    let uri = format!("nbd+unix:///d0?socket={}", sock.display());
    let mut c = haven_nbd::Client::connect(&uri)?;
    let mut buf = vec![0u8; 4096];
    c.read_at(&mut buf, 0)?;
    let first = t.elapsed();
    if let Some(check) = check {
        check(0, &buf);
        let mut more = vec![0u8; 1 << 20];
        c.read_at(&mut more, HOT / 2)?;
        check(HOT / 2, &more);
    }
    c.disconnect()?;
    rt.block_on(handle.shutdown());
    std::fs::remove_dir_all(&ddir)?;
    Ok(Ttfb {
        view: view_t,
        overlay: overlay_t,
        first_byte: first,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ttfb(root: &Path, seconds: u64) -> Res<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!("## time to the first byte of a drill ({seconds} s of history, 16 x 4 KiB writes + a point per second)");
    println!(
        "| disk | build | point age | records after it | view | overlay | first byte (total) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for size in [GIB, 10 * GIB] {
        let dir = root.join(format!("ttfb-{}g", size / GIB));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let t = Instant::now();
        let r = build(&dir, size, seconds)?;
        let built = t.elapsed();
        let points = r.points();
        let oldest = points.first().ok_or("no points")?.seq;
        let mid = points[points.len() / 2].seq;
        let newest = points.last().ok_or("no points")?.seq;
        let applied = newest;
        // The oldest point is the working set as prefilled: check what the drill reads.
        let check = |off: u64, buf: &[u8]| {
            for (i, b) in buf.iter().enumerate() {
                assert_eq!(
                    *b,
                    prefill_byte(off + i as u64),
                    "view of the oldest point at {}",
                    off + i as u64
                );
            }
        };
        for (label, seq, chk) in [
            ("1 h", oldest, Some(&check as &Check)),
            ("30 min", mid, None),
            ("newest", newest, None),
        ] {
            let label = if seconds != 3600 && label != "newest" {
                format!("{label} (scaled)")
            } else {
                label.to_string()
            };
            let m = drill_first_byte(&rt, &r, seq, &dir, chk)?;
            println!(
                "| {} GiB | {:.0} s | {label} | {} | {:.1} ms | {:.1} ms | **{:.1} ms** |",
                size / GIB,
                built.as_secs_f64(),
                applied - seq,
                ms(m.view),
                ms(m.overlay),
                ms(m.first_byte)
            );
        }
        drop(r);
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// MB/s of applying `batches` 1 MiB batches (16 x 64 KiB overwrites each) and committing
/// every 4, with history kept (`keep`) or pruned to nothing after each commit.
fn apply_rate(dir: &Path, keep: bool, batches: u64) -> Res<f64> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let size = 1 << 30;
    let mut r = Replica::open(dir, "m", 1, &[DiskInfo::new("d0", size)])?;
    let mut seq = 1;
    // Data to overwrite: the first 256 MiB.
    for mib in 0..256u64 {
        let (a, b, body) = batch(&mut seq, vec![(mib << 20, vec![0x11; 1 << 20])], None);
        r.apply(1, a, b, &body, T0)?;
    }
    r.commit()?;
    r.prune(
        T0,
        &RetentionPolicy {
            retention_ms: 0,
            cap_bytes: 0,
        },
    )?;
    let policy = if keep {
        r.default_policy()
    } else {
        RetentionPolicy {
            retention_ms: 0,
            cap_bytes: 0,
        }
    };
    let mut rng = StdRng::seed_from_u64(2);
    let data = vec![0x77u8; 64 << 10];
    let t = Instant::now();
    for i in 0..batches {
        let writes = (0..16)
            .map(|_| {
                (
                    rng.gen_range(0..(256u64 << 20) / (64 << 10)) * (64 << 10),
                    data.clone(),
                )
            })
            .collect();
        let now = T0 + 1000 + i;
        let (a, b, body) = batch(&mut seq, writes, Some(now));
        r.apply(1, a, b, &body, now)?;
        if i % 4 == 3 {
            r.commit()?;
            if !keep {
                r.prune(now, &policy)?;
            }
        }
    }
    r.commit()?;
    let secs = t.elapsed().as_secs_f64();
    drop(r);
    std::fs::remove_dir_all(dir)?;
    Ok((batches << 20) as f64 / secs / 1e6)
}

/// The same writes without any journal: pwrite of each, fdatasync per batch.
fn bare_rate(dir: &Path, batches: u64) -> Res<f64> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.join("d0.img"))?;
    f.set_len(1 << 30)?;
    for mib in 0..256u64 {
        f.write_all_at(&vec![0x11; 1 << 20], mib << 20)?;
    }
    f.sync_data()?;
    let mut rng = StdRng::seed_from_u64(2);
    let data = vec![0x77u8; 64 << 10];
    let t = Instant::now();
    for _ in 0..batches {
        for _ in 0..16 {
            let off = rng.gen_range(0..(256u64 << 20) / (64 << 10)) * (64 << 10);
            f.write_all_at(&data, off)?;
        }
        f.sync_data()?;
    }
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir)?;
    Ok((batches << 20) as f64 / secs / 1e6)
}

fn journal_cost(root: &Path) -> Res<()> {
    println!();
    println!("## apply throughput, journal on vs off (1 MiB batches of 16 x 64 KiB overwrites, 512 MiB per run)");
    println!("| round | bare pwrite+fdatasync MB/s | journal off (pruned each commit) MB/s | journal on (history kept) MB/s | **on / off** | on / bare |");
    println!("|---|---|---|---|---|---|");
    for round in 1..=3 {
        let bare = bare_rate(&root.join("bare"), 512)?;
        let off = apply_rate(&root.join("off"), false, 512)?;
        let on = apply_rate(&root.join("on"), true, 512)?;
        println!(
            "| {round} | {bare:.0} | {off:.0} | {on:.0} | **{:.2}** | {:.2} |",
            on / off,
            on / bare
        );
    }
    Ok(())
}

fn main() -> Res<()> {
    // `cargo test --benches` runs bench binaries with --bench absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let root = match std::env::var_os("HAVEN_BENCH_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::temp_dir().join(format!("haven-bench-view-{}", std::process::id())),
    };
    std::fs::create_dir_all(&root)?;
    let seconds = std::env::var("HAVEN_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3600);
    ttfb(&root, seconds)?;
    journal_cost(&root)?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
