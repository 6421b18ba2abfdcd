//! TEMPORARY STAND-INS, deleted at merge: minimal versions of the APIs that other branches
//! provide (`pipeline::image`, `pipeline::planner`, `pipeline::flux`, `pipeline::weights`), so that
//! this branch builds and [`super::restore`] runs end to end. They do not restore anything:
//! the plan is a constant line, the "transformer" predicts zero velocity (so the step returns its
//! input latent), and synthetic weights come from candle's unseeded `VarMap` initialiser.
//! `restore.rs` imports them through the `use super::standin::...` lines at its top, which become
//! `use super::{image, planner, flux, weights}::...` at merge.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::error::{config_error, FapeError, Result};

fn file_error(path: &Path, message: impl Into<String>) -> FapeError {
    FapeError::File { path: path.display().to_string(), message: message.into() }
}

/// Stand-in for `pipeline::image::Image`: planar RGB `[3, height, width]` in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Planar RGB, `3 * height * width` values in [0, 1].
    pub data: Vec<f32>,
}

impl Image {
    /// Reads a PNG/JPEG/TIFF file (any bit depth; alpha is dropped).
    ///
    /// # Errors
    /// [`FapeError::File`] for unreadable, non-image or zero-size files.
    pub fn load(path: &Path) -> Result<Self> {
        let decoded = image::open(path).map_err(|e| file_error(path, format!("cannot read image: {e}")))?;
        let rgb = decoded.to_rgb32f();
        let (width, height) = (rgb.width() as usize, rgb.height() as usize);
        if width == 0 || height == 0 {
            return Err(file_error(path, format!("image is empty ({width}x{height})")));
        }
        let pixels = rgb.into_raw();
        let data = (0..3).flat_map(|c| pixels.iter().skip(c).step_by(3).copied()).collect();
        Ok(Self { width, height, data })
    }

    /// Writes the image as 8-bit RGB, the format chosen by the file extension.
    ///
    /// # Errors
    /// [`FapeError::File`] for an unknown extension or a failed write.
    pub fn save(&self, path: &Path) -> Result<()> {
        let plane = self.width * self.height;
        let bytes: Vec<u8> = (0..plane)
            .flat_map(|i| (0..3).map(move |c| i + c * plane))
            .map(|i| (self.data[i].clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        let buffer = image::RgbImage::from_raw(self.width as u32, self.height as u32, bytes)
            .ok_or_else(|| file_error(path, "image buffer does not match its size"))?;
        buffer.save(path).map_err(|e| file_error(path, format!("cannot write image: {e}")))
    }
}

/// Stand-in for `pipeline::planner::Plan`.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    line: String,
}

impl Plan {
    /// The plan line.
    pub fn line(&self) -> String {
        self.line.clone()
    }
}

/// Stand-in for `pipeline::planner::plan`: one constant plan line.
///
/// # Errors
/// Never (the real planner's signature).
pub fn plan(_image: &Image) -> Result<Plan> {
    Ok(Plan { line: "Task: denoise, Focus: high, Rationale: stand-in planner, Pipeline: one step".into() })
}

/// Stand-in for `pipeline::flux::ExecPath`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecPath {
    /// Plain candle ops.
    Reference,
    /// This crate's fused kernels.
    Fused,
}

/// Stand-in for `pipeline::flux::FluxConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct FluxConfig {
    /// Latent channels the transformer reads.
    pub latent_channels: usize,
}

impl FluxConfig {
    /// The preset called `name` (`flux-dev` or `tiny`).
    ///
    /// # Errors
    /// [`FapeError::Config`] for an unknown name.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "flux-dev" | "tiny" => Ok(Self { latent_channels: 16 }),
            other => Err(config_error("flux", "preset", format!("`{other}` is unknown (known: flux-dev, tiny)"))),
        }
    }
}

/// Stand-in for `pipeline::flux::PlanTokens`.
#[derive(Debug, Clone)]
pub struct PlanTokens;

/// Stand-in for `pipeline::flux::PlanEncoder`.
#[derive(Debug, Clone)]
pub struct PlanEncoder;

impl PlanEncoder {
    /// Loads nothing.
    ///
    /// # Errors
    /// Never (the real signature).
    pub fn load(_vb: VarBuilder, _cfg: &FluxConfig) -> candle_core::Result<Self> {
        Ok(Self)
    }

    /// No tokens.
    ///
    /// # Errors
    /// Never (the real signature).
    pub fn encode(&self, _plan_line: &str, _device: &Device) -> candle_core::Result<PlanTokens> {
        Ok(PlanTokens)
    }
}

/// Stand-in for `pipeline::flux::FluxTransformer`: predicts zero velocity.
#[derive(Debug, Clone)]
pub struct FluxTransformer;

impl FluxTransformer {
    /// Loads nothing.
    ///
    /// # Errors
    /// Never (the real signature).
    pub fn load(_vb: VarBuilder, _cfg: &FluxConfig) -> candle_core::Result<Self> {
        Ok(Self)
    }

    /// Zero velocity of the latent's shape.
    ///
    /// # Errors
    /// A candle error from allocating it.
    pub fn forward(&self, latent: &Tensor, _: &PlanTokens, _: f64, _: ExecPath) -> candle_core::Result<Tensor> {
        latent.zeros_like()
    }
}

/// Stand-in for `pipeline::flux::one_step`: `x0 = z - 0.3 v` with `v` predicted at t = 0.3.
///
/// # Errors
/// A candle error from the transformer.
pub fn one_step(
    transformer: &FluxTransformer,
    latent: &Tensor,
    plan: &PlanTokens,
    path: ExecPath,
) -> candle_core::Result<Tensor> {
    latent - (transformer.forward(latent, plan, 0.3, path)? * 0.3)?
}

/// Stand-in for `pipeline::weights`: every `*.safetensors` file of `dir/subfolder`.
///
/// # Errors
/// [`FapeError::File`] when the folder is missing, holds no safetensors file, or one is unreadable.
pub fn dir_var_builder(dir: &Path, subfolder: &str, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let folder = dir.join(subfolder);
    let entries = std::fs::read_dir(&folder).map_err(|e| file_error(&folder, format!("cannot list weights: {e}")))?;
    let mut tensors = std::collections::HashMap::new();
    for entry in entries {
        let path = entry.map_err(|e| file_error(&folder, e.to_string()))?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let loaded = candle_core::safetensors::load(&path, device).map_err(|e| file_error(&path, e.to_string()))?;
            tensors.extend(loaded);
        }
    }
    if tensors.is_empty() {
        return Err(file_error(&folder, "no tensors in *.safetensors files"));
    }
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

/// Stand-in for `pipeline::weights`' synthetic backend: candle's `VarMap` initialisers (NOT
/// seeded by `seed`: candle's CPU generator cannot be seeded).
pub fn synthetic_var_builder(_seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_varmap(&VarMap::new(), dtype, device)
}
