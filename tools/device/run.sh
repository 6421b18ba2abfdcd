#!/usr/bin/env bash
# The GPU checks and benchmarks of every op in one `device` call (staged by tools/device/stage.sh):
#   run: bash .device/run.sh    carry: [".device"]    timeout_s: 600
# Correctness first (device tests, `fape check --large`, compute-sanitizer), then speed (the three
# `fape bench` tables, the PyTorch peers in the same call, the end-to-end bench when staged).
# Every step has its own time limit and writes $OUT/<step>.txt, so a slow step costs only itself.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export FAPE_TEST_CUDA=1 FAPE_NO_SKIP=1
out=${OUT:-/tmp/fape-device-out}
mkdir -p "$out" /tmp/fape-bin
tar -C /tmp/fape-bin -xJf .device/bins.tar.xz
bin=/tmp/fape-bin/bin

step() { # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - start))s; tail:"; tail -n 4 "$out/$name.txt" | sed 's/^/   /'
}

step devices 30 "$bin/fape" devices
# The PTX-semantics tests (all of test-cuda_ptx) show the emulator's warp collectives agree with
# the hardware; the others' CUDA tests are those named cuda_*.
[ -x "$bin/test-cuda_ptx" ] && step test-cuda_ptx 60 "$bin/test-cuda_ptx" --test-threads 1
for t in fape_kernels attention freq_split lora_moe backends; do
  [ -x "$bin/test-$t" ] && step "test-$t" 90 "$bin/test-$t" cuda --test-threads 1
done
step check 60 "$bin/fape" check --device cuda
# The emulator's table (staged) against the GPU's: the same rows must pass on both.
[ -f .device/emu-check.txt ] && step agree 10 python3 .device/agree.py .device/emu-check.txt "$out/check.txt"
step check-large 150 "$bin/fape" check --device cuda --large
step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 9 "$bin/fape" check --device cuda
# The emulator's racecheck and synccheck have their GPU counterparts (small subsets: slow tools).
step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 "$bin/fape" check --device cuda --op attention
step synccheck 60 compute-sanitizer --tool synccheck --error-exitcode 9 "$bin/fape" check --device cuda --op lora-moe
step bench-lora-moe 90 "$bin/fape" bench lora-moe --device cuda
step bench-freq-split 60 "$bin/fape" bench freq-split --device cuda
step bench-attention 60 "$bin/fape" bench attention --device cuda
[ -f .device/torch_peers.py ] && step torch-peers 120 python3 .device/torch_peers.py fft_mask attention lora_moe
[ -x "$bin/fape-candle-cuda" ] && step e2e-flux-dev 150 "$bin/fape-candle-cuda" bench e2e --preset flux-dev --device cuda --runs 3
exit 0
