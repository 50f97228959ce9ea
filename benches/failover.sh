#!/usr/bin/env bash
# RTO of `ctl failover`: from the command to a writable NBD export at the recovery site, for
# disks of different sizes and points of different ages, each failover cancelled before the
# next (the replica is only read, so every run sees the same replica).
#
#   benches/failover.sh                       # 1 GiB and 10 GiB, history of HISTORY_SECS
#   SIZES_MB="1024 10240" HISTORY_SECS=60 ROUNDS=3 benches/failover.sh
#
# Per size: an all-in-one node and an agent with `--capture tap` on a sparse raw file,
# protected and synced; then HISTORY_SECS of writes through the tap (qemu-io: 16 random
# 4 KiB writes and a flush every second, so a crash-consistent point per second). Then, for
# the oldest point held, the one in the middle and the newest, ROUNDS times each:
# `ctl --json failover m1 --point ID` (unplanned: a point id never waits for the source), the
# wall-clock time of the command (connect, request, the master target fencing and serving,
# the poll that sees it served), the master target's own `serve_ms`, and a first 4 KiB read
# through the export with qemu-io; then `ctl failover-cancel m1` and wait until the tap takes
# writes again. Last, a planned `ctl failover m1` (latest: the tap goes read-only, its final
# point is made and applied first) and its cancel. The target (issue 9): RTO < 5 s, flat in
# disk size and in the point's age.
#
# Needs qemu-io (qemu-utils), python3. Builds the release binary unless HAVEN_BIN names one;
# the work dir goes in $BENCH_DIR (default the target dir): about twice the largest size.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES_MB=${SIZES_MB:-1024 10240}
HISTORY_SECS=${HISTORY_SECS:-60}
ROUNDS=${ROUNDS:-3}
source benches/common.sh
bench_setup failover qemu-io python3
root=$work  # the per-size dirs go under it; the whole of it is removed at exit
echo "failover bench: $(date -u '+%F %T UTC'), commit $(git rev-parse --short HEAD), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "  binary $HAVEN; sizes ${SIZES_MB} MiB; ${HISTORY_SECS} s of history; ${ROUNDS} round(s) per point"
results=$root/results.txt
: > "$results"

for size in $SIZES_MB; do
  dir=$root/$size
  mkdir -p "$dir"
  cd "$dir"
  truncate -s "${size}M" disk.img
  port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$HAVEN" node --data-dir node --listen "127.0.0.1:$port" --name n --site dr >node.log 2>&1 &
  node_pid=$!
  pids+=($node_pid)
  for _ in $(seq 300); do [ -s node/admin-token ] && break; sleep 0.1; done
  "$HAVEN" agent --join "127.0.0.1:$port" --token-file node/agent-token --data-dir agent \
    --disk d0="$dir/disk.img" --name m1 --capture tap >agent.log 2>&1 &
  agent_pid=$!
  pids+=($agent_pid)
  ctl() { "$HAVEN" ctl --cluster "127.0.0.1:$port" --token-file node/admin-token --json "$@"; }
  for _ in $(seq 300); do ctl machines 2>/dev/null | grep -q '"m1"' && break; sleep 0.1; done
  t0=$(now)
  ctl protect m1 >/dev/null
  ctl wait-sync m1 --timeout 900s >/dev/null
  echo "  ${size} MiB: protected and synced in $(since "$t0") s"
  tap="nbd+unix:///d0?socket=$dir/agent/nbd/d0.sock"
  for _ in $(seq 300); do [ -S agent/nbd/d0.sock ] && break; sleep 0.1; done
  python3 - "$tap" "$HISTORY_SECS" "$size" <<'PY'
import random, subprocess, sys, time
uri, secs, size_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(9)
end = time.monotonic() + secs
while time.monotonic() < end:
    t = time.monotonic()
    cmds = []
    for _ in range(16):
        off = rng.randrange(0, min(size_mb, 256) * 256) * 4096
        cmds += ["-c", f"write -P {rng.randrange(1, 255)} {off} 4k"]
    subprocess.run(["qemu-io", "-f", "raw", *cmds, "-c", "flush", uri], check=True, stdout=subprocess.DEVNULL)
    time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
PY
  ctl wait-sync m1 --timeout 300s >/dev/null
  ctl recovery-points m1 > points.json
  read -r oldest middle newest count <<<"$(python3 -c "
import json; p = json.load(open('points.json'))['points']
print(p[0]['point'], p[len(p)//2]['point'], p[-1]['point'], len(p))")"
  echo "  ${size} MiB: ${count} points held; oldest ${oldest}, middle ${middle}, newest ${newest}"
  run() { # label, failover args...
    local label=$1; shift
    local t
    t=$(now)
    ctl failover m1 "$@" --timeout 60s > fo.json
    local rto
    rto=$(since "$t")
    local uri serve age
    read -r uri serve age <<<"$(python3 -c "
import json, time; f = json.load(open('fo.json'))
print(f['disks'][0]['nbd_uri'], f['serve_ms'], round(time.time() - f['point']['time_ms'] / 1000))")"
    t=$(now)
    qemu-io -f raw -r -c "read 0 4k" "$uri" >/dev/null
    local first
    first=$(since "$t")
    echo "$size $label $rto $serve $first $age" >> "$results"
    ctl failover-cancel m1 >/dev/null
    # Back to protected: the tap takes writes again (the agent's next poll).
    for _ in $(seq 200); do qemu-io -f raw -c "write -P 7 0 4k" "$tap" >/dev/null 2>&1 && break; sleep 0.1; done
    ctl wait-sync m1 --timeout 120s >/dev/null
  }
  for r in $(seq "$ROUNDS"); do
    run oldest --point "$oldest"
    run middle --point "$middle"
    run newest --point "$newest"
  done
  run planned-latest
  kill "$agent_pid" "$node_pid" 2>/dev/null || true
  wait "$agent_pid" "$node_pid" 2>/dev/null || true
  cd "$root"
done

python3 - "$results" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
print()
print(f"{'disk':>8} {'point':>15} {'age s':>6} {'RTO s (median)':>15} {'max':>6} {'MT serve ms':>12} {'1st read s':>10}  verdict (RTO < 5 s)")
keys = []
for r in rows:
    if (r[0], r[1]) not in keys: keys.append((r[0], r[1]))
for size, label in keys:
    rs = [r for r in rows if r[0] == size and r[1] == label]
    rto = [float(r[2]) for r in rs]
    print(f"{int(size)//1024 if int(size) >= 1024 else size:>6}{'GiB' if int(size) >= 1024 else 'MiB':<2} {label:>15} {statistics.median(int(r[5]) for r in rs):>6} "
          f"{statistics.median(rto):>15.3f} {max(rto):>6.3f} {statistics.median(int(r[3]) for r in rs):>12} "
          f"{statistics.median(float(r[4]) for r in rs):>10.3f}  {'meets' if max(rto) < 5 else 'MISSES'}")
PY
