//! The autoencoder's shape: channel widths per resolution level, resnets per level, GroupNorm
//! groups, latent channels and the latent normalisation.

use std::path::Path;

use serde::Deserialize;

use crate::error::{config_error, FapeError, Result};

/// GroupNorm epsilon of every norm in FLUX's autoencoder.
pub const NORM_EPS: f64 = 1e-6;

/// The most resolution levels (`block_out_channels` entries) a config may have: 8, a 128x
/// downscale.
pub const MAX_LEVELS: usize = 8;

/// The largest channel count a config may give (levels, image, latent).
pub const MAX_CHANNELS: usize = 1 << 16;

/// The most resnets per level a config may give.
pub const MAX_LAYERS_PER_BLOCK: usize = 64;

/// The shape of a FLUX-style `AutoencoderKL` (diffusers layout).
///
/// With `n = block_out_channels.len()` levels the encoder halves the resolution `n - 1` times
/// (FLUX: 8x), so images of `[B, in_channels, H, W]` map to latents of
/// `[B, latent_channels, H / 2^(n-1), W / 2^(n-1)]`.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    /// Image channels (3: RGB).
    pub in_channels: usize,
    /// Channels of each resolution level, finest first (FLUX: `[128, 256, 512, 512]`).
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level; each decoder level has one more (diffusers' convention).
    pub layers_per_block: usize,
    /// GroupNorm groups; must divide every channel count in `block_out_channels` (FLUX: 32).
    pub norm_groups: usize,
    /// Latent channels (FLUX: 16). The encoder's `conv_out` emits twice as many (mean, logvar).
    pub latent_channels: usize,
    /// `latent = (mean - shift_factor) * scaling_factor` (FLUX: 0.3611).
    pub scaling_factor: f64,
    /// See `scaling_factor` (FLUX: 0.1159).
    pub shift_factor: f64,
}

impl VaeConfig {
    /// The names [`VaeConfig::preset`] accepts.
    pub const PRESETS: [&'static str; 2] = ["flux-dev", "tiny"];

    /// FLUX.1-dev's autoencoder: 83.8 M parameters, 16 latent channels, 8x down.
    pub fn flux_dev() -> Self {
        Self {
            in_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_groups: 32,
            latent_channels: 16,
            scaling_factor: 0.3611,
            shift_factor: 0.1159,
        }
    }

    /// The same architecture and latent space (16 channels, 8x down, same normalisation) with
    /// narrow levels and one resnet per encoder level: for tests and CPU runs.
    pub fn tiny() -> Self {
        Self { block_out_channels: vec![16, 32, 32, 32], layers_per_block: 1, norm_groups: 8, ..Self::flux_dev() }
    }

    /// The preset called `name` (one of [`VaeConfig::PRESETS`]).
    ///
    /// # Errors
    /// [`crate::FapeError::Config`] for an unknown name.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "flux-dev" => Ok(Self::flux_dev()),
            "tiny" => Ok(Self::tiny()),
            other => Err(config_error(
                "vae",
                "preset",
                format!("`{other}` is unknown (known: {})", Self::PRESETS.join(", ")),
            )),
        }
    }

    /// A config from the JSON file at `path` (at most
    /// [`crate::pipeline::flux::MAX_CONFIG_BYTES`]): a preset (`"preset"`, default `flux-dev`)
    /// with any of its fields overridden. Every key is optional; unknown keys are errors:
    ///
    /// ```json
    /// { "preset": "tiny", "in_channels": 3, "block_out_channels": [16, 32, 32, 32],
    ///   "layers_per_block": 1, "norm_groups": 8, "latent_channels": 16,
    ///   "scaling_factor": 0.3611, "shift_factor": 0.1159 }
    /// ```
    ///
    /// # Errors
    /// [`FapeError::File`] when the file cannot be read, is too large or is not such JSON;
    /// [`FapeError::Config`] naming the field for an unknown preset or an invalid value (see
    /// [`Self::validate`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::pipeline::flux::read_config_file(path)?;
        Self::from_json(&path.display().to_string(), &text)
    }

    /// A config from JSON `text` in the format of [`Self::from_file`]; `source` is what errors
    /// name.
    ///
    /// # Errors
    /// As [`Self::from_file`].
    pub fn from_json(source: &str, text: &str) -> Result<Self> {
        let file: ConfigFile = serde_json::from_str(text)
            .map_err(|e| FapeError::File { path: source.to_string(), message: format!("not a VAE config: {e}") })?;
        let mut c = Self::preset(file.preset.as_deref().unwrap_or("flux-dev"))?;
        c.in_channels = file.in_channels.unwrap_or(c.in_channels);
        c.block_out_channels = file.block_out_channels.unwrap_or(c.block_out_channels);
        c.layers_per_block = file.layers_per_block.unwrap_or(c.layers_per_block);
        c.norm_groups = file.norm_groups.unwrap_or(c.norm_groups);
        c.latent_channels = file.latent_channels.unwrap_or(c.latent_channels);
        c.scaling_factor = file.scaling_factor.unwrap_or(c.scaling_factor);
        c.shift_factor = file.shift_factor.unwrap_or(c.shift_factor);
        c.validate()?;
        Ok(c)
    }

    /// How many times smaller the latent grid is than the image, per side (`2^(levels - 1)`).
    pub fn downscale(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Checks that the config describes a buildable network.
    ///
    /// # Errors
    /// [`crate::FapeError::Config`] naming the field: no levels or more than [`MAX_LEVELS`], a
    /// zero channel count or one over [`MAX_CHANNELS`], no resnets per level or more than
    /// [`MAX_LAYERS_PER_BLOCK`], groups that do not divide a channel count, a non-finite or zero
    /// scaling factor.
    pub fn validate(&self) -> Result<()> {
        let err = |field, message: String| Err(config_error("vae", field, message));
        if self.block_out_channels.is_empty() || self.block_out_channels.len() > MAX_LEVELS {
            return err(
                "block_out_channels",
                format!("has {} levels, not 1 to {MAX_LEVELS}", self.block_out_channels.len()),
            );
        }
        if self.in_channels == 0 || self.latent_channels == 0 {
            return err("in_channels/latent_channels", "must be positive".into());
        }
        let channels =
            [self.in_channels, self.latent_channels].into_iter().chain(self.block_out_channels.iter().copied());
        if let Some(c) = channels.into_iter().find(|&c| c > MAX_CHANNELS) {
            return err("block_out_channels", format!("channel count {c} is over the limit of {MAX_CHANNELS}"));
        }
        if self.layers_per_block == 0 || self.layers_per_block > MAX_LAYERS_PER_BLOCK {
            return err("layers_per_block", format!("{} is not 1 to {MAX_LAYERS_PER_BLOCK}", self.layers_per_block));
        }
        if self.norm_groups == 0 {
            return err("norm_groups", "must be positive".into());
        }
        if let Some(&c) = self.block_out_channels.iter().find(|&&c| c == 0 || c % self.norm_groups != 0) {
            return err(
                "norm_groups",
                format!("{} does not divide channel count {c} of {:?}", self.norm_groups, self.block_out_channels),
            );
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 || !self.shift_factor.is_finite() {
            return err(
                "scaling_factor/shift_factor",
                format!("{} / {} must be finite, the scale non-zero", self.scaling_factor, self.shift_factor),
            );
        }
        Ok(())
    }

    /// Multiply-add FLOPs (2 per multiply-add) of the encoder on one `height x width` image,
    /// counting convolutions, attention projections and the attention matmuls (norms, activations
    /// and the softmax are left out). `height` and `width` are multiples of [`Self::downscale`].
    pub fn encode_flops(&self, height: usize, width: usize) -> f64 {
        let ch = &self.block_out_channels;
        let pixels = |level: usize| ((height >> level) * (width >> level)) as f64;
        let conv = |cin: usize, cout: usize, k: usize, px: f64| 2.0 * (cin * cout * k * k) as f64 * px;
        let mut flops = conv(self.in_channels, ch[0], 3, pixels(0));
        let mut cin = ch[0];
        for (level, &cout) in ch.iter().enumerate() {
            flops += self.resnets_flops(cin, cout, self.layers_per_block, pixels(level));
            if level + 1 < ch.len() {
                flops += conv(cout, cout, 3, pixels(level + 1));
            }
            cin = cout;
        }
        let last = ch.len() - 1;
        flops + self.mid_flops(pixels(last)) + conv(ch[last], 2 * self.latent_channels, 3, pixels(last))
    }

    /// Multiply-add FLOPs of the decoder producing one `height x width` image (as
    /// [`Self::encode_flops`] counts them).
    pub fn decode_flops(&self, height: usize, width: usize) -> f64 {
        let ch = &self.block_out_channels;
        let last = ch.len() - 1;
        let pixels = |level: usize| ((height >> level) * (width >> level)) as f64;
        let conv = |cin: usize, cout: usize, k: usize, px: f64| 2.0 * (cin * cout * k * k) as f64 * px;
        let mut flops = conv(self.latent_channels, ch[last], 3, pixels(last)) + self.mid_flops(pixels(last));
        let mut cin = ch[last];
        for level in (0..ch.len()).rev() {
            let cout = ch[level];
            flops += self.resnets_flops(cin, cout, self.layers_per_block + 1, pixels(level));
            if level > 0 {
                flops += conv(cout, cout, 3, pixels(level - 1));
            }
            cin = cout;
        }
        flops + conv(ch[0], self.in_channels, 3, pixels(0))
    }

    fn resnets_flops(&self, cin: usize, cout: usize, count: usize, px: f64) -> f64 {
        let conv = |cin: usize, cout: usize, k: usize| 2.0 * (cin * cout * k * k) as f64 * px;
        let first = conv(cin, cout, 3) + conv(cout, cout, 3) + if cin == cout { 0.0 } else { conv(cin, cout, 1) };
        first + (count - 1) as f64 * 2.0 * conv(cout, cout, 3)
    }

    fn mid_flops(&self, tokens: f64) -> f64 {
        let c = *self.block_out_channels.last().unwrap_or(&0) as f64;
        let resnet = 2.0 * 2.0 * c * c * 9.0 * tokens;
        2.0 * resnet + 4.0 * 2.0 * c * c * tokens + 2.0 * 2.0 * tokens * tokens * c
    }
}

/// The JSON form of [`VaeConfig::from_file`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    preset: Option<String>,
    in_channels: Option<usize>,
    block_out_channels: Option<Vec<usize>>,
    layers_per_block: Option<usize>,
    norm_groups: Option<usize>,
    latent_channels: Option<usize>,
    scaling_factor: Option<f64>,
    shift_factor: Option<f64>,
}
