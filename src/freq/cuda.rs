//! The CUDA backend of [`freq_split`](super::freq_split) (kernels in `kernels/freq_split.cu`).
//!
//! Three routes, picked per call by [`CudaFftPath::Auto`]:
//!
//! - **fused**: power-of-two `H`, `W` <= 128 whose packed rows and half-spectrum fit one block's
//!   shared memory (128 x 128 needs about 140 KiB with 5 bands): one launch, one block per
//!   image, reading `x` once and writing `low`, `high` and the band energies once.
//! - **three passes**: power-of-two `H`, `W` <= 4096: rows forward (two real rows per complex
//!   FFT, half-rows written once), columns (forward FFT, mask, band energies, inverse FFT, in
//!   place), rows inverse (writing `low` and `high = x - low` together), through a half-spectrum
//!   scratch. Images go through the three passes in chunks whose half-spectra fit half the L2
//!   cache, so the scratch traffic mostly stays on chip and HBM sees about `x` twice, `low` and
//!   `high` once.
//! - **cuFFT**: any other size: cuFFT R2C, the mask-and-energy kernel, cuFFT C2R (its output is
//!   `low`, the `1/(H W)` being folded into the mask), then `high = x - low`.
//!   [`CudaFftPath::Cufft`] forces it: the benchmark's "cufft+mask" baseline.
//!
//! Precision: the FFTs are f32 decimation in time (radix-8 passes, one radix-4 or -2 pass for
//! the rest) with twiddles from `sincospif` (about `eps log2 n` relative error); each thread
//! sums its bins' `|X|^2` per band in f32 (about 32 terms), blocks add their threads' sums in
//! f64 in a fixed order, and per-block partials are added in f64 in block order, so the band
//! energies are deterministic and carry only the f32 spectrum's round-off. A bin's mask and band
//! come from a per-shape [`SpectralTable`] built on the host from the reference's f64 geometry,
//! so its band and hard-mask side are the reference's exactly. At most [`MAX_BANDS`] bands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::cufft::sys::{cufftType, float2};
use cudarc::cufft::CudaFft;
use cudarc::driver::{sys as cu, CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, DeviceRepr, PushKernelArg};

use super::spectrum::{bin_geometry, table_key, TableKey};
use super::{output, validate, FreqDims, FreqSplitConfig, FreqSplitOutput, OP};
use crate::backend::cuda::{
    dev_err, kernel_int, launch_config, require_library, tiles, CudaDevice, DeviceGraph, MathLibrary, FREQ_SPLIT_CU,
};
use crate::error::{FapeError, Result};
use crate::tensor::View;

/// The most bands the CUDA kernels accumulate (`FS_MAX_BANDS` in `kernels/freq_split.cu`).
pub const MAX_BANDS: usize = 16;

/// Threads per block of every kernel (`FS_THREADS`).
const THREADS: usize = 256;
/// Longest side of the fused single-launch kernel.
const FUSED_MAX_SIDE: usize = 128;
/// Longest side of the three-pass path.
const PASS_MAX_SIDE: usize = 4096;
/// Complex points per block of the row passes (row pairs per block = this / W, at least 1).
const ROW_POINTS: usize = 4096;
/// Complex points per block of the column pass (columns per block = this / H, 1 to 16).
const COLUMN_POINTS: usize = 8192;
const MAX_COLUMNS: usize = 16;
/// Half-spectrum bins per block of the cuFFT path's mask kernel.
const MASK_BINS: usize = 8192;
/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_SHARED: usize = 48 * 1024;
/// Bytes of one complex f32.
const COMPLEX: usize = 8;

/// Which transforms the CUDA backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaFftPath {
    /// This crate's kernels for power-of-two sizes (fused up to 128 x 128, three passes up to
    /// 4096 per side), cuFFT with the mask kernel between its transforms otherwise.
    Auto,
    /// cuFFT R2C, the mask-and-energy kernel, cuFFT C2R and a subtraction, at every size (the
    /// FFT-library baseline).
    Cufft,
}

/// A bin outside every band in [`SpectralTable::band`] (`FS_NO_BAND`).
const NO_BAND: u8 = 255;

/// Most `(context, stream, H, W, config)` tables [`spectral_table`] keeps before starting afresh.
const MAX_CACHED_TABLES: usize = 16;

/// What the kernels read instead of computing each bin's geometry: the `[H][W/2+1]`
/// half-spectrum's `mask` (f32, the mask value times `1/(H W)`) and `band` (u8, [`NO_BAND`]
/// outside every band), built on the host from the reference's f64 geometry (so every band and
/// hard-mask side is the reference's) and uploaded once per shape and config: 5 bytes a bin,
/// read from L2 by every image of a batch.
struct SpectralTable {
    mask: CudaSlice<f32>,
    band: CudaSlice<u8>,
}

/// [`FapeError::Unsupported`] beyond [`MAX_BANDS`] bands.
fn check_bands(config: &FreqSplitConfig) -> Result<()> {
    if config.nbands() > MAX_BANDS {
        return Err(unsupported(format!("{} bands (the CUDA kernels take at most {MAX_BANDS})", config.nbands())));
    }
    Ok(())
}

/// The [`SpectralTable`] of `h x w` images under `config` (validated, at most [`MAX_BANDS`]
/// bands) on `d`'s stream, built and uploaded on first use. Tables are keyed by context and
/// stream too, and only ever used on the stream that uploaded them, so a table dropped from the
/// cache is freed after every kernel that read it.
fn spectral_table(d: &CudaDevice, h: usize, w: usize, config: &FreqSplitConfig) -> Result<Arc<SpectralTable>> {
    type Key = (usize, usize, TableKey);
    static CACHE: OnceLock<Mutex<HashMap<Key, Arc<SpectralTable>>>> = OnceLock::new();
    let stream = d.stream();
    let key = (stream.context().cu_ctx() as usize, stream.cu_stream() as usize, table_key(h, w, config));
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(table) = cache.get(&key) {
        return Ok(table.clone());
    }
    let scale = (1.0 / (h as f64 * w as f64)) as f32;
    let (mask, band): (Vec<f32>, Vec<u8>) =
        bin_geometry(h, w, w / 2 + 1, config).map(|(m, b)| (m as f32 * scale, b.map_or(NO_BAND, |b| b as u8))).unzip();
    let band = stream.clone_htod(&band).map_err(dev_err(format!("copying the {h}x{w} band table to the device")))?;
    let table = Arc::new(SpectralTable { mask: d.upload("mask table", &mask)?, band });
    if cache.len() >= MAX_CACHED_TABLES {
        cache.clear();
    }
    cache.insert(key, table.clone());
    Ok(table)
}

fn unsupported(what: String) -> FapeError {
    FapeError::Unsupported { op: OP, backend: "cuda", what }
}

/// The route one call takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Fused { shared: usize },
    ThreePass { pairs: usize, columns: usize, rows_shared: usize, columns_shared: usize },
    Cufft,
}

/// The config of one call and its number of bands (at most [`MAX_BANDS`]).
#[derive(Clone, Copy)]
struct Bands<'a> {
    nbands: usize,
    config: &'a FreqSplitConfig,
}

/// Shared-memory slots of one padded row of `w` points (`row_len` in the kernels: one float2 of
/// padding after every 16 points).
fn row_len(w: usize) -> usize {
    w + w / 16
}

/// Dynamic shared memory of `freq_split_fused_f32` for `h x w` and `nbands`.
fn fused_shared(h: usize, w: usize, nbands: usize) -> usize {
    let complex = h.div_ceil(2) * row_len(w) + h * (w / 2 + 1) + (w / 2).max(1) + (h / 2).max(1);
    complex * COMPLEX + nbands * THREADS * 4
}

/// Every kernel of `kernels/freq_split.cu`.
const KERNELS: [&str; 7] = [
    "freq_split_fused_f32",
    "freq_rows_forward_f32",
    "freq_columns_f32",
    "freq_rows_inverse_f32",
    "freq_mask_energy_f32",
    "freq_energy_reduce_f32",
    "freq_subtract_f32",
];

/// The kernels loaded in one context and the device limits the routes read: looked up once
/// per context, so a call costs no source hashing or function lookup on the host (which would
/// dominate a 10 us split).
struct Loaded {
    functions: HashMap<&'static str, CudaFunction>,
    /// Most dynamic shared memory one block may opt into, bytes.
    optin_shared: usize,
    /// L2 cache size, bytes.
    l2: usize,
}

/// The [`Loaded`] kernels of `d`'s context. Contexts are never reused while cached: the
/// functions keep their module, and the module its context, alive.
fn loaded(d: &CudaDevice) -> Result<Arc<Loaded>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Loaded>>>> = OnceLock::new();
    let key = d.stream().context().cu_ctx() as usize;
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(l) = cache.get(&key) {
        return Ok(l.clone());
    }
    let attribute = |a| d.attribute(a).map(|v| usize::try_from(v).unwrap_or(0));
    let optin_shared =
        attribute(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(DEFAULT_SHARED);
    let l2 = attribute(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?;
    let mut functions = HashMap::new();
    for name in KERNELS {
        let f = d.function(FREQ_SPLIT_CU, name)?;
        // Once per context, to the device's opt-in maximum: the attribute belongs to the
        // function, which every thread using this context shares, so setting it per call to
        // that call's size would let a concurrent call with a smaller size lower it between
        // another call's set and launch (CUDA_ERROR_INVALID_VALUE at launch). The attribute is
        // only a cap; each launch still asks for its own size.
        if optin_shared > DEFAULT_SHARED {
            f.set_attribute(
                cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                kernel_int(OP, "shared memory bytes", optin_shared)?,
            )
            .map_err(dev_err(format!("allowing {name} {optin_shared} bytes of dynamic shared memory")))?;
        }
        functions.insert(name, f);
    }
    let l = Arc::new(Loaded { functions, optin_shared, l2 });
    cache.insert(key, l.clone());
    Ok(l)
}

fn route(k: &Loaded, dims: FreqDims, nbands: usize, path: CudaFftPath) -> Route {
    let (h, w) = (dims.height, dims.width);
    if path == CudaFftPath::Cufft || !(h.is_power_of_two() && w.is_power_of_two()) {
        return Route::Cufft;
    }
    let optin = k.optin_shared;
    let shared = fused_shared(h, w, nbands);
    if h <= FUSED_MAX_SIDE && w <= FUSED_MAX_SIDE && shared <= optin {
        return Route::Fused { shared };
    }
    if h <= PASS_MAX_SIDE && w <= PASS_MAX_SIDE {
        let pairs = (ROW_POINTS / w).max(1);
        let columns = (COLUMN_POINTS / h).clamp(1, MAX_COLUMNS);
        let rows_shared = (pairs * row_len(w) + (w / 2).max(1)) * COMPLEX;
        let columns_shared = (h * columns + (h / 2).max(1)) * COMPLEX + nbands * THREADS * 4;
        if rows_shared.max(columns_shared) <= optin {
            return Route::ThreePass { pairs, columns, rows_shared, columns_shared };
        }
    }
    Route::Cufft
}

/// `kernel` (one of [`KERNELS`]), checked to be allowed `shared` bytes of dynamic shared memory
/// (every kernel may use up to [`Loaded::optin_shared`], set once in [`loaded`]).
fn function(k: &Loaded, kernel: &str, shared: usize) -> Result<CudaFunction> {
    if shared > k.optin_shared {
        return Err(unsupported(format!(
            "{kernel} with {shared} bytes of shared memory (the device allows {})",
            k.optin_shared
        )));
    }
    k.functions.get(kernel).cloned().ok_or_else(|| unsupported(format!("no kernel `{kernel}`")))
}

fn block(shared: usize) -> Result<((u32, u32, u32), u32)> {
    Ok(((THREADS as u32, 1, 1), kernel_int(OP, "shared memory bytes", shared)? as u32))
}

/// The split on device buffers: `x`, `low`, `high` hold `[B,C,H,W]` f32 of `dims` (non-empty,
/// validated), `energy` `[B,C,nbands]`; enqueued on `d`'s stream without synchronising.
///
/// # Errors
/// [`FapeError::Unsupported`] when a buffer is too short, beyond [`MAX_BANDS`] bands, when an
/// extent exceeds the kernels' 32-bit indexing or a size needs cuFFT and libcufft is missing;
/// [`FapeError::Nvrtc`] / [`FapeError::Device`] from compilation, allocation and launches.
#[allow(clippy::too_many_arguments)]
pub(crate) fn split_device(
    d: &CudaDevice,
    x: &CudaView<'_, f32>,
    low: &mut CudaViewMut<'_, f32>,
    high: &mut CudaViewMut<'_, f32>,
    energy: &mut CudaViewMut<'_, f32>,
    dims: FreqDims,
    config: &FreqSplitConfig,
    path: CudaFftPath,
) -> Result<()> {
    let nbands = config.nbands();
    check_bands(config)?;
    let len = dims.images * dims.pixels();
    if x.len() < len || low.len() < len || high.len() < len || energy.len() < dims.images * nbands {
        return Err(unsupported(format!(
            "buffers of {} / {} / {} / {} f32 for {len} pixels and {} band energies",
            x.len(),
            low.len(),
            high.len(),
            energy.len(),
            dims.images * nbands
        )));
    }
    // Indices within an image are 32-bit in the kernels (image offsets are 64-bit).
    kernel_int(OP, "pixels per image", dims.height * (dims.width + 2))?;
    let k = loaded(d)?;
    let bands = Bands { nbands, config };
    match route(&k, dims, nbands, path) {
        Route::Fused { shared } => launch_fused(d, &k, x, low, high, energy, dims, bands, shared),
        Route::ThreePass { pairs, columns, rows_shared, columns_shared } => {
            three_pass(d, &k, x, low, high, energy, dims, bands, (pairs, columns, rows_shared, columns_shared))
        }
        Route::Cufft => cufft_split(d, &k, x, low, high, energy, dims, bands),
    }
}

#[allow(clippy::too_many_arguments)]
fn launch_fused(
    d: &CudaDevice,
    k: &Loaded,
    x: &CudaView<'_, f32>,
    low: &mut CudaViewMut<'_, f32>,
    high: &mut CudaViewMut<'_, f32>,
    energy: &mut CudaViewMut<'_, f32>,
    dims: FreqDims,
    bands: Bands<'_>,
    shared: usize,
) -> Result<()> {
    let kernel = "freq_split_fused_f32";
    let table = spectral_table(d, dims.height, dims.width, bands.config)?;
    let nbands = bands.nbands as i32;
    let f = function(k, kernel, shared)?;
    let (threads, shared_u32) = block(shared)?;
    let cfg = launch_config(OP, (dims.images, 1, 1), threads, shared_u32)?;
    let (h, w) = (dims.height as i32, dims.width as i32);
    let (log2h, log2w) = (dims.height.trailing_zeros() as i32, dims.width.trailing_zeros() as i32);
    let mut launch = d.stream().launch_builder(&f);
    launch.arg(x).arg(&mut *low).arg(&mut *high).arg(&mut *energy).arg(&h).arg(&w).arg(&log2h).arg(&log2w);
    launch.arg(&table.mask).arg(&table.band).arg(&nbands);
    // SAFETY: the arguments match `freq_split_fused_f32(const float* x, float* low, float* high,
    // float* energy, int h, int w, int log2h, int log2w, const float* mask, const unsigned char*
    // band, int nbands)` in order and type; the tables hold the h (w/2+1) bins the kernel
    // indexes, and every band index in them is below nbands. One block per image (grid = images): it
    // reads x and writes low/high at image * h * w + [0, h w) and energy at image * nbands +
    // [0, nbands), all within the buffers (lengths checked by `split_device`); h and w are
    // powers of two <= 128 with log2h/log2w their exponents, and `shared` is the kernel's
    // dynamic shared memory for them (`fused_shared`), at most the opt-in maximum every kernel
    // is allowed in `loaded` (checked by `function`). low, high and energy are distinct
    // mutable buffers, x is not written. They outlive the launch: callers synchronise before
    // dropping them, and cudarc's drop waits on the stream otherwise.
    unsafe { launch.launch(cfg) }.map_err(dev_err(format!("launching {kernel}")))?;
    Ok(())
}

/// Images per chunk of the three-pass path: half-spectra of at most about half the L2 cache,
/// the images split into equal chunks.
fn chunk_images(k: &Loaded, dims: FreqDims) -> usize {
    let l2 = k.l2;
    let per_image = dims.height * (dims.width / 2 + 1) * COMPLEX;
    let most = (l2 / 2 / per_image).clamp(1, 65_535);
    // Equal chunks: 25 images with room for 24 run as 13 + 12, not 24 + 1.
    dims.images.div_ceil(dims.images.div_ceil(most))
}

/// A scratch buffer every element of which a kernel writes before any is read.
fn scratch<T: DeviceRepr>(d: &CudaDevice, what: &str, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: uninitialised device memory is only handed to kernels that write every element
    // they later read (documented at each use).
    unsafe { d.stream().alloc::<T>(len.max(1)) }
        .map_err(dev_err(format!("allocating scratch `{what}` ({len} elements)")))
}

#[allow(clippy::too_many_arguments)]
fn three_pass(
    d: &CudaDevice,
    k: &Loaded,
    x: &CudaView<'_, f32>,
    low: &mut CudaViewMut<'_, f32>,
    high: &mut CudaViewMut<'_, f32>,
    energy: &mut CudaViewMut<'_, f32>,
    dims: FreqDims,
    bands: Bands<'_>,
    (pairs, columns, rows_shared, columns_shared): (usize, usize, usize, usize),
) -> Result<()> {
    let (h, w) = (dims.height, dims.width);
    let (pixels, wh, nbands) = (dims.pixels(), w / 2 + 1, bands.nbands);
    let table = spectral_table(d, h, w, bands.config)?;
    let chunk = chunk_images(k, dims);
    let row_groups = tiles(h.div_ceil(2), pairs);
    let column_tiles = tiles(wh, columns);
    let mut spec = scratch::<float2>(d, "half-spectrum", chunk * h * wh)?;
    let mut partial = scratch::<f64>(d, "band partials", chunk * column_tiles * nbands)?;
    let forward = function(k, "freq_rows_forward_f32", rows_shared)?;
    let cols = function(k, "freq_columns_f32", columns_shared)?;
    let inverse = function(k, "freq_rows_inverse_f32", rows_shared)?;
    let reduce = function(k, "freq_energy_reduce_f32", 0)?;
    let (threads, rows_shared) = block(rows_shared)?;
    let (_, columns_shared) = block(columns_shared)?;
    let (h_i, w_i) = (h as i32, w as i32);
    let (log2h, log2w) = (h.trailing_zeros() as i32, w.trailing_zeros() as i32);
    let (pairs_i, columns_i) = (pairs as i32, columns as i32);
    let (nbands_i, tiles_i) = (nbands as i32, kernel_int(OP, "column tiles", column_tiles)?);
    let scale = 1.0 / (h as f64 * w as f64);
    let stream = d.stream();
    for first in (0..dims.images).step_by(chunk) {
        let n = chunk.min(dims.images - first);
        let (n_i, pix) = (n as i32, first * pixels..(first + n) * pixels);
        let x_c = x.slice(pix.clone());
        let mut low_c = low.slice_mut(pix.clone());
        let mut high_c = high.slice_mut(pix);
        let mut energy_c = energy.slice_mut(first * nbands..(first + n) * nbands);

        let cfg = launch_config(OP, (row_groups, n, 1), threads, rows_shared)?;
        let mut launch = stream.launch_builder(&forward);
        launch.arg(&x_c).arg(&mut spec).arg(&h_i).arg(&w_i).arg(&log2w).arg(&pairs_i);
        // SAFETY: matches `freq_rows_forward_f32(const float* x, float2* spec, int h, int w,
        // int log2w, int pairs)`. Block (g, i) reads rows 2 (g pairs + l) (+1 when < h) of
        // image i < n of x_c (n images of h w f32) and writes those rows' w/2+1 bins of image i
        // in spec (chunk >= n images of h (w/2+1) float2); the row groups cover all ceil(h/2)
        // pairs, so every spec element is written. Shared memory: pairs * row_len(w) +
        // max(w/2, 1) float2 = rows_shared, allowed in `function`. Buffers outlive the launch (see
        // `launch_fused`).
        unsafe { launch.launch(cfg) }.map_err(dev_err("launching freq_rows_forward_f32"))?;

        let cfg = launch_config(OP, (column_tiles, n, 1), threads, columns_shared)?;
        let mut launch = stream.launch_builder(&cols);
        launch.arg(&mut spec).arg(&mut partial).arg(&h_i).arg(&w_i).arg(&log2h).arg(&columns_i);
        launch.arg(&table.mask).arg(&table.band).arg(&nbands_i);
        // SAFETY: matches `freq_columns_f32(float2* spec, double* partial, int h, int w, int
        // log2h, int cols, const float* mask, const unsigned char* band, int nbands)`; the
        // tables hold the h (w/2+1) bins it indexes. Block (t, i) reads and rewrites columns
        // t cols .. min((t+1) cols, w/2+1) of image i's half-spectrum (written by the pass
        // above) and writes partial[(i tiles + t) nbands + b], b < nbands, inside the
        // chunk * tiles * nbands f64 of `partial`: every partial is written. Shared memory:
        // h cols + max(h/2,1) float2 and nbands * 256 f32 = columns_shared, allowed.
        unsafe { launch.launch(cfg) }.map_err(dev_err("launching freq_columns_f32"))?;

        let cfg = launch_config(OP, (tiles(n * nbands, THREADS), 1, 1), threads, 0)?;
        let mut launch = stream.launch_builder(&reduce);
        launch.arg(&partial).arg(&mut energy_c).arg(&n_i).arg(&nbands_i).arg(&tiles_i).arg(&scale);
        // SAFETY: matches `freq_energy_reduce_f32(const double* partial, float* energy, int
        // images, int nbands, int tiles, double scale)`: thread k < n nbands reads partial
        // [(k / nbands) tiles + t] rows (all written by the column pass) and writes
        // energy_c[k], inside the n * nbands f32 of the slice.
        unsafe { launch.launch(cfg) }.map_err(dev_err("launching freq_energy_reduce_f32"))?;

        let cfg = launch_config(OP, (row_groups, n, 1), threads, rows_shared)?;
        let mut launch = stream.launch_builder(&inverse);
        launch.arg(&x_c).arg(&spec).arg(&mut low_c).arg(&mut high_c).arg(&h_i).arg(&w_i).arg(&log2w).arg(&pairs_i);
        // SAFETY: matches `freq_rows_inverse_f32(const float* x, const float2* spec, float* low,
        // float* high, int h, int w, int log2w, int pairs)`. Block (g, i) reads image i's
        // half-rows of its pairs from spec and x, and writes the same rows of low_c and high_c
        // (n images of h w f32 each, distinct buffers). Shared memory as the forward pass.
        unsafe { launch.launch(cfg) }.map_err(dev_err("launching freq_rows_inverse_f32"))?;
    }
    Ok(())
}

/// Plan key: context, stream, transform extents (rank 1 when `h == 1`), batch and direction.
type PlanKey = (usize, usize, usize, usize, usize, bool);

/// A cached cuFFT plan of `batch` transforms of `h x w` images on `d`'s stream, R2C (`forward`)
/// or C2R. Plans keep their stream and its context alive, so a cached key is never reused by
/// another stream. The context is part of the key because the legacy and per-thread default
/// streams (candle's `Device::new_cuda` uses the latter) have the same handle in every context.
fn plan(d: &CudaDevice, h: usize, w: usize, batch: usize, forward: bool) -> Result<Arc<CudaFft>> {
    static PLANS: OnceLock<Mutex<HashMap<PlanKey, Arc<CudaFft>>>> = OnceLock::new();
    let stream = d.stream();
    let key = (stream.context().cu_ctx() as usize, stream.cu_stream() as usize, h, w, batch, forward);
    let mut plans = PLANS.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(p) = plans.get(&key) {
        return Ok(p.clone());
    }
    let n: Vec<i32> = if h == 1 { vec![kernel_int(OP, "width", w)?] } else { vec![h as i32, w as i32] };
    let kind = if forward { cufftType::CUFFT_R2C } else { cufftType::CUFFT_C2R };
    let batch_i = kernel_int(OP, "images", batch)?;
    let (real, half) = (kernel_int(OP, "pixels", h * w)?, kernel_int(OP, "bins", h * (w / 2 + 1))?);
    let (idist, odist) = if forward { (real, half) } else { (half, real) };
    let fft = CudaFft::plan_many(&n, None, 1, idist, None, 1, odist, kind, batch_i, stream.clone()).map_err(|e| {
        FapeError::Device {
            backend: "cuda",
            context: format!("planning a cuFFT {kind:?} of {batch} {h}x{w} images"),
            message: format!("{e}"),
        }
    })?;
    let fft = Arc::new(fft);
    plans.insert(key, fft.clone());
    Ok(fft)
}

fn cufft_error(what: &str) -> impl FnOnce(cudarc::cufft::result::CufftError) -> FapeError + '_ {
    move |e| FapeError::Device { backend: "cuda", context: what.to_string(), message: format!("{e}") }
}

#[allow(clippy::too_many_arguments)]
fn cufft_split(
    d: &CudaDevice,
    k: &Loaded,
    x: &CudaView<'_, f32>,
    low: &mut CudaViewMut<'_, f32>,
    high: &mut CudaViewMut<'_, f32>,
    energy: &mut CudaViewMut<'_, f32>,
    dims: FreqDims,
    bands: Bands<'_>,
) -> Result<()> {
    if require_library(MathLibrary::Cufft, "freq_split").is_err() {
        return Err(unsupported(format!(
            "{}x{} images need cuFFT (sizes other than powers of two up to {PASS_MAX_SIDE}), and libcufft was not found",
            dims.height, dims.width
        )));
    }
    // An H x 1 image is the same row-major data as a 1 x H image, with the same radius at every
    // bin (fx = 0 there, fy = 0 here), so it runs as a 1-D transform along its length.
    let (h, w) = if dims.width == 1 { (1, dims.height) } else { (dims.height, dims.width) };
    let (images, pixels, wh, nbands) = (dims.images, h * w, w / 2 + 1, bands.nbands);
    let table = spectral_table(d, h, w, bands.config)?;
    let len = images * pixels;
    let bins_per_image = h * wh;
    let mask_tiles = tiles(bins_per_image, MASK_BINS);
    let mut spec = scratch::<float2>(d, "half-spectrum", images * bins_per_image)?;
    let mut partial = scratch::<f64>(d, "band partials", images * mask_tiles * nbands)?;
    let (r2c, c2r) = (plan(d, h, w, images, true)?, plan(d, h, w, images, false)?);

    let x_n = x.slice(..len);
    let mut low_n = low.slice_mut(..len);
    // cuFFT wants 8-byte aligned buffers; a view at an odd offset (a sliced framework tensor)
    // is transformed from an aligned copy.
    let misaligned = |ptr: u64| !ptr.is_multiple_of(COMPLEX as u64);
    let x_misaligned = misaligned(x_n.device_ptr(d.stream()).0);
    let low_misaligned = misaligned(low_n.device_ptr(d.stream()).0);
    let aligned_x = if x_misaligned {
        let mut copy = scratch::<f32>(d, "aligned copy of x", len)?;
        d.stream().memcpy_dtod(&x_n, &mut copy).map_err(dev_err("copying x to an aligned buffer"))?;
        Some(copy)
    } else {
        None
    };
    match &aligned_x {
        Some(copy) => r2c.exec_r2c(copy, &mut spec),
        None => r2c.exec_r2c(&x_n, &mut spec),
    }
    .map_err(cufft_error("cuFFT R2C of x"))?;

    let shared = nbands * THREADS * 4;
    let (threads, shared_u32) = block(shared)?;
    let mask = function(k, "freq_mask_energy_f32", shared)?;
    let cfg = launch_config(OP, (mask_tiles * images, 1, 1), threads, shared_u32)?;
    let (h_i, w_i, bins_i) = (h as i32, w as i32, MASK_BINS as i32);
    let mut launch = d.stream().launch_builder(&mask);
    let nbands_i = nbands as i32;
    launch.arg(&mut spec).arg(&mut partial).arg(&h_i).arg(&w_i).arg(&bins_i);
    launch.arg(&table.mask).arg(&table.band).arg(&nbands_i);
    // SAFETY: matches `freq_mask_energy_f32(float2* spec, double* partial, int h, int w, int
    // bins, const float* mask, const unsigned char* band, int nbands)`; the tables hold the
    // h (w/2+1) bins of one image, which is what it indexes. Block k = i tiles + t (k < images * tiles) rewrites bins
    // [t bins, min((t+1) bins, h (w/2+1))) of image i of spec (images * h (w/2+1) float2, all
    // written by the R2C above) and writes partial[k nbands + b], b < nbands (images * tiles *
    // nbands f64: all written).
    // Shared memory: nbands * 256 f32, allowed. Buffers outlive the launch (see launch_fused).
    unsafe { launch.launch(cfg) }.map_err(dev_err("launching freq_mask_energy_f32"))?;

    let reduce = function(k, "freq_energy_reduce_f32", 0)?;
    let cfg = launch_config(OP, (tiles(images * nbands, THREADS), 1, 1), threads, 0)?;
    let (images_i, tiles_i) = (kernel_int(OP, "images", images)?, kernel_int(OP, "mask tiles", mask_tiles)?);
    let scale = 1.0 / (h as f64 * w as f64);
    let mut launch = d.stream().launch_builder(&reduce);
    launch.arg(&partial).arg(&mut *energy).arg(&images_i).arg(&nbands_i).arg(&tiles_i).arg(&scale);
    // SAFETY: as in `three_pass`: thread k < images * nbands reads written partials and writes
    // energy[k], inside the images * nbands f32 checked by `split_device`.
    unsafe { launch.launch(cfg) }.map_err(dev_err("launching freq_energy_reduce_f32"))?;

    if low_misaligned {
        let mut aligned_low = scratch::<f32>(d, "aligned low", len)?;
        c2r.exec_c2r(&mut spec, &mut aligned_low).map_err(cufft_error("cuFFT C2R of the masked spectrum"))?;
        d.stream().memcpy_dtod(&aligned_low, &mut low_n).map_err(dev_err("copying low from its aligned buffer"))?;
    } else {
        c2r.exec_c2r(&mut spec, &mut low_n).map_err(cufft_error("cuFFT C2R of the masked spectrum"))?;
    }

    let subtract = function(k, "freq_subtract_f32", 0)?;
    let cfg = launch_config(OP, (tiles(len, THREADS).min(1 << 16), 1, 1), threads, 0)?;
    let n = len as i64;
    let low_v = low_n.slice(..);
    let mut launch = d.stream().launch_builder(&subtract);
    launch.arg(&x_n).arg(&low_v).arg(&mut *high).arg(&n);
    // SAFETY: matches `freq_subtract_f32(const float* x, const float* low, float* high, long
    // long n)`: grid-stride over i < n, reading x and low and writing high, each holding at
    // least n f32 (checked by `split_device`); high is distinct from both.
    unsafe { launch.launch(cfg) }.map_err(dev_err("launching freq_subtract_f32"))?;
    Ok(())
}

/// The split of validated `x` (`[B,C,H,W]` with extents `dims`) on `d`: upload, launch,
/// download (outputs poisoned first when `d` is).
pub(crate) fn freq_split(
    d: &CudaDevice,
    x: View<'_, f32>,
    dims: FreqDims,
    config: &FreqSplitConfig,
) -> Result<FreqSplitOutput<f32>> {
    let mut buffers = CudaSplitBuffers::upload(d, x, dims, config.nbands())?;
    buffers.run(d, config, CudaFftPath::Auto)?;
    buffers.download(d)
}

/// The GPU time of one call of `enqueue`: `reps` calls between two CUDA events on `device`'s
/// stream, the elapsed time divided by `reps`.
fn event_time(
    device: &CudaDevice,
    reps: usize,
    mut enqueue: impl FnMut() -> Result<()>,
) -> Result<std::time::Duration> {
    let reps = reps.max(1);
    let stream = device.stream();
    let timing = Some(cu::CUevent_flags::CU_EVENT_DEFAULT);
    let start = stream.record_event(timing).map_err(dev_err("recording the start event"))?;
    for _ in 0..reps {
        enqueue()?;
    }
    let end = stream.record_event(timing).map_err(dev_err("recording the end event"))?;
    let ms = start.elapsed_ms(&end).map_err(dev_err("reading the elapsed time (or a kernel failed)"))?;
    Ok(std::time::Duration::from_secs_f64(f64::from(ms) * 1e-3 / reps as f64))
}

/// Device-resident input and outputs of repeated splits at one shape, for benchmarks and
/// pipelines that keep data on the GPU.
pub struct CudaSplitBuffers {
    x: CudaSlice<f32>,
    low: CudaSlice<f32>,
    high: CudaSlice<f32>,
    energy: CudaSlice<f32>,
    dims: FreqDims,
    shape: Vec<usize>,
    nbands: usize,
}

impl CudaSplitBuffers {
    /// Uploads `x` (`[B,C,H,W]` f32, non-empty) and allocates `low`, `high` (`[B,C,H,W]`) and
    /// `band_energy` (`[B,C,nbands]` of `config`) on `device` (NaN-filled when it is poisoned).
    ///
    /// # Errors
    /// As [`freq_split`](super::freq_split) for the shape and config; [`FapeError::Device`] when
    /// allocation or the copy fails.
    pub fn new(device: &CudaDevice, x: View<'_, f32>, config: &FreqSplitConfig) -> Result<Self> {
        let dims = validate(&x, config)?;
        Self::upload(device, x, dims, config.nbands())
    }

    fn upload(d: &CudaDevice, x: View<'_, f32>, dims: FreqDims, nbands: usize) -> Result<Self> {
        let len = x.data().len();
        Ok(Self {
            x: d.upload("x", x.data())?,
            low: d.output("low", len)?,
            high: d.output("high", len)?,
            energy: d.output("band_energy", dims.images * nbands)?,
            dims,
            shape: x.shape().to_vec(),
            nbands,
        })
    }

    /// Enqueues one split of the held `x` under `config` (same number of bands as at
    /// [`CudaSplitBuffers::new`]) on `device`'s stream through `path`; returns without
    /// waiting.
    ///
    /// # Errors
    /// [`FapeError::Config`] as [`FreqSplitConfig::validate`]; [`FapeError::Unsupported`] for
    /// another number of bands, more than [`MAX_BANDS`], or extents past the kernels' indexing;
    /// [`FapeError::Nvrtc`] / [`FapeError::Device`] from compilation and launches.
    pub fn run(&mut self, device: &CudaDevice, config: &FreqSplitConfig, path: CudaFftPath) -> Result<()> {
        config.validate()?;
        if config.nbands() != self.nbands {
            return Err(unsupported(format!("{} bands for buffers made for {}", config.nbands(), self.nbands)));
        }
        let x = self.x.as_view();
        split_device(
            device,
            &x,
            &mut self.low.as_view_mut(),
            &mut self.high.as_view_mut(),
            &mut self.energy.as_view_mut(),
            self.dims,
            config,
            path,
        )
    }

    /// The GPU time of one split through `path`: `reps` splits enqueued back to back between
    /// two CUDA events on `device`'s stream, their elapsed time divided by `reps` (so launch
    /// overheads overlap execution as in a pipeline, and no host sync is timed).
    ///
    /// # Errors
    /// As [`CudaSplitBuffers::run`]; [`FapeError::Device`] when an event call fails.
    pub fn time_runs(
        &mut self,
        device: &CudaDevice,
        config: &FreqSplitConfig,
        path: CudaFftPath,
        reps: usize,
    ) -> Result<std::time::Duration> {
        event_time(device, reps, || self.run(device, config, path))
    }

    /// A CUDA graph of one split of the held buffers through `path` (see
    /// [`CudaDevice::capture_graph`]); run [`CudaSplitBuffers::run`] once before at this shape
    /// and config, so that the mask tables and cuFFT plans exist. The three-pass and cuFFT
    /// routes allocate scratch per split, which the graph then holds as memory nodes.
    ///
    /// # Errors
    /// As [`CudaSplitBuffers::run`]; [`FapeError::Device`] when the capture is refused.
    pub fn capture(&mut self, device: &CudaDevice, config: &FreqSplitConfig, path: CudaFftPath) -> Result<DeviceGraph> {
        device.capture_graph(|| self.run(device, config, path))
    }

    /// The GPU time of one replay of `graph` (from [`CudaSplitBuffers::capture`]), timed as
    /// [`CudaSplitBuffers::time_runs`] times a split.
    ///
    /// # Errors
    /// [`FapeError::Device`] when a launch or an event call fails.
    pub fn time_graph(&self, device: &CudaDevice, graph: &DeviceGraph, reps: usize) -> Result<std::time::Duration> {
        event_time(device, reps, || graph.launch())
    }

    /// The host time of enqueueing one split through `path` (launch setup and driver calls,
    /// without the GPU's work): `reps` splits enqueued back to back, the host time divided by
    /// `reps`; the stream is synchronised after the clock stops.
    ///
    /// # Errors
    /// As [`CudaSplitBuffers::run`]; [`FapeError::Device`] when a kernel failed.
    pub fn time_enqueue(
        &mut self,
        device: &CudaDevice,
        config: &FreqSplitConfig,
        path: CudaFftPath,
        reps: usize,
    ) -> Result<std::time::Duration> {
        let reps = reps.max(1);
        let start = std::time::Instant::now();
        for _ in 0..reps {
            self.run(device, config, path)?;
        }
        let enqueue = start.elapsed() / reps as u32;
        self.synchronize(device)?;
        Ok(enqueue)
    }

    /// Waits for the splits enqueued on `device`'s stream.
    ///
    /// # Errors
    /// [`FapeError::Device`] when a kernel failed.
    pub fn synchronize(&self, device: &CudaDevice) -> Result<()> {
        device.stream().synchronize().map_err(dev_err("waiting for freq_split kernels"))
    }

    /// Copies only `band_energy` (`[B,C,nbands]`) of the last run back.
    ///
    /// # Errors
    /// [`FapeError::Device`] when the copy or an earlier kernel failed.
    pub fn download_band_energy(&self, device: &CudaDevice) -> Result<crate::tensor::Tensor<f32>> {
        let energy = device.download("band_energy", &self.energy)?;
        crate::tensor::Tensor::new(energy, vec![self.shape[0], self.shape[1], self.nbands])
    }

    /// Copies the outputs of the last run back: `low`, `high` `[B,C,H,W]`, `band_energy`
    /// `[B,C,nbands]`.
    ///
    /// # Errors
    /// [`FapeError::Device`] when a copy or an earlier kernel failed.
    pub fn download(&self, device: &CudaDevice) -> Result<FreqSplitOutput<f32>> {
        let low = device.download("low", &self.low)?;
        let high = device.download("high", &self.high)?;
        let energy = device.download("band_energy", &self.energy)?;
        Ok(output(&self.shape, self.nbands, low, high, energy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// H100-like limits: 227 KiB of opt-in shared memory, 50 MiB of L2.
    fn hopper() -> Loaded {
        Loaded { functions: HashMap::new(), optin_shared: 227 * 1024, l2: 50 << 20 }
    }

    fn dims(images: usize, height: usize, width: usize) -> FreqDims {
        FreqDims { images, height, width }
    }

    #[test]
    fn bands_are_capped_at_the_kernels_maximum() {
        let edges: Vec<f64> = (0..=MAX_BANDS).map(|i| i as f64 / MAX_BANDS as f64).collect();
        assert!(check_bands(&FreqSplitConfig { edges: edges.clone(), ..FreqSplitConfig::default() }).is_ok());
        let mut more = edges;
        more.insert(1, 0.5 / MAX_BANDS as f64);
        let err = check_bands(&FreqSplitConfig { edges: more, ..FreqSplitConfig::default() });
        assert!(matches!(err, Err(FapeError::Unsupported { .. })));
        assert!(usize::from(NO_BAND) >= MAX_BANDS, "the no-band marker must not be a band index");
    }

    #[test]
    fn routes_by_size_and_shared_memory() {
        let k = hopper();
        let auto = |h, w| route(&k, dims(3, h, w), 5, CudaFftPath::Auto);
        for (h, w) in [(1, 1), (64, 64), (128, 128), (1, 128), (128, 2)] {
            assert!(matches!(auto(h, w), Route::Fused { .. }), "{h}x{w}");
        }
        for (h, w) in [(256, 128), (512, 512), (1024, 2048), (4096, 4096), (1, 4096), (4096, 1)] {
            match auto(h, w) {
                Route::ThreePass { pairs, columns, rows_shared, columns_shared } => {
                    assert!(pairs >= 1 && (1..=MAX_COLUMNS).contains(&columns), "{h}x{w}");
                    assert!(rows_shared.max(columns_shared) <= k.optin_shared, "{h}x{w}");
                }
                other => panic!("{h}x{w}: {other:?}"),
            }
        }
        for (h, w) in [(7, 5), (33, 20), (8192, 8), (3, 64)] {
            assert_eq!(auto(h, w), Route::Cufft, "{h}x{w}");
        }
        assert_eq!(route(&k, dims(3, 64, 64), 5, CudaFftPath::Cufft), Route::Cufft);
        // An A100 (163 KiB) still takes 128 x 128 with 16 bands in one launch.
        let ampere = Loaded { optin_shared: 163 * 1024, ..hopper() };
        assert!(matches!(route(&ampere, dims(1, 128, 128), 16, CudaFftPath::Auto), Route::Fused { .. }));
        // Without opt-in shared memory it falls back to the three passes.
        let small = Loaded { optin_shared: DEFAULT_SHARED, ..hopper() };
        assert!(matches!(route(&small, dims(1, 128, 128), 5, CudaFftPath::Auto), Route::ThreePass { .. }));
    }

    #[test]
    fn kernels_are_refused_more_shared_memory_than_the_device_allows() {
        let k = hopper();
        match function(&k, "freq_split_fused_f32", k.optin_shared + 1) {
            Err(FapeError::Unsupported { what, .. }) => assert!(what.contains("bytes of shared memory"), "{what}"),
            _ => panic!("a launch above the opt-in maximum must be refused before it reaches the driver"),
        }
    }

    #[test]
    fn fused_shared_memory_counts_padded_rows_spectrum_twiddles_and_band_slots() {
        // 32 padded rows of 68, 64 x 33 bins, 32 + 32 twiddles; 5 x 256 f32.
        assert_eq!(fused_shared(64, 64, 5), (32 * 68 + 64 * 33 + 64) * 8 + 5 * 256 * 4);
        assert_eq!(fused_shared(1, 1, 1), 4 * 8 + 256 * 4);
    }

    #[test]
    fn image_chunks_are_equal_and_fit_half_the_l2() {
        let k = hopper();
        // A 512 x 512 half-spectrum is 512 * 257 * 8 bytes: 24 fit in 25 MiB.
        assert_eq!(chunk_images(&k, dims(192, 512, 512)), 24);
        assert_eq!(chunk_images(&k, dims(24, 512, 512)), 24);
        assert_eq!(chunk_images(&k, dims(25, 512, 512)), 13);
        assert_eq!(chunk_images(&k, dims(5, 512, 512)), 5);
        assert_eq!(chunk_images(&k, dims(3, 4096, 4096)), 1);
    }
}
