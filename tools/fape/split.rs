//! `fape split`: the frequency split of an image made visible, written as three PNGs.

use std::path::PathBuf;

use clap::Args;
use fape_kernels::freq::{FreqSplitConfig, MaskKind};
use fape_kernels::pipeline::split::{split_images, HIGH_OFFSET};
use fape_kernels::{Device, DeviceKind, FapeError, Result};

use crate::image_limit::ImageLimitArgs;

#[derive(Args)]
pub struct SplitArgs {
    /// Image to split (PNG, JPEG or TIFF).
    input: PathBuf,
    /// Directory to write low.png, high.png and spectrum.png to (created if missing).
    #[arg(long)]
    out_dir: PathBuf,
    /// Normalised cutoff radius (1 is the Nyquist corner) [default: 0.15].
    #[arg(long)]
    cutoff: Option<f64>,
    /// Mask shape, hard or gaussian [default: hard].
    #[arg(long)]
    mask: Option<MaskKind>,
    /// The size limit of the image.
    #[command(flatten)]
    images: ImageLimitArgs,
    /// Backend to run the split on.
    #[arg(long, default_value = "cpu", value_name = "reference|cpu|cube|cuda")]
    device: DeviceKind,
}

/// Splits the image and writes `low.png` (the low-pass image), `high.png` (the high-pass image
/// plus 0.5, so zero is mid grey) and `spectrum.png` (the fftshifted log-magnitude spectrum of
/// the grey image, the cutoff in red).
///
/// # Errors
/// An unreadable or non-image input, an invalid cutoff, an unavailable backend, an output
/// directory that cannot be created or written.
pub fn run(args: SplitArgs) -> Result<()> {
    let image = args.images.load(&args.input)?;
    let d = FreqSplitConfig::default();
    let config = FreqSplitConfig { cutoff: args.cutoff.unwrap_or(d.cutoff), mask: args.mask.unwrap_or(d.mask), ..d };
    let device = Device::open(args.device)?;
    let split = split_images(&device, &image, &config)?;
    std::fs::create_dir_all(&args.out_dir).map_err(|e| FapeError::File {
        path: args.out_dir.display().to_string(),
        message: format!("cannot create directory: {e}"),
    })?;
    for (name, image) in [("low.png", &split.low), ("high.png", &split.high), ("spectrum.png", &split.spectrum)] {
        let path = args.out_dir.join(name);
        image.save(&path)?;
        println!("wrote {}", path.display());
    }
    println!(
        "(cutoff {} {} mask on {}; high shown as high + {HIGH_OFFSET})",
        config.cutoff,
        config.mask,
        device.kind()
    );
    Ok(())
}
