//! CubeCL kernels of the LoRA-MoE module.

use cubecl::prelude::*;
use cubecl::wgpu::WgpuRuntime;

use super::config::{LoraMoeConfig, LoraMoeDims, LoraMoeInputs, LoraMoeOutput};
use super::gating::gates_from_band_sums;
use super::lowpass::{gaussian_taps, OP};
use super::LowpassDims;
use crate::backend::cube::{CubeDevice, GpuArray};
use crate::error::{FapeError, Result};
use crate::tensor::Tensor;

/// Work units per cube of the low-pass kernel.
const LOWPASS_CUBE: u32 = 256;

/// Filters up to this many taps are fully unrolled; longer ones loop.
const MAX_UNROLLED_TAPS: usize = 63;

/// One output vector of `N` consecutive channels per unit:
/// `out[b,t,c] = sum_j h[j] x[b, t+j-half, c]`, taps that fall outside `[0, tokens)` of the
/// same image skipped (zero padding). `x` and `out` are `[B,T,C]` row-major, seen as
/// `[B,T,C/N]` vectors (`channels` counts vectors, `N` divides `C`); units past `out.len()`
/// (the grid's tail) do nothing.
#[cube(launch_unchecked)]
fn token_lowpass_kernel<N: Size>(
    x: &Array<Vector<f32, N>>,
    h: &Array<f32>,
    out: &mut Array<Vector<f32, N>>,
    tokens: u32,
    channels: u32,
    #[comptime] taps: usize,
    #[comptime] unroll: bool,
) {
    let pos = ABSOLUTE_POS;
    if pos < out.len() {
        let tokens = tokens as usize;
        let channels = channels as usize;
        let half = comptime![(taps - 1) / 2];
        let c = pos % channels;
        let row = pos / channels; // b * tokens + t
        let t = row % tokens;
        let image = (row - t) * channels; // b * tokens * channels
        let mut acc = Vector::<f32, N>::new(0.0f32);
        // Source token of tap j is t + j - half; `s = t + j` keeps the test unsigned.
        #[unroll(unroll)]
        for j in 0..taps {
            let s = t + j;
            if s >= half && s < tokens + half {
                acc += Vector::<f32, N>::new(h[j]) * x[image + (s - half) * channels + c];
            }
        }
        out[pos] = acc;
    }
}

/// The token-axis low-pass on a CubeCL device. `x`: `[B,T,C]` row-major per `dims`; `h`: the
/// odd-length normalised filter. Returns `[B,T,C]`.
///
/// # Errors
/// [`FapeError::Layout`] when `x` does not hold `B*T*C` elements; [`FapeError::Unsupported`]
/// when an extent does not fit the kernel's 32-bit indices; [`FapeError::Device`] on upload,
/// launch or read-back failures.
pub(crate) fn token_lowpass(d: &CubeDevice, x: &[f32], dims: LowpassDims, h: &[f64]) -> Result<Vec<f32>> {
    let LowpassDims { batch, tokens, channels } = dims;
    let n = batch * tokens * channels;
    if x.len() != n {
        return Err(FapeError::Layout {
            op: OP,
            tensor: "x",
            len: x.len(),
            shape: vec![batch, tokens, channels],
            needed: n,
        });
    }
    debug_assert!(h.len() % 2 == 1, "the filter must have an odd number of taps");
    if n == 0 {
        return Ok(Vec::new());
    }
    // Indices are u32 in the generated WGSL: every index the kernel forms is below n + taps * C.
    if (n + h.len() * channels) as u64 > u64::from(u32::MAX) {
        return Err(FapeError::Unsupported {
            op: OP,
            backend: "cube",
            what: format!("{n} elements exceed the kernel's 32-bit indexing"),
        });
    }
    let taps = h.len();
    let h32: Vec<f32> = h.iter().map(|&w| w as f32).collect();

    let x_dev = d.upload(x)?;
    let h_dev = d.upload(&h32)?;
    let out = d.output::<f32>(n)?;
    // Widest vector (WGSL vec4/vec2) that divides the channels: 128-bit loads, and the index
    // arithmetic is shared by N channels.
    let vector = [4, 2, 1].into_iter().find(|v| channels % v == 0).unwrap_or(1);
    let cube_dim = CubeDim::new_1d(LOWPASS_CUBE);
    let cube_count = d.cube_count_1d(n / vector, cube_dim);
    d.guarded("launching token_lowpass", || {
        // SAFETY: in units of `vector` channels (which divides C, so `x` and `out` hold
        // exactly B*T*Cv vectors, Cv = C / vector), the kernel only indexes `out` at
        // `pos < out.len()`, `h` at `j < taps == h.len()`, and `x` at `b*T*Cv + src*Cv + c`
        // with `src < T` and `c < Cv`, i.e. below `B*T*Cv`; the array lengths passed are
        // those of the buffers. Its only loop has the compile-time bound `taps`.
        unsafe {
            token_lowpass_kernel::launch_unchecked::<WgpuRuntime>(
                d.client(),
                cube_count,
                cube_dim,
                vector,
                x_dev.arg(),
                h_dev.arg(),
                out.arg(),
                tokens as u32,
                (channels / vector) as u32,
                taps,
                taps <= MAX_UNROLLED_TAPS,
            )
        }
    })?;
    d.read(&out)
}

// ---------------------------------------------------------------------------------------------
// The LoRA-MoE layer (issue #3).
//
// Shrink first, as the CPU path: the token filters commute with the down-projection, so the
// bands are applied to `s = x A_cat^T` (`E*r` columns) instead of `x` (`d` columns), and the
// up-projection joins the base projection in one GEMM over the augmented K:
// `y = [x | u] . [W | B_1 .. B_E]^T + bias`, `u = scale * gate_e * band_e(s)`.
//
// On the device: the shrink and router-logit GEMMs, the per-image band energies (partial sums),
// the banded, gated `u`, and the final GEMM. On the host, in f64: finishing the energy sums, the
// prior and the per-token gates (`[B,T,E]`, tiny) with the shared `gating` helpers.
// ---------------------------------------------------------------------------------------------

/// Units per axis of the GEMM kernel's square cube; also the depth (K extent) of its tiles.
const GEMM_SIDE: u32 = 16;

/// Units per cube of the band-energy reduction (a power of two: the tree halves it).
const ENERGY_CUBE: u32 = 256;

/// At most this many cubes per image reduce the band energies (each loops over its share).
const ENERGY_MAX_CUBES: usize = 128;

/// Units per cube of the expert-band kernel.
const BAND_CUBE: u32 = 256;

/// The largest cube count WebGPU guarantees per grid axis.
const MAX_GRID_AXIS: usize = 65_535;

/// `out[m, o] = sum_k A[m,k] B[o,k] (+ bias[o])`, f32 accumulation, over an augmented K of two
/// segments: `k < k1` reads `a1 [M,k1]` and `b1 [N,k1]` (row-major); `k1 <= k < k1 + k2` reads
/// `a2 [M,k2]` (row-major) and `b2`, whose element `(o, q)` (`q = k - k1`) lies at
/// `(q / group) * group_stride + o * group + q % group` — a plain `[N,k2]` matrix with
/// `group = k2`, or PEFT's `lora_b [E,N,r]` seen as `[N, E*r]` with `group = r`,
/// `group_stride = N*r`.
///
/// A cube of 16x16 units computes a `16 rm x 16 rn` output tile; unit `(tx, ty)` owns rows
/// `ty + 16 i` and columns `tx + 16 j`. K advances in tiles of 16 staged in shared memory
/// (k-major, zero-filled past M, N or K), so no extent need be a tile multiple. `bias` is read
/// only when `has_bias`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemm_nt_kernel(
    a1: &Array<f32>,
    b1: &Array<f32>,
    a2: &Array<f32>,
    b2: &Array<f32>,
    bias: &Array<f32>,
    out: &mut Array<f32>,
    m: u32,
    n: u32,
    k1: u32,
    k2: u32,
    group: u32,
    group_stride: u32,
    #[comptime] rm: usize,
    #[comptime] rn: usize,
    #[comptime] has_bias: bool,
) {
    let m = m as usize;
    let n = n as usize;
    let k1 = k1 as usize;
    let k2 = k2 as usize;
    let group = group as usize;
    let group_stride = group_stride as usize;
    let k_total = k1 + k2;
    let tile_m = comptime![rm * 16];
    let tile_n = comptime![rn * 16];

    let mut a_s = SharedMemory::<f32>::new(comptime![rm * 256]);
    let mut b_s = SharedMemory::<f32>::new(comptime![rn * 256]);
    let mut acc = Array::<f32>::new(comptime![rm * rn]);
    let mut a_r = Array::<f32>::new(rm);
    let mut b_r = Array::<f32>::new(rn);
    #[unroll]
    for i in 0..comptime![rm * rn] {
        acc[i] = 0.0f32;
    }

    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let lin = ty * 16 + tx;
    // Staging: unit `lin` loads column `lin % 16` of the K tile for rows `lin / 16 + 16 p`,
    // so 16 consecutive units read 16 consecutive floats of one row.
    let load_k = lin % 16;
    let load_row = lin / 16;
    let m0 = CUBE_POS_X as usize * tile_m;
    let n0 = CUBE_POS_Y as usize * tile_n;

    let mut k0 = 0usize;
    while k0 < k_total {
        let gk = k0 + load_k;
        #[unroll]
        for p in 0..rm {
            let row = m0 + load_row + p * 16;
            let mut v = 0.0f32;
            if row < m {
                if gk < k1 {
                    v = a1[row * k1 + gk];
                } else if gk < k_total {
                    v = a2[row * k2 + (gk - k1)];
                }
            }
            a_s[load_k * tile_m + load_row + p * 16] = v;
        }
        #[unroll]
        for p in 0..rn {
            let col = n0 + load_row + p * 16;
            let mut v = 0.0f32;
            if col < n {
                if gk < k1 {
                    v = b1[col * k1 + gk];
                } else if gk < k_total {
                    let q = gk - k1;
                    let g = q / group;
                    v = b2[g * group_stride + col * group + (q - g * group)];
                }
            }
            b_s[load_k * tile_n + load_row + p * 16] = v;
        }
        sync_cube();
        #[unroll]
        for kk in 0..16usize {
            #[unroll]
            for i in 0..rm {
                a_r[i] = a_s[kk * tile_m + ty + i * 16];
            }
            #[unroll]
            for j in 0..rn {
                b_r[j] = b_s[kk * tile_n + tx + j * 16];
            }
            #[unroll]
            for i in 0..rm {
                #[unroll]
                for j in 0..rn {
                    acc[i * rn + j] += a_r[i] * b_r[j];
                }
            }
        }
        sync_cube();
        k0 += 16;
    }

    #[unroll]
    for i in 0..rm {
        let row = m0 + ty + i * 16;
        #[unroll]
        for j in 0..rn {
            let col = n0 + tx + j * 16;
            if row < m && col < n {
                let mut v = acc[i * rn + j];
                if comptime![has_bias] {
                    v += bias[col];
                }
                out[row * n + col] = v;
            }
        }
    }
}

/// Per-image partial sums of the band energies of `x [B,T,C]`: cube `(bx, b)` of the
/// `(cubes, B)` grid strides over image `b`'s `T*C` entries from unit `bx * width + u` in steps
/// of `cubes * width`, forms `low` on the fly (the [`token_lowpass_kernel`] sum, zero padding),
/// accumulates `low^2`, `(x - low)^2` and `x^2`, and tree-reduces them in shared memory into
/// `partial[(b * cubes + bx) * 3 + {0, 1, 2}]` (finished on the host in f64).
#[cube(launch_unchecked)]
fn band_energy_kernel(
    x: &Array<f32>,
    h: &Array<f32>,
    partial: &mut Array<f32>,
    tokens: u32,
    channels: u32,
    #[comptime] width: usize,
    #[comptime] taps: usize,
    #[comptime] unroll: bool,
) {
    let tokens = tokens as usize;
    let channels = channels as usize;
    let half = comptime![(taps - 1) / 2];
    let per_image = tokens * channels;
    let image = CUBE_POS_Y as usize * per_image;
    let cubes = CUBE_COUNT_X as usize;
    let u = UNIT_POS_X as usize;
    let stride = cubes * width;

    let mut sum_low = 0.0f32;
    let mut sum_high = 0.0f32;
    let mut sum_full = 0.0f32;
    let mut i = CUBE_POS_X as usize * width + u;
    while i < per_image {
        let c = i % channels;
        let t = i / channels;
        let mut low = 0.0f32;
        #[unroll(unroll)]
        for j in 0..taps {
            let s = t + j;
            if s >= half && s < tokens + half {
                low += h[j] * x[image + (s - half) * channels + c];
            }
        }
        let v = x[image + i];
        let high = v - low;
        sum_low += low * low;
        sum_high += high * high;
        sum_full += v * v;
        i += stride;
    }

    let mut s_low = SharedMemory::<f32>::new(width);
    let mut s_high = SharedMemory::<f32>::new(width);
    let mut s_full = SharedMemory::<f32>::new(width);
    s_low[u] = sum_low;
    s_high[u] = sum_high;
    s_full[u] = sum_full;
    sync_cube();
    let mut w = CUBE_DIM_X as usize / 2; // == width / 2, as a runtime value the loop can halve
    while w > 0 {
        if u < w {
            s_low[u] += s_low[u + w];
            s_high[u] += s_high[u + w];
            s_full[u] += s_full[u + w];
        }
        sync_cube();
        w /= 2;
    }
    if u == 0 {
        let at = (CUBE_POS_Y as usize * cubes + CUBE_POS_X as usize) * 3;
        partial[at] = s_low[0];
        partial[at + 1] = s_high[0];
        partial[at + 2] = s_full[0];
    }
}

/// `u[row, e*r + j] = factor[row, e] * band_e(s)[row, e*r + j]` for `s, u [B*T, E*r]`, where
/// `band_e` is selected by `bands[e]` (0 low, 1 high = `s - low`, 2 full = `s`) and `low`
/// filters each column along the tokens of its own image (zero padding), as
/// [`token_lowpass_kernel`]. `factor [B*T, E]` holds `scale * gate`. Units past `u.len()` do
/// nothing.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn expert_band_kernel(
    s: &Array<f32>,
    h: &Array<f32>,
    factor: &Array<f32>,
    bands: &Array<u32>,
    u: &mut Array<f32>,
    tokens: u32,
    rank: u32,
    experts: u32,
    #[comptime] taps: usize,
    #[comptime] unroll: bool,
) {
    let pos = ABSOLUTE_POS;
    if pos < u.len() {
        let tokens = tokens as usize;
        let rank = rank as usize;
        let experts = experts as usize;
        let width = rank * experts;
        let half = comptime![(taps - 1) / 2];
        let col = pos % width;
        let row = pos / width; // b * tokens + t
        let t = row % tokens;
        let image = (row - t) * width;
        let e = col / rank;
        let band = bands[e];
        let v = s[pos];
        let mut out = v;
        if band != 2u32 {
            let mut low = 0.0f32;
            #[unroll(unroll)]
            for j in 0..taps {
                let src = t + j;
                if src >= half && src < tokens + half {
                    low += h[j] * s[image + (src - half) * width + col];
                }
            }
            if band == 0u32 {
                out = low;
            } else {
                out = v - low;
            }
        }
        u[pos] = factor[row * experts + e] * out;
    }
}

/// The second K segment of [`gemm_nt`]: `a [M,k]` and `b` with the grouped layout of
/// [`gemm_nt_kernel`].
struct Segment<'a> {
    a: &'a GpuArray<f32>,
    b: &'a GpuArray<f32>,
    k: usize,
    group: usize,
    group_stride: usize,
}

/// Per-unit micro-tile extent for an output extent: 4 (64-wide cube tiles) unless the extent is
/// small, so skinny GEMMs (router logits: N = E) do not compute mostly padding.
fn micro_tile(extent: usize) -> usize {
    match extent {
        0..=16 => 1,
        17..=32 => 2,
        _ => 4,
    }
}

/// Three distinct one-element buffers bound in place of the absent second K segment (`a2`,
/// `b2`) and bias of [`gemm_nt_kernel`], so that no two bindings of a launch alias (they are
/// declared read-write in the generated WGSL).
struct Dummies([GpuArray<f32>; 3]);

impl Dummies {
    fn new(d: &CubeDevice) -> Result<Self> {
        Ok(Self([d.upload(&[0.0f32])?, d.upload(&[0.0f32])?, d.upload(&[0.0f32])?]))
    }
}

/// Launches [`gemm_nt_kernel`]: `[M,N] = a1 [M,k1] . b1 [N,k1]^T (+ second segment) (+ bias)`.
///
/// # Errors
/// [`FapeError::Unsupported`] when the grid would exceed 65535 cubes on an axis;
/// [`FapeError::Device`] from allocation or launch.
#[allow(clippy::too_many_arguments)]
fn gemm_nt(
    d: &CubeDevice,
    (m, n): (usize, usize),
    a1: &GpuArray<f32>,
    b1: &GpuArray<f32>,
    k1: usize,
    second: Option<Segment<'_>>,
    bias: Option<&GpuArray<f32>>,
    dummies: &Dummies,
) -> Result<GpuArray<f32>> {
    let (rm, rn) = (micro_tile(m), micro_tile(n));
    let side = GEMM_SIDE as usize;
    let (tiles_m, tiles_n) = (m.div_ceil(side * rm), n.div_ceil(side * rn));
    if tiles_m > MAX_GRID_AXIS || tiles_n > MAX_GRID_AXIS {
        return Err(unsupported(format!("a {m}x{n} GEMM needs more than {MAX_GRID_AXIS} cubes on a grid axis")));
    }
    let out = d.output::<f32>(m * n)?;
    let (a2, b2, k2, group, group_stride) = match &second {
        Some(s) => (s.a, s.b, s.k, s.group, s.group_stride),
        None => (&dummies.0[0], &dummies.0[1], 0, 1, 0),
    };
    let bias_arg = bias.unwrap_or(&dummies.0[2]);
    d.guarded("launching lora_moe gemm", || {
        // SAFETY: the kernel writes `out` only at `row * n + col` with `row < m`, `col < n`
        // (`out` holds m*n). It reads `a1` at `row * k1 + k` (row < m, k < k1: inside the
        // [M,k1] buffer), `b1` at `col * k1 + k` (col < n: inside [N,k1]), `a2` at
        // `row * k2 + q` (q < k2: inside [M,k2]) and `b2` at `(q / group) * group_stride +
        // col * group + q % group`, inside the [E,N,r] `lora_b` buffer (group = r,
        // group_stride = N*r, q < E*r); the second segment is never read when k2 = 0 (the
        // dummy buffers), nor `bias` (length n) unless `has_bias`. Shared and local arrays are
        // indexed below their compile-time sizes (16 rm / 16 rn rows of 16, unit ids < 16).
        // Every buffer length passed is the buffer's own; the loop over K is uniform per cube,
        // so every unit reaches each `sync_cube`.
        unsafe {
            gemm_nt_kernel::launch_unchecked::<WgpuRuntime>(
                d.client(),
                CubeCount::new_2d(tiles_m as u32, tiles_n as u32),
                CubeDim::new_2d(GEMM_SIDE, GEMM_SIDE),
                a1.arg(),
                b1.arg(),
                a2.arg(),
                b2.arg(),
                bias_arg.arg(),
                out.arg(),
                m as u32,
                n as u32,
                k1 as u32,
                k2 as u32,
                group as u32,
                group_stride as u32,
                rm,
                rn,
                bias.is_some(),
            )
        }
    })?;
    Ok(out)
}

/// An [`FapeError::Unsupported`] of the LoRA-MoE op on this backend.
fn unsupported(what: String) -> FapeError {
    FapeError::Unsupported { op: super::OP, backend: "cube", what }
}

/// The LoRA-MoE layer on a CubeCL device, f32 (the contract of [`super::reference::lora_moe`]).
///
/// Device work: the shrink GEMM `s = x . A_cat^T` and the router-logit GEMM `g . router^T`
/// ([`gemm_nt_kernel`]), the per-image band energies of `x` ([`band_energy_kernel`]), the
/// banded and gated `u` ([`expert_band_kernel`]) and the final augmented GEMM
/// `y = [x | u] . [W | B_cat]^T + bias`. Host work, in f64: finishing the energy partial sums,
/// the prior and the per-token gates (`[B,T,E]`, tiny, read back once) with
/// [`energy_prior`] and [`gate_token`], as every host path does; NaN in `x` reaches the gates
/// and `y` as NaN without a panic.
///
/// # Errors
/// (`dims` come from [`LoraMoeInputs::validate`], run by the caller.) [`FapeError::Unsupported`] when
/// an extent does not fit the kernels' 32-bit indexing or grid; [`FapeError::Device`] on
/// upload, launch or read-back failures.
pub(crate) fn lora_moe(
    d: &CubeDevice,
    inputs: &LoraMoeInputs<'_, f32>,
    dims: LoraMoeDims,
    config: &LoraMoeConfig,
) -> Result<LoraMoeOutput<f32>> {
    let LoraMoeDims { batch, tokens, d: features, n, experts, rank, dg } = dims;
    let h = gaussian_taps(config.taps, config.sigma)?;
    let taps = h.len();
    let unroll = taps <= MAX_UNROLLED_TAPS;
    let (rows, width) = (batch * tokens, experts * rank);

    // Every index a kernel forms stays below the longest buffer plus a tile or filter overhang.
    let longest = [rows * features, rows * dg, rows * n, rows * width, n * features, experts * n * rank]
        .into_iter()
        .max()
        .unwrap_or(0);
    let overhang = (taps + 64) * features.max(dg).max(n).max(width);
    if (longest as u64).saturating_add(overhang as u64) > u64::from(u32::MAX) {
        return Err(unsupported(format!("{longest} elements exceed the kernels' 32-bit indexing")));
    }
    let h32: Vec<f32> = h.iter().map(|&w| w as f32).collect();

    let x_dev = d.upload(inputs.x.data())?;
    let h_dev = d.upload(&h32)?;
    let dummies = Dummies::new(d)?;
    let a_dev = d.upload(inputs.lora_a.data())?; // [E,r,d] = A_cat [E*r, d]
    let router_dev = d.upload(inputs.router.data())?;
    let guidance_dev = match inputs.guidance {
        Some(g) => d.upload(g.data())?,
        None => x_dev.clone(),
    };

    // 1. Shrink and router logits.
    let s_dev = gemm_nt(d, (rows, width), &x_dev, &a_dev, features, None, None, &dummies)?;
    let logits_dev = gemm_nt(d, (rows, experts), &guidance_dev, &router_dev, dg, None, None, &dummies)?;

    // 2. Band energies of x, per image.
    let per_image = tokens * features;
    let cubes = per_image.div_ceil(ENERGY_CUBE as usize * 4).clamp(1, ENERGY_MAX_CUBES);
    if batch > MAX_GRID_AXIS {
        return Err(unsupported(format!("{batch} images exceed {MAX_GRID_AXIS} cubes on a grid axis")));
    }
    let partial_dev = d.output::<f32>(batch * cubes * 3)?;
    d.guarded("launching lora_moe band energies", || {
        // SAFETY: cube (bx, b) of the (cubes, batch) grid reads `x` at `b*T*d + i` and at
        // `b*T*d + src*d + c` with `i < T*d`, `src < T`, `c < d` (inside the [B,T,d] buffer),
        // `h` at `j < taps == h.len()`, writes `partial` at `(b*cubes + bx)*3 + {0,1,2}`
        // (inside its batch*cubes*3 elements), and indexes its shared arrays at units
        // `< width == ENERGY_CUBE`, the cube's size. The reduction loop is uniform per cube.
        unsafe {
            band_energy_kernel::launch_unchecked::<WgpuRuntime>(
                d.client(),
                CubeCount::new_2d(cubes as u32, batch as u32),
                CubeDim::new_1d(ENERGY_CUBE),
                x_dev.arg(),
                h_dev.arg(),
                partial_dev.arg(),
                tokens as u32,
                features as u32,
                ENERGY_CUBE as usize,
                taps,
                unroll,
            )
        }
    })?;

    // 3. Gates on the host (f64), then u = scale * gate_e * band_e(s) on the device.
    let logits = d.read(&logits_dev)?;
    let partial = d.read(&partial_dev)?;
    let band_sums: Vec<[f64; 3]> = partial
        .chunks(cubes * 3)
        .map(|image| {
            let mut sums = [0.0f64; 3];
            for cube in image.chunks(3) {
                for (sum, &v) in sums.iter_mut().zip(cube) {
                    *sum += f64::from(v);
                }
            }
            sums
        })
        .collect();
    let (gates, factor) = gates_from_band_sums(&band_sums, per_image, &logits, tokens, config, rank);
    let band_codes: Vec<u32> = config.bands.iter().map(|band| band.kernel_code()).collect();
    let factor_dev = d.upload(&factor)?;
    let bands_dev = d.upload(&band_codes)?;
    let u_dev = d.output::<f32>(rows * width)?;
    let cube_dim = CubeDim::new_1d(BAND_CUBE);
    let cube_count = d.cube_count_1d(rows * width, cube_dim);
    d.guarded("launching lora_moe expert bands", || {
        // SAFETY: the kernel writes `u` only at `pos < u.len() == B*T*E*r`; it reads `s` (same
        // length) at `pos` and at `image + src*E*r + col` with `src < T`, `col < E*r` (inside
        // the image's rows), `h` at `j < taps == h.len()`, `bands` at `e = col / r < E`
        // (its length) and `factor` at `row*E + e < B*T*E` (its length).
        unsafe {
            expert_band_kernel::launch_unchecked::<WgpuRuntime>(
                d.client(),
                cube_count,
                cube_dim,
                s_dev.arg(),
                h_dev.arg(),
                factor_dev.arg(),
                bands_dev.arg(),
                u_dev.arg(),
                tokens as u32,
                rank as u32,
                experts as u32,
                taps,
                unroll,
            )
        }
    })?;

    // 4. y = [x | u] . [W | B_cat]^T + bias.
    let w_dev = d.upload(inputs.weight.data())?;
    let b_dev = d.upload(inputs.lora_b.data())?;
    let bias_dev = inputs.bias.map(|b| d.upload(b.data())).transpose()?;
    let lora = Segment { a: &u_dev, b: &b_dev, k: width, group: rank, group_stride: n * rank };
    let y_dev = gemm_nt(d, (rows, n), &x_dev, &w_dev, features, Some(lora), bias_dev.as_ref(), &dummies)?;
    let y = d.read(&y_dev)?;

    Ok(LoraMoeOutput {
        y: Tensor { data: y, shape: vec![batch, tokens, n] },
        gates: Tensor { data: gates.into_iter().map(|g| g as f32).collect(), shape: vec![batch, tokens, experts] },
    })
}

#[cfg(test)]
mod tests {
    use super::super::{lora_moe, reference, Band, LoraMoeConfig, LoraMoeDims, LoraMoeTensors, TOLERANCE_F32};
    use crate::backend::{Device, DeviceKind};
    use crate::testing::{assert_close, device_or_skip};

    /// Cube against the reference on `dims` for every `top_k` in `0..=E`.
    fn sweep(device: &Device, seed: u64, dims: LoraMoeDims, bias: bool, bands: &[Band], taps: usize, sigma: f64) {
        let tensors = LoraMoeTensors::random(seed, dims, bias);
        let inputs = tensors.inputs();
        for top_k in 0..=dims.experts {
            let config = LoraMoeConfig { bands: bands.to_vec(), taps, sigma, top_k, ..LoraMoeConfig::default() };
            let got = lora_moe(device, &inputs, &config).unwrap();
            let expected = reference::lora_moe(&inputs, &config).unwrap();
            let what = format!("cube {dims:?} bias {bias} k{top_k} taps {taps}");
            assert_close(&format!("{what} y"), &got.y.data, &expected.y.data, TOLERANCE_F32);
            assert_close(&format!("{what} gates"), &got.gates.data, &expected.gates.data, TOLERANCE_F32);
        }
    }

    fn dims(batch: usize, tokens: usize, d: usize, n: usize, experts: usize, rank: usize, dg: usize) -> LoraMoeDims {
        LoraMoeDims { batch, tokens, d, n, experts, rank, dg }
    }

    #[test]
    fn cube_lora_moe_matches_reference_on_awkward_shapes() {
        let Some(device) = device_or_skip("cube_lora_moe_matches_reference_on_awkward_shapes", DeviceKind::Cube) else {
            return;
        };
        use Band::{Full, High, Low};
        // Tile remainders in M, N and K, guidance, no bias, a lone token, every band.
        sweep(&device, 1, dims(2, 19, 33, 70, 3, 5, 7), false, &[Low, High, Full], 9, 2.0);
        sweep(&device, 2, dims(1, 1, 17, 9, 2, 3, 17), true, &[High, Low], 9, 2.0);
        // E = 16, r = 64: the shrink is 1024 wide, the augmented K is d + 1024.
        sweep(&device, 3, dims(1, 23, 40, 65, 16, 64, 40), true, &[Low, High, Full, Low].repeat(4), 9, 2.0);
        // A filter longer than the unroll limit (runtime tap loop) and longer than T.
        sweep(&device, 4, dims(2, 50, 24, 17, 2, 4, 24), true, &[Low, High], 65, 8.0);
        sweep(&device, 5, dims(1, 3, 8, 8, 1, 1, 8), false, &[Full], 1, 1.0);
    }

    #[test]
    fn cube_lora_moe_propagates_nan_in_x() {
        let Some(device) = device_or_skip("cube_lora_moe_propagates_nan_in_x", DeviceKind::Cube) else {
            return;
        };
        let mut tensors = LoraMoeTensors::random(6, dims(2, 9, 8, 4, 2, 2, 8), true);
        tensors.x.data[3] = f32::NAN;
        let config = LoraMoeConfig { top_k: 1, ..LoraMoeConfig::default() };
        let got = lora_moe(&device, &tensors.inputs(), &config).unwrap();
        let expected = reference::lora_moe(&tensors.inputs(), &config).unwrap();
        // The NaN poisons image 0's prior, hence all of image 0; image 1 stays finite.
        let per_image = 9 * 4;
        assert!(got.y.data[..per_image].iter().all(|v| v.is_nan()));
        assert!(got.y.data[per_image..].iter().all(|v| v.is_finite()));
        assert_close("nan y", &got.y.data, &expected.y.data, TOLERANCE_F32);
        assert_close("nan gates", &got.gates.data, &expected.gates.data, TOLERANCE_F32);
    }
}
