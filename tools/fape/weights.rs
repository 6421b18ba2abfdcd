//! `fape weights synth`: seeded synthetic executor weights written as safetensors files
//! (layout and values in `fape_kernels::pipeline::weights`).

use std::path::PathBuf;

use candle_core::DType;
use clap::{Args, Subcommand, ValueEnum};
use fape_kernels::pipeline::flux::{self, FluxConfig, TRANSFORMER_SUBFOLDER};
use fape_kernels::pipeline::vae::{self, VaeConfig, VAE_SUBFOLDER};
use fape_kernels::pipeline::weights::{write_synthetic, DEFAULT_SHARD_BYTES};
use fape_kernels::{FapeError, Result};

/// Arguments of `fape weights`.
#[derive(Args)]
pub struct WeightsArgs {
    #[command(subcommand)]
    command: WeightsCommand,
}

#[derive(Subcommand)]
enum WeightsCommand {
    /// Write seeded synthetic weights to OUT/transformer/ and, for a preset, OUT/vae/ (with progress bars).
    Synth(SynthArgs),
}

/// The dtypes synthetic weights are written in.
#[derive(Clone, Copy, ValueEnum)]
enum WeightDtype {
    Bf16,
    F32,
}

#[derive(Args)]
struct SynthArgs {
    /// The executor preset: flux-dev or tiny.
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    preset: Option<String>,
    /// A JSON executor config instead of a preset (format in `FluxConfig::from_file`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A JSON autoencoder config (format in `VaeConfig::from_file`): writes OUT/vae/ from it.
    #[arg(long)]
    vae_config: Option<PathBuf>,
    /// The weights directory: the files go to OUT/transformer/ and OUT/vae/.
    #[arg(long)]
    out: PathBuf,
    /// The seed of the synthetic values.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The stored dtype (`fape restore` on the CPU loads f32 weights: the loader never converts).
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: WeightDtype,
    /// The largest shard in GiB (bigger models get several files and an index).
    #[arg(long, default_value_t = (DEFAULT_SHARD_BYTES >> 30) as f64)]
    shard_gib: f64,
}

/// Runs `fape weights`.
///
/// # Errors
/// An unknown preset, an invalid or oversized config file, an invalid shard size, or a file that cannot be written.
pub fn run(args: WeightsArgs) -> Result<()> {
    let WeightsCommand::Synth(args) = args.command;
    let cfg = match (&args.preset, &args.config) {
        (_, Some(path)) => FluxConfig::from_file(path)?,
        (Some(name), None) => FluxConfig::preset(name)?,
        (None, None) => FluxConfig::preset("")?,
    };
    if !(args.shard_gib.is_finite() && args.shard_gib > 0.0) {
        let message = format!("must be a positive number of GiB, got {}", args.shard_gib);
        return Err(FapeError::Config { op: "weights", field: "shard-gib", message });
    }
    let dtype = match args.dtype {
        WeightDtype::Bf16 => DType::BF16,
        WeightDtype::F32 => DType::F32,
    };
    let shard_bytes = (args.shard_gib * (1u64 << 30) as f64) as u64;
    // A preset names both models; --config describes the transformer only, --vae-config the
    // autoencoder.
    let vae_config = match (&args.vae_config, &args.preset) {
        (Some(path), _) => Some(VaeConfig::from_file(path)?),
        (None, preset) => preset.as_deref().map(VaeConfig::preset).transpose()?,
    };
    let mut parts = vec![(cfg.name.clone(), TRANSFORMER_SUBFOLDER, flux::tensor_specs(&cfg)?)];
    if let Some(vae_config) = &vae_config {
        parts.push((format!("{} autoencoder", cfg.name), VAE_SUBFOLDER, vae::tensor_specs(vae_config)?));
    }
    for (what, subfolder, specs) in parts {
        let files = write_synthetic(&args.out, subfolder, &specs, args.seed, dtype, shard_bytes, true)?;
        let parameters: u64 = specs.iter().map(|s| s.elements() as u64).sum();
        println!(
            "{what}: {} tensors, {parameters} parameters as {dtype:?} (seed {}) in {} file(s) under {}",
            specs.len(),
            args.seed,
            files.len(),
            args.out.join(subfolder).display()
        );
    }
    if vae_config.is_none() {
        println!("no autoencoder written: --config describes the transformer only (add --vae-config, or use --preset)");
    }
    Ok(())
}
