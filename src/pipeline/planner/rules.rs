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

/// How far on the wrong side of its threshold a task's statistic must be, as a factor, before
/// another planner's choice of that task counts as contradicting the statistics.
pub const CONTRADICTION_FACTOR: f64 = 2.0;

/// Why choosing `task` contradicts `s`, if it does: the size rule (super-resolution exactly
/// when both sides are under 512 px), or the built-in rules firing for another task while
/// `task`'s own statistic is more than [`CONTRADICTION_FACTOR`] on the wrong side of its
/// threshold. Weak evidence never contradicts: only a rule that fires does.
pub fn contradiction(s: &Statistics, task: Task) -> Option<String> {
    let small = s.is_small();
    if small != (task == Task::SuperResolution) {
        let size = format!("the input is {}x{}", s.width, s.height);
        return Some(if small {
            format!("{size}, under 512 px on both sides, so the task is super_resolution")
        } else {
            format!("{size}, not under 512 px on both sides, so the task is not super_resolution")
        });
    }
    if small {
        return None;
    }
    let all = evidence(s);
    let fired = all.iter().find(|e| e.margin > 0.0)?;
    let chosen = all.iter().find(|e| e.task == task)?;
    if fired.task == task || chosen.margin >= -CONTRADICTION_FACTOR.ln() {
        return None;
    }
    Some(format!("for {task}: {}; the statistics point to {}: {}", chosen.reason, fired.task, fired.reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(width: usize, height: usize) -> Statistics {
        Statistics {
            width,
            height,
            mean_luminance: 0.45,
            dark_channel: 0.15,
            saturation: 0.55,
            noise_sigma: 1e-4,
            laplacian: 0.5,
            mid_over_low: 0.05,
            outer_over_inner: 0.015,
            streak_strength: 0.05,
            anisotropy: 0.1,
            streak_angle_deg: 0.0,
            snow_density: 1.0,
        }
    }

    #[test]
    fn priority_order_and_weak_evidence() {
        let mut s = stats(512, 384);
        s.noise_sigma = 0.05;
        s.snow_density = 20.0;
        assert_eq!(decide(&s).0, Task::Denoising, "noise is read before snow");
        s.mean_luminance = 0.05;
        assert_eq!(decide(&s).0, Task::LowLightEnhancement, "low light explains the noise");
        let clean = stats(512, 384);
        let (task, why) = decide(&clean);
        assert!(why.starts_with("weak evidence"), "{task}: {why}");
        assert_eq!(decide(&stats(511, 300)).0, Task::SuperResolution);
        assert_ne!(decide(&stats(300, 512)).0, Task::SuperResolution, "512 on one side is not small");
    }

    #[test]
    fn contradictions_follow_size_and_firing_rules() {
        let small = stats(256, 200);
        assert!(contradiction(&small, Task::SuperResolution).is_none());
        assert!(contradiction(&small, Task::Deraining).unwrap().contains("super_resolution"));
        let mut rainy = stats(512, 384);
        assert!(contradiction(&rainy, Task::SuperResolution).is_some());
        // Nothing fires: no choice contradicts.
        assert!(Task::ALL[..6].iter().all(|&t| contradiction(&rainy, t).is_none()));
        rainy.streak_strength = 0.5;
        assert!(contradiction(&rainy, Task::Deraining).is_none());
        // Snow density 1.0 is 4x under its threshold of 4: contradicted. Blur's ratio 0.015 is
        // 5x over its 0.003: contradicted.
        assert!(contradiction(&rainy, Task::Desnowing).unwrap().contains("deraining"));
        assert!(contradiction(&rainy, Task::Deblurring).is_some());
        // Snow density 3.0 is within a factor 2 of its threshold: a judgement call, allowed.
        rainy.snow_density = 3.0;
        assert!(contradiction(&rainy, Task::Desnowing).is_none());
    }
}
