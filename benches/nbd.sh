#!/usr/bin/env bash
# haven-nbd (FileBackend, nbd/examples/serve_file.rs) against qemu-nbd, same file, same run.
#
#   benches/nbd.sh                 # 10 s per job
#   DURATION=30 ROUNDS=3 benches/nbd.sh
#
# Both servers export the same preallocated raw file through the page cache (qemu-nbd
# --cache=writeback --aio=threads, its defaults; FileBackend pread/pwrite on tokio's blocking
# pool) on a unix socket; fio's nbd engine (libnbd) is the client. Jobs alternate between the
# servers. Prints IOPS, MB/s and p99 completion latency per job, and haven/qemu-nbd ratios.
# Needs fio, qemu-nbd (qemu-utils), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-1}
SIZE_MB=${SIZE_MB:-1024}
TARGET=${CARGO_TARGET_DIR:-target}
for t in fio qemu-nbd python3; do
  command -v "$t" >/dev/null || { echo "benches/nbd.sh: $t is missing" >&2; exit 1; }
done
cargo build --release -q -p haven-nbd --example serve_file
work=$(mktemp -d "${BENCH_DIR:-$TARGET}/nbd-bench.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
img=$work/disk.img
dd if=/dev/zero of="$img" bs=1M count="$SIZE_MB" conv=fsync status=none

qemu-nbd -f raw -x bench -k "$work/qemu.sock" --shared=16 -t --cache=writeback --aio=threads "$img" &
pids+=($!)
"$TARGET/release/examples/serve_file" "$img" bench "$work/haven.sock" >/dev/null &
pids+=($!)
for s in qemu haven; do
  for _ in $(seq 100); do [ -S "$work/$s.sock" ] && break; sleep 0.1; done
  [ -S "$work/$s.sock" ] || { echo "$s server did not start" >&2; exit 1; }
done

# name rw bs iodepth
jobs=(
  "randwrite-4k-qd1 randwrite 4k 1"
  "randwrite-4k-qd16 randwrite 4k 16"
  "randread-4k-qd1 randread 4k 1"
  "randread-4k-qd16 randread 4k 16"
  "seqwrite-1m-qd8 write 1m 8"
)
results=$work/results.txt
: > "$results"
for round in $(seq "$ROUNDS"); do
  for j in "${jobs[@]}"; do
    read -r name rw bs qd <<<"$j"
    for s in qemu haven; do
      fio --name="$name" --ioengine=nbd --uri="nbd+unix:///bench?socket=$work/$s.sock" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --size="${SIZE_MB}M" --time_based \
        --runtime="$DURATION" --ramp_time=1 --randrepeat=1 --norandommap \
        --output-format=json --output="$work/out.json" >/dev/null
      python3 - "$work/out.json" "$name" "$s" "$round" >> "$results" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
p99 = d["clat_ns"]["percentile"]["99.000000"] / 1000
print(sys.argv[2], sys.argv[3], sys.argv[4], round(d["iops"]), round(d["bw_bytes"] / 1e6, 1), round(p99, 1))
PY
    done
  done
done

python3 - "$results" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
jobs = []
for r in rows:
    if r[0] not in jobs: jobs.append(r[0])
def med(job, srv, col):
    return statistics.median(float(r[col]) for r in rows if r[0] == job and r[1] == srv)
print(f"{'job':20} {'qemu-nbd IOPS':>13} {'haven IOPS':>10} {'ratio':>6} {'qemu MB/s':>9} {'haven MB/s':>10} {'ratio':>6} {'qemu p99us':>10} {'haven p99us':>11} {'ratio':>6}")
for job in jobs:
    qi, hi = med(job, "qemu", 3), med(job, "haven", 3)
    qb, hb = med(job, "qemu", 4), med(job, "haven", 4)
    ql, hl = med(job, "qemu", 5), med(job, "haven", 5)
    print(f"{job:20} {qi:13.0f} {hi:10.0f} {hi/qi:6.2f} {qb:9.1f} {hb:10.1f} {hb/qb:6.2f} {ql:10.1f} {hl:11.1f} {hl/ql:6.2f}")
PY
