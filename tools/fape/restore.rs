//! `fape restore IN -o OUT`: one image through the whole pipeline (planner, VAE, one transformer
//! step), or every image of a folder (`fape restore DIR -o OUT_DIR`, see [`crate::batch`]), and
//! the pipeline flags `fape bench e2e` shares.

use std::path::PathBuf;

use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use fape_kernels::pipeline::flux::ExecPath;
use fape_kernels::pipeline::restore::{restore, Pipeline, WeightsSource};
use fape_kernels::{FapeError, Result};

use crate::batch::{self, Shard};
use crate::image_limit::ImageLimitArgs;

/// Where the pipeline runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA device 0 when candle was built with CUDA (feature `candle-cuda`) and one is present,
    /// else the CPU.
    Auto,
    /// The CPU (f32).
    Cpu,
    /// CUDA device 0 (needs the `candle-cuda` build).
    Cuda,
}

/// Weights and activations dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// 32-bit float (the only dtype on the CPU).
    F32,
    /// bfloat16 (CUDA).
    Bf16,
}

/// The transformer's execution path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PathArg {
    /// This crate's fused kernels.
    Fused,
    /// Plain candle ops.
    Reference,
}

impl From<PathArg> for ExecPath {
    fn from(path: PathArg) -> Self {
        match path {
            PathArg::Fused => ExecPath::Fused,
            PathArg::Reference => ExecPath::Reference,
        }
    }
}

/// The flags that choose and load a pipeline.
#[derive(Args)]
pub struct PipelineArgs {
    /// Diffusers-style weights folder (`DIR/vae`, `DIR/transformer`).
    #[arg(long, value_name = "DIR", conflicts_with = "synthetic")]
    pub weights: Option<PathBuf>,
    /// Seeded random weights: runs the pipeline, restores nothing.
    #[arg(long, value_name = "SEED")]
    pub synthetic: Option<u64>,
    /// Model sizes: flux-dev or tiny.
    #[arg(long, default_value = "flux-dev")]
    pub preset: String,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Weights and activations dtype [default: bf16 on CUDA, f32 on the CPU].
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// The size limit of the images read.
    #[command(flatten)]
    pub images: ImageLimitArgs,
}

impl PipelineArgs {
    /// The weights asked for, or synthetic seed 0 when `default_synthetic` and none was given.
    ///
    /// # Errors
    /// [`FapeError::Config`] when neither `--weights` nor `--synthetic` was given and there is no
    /// default.
    pub fn weights_source(&self, default_synthetic: bool) -> Result<WeightsSource> {
        match (&self.weights, self.synthetic) {
            (Some(dir), _) => Ok(WeightsSource::Dir(dir.clone())),
            (None, Some(seed)) => Ok(WeightsSource::Synthetic(seed)),
            (None, None) if default_synthetic => Ok(WeightsSource::Synthetic(0)),
            (None, None) => Err(FapeError::Config {
                op: "restore",
                field: "weights",
                message: "missing: give --weights DIR or --synthetic SEED".into(),
            }),
        }
    }

    /// Opens the device asked for.
    ///
    /// # Errors
    /// [`FapeError::BackendUnavailable`] when `--device cuda` cannot be opened.
    pub fn device(&self) -> Result<Device> {
        let unavailable = |e: candle_core::Error| FapeError::BackendUnavailable {
            backend: "cuda",
            reason: format!("candle cannot open CUDA device 0 (build with --features candle-cuda): {e}"),
        };
        match self.device {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda => Device::new_cuda(0).map_err(unavailable),
            DeviceArg::Auto => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        }
    }

    /// Loads the pipeline (see [`Pipeline::load`]).
    ///
    /// # Errors
    /// As [`PipelineArgs::weights_source`], [`PipelineArgs::device`] and [`Pipeline::load`].
    pub fn load(&self, default_synthetic: bool) -> Result<Pipeline> {
        let weights = self.weights_source(default_synthetic)?;
        let device = self.device()?;
        let dtype = match (self.dtype, device.is_cpu()) {
            (Some(DtypeArg::F32), _) | (None, true) => DType::F32,
            (Some(DtypeArg::Bf16), _) | (None, false) => DType::BF16,
        };
        Pipeline::load(weights, &self.preset, device, dtype)
    }
}

/// The note printed whenever the weights are synthetic.
pub fn synthetic_note(weights: &WeightsSource) -> Option<String> {
    match weights {
        WeightsSource::Synthetic(seed) => Some(format!(
            "NOTE: synthetic weights (seed {seed}): the output is NOT a restoration, only the pipeline run on random weights"
        )),
        WeightsSource::Dir(_) => None,
    }
}

/// A device's name for tables and messages.
fn device_label(device: &Device) -> &'static str {
    if device.is_cpu() {
        "cpu"
    } else {
        "cuda"
    }
}

/// Arguments of `fape restore`.
#[derive(Args)]
pub struct RestoreArgs {
    /// Input image (PNG, JPEG or TIFF; any size; alpha and 16-bit handled by the image loader),
    /// or a folder: every image directly in it, sorted by name.
    input: PathBuf,
    /// Output image, the format following the extension (.png, .jpg/.jpeg, .tif/.tiff); for a
    /// folder input, the output folder (created if missing; outputs keep the input file names,
    /// and existing ones are skipped, so a rerun resumes).
    #[arg(short, long)]
    output: PathBuf,
    /// With a folder input: take only file k of the sorted list where k mod N = I (0 <= I < N),
    /// so N processes (a SLURM or Kubernetes job array) share a folder with no coordinator.
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// The transformer's execution path.
    #[arg(long, value_enum, default_value_t = PathArg::Fused)]
    path: PathArg,
}

/// Restores one image and writes it, printing the plan and the stage times; or, for a folder,
/// every image of it ([`batch::run`]).
///
/// # Errors
/// Unreadable input, bad flags, missing weights, an unavailable device, a failed write;
/// `--shard` with a single image; for a folder, the errors of [`batch::run`].
pub fn run(args: RestoreArgs) -> Result<()> {
    if args.input.is_dir() {
        return batch::run(&args.input, &args.output, args.shard, &args.pipeline, args.path.into());
    }
    if let Some(shard) = args.shard {
        return Err(FapeError::Config {
            op: "restore",
            field: "shard",
            message: format!("{shard} applies to a folder input, and {} is not a folder", args.input.display()),
        });
    }
    if !batch::has_image_extension(&args.output) {
        return Err(FapeError::File {
            path: args.output.display().to_string(),
            message: "output must end in .png, .jpg, .jpeg, .tif or .tiff".into(),
        });
    }
    let image = args.pipeline.images.load(&args.input)?;
    let pipeline = args.pipeline.load(false)?;
    let note = synthetic_note(pipeline.weights());
    if let Some(note) = &note {
        println!("{note}");
    }
    let restored = restore(&image, &pipeline, args.path.into())?;
    restored.image.save(&args.output)?;
    let g = restored.geometry;
    let latent = g.latent(pipeline.vae().config().downscale());
    println!("plan: {}", restored.plan.line());
    println!(
        "{} {}x{} -> work {}x{} -> padded {}x{} -> latent {}x{}; preset {}, {} {:?}",
        args.input.display(),
        g.input.1,
        g.input.0,
        g.work.1,
        g.work.0,
        g.padded.1,
        g.padded.0,
        latent.1,
        latent.0,
        pipeline.preset(),
        device_label(pipeline.device()),
        pipeline.dtype()
    );
    for (stage, time) in restored.timings.stages() {
        println!("{stage:<12} {:>10.1} ms", time.as_secs_f64() * 1e3);
    }
    println!("{}", restored.peak_memory);
    println!("wrote {}", args.output.display());
    if let Some(note) = note {
        println!("{note}");
    }
    Ok(())
}
