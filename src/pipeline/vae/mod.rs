//! FLUX's autoencoder (diffusers `AutoencoderKL` layout and tensor names, no `quant_conv`):
//! images `[B, 3, H, W]` in [-1, 1] to normalised latents `[B, 16, H/8, W/8]` and back.
//!
//! Tensor names under the VarBuilder's root: `encoder.conv_in`,
//! `encoder.down_blocks.{i}.resnets.{j}.{norm1,conv1,norm2,conv2,conv_shortcut}`,
//! `encoder.down_blocks.{i}.downsamplers.0.conv`, `encoder.mid_block.resnets.{0,1}`,
//! `encoder.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`, `encoder.conv_norm_out`,
//! `encoder.conv_out`; `decoder.conv_in`, `decoder.mid_block...`, `decoder.up_blocks.{i}.resnets.{j}`,
//! `decoder.up_blocks.{i}.upsamplers.0.conv`, `decoder.conv_norm_out`, `decoder.conv_out` (each with
//! `.weight` and `.bias`).
//!
//! The encoder's `conv_out` emits the mean and log-variance of the latent distribution; encoding
//! keeps the mean (no sampling) and normalises it: `latent = (mean - shift) * scale`.

pub mod blocks;
mod config;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

pub use config::{VaeConfig, MAX_CHANNELS, MAX_LAYERS_PER_BLOCK, MAX_LEVELS, NORM_EPS};

use self::blocks::{conv3x3, Conv, Downsample, MidBlock, Norm, ResnetBlock, Upsample};
use crate::candle_ops::candle_error;
use crate::error::FapeError;

/// One resolution level of a half: its resnets, then the optional resampler.
#[derive(Debug, Clone)]
struct Level<S> {
    resnets: Vec<ResnetBlock>,
    sampler: Option<S>,
}

impl<S: Module> Module for Level<S> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for resnet in &self.resnets {
            x = resnet.forward(&x)?;
        }
        match &self.sampler {
            Some(sampler) => sampler.forward(&x),
            None => Ok(x),
        }
    }
}

/// `[B, in_channels, H, W] -> [B, 2 * latent_channels, H/f, W/f]` (mean and log-variance).
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv,
    down_blocks: Vec<Level<Downsample>>,
    mid_block: MidBlock,
    conv_norm_out: Norm,
    conv_out: Conv,
}

impl Encoder {
    fn load(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let (groups, last) = (cfg.norm_groups, ch[ch.len() - 1]);
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| ResnetBlock::load(if j == 0 { cin } else { cout }, cout, groups, vb.pp("resnets").pp(j)))
                .collect::<Result<Vec<_>>>()?;
            let sampler =
                if i + 1 < ch.len() { Some(Downsample::load(cout, vb.pp("downsamplers").pp("0"))?) } else { None };
            down_blocks.push(Level { resnets, sampler });
            cin = cout;
        }
        Ok(Self {
            conv_in: conv3x3(cfg.in_channels, ch[0], vb.pp("conv_in"))?,
            down_blocks,
            mid_block: MidBlock::load(last, groups, vb.pp("mid_block"))?,
            conv_norm_out: Norm::load(groups, last, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(last, 2 * cfg.latent_channels, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for level in &self.down_blocks {
            x = level.forward(&x)?;
        }
        let x = self.mid_block.forward(&x)?;
        self.conv_out.forward(&self.conv_norm_out.forward(&x, true)?)
    }
}

/// `[B, latent_channels, h, w] -> [B, in_channels, h*f, w*f]`.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv,
    mid_block: MidBlock,
    up_blocks: Vec<Level<Upsample>>,
    conv_norm_out: Norm,
    conv_out: Conv,
}

impl Decoder {
    fn load(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let (groups, last) = (cfg.norm_groups, ch[ch.len() - 1]);
        let mut up_blocks = Vec::with_capacity(ch.len());
        let mut cin = last;
        for (i, &cout) in ch.iter().rev().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| ResnetBlock::load(if j == 0 { cin } else { cout }, cout, groups, vb.pp("resnets").pp(j)))
                .collect::<Result<Vec<_>>>()?;
            let sampler =
                if i + 1 < ch.len() { Some(Upsample::load(cout, vb.pp("upsamplers").pp("0"))?) } else { None };
            up_blocks.push(Level { resnets, sampler });
            cin = cout;
        }
        Ok(Self {
            conv_in: conv3x3(cfg.latent_channels, last, vb.pp("conv_in"))?,
            mid_block: MidBlock::load(last, groups, vb.pp("mid_block"))?,
            up_blocks,
            conv_norm_out: Norm::load(groups, ch[0], vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(ch[0], cfg.in_channels, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for level in &self.up_blocks {
            x = level.forward(&x)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&x, true)?)
    }
}

/// The folder of a weights directory that holds the autoencoder (`DIR/vae/*.safetensors`).
pub const VAE_SUBFOLDER: &str = "vae";

/// Every tensor [`Vae::load`] reads for `config`, by name and shape, in load order (recorded
/// without allocating: what `fape weights synth` writes under [`VAE_SUBFOLDER`]).
///
/// # Errors
/// [`crate::FapeError::Config`] for an invalid `config`.
pub fn tensor_specs(config: &VaeConfig) -> crate::Result<Vec<crate::pipeline::weights::TensorSpec>> {
    config.validate()?;
    let recorder = crate::pipeline::weights::Recorder::new();
    Vae::load(recorder.var_builder(candle_core::DType::F32), config).map_err(|e| crate::FapeError::Device {
        backend: "candle",
        context: "recording the autoencoder's tensors".into(),
        message: e.to_string(),
    })?;
    Ok(recorder.specs())
}

/// FLUX's autoencoder: [`Vae::encode`] and [`Vae::decode`] between images in [-1, 1] and
/// normalised latents.
#[derive(Debug, Clone)]
pub struct Vae {
    encoder: Encoder,
    decoder: Decoder,
    config: VaeConfig,
}

fn shape_error(tensor: &'static str, expected: String, actual: &[usize]) -> candle_core::Error {
    candle_error(FapeError::Shape { op: "vae", tensor, expected, actual: actual.to_vec() })
}

impl Vae {
    /// Loads the encoder (`encoder.*`) and decoder (`decoder.*`) from `vb` (dtype and device are
    /// `vb`'s).
    ///
    /// # Errors
    /// An invalid `config` (see [`VaeConfig::validate`]), or a missing or mis-shaped tensor: the
    /// error names its full path, such as `encoder.mid_block.attentions.0.to_q.weight`.
    pub fn load(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        config.validate().map_err(candle_error)?;
        Ok(Self {
            encoder: Encoder::load(config, vb.pp("encoder"))?,
            decoder: Decoder::load(config, vb.pp("decoder"))?,
            config: config.clone(),
        })
    }

    /// The config this autoencoder was loaded with.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Normalised latent `[B, latent_channels, H/f, W/f]` (f = [`VaeConfig::downscale`], 8 for
    /// FLUX) of `image` `[B, in_channels, H, W]` in [-1, 1], in the weights' dtype:
    /// `(mean - shift_factor) * scaling_factor`.
    ///
    /// # Errors
    /// [`FapeError::Shape`] (wrapped) when `image` is not rank 4 with `in_channels` channels and
    /// `H`, `W` positive multiples of f; a candle error from the device.
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let f = self.config.downscale();
        let expected = || format!("[B, {}, H, W] with H, W positive multiples of {f}", self.config.in_channels);
        match *image.dims() {
            [b, c, h, w] if b > 0 && c == self.config.in_channels && h > 0 && w > 0 && h % f == 0 && w % f == 0 => {}
            _ => return Err(shape_error("image", expected(), image.dims())),
        }
        let moments = self.encoder.forward(image)?;
        let mean = moments.narrow(1, 0, self.config.latent_channels)?;
        mean.affine(self.config.scaling_factor, -self.config.shift_factor * self.config.scaling_factor)
    }

    /// Image `[B, in_channels, h*f, w*f]` in [-1, 1] (clamped) decoded from the normalised
    /// `latent` `[B, latent_channels, h, w]`: the decoder runs on `latent / scaling_factor +
    /// shift_factor`.
    ///
    /// # Errors
    /// [`FapeError::Shape`] (wrapped) when `latent` is not rank 4 with `latent_channels` channels
    /// and positive extents; a candle error from the device.
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        match *latent.dims() {
            [b, c, h, w] if b > 0 && c == self.config.latent_channels && h > 0 && w > 0 => {}
            _ => {
                let expected = format!("[B, {}, h, w], all positive", self.config.latent_channels);
                return Err(shape_error("latent", expected, latent.dims()));
            }
        }
        let z = latent.affine(1.0 / self.config.scaling_factor, self.config.shift_factor)?;
        self.decoder.forward(&z)?.clamp(-1.0, 1.0)
    }
}
