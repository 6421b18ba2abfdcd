//! The fast f32 CPU path of LoRA-MoE: shrink first (band filters along tokens commute with the
//! down-projection along features), GEMMs through candle's CPU matmul, images in parallel.

use candle_core::{Device as CandleDevice, Tensor as CandleTensor};
use rayon::prelude::*;

use super::config::{Band, LoraMoeConfig, LoraMoeDims, LoraMoeInputs, LoraMoeOutput};
use super::gating::{energy_prior, gate_token};
use super::lowpass::{filter_tokens, filter_tokens_parallel, gaussian_taps, LowpassDims};
use crate::error::{FapeError, Result};
use crate::tensor::Tensor;

fn candle_err(context: &str) -> impl Fn(candle_core::Error) -> FapeError + '_ {
    move |e| FapeError::Device { backend: "cpu", context: context.to_string(), message: e.to_string() }
}

/// `a [m,k] · b[rows,k]^T -> [m,rows]` through candle's multithreaded CPU GEMM.
fn matmul_nt(a: &[f32], m: usize, k: usize, b: &[f32], rows: usize) -> Result<Vec<f32>> {
    let err = candle_err("lora_moe matmul");
    let cpu = CandleDevice::Cpu;
    let a = CandleTensor::from_slice(a, (m, k), &cpu).map_err(&err)?;
    let b = CandleTensor::from_slice(b, (rows, k), &cpu).map_err(&err)?;
    a.matmul(&b.t().map_err(&err)?).and_then(|c| c.flatten_all()).and_then(|c| c.to_vec1::<f32>()).map_err(&err)
}

/// Mean of squares of one image's band, in f64.
fn band_energy(band: Band, x: &[f32], low: &[f32]) -> f64 {
    let sum: f64 = match band {
        Band::Low => low.iter().map(|&v| (v as f64) * (v as f64)).sum(),
        Band::High => x.iter().zip(low).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum(),
        Band::Full => x.iter().map(|&v| (v as f64) * (v as f64)).sum(),
    };
    sum / x.len() as f64
}

/// Per-image band-energy priors `[B][E]`.
fn priors(x: &[f32], dims: &LoraMoeDims, bands: &[Band], h: &[f64]) -> Vec<Vec<f64>> {
    let lowpass_dims = LowpassDims { batch: dims.batch, tokens: dims.tokens, channels: dims.d };
    let low = filter_tokens_parallel(x, lowpass_dims, h);
    let per_image = dims.tokens * dims.d;
    x.par_chunks(per_image)
        .zip(low.par_chunks(per_image))
        .map(|(xb, lb)| {
            let energies: Vec<f64> = bands.iter().map(|&band| band_energy(band, xb, lb)).collect();
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

/// The LoRA-MoE layer in f32 on the CPU, `dims` from [`LoraMoeInputs::validate`]. Shapes as
/// [`super::reference::lora_moe`].
pub(crate) fn lora_moe(
    inputs: &LoraMoeInputs<'_, f32>,
    dims: LoraMoeDims,
    config: &LoraMoeConfig,
) -> Result<LoraMoeOutput<f32>> {
    let h = gaussian_taps(config.taps, config.sigma)?;
    let (rows, width) = (dims.batch * dims.tokens, dims.experts * dims.rank);
    let x = inputs.x.data();

    let priors = priors(x, &dims, &config.bands, &h);
    let guidance = inputs.guidance.map_or(x, |g| g.data());
    let logits = matmul_nt(guidance, rows, dims.dg, inputs.router.data(), dims.experts)?;
    let gates: Vec<f64> = logits
        .par_chunks(dims.experts)
        .enumerate()
        .flat_map_iter(|(row, l)| {
            let mut g: Vec<f64> = l.iter().map(|&v| v as f64 / config.temperature).collect();
            gate_token(&mut g, &priors[row / dims.tokens], config.lambda, config.top_k);
            g
        })
        .collect();

    let mut shrunk = matmul_nt(x, rows, dims.d, inputs.lora_a.data(), width)?;
    filter_shrunk(&mut shrunk, &dims, &config.bands, &h);
    let scale = config.scale_for(dims.rank);
    shrunk.par_chunks_mut(width).zip(gates.par_chunks(dims.experts)).for_each(|(row, g)| {
        for (e, cols) in row.chunks_mut(dims.rank).enumerate() {
            let factor = (scale * g[e]) as f32;
            cols.iter_mut().for_each(|v| *v *= factor);
        }
    });

    // y = [x | u] · [W | B_1 .. B_E]^T: one GEMM over the augmented K.
    let k = dims.d + width;
    let augmented_x: Vec<f32> = x
        .par_chunks(dims.d)
        .zip(shrunk.par_chunks(width))
        .flat_map_iter(|(xr, ur)| xr.iter().chain(ur).copied())
        .collect();
    let (weight, lora_b) = (inputs.weight.data(), inputs.lora_b.data());
    let augmented_w: Vec<f32> = (0..dims.n)
        .into_par_iter()
        .flat_map_iter(|o| {
            let base = weight[o * dims.d..(o + 1) * dims.d].iter().copied();
            let lora = (0..dims.experts).flat_map(move |e| {
                lora_b[(e * dims.n + o) * dims.rank..(e * dims.n + o + 1) * dims.rank].iter().copied()
            });
            base.chain(lora)
        })
        .collect();
    let mut y = matmul_nt(&augmented_x, rows, k, &augmented_w, dims.n)?;
    if let Some(bias) = inputs.bias {
        y.par_chunks_mut(dims.n).for_each(|row| row.iter_mut().zip(bias.data()).for_each(|(v, b)| *v += b));
    }
    Ok(LoraMoeOutput {
        y: Tensor { data: y, shape: vec![dims.batch, dims.tokens, dims.n] },
        gates: Tensor {
            data: gates.into_iter().map(|g| g as f32).collect(),
            shape: vec![dims.batch, dims.tokens, dims.experts],
        },
    })
}
