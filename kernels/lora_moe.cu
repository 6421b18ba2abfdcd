// LoRA-MoE kernels of fape-kernels, compiled at run time with NVRTC (see src/backend/cuda.rs).
//
// Self-contained on purpose: NVRTC has no system include path, so no #include here.
// Conventions for every kernel in this file:
//   * tensors are dense row-major f32, extents passed as int, flat offsets computed in 64 bits;
//   * entry points are `extern "C"` (unmangled names for cuModuleGetFunction), named
//     `<op>_<dtype>`, and the launch wrapper in src/lora_moe/cuda/fp32.rs mirrors their argument list;
//   * tile sizes are `constexpr` in a namespace per op and mirrored as consts in the wrapper.

// ---------------------------------------------------------------------------------------------
// token_lowpass: the token-axis FIR of the LoRA-MoE band split.
//
//   out[b, t, c] = sum_{j < taps} h[j] * x[b, t + j - half, c],   half = (taps - 1) / 2,
//
// with zero padding outside [0, T) of the same image. x, out: [B, T, C]; h: [taps].
//
// Design. A block owns one image b, a tile of ROW_GROUPS * ROWS output tokens and CHANNELS
// channels. The 32 lanes of a warp run along channels, so every global load and store is one
// coalesced 128-byte row segment and every shared-memory access is bank-conflict free. The
// taps are processed in chunks of TAP_CHUNK: for each chunk the block stages the
// tile + TAP_CHUNK - 1 input rows that chunk touches (zeros outside the image) plus the chunk's
// weights in shared memory, so shared memory is fixed whatever `taps` is. Each thread
// accumulates ROWS consecutive output tokens of one channel in registers and slides a register
// window down the staged rows: one shared load of x and one broadcast load of h per tap feed
// ROWS FMAs. For one output the taps are summed in ascending j, as the reference does.
//
// Two instantiations (measured on an H200, see src/lora_moe/cuda/fp32.rs):
//   token_lowpass_f32       ROWS = 8, tap loop rolled: 32 registers, full occupancy; best for
//                           short filters, where the op is bound by memory bandwidth.
//   token_lowpass_long_f32  ROWS = 16, tap loop unrolled by ROWS (the window's shift becomes
//                           register renaming): 2 FMAs per shared load instead of 1; best for
//                           long filters, where the op is bound by the FMA / shared-load issue.
// ---------------------------------------------------------------------------------------------

namespace token_lowpass_cfg {
constexpr int CHANNELS = 32;                             // = blockDim.x (one warp wide)
constexpr int ROW_GROUPS = 8;                            // = blockDim.y
constexpr int THREADS = CHANNELS * ROW_GROUPS;
constexpr int TAP_CHUNK = 64;                            // taps staged per pass
constexpr int SHORT_ROWS = 8;                            // tokens per thread, token_lowpass_f32
constexpr int LONG_ROWS = 16;                            // tokens per thread, token_lowpass_long_f32
static_assert(TAP_CHUNK <= THREADS, "one thread stages each weight");
}  // namespace token_lowpass_cfg

// One tap for ROWS outputs: shift the window by one row, append staged value `next`,
// accumulate weight `w` times the window.
template <int ROWS>
__device__ __forceinline__ void token_lowpass_tap(float (&window)[ROWS], float (&acc)[ROWS], float next, float w)
{
#pragma unroll
    for (int i = 0; i + 1 < ROWS; ++i) window[i] = window[i + 1];
    window[ROWS - 1] = next;
#pragma unroll
    for (int i = 0; i < ROWS; ++i) acc[i] = fmaf(w, window[i], acc[i]);
}

// The body of both entry points. Grid: x = token tile * channel tiles + channel tile (channel
// tile fastest), y = images (grid-stride over b when B exceeds gridDim.y).
// Block: (CHANNELS, ROW_GROUPS, 1).
template <int ROWS, bool UNROLL_TAPS>
__device__ __forceinline__ void token_lowpass_body(const float* __restrict__ x,
                                                   const float* __restrict__ h,
                                                   float* __restrict__ out,
                                                   int batch,
                                                   int tokens,
                                                   int channels,
                                                   int taps)
{
    using namespace token_lowpass_cfg;
    constexpr int TOKENS = ROW_GROUPS * ROWS;            // output tokens per block
    constexpr int STAGED_ROWS = TOKENS + TAP_CHUNK - 1;  // input rows staged per pass
    static_assert(!UNROLL_TAPS || TAP_CHUNK % ROWS == 0, "the unrolled tap loop steps by ROWS");
    __shared__ float staged[STAGED_ROWS * CHANNELS];
    __shared__ float weights[TAP_CHUNK];

    const int lane = threadIdx.x;                        // channel within the tile
    const int group = threadIdx.y;                       // row group within the tile
    const int thread_id = group * CHANNELS + lane;
    const int channel_tiles = (channels + CHANNELS - 1) / CHANNELS;
    const int channel_tile = blockIdx.x % channel_tiles;
    const int token_tile = blockIdx.x / channel_tiles;
    const int c = channel_tile * CHANNELS + lane;
    const int t0 = token_tile * TOKENS;                  // first output token of the tile
    const int r0 = group * ROWS;                         // this thread's first row in the tile
    const int half = (taps - 1) / 2;
    const bool channel_ok = c < channels;
    const float* column = staged + lane;                 // this thread's channel of `staged`

    for (int b = blockIdx.y; b < batch; b += gridDim.y) {
        const long long image = (long long)b * tokens * channels;
        const float* __restrict__ xb = x + image;

        float acc[ROWS];
#pragma unroll
        for (int i = 0; i < ROWS; ++i) acc[i] = 0.0f;

        for (int k0 = 0; k0 < taps; k0 += TAP_CHUNK) {
            const int kc = min(TAP_CHUNK, taps - k0);    // taps in this chunk
            const int rows = TOKENS + kc - 1;            // rows this chunk reads
            const int first = t0 - half + k0;            // token of staged row 0

            __syncthreads();                             // previous chunk / image is consumed
            for (int r = group; r < rows; r += ROW_GROUPS) {
                const int t = first + r;
                float v = 0.0f;
                if (channel_ok && t >= 0 && t < tokens) v = xb[(long long)t * channels + c];
                staged[r * CHANNELS + lane] = v;
            }
            if (thread_id < kc) weights[thread_id] = h[k0 + thread_id];
            __syncthreads();

            // window[i] holds staged row r0 + j + i while tap j of the chunk is applied.
            float window[ROWS];
#pragma unroll
            for (int i = 1; i < ROWS; ++i) window[i] = column[(r0 + i - 1) * CHANNELS];
            int j = 0;
            if (UNROLL_TAPS) {
                for (; j + ROWS <= kc; j += ROWS) {
#pragma unroll
                    for (int jj = 0; jj < ROWS; ++jj)
                        token_lowpass_tap(window, acc, column[(r0 + j + jj + ROWS - 1) * CHANNELS], weights[j + jj]);
                }
            }
            for (; j < kc; ++j)
                token_lowpass_tap(window, acc, column[(r0 + j + ROWS - 1) * CHANNELS], weights[j]);
        }

        if (channel_ok) {
#pragma unroll
            for (int i = 0; i < ROWS; ++i) {
                const int t = t0 + r0 + i;
                if (t < tokens) out[image + (long long)t * channels + c] = acc[i];
            }
        }
    }
}

// Short filters. Grid x covers ceil(C / 32) * ceil(T / 64) tiles.
extern "C" __global__ void __launch_bounds__(token_lowpass_cfg::THREADS)
token_lowpass_f32(const float* __restrict__ x,
                  const float* __restrict__ h,
                  float* __restrict__ out,
                  int batch,
                  int tokens,
                  int channels,
                  int taps)
{
    token_lowpass_body<token_lowpass_cfg::SHORT_ROWS, false>(x, h, out, batch, tokens, channels, taps);
}

// Long filters. Grid x covers ceil(C / 32) * ceil(T / 128) tiles.
extern "C" __global__ void __launch_bounds__(token_lowpass_cfg::THREADS)
token_lowpass_long_f32(const float* __restrict__ x,
                       const float* __restrict__ h,
                       float* __restrict__ out,
                       int batch,
                       int tokens,
                       int channels,
                       int taps)
{
    token_lowpass_body<token_lowpass_cfg::LONG_ROWS, true>(x, h, out, batch, tokens, channels, taps);
}

// ---------------------------------------------------------------------------------------------
// lora_moe: the fused LoRA-MoE layer, f32. The launch wrapper (src/lora_moe/cuda/fp32.rs) runs
//
//   1. s      = x . A_cat^T                  lora_moe_gemm_nt_f32   [B*T, E*r]  (shrink first)
//   2. logits = g . router^T                 lora_moe_gemm_nt_f32   [B*T, E]    (g = guidance or x)
//   3. low(x)                                token_lowpass_f32      [B, T, d]
//      band-energy partial sums per image    lora_moe_energy_f32    [B * chunks, 3] f64
//   4. gates on the host in f64 (gating::gate_token), uploaded as factor = scale * gate [B*T, E]
//   5. low(s)                                token_lowpass_f32      [B, T, E*r]
//      u = factor * band_e(s)                lora_moe_band_scale_f32
//   6. y = [x | u] . [W | B_cat]^T + bias    lora_moe_gemm_nt_f32   [B*T, n]  (one GEMM over
//                                                                  the augmented K = d + E*r)
//
// Full f32 everywhere (no TF32): the op's f32 tolerance (rel-L2 1e-4) is below TF32's error.
// ---------------------------------------------------------------------------------------------

namespace lora_moe_gemm_cfg {
constexpr int DIM = 16;                                  // = blockDim.x = blockDim.y
constexpr int THREADS = DIM * DIM;
constexpr int TILE_M = 64;                               // rows of C per block
constexpr int TILE_N = 64;                               // columns of C per block
constexpr int TILE_K = 16;                               // K staged per pass
constexpr int RM = TILE_M / DIM;                         // rows per thread
constexpr int RN = TILE_N / DIM;                         // columns per thread
static_assert(TILE_M % DIM == 0 && TILE_N % DIM == 0, "register blocking divides the tile");
static_assert(TILE_M * TILE_K % THREADS == 0 && TILE_N * TILE_K % THREADS == 0, "staging divides evenly");
}  // namespace lora_moe_gemm_cfg

// Element k of row `row` of the augmented operand [p1 | p2] (p1: [rows, k1], p2: [rows, k2],
// dense row-major), zero outside row < rows, k < k1 + k2.
__device__ __forceinline__ float lora_moe_gemm_load(const float* __restrict__ p1,
                                                    const float* __restrict__ p2,
                                                    int k1,
                                                    int k2,
                                                    int row,
                                                    int rows,
                                                    int k)
{
    if (row >= rows) return 0.0f;
    if (k < k1) return p1[(long long)row * k1 + k];
    if (k < k1 + k2) return p2[(long long)row * k2 + (k - k1)];
    return 0.0f;
}

// c[m, n] = [a1 | a2] . [b1 | b2]^T (+ bias[n] when has_bias), i.e.
// a1[m, k1] . b1[n, k1]^T + a2[m, k2] . b2[n, k2]^T, every operand dense row-major f32: one
// GEMM over the augmented K = k1 + k2. k2 may be 0 (a2, b2 then unread). Each output is one
// f32 FMA chain over the augmented k ascending, then + bias (as the CPU path).
// Grid: (ceil(m / TILE_M), ceil(n / TILE_N), 1); block: (DIM, DIM, 1). Shared tiles are stored
// k-major (transposed) with one float of padding per row; out-of-range rows, columns and k are
// staged as zeros. Thread (tx, ty) owns rows row0 + ty + DIM*i and columns col0 + tx + DIM*j,
// so shared reads are broadcasts / consecutive and global stores are 16-float row segments.
extern "C" __global__ void __launch_bounds__(lora_moe_gemm_cfg::THREADS)
lora_moe_gemm_nt_f32(const float* __restrict__ a1,
                     const float* __restrict__ b1,
                     int k1,
                     const float* __restrict__ a2,
                     const float* __restrict__ b2,
                     int k2,
                     const float* __restrict__ bias,
                     int has_bias,
                     float* __restrict__ c,
                     int m,
                     int n)
{
    using namespace lora_moe_gemm_cfg;
    __shared__ float as[TILE_K][TILE_M + 1];
    __shared__ float bs[TILE_K][TILE_N + 1];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int tid = ty * DIM + tx;
    const int row0 = blockIdx.x * TILE_M;
    const int col0 = blockIdx.y * TILE_N;
    const int k_total = k1 + k2;

    float acc[RM][RN];
#pragma unroll
    for (int i = 0; i < RM; ++i) {
#pragma unroll
        for (int j = 0; j < RN; ++j) acc[i][j] = 0.0f;
    }

    for (int k0 = 0; k0 < k_total; k0 += TILE_K) {
        __syncthreads();                                 // the previous tile is consumed
#pragma unroll
        for (int l = 0; l < TILE_M * TILE_K / THREADS; ++l) {
            const int i = tid + l * THREADS;
            const int r = i / TILE_K;
            const int kk = i % TILE_K;
            as[kk][r] = lora_moe_gemm_load(a1, a2, k1, k2, row0 + r, m, k0 + kk);
        }
#pragma unroll
        for (int l = 0; l < TILE_N * TILE_K / THREADS; ++l) {
            const int i = tid + l * THREADS;
            const int r = i / TILE_K;
            const int kk = i % TILE_K;
            bs[kk][r] = lora_moe_gemm_load(b1, b2, k1, k2, col0 + r, n, k0 + kk);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TILE_K; ++kk) {
            float av[RM];
            float bv[RN];
#pragma unroll
            for (int i = 0; i < RM; ++i) av[i] = as[kk][ty + DIM * i];
#pragma unroll
            for (int j = 0; j < RN; ++j) bv[j] = bs[kk][tx + DIM * j];
#pragma unroll
            for (int i = 0; i < RM; ++i) {
#pragma unroll
                for (int j = 0; j < RN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < RM; ++i) {
        const int row = row0 + ty + DIM * i;
        if (row >= m) continue;
#pragma unroll
        for (int j = 0; j < RN; ++j) {
            const int col = col0 + tx + DIM * j;
            if (col < n) c[(long long)row * n + col] = has_bias ? acc[i][j] + bias[col] : acc[i][j];
        }
    }
}

namespace lora_moe_energy_cfg {
constexpr int THREADS = 256;                             // = blockDim.x
constexpr int CHUNK = 4096;                              // entries of one image per block
constexpr int WARPS = THREADS / 32;
}  // namespace lora_moe_energy_cfg

// Per-image band-energy partial sums in f64. x, low: [B, per_image] (low = low(x) along
// tokens). Block blockIdx.x = b * chunks + chunk sums entries [chunk*CHUNK, (chunk+1)*CHUNK)
// of image b and writes partials[blockIdx.x * 3 + {0, 1, 2}] = sums of low^2, (x - low)^2,
// x^2. The host adds the chunks of each image. Grid: (B * chunks, 1, 1); block: (THREADS, 1, 1).
extern "C" __global__ void __launch_bounds__(lora_moe_energy_cfg::THREADS)
lora_moe_energy_f32(const float* __restrict__ x,
                    const float* __restrict__ low,
                    double* __restrict__ partials,
                    int chunks,
                    long long per_image)
{
    using namespace lora_moe_energy_cfg;
    __shared__ double sums[WARPS][3];
    const int b = blockIdx.x / chunks;
    const int chunk = blockIdx.x % chunks;
    const long long base = (long long)b * per_image;
    const long long start = (long long)chunk * CHUNK;
    const long long end = min(start + CHUNK, per_image);

    double s_low = 0.0;
    double s_high = 0.0;
    double s_full = 0.0;
    for (long long i = start + threadIdx.x; i < end; i += THREADS) {
        const double xv = (double)x[base + i];
        const double lv = (double)low[base + i];
        const double hv = xv - lv;
        s_low += lv * lv;
        s_high += hv * hv;
        s_full += xv * xv;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        s_low += __shfl_down_sync(0xffffffffu, s_low, offset);
        s_high += __shfl_down_sync(0xffffffffu, s_high, offset);
        s_full += __shfl_down_sync(0xffffffffu, s_full, offset);
    }
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
        sums[warp][0] = s_low;
        sums[warp][1] = s_high;
        sums[warp][2] = s_full;
    }
    __syncthreads();
    if (threadIdx.x < 3) {
        double total = 0.0;
        for (int w = 0; w < WARPS; ++w) total += sums[w][threadIdx.x];
        partials[(long long)blockIdx.x * 3 + threadIdx.x] = total;
    }
}

// u[row, e*r + j] = factor[row, e] * band_e(s)[row, e*r + j] with band_e(s) = low (bands[e] = 0),
// s - low (1) or s (2). s, low, u: [rows, E*r]; factor: [rows, E] (scale * gate); bands: [E].
// Grid-stride over the rows * E * r entries. Grid: (blocks, 1, 1); block: (256, 1, 1).
extern "C" __global__ void __launch_bounds__(256)
lora_moe_band_scale_f32(const float* __restrict__ s,
                        const float* __restrict__ low,
                        const float* __restrict__ factor,
                        const int* __restrict__ bands,
                        float* __restrict__ u,
                        int rows,
                        int experts,
                        int rank)
{
    const long long width = (long long)experts * rank;
    const long long total = (long long)rows * width;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const long long row = i / width;
        const int e = (int)((i % width) / rank);
        const int band = bands[e];
        const float sv = s[i];
        const float lv = low[i];
        const float v = band == 0 ? lv : (band == 1 ? sv - lv : sv);
        u[i] = factor[row * experts + e] * v;
    }
}
