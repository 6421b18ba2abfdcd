//! The fast f32 CPU path of LoRA-MoE: shrink first (band filters along tokens commute with the
//! down-projection along features), every product through this crate's GEMM on the input
//! slices ([`matmul_nt`]: no tensor copies, no transposed or augmented copy of the weights).
//!
//! Passes over `x`: the band energies (a row of the low-pass at a time, token blocks in
//! parallel), one GEMM `x [A_1..A_E; router]^T` for the shrink and the router logits, and the
//! base GEMM `y = x W^T`; then `y += [u | 1] [B_1..B_E | bias]^T`, a GEMM with `K = E*r + 1`
//! that adds the LoRA term and the bias in one pass over `y`.

use rayon::prelude::*;

use super::config::{Band, LoraMoeConfig, LoraMoeDims, LoraMoeInputs, LoraMoeOutput};
use super::gating::{energy_prior, gate_token};
use super::lowpass::{filter_row, filter_tokens, gaussian_taps, LowpassDims};
use crate::cpu_gemm::matmul_nt;
use crate::error::Result;
use crate::tensor::Tensor;

/// Tokens per parallel task of the band energies.
const ENERGY_TOKENS: usize = 16;

/// `[sum low^2, sum (x - low)^2, sum x^2]` over one image's entries, in f64.
type BandSums = [f64; 3];

/// Adds the squares of `low`, `x - low` and `x` (rows of equal length) to `sums`, in f64 with
/// lane-wise partial sums the compiler vectorises.
fn add_squares(sums: &mut BandSums, x: &[f32], low: &[f32]) {
    const LANES: usize = 8;
    let mut acc = [[0.0f64; LANES]; 3];
    let (xs, ls) = (x.chunks_exact(LANES), low.chunks_exact(LANES));
    let tail = xs.remainder().iter().zip(ls.remainder());
    for (xc, lc) in xs.zip(ls) {
        for l in 0..LANES {
            let (a, b) = (f64::from(xc[l]), f64::from(lc[l]));
            acc[0][l] += b * b;
            acc[1][l] += (a - b) * (a - b);
            acc[2][l] += a * a;
        }
    }
    for (&a, &b) in tail {
        let (a, b) = (f64::from(a), f64::from(b));
        acc[0][0] += b * b;
        acc[1][0] += (a - b) * (a - b);
        acc[2][0] += a * a;
    }
    for (sum, acc) in sums.iter_mut().zip(acc) {
        *sum += acc.iter().sum::<f64>();
    }
}

/// Per-image band-energy priors `[B][E]`: the low-pass of `x` one row at a time (never stored
/// whole), blocks of [`ENERGY_TOKENS`] tokens in parallel, summed per image in block order.
fn priors(x: &[f32], dims: &LoraMoeDims, bands: &[Band], h: &[f64]) -> Vec<Vec<f64>> {
    let (tokens, d) = (dims.tokens, dims.d);
    let hf: Vec<f32> = h.iter().map(|&w| w as f32).collect();
    let blocks = tokens.div_ceil(ENERGY_TOKENS);
    let partial: Vec<BandSums> = (0..dims.batch * blocks)
        .into_par_iter()
        .map_init(
            || vec![0.0f32; d],
            |low, block| {
                let image = &x[block / blocks * tokens * d..][..tokens * d];
                let first = block % blocks * ENERGY_TOKENS;
                let mut sums = [0.0; 3];
                for t in first..(first + ENERGY_TOKENS).min(tokens) {
                    filter_row(image, t, &hf, low);
                    add_squares(&mut sums, &image[t * d..][..d], low);
                }
                sums
            },
        )
        .collect();
    let entries = (tokens * d) as f64;
    partial
        .chunks(blocks)
        .map(|image| {
            let sums = image.iter().fold([0.0; 3], |a, s| [a[0] + s[0], a[1] + s[1], a[2] + s[2]]);
            let energies: Vec<f64> = bands
                .iter()
                .map(|band| {
                    let sum = match band {
                        Band::Low => sums[0],
                        Band::High => sums[1],
                        Band::Full => sums[2],
                    };
                    sum / entries
                })
                .collect();
            energy_prior(&energies)
        })
        .collect()
}

/// Applies expert `e`'s band to its `rank` columns of the shrunk activations `s [B*T, E*r]`
/// in place (low-pass along tokens within each image).
fn filter_shrunk(s: &mut [f32], dims: &LoraMoeDims, bands: &[Band], h: &[f64]) {
    let width = dims.experts * dims.rank;
    let one = LowpassDims { batch: 1, tokens: dims.tokens, channels: width };
    s.par_chunks_mut(dims.tokens * width).for_each(|image| {
        let low = filter_tokens(image, one, h);
        for (row, low_row) in image.chunks_mut(width).zip(low.chunks(width)) {
            for (e, &band) in bands.iter().enumerate() {
                let cols = e * dims.rank..(e + 1) * dims.rank;
                match band {
                    Band::Low => row[cols.clone()].copy_from_slice(&low_row[cols]),
                    Band::High => row[cols.clone()].iter_mut().zip(&low_row[cols]).for_each(|(v, l)| *v -= l),
                    Band::Full => {}
                }
            }
        }
    });
}

/// `x A_cat^T` `[B*T, E*r]` and the router logits `[B*T, E]`: one GEMM over `x` against the
/// stacked `[A_1..A_E; router]` when the router reads `x`, two otherwise.
fn shrink_and_logits(inputs: &LoraMoeInputs<'_, f32>, dims: &LoraMoeDims) -> (Vec<f32>, Vec<f32>) {
    let (rows, width, experts, d) = (dims.batch * dims.tokens, dims.experts * dims.rank, dims.experts, dims.d);
    let (x, lora_a, router) = (inputs.x.data(), inputs.lora_a.data(), inputs.router.data());
    let mut shrunk = vec![0.0; rows * width];
    let mut logits = vec![0.0; rows * experts];
    match inputs.guidance {
        Some(g) => {
            matmul_nt(&mut shrunk, false, x, lora_a, rows, d, width);
            matmul_nt(&mut logits, false, g.data(), router, rows, dims.dg, experts);
        }
        None => {
            let stacked = [lora_a, router].concat();
            let mut both = vec![0.0; rows * (width + experts)];
            matmul_nt(&mut both, false, x, &stacked, rows, d, width + experts);
            for ((row, s), l) in both
                .chunks_exact(width + experts)
                .zip(shrunk.chunks_exact_mut(width))
                .zip(logits.chunks_exact_mut(experts))
            {
                s.copy_from_slice(&row[..width]);
                l.copy_from_slice(&row[width..]);
            }
        }
    }
    (shrunk, logits)
}

/// The LoRA-MoE layer in f32 on the CPU, `dims` from [`LoraMoeInputs::validate`]. Shapes as
/// [`super::reference::lora_moe`].
pub(crate) fn lora_moe(
    inputs: &LoraMoeInputs<'_, f32>,
    dims: LoraMoeDims,
    config: &LoraMoeConfig,
) -> Result<LoraMoeOutput<f32>> {
    let h = gaussian_taps(config.taps, config.sigma)?;
    let (rows, width, n) = (dims.batch * dims.tokens, dims.experts * dims.rank, dims.n);
    let x = inputs.x.data();

    let priors = priors(x, &dims, &config.bands, &h);
    let (mut shrunk, logits) = shrink_and_logits(inputs, &dims);
    let gates: Vec<f64> = logits
        .par_chunks(dims.experts)
        .enumerate()
        .flat_map_iter(|(row, l)| {
            let mut g: Vec<f64> = l.iter().map(|&v| v as f64 / config.temperature).collect();
            gate_token(&mut g, &priors[row / dims.tokens], config.lambda, config.top_k);
            g
        })
        .collect();
    filter_shrunk(&mut shrunk, &dims, &config.bands, &h);

    // u = scale * gate * band(x A^T), with a column of ones for the bias: [u | 1].
    let bias = inputs.bias.map(|b| b.data());
    let k = width + usize::from(bias.is_some());
    let scale = config.scale_for(dims.rank);
    let mut u = vec![1.0f32; rows * k];
    u.par_chunks_mut(k).zip(shrunk.par_chunks(width)).zip(gates.par_chunks(dims.experts)).for_each(|((u, s), g)| {
        for ((u, s), g) in u.chunks_mut(dims.rank).zip(s.chunks(dims.rank)).zip(g) {
            let factor = (scale * g) as f32;
            u.iter_mut().zip(s).for_each(|(u, s)| *u = s * factor);
        }
    });
    // [B_1 .. B_E | bias] `[n, k]`, from lora_b `[E, n, r]`.
    let lora_b = inputs.lora_b.data();
    let mut up = vec![0.0f32; n * k];
    up.par_chunks_mut(k).enumerate().for_each(|(o, row)| {
        for (e, cols) in row[..width].chunks_mut(dims.rank).enumerate() {
            cols.copy_from_slice(&lora_b[(e * n + o) * dims.rank..][..dims.rank]);
        }
        if let Some(b) = bias {
            row[width] = b[o];
        }
    });

    let mut y = vec![0.0f32; rows * n];
    matmul_nt(&mut y, false, x, inputs.weight.data(), rows, dims.d, n);
    matmul_nt(&mut y, true, &u, &up, rows, k, n);
    Ok(LoraMoeOutput {
        y: Tensor { data: y, shape: vec![dims.batch, dims.tokens, n] },
        gates: Tensor {
            data: gates.into_iter().map(|g| g as f32).collect(),
            shape: vec![dims.batch, dims.tokens, dims.experts],
        },
    })
}
