//! The executor's shape: presets (`flux-dev`, `tiny`), a JSON config file, validation and the
//! parameter count.

use std::path::Path;

use serde::Deserialize;

use crate::error::{FapeError, Result};
use crate::lora_moe::{Band, LoraMoeConfig, LoraMoeDims};

/// The name configs report in errors.
const OP: &str = "flux_config";

fn config_error(field: &'static str, message: impl Into<String>) -> FapeError {
    FapeError::Config { op: OP, field, message: message.into() }
}

/// The largest extent (width, heads, blocks, tokens, experts, rank) a config may give.
pub const MAX_EXTENT: usize = 1 << 20;

/// The most parameters a config may describe: 2^40 (FLUX.1-dev has about 1.2 x 10^10).
pub const MAX_PARAMETERS: u64 = 1 << 40;

/// The largest config file read: 1 MiB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The text of the config file at `path`, refused unread when over [`MAX_CONFIG_BYTES`]
/// ([`crate::io::read_bounded`]).
///
/// # Errors
/// [`FapeError::File`] naming `path` when it cannot be read, is too large or is not UTF-8.
pub fn read_config_file(path: &Path) -> Result<String> {
    let bytes = crate::io::read_bounded(path, MAX_CONFIG_BYTES, "a config file")?;
    String::from_utf8(bytes)
        .map_err(|e| FapeError::File { path: path.display().to_string(), message: format!("not UTF-8: {e}") })
}

/// The width of the sinusoidal timestep (and guidance) features, as in FLUX.
pub const TIMESTEP_FEATURES: usize = 256;

/// The shape of the FLUX-shaped executor and of its LoRA-MoE adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct FluxConfig {
    /// The preset (or file) it came from, for tables and messages.
    pub name: String,
    /// Channels of a packed image token: 4 x the latent channels (2x2 patches); 64 for FLUX.
    pub in_channels: usize,
    /// Model width; `heads * head_dim`.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of one head; the sum of `axes_dims_rope`.
    pub head_dim: usize,
    /// Double-stream (MMDiT) blocks.
    pub double_blocks: usize,
    /// Single-stream blocks.
    pub single_blocks: usize,
    /// Width of a context (plan) token (T5's 4096 in FLUX).
    pub context_dim: usize,
    /// Width of the pooled text vector (CLIP's 768 in FLUX).
    pub pooled_dim: usize,
    /// MLP hidden width over `dim`.
    pub mlp_ratio: usize,
    /// RoPE widths of the three position axes (text/index, row, column); each even.
    pub axes_dims_rope: [usize; 3],
    /// RoPE base.
    pub rope_theta: f64,
    /// Whether the model has `time_text_embed.guidance_embedder` (FLUX-dev does).
    pub guidance_embeds: bool,
    /// The guidance value fed to the guidance embedder (FLUX-dev's usual 3.5).
    pub guidance: f64,
    /// Most plan tokens (bytes of the plan line) the plan encoder keeps.
    pub max_plan_tokens: usize,
    /// LoRA-MoE experts per adapted projection.
    pub lora_experts: usize,
    /// LoRA rank of each expert.
    pub lora_rank: usize,
    /// The LoRA-MoE op's settings (bands one per expert, FIR, router, prior, top-k, scale).
    pub lora_moe: LoraMoeConfig,
}

impl FluxConfig {
    /// The names [`Self::preset`] knows.
    pub const PRESETS: [&'static str; 2] = ["flux-dev", "tiny"];

    /// FLUX.1-dev's transformer (about 12 B parameters) with FAPE-IR's adapters.
    pub fn flux_dev() -> Self {
        Self {
            name: "flux-dev".into(),
            in_channels: 64,
            dim: 3072,
            heads: 24,
            head_dim: 128,
            double_blocks: 19,
            single_blocks: 38,
            context_dim: 4096,
            pooled_dim: 768,
            mlp_ratio: 4,
            axes_dims_rope: [16, 56, 56],
            rope_theta: 10_000.0,
            guidance_embeds: true,
            guidance: 3.5,
            max_plan_tokens: 512,
            lora_experts: 2,
            lora_rank: 8,
            lora_moe: LoraMoeConfig::default(),
        }
    }

    /// The same structure, small enough for tests on a CPU: width 128 (2 heads of 64), 2 double
    /// and 2 single blocks, context 64, pooled 32, RoPE axes (8, 28, 28).
    pub fn tiny() -> Self {
        Self {
            name: "tiny".into(),
            dim: 128,
            heads: 2,
            head_dim: 64,
            double_blocks: 2,
            single_blocks: 2,
            context_dim: 64,
            pooled_dim: 32,
            axes_dims_rope: [8, 28, 28],
            max_plan_tokens: 128,
            ..Self::flux_dev()
        }
    }

    /// The preset called `name` (one of [`Self::PRESETS`]).
    ///
    /// # Errors
    /// [`FapeError::Config`] (field `preset`) for an unknown name.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "flux-dev" => Ok(Self::flux_dev()),
            "tiny" => Ok(Self::tiny()),
            _ => Err(config_error("preset", format!("`{name}` is not one of {:?}", Self::PRESETS))),
        }
    }

    /// A config from the JSON file at `path`: a preset (`"preset"`, default `flux-dev`) with any
    /// of its fields overridden. Every key is optional; unknown keys are errors:
    ///
    /// ```json
    /// { "preset": "tiny", "name": "my-model", "in_channels": 64, "dim": 256, "heads": 4,
    ///   "head_dim": 64, "double_blocks": 3, "single_blocks": 6, "context_dim": 128,
    ///   "pooled_dim": 64, "mlp_ratio": 4, "axes_dims_rope": [8, 28, 28], "rope_theta": 10000.0,
    ///   "guidance_embeds": true, "guidance": 3.5, "max_plan_tokens": 512,
    ///   "lora_moe": { "experts": 2, "rank": 8, "bands": ["low", "high"], "taps": 9,
    ///                 "sigma": 2.0, "temperature": 5.0, "lambda": 0.5, "top_k": 0, "scale": null } }
    /// ```
    ///
    /// # Errors
    /// [`FapeError::File`] when the file cannot be read or is not such JSON;
    /// [`FapeError::Config`] naming the field for an unknown preset, band or invalid value
    /// (see [`Self::validate`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        Self::from_json(&shown, &read_config_file(path)?)
    }

    /// A config from JSON `text` in the format of [`Self::from_file`]; `source` is what errors
    /// name.
    ///
    /// # Errors
    /// As [`Self::from_file`].
    pub fn from_json(source: &str, text: &str) -> Result<Self> {
        let file: ConfigFile = serde_json::from_str(text)
            .map_err(|e| FapeError::File { path: source.to_string(), message: format!("not a FLUX config: {e}") })?;
        file.into_config()
    }

    /// Checks the fields against each other.
    ///
    /// # Errors
    /// [`FapeError::Config`] naming the field: a zero extent or one over [`MAX_EXTENT`], more
    /// than [`MAX_PARAMETERS`] parameters, `dim != heads * head_dim`,
    /// `head_dim != sum(axes_dims_rope)` or an odd axis, `in_channels` not a multiple of 4,
    /// a non-positive `rope_theta`, a non-finite `guidance`, or LoRA-MoE settings that do not fit
    /// `lora_experts` and `lora_rank`.
    pub fn validate(&self) -> Result<()> {
        let extents = [
            ("in_channels", self.in_channels),
            ("dim", self.dim),
            ("heads", self.heads),
            ("head_dim", self.head_dim),
            ("context_dim", self.context_dim),
            ("pooled_dim", self.pooled_dim),
            ("mlp_ratio", self.mlp_ratio),
            ("max_plan_tokens", self.max_plan_tokens),
            ("lora_experts", self.lora_experts),
            ("lora_rank", self.lora_rank),
        ];
        if let Some((field, _)) = extents.iter().find(|(_, v)| *v == 0) {
            return Err(config_error(field, "must be positive"));
        }
        let blocks = [("double_blocks", self.double_blocks), ("single_blocks", self.single_blocks)];
        if let Some((field, v)) = extents.iter().chain(&blocks).find(|(_, v)| *v > MAX_EXTENT) {
            return Err(config_error(field, format!("{v} is over the limit of {MAX_EXTENT}")));
        }
        if self.dim != self.heads * self.head_dim {
            return Err(config_error(
                "dim",
                format!("{} is not heads x head_dim = {} x {}", self.dim, self.heads, self.head_dim),
            ));
        }
        let rope: usize = self.axes_dims_rope.iter().sum();
        if rope != self.head_dim || self.axes_dims_rope.iter().any(|a| !a.is_multiple_of(2)) {
            return Err(config_error(
                "axes_dims_rope",
                format!("{:?} must be even and sum to head_dim {}", self.axes_dims_rope, self.head_dim),
            ));
        }
        if !self.in_channels.is_multiple_of(4) {
            return Err(config_error("in_channels", format!("{} is not 4 x latent channels", self.in_channels)));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(config_error("rope_theta", format!("must be positive and finite, got {}", self.rope_theta)));
        }
        if !self.guidance.is_finite() {
            return Err(config_error("guidance", format!("must be finite, got {}", self.guidance)));
        }
        let parameters = self.parameter_count();
        if parameters > MAX_PARAMETERS {
            return Err(config_error(
                "dim",
                format!("the config describes {parameters} parameters, over the limit of {MAX_PARAMETERS}"),
            ));
        }
        let dims = LoraMoeDims {
            batch: 1,
            tokens: 1,
            d: self.dim,
            n: self.dim,
            experts: self.lora_experts,
            rank: self.lora_rank,
            dg: self.dim,
        };
        self.lora_moe.validate_for(&dims)
    }

    /// Channels of the VAE latent the model reads: `in_channels / 4` (16 for FLUX).
    pub fn latent_channels(&self) -> usize {
        self.in_channels / 4
    }

    /// The MLP hidden width, `mlp_ratio * dim`.
    pub fn mlp_dim(&self) -> usize {
        self.mlp_ratio * self.dim
    }

    /// Parameters of the model as [`super::FluxTransformer::load`] and
    /// [`super::PlanEncoder::load`] take them, counted from the config alone.
    pub fn parameter_count(&self) -> u64 {
        // f64: exact for every count under 2^53 (validated configs stay under 2^40), and saturating
        // instead of overflowing for any other.
        let wide = |v: usize| v as f64;
        let (dim, mlp) = (wide(self.dim), wide(self.mlp_ratio) * wide(self.dim));
        let linear = |i: f64, o: f64| i * o + o;
        let (e, r) = (wide(self.lora_experts), wide(self.lora_rank));
        let lora = |d: f64, n: f64| e * r * d + e * n * r + e * d;
        let mlp_pair = |i: f64, o: f64| linear(i, o) + linear(o, o);
        let embed = linear(wide(self.in_channels), dim)
            + linear(wide(self.context_dim), dim)
            + mlp_pair(wide(TIMESTEP_FEATURES), dim)
            + if self.guidance_embeds { mlp_pair(wide(TIMESTEP_FEATURES), dim) } else { 0.0 }
            + mlp_pair(wide(self.pooled_dim), dim);
        let head = wide(self.head_dim);
        let double = 2.0 * linear(dim, 6.0 * dim)
            + 8.0 * linear(dim, dim)
            + 4.0 * head
            + 2.0 * (linear(dim, mlp) + linear(mlp, dim))
            + 4.0 * lora(dim, dim);
        let single = linear(dim, 3.0 * dim)
            + 3.0 * linear(dim, dim)
            + 2.0 * head
            + linear(dim, mlp)
            + linear(dim + mlp, dim)
            + 3.0 * lora(dim, dim);
        let out = linear(dim, 2.0 * dim) + linear(dim, wide(self.in_channels));
        let plan = 256.0 * wide(self.context_dim) + linear(wide(self.context_dim), wide(self.pooled_dim));
        let total = embed + wide(self.double_blocks) * double + wide(self.single_blocks) * single + out + plan;
        total as u64
    }
}

/// The JSON form of [`FluxConfig::from_file`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    preset: Option<String>,
    name: Option<String>,
    in_channels: Option<usize>,
    dim: Option<usize>,
    heads: Option<usize>,
    head_dim: Option<usize>,
    double_blocks: Option<usize>,
    single_blocks: Option<usize>,
    context_dim: Option<usize>,
    pooled_dim: Option<usize>,
    mlp_ratio: Option<usize>,
    axes_dims_rope: Option<[usize; 3]>,
    rope_theta: Option<f64>,
    guidance_embeds: Option<bool>,
    guidance: Option<f64>,
    max_plan_tokens: Option<usize>,
    lora_moe: Option<LoraMoeFile>,
}

/// The `lora_moe` object of the JSON config.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoraMoeFile {
    experts: Option<usize>,
    rank: Option<usize>,
    bands: Option<Vec<String>>,
    taps: Option<usize>,
    sigma: Option<f64>,
    temperature: Option<f64>,
    lambda: Option<f64>,
    top_k: Option<usize>,
    scale: Option<f64>,
}

impl ConfigFile {
    fn into_config(self) -> Result<FluxConfig> {
        let mut c = FluxConfig::preset(self.preset.as_deref().unwrap_or("flux-dev"))?;
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        take!(name, in_channels, dim, heads, head_dim, double_blocks, single_blocks, context_dim, pooled_dim);
        take!(mlp_ratio, axes_dims_rope, rope_theta, guidance_embeds, guidance, max_plan_tokens);
        if let Some(l) = self.lora_moe {
            c.lora_experts = l.experts.unwrap_or(c.lora_experts);
            c.lora_rank = l.rank.unwrap_or(c.lora_rank);
            if let Some(bands) = l.bands {
                c.lora_moe.bands = bands.iter().map(|b| b.parse::<Band>()).collect::<Result<_>>()?;
            }
            let m = &mut c.lora_moe;
            m.taps = l.taps.unwrap_or(m.taps);
            m.sigma = l.sigma.unwrap_or(m.sigma);
            m.temperature = l.temperature.unwrap_or(m.temperature);
            m.lambda = l.lambda.unwrap_or(m.lambda);
            m.top_k = l.top_k.unwrap_or(m.top_k);
            m.scale = l.scale.or(m.scale);
        }
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for name in FluxConfig::PRESETS {
            FluxConfig::preset(name).and_then(|c| c.validate()).unwrap();
        }
    }

    #[test]
    fn flux_dev_has_about_twelve_billion_parameters() {
        let n = FluxConfig::flux_dev().parameter_count() as f64;
        assert!((11.8e9..12.1e9).contains(&n), "{n}");
    }

    #[test]
    fn bad_fields_are_named() {
        let mut c = FluxConfig::tiny();
        c.heads = 3;
        assert!(c.validate().unwrap_err().to_string().contains("`dim`"));
        let mut c = FluxConfig::tiny();
        c.axes_dims_rope = [10, 26, 28];
        c.validate().unwrap();
        c.axes_dims_rope = [9, 27, 28];
        assert!(c.validate().unwrap_err().to_string().contains("axes_dims_rope"));
        let mut c = FluxConfig::tiny();
        c.lora_experts = 3;
        assert!(c.validate().unwrap_err().to_string().contains("bands"));
        assert!(FluxConfig::preset("flux-pro").unwrap_err().to_string().contains("preset"));
    }
}
