//! The fast f32 CPU backend of [`freq_split`](super::freq_split): rustfft in f32 with plans
//! cached for the life of the process, rayon across the `B*C` images, one workspace per rayon
//! job rather than per image, band energies summed in f64.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rayon::prelude::*;
use rustfft::{Fft, FftDirection, FftPlanner};

use super::spectrum::{split_image, Plans, SpectralMap, Workspace};
use super::{output, FreqDims, FreqSplitConfig, FreqSplitOutput};
use crate::tensor::View;

/// The process-wide f32 planner: it keeps every plan it has made, keyed by length and
/// direction, so repeated calls at one size plan once.
fn plan(len: usize, direction: FftDirection) -> Arc<dyn Fft<f32>> {
    static PLANNER: OnceLock<Mutex<FftPlanner<f32>>> = OnceLock::new();
    let planner = PLANNER.get_or_init(|| Mutex::new(FftPlanner::new()));
    // A panic while planning leaves the cache itself consistent, so a poisoned lock is usable.
    let mut planner = planner.lock().unwrap_or_else(PoisonError::into_inner);
    planner.plan_fft(len, direction)
}

/// The split of validated `x` (`[B,C,H,W]` with extents `dims`) in f32.
pub(crate) fn freq_split(x: View<'_, f32>, dims: FreqDims, config: &FreqSplitConfig) -> FreqSplitOutput<f32> {
    let (pixels, nbands) = (dims.pixels(), config.nbands());
    let map = SpectralMap::new(dims.height, dims.width, config);
    let plans = Plans::new(dims.height, dims.width, plan);
    let mut low = vec![0.0f32; x.data().len()];
    let mut high = vec![0.0f32; x.data().len()];
    let mut energy = vec![0.0f64; dims.images * nbands];
    x.data()
        .par_chunks(pixels)
        .zip(low.par_chunks_mut(pixels))
        .zip(high.par_chunks_mut(pixels))
        .zip(energy.par_chunks_mut(nbands))
        .for_each_init(
            || Workspace::new(&plans, pixels),
            |ws, (((x, l), h), e)| split_image(&plans, &map, ws, x, l, h, e),
        );
    let energy = energy.into_iter().map(|e| e as f32).collect();
    output(x.shape(), nbands, low, high, energy)
}
