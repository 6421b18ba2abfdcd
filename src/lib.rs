//! # fape-kernels
//!
//! GPU kernels for the executor hot path of FAPE-IR (arXiv 2511.14099) behind a safe Rust API:
//! the fused LoRA-MoE expert dispatch ([`lora_moe`]), FFT frequency masking ([`freq`]) and
//! attention ([`attention`]). Each op has an exact f64 CPU reference (its `reference` module),
//! a fast f32 CPU backend, and GPU backends discovered at run time ([`backend`]): CubeCL on wgpu
//! (feature `cube`) and CUDA through NVRTC (feature `cuda`).

pub mod attention;
pub mod backend;
pub mod bench;
pub mod candle_ops;
pub mod check;
mod cpu_conv;
pub mod cpu_gemm;
mod cpu_norm;
pub mod error;
pub mod freq;
pub mod io;
pub mod lora_moe;
pub mod pipeline;
mod simd;
pub mod tensor;
pub mod testing;

pub use backend::{Device, DeviceKind};
pub use error::{FapeError, Result};
pub use tensor::{Real, Tensor, View};
