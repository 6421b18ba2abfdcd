//! TEMPORARY SHIM — replace at merge by `crate::candle_ops::{lora_moe, attention, LoraMoeWeights}`
//! (being written on other branches with these exact signatures) and delete this file.
//!
//! Until then the fused path runs this crate's host CPU backends through these two functions:
//! every input is copied to the host as f32, the op runs on `Device::Cpu` of this crate, and the
//! result is copied back to the input's candle device and dtype.

use candle_core::{DType, Tensor};

use crate::attention::{AttentionConfig, AttentionInputs};
use crate::backend::Device as FapeDevice;
use crate::candle_ops::candle_error;
use crate::lora_moe::{LoraMoeConfig, LoraMoeInputs};
use crate::tensor::View;

/// The weights of one LoRA-MoE projection (PEFT layouts).
#[derive(Debug, Clone)]
pub struct LoraMoeWeights {
    /// `[n,d]`.
    pub weight: Tensor,
    /// `[n]`.
    pub bias: Option<Tensor>,
    /// `[E,r,d]`.
    pub lora_a: Tensor,
    /// `[E,n,r]`.
    pub lora_b: Tensor,
    /// `[E,dg]`.
    pub router: Tensor,
}

/// A tensor's f32 elements and shape on the host.
struct Host {
    data: Vec<f32>,
    shape: Vec<usize>,
}

impl Host {
    fn of(t: &Tensor) -> candle_core::Result<Self> {
        Ok(Self { data: t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, shape: t.dims().to_vec() })
    }

    fn view(&self, op: &'static str, name: &'static str) -> candle_core::Result<View<'_, f32>> {
        View::new(op, name, &self.data, &self.shape).map_err(candle_error)
    }
}

fn host_opt(t: Option<&Tensor>) -> candle_core::Result<Option<Host>> {
    t.map(Host::of).transpose()
}

/// `y` `[B,T,n]` of the LoRA-MoE op (contract in the README) for `x` `[B,T,d]`.
///
/// # Errors
/// The op's shape and config errors (naming the tensor or field), wrapped in candle's error.
pub fn lora_moe(
    x: &Tensor,
    weights: &LoraMoeWeights,
    guidance: Option<&Tensor>,
    config: &LoraMoeConfig,
) -> candle_core::Result<Tensor> {
    let op = crate::lora_moe::OP;
    let (hx, hw, ha, hb, hr) = (
        Host::of(x)?,
        Host::of(&weights.weight)?,
        Host::of(&weights.lora_a)?,
        Host::of(&weights.lora_b)?,
        Host::of(&weights.router)?,
    );
    let (hbias, hg) = (host_opt(weights.bias.as_ref())?, host_opt(guidance)?);
    let inputs = LoraMoeInputs {
        x: hx.view(op, "x")?,
        weight: hw.view(op, "weight")?,
        bias: hbias.as_ref().map(|b| b.view(op, "bias")).transpose()?,
        lora_a: ha.view(op, "lora_a")?,
        lora_b: hb.view(op, "lora_b")?,
        router: hr.view(op, "router")?,
        guidance: hg.as_ref().map(|g| g.view(op, "guidance")).transpose()?,
    };
    let out = crate::lora_moe::lora_moe(&FapeDevice::Cpu, &inputs, config).map_err(candle_error)?;
    Tensor::from_vec(out.y.data, out.y.shape, x.device())?.to_dtype(x.dtype())
}

/// Attention (contract in the README) of `q` `[B,H,Lq,D]` over `k`, `v` `[B,H,Lk,D]` with optional
/// RMSNorm weights `(q_norm, k_norm)` `[D]` and RoPE tables `(cos, sin)` `[L,D/2]`.
///
/// # Errors
/// The op's shape and config errors (naming the tensor or field), wrapped in candle's error.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    norms: Option<(&Tensor, &Tensor)>,
    rope: Option<(&Tensor, &Tensor)>,
    config: &AttentionConfig,
) -> candle_core::Result<Tensor> {
    let op = crate::attention::OP;
    let (hq, hk, hv) = (Host::of(q)?, Host::of(k)?, Host::of(v)?);
    let norms = norms.map(|(a, b)| Ok::<_, candle_core::Error>((Host::of(a)?, Host::of(b)?))).transpose()?;
    let rope = rope.map(|(a, b)| Ok::<_, candle_core::Error>((Host::of(a)?, Host::of(b)?))).transpose()?;
    let mut inputs = AttentionInputs::new(hq.view(op, "q")?, hk.view(op, "k")?, hv.view(op, "v")?);
    if let Some((qn, kn)) = &norms {
        inputs = inputs.with_norms(qn.view(op, "q_norm")?, kn.view(op, "k_norm")?);
    }
    if let Some((c, s)) = &rope {
        inputs = inputs.with_rope(c.view(op, "rope_cos")?, s.view(op, "rope_sin")?);
    }
    let out = crate::attention::attention(&FapeDevice::Cpu, &inputs, config).map_err(candle_error)?;
    Tensor::from_vec(out.data, out.shape, q.device())?.to_dtype(q.dtype())
}
