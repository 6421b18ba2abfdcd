//! FFT frequency masking: the low/high split and radial band energies of FAPE-IR's
//! frequency-aware path.
//!
//! For every image `x[b,c]` (`H x W`, any extents), with `X = fft2(x)`:
//!
//! - `rho(ky,kx) = sqrt(fy^2 + fx^2) / sqrt(0.5)`, where `fy = fftfreq(H)[ky]` and
//!   `fx = fftfreq(W)[kx]` exactly as `numpy.fft.fftfreq` spells them, so `rho = 0` at DC and
//!   `1` at the Nyquist corner;
//! - the mask `M` is `[rho <= cutoff]` ([`MaskKind::Hard`]) or `exp(-rho^2 / (2 cutoff^2))`
//!   ([`MaskKind::Gaussian`]);
//! - `low = real(ifft2(X * M))`, `high = x - low`;
//! - `band_energy[b,c,i] = sum |X|^2 / (H W)` over bins with `edges[i] <= rho < edges[i+1]`,
//!   the last band closed at its top, so with edges covering `[0,1]` the bands sum to
//!   `sum x^2` (Parseval).

pub(crate) mod candle;
mod check;
mod cpu;
#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "cuda")]
mod cuda;
mod hints;
pub mod reference;
mod spectrum;

use std::fmt;
use std::str::FromStr;

use crate::backend::Device;
use crate::error::{config_error, FapeError, Result};
use crate::tensor::{Tensor, View};

pub(crate) use check::check_rows;
#[cfg(feature = "cuda")]
pub use cuda::{CudaFftPath, CudaSplitBuffers, MAX_BANDS as CUDA_MAX_BANDS};
pub use hints::{band_energies_grey, BT601_LUMA};
pub use spectrum::{fft2_real, fftfreq, rho};

/// The op's name in errors and in the check table.
pub const OP: &str = "freq_split";

/// f32 tolerance (relative L2) of `low` and `high` against the f64 reference for images up to
/// 512 on a side. An f32 FFT's round-off grows like `eps * log2(n)`; `low` holds only a few
/// percent of the energy of a broadband image, so its relative error is that round-off
/// amplified by `||x|| / ||low||` (about 5x for the default cutoff). The CPU backend measures
/// about 2e-7 on `low` and 5e-8 on `high` from 7x5 to 1024x2048 on uniform inputs; 1e-5
/// leaves room for GPU FFTs' less careful twiddles. See [`tolerance_f32`] beyond 512.
pub const TOLERANCE_F32: f64 = 1e-5;

/// Tolerance (relative L2 over the `[B,C,nbands]` tensor) of f32 band energies. Backends sum
/// `|X|^2` in f64, so only the f32 spectrum's own round-off (relative `eps * log2(n)` per bin)
/// remains.
pub const BAND_ENERGY_TOLERANCE: f64 = 1e-5;

/// The f32 tolerance of `low`/`high` for an `h x w` image: [`TOLERANCE_F32`] up to 512 on the
/// longer side, scaled by `log2(n) / 9` beyond it, as FFT round-off grows with `log2(n)`.
pub fn tolerance_f32(h: usize, w: usize) -> f64 {
    let n = h.max(w).max(1) as f64;
    TOLERANCE_F32 * (n.log2() / 9.0).max(1.0)
}

/// The frequency mask's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskKind {
    /// `M = [rho <= cutoff]`.
    Hard,
    /// `M = exp(-rho^2 / (2 cutoff^2))`.
    Gaussian,
}

impl MaskKind {
    /// Every kind, in the order the check table lists them.
    pub const ALL: [MaskKind; 2] = [Self::Hard, Self::Gaussian];

    /// The lower-case name used on the command line and in the check table.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hard => "hard",
            Self::Gaussian => "gaussian",
        }
    }
}

impl fmt::Display for MaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MaskKind {
    type Err = FapeError;

    /// Parses `"hard"` or `"gaussian"`.
    ///
    /// # Errors
    /// [`FapeError::Config`] naming the field `mask` for any other string.
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| config_error(OP, "mask", format!("`{s}` is not one of hard, gaussian")))
    }
}

/// The split's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct FreqSplitConfig {
    /// Cutoff radius in normalised frequency (`rho`; 1 is the corner): the hard mask's edge or
    /// the Gaussian's standard deviation. Positive and finite; 1 or more keeps everything low
    /// under the hard mask.
    pub cutoff: f64,
    /// The mask's shape.
    pub mask: MaskKind,
    /// Band edges in `rho`: at least 2, strictly increasing, within `[0,1]`.
    pub edges: Vec<f64>,
}

impl Default for FreqSplitConfig {
    /// Cutoff 0.15, hard mask, edges `0, 0.15, 0.35, 0.45, 0.9, 1`.
    fn default() -> Self {
        Self { cutoff: 0.15, mask: MaskKind::Hard, edges: vec![0.0, 0.15, 0.35, 0.45, 0.9, 1.0] }
    }
}

impl FreqSplitConfig {
    /// The number of bands, `edges.len() - 1`.
    pub fn nbands(&self) -> usize {
        self.edges.len().saturating_sub(1)
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`FapeError::Config`] naming `cutoff` when it is not a positive finite number, or
    /// `edges` when there are fewer than 2, one is not finite or lies outside `[0,1]`, or they
    /// are not strictly increasing.
    pub fn validate(&self) -> Result<()> {
        if !(self.cutoff.is_finite() && self.cutoff > 0.0) {
            return Err(config_error(OP, "cutoff", format!("must be a positive finite number, got {}", self.cutoff)));
        }
        let edges = &self.edges;
        if edges.len() < 2 {
            return Err(config_error(OP, "edges", format!("needs at least 2 edges, got {}", edges.len())));
        }
        if let Some(e) = edges.iter().find(|e| !(0.0..=1.0).contains(*e)) {
            return Err(config_error(OP, "edges", format!("must lie within [0,1], got {e}")));
        }
        if let Some(i) = edges.windows(2).position(|w| w[0] >= w[1]) {
            return Err(config_error(
                OP,
                "edges",
                format!("must be strictly increasing, got {} then {}", edges[i], edges[i + 1]),
            ));
        }
        Ok(())
    }
}

/// What the split returns.
#[derive(Debug, Clone, PartialEq)]
pub struct FreqSplitOutput<T> {
    /// `[B,C,H,W]`: `real(ifft2(fft2(x) * M))`.
    pub low: Tensor<T>,
    /// `[B,C,H,W]`: `x - low`.
    pub high: Tensor<T>,
    /// `[B,C,nbands]`: `|X|^2 / (H W)` summed over each band's bins.
    pub band_energy: Tensor<T>,
}

impl<T> FreqSplitOutput<T> {
    /// The same output with every element of every tensor mapped through `f`.
    pub fn map<U>(&self, f: impl Fn(&T) -> U) -> FreqSplitOutput<U> {
        FreqSplitOutput { low: self.low.map(&f), high: self.high.map(&f), band_energy: self.band_energy.map(&f) }
    }
}

/// Extents of a validated input `[B,C,H,W]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FreqDims {
    /// Images times channels: the number of independent 2-D transforms.
    pub images: usize,
    pub height: usize,
    pub width: usize,
}

impl FreqDims {
    /// Pixels per image.
    pub fn pixels(self) -> usize {
        self.height * self.width
    }
}

/// Validates `x` (`[B,C,H,W]`, non-empty) and `config`; returns the extents.
pub(crate) fn validate<T>(x: &View<'_, T>, config: &FreqSplitConfig) -> Result<FreqDims> {
    validate_shape(x.shape(), config)
}

/// Validates the shape of `x` (`[B,C,H,W]`, non-empty) and `config`; returns the extents.
pub(crate) fn validate_shape(shape: &[usize], config: &FreqSplitConfig) -> Result<FreqDims> {
    let shape_error = |expected: &str| FapeError::Shape {
        op: OP,
        tensor: "x",
        expected: expected.to_string(),
        actual: shape.to_vec(),
    };
    let &[b, c, h, w] = shape else {
        return Err(shape_error("[B,C,H,W]"));
    };
    if shape.iter().product::<usize>() == 0 {
        return Err(shape_error("at least one element"));
    }
    config.validate()?;
    Ok(FreqDims { images: b * c, height: h, width: w })
}

/// Assembles the output tensors from flat buffers; `shape` is `x`'s `[B,C,H,W]`.
pub(crate) fn output<T>(
    shape: &[usize],
    nbands: usize,
    low: Vec<T>,
    high: Vec<T>,
    energy: Vec<T>,
) -> FreqSplitOutput<T> {
    FreqSplitOutput {
        low: Tensor { data: low, shape: shape.to_vec() },
        high: Tensor { data: high, shape: shape.to_vec() },
        band_energy: Tensor { data: energy, shape: vec![shape[0], shape[1], nbands] },
    }
}

/// The frequency split on `device`. `x`: `[B,C,H,W]` f32 (any `H`, `W` >= 1); returns `low`
/// and `high` `[B,C,H,W]` and `band_energy` `[B,C,nbands]`, all f32. NaN in `x` propagates to
/// its image's outputs.
///
/// # Errors
/// [`FapeError::Shape`] naming `x` when it is empty or not rank 4; [`FapeError::Config`] as
/// [`FreqSplitConfig::validate`]; [`FapeError::Unsupported`] on CUDA beyond `CUDA_MAX_BANDS` (16)
/// bands or, for sizes other than powers of two up to 4096, without libcufft, and on Cube and
/// CUDA for extents past 32-bit indexing.
pub fn freq_split(device: &Device, x: View<'_, f32>, config: &FreqSplitConfig) -> Result<FreqSplitOutput<f32>> {
    let dims = validate(&x, config)?;
    match device {
        Device::Reference => reference::freq_split(x, config).map(|out| out.map(|&v| v as f32)),
        Device::Cpu => Ok(cpu::freq_split(x, dims, config)),
        #[cfg(feature = "cube")]
        Device::Cube(d) => cube::freq_split(d, x, dims, config),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::freq_split(d, x, dims, config),
    }
}
