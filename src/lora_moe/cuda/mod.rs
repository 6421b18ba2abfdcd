//! The LoRA-MoE ops on CUDA. Submodules, each using only those listed before it:
//! - `shared`: the bf16 kernels' lookup and the buffer-length check;
//! - `fp32`: the f32 layer and the token low-pass (kernels in `kernels/lora_moe.cu`);
//! - `gemm`: the cuBLASLt bf16 GEMMs (handles, workspaces, the bias epilogue);
//! - `fused`: the fused bf16 path, [`LoraMoeLinear`] (kernels in `kernels/lora_moe_bf16.cu`);
//! - `unfused`: the unfused bf16 baseline of the benchmarks;
//! - `bench`: device-resident problems for `fape bench lora-moe`.

mod bench;
mod fp32;
mod fused;
mod gemm;
mod shared;
mod unfused;

pub use bench::{CudaBenchProblem, CudaVariant};
pub(crate) use fp32::{lora_moe as lora_moe_f32, token_lowpass};
pub(crate) use fused::lora_moe as lora_moe_bf16;
pub use fused::{LoraMoeLinear, LoraMoeProjection, Schedule, MAX_RANK, MAX_TAPS};
pub use gemm::GemmPlans;
