//! GroupNorm, optionally followed by SiLU, on the CPU in f32 in two passes over the input: the
//! statistics of each (image, group) in f64, then one SIMD pass per channel plane that
//! normalises, applies the channel's weight and bias and the SiLU `v / (1 + e^-v)`.

use rayon::prelude::*;

use crate::simd::{exp, Isa, Simd, SimdKernel};

/// `x` `[B, C, N]` (`N` the spatial size) normalised over each of `groups` groups of `C/groups`
/// channels with `eps`, times `weight[c]` plus `bias[c]` (both `[C]`), then SiLU when `silu`.
///
/// # Panics
/// When the lengths disagree with `[B, C, N]` or `groups` does not divide `C` (the caller checked
/// the shapes).
pub(crate) fn group_norm(
    x: &[f32],
    dims: [usize; 3],
    groups: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f64,
    silu: bool,
) -> Vec<f32> {
    group_norm_on(Isa::detect(), x, dims, groups, (weight, bias), eps, silu)
}

/// [`group_norm`] on the SIMD level `isa` (or the best one below it this CPU runs).
fn group_norm_on(
    isa: Isa,
    x: &[f32],
    [batch, channels, spatial]: [usize; 3],
    groups: usize,
    (weight, bias): (&[f32], &[f32]),
    eps: f64,
    silu: bool,
) -> Vec<f32> {
    assert!(
        x.len() == batch * channels * spatial
            && channels % groups == 0
            && weight.len() == channels
            && bias.len() == channels,
        "group_norm shapes"
    );
    let group_len = channels / groups * spatial;
    let stats: Vec<(f64, f64)> = x.par_chunks(group_len.max(1)).map(mean_and_inverse_std(eps)).collect();
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(spatial.max(1)).zip(x.par_chunks(spatial.max(1))).enumerate().for_each(|(plane, (out, x))| {
        let c = plane % channels;
        let (mean, inv) = stats[plane / channels * groups + c / (channels / groups)];
        let scale = inv * f64::from(weight[c]);
        let shift = f64::from(bias[c]) - mean * scale;
        isa.run(Affine { x, out, scale: scale as f32, shift: shift as f32, silu });
    });
    out
}

/// The mean and `1 / sqrt(variance + eps)` of a group, in f64 (two passes, as candle's
/// GroupNorm computes them).
fn mean_and_inverse_std(eps: f64) -> impl Fn(&[f32]) -> (f64, f64) + Sync {
    move |group| {
        let n = group.len() as f64;
        let mean = lane_sum(group, |v| v) / n;
        let variance = lane_sum(group, |v| (v - mean) * (v - mean)) / n;
        (mean, 1.0 / (variance + eps).sqrt())
    }
}

/// `sum f(v)` in f64 with eight partial sums the compiler vectorises.
fn lane_sum(values: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(f64::from(v))).sum();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(f64::from(v));
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// `out = x * scale + shift`, then SiLU when `silu`, over one plane.
struct Affine<'a> {
    x: &'a [f32],
    out: &'a mut [f32],
    scale: f32,
    shift: f32,
    silu: bool,
}

impl SimdKernel for Affine<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let lanes = S::LANES;
        let (scale, shift) = (s.splat(self.scale), s.splat(self.shift));
        let mut x = self.x.chunks_exact(lanes);
        let mut out = self.out.chunks_exact_mut(lanes);
        for (o, x) in (&mut out).zip(&mut x) {
            let v = s.mul_add(s.load(x), scale, shift);
            s.store(o, if self.silu { silu(s, v) } else { v });
        }
        let (x, out) = (x.remainder(), out.into_remainder());
        if !x.is_empty() {
            let mut spill = [0.0f32; 16];
            spill[..x.len()].copy_from_slice(x);
            let v = s.mul_add(s.load(&spill), scale, shift);
            s.store(&mut spill, if self.silu { silu(s, v) } else { v });
            out.copy_from_slice(&spill[..out.len()]);
        }
    }
}

/// `v / (1 + e^-v)` per lane (a closure here would be compiled apart from the kernel's
/// instruction set: kernels call only `#[inline(always)]` functions).
#[inline(always)]
fn silu<S: Simd>(s: S, v: S::V) -> S::V {
    s.div(v, s.add(s.splat(1.0), exp(s, s.sub(s.splat(0.0), v))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, rng, uniform};

    #[test]
    fn matches_f64_with_and_without_silu_on_every_level() {
        for (dims, groups) in [([2, 6, 37], 3), ([1, 4, 1], 2), ([1, 16, 100], 8)] {
            let [b, c, n] = dims;
            let mut r = rng(c as u64);
            let x: Vec<f32> = uniform(&mut r, b * c * n, -2.0, 3.0);
            let (w, bias) = (uniform(&mut r, c, 0.5, 1.5), uniform(&mut r, c, -1.0, 1.0));
            for silu in [false, true] {
                let len = c / groups * n;
                let mut expected = Vec::new();
                for (i, plane) in x.chunks(n).enumerate() {
                    let group = &x[i / (c / groups) * len..][..len];
                    let mean = group.iter().map(|&v| f64::from(v)).sum::<f64>() / len as f64;
                    let var = group.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / len as f64;
                    let ch = i % c;
                    expected.extend(plane.iter().map(|&v| {
                        let y = (f64::from(v) - mean) / (var + 1e-6).sqrt() * f64::from(w[ch]) + f64::from(bias[ch]);
                        if silu {
                            y / (1.0 + (-y).exp())
                        } else {
                            y
                        }
                    }));
                }
                for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
                    let got = group_norm_on(isa, &x, dims, groups, (&w, &bias), 1e-6, silu);
                    assert_close(
                        &format!("{} {dims:?} groups {groups} silu {silu}", isa.name()),
                        &got,
                        &expected,
                        1e-6,
                    );
                }
            }
        }
    }
}
