//! The CubeCL backend of [`freq_split`](super::freq_split): a separable 2-D DFT on the device.
//!
//! Pipeline, per call (spectra live in two ping-pong pairs of `re`/`im` f32 buffers laid out
//! like `x`, `[images][ky][kx]`):
//!
//! 1. forward transform of every row (`x` -> `A`), then of every column (`A` -> `B`);
//! 2. band energies: per `(image, band, kx)` unit, `|X|^2` summed down the column in f32 with
//!    Kahan compensation; the `images * nbands * W` partial sums are read back and finished in
//!    f64 on the host (the f32 partials carry only a few ulps of summation error);
//! 3. `B *= M` with a per-bin mask table built on the host from the numpy-exact geometry of
//!    [`super::spectrum`];
//! 4. inverse transform of every column (`B` -> `A`), then of every row (`A` -> `B`);
//! 5. `low = re(B) / (H W)`, `high = x - low`.
//!
//! Each 1-D transform is one of three kernels:
//! - a power-of-two length whose line fits shared memory: an in-place radix-2 Cooley–Tukey
//!   FFT in shared memory, one cube per line (bit-reversed load, `log2 n` butterfly stages);
//! - other lengths above [`DIRECT_MAX`] whose Bluestein padding `m >= 2n - 1` fits shared
//!   memory: Bluestein's chirp-z transform through two `m`-point shared-memory FFTs, one cube
//!   per line (chirp and filter spectrum precomputed on the host in f64);
//! - the rest (short lines, or lines too long for shared memory): a direct DFT, one unit per
//!   output bin, `O(n)` work per bin.
//!
//! The per-bin tables and the per-length plans (twiddles, bit reversals, Bluestein spectra)
//! are built once per size and configuration and cached on the device for the process.
//!
//! Twiddles are computed on the host in f64 and rounded to f32 (`exp(-2 pi i k / n)`); the
//! inverse transforms use their conjugates and leave the `1/(H W)` scale to step 5.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cubecl::prelude::*;
use cubecl::wgpu::WgpuRuntime;

use super::spectrum::{bin_geometry, table_key, TableKey};
use super::{output, FreqDims, FreqSplitConfig, FreqSplitOutput, OP};
use crate::backend::cube::{CubeDevice, GpuArray};
use crate::error::{FapeError, Result};
use crate::tensor::View;

/// Units per cube of the elementwise, direct-DFT and energy kernels.
const ELEMWISE_CUBE: u32 = 256;

/// Most units per cube of the shared-memory FFT (each handles `n / 2 / units` butterflies per
/// stage).
const FFT_MAX_UNITS: usize = 256;

/// Longest line the shared-memory FFT takes (further capped by the adapter's shared memory,
/// `8 n` bytes per line); longer power-of-two lines fall back to the direct DFT.
const FFT_MAX_LEN: usize = 4096;

/// A band index no bin matches (bins outside every band).
const NO_BAND: u32 = u32::MAX;

/// The `log2n` radix-2 decimation-in-time stages of an `n`-point FFT of the line held in
/// `s_re`/`s_im` in bit-reversed order, in place, leaving it in natural order; twiddles
/// `tw[k] = exp(-2 pi i k / n)`, `k < n / 2`, conjugated when `inverse` (no `1/n` scale).
/// Every unit of the cube must call it (it synchronises the cube after each stage); the caller
/// synchronises before it, after filling the line.
#[cube]
fn fft_in_shared(
    s_re: &mut SharedMemory<f32>,
    s_im: &mut SharedMemory<f32>,
    tw_re: &Array<f32>,
    tw_im: &Array<f32>,
    #[comptime] n: usize,
    #[comptime] log2n: usize,
    #[comptime] inverse: bool,
) {
    let units = CUBE_DIM as usize;
    let half = n / 2;
    for stage in 0..log2n {
        let m = 1usize << stage; // half the butterfly span of this stage
        let tw_step = half >> stage; // n / (2 m)
        let mut i = UNIT_POS as usize;
        while i < half {
            let pos = i & (m - 1);
            let a = (i - pos) * 2 + pos;
            let b = a + m;
            let t = pos * tw_step;
            let wr = tw_re[t];
            let mut wi = tw_im[t];
            if inverse {
                wi = -wi;
            }
            let br = s_re[b];
            let bi = s_im[b];
            let tr = wr * br - wi * bi;
            let ti = wr * bi + wi * br;
            let ar = s_re[a];
            let ai = s_im[a];
            s_re[a] = ar + tr;
            s_im[a] = ai + ti;
            s_re[b] = ar - tr;
            s_im[b] = ai - ti;
            i += units;
        }
        sync_cube();
    }
}

/// Radix-2 FFT of one line per cube, in shared memory.
///
/// Line `l` (cube `min(CUBE_POS, lines - 1)`) of image `l / lines_per_image` starts at
/// `image * image_size + (l % lines_per_image) * line_step`, its elements `elem_stride` apart.
/// It is loaded in bit-reversed order (`bitrev`), transformed in `log2n` stages with twiddles
/// `tw[k] = exp(-2 pi i k / n)`, `k < n / 2` (conjugated when `inverse`), and stored in natural
/// order at the same place of `out`. With `real_input` the imaginary input is zero and `in_im`
/// is not read. Cubes past `lines` (the grid's tail) compute the last line again but write
/// nothing, so every unit of every cube reaches every barrier.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn fft_lines_kernel(
    in_re: &Array<f32>,
    in_im: &Array<f32>,
    out_re: &mut Array<f32>,
    out_im: &mut Array<f32>,
    tw_re: &Array<f32>,
    tw_im: &Array<f32>,
    bitrev: &Array<u32>,
    lines: u32,
    lines_per_image: u32,
    line_step: u32,
    elem_stride: u32,
    image_size: u32,
    #[comptime] n: usize,
    #[comptime] log2n: usize,
    #[comptime] inverse: bool,
    #[comptime] real_input: bool,
) {
    let lines = lines as usize;
    let lines_per_image = lines_per_image as usize;
    let stride = elem_stride as usize;
    let units = CUBE_DIM as usize;
    let writes = CUBE_POS < lines;
    let line = if writes { CUBE_POS } else { lines - 1 };
    let image = line / lines_per_image;
    let base = image * (image_size as usize) + (line % lines_per_image) * (line_step as usize);

    let mut s_re = SharedMemory::<f32>::new(n);
    let mut s_im = SharedMemory::<f32>::new(n);

    let mut j = UNIT_POS as usize;
    while j < n {
        let src = base + j * stride;
        let dst = bitrev[j] as usize;
        s_re[dst] = in_re[src];
        if real_input {
            s_im[dst] = 0.0f32;
        } else {
            s_im[dst] = in_im[src];
        }
        j += units;
    }
    sync_cube();

    fft_in_shared(&mut s_re, &mut s_im, tw_re, tw_im, n, log2n, inverse);

    if writes {
        let mut k = UNIT_POS as usize;
        while k < n {
            let dst = base + k * stride;
            out_re[dst] = s_re[k];
            out_im[dst] = s_im[k];
            k += units;
        }
    }
}

/// Bluestein (chirp-z) DFT of one line of any length `len` per cube, through a power-of-two
/// `m >= 2 len - 1` point FFT in shared memory. With the chirp `c[j] = exp(-pi i j^2 / len)`
/// (conjugated when `inverse`): `a[j] = x[j] c[j]` zero-padded to `m`, `y = ifft_m(fft_m(a) *
/// bhat)` where `bhat` is the (direction's) precomputed `fft_m` of the wrapped conjugate chirp,
/// and `X[k] = c[k] y[k]`, the `1/m` folded into `bhat`. Lines, addressing, the grid's tail and
/// `real_input` as in [`fft_lines_kernel`].
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn bluestein_lines_kernel(
    in_re: &Array<f32>,
    in_im: &Array<f32>,
    out_re: &mut Array<f32>,
    out_im: &mut Array<f32>,
    tw_re: &Array<f32>,
    tw_im: &Array<f32>,
    bitrev: &Array<u32>,
    chirp_re: &Array<f32>,
    chirp_im: &Array<f32>,
    bhat_re: &Array<f32>,
    bhat_im: &Array<f32>,
    len: u32,
    lines: u32,
    lines_per_image: u32,
    line_step: u32,
    elem_stride: u32,
    image_size: u32,
    #[comptime] m: usize,
    #[comptime] log2m: usize,
    #[comptime] inverse: bool,
    #[comptime] real_input: bool,
) {
    let len = len as usize;
    let lines = lines as usize;
    let lines_per_image = lines_per_image as usize;
    let stride = elem_stride as usize;
    let units = CUBE_DIM as usize;
    let writes = CUBE_POS < lines;
    let line = if writes { CUBE_POS } else { lines - 1 };
    let image = line / lines_per_image;
    let base = image * (image_size as usize) + (line % lines_per_image) * (line_step as usize);

    let mut s_re = SharedMemory::<f32>::new(m);
    let mut s_im = SharedMemory::<f32>::new(m);

    // a = x * c, zero-padded, in bit-reversed order.
    let mut j = UNIT_POS as usize;
    while j < m {
        let dst = bitrev[j] as usize;
        if j < len {
            let src = base + j * stride;
            let cr = chirp_re[j];
            let mut ci = chirp_im[j];
            if inverse {
                ci = -ci;
            }
            let xr = in_re[src];
            if real_input {
                s_re[dst] = xr * cr;
                s_im[dst] = xr * ci;
            } else {
                let xi = in_im[src];
                s_re[dst] = xr * cr - xi * ci;
                s_im[dst] = xr * ci + xi * cr;
            }
        } else {
            s_re[dst] = 0.0f32;
            s_im[dst] = 0.0f32;
        }
        j += units;
    }
    sync_cube();
    fft_in_shared(&mut s_re, &mut s_im, tw_re, tw_im, m, log2m, false);

    // Multiply by bhat, then permute to bit-reversed order (disjoint swaps) for the inverse.
    let mut k = UNIT_POS as usize;
    while k < m {
        let ar = s_re[k];
        let ai = s_im[k];
        let br = bhat_re[k];
        let bi = bhat_im[k];
        s_re[k] = ar * br - ai * bi;
        s_im[k] = ar * bi + ai * br;
        k += units;
    }
    sync_cube();
    let mut p = UNIT_POS as usize;
    while p < m {
        let r = bitrev[p] as usize;
        if p < r {
            let tr = s_re[p];
            let ti = s_im[p];
            s_re[p] = s_re[r];
            s_im[p] = s_im[r];
            s_re[r] = tr;
            s_im[r] = ti;
        }
        p += units;
    }
    sync_cube();
    fft_in_shared(&mut s_re, &mut s_im, tw_re, tw_im, m, log2m, true);

    if writes {
        let mut q = UNIT_POS as usize;
        while q < len {
            let cr = chirp_re[q];
            let mut ci = chirp_im[q];
            if inverse {
                ci = -ci;
            }
            let yr = s_re[q];
            let yi = s_im[q];
            let dst = base + q * stride;
            out_re[dst] = yr * cr - yi * ci;
            out_im[dst] = yr * ci + yi * cr;
            q += units;
        }
    }
}

/// Direct DFT of lines of any length `n`, one unit per output bin: unit `p < total` computes bin
/// `k = p % n` of line `p / n` (addressed as in [`fft_lines_kernel`]) as
/// `sum_j in[j] tw[(j k) mod n]`, `tw[k] = exp(-2 pi i k / n)` (conjugated when `inverse`).
/// With `real_input` the imaginary input is zero and `in_im` is not read.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn dft_lines_kernel(
    in_re: &Array<f32>,
    in_im: &Array<f32>,
    out_re: &mut Array<f32>,
    out_im: &mut Array<f32>,
    tw_re: &Array<f32>,
    tw_im: &Array<f32>,
    total: u32,
    n: u32,
    lines_per_image: u32,
    line_step: u32,
    elem_stride: u32,
    image_size: u32,
    #[comptime] inverse: bool,
    #[comptime] real_input: bool,
) {
    let pos = ABSOLUTE_POS;
    if pos < total as usize {
        let n = n as usize;
        let lines_per_image = lines_per_image as usize;
        let stride = elem_stride as usize;
        let line = pos / n;
        let k = pos % n;
        let image = line / lines_per_image;
        let base = image * (image_size as usize) + (line % lines_per_image) * (line_step as usize);
        let mut acc_re = 0.0f32;
        let mut acc_im = 0.0f32;
        let mut t = 0usize; // (j k) mod n
        for j in 0..n {
            let src = base + j * stride;
            let xr = in_re[src];
            let wr = tw_re[t];
            let mut wi = tw_im[t];
            if inverse {
                wi = -wi;
            }
            if real_input {
                acc_re += xr * wr;
                acc_im += xr * wi;
            } else {
                let xi = in_im[src];
                acc_re += xr * wr - xi * wi;
                acc_im += xr * wi + xi * wr;
            }
            t += k;
            if t >= n {
                t -= n;
            }
        }
        let dst = base + k * stride;
        out_re[dst] = acc_re;
        out_im[dst] = acc_im;
    }
}

/// Per-`(image, band, kx)` partial band energy: unit `p < total` (`p = (image * nbands + band)
/// * width + kx`) sums `re^2 + im^2` over the `height` bins of column `kx` whose `band` table
/// entry is `band`, with Kahan compensation.
#[cube(launch_unchecked)]
fn band_energy_kernel(
    re: &Array<f32>,
    im: &Array<f32>,
    band: &Array<u32>,
    partial: &mut Array<f32>,
    total: u32,
    nbands: u32,
    height: u32,
    width: u32,
) {
    let pos = ABSOLUTE_POS;
    if pos < total as usize {
        let width = width as usize;
        let nbands = nbands as usize;
        let kx = pos % width;
        let row = pos / width; // image * nbands + band
        let b = (row % nbands) as u32;
        let image = row / nbands;
        let pixels = (height as usize) * width;
        let base = image * pixels;
        let mut sum = 0.0f32;
        let mut carry = 0.0f32;
        for ky in 0..height as usize {
            let bin = ky * width + kx;
            if band[bin] == b {
                let r = re[base + bin];
                let i = im[base + bin];
                let y = (r * r + i * i) - carry;
                let t = sum + y;
                carry = (t - sum) - y;
                sum = t;
            }
        }
        partial[pos] = sum;
    }
}

/// `re[p] *= mask[p % pixels]`, `im[p] *= mask[p % pixels]` for `p < re.len()`.
#[cube(launch_unchecked)]
fn apply_mask_kernel(re: &mut Array<f32>, im: &mut Array<f32>, mask: &Array<f32>, pixels: u32) {
    let pos = ABSOLUTE_POS;
    if pos < re.len() {
        let m = mask[pos % (pixels as usize)];
        re[pos] *= m;
        im[pos] *= m;
    }
}

/// `low[p] = re[p] * scale`, `high[p] = x[p] - low[p]` for `p < low.len()`.
#[cube(launch_unchecked)]
fn finish_kernel(re: &Array<f32>, x: &Array<f32>, low: &mut Array<f32>, high: &mut Array<f32>, scale: f32) {
    let pos = ABSOLUTE_POS;
    if pos < low.len() {
        let l = re[pos] * scale;
        low[pos] = l;
        high[pos] = x[pos] - l;
    }
}

/// A complex buffer of `len` elements as separate real and imaginary f32 arrays.
struct Complex {
    re: GpuArray<f32>,
    im: GpuArray<f32>,
}

impl Complex {
    fn output(d: &CubeDevice, len: usize) -> Result<Self> {
        Ok(Self { re: d.output(len)?, im: d.output(len)? })
    }
}

/// How the transforms of one length run, with its device tables.
#[allow(clippy::large_enum_variant)] // a few plans per process, each behind an `Arc`
enum LinePlan {
    /// Shared-memory radix-2 FFT: `tw` holds `exp(-2 pi i k / n)` for `k < n / 2`, `bitrev`
    /// the bit reversal of `0..n` over `log2n` bits.
    Fft { tw: Complex, bitrev: GpuArray<u32>, log2n: usize },
    /// Bluestein through an `m`-point shared-memory FFT (`tw`, `bitrev` as for
    /// [`LinePlan::Fft`] at length `m`): `chirp[j] = exp(-pi i j^2 / n)`, `j < n`, and
    /// `bhat[d]` the `fft_m` of the wrapped conjugate chirp of direction `d` (forward,
    /// inverse), divided by `m`.
    Bluestein { tw: Complex, bitrev: GpuArray<u32>, m: usize, chirp: Complex, bhat: [Complex; 2] },
    /// Direct DFT: `tw` holds `exp(-2 pi i k / n)` for `k < n`.
    Dft { tw: Complex },
}

/// Lines up to this length (not a power of two) use the direct DFT; longer ones Bluestein.
const DIRECT_MAX: usize = 32;

/// The twiddles `exp(-2 pi i k / n)`, `k < count`, computed in f64 and rounded to f32.
fn twiddles(d: &CubeDevice, n: usize, count: usize) -> Result<Complex> {
    let (re, im): (Vec<f32>, Vec<f32>) = (0..count.max(1))
        .map(|k| {
            let angle = -2.0 * std::f64::consts::PI * (k as f64) / (n as f64);
            (angle.cos() as f32, angle.sin() as f32)
        })
        .unzip();
    Ok(Complex { re: d.upload(&re)?, im: d.upload(&im)? })
}

/// The bit reversal of `0..n` (`n` a power of two).
fn bit_reversal(n: usize) -> Vec<u32> {
    let bits = n.trailing_zeros();
    (0..n as u32).map(|j| if bits == 0 { 0 } else { j.reverse_bits() >> (32 - bits) }).collect()
}

/// Bluestein's host tables of length `n` through `m` points, in f64 rounded to f32: the chirp
/// `exp(-pi i j^2 / n)` (`j^2` reduced mod `2 n` first) and, per direction, `fft_m(b) / m` with
/// `b[j] = b[m - j] = conj(chirp[j])` of that direction, zero between.
#[allow(clippy::type_complexity)]
fn bluestein_tables(n: usize, m: usize) -> ((Vec<f32>, Vec<f32>), [(Vec<f32>, Vec<f32>); 2]) {
    use rustfft::num_complex::Complex64;
    let chirp: Vec<Complex64> = (0..n as u64)
        .map(|j| {
            let angle = -std::f64::consts::PI * ((j * j) % (2 * n as u64)) as f64 / n as f64;
            Complex64::new(angle.cos(), angle.sin())
        })
        .collect();
    let fft = rustfft::FftPlanner::<f64>::new().plan_fft_forward(m);
    let bhat = |inverse: bool| {
        let mut b = vec![Complex64::new(0.0, 0.0); m];
        for (j, c) in chirp.iter().enumerate() {
            // The direction's chirp is conj(c) when inverse; b holds its conjugate.
            let v = if inverse { *c } else { c.conj() };
            b[j] = v;
            if j > 0 {
                b[m - j] = v;
            }
        }
        fft.process(&mut b);
        let scale = 1.0 / m as f64;
        b.iter().map(|v| ((v.re * scale) as f32, (v.im * scale) as f32)).unzip()
    };
    let chirp32 = chirp.iter().map(|c| (c.re as f32, c.im as f32)).unzip();
    (chirp32, [bhat(false), bhat(true)])
}

impl LinePlan {
    /// The plan of length `n`, built by [`LinePlan::new`] on first use and kept for the life
    /// of the process (a handful of lengths in practice; starts afresh past
    /// [`MAX_CACHED_TABLES`] `* 2`).
    fn get(d: &CubeDevice, n: usize) -> Result<Arc<Self>> {
        static CACHE: OnceLock<Mutex<HashMap<usize, Arc<LinePlan>>>> = OnceLock::new();
        let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(plan) = cache.get(&n) {
            return Ok(Arc::clone(plan));
        }
        let plan = Arc::new(Self::new(d, n)?);
        if cache.len() >= 2 * MAX_CACHED_TABLES {
            cache.clear();
        }
        cache.insert(n, Arc::clone(&plan));
        Ok(plan)
    }

    /// The plan of length `n` on `d`: the shared-memory FFT when `n` is a power of two whose
    /// line (`8 n` bytes) fits the adapter's shared memory (and [`FFT_MAX_LEN`]), the direct
    /// DFT up to [`DIRECT_MAX`], Bluestein when its `m`-point line fits likewise, the direct
    /// DFT otherwise.
    fn new(d: &CubeDevice, n: usize) -> Result<Self> {
        let shared = d.client().properties().hardware.max_shared_memory_size;
        let fits = |len: usize| len <= FFT_MAX_LEN && 8 * len <= shared;
        let upload = |(re, im): (Vec<f32>, Vec<f32>)| -> Result<Complex> {
            Ok(Complex { re: d.upload(&re)?, im: d.upload(&im)? })
        };
        if n.is_power_of_two() && fits(n) {
            return Ok(Self::Fft {
                tw: twiddles(d, n, n / 2)?,
                bitrev: d.upload(&bit_reversal(n))?,
                log2n: n.trailing_zeros() as usize,
            });
        }
        let m = (2 * n - 1).next_power_of_two();
        if n > DIRECT_MAX && fits(m) {
            let (chirp, [forward, inverse]) = bluestein_tables(n, m);
            return Ok(Self::Bluestein {
                tw: twiddles(d, m, m / 2)?,
                bitrev: d.upload(&bit_reversal(m))?,
                m,
                chirp: upload(chirp)?,
                bhat: [upload(forward)?, upload(inverse)?],
            });
        }
        Ok(Self::Dft { tw: twiddles(d, n, n)? })
    }
}

/// Most `(H, W, config)` entries [`Tables::get`] keeps before starting afresh.
const MAX_CACHED_TABLES: usize = 16;

/// The device tables of one `(H, W, config)`: the per-bin mask and band tables (`[ky][kx]`,
/// from the same numpy-exact geometry as the reference) and the row and column plans, kept for
/// the life of the process so that repeated calls at one size upload nothing but `x`. The
/// cache needs no device in its key: [`CubeDevice::open`] hands out one process-wide device.
struct Tables {
    mask: GpuArray<f32>,
    band: GpuArray<u32>,
    rows: Arc<LinePlan>,
    cols: Arc<LinePlan>,
    /// A one-element stand-in for the imaginary input of `real_input` transforms (never read).
    no_im: GpuArray<f32>,
}

impl Tables {
    /// The tables of `h x w` images under `config` (validated), built and uploaded on first use.
    fn get(d: &CubeDevice, h: usize, w: usize, config: &FreqSplitConfig) -> Result<Arc<Self>> {
        static CACHE: OnceLock<Mutex<HashMap<TableKey, Arc<Tables>>>> = OnceLock::new();
        let key = table_key(h, w, config);
        // A panic while building leaves the map itself consistent, so a poisoned lock is usable.
        let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tables) = cache.get(&key) {
            return Ok(Arc::clone(tables));
        }
        let (mask, band): (Vec<f32>, Vec<u32>) =
            bin_geometry(h, w, w, config).map(|(m, b)| (m as f32, b.map_or(NO_BAND, |b| b as u32))).unzip();
        let rows = LinePlan::get(d, w)?;
        let cols = LinePlan::get(d, h)?;
        let tables =
            Arc::new(Self { mask: d.upload(&mask)?, band: d.upload(&band)?, rows, cols, no_im: d.upload(&[0.0f32])? });
        if cache.len() >= MAX_CACHED_TABLES {
            cache.clear();
        }
        cache.insert(key, Arc::clone(&tables));
        Ok(tables)
    }
}

/// The lines of one axis of the `[images][H][W]` layout.
struct Axis {
    /// Line length.
    n: usize,
    /// Lines in all images.
    lines: usize,
    lines_per_image: usize,
    /// Offset between consecutive lines of an image.
    line_step: usize,
    /// Offset between consecutive elements of a line.
    elem_stride: usize,
    /// Elements per image (`H W`).
    image_size: usize,
}

/// Transforms every line of `axis` from `input` into `output` (`real_input`: `input.im` is
/// ignored and may be any buffer).
fn transform(
    d: &CubeDevice,
    plan: &LinePlan,
    axis: &Axis,
    input: &Complex,
    output: &Complex,
    inverse: bool,
    real_input: bool,
) -> Result<()> {
    let &Axis { n, lines, lines_per_image, line_step, elem_stride, image_size } = axis;
    match plan {
        LinePlan::Fft { tw, bitrev, log2n } => {
            let units = (n / 2).clamp(1, FFT_MAX_UNITS) as u32;
            let cube_dim = CubeDim::new_1d(units);
            // One cube per line; the grid may hold a few more (they write nothing).
            let cube_count = d.cube_count_1d(lines * units as usize, cube_dim);
            d.guarded("launching freq_split fft_lines", || {
                // SAFETY: line `l < lines` of image `l / lines_per_image` addresses
                // `image * image_size + r * line_step + j * elem_stride` with
                // `r < lines_per_image`, `j < n`; for rows (`r < H`, step `W`, stride 1, n = W)
                // and columns (`r < W`, step 1, stride `W`, n = H) that is below
                // `images * H * W`, the length of every data buffer passed; cubes past `lines`
                // clamp to the last line and do not write. `bitrev` holds `n` entries below
                // `n` (indices into the `n`-element shared arrays); `tw` holds `n / 2` entries
                // and is indexed at `pos * n / (2 m) < n / 2` (`pos < m`). The loops are
                // bounded by `n`, `n / 2` and the compile-time `log2n`.
                unsafe {
                    fft_lines_kernel::launch_unchecked::<WgpuRuntime>(
                        d.client(),
                        cube_count,
                        cube_dim,
                        input.re.arg(),
                        input.im.arg(),
                        output.re.arg(),
                        output.im.arg(),
                        tw.re.arg(),
                        tw.im.arg(),
                        bitrev.arg(),
                        lines as u32,
                        lines_per_image as u32,
                        line_step as u32,
                        elem_stride as u32,
                        image_size as u32,
                        n,
                        *log2n,
                        inverse,
                        real_input,
                    )
                }
            })
        }
        LinePlan::Bluestein { tw, bitrev, m, chirp, bhat } => {
            let m = *m;
            let units = (m / 2).clamp(1, FFT_MAX_UNITS) as u32;
            let cube_dim = CubeDim::new_1d(units);
            let cube_count = d.cube_count_1d(lines * units as usize, cube_dim);
            let bhat = &bhat[usize::from(inverse)];
            d.guarded("launching freq_split bluestein_lines", || {
                // SAFETY: data addressing as in the FFT launch above, elements `j < n` only;
                // `chirp` holds `n` entries indexed below `n`; `bitrev` and `bhat` hold `m`
                // entries indexed below `m`, `bitrev`'s values below `m` (the shared arrays'
                // length); `tw` holds `m / 2` entries indexed below `m / 2`. Loops are bounded
                // by `m`, `m / 2` and the compile-time `log2 m`.
                unsafe {
                    bluestein_lines_kernel::launch_unchecked::<WgpuRuntime>(
                        d.client(),
                        cube_count,
                        cube_dim,
                        input.re.arg(),
                        input.im.arg(),
                        output.re.arg(),
                        output.im.arg(),
                        tw.re.arg(),
                        tw.im.arg(),
                        bitrev.arg(),
                        chirp.re.arg(),
                        chirp.im.arg(),
                        bhat.re.arg(),
                        bhat.im.arg(),
                        n as u32,
                        lines as u32,
                        lines_per_image as u32,
                        line_step as u32,
                        elem_stride as u32,
                        image_size as u32,
                        m,
                        m.trailing_zeros() as usize,
                        inverse,
                        real_input,
                    )
                }
            })
        }
        LinePlan::Dft { tw } => {
            let total = lines * n;
            let cube_dim = CubeDim::new_1d(ELEMWISE_CUBE);
            let cube_count = d.cube_count_1d(total, cube_dim);
            d.guarded("launching freq_split dft_lines", || {
                // SAFETY: unit `p < total = lines * n` reads element `j < n` and writes bin
                // `p % n` of line `p / n < lines`, addressed as in the FFT launch above, so
                // below `images * H * W`, every data buffer's length; `tw` holds `n` entries,
                // indexed at `(j k) mod n`. The only loop is bounded by `n`.
                unsafe {
                    dft_lines_kernel::launch_unchecked::<WgpuRuntime>(
                        d.client(),
                        cube_count,
                        cube_dim,
                        input.re.arg(),
                        input.im.arg(),
                        output.re.arg(),
                        output.im.arg(),
                        tw.re.arg(),
                        tw.im.arg(),
                        total as u32,
                        n as u32,
                        lines_per_image as u32,
                        line_step as u32,
                        elem_stride as u32,
                        image_size as u32,
                        inverse,
                        real_input,
                    )
                }
            })
        }
    }
}

/// The split of validated `x` (`[B,C,H,W]` with extents `dims`) on a CubeCL device, in f32.
///
/// # Errors
/// [`FapeError::Unsupported`] when `x` does not fit the kernels' 32-bit indexing;
/// [`FapeError::Device`] on upload, launch or read-back failures.
pub(crate) fn freq_split(
    d: &CubeDevice,
    x: View<'_, f32>,
    dims: FreqDims,
    config: &FreqSplitConfig,
) -> Result<FreqSplitOutput<f32>> {
    let FreqDims { images, height: h, width: w } = dims;
    let (pixels, nbands) = (dims.pixels(), config.nbands());
    let len = images * pixels;
    // Every index the kernels form is below len (data) or images * nbands * W (partials).
    if len.max(images * nbands * w) as u64 >= u64::from(u32::MAX) {
        return Err(FapeError::Unsupported {
            op: OP,
            backend: "cube",
            what: format!("{len} elements exceed the kernels' 32-bit indexing"),
        });
    }

    let tables = Tables::get(d, h, w, config)?;
    let (row_plan, col_plan) = (&*tables.rows, &*tables.cols);
    let x_dev = d.upload(x.data())?;
    let rows = Axis { n: w, lines: images * h, lines_per_image: h, line_step: w, elem_stride: 1, image_size: pixels };
    let cols = Axis { n: h, lines: images * w, lines_per_image: w, line_step: 1, elem_stride: w, image_size: pixels };

    let a = Complex::output(d, len)?;
    let b = Complex::output(d, len)?;
    let x_in = Complex { re: x_dev.clone(), im: tables.no_im.clone() };
    transform(d, row_plan, &rows, &x_in, &a, false, true)?;
    transform(d, col_plan, &cols, &a, &b, false, false)?;

    let partial_len = images * nbands * w;
    let partial = d.output::<f32>(partial_len)?;
    let cube_dim = CubeDim::new_1d(ELEMWISE_CUBE);
    d.guarded("launching freq_split band_energy", || {
        // SAFETY: unit `p < partial_len` writes `partial[p]` and reads bins
        // `image * H * W + ky * W + kx` with `image < images`, `ky < H`, `kx < W` (below `len`,
        // the spectrum's length) and `band[ky * W + kx]` (below `H * W`, the table's length).
        // The only loop is bounded by `H`.
        unsafe {
            band_energy_kernel::launch_unchecked::<WgpuRuntime>(
                d.client(),
                d.cube_count_1d(partial_len, cube_dim),
                cube_dim,
                b.re.arg(),
                b.im.arg(),
                tables.band.arg(),
                partial.arg(),
                partial_len as u32,
                nbands as u32,
                h as u32,
                w as u32,
            )
        }
    })?;
    d.guarded("launching freq_split apply_mask", || {
        // SAFETY: unit `p < re.len() == im.len() == len` indexes `re`, `im` at `p` and `mask`
        // at `p % (H * W)`, below the mask table's `H * W` entries.
        unsafe {
            apply_mask_kernel::launch_unchecked::<WgpuRuntime>(
                d.client(),
                d.cube_count_1d(len, cube_dim),
                cube_dim,
                b.re.arg(),
                b.im.arg(),
                tables.mask.arg(),
                pixels as u32,
            )
        }
    })?;

    transform(d, col_plan, &cols, &b, &a, true, false)?;
    transform(d, row_plan, &rows, &a, &b, true, false)?;

    let low = d.output::<f32>(len)?;
    let high = d.output::<f32>(len)?;
    let scale = (1.0 / pixels as f64) as f32;
    d.guarded("launching freq_split finish", || {
        // SAFETY: unit `p < low.len() == len` indexes `re`, `x`, `low` and `high`, all of `len`
        // elements, at `p`.
        unsafe {
            finish_kernel::launch_unchecked::<WgpuRuntime>(
                d.client(),
                d.cube_count_1d(len, cube_dim),
                cube_dim,
                b.re.arg(),
                x_dev.arg(),
                low.arg(),
                high.arg(),
                scale,
            )
        }
    })?;

    // Band energies finished in f64: the f32 partial sums per (image, band, kx), summed over kx.
    let partial = d.read(&partial)?;
    let inv_pixels = 1.0 / pixels as f64;
    let energy =
        partial.chunks(w).map(|col| (col.iter().map(|&e| f64::from(e)).sum::<f64>() * inv_pixels) as f32).collect();
    Ok(output(x.shape(), nbands, d.read(&low)?, d.read(&high)?, energy))
}
