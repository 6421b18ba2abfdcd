// Attention kernels of fape-kernels, compiled at run time with NVRTC (see src/backend/cuda.rs).
//
// Self-contained on purpose: NVRTC has no system include path, so no #include here; bf16 and f16
// are carried as their 16-bit patterns (`unsigned short`) and converted with PTX `cvt`.
// Conventions for every kernel in this file:
//   * tensors are dense row-major, q/out [B*H, Lq, D], k/v [B*H, Lk, D], extents passed as int,
//     flat offsets computed in 64 bits;
//   * entry points are `extern "C"`, named `attention_<kernel>_<dtype>[_d<D>]`, and the launch
//     wrappers in src/attention/cuda.rs and src/attention/naive.rs mirror their argument lists;
//   * tile sizes are `constexpr` in a namespace per kernel and mirrored as consts in the wrapper.
//
// Kernels:
//   attention_prepare_<t>       RMSNorm then RoPE of the rows of q or k (f32 math, stores <t>)
//   attention_flash_<t>_d<D>    flash-attention forward on tensor cores, t in {bf16, f16},
//                               D in {64, 128}; f32 accumulation
//   attention_flash_f32         flash-attention forward in plain f32 FMA (the f32 path), D <= 256
//   attention_softmax_<t>       row softmax of a materialised score matrix (the naive baseline)

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

struct F32Elem {
    using T = float;
    static __device__ __forceinline__ float to_float(float x) { return x; }
    static __device__ __forceinline__ float from_float(float x) { return x; }
};

struct Bf16Elem {
    using T = unsigned short;
    static __device__ __forceinline__ float to_float(unsigned short x)
    {
        return __uint_as_float(static_cast<unsigned>(x) << 16);
    }
    static __device__ __forceinline__ unsigned short from_float(float x)
    {
        unsigned short r;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
        return r;
    }
    // Two values as one 32-bit register: `lo` in the low half (the lower-indexed element, as
    // memory order and the mma fragments have it). cvt.rn.bf16x2.f32 d, a, b puts a in the
    // upper half and b in the lower half.
    static __device__ __forceinline__ unsigned pack2(float lo, float hi)
    {
        unsigned r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
    // d (16x8 f32) += a (16x16, row) * b (16x8, col), see the fragment layouts below.
    static __device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1)
    {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

struct F16Elem {
    using T = unsigned short;
    static __device__ __forceinline__ float to_float(unsigned short x)
    {
        float r;
        asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x));
        return r;
    }
    static __device__ __forceinline__ unsigned short from_float(float x)
    {
        unsigned short r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
        return r;
    }
    static __device__ __forceinline__ unsigned pack2(float lo, float hi)
    {
        unsigned r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
    static __device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1)
    {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

// -inf: the score of a masked key and the running max before any key.
#define NEG_INF __int_as_float(static_cast<int>(0xff800000u))

__device__ __forceinline__ float warp_sum(float x)
{
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

__device__ __forceinline__ float warp_max(float x)
{
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

// ---------------------------------------------------------------------------------------------
// attention_prepare: out[r] = rope(rms_norm(x[r])) for each row r of x [rows, D], row r at
// sequence position r % seq_len, exactly the reference's order:
//   RMSNorm (use_norm): x * (1 / sqrt(mean(x^2) + eps)) * weight[e];
//   RoPE (use_rope, D even): pair (x[2i], x[2i+1]) -> (x0 c - x1 s, x0 s + x1 c) with
//   c = cos[pos * D/2 + i], s = sin[pos * D/2 + i].
// f32 math, stored as the element type. One warp per row; lanes stride over the row.
// Grid: x = ceil(rows / WARPS). Block: THREADS.
// ---------------------------------------------------------------------------------------------

namespace attention_prepare_cfg {
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
}  // namespace attention_prepare_cfg

template <typename E>
__device__ __forceinline__ void prepare_body(const typename E::T* __restrict__ x,
                                             const typename E::T* __restrict__ weight,
                                             const typename E::T* __restrict__ cos_table,
                                             const typename E::T* __restrict__ sin_table,
                                             typename E::T* __restrict__ out,
                                             int rows,
                                             int seq_len,
                                             int head_dim,
                                             int use_norm,
                                             int use_rope,
                                             float eps)
{
    using namespace attention_prepare_cfg;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps leave together: row is uniform per warp
    const long long base = static_cast<long long>(row) * head_dim;
    const typename E::T* src = x + base;
    typename E::T* dst = out + base;
    float inv = 1.0f;
    if (use_norm) {
        float sum_sq = 0.0f;
        for (int e = lane; e < head_dim; e += 32) {
            const float a = E::to_float(src[e]);
            sum_sq = fmaf(a, a, sum_sq);
        }
        sum_sq = warp_sum(sum_sq);
        inv = 1.0f / sqrtf(sum_sq / static_cast<float>(head_dim) + eps);
    }
    if (use_rope) {
        const int half = head_dim / 2;
        const long long at = static_cast<long long>(row % seq_len) * half;
        for (int i = lane; i < half; i += 32) {
            float x0 = E::to_float(src[2 * i]) * inv;
            float x1 = E::to_float(src[2 * i + 1]) * inv;
            if (use_norm) {
                x0 *= E::to_float(weight[2 * i]);
                x1 *= E::to_float(weight[2 * i + 1]);
            }
            const float c = E::to_float(cos_table[at + i]);
            const float s = E::to_float(sin_table[at + i]);
            dst[2 * i] = E::from_float(x0 * c - x1 * s);
            dst[2 * i + 1] = E::from_float(x0 * s + x1 * c);
        }
    } else {
        for (int e = lane; e < head_dim; e += 32) {
            float a = E::to_float(src[e]) * inv;
            if (use_norm) a *= E::to_float(weight[e]);
            dst[e] = E::from_float(a);
        }
    }
}

#define FAPE_ATTENTION_PREPARE(NAME, ELEM)                                                            \
    extern "C" __global__ void __launch_bounds__(attention_prepare_cfg::THREADS)                      \
        NAME(const ELEM::T* x, const ELEM::T* weight, const ELEM::T* cos_table, const ELEM::T* sin_table, \
             ELEM::T* out, int rows, int seq_len, int head_dim, int use_norm, int use_rope, float eps)  \
    {                                                                                                 \
        prepare_body<ELEM>(x, weight, cos_table, sin_table, out, rows, seq_len, head_dim, use_norm,    \
                           use_rope, eps);                                                            \
    }

FAPE_ATTENTION_PREPARE(attention_prepare_f32, F32Elem)
FAPE_ATTENTION_PREPARE(attention_prepare_bf16, Bf16Elem)
FAPE_ATTENTION_PREPARE(attention_prepare_f16, F16Elem)

// ---------------------------------------------------------------------------------------------
// attention_flash_<t>_d<D>: flash-attention forward on tensor cores (FlashAttention-2 style).
//
//   out[bh, i, :] = sum_j softmax_j(q[bh, i, :] . k[bh, j, :] * scale) v[bh, j, :]
//
// q, k, v already normed/rotated (attention_prepare), 16-bit elements, f32 accumulation.
// Grid: x = ceil(Lq / BLOCK_M) query tiles (BLOCK_M = 128), y = B*H heads. Block: WARPS = 4
// warps; warp w owns the WARP_ROWS = 32 query rows [q0 + 32w, q0 + 32w + 32) of the block's
// tile as M_TILES = 2 m-tiles of 16 rows, so every K and V fragment loaded with ldmatrix feeds
// 4 MMAs (2 per m-tile). Keys per tile: BLOCK_N = 64 at D = 64, 32 at D = 128. Dynamic shared
// memory: SMEM_BYTES(D) = Q tile + 2 K tiles + 2 V tiles, each row padded to STRIDE = D + 8
// elements.
//
// Per block: the Q tile and K/V tile 0 are fetched with cp.async (one commit group); iteration
// j fetches K/V tile j+1 into the other buffer before computing tile j (double buffering).
// Rows past Lq or Lk are zero-filled by cp.async (src-size 0), so no garbage (or NaN) enters a
// product; scores of keys >= Lk are set to -inf, rows >= Lq are never stored.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16/.f16 inputs, .f32 accumulators); lane
// = threadIdx.x % 32, g = lane / 4 (0..7), t = lane % 4 (0..3). Each .b32 register of A/B
// holds two 16-bit elements, the lower-indexed one in the low half.
//   A (16x16, row-major, M x K):  a0 = A[g][2t, 2t+1]     a1 = A[g+8][2t, 2t+1]
//                                 a2 = A[g][2t+8, 2t+9]   a3 = A[g+8][2t+8, 2t+9]
//   B (16x8, K x N, "col"):       b0 = B[2t, 2t+1][g]     b1 = B[2t+8, 2t+9][g]
//   C/D (16x8 f32):               c0, c1 = C[g][2t, 2t+1] c2, c3 = C[g+8][2t, 2t+1]
// ldmatrix.m8n8.x4.b16: lanes 8m..8m+7 give the addresses of rows 0..7 of matrix m (16 bytes
// each); register m of every lane receives matrix m:
//   plain:  lane holds M[g][2t, 2t+1]
//   .trans: lane holds M[2t][g], M[2t+1][g]   (M as stored: rows = the addressed rows)
//
// How each operand is fetched (m = lane / 8, r = lane % 8 name the matrix and row a lane
// addresses; all tiles are row-major in shared memory):
//   Q (A of S = Q K^T), k-step kk (dims 16kk..16kk+15): matrices (rows 0-7, dims 0-7),
//     (rows 8-15, dims 0-7), (rows 0-7, dims 8-15), (rows 8-15, dims 8-15) = a0, a1, a2, a3.
//     Lane address: row = 32w + 16mt + lane % 16, dim = 16kk + 8 (lane / 16).
//   K (B of S = Q K^T, B[d][n] = K[n][d], so B "col" is K row-major, plain ldmatrix): for keys
//     16p..16p+15 and k-step kk: matrices (keys 0-7, dims 0-7) = b0 and (keys 0-7, dims 8-15) =
//     b1 of key block 2p; (keys 8-15, dims 0-7) = b0, (keys 8-15, dims 8-15) = b1 of block 2p+1.
//     Lane address: key = 16p + 8 (m / 2) + r, dim = 16kk + 8 (m % 2).
//   P (A of O = P V) straight from the S accumulators: key block n's c0,c1 are P[g][8n+2t, +1]
//     and c2,c3 are P[g+8][8n+2t, +1]; for key k-step kk (keys 16kk..16kk+15):
//     a0 = pack(S[2kk].c0, c1), a1 = pack(S[2kk].c2, c3), a2 = pack(S[2kk+1].c0, c1),
//     a3 = pack(S[2kk+1].c2, c3).
//   V (B of O = P V, B[key][d] = V[key][d]: b0 = V[2t, 2t+1][g], the .trans layout of the
//     matrix with rows = keys): for keys 16kk.. and dims 16p..16p+15: matrices (keys 0-7,
//     dims 0-7) = b0 and (keys 8-15, dims 0-7) = b1 of dim block 2p; (keys 0-7, dims 8-15) =
//     b0, (keys 8-15, dims 8-15) = b1 of dim block 2p+1.
//     Lane address: key = 16kk + 8 (m % 2) + r, dim = 16p + 8 (m / 2).
// Bank conflicts: a padded row is (D + 8) * 2 bytes = 36 or 68 words, so the 8 rows of one
// ldmatrix phase start at words 4r (mod 32) and their 16-byte pieces cover all 32 banks once.
//
// Online softmax per row (lanes g and g+8 rows of each quad, reduced over the 4 lanes of the
// quad with shfl_xor 1, 2), in base 2 with the scale pre-multiplied by log2(e):
//   s = acc * scale_log2; m_new = max(m, max_j s_j); base = m_new, or 0 when m_new = -inf;
//   alpha = 2^(m - base); p_j = 2^(s_j - base); l = alpha l + sum_j p_j; o = alpha o + P V.
// s - base <= 0, so huge scores never overflow; -inf - -inf never happens (base is finite).
// l is kept per lane (its own columns) and reduced over the quad once at the end.
// ---------------------------------------------------------------------------------------------

namespace attention_flash_cfg {
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int M_TILES = 2;                   // 16-row m-tiles per warp
constexpr int WARP_ROWS = 16 * M_TILES;      // query rows per warp
constexpr int BLOCK_M = WARPS * WARP_ROWS;   // query rows per block
constexpr int PAD = 8;                       // 16-bit elements of padding per shared row
// Keys per K/V tile at D = 64 and at D = 128 (where S must leave registers for the 128 of
// the O accumulators).
constexpr int BLOCK_N_D64 = 64;
constexpr int BLOCK_N_D128 = 32;
}  // namespace attention_flash_cfg

template <int D>
struct FlashShape {
    static_assert(D == 64 || D == 128, "the register budget is planned for D = 64 and 128");
    static constexpr int BLOCK_N = D == 64 ? attention_flash_cfg::BLOCK_N_D64 : attention_flash_cfg::BLOCK_N_D128;
    // The warp's Q fragments stay in registers at D = 64 (32 registers). At D = 128 they would
    // take 64 beside the 128 of the O accumulators and spill (ptxas, sm_80 and sm_90a): there
    // each k-step reloads them from the Q tile with ldmatrix (as FlashAttention-2 does), one Q
    // load per 4 MMAs as for K.
    static constexpr bool Q_IN_REGISTERS = D <= 64;
    static constexpr int STRIDE = D + attention_flash_cfg::PAD;  // elements per shared row
    static constexpr int CHUNKS = D / 8;                         // 16-byte pieces per row
    static constexpr int Q_ELEMS = attention_flash_cfg::BLOCK_M * STRIDE;
    static constexpr int KV_ELEMS = BLOCK_N * STRIDE;
    static constexpr int SMEM_BYTES = (Q_ELEMS + 4 * KV_ELEMS) * 2;
};

__device__ __forceinline__ unsigned shared_address(const void* p)
{
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-filled (and src unread) when !valid.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid)
{
    const int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
                 "r"(src_size)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(p)));
}

__device__ __forceinline__ float fast_exp2(float x)
{
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// Issues the cp.async copies of rows [row0, row0 + ROWS) of `src` (rows of D elements) into the
// padded shared tile `dst`; rows >= limit are zero-filled. Every thread of the block takes part.
template <int D, int ROWS>
__device__ __forceinline__ void load_tile(unsigned short* dst, const unsigned short* src, int row0, int limit)
{
    using Shape = FlashShape<D>;
    constexpr int TOTAL = ROWS * Shape::CHUNKS;
    static_assert(TOTAL % attention_flash_cfg::THREADS == 0, "whole rounds of 16-byte copies");
#pragma unroll
    for (int it = 0; it < TOTAL / attention_flash_cfg::THREADS; ++it) {
        const int i = it * attention_flash_cfg::THREADS + static_cast<int>(threadIdx.x);
        const int r = i / Shape::CHUNKS;
        const int c = i % Shape::CHUNKS;
        const bool valid = row0 + r < limit;
        const unsigned short* from = valid ? src + static_cast<long long>(row0 + r) * D + c * 8 : src;
        cp_async_16(dst + r * Shape::STRIDE + c * 8, from, valid);
    }
}

template <typename E, int D>
__device__ __forceinline__ void flash_body(const unsigned short* __restrict__ q,
                                           const unsigned short* __restrict__ k,
                                           const unsigned short* __restrict__ v,
                                           unsigned short* __restrict__ out,
                                           int q_len,
                                           int k_len,
                                           float scale_log2)
{
    using namespace attention_flash_cfg;
    using Shape = FlashShape<D>;
    constexpr int BLOCK_N = Shape::BLOCK_N;
    constexpr int STRIDE = Shape::STRIDE;
    constexpr int KSTEPS = D / 16;        // mma k-steps of S = Q K^T
    constexpr int DBLOCKS = D / 8;        // 8-column blocks of O
    constexpr int NBLOCKS = BLOCK_N / 8;  // 8-key blocks of S
    extern __shared__ __align__(16) unsigned short smem[];
    unsigned short* const s_q = smem;
    unsigned short* const s_k = smem + Shape::Q_ELEMS;         // 2 buffers
    unsigned short* const s_v = s_k + 2 * Shape::KV_ELEMS;     // 2 buffers

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int q0 = blockIdx.x * BLOCK_M;
    const long long head = blockIdx.y;
    const unsigned short* const q_head = q + head * q_len * D;
    const unsigned short* const k_head = k + head * k_len * D;
    const unsigned short* const v_head = v + head * k_len * D;
    unsigned short* const out_head = out + head * q_len * D;
    const int tiles = (k_len + BLOCK_N - 1) / BLOCK_N;

    load_tile<D, BLOCK_M>(s_q, q_head, q0, q_len);
    load_tile<D, BLOCK_N>(s_k, k_head, 0, k_len);
    load_tile<D, BLOCK_N>(s_v, v_head, 0, k_len);
    cp_async_commit();

    // Per m-tile mt (the warp's rows 16 mt .. 16 mt + 15): Q fragments (when held), O
    // accumulators, and the running max and sum of rows g and g+8 (base-2 units; the sum over
    // this lane's columns).
    constexpr bool Q_REGS = Shape::Q_IN_REGISTERS;
    unsigned q_frag[Q_REGS ? M_TILES : 1][Q_REGS ? KSTEPS : 1][4];
    const auto q_address = [&](int mt, int kk) {
        return s_q + (warp * WARP_ROWS + mt * 16 + (lane & 15)) * STRIDE + kk * 16 + (lane >> 4) * 8;
    };
    float o[M_TILES][DBLOCKS][4];
    float row_max[M_TILES][2];
    float row_sum[M_TILES][2];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
        for (int db = 0; db < DBLOCKS; ++db) o[mt][db][0] = o[mt][db][1] = o[mt][db][2] = o[mt][db][3] = 0.0f;
        row_max[mt][0] = row_max[mt][1] = NEG_INF;
        row_sum[mt][0] = row_sum[mt][1] = 0.0f;
    }

    for (int j = 0; j < tiles; ++j) {
        const int buf = j & 1;
        if (j + 1 < tiles) {
            // Buffer buf^1 was last read in iteration j-1, which ended with __syncthreads.
            load_tile<D, BLOCK_N>(s_k + (buf ^ 1) * Shape::KV_ELEMS, k_head, (j + 1) * BLOCK_N, k_len);
            load_tile<D, BLOCK_N>(s_v + (buf ^ 1) * Shape::KV_ELEMS, v_head, (j + 1) * BLOCK_N, k_len);
            cp_async_commit();
            cp_async_wait<1>();  // every group but the newest (tile j+1) has landed
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // tile j (and at j = 0 the Q tile) is visible to every thread

        if constexpr (Q_REGS) {
            if (j == 0) {
#pragma unroll
                for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
                    for (int kk = 0; kk < KSTEPS; ++kk) ldmatrix_x4(q_frag[mt][kk], q_address(mt, kk));
            }
        }
        const unsigned short* const k_tile = s_k + buf * Shape::KV_ELEMS;
        const unsigned short* const v_tile = s_v + buf * Shape::KV_ELEMS;

        // S = Q K^T for this warp's rows and the tile's keys; each K fragment feeds every m-tile.
        float s[M_TILES][NBLOCKS][4];
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
            for (int nb = 0; nb < NBLOCKS; ++nb) s[mt][nb][0] = s[mt][nb][1] = s[mt][nb][2] = s[mt][nb][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            unsigned a[M_TILES][4];
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt) {
                if constexpr (Q_REGS) {
#pragma unroll
                    for (int r = 0; r < 4; ++r) a[mt][r] = q_frag[mt][kk][r];
                } else {
                    ldmatrix_x4(a[mt], q_address(mt, kk));
                }
            }
#pragma unroll
            for (int p = 0; p < NBLOCKS / 2; ++p) {
                unsigned b[4];
                ldmatrix_x4(b, k_tile + (p * 16 + (lane >> 4) * 8 + (lane & 7)) * STRIDE + kk * 16 +
                                   ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int mt = 0; mt < M_TILES; ++mt) {
                    E::mma(s[mt][2 * p], a[mt], b[0], b[1]);
                    E::mma(s[mt][2 * p + 1], a[mt], b[2], b[3]);
                }
            }
        }

        // Scale into base-2 units; mask keys past Lk (only the last tile can have them).
        const int key0 = j * BLOCK_N;
        const bool full = key0 + BLOCK_N <= k_len;
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
            for (int nb = 0; nb < NBLOCKS; ++nb)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int key = key0 + nb * 8 + 2 * t + (c & 1);
                    s[mt][nb][c] = full || key < k_len ? s[mt][nb][c] * scale_log2 : NEG_INF;
                }

        // Online softmax per m-tile: c0, c1 belong to row g (r = 0), c2, c3 to row g+8 (r = 1).
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt) {
            float tile_max[2] = {row_max[mt][0], row_max[mt][1]};
#pragma unroll
            for (int nb = 0; nb < NBLOCKS; ++nb) {
                tile_max[0] = fmaxf(tile_max[0], fmaxf(s[mt][nb][0], s[mt][nb][1]));
                tile_max[1] = fmaxf(tile_max[1], fmaxf(s[mt][nb][2], s[mt][nb][3]));
            }
            float base[2];
            float alpha[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
                tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
                base[r] = tile_max[r] == NEG_INF ? 0.0f : tile_max[r];
                alpha[r] = fast_exp2(row_max[mt][r] - base[r]);  // 0 while row_max is still -inf
                row_max[mt][r] = tile_max[r];
            }
            float tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
            for (int nb = 0; nb < NBLOCKS; ++nb) {
                s[mt][nb][0] = fast_exp2(s[mt][nb][0] - base[0]);
                s[mt][nb][1] = fast_exp2(s[mt][nb][1] - base[0]);
                s[mt][nb][2] = fast_exp2(s[mt][nb][2] - base[1]);
                s[mt][nb][3] = fast_exp2(s[mt][nb][3] - base[1]);
                tile_sum[0] += s[mt][nb][0] + s[mt][nb][1];
                tile_sum[1] += s[mt][nb][2] + s[mt][nb][3];
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) row_sum[mt][r] = row_sum[mt][r] * alpha[r] + tile_sum[r];
#pragma unroll
            for (int db = 0; db < DBLOCKS; ++db) {
                o[mt][db][0] *= alpha[0];
                o[mt][db][1] *= alpha[0];
                o[mt][db][2] *= alpha[1];
                o[mt][db][3] *= alpha[1];
            }
        }

        // O += P V over the tile's keys, 16 at a time; each V fragment feeds every m-tile.
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            unsigned a[M_TILES][4];
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt) {
                a[mt][0] = E::pack2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = E::pack2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = E::pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = E::pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int p = 0; p < DBLOCKS / 2; ++p) {
                unsigned b[4];
                ldmatrix_x4_trans(b, v_tile + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * STRIDE + p * 16 +
                                         (lane >> 4) * 8);
#pragma unroll
                for (int mt = 0; mt < M_TILES; ++mt) {
                    E::mma(o[mt][2 * p], a[mt], b[0], b[1]);
                    E::mma(o[mt][2 * p + 1], a[mt], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with buffer buf before iteration j+1 refills it
    }

    // Normalise and store. The warp stages its rows in its own rows of the Q tile (read only
    // by this warp, at j = 0), then writes whole 16-byte pieces of rows < Lq.
    unsigned short* const staged = s_q + warp * WARP_ROWS * STRIDE;
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
        float inv[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            row_sum[mt][r] += __shfl_xor_sync(0xffffffffu, row_sum[mt][r], 1);
            row_sum[mt][r] += __shfl_xor_sync(0xffffffffu, row_sum[mt][r], 2);
            inv[r] = 1.0f / row_sum[mt][r];
        }
        unsigned short* const rows = staged + mt * 16 * STRIDE;
#pragma unroll
        for (int db = 0; db < DBLOCKS; ++db) {
            *reinterpret_cast<unsigned*>(rows + g * STRIDE + db * 8 + 2 * t) =
                E::pack2(o[mt][db][0] * inv[0], o[mt][db][1] * inv[0]);
            *reinterpret_cast<unsigned*>(rows + (g + 8) * STRIDE + db * 8 + 2 * t) =
                E::pack2(o[mt][db][2] * inv[1], o[mt][db][3] * inv[1]);
        }
    }
    __syncwarp();
    constexpr int PIECES = WARP_ROWS * Shape::CHUNKS;
    static_assert(PIECES % 32 == 0, "whole rounds of 16-byte stores");
#pragma unroll
    for (int it = 0; it < PIECES / 32; ++it) {
        const int i = it * 32 + lane;
        const int r = i / Shape::CHUNKS;
        const int c = i % Shape::CHUNKS;
        const int row = q0 + warp * WARP_ROWS + r;
        if (row < q_len)
            *reinterpret_cast<uint4*>(out_head + static_cast<long long>(row) * D + c * 8) =
                *reinterpret_cast<const uint4*>(staged + r * STRIDE + c * 8);
    }
}

#define FAPE_ATTENTION_FLASH(NAME, ELEM, D)                                                             \
    extern "C" __global__ void __launch_bounds__(attention_flash_cfg::THREADS)                          \
        NAME(const unsigned short* q, const unsigned short* k, const unsigned short* v, unsigned short* out, \
             int q_len, int k_len, float scale_log2)                                                    \
    {                                                                                                   \
        flash_body<ELEM, D>(q, k, v, out, q_len, k_len, scale_log2);                                    \
    }

FAPE_ATTENTION_FLASH(attention_flash_bf16_d64, Bf16Elem, 64)
FAPE_ATTENTION_FLASH(attention_flash_bf16_d128, Bf16Elem, 128)
FAPE_ATTENTION_FLASH(attention_flash_f16_d64, F16Elem, 64)
FAPE_ATTENTION_FLASH(attention_flash_f16_d128, F16Elem, 128)

// ---------------------------------------------------------------------------------------------
// attention_flash_f32: the f32 path (checks at f32 tolerance, any D <= MAX_D). Same contract
// as the tensor-core kernel, in plain f32 FMA with expf.
// Grid: x = ceil(Lq / BLOCK_M), y = B*H. Block: THREADS. Warp w owns query rows
// q0 + ROWS_PER_WARP w + [0, ROWS_PER_WARP); lane j scores key j of each BLOCK_N-key tile,
// lane l accumulates output columns l, l + 32, ... (< D).
// Dynamic shared memory (floats): q tile [BLOCK_M][D], k tile [BLOCK_N][D+1] (odd stride: lane
// j reads row j, conflict-free), v tile [BLOCK_N][D]; see attention_flash_f32_smem in the wrapper.
// ---------------------------------------------------------------------------------------------

namespace attention_flash_f32_cfg {
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int ROWS_PER_WARP = 4;
constexpr int BLOCK_M = WARPS * ROWS_PER_WARP;
constexpr int BLOCK_N = 32;  // one key per lane
constexpr int MAX_D = 256;
constexpr int COLS = MAX_D / 32;  // output columns per lane at most
}  // namespace attention_flash_f32_cfg

extern "C" __global__ void __launch_bounds__(attention_flash_f32_cfg::THREADS)
    attention_flash_f32(const float* __restrict__ q,
                        const float* __restrict__ k,
                        const float* __restrict__ v,
                        float* __restrict__ out,
                        int q_len,
                        int k_len,
                        int head_dim,
                        float scale)
{
    using namespace attention_flash_f32_cfg;
    extern __shared__ __align__(16) float smem_f32[];
    const int d = head_dim;
    float* const s_q = smem_f32;
    float* const s_k = s_q + BLOCK_M * d;
    float* const s_v = s_k + BLOCK_N * (d + 1);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int q0 = blockIdx.x * BLOCK_M;
    const long long head = blockIdx.y;
    const float* const q_head = q + head * q_len * d;
    const float* const k_head = k + head * k_len * d;
    const float* const v_head = v + head * k_len * d;
    float* const out_head = out + head * q_len * d;

    for (int i = threadIdx.x; i < BLOCK_M * d; i += THREADS) {
        const int row = q0 + i / d;
        s_q[i] = row < q_len ? q_head[static_cast<long long>(row) * d + i % d] : 0.0f;
    }
    float acc[ROWS_PER_WARP][COLS];
    float row_max[ROWS_PER_WARP];
    float row_sum[ROWS_PER_WARP];
#pragma unroll
    for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
        row_max[rr] = NEG_INF;
        row_sum[rr] = 0.0f;
#pragma unroll
        for (int c = 0; c < COLS; ++c) acc[rr][c] = 0.0f;
    }

    for (int key0 = 0; key0 < k_len; key0 += BLOCK_N) {
        __syncthreads();  // the previous tile is consumed (first pass: orders nothing, harmless)
        for (int i = threadIdx.x; i < BLOCK_N * d; i += THREADS) {
            const int r = i / d;
            const int e = i % d;
            const bool valid = key0 + r < k_len;
            const long long at = static_cast<long long>(key0 + r) * d + e;
            s_k[r * (d + 1) + e] = valid ? k_head[at] : 0.0f;
            s_v[r * d + e] = valid ? v_head[at] : 0.0f;
        }
        __syncthreads();
        const bool key_valid = key0 + lane < k_len;
        // Scores of the warp's rows against key key0 + lane: each k element read once.
        float score[ROWS_PER_WARP];
#pragma unroll
        for (int rr = 0; rr < ROWS_PER_WARP; ++rr) score[rr] = 0.0f;
        const float* const k_row = s_k + lane * (d + 1);
        const float* const q_rows = s_q + warp * ROWS_PER_WARP * d;
        for (int e = 0; e < d; ++e) {
            const float ke = k_row[e];
#pragma unroll
            for (int rr = 0; rr < ROWS_PER_WARP; ++rr) score[rr] = fmaf(q_rows[rr * d + e], ke, score[rr]);
        }
        float p[ROWS_PER_WARP];
#pragma unroll
        for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
            const float sc = key_valid ? score[rr] * scale : NEG_INF;
            const float tile_max = fmaxf(warp_max(sc), row_max[rr]);
            const float base = tile_max == NEG_INF ? 0.0f : tile_max;
            const float alpha = expf(row_max[rr] - base);  // 0 while row_max is still -inf
            p[rr] = expf(sc - base);
            row_sum[rr] = row_sum[rr] * alpha + warp_sum(p[rr]);
            row_max[rr] = tile_max;
#pragma unroll
            for (int c = 0; c < COLS; ++c) acc[rr][c] *= alpha;
        }
        for (int jj = 0; jj < BLOCK_N; ++jj) {
            const float* const v_row = s_v + jj * d;
            float vj[COLS];
#pragma unroll
            for (int c = 0; c < COLS; ++c) vj[c] = lane + 32 * c < d ? v_row[lane + 32 * c] : 0.0f;
#pragma unroll
            for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
                const float pj = __shfl_sync(0xffffffffu, p[rr], jj);
#pragma unroll
                for (int c = 0; c < COLS; ++c) acc[rr][c] = fmaf(pj, vj[c], acc[rr][c]);
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
        const int row = q0 + warp * ROWS_PER_WARP + rr;
        if (row >= q_len) continue;
        const float inv = 1.0f / row_sum[rr];
#pragma unroll
        for (int c = 0; c < COLS; ++c) {
            const int col = lane + 32 * c;
            if (col < d) out_head[static_cast<long long>(row) * d + col] = acc[rr][c] * inv;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// attention_softmax_<t>: the naive baseline's row softmax, in place on scores [rows, cols]
// already multiplied by the scale: x = exp(x - max) / sum(exp(x - max)), f32 math, stored as
// the element type. One block per row (grid-stride over rows past gridDim.x), THREADS threads.
// ---------------------------------------------------------------------------------------------

namespace attention_softmax_cfg {
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
}  // namespace attention_softmax_cfg

// The block-wide reduction of `x` (max when is_max, else sum); every thread gets the result.
__device__ __forceinline__ float block_reduce(float x, bool is_max, float* scratch)
{
    using namespace attention_softmax_cfg;
    x = is_max ? warp_max(x) : warp_sum(x);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
    __syncthreads();
    float total = scratch[0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) total = is_max ? fmaxf(total, scratch[w]) : total + scratch[w];
    __syncthreads();  // scratch is reused by the next reduction
    return total;
}

template <typename E>
__device__ __forceinline__ void softmax_body(typename E::T* __restrict__ x, int rows, int cols)
{
    using namespace attention_softmax_cfg;
    __shared__ float scratch[WARPS];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        typename E::T* const r = x + static_cast<long long>(row) * cols;
        float m = NEG_INF;
        for (int c = threadIdx.x; c < cols; c += THREADS) m = fmaxf(m, E::to_float(r[c]));
        m = block_reduce(m, true, scratch);
        const float base = m == NEG_INF ? 0.0f : m;
        float total = 0.0f;
        for (int c = threadIdx.x; c < cols; c += THREADS) total += expf(E::to_float(r[c]) - base);
        total = block_reduce(total, false, scratch);
        const float inv = 1.0f / total;
        for (int c = threadIdx.x; c < cols; c += THREADS) r[c] = E::from_float(expf(E::to_float(r[c]) - base) * inv);
    }
}

#define FAPE_ATTENTION_SOFTMAX(NAME, ELEM)                                                          \
    extern "C" __global__ void __launch_bounds__(attention_softmax_cfg::THREADS)                    \
        NAME(ELEM::T* x, int rows, int cols)                                                        \
    {                                                                                               \
        softmax_body<ELEM>(x, rows, cols);                                                          \
    }

FAPE_ATTENTION_SOFTMAX(attention_softmax_f32, F32Elem)
FAPE_ATTENTION_SOFTMAX(attention_softmax_bf16, Bf16Elem)
FAPE_ATTENTION_SOFTMAX(attention_softmax_f16, F16Elem)
