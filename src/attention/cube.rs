//! CubeCL kernels of attention: a row pre-pass (RMSNorm, then RoPE) for `q` and `k`, and a
//! flash-attention forward kernel.
//!
//! The flash kernel gives each cube [`ROWS_PER_CUBE`] consecutive query rows of one
//! (batch, head); each unit owns one query row, kept (pre-scaled) in registers together with its
//! output accumulator. The cube walks the head's keys and values in tiles of `keys` rows staged
//! in shared memory and keeps a running row max and sum (online softmax), rescaling the
//! accumulator whenever the max grows, so the `Lq x Lk` scores are never materialised. The head
//! dimension is a compile-time constant (one kernel per `D`, any `D` whose tile fits the
//! adapter's shared memory); rows are read as WGSL `vec4`/`vec2` where `D` allows.

use cubecl::prelude::*;
use cubecl::wgpu::WgpuRuntime;

use super::{AttentionDims, AttentionInputs, OP, RMS_EPS};
use crate::backend::cube::{CubeDevice, GpuArray};
use crate::error::{FapeError, Result};

/// Query rows (units) per cube of the flash kernel.
const ROWS_PER_CUBE: u32 = 64;

/// The most keys staged per tile (fewer when `2 * keys * D` floats exceed shared memory). 16
/// keeps a `D` = 128 tile within WebGPU's minimum 16 KiB of workgroup memory, and measured
/// faster than 32 on lavapipe (1x4x2048x2048x128: 2.2 s against 2.6 s).
const MAX_KEYS_PER_TILE: usize = 16;

/// Units per cube of the pre-pass (one row each).
const PREPARE_CUBE: u32 = 64;

/// The running max a row starts from: below every finite score, so that `exp(start - max)` is
/// 0 (or 1 with an all-zero accumulator) and never `exp(-inf + inf)`.
const START_MAX: f32 = f32::MIN;

/// RMSNorm (when `norm`) and RoPE (when `rope`) of each row of `x` `[rows, D]` (row `r` at
/// sequence position `r % seq_len`): `out = rope(x / sqrt(mean(x^2) + eps) * weight)`.
/// `weight` `[D]` is read only with `norm`, `cos`/`sin` `[>=seq_len, D/2]` only with `rope`
/// (then `D` is even). One unit per row; units past the last row do nothing.
#[cube(launch_unchecked)]
fn prepare_rows_kernel(
    x: &Array<f32>,
    weight: &Array<f32>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    out: &mut Array<f32>,
    seq_len: u32,
    head_dim: u32,
    eps: f32,
    #[comptime] norm: bool,
    #[comptime] rope: bool,
) {
    let row = ABSOLUTE_POS;
    let d = head_dim as usize;
    if row * d < out.len() {
        let base = row * d;
        let mut inv = 1.0f32;
        if norm {
            let mut sum_sq = 0.0f32;
            for e in 0..d {
                let a = x[base + e];
                sum_sq += a * a;
            }
            inv = 1.0f32 / f32::sqrt(sum_sq / f32::cast_from(d) + eps);
        }
        if rope {
            let half = d / 2;
            let at = (row % (seq_len as usize)) * half;
            for i in 0..half {
                let mut x0 = x[base + 2 * i] * inv;
                let mut x1 = x[base + 2 * i + 1] * inv;
                if norm {
                    x0 *= weight[2 * i];
                    x1 *= weight[2 * i + 1];
                }
                let c = cos[at + i];
                let s = sin[at + i];
                out[base + 2 * i] = x0 * c - x1 * s;
                out[base + 2 * i + 1] = x0 * s + x1 * c;
            }
        } else {
            for e in 0..d {
                out[base + e] = x[base + e] * inv * weight[e];
            }
        }
    }
}

/// Flash-attention forward. `q`/`out` are `[BH, Lq, dv]`, `k`/`v` `[BH, Lk, dv]` in vectors of
/// `N` floats (`dv * N = D`). Cube `(x, y, z)` handles query rows
/// `x * rows .. (x + 1) * rows` of head `y + z * CUBE_COUNT_Y` (cubes past the last head do
/// nothing); unit `u` owns row `x * rows + u` and writes it only when it is below `Lq`. Every
/// unit of a cube takes part in loading each tile of `keys` key/value rows (zero past `Lk`) and in
/// both barriers, so the barriers stay in uniform control flow.
#[cube(launch_unchecked)]
fn flash_attention_kernel<N: Size>(
    q: &Array<Vector<f32, N>>,
    k: &Array<Vector<f32, N>>,
    v: &Array<Vector<f32, N>>,
    out: &mut Array<Vector<f32, N>>,
    heads: u32,
    q_len: u32,
    k_len: u32,
    scale: f32,
    #[comptime] dv: usize,
    #[comptime] rows: usize,
    #[comptime] keys: usize,
) {
    let head = CUBE_POS_Y as usize + CUBE_POS_Z as usize * CUBE_COUNT_Y as usize;
    if head < heads as usize {
        let q_len = q_len as usize;
        let k_len = k_len as usize;
        let unit = UNIT_POS as usize;
        let row = CUBE_POS_X as usize * rows + unit;
        let active = row < q_len;
        // Inactive units read row 0 (always present) and never write.
        let q_base = (head * q_len + select(active, row, 0usize)) * dv;
        let kv_base = head * k_len * dv;

        let scale_v = Vector::<f32, N>::new(scale);
        let mut q_row = Array::<Vector<f32, N>>::new(dv);
        let mut acc = Array::<Vector<f32, N>>::new(dv);
        #[unroll]
        for i in 0..dv {
            q_row[i] = q[q_base + i] * scale_v;
            acc[i] = Vector::<f32, N>::new(0.0f32);
        }
        let mut scores = Array::<f32>::new(keys);
        let mut k_tile = SharedMemory::<Vector<f32, N>>::new(keys * dv);
        let mut v_tile = SharedMemory::<Vector<f32, N>>::new(keys * dv);

        let mut row_max = f32::new(START_MAX);
        let mut row_sum = 0.0f32;
        let tiles = k_len.div_ceil(keys);
        for t in 0..tiles {
            let start = t * keys;
            // Stage keys start..start+keys (zeros past Lk): `idx` runs over the tile's vectors.
            let tile_base = kv_base + start * dv;
            let mut idx = unit;
            while idx < keys * dv {
                if start + idx / dv < k_len {
                    k_tile[idx] = k[tile_base + idx];
                    v_tile[idx] = v[tile_base + idx];
                } else {
                    k_tile[idx] = Vector::<f32, N>::new(0.0f32);
                    v_tile[idx] = Vector::<f32, N>::new(0.0f32);
                }
                idx += rows;
            }
            sync_cube();

            let mut tile_max = f32::new(START_MAX);
            for j in 0..keys {
                let mut dot = 0.0f32;
                #[unroll]
                for i in 0..dv {
                    dot += Vector::dot(q_row[i], k_tile[j * dv + i]);
                }
                let score = select(start + j < k_len, dot, f32::new(START_MAX));
                scores[j] = score;
                tile_max = max(tile_max, score);
            }
            let new_max = max(row_max, tile_max);
            let alpha = f32::exp(row_max - new_max);
            row_sum *= alpha;
            let alpha_v = Vector::<f32, N>::new(alpha);
            #[unroll]
            for i in 0..dv {
                acc[i] *= alpha_v;
            }
            for j in 0..keys {
                // A NaN score gives a NaN weight (propagating to this row); masked keys give 0.
                let p = select(start + j < k_len, f32::exp(scores[j] - new_max), 0.0f32);
                row_sum += p;
                let p_v = Vector::<f32, N>::new(p);
                #[unroll]
                for i in 0..dv {
                    acc[i] += p_v * v_tile[j * dv + i];
                }
            }
            row_max = new_max;
            sync_cube();
        }

        if active {
            let inv_v = Vector::<f32, N>::new(1.0f32 / row_sum);
            #[unroll]
            for i in 0..dv {
                out[q_base + i] = acc[i] * inv_v;
            }
        }
    }
}

/// An `Unsupported` error of this backend.
fn unsupported(what: String) -> FapeError {
    FapeError::Unsupported { op: OP, backend: "cube", what }
}

/// Attention of validated f32 `inputs` with extents `dims` and the resolved `scale` on a CubeCL
/// device; returns `out` `[B,H,Lq,D]` flattened.
///
/// # Errors
/// [`FapeError::Unsupported`] when `D` is too large for one key row of `k` and `v` to fit the
/// adapter's shared memory, or an extent exceeds the kernels' 32-bit indexing or grid;
/// [`FapeError::Device`] on upload, launch or read-back failures.
pub(super) fn attention(
    d: &CubeDevice,
    inputs: &AttentionInputs<'_, f32>,
    dims: AttentionDims,
    scale: f64,
) -> Result<Vec<f32>> {
    let AttentionDims { batch, heads, q_len, k_len, head_dim } = dims;
    let bh = batch * heads;
    let (q_elems, kv_elems) = (bh * q_len * head_dim, bh * k_len * head_dim);
    if q_elems.max(kv_elems) as u64 >= u64::from(u32::MAX) {
        return Err(unsupported(format!("{} elements exceed the kernels' 32-bit indexing", q_elems.max(kv_elems))));
    }
    let shared_bytes = d.client().properties().hardware.max_shared_memory_size;
    let row_bytes = 2 * head_dim * std::mem::size_of::<f32>();
    let keys = (shared_bytes / row_bytes).min(MAX_KEYS_PER_TILE);
    if keys == 0 {
        return Err(unsupported(format!(
            "head dimension {head_dim} is too large: one key and value row ({row_bytes} bytes) exceed the \
             adapter's {shared_bytes} bytes of shared memory"
        )));
    }
    let max_count = d.client().properties().hardware.max_cube_count;
    let row_blocks = q_len.div_ceil(ROWS_PER_CUBE as usize);
    let heads_y = bh.min(max_count.1 as usize);
    let heads_z = bh.div_ceil(heads_y);
    if row_blocks > max_count.0 as usize || heads_z > max_count.2 as usize {
        return Err(unsupported(format!(
            "the grid of {row_blocks} x {bh} cubes exceeds the adapter's limit of {max_count:?}"
        )));
    }

    let rope = inputs.rope().map(|(c, s)| (c.data(), s.data()));
    let q = prepare(d, inputs.q.data(), q_len, head_dim, inputs.q_norm.map(|w| w.data()), rope)?;
    let k = prepare(d, inputs.k.data(), k_len, head_dim, inputs.k_norm.map(|w| w.data()), rope)?;
    let v = d.upload(inputs.v.data())?;
    let out = d.output::<f32>(q_elems)?;

    let vector = [4, 2, 1].into_iter().find(|n| head_dim % n == 0).unwrap_or(1);
    let dv = head_dim / vector;
    let cube_dim = CubeDim::new_1d(ROWS_PER_CUBE);
    let cube_count = CubeCount::Static(row_blocks as u32, heads_y as u32, heads_z as u32);
    d.guarded("launching flash_attention", || {
        // SAFETY: in units of `vector` floats (which divides D, so every buffer holds whole
        // rows of `dv` vectors), `q` and `out` hold BH*Lq*dv vectors and `k`, `v` BH*Lk*dv.
        // The kernel reads `q` at `(head*Lq + r)*dv + i` with `head < BH` (checked against
        // `heads`), `r < Lq` (inactive units use row 0) and `i < dv`; reads `k`, `v` at
        // `(head*Lk + start + j)*dv + i` only when `start + j < Lk`; writes `out` only at active
        // rows; shared memory and the local arrays are indexed below their comptime sizes
        // (`idx < keys*dv`, `j < keys`, `i < dv`). The array lengths passed are the buffers'.
        unsafe {
            flash_attention_kernel::launch_unchecked::<WgpuRuntime>(
                d.client(),
                cube_count,
                cube_dim,
                vector,
                q.arg(),
                k.arg(),
                v.arg(),
                out.arg(),
                bh as u32,
                q_len as u32,
                k_len as u32,
                scale as f32,
                dv,
                ROWS_PER_CUBE as usize,
                keys,
            )
        }
    })?;
    d.read(&out)
}

/// `x` `[BH, seq_len, D]` on the device after the optional RMSNorm with weight `norm` `[D]` and
/// the optional RoPE `(cos, sin)` `[>=seq_len, D/2]` (the plain upload when neither is given).
fn prepare(
    d: &CubeDevice,
    x: &[f32],
    seq_len: usize,
    head_dim: usize,
    norm: Option<&[f32]>,
    rope: Option<(&[f32], &[f32])>,
) -> Result<GpuArray<f32>> {
    let x_dev = d.upload(x)?;
    if norm.is_none() && rope.is_none() {
        return Ok(x_dev);
    }
    let placeholder = [0.0f32];
    let weight = d.upload(norm.unwrap_or(&placeholder))?;
    let (cos, sin) = rope.unwrap_or((&placeholder, &placeholder));
    let (cos, sin) = (d.upload(cos)?, d.upload(sin)?);
    let out = d.output::<f32>(x.len())?;
    let rows = x.len() / head_dim;
    let cube_dim = CubeDim::new_1d(PREPARE_CUBE);
    let cube_count = d.cube_count_1d(rows, cube_dim);
    d.guarded("launching attention prepare_rows", || {
        // SAFETY: `x` and `out` hold `rows * D` floats; the kernel handles row `r` only when
        // `r * D < out.len()` and then touches `x`, `out` at `r*D + e`, `e < D`; it reads
        // `weight` (`[D]`) at `e < D` only with `norm` (the weight was given), and `cos`/`sin`
        // at `(r % seq_len) * D/2 + i`, `i < D/2`, only with `rope`, whose validated tables
        // have at least `seq_len` rows of `D/2`. Array lengths passed are the buffers'.
        unsafe {
            prepare_rows_kernel::launch_unchecked::<WgpuRuntime>(
                d.client(),
                cube_count,
                cube_dim,
                x_dev.arg(),
                weight.arg(),
                cos.arg(),
                sin.arg(),
                out.arg(),
                seq_len as u32,
                head_dim as u32,
                RMS_EPS as f32,
                norm.is_some(),
                rope.is_some(),
            )
        }
    })?;
    Ok(out)
}
