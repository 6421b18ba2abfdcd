// fape-cuda-emu: what a compiled kernel module and the emulator's runtime share. Included by
// fape_cuda_emu.h (the device-side header every emulated kernel is compiled with) and by the
// runtime (libfape_cuda_emu.so). Plain C layout: the module and the runtime are built apart.
#pragma once

#include <cstddef>
#include <cstdint>

#define FAPE_EMU_ABI_VERSION 1
#define FAPE_EMU_EXPORT extern "C" __attribute__((visibility("default")))

struct fape_emu_dim3 {
    unsigned x, y, z;
};

// The block a thread runs in: indices, extents and its shared-memory window (static shared
// variables first, FAPE_EMU_STATIC_SHARED bytes at most, then the launch's dynamic shared memory).
struct fape_emu_block {
    fape_emu_dim3 block_idx, block_dim, grid_dim;
    char* shared_window;
    unsigned dynamic_offset;  // dynamic shared memory starts here in the window
    unsigned window_bytes;    // static reservation + dynamic bytes of the launch
};

#define FAPE_EMU_STATIC_SHARED (48u * 1024u)

// One emulated CUDA thread as the module sees it (the runtime's thread record starts with it).
struct fape_emu_thread {
    fape_emu_dim3 thread_idx;
    const fape_emu_block* block;
    unsigned linear;  // x + y bx + z bx by
    unsigned lane;    // linear % 32
};

// A warp collective: called once, by the last lane to arrive, with every participating lane's
// input and output (indexed by lane; lanes outside `mask` are null).
typedef void (*fape_emu_collective_fn)(const void* const* in, void* const* out, unsigned mask);

// A kernel entry of a module: name (as cuModuleGetFunction looks it up), the thunk that calls
// it with cuLaunchKernel's argument array, __launch_bounds__'s maximum threads (0: none), and
// its parameter sizes.
struct fape_emu_kernel {
    const char* name;
    void (*thunk)(void** params);
    unsigned max_threads;
    unsigned param_count;
    const unsigned* param_sizes;
};

// The module's table, returned by its exported `fape_emu_module_kernels`.
struct fape_emu_module_table {
    unsigned abi_version;
    unsigned count;
    const fape_emu_kernel* kernels;
};

extern "C" {
// The thread running on this OS thread now (set by the runtime before each switch to a fiber).
extern __thread fape_emu_thread* fape_emu_self;

// Block barrier (__syncthreads, bar.sync 0).
void fape_emu_syncthreads(void);
// Warp collective over `mask` (see fape_emu_collective_fn); `in`/`out` stay valid until it returns.
void fape_emu_warp_collective(unsigned mask, fape_emu_collective_fn fn, const void* in, void* out);
// Static __shared__ storage of the declaration identified by `token`, the same address for every
// thread of the block.
void* fape_emu_static_shared(const void* token, size_t bytes, size_t align);
// cp.async: a copy of cp_size bytes, src_size of them from src and the rest zeros, done when a
// later wait_group retires its group.
void fape_emu_cp_async(void* dst_shared, const void* src, unsigned cp_size, unsigned src_size);
void fape_emu_cp_async_commit(void);
void fape_emu_cp_async_wait(unsigned pending_groups);
// Reports `message` (synccheck/trap) and ends the block's execution; never returns.
[[noreturn]] void fape_emu_trap(const char* message);
}
