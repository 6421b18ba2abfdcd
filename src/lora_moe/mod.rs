//! Fused LoRA-MoE expert dispatch: `y = x W^T + bias + scale * sum_e gate_e * (band_e(x) A_e^T) B_e^T`,
//! with per-token gates blending a router softmax and a per-image band-energy prior (see the
//! README for the full contract), and its token-axis Gaussian low-pass as an op of its own.
//!
//! [`lora_moe`] takes f32 or bf16 on every backend. On CUDA, bf16 runs the fused path of
//! [`LoraMoeLinear`] (weights packed once; one pass over `x`, one gate/filter kernel, one
//! cuBLASLt GEMM over the augmented K; QKV grouping; device buffers on a given stream);
//! `CudaBenchProblem` also holds the unfused GPU baseline and the base GEMM for the benchmarks.
//! The candle op is `crate::candle_ops::lora_moe`.

pub(crate) mod candle;
mod check;
mod config;
mod cpu;
#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "cuda")]
mod cuda;
mod dtype;
mod gating;
mod lowpass;

pub use config::{Band, LoraMoeConfig, LoraMoeDims, LoraMoeInputs, LoraMoeOutput, LoraMoeTensors, OP};
#[cfg(feature = "cuda")]
pub use cuda::{
    CudaBenchProblem, CudaVariant, GemmPlans, LoraMoeLinear, LoraMoeProjection, Schedule, MAX_RANK, MAX_TAPS,
};
pub use dtype::LoraMoeDtype;
pub use lowpass::{gaussian_taps, token_lowpass, LowpassDims};

pub(crate) use check::check_rows;

use crate::backend::Device;
use crate::error::Result;

/// Named tolerance (rel-L2 against the f64 reference) of f32 inputs.
pub const TOLERANCE_F32: f64 = 1e-4;
/// Named tolerance (rel-L2 against the f64 reference) of bf16 inputs (the GPU kernels' dtype).
pub const TOLERANCE_BF16: f64 = 1e-2;

/// The exact f64 references of this module's ops.
pub mod reference {
    pub use super::lowpass::reference as token_lowpass;
    pub use super::reference_impl::lora_moe;
}

#[path = "reference.rs"]
mod reference_impl;

/// The LoRA-MoE layer on `device`, in f32 or bf16 ([`LoraMoeDtype`]). Shapes: `x` `[B,T,d]`,
/// `weight` `[n,d]`, `bias` `[n]`, `lora_a` `[E,r,d]`, `lora_b` `[E,n,r]`, `router` `[E,dg]`,
/// `guidance` `[B,T,dg]`; returns `y` `[B,T,n]` and `gates` `[B,T,E]` in the input dtype.
///
/// bf16 on the CPU and Cube backends is widened to f32 on the host (wgpu has no bf16) and the
/// outputs rounded back; on CUDA it runs the fused bf16 path (shrink/energy and gate/filter
/// kernels, then one cuBLASLt GEMM over the augmented K), which needs `d` and `dg` divisible by 8.
///
/// # Errors
/// Shape and config errors of [`LoraMoeInputs::validate`]; [`crate::FapeError::Shape`] for bf16
/// on CUDA when `d` or `dg` is not a multiple of 8; [`crate::FapeError::Unsupported`] on GPU
/// backends for extents past their 32-bit indexing or grid limits; device errors.
pub fn lora_moe<T: LoraMoeDtype>(
    device: &Device,
    inputs: &LoraMoeInputs<'_, T>,
    config: &LoraMoeConfig,
) -> Result<LoraMoeOutput<T>> {
    let dims = inputs.validate(config)?;
    match device {
        Device::Reference => reference::lora_moe(inputs, config)
            .map(|o| LoraMoeOutput { y: o.y.map(|&v| T::from_f64(v)), gates: o.gates.map(|&v| T::from_f64(v)) }),
        Device::Cpu => cpu::lora_moe(&T::host_f32(inputs).inputs(), dims, config).map(T::from_f32_output),
        #[cfg(feature = "cube")]
        Device::Cube(d) => cube::lora_moe(d, &T::host_f32(inputs).inputs(), dims, config).map(T::from_f32_output),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => T::cuda(d, inputs, dims, config),
    }
}
