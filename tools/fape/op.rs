//! `fape op`: one op on the tensors of a safetensors file, outputs written to another.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use fape_kernels::attention::{self, AttentionConfig, AttentionInputs};
use fape_kernels::freq::{self, FreqSplitConfig, MaskKind};
use fape_kernels::io::{self, TensorFile};
use fape_kernels::lora_moe::{self, Band, LoraMoeConfig, LoraMoeInputs};
use fape_kernels::{Device, DeviceKind, FapeError, Result};

/// The ops `fape op` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OpName {
    /// Inputs x, weight, bias?, lora_a, lora_b, router, guidance?; outputs y, gates.
    LoraMoe,
    /// Input x; outputs low, high, band_energy.
    FreqSplit,
    /// Inputs q, k, v, q_norm?, k_norm?, rope_cos?, rope_sin?; output out.
    Attention,
    /// LoRA-MoE's token-axis Gaussian low-pass alone: input x [B,T,C]; output low.
    TokenLowpass,
}

#[derive(Args)]
pub struct OpArgs {
    /// The op to run.
    op: OpName,
    /// Safetensors file holding the inputs by name (f32, bf16 or f16).
    #[arg(long)]
    input: PathBuf,
    /// Safetensors file to write the outputs to (f32).
    #[arg(long)]
    output: PathBuf,
    /// Backend to run on.
    #[arg(long, default_value = "cpu", value_name = "reference|cpu|cube|cuda")]
    device: DeviceKind,
    /// lora-moe: band of each expert, comma-separated from low, high, full [default: low,high].
    #[arg(long, value_delimiter = ',')]
    bands: Option<Vec<Band>>,
    /// lora-moe, token-lowpass: FIR length along tokens, odd [default: 9].
    #[arg(long)]
    taps: Option<usize>,
    /// lora-moe, token-lowpass: Gaussian width in tokens [default: 2.0].
    #[arg(long)]
    sigma: Option<f64>,
    /// lora-moe: router softmax temperature [default: 5.0].
    #[arg(long)]
    temperature: Option<f64>,
    /// lora-moe: router weight against the band-energy prior, in [0,1] [default: 0.5].
    #[arg(long)]
    lambda: Option<f64>,
    /// lora-moe: keep the k largest gates per token, 0 keeps all [default: 0].
    #[arg(long)]
    top_k: Option<usize>,
    /// lora-moe: LoRA scale [default: 1/r]; attention: softmax scale [default: 1/sqrt(D)].
    #[arg(long)]
    scale: Option<f64>,
    /// freq-split: normalised cutoff radius [default: 0.15].
    #[arg(long)]
    cutoff: Option<f64>,
    /// freq-split: mask shape, hard or gaussian [default: hard].
    #[arg(long)]
    mask: Option<MaskKind>,
    /// freq-split: band edges, comma-separated, increasing in [0,1] [default: 0,0.15,0.35,0.45,0.9,1].
    #[arg(long, value_delimiter = ',')]
    edges: Option<Vec<f64>>,
}

impl OpArgs {
    /// Rejects flags that do not apply to the op, naming the first one.
    fn reject_foreign_flags(&self) -> Result<()> {
        use OpName::*;
        let flags: [(&'static str, bool, &[OpName]); 10] = [
            ("bands", self.bands.is_some(), &[LoraMoe]),
            ("taps", self.taps.is_some(), &[LoraMoe, TokenLowpass]),
            ("sigma", self.sigma.is_some(), &[LoraMoe, TokenLowpass]),
            ("temperature", self.temperature.is_some(), &[LoraMoe]),
            ("lambda", self.lambda.is_some(), &[LoraMoe]),
            ("top-k", self.top_k.is_some(), &[LoraMoe]),
            ("scale", self.scale.is_some(), &[LoraMoe, Attention]),
            ("cutoff", self.cutoff.is_some(), &[FreqSplit]),
            ("mask", self.mask.is_some(), &[FreqSplit]),
            ("edges", self.edges.is_some(), &[FreqSplit]),
        ];
        match flags.iter().find(|(_, set, ops)| *set && !ops.contains(&self.op)) {
            Some((flag, ..)) => Err(FapeError::Config {
                op: "fape op",
                field: flag,
                message: format!("does not apply to {:?}", self.op),
            }),
            None => Ok(()),
        }
    }

    fn lora_moe_config(&self) -> LoraMoeConfig {
        let d = LoraMoeConfig::default();
        LoraMoeConfig {
            bands: self.bands.clone().unwrap_or(d.bands),
            taps: self.taps.unwrap_or(d.taps),
            sigma: self.sigma.unwrap_or(d.sigma),
            temperature: self.temperature.unwrap_or(d.temperature),
            lambda: self.lambda.unwrap_or(d.lambda),
            top_k: self.top_k.unwrap_or(d.top_k),
            scale: self.scale,
        }
    }

    fn freq_config(&self) -> FreqSplitConfig {
        let d = FreqSplitConfig::default();
        FreqSplitConfig {
            cutoff: self.cutoff.unwrap_or(d.cutoff),
            mask: self.mask.unwrap_or(d.mask),
            edges: self.edges.clone().unwrap_or(d.edges),
        }
    }
}

/// Reads the inputs, runs the op, writes the outputs.
///
/// # Errors
/// Bad flags, unreadable files, missing or mis-shaped tensors, an unavailable backend.
pub fn run(args: OpArgs) -> Result<()> {
    args.reject_foreign_flags()?;
    let file = TensorFile::read(&args.input)?;
    let device = Device::open(args.device)?;
    match args.op {
        OpName::LoraMoe => {
            let op = lora_moe::OP;
            let inputs = LoraMoeInputs {
                x: file.require(op, "x")?,
                weight: file.require(op, "weight")?,
                bias: file.optional(op, "bias")?,
                lora_a: file.require(op, "lora_a")?,
                lora_b: file.require(op, "lora_b")?,
                router: file.require(op, "router")?,
                guidance: file.optional(op, "guidance")?,
            };
            let out = lora_moe::lora_moe(&device, &inputs, &args.lora_moe_config())?;
            io::write(&args.output, &[("y", &out.y), ("gates", &out.gates)])
        }
        OpName::FreqSplit => {
            let x = file.require(freq::OP, "x")?;
            let out = freq::freq_split(&device, x, &args.freq_config())?;
            io::write(&args.output, &[("low", &out.low), ("high", &out.high), ("band_energy", &out.band_energy)])
        }
        OpName::Attention => {
            let op = attention::OP;
            let inputs = AttentionInputs {
                q_norm: file.optional(op, "q_norm")?,
                k_norm: file.optional(op, "k_norm")?,
                rope_cos: file.optional(op, "rope_cos")?,
                rope_sin: file.optional(op, "rope_sin")?,
                ..AttentionInputs::new(file.require(op, "q")?, file.require(op, "k")?, file.require(op, "v")?)
            };
            let out = attention::attention(&device, &inputs, &AttentionConfig { scale: args.scale })?;
            io::write(&args.output, &[("out", &out)])
        }
        OpName::TokenLowpass => {
            let d = LoraMoeConfig::default();
            let x = file.require("token_lowpass", "x")?;
            let low = lora_moe::token_lowpass(&device, x, args.taps.unwrap_or(d.taps), args.sigma.unwrap_or(d.sigma))?;
            io::write(&args.output, &[("low", &low)])
        }
    }
}
