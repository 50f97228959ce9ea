#!/usr/bin/env bash
# Long fuzz runs: every target (or the ones named) under libFuzzer, coverage guided, on the
# stable toolchain (no sanitizer: the decoders are safe Rust; the targets check allocations
# themselves). See docs/fuzzing.md.
#
#   fuzz/run.sh SECONDS [TARGET...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). Each target starts from its seeds and its
# committed corpus (fuzz/corpus/<target>.bin) plus what earlier runs on this machine found
# (a working corpus under the target dir), runs for SECONDS, and then the committed corpus is
# replaced by a set-cover merge of everything (the fewest inputs that keep every edge).
# Crashes land in fuzz/artifacts/<target>/; each run's figures in $work/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
target_dir=${CARGO_TARGET_DIR:-target}/libfuzzer
work=$target_dir/work
bin=$target_dir/x86_64-unknown-linux-gnu/release
flags=(-s none -O -a --features libfuzzer --target-dir "$target_dir")
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi

cargo fuzz build "${flags[@]}"
rm -rf "$work/start"
cargo run -q -p haven-fuzz --example corpus -- seeds "$work/start"
for t in "${targets[@]}"; do
    mkdir -p "$work/$t" "fuzz/artifacts/$t" fuzz/corpus
    cp "$work/start/$t"/* "$work/$t/"
    echo "== $t: ${secs}s"
    "$bin/$t" "$work/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 \
        -max_len=65536 -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
        >"$work/$t.log" 2>&1 || echo "!! $t exited $? (see $work/$t.log)"
    grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)|panicked|ERROR|SUMMARY' \
        "$work/$t.log" || true
    rm -rf "$work/$t.cover" && mkdir "$work/$t.cover"
    "$bin/$t" "$work/$t.cover" "$work/$t" -set_cover_merge=1 -use_counters=0 -timeout=10 \
        -rss_limit_mb=4096 -max_len=65536 >"$work/$t.merge.log" 2>&1
    cargo run -q -p haven-fuzz --example corpus -- pack "$work/$t.cover" "fuzz/corpus/$t.bin"
done
