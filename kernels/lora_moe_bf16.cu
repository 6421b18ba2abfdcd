// The fused bf16 LoRA-MoE path of fape-kernels, compiled at run time with NVRTC (see
// src/backend/cuda.rs); launch wrappers in src/lora_moe/cuda/fused.rs.
//
// Self-contained (NVRTC has no system include path): bf16 values travel as their raw 16 bits
// (`unsigned short`), widened with a shift and narrowed with round-to-nearest-even here.
// Extents are int, flat offsets 64-bit; tile sizes are `constexpr` and mirrored in the wrapper.
//
// The layer, for P projections p that read the same x [M = B*T, d] (q, k, v: one shrink, one
// GEMM), E experts of rank r each (W = E*r shrink columns per projection):
//
//   1. lora_moe_shrink_bf16, ONE pass over x (a tile of tokens plus the (taps-1)/2 halo):
//        s[m, :]      = x[m, :] . S^T      S = [A_cat of every projection ; routers] (bf16 [S_rows, d],
//                                          rows padded with zeros to a multiple of 8; tensor cores)
//        xa[m, 0:d]   = x[m, :]            (the base part of the augmented activations)
//        partials     = per-image sums of low(x)^2, (x - low(x))^2, x^2 over the tile (f64)
//      The band filters run along tokens and the shrink along features, so they commute:
//      band_e(x) A_e^T = band_e(x A_e^T); the shrink goes first and the filter runs on W columns
//      instead of d. The kernel splits d across blocks (SPLIT_COLS per block) for parallelism;
//      s holds one partial sum per split, added in step 2. With guidance the router logits come
//      from a second launch of the same kernel over the guidance with the routers alone.
//   2. lora_moe_gate_bf16, per tile of tokens: the image's prior from the energy partials, the
//      gates from the router logits (softmax with temperature, blended with the prior by lambda,
//      top-k renormalised; the semantics of src/lora_moe/gating.rs), then
//        xa[m, d + p*W + e*r + j] = scale * gate[m, p, e] * band_e(s_p)[m, e*r + j]   (bf16)
//      filtering s along tokens within the image (zero padding), and zeros in the pad columns.
//   3. cuBLASLt: y = xa . Wp^T + bias, Wp = [W_p | 0 .. B_p .. 0] packed once by
//      lora_moe_pack_bf16 (bf16 in, f32 accumulate, bias in the epilogue).
// ---------------------------------------------------------------------------------------------

typedef unsigned short bf16_bits;

__device__ __forceinline__ float bf16_to_f32(bf16_bits v)
{
    return __uint_as_float(((unsigned int)v) << 16);
}

// Round to nearest even; NaN stays a (quiet) NaN of the same sign.
__device__ __forceinline__ bf16_bits f32_to_bf16(float f)
{
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_bits)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_bits)(u >> 16);
}

// Eight bf16 (one 16-byte vector) widened into dst[0..8).
__device__ __forceinline__ void unpack8(uint4 v, float* dst)
{
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        dst[2 * i] = __uint_as_float(w[i] << 16);
        dst[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

namespace lora_moe_shrink_cfg {
constexpr int THREADS = 256;                             // = blockDim.x
constexpr int TOKENS = 32;                               // tokens per block (tile): two m16 tiles
constexpr int SLAB = 32;                                 // shrink rows (s columns) per block: four n8 tiles
constexpr int ROW_PAD = 8;                               // mat_rows is a multiple of this (n8 tiles)
constexpr int CHUNK = 64;                                // columns of x staged per pass: four k16 steps
constexpr int SPLIT_COLS = 256;                          // columns of x per block (d split)
constexpr int STRIDE = CHUNK + 8;                        // padded shared row, bf16 (36 words)
constexpr int WARPS = THREADS / 32;
constexpr int M_TILES = TOKENS / 16;                     // warp w: m tile w % M_TILES,
constexpr int N_TILES = SLAB / ROW_PAD;                  // n tile w / M_TILES
constexpr int ROW_GROUPS = THREADS / CHUNK;              // energy: rows g*ROWS_E .. +ROWS_E
constexpr int ROWS_E = TOKENS / ROW_GROUPS;              // energy: consecutive rows per thread
static_assert(SPLIT_COLS % CHUNK == 0 && CHUNK % 16 == 0, "whole k16 steps per chunk");
static_assert(STRIDE % 8 == 0, "16-byte aligned shared rows for the uint4 stores");
static_assert(M_TILES * N_TILES == WARPS, "one 16x8 output tile per warp");
static_assert(TOKENS % ROW_GROUPS == 0, "even work split");
}  // namespace lora_moe_shrink_cfg

// d (16x8 f32) += a (16x16 bf16, row) * b (16x8 bf16, col). Fragments (g = lane / 4,
// q = lane % 4; a register holds two bf16, the lower-indexed one in its low half):
//   a0 = A[g][2q, 2q+1], a1 = A[g+8][2q, 2q+1], a2 = A[g][2q+8, +9], a3 = A[g+8][2q+8, +9];
//   b0 = B[2q, 2q+1][g], b1 = B[2q+8, +9][g]   (B "col": the n rows of B^T, row-major);
//   d0, d1 = D[g][2q, 2q+1], d2, d3 = D[g+8][2q, 2q+1].
__device__ __forceinline__ void lora_moe_mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1)
{
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two bf16 at p (4-byte aligned) as one 32-bit fragment register.
__device__ __forceinline__ unsigned lora_moe_pair(const bf16_bits* p)
{
    return *reinterpret_cast<const unsigned*>(p);
}

// Grid: (tiles * splits, ceil(mat_rows / SLAB), B) with tiles = ceil(T / TOKENS), splits =
// ceil(d / SPLIT_COLS); blockIdx.x = tile * splits + split. Block: (THREADS, 1, 1).
// Dynamic shared memory: round_up(taps, 4) floats, then ((TOKENS + taps - 1) + SLAB) * STRIDE
// bf16.
//
// x:        [B*T, d] bf16, 16-byte aligned rows (d % 8 == 0, 16-byte aligned base).
// mat:      [mat_rows, d] bf16, mat_rows a multiple of ROW_PAD (zero rows past the real ones).
// s:        [splits, B*T, mat_rows] f32: the split's partial dot products.
// xa:       [B*T, xa_stride] bf16 or null: blocks of slab 0 copy their x tile into columns 0..d.
// partials: [B, tiles * splits, 3] f64 or null: blocks of slab 0 write their tile's sums of
//           low^2, (x-low)^2, x^2 (low along tokens with h [taps], zero padding in the image).
//
// The shrink runs on the tensor cores: x and the slab stay bf16 in shared memory, and each warp
// accumulates one 16-token x 8-row tile of s in f32 (mma.sync.m16n8k16, products exact, f32
// sums); warps whose 8 rows lie past mat_rows (the last slab) skip the MMAs.
extern "C" __global__ void __launch_bounds__(lora_moe_shrink_cfg::THREADS)
lora_moe_shrink_bf16(const bf16_bits* __restrict__ x,
                     const bf16_bits* __restrict__ mat,
                     float* __restrict__ s,
                     bf16_bits* __restrict__ xa,
                     double* __restrict__ partials,
                     const float* __restrict__ h,
                     int tokens,
                     int d,
                     int mat_rows,
                     int xa_stride,
                     int taps)
{
    using namespace lora_moe_shrink_cfg;
    extern __shared__ __align__(16) float smem[];
    __shared__ double red[WARPS][3];

    const int splits = (d + SPLIT_COLS - 1) / SPLIT_COLS;
    const int tiles = (tokens + TOKENS - 1) / TOKENS;
    const int tile = blockIdx.x / splits;
    const int split = blockIdx.x % splits;
    const int slab = blockIdx.y;
    const int b = blockIdx.z;
    const int batch = gridDim.z;
    const int tid = threadIdx.x;
    const int t0 = tile * TOKENS;
    const bool energy = partials != nullptr && slab == 0;   // uniform per block
    const bool copy = xa != nullptr && slab == 0;
    const int half = energy ? (taps - 1) / 2 : 0;
    const int rows = TOKENS + 2 * half;                      // staged rows: tile + halo
    const long long image_row = (long long)b * tokens;     // row of token 0 of image b

    float* hs = smem;                                        // [taps], padded to 16 bytes
    bf16_bits* xs = reinterpret_cast<bf16_bits*>(smem + ((taps + 3) & ~3));  // [rows][STRIDE]
    bf16_bits* as = xs + (TOKENS + taps - 1) * STRIDE;      // [SLAB][STRIDE]
    if (energy)
        for (int j = tid; j < taps; j += THREADS) hs[j] = h[j];

    const int lane = tid % 32;
    const int g = lane / 4;
    const int q = lane % 4;
    const int mt = (tid / 32) % M_TILES;                     // this warp's tokens mt*16 ..
    const int nt = (tid / 32) / M_TILES;                     // and slab rows nt*8 ..
    const int n0 = slab * SLAB + nt * ROW_PAD;
    const bool mma_warp = n0 < mat_rows;                     // uniform per warp
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int ec = tid % CHUNK;                              // energy: this thread's column
    const int er = (tid / CHUNK) * ROWS_E;                   // and tile rows er .. er + ROWS_E
    double e_low = 0.0, e_high = 0.0, e_full = 0.0;

    const int c_begin = split * SPLIT_COLS;
    const int c_end = min(d, c_begin + SPLIT_COLS);
    const int slab_rows = min(SLAB, mat_rows - slab * SLAB);
    for (int c0 = c_begin; c0 < c_end; c0 += CHUNK) {
        __syncthreads();                                     // the previous chunk is consumed
        for (int i = tid; i < rows * (CHUNK / 8); i += THREADS) {
            const int r = i / (CHUNK / 8);
            const int c = c0 + (i % (CHUNK / 8)) * 8;
            const int t = t0 - half + r;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (t >= 0 && t < tokens && c < c_end) {
                const long long off = (image_row + t) * d + c;
                v = *reinterpret_cast<const uint4*>(x + off);
                if (copy && r >= half && r < half + TOKENS)
                    *reinterpret_cast<uint4*>(xa + (image_row + t) * xa_stride + c) = v;
            }
            *reinterpret_cast<uint4*>(xs + r * STRIDE + (c - c0)) = v;
        }
        // Rows past mat_rows (only in the last slab) are read by no warp and not staged.
        for (int i = tid; i < slab_rows * (CHUNK / 8); i += THREADS) {
            const int rr = i / (CHUNK / 8);
            const int c = c0 + (i % (CHUNK / 8)) * 8;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (c < c_end) v = *reinterpret_cast<const uint4*>(mat + (long long)(slab * SLAB + rr) * d + c);
            *reinterpret_cast<uint4*>(as + rr * STRIDE + (c - c0)) = v;
        }
        __syncthreads();

        // Columns past c_end were staged as zeros in both operands. Fragment loads are 32-bit:
        // with rows of 36 words, lane (g, q) reads word 4g + q (mod 32) of its k step, so the
        // 32 lanes hit 32 distinct banks.
        if (mma_warp) {
            const bf16_bits* a_lo = xs + (half + mt * 16 + g) * STRIDE + 2 * q;
            const bf16_bits* a_hi = a_lo + 8 * STRIDE;
            const bf16_bits* b_row = as + (nt * ROW_PAD + g) * STRIDE + 2 * q;
#pragma unroll
            for (int kk = 0; kk < CHUNK; kk += 16) {
                const unsigned a[4] = {lora_moe_pair(a_lo + kk), lora_moe_pair(a_hi + kk), lora_moe_pair(a_lo + kk + 8),
                                       lora_moe_pair(a_hi + kk + 8)};
                lora_moe_mma_bf16(acc, a, lora_moe_pair(b_row + kk), lora_moe_pair(b_row + kk + 8));
            }
        }

        if (energy && c0 + ec < c_end) {
            // low of tile rows er .. er + ROWS_E - 1 with a register window sliding down the
            // staged rows: window[i] holds staged row er + i + j while tap j is applied (staged
            // row r + j is token t0 + r + j - half), so each staged value is loaded once.
            float window[ROWS_E];
            float low[ROWS_E];
#pragma unroll
            for (int i = 0; i < ROWS_E; ++i) {
                window[i] = i > 0 ? bf16_to_f32(xs[(er + i - 1) * STRIDE + ec]) : 0.0f;
                low[i] = 0.0f;
            }
            for (int j = 0; j < taps; ++j) {
#pragma unroll
                for (int i = 0; i + 1 < ROWS_E; ++i) window[i] = window[i + 1];
                window[ROWS_E - 1] = bf16_to_f32(xs[(er + j + ROWS_E - 1) * STRIDE + ec]);
                const float w = hs[j];
#pragma unroll
                for (int i = 0; i < ROWS_E; ++i) low[i] = fmaf(w, window[i], low[i]);
            }
#pragma unroll
            for (int i = 0; i < ROWS_E; ++i) {
                if (t0 + er + i < tokens) {
                    const double xv = (double)bf16_to_f32(xs[(er + i + half) * STRIDE + ec]);
                    const double lv = (double)low[i];
                    e_low += lv * lv;
                    e_high += (xv - lv) * (xv - lv);
                    e_full += xv * xv;
                }
            }
        }
    }

    if (mma_warp) {
        const long long m_rows = (long long)batch * tokens;
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
            const int t = t0 + mt * 16 + g + 8 * hi;
            if (t < tokens) {
                float2 v = make_float2(acc[2 * hi], acc[2 * hi + 1]);
                *reinterpret_cast<float2*>(s + ((long long)split * m_rows + image_row + t) * mat_rows + n0 + 2 * q) = v;
            }
        }
    }

    if (energy) {
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            e_low += __shfl_down_sync(0xffffffffu, e_low, offset);
            e_high += __shfl_down_sync(0xffffffffu, e_high, offset);
            e_full += __shfl_down_sync(0xffffffffu, e_full, offset);
        }
        if (tid % 32 == 0) {
            red[tid / 32][0] = e_low;
            red[tid / 32][1] = e_high;
            red[tid / 32][2] = e_full;
        }
        __syncthreads();
        if (tid < 3) {
            double total = 0.0;
            for (int w = 0; w < WARPS; ++w) total += red[w][tid];
            partials[(((long long)b * tiles + tile) * splits + split) * 3 + tid] = total;
        }
    }
}

namespace lora_moe_gate_cfg {
constexpr int THREADS = 256;                             // = blockDim.x
constexpr int TOKENS = 32;                               // tokens per block (tile)
constexpr int COLS = 32;                                 // u columns staged per pass
constexpr int MAX_EXPERTS = 16;
constexpr int MAX_PROJECTIONS = 4;
constexpr int WARPS = THREADS / 32;
}  // namespace lora_moe_gate_cfg

// Whether gate a of expert ia sorts before gate b of expert ib: descending, NaN first (as f64
// total_cmp orders a positive NaN above +inf), ties to the lower expert.
__device__ __forceinline__ bool lora_moe_gate_before(float a, int ia, float b, int ib)
{
    const bool na = isnan(a);
    const bool nb = isnan(b);
    if (na || nb) return na && (!nb || ia < ib);
    return a > b || (a == b && ia < ib);
}

// Grid: (ceil(T / TOKENS), 1, B). Block: (THREADS, 1, 1).
// Dynamic shared memory: (TOKENS + taps - 1) * COLS + taps floats.
//
// s:        [s_splits, B*T, s_stride] f32 from lora_moe_shrink_bf16; columns p*W + e*r + j are
//           the shrink of projection p (W = experts * rank).
// lg:       [lg_splits, B*T, lg_stride] f32 partial router logits; column lg_col + p*E + e.
// partials: [B, pcount, 3] f64 band-energy partial sums of x; entries = T * d per image.
// bands:    [E] 0 low, 1 high, 2 full; h: [taps].
// xa:       [B*T, xa_stride] bf16: writes columns u_col .. xa_stride (u, then zero padding).
// gates:    [P, B*T, E] f32.
extern "C" __global__ void __launch_bounds__(lora_moe_gate_cfg::THREADS)
lora_moe_gate_bf16(const float* __restrict__ s,
                   int s_splits,
                   int s_stride,
                   const float* __restrict__ lg,
                   int lg_splits,
                   int lg_stride,
                   int lg_col,
                   const double* __restrict__ partials,
                   int pcount,
                   double entries,
                   const int* __restrict__ bands,
                   const float* __restrict__ h,
                   int taps,
                   int tokens,
                   int projections,
                   int experts,
                   int rank,
                   float temperature,
                   float lambda,
                   int top_k,
                   float scale,
                   bf16_bits* __restrict__ xa,
                   int xa_stride,
                   int u_col,
                   float* __restrict__ gates)
{
    using namespace lora_moe_gate_cfg;
    extern __shared__ float smem[];
    __shared__ double red[WARPS][3];
    __shared__ float prior[MAX_EXPERTS];
    __shared__ float gate_s[TOKENS][MAX_PROJECTIONS][MAX_EXPERTS];

    const int tid = threadIdx.x;
    const int b = blockIdx.z;
    const int batch = gridDim.z;
    const int t0 = blockIdx.x * TOKENS;
    const int half = (taps - 1) / 2;
    const int rows = TOKENS + taps - 1;
    const long long image_row = (long long)b * tokens;
    const long long m_rows = (long long)batch * tokens;
    const int width = experts * rank;
    float* staged = smem;                                    // [rows][COLS]
    float* hs = smem + rows * COLS;                          // [taps]
    for (int j = tid; j < taps; j += THREADS) hs[j] = h[j];

    // 1. The prior of image b: energy_e = sum of band_e(x)^2 / entries, normalised.
    double sums[3] = {0.0, 0.0, 0.0};
    for (int i = tid; i < pcount; i += THREADS) {
#pragma unroll
        for (int q = 0; q < 3; ++q) sums[q] += partials[((long long)b * pcount + i) * 3 + q];
    }
#pragma unroll
    for (int q = 0; q < 3; ++q) {
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) sums[q] += __shfl_down_sync(0xffffffffu, sums[q], offset);
    }
    if (tid % 32 == 0) {
#pragma unroll
        for (int q = 0; q < 3; ++q) red[tid / 32][q] = sums[q];
    }
    __syncthreads();
    if (tid == 0) {
        double total[3] = {0.0, 0.0, 0.0};
        for (int w = 0; w < WARPS; ++w) {
#pragma unroll
            for (int q = 0; q < 3; ++q) total[q] += red[w][q];
        }
        double energy[MAX_EXPERTS];
        double energy_sum = 0.0;
#pragma unroll
        for (int e = 0; e < MAX_EXPERTS; ++e) {
            const int band = e < experts ? bands[e] : 0;
            energy[e] = e < experts ? (band == 0 ? total[0] : (band == 1 ? total[1] : total[2])) / entries : 0.0;
            energy_sum += energy[e];
        }
#pragma unroll
        for (int e = 0; e < MAX_EXPERTS; ++e) prior[e] = (float)(energy[e] / (energy_sum + 1e-12));
    }
    __syncthreads();

    // 2. Gates, one thread per (token, projection).
    for (int i = tid; i < TOKENS * projections; i += THREADS) {
        const int tt = i / projections;
        const int p = i % projections;
        const int t = t0 + tt;
        if (t >= tokens) continue;
        const long long m = image_row + t;
        float g[MAX_EXPERTS];
        float max_logit = __int_as_float(0xff800000);  // -inf
        bool any_nan = false;
#pragma unroll
        for (int e = 0; e < MAX_EXPERTS; ++e) {
            float l = 0.0f;
            if (e < experts) {
                for (int sp = 0; sp < lg_splits; ++sp)
                    l += lg[((long long)sp * m_rows + m) * lg_stride + lg_col + p * experts + e];
                l /= temperature;
                any_nan |= isnan(l);
                max_logit = fmaxf(max_logit, l);
            }
            g[e] = l;
        }
        if (any_nan) max_logit = __int_as_float(0x7fc00000);  // NaN: fmaxf drops it, the softmax keeps it
        float sum = 0.0f;
#pragma unroll
        for (int e = 0; e < MAX_EXPERTS; ++e) {
            g[e] = e < experts ? expf(g[e] - max_logit) : 0.0f;
            sum += g[e];
        }
#pragma unroll
        for (int e = 0; e < MAX_EXPERTS; ++e)
            g[e] = e < experts ? lambda * (g[e] / sum) + (1.0f - lambda) * prior[e] : 0.0f;
        if (top_k > 0 && top_k < experts) {
            bool keep[MAX_EXPERTS];
            float kept = 0.0f;
#pragma unroll
            for (int e = 0; e < MAX_EXPERTS; ++e) {
                int before = 0;
#pragma unroll
                for (int o = 0; o < MAX_EXPERTS; ++o)
                    before += (o < experts && o != e && lora_moe_gate_before(g[o], o, g[e], e)) ? 1 : 0;
                keep[e] = e < experts && before < top_k;
                kept += keep[e] ? g[e] : 0.0f;
            }
#pragma unroll
            for (int e = 0; e < MAX_EXPERTS; ++e) g[e] = keep[e] ? g[e] / kept : 0.0f;
        }
#pragma unroll
        for (int e = 0; e < MAX_EXPERTS; ++e) {
            if (e < experts) {
                gate_s[tt][p][e] = g[e];
                gates[((long long)p * m_rows + m) * experts + e] = g[e];
            }
        }
    }

    // 3. u = scale * gate * band(s), COLS columns of the P*W at a time; then the pad columns.
    const int u_width = projections * width;
    for (int col0 = 0; col0 < u_width; col0 += COLS) {
        __syncthreads();                                     // gates written / staged consumed
        for (int i = tid; i < rows * COLS; i += THREADS) {
            const int r = i / COLS;
            const int c = col0 + i % COLS;
            const int t = t0 - half + r;
            float v = 0.0f;
            if (t >= 0 && t < tokens && c < u_width) {
#pragma unroll 4
                for (int sp = 0; sp < s_splits; ++sp) v += s[((long long)sp * m_rows + image_row + t) * s_stride + c];
            }
            staged[i] = v;
        }
        __syncthreads();
        for (int i = tid; i < TOKENS * COLS; i += THREADS) {
            const int tt = i / COLS;
            const int cl = i % COLS;
            const int c = col0 + cl;
            const int t = t0 + tt;
            if (t >= tokens || c >= u_width) continue;
            const int p = c / width;
            const int e = (c % width) / rank;
            const int band = bands[e];
            float low = 0.0f;
            for (int j = 0; j < taps; ++j) low = fmaf(hs[j], staged[(tt + j) * COLS + cl], low);
            const float sv = staged[(tt + half) * COLS + cl];
            const float v = band == 0 ? low : (band == 1 ? sv - low : sv);
            xa[(image_row + t) * xa_stride + u_col + c] = f32_to_bf16(scale * gate_s[tt][p][e] * v);
        }
    }
    const int pad = xa_stride - u_col - u_width;
    for (int i = tid; i < TOKENS * pad; i += THREADS) {
        const int t = t0 + i / pad;
        if (t < tokens) xa[(image_row + t) * xa_stride + u_col + u_width + i % pad] = 0;
    }
}

// Packs projection p's base weight and LoRA up-projections into rows row0 .. row0 + n of the
// stacked GEMM weight out [N_total, k_pad] (bf16):
//   out[row0 + o, c] = w[o, c]                      for c < d,
//                      lora_b[e, o, j]              for c = u_col + e*rank + j (the projection's
//                                                   u columns), 0 elsewhere (other projections'
//                                                   u columns and the padding).
// w: [n, d]; lora_b: [E, n, rank]. Grid-stride over n * k_pad. Block: (256, 1, 1).
extern "C" __global__ void __launch_bounds__(256)
lora_moe_pack_bf16(const bf16_bits* __restrict__ w,
                   const bf16_bits* __restrict__ lora_b,
                   bf16_bits* __restrict__ out,
                   int n,
                   int d,
                   int experts,
                   int rank,
                   int k_pad,
                   int u_col,
                   int row0)
{
    const long long total = (long long)n * k_pad;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const int width = experts * rank;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int o = (int)(i / k_pad);
        const int c = (int)(i % k_pad);
        bf16_bits v = 0;
        if (c < d) {
            v = w[(long long)o * d + c];
        } else if (c >= u_col && c < u_col + width) {
            const int e = (c - u_col) / rank;
            const int j = (c - u_col) % rank;
            v = lora_b[((long long)e * n + o) * rank + j];
        }
        out[((long long)row0 + o) * k_pad + c] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// The unfused baseline (src/lora_moe/cuda/unfused.rs): the reference's code path, literally,
// for benchmarks and as a second GPU reference. Every kernel grid-strides over its elements
// with blocks of 256 threads; GEMMs are cuBLAS calls between them.
// ---------------------------------------------------------------------------------------------

// out[m, c] = band(x)[m, c] over the full width: low = sum_j h[j] x[t + j - half, c] within the
// image (zero padding), high = x - low, full = x (band 0, 1, 2). x, out: [B*T, d] bf16.
extern "C" __global__ void __launch_bounds__(256)
lora_moe_unfused_band_bf16(const bf16_bits* __restrict__ x,
                           const float* __restrict__ h,
                           bf16_bits* __restrict__ out,
                           long long total,
                           int tokens,
                           int d,
                           int taps,
                           int band)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    const int half = (taps - 1) / 2;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long row = i / d;
        const int c = (int)(i % d);
        const int t = (int)(row % tokens);
        const long long first = row - t;                 // row of token 0 of this image
        const float xv = bf16_to_f32(x[i]);
        float low = 0.0f;
        for (int j = 0; j < taps; ++j) {
            const int src = t + j - half;
            if (src >= 0 && src < tokens) low = fmaf(h[j], bf16_to_f32(x[(first + src) * d + c]), low);
        }
        out[i] = f32_to_bf16(band == 0 ? low : (band == 1 ? xv - low : xv));
    }
}

// energies[b] += sum of v^2 over image b's per_image entries of v [B, per_image] (bf16), in f64
// (atomicAdd of one partial per block; energies zeroed by the caller).
// Grid: (blocks, B); block 256.
extern "C" __global__ void __launch_bounds__(256)
lora_moe_unfused_energy_bf16(const bf16_bits* __restrict__ v, double* __restrict__ energies, long long per_image)
{
    __shared__ double red[8];
    const int b = blockIdx.y;
    double sum = 0.0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < per_image; i += stride) {
        const double e = (double)bf16_to_f32(v[(long long)b * per_image + i]);
        sum += e * e;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int w = 0; w < 8; ++w) total += red[w];
        atomicAdd(energies + b, total);
    }
}

// gates[m, e] for every token m: prior_e = energy_e / (sum + 1e-12) with energy_e =
// energies[e * B + b] / entries, softmax(logits[m, :] / temperature) blended by lambda, top-k
// renormalised (as lora_moe_gate_bf16). logits: [B*T, E] bf16; gates: [B*T, E] f32.
extern "C" __global__ void __launch_bounds__(256)
lora_moe_unfused_gate_bf16(const bf16_bits* __restrict__ logits,
                           const double* __restrict__ energies,
                           float* __restrict__ gates,
                           int rows,
                           int tokens,
                           int batch,
                           int experts,
                           double entries,
                           float temperature,
                           float lambda,
                           int top_k)
{
    constexpr int MAX_EXPERTS = 16;
    for (int m = blockIdx.x * blockDim.x + threadIdx.x; m < rows; m += gridDim.x * blockDim.x) {
        const int b = m / tokens;
        double energy[MAX_EXPERTS];
        double energy_sum = 0.0;
        float g[MAX_EXPERTS];
        float max_logit = __int_as_float(0xff800000);
        bool any_nan = false;
#pragma unroll
        for (int e = 0; e < MAX_EXPERTS; ++e) {
            energy[e] = e < experts ? energies[e * batch + b] / entries : 0.0;
            energy_sum += energy[e];
            const float l = e < experts ? bf16_to_f32(logits[(long long)m * experts + e]) / temperature : 0.0f;
            any_nan |= isnan(l);
            if (e < experts) max_logit = fmaxf(max_logit, l);
            g[e] = l;
        }
        if (any_nan) max_logit = __int_as_float(0x7fc00000);
        float sum = 0.0f;
#pragma unroll
        for (int e = 0; e < MAX_EXPERTS; ++e) {
            g[e] = e < experts ? expf(g[e] - max_logit) : 0.0f;
            sum += g[e];
        }
#pragma unroll
        for (int e = 0; e < MAX_EXPERTS; ++e) {
            const float prior = (float)(energy[e] / (energy_sum + 1e-12));
            g[e] = e < experts ? lambda * (g[e] / sum) + (1.0f - lambda) * prior : 0.0f;
        }
        if (top_k > 0 && top_k < experts) {
            bool keep[MAX_EXPERTS];
            float kept = 0.0f;
#pragma unroll
            for (int e = 0; e < MAX_EXPERTS; ++e) {
                int before = 0;
#pragma unroll
                for (int o = 0; o < MAX_EXPERTS; ++o)
                    before += (o < experts && o != e && lora_moe_gate_before(g[o], o, g[e], e)) ? 1 : 0;
                keep[e] = e < experts && before < top_k;
                kept += keep[e] ? g[e] : 0.0f;
            }
#pragma unroll
            for (int e = 0; e < MAX_EXPERTS; ++e) g[e] = keep[e] ? g[e] / kept : 0.0f;
        }
#pragma unroll
        for (int e = 0; e < MAX_EXPERTS; ++e)
            if (e < experts) gates[(long long)m * experts + e] = g[e];
    }
}

// acc[m, o] = (first ? base[m, o] + bias[o] : acc[m, o]) + scale * gates[m, e] * t[m, o]; on the
// last expert the sum is written to out (bf16) instead of acc. base, t, out: [rows, n] bf16;
// acc: [rows, n] f32; bias: [n] bf16 or null; gates: [rows, E] f32.
extern "C" __global__ void __launch_bounds__(256)
lora_moe_unfused_add_bf16(const bf16_bits* __restrict__ base,
                          const bf16_bits* __restrict__ bias,
                          const bf16_bits* __restrict__ t,
                          const float* __restrict__ gates,
                          float* __restrict__ acc,
                          bf16_bits* __restrict__ out,
                          long long total,
                          int n,
                          int e,
                          int experts,
                          float scale,
                          int first,
                          int last)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long m = i / n;
        const int o = (int)(i % n);
        float v = first ? bf16_to_f32(base[i]) + (bias != nullptr ? bf16_to_f32(bias[o]) : 0.0f) : acc[i];
        v = fmaf(scale * gates[m * experts + e], bf16_to_f32(t[i]), v);
        if (last) {
            out[i] = f32_to_bf16(v);
        } else {
            acc[i] = v;
        }
    }
}
