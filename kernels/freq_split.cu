// freq_split: the low/high frequency split and radial band energies of FAPE-IR on CUDA.
//
// Spectra are half-spectra `S[image][ky][kx]`, `kx < Wh = W/2 + 1` (cuFFT's R2C layout), as
// float2. The geometry of every bin comes from two per-shape tables in the same `[H][Wh]`
// layout, built once on the host from the numpy-exact f64 geometry of `src/freq/spectrum.rs`
// (so every bin's band and hard-mask side are the reference's) and read from L2: `mask` (f32,
// the mask value times 1/(H W)) and `band` (u8, FS_NO_BAND outside every band).
//
// Band energies use the Hermitian symmetry of a real image's spectrum: the bins of columns
// 0 < kx < W - kx stand for themselves and their mirror (weight 2), columns 0 and W/2 (even W)
// hold both members of each pair (weight 1), so the weighted half-spectrum sums equal the
// full-spectrum sums of the reference. Every thread accumulates its own bins per band in f32
// in its own shared-memory slot (no atomics); a block then sums the slots of each band in f64
// in a fixed order, so results are deterministic.
//
// Kernels (all launched with FS_THREADS threads per block, dynamic shared memory as noted):
//  - freq_split_fused_f32: one block per image for power-of-two H, W <= 128; everything in
//    shared memory (rows, columns, mask and energies, inverse, low and high) in one launch.
//  - freq_rows_forward_f32 / freq_columns_f32 / freq_rows_inverse_f32: the three passes of
//    larger power-of-two images (each side <= 4096) through a global half-spectrum.
//  - freq_mask_energy_f32 / freq_subtract_f32: the mask and energies between cuFFT's R2C and
//    C2R, and high = x - low after them (any size).
//  - freq_energy_reduce_f32: per-image band energies from per-block f64 partials.
//
// FFTs: in-place decimation in time in shared memory (bit-reversal permutation, then radix-8
// passes of three radix-2 stages each in registers, one barrier per pass, and a radix-4 or -2
// pass for the rest), twiddles exp(-2 pi i k / n) from a per-block table filled with sincospif
// (exact power-of-two arguments). Two real rows are transformed as one complex row
// (x[2p] + i x[2p+1]) and separated afterwards, and the inverse packs two Hermitian half-rows
// the same way; row data is stored bit-reversed as it is loaded or packed, so row FFTs skip
// the permutation pass (column FFTs permute in place).

#define FS_THREADS 256
#define FS_MAX_BANDS 16

// A bin outside every band in the band table.
#define FS_NO_BAND 255

// Masks bin `bin` (row-major in the `[H][Wh]` half-spectrum, column kx) in place by the mask
// table (already scaled by 1/(H W)) and adds its Hermitian-weighted energy to this thread's
// slot `acc[band * FS_THREADS + tid]` of the band table's band.
__device__ __forceinline__ void mask_bin(float2* v, int bin, int kx, int w, const float* __restrict__ mask,
                                         const unsigned char* __restrict__ band, float* acc) {
    const int b = band[bin];
    const float2 x = *v;
    if (b != FS_NO_BAND) {
        const float weight = (kx == 0 || 2 * kx == w) ? 1.0f : 2.0f;
        acc[b * FS_THREADS + threadIdx.x] += weight * (x.x * x.x + x.y * x.y);
    }
    const float m = mask[bin];
    *v = make_float2(x.x * m, x.y * m);
}

// Zeroes this thread's band slots. The caller synchronises before anyone adds to them (the
// slots are thread-private until the reduction).
__device__ __forceinline__ void zero_slots(float* acc, int nbands) {
    for (int b = 0; b < nbands; ++b) acc[b * FS_THREADS + threadIdx.x] = 0.0f;
}

// After a barrier that follows the last addition: band b's slots summed in f64 in a fixed
// order (lane-strided, then a butterfly over the warp), times `scale`; lane 0 of the warp that
// owns band b calls `store(b, sum)`.
template <typename Store>
__device__ __forceinline__ void reduce_slots(const float* acc, int nbands, double scale, Store store) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int b = warp; b < nbands; b += FS_THREADS / 32) {
        double sum = 0.0;
        for (int j = lane; j < FS_THREADS; j += 32) sum += (double)acc[b * FS_THREADS + j];
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (lane == 0) store(b, sum * scale);
    }
}

// tw[k] = exp(-2 pi i k / n), k < n / 2. No barrier: the caller synchronises before use.
__device__ __forceinline__ void fill_twiddles(float2* tw, int log2n) {
    const int half = (1 << log2n) >> 1;
    for (int k = threadIdx.x; k < half; k += FS_THREADS) {
        float s, c;
        // -2k / n is exact in f32 (n a power of two <= 4096).
        sincospif(-(float)(2 * k) / (float)(1 << log2n), &s, &c);
        tw[k] = make_float2(c, s);
    }
}

// Where point j of a padded row lives: one float2 of padding after every 16 points, so that the
// bit-reversed stores and the first radix passes of rows spread over the shared-memory banks
// instead of hitting one (a padded row of W points takes row_len(W) = W + W / 16 slots).
__device__ __forceinline__ int row_slot(int j) { return j + (j >> 4); }
__device__ __forceinline__ int row_len(int w) { return w + (w >> 4); }
__device__ __forceinline__ int slot(int j, bool padded) { return padded ? row_slot(j) : j; }

// j with its low log2n bits reversed (0 when n = 1).
__device__ __forceinline__ int bit_reverse(int j, int log2n) {
    return log2n == 0 ? 0 : (int)(__brev((unsigned)j) >> (32 - log2n));
}

// One radix-2^LOGR pass of the in-place decimation-in-time FFT: stages stage .. stage+LOGR-1
// at once. Each item owns R = 2^LOGR points of one line, base + pos + j m (j < R, m =
// 2^stage, base a multiple of m R, pos < m), which those stages combine only among themselves;
// it loads them, runs the LOGR radix-2 stages in registers (stage stage+q pairs j and j + 2^q
// with twiddle tw[p << (log2n - 1 - stage - q)], p = pos + (j mod 2^q) m its position in the
// 2^(stage+q+1)-point block) and stores them back. Addressing as in fft_lines.
template <int LOGR>
__device__ __forceinline__ void radix_pass(float2* s, const float2* tw, int lines, int log2n, int line_stride,
                                           int elem_stride, int stage, bool inverse, bool lines_fastest,
                                           bool padded) {
    constexpr int R = 1 << LOGR;
    const int m = 1 << stage;
    const int group_shift = log2n - LOGR;
    const int groups = 1 << group_shift;
    const int items = lines << group_shift;
    for (int t = threadIdx.x; t < items; t += FS_THREADS) {
        const int l = lines_fastest ? t % lines : t >> group_shift;
        const int g = lines_fastest ? t / lines : t & (groups - 1);
        const int pos = g & (m - 1);
        float2* line = s + l * line_stride;
        const int e0 = ((g - pos) << LOGR) + pos;
        float2 v[R];
#pragma unroll
        for (int j = 0; j < R; ++j) v[j] = line[slot(e0 + j * m, padded) * elem_stride];
#pragma unroll
        for (int q = 0; q < LOGR; ++q) {
            const int half = 1 << q;
#pragma unroll
            for (int j = 0; j < R; ++j) {
                if (j & half) continue;
                float2 w = tw[(pos + (j & (half - 1)) * m) << (log2n - 1 - stage - q)];
                if (inverse) w.y = -w.y;
                const float2 a = v[j], b = v[j + half];
                const float2 tb = make_float2(w.x * b.x - w.y * b.y, w.x * b.y + w.y * b.x);
                v[j] = make_float2(a.x + tb.x, a.y + tb.y);
                v[j + half] = make_float2(a.x - tb.x, a.y - tb.y);
            }
        }
#pragma unroll
        for (int j = 0; j < R; ++j) line[slot(e0 + j * m, padded) * elem_stride] = v[j];
    }
}

// In-place FFT of `lines` lines of n = 2^log2n points in shared memory: element j of line l is
// s[l * line_stride + slot(j, padded) * elem_stride]. Forward uses tw (see fill_twiddles), inverse its
// conjugate; no 1/n scale. A bit-reversal permutation (skipped when `permuted`: the caller
// stored point j at position bit_reverse(j)), then radix-8 passes (three stages per
// pass, one barrier each) and one radix-4 or radix-2 pass for the remaining stages. With
// `lines_fastest` consecutive threads take consecutive lines (for column layouts), else
// consecutive groups of one line (row layouts). Every thread of the block calls it after a
// barrier that published the data and tw; it ends with a barrier (none when n = 1).
__device__ void fft_lines(float2* s, const float2* tw, int lines, int log2n, int line_stride, int elem_stride,
                          bool inverse, bool lines_fastest, bool permuted, bool padded) {
    if (log2n == 0) return;
    if (!permuted) {
        const int n = 1 << log2n;
        const int total = lines << log2n;
        for (int i = threadIdx.x; i < total; i += FS_THREADS) {
            const int l = lines_fastest ? i % lines : i >> log2n;
            const int j = lines_fastest ? i / lines : i & (n - 1);
            const int r = bit_reverse(j, log2n);
            if (j < r) {
                float2* a = s + l * line_stride + slot(j, padded) * elem_stride;
                float2* b = s + l * line_stride + slot(r, padded) * elem_stride;
                const float2 t = *a;
                *a = *b;
                *b = t;
            }
        }
        __syncthreads();
    }
    int stage = 0;
    for (; log2n - stage >= 3; stage += 3) {
        radix_pass<3>(s, tw, lines, log2n, line_stride, elem_stride, stage, inverse, lines_fastest, padded);
        __syncthreads();
    }
    if (log2n - stage == 2) {
        radix_pass<2>(s, tw, lines, log2n, line_stride, elem_stride, stage, inverse, lines_fastest, padded);
        __syncthreads();
    } else if (log2n - stage == 1) {
        radix_pass<1>(s, tw, lines, log2n, line_stride, elem_stride, stage, inverse, lines_fastest, padded);
        __syncthreads();
    }
}

// Separates the spectra of two real rows packed as z = a + i b (Z = FFT z, n = W points, the
// padded row `z`) into half-rows: A[k] = (Z[k] + conj Z[-k]) / 2, B[k] = (Z[k] -
// conj Z[-k]) / 2i, for k < Wh.
__device__ __forceinline__ void unpack_pair(const float2* z, int w, int k, float2* a, float2* b) {
    const float2 zk = z[row_slot(k)], zc = z[row_slot((w - k) & (w - 1))];
    *a = make_float2(0.5f * (zk.x + zc.x), 0.5f * (zk.y - zc.y));
    *b = make_float2(0.5f * (zk.y + zc.y), 0.5f * (zc.x - zk.x));
}

// Packs half-rows A and B (bin k < Wh) of two Hermitian spectra into Z = A + i B over the full
// row (z, n = W = 2^log2w points, the padded row, stored bit-reversed for fft_lines(permuted)):
// Z[k] and, for 0 < k < W - k, Z[W-k] = conj A[k] + i conj B[k]. The imaginary parts of bins 0 and W/2 are dropped, as a C2R transform drops them, so
// the real part of ifft(Z) is exactly C2R(A) and the imaginary part C2R(B).
__device__ __forceinline__ void pack_pair(float2* z, int w, int log2w, int k, float2 a, float2 b) {
    const bool self_mirror = (k == 0) || (2 * k == w);
    if (self_mirror) {
        a.y = 0.0f;
        b.y = 0.0f;
    }
    z[row_slot(bit_reverse(k, log2w))] = make_float2(a.x - b.y, a.y + b.x);
    if (!self_mirror) z[row_slot(bit_reverse(w - k, log2w))] = make_float2(a.x + b.y, b.x - a.y);
}

// Dynamic shared memory of freq_split_fused_f32, in float2 units before the band slots:
// packed rows ceil(H/2) * row_len(W), spectrum H * Wh, twiddles max(W/2,1) + max(H/2,1); then
// nbands * FS_THREADS floats.
extern "C" __global__ void __launch_bounds__(FS_THREADS)
    freq_split_fused_f32(const float* __restrict__ x, float* __restrict__ low, float* __restrict__ high,
                         float* __restrict__ energy, int h, int w, int log2h, int log2w,
                         const float* __restrict__ mask, const unsigned char* __restrict__ band, int nbands) {
    extern __shared__ float2 smem[];
    const int hp = (h + 1) / 2, wh = w / 2 + 1, wp = row_len(w);
    float2* rows = smem;
    float2* spec = rows + hp * wp;
    float2* tw_w = spec + h * wh;
    float2* tw_h = tw_w + max(w / 2, 1);
    float* acc = (float*)(tw_h + max(h / 2, 1));

    const long long image = blockIdx.x;
    const float* xi = x + image * h * w;
    fill_twiddles(tw_w, log2w);
    fill_twiddles(tw_h, log2h);
    zero_slots(acc, nbands);
    for (int i = threadIdx.x; i < hp * w; i += FS_THREADS) {
        const int pr = i >> log2w, j = i & (w - 1);
        const float re = xi[(2 * pr) * w + j];
        const float im = 2 * pr + 1 < h ? xi[(2 * pr + 1) * w + j] : 0.0f;
        rows[pr * wp + row_slot(bit_reverse(j, log2w))] = make_float2(re, im);
    }
    __syncthreads();
    fft_lines(rows, tw_w, hp, log2w, wp, 1, false, false, true, true);

    for (int i = threadIdx.x; i < hp * wh; i += FS_THREADS) {
        const int pr = i / wh, k = i % wh;
        float2 a, b;
        unpack_pair(rows + pr * wp, w, k, &a, &b);
        spec[(2 * pr) * wh + k] = a;
        if (2 * pr + 1 < h) spec[(2 * pr + 1) * wh + k] = b;
    }
    __syncthreads();
    fft_lines(spec, tw_h, wh, log2h, 1, wh, false, true, false, false);

    for (int i = threadIdx.x; i < h * wh; i += FS_THREADS) mask_bin(spec + i, i, i % wh, w, mask, band, acc);
    __syncthreads();
    float* ei = energy + image * nbands;
    reduce_slots(acc, nbands, 1.0 / ((double)h * (double)w), [&](int b, double e) { ei[b] = (float)e; });
    fft_lines(spec, tw_h, wh, log2h, 1, wh, true, true, false, false);

    for (int i = threadIdx.x; i < hp * wh; i += FS_THREADS) {
        const int pr = i / wh, k = i % wh;
        const float2 a = spec[(2 * pr) * wh + k];
        const float2 b = 2 * pr + 1 < h ? spec[(2 * pr + 1) * wh + k] : make_float2(0.0f, 0.0f);
        pack_pair(rows + pr * wp, w, log2w, k, a, b);
    }
    __syncthreads();
    fft_lines(rows, tw_w, hp, log2w, wp, 1, true, false, true, true);

    float* lo = low + image * h * w;
    float* hi = high + image * h * w;
    for (int i = threadIdx.x; i < hp * w; i += FS_THREADS) {
        const int pr = i >> log2w, j = i & (w - 1);
        const float2 z = rows[pr * wp + row_slot(j)];
        const int o = (2 * pr) * w + j;
        lo[o] = z.x;
        hi[o] = xi[o] - z.x;
        if (2 * pr + 1 < h) {
            lo[o + w] = z.y;
            hi[o + w] = xi[o + w] - z.y;
        }
    }
}

// Pass 1 of the three-pass path: block (g, i) transforms row pairs g * pairs .. of image i of
// x (`images` images of h x w, power-of-two w) and writes their half-rows to spec
// (`[images][h][wh]`). Shared: pairs * row_len(w) + max(w/2,1) float2.
extern "C" __global__ void __launch_bounds__(FS_THREADS)
    freq_rows_forward_f32(const float* __restrict__ x, float2* __restrict__ spec, int h, int w, int log2w,
                          int pairs) {
    extern __shared__ float2 smem[];
    const int hp = (h + 1) / 2, wh = w / 2 + 1;
    const int first = blockIdx.x * pairs;
    const int lines = min(pairs, hp - first);
    const int wp = row_len(w);
    float2* rows = smem;
    float2* tw = rows + pairs * wp;
    const long long image = blockIdx.y;
    const float* xi = x + image * h * w;
    float2* si = spec + image * h * wh;

    fill_twiddles(tw, log2w);
    for (int i = threadIdx.x; i < lines * w; i += FS_THREADS) {
        const int r = 2 * (first + (i >> log2w)), j = i & (w - 1);
        const float2 z = make_float2(xi[r * w + j], r + 1 < h ? xi[(r + 1) * w + j] : 0.0f);
        rows[(i >> log2w) * wp + row_slot(bit_reverse(j, log2w))] = z;
    }
    __syncthreads();
    fft_lines(rows, tw, lines, log2w, wp, 1, false, false, true, true);
    for (int i = threadIdx.x; i < lines * wh; i += FS_THREADS) {
        const int l = i / wh, k = i % wh;
        const int r = 2 * (first + l);
        float2 a, b;
        unpack_pair(rows + l * wp, w, k, &a, &b);
        si[r * wh + k] = a;
        if (r + 1 < h) si[(r + 1) * wh + k] = b;
    }
}

// Pass 2: block (t, i) takes columns t * cols .. of image i's half-spectrum (power-of-two h):
// forward FFT down the columns, mask (scaled by 1/(h w)) and band energies, inverse FFT, back in
// place. Writes the block's unscaled band sums to partial[(i * gridDim.x + t) * nbands + b].
// Shared: h * cols + max(h/2,1) float2, then nbands * FS_THREADS floats.
extern "C" __global__ void __launch_bounds__(FS_THREADS)
    freq_columns_f32(float2* __restrict__ spec, double* __restrict__ partial, int h, int w, int log2h, int cols,
                     const float* __restrict__ mask, const unsigned char* __restrict__ band, int nbands) {
    extern __shared__ float2 smem[];
    const int wh = w / 2 + 1;
    const int first = blockIdx.x * cols;
    const int lines = min(cols, wh - first);
    float2* tile = smem;
    float2* tw = tile + h * cols;
    float* acc = (float*)(tw + max(h / 2, 1));
    const long long image = blockIdx.y;
    float2* si = spec + image * h * wh;

    fill_twiddles(tw, log2h);
    zero_slots(acc, nbands);
    for (int i = threadIdx.x; i < h * lines; i += FS_THREADS) {
        const int ky = i / lines, c = i % lines;
        tile[ky * cols + c] = si[ky * wh + first + c];
    }
    __syncthreads();
    fft_lines(tile, tw, lines, log2h, 1, cols, false, true, false, false);
    for (int i = threadIdx.x; i < h * lines; i += FS_THREADS) {
        const int ky = i / lines, c = i % lines;
        mask_bin(tile + ky * cols + c, ky * wh + first + c, first + c, w, mask, band, acc);
    }
    __syncthreads();
    double* out = partial + (image * gridDim.x + blockIdx.x) * nbands;
    reduce_slots(acc, nbands, 1.0, [&](int b, double e) { out[b] = e; });
    fft_lines(tile, tw, lines, log2h, 1, cols, true, true, false, false);
    for (int i = threadIdx.x; i < h * lines; i += FS_THREADS) {
        const int ky = i / lines, c = i % lines;
        si[ky * wh + first + c] = tile[ky * cols + c];
    }
}

// Pass 3: block (g, i) packs half-row pairs g * pairs .. of image i, inverse-transforms them and
// writes low (the real rows) and high = x - low. Shared as freq_rows_forward_f32.
extern "C" __global__ void __launch_bounds__(FS_THREADS)
    freq_rows_inverse_f32(const float* __restrict__ x, const float2* __restrict__ spec, float* __restrict__ low,
                          float* __restrict__ high, int h, int w, int log2w, int pairs) {
    extern __shared__ float2 smem[];
    const int hp = (h + 1) / 2, wh = w / 2 + 1;
    const int first = blockIdx.x * pairs;
    const int lines = min(pairs, hp - first);
    const int wp = row_len(w);
    float2* rows = smem;
    float2* tw = rows + pairs * wp;
    const long long image = blockIdx.y;
    const long long base = image * h * w;
    const float2* si = spec + image * h * wh;

    fill_twiddles(tw, log2w);
    for (int i = threadIdx.x; i < lines * wh; i += FS_THREADS) {
        const int l = i / wh, k = i % wh;
        const int r = 2 * (first + l);
        const float2 a = si[r * wh + k];
        const float2 b = r + 1 < h ? si[(r + 1) * wh + k] : make_float2(0.0f, 0.0f);
        pack_pair(rows + l * wp, w, log2w, k, a, b);
    }
    __syncthreads();
    fft_lines(rows, tw, lines, log2w, wp, 1, true, false, true, true);
    for (int i = threadIdx.x; i < lines * w; i += FS_THREADS) {
        const int r = 2 * (first + (i >> log2w)), j = i & (w - 1);
        const float2 z = rows[(i >> log2w) * wp + row_slot(j)];
        const long long o = base + (long long)r * w + j;
        low[o] = z.x;
        high[o] = x[o] - z.x;
        if (r + 1 < h) {
            low[o + w] = z.y;
            high[o + w] = x[o + w] - z.y;
        }
    }
}

// Between cuFFT's R2C and C2R (any h, w): block k = i * tiles + t (a 1-D grid of images *
// tiles blocks, tiles = ceil(h (w/2+1) / bins), so any number of images fits the grid) masks
// bins t * bins .. of image i's half-spectrum `[h][w/2+1]` in place (scaled by 1/(h w), so C2R
// yields low) and writes its unscaled band sums to partial[k * nbands + b]. Shared: nbands *
// FS_THREADS floats.
extern "C" __global__ void __launch_bounds__(FS_THREADS)
    freq_mask_energy_f32(float2* __restrict__ spec, double* __restrict__ partial, int h, int w, int bins,
                         const float* __restrict__ mask, const unsigned char* __restrict__ band, int nbands) {
    extern __shared__ float2 smem[];
    float* acc = (float*)smem;
    const int wh = w / 2 + 1;
    const long long total = (long long)h * wh;
    const long long tiles = (total + bins - 1) / bins;
    const long long image = blockIdx.x / tiles;
    const long long first = (blockIdx.x % tiles) * bins;
    const long long last = min(total, first + bins);
    float2* si = spec + image * total;
    zero_slots(acc, nbands);
    __syncthreads();
    for (long long i = first + threadIdx.x; i < last; i += FS_THREADS) {
        mask_bin(si + i, (int)i, (int)(i % wh), w, mask, band, acc);
    }
    __syncthreads();
    double* out = partial + (long long)blockIdx.x * nbands;
    reduce_slots(acc, nbands, 1.0, [&](int b, double e) { out[b] = e; });
}

// energy[i * nbands + b] = (sum over t < tiles of partial[(i * tiles + t) * nbands + b]) *
// scale, summed in f64 in order of t; one thread per (image, band).
extern "C" __global__ void __launch_bounds__(FS_THREADS)
    freq_energy_reduce_f32(const double* __restrict__ partial, float* __restrict__ energy, int images, int nbands,
                           int tiles, double scale) {
    const long long k = (long long)blockIdx.x * FS_THREADS + threadIdx.x;
    if (k >= (long long)images * nbands) return;
    const long long image = k / nbands;
    const int b = (int)(k % nbands);
    double sum = 0.0;
    for (int t = 0; t < tiles; ++t) sum += partial[(image * tiles + t) * nbands + b];
    energy[k] = (float)(sum * scale);
}

// high[i] = x[i] - low[i] for i < n (grid-stride).
extern "C" __global__ void __launch_bounds__(FS_THREADS)
    freq_subtract_f32(const float* __restrict__ x, const float* __restrict__ low, float* __restrict__ high,
                      long long n) {
    for (long long i = (long long)blockIdx.x * FS_THREADS + threadIdx.x; i < n;
         i += (long long)gridDim.x * FS_THREADS) {
        high[i] = x[i] - low[i];
    }
}
