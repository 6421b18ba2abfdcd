//! Inputs, config and validation of the LoRA-MoE op, shared by every backend.

use std::fmt;
use std::str::FromStr;

use crate::error::{config_error, FapeError, Result};
use crate::tensor::{expect_nonempty, expect_shape, Tensor, View};

use super::lowpass::validate_filter;

/// The op's name in errors and tables.
pub const OP: &str = "lora_moe";

/// Which frequency band of the token sequence an expert reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Band {
    /// The Gaussian low-pass along tokens.
    Low,
    /// The rest: `x - low(x)`.
    High,
    /// `x` itself.
    Full,
}

impl Band {
    /// The lower-case name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::High => "high",
            Self::Full => "full",
        }
    }
}

impl fmt::Display for Band {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Band {
    type Err = FapeError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "low" => Ok(Self::Low),
            "high" => Ok(Self::High),
            "full" => Ok(Self::Full),
            _ => Err(config_error(OP, "bands", format!("entry `{s}` is not one of low, high, full"))),
        }
    }
}

/// The op's configuration (defaults as in FAPE-IR).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraMoeConfig {
    /// The band each expert reads, one per expert (default `[low, high]`).
    pub bands: Vec<Band>,
    /// FIR length along tokens, odd (default 9).
    pub taps: usize,
    /// Gaussian width of the FIR in tokens (default 2.0).
    pub sigma: f64,
    /// Router softmax temperature (default 5.0).
    pub temperature: f64,
    /// Weight of the router against the band-energy prior, in \[0,1\] (default 0.5).
    pub lambda: f64,
    /// Keep the k largest gates per token (0 keeps all; default 0).
    pub top_k: usize,
    /// LoRA scale (default `1 / rank`).
    pub scale: Option<f64>,
}

impl Default for LoraMoeConfig {
    fn default() -> Self {
        Self {
            bands: vec![Band::Low, Band::High],
            taps: 9,
            sigma: 2.0,
            temperature: 5.0,
            lambda: 0.5,
            top_k: 0,
            scale: None,
        }
    }
}

/// The op's inputs (PEFT layouts).
#[derive(Debug, Clone, Copy)]
pub struct LoraMoeInputs<'a, T> {
    /// `[B,T,d]`: T tokens of each of B images, raster order.
    pub x: View<'a, T>,
    /// `[n,d]`: the base projection.
    pub weight: View<'a, T>,
    /// `[n]`, optional.
    pub bias: Option<View<'a, T>>,
    /// `[E,r,d]`: LoRA down-projections.
    pub lora_a: View<'a, T>,
    /// `[E,n,r]`: LoRA up-projections.
    pub lora_b: View<'a, T>,
    /// `[E,dg]`: router weights.
    pub router: View<'a, T>,
    /// `[B,T,dg]`, optional: what the router reads (x itself when absent, dg = d).
    pub guidance: Option<View<'a, T>>,
}

/// Extents of validated inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraMoeDims {
    /// Images B.
    pub batch: usize,
    /// Tokens per image T.
    pub tokens: usize,
    /// Input features d.
    pub d: usize,
    /// Output features n.
    pub n: usize,
    /// Experts E.
    pub experts: usize,
    /// LoRA rank r.
    pub rank: usize,
    /// Router input features dg.
    pub dg: usize,
}

/// The op's outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraMoeOutput<T> {
    /// `[B,T,n]`.
    pub y: Tensor<T>,
    /// `[B,T,E]`: the per-token gates after blending and top-k.
    pub gates: Tensor<T>,
}

impl<'a, T> LoraMoeInputs<'a, T> {
    /// Checks every tensor's shape against the others and `config` against the shapes.
    ///
    /// # Errors
    /// [`FapeError::Shape`] naming the tensor whose rank or extents disagree (or that is empty);
    /// [`FapeError::Config`] naming the field out of its domain.
    pub fn validate(&self, config: &LoraMoeConfig) -> Result<LoraMoeDims> {
        expect_shape(OP, "x", &self.x, "[B,T,d]", &[None, None, None])?;
        let [batch, tokens, d] = [self.x.shape()[0], self.x.shape()[1], self.x.shape()[2]];
        expect_shape(OP, "weight", &self.weight, &format!("[n,{d}]"), &[None, Some(d)])?;
        let n = self.weight.shape()[0];
        expect_shape(OP, "lora_a", &self.lora_a, &format!("[E,r,{d}]"), &[None, None, Some(d)])?;
        let [experts, rank] = [self.lora_a.shape()[0], self.lora_a.shape()[1]];
        let b_shape = format!("[{experts},{n},{rank}]");
        expect_shape(OP, "lora_b", &self.lora_b, &b_shape, &[Some(experts), Some(n), Some(rank)])?;
        if let Some(bias) = &self.bias {
            expect_shape(OP, "bias", bias, &format!("[{n}]"), &[Some(n)])?;
        }
        let dg = match &self.guidance {
            Some(g) => {
                let want = format!("[{batch},{tokens},dg]");
                expect_shape(OP, "guidance", g, &want, &[Some(batch), Some(tokens), None])?;
                g.shape()[2]
            }
            None => d,
        };
        expect_shape(OP, "router", &self.router, &format!("[{experts},{dg}]"), &[Some(experts), Some(dg)])?;
        for (name, view) in [("x", &self.x), ("weight", &self.weight), ("lora_a", &self.lora_a)] {
            expect_nonempty(OP, name, view)?;
        }
        expect_nonempty(OP, "router", &self.router)?;
        let dims = LoraMoeDims { batch, tokens, d, n, experts, rank, dg };
        config.validate_for(&dims)?;
        Ok(dims)
    }
}

impl LoraMoeConfig {
    /// Checks each field's domain and that `bands` and `top_k` fit `dims.experts`.
    ///
    /// # Errors
    /// [`FapeError::Config`] naming the field.
    pub fn validate_for(&self, dims: &LoraMoeDims) -> Result<()> {
        validate_filter(OP, self.taps, self.sigma)?;
        if self.bands.len() != dims.experts {
            return Err(config_error(
                OP,
                "bands",
                format!("has {} entries but lora_a has E = {} experts", self.bands.len(), dims.experts),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(config_error(
                OP,
                "temperature",
                format!("must be positive and finite, got {}", self.temperature),
            ));
        }
        if !(0.0..=1.0).contains(&self.lambda) {
            return Err(config_error(OP, "lambda", format!("must lie in [0,1], got {}", self.lambda)));
        }
        if self.top_k > dims.experts {
            return Err(config_error(OP, "top_k", format!("{} exceeds the {} experts", self.top_k, dims.experts)));
        }
        if let Some(s) = self.scale.filter(|s| !s.is_finite()) {
            return Err(config_error(OP, "scale", format!("must be finite, got {s}")));
        }
        Ok(())
    }

    /// The LoRA scale in effect: the given one, else `1 / rank`.
    pub fn scale_for(&self, rank: usize) -> f64 {
        self.scale.unwrap_or(1.0 / rank as f64)
    }
}

/// Owned LoRA-MoE inputs: what tests, checks, benches and files hold; [`Self::inputs`] lends
/// them as [`LoraMoeInputs`]. `T` is f32 by default; bf16 copies come from
/// [`LoraMoeTensors::cast`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoraMoeTensors<T = f32> {
    /// `[B,T,d]`.
    pub x: Tensor<T>,
    /// `[n,d]`.
    pub weight: Tensor<T>,
    /// `[n]`.
    pub bias: Option<Tensor<T>>,
    /// `[E,r,d]`.
    pub lora_a: Tensor<T>,
    /// `[E,n,r]`.
    pub lora_b: Tensor<T>,
    /// `[E,dg]`.
    pub router: Tensor<T>,
    /// `[B,T,dg]`.
    pub guidance: Option<Tensor<T>>,
}

impl LoraMoeTensors<f32> {
    /// Seeded random inputs of `dims`, with a bias when `bias`, and guidance when
    /// `dims.dg != dims.d`. `x`, the router and guidance are uniform in [-1,1); the weights are
    /// scaled by 1/sqrt(d), and `lora_b` is uniform in [-0.5,0.5) so that the LoRA term matters
    /// next to the base projection.
    pub fn random(seed: u64, dims: LoraMoeDims, bias: bool) -> Self {
        use crate::testing::{rng, uniform};
        let LoraMoeDims { batch, tokens, d, n, experts, rank, dg } = dims;
        let mut r = rng(seed);
        let w = 1.0 / (d as f32).sqrt();
        let mut tensor = |shape: Vec<usize>, bound: f32| {
            let data = uniform(&mut r, shape.iter().product(), -bound, bound);
            Tensor { data, shape }
        };
        Self {
            x: tensor(vec![batch, tokens, d], 1.0),
            weight: tensor(vec![n, d], w),
            bias: bias.then(|| tensor(vec![n], 0.1)),
            lora_a: tensor(vec![experts, rank, d], w),
            lora_b: tensor(vec![experts, n, rank], 0.5),
            router: tensor(vec![experts, dg], 1.0),
            guidance: (dg != d).then(|| tensor(vec![batch, tokens, dg], 1.0)),
        }
    }
}

impl<T: Copy> LoraMoeTensors<T> {
    /// Borrowed views of every tensor.
    pub fn inputs(&self) -> LoraMoeInputs<'_, T> {
        LoraMoeInputs {
            x: self.x.view(),
            weight: self.weight.view(),
            bias: self.bias.as_ref().map(Tensor::view),
            lora_a: self.lora_a.view(),
            lora_b: self.lora_b.view(),
            router: self.router.view(),
            guidance: self.guidance.as_ref().map(Tensor::view),
        }
    }
}
