//! The autoencoder's building blocks, with diffusers' tensor names: the resnet block, the
//! single-head spatial self-attention of the middle blocks, the down/up samplers.
//!
//! Every block maps `[B, C, H, W]` to `[B, C', H', W']` and computes in the weights' dtype, except
//! GroupNorm statistics and the attention softmax, which run in f32 for half-precision inputs.

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::{conv2d, linear, Conv2d, Conv2dConfig, GroupNorm, Init, Linear, VarBuilder};

use super::config::NORM_EPS;
use crate::candle_ops::cpu_slice;
use crate::cpu_conv::{ConvGeometry, PackedConv};

/// A convolution of the autoencoder (`[B, cin, H, W] -> [B, cout, H', W']`, `weight` and `bias`
/// under `vb`'s prefix): candle's `conv2d`, except for f32 on the CPU, where it runs this crate's
/// direct convolution ([`crate::cpu_conv`]) on the same weights (packed at load), the
/// upsampling and asymmetric padding of `geometry` folded into its input reads.
#[derive(Debug, Clone)]
pub(super) struct Conv {
    candle: Conv2d,
    geometry: ConvGeometry,
    packed: Option<Arc<PackedConv>>,
}

impl Conv {
    /// Loads the convolution.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor (the error names it).
    pub(super) fn load(cin: usize, cout: usize, geometry: ConvGeometry, vb: VarBuilder) -> Result<Self> {
        let padding = if geometry.pad_before == geometry.pad_after { geometry.pad_before } else { 0 };
        let config = Conv2dConfig { padding, stride: geometry.stride, ..Default::default() };
        let candle = conv2d(cin, cout, geometry.kernel, config, vb)?;
        let packed = match (candle.weight().device(), candle.weight().dtype()) {
            (candle_core::Device::Cpu, DType::F32) => {
                let weight = candle.weight().flatten_all()?.to_vec1::<f32>()?;
                let bias = candle.bias().map(|b| b.to_vec1::<f32>()).transpose()?;
                Some(Arc::new(PackedConv::new(&weight, bias.as_deref(), cout, cin, geometry.kernel)))
            }
            _ => None,
        };
        Ok(Self { candle, geometry, packed })
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(packed) = &self.packed {
            if x.device().is_cpu() && x.dtype() == DType::F32 {
                return x.contiguous()?.apply_op1_no_bwd(&CpuConv { packed, geometry: self.geometry });
            }
        }
        let ConvGeometry { pad_before, pad_after, upsample, .. } = self.geometry;
        let mut x = x.clone();
        if upsample {
            let (_, _, h, w) = x.dims4()?;
            x = x.upsample_nearest2d(2 * h, 2 * w)?;
        }
        if pad_before != pad_after {
            x = x.pad_with_zeros(D::Minus1, pad_before, pad_after)?.pad_with_zeros(D::Minus2, pad_before, pad_after)?;
        }
        self.candle.forward(&x)
    }
}

/// [`Conv`]'s CPU path as a candle op on a contiguous f32 input.
struct CpuConv<'a> {
    packed: &'a PackedConv,
    geometry: ConvGeometry,
}

impl candle_core::CustomOp1 for CpuConv<'_> {
    fn name(&self) -> &'static str {
        "vae-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice::<f32>("vae-conv2d", "x", storage, layout)?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let (out, dims) = crate::cpu_conv::conv2d(x, [b, c, h, w], self.packed, self.geometry)
            .ok_or_else(|| candle_core::Error::Msg(format!("vae-conv2d: input {h}x{w} is smaller than the kernel")))?;
        Ok((CpuStorage::F32(out), Shape::from(dims.to_vec())))
    }
}

/// GroupNorm of the autoencoder (`weight`, `bias` `[C]` under `vb`'s prefix, eps [`NORM_EPS`]),
/// optionally followed by SiLU: candle's ops, except for f32 on the CPU, where it is one fused
/// pass of this crate ([`crate::cpu_norm`]). `[B, C, H, W]` in and out.
#[derive(Debug, Clone)]
pub(super) struct Norm {
    candle: GroupNorm,
    groups: usize,
    /// `(weight, bias)` on the host, for f32 CPU runs.
    host: Option<Arc<(Vec<f32>, Vec<f32>)>>,
}

impl Norm {
    /// Loads the norm for `channels` channels in `groups` groups.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor (the error names it), or `groups` not dividing `channels`.
    pub(super) fn load(groups: usize, channels: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let host = match (weight.device(), weight.dtype()) {
            (candle_core::Device::Cpu, DType::F32) => Some(Arc::new((weight.to_vec1()?, bias.to_vec1()?))),
            _ => None,
        };
        Ok(Self { candle: GroupNorm::new(weight, bias, channels, groups, NORM_EPS)?, groups, host })
    }

    /// The norm of `x`, then SiLU when `silu`.
    ///
    /// # Errors
    /// A shape or device error from candle.
    pub(super) fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if let Some(host) = &self.host {
            if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() >= 3 {
                return x.contiguous()?.apply_op1_no_bwd(&CpuNorm { norm: self, host, silu });
            }
        }
        let y = self.candle.forward(x)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

/// [`Norm`]'s CPU path as a candle op on a contiguous f32 input.
struct CpuNorm<'a> {
    norm: &'a Norm,
    host: &'a (Vec<f32>, Vec<f32>),
    silu: bool,
}

impl candle_core::CustomOp1 for CpuNorm<'_> {
    fn name(&self) -> &'static str {
        "vae-group-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice::<f32>("vae-group-norm", "x", storage, layout)?;
        let dims = layout.dims();
        let (batch, channels) = (dims[0], dims[1]);
        if channels != self.host.0.len() || channels % self.norm.groups != 0 {
            candle_core::bail!("vae-group-norm: {channels} channels, expected {}", self.host.0.len());
        }
        let spatial = dims[2..].iter().product();
        let (weight, bias) = (&self.host.0, &self.host.1);
        let out = crate::cpu_norm::group_norm(
            x,
            [batch, channels, spatial],
            self.norm.groups,
            weight,
            bias,
            NORM_EPS,
            self.silu,
        );
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// A 3x3 convolution with padding 1 (`[B, cin, H, W] -> [B, cout, H, W]`) under `vb`'s prefix.
pub(super) fn conv3x3(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv> {
    let geometry = ConvGeometry { kernel: 3, stride: 1, pad_before: 1, pad_after: 1, upsample: false };
    Conv::load(cin, cout, geometry, vb)
}

/// diffusers' `ResnetBlock2D` without time embedding: `norm1, SiLU, conv1, norm2, SiLU, conv2`,
/// added to the input (through the 1x1 `conv_shortcut` when the channel count changes).
/// `[B, cin, H, W] -> [B, cout, H, W]`.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
    conv_shortcut: Option<Conv>,
}

impl ResnetBlock {
    /// Loads `norm1`, `conv1`, `norm2`, `conv2` (and `conv_shortcut` when `cin != cout`) under
    /// `vb`'s prefix; `groups` GroupNorm groups, which must divide `cin` and `cout`.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor (the error names it), or groups not dividing a channel count.
    pub fn load(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let conv_shortcut = if cin == cout {
            None
        } else {
            let one = ConvGeometry { kernel: 1, stride: 1, pad_before: 0, pad_after: 0, upsample: false };
            Some(Conv::load(cin, cout, one, vb.pp("conv_shortcut"))?)
        };
        Ok(Self {
            norm1: Norm::load(groups, cin, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, vb.pp("conv1"))?,
            norm2: Norm::load(groups, cout, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, true)?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h, true)?)?;
        match &self.conv_shortcut {
            Some(shortcut) => shortcut.forward(x)? + h,
            None => x + h,
        }
    }
}

/// diffusers' `Attention` as the autoencoder's middle block uses it: one head over all `C`
/// channels, `group_norm` first, `to_q`, `to_k`, `to_v`, `to_out.0` linear layers with bias,
/// softmax(q k^T / sqrt(C)) v over the `H*W` positions, plus the input. `[B, C, H, W]` in and out.
#[derive(Debug, Clone)]
pub struct AttentionBlock {
    group_norm: Norm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    channels: usize,
}

impl AttentionBlock {
    /// Loads the block under `vb`'s prefix for `channels` channels and `groups` GroupNorm groups.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor (the error names it), or groups not dividing `channels`.
    pub fn load(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: Norm::load(groups, channels, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out").pp("0"))?,
            channels,
        })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.group_norm.forward(x, false)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            // This crate's flash attention: one head of D = C, scale 1/sqrt(C).
            let heads = |t: &Tensor| t.reshape((b, 1, h * w, c));
            let config = crate::attention::AttentionConfig::default();
            let attended = crate::candle_ops::attention(&heads(&q)?, &heads(&k)?, &heads(&v)?, None, None, &config)?;
            let out = self.to_out.forward(&attended.reshape((b, h * w, c))?)?;
            return out.transpose(1, 2)?.reshape((b, c, h, w))? + x;
        }
        let scores = (q.matmul(&k.t()?)? * (1.0 / (self.channels as f64).sqrt()))?;
        let probs = match scores.dtype() {
            DType::F16 | DType::BF16 => {
                candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(scores.dtype())?
            }
            _ => candle_nn::ops::softmax_last_dim(&scores)?,
        };
        let out = self.to_out.forward(&probs.matmul(&v)?)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

/// diffusers' `Downsample2D` with `padding=0`: zero-pad one row at the bottom and one column at
/// the right (pad `(0, 1, 0, 1)`), then a 3x3 stride-2 `conv`. `[B, C, H, W] -> [B, C, H/2, W/2]`
/// for even `H`, `W`.
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Conv,
}

impl Downsample {
    /// Loads `conv` under `vb`'s prefix.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor (the error names it).
    pub fn load(channels: usize, vb: VarBuilder) -> Result<Self> {
        let geometry = ConvGeometry { kernel: 3, stride: 2, pad_before: 0, pad_after: 1, upsample: false };
        Ok(Self { conv: Conv::load(channels, channels, geometry, vb.pp("conv"))? })
    }
}

impl Module for Downsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x)
    }
}

/// diffusers' `Upsample2D`: nearest-neighbour 2x, then a 3x3 `conv`.
/// `[B, C, H, W] -> [B, C, 2H, 2W]`.
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv,
}

impl Upsample {
    /// Loads `conv` under `vb`'s prefix.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor (the error names it).
    pub fn load(channels: usize, vb: VarBuilder) -> Result<Self> {
        let geometry = ConvGeometry { kernel: 3, stride: 1, pad_before: 1, pad_after: 1, upsample: true };
        Ok(Self { conv: Conv::load(channels, channels, geometry, vb.pp("conv"))? })
    }
}

impl Module for Upsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x)
    }
}

/// diffusers' `UNetMidBlock2D` of the autoencoder: `resnets.0`, `attentions.0`, `resnets.1`, all
/// at `channels`. `[B, C, H, W]` in and out.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnet0: ResnetBlock,
    attention: AttentionBlock,
    resnet1: ResnetBlock,
}

impl MidBlock {
    /// Loads the block under `vb`'s prefix.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor (the error names it).
    pub fn load(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock::load(channels, channels, groups, vb.pp("resnets").pp("0"))?,
            attention: AttentionBlock::load(channels, groups, vb.pp("attentions").pp("0"))?,
            resnet1: ResnetBlock::load(channels, channels, groups, vb.pp("resnets").pp("1"))?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.resnet1.forward(&self.attention.forward(&self.resnet0.forward(x)?)?)
    }
}
