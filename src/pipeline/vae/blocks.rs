//! The autoencoder's building blocks, with diffusers' tensor names: the resnet block, the
//! single-head spatial self-attention of the middle blocks, the down/up samplers.
//!
//! Every block maps `[B, C, H, W]` to `[B, C', H', W']` and computes in the weights' dtype, except
//! GroupNorm statistics and the attention softmax, which run in f32 for half-precision inputs.

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::{conv2d, group_norm, linear, Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};

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
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
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
            norm1: group_norm(groups, cin, NORM_EPS, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, vb.pp("conv1"))?,
            norm2: group_norm(groups, cout, NORM_EPS, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
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
    group_norm: GroupNorm,
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
            group_norm: group_norm(groups, channels, NORM_EPS, vb.pp("group_norm"))?,
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
        let tokens = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
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
