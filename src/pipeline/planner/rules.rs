//! The rules from [`Statistics`] to one task, with the thresholds and the reason they cite.
//!
//! Each task's rule reads its statistics against thresholds and reports a margin, the log of
//! how far past the threshold it is (positive: it fires). Tasks are tried in the priority order
//! of [`evidence`] and the first that fires wins:
//!
//! 1. low light (dark images are noisy: low light explains the noise statistic);
//! 2. haze (a veil over everything, with a dark channel and a saturation no other degradation
//!    reaches);
//! 3. noise (it spawns small bright blobs and fills the outer band, so it must be read before
//!    snow and blur; rain and snow barely move its flat-region median);
//! 4. blur (it leaves long edges that all point one way after motion blur, which the streak
//!    statistic alone would take for rain; rain and snow add outer-band energy, so they never
//!    read as blurred);
//! 5. rain (its streaks also form small bright blobs, so it is read before snow);
//! 6. snow.
//!
//! When none fires, the task closest to its threshold wins and the rationale says the evidence
//! is weak. An input under 512 px on both sides is super-resolution before any of this.
//!
//! The thresholds were set on the synthetic degradations of [`crate::pipeline::degrade`]
//! applied to [`crate::pipeline::scenes`] with seeds apart from the accuracy test's (16 cases
//! per task, strengths uniform in `[0,1)`), between the populations measured there: mean
//! luminance 0.03-0.13 under low light, 0.27 or more otherwise; dark channel 0.45-0.79 and
//! saturation 0.08-0.22 under haze, at most 0.33 and at least 0.39 otherwise; noise sigma
//! 0.020-0.115 under noise, at most 0.014 otherwise; outer/inner band energy 0.0005-0.0024
//! under blur, at least 0.0041 otherwise; streak strength 0.18-0.70 under rain (but 0.06 in
//! the mildest case, strength 0.06, which reads as snow), at most 0.11 under snow; 8 or more
//! blobs per 10^4 px under snow, about 2 on the clean scenes' own features.
//!
//! Known confusions: a motion blur along a scene full of edges of one direction can keep
//! enough outer-band energy to pass the blur rule and read as rain (its surviving edges all
//! point one way); very light rain reads as snow.

use super::stats::Statistics;
use super::Task;

/// Low light: mean luminance under this.
pub const LOW_LIGHT_MAX_LUMINANCE: f64 = 0.2;
/// Haze: dark channel over this...
pub const HAZE_MIN_DARK_CHANNEL: f64 = 0.4;
/// ... and mean saturation under this.
pub const HAZE_MAX_SATURATION: f64 = 0.35;
/// Rain: tile consensus of streak orientation over this.
pub const RAIN_MIN_STREAK_STRENGTH: f64 = 0.14;
/// Snow: small bright blobs per 10^4 px over this.
pub const SNOW_MIN_DENSITY: f64 = 4.0;
/// Noise: deviation in flat regions over this (about 4/255).
pub const NOISE_MIN_SIGMA: f64 = 0.015;
/// Blur: outer over inner band energy under this.
pub const BLUR_MAX_OUTER_OVER_INNER: f64 = 0.003;

/// One task's reading of the statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    /// The task this rule argues for.
    pub task: Task,
    /// `ln(statistic / threshold)` oriented so that positive means the rule fires.
    pub margin: f64,
    /// The statistics it read and their thresholds, for the rationale.
    pub reason: String,
}

/// `ln(value / threshold)` with both floored at 1e-12; NaN stays NaN (and never fires).
fn above(value: f64, threshold: f64) -> f64 {
    if value.is_nan() || threshold.is_nan() {
        return f64::NAN;
    }
    (value.max(1e-12) / threshold.max(1e-12)).ln()
}

/// Every rule's evidence, in priority order (see the module documentation).
pub fn evidence(s: &Statistics) -> Vec<Evidence> {
    let haze_margin = above(s.dark_channel, HAZE_MIN_DARK_CHANNEL).min(above(HAZE_MAX_SATURATION, s.saturation));
    vec![
        Evidence {
            task: Task::LowLightEnhancement,
            margin: above(LOW_LIGHT_MAX_LUMINANCE, s.mean_luminance),
            reason: format!("mean luminance {:.3} (low below {LOW_LIGHT_MAX_LUMINANCE})", s.mean_luminance),
        },
        Evidence {
            task: Task::Dehazing,
            margin: haze_margin,
            reason: format!(
                "dark channel {:.3} (haze above {HAZE_MIN_DARK_CHANNEL}), saturation {:.3} (below {HAZE_MAX_SATURATION})",
                s.dark_channel, s.saturation
            ),
        },
        Evidence {
            task: Task::Denoising,
            margin: above(s.noise_sigma, NOISE_MIN_SIGMA),
            reason: format!(
                "flat-region noise sigma {:.4} (noisy above {NOISE_MIN_SIGMA}), outer/inner band energy {:.4}",
                s.noise_sigma, s.outer_over_inner
            ),
        },
        Evidence {
            task: Task::Deblurring,
            margin: above(BLUR_MAX_OUTER_OVER_INNER, s.outer_over_inner),
            reason: format!(
                "outer/inner band energy {:.5} (blurred below {BLUR_MAX_OUTER_OVER_INNER}), Laplacian response {:.3}",
                s.outer_over_inner, s.laplacian
            ),
        },
        Evidence {
            task: Task::Deraining,
            margin: above(s.streak_strength, RAIN_MIN_STREAK_STRENGTH),
            reason: format!(
                "oriented streak strength {:.3} (rain above {RAIN_MIN_STREAK_STRENGTH}) at {:.0} deg from vertical, \
                 anisotropy {:.3}, mid/low band energy {:.3}",
                s.streak_strength, s.streak_angle_deg, s.anisotropy, s.mid_over_low
            ),
        },
        Evidence {
            task: Task::Desnowing,
            margin: above(s.snow_density, SNOW_MIN_DENSITY),
            reason: format!(
                "{:.1} small bright blobs per 10^4 px (snow above {SNOW_MIN_DENSITY}), mid/low band energy {:.3}",
                s.snow_density, s.mid_over_low
            ),
        },
    ]
}

/// The task for `s` and the rationale citing the statistics it rests on.
pub fn decide(s: &Statistics) -> (Task, String) {
    if s.is_small() {
        return (Task::SuperResolution, format!("input {}x{} is under 512 px on both sides", s.width, s.height));
    }
    let all = evidence(s);
    if let Some(first) = all.iter().find(|e| e.margin > 0.0) {
        return (first.task, first.reason.clone());
    }
    let closest = all
        .iter()
        .filter(|e| !e.margin.is_nan())
        .max_by(|a, b| a.margin.total_cmp(&b.margin))
        .unwrap_or(&all[all.len() - 1]);
    (closest.task, format!("weak evidence, nearest threshold: {}", closest.reason))
}
