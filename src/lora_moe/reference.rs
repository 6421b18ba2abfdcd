//! The exact f64 reference of the LoRA-MoE contract, written as the contract reads (full-width
//! band filtering, one LoRA path per expert), with tokens in parallel.

use rayon::prelude::*;

use super::config::{Band, LoraMoeConfig, LoraMoeInputs, LoraMoeOutput};
use super::gating::{energy_prior, gate_token};
use super::lowpass::{filter_tokens, gaussian_taps, LowpassDims};
use crate::error::Result;
use crate::tensor::{Real, Tensor};

fn to_f64<T: Real>(data: &[T]) -> Vec<f64> {
    data.iter().map(|v| v.to_f64()).collect()
}

/// `band(x)` of one image `[T,d]` in f64.
fn band_of(band: Band, x: &[f64], low: &[f64]) -> Vec<f64> {
    match band {
        Band::Low => low.to_vec(),
        Band::High => x.iter().zip(low).map(|(a, b)| a - b).collect(),
        Band::Full => x.to_vec(),
    }
}

/// The LoRA-MoE layer in f64: `y = x W^T + bias + scale * sum_e gate_e * (band_e(x) A_e^T) B_e^T`.
/// Shapes: see [`LoraMoeInputs`]; returns `y` `[B,T,n]` and `gates` `[B,T,E]`.
///
/// # Errors
/// The shape and config errors of [`LoraMoeInputs::validate`].
pub fn lora_moe<T: Real>(inputs: &LoraMoeInputs<'_, T>, config: &LoraMoeConfig) -> Result<LoraMoeOutput<f64>> {
    let dims = inputs.validate(config)?;
    let (tokens, d, n, experts, rank, dg) = (dims.tokens, dims.d, dims.n, dims.experts, dims.rank, dims.dg);
    let h = gaussian_taps(config.taps, config.sigma)?;
    let scale = config.scale_for(rank);
    let x = to_f64(inputs.x.data());
    let weight = to_f64(inputs.weight.data());
    let bias = inputs.bias.map(|b| to_f64(b.data()));
    let lora_a = to_f64(inputs.lora_a.data());
    let lora_b = to_f64(inputs.lora_b.data());
    let router = to_f64(inputs.router.data());
    let guidance = inputs.guidance.map(|g| to_f64(g.data()));
    let one_image = LowpassDims { batch: 1, tokens, channels: d };

    let mut y = Vec::with_capacity(dims.batch * tokens * n);
    let mut gates = Vec::with_capacity(dims.batch * tokens * experts);
    for b in 0..dims.batch {
        let xb = &x[b * tokens * d..(b + 1) * tokens * d];
        let low = filter_tokens(xb, one_image, &h);
        let bands: Vec<Vec<f64>> = config.bands.iter().map(|&band| band_of(band, xb, &low)).collect();
        let energies: Vec<f64> =
            bands.iter().map(|v| v.iter().map(|e| e * e).sum::<f64>() / (tokens * d) as f64).collect();
        let prior = energy_prior(&energies);
        let gb = guidance.as_ref().map_or(xb, |g| &g[b * tokens * dg..(b + 1) * tokens * dg]);

        let rows: Vec<(Vec<f64>, Vec<f64>)> = (0..tokens)
            .into_par_iter()
            .map(|t| {
                let g = &gb[t * dg..(t + 1) * dg];
                let mut gate: Vec<f64> =
                    (0..experts).map(|e| dot(&router[e * dg..(e + 1) * dg], g) / config.temperature).collect();
                gate_token(&mut gate, &prior, config.lambda, config.top_k);
                let xt = &xb[t * d..(t + 1) * d];
                let mut yt: Vec<f64> = (0..n)
                    .map(|o| dot(&weight[o * d..(o + 1) * d], xt) + bias.as_ref().map_or(0.0, |bv| bv[o]))
                    .collect();
                for (e, band) in bands.iter().enumerate() {
                    let bt = &band[t * d..(t + 1) * d];
                    let shrunk: Vec<f64> =
                        (0..rank).map(|j| dot(&lora_a[(e * rank + j) * d..(e * rank + j + 1) * d], bt)).collect();
                    for (o, yo) in yt.iter_mut().enumerate() {
                        let up = dot(&lora_b[(e * n + o) * rank..(e * n + o + 1) * rank], &shrunk);
                        *yo += scale * gate[e] * up;
                    }
                }
                (yt, gate)
            })
            .collect();
        for (yt, gate) in rows {
            y.extend(yt);
            gates.extend(gate);
        }
    }
    Ok(LoraMoeOutput {
        y: Tensor { data: y, shape: vec![dims.batch, tokens, n] },
        gates: Tensor { data: gates, shape: vec![dims.batch, tokens, experts] },
    })
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
