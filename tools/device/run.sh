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

# The whole call must end inside the device tool's 10-minute command limit and the session's
# 15 minutes of device time: a step whose limit would end past FAPE_DEVICE_BUDGET_S (default
# 480 s from the start) is skipped and named in $OUT/skipped.txt. Steps run in order of what a
# session needs most: correctness on the GPU, the figures of merit beside their peers, then the
# sanitizers, the device tests and the large shapes.
budget=${FAPE_DEVICE_BUDGET_S:-480}

step() { # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  if (( SECONDS + limit > budget )); then
    echo "== $name skipped: ${SECONDS}s + its ${limit}s limit exceeds the ${budget}s budget" | tee -a "$out/skipped.txt"
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - start))s; tail:"; tail -n 4 "$out/$name.txt" | sed 's/^/   /'
}

step devices 15 "$bin/fape" devices
step check 45 "$bin/fape" check --device cuda
# The emulator's table (staged) against the GPU's: the same rows must pass on both.
[ -f .device/emu-check.txt ] && step agree 5 python3 .device/agree.py .device/emu-check.txt "$out/check.txt"
step bench-lora-moe 50 "$bin/fape" bench lora-moe --device cuda
step bench-freq-split 35 "$bin/fape" bench freq-split --device cuda
step bench-attention 35 "$bin/fape" bench attention --device cuda
[ -f .device/torch_peers.py ] && step torch-peers 75 python3 .device/torch_peers.py fft_mask attention lora_moe
# The PTX-semantics tests (all of test-cuda_ptx) show the emulator's warp collectives agree with
# the hardware; the others' CUDA tests are those named cuda_*.
[ -x "$bin/test-cuda_ptx" ] && step test-cuda_ptx 20 "$bin/test-cuda_ptx" --test-threads 1
# The emulator's racecheck and synccheck have their GPU counterparts (small subsets: slow tools).
step memcheck 50 compute-sanitizer --tool memcheck --error-exitcode 9 "$bin/fape" check --device cuda --op lora-moe --op freq-split
step racecheck 40 compute-sanitizer --tool racecheck --error-exitcode 9 "$bin/fape" check --device cuda --op attention
step synccheck 25 compute-sanitizer --tool synccheck --error-exitcode 9 "$bin/fape" check --device cuda --op lora-moe
for t in fape_kernels attention freq_split lora_moe backends; do
  [ -x "$bin/test-$t" ] && step "test-$t" 20 "$bin/test-$t" cuda --test-threads 1
done
step check-large 60 "$bin/fape" check --device cuda --large
[ -x "$bin/fape-candle-cuda" ] && step e2e-flux-dev 90 "$bin/fape-candle-cuda" bench e2e --preset flux-dev --device cuda --runs 3
exit 0
