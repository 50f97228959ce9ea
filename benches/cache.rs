//! Cache append + group-commit throughput with 4 MiB payloads, syncing every 4 MiB and every
//! 16 MiB, against a same-run baseline of plain `write_all` + `sync_data` of the same sizes.
//!
//! Runs in `$HAVEN_BENCH_DIR` if set, else under `target/tmp` (a real disk: a tmpfs would make
//! fsync free). `cargo bench --bench cache`
use std::fs::File;
use std::hint::black_box;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use haven_storage::cache::{CacheOptions, MachineCache};
use haven_testkit::Rng;

const PAYLOAD: usize = 4 << 20;
/// Bytes written per timed iteration.
const PER_ITER: usize = 64 << 20;

fn bench_root() -> tempfile::TempDir {
    let base = std::env::var_os("HAVEN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

fn bench_cache(c: &mut Criterion) {
    let root = bench_root();
    eprintln!("cache bench directory: {}", root.path().display());
    let mut payload = vec![0u8; PAYLOAD];
    Rng::new(7).fill(&mut payload); // sealed batches look random

    let mut g = c.benchmark_group("cache_append_sync_4MiB");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(PER_ITER as u64));

    for sync_every in [4usize << 20, 16 << 20] {
        let per_sync = sync_every / PAYLOAD;
        let label = sync_every >> 20;

        // The cache in steady state: segments roll every 64 MiB; trimming is untimed.
        let dir = root.path().join(format!("cache-{label}"));
        let (mut cache, _) = MachineCache::open(&dir, CacheOptions::default()).unwrap();
        let mut seq = 0u64;
        g.bench_function(format!("cache_sync_every_{label}MiB"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    for i in 0..PER_ITER / PAYLOAD {
                        cache
                            .append(seq + 1, seq + 1000, black_box(&payload))
                            .unwrap();
                        seq += 1000;
                        if (i + 1) % per_sync == 0 {
                            cache.sync().unwrap();
                        }
                    }
                    total += t.elapsed();
                    cache.trim(seq).unwrap();
                }
                total
            })
        });
        drop(cache);

        // Baseline: a fresh file per 64 MiB (like a segment), write_all + sync_data.
        let bdir = root.path().join(format!("plain-{label}"));
        std::fs::create_dir_all(&bdir).unwrap();
        let mut n = 0u64;
        g.bench_function(format!("baseline_file_sync_every_{label}MiB"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let path = bdir.join(format!("f{n}"));
                    let t = Instant::now();
                    let mut f = File::create(&path).unwrap();
                    for i in 0..PER_ITER / PAYLOAD {
                        f.write_all(black_box(&payload)).unwrap();
                        if (i + 1) % per_sync == 0 {
                            f.sync_data().unwrap();
                        }
                    }
                    total += t.elapsed();
                    drop(f);
                    std::fs::remove_file(&path).unwrap();
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_cache);
criterion_main!(benches);
