//! The token-axis Gaussian low-pass of the LoRA-MoE band split, as an op of its own:
//! `low[b,t,c] = sum_j h[j] x[b, t + j - (taps-1)/2, c]`, zero padding at the sequence ends,
//! `h` = Gaussian(sigma) normalised to sum 1.

use crate::backend::Device;
use crate::error::{config_error, Result};
use crate::tensor::{expect_nonempty, expect_shape, Real, Tensor, View};

pub(crate) const OP: &str = "token_lowpass";

/// The most taps a filter may have (a filter is allocated and applied per token, so a config
/// must not ask for an unbounded one; 9 is the default, the fused CUDA path takes up to 101).
pub const MAX_TAPS: usize = 4095;

/// The normalised Gaussian FIR: `taps` weights `exp(-k^2 / (2 sigma^2))`, `k = j - (taps-1)/2`,
/// scaled to sum 1.
///
/// # Errors
/// [`crate::FapeError::Config`] when `taps` is even, zero or over [`MAX_TAPS`], or `sigma` is not a positive finite number.
pub fn gaussian_taps(taps: usize, sigma: f64) -> Result<Vec<f64>> {
    validate_filter(OP, taps, sigma)?;
    let center = (taps - 1) as f64 / 2.0;
    let raw: Vec<f64> = (0..taps)
        .map(|j| {
            let k = j as f64 - center;
            (-k * k / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum: f64 = raw.iter().sum();
    Ok(raw.into_iter().map(|w| w / sum).collect())
}

pub(crate) fn validate_filter(op: &'static str, taps: usize, sigma: f64) -> Result<()> {
    if taps == 0 || taps.is_multiple_of(2) || taps > MAX_TAPS {
        return Err(config_error(op, "taps", format!("must be odd, positive and at most {MAX_TAPS}, got {taps}")));
    }
    if !(sigma.is_finite() && sigma > 0.0) {
        return Err(config_error(op, "sigma", format!("must be a positive finite number, got {sigma}")));
    }
    Ok(())
}

/// Extents of a validated low-pass input `[B,T,C]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LowpassDims {
    /// Images.
    pub batch: usize,
    /// Tokens per image.
    pub tokens: usize,
    /// Channels per token.
    pub channels: usize,
}

fn validate<T>(x: &View<'_, T>) -> Result<LowpassDims> {
    expect_shape(OP, "x", x, "[B,T,C]", &[None, None, None])?;
    expect_nonempty(OP, "x", x)?;
    let s = x.shape();
    Ok(LowpassDims { batch: s[0], tokens: s[1], channels: s[2] })
}

/// Exact f64 reference of the token low-pass. `x`: `[B,T,C]`; returns `[B,T,C]`.
///
/// # Errors
/// Shape errors for a rank other than 3 or an empty tensor; config errors for `taps`/`sigma`.
pub fn reference<T: Real>(x: View<'_, T>, taps: usize, sigma: f64) -> Result<Tensor<f64>> {
    let dims = validate(&x)?;
    let h = gaussian_taps(taps, sigma)?;
    let xs: Vec<f64> = x.data().iter().map(|v| v.to_f64()).collect();
    Ok(Tensor { data: filter_tokens(&xs, dims, &h), shape: x.shape().to_vec() })
}

/// Filters every channel of every image along tokens with `h` (zero padding). Generic so the
/// reference runs it in f64 and the CPU backend in f32.
pub(crate) fn filter_tokens<F>(x: &[F], dims: LowpassDims, h: &[f64]) -> Vec<F>
where
    F: Copy + Default + std::ops::Add<Output = F> + std::ops::Mul<Output = F> + Real,
{
    let LowpassDims { tokens, channels, .. } = dims;
    let hf: Vec<F> = h.iter().map(|&w| F::from_f64(w)).collect();
    let mut out = vec![F::default(); x.len()];
    for (image, dst) in x.chunks(tokens * channels).zip(out.chunks_mut(tokens * channels)) {
        for (t, row) in dst.chunks_mut(channels).enumerate() {
            filter_row(image, t, &hf, row);
        }
    }
    out
}

/// Row `t` of the low-pass of one image `image` `[T, C]` (`C` = `row.len()`) with the taps
/// `h` as `F`: `row[c] = sum_j h[j] image[t + j - (taps-1)/2][c]`, zero padding, summed in tap
/// order.
pub(crate) fn filter_row<F>(image: &[F], t: usize, h: &[F], row: &mut [F])
where
    F: Copy + Default + std::ops::Add<Output = F> + std::ops::Mul<Output = F>,
{
    let channels = row.len();
    let tokens = image.len() / channels;
    let half = (h.len() - 1) / 2;
    row.fill(F::default());
    for (j, &w) in h.iter().enumerate() {
        let Some(src_t) = (t + j).checked_sub(half).filter(|&s| s < tokens) else {
            continue;
        };
        for (o, &v) in row.iter_mut().zip(&image[src_t * channels..][..channels]) {
            *o = *o + w * v;
        }
    }
}

/// The token low-pass on `device`. `x`: `[B,T,C]` f32; returns `[B,T,C]` f32.
///
/// # Errors
/// Shape and config errors as [`reference()`]; device errors from GPU backends.
pub fn token_lowpass(device: &Device, x: View<'_, f32>, taps: usize, sigma: f64) -> Result<Tensor<f32>> {
    let dims = validate(&x)?;
    let h = gaussian_taps(taps, sigma)?;
    let data = match device {
        Device::Reference => {
            return reference(x, taps, sigma).map(|t| t.map(|&v| v as f32));
        }
        Device::Cpu => filter_tokens_parallel(x.data(), dims, &h),
        #[cfg(feature = "cube")]
        Device::Cube(d) => super::cube::token_lowpass(d, x.data(), dims, &h)?,
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => super::cuda::token_lowpass(d, x.data(), dims, &h)?,
    };
    Ok(Tensor { data, shape: x.shape().to_vec() })
}

/// The CPU backend's low-pass: rows (tokens of every image) in parallel.
pub(crate) fn filter_tokens_parallel(x: &[f32], dims: LowpassDims, h: &[f64]) -> Vec<f32> {
    use rayon::prelude::*;
    let LowpassDims { tokens, channels, .. } = dims;
    let hf: Vec<f32> = h.iter().map(|&w| w as f32).collect();
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(channels).with_min_len(MIN_ROW_ELEMENTS.div_ceil(channels)).enumerate().for_each(|(r, row)| {
        let image = r / tokens;
        filter_row(&x[image * tokens * channels..][..tokens * channels], r % tokens, &hf, row)
    });
    out
}

/// Elements a parallel task of the CPU low-pass filters at least (fewer rows per task would
/// spend more on scheduling than on filtering).
pub(crate) const MIN_ROW_ELEMENTS: usize = 16 * 1024;
