//! The input dtypes of [`super::lora_moe`]: f32 and bf16. The host backends (cpu) and Cube
//! (wgpu has no bf16) widen bf16 inputs to f32 and round the outputs back; CUDA runs bf16 through
//! its fused bf16 kernels and f32 through its f32 kernels.

use half::bf16;

#[cfg(feature = "cuda")]
use super::config::{LoraMoeConfig, LoraMoeDims};
use super::config::{LoraMoeInputs, LoraMoeOutput, LoraMoeTensors};
#[cfg(feature = "cuda")]
use crate::error::Result;
use crate::tensor::{Real, Tensor, View};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// f32 inputs as given, or bf16 inputs widened to owned f32 tensors.
#[doc(hidden)]
pub enum HostF32<'a> {
    /// The caller's f32 views.
    Borrowed(LoraMoeInputs<'a, f32>),
    /// Widened copies.
    Owned(LoraMoeTensors<f32>),
}

impl HostF32<'_> {
    /// The f32 inputs.
    pub fn inputs(&self) -> LoraMoeInputs<'_, f32> {
        match self {
            Self::Borrowed(inputs) => *inputs,
            Self::Owned(tensors) => tensors.inputs(),
        }
    }
}

/// An element type [`super::lora_moe`] takes (f32 or bf16; sealed). Outputs come back in the
/// same dtype.
pub trait LoraMoeDtype: Real + sealed::Sealed {
    /// The inputs as f32 for the host and Cube backends (borrowed for f32, widened for bf16).
    #[doc(hidden)]
    fn host_f32<'a>(inputs: &LoraMoeInputs<'a, Self>) -> HostF32<'a>;

    /// An f32 output rounded to this dtype (moved for f32).
    #[doc(hidden)]
    fn from_f32_output(out: LoraMoeOutput<f32>) -> LoraMoeOutput<Self>;

    /// The op on a CUDA device in this dtype.
    #[doc(hidden)]
    #[cfg(feature = "cuda")]
    fn cuda(
        device: &crate::backend::cuda::CudaDevice,
        inputs: &LoraMoeInputs<'_, Self>,
        dims: LoraMoeDims,
        config: &LoraMoeConfig,
    ) -> Result<LoraMoeOutput<Self>>;
}

impl LoraMoeDtype for f32 {
    fn host_f32<'a>(inputs: &LoraMoeInputs<'a, Self>) -> HostF32<'a> {
        HostF32::Borrowed(*inputs)
    }

    fn from_f32_output(out: LoraMoeOutput<f32>) -> LoraMoeOutput<Self> {
        out
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        device: &crate::backend::cuda::CudaDevice,
        inputs: &LoraMoeInputs<'_, Self>,
        dims: LoraMoeDims,
        config: &LoraMoeConfig,
    ) -> Result<LoraMoeOutput<Self>> {
        super::cuda::lora_moe_f32(device, inputs, dims, config)
    }
}

impl LoraMoeDtype for bf16 {
    fn host_f32<'a>(inputs: &LoraMoeInputs<'a, Self>) -> HostF32<'a> {
        HostF32::Owned(LoraMoeTensors::from_inputs(inputs))
    }

    fn from_f32_output(out: LoraMoeOutput<f32>) -> LoraMoeOutput<Self> {
        LoraMoeOutput { y: out.y.map(|&v| bf16::from_f32(v)), gates: out.gates.map(|&v| bf16::from_f32(v)) }
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        device: &crate::backend::cuda::CudaDevice,
        inputs: &LoraMoeInputs<'_, Self>,
        dims: LoraMoeDims,
        config: &LoraMoeConfig,
    ) -> Result<LoraMoeOutput<Self>> {
        super::cuda::lora_moe_bf16(device, inputs, dims, config, super::cuda::Schedule::OneGemm)
    }
}

impl<T: Real> LoraMoeTensors<T> {
    /// Owned copies of `inputs` converted to `T` (rounded to nearest).
    pub fn from_inputs<S: Real>(inputs: &LoraMoeInputs<'_, S>) -> Self {
        let own = |v: &View<'_, S>| Tensor {
            data: v.data().iter().map(|e| T::from_f64(e.to_f64())).collect(),
            shape: v.shape().to_vec(),
        };
        Self {
            x: own(&inputs.x),
            weight: own(&inputs.weight),
            bias: inputs.bias.as_ref().map(own),
            lora_a: own(&inputs.lora_a),
            lora_b: own(&inputs.lora_b),
            router: own(&inputs.router),
            guidance: inputs.guidance.as_ref().map(own),
        }
    }

    /// The same tensors converted to `U` (rounded to nearest).
    pub fn cast<U: Real>(&self) -> LoraMoeTensors<U> {
        LoraMoeTensors::from_inputs(&self.inputs())
    }
}
