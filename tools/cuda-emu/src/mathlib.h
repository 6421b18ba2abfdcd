// fape-cuda-emu: what the cuBLAS, cuBLASLt and cuFFT stand-ins share: the CUDA data types they
// take, f16/bf16 conversions (round to nearest even), the device-memory check of an operand and
// the one GEMM core (defined in cublas.cpp, used by cublas.cpp and cublaslt.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "emu.h"

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

// cublasStatus_t, of cuBLAS and cuBLASLt: the codes the stand-ins return.
enum cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};

namespace emu {

// cudaDataType_t values (library_types.h) of the element types the stand-ins compute on.
enum : int32_t { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 };

// Bytes per element of an emulated element type; 0 for the others.
inline size_t element_size(int32_t type)
{
    switch (type) {
    case CUDA_R_32F: return 4;
    case CUDA_R_16F:
    case CUDA_R_16BF: return 2;
    default: return 0;
    }
}

inline float bits_to_float(uint32_t u)
{
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint32_t float_to_bits(float f)
{
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f)
{
    uint32_t u = float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays a (quiet) NaN
    u += 0x7fffu + ((u >> 16) & 1);
    return uint16_t(u >> 16);
}

inline float f16_to_float(uint16_t h)
{
    const uint32_t sign = uint32_t(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {
        const float f = std::ldexp(float(mantissa), -24);  // zero or subnormal
        return sign ? -f : f;
    }
    return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline uint16_t float_to_f16(float f)
{
    const uint32_t u = float_to_bits(f), a = u & 0x7fffffffu;
    const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    if (a > 0x7f800000u) return sign | 0x7e00u;          // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00u;         // 65520 and above round to infinity
    if (a < 0x38800000u)                                 // below 2^-14: a subnormal f16 (exact scaling)
        return sign | uint16_t(std::nearbyint(bits_to_float(a) * 16777216.0f));
    uint32_t r = a - (112u << 23);                       // rebias the exponent, round 23 -> 10 bits
    r += 0xfffu + ((r >> 13) & 1);
    return sign | uint16_t(r >> 13);
}

// Element i of an array of `type` (an emulated one).
inline double load(int32_t type, const void* base, int64_t i)
{
    switch (type) {
    case CUDA_R_32F: return static_cast<const float*>(base)[i];
    case CUDA_R_16F: return f16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    }
}

// Stores v as element i of an array of `type`: rounded to f32 (the compute type), then to `type`.
inline void store(int32_t type, void* base, int64_t i, double v)
{
    const float f = float(v);
    switch (type) {
    case CUDA_R_32F: static_cast<float*>(base)[i] = f; break;
    case CUDA_R_16F: static_cast<uint16_t*>(base)[i] = float_to_f16(f); break;
    default: static_cast<uint16_t*>(base)[i] = float_to_bf16(f); break;
    }
}

// Whether [p, p + bytes) lies inside one device allocation; if not, reports it to memcheck as
// `fn`'s operand `what` (the caller then fails without touching memory).
inline bool in_device_memory(const char* fn, const char* what, const void* p, size_t bytes)
{
    if (bytes == 0 || device_range(p, bytes)) return true;
    report("memcheck", std::string(fn) + ": " + what + " (" + std::to_string(bytes) + " bytes from " +
                           describe_address(p) + ") is not inside one device allocation");
    return false;
}

// A call the emulator cannot reproduce (the real library would accept it): said on stderr, and the
// caller returns the library's NOT_SUPPORTED status.
inline void not_emulated(const char* fn, const std::string& what)
{
    std::fprintf(stderr, "fape-cuda-emu: %s: %s is not emulated\n", fn, what.c_str());
}

// One column-major operand: `batch` matrices of `rows x cols` elements of `type`, leading
// dimension `ld`, `stride` elements apart.
struct Matrix {
    const void* ptr;
    int32_t type;
    int64_t rows, cols, ld, stride;
};

// D = alpha op(A) op(B) + beta C (+ bias) for each of `batch` matrices, op(A) m x k, op(B) k x n.
// `a` and `b` are the stored matrices (k x m when transposed); C is read only when beta != 0; the
// bias (m elements of `bias_type`, or null) is added to every column of D.
struct Gemm {
    const char* fn;  // the API function, for reports
    bool trans_a, trans_b;
    int64_t m, n, k, batch;
    double alpha, beta;
    Matrix a, b, c, d;
    const void* bias;
    int32_t bias_type;
};

enum class GemmResult { Ok, OutOfRange, Unwritten };

// Runs `g` (shapes and types already validated): OutOfRange (memcheck reported, nothing touched)
// when an operand region is outside device memory; Unwritten (initcheck reported, D computed)
// when it read never-written bytes. The reports are consumed here: the caller's call fails.
GemmResult gemm(const Gemm& g);

// Whether cuBLAS(Lt) computes A of `a` times B of `b` into C of `c` with `compute` (a
// cublasComputeType_t), among the combinations emulated (a subset of cuBLAS's table): A and B of
// one type (f32, f16 or bf16), C of that type or f32, 32F compute; the 32F_FAST_* ones on f32.
bool gemm_types_supported(int32_t compute, int32_t a, int32_t b, int32_t c);
// Whether `compute` is a cublasComputeType_t value at all.
bool known_compute_type(int32_t compute);

}  // namespace emu
