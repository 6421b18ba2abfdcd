//! The label-free pixel statistics the planner decides on, each a function of the image alone.
//!
//! Luminance-domain statistics read the BT.601 grey plane; values are in the image's `[0,1]`
//! units unless said otherwise.

use crate::backend::Device;
use crate::error::Result;
use crate::freq::{self, FreqSplitConfig};
use crate::pipeline::filters::{self, Plane};
use crate::pipeline::image::Image;

/// Side of the square tiles over which [`streaks`] measures local orientation.
pub const STREAK_TILE: usize = 32;

/// Radius of the dark channel's minimum filter (a 15x15 patch, as in He et al.'s dark channel
/// prior).
pub const DARK_CHANNEL_RADIUS: usize = 7;

/// Every statistic of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Statistics {
    /// `W` in pixels.
    pub width: usize,
    /// `H` in pixels.
    pub height: usize,
    /// [`mean_luminance`].
    pub mean_luminance: f64,
    /// [`dark_channel`].
    pub dark_channel: f64,
    /// [`mean_saturation`].
    pub saturation: f64,
    /// [`noise_sigma`].
    pub noise_sigma: f64,
    /// [`laplacian_response`].
    pub laplacian: f64,
    /// [`BandRatios::mid_over_low`].
    pub mid_over_low: f64,
    /// [`BandRatios::outer_over_inner`].
    pub outer_over_inner: f64,
    /// [`Streaks::strength`].
    pub streak_strength: f64,
    /// [`Streaks::anisotropy`].
    pub anisotropy: f64,
    /// [`Streaks::angle_deg`].
    pub streak_angle_deg: f64,
    /// [`snow_density`].
    pub snow_density: f64,
}

impl Statistics {
    /// Measures every statistic of `image`.
    ///
    /// # Errors
    /// [`crate::FapeError::Shape`]/[`crate::FapeError::Layout`] when `image` breaks its
    /// invariants ([`Image::validate`]).
    pub fn measure(image: &Image) -> Result<Self> {
        image.validate()?;
        let grey = Plane::grey(image);
        let noise = noise_sigma(&grey);
        let bands = band_ratios(image, mean_luminance(&grey))?;
        let streaks = streaks(&grey);
        Ok(Self {
            width: image.width,
            height: image.height,
            mean_luminance: mean_luminance(&grey),
            dark_channel: dark_channel(image),
            saturation: mean_saturation(image),
            noise_sigma: noise,
            laplacian: laplacian_response(&grey),
            mid_over_low: bands.mid_over_low,
            outer_over_inner: bands.outer_over_inner,
            streak_strength: streaks.strength,
            anisotropy: streaks.anisotropy,
            streak_angle_deg: streaks.angle_deg,
            snow_density: snow_density(&grey, noise),
        })
    }

    /// Every measured statistic by its field name, in declaration order (the extents apart).
    pub fn measured(&self) -> [(&'static str, f64); 11] {
        [
            ("mean_luminance", self.mean_luminance),
            ("dark_channel", self.dark_channel),
            ("saturation", self.saturation),
            ("noise_sigma", self.noise_sigma),
            ("laplacian", self.laplacian),
            ("mid_over_low", self.mid_over_low),
            ("outer_over_inner", self.outer_over_inner),
            ("streak_strength", self.streak_strength),
            ("anisotropy", self.anisotropy),
            ("streak_angle_deg", self.streak_angle_deg),
            ("snow_density", self.snow_density),
        ]
    }

    /// Both sides under 512 px: the input is a super-resolution case by definition.
    pub fn is_small(&self) -> bool {
        self.width < 512 && self.height < 512
    }
}

/// Mean of the grey plane: low light reads well under the ~0.4-0.5 of a normally exposed image.
pub fn mean_luminance(grey: &Plane) -> f64 {
    grey.data.iter().map(|&v| v as f64).sum::<f64>() / grey.data.len().max(1) as f64
}

/// Mean of the dark channel: `min` over R, G, B, then the minimum over a 15x15 patch
/// ([`DARK_CHANNEL_RADIUS`]). Haze-free scenes have a dark channel near 0 almost everywhere
/// (shadows, saturated colours); haze adds the airlight `A (1 - t)` to every channel, lifting it.
pub fn dark_channel(image: &Image) -> f64 {
    let (r, g, b) = (image.channel(0), image.channel(1), image.channel(2));
    let data = r.iter().zip(g).zip(b).map(|((&r, &g), &b)| r.min(g).min(b)).collect();
    let per_pixel = Plane { width: image.width, height: image.height, data };
    mean_luminance(&filters::min_filter(&per_pixel, DARK_CHANNEL_RADIUS))
}

/// Mean HSV saturation `(max - min) / max` over pixels (0 for black ones). Haze blends every
/// colour toward the grey airlight and lowers it.
pub fn mean_saturation(image: &Image) -> f64 {
    let (r, g, b) = (image.channel(0), image.channel(1), image.channel(2));
    let total: f64 = r
        .iter()
        .zip(g)
        .zip(b)
        .map(|((&r, &g), &b)| {
            let (max, min) = (r.max(g).max(b), r.min(g).min(b));
            if max > 1e-6 {
                ((max - min) / max) as f64
            } else {
                0.0
            }
        })
        .sum();
    total / image.pixels().max(1) as f64
}

/// The noise deviation in flat regions: the response of [`filters::noise_response`] (deviation
/// `6 s` on i.i.d. noise of deviation `s`, zero on planes and ramps) at the 50% of pixels with
/// the smallest gradient of the lightly smoothed image, turned into a deviation robustly:
/// `median(|response|) / 0.6745 / 6` (the MAD of a Gaussian). Edges and texture sit in the
/// excluded half; sparse streaks and flakes barely move a median.
pub fn noise_sigma(grey: &Plane) -> f64 {
    let response = filters::noise_response(grey);
    let (gx, gy) = filters::gradients(&filters::gaussian_blur(grey, 1.0));
    let magnitude: Vec<f32> = gx.data.iter().zip(&gy.data).map(|(x, y)| x.hypot(*y)).collect();
    let mut sorted = magnitude.clone();
    let cut = filters::median(&mut sorted);
    let mut flat: Vec<f32> =
        response.data.iter().zip(&magnitude).filter(|(_, &m)| m <= cut).map(|(r, _)| r.abs()).collect();
    (filters::median(&mut flat) / 0.6745 / 6.0) as f64
}

/// Sharpness: the deviation of the 4-neighbour Laplacian over the deviation of the grey plane
/// (so contrast cancels). Blur lowers it; noise raises it.
pub fn laplacian_response(grey: &Plane) -> f64 {
    let deviation = |data: &[f32]| {
        let n = data.len().max(1) as f64;
        let mean = data.iter().map(|&v| v as f64).sum::<f64>() / n;
        (data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
    };
    let lap = filters::laplacian(grey);
    deviation(&lap.data) / deviation(&grey.data).max(1e-12)
}

/// Ratios of the grey plane's radial band energies (the [`freq::freq_split`] contract's bands
/// at the default edges `0, 0.15, 0.35, 0.45, 0.9, 1` of the normalised radius `rho`), with the
/// mean removed first so the DC bin holds nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BandRatios {
    /// `E[0.15, 0.45) / E[0, 0.15)`: rain streaks and flakes add mid-band energy.
    pub mid_over_low: f64,
    /// `E[0.45, 1] / E[0, 0.15)`: blur removes the outer band, noise fills it.
    pub outer_over_inner: f64,
}

/// The band ratios of `image`'s BT.601 grey plane, whose mean is `grey_mean`: the band energies
/// of [`freq::band_energies_grey`] on the CPU backend, less the DC bin (`H W mean^2`) in band 0.
///
/// # Errors
/// The hints' shape errors when `image` breaks its invariants.
pub fn band_ratios(image: &Image, grey_mean: f64) -> Result<BandRatios> {
    let shape = image.shape();
    let edges = FreqSplitConfig::default().edges;
    let energy = freq::band_energies_grey(&Device::Cpu, image.view(&shape)?, &edges)?;
    let e: Vec<f64> = energy.data.iter().map(|&v| v as f64).collect();
    let dc = (image.width * image.height) as f64 * grey_mean * grey_mean;
    let low = (e[0] - dc).max(1e-12);
    Ok(BandRatios { mid_over_low: (e[1] + e[2]) / low, outer_over_inner: (e[3] + e[4]) / low })
}

/// Oriented-streak measures from the gradient structure tensor of the high-passed grey plane
/// `hp = grey - gaussian_blur(grey, 1.5)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Streaks {
    /// Coherence `sqrt((Jxx - Jyy)^2 + 4 Jxy^2) / (Jxx + Jyy)` of the tensor summed over the
    /// whole image, in `[0,1]`: 0 isotropic, 1 every gradient along one axis.
    pub anisotropy: f64,
    /// Tile consensus in `[0,1]`: the length of the mean over all [`STREAK_TILE`]-square tiles
    /// of `c_t (cos 2 theta_t, sin 2 theta_t)`, `c_t` the tile's coherence and `theta_t` its
    /// gradient angle, counting only tiles with texture (mean `|grad hp|^2 > 1e-5`). Rain draws
    /// parallel streaks over the whole frame, so every tile agrees; a scene's own edges point
    /// every way (horizontal and vertical edges cancel in the doubled angle), and blur leaves
    /// few textured tiles.
    pub strength: f64,
    /// Streak direction in degrees from vertical, in `(-90, 90]`, from the mean tile vector:
    /// positive when the streak's lower end lies to its right (direction `(sin a, cos a)` with
    /// `y` down), as [`crate::pipeline::degrade::Degradation::Rain`] draws `angle_deg`.
    pub angle_deg: f64,
}

/// The streak measures of `grey`, see [`Streaks`].
pub fn streaks(grey: &Plane) -> Streaks {
    let hp = grey.zip(&filters::gaussian_blur(grey, 1.5), |a, b| a - b);
    let (gx, gy) = filters::gradients(&hp);
    let (w, h) = (grey.width, grey.height);
    let (tiles_x, tiles_y) = (w.div_ceil(STREAK_TILE), h.div_ceil(STREAK_TILE));
    let mut tiles = vec![[0.0f64; 4]; tiles_x * tiles_y]; // Jxx, Jyy, Jxy, pixels
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let (a, b) = (gx.data[i] as f64, gy.data[i] as f64);
            let t = &mut tiles[(y / STREAK_TILE) * tiles_x + x / STREAK_TILE];
            t[0] += a * a;
            t[1] += b * b;
            t[2] += a * b;
            t[3] += 1.0;
        }
    }
    let coherence = |jxx: f64, jyy: f64, jxy: f64| {
        let trace = jxx + jyy;
        if trace > 0.0 {
            ((jxx - jyy).powi(2) + 4.0 * jxy * jxy).sqrt() / trace
        } else {
            0.0
        }
    };
    let (mut sum_c, mut sum_s) = (0.0, 0.0);
    let mut total = [0.0f64; 3];
    for t in &tiles {
        for k in 0..3 {
            total[k] += t[k];
        }
        let trace = t[0] + t[1];
        if trace / t[3] > 1e-5 {
            // c_t times the unit doubled-angle vector is the vector over the trace.
            sum_c += (t[0] - t[1]) / trace;
            sum_s += 2.0 * t[2] / trace;
        }
    }
    let n = tiles.len() as f64;
    let (mean_c, mean_s) = (sum_c / n, sum_s / n);
    // Gradient angle phi from the doubled-angle mean; a streak along (sin a, cos a) (x right,
    // y down) has its gradient at phi = -a.
    let mut angle = -0.5 * mean_s.atan2(mean_c).to_degrees();
    if angle <= -90.0 {
        angle += 180.0;
    }
    Streaks { anisotropy: coherence(total[0], total[1], total[2]), strength: mean_c.hypot(mean_s), angle_deg: angle }
}

/// Density of small bright blobs, per 10^4 pixels: connected regions (4-connected) of pixels
/// brighter than their 9x9 neighbourhood mean by more than `max(0.08, 4 noise_sigma)` that are
/// small (2 to 80 pixels, bounding box at most 12 on a side), compact (box aspect at most 2.5)
/// and fill at least 40% of their box. Snowflakes pass; rain streaks (long), the bright side
/// of edges (long) and noise (under the threshold) do not.
pub fn snow_density(grey: &Plane, noise_sigma: f64) -> f64 {
    let threshold = (4.0 * noise_sigma).max(0.08) as f32;
    let background = filters::box_blur(grey, 4);
    let (w, h) = (grey.width, grey.height);
    let mut bright: Vec<bool> = grey.data.iter().zip(&background.data).map(|(&v, &b)| v - b > threshold).collect();
    let mut blobs = 0usize;
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !bright[start] {
            continue;
        }
        bright[start] = false;
        stack.push(start);
        let (mut area, mut x0, mut x1, mut y0, mut y1) = (0usize, usize::MAX, 0, usize::MAX, 0);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            area += 1;
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            let mut visit = |j: usize| {
                if bright[j] {
                    bright[j] = false;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        let (bw, bh) = ((x1 - x0 + 1) as f64, (y1 - y0 + 1) as f64);
        let compact = bw.max(bh) / bw.min(bh) <= 2.5 && area as f64 >= 0.4 * bw * bh;
        if (2..=80).contains(&area) && bw.max(bh) <= 12.0 && compact {
            blobs += 1;
        }
    }
    blobs as f64 * 1e4 / (w * h) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::degrade::Degradation;

    fn grey_image(w: usize, h: usize, f: impl Fn(usize, usize) -> f32) -> Image {
        Image::from_fn(w, h, |x, y| [f(x, y); 3])
    }

    #[test]
    fn luminance_dark_channel_and_saturation_of_known_images() {
        let grey = grey_image(40, 30, |_, _| 0.6);
        assert!((mean_luminance(&Plane::grey(&grey)) - 0.6).abs() < 1e-6);
        assert!((dark_channel(&grey) - 0.6).abs() < 1e-6);
        assert!(mean_saturation(&grey).abs() < 1e-9);
        // Saturated colours: one channel is 0 everywhere, so the dark channel is 0.
        let colours = Image::from_fn(40, 30, |x, _| if x < 20 { [1.0, 0.0, 0.0] } else { [0.0, 0.5, 1.0] });
        assert_eq!(dark_channel(&colours), 0.0);
        assert!((mean_saturation(&colours) - 1.0).abs() < 1e-9);
        // A bright image with one dark pixel: the 15x15 minimum spreads it over 15x15 pixels.
        let mut spot = grey_image(40, 30, |_, _| 0.5);
        spot.data.iter_mut().skip(15 * 40 + 20).step_by(40 * 30).for_each(|v| *v = 0.0);
        assert!((dark_channel(&spot) - 0.5 * (1.0 - 225.0 / 1200.0)).abs() < 1e-6);
    }

    #[test]
    fn noise_sigma_reads_the_added_deviation_and_ignores_edges() {
        let flat = grey_image(128, 128, |x, _| if x < 64 { 0.3 } else { 0.7 });
        assert!(noise_sigma(&Plane::grey(&flat)) < 1e-4, "a clean step edge is not noise");
        for sigma in [0.02, 0.05] {
            let noisy = Degradation::Noise { sigma }.apply(&flat, 5).unwrap();
            let got = noise_sigma(&Plane::grey(&noisy));
            // Grey mixes three independent channels: sigma * sqrt(0.299^2 + 0.587^2 + 0.114^2).
            let expected = sigma as f64 * (0.299f64.powi(2) + 0.587f64.powi(2) + 0.114f64.powi(2)).sqrt();
            assert!((got / expected - 1.0).abs() < 0.1, "sigma {sigma}: got {got}, expected {expected}");
        }
    }

    #[test]
    fn band_ratios_are_the_squared_amplitude_ratios_of_pure_tones() {
        // Periods 40, 5 and 2.5 px along x put the tones at rho 0.035 (low band), 0.283 (mid)
        // and 0.566 (outer), each on an exact bin of a 120-wide image.
        let tone = |x: usize, period: f32| (std::f32::consts::TAU * x as f32 / period).sin();
        let image = grey_image(120, 16, |x, _| 0.5 + 0.2 * tone(x, 40.0) + 0.1 * tone(x, 5.0) + 0.05 * tone(x, 2.5));
        let r = band_ratios(&image, mean_luminance(&Plane::grey(&image))).unwrap();
        assert!((r.mid_over_low - 0.25).abs() < 1e-3, "{r:?}");
        assert!((r.outer_over_inner - 0.0625).abs() < 1e-3, "{r:?}");
    }

    #[test]
    fn laplacian_response_falls_with_blur() {
        let sharp = grey_image(64, 64, |x, y| if (x / 8 + y / 8) % 2 == 0 { 0.2 } else { 0.8 });
        let blurred = Degradation::DefocusBlur { radius: 4.0 }.apply(&sharp, 1).unwrap();
        let (s, b) = (laplacian_response(&Plane::grey(&sharp)), laplacian_response(&Plane::grey(&blurred)));
        assert!(b < 0.3 * s, "sharp {s}, blurred {b}");
    }

    #[test]
    fn streaks_read_parallel_lines_and_their_angle() {
        for angle in [0.0f32, 20.0, -35.0] {
            let (sin, cos) = angle.to_radians().sin_cos();
            // Bright lines along (sin, cos), every 9 px across, with a Gaussian cross-profile
            // (hard-edged thin lines alias into axis-aligned staircases).
            let lines = grey_image(256, 256, |x, y| {
                let across = (x as f32 * cos - y as f32 * sin).rem_euclid(9.0) - 4.5;
                0.3 + 0.6 * (-across * across / (2.0 * 0.8 * 0.8)).exp()
            });
            let s = streaks(&Plane::grey(&lines));
            assert!(s.strength > 0.8 && s.anisotropy > 0.8, "{angle}: {s:?}");
            assert!((s.angle_deg - angle as f64).abs() < 1.5, "{angle}: {s:?}");
        }
        let noisy = Degradation::Noise { sigma: 0.1 }.apply(&grey_image(256, 256, |_, _| 0.5), 3).unwrap();
        let s = streaks(&Plane::grey(&noisy));
        assert!(s.strength < 0.1 && s.anisotropy < 0.1, "isotropic noise: {s:?}");
    }

    #[test]
    fn snow_density_counts_small_bright_blobs_only() {
        // 24 discs of radius 1.5 on a 6x4 grid, 20 px apart, on 0.3 grey: 24 blobs in 120x80.
        let discs = grey_image(120, 80, |x, y| {
            let (dx, dy) = ((x % 20) as f32 - 10.0, (y % 20) as f32 - 10.0);
            if dx * dx + dy * dy <= 2.25 {
                0.9
            } else {
                0.3
            }
        });
        assert!((snow_density(&Plane::grey(&discs), 0.0) - 24.0 * 1e4 / 9600.0).abs() < 1e-9);
        // One long bright line: elongated, not a flake.
        let line = grey_image(120, 80, |x, y| if y == 40 && x > 10 && x < 100 { 0.9 } else { 0.3 });
        assert_eq!(snow_density(&Plane::grey(&line), 0.0), 0.0);
    }
}
