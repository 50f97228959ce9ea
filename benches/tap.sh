#!/usr/bin/env bash
# haven's tap capture (`haven agent --capture tap`, roles/src/agent/tap.rs) against qemu-nbd,
# same file, same run; then the RPO under sustained random writes through the tap.
#
#   benches/tap.sh                                  # 10 s per job, 60 s RPO phase
#   DURATION=30 ROUNDS=3 RPO_SECS=120 benches/tap.sh
#
# An all-in-one cluster (`haven node`, all roles in one process, on a free 127.0.0.1 UDP port)
# and one agent with `--capture tap` on a preallocated raw file, protected and synced; the
# agent serves the disk as NBD export d0 on <agent data dir>/nbd/d0.sock, and every write
# through it is captured and replicated to <node>/replicas/m1/d0.img. qemu-nbd exports a copy
# of the same file (-f raw --shared=16 -t --cache=writeback --aio=threads, as benches/nbd.sh).
# Client: fio's nbd engine (libnbd), one job, jobs alternating between the two servers
# (qemu-nbd first). After every tap job the bench runs `ctl wait-sync m1`, so the replication
# of one job's writes never competes with the next job; the replication *during* a tap job
# (seal, cache, ship, apply on the same 2 cores) is part of what the tap pays.
#
# Then the RPO phase: fio random writes of 4k–64k through the tap, rate-limited to RPO_RATE
# (20m = 20 MiB/s) for RPO_SECS, while `haven ctl --json status` is sampled every 200 ms
# (start to start) for the machine's `rpo_seconds` (docs/json.md). Finally `wait-sync` and
# `cmp` of the replica against the tap's file: a mismatch fails the bench.
#
# Needs fio, qemu-nbd (qemu-utils), python3, cmp. Builds the release binary unless HAVEN_BIN
# names one; the work dir goes in $BENCH_DIR (default the target dir): ~3 GiB at 1 GiB.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-1}
SIZE_MB=${SIZE_MB:-1024}
RPO_SECS=${RPO_SECS:-60}
RPO_RATE=${RPO_RATE:-20m}
RPO_QD=${RPO_QD:-4}
TARGET=${CARGO_TARGET_DIR:-target}
for t in fio qemu-nbd python3 cmp; do
  command -v "$t" >/dev/null || { echo "benches/tap.sh: $t is missing" >&2; exit 1; }
done
if [ -z "${HAVEN_BIN:-}" ]; then
  cargo build --release -q --bin haven
  HAVEN_BIN=$TARGET/release/haven
fi
HAVEN=$(realpath "$HAVEN_BIN")
work=$(mktemp -d "${BENCH_DIR:-$TARGET}/tap-bench.XXXXXX")
work=$(realpath "$work")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && { echo "kept $work"; return; }
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
echo "tap bench: $(date -u '+%F %T UTC'), commit $(git -C "$OLDPWD" rev-parse --short HEAD), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "  binary $HAVEN; work dir $work; ${SIZE_MB} MiB disk, ${DURATION} s per job, ${ROUNDS} round(s)"

dd if=/dev/zero of=tap.img bs=1M count="$SIZE_MB" conv=fsync status=none
cp --sparse=never tap.img qemu.img
sync qemu.img

port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$HAVEN" node --data-dir node --listen "127.0.0.1:$port" --name n >node.log 2>&1 &
pids+=($!)
for _ in $(seq 300); do [ -s node/agent-token ] && [ -s node/admin-token ] && break; sleep 0.1; done
[ -s node/admin-token ] || { echo "the node did not start:" >&2; tail node.log >&2; exit 1; }
"$HAVEN" agent --join "127.0.0.1:$port" --token-file node/agent-token --data-dir agent \
  --disk d0="$work/tap.img" --name m1 --capture tap >agent.log 2>&1 &
pids+=($!)
ctl() { "$HAVEN" ctl --cluster "127.0.0.1:$port" --token-file node/admin-token --json "$@"; }
for _ in $(seq 300); do ctl machines 2>/dev/null | grep -q '"m1"' && break; sleep 0.1; done
t0=$(date +%s.%N)
ctl protect m1 >/dev/null
ctl wait-sync m1 --timeout 300s >/dev/null
echo "  protected m1 and synced in $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s"
for _ in $(seq 300); do [ -S agent/nbd/d0.sock ] && break; sleep 0.1; done
qemu-nbd -f raw -x d0 -k "$work/qemu.sock" --shared=16 -t --cache=writeback --aio=threads qemu.img &
pids+=($!)
for _ in $(seq 100); do [ -S qemu.sock ] && break; sleep 0.1; done
[ -S qemu.sock ] || { echo "qemu-nbd did not start" >&2; exit 1; }
declare -A sock=([qemu]="$work/qemu.sock" [tap]="$work/agent/nbd/d0.sock")

# name rw bs iodepth
jobs=(
  "randwrite-4k-qd1 randwrite 4k 1"
  "randwrite-4k-qd16 randwrite 4k 16"
  "seqwrite-1m-qd8 write 1m 8"
)
results=$work/results.txt
: > "$results"
for round in $(seq "$ROUNDS"); do
  for j in "${jobs[@]}"; do
    read -r name rw bs qd <<<"$j"
    for s in qemu tap; do
      fio --name="$name" --ioengine=nbd --uri="nbd+unix:///d0?socket=${sock[$s]}" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --size="${SIZE_MB}M" --time_based \
        --runtime="$DURATION" --ramp_time=1 --randrepeat=1 --norandommap \
        --output-format=json --output="$work/out.json" >/dev/null
      python3 - "$work/out.json" "$name" "$s" "$round" >> "$results" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["write"]
p99 = d["clat_ns"]["percentile"]["99.000000"] / 1000
print(sys.argv[2], sys.argv[3], sys.argv[4], round(d["iops"]), round(d["bw_bytes"] / 1e6, 1), round(p99, 1))
PY
      if [ "$s" = tap ]; then
        t=$(date +%s.%N)
        ctl wait-sync m1 --timeout 300s >/dev/null
        echo "  $name round $round: $(tail -n 2 "$results" | tr '\n' ' ')| tap's writes applied $(python3 -c "print(f'{$(date +%s.%N) - $t:.2f}')") s after fio ended; retention-full holds so far: $(grep -c 'retention buffer full' agent.log || true)"
      fi
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
print()
print(f"{'job':20} {'qemu-nbd IOPS':>13} {'tap IOPS':>9} {'ratio':>6} {'qemu MB/s':>9} {'tap MB/s':>9} {'ratio':>6} {'qemu p99us':>10} {'tap p99us':>10} {'ratio':>6}  verdict (>=0.9x IOPS and MB/s, p99 <=1.2x)")
for job in jobs:
    qi, hi = med(job, "qemu", 3), med(job, "tap", 3)
    qb, hb = med(job, "qemu", 4), med(job, "tap", 4)
    ql, hl = med(job, "qemu", 5), med(job, "tap", 5)
    ok = hi / qi >= 0.9 and hb / qb >= 0.9 and hl / ql <= 1.2
    print(f"{job:20} {qi:13.0f} {hi:9.0f} {hi/qi:6.2f} {qb:9.1f} {hb:9.1f} {hb/qb:6.2f} {ql:10.1f} {hl:10.1f} {hl/ql:6.2f}  {'meets' if ok else 'MISSES'}")
PY

# ---- RPO under sustained random writes through the tap
echo
echo "RPO phase: fio randwrite bs 4k-64k, rate $RPO_RATE, QD $RPO_QD, ${RPO_SECS} s through the tap; ctl status every 200 ms"
python3 - "$HAVEN" "$port" "$work" "$RPO_SECS" "$RPO_RATE" "$RPO_QD" "$SIZE_MB" <<'PY'
import json, subprocess, sys, time
haven, port, work, secs, rate, qd, size_mb = sys.argv[1:]
ctl = [haven, "ctl", "--cluster", f"127.0.0.1:{port}", "--token-file", f"{work}/node/admin-token", "--json", "status"]
fio = subprocess.Popen([
    "fio", "--name=rpo", "--ioengine=nbd", f"--uri=nbd+unix:///d0?socket={work}/agent/nbd/d0.sock",
    "--rw=randwrite", "--bsrange=4k-64k", f"--iodepth={qd}", f"--size={size_mb}M", f"--rate={rate}",
    "--time_based", f"--runtime={secs}", "--randrepeat=1", "--norandommap",
    "--output-format=json", f"--output={work}/rpo.json"], stdout=subprocess.DEVNULL)
samples, nulls, states, call_ms = [], 0, {}, []
time.sleep(1.0)  # let fio connect and start writing
next_t = time.monotonic()
while fio.poll() is None:
    t = time.monotonic()
    out = subprocess.run(ctl, capture_output=True, text=True)
    call_ms.append((time.monotonic() - t) * 1000)
    if out.returncode == 0 and fio.poll() is None:
        m = next(x for x in json.loads(out.stdout)["machines"] if x["name"] == "m1")
        states[m["state"]] = states.get(m["state"], 0) + 1
        if m["rpo_seconds"] is None:
            nulls += 1
        else:
            samples.append(m["rpo_seconds"])
    next_t += 0.2
    time.sleep(max(0.0, next_t - time.monotonic()))
    next_t = max(next_t, time.monotonic() - 0.2)
fio.wait()
j = json.load(open(f"{work}/rpo.json"))["jobs"][0]["write"]
def pct(v, p):
    s = sorted(v)
    return s[min(len(s) - 1, max(0, int(-(-p * len(s) // 1)) - 1))] if s else float("nan")
print(f"  fio: {j['bw_bytes'] / 1e6:.1f} MB/s ({j['bw_bytes'] / 2**20:.1f} MiB/s), {j['iops']:.0f} IOPS, "
      f"p99 clat {j['clat_ns']['percentile']['99.000000'] / 1000:.0f} us, max {j['clat_ns']['max'] / 1000:.0f} us")
print(f"  {len(samples)} samples with an rpo ({nulls} null), states {states}; one ctl status call "
      f"p50 {pct(call_ms, 0.5):.0f} ms / max {pct(call_ms, 1.0):.0f} ms")
print(f"  rpo_seconds: p50 {pct(samples, 0.5):.3f} / p90 {pct(samples, 0.9):.3f} / p99 {pct(samples, 0.99):.3f} / "
      f"max {pct(samples, 1.0):.3f}; samples at 0: {sum(1 for x in samples if x == 0)}; target p99 < 1 s: "
      f"{'meets' if samples and pct(samples, 0.99) < 1.0 else 'MISSES'}")
PY

t=$(date +%s.%N)
ctl wait-sync m1 --timeout 300s >/dev/null
echo "  wait-sync after the RPO phase: $(python3 -c "print(f'{$(date +%s.%N) - $t:.2f}')") s"
cmp tap.img node/replicas/m1/d0.img || { echo "REPLICA DIFFERS from the tap's file" >&2; exit 1; }
echo "replica verified byte-identical with cmp; load $(cut -d' ' -f1-3 /proc/loadavg)"
