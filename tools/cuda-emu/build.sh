#!/usr/bin/env bash
# Builds the CUDA stand-in libraries into OUT_DIR (default: target/cuda-emu of the crate):
# libfape_cuda_emu.so and the names cudarc's loader looks for (libcuda.so.1, libnvrtc.so.13,
# libcublas.so.13, libcublasLt.so.13, libcufft.so.12), all links to it. Rebuilds only when a
# source changed (a hash of src/, include/ and the compiler is kept beside the library).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/../../target/cuda-emu}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cxx="${CXX:-g++}"
# One build at a time per output directory (tests start several).
exec 9>"$out/.lock"
flock 9
stamp="$( (cd "$here" && cat src/* include/* build.sh; "$cxx" --version) | sha256sum | cut -c1-32)"
if [ -e "$out/libfape_cuda_emu.so" ] && [ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
echo "fape-cuda-emu: building the CUDA stand-ins in $out" >&2
objs=()
pids=()
for src in "$here"/src/*.cpp "$here"/src/*.S; do
  [ -e "$src" ] || continue
  obj="$out/obj/$(basename "$src").o"
  mkdir -p "$out/obj"
  "$cxx" -std=c++17 -O2 -g -fPIC -fvisibility=hidden -Wall -Wextra -Werror -I"$here/include" -c "$src" -o "$obj" &
  pids+=($!)
  objs+=("$obj")
done
for pid in "${pids[@]}"; do wait "$pid"; done
"$cxx" -shared -Wl,-soname,libfape_cuda_emu.so -o "$out/libfape_cuda_emu.so.tmp" "${objs[@]}" -ldl -lpthread
mv "$out/libfape_cuda_emu.so.tmp" "$out/libfape_cuda_emu.so"
rm -rf "$out/include"
cp -r "$here/include" "$out/include"
for name in libcuda.so libcuda.so.1 libnvrtc.so libnvrtc.so.13 libcublas.so libcublas.so.13 \
            libcublasLt.so libcublasLt.so.13 libcufft.so libcufft.so.12; do
  ln -sf libfape_cuda_emu.so "$out/$name"
done
echo "$stamp" > "$out/.stamp"
