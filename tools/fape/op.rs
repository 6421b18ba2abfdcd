//! `fape op`: one op on the tensors of a safetensors file, outputs written to another, in the
//! dtype the inputs are stored in where the op has it.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use fape_kernels::attention::{self, AttentionConfig, AttentionElement, AttentionInputs};
use fape_kernels::freq::{self, FreqSplitConfig, MaskKind};
use fape_kernels::io::{self, Dtype, Element, TensorFile};
use fape_kernels::lora_moe::{self, Band, LoraMoeConfig, LoraMoeDtype, LoraMoeInputs};
use fape_kernels::{Device, DeviceKind, FapeError, Result, Tensor};
use half::{bf16, f16};

/// The ops `fape op` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OpName {
    /// Inputs x, weight, bias?, lora_a, lora_b, router, guidance?; outputs y, gates.
    LoraMoe,
    /// Input x; outputs low, high, band_energy.
    FreqSplit,
    /// Inputs q, k, v, q_norm?, k_norm?, rope_cos?, rope_sin?; output out.
    Attention,
    /// LoRA-MoE's token-axis Gaussian low-pass alone: input x (B,T,C); output low.
    TokenLowpass,
}

impl OpName {
    /// The op's name in errors (as the library spells it).
    fn name(self) -> &'static str {
        match self {
            Self::LoraMoe => lora_moe::OP,
            Self::FreqSplit => freq::OP,
            Self::Attention => attention::OP,
            Self::TokenLowpass => "token_lowpass",
        }
    }

    /// The input tensors, required ones first.
    fn inputs(self) -> &'static [&'static str] {
        match self {
            Self::LoraMoe => &["x", "weight", "lora_a", "lora_b", "router", "bias", "guidance"],
            Self::FreqSplit | Self::TokenLowpass => &["x"],
            Self::Attention => &["q", "k", "v", "q_norm", "k_norm", "rope_cos", "rope_sin"],
        }
    }

    /// The dtypes the op runs in (on every backend; the host backends and Cube widen 16-bit
    /// inputs to f32 inside, see the README). [`run`] dispatches exactly these.
    fn dtypes(self) -> &'static [Dtype] {
        match self {
            Self::LoraMoe => &[Dtype::F32, Dtype::Bf16],
            Self::FreqSplit | Self::TokenLowpass => &[Dtype::F32],
            Self::Attention => &[Dtype::F32, Dtype::Bf16, Dtype::F16],
        }
    }
}

/// The one dtype `--compute-dtype` and `--output-dtype` take (widening to it is exact).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WideDtype {
    /// 32-bit float.
    F32,
}

#[derive(Args)]
pub struct OpArgs {
    /// The op to run.
    op: OpName,
    /// Safetensors file holding the inputs by name (f32, bf16 or f16; one dtype for all inputs).
    #[arg(long)]
    input: PathBuf,
    /// Safetensors file to write the outputs to (in the dtype the op ran in).
    #[arg(long)]
    output: PathBuf,
    /// Widen the inputs to f32 and run the op in f32 (for ops without a 16-bit path, or to
    /// compare with it) [default: the inputs' dtype].
    #[arg(long, value_enum, value_name = "f32")]
    compute_dtype: Option<WideDtype>,
    /// Write the outputs as f32 [default: the dtype the op ran in].
    #[arg(long, value_enum, value_name = "f32")]
    output_dtype: Option<WideDtype>,
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
    /// lora-moe: router weight against the band-energy prior, from 0 to 1 [default: 0.5].
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
    /// freq-split: band edges, comma-separated, increasing from 0 to 1 [default: 0,0.15,0.35,0.45,0.9,1].
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

/// Reads the inputs, runs the op in their dtype (or f32 with `--compute-dtype f32`), writes the
/// outputs in that dtype (or f32 with `--output-dtype f32`).
///
/// # Errors
/// Bad flags, unreadable files, missing or mis-shaped tensors, inputs of mixed dtypes or of a
/// dtype the op does not run in, an unavailable backend.
pub fn run(args: OpArgs) -> Result<()> {
    args.reject_foreign_flags()?;
    let stored = TensorFile::read(&args.input)?;
    let file = if args.compute_dtype.is_some() { stored.widened() } else { stored };
    let op = args.op.name();
    let (dtype, first) = file.common_dtype(op, args.op.inputs())?;
    let device = Device::open(args.device)?;
    match (args.op, dtype) {
        (OpName::LoraMoe, Dtype::F32) => args.lora_moe::<f32>(&file, &device),
        (OpName::LoraMoe, Dtype::Bf16) => args.lora_moe::<bf16>(&file, &device),
        (OpName::Attention, Dtype::F32) => args.attention::<f32>(&file, &device),
        (OpName::Attention, Dtype::Bf16) => args.attention::<bf16>(&file, &device),
        (OpName::Attention, Dtype::F16) => args.attention::<f16>(&file, &device),
        (OpName::FreqSplit, Dtype::F32) => {
            let out = freq::freq_split(&device, file.require(op, "x")?, &args.freq_config())?;
            args.write(&[("low", &out.low), ("high", &out.high), ("band_energy", &out.band_energy)])
        }
        (OpName::TokenLowpass, Dtype::F32) => {
            let d = LoraMoeConfig::default();
            let (taps, sigma) = (args.taps.unwrap_or(d.taps), args.sigma.unwrap_or(d.sigma));
            let low = lora_moe::token_lowpass(&device, file.require(op, "x")?, taps, sigma)?;
            args.write(&[("low", &low)])
        }
        (name, dtype) => {
            let runs: Vec<&str> = name.dtypes().iter().map(|d| d.name()).collect();
            Err(FapeError::Dtype {
                op,
                tensor: first,
                dtype: dtype.name(),
                message: format!("but {op} runs in {} only (--compute-dtype f32 widens the inputs)", runs.join(", ")),
            })
        }
    }
}

impl OpArgs {
    fn lora_moe<T: LoraMoeDtype + Element>(&self, file: &TensorFile, device: &Device) -> Result<()> {
        let op = lora_moe::OP;
        let inputs = LoraMoeInputs::<T> {
            x: file.require(op, "x")?,
            weight: file.require(op, "weight")?,
            bias: file.optional(op, "bias")?,
            lora_a: file.require(op, "lora_a")?,
            lora_b: file.require(op, "lora_b")?,
            router: file.require(op, "router")?,
            guidance: file.optional(op, "guidance")?,
        };
        let out = lora_moe::lora_moe(device, &inputs, &self.lora_moe_config())?;
        self.write(&[("y", &out.y), ("gates", &out.gates)])
    }

    fn attention<T: AttentionElement + Element>(&self, file: &TensorFile, device: &Device) -> Result<()> {
        let op = attention::OP;
        let inputs = AttentionInputs::<T> {
            q_norm: file.optional(op, "q_norm")?,
            k_norm: file.optional(op, "k_norm")?,
            rope_cos: file.optional(op, "rope_cos")?,
            rope_sin: file.optional(op, "rope_sin")?,
            ..AttentionInputs::new(file.require(op, "q")?, file.require(op, "k")?, file.require(op, "v")?)
        };
        let out = attention::attention_typed(device, &inputs, &AttentionConfig { scale: self.scale })?;
        self.write(&[("out", &out)])
    }

    /// Writes `outputs` in their dtype, or as f32 with `--output-dtype f32`.
    fn write<T: Element>(&self, outputs: &[(&str, &Tensor<T>)]) -> Result<()> {
        match self.output_dtype {
            None => io::write(&self.output, outputs),
            Some(WideDtype::F32) => {
                let wide: Vec<(&str, Tensor<f32>)> =
                    outputs.iter().map(|(name, t)| (*name, t.map(|v| v.to_f64() as f32))).collect();
                let views: Vec<(&str, &Tensor<f32>)> = wide.iter().map(|(name, t)| (*name, t)).collect();
                io::write(&self.output, &views)
            }
        }
    }
}
