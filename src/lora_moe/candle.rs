//! The LoRA-MoE layer as a candle `CustomOp1` on `x`, with the weights and guidance held by the
//! op. f32 and bf16 (every tensor in `x`'s dtype).
//!
//! - CPU: this crate's CPU backend on candle's buffers (bf16 widened to f32 on the host).
//! - CUDA (feature `candle-cuda`), bf16: the fused bf16 kernels ([`super::LoraMoeLinear`]) on
//!   candle's own stream, reading candle's buffers and writing the output buffer in place, no
//!   host copies. The weights are packed on the device on every call (one copy of `W`); a model
//!   that calls a layer many times can hold a [`super::LoraMoeLinear`] instead.
//! - CUDA, f32: the crate's f32 CUDA path, which takes host tensors: the inputs are copied to
//!   the host and the output back (bf16 is the production dtype).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, StorageRef, Tensor, WithDType};

use super::config::{LoraMoeConfig, LoraMoeDims, LoraMoeInputs, OP};
use super::dtype::LoraMoeDtype;
use crate::backend::Device;
use crate::candle_ops::{candle_error, cpu_slice};
use crate::error::FapeError;
use crate::tensor::View;

/// The weights of one LoRA-MoE projection as candle tensors (PEFT layouts), all in the dtype of
/// the `x` they are applied to.
#[derive(Debug, Clone)]
pub struct LoraMoeWeights {
    /// `[n, d]`: the base projection.
    pub weight: Tensor,
    /// `[n]`, optional.
    pub bias: Option<Tensor>,
    /// `[E, r, d]`: LoRA down-projections.
    pub lora_a: Tensor,
    /// `[E, n, r]`: LoRA up-projections.
    pub lora_b: Tensor,
    /// `[E, dg]`: router weights.
    pub router: Tensor,
}

/// The LoRA-MoE layer on candle tensors: `x` `[B,T,d]`, `guidance` `[B,T,dg]` (what the router
/// reads; `x` when `None`, then `dg = d`); returns `y` `[B,T,n]` in the dtype of `x` (f32 or
/// bf16). Same contract as [`super::lora_moe`] (the gates are not returned).
///
/// # Errors
/// A candle error wrapping [`FapeError`]: shape and config errors of
/// [`LoraMoeInputs::validate`], [`FapeError::Config`] naming a tensor whose dtype differs from
/// `x`'s or a dtype other than f32/bf16, [`FapeError::Shape`] for bf16 on CUDA with `d` or `dg`
/// not a multiple of 8, tensors on different devices, device errors.
pub fn lora_moe(
    x: &Tensor,
    weights: &LoraMoeWeights,
    guidance: Option<&Tensor>,
    config: &LoraMoeConfig,
) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(candle_error(FapeError::Config {
            op: OP,
            field: "x",
            message: format!("has dtype {dtype:?}; lora_moe takes f32 or bf16"),
        }));
    }
    let named = [
        ("weight", Some(&weights.weight)),
        ("bias", weights.bias.as_ref()),
        ("lora_a", Some(&weights.lora_a)),
        ("lora_b", Some(&weights.lora_b)),
        ("router", Some(&weights.router)),
        ("guidance", guidance),
    ];
    for (name, tensor) in named {
        if let Some(t) = tensor.filter(|t| t.dtype() != dtype) {
            return Err(candle_error(FapeError::Config {
                op: OP,
                field: name,
                message: format!("has dtype {:?} but x has {dtype:?}", t.dtype()),
            }));
        }
    }
    let op = LoraMoeOp {
        weight: weights.weight.contiguous()?,
        bias: weights.bias.as_ref().map(Tensor::contiguous).transpose()?,
        lora_a: weights.lora_a.contiguous()?,
        lora_b: weights.lora_b.contiguous()?,
        router: weights.router.contiguous()?,
        guidance: guidance.map(Tensor::contiguous).transpose()?,
        config: config.clone(),
    };
    op.dims(x.dims())?;
    x.contiguous()?.apply_op1_no_bwd(&op)
}

/// The op `x -> y`, holding contiguous copies (cheap handles) of the other tensors.
struct LoraMoeOp {
    weight: Tensor,
    bias: Option<Tensor>,
    lora_a: Tensor,
    lora_b: Tensor,
    router: Tensor,
    guidance: Option<Tensor>,
    config: LoraMoeConfig,
}

/// Zero-sized placeholders for shape-only views: validation reads shapes, never elements, so a
/// `View<()>` over `len` units (no allocation) lets it run on device tensors too.
fn shape_view<'a>(units: &'a [()], shape: &'a [usize]) -> candle_core::Result<View<'a, ()>> {
    let len: usize = shape.iter().product();
    View::new(OP, "shape", &units[..len.min(units.len())], shape).map_err(candle_error)
}

impl LoraMoeOp {
    /// Validates every shape against `x`'s and the config.
    fn dims(&self, x: &[usize]) -> candle_core::Result<LoraMoeDims> {
        let shapes = [
            x,
            self.weight.dims(),
            self.lora_a.dims(),
            self.lora_b.dims(),
            self.router.dims(),
            self.bias.as_ref().map_or(&[][..], Tensor::dims),
            self.guidance.as_ref().map_or(&[][..], Tensor::dims),
        ];
        let longest = shapes.iter().map(|s| s.iter().product::<usize>()).max().unwrap_or(0);
        let units = vec![(); longest];
        let inputs = LoraMoeInputs {
            x: shape_view(&units, x)?,
            weight: shape_view(&units, shapes[1])?,
            lora_a: shape_view(&units, shapes[2])?,
            lora_b: shape_view(&units, shapes[3])?,
            router: shape_view(&units, shapes[4])?,
            bias: self.bias.as_ref().map(|_| shape_view(&units, shapes[5])).transpose()?,
            guidance: self.guidance.as_ref().map(|_| shape_view(&units, shapes[6])).transpose()?,
        };
        inputs.validate(&self.config).map_err(candle_error)
    }

    fn cpu_run<T: LoraMoeDtype + WithDType>(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = self.dims(layout.dims())?;
        let x = cpu_slice::<T>(OP, "x", storage, layout)?;
        let (weight, lora_a) = (self.weight.storage_and_layout(), self.lora_a.storage_and_layout());
        let (lora_b, router) = (self.lora_b.storage_and_layout(), self.router.storage_and_layout());
        let bias = self.bias.as_ref().map(Tensor::storage_and_layout);
        let guidance = self.guidance.as_ref().map(Tensor::storage_and_layout);
        let inputs = LoraMoeInputs {
            x: View::new(OP, "x", x, layout.dims()).map_err(candle_error)?,
            weight: cpu_view("weight", &weight)?,
            bias: bias.as_ref().map(|g| cpu_view("bias", g)).transpose()?,
            lora_a: cpu_view("lora_a", &lora_a)?,
            lora_b: cpu_view("lora_b", &lora_b)?,
            router: cpu_view("router", &router)?,
            guidance: guidance.as_ref().map(|g| cpu_view("guidance", g)).transpose()?,
        };
        let out = super::lora_moe(&Device::Cpu, &inputs, &self.config).map_err(candle_error)?;
        let shape = Shape::from((dims.batch, dims.tokens, dims.n));
        Ok((T::to_cpu_storage_owned(out.y.data), shape))
    }
}

/// The elements of a tensor held by the op (`guard` from `storage_and_layout`) as a view, when
/// its storage is on the CPU.
fn cpu_view<'a, T: WithDType>(
    name: &'static str,
    guard: &'a (StorageRef<'_>, &Layout),
) -> candle_core::Result<View<'a, T>> {
    let (storage, layout) = guard;
    let Storage::Cpu(cpu) = &**storage else {
        return Err(candle_error(FapeError::Config {
            op: OP,
            field: name,
            message: "is not on the CPU like x".into(),
        }));
    };
    View::new(OP, name, cpu_slice::<T>(OP, name, cpu, layout)?, layout.dims()).map_err(candle_error)
}

impl CustomOp1 for LoraMoeOp {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match storage.dtype() {
            DType::F32 => self.cpu_run::<f32>(storage, layout),
            DType::BF16 => self.cpu_run::<half::bf16>(storage, layout),
            other => Err(candle_error(FapeError::Config {
                op: OP,
                field: "x",
                message: format!("has dtype {other:?}; lora_moe takes f32 or bf16"),
            })),
        }
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda_fwd::run(self, storage, layout)
    }
}

#[cfg(feature = "candle-cuda")]
mod cuda_fwd {
    //! The CUDA side of the op: bf16 through the fused kernels on candle's stream; f32 through
    //! the crate's f32 CUDA path (host tensors).

    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, DType, Layout, Shape, Storage, StorageRef, Tensor};
    use cudarc::driver::CudaView;
    use half::bf16;

    use super::super::config::{LoraMoeDims, LoraMoeInputs, OP};
    use super::super::cuda::{LoraMoeLinear, LoraMoeProjection};
    use super::LoraMoeOp;
    use crate::backend::cuda::{dev_err, CudaDevice};
    use crate::candle_ops::{candle_error, cuda_view};
    use crate::error::FapeError;
    use crate::tensor::View;

    /// The CUDA storage and layout of a tensor held by the op, or an error naming it.
    fn cuda_storage<'a>(
        name: &'static str,
        guard: &'a (StorageRef<'_>, &Layout),
    ) -> candle_core::Result<(&'a CudaStorage, &'a Layout)> {
        match &*guard.0 {
            Storage::Cuda(s) => Ok((s, guard.1)),
            _ => Err(candle_error(FapeError::Config { op: OP, field: name, message: "is not on CUDA like x".into() })),
        }
    }

    /// A bf16 view of a tensor held by the op.
    fn bf16_view<'a>(
        name: &'static str,
        guard: &'a (StorageRef<'_>, &Layout),
    ) -> candle_core::Result<CudaView<'a, bf16>> {
        let (storage, layout) = cuda_storage(name, guard)?;
        cuda_view::<bf16>(OP, name, storage, layout)
    }

    pub(super) fn run(
        op: &LoraMoeOp,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dims = op.dims(layout.dims())?;
        let device = CudaDevice::on_stream(storage.device.cuda_stream()).map_err(candle_error)?;
        match storage.dtype() {
            DType::BF16 => bf16_fused(op, storage, layout, &device, dims),
            DType::F32 => f32_via_host(op, storage, layout, &device, dims),
            other => Err(candle_error(FapeError::Config {
                op: OP,
                field: "x",
                message: format!("has dtype {other:?}; lora_moe takes f32 or bf16"),
            })),
        }
    }

    /// bf16: pack the weights on the device and run the fused path on candle's stream, writing
    /// a fresh candle buffer.
    fn bf16_fused(
        op: &LoraMoeOp,
        storage: &CudaStorage,
        layout: &Layout,
        device: &CudaDevice,
        dims: LoraMoeDims,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let x = cuda_view::<bf16>(OP, "x", storage, layout)?;
        let (weight_g, lora_a_g) = (op.weight.storage_and_layout(), op.lora_a.storage_and_layout());
        let (lora_b_g, router_g) = (op.lora_b.storage_and_layout(), op.router.storage_and_layout());
        let bias_g = op.bias.as_ref().map(Tensor::storage_and_layout);
        let guidance_g = op.guidance.as_ref().map(Tensor::storage_and_layout);
        let weight = bf16_view("weight", &weight_g)?;
        let lora_a = bf16_view("lora_a", &lora_a_g)?;
        let lora_b = bf16_view("lora_b", &lora_b_g)?;
        let router = bf16_view("router", &router_g)?;
        let bias = bias_g.as_ref().map(|g| bf16_view("bias", g)).transpose()?;
        let guidance = guidance_g.as_ref().map(|g| bf16_view("guidance", g)).transpose()?;
        let projection = LoraMoeProjection {
            weight: &weight,
            bias: bias.as_ref(),
            lora_a: &lora_a,
            lora_b: &lora_b,
            router: &router,
            n: dims.n,
        };
        let layer = LoraMoeLinear::new(device, dims.d, dims.dg, dims.experts, dims.rank, &[projection], &op.config)
            .map_err(candle_error)?;
        let rows = dims.batch * dims.tokens;
        let stream = device.stream();
        let mut y =
            stream.alloc_zeros::<bf16>(rows * dims.n).map_err(|e| candle_error(dev_err("allocating `y`")(e)))?;
        let mut gates = stream
            .alloc_zeros::<f32>(rows * dims.experts)
            .map_err(|e| candle_error(dev_err("allocating `gates`")(e)))?;
        layer
            .forward(&x, dims.batch, dims.tokens, guidance.as_ref(), &mut y.slice_mut(..), &mut gates.slice_mut(..))
            .map_err(candle_error)?;
        let shape = Shape::from((dims.batch, dims.tokens, dims.n));
        Ok((CudaStorage::wrap_cuda_slice(y, storage.device.clone()), shape))
    }

    /// The f32 elements of a CUDA tensor on the host (asynchronous copy on `device`'s stream).
    fn to_host(device: &CudaDevice, name: &'static str, s: &CudaStorage, l: &Layout) -> candle_core::Result<Vec<f32>> {
        let view = cuda_view::<f32>(OP, name, s, l)?;
        device.stream().clone_dtoh(&view).map_err(|e| candle_error(dev_err(format!("copying `{name}` to the host"))(e)))
    }

    /// A tensor held by the op on the host.
    fn held_to_host(device: &CudaDevice, name: &'static str, t: &Tensor) -> candle_core::Result<Vec<f32>> {
        let guard = t.storage_and_layout();
        let (s, l) = cuda_storage(name, &guard)?;
        to_host(device, name, s, l)
    }

    /// f32: the crate's f32 CUDA path, which takes host tensors (copies both ways).
    fn f32_via_host(
        op: &LoraMoeOp,
        storage: &CudaStorage,
        layout: &Layout,
        device: &CudaDevice,
        dims: LoraMoeDims,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let x = to_host(device, "x", storage, layout)?;
        let weight = held_to_host(device, "weight", &op.weight)?;
        let bias = op.bias.as_ref().map(|t| held_to_host(device, "bias", t)).transpose()?;
        let lora_a = held_to_host(device, "lora_a", &op.lora_a)?;
        let lora_b = held_to_host(device, "lora_b", &op.lora_b)?;
        let router = held_to_host(device, "router", &op.router)?;
        let guidance = op.guidance.as_ref().map(|t| held_to_host(device, "guidance", t)).transpose()?;
        device.stream().synchronize().map_err(|e| candle_error(dev_err("copying the inputs to the host")(e)))?;
        let bias_shape = op.bias.as_ref().map(|t| t.dims().to_vec()).unwrap_or_default();
        let guidance_shape = op.guidance.as_ref().map(|t| t.dims().to_vec()).unwrap_or_default();
        let inputs = LoraMoeInputs {
            x: View::new(OP, "x", &x, layout.dims()).map_err(candle_error)?,
            weight: View::new(OP, "weight", &weight, op.weight.dims()).map_err(candle_error)?,
            bias: bias.as_deref().map(|b| View::new(OP, "bias", b, &bias_shape)).transpose().map_err(candle_error)?,
            lora_a: View::new(OP, "lora_a", &lora_a, op.lora_a.dims()).map_err(candle_error)?,
            lora_b: View::new(OP, "lora_b", &lora_b, op.lora_b.dims()).map_err(candle_error)?,
            router: View::new(OP, "router", &router, op.router.dims()).map_err(candle_error)?,
            guidance: guidance
                .as_deref()
                .map(|g| View::new(OP, "guidance", g, &guidance_shape))
                .transpose()
                .map_err(candle_error)?,
        };
        let out = super::super::cuda::lora_moe_f32(device, &inputs, dims, &op.config).map_err(candle_error)?;
        let y = device
            .stream()
            .clone_htod(&out.y.data)
            .map_err(|e| candle_error(dev_err("copying `y` to the device")(e)))?;
        let shape = Shape::from((dims.batch, dims.tokens, dims.n));
        Ok((CudaStorage::wrap_cuda_slice(y, storage.device.clone()), shape))
    }
}
