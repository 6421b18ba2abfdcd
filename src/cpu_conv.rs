//! Direct 2-D convolution on the CPU in f32, NCHW, SIMD chosen at run time ([`crate::simd`]):
//! the autoencoder's 3x3 and 1x1 convolutions (stride 1 or 2, zero padding, optionally after a
//! nearest 2x upsampling), without im2col.
//!
//! Rayon runs over bands of output rows. A band first copies the input rows it reads into a
//! zero-padded buffer (upsampled, and split into even and odd columns for stride 2, so that
//! every tap reads contiguous vectors), then computes register tiles of [`CHANNELS`] output
//! channels (broadcast weights) by `NV` vectors of output pixels (input rows), and writes its
//! rows of every output plane.

use std::array::from_fn;

use rayon::prelude::*;

use crate::simd::{Isa, Simd, SimdKernel};

/// Output channels per register tile: the broadcast side.
const CHANNELS: usize = 6;

/// Output pixels a band task holds at least (fewer rows per task would cost more in scheduling
/// and in re-read rows than they gain).
const MIN_BAND_PIXELS: usize = 4096;

/// Where the kernel reads the input: kernel size, stride, zero padding before (top, left) and
/// after (bottom, right), and a nearest 2x upsampling applied first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvGeometry {
    pub kernel: usize,
    pub stride: usize,
    pub pad_before: usize,
    pub pad_after: usize,
    pub upsample: bool,
}

impl ConvGeometry {
    /// The output height or width for an input extent `n`, when at least one output fits.
    pub(crate) fn output_len(&self, n: usize) -> Option<usize> {
        let padded = n * self.upscale() + self.pad_before + self.pad_after;
        padded.checked_sub(self.kernel).map(|r| r / self.stride + 1)
    }

    fn upscale(&self) -> usize {
        if self.upsample {
            2
        } else {
            1
        }
    }
}

/// A convolution's weights `[Cout, Cin, K, K]` and bias `[Cout]`, packed as
/// `[ceil(Cout/CHANNELS)][Cin][K][K][CHANNELS]` (zero output channels past `Cout`).
#[derive(Debug, Clone)]
pub(crate) struct PackedConv {
    cout: usize,
    cin: usize,
    kernel: usize,
    weights: Vec<f32>,
    /// `[ceil(Cout/CHANNELS) * CHANNELS]`, zero where absent or past `Cout`.
    bias: Vec<f32>,
}

impl PackedConv {
    /// Packs `weight` `[cout, cin, kernel, kernel]` and `bias` `[cout]`.
    ///
    /// # Panics
    /// When the lengths are not those of the extents (the caller checked the shapes).
    pub(crate) fn new(weight: &[f32], bias: Option<&[f32]>, cout: usize, cin: usize, kernel: usize) -> Self {
        let taps = kernel * kernel;
        assert_eq!(weight.len(), cout * cin * taps, "conv weight length");
        let groups = cout.div_ceil(CHANNELS);
        let mut weights = vec![0.0; groups * cin * taps * CHANNELS];
        for (o, filter) in weight.chunks_exact(cin * taps).enumerate() {
            let (g, lane) = (o / CHANNELS, o % CHANNELS);
            for (i, &w) in filter.iter().enumerate() {
                weights[(g * cin * taps + i) * CHANNELS + lane] = w;
            }
        }
        let mut padded_bias = vec![0.0; groups * CHANNELS];
        if let Some(b) = bias {
            padded_bias[..cout].copy_from_slice(&b[..cout]);
        }
        Self { cout, cin, kernel, weights, bias: padded_bias }
    }
}

/// The convolution of `x` `[B, Cin, H, W]` (`dims`) with `conv` under `geometry`; returns the
/// output `[B, Cout, OH, OW]` and its dims, or `None` when no output fits.
///
/// # Panics
/// When `x`'s length or `Cin` disagree with `dims` and `conv` (the caller checked the shapes).
pub(crate) fn conv2d(
    x: &[f32],
    dims: [usize; 4],
    conv: &PackedConv,
    geometry: ConvGeometry,
) -> Option<(Vec<f32>, [usize; 4])> {
    conv2d_on(Isa::detect(), x, dims, conv, geometry)
}

/// [`conv2d`] on the SIMD level `isa` (or the best one below it this CPU runs).
fn conv2d_on(
    isa: Isa,
    x: &[f32],
    dims: [usize; 4],
    conv: &PackedConv,
    geometry: ConvGeometry,
) -> Option<(Vec<f32>, [usize; 4])> {
    let [batch, cin, h, w] = dims;
    assert!(x.len() == batch * cin * h * w && cin == conv.cin && geometry.kernel == conv.kernel, "conv2d input");
    let (oh, ow) = (geometry.output_len(h)?, geometry.output_len(w)?);
    let out_dims = [batch, conv.cout, oh, ow];
    let mut out = vec![0.0f32; batch * conv.cout * oh * ow];
    let threads = rayon::current_num_threads();
    let band_rows = (MIN_BAND_PIXELS.div_ceil(ow)).max(oh.div_ceil(4 * threads).min(16)).min(oh).max(1);
    let bands = oh.div_ceil(band_rows);
    let mut tasks = Vec::with_capacity(batch * bands);
    for (image, out_image) in x.chunks_exact(cin * h * w).zip(out.chunks_mut(conv.cout * oh * ow)) {
        let mut per_band: Vec<Vec<&mut [f32]>> = (0..bands).map(|_| Vec::with_capacity(conv.cout)).collect();
        for plane in out_image.chunks_mut(oh * ow) {
            for (band, rows) in per_band.iter_mut().zip(plane.chunks_mut(band_rows * ow)) {
                band.push(rows);
            }
        }
        for (b, outs) in per_band.into_iter().enumerate() {
            tasks.push(Band { image, dims: [h, w], width: ow, first: b * band_rows, conv, geometry, outs });
        }
    }
    tasks.into_par_iter().for_each(|band| isa.run(band));
    Some((out, out_dims))
}

/// Output rows `first..` of one image (`dims` `[H, W]`, output width `width`), written to
/// `outs`: one slice of whole output rows per output channel.
struct Band<'a> {
    image: &'a [f32],
    dims: [usize; 2],
    width: usize,
    first: usize,
    conv: &'a PackedConv,
    geometry: ConvGeometry,
    outs: Vec<&'a mut [f32]>,
}

impl SimdKernel for Band<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        if S::LANES >= 16 {
            self.compute::<S, 4>(s);
        } else {
            self.compute::<S, 2>(s);
        }
    }
}

impl Band<'_> {
    /// The band with tiles of `NV` pixel vectors (one vector at a time for the pixels left over).
    #[inline(always)]
    fn compute<S: Simd, const NV: usize>(mut self, s: S) {
        let (lanes, ow, k, stride) = (S::LANES, self.width, self.geometry.kernel, self.geometry.stride);
        let rows = self.outs[0].len() / ow;
        let padded_width = ow.next_multiple_of(lanes);
        let (in_rows, row_len) = (stride * (rows - 1) + k, padded_width + (k - 1) / stride);
        let input = self.gather(in_rows, row_len);
        let taps = self.conv.cin * k * k;
        for (g, filters) in self.conv.weights.chunks_exact(taps * CHANNELS).enumerate() {
            let bias: [S::V; CHANNELS] = from_fn(|m| s.splat(self.conv.bias[g * CHANNELS + m]));
            let channels = (self.conv.cout - g * CHANNELS).min(CHANNELS);
            for y in 0..rows {
                let mut x = 0;
                while x + NV * lanes <= padded_width {
                    let tile = self.tile::<S, NV>(s, &input, filters, bias, y, x, in_rows, row_len);
                    self.store(s, &tile, g * CHANNELS, channels, y, x);
                    x += NV * lanes;
                }
                while x < padded_width {
                    let tile = self.tile::<S, 1>(s, &input, filters, bias, y, x, in_rows, row_len);
                    self.store(s, &tile, g * CHANNELS, channels, y, x);
                    x += lanes;
                }
            }
        }
    }

    /// Writes the first `channels` rows of `tile` (output channels `first..`, row `y` of the
    /// band, pixels from `x`), clipped at the output width.
    #[inline(always)]
    fn store<S: Simd, const NV: usize>(
        &mut self,
        s: S,
        tile: &[[S::V; NV]; CHANNELS],
        first: usize,
        channels: usize,
        y: usize,
        x: usize,
    ) {
        let (lanes, ow) = (S::LANES, self.width);
        for (out, vectors) in self.outs[first..first + channels].iter_mut().zip(tile) {
            let row = &mut out[y * ow..][..ow];
            for (n, &v) in vectors.iter().enumerate() {
                let at = x + n * lanes;
                if at + lanes <= ow {
                    s.store(&mut row[at..], v);
                } else if at < ow {
                    let mut spill = [0.0f32; 16];
                    s.store(&mut spill, v);
                    row[at..].copy_from_slice(&spill[..ow - at]);
                }
            }
        }
    }

    /// The padded (upsampled, column-phase split) input rows this band reads:
    /// `[Cin][stride][in_rows][row_len]`, entry `(c, p, r, j)` = padded input at row
    /// `stride * first + r`, column `stride * j + p`.
    fn gather(&self, in_rows: usize, row_len: usize) -> Vec<f32> {
        let ConvGeometry { stride, pad_before, .. } = self.geometry;
        let up = self.geometry.upscale();
        let [h, w] = self.dims;
        let source =
            |padded: usize, extent: usize| padded.checked_sub(pad_before).map(|i| i / up).filter(|&i| i < extent);
        let columns: Vec<Vec<Option<usize>>> =
            (0..stride).map(|p| (0..row_len).map(|j| source(stride * j + p, w)).collect()).collect();
        let mut buffer = vec![0.0f32; self.conv.cin * stride * in_rows * row_len];
        for (plane, rows) in self.image.chunks_exact(h * w).zip(buffer.chunks_exact_mut(stride * in_rows * row_len)) {
            for (phase, rows) in columns.iter().zip(rows.chunks_exact_mut(in_rows * row_len)) {
                for (r, row) in rows.chunks_exact_mut(row_len).enumerate() {
                    let Some(y) = source(stride * self.first + r, h) else { continue };
                    let src = &plane[y * w..][..w];
                    if stride == 1 && up == 1 {
                        // The row as it is, shifted right by the padding (which stays zero).
                        let end = (pad_before + w).min(row_len);
                        row[pad_before.min(end)..end].copy_from_slice(&src[..end.saturating_sub(pad_before)]);
                        continue;
                    }
                    for (dst, col) in row.iter_mut().zip(phase) {
                        if let Some(c) = col {
                            *dst = src[*c];
                        }
                    }
                }
            }
        }
        buffer
    }

    /// One register tile: output row `y` (of the band), pixels `x..x + NV*LANES`, the
    /// `CHANNELS` output channels of `filters` `[Cin][K][K][CHANNELS]`, starting from `bias`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn tile<S: Simd, const NV: usize>(
        &self,
        s: S,
        input: &[f32],
        filters: &[f32],
        bias: [S::V; CHANNELS],
        y: usize,
        x: usize,
        in_rows: usize,
        row_len: usize,
    ) -> [[S::V; NV]; CHANNELS] {
        let (lanes, k, stride) = (S::LANES, self.geometry.kernel, self.geometry.stride);
        let mut acc: [[S::V; NV]; CHANNELS] = from_fn(|m| [bias[m]; NV]);
        for (c, filter) in filters.chunks_exact(k * k * CHANNELS).enumerate() {
            for ky in 0..k {
                for kx in 0..k {
                    let row = &input[((c * stride + kx % stride) * in_rows + stride * y + ky) * row_len..][..row_len];
                    let at = x + kx / stride;
                    let v: [S::V; NV] = from_fn(|n| s.load(&row[at + n * lanes..]));
                    let weights = &filter[(ky * k + kx) * CHANNELS..][..CHANNELS];
                    for (acc, &w) in acc.iter_mut().zip(weights) {
                        let w = s.splat(w);
                        for (a, &v) in acc.iter_mut().zip(&v) {
                            *a = s.mul_add(w, v, *a);
                        }
                    }
                }
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, rng, uniform};

    /// The convolution in f64, straight from the definition.
    fn direct(
        x: &[f32],
        [b, cin, h, w]: [usize; 4],
        weight: &[f32],
        bias: &[f32],
        cout: usize,
        g: ConvGeometry,
    ) -> Vec<f64> {
        let (k, up) = (g.kernel, g.upscale());
        let (oh, ow) = (g.output_len(h).unwrap(), g.output_len(w).unwrap());
        let at = |n: usize, c: usize, y: usize, x_: usize| -> f64 {
            let (y, x_) = (y.checked_sub(g.pad_before), x_.checked_sub(g.pad_before));
            match (y, x_) {
                (Some(y), Some(x_)) if y < h * up && x_ < w * up => {
                    f64::from(x[((n * cin + c) * h + y / up) * w + x_ / up])
                }
                _ => 0.0,
            }
        };
        let mut out = Vec::with_capacity(b * cout * oh * ow);
        for n in 0..b {
            for o in 0..cout {
                for y in 0..oh {
                    for x_ in 0..ow {
                        let mut sum = f64::from(bias[o]);
                        for c in 0..cin {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let wt = f64::from(weight[((o * cin + c) * k + ky) * k + kx]);
                                    sum += wt * at(n, c, g.stride * y + ky, g.stride * x_ + kx);
                                }
                            }
                        }
                        out.push(sum);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_level_matches_the_definition_at_awkward_shapes() {
        let geometry = |kernel, stride, pad_before, pad_after, upsample| ConvGeometry {
            kernel,
            stride,
            pad_before,
            pad_after,
            upsample,
        };
        let cases = [
            ([1, 3, 5, 7], 4, geometry(3, 1, 1, 1, false)),
            ([2, 5, 13, 37], 13, geometry(3, 1, 1, 1, false)),
            ([1, 4, 9, 70], 7, geometry(3, 2, 0, 1, false)),
            ([1, 6, 6, 11], 6, geometry(3, 1, 1, 1, true)),
            ([2, 7, 4, 19], 5, geometry(1, 1, 0, 0, false)),
            ([1, 2, 1, 1], 1, geometry(3, 1, 1, 1, false)),
            ([1, 3, 40, 130], 12, geometry(3, 1, 1, 1, false)),
        ];
        for (i, (dims, cout, g)) in cases.into_iter().enumerate() {
            let [b, cin, h, w] = dims;
            let mut r = rng(i as u64);
            let x = uniform(&mut r, b * cin * h * w, -1.0, 1.0);
            let weight = uniform(&mut r, cout * cin * g.kernel * g.kernel, -1.0, 1.0);
            let bias = uniform(&mut r, cout, -1.0, 1.0);
            let packed = PackedConv::new(&weight, Some(&bias), cout, cin, g.kernel);
            let expected = direct(&x, dims, &weight, &bias, cout, g);
            for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
                let (got, out_dims) = conv2d_on(isa, &x, dims, &packed, g).expect("an output fits");
                assert_eq!(out_dims, [b, cout, g.output_len(h).unwrap(), g.output_len(w).unwrap()]);
                assert_close(&format!("{} {dims:?} cout {cout} {g:?}", isa.name()), &got, &expected, 1e-6);
            }
        }
        let too_small = geometry(3, 1, 0, 0, false);
        assert!(conv2d(&[0.0; 4], [1, 1, 2, 2], &PackedConv::new(&[0.0; 9], None, 1, 1, 3), too_small).is_none());
    }
}
