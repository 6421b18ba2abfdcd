//! Seeded, parameterised synthetic degradations of clean images: what the planner's accuracy is
//! measured on. [`Degradation::sample`] draws the parameters of a task's degradation at a
//! strength in `[0,1]` (0 mild, 1 severe); [`Degradation::apply`] renders it with a seed.
//! The same parameters and seed always give the same image.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::filters::{self, per_channel, Plane};
use super::image::Image;
use super::planner::Task;
use super::scenes::smooth_field;
use crate::error::{config_error, Result};
use crate::testing::rng;

/// The op name in the errors of [`Degradation::apply`].
const OP: &str = "degrade";

/// One synthetic degradation and its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Degradation {
    /// Parallel bright streaks blended over the image (screen blend).
    Rain {
        /// Streaks per 10^4 px.
        density: f32,
        /// Mean streak length in px.
        length: f32,
        /// Streak direction in degrees from vertical (each streak jitters by up to 3 degrees).
        angle_deg: f32,
        /// Peak streak opacity in `[0,1]`.
        intensity: f32,
        /// Streak width (Gaussian profile deviation) in px.
        width: f32,
    },
    /// Bright soft flakes of random size.
    Snow {
        /// Flakes per 10^4 px.
        density: f32,
        /// Largest flake radius in px (radii are drawn from 0.8 to it, small ones likelier).
        max_radius: f32,
    },
    /// The atmospheric scattering model `I = J t + A (1 - t)`, `t = exp(-beta d)`, with a
    /// depth-ish map `d` in `[0.3, 1]` (far at the top, near at the bottom, smoothly perturbed).
    Haze {
        /// Scattering coefficient.
        beta: f32,
        /// Airlight `A` (grey with a slight blue cast).
        airlight: [f32; 3],
    },
    /// Under-exposure: `I = scale * J^gamma + n`, `n` Gaussian of deviation `noise`.
    LowLight {
        /// Tone curve exponent (> 1 darkens the mid-tones).
        gamma: f32,
        /// Exposure scale.
        scale: f32,
        /// Sensor noise deviation.
        noise: f32,
    },
    /// Additive i.i.d. Gaussian noise of deviation `sigma`, clamped to `[0,1]`.
    Noise {
        /// Deviation.
        sigma: f32,
    },
    /// Linear motion blur: the mean along a segment.
    MotionBlur {
        /// Segment length in px.
        length: f32,
        /// Segment direction in degrees from horizontal.
        angle_deg: f32,
    },
    /// Defocus blur: the mean over a disc.
    DefocusBlur {
        /// Disc radius in px.
        radius: f32,
    },
    /// Area-average downscaling by `factor` (the result is the super-resolution input).
    Downscale {
        /// Size divisor, > 1.
        factor: f32,
    },
}

/// Linear interpolation from `mild` (strength 0) to `severe` (strength 1).
fn lerp(mild: f32, severe: f32, strength: f32) -> f32 {
    mild + (severe - mild) * strength
}

/// A standard normal draw (Box-Muller).
fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

impl Degradation {
    /// The task that restores this degradation.
    pub fn task(&self) -> Task {
        match self {
            Self::Rain { .. } => Task::Deraining,
            Self::Snow { .. } => Task::Desnowing,
            Self::Haze { .. } => Task::Dehazing,
            Self::LowLight { .. } => Task::LowLightEnhancement,
            Self::Noise { .. } => Task::Denoising,
            Self::MotionBlur { .. } | Self::DefocusBlur { .. } => Task::Deblurring,
            Self::Downscale { .. } => Task::SuperResolution,
        }
    }

    /// Draws the parameters of a degradation for `task` at `strength` (clamped to `[0,1]`;
    /// 0 mild, 1 severe), with the random parts (angles, colours, blur kind) from `rng`.
    /// Deblurring draws motion or defocus blur with equal odds.
    pub fn sample(task: Task, strength: f32, rng: &mut ChaCha8Rng) -> Self {
        let s = strength.clamp(0.0, 1.0);
        match task {
            Task::Deraining => Self::Rain {
                density: lerp(4.0, 14.0, s),
                length: lerp(14.0, 36.0, s),
                angle_deg: rng.random_range(-25.0..25.0),
                intensity: lerp(0.35, 0.8, s),
                width: rng.random_range(0.5..1.0),
            },
            Task::Desnowing => Self::Snow { density: lerp(6.0, 30.0, s), max_radius: lerp(1.8, 3.5, s) },
            Task::Dehazing => {
                let grey = rng.random_range(0.75..0.95);
                Self::Haze { beta: lerp(0.9, 2.5, s), airlight: [grey - 0.03, grey, (grey + 0.04).min(1.0)] }
            }
            Task::LowLightEnhancement => {
                Self::LowLight { gamma: lerp(1.4, 2.6, s), scale: lerp(0.45, 0.15, s), noise: lerp(0.005, 0.03, s) }
            }
            Task::Denoising => Self::Noise { sigma: lerp(0.03, 0.2, s) },
            Task::Deblurring => {
                if rng.random_bool(0.5) {
                    Self::MotionBlur { length: lerp(9.0, 25.0, s), angle_deg: rng.random_range(0.0..180.0) }
                } else {
                    Self::DefocusBlur { radius: lerp(3.0, 8.0, s) }
                }
            }
            Task::SuperResolution => Self::Downscale { factor: lerp(2.0, 4.0, s) },
        }
    }

    /// The degraded image; `seed` places streaks, flakes and noise and perturbs the haze depth.
    ///
    /// # Errors
    /// [`crate::FapeError::Shape`]/[`crate::FapeError::Layout`] when `image` breaks its
    /// invariants; [`crate::FapeError::Config`] naming the parameter when it is out of range
    /// (non-positive sizes or deviations, a downscale factor of 1 or less or one that leaves
    /// no pixel).
    pub fn apply(&self, image: &Image, seed: u64) -> Result<Image> {
        image.validate()?;
        let mut rng = rng(seed);
        let positive = |field: &'static str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(config_error(OP, field, format!("must be positive, got {v}")))
            }
        };
        match *self {
            Self::Rain { density, length, angle_deg, intensity, width } => {
                positive("length", length)?;
                positive("width", width)?;
                let layer = rain_layer(&mut rng, image.width, image.height, density, length, angle_deg, width);
                Ok(per_channel(image, |p| p.zip(&layer, |v, a| v + (1.0 - v) * a * intensity.clamp(0.0, 1.0))))
            }
            Self::Snow { density, max_radius } => {
                positive("max_radius", max_radius)?;
                let layer = snow_layer(&mut rng, image.width, image.height, density, max_radius);
                Ok(per_channel(image, |p| p.zip(&layer, |v, a| v * (1.0 - a) + a)))
            }
            Self::Haze { beta, airlight } => {
                positive("beta", beta)?;
                let field = smooth_field(&mut rng, image.width, image.height, 4);
                let (w, h) = (image.width, image.height);
                let t: Vec<f32> = (0..w * h)
                    .map(|i| {
                        let far = 1.0 - (i / w) as f32 / h.max(2) as f32;
                        let depth = (0.35 + 0.6 * far + 0.1 * field[i]).clamp(0.3, 1.0);
                        (-beta * depth).exp()
                    })
                    .collect();
                let mut out = image.clone();
                for (c, &a) in airlight.iter().enumerate() {
                    let plane = &mut out.data[c * w * h..(c + 1) * w * h];
                    for (v, &t) in plane.iter_mut().zip(&t) {
                        *v = *v * t + a * (1.0 - t);
                    }
                }
                Ok(out)
            }
            Self::LowLight { gamma, scale, noise } => {
                positive("gamma", gamma)?;
                positive("scale", scale)?;
                let mut out = image.map(|v| scale * v.powf(gamma));
                add_noise(&mut out, &mut rng, noise);
                Ok(out)
            }
            Self::Noise { sigma } => {
                positive("sigma", sigma)?;
                let mut out = image.clone();
                add_noise(&mut out, &mut rng, sigma);
                Ok(out)
            }
            Self::MotionBlur { length, angle_deg } => {
                positive("length", length)?;
                let taps = motion_taps(length, angle_deg);
                Ok(per_channel(image, |p| filters::convolve_taps(p, &taps)))
            }
            Self::DefocusBlur { radius } => {
                positive("radius", radius)?;
                let taps = disc_taps(radius);
                Ok(per_channel(image, |p| filters::convolve_taps(p, &taps)))
            }
            Self::Downscale { factor } => downscale(image, factor),
        }
    }
}

/// Adds Gaussian noise of deviation `sigma` to every value, clamping to `[0,1]`.
fn add_noise(image: &mut Image, rng: &mut ChaCha8Rng, sigma: f32) {
    for v in &mut image.data {
        *v = (*v + sigma * gaussian(rng)).clamp(0.0, 1.0);
    }
}

/// The opacity layer of rain: `density` streaks per 10^4 px, each a segment of about `length`
/// px (0.6x to 1.4x) at `angle_deg` from vertical (jittered by up to 3 degrees), with a
/// Gaussian cross-profile of deviation `width`, tapered toward both ends, opacity 0.5 to 1.
fn rain_layer(
    rng: &mut ChaCha8Rng,
    w: usize,
    h: usize,
    density: f32,
    length: f32,
    angle_deg: f32,
    width: f32,
) -> Plane {
    let mut layer = Plane::filled(w, h, 0.0);
    let count = (density.max(0.0) * (w * h) as f32 / 1e4).round() as usize;
    let reach = (3.0 * width).ceil() as isize;
    for _ in 0..count {
        let len = length * rng.random_range(0.6..1.4);
        let angle = (angle_deg + rng.random_range(-3.0..3.0)).to_radians();
        let (dx, dy) = (angle.sin(), angle.cos());
        let (cx, cy) = (rng.random_range(-len..w as f32 + len), rng.random_range(-len..h as f32 + len));
        let opacity = rng.random_range(0.5..1.0);
        let steps = (2.0 * len).ceil() as usize;
        for k in 0..=steps {
            let u = k as f32 / steps as f32 - 0.5;
            let (px, py) = (cx + u * len * dx, cy + u * len * dy);
            let taper = (1.0 - (2.0 * u).powi(2)).sqrt();
            for oy in -reach..=reach {
                for ox in -reach..=reach {
                    let (ix, iy) = (px.round() as isize + ox, py.round() as isize + oy);
                    if ix < 0 || iy < 0 || ix >= w as isize || iy >= h as isize {
                        continue;
                    }
                    let d2 = (ix as f32 - px).powi(2) + (iy as f32 - py).powi(2);
                    let a = opacity * taper * (-d2 / (2.0 * width * width)).exp();
                    let cell = &mut layer.data[iy as usize * w + ix as usize];
                    *cell = cell.max(a);
                }
            }
        }
    }
    layer
}

/// The opacity layer of snow: `density` flakes per 10^4 px with radii from 0.8 to
/// `max_radius` (squared uniform, so small flakes dominate), profiles `exp(-d^2 / r^2)`, peak opacity
/// 0.7 to 1.
fn snow_layer(rng: &mut ChaCha8Rng, w: usize, h: usize, density: f32, max_radius: f32) -> Plane {
    let mut layer = Plane::filled(w, h, 0.0);
    let count = (density.max(0.0) * (w * h) as f32 / 1e4).round() as usize;
    for _ in 0..count {
        let u: f32 = rng.random();
        let radius = 0.8 + (max_radius - 0.8).max(0.0) * u * u;
        let (cx, cy) = (rng.random_range(0.0..w as f32), rng.random_range(0.0..h as f32));
        let opacity = rng.random_range(0.7..1.0);
        let reach = (2.5 * radius).ceil() as isize;
        for oy in -reach..=reach {
            for ox in -reach..=reach {
                let (ix, iy) = (cx as isize + ox, cy as isize + oy);
                if ix < 0 || iy < 0 || ix >= w as isize || iy >= h as isize {
                    continue;
                }
                let d2 = (ix as f32 + 0.5 - cx).powi(2) + (iy as f32 + 0.5 - cy).powi(2);
                let a = opacity * (-d2 / (radius * radius)).exp();
                let cell = &mut layer.data[iy as usize * w + ix as usize];
                *cell = cell.max(a);
            }
        }
    }
    layer
}

/// Taps averaging along a segment of `length` px at `angle_deg` from horizontal: points every
/// 0.25 px along it, each shared bilinearly among its four neighbours, normalised to sum 1.
fn motion_taps(length: f32, angle_deg: f32) -> Vec<(isize, isize, f32)> {
    let (dx, dy) = (angle_deg.to_radians().cos(), angle_deg.to_radians().sin());
    let samples = (4.0 * length).ceil().max(1.0) as usize;
    let mut weights = std::collections::BTreeMap::new();
    for k in 0..=samples {
        let u = (k as f32 / samples as f32 - 0.5) * length;
        let (x, y) = (u * dx, u * dy);
        let (x0, y0) = (x.floor(), y.floor());
        let (tx, ty) = (x - x0, y - y0);
        for (ox, oy, wt) in
            [(0, 0, (1.0 - tx) * (1.0 - ty)), (1, 0, tx * (1.0 - ty)), (0, 1, (1.0 - tx) * ty), (1, 1, tx * ty)]
        {
            *weights.entry((x0 as isize + ox, y0 as isize + oy)).or_insert(0.0f32) += wt;
        }
    }
    normalised(weights.into_iter().map(|((x, y), w)| (x, y, w)).collect())
}

/// Taps averaging over a disc of `radius` px (pixel centres within it).
fn disc_taps(radius: f32) -> Vec<(isize, isize, f32)> {
    let r = radius.ceil() as isize;
    let taps = (-r..=r)
        .flat_map(|y| (-r..=r).map(move |x| (x, y)))
        .filter(|&(x, y)| ((x * x + y * y) as f32) <= radius * radius)
        .map(|(x, y)| (x, y, 1.0))
        .collect();
    normalised(taps)
}

fn normalised(mut taps: Vec<(isize, isize, f32)>) -> Vec<(isize, isize, f32)> {
    let total: f32 = taps.iter().map(|t| t.2).sum();
    taps.iter_mut().for_each(|t| t.2 /= total);
    taps
}

/// Area-average downscaling: output pixel `(X, Y)` is the mean of the input pixels whose
/// centres fall in `[X f, (X+1) f) x [Y f, (Y+1) f)` (at least one).
fn downscale(image: &Image, factor: f32) -> Result<Image> {
    if !(factor.is_finite() && factor > 1.0) {
        return Err(config_error(OP, "factor", format!("must be greater than 1, got {factor}")));
    }
    let (ow, oh) = ((image.width as f32 / factor) as usize, (image.height as f32 / factor) as usize);
    if ow == 0 || oh == 0 {
        return Err(config_error(
            OP,
            "factor",
            format!("{factor} leaves no pixel of {}x{}", image.width, image.height),
        ));
    }
    let span = |o: usize, n: usize| {
        let start = ((o as f32 * factor) as usize).min(n - 1);
        let end = (((o + 1) as f32 * factor) as usize).clamp(start + 1, n);
        start..end
    };
    Ok(per_channel(image, |p| {
        let mut out = Plane::filled(ow, oh, 0.0);
        for oy in 0..oh {
            for ox in 0..ow {
                let (xs, ys) = (span(ox, p.width), span(oy, p.height));
                let n = (xs.len() * ys.len()) as f32;
                let sum: f32 = ys.flat_map(|y| xs.clone().map(move |x| p.data[y * p.width + x])).sum();
                out.data[oy * ow + ox] = sum / n;
            }
        }
        out
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::scenes::scene;

    #[test]
    fn every_task_degrades_reproducibly_and_stays_in_range() {
        let clean = scene(3, 80, 60);
        for task in Task::ALL {
            let d = Degradation::sample(task, 0.5, &mut rng(9));
            assert_eq!(d.task(), task);
            let a = d.apply(&clean, 4).unwrap();
            assert_eq!(a, d.apply(&clean, 4).unwrap(), "{task}: same seed, same image");
            assert!(a.data.iter().all(|v| (0.0..=1.0).contains(v)), "{task}: values leave [0,1]");
            if task != Task::SuperResolution {
                assert_eq!((a.width, a.height), (80, 60));
                assert_ne!(a, clean, "{task}: nothing changed");
            }
        }
    }

    #[test]
    fn parameters_act_as_documented() {
        let grey = Image::from_fn(40, 30, |_, _| [0.5; 3]);
        // Haze pulls toward the airlight; a constant image blurs to itself.
        let hazy = Degradation::Haze { beta: 50.0, airlight: [0.9; 3] }.apply(&grey, 1).unwrap();
        assert!(hazy.data.iter().all(|v| (v - 0.9).abs() < 1e-3));
        for d in [Degradation::MotionBlur { length: 9.0, angle_deg: 30.0 }, Degradation::DefocusBlur { radius: 3.0 }] {
            let out = d.apply(&grey, 1).unwrap();
            assert!(out.data.iter().all(|v| (v - 0.5).abs() < 1e-5), "{d:?}");
        }
        let small = Degradation::Downscale { factor: 3.0 }.apply(&grey, 1).unwrap();
        assert_eq!((small.width, small.height), (13, 10));
        let dark = Degradation::LowLight { gamma: 2.0, scale: 0.2, noise: 0.0001 }.apply(&grey, 1).unwrap();
        assert!(dark.data.iter().all(|v| (v - 0.05).abs() < 0.002));
        assert!(Degradation::Downscale { factor: 1.0 }.apply(&grey, 1).is_err());
        assert!(Degradation::Noise { sigma: -1.0 }.apply(&grey, 1).is_err());
    }
}
