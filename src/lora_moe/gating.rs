//! The per-token gate: router softmax blended with the per-image band-energy prior, then top-k.
//! Gates are tiny (`[B,T,E]`), so every host path computes them in f64 with these functions.

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
