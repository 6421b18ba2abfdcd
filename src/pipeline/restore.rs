//! One image through the whole pipeline: planner, VAE encode, one transformer step, VAE decode.
//!
//! [`restore`] does, in order:
//! 1. **plan**: the built-in planner reads the image's pixel statistics and writes the plan line;
//! 2. **fit to the latent grid**: an image whose longer side exceeds the preset's
//!    [`Pipeline::max_side`] (1024 px for `flux-dev`, 512 for `tiny`) is first downscaled
//!    (triangle filter, aspect ratio kept); the result is padded at the bottom and right by mirror
//!    reflection (edge pixel not repeated, folded again for images smaller than the pad) to
//!    multiples of [`Pipeline::grid`] px (16: the VAE's 8x down times the transformer's 2x2
//!    patches, so the latent has even sides), and mapped from [0, 1] to [-1, 1];
//! 3. **VAE encode** to the normalised latent `[1, 16, H/8, W/8]`;
//! 4. **transformer**: the plan line is encoded to plan tokens and the latent takes one step from
//!    t = 0.3: `x0 = z - 0.3 v`;
//! 5. **VAE decode**, then the padding is cropped, values mapped back to [0, 1] (clamped), and a
//!    downscaled image is upscaled back to the input size (triangle filter), so the output always
//!    has the input's size.
//!
//! Each stage's time is measured on the host with a device synchronisation at its end; the upload
//! of the padded image counts to VAE encode, the download of the decoded one to VAE decode.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::imageops::{resize, FilterType};
use image::Rgb32FImage;

use super::vae::{Vae, VaeConfig, VAE_SUBFOLDER};
use crate::error::{config_error, FapeError, Result};

use super::flux::{one_step, ExecPath, FluxConfig, FluxTransformer, PlanEncoder};
use super::image::Image;
use super::planner::{plan, Plan};
use super::weights;

/// Pipeline presets and the longest image side each restores at full resolution.
const PRESET_MAX_SIDE: [(&str, usize); 2] = [("flux-dev", 1024), ("tiny", 512)];

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    /// A diffusers-style folder: `DIR/vae/*.safetensors` and `DIR/transformer/*.safetensors`.
    Dir(PathBuf),
    /// Seeded random weights of the preset's shapes: runs the pipeline, restores nothing.
    Synthetic(u64),
}

impl std::fmt::Display for WeightsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(dir) => write!(f, "{}", dir.display()),
            Self::Synthetic(seed) => write!(f, "synthetic weights (seed {seed})"),
        }
    }
}

/// The loaded models of one preset on one device.
pub struct Pipeline {
    preset: String,
    max_side: usize,
    weights: WeightsSource,
    vae: Vae,
    transformer: FluxTransformer,
    plan_encoder: PlanEncoder,
    device: Device,
    dtype: DType,
}

/// A candle or crate error as the crate's error, naming the stage it came from.
trait InStage<T> {
    fn in_stage(self, stage: &str) -> Result<T>;
}

impl<T> InStage<T> for candle_core::Result<T> {
    fn in_stage(self, stage: &str) -> Result<T> {
        self.map_err(|e| FapeError::Device { backend: "candle", context: stage.to_string(), message: e.to_string() })
    }
}

impl<T> InStage<T> for Result<T> {
    fn in_stage(self, _stage: &str) -> Result<T> {
        self
    }
}

/// A load error naming the weights it came from (`DIR/vae`, or the synthetic seed).
fn weights_error(weights: &WeightsSource, part: &str, err: candle_core::Error) -> FapeError {
    let path = match weights {
        WeightsSource::Dir(dir) => dir.join(part).display().to_string(),
        synthetic => format!("{synthetic}, {part}"),
    };
    FapeError::File { path, message: err.to_string() }
}

impl Pipeline {
    /// The preset names [`Pipeline::load`] accepts.
    pub fn presets() -> Vec<&'static str> {
        PRESET_MAX_SIDE.iter().map(|&(name, _)| name).collect()
    }

    /// Loads the VAE, transformer and plan encoder of `preset` (`flux-dev` or `tiny`) from
    /// `weights` onto `device` in `dtype`.
    ///
    /// # Errors
    /// [`FapeError::Config`] for an unknown preset; [`FapeError::Unsupported`] for a dtype other
    /// than f32 on the CPU (candle's CPU matmul has no bf16) or other than f32/bf16/f16;
    /// [`FapeError::File`] for a missing weights folder or a missing or mis-shaped tensor (naming
    /// the folder and the tensor).
    pub fn load(weights: WeightsSource, preset: &str, device: Device, dtype: DType) -> Result<Self> {
        let max_side =
            PRESET_MAX_SIDE.iter().find(|&&(name, _)| name == preset).map(|&(_, side)| side).ok_or_else(|| {
                let known = Self::presets().join(", ");
                config_error("restore", "preset", format!("`{preset}` is unknown (known: {known})"))
            })?;
        let backend = if device.is_cpu() { "cpu" } else { "cuda" };
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) || (device.is_cpu() && dtype != DType::F32) {
            let what = format!("dtype {dtype:?} (the CPU runs f32; CUDA runs f32, bf16 or f16)");
            return Err(FapeError::Unsupported { op: "restore", backend, what });
        }
        let vae_config = VaeConfig::preset(preset)?;
        let flux_config = FluxConfig::preset(preset)?;
        // The VAE loads completely before the transformer's folder is read, so that an error
        // names the first missing tensor in pipeline order.
        let var_builder = |subfolder: &str| -> Result<VarBuilder<'static>> {
            match &weights {
                WeightsSource::Dir(dir) => weights::load(dir, subfolder, dtype, &device),
                WeightsSource::Synthetic(seed) => Ok(weights::synthetic(*seed, dtype, &device)),
            }
        };
        let vae = Vae::load(var_builder(VAE_SUBFOLDER)?, &vae_config).map_err(|e| weights_error(&weights, "vae", e))?;
        let transformer_vb = var_builder("transformer")?;
        let transformer = FluxTransformer::load(transformer_vb.clone(), &flux_config)
            .map_err(|e| weights_error(&weights, "transformer", e))?;
        let plan_encoder =
            PlanEncoder::load(transformer_vb, &flux_config).map_err(|e| weights_error(&weights, "transformer", e))?;
        Ok(Self { preset: preset.to_string(), max_side, weights, vae, transformer, plan_encoder, device, dtype })
    }

    /// The preset's name.
    pub fn preset(&self) -> &str {
        &self.preset
    }

    /// Where the weights came from.
    pub fn weights(&self) -> &WeightsSource {
        &self.weights
    }

    /// The device everything runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The autoencoder.
    pub fn vae(&self) -> &Vae {
        &self.vae
    }

    /// Longest image side restored at full resolution; larger images are downscaled to it.
    pub fn max_side(&self) -> usize {
        self.max_side
    }

    /// Image sides are padded to multiples of this (VAE downscale times the 2x2 patch).
    pub fn grid(&self) -> usize {
        2 * self.vae.config().downscale()
    }
}

/// Sizes an image passes through, each `(height, width)` in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// The input image.
    pub input: (usize, usize),
    /// After downscaling to the longest side allowed (equal to `input` when it fits).
    pub work: (usize, usize),
    /// `work` padded up to multiples of the grid: what the VAE encodes.
    pub padded: (usize, usize),
}

impl Geometry {
    /// The sizes for a `height x width` image, a longest side `max_side` and a `grid` multiple.
    /// A downscaled side is rounded to the nearest pixel, at least 1.
    pub fn new(height: usize, width: usize, max_side: usize, grid: usize) -> Self {
        let longest = height.max(width);
        let work = if longest > max_side {
            let scale = |side: usize| ((side * max_side) as f64 / longest as f64).round().max(1.0) as usize;
            (scale(height), scale(width))
        } else {
            (height, width)
        };
        let up = |side: usize| side.div_ceil(grid).max(1) * grid;
        Self { input: (height, width), work, padded: (up(work.0), up(work.1)) }
    }

    /// The latent's spatial size for the VAE's `downscale`.
    pub fn latent(&self, downscale: usize) -> (usize, usize) {
        (self.padded.0 / downscale, self.padded.1 / downscale)
    }
}

/// The time of each stage of one [`restore`], each ending with a device synchronisation.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StageTimings {
    /// The planner: pixel statistics and the plan line.
    pub planner: Duration,
    /// Upload of the padded image and the VAE encoder.
    pub vae_encode: Duration,
    /// Plan tokens and the one transformer step.
    pub transformer: Duration,
    /// The VAE decoder and the download of the decoded image.
    pub vae_decode: Duration,
}

impl StageTimings {
    /// The stage names, in order, as [`StageTimings::stages`] pairs them.
    pub const NAMES: [&'static str; 4] = ["planner", "vae-encode", "transformer", "vae-decode"];

    /// `(name, time)` of each stage, in pipeline order.
    pub fn stages(&self) -> [(&'static str, Duration); 4] {
        let [p, e, t, d] = Self::NAMES;
        [(p, self.planner), (e, self.vae_encode), (t, self.transformer), (d, self.vae_decode)]
    }

    /// The sum of the stages.
    pub fn total(&self) -> Duration {
        self.planner + self.vae_encode + self.transformer + self.vae_decode
    }
}

/// The highest memory use seen, and what was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeakMemory {
    /// CUDA device memory in use (total minus free, all processes), sampled after every stage:
    /// a lower bound on the true peak inside a stage.
    CudaDeviceUsed { bytes: u64 },
    /// The process's peak resident set size (`VmHWM` of `/proc/self/status`) since it started:
    /// what a CPU run reports, host memory, not a device's.
    HostHighWater { bytes: u64 },
    /// Nothing could be measured here (no `/proc`, or the driver query failed).
    Unknown,
}

impl PeakMemory {
    /// The larger of two readings of the same kind (`self` when they differ in kind).
    pub fn max(self, other: Self) -> Self {
        match (self, other) {
            (Self::CudaDeviceUsed { bytes: a }, Self::CudaDeviceUsed { bytes: b }) => {
                Self::CudaDeviceUsed { bytes: a.max(b) }
            }
            (Self::HostHighWater { bytes: a }, Self::HostHighWater { bytes: b }) => {
                Self::HostHighWater { bytes: a.max(b) }
            }
            (Self::Unknown, other) => other,
            (this, _) => this,
        }
    }
}

impl std::fmt::Display for PeakMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        match self {
            Self::CudaDeviceUsed { bytes } => {
                write!(f, "peak device memory {:.1} MiB (CUDA total - free, sampled after each stage)", mib(*bytes))
            }
            Self::HostHighWater { bytes } => {
                write!(f, "peak memory {:.1} MiB (CPU run: process peak resident set, VmHWM)", mib(*bytes))
            }
            Self::Unknown => write!(f, "peak memory unknown (no CUDA memory query or /proc/self/status here)"),
        }
    }
}

/// Reads the current reading of `device`'s memory: CUDA used bytes, or the host's VmHWM.
fn sample_memory(device: &Device) -> PeakMemory {
    #[cfg(feature = "candle-cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        return match cuda.cuda_stream().context().mem_get_info() {
            Ok((free, total)) => PeakMemory::CudaDeviceUsed { bytes: (total - free) as u64 },
            Err(_) => PeakMemory::Unknown,
        };
    }
    if !device.is_cpu() {
        return PeakMemory::Unknown;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(PeakMemory::Unknown, |kib| PeakMemory::HostHighWater { bytes: kib * 1024 })
}

/// What [`restore`] returns.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The restored image, the input's size, values in [0, 1].
    pub image: Image,
    /// The planner's plan.
    pub plan: Plan,
    /// Sizes the image went through.
    pub geometry: Geometry,
    /// Time per stage.
    pub timings: StageTimings,
    /// Peak memory over the run.
    pub peak_memory: PeakMemory,
}

/// Runs `f`, synchronises `device`, and returns `f`'s value with the elapsed time; memory is
/// sampled into `peak` afterwards.
fn timed<T>(
    device: &Device,
    stage: &str,
    peak: &mut PeakMemory,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Duration)> {
    let start = Instant::now();
    let value = f()?;
    device.synchronize().in_stage(stage)?;
    let elapsed = start.elapsed();
    *peak = peak.max(sample_memory(device));
    Ok((value, elapsed))
}

/// `image` as an interleaved f32 RGB buffer (what the `image` crate resizes).
fn interleaved(image: &Image) -> Option<Rgb32FImage> {
    let plane = image.width * image.height;
    let data = (0..plane).flat_map(|i| (0..3).map(move |c| image.data[c * plane + i])).collect();
    Rgb32FImage::from_raw(u32::try_from(image.width).ok()?, u32::try_from(image.height).ok()?, data)
}

fn planar(buffer: &Rgb32FImage) -> Image {
    let pixels = buffer.as_raw();
    let data = (0..3).flat_map(|c| pixels.iter().skip(c).step_by(3).copied()).collect();
    Image { width: buffer.width() as usize, height: buffer.height() as usize, data }
}

/// `image` resized to `height x width` with the triangle filter (area-averaging when shrinking).
fn resized(image: &Image, height: usize, width: usize) -> Result<Image> {
    let too_large = || config_error("restore", "image", format!("{}x{} is too large", image.width, image.height));
    let buffer = interleaved(image).ok_or_else(too_large)?;
    let (w, h) = (u32::try_from(width).map_err(|_| too_large())?, u32::try_from(height).map_err(|_| too_large())?);
    Ok(planar(&resize(&buffer, w, h, FilterType::Triangle)))
}

/// Index `i` of a padded axis mapped into `0..n` by mirror reflection without repeating the edge
/// (numpy's `reflect`), folded again as often as needed; `n = 1` maps everything to 0.
fn reflect(i: usize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let r = i % period;
    if r < n {
        r
    } else {
        period - r
    }
}

/// `image` (`work` size) reflect-padded at the bottom and right to `padded`, mapped to [-1, 1]:
/// planar `[3, ph, pw]` values.
fn padded_signed(image: &Image, (ph, pw): (usize, usize)) -> Vec<f32> {
    let (h, w) = (image.height, image.width);
    let mut out = Vec::with_capacity(3 * ph * pw);
    for c in 0..3 {
        for y in 0..ph {
            let row = (c * h + reflect(y, h)) * w;
            out.extend((0..pw).map(|x| image.data[row + reflect(x, w)] * 2.0 - 1.0));
        }
    }
    out
}

/// Checks that `image` holds `3 * height * width` values of a non-empty image.
fn validate(image: &Image) -> Result<()> {
    let needed = image.width.checked_mul(image.height).and_then(|n| n.checked_mul(3)).unwrap_or(usize::MAX);
    if image.width == 0 || image.height == 0 || image.data.len() != needed {
        return Err(FapeError::Layout {
            op: "restore",
            tensor: "image",
            len: image.data.len(),
            shape: vec![3, image.height, image.width],
            needed,
        });
    }
    Ok(())
}

/// What the VAE encodes for `image`: the [`Geometry`] for a longest side `max_side` and a
/// `grid` multiple, and the image downscaled to `geometry.work` when it is larger, reflect-padded
/// to `geometry.padded` and mapped to [-1, 1], planar `[3, ph, pw]` (steps 1 and 2 of the module
/// docs).
///
/// # Errors
/// [`FapeError::Layout`] for an empty image or one whose data does not match its size;
/// [`FapeError::Config`] when `max_side` or `grid` is 0, or an extent is too large to resize.
pub fn vae_input(image: &Image, max_side: usize, grid: usize) -> Result<(Geometry, Vec<f32>)> {
    validate(image)?;
    if max_side == 0 || grid == 0 {
        return Err(config_error("restore", "max_side/grid", format!("must be positive, got {max_side} / {grid}")));
    }
    let geometry = Geometry::new(image.height, image.width, max_side, grid);
    let signed = if geometry.work == geometry.input {
        padded_signed(image, geometry.padded)
    } else {
        padded_signed(&resized(image, geometry.work.0, geometry.work.1)?, geometry.padded)
    };
    Ok((geometry, signed))
}

/// Restores `image` (any size) with `pipeline` along the transformer's `path`: see the module
/// docs for the stages and how sizes are handled.
///
/// # Errors
/// [`FapeError::Layout`] for an empty image or one whose data does not match its size; the
/// planner's errors; [`FapeError::Device`] naming the stage for a candle failure.
pub fn restore(image: &Image, pipeline: &Pipeline, path: ExecPath) -> Result<Restored> {
    validate(image)?;
    let device = &pipeline.device;
    let mut peak = PeakMemory::Unknown;
    let (plan, planner_time) = timed(device, "planner", &mut peak, || plan(image))?;

    let (geometry, signed) = vae_input(image, pipeline.max_side, pipeline.grid())?;
    let (ph, pw) = geometry.padded;

    let (latent, encode_time) = timed(device, "vae-encode", &mut peak, || {
        let x = Tensor::from_vec(signed, (1, 3, ph, pw), device).and_then(|t| t.to_dtype(pipeline.dtype));
        x.and_then(|x| pipeline.vae.encode(&x)).in_stage("vae-encode")
    })?;
    let (restored, transformer_time) = timed(device, "transformer", &mut peak, || {
        let tokens = pipeline.plan_encoder.encode(&plan.line(), device).in_stage("plan encoder")?;
        let x0 = one_step(&pipeline.transformer, &latent, &tokens, path).in_stage("transformer")?;
        if x0.dims() != latent.dims() {
            let expected = format!("{:?} (the latent's shape)", latent.dims());
            return Err(FapeError::Shape {
                op: "restore",
                tensor: "transformer output",
                expected,
                actual: x0.dims().to_vec(),
            });
        }
        Ok(x0)
    })?;
    let (decoded, decode_time) = timed(device, "vae-decode", &mut peak, || {
        let x = pipeline.vae.decode(&restored).in_stage("vae-decode")?;
        x.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).in_stage("vae-decode")
    })?;

    let (wh, ww) = geometry.work;
    let mut data = Vec::with_capacity(3 * wh * ww);
    for c in 0..3 {
        for y in 0..wh {
            let row = (c * ph + y) * pw;
            data.extend(decoded[row..row + ww].iter().map(|v| ((v + 1.0) * 0.5).clamp(0.0, 1.0)));
        }
    }
    let cropped = Image { width: ww, height: wh, data };
    let output = if geometry.work == geometry.input { cropped } else { resized(&cropped, image.height, image.width)? };
    let timings = StageTimings {
        planner: planner_time,
        vae_encode: encode_time,
        transformer: transformer_time,
        vae_decode: decode_time,
    };
    Ok(Restored { image: output, plan, geometry, timings, peak_memory: peak })
}

/// A deterministic `width x height` test scene with content at every scale: a smooth colour
/// gradient, a few discs with hard edges, a patch of fine stripes and seeded pixel noise.
pub fn test_scene(width: usize, height: usize, seed: u64) -> Image {
    use rand::Rng;
    let mut rng = crate::testing::rng(seed);
    let plane = width * height;
    let mut data = vec![0.0f32; 3 * plane];
    let discs =
        [(0.3, 0.35, 0.18, [0.9, 0.2, 0.1]), (0.7, 0.6, 0.22, [0.1, 0.5, 0.9]), (0.45, 0.8, 0.1, [0.95, 0.9, 0.2])];
    for y in 0..height {
        for x in 0..width {
            let (u, v) = ((x as f32 + 0.5) / width as f32, (y as f32 + 0.5) / height as f32);
            let mut rgb = [0.2 + 0.6 * u, 0.3 + 0.4 * v, 0.6 - 0.4 * u * v];
            for &(cx, cy, r, colour) in &discs {
                if (u - cx).powi(2) + (v - cy).powi(2) < r * r {
                    rgb = colour;
                }
            }
            if u > 0.75 && v < 0.3 {
                let stripe = if (x / 2) % 2 == 0 { 0.85 } else { 0.15 };
                rgb = [stripe; 3];
            }
            for (c, value) in rgb.iter().enumerate() {
                data[c * plane + y * width + x] = (value + rng.random_range(-0.04f32..0.04)).clamp(0.0, 1.0);
            }
        }
    }
    Image { width, height, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_fits_small_and_large_images() {
        let g = Geometry::new(37, 50, 512, 16);
        assert_eq!((g.work, g.padded, g.latent(8)), ((37, 50), (48, 64), (6, 8)));
        let g = Geometry::new(2000, 1000, 1024, 16);
        assert_eq!((g.work, g.padded), ((1024, 512), (1024, 512)));
        let g = Geometry::new(1, 3000, 1024, 16);
        assert_eq!((g.work, g.padded), ((1, 1024), (16, 1024)));
    }

    #[test]
    fn reflect_mirrors_without_repeating_the_edge_and_folds() {
        let got: Vec<usize> = (0..9).map(|i| reflect(i, 3)).collect();
        assert_eq!(got, [0, 1, 2, 1, 0, 1, 2, 1, 0]);
        assert!((0..40).all(|i| reflect(i, 1) == 0));
    }

    #[test]
    fn padding_reflects_and_maps_to_signed_range() {
        let image = Image { width: 3, height: 2, data: (0..18).map(|i| i as f32 / 17.0).collect() };
        let padded = padded_signed(&image, (4, 5));
        let src = |c: usize, y: usize, x: usize| image.data[(c * 2 + y) * 3 + x] * 2.0 - 1.0;
        for c in 0..3 {
            for (y, sy) in [0, 1, 0, 1].into_iter().enumerate() {
                for (x, sx) in [0, 1, 2, 1, 0].into_iter().enumerate() {
                    assert_eq!(padded[(c * 4 + y) * 5 + x], src(c, sy, sx), "c{c} y{y} x{x}");
                }
            }
        }
    }

    #[test]
    fn interleaving_round_trips() {
        let scene = test_scene(7, 5, 3);
        let back = planar(&interleaved(&scene).expect("fits"));
        assert_eq!((back.width, back.height, back.data), (scene.width, scene.height, scene.data));
    }
}
