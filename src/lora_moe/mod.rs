//! Fused LoRA-MoE expert dispatch: `y = x W^T + bias + scale * sum_e gate_e * (band_e(x) A_e^T) B_e^T`,
//! with per-token gates blending a router softmax and a per-image band-energy prior (see the
//! README for the full contract), and its token-axis Gaussian low-pass as an op of its own.

mod check;
mod config;
mod cpu;
#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "cuda")]
mod cuda;
mod gating;
mod lowpass;

pub use config::{Band, LoraMoeConfig, LoraMoeDims, LoraMoeInputs, LoraMoeOutput, LoraMoeTensors, OP};
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

/// The LoRA-MoE layer on `device`, f32. Shapes: `x` `[B,T,d]`, `weight` `[n,d]`, `bias` `[n]`,
/// `lora_a` `[E,r,d]`, `lora_b` `[E,n,r]`, `router` `[E,dg]`, `guidance` `[B,T,dg]`; returns
/// `y` `[B,T,n]` and `gates` `[B,T,E]`.
///
/// # Errors
/// Shape and config errors of [`LoraMoeInputs::validate`]; [`crate::FapeError::Unsupported`] on
/// GPU backends for extents past their 32-bit indexing or grid limits; device errors.
pub fn lora_moe(
    device: &Device,
    inputs: &LoraMoeInputs<'_, f32>,
    config: &LoraMoeConfig,
) -> Result<LoraMoeOutput<f32>> {
    let dims = inputs.validate(config)?;
    match device {
        Device::Reference => reference::lora_moe(inputs, config)
            .map(|o| LoraMoeOutput { y: o.y.map(|&v| v as f32), gates: o.gates.map(|&v| v as f32) }),
        Device::Cpu => cpu::lora_moe(inputs, dims, config),
        #[cfg(feature = "cube")]
        Device::Cube(d) => cube::lora_moe(d, inputs, dims, config),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::lora_moe(d, inputs, dims, config),
    }
}
