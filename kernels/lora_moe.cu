// LoRA-MoE kernels of fape-kernels, compiled at run time with NVRTC (see src/backend/cuda.rs).
//
// Self-contained on purpose: NVRTC has no system include path, so no #include here.
// Conventions for every kernel in this file:
//   * tensors are dense row-major f32, extents passed as int, flat offsets computed in 64 bits;
//   * entry points are `extern "C"` (unmangled names for cuModuleGetFunction), named
//     `<op>_<dtype>`, and the launch wrapper in src/lora_moe/cuda.rs mirrors their argument list;
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
// Two instantiations (measured on an H200, see src/lora_moe/cuda.rs):
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
