//! The exact f64 reference of attention: the op contract in straightforward loops.
//!
//! `prepare_row` (RMSNorm then RoPE, in f64) is shared with the CPU backend, which stores
//! its result in f32.

use rayon::prelude::*;

use super::{AttentionConfig, AttentionInputs, RMS_EPS};
use crate::error::Result;
use crate::tensor::{Real, Tensor};

/// Exact attention in f64. `q` `[B,H,Lq,D]`, `k`/`v` `[B,H,Lk,D]`, optional norm weights `[D]`
/// and RoPE tables `[L,D/2]` (see [`AttentionInputs`]); returns `out` `[B,H,Lq,D]`.
/// NaN in an input propagates to the outputs it reaches.
///
/// # Errors
/// Shape and config errors as [`AttentionInputs::validate`] and [`AttentionConfig::validate`].
pub fn attention<T: Real>(inputs: &AttentionInputs<'_, T>, config: &AttentionConfig) -> Result<Tensor<f64>> {
    let dims = inputs.validate()?;
    config.validate()?;
    let d = dims.head_dim;
    let rope = inputs.rope().map(|(c, s)| (c.data(), s.data()));
    let q = prepare_rows(inputs.q.data(), dims.q_len, d, inputs.q_norm.map(|w| w.data()), rope);
    let k = prepare_rows(inputs.k.data(), dims.k_len, d, inputs.k_norm.map(|w| w.data()), rope);
    let v: Vec<f64> = inputs.v.data().iter().map(|x| x.to_f64()).collect();
    let scale = config.scale_for(d);
    let kv_head = dims.k_len * d;
    let mut out = vec![0.0; q.len()];
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let head = row / dims.q_len;
        let kv = head * kv_head..(head + 1) * kv_head;
        attend_row(&q[row * d..][..d], &k[kv.clone()], &v[kv], scale, o);
    });
    Ok(Tensor { data: out, shape: inputs.q.shape().to_vec() })
}

/// One output row `out` `[D]` (zeros on entry): `sum_j w_j v_j` with
/// `w = softmax_j(q . k_j * scale)` for the query row `q` `[D]` over one head's `k`, `v`
/// `[Lk,D]`; the row max is subtracted before `exp`.
fn attend_row(q: &[f64], k: &[f64], v: &[f64], scale: f64, out: &mut [f64]) {
    let d = q.len();
    let scores: Vec<f64> =
        k.chunks_exact(d).map(|kr| q.iter().zip(kr).map(|(a, b)| a * b).sum::<f64>() * scale).collect();
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    for (w, vr) in weights.iter().zip(v.chunks_exact(d)) {
        for (o, x) in out.iter_mut().zip(vr) {
            *o += w * x;
        }
    }
    for o in out {
        *o /= total;
    }
}

/// The rows of `x` (`[B,H,L,D]` with `seq_len` = `L`, `head_dim` = `D`) after [`prepare_row`].
/// The shapes must be validated.
fn prepare_rows<T: Real>(
    x: &[T],
    seq_len: usize,
    head_dim: usize,
    norm: Option<&[T]>,
    rope: Option<(&[T], &[T])>,
) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    out.par_chunks_mut(head_dim).zip(x.par_chunks(head_dim)).enumerate().for_each(|(r, (dst, src))| {
        prepare_row(src, r % seq_len, norm, rope, dst);
    });
    out
}

/// `row` `[D]` = the row `src` `[D]` at sequence position `position` after the optional
/// RMSNorm with weight `norm` `[D]` and the optional RoPE `(cos, sin)` `[>position, D/2]`,
/// computed in f64. Shared with the CPU backend, which stores the result in f32.
pub(super) fn prepare_row<T: Real>(
    src: &[T],
    position: usize,
    norm: Option<&[T]>,
    rope: Option<(&[T], &[T])>,
    row: &mut [f64],
) {
    for (a, b) in row.iter_mut().zip(src) {
        *a = b.to_f64();
    }
    if let Some(w) = norm {
        rms_norm(row, w);
    }
    if let Some((cos, sin)) = rope {
        let half = row.len() / 2;
        let at = position * half;
        rotate_pairs(row, &cos[at..at + half], &sin[at..at + half]);
    }
}

/// `x / sqrt(mean(x^2) + eps) * w`, in place.
fn rms_norm<T: Real>(x: &mut [f64], w: &[T]) {
    let mean_square = x.iter().map(|a| a * a).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (mean_square + RMS_EPS).sqrt();
    for (a, w) in x.iter_mut().zip(w) {
        *a *= inv * w.to_f64();
    }
}

/// Rotates each pair `(x[2i], x[2i+1])` by the angle with cosine `cos[i]` and sine `sin[i]`.
fn rotate_pairs<T: Real>(x: &mut [f64], cos: &[T], sin: &[T]) {
    for ((pair, c), s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
        let (c, s) = (c.to_f64(), s.to_f64());
        let (x0, x1) = (pair[0], pair[1]);
        pair[0] = x0 * c - x1 * s;
        pair[1] = x0 * s + x1 * c;
    }
}
