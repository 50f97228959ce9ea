# Shared by the end-to-end shell benches (sourced, not run): `bench_setup NAME TOOL...`
# checks the tools, builds the release binary unless HAVEN_BIN names one (sets HAVEN),
# makes the work dir `$work` under $BENCH_DIR (default the target dir), and on exit kills
# every pid in `pids` and removes `$work` (kept with KEEP=1). Also `now` and `since T`.
bench_setup() {
  local name=$1
  shift
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null || { echo "benches/$name.sh: $t is missing" >&2; exit 1; }
  done
  local target=${CARGO_TARGET_DIR:-target}
  if [ -z "${HAVEN_BIN:-}" ]; then
    cargo build --release -q --bin haven
    HAVEN_BIN=$target/release/haven
  fi
  HAVEN=$(realpath "$HAVEN_BIN")
  work=$(mktemp -d "${BENCH_DIR:-$target}/$name-bench.XXXXXX")
  work=$(realpath "$work")
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && { echo "kept $work"; return; }
  rm -rf "$work"
}

now() { date +%s.%N; }
since() { python3 -c "print(f'{$(now) - $1:.3f}')"; }
