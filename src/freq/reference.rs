//! The exact f64 reference of [`freq_split`](super::freq_split): rustfft in f64 over rows then
//! columns, one image after another, with the mask and bands taken from numpy's `fftfreq`.

use rustfft::FftPlanner;

use super::spectrum::{split_image, Plans, SpectralMap, Workspace};
use super::{output, validate, FreqSplitConfig, FreqSplitOutput};
use crate::error::Result;
use crate::tensor::{Real, View};

/// The frequency split in f64. `x`: `[B,C,H,W]` of any [`Real`] dtype (any `H`, `W` >= 1);
/// returns `low` and `high` `[B,C,H,W]` and `band_energy` `[B,C,nbands]`, all f64. NaN in `x`
/// propagates to its image's outputs.
///
/// # Errors
/// [`crate::FapeError::Shape`] naming `x` when it is empty or not rank 4;
/// [`crate::FapeError::Config`] as [`FreqSplitConfig::validate`].
pub fn freq_split<T: Real>(x: View<'_, T>, config: &FreqSplitConfig) -> Result<FreqSplitOutput<f64>> {
    let dims = validate(&x, config)?;
    let (pixels, nbands) = (dims.pixels(), config.nbands());
    let xs: Vec<f64> = x.data().iter().map(|v| v.to_f64()).collect();
    let map = SpectralMap::new(dims.height, dims.width, config);
    let mut planner = FftPlanner::new();
    let plans = Plans::new(dims.height, dims.width, |len, dir| planner.plan_fft(len, dir));
    let mut ws = Workspace::new(&plans, pixels);
    let mut low = vec![0.0; xs.len()];
    let mut high = vec![0.0; xs.len()];
    let mut energy = vec![0.0; dims.images * nbands];
    let images =
        xs.chunks(pixels).zip(low.chunks_mut(pixels)).zip(high.chunks_mut(pixels)).zip(energy.chunks_mut(nbands));
    for (((x, l), h), e) in images {
        split_image(&plans, &map, &mut ws, x, l, h, e);
    }
    Ok(output(x.shape(), nbands, low, high, energy))
}
