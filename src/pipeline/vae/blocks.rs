//! The autoencoder's building blocks, with diffusers' tensor names: the resnet block, the
//! single-head spatial self-attention of the middle blocks, the down/up samplers.
//!
//! Every block maps `[B, C, H, W]` to `[B, C', H', W']` and computes in the weights' dtype, except
//! GroupNorm statistics and the attention softmax, which run in f32 for half-precision inputs.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{conv2d, group_norm, linear, Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};

use super::config::NORM_EPS;

/// A 3x3 convolution with padding 1 (`[B, cin, H, W] -> [B, cout, H, W]`) under `vb`'s prefix.
pub(super) fn conv3x3(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(cin, cout, 3, Conv2dConfig { padding: 1, ..Default::default() }, vb)
}

/// diffusers' `ResnetBlock2D` without time embedding: `norm1, SiLU, conv1, norm2, SiLU, conv2`,
/// added to the input (through the 1x1 `conv_shortcut` when the channel count changes).
/// `[B, cin, H, W] -> [B, cout, H, W]`.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
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
            Some(conv2d(cin, cout, 1, Conv2dConfig::default(), vb.pp("conv_shortcut"))?)
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
    conv: Conv2d,
}

impl Downsample {
    /// Loads `conv` under `vb`'s prefix.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor (the error names it).
    pub fn load(channels: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig { stride: 2, ..Default::default() };
        Ok(Self { conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))? })
    }
}

impl Module for Downsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&x.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?)
    }
}

/// diffusers' `Upsample2D`: nearest-neighbour 2x, then a 3x3 `conv`.
/// `[B, C, H, W] -> [B, C, 2H, 2W]`.
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// Loads `conv` under `vb`'s prefix.
    ///
    /// # Errors
    /// A missing or mis-shaped tensor (the error names it).
    pub fn load(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: conv3x3(channels, channels, vb.pp("conv"))? })
    }
}

impl Module for Upsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
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
