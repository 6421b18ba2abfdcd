// The emulator's execution engine: kernel modules, the emulated device, and launches that run
// a grid block after block on a pool of OS threads, each block's CUDA threads as fibers.
#pragma once

#include <string>
#include <vector>

#include "fape_cuda_emu_abi.h"

namespace emu {

// The emulated device: compute capability 8.0, or 9.0 with FAPE_CUDA_EMU_ARCH=90.
struct DeviceInfo {
    int major, minor;
    int sm_count;
    int l2_bytes;
    unsigned shared_optin;  // most shared memory per block a kernel may opt in to
    unsigned shared_per_sm;
    const char* name;
};
const DeviceInfo& device();

// A module compiled by the emulator's NVRTC: the loaded shared object and its kernels.
struct Module {
    void* handle;
    std::string path;
    const fape_emu_module_table* table;
};

// A kernel of a module with its launch attributes.
struct Function {
    const fape_emu_kernel* kernel;
    Module* module;
    unsigned max_dynamic_shared = 48 * 1024;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
};

// Loads the module at `path`; null with `error` set on failure.
Module* load_module(const std::string& path, std::string* error);

struct LaunchRequest {
    const Function* function;
    fape_emu_dim3 grid, block;
    unsigned dynamic_shared;
    void** params;
};

enum class LaunchResult { Ok, InvalidValue, OutOfResources, LaunchFailed, IllegalAddress };

// Validates the configuration and runs the grid to completion. Errors found while the kernel
// runs (traps, synccheck, the sanitizer modes) are reported on stderr; `error` gets the first.
LaunchResult launch(const LaunchRequest& request, std::string* error);

}  // namespace emu
