//! CubeCL kernels of the LoRA-MoE module.

use cubecl::prelude::*;
use cubecl::wgpu::WgpuRuntime;

use super::lowpass::OP;
use super::LowpassDims;
use crate::backend::cube::CubeDevice;
use crate::error::{FapeError, Result};

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

/// The LoRA-MoE layer on this backend (being written for issue #3).
pub(crate) fn lora_moe(
    _d: &crate::backend::cube::CubeDevice,
    _inputs: &super::LoraMoeInputs<'_, f32>,
    _config: &super::LoraMoeConfig,
) -> Result<super::LoraMoeOutput<f32>> {
    Err(FapeError::Unsupported { op: super::OP, backend: "cube", what: "the fused GPU kernels land with issue #3".into() })
}
