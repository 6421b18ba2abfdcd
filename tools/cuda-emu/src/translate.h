// The source translation of the emulator's NVRTC: preprocessed CUDA C++ in, host C++ out.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

namespace emu {

struct KernelDecl {
    std::string name;
    std::string max_threads;  // __launch_bounds__'s first argument as written, or empty
};

struct Translation {
    std::string source;  // compiles with fape_cuda_emu.h included first
    std::vector<KernelDecl> kernels;
};

// A construct the emulator cannot run, with the line ("file:line: message").
struct TranslateError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Translates the preprocessor output `pre` (with its line markers) of a kernel source:
//  - each inline `asm` statement becomes calls of fape_ptx::<opcode> (see fape_cuda_emu.h),
//  - each `__shared__` declaration becomes per-block storage of the runtime,
//  - every `extern "C" __global__` kernel is registered in the module's kernel table.
// Throws TranslateError.
Translation translate(const std::string& pre);

}  // namespace emu
