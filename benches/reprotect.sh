#!/usr/bin/env bash
# Reprotect after a failover: bytes sent against the blocks changed on both sides, and time;
# then failback after another change at the recovery site, and its time.
#
#   benches/reprotect.sh                      # 1 GiB disk, 1 % changed on each side
#   SIZE_MB=4096 CHANGE_PCT=1 benches/reprotect.sh
#
# An all-in-one node and an agent with `--capture tap` on a raw file of SIZE_MB (random
# content in its first quarter, the rest zero), protected and synced, and a flush: the point
# P. Then the primary site "dies" (SIGKILL of the agent) after writing CHANGE_PCT % of the
# disk in random 4 KiB blocks straight to its file, i.e. blocks that never reached the
# replica and must go back to P's content; `ctl failover m1 --point P`, `failover-commit`;
# the recovery site writes CHANGE_PCT % of the disk in random 4 KiB blocks through the
# export (qemu-io); the agent starts again and `ctl --json reprotect m1` runs, timed. Reported:
# the bytes the agent received and wrote against the distinct 4 KiB blocks changed on either
# side (target, issue 9: ≤ 1.1× the changed bytes plus hashes), the hash bytes sent, the
# bytes compared, the time; then `qemu-img compare` of the original disk and the export.
# Then the recovery site writes another CHANGE_PCT % and `ctl --json failback m1` runs, timed
# against a same-run full copy of the recovery disk over NBD (`qemu-img convert` + sync):
# the final pass's blocks, the replica's bytes compared and rewritten, `cmp` of the original
# disk and the replica, and a write through the tap that reaches the replica with no resync.
#
# Needs qemu-io and qemu-img (qemu-utils), python3. Builds the release binary unless HAVEN_BIN
# names one; the work dir goes in $BENCH_DIR (default the target dir).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${SIZE_MB:-1024}
CHANGE_PCT=${CHANGE_PCT:-1}
source benches/common.sh
bench_setup reprotect qemu-io qemu-img python3
cd "$work"
echo "reprotect bench: $(date -u '+%F %T UTC'), commit $(git -C "$OLDPWD" rev-parse --short HEAD), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "  ${SIZE_MB} MiB disk, ${CHANGE_PCT} % changed on each side"
truncate -s "${SIZE_MB}M" disk.img
head -c "$((SIZE_MB / 4))M" /dev/urandom | dd of=disk.img conv=notrunc status=none
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# No periodic reverse pass: the failback's final pass is to carry the late 1 %.
"$HAVEN" node --data-dir node --listen "127.0.0.1:$port" --name n --site dr --reverse-every 1h >node.log 2>&1 &
pids+=($!)
for _ in $(seq 300); do [ -s node/admin-token ] && break; sleep 0.1; done
agent() {
  "$HAVEN" agent --join "127.0.0.1:$port" --token-file node/agent-token --data-dir agent \
    --disk d0="$work/disk.img" --name m1 --capture tap >>agent.log 2>&1 &
  agent_pid=$!
  pids+=($agent_pid)
}
agent
ctl() { "$HAVEN" ctl --cluster "127.0.0.1:$port" --token-file node/admin-token --json "$@"; }
for _ in $(seq 300); do ctl machines 2>/dev/null | grep -q '"m1"' && break; sleep 0.1; done
t0=$(now)
ctl protect m1 >/dev/null
ctl wait-sync m1 --timeout 600s >/dev/null
echo "  protected and synced in $(since "$t0") s"
for _ in $(seq 300); do [ -S agent/nbd/d0.sock ] && break; sleep 0.1; done
tap="nbd+unix:///d0?socket=$work/agent/nbd/d0.sock"
qemu-io -f raw -c "write -P 1 0 4k" -c flush "$tap" >/dev/null
ctl wait-sync m1 --timeout 60s >/dev/null
point=$(ctl recovery-points m1 | python3 -c "import json,sys; print(json.load(sys.stdin)['points'][-1]['point'])")

# The blocks each side changes: distinct random 4 KiB blocks, CHANGE_PCT % of the disk each.
python3 - "$SIZE_MB" "$CHANGE_PCT" <<'PY'
import random, sys
size_mb, pct = int(sys.argv[1]), float(sys.argv[2])
blocks = size_mb * 256
n = int(blocks * pct / 100)
rng = random.Random(11)
prim = rng.sample(range(1, blocks), n)
rec = rng.sample(range(1, blocks), n)
open("primary.blocks", "w").write("\n".join(map(str, prim)))
open("recovery.blocks", "w").write("\n".join(map(str, rec)))
# Written at the recovery site after the reprotect: the failback's final pass carries them.
late = random.Random(12).sample(range(1, blocks), n)
open("late.blocks", "w").write("\n".join(map(str, late)))
print(f"  each side changes {n} random 4 KiB blocks ({n * 4096 / 2**20:.1f} MiB); distinct on either side: {len(set(prim) | set(rec))}")
PY
kill -9 "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
python3 - <<'PY'
import os
fd = os.open("disk.img", os.O_WRONLY)
for b in map(int, open("primary.blocks").read().split()):
    os.pwrite(fd, bytes([0x5a]) * 4096, b * 4096)
os.fsync(fd)
PY
echo "  the primary wrote its blocks after the point, then died (its agent SIGKILLed)"
t=$(now)
ctl failover m1 --point "$point" --timeout 60s > fo.json
echo "  failover to point $point in $(since "$t") s"
ctl failover-commit m1 >/dev/null
export_uri=$(python3 -c "import json; print(json.load(open('fo.json'))['disks'][0]['nbd_uri'])")
# write_blocks FILE PATTERN URI: a 4 KiB write of PATTERN through URI (qemu-io, 512 per
# run, then a flush) at each block listed in FILE.
write_blocks() {
  python3 - "$@" <<'PY'
import subprocess, sys
path, pattern, uri = sys.argv[1:4]
blocks = list(map(int, open(path).read().split()))
for i in range(0, len(blocks), 512):
    cmds = []
    for b in blocks[i:i + 512]:
        cmds += ["-c", f"write -P {pattern} {b * 4096} 4k"]
    subprocess.run(["qemu-io", "-f", "raw", *cmds, "-c", "flush", uri], check=True, stdout=subprocess.DEVNULL)
PY
}
write_blocks recovery.blocks 165 "$export_uri"
echo "  the recovery site wrote its blocks through the export"
agent
for _ in $(seq 300); do
  m=$(ctl machines 2>/dev/null | python3 -c "import json,sys; m=[x for x in json.load(sys.stdin) if x['name']=='m1'][0]; print(m['agent_last_seen_ms_ago'] if m['agent_last_seen_ms_ago'] is not None else 99999)")
  [ "$m" -lt 2000 ] && break
  sleep 0.2
done
t=$(now)
ctl reprotect m1 --timeout 600s > rp.json
elapsed=$(since "$t")
python3 - "$elapsed" <<'PY'
import json, sys
r = json.load(open("rp.json"))["reverse"]
changed = len(set(map(int, open("primary.blocks").read().split())) | set(map(int, open("recovery.blocks").read().split()))) * 4096
recv, hashes = r["bytes_received"], r["hash_bytes"]
ratio = recv / changed
print(f"  reprotect: {sys.argv[1]} s; compared {r['bytes_compared'] / 2**20:.0f} MiB by hash; hashes sent {hashes / 2**20:.2f} MiB; "
      f"received and wrote {recv / 2**20:.2f} MiB in {r['blocks_written']} blocks; changed on either side {changed / 2**20:.2f} MiB")
print(f"  bytes sent / changed bytes = {ratio:.3f} (plus {hashes / changed:.3f}x in hashes); target <= 1.1x plus hashes: {'meets' if ratio <= 1.1 else 'MISSES'}")
PY
qemu-img compare -f raw -F raw disk.img "$export_uri" >/dev/null && echo "  qemu-img compare: the original disk equals the recovery disk"

# Failback: the recovery site writes another CHANGE_PCT % (the final pass carries it), then
# `ctl failback`, timed.
write_blocks late.blocks 177 "$export_uri"
echo "  the recovery site wrote another ${CHANGE_PCT} % after the reprotect"
# The same-run peer: a failback without tracking copies the whole recovery disk home. Here
# qemu-img copies it over NBD from the export to a file, then sync (kept for the cmp below).
t=$(now)
qemu-img convert -f raw -O raw "$export_uri" recovered.img
sync
copy_s=$(since "$t")
t=$(now)
ctl failback m1 --timeout 600s > fb.json
elapsed=$(since "$t")
python3 - "$elapsed" "$copy_s" <<'PY'
import json, sys
v = json.load(open("fb.json"))
r, b = v["reverse"], v["failback"]
late = len(set(map(int, open("late.blocks").read().split())))
fb, copy = float(sys.argv[1]), float(sys.argv[2])
print(f"  failback: {fb:.3f} s (command to protected from the original site again); "
      f"same-run full copy of the recovery disk over NBD (qemu-img convert + sync): {copy:.3f} s; ratio {fb / copy:.2f}x")
print(f"    final reverse pass {r['done_pass']}: rewrote {r['blocks_written']} blocks of the original disk ({late} written at the recovery site since the reprotect)")
print(f"    replica: compared {b['bytes_compared'] / 2**20:.0f} MiB with the recovery disk, rewrote {b['bytes_written'] / 2**20:.2f} MiB (the recovery site's writes since the point)")
PY
cmp disk.img recovered.img && echo "  cmp: the original disk equals the recovery disk as the failback quiesced it"
cmp disk.img node/replicas/m1/d0.img && echo "  cmp: the replica equals the original disk"
sent0=$(ctl machines | python3 -c "import json,sys; print([x for x in json.load(sys.stdin) if x['name']=='m1'][0]['raw_bytes_sent'])")
qemu-io -f raw -c "write -P 3 4096 64k" -c flush "$tap" >/dev/null
ctl wait-sync m1 --timeout 60s >/dev/null
# The agent reports what it sent on its next poll.
for _ in $(seq 50); do
  sent1=$(ctl machines | python3 -c "import json,sys; print([x for x in json.load(sys.stdin) if x['name']=='m1'][0]['raw_bytes_sent'])")
  [ "$sent1" -gt "$sent0" ] && break
  sleep 0.2
done
cmp disk.img node/replicas/m1/d0.img && echo "  forward protection: a 64 KiB write through the tap reached the replica; $(( (sent1 - sent0) / 1024 )) KiB sent (no resync)"
