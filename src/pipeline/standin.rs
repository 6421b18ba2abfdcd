//! TEMPORARY STAND-INS, deleted at merge: minimal versions of the APIs that other branches
//! provide (`pipeline::image`, `pipeline::planner`, `pipeline::flux`, `pipeline::weights`), so that
//! this branch builds and [`super::restore`] runs end to end. They do not restore anything:
//! the plan is a constant line, the "transformer" predicts zero velocity (so the step returns its
//! input latent), and synthetic weights come from candle's unseeded `VarMap` initialiser.
//! `restore.rs` imports them through the `use super::standin::...` lines at its top, which become
//! `use super::{image, planner, flux, weights}::...` at merge.

use std::path::Path;

use crate::error::{FapeError, Result};

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
