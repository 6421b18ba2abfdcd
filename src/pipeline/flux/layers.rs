//! The primitives whose implementation depends on the [`ExecPath`]: LayerNorm, RMSNorm, GELU-tanh
//! and attention (with per-head RMSNorm and RoPE). The reference path writes each formula in
//! plain candle ops, normalising and rotating in f32; the fused path uses candle's fused norm and
//! GELU ops and this crate's attention op.

use candle_core::{DType, Tensor, D};

use super::ExecPath;
use crate::attention::{AttentionConfig, RMS_EPS};

/// The epsilon of FLUX's affine-free LayerNorms.
pub const LAYER_NORM_EPS: f64 = 1e-6;

/// LayerNorm over the last dim without affine parameters: `(x - mean) / sqrt(var + 1e-6)`.
pub(crate) fn layer_norm(x: &Tensor, path: ExecPath) -> candle_core::Result<Tensor> {
    match path {
        ExecPath::Reference => {
            let x32 = x.to_dtype(DType::F32)?;
            let centred = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
            let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
            centred.broadcast_div(&(var + LAYER_NORM_EPS)?.sqrt()?)?.to_dtype(x.dtype())
        }
        ExecPath::Fused => {
            let width = x.dim(D::Minus1)?;
            let ones = Tensor::ones(width, x.dtype(), x.device())?;
            let zeros = Tensor::zeros(width, x.dtype(), x.device())?;
            candle_nn::ops::layer_norm(&x.contiguous()?, &ones, &zeros, LAYER_NORM_EPS as f32)
        }
    }
}

/// RMSNorm over the last dim with weight `w` `[D]`: `x / sqrt(mean(x^2) + 1e-6) * w`.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, path: ExecPath) -> candle_core::Result<Tensor> {
    match path {
        ExecPath::Reference => rms_norm_f32(&x.to_dtype(DType::F32)?, w)?.to_dtype(x.dtype()),
        ExecPath::Fused => candle_nn::ops::rms_norm(&x.contiguous()?, w, RMS_EPS as f32),
    }
}

/// The literal RMSNorm of an f32 tensor.
fn rms_norm_f32(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + RMS_EPS)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(&w.to_dtype(DType::F32)?)
}

/// GELU with the tanh approximation: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub(crate) fn gelu_tanh(x: &Tensor, path: ExecPath) -> candle_core::Result<Tensor> {
    match path {
        ExecPath::Reference => {
            let x32 = x.to_dtype(DType::F32)?;
            let inner = ((&x32 + (x32.powf(3.0)? * 0.044715)?)? * (2.0 / std::f64::consts::PI).sqrt())?;
            ((x32 * 0.5)? * (inner.tanh()? + 1.0)?)?.to_dtype(x.dtype())
        }
        ExecPath::Fused => x.gelu(),
    }
}

/// RoPE of `x` `[B,H,L,D]` (f32) with tables `cos`, `sin` `[>=L, D/2]`: each pair
/// `(x[2i], x[2i+1])` of row `l` becomes `(x0 cos - x1 sin, x0 sin + x1 cos)` at `(l, i)`.
fn rotate_pairs(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    let cos = cos.narrow(0, 0, l)?.to_dtype(DType::F32)?;
    let sin = sin.narrow(0, 0, l)?.to_dtype(DType::F32)?;
    let pairs = x.reshape((b, h, l, d / 2, 2))?;
    let x0 = pairs.narrow(4, 0, 1)?.squeeze(4)?;
    let x1 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
    let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
    Tensor::stack(&[r0, r1], 4)?.reshape((b, h, l, d))
}

/// Non-causal attention `softmax(q k^T / sqrt(D)) v` of `q` `[B,H,Lq,D]` over `k`, `v`
/// `[B,H,Lk,D]`, after the optional per-head RMSNorm `(q_norm, k_norm)` `[D]` and RoPE
/// `(cos, sin)` `[L,D/2]` of `q` and `k` (the contract of [`crate::attention`]). Returns
/// `[B,H,Lq,D]` in `q`'s dtype.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    norms: Option<(&Tensor, &Tensor)>,
    rope: Option<(&Tensor, &Tensor)>,
    path: ExecPath,
) -> candle_core::Result<Tensor> {
    if path == ExecPath::Fused {
        return crate::candle_ops::attention(q, k, v, norms, rope, &AttentionConfig::default());
    }
    let dtype = q.dtype();
    let prepare = |x: &Tensor, norm: Option<&Tensor>| -> candle_core::Result<Tensor> {
        let mut x = x.to_dtype(DType::F32)?;
        if let Some(w) = norm {
            x = rms_norm_f32(&x, w)?;
        }
        if let Some((cos, sin)) = rope {
            x = rotate_pairs(&x, cos, sin)?;
        }
        x.to_dtype(dtype)
    };
    let q = prepare(q, norms.map(|n| n.0))?;
    let k = prepare(k, norms.map(|n| n.1))?;
    let scale = AttentionConfig::default().scale_for(q.dim(D::Minus1)?);
    let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?.to_dtype(DType::F32)? * scale;
    let scores = scores?;
    let weights = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
    let weights = weights.broadcast_div(&weights.sum_keepdim(D::Minus1)?)?;
    weights.to_dtype(dtype)?.matmul(&v.contiguous()?)
}
