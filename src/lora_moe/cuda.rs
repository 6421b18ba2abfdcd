//! CUDA launch wrappers of the LoRA-MoE ops (kernels in `kernels/lora_moe.cu`).

use cudarc::driver::PushKernelArg;

use super::lowpass::OP as LOWPASS_OP;
use super::LowpassDims;
use crate::backend::cuda::{dev_err, kernel_int, launch_config, tiles, CudaDevice, LORA_MOE_CU};
use crate::error::{FapeError, Result};

/// Mirrors `token_lowpass_cfg` in `kernels/lora_moe.cu`.
mod lowpass_cfg {
    /// Channels per block (`blockDim.x`, one warp).
    pub const CHANNELS: usize = 32;
    /// Row groups per block (`blockDim.y`).
    pub const ROW_GROUPS: usize = 8;
    /// Output tokens per block of `token_lowpass_f32` (8 per thread).
    pub const SHORT_TOKENS: usize = ROW_GROUPS * 8;
    /// Output tokens per block of `token_lowpass_long_f32` (16 per thread).
    pub const LONG_TOKENS: usize = ROW_GROUPS * 16;
    /// Filters of at least this many taps run `token_lowpass_long_f32`. On an H200 (B,T,C =
    /// 4,4096,1024 and 16,1024,3072) the short kernel was 7-20% faster at 9 and 31 taps, the
    /// long one 7-23% faster at 65 and 129 taps, and they tied at 47 and 49.
    pub const LONG_TAPS_MIN: usize = 48;
}

/// Token low-pass on the GPU: `x` `[B,T,C]` f32 (row-major, `dims` validated, non-empty),
/// `h` the odd-length FIR; returns `[B,T,C]` f32 with
/// `out[b,t,c] = sum_j h[j] x[b, t+j-(taps-1)/2, c]`, zero padding within each image.
///
/// # Errors
/// [`FapeError::Unsupported`] when an extent exceeds the kernel's 32-bit indexing;
/// [`FapeError::Nvrtc`] / [`FapeError::Device`] from compilation, transfers and the launch.
pub(crate) fn token_lowpass(d: &CudaDevice, x: &[f32], dims: LowpassDims, h: &[f64]) -> Result<Vec<f32>> {
    use lowpass_cfg::*;
    let LowpassDims { batch, tokens, channels } = dims;
    debug_assert_eq!(x.len(), batch * tokens * channels, "validated by the caller");
    debug_assert!(h.len() % 2 == 1, "validated by the caller");
    let batch_i = kernel_int(LOWPASS_OP, "batch", batch)?;
    let tokens_i = kernel_int(LOWPASS_OP, "tokens", tokens)?;
    let channels_i = kernel_int(LOWPASS_OP, "channels", channels)?;
    let taps_i = kernel_int(LOWPASS_OP, "taps", h.len())?;
    let (kernel, tile_tokens) = if h.len() >= LONG_TAPS_MIN {
        ("token_lowpass_long_f32", LONG_TOKENS)
    } else {
        ("token_lowpass_f32", SHORT_TOKENS)
    };
    // The kernel forms token indices up to T + taps + a tile and channels up to a whole
    // tile in int.
    kernel_int(LOWPASS_OP, "tokens + taps", tokens + h.len() + tile_tokens)?;
    kernel_int(LOWPASS_OP, "channels rounded up to a tile", tiles(channels, CHANNELS) * CHANNELS)?;

    let blocks =
        tiles(channels, CHANNELS).checked_mul(tiles(tokens, tile_tokens)).ok_or_else(|| FapeError::Unsupported {
            op: LOWPASS_OP,
            backend: "cuda",
            what: format!("{tokens} tokens x {channels} channels is too many tiles"),
        })?;
    // Images beyond gridDim.y are covered by the kernel's grid-stride loop.
    let cfg = launch_config(LOWPASS_OP, (blocks, batch.min(65_535), 1), (CHANNELS as u32, ROW_GROUPS as u32, 1), 0)?;

    let function = d.function(LORA_MOE_CU, kernel)?;
    let h32: Vec<f32> = h.iter().map(|&w| w as f32).collect();
    let x_dev = d.upload("x", x)?;
    let h_dev = d.upload("h", &h32)?;
    let mut out = d.output("out", x.len())?;

    let stream = d.stream();
    let mut launch = stream.launch_builder(&function);
    launch.arg(&x_dev).arg(&h_dev).arg(&mut out).arg(&batch_i).arg(&tokens_i).arg(&channels_i).arg(&taps_i);
    // SAFETY: the arguments match `token_lowpass_f32` / `token_lowpass_long_f32(const float* x,
    // const float* h, float* out, int batch, int tokens, int channels, int taps)` in order and
    // type, and the grid was sized with the chosen kernel's tile; `x_dev` and `out` hold batch*tokens*channels f32 and `h_dev` holds taps f32, and the kernel only
    // reads x at b < batch, 0 <= t < tokens, c < channels, h below taps, and writes out at the
    // same bounds (all extents checked to fit its int arithmetic above). The buffers outlive
    // the launch: `download` synchronizes the stream before they drop, and cudarc's drop
    // waits on the stream otherwise.
    unsafe { launch.launch(cfg) }.map_err(dev_err(format!("launching {kernel}")))?;
    d.download("out", &out)
}

/// The LoRA-MoE layer on this backend (being written for issue #3).
pub(crate) fn lora_moe(
    _d: &crate::backend::cuda::CudaDevice,
    _inputs: &super::LoraMoeInputs<'_, f32>,
    _config: &super::LoraMoeConfig,
) -> Result<super::LoraMoeOutput<f32>> {
    Err(FapeError::Unsupported { op: super::OP, backend: "cuda", what: "the fused GPU kernels land with issue #3".into() })
}
