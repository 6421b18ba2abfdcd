// fape-cuda-emu: the device side of CUDA C++ for kernels compiled by the emulator's NVRTC
// (src/nvrtc.cpp) with the host C++ compiler. The emulator preprocesses a kernel source,
// rewrites its inline PTX (`asm`) into calls of the functions in namespace fape_ptx below, its
// `__shared__` declarations into per-block storage and registers its `extern "C" __global__`
// kernels (src/translate.cpp), then compiles the result with this header included first.
//
// Every CUDA thread is a fiber of the runtime; what needs other threads (barriers, warp
// collectives, cp.async retirement) calls into the runtime through fape_cuda_emu_abi.h.
// Warp collectives follow the PTX ISA lane by lane: each lane hands in its operands, the last
// lane to arrive computes the result of every lane.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <utility>

#include "fape_cuda_emu_abi.h"

// ---------------------------------------------------------------------------------------------
// Keywords
// ---------------------------------------------------------------------------------------------
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
#define __constant__ static

// ---------------------------------------------------------------------------------------------
// Vector types (CUDA's sizes and alignments)
// ---------------------------------------------------------------------------------------------
#define FAPE_EMU_VEC2(T, N, A) \
    struct __attribute__((aligned(A))) N##2 { T x, y; }; \
    static inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define FAPE_EMU_VEC4(T, N, A) \
    struct __attribute__((aligned(A))) N##4 { T x, y, z, w; }; \
    static inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
FAPE_EMU_VEC2(float, float, 8)
FAPE_EMU_VEC4(float, float, 16)
FAPE_EMU_VEC2(double, double, 16)
FAPE_EMU_VEC2(int, int, 8)
FAPE_EMU_VEC4(int, int, 16)
FAPE_EMU_VEC2(unsigned int, uint, 8)
FAPE_EMU_VEC4(unsigned int, uint, 16)
FAPE_EMU_VEC2(unsigned short, ushort, 4)
FAPE_EMU_VEC4(unsigned short, ushort, 8)
FAPE_EMU_VEC2(long long, longlong, 16)
FAPE_EMU_VEC2(unsigned long long, ulonglong, 16)
#undef FAPE_EMU_VEC2
#undef FAPE_EMU_VEC4
typedef fape_emu_dim3 uint3;
typedef fape_emu_dim3 dim3;

// ---------------------------------------------------------------------------------------------
// Built-in variables
// ---------------------------------------------------------------------------------------------
#define threadIdx (fape_emu_self->thread_idx)
#define blockIdx (fape_emu_self->block->block_idx)
#define blockDim (fape_emu_self->block->block_dim)
#define gridDim (fape_emu_self->block->grid_dim)
#define warpSize 32

namespace fape_emu {

// Bit copy between equally sized types.
template <typename To, typename From>
static inline To bits(const From& v)
{
    static_assert(sizeof(To) == sizeof(From), "a bit cast between types of one size");
    To r;
    std::memcpy(&r, &v, sizeof r);
    return r;
}

// An asm input operand as the PTX register type T of its constraint: a value conversion
// between numbers of one kind (integer or floating point), else a bit copy of an equally sized
// value (a float in an "r" register, a pointer in an "l" register).
template <typename T, typename V>
static inline T ptx_in(const V& v)
{
    if constexpr (std::is_same_v<T, V>) {
        return v;
    } else if constexpr ((std::is_integral_v<V> || std::is_enum_v<V>) && std::is_integral_v<T>) {
        return static_cast<T>(v);
    } else if constexpr (std::is_floating_point_v<V> && std::is_floating_point_v<T>) {
        return static_cast<T>(v);
    } else {
        return bits<T>(v);
    }
}

// Stores an asm output register into its operand (equal sizes, bit copy).
template <typename V, typename T>
static inline void ptx_out(V& v, const T& t)
{
    static_assert(sizeof(V) == sizeof(T), "an asm output operand of the register's size");
    std::memcpy(&v, &t, sizeof t);
}

// The window offset of a shared-memory address (what PTX's .shared state space addresses).
static inline unsigned shared_offset(const void* p)
{
    const char* base = fape_emu_self->block->shared_window;
    const char* c = static_cast<const char*>(p);
    if (c < base || c >= base + fape_emu_self->block->window_bytes)
        fape_emu_trap("a generic address converted to .shared is not in the block's shared memory");
    return static_cast<unsigned>(c - base);
}

// The generic address of shared-window offset `offset` (`bytes` of it must lie in the window).
static inline char* shared_pointer(uint64_t offset, unsigned bytes)
{
    if (offset + bytes > fape_emu_self->block->window_bytes)
        fape_emu_trap("a .shared address lies outside the block's shared memory");
    return fape_emu_self->block->shared_window + offset;
}

static inline void* dynamic_shared() { return fape_emu_self->block->shared_window + fape_emu_self->block->dynamic_offset; }

// --- warp collectives ------------------------------------------------------------------------

enum class Shfl { Idx, Up, Down, Xor };

struct ShflIn {
    uint64_t value;
    int operand;  // srcLane, delta or laneMask
    int width;
};

template <Shfl K>
static void shfl_collective(const void* const* in, void* const* out, unsigned mask)
{
    for (unsigned lane = 0; lane < 32; ++lane) {
        if (!(mask & (1u << lane))) continue;
        const ShflIn& a = *static_cast<const ShflIn*>(in[lane]);
        const int width = a.width;
        if (width <= 0 || width > 32 || (width & (width - 1)))
            fape_emu_trap("__shfl_*_sync: width is not a power of two in 1..32");
        // PTX shfl.sync: b is taken mod 32; a lane reads its own value where the source lies
        // past the end of its segment (idx, down, bfly) or before its start (up). A bfly source
        // in an earlier segment is read, as PTX's `j <= maxLane` allows.
        const int l = static_cast<int>(lane);
        const int b = a.operand & 31;
        const int base = l & ~(width - 1);
        const int last = base + width - 1;
        int src = l;
        switch (K) {
        case Shfl::Idx: src = base + (b & (width - 1)); break;
        case Shfl::Up: src = l - b >= base ? l - b : l; break;
        case Shfl::Down: src = l + b <= last ? l + b : l; break;
        case Shfl::Xor: src = (l ^ b) <= last ? l ^ b : l; break;
        }
        if (!(mask & (1u << src))) fape_emu_trap("__shfl_*_sync reads a lane outside its mask");
        *static_cast<uint64_t*>(out[lane]) = static_cast<const ShflIn*>(in[src])->value;
    }
}

template <Shfl K, typename T>
static inline T shfl(unsigned mask, T var, int operand, int width)
{
    static_assert(sizeof(T) <= 8, "__shfl_*_sync moves at most 8 bytes");
    ShflIn a{0, operand, width};
    std::memcpy(&a.value, &var, sizeof(T));
    uint64_t r = 0;
    fape_emu_warp_collective(mask, &shfl_collective<K>, &a, &r);
    T out;
    std::memcpy(&out, &r, sizeof(T));
    return out;
}

enum class Vote { Ballot, Any, All };

template <Vote K>
static void vote_collective(const void* const* in, void* const* out, unsigned mask)
{
    unsigned ballot = 0;
    for (unsigned lane = 0; lane < 32; ++lane)
        if ((mask & (1u << lane)) && *static_cast<const int*>(in[lane])) ballot |= 1u << lane;
    const unsigned r = K == Vote::Ballot ? ballot : K == Vote::Any ? (ballot != 0) : (ballot == mask);
    for (unsigned lane = 0; lane < 32; ++lane)
        if (mask & (1u << lane)) *static_cast<unsigned*>(out[lane]) = r;
}

template <Vote K>
static inline unsigned vote(unsigned mask, int predicate)
{
    const int p = predicate != 0;
    unsigned r = 0;
    fape_emu_warp_collective(mask, &vote_collective<K>, &p, &r);
    return r;
}

static void sync_collective(const void* const*, void* const*, unsigned) {}

// --- 16-bit floats (round to nearest even; NaN stays a quiet NaN of its sign) -----------------

static inline uint16_t f32_to_bf16(float f)
{
    uint32_t u = bits<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

static inline float bf16_to_f32(uint16_t h) { return bits<float>(static_cast<uint32_t>(h) << 16); }

static inline float f16_to_f32(uint16_t h)
{
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return bits<float>(sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0u));
    if (exp != 0) return bits<float>(sign | ((exp + 112u) << 23) | (man << 13));
    // Zero or subnormal: man * 2^-24, exact in f32.
    const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
}

static inline uint16_t f32_to_f16(float f)
{
    const uint32_t u = bits<uint32_t>(f);
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (a < 0x38800000u) {
        // Result is subnormal (or zero): round |f| / 2^-24 to nearest even integer.
        const float scaled = bits<float>(a) * 16777216.0f;  // exact: a power-of-two scale
        return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)));
    }
    // Normal: rebias the exponent, round the mantissa to 10 bits (carry may bump the exponent).
    uint32_t r = a - 0x38000000u;  // exponent - 112
    r += 0xfffu + ((r >> 13) & 1u);
    return static_cast<uint16_t>(sign | (r >> 13));
}

// --- registration of kernels -----------------------------------------------------------------

template <typename F, F f>
struct Thunk;

template <typename... A, void (*f)(A...)>
struct Thunk<void (*)(A...), f> {
    static constexpr unsigned count = sizeof...(A);
    static constexpr unsigned sizes[sizeof...(A) + 1] = {static_cast<unsigned>(sizeof(std::decay_t<A>))..., 0u};
    template <size_t... I>
    static void call_with(void** params, std::index_sequence<I...>)
    {
        f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(params[I])...);
    }
    static void call(void** params) { call_with(params, std::index_sequence_for<A...>{}); }
};

}  // namespace fape_emu

// ---------------------------------------------------------------------------------------------
// Synchronisation and warp intrinsics
// ---------------------------------------------------------------------------------------------
// A macro, so that the runtime sees each barrier's call site (synccheck: one barrier, one site).
#define __syncthreads() fape_emu_syncthreads()
static inline void __syncwarp(unsigned mask = 0xffffffffu)
{
    fape_emu_warp_collective(mask, &fape_emu::sync_collective, nullptr, nullptr);
}
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
static inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32)
{
    return fape_emu::shfl<fape_emu::Shfl::Idx>(mask, var, src_lane, width);
}
template <typename T>
static inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32)
{
    return fape_emu::shfl<fape_emu::Shfl::Up>(mask, var, static_cast<int>(delta), width);
}
template <typename T>
static inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32)
{
    return fape_emu::shfl<fape_emu::Shfl::Down>(mask, var, static_cast<int>(delta), width);
}
template <typename T>
static inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32)
{
    return fape_emu::shfl<fape_emu::Shfl::Xor>(mask, var, lane_mask, width);
}
static inline unsigned __ballot_sync(unsigned mask, int p) { return fape_emu::vote<fape_emu::Vote::Ballot>(mask, p); }
static inline int __any_sync(unsigned mask, int p) { return static_cast<int>(fape_emu::vote<fape_emu::Vote::Any>(mask, p)); }
static inline int __all_sync(unsigned mask, int p) { return static_cast<int>(fape_emu::vote<fape_emu::Vote::All>(mask, p)); }

static inline unsigned long long __cvta_generic_to_shared(const void* p) { return fape_emu::shared_offset(p); }
[[noreturn]] static inline void __trap() { fape_emu_trap("__trap() called"); }

// ---------------------------------------------------------------------------------------------
// Math and bit intrinsics (IEEE f32/f64 on the host; the _rn forms are plain correctly rounded
// operations, which the host never contracts: kernels compile with -ffp-contract=off). glibc
// supplies __expf, __logf, __sinf, __cosf, exp10f and sincosf itself.
// ---------------------------------------------------------------------------------------------
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;
static inline float __int_as_float(int v) { return fape_emu::bits<float>(v); }
static inline int __float_as_int(float v) { return fape_emu::bits<int>(v); }
static inline float __uint_as_float(unsigned v) { return fape_emu::bits<float>(v); }
static inline unsigned __float_as_uint(float v) { return fape_emu::bits<unsigned>(v); }
static inline double __longlong_as_double(long long v) { return fape_emu::bits<double>(v); }
static inline long long __double_as_longlong(double v) { return fape_emu::bits<long long>(v); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __dsqrt_rn(double a) { return std::sqrt(a); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fsqrt_rn(float a) { return std::sqrt(a); }
static inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
static inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
static inline float sinpif(float a) { return static_cast<float>(std::sin(M_PI * static_cast<double>(a))); }
static inline float cospif(float a) { return static_cast<float>(std::cos(M_PI * static_cast<double>(a))); }
static inline void sincospif(float a, float* s, float* c)
{
    // sin/cos(pi a) with the argument reduced exactly: a = 2k + r, |r| <= 1 (fmod is exact).
    const double r = std::fmod(static_cast<double>(a), 2.0);
    *s = static_cast<float>(std::sin(M_PI * r));
    *c = static_cast<float>(std::cos(M_PI * r));
}
static inline void sincospi(double a, double* s, double* c)
{
    const double r = std::fmod(a, 2.0);
    *s = std::sin(M_PI * r);
    *c = std::cos(M_PI * r);
}
static inline unsigned __brev(unsigned v)
{
    v = ((v >> 1) & 0x55555555u) | ((v & 0x55555555u) << 1);
    v = ((v >> 2) & 0x33333333u) | ((v & 0x33333333u) << 2);
    v = ((v >> 4) & 0x0f0f0f0fu) | ((v & 0x0f0f0f0fu) << 4);
    v = ((v >> 8) & 0x00ff00ffu) | ((v & 0x00ff00ffu) << 8);
    return (v >> 16) | (v << 16);
}
static inline int __popc(unsigned v) { return __builtin_popcount(v); }
static inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
static inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
static inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v)); }
static inline int __ffs(int v) { return __builtin_ffs(v); }
static inline int __ffsll(long long v) { return __builtin_ffsll(v); }
static inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32); }
static inline long long clock64() { return static_cast<long long>(__builtin_ia32_rdtsc()); }
template <typename T>
static inline T __ldg(const T* p) { return *p; }

static inline int min(int a, int b) { return a < b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline float min(float a, float b) { return std::fmin(a, b); }
static inline double min(double a, double b) { return std::fmin(a, b); }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline float max(float a, float b) { return std::fmax(a, b); }
static inline double max(double a, double b) { return std::fmax(a, b); }

// ---------------------------------------------------------------------------------------------
// Atomics (blocks run on several OS threads: real atomic operations on host memory)
// ---------------------------------------------------------------------------------------------
template <typename T, typename F>
static inline T fape_emu_atomic_update(T* p, F f)
{
    using U = std::conditional_t<sizeof(T) == 8, unsigned long long, unsigned>;
    U* q = reinterpret_cast<U*>(p);
    U old = __atomic_load_n(q, __ATOMIC_RELAXED);
    for (;;) {
        const U next = fape_emu::bits<U>(static_cast<T>(f(fape_emu::bits<T>(old))));
        if (__atomic_compare_exchange_n(q, &old, next, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
            return fape_emu::bits<T>(old);
    }
}
static inline float atomicAdd(float* p, float v) { return fape_emu_atomic_update(p, [v](float o) { return o + v; }); }
static inline double atomicAdd(double* p, double v) { return fape_emu_atomic_update(p, [v](double o) { return o + v; }); }
static inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v)
{
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
static inline int atomicSub(int* p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicSub(unsigned* p, unsigned v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
static inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline float atomicExch(float* p, float v) { return fape_emu_atomic_update(p, [v](float) { return v; }); }
static inline int atomicMax(int* p, int v) { return fape_emu_atomic_update(p, [v](int o) { return o > v ? o : v; }); }
static inline unsigned atomicMax(unsigned* p, unsigned v) { return fape_emu_atomic_update(p, [v](unsigned o) { return o > v ? o : v; }); }
static inline int atomicMin(int* p, int v) { return fape_emu_atomic_update(p, [v](int o) { return o < v ? o : v; }); }
static inline unsigned atomicMin(unsigned* p, unsigned v) { return fape_emu_atomic_update(p, [v](unsigned o) { return o < v ? o : v; }); }
static inline int atomicCAS(int* p, int compare, int v)
{
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;
}
static inline unsigned atomicCAS(unsigned* p, unsigned compare, unsigned v)
{
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;
}
static inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long compare, unsigned long long v)
{
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;
}

// ---------------------------------------------------------------------------------------------
// Inline PTX. The translator turns `asm("op.a.b %0, [%1], 16;" : "=r"(x) : "l"(p))` into
// `fape_ptx::op_a_b(x_tmp, p_tmp, 16)`: one function per opcode (dots become underscores),
// register operands as typed by their constraint (h u16, r u32, l u64, f float, d double; outputs
// by reference), vector operands {..} flattened, address operands [..] as a 64-bit address (a
// .shared window offset or a generic/global address), immediates as written.
// ---------------------------------------------------------------------------------------------
namespace fape_ptx {

// --- conversions ---
static inline void cvt_rn_bf16_f32(uint16_t& d, float a) { d = fape_emu::f32_to_bf16(a); }
static inline void cvt_rn_f16_f32(uint16_t& d, float a) { d = fape_emu::f32_to_f16(a); }
static inline void cvt_f32_bf16(float& d, uint16_t a) { d = fape_emu::bf16_to_f32(a); }
static inline void cvt_f32_f16(float& d, uint16_t a) { d = fape_emu::f16_to_f32(a); }
// d = {a -> upper half, b -> lower half}
static inline void cvt_rn_bf16x2_f32(uint32_t& d, float a, float b)
{
    d = (static_cast<uint32_t>(fape_emu::f32_to_bf16(a)) << 16) | fape_emu::f32_to_bf16(b);
}
static inline void cvt_rn_f16x2_f32(uint32_t& d, float a, float b)
{
    d = (static_cast<uint32_t>(fape_emu::f32_to_f16(a)) << 16) | fape_emu::f32_to_f16(b);
}

// --- special functions ---
static inline float flush_subnormal(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }
static inline void ex2_approx_ftz_f32(float& d, float a) { d = flush_subnormal(std::exp2(flush_subnormal(a))); }
static inline void ex2_approx_f32(float& d, float a) { d = std::exp2(a); }
static inline void lg2_approx_ftz_f32(float& d, float a) { d = flush_subnormal(std::log2(flush_subnormal(a))); }
static inline void rcp_approx_ftz_f32(float& d, float a) { d = flush_subnormal(1.0f / flush_subnormal(a)); }

// --- cp.async ---
static inline void cp_async_any(uint64_t dst, uint64_t src, long long cp_size, long long src_size)
{
    if (src_size < 0 || src_size > cp_size) fape_emu_trap("cp.async: src-size is larger than cp-size");
    char* d = fape_emu::shared_pointer(dst, static_cast<unsigned>(cp_size));
    fape_emu_cp_async(d, reinterpret_cast<const void*>(static_cast<uintptr_t>(src)), static_cast<unsigned>(cp_size),
                      static_cast<unsigned>(src_size));
}
static inline void cp_async_cg_shared_global(uint64_t dst, uint64_t src, long long cp_size, long long src_size)
{
    if (cp_size != 16) fape_emu_trap("cp.async.cg: cp-size must be 16");
    cp_async_any(dst, src, cp_size, src_size);
}
static inline void cp_async_cg_shared_global(uint64_t dst, uint64_t src, long long cp_size)
{
    cp_async_cg_shared_global(dst, src, cp_size, cp_size);
}
static inline void cp_async_ca_shared_global(uint64_t dst, uint64_t src, long long cp_size, long long src_size)
{
    if (cp_size != 4 && cp_size != 8 && cp_size != 16) fape_emu_trap("cp.async.ca: cp-size must be 4, 8 or 16");
    cp_async_any(dst, src, cp_size, src_size);
}
static inline void cp_async_ca_shared_global(uint64_t dst, uint64_t src, long long cp_size)
{
    cp_async_ca_shared_global(dst, src, cp_size, cp_size);
}
static inline void cp_async_commit_group() { fape_emu_cp_async_commit(); }
static inline void cp_async_wait_group(long long n) { fape_emu_cp_async_wait(static_cast<unsigned>(n)); }
static inline void cp_async_wait_all()
{
    fape_emu_cp_async_commit();
    fape_emu_cp_async_wait(0);
}

// --- ldmatrix: lane 8m + r addresses row r of matrix m (16 bytes); register m of lane l gets
// the 32-bit word l % 4 of row l / 4 of matrix m, or with .trans the 16-bit elements l / 4 of
// rows 2 (l % 4) and 2 (l % 4) + 1 (lower half from the lower row).
struct LdmatrixIn {
    uint16_t row[8];
    int matrices;
};
template <bool TRANS>
static void ldmatrix_collective(const void* const* in, void* const* out, unsigned)
{
    for (unsigned lane = 0; lane < 32; ++lane) {
        const int matrices = static_cast<const LdmatrixIn*>(in[lane])->matrices;
        uint32_t* r = static_cast<uint32_t*>(out[lane]);
        for (int m = 0; m < matrices; ++m) {
            if (!TRANS) {
                const LdmatrixIn& src = *static_cast<const LdmatrixIn*>(in[8 * m + lane / 4]);
                r[m] = static_cast<uint32_t>(src.row[2 * (lane % 4)]) |
                       (static_cast<uint32_t>(src.row[2 * (lane % 4) + 1]) << 16);
            } else {
                const LdmatrixIn& lo = *static_cast<const LdmatrixIn*>(in[8 * m + 2 * (lane % 4)]);
                const LdmatrixIn& hi = *static_cast<const LdmatrixIn*>(in[8 * m + 2 * (lane % 4) + 1]);
                r[m] = static_cast<uint32_t>(lo.row[lane / 4]) | (static_cast<uint32_t>(hi.row[lane / 4]) << 16);
            }
        }
    }
}
template <bool TRANS, int M>
static inline void ldmatrix(uint32_t* r, uint64_t address)
{
    LdmatrixIn a{};
    a.matrices = M;
    // Only lanes 0 .. 8M-1 supply row addresses; the others' operand is ignored.
    if (fape_emu_self->lane < 8u * M) {
        if (address % 16 != 0) fape_emu_trap("ldmatrix: a row address is not 16-byte aligned");
        std::memcpy(a.row, fape_emu::shared_pointer(address, 16), 16);
    }
    fape_emu_warp_collective(0xffffffffu, &ldmatrix_collective<TRANS>, &a, r);
}
static inline void ldmatrix_sync_aligned_m8n8_x1_shared_b16(uint32_t& r0, uint64_t a)
{
    uint32_t r[1];
    ldmatrix<false, 1>(r, a);
    r0 = r[0];
}
static inline void ldmatrix_sync_aligned_m8n8_x2_shared_b16(uint32_t& r0, uint32_t& r1, uint64_t a)
{
    uint32_t r[2];
    ldmatrix<false, 2>(r, a);
    r0 = r[0], r1 = r[1];
}
static inline void ldmatrix_sync_aligned_m8n8_x4_shared_b16(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint64_t a)
{
    uint32_t r[4];
    ldmatrix<false, 4>(r, a);
    r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
static inline void ldmatrix_sync_aligned_m8n8_x1_trans_shared_b16(uint32_t& r0, uint64_t a)
{
    uint32_t r[1];
    ldmatrix<true, 1>(r, a);
    r0 = r[0];
}
static inline void ldmatrix_sync_aligned_m8n8_x2_trans_shared_b16(uint32_t& r0, uint32_t& r1, uint64_t a)
{
    uint32_t r[2];
    ldmatrix<true, 2>(r, a);
    r0 = r[0], r1 = r[1];
}
static inline void ldmatrix_sync_aligned_m8n8_x4_trans_shared_b16(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                                                  uint64_t a)
{
    uint32_t r[4];
    ldmatrix<true, 4>(r, a);
    r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}

// --- mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 ---
// Lane l, g = l / 4, t = l % 4; each 32-bit A/B register holds two 16-bit elements, the lower
// index in the low half. A (16x16): a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
// a3 = A[g+8][2t+8..]; B (16x8): b0 = B[2t..][g], b1 = B[2t+8..][g]; C, D (16x8 f32):
// c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1].
struct MmaIn {
    uint32_t a[4], b[2];
    float c[4];
};
template <bool BF16>
static void mma_m16n8k16_collective(const void* const* in, void* const* out, unsigned)
{
    float A[16][16], B[16][8], C[16][8];
    auto wide = [](uint16_t h) { return BF16 ? fape_emu::bf16_to_f32(h) : fape_emu::f16_to_f32(h); };
    for (unsigned lane = 0; lane < 32; ++lane) {
        const MmaIn& x = *static_cast<const MmaIn*>(in[lane]);
        const unsigned g = lane / 4, t = lane % 4;
        for (int i = 0; i < 4; ++i) {
            const unsigned row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
            A[row][col] = wide(static_cast<uint16_t>(x.a[i]));
            A[row][col + 1] = wide(static_cast<uint16_t>(x.a[i] >> 16));
        }
        for (int i = 0; i < 2; ++i) {
            B[2 * t + 8 * i][g] = wide(static_cast<uint16_t>(x.b[i]));
            B[2 * t + 8 * i + 1][g] = wide(static_cast<uint16_t>(x.b[i] >> 16));
        }
        for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = x.c[i];
    }
    for (unsigned lane = 0; lane < 32; ++lane) {
        float* d = static_cast<float*>(out[lane]);
        const unsigned g = lane / 4, t = lane % 4;
        for (int i = 0; i < 4; ++i) {
            const unsigned row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
            // Products of 16-bit floats are exact in f64; the sum is rounded once to f32.
            double acc = C[row][col];
            for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * static_cast<double>(B[k][col]);
            d[i] = static_cast<float>(acc);
        }
    }
}
template <bool BF16>
static inline void mma_m16n8k16(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2,
                                uint32_t a3, uint32_t b0, uint32_t b1, float c0, float c1, float c2, float c3)
{
    const MmaIn x{{a0, a1, a2, a3}, {b0, b1}, {c0, c1, c2, c3}};
    float d[4];
    fape_emu_warp_collective(0xffffffffu, &mma_m16n8k16_collective<BF16>, &x, d);
    d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
}
static inline void mma_sync_aligned_m16n8k16_row_col_f32_bf16_bf16_f32(float& d0, float& d1, float& d2, float& d3,
                                                                       uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                                       uint32_t b0, uint32_t b1, float c0, float c1,
                                                                       float c2, float c3)
{
    mma_m16n8k16<true>(d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);
}
static inline void mma_sync_aligned_m16n8k16_row_col_f32_f16_f16_f32(float& d0, float& d1, float& d2, float& d3,
                                                                     uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                                     uint32_t b0, uint32_t b1, float c0, float c1,
                                                                     float c2, float c3)
{
    mma_m16n8k16<false>(d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);
}

// --- misc ---
static inline void trap() { fape_emu_trap("PTX trap"); }

}  // namespace fape_ptx
