// fape-cuda-emu: the internal API shared by the stand-in libraries (driver, NVRTC, cuBLAS,
// cuBLASLt, cuFFT) built into libfape_cuda_emu.so. Device memory is host memory: a device
// pointer (CUdeviceptr) is the host address of a live allocation of memory.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace emu {

// The checker modes of FAPE_CUDA_EMU_SANITIZER (none when unset or empty).
enum class Sanitizer { None, Memcheck, Racecheck, Initcheck };
Sanitizer sanitizer();
const char* sanitizer_name(Sanitizer s);

// Prints one checker report to stderr ("========= fape-cuda-emu <tool>: <message>") and counts
// it; `take_reports` returns the count since the last call and resets it (a launch or a library
// call that reported fails with an error code).
void report(const char* tool, const std::string& message);
size_t take_reports();

// Device allocations, 256-byte aligned, filled with the poison byte 0xFF (NaN in f32, bf16,
// f16 and f64; -1 in integers) so an element nobody wrote shows in every comparison.
void* device_alloc(size_t bytes);
// False when `p` is not the start of a live allocation.
bool device_free(void* p);
// Whether [p, p + bytes) lies inside one live allocation.
bool device_range(const void* p, size_t bytes);
// "allocation of N bytes at 0x.. + offset" or "not device memory", for reports.
std::string describe_address(const void* p);

// initcheck: whether the mode is on; marking bytes written (host copies, memsets, library
// outputs, kernel stores); reporting reads of bytes never written (`what` names the reader).
// No-ops unless the mode is on. check_read returns false when it reported.
bool initcheck_on();
void mark_written(const void* p, size_t bytes);
bool check_read(const void* p, size_t bytes, const char* what);
// The live allocation holding `p`, for the kernel access hooks' cache: base, size and its
// initcheck bits (null when initcheck is off). The view stays valid while free_generation()
// is unchanged (every free bumps it).
struct AllocationView {
    uintptr_t base;
    size_t bytes;
    uint8_t* written;
};
bool find_allocation(const void* p, AllocationView* view);
uint64_t free_generation();

// Copies the written-bits of [src, src + bytes) to dst (device-to-device copies).
void copy_written(void* dst, const void* src, size_t bytes);

// Whether `stream` (a driver stream handle) is capturing into a graph.
bool capturing(void* stream);
// Records `work` in `stream`'s capture (`capturing(stream)` must hold): a replay runs it, and
// its failure (false) becomes the stream's error, as a failed kernel's does. The math-library
// stand-ins compute at once outside a capture (every stream operation here runs in order as it
// is issued) and through this inside one. False for a stream that is not capturing.
bool capture(void* stream, std::function<bool()> work);

}  // namespace emu
