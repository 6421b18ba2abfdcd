# Source this file (`. tools/cuda-emu/env.sh`) to run the crate's CUDA backend on the CPU: it
# builds the stand-in libraries when needed (tools/cuda-emu/build.sh, into target/cuda-emu or
# $FAPE_CUDA_EMU_DIR) and puts them first on LD_LIBRARY_PATH, where cudarc's loader finds them
# instead of the real libcuda, libnvrtc, libcublas(Lt) and libcufft. A real libnvrtc.so.13 later
# on LD_LIBRARY_PATH is still used to compile each kernel first, so its errors stay real.
# Nothing else changes; without this file the real libraries load as before.
_fape_emu_here="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
_fape_emu_out="${FAPE_CUDA_EMU_DIR:-$_fape_emu_here/../../target/cuda-emu}"
if "$_fape_emu_here/build.sh" "$_fape_emu_out"; then
  _fape_emu_out="$(cd "$_fape_emu_out" && pwd)"
  case ":${LD_LIBRARY_PATH:-}:" in
    *":$_fape_emu_out:"*) ;;
    *) export LD_LIBRARY_PATH="$_fape_emu_out${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
  esac
  export FAPE_CUDA_EMU_DIR="$_fape_emu_out"
else
  echo "fape-cuda-emu: building the stand-ins failed; LD_LIBRARY_PATH is unchanged" >&2
fi
unset _fape_emu_here _fape_emu_out
