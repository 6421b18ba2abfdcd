#!/usr/bin/env bash
# tools/fuzz.sh --list: prints the fuzz targets, one a line.
# tools/fuzz.sh TARGET SECONDS [libFuzzer flags...]: builds and runs one coverage-guided fuzz
# target of fuzz/ (libFuzzer through the libfuzzer-sys crate on stable Rust, instrumented with
# LLVM's SanitizerCoverage: inline 8-bit counters, PC table, comparison tracing) for SECONDS,
# then prints one line `fuzz TARGET: N executions in S s, C crashes`. Exit code 0 without a
# crash, 1 with one (the input is saved under fuzz/artifacts/TARGET/), 2 for bad arguments.
#
# The committed seeds (fuzz/corpus/TARGET/) are read, never written: new inputs go to
# fuzz/target/corpus/TARGET/ (or $FAPE_FUZZ_TARGET_DIR/corpus/TARGET), which later runs resume
# from. FAPE_FUZZ_TARGET_DIR moves the build (default fuzz/target); CI keeps it in its cache.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^fape-fuzz$')
if [ "${1:-}" = --list ]; then
  echo "$targets"
  exit 0
fi
if [ $# -lt 2 ] || ! grep -qx "$1" <<<"$targets" || ! [[ "$2" =~ ^[0-9]+$ ]] || [ "$2" -lt 1 ]; then
  echo "usage: tools/fuzz.sh TARGET SECONDS [libFuzzer flags...]; targets:" $targets >&2
  exit 2
fi
target=$1 seconds=$2
shift 2
if [ ! -d "fuzz/corpus/$target" ]; then
  echo "fuzz/corpus/$target is missing (FAPE_WRITE_FUZZ_SEEDS=1 cargo test --test hostile_input writes it)" >&2
  exit 2
fi

host=$(rustc -vV | sed -n 's/^host: //p')
build_dir=${FAPE_FUZZ_TARGET_DIR:-$PWD/fuzz/target}
# --target keeps these flags off build scripts and proc macros (they are not linked with libFuzzer).
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=3 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing" \
  CARGO_TARGET_DIR="$build_dir" cargo build --locked --release --quiet \
  --manifest-path fuzz/Cargo.toml --target "$host" --bin "$target"

work="$build_dir/corpus/$target" artifacts="fuzz/artifacts/$target"
mkdir -p "$work" "$artifacts"
before=$(find "$artifacts" -type f | wc -l)
log="$build_dir/$target.log"
status=0
# -rss_limit_mb catches memory that grows, fape_fuzz::CappedAlloc single huge allocations,
# -timeout an input that hangs.
"$build_dir/$host/release/$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
  -max_len=65536 -print_final_stats=1 -artifact_prefix="$artifacts/" "$@" \
  "$work" "fuzz/corpus/$target" >"$log" 2>&1 || status=$?
runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
time=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
crashes=$(( $(find "$artifacts" -type f | wc -l) - before ))
if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
  crashes=1
fi
echo "fuzz $target: ${runs:-0} executions in ${time:-$seconds} s, $crashes crashes"
if [ "$crashes" -ne 0 ]; then
  grep -E "panicked|ERROR|fape-fuzz:|Test unit written" "$log" | head -n 8 >&2 || true
  echo "full log: $log" >&2
  exit 1
fi
