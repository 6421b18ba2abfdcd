//! The fast f32 CPU backend of [`freq_split`](super::freq_split): rustfft in f32 with plans
//! cached for the life of the process, rayon across pairs of the `B*C` images, each pair of
//! finite images through one complex transform ([`split_pair`]), one workspace per rayon job
//! rather than per image, band energies summed in f64.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rayon::prelude::*;
use rustfft::{Fft, FftDirection, FftPlanner};

use super::spectrum::{split_image, split_pair, Plans, SpectralMap, Workspace};
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

/// The mask and bands of an `height x width` spectrum under `config`, made once per shape and
/// config for the process (at most [`MAPS_KEPT`] kept; the cache starts over past that).
fn spectral_map(height: usize, width: usize, config: &FreqSplitConfig) -> Arc<SpectralMap<f32>> {
    type Key = (usize, usize, u64, &'static str, Vec<u64>);
    static MAPS: OnceLock<Mutex<HashMap<Key, Arc<SpectralMap<f32>>>>> = OnceLock::new();
    let key = (
        height,
        width,
        config.cutoff.to_bits(),
        config.mask.name(),
        config.edges.iter().map(|e| e.to_bits()).collect(),
    );
    let maps = MAPS.get_or_init(Mutex::default);
    if let Some(map) = maps.lock().unwrap_or_else(PoisonError::into_inner).get(&key) {
        return map.clone();
    }
    let map = Arc::new(SpectralMap::new(height, width, config));
    let mut maps = maps.lock().unwrap_or_else(PoisonError::into_inner);
    if maps.len() >= MAPS_KEPT {
        maps.clear();
    }
    maps.insert(key, map.clone());
    map
}

/// Whether `x` holds two images (of `pixels` each) that can share one transform: both finite
/// (a NaN or infinity would reach the other) and of comparable size (the round-off of the
/// shared transform scales with the larger one: sums of squares within [`PAIR_RATIO`]).
fn pairable(x: &[f32], pixels: usize) -> bool {
    if x.len() != 2 * pixels || !x.iter().all(|v| v.is_finite()) {
        return false;
    }
    let energy = |image: &[f32]| image.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
    let (a, b) = (energy(&x[..pixels]), energy(&x[pixels..]));
    a <= PAIR_RATIO * b && b <= PAIR_RATIO * a
}

/// The largest ratio of two paired images' sums of squares (a factor 4 in size): round-off in
/// the smaller stays within the f32 tolerance.
const PAIR_RATIO: f64 = 16.0;

/// Spectral maps [`spectral_map`] keeps at most.
const MAPS_KEPT: usize = 16;

/// The split of validated `x` (`[B,C,H,W]` with extents `dims`) in f32.
pub(crate) fn freq_split(x: View<'_, f32>, dims: FreqDims, config: &FreqSplitConfig) -> FreqSplitOutput<f32> {
    let (pixels, nbands) = (dims.pixels(), config.nbands());
    let map = spectral_map(dims.height, dims.width, config);
    let plans = Plans::new(dims.height, dims.width, plan);
    let mut low = vec![0.0f32; x.data().len()];
    let mut high = vec![0.0f32; x.data().len()];
    let mut energy = vec![0.0f64; dims.images * nbands];
    x.data()
        .par_chunks(2 * pixels)
        .zip(low.par_chunks_mut(2 * pixels))
        .zip(high.par_chunks_mut(2 * pixels))
        .zip(energy.par_chunks_mut(2 * nbands))
        .for_each_init(
            || Workspace::new(&plans, pixels),
            |ws, (((x, l), h), e)| {
                if pairable(x, pixels) {
                    let (x0, x1) = x.split_at(pixels);
                    let (l0, l1) = l.split_at_mut(pixels);
                    let (h0, h1) = h.split_at_mut(pixels);
                    let (e0, e1) = e.split_at_mut(nbands);
                    split_pair(&plans, &map, ws, [x0, x1], [l0, l1], [h0, h1], [e0, e1]);
                } else {
                    let images = x.chunks(pixels).zip(l.chunks_mut(pixels)).zip(h.chunks_mut(pixels));
                    for (((x, l), h), e) in images.zip(e.chunks_mut(nbands)) {
                        split_image(&plans, &map, ws, x, l, h, e);
                    }
                }
            },
        );
    let energy = energy.into_iter().map(|e| e as f32).collect();
    output(x.shape(), nbands, low, high, energy)
}
