//! Seal/open throughput on 4 MiB batches of disk-like mixed data, with same-run baselines
//! (memcpy, zstd alone, XChaCha20-Poly1305 alone) so results read as ratios.
//!
//! `cargo bench --bench seal`
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use haven_testkit::mixed_disk_data;
use haven_transport::seal::{self, bench_hooks, DataKey, SealContext};

const BATCH: usize = 4 << 20;

fn bench_seal(c: &mut Criterion) {
    let data = mixed_disk_data(BATCH, 42);
    let key = DataKey::from_bytes([0x5a; 32]);
    let ctx = SealContext {
        machine: "bench-machine",
        epoch: 1,
        first_seq: 1_000,
        last_seq: 1_999,
    };
    let frame = bench_hooks::compress(&data, 1);
    let sealed = seal::seal(&key, &ctx, &data).unwrap();
    eprintln!(
        "mixed data: {} bytes -> zstd-1 {} bytes (ratio {:.2}); sealed {} bytes",
        data.len(),
        frame.len(),
        data.len() as f64 / frame.len() as f64,
        sealed.ciphertext.len()
    );
    for level in [-1, 3] {
        let f = bench_hooks::compress(&data, level);
        eprintln!(
            "  zstd level {level}: ratio {:.2}",
            data.len() as f64 / f.len() as f64
        );
    }

    let mut g = c.benchmark_group("seal_4MiB_mixed");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(BATCH as u64));

    let mut dst = vec![0u8; BATCH];
    g.bench_function("baseline_memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&data));
            black_box(&dst);
        })
    });
    g.bench_function("baseline_zstd1_compress", |b| {
        b.iter(|| black_box(bench_hooks::compress(black_box(&data), 1)))
    });
    let mut buf = data.clone();
    g.bench_function("baseline_xchacha_encrypt_raw", |b| {
        b.iter(|| {
            black_box(bench_hooks::encrypt_in_place(
                &key,
                &ctx,
                black_box(&mut buf),
            ))
        })
    });
    g.bench_function("seal_level1", |b| {
        b.iter(|| black_box(seal::seal(&key, &ctx, black_box(&data)).unwrap()))
    });
    g.bench_function("seal_level-1", |b| {
        b.iter(|| black_box(seal::seal_with_level(&key, &ctx, black_box(&data), -1).unwrap()))
    });
    g.bench_function("baseline_zstd_decompress", |b| {
        b.iter(|| black_box(bench_hooks::decompress(black_box(&frame), BATCH)))
    });
    g.bench_function("open", |b| {
        b.iter(|| black_box(seal::open(&key, &ctx, black_box(&sealed)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench_seal);
criterion_main!(benches);
