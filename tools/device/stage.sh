#!/usr/bin/env bash
# Stages everything the GPU checks need into .device/ (git-ignored), for one `device` tool call
# that runs tools/device/run.sh with `carry: [".device"]`. Runs on the build machine (no GPU).
#
#   tools/device/stage.sh [PEERS_PY]     # PEERS_PY: ../shared/peers/torch_peers.py, copied if given
#
# What it builds (dev profile: the host side is optimised at opt-level 1/2, the kernels are
# NVRTC's): `fape` and the test binaries with CUDA device tests (lib, attention, freq_split,
# lora_moe, backends, cuda_ptx), stripped, in .device/bins.tar.xz (the carry limit is 64 MiB). With
# FAPE_STAGE_CANDLE_CUDA=1 it also builds `fape` with `--features candle-cuda` (candle's CUDA
# backend, for `fape bench e2e --device cuda`), which needs nvcc and the CUDA libraries at build
# time: source ../shared/cuda/env.sh first, and put a libcufft.so on LIBRARY_PATH (env.sh has no
# cuFFT: unpack the `nvidia-cufft==12.0.0.15` wheel and link libcufft.so -> libcufft.so.12).
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=.device
rm -rf "$stage" && mkdir -p "$stage/bin"

cargo build --bin fape
cp target/debug/fape "$stage/bin/fape"
# The test binaries, by the names cargo reports for them.
cargo test --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = m["target"]["name"]
        if name in ("fape_kernels", "attention", "freq_split", "lora_moe", "backends", "cuda_ptx"):
            print(name, m["executable"])' \
  | while read -r name exe; do cp "$exe" "$stage/bin/test-$name"; done

if [ "${FAPE_STAGE_CANDLE_CUDA:-0}" = 1 ]; then
  # The libcuda.so env.sh links against is an older driver's: it lacks symbols of the CUDA 13
  # bindings (cuEventElapsedTime_v2). Left undefined here, they bind at load time to the GPU
  # machine's driver (580+), which has them.
  cargo rustc --no-default-features --features candle-cuda,cube --bin fape --target-dir target/candle-cuda \
    -- -C link-arg=-Wl,--unresolved-symbols=ignore-in-object-files
  cp target/candle-cuda/debug/fape "$stage/bin/fape-candle-cuda"
fi

strip "$stage"/bin/*
tar -C "$stage" -cJf "$stage/bins.tar.xz" bin && rm -rf "$stage/bin"
# The same check table on the CPU emulator (tools/cuda-emu), for run.sh to compare row by row
# with the GPU's (tools/device/agree.py).
(. tools/cuda-emu/env.sh && ./target/debug/fape check --device cuda) > "$stage/emu-check.txt" 2>&1 || true
cp tools/device/run.sh tools/device/agree.py "$stage/"
if [ $# -ge 1 ]; then cp "$1" "$stage/torch_peers.py"; fi
du -sh "$stage"
