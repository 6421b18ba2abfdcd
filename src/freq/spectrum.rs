//! What the reference and the CPU backend share: the spectral geometry (numpy's `fftfreq`, the
//! normalised radius, the mask and the band of every bin) and the split of one image, generic
//! over the FFT's float type so the reference runs it in f64 and the CPU backend in f32.
//!
//! Spectra are held transposed (`W x H`, bin `(ky,kx)` at `kx * H + ky`): the row transforms
//! run on the image as laid out, the column transforms on its transpose, and the mask is
//! applied there before transforming back the same way.

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftDirection, FftNum};

use super::{FreqSplitConfig, MaskKind};
use crate::tensor::Real;

/// `numpy.fft.fftfreq(n)[k]`, computed as numpy does: the signed index (`k` below `ceil(n/2)`,
/// `k - n` from there) times `1/n`.
pub fn fftfreq(n: usize, k: usize) -> f64 {
    let signed = if k < n.div_ceil(2) { k as f64 } else { k as f64 - n as f64 };
    signed * (1.0 / n as f64)
}

/// The normalised radius `sqrt(fy^2 + fx^2) / sqrt(0.5)`: 0 at DC, 1 at the Nyquist corner.
pub fn rho(fy: f64, fx: f64) -> f64 {
    (fy * fy + fx * fx).sqrt() / 0.5f64.sqrt()
}

/// The 2-D DFT (forward, unnormalised) of the real `height x width` row-major `plane`, as
/// row-major complex bins: bin `(ky,kx)` at `ky * width + kx`.
pub fn fft2_real(plane: &[f32], height: usize, width: usize) -> Vec<Complex<f32>> {
    let mut planner = rustfft::FftPlanner::new();
    let (rows, cols) = (planner.plan_fft_forward(width), planner.plan_fft_forward(height));
    let mut bins: Vec<Complex<f32>> = plane.iter().map(|&v| Complex::new(v, 0.0)).collect();
    for row in bins.chunks_exact_mut(width) {
        rows.process(row);
    }
    let mut column = vec![Complex::new(0.0, 0.0); height];
    for kx in 0..width {
        column.iter_mut().enumerate().for_each(|(y, c)| *c = bins[y * width + kx]);
        cols.process(&mut column);
        column.iter().enumerate().for_each(|(y, &c)| bins[y * width + kx] = c);
    }
    bins
}

/// The mask's value at radius `rho`.
pub(crate) fn mask_value(config: &FreqSplitConfig, rho: f64) -> f64 {
    match config.mask {
        MaskKind::Hard => f64::from(u8::from(rho <= config.cutoff)),
        MaskKind::Gaussian => (-rho * rho / (2.0 * config.cutoff * config.cutoff)).exp(),
    }
}

/// The band holding radius `rho`: `i` with `edges[i] <= rho < edges[i+1]`, the last band also
/// taking `rho == edges[last]`; `None` outside the edges.
pub(crate) fn band_of(edges: &[f64], rho: f64) -> Option<usize> {
    let at_or_below = edges.partition_point(|&e| e <= rho);
    let nbands = edges.len() - 1;
    match at_or_below {
        0 => None,
        i if i <= nbands => Some(i - 1),
        _ if edges.last() == Some(&rho) => Some(nbands - 1),
        _ => None,
    }
}

/// The mask value and band (`None` outside every band) of the bins `(ky, kx)`, `ky < height`,
/// `kx < columns`, of a `height x width` spectrum in row-major order (`columns` is `width` for
/// the whole spectrum, `width / 2 + 1` for a real image's half-spectrum): the host tables the
/// GPU backends upload once per shape and config instead of computing the geometry per bin.
#[cfg(any(feature = "cube", feature = "cuda"))]
pub(crate) fn bin_geometry(
    height: usize,
    width: usize,
    columns: usize,
    config: &FreqSplitConfig,
) -> impl Iterator<Item = (f64, Option<usize>)> + '_ {
    (0..height).flat_map(move |ky| {
        let fy = fftfreq(height, ky);
        (0..columns).map(move |kx| {
            let r = rho(fy, fftfreq(width, kx));
            (mask_value(config, r), band_of(&config.edges, r))
        })
    })
}

/// What a per-shape table of the GPU backends is keyed by besides the device: `H`, `W`, the
/// mask's name, and the bits of the cutoff and of the edges.
#[cfg(any(feature = "cube", feature = "cuda"))]
pub(crate) type TableKey = (usize, usize, &'static str, u64, Vec<u64>);

/// The [`TableKey`] of `h x w` images under `config`.
#[cfg(any(feature = "cube", feature = "cuda"))]
pub(crate) fn table_key(h: usize, w: usize, config: &FreqSplitConfig) -> TableKey {
    (h, w, config.mask.name(), config.cutoff.to_bits(), config.edges.iter().map(|e| e.to_bits()).collect())
}

/// The mask and band of every bin of an `H x W` spectrum, in the transposed layout.
pub(crate) struct SpectralMap<F> {
    height: usize,
    width: usize,
    mask: Vec<F>,
    /// The bin's band, or [`NO_BAND`].
    band: Vec<u32>,
}

/// A bin outside every band.
const NO_BAND: u32 = u32::MAX;

impl<F: Real> SpectralMap<F> {
    /// The map of an `height x width` spectrum under `config` (validated).
    pub fn new(height: usize, width: usize, config: &FreqSplitConfig) -> Self {
        let (mut mask, mut band) = (Vec::with_capacity(height * width), Vec::with_capacity(height * width));
        for kx in 0..width {
            let fx = fftfreq(width, kx);
            for ky in 0..height {
                let r = rho(fftfreq(height, ky), fx);
                mask.push(F::from_f64(mask_value(config, r)));
                band.push(band_of(&config.edges, r).map_or(NO_BAND, |b| b as u32));
            }
        }
        Self { height, width, mask, band }
    }
}

/// The four transforms of an `H x W` image.
pub(crate) struct Plans<F> {
    row_forward: Arc<dyn Fft<F>>,
    row_inverse: Arc<dyn Fft<F>>,
    col_forward: Arc<dyn Fft<F>>,
    col_inverse: Arc<dyn Fft<F>>,
}

impl<F: FftNum> Plans<F> {
    /// Plans for `height x width` images from `plan(len, direction)`.
    pub fn new(height: usize, width: usize, mut plan: impl FnMut(usize, FftDirection) -> Arc<dyn Fft<F>>) -> Self {
        Self {
            row_forward: plan(width, FftDirection::Forward),
            row_inverse: plan(width, FftDirection::Inverse),
            col_forward: plan(height, FftDirection::Forward),
            col_inverse: plan(height, FftDirection::Inverse),
        }
    }

    fn scratch_len(&self) -> usize {
        [&self.row_forward, &self.row_inverse, &self.col_forward, &self.col_inverse]
            .iter()
            .map(|p| p.get_inplace_scratch_len())
            .max()
            .unwrap_or(0)
    }
}

/// Buffers for one image at a time, reused across images.
pub(crate) struct Workspace<F> {
    rows: Vec<Complex<F>>,
    cols: Vec<Complex<F>>,
    scratch: Vec<Complex<F>>,
}

impl<F: FftNum> Workspace<F> {
    /// Buffers for images of `pixels` elements transformed with `plans`.
    pub fn new(plans: &Plans<F>, pixels: usize) -> Self {
        let zero = Complex::new(F::zero(), F::zero());
        Self { rows: vec![zero; pixels], cols: vec![zero; pixels], scratch: vec![zero; plans.scratch_len()] }
    }
}

/// Splits one image `x` (`H x W`, row-major): writes `low` and `high` (`H x W`) and the band
/// energies `energy` (`nbands`), the latter summed in f64.
pub(crate) fn split_image<F: FftNum + Real>(
    plans: &Plans<F>,
    map: &SpectralMap<F>,
    ws: &mut Workspace<F>,
    x: &[F],
    low: &mut [F],
    high: &mut [F],
    energy: &mut [f64],
) {
    let (h, w) = (map.height, map.width);
    let Workspace { rows, cols, scratch } = ws;
    for (c, &v) in rows.iter_mut().zip(x) {
        *c = Complex::new(v, F::zero());
    }
    plans.row_forward.process_with_scratch(rows, scratch);
    transpose(rows, cols, h, w);
    plans.col_forward.process_with_scratch(cols, scratch);

    energy.fill(0.0);
    for ((c, &m), &b) in cols.iter_mut().zip(&map.mask).zip(&map.band) {
        if let Some(e) = energy.get_mut(b as usize) {
            let (re, im) = (c.re.to_f64(), c.im.to_f64());
            *e += re * re + im * im;
        }
        *c = *c * m;
    }
    let inv_pixels = 1.0 / (h * w) as f64;
    energy.iter_mut().for_each(|e| *e *= inv_pixels);

    plans.col_inverse.process_with_scratch(cols, scratch);
    transpose(cols, rows, w, h);
    plans.row_inverse.process_with_scratch(rows, scratch);
    let scale = <F as Real>::from_f64(inv_pixels);
    for (((l, hi), &v), c) in low.iter_mut().zip(high.iter_mut()).zip(x).zip(rows.iter()) {
        *l = c.re * scale;
        *hi = v - *l;
    }
}

/// Splits two images at once, as [`split_image`] does each, through one complex transform of
/// `x[0] + i x[1]`: the mask is real and even (`M(k) = M(-k)`), so the inverse transform's real
/// and imaginary parts are the two low bands; each image's spectrum for the band energies is
/// `X_0(k) = (Z(k) + conj Z(-k)) / 2`, `X_1(k) = (Z(k) - conj Z(-k)) / 2i`. The inputs must be
/// finite (a NaN or infinity would reach the other image).
pub(crate) fn split_pair<F: FftNum + Real>(
    plans: &Plans<F>,
    map: &SpectralMap<F>,
    ws: &mut Workspace<F>,
    x: [&[F]; 2],
    low: [&mut [F]; 2],
    high: [&mut [F]; 2],
    energy: [&mut [f64]; 2],
) {
    let (h, w) = (map.height, map.width);
    let Workspace { rows, cols, scratch } = ws;
    for ((c, &a), &b) in rows.iter_mut().zip(x[0]).zip(x[1]) {
        *c = Complex::new(a, b);
    }
    plans.row_forward.process_with_scratch(rows, scratch);
    transpose(rows, cols, h, w);
    plans.col_forward.process_with_scratch(cols, scratch);

    let [e0, e1] = energy;
    e0.fill(0.0);
    e1.fill(0.0);
    for kx in 0..w {
        let mirror_x = (w - kx) % w;
        for ky in 0..h {
            let at = kx * h + ky;
            let Some(band) = map.band.get(at).and_then(|&b| usize::try_from(b).ok()).filter(|&b| b < e0.len()) else {
                continue;
            };
            let (z, m) = (cols[at], cols[mirror_x * h + (h - ky) % h]);
            let (zr, zi, mr, mi) = (z.re.to_f64(), z.im.to_f64(), m.re.to_f64(), m.im.to_f64());
            // Z(k) + conj Z(-k) and Z(k) - conj Z(-k), each twice an image's bin.
            let (sr, si, dr, di) = (zr + mr, zi - mi, zr - mr, zi + mi);
            e0[band] += 0.25 * (sr * sr + si * si);
            e1[band] += 0.25 * (dr * dr + di * di);
        }
    }
    let inv_pixels = 1.0 / (h * w) as f64;
    e0.iter_mut().chain(e1.iter_mut()).for_each(|e| *e *= inv_pixels);
    for (c, &m) in cols.iter_mut().zip(&map.mask) {
        *c = *c * m;
    }

    plans.col_inverse.process_with_scratch(cols, scratch);
    transpose(cols, rows, w, h);
    plans.row_inverse.process_with_scratch(rows, scratch);
    let scale = <F as Real>::from_f64(inv_pixels);
    let [l0, l1] = low;
    let [h0, h1] = high;
    for (i, c) in rows.iter().enumerate() {
        l0[i] = c.re * scale;
        l1[i] = c.im * scale;
        h0[i] = x[0][i] - l0[i];
        h1[i] = x[1][i] - l1[i];
    }
}

/// `dst` (`cols x rows`) = the transpose of `src` (`rows x cols`), in cache-sized tiles.
fn transpose<T: Copy>(src: &[T], dst: &mut [T], rows: usize, cols: usize) {
    const TILE: usize = 8;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fftfreq_matches_numpy_for_even_and_odd_lengths() {
        let even: Vec<f64> = (0..4).map(|k| fftfreq(4, k)).collect();
        assert_eq!(even, [0.0, 0.25, -0.5, -0.25]);
        let odd: Vec<f64> = (0..5).map(|k| fftfreq(5, k)).collect();
        assert_eq!(odd, [0.0, 0.2, 0.4, -0.4, -0.2]);
        assert_eq!(fftfreq(1, 0), 0.0);
    }

    #[test]
    fn band_of_is_half_open_with_the_last_band_closed() {
        let edges = [0.0, 0.5, 1.0];
        assert_eq!(band_of(&edges, 0.0), Some(0));
        assert_eq!(band_of(&edges, 0.5), Some(1));
        assert_eq!(band_of(&edges, 1.0), Some(1));
        assert_eq!(band_of(&[0.2, 0.5], 0.1), None);
        assert_eq!(band_of(&[0.2, 0.5], 0.6), None);
    }

    #[test]
    fn transpose_of_a_non_square_tile_crossing_matrix() {
        let (rows, cols) = (37, 70);
        let src: Vec<usize> = (0..rows * cols).collect();
        let mut dst = vec![0; rows * cols];
        transpose(&src, &mut dst, rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(dst[c * rows + r], src[r * cols + c]);
            }
        }
    }
}
