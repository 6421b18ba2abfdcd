//! The per-token gate: router softmax blended with the per-image band-energy prior, then top-k.
//! Gates are tiny (`[B,T,E]`), so every path computes them on the host in f64 with these
//! functions (the GPU paths from the band sums and logits their kernels read back).

#[cfg(any(feature = "cube", feature = "cuda"))]
use super::config::{Band, LoraMoeConfig};

/// `prior_e = energy_e / (sum_e energy_e + 1e-12)`.
pub(crate) fn energy_prior(energies: &[f64]) -> Vec<f64> {
    let total: f64 = energies.iter().sum::<f64>() + 1e-12;
    energies.iter().map(|e| e / total).collect()
}

/// Turns one token's router logits (already divided by the temperature) into its gates in
/// place: `lambda * softmax + (1 - lambda) * prior`, then, for `top_k > 0`, keeps the k largest
/// (ties: lower expert first), zeroes the rest and renormalises the kept ones to sum 1.
/// NaN logits give NaN gates; nothing panics.
pub(crate) fn gate_token(logits: &mut [f64], prior: &[f64], lambda: f64, top_k: usize) {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for l in logits.iter_mut() {
        *l = (*l - max).exp();
        sum += *l;
    }
    for (g, p) in logits.iter_mut().zip(prior) {
        *g = lambda * (*g / sum) + (1.0 - lambda) * p;
    }
    if top_k == 0 || top_k >= logits.len() {
        return;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let kept: f64 = order[..top_k].iter().map(|&e| logits[e]).sum();
    for &e in &order[top_k..] {
        logits[e] = 0.0;
    }
    for &e in &order[..top_k] {
        logits[e] /= kept;
    }
}

#[cfg(any(feature = "cube", feature = "cuda"))]
impl Band {
    /// The band's code in the GPU kernels: low 0, high 1, full 2.
    pub(crate) fn kernel_code(self) -> u32 {
        match self {
            Band::Low => 0,
            Band::High => 1,
            Band::Full => 2,
        }
    }
}

/// The host half of the GPU paths. `band_sums[b]` = `[sum low^2, sum (x-low)^2, sum x^2]` over
/// image b's `entries` values of x; `logits` `[B*T, E]` are the router outputs before the
/// temperature. Returns the gates `[B*T, E]` (f64) and `scale * gate` (f32), the factor each
/// expert's band of the shrunk activations is multiplied by.
#[cfg(any(feature = "cube", feature = "cuda"))]
pub(crate) fn gates_from_band_sums(
    band_sums: &[[f64; 3]],
    entries: usize,
    logits: &[f32],
    tokens: usize,
    config: &LoraMoeConfig,
    rank: usize,
) -> (Vec<f64>, Vec<f32>) {
    let priors: Vec<Vec<f64>> = band_sums
        .iter()
        .map(|sums| {
            let energies: Vec<f64> =
                config.bands.iter().map(|band| sums[band.kernel_code() as usize] / entries as f64).collect();
            energy_prior(&energies)
        })
        .collect();
    let experts = config.bands.len();
    let mut gates = Vec::with_capacity(logits.len());
    for (row, l) in logits.chunks(experts).enumerate() {
        let mut g: Vec<f64> = l.iter().map(|&v| f64::from(v) / config.temperature).collect();
        gate_token(&mut g, &priors[row / tokens], config.lambda, config.top_k);
        gates.extend(g);
    }
    let scale = config.scale_for(rank);
    let factors = gates.iter().map(|&g| (scale * g) as f32).collect();
    (gates, factors)
}
