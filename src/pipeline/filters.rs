//! Single-channel planes and the small spatial filters the planner's statistics and the
//! synthetic degradations share. Every filter clamps at the borders (the edge pixel repeats).

use super::image::Image;

/// One channel: row-major `[H,W]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Plane {
    /// `W`, pixels per row.
    pub width: usize,
    /// `H`, rows.
    pub height: usize,
    /// `[H,W]` row-major.
    pub data: Vec<f32>,
}

impl Plane {
    /// A `width x height` plane of `value`.
    pub fn filled(width: usize, height: usize, value: f32) -> Self {
        Self { width, height, data: vec![value; width * height] }
    }

    /// The grey plane (BT.601 luma) of `image`, see [`Image::to_grey`].
    pub fn grey(image: &Image) -> Self {
        Self { width: image.width, height: image.height, data: image.to_grey() }
    }

    /// Channel `c` (0 R, 1 G, 2 B) of `image`.
    pub fn channel(image: &Image, c: usize) -> Self {
        Self { width: image.width, height: image.height, data: image.channel(c).to_vec() }
    }

    /// The value at `(x, y)` with both coordinates clamped into the plane.
    pub fn clamped(&self, x: isize, y: isize) -> f32 {
        let x = x.clamp(0, self.width as isize - 1) as usize;
        let y = y.clamp(0, self.height as isize - 1) as usize;
        self.data[y * self.width + x]
    }

    /// The same extents with every value mapped through `f`.
    pub fn map(&self, f: impl Fn(f32) -> f32) -> Self {
        Self { width: self.width, height: self.height, data: self.data.iter().map(|&v| f(v)).collect() }
    }

    /// The element-wise combination `f(self, other)` of two planes of equal extents.
    pub fn zip(&self, other: &Plane, f: impl Fn(f32, f32) -> f32) -> Self {
        debug_assert_eq!((self.width, self.height), (other.width, other.height));
        let data = self.data.iter().zip(&other.data).map(|(&a, &b)| f(a, b)).collect();
        Self { width: self.width, height: self.height, data }
    }
}

/// Three planes back into an RGB image (all of equal extents).
pub fn merge_channels(channels: [Plane; 3]) -> Image {
    let (width, height) = (channels[0].width, channels[0].height);
    let mut data = Vec::with_capacity(3 * width * height);
    for plane in &channels {
        data.extend_from_slice(&plane.data);
    }
    Image { width, height, data }
}

/// `f` applied to each channel of `image`, reassembled.
pub fn per_channel(image: &Image, f: impl Fn(&Plane) -> Plane) -> Image {
    merge_channels([0, 1, 2].map(|c| f(&Plane::channel(image, c))))
}

/// Convolution with `kernel` (odd length, centred) along rows, then along columns.
pub fn convolve_separable(plane: &Plane, kernel: &[f32]) -> Plane {
    let r = (kernel.len() / 2) as isize;
    let (w, h) = (plane.width, plane.height);
    let mut rows = Plane::filled(w, h, 0.0);
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (k, &weight) in kernel.iter().enumerate() {
                acc += weight * plane.clamped(x as isize + k as isize - r, y as isize);
            }
            rows.data[y * w + x] = acc;
        }
    }
    let mut out = Plane::filled(w, h, 0.0);
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0.0;
            for (k, &weight) in kernel.iter().enumerate() {
                acc += weight * rows.clamped(x as isize, y as isize + k as isize - r);
            }
            out.data[y * w + x] = acc;
        }
    }
    out
}

/// Gaussian blur of standard deviation `sigma` pixels (kernel radius `ceil(3 sigma)`, taps
/// normalised to sum 1).
pub fn gaussian_blur(plane: &Plane, sigma: f32) -> Plane {
    let radius = (3.0 * sigma).ceil().max(1.0) as isize;
    let taps: Vec<f32> = (-radius..=radius).map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = taps.iter().sum();
    let kernel: Vec<f32> = taps.iter().map(|t| t / total).collect();
    convolve_separable(plane, &kernel)
}

/// Mean over the `(2 radius + 1)^2` window around each pixel.
pub fn box_blur(plane: &Plane, radius: usize) -> Plane {
    let n = 2 * radius + 1;
    convolve_separable(plane, &vec![1.0 / n as f32; n])
}

/// Minimum over the `(2 radius + 1)^2` window around each pixel (grey erosion).
pub fn min_filter(plane: &Plane, radius: usize) -> Plane {
    let r = radius as isize;
    let (w, h) = (plane.width, plane.height);
    let window_min = |get: &dyn Fn(isize) -> f32| (-r..=r).map(get).fold(f32::INFINITY, f32::min);
    let mut rows = Plane::filled(w, h, 0.0);
    for y in 0..h {
        for x in 0..w {
            rows.data[y * w + x] = window_min(&|k| plane.clamped(x as isize + k, y as isize));
        }
    }
    let mut out = Plane::filled(w, h, 0.0);
    for y in 0..h {
        for x in 0..w {
            out.data[y * w + x] = window_min(&|k| rows.clamped(x as isize, y as isize + k));
        }
    }
    out
}

/// Convolution with a sparse kernel of `(dx, dy, weight)` taps: `out(x,y) = sum weight *
/// in(x + dx, y + dy)`.
pub fn convolve_taps(plane: &Plane, taps: &[(isize, isize, f32)]) -> Plane {
    let (w, h) = (plane.width, plane.height);
    let mut out = Plane::filled(w, h, 0.0);
    for y in 0..h {
        for x in 0..w {
            out.data[y * w + x] =
                taps.iter().map(|&(dx, dy, weight)| weight * plane.clamped(x as isize + dx, y as isize + dy)).sum();
        }
    }
    out
}

/// Scharr gradients `(d/dx, d/dy)`: the central difference `(in(x+1) - in(x-1)) / 2` along the
/// axis, smoothed by `(3, 10, 3) / 16` across it, so a unit ramp reads 1. The cross-smoothing
/// cancels most of the central difference's orientation bias toward the diagonals at high
/// frequencies (a thin line at 20 degrees reads within a degree, not at 30).
pub fn gradients(plane: &Plane) -> (Plane, Plane) {
    let (w, h) = (plane.width, plane.height);
    let (mut gx, mut gy) = (Plane::filled(w, h, 0.0), Plane::filled(w, h, 0.0));
    let at = |x: isize, y: isize| plane.clamped(x, y);
    let smooth = [(-1isize, 3.0f32 / 32.0), (0, 10.0 / 32.0), (1, 3.0 / 32.0)];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            gx.data[i] = smooth.iter().map(|&(k, c)| c * (at(x + 1, y + k) - at(x - 1, y + k))).sum();
            gy.data[i] = smooth.iter().map(|&(k, c)| c * (at(x + k, y + 1) - at(x + k, y - 1))).sum();
        }
    }
    (gx, gy)
}

/// The 3x3 kernel `[1 -2 1; -2 4 -2; 1 -2 1]` (the difference of two Laplacians, blind to
/// planes and linear ramps); on i.i.d. noise of deviation `s` its response has deviation `6 s`.
pub fn noise_response(plane: &Plane) -> Plane {
    const TAPS: [(isize, isize, f32); 9] = [
        (-1, -1, 1.0),
        (0, -1, -2.0),
        (1, -1, 1.0),
        (-1, 0, -2.0),
        (0, 0, 4.0),
        (1, 0, -2.0),
        (-1, 1, 1.0),
        (0, 1, -2.0),
        (1, 1, 1.0),
    ];
    convolve_taps(plane, &TAPS)
}

/// The 4-neighbour Laplacian `in(x-1,y) + in(x+1,y) + in(x,y-1) + in(x,y+1) - 4 in(x,y)`.
pub fn laplacian(plane: &Plane) -> Plane {
    convolve_taps(plane, &[(0, 0, -4.0), (-1, 0, 1.0), (1, 0, 1.0), (0, -1, 1.0), (0, 1, 1.0)])
}

/// The median of `values` (the upper one of an even count); NaN for none. Reorders `values`.
pub fn median(values: &mut [f32]) -> f32 {
    if values.is_empty() {
        return f32::NAN;
    }
    let mid = values.len() / 2;
    *values.select_nth_unstable_by(mid, f32::total_cmp).1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: usize, h: usize) -> Plane {
        Plane { width: w, height: h, data: (0..w * h).map(|i| ((i % w) + 2 * (i / w)) as f32 * 0.01).collect() }
    }

    #[test]
    fn blurs_keep_constants_and_filters_see_what_they_should() {
        let flat = Plane::filled(9, 7, 0.3);
        for out in [gaussian_blur(&flat, 1.5), box_blur(&flat, 2), min_filter(&flat, 3)] {
            assert!(out.data.iter().all(|v| (v - 0.3).abs() < 1e-6));
        }
        // A linear ramp: the noise kernel and the Laplacian read 0 away from the border.
        let ramp = ramp(9, 7);
        let (nr, lap) = (noise_response(&ramp), laplacian(&ramp));
        for y in 1..6 {
            for x in 1..8 {
                assert!(nr.data[y * 9 + x].abs() < 1e-5 && lap.data[y * 9 + x].abs() < 1e-5);
            }
        }
        let (gx, gy) = gradients(&ramp);
        assert!((gx.data[3 * 9 + 4] - 0.01).abs() < 1e-6 && (gy.data[3 * 9 + 4] - 0.02).abs() < 1e-6);
        let mut spike = Plane::filled(9, 7, 1.0);
        spike.data[3 * 9 + 4] = 0.0;
        let eroded = min_filter(&spike, 1);
        assert_eq!(eroded.data.iter().filter(|&&v| v == 0.0).count(), 9);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    }
}
