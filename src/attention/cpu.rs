//! The fast f32 CPU attention: norms, RoPE and the scale are applied once to `q` and `k`
//! ([`prepare_rows`]); each head's keys and values are packed into panels; then rayon runs over
//! (batch, head, block of query rows). A block keeps its `[rows, Lk]` scores only, so memory
//! beyond the inputs is `O(BLOCK_ROWS * Lk)` per task. Scores and outputs both come from one
//! register-tiled micro-kernel ([`tile`]) that reads each key/value panel once per block.

use std::borrow::Cow;

use rayon::prelude::*;

use super::reference::prepare_rows;
use super::{AttentionDims, AttentionInputs};
use crate::tensor::Tensor;

/// Query rows per parallel task: a multiple of [`GROUP`].
const BLOCK_ROWS: usize = 32;

/// Query rows that share each load of keys and values in [`tile`].
const GROUP: usize = 4;

/// Keys (for scores) or value columns (for outputs) per packed panel in [`tile`].
const PANEL: usize = 8;

/// Attention of validated f32 `inputs` with extents `dims` and the resolved `scale`;
/// returns `out` `[B,H,Lq,D]`.
pub(super) fn attention(inputs: &AttentionInputs<'_, f32>, dims: AttentionDims, scale: f64) -> Tensor<f32> {
    let d = dims.head_dim;
    let rope = inputs.rope().map(|(c, s)| (c.data(), s.data()));
    let q: Vec<f32> = prepare_rows(inputs.q.data(), dims.q_len, d, inputs.q_norm.map(|w| w.data()), rope, scale);
    let k: Cow<'_, [f32]> = match (inputs.k_norm, rope) {
        (None, None) => Cow::Borrowed(inputs.k.data()),
        (norm, _) => Cow::Owned(prepare_rows(inputs.k.data(), dims.k_len, d, norm.map(|w| w.data()), rope, 1.0)),
    };
    let (q_head, kv_head) = (dims.q_len * d, dims.k_len * d);
    let mut out = vec![0.0f32; q.len()];
    out.par_chunks_mut(q_head)
        .zip(q.par_chunks(q_head))
        .zip(k.par_chunks(kv_head).zip(inputs.v.data().par_chunks(kv_head)))
        .for_each(|((out_head, q_head), (k_head, v_head))| {
            let head = PackedHead::new(k_head, v_head, d);
            out_head
                .par_chunks_mut(BLOCK_ROWS * d)
                .zip(q_head.par_chunks(BLOCK_ROWS * d))
                .for_each(|(out_block, q_block)| head.attend(q_block, out_block));
        });
    Tensor { data: out, shape: inputs.q.shape().to_vec() }
}

/// One head's keys and values in the panel layout [`tile`] reads.
struct PackedHead {
    /// `ceil(Lk/PANEL)` panels of `D` entries: entry `e` of panel `p` holds `k[p*PANEL + l][e]`.
    keys: Vec<[f32; PANEL]>,
    /// `ceil(D/PANEL)` panels of `Lk` entries: entry `j` of panel `p` holds `v[j][p*PANEL + l]`.
    values: Vec<[f32; PANEL]>,
    head_dim: usize,
    k_len: usize,
}

impl PackedHead {
    /// Packs `k`, `v` `[Lk,D]`.
    fn new(k: &[f32], v: &[f32], head_dim: usize) -> Self {
        let k_len = k.len() / head_dim;
        Self {
            keys: pack(k_len, head_dim, |e, j| k[j * head_dim + e]),
            values: pack(head_dim, k_len, |j, e| v[j * head_dim + e]),
            head_dim,
            k_len,
        }
    }

    /// Attention of pre-scaled query rows `q` `[rows,D]` (`rows <= BLOCK_ROWS`) over this head;
    /// writes `out` `[rows,D]`.
    fn attend(&self, q: &[f32], out: &mut [f32]) {
        let (d, k_len) = (self.head_dim, self.k_len);
        let queries: Vec<Vec<[f32; GROUP]>> = q.chunks(GROUP * d).map(|g| interleave(g, d)).collect();
        // Scores, then softmax numerators, of each group of query rows: `[Lk][GROUP]`.
        let mut weights = vec![vec![[0.0f32; GROUP]; k_len]; queries.len()];
        for (p, panel) in self.keys.chunks_exact(d).enumerate() {
            for (query, weight) in queries.iter().zip(&mut weights) {
                let scores = tile(query, panel);
                for (l, w) in weight[p * PANEL..].iter_mut().take(PANEL).enumerate() {
                    *w = std::array::from_fn(|n| scores[n][l]);
                }
            }
        }
        let inverse_totals: Vec<[f32; GROUP]> = weights.iter_mut().map(|w| softmax_numerators(w)).collect();
        let mut out_groups: Vec<&mut [f32]> = out.chunks_mut(GROUP * d).collect();
        for (p, panel) in self.values.chunks_exact(k_len).enumerate() {
            for ((weight, inv), out_group) in weights.iter().zip(&inverse_totals).zip(&mut out_groups) {
                let sums = tile(weight, panel);
                for (n, out_row) in out_group.chunks_exact_mut(d).enumerate() {
                    for (l, o) in out_row[p * PANEL..].iter_mut().take(PANEL).enumerate() {
                        *o = sums[n][l] * inv[n];
                    }
                }
            }
        }
    }
}

/// Panels of `PANEL` lanes over `0..lanes`, each with `entries` entries: lane `l` of entry `t`
/// of panel `p` is `at(t, p*PANEL + l)`, zero past `lanes`.
fn pack(lanes: usize, entries: usize, at: impl Fn(usize, usize) -> f32) -> Vec<[f32; PANEL]> {
    let panels = lanes.div_ceil(PANEL);
    (0..panels * entries)
        .map(|i| {
            let (p, t) = (i / entries, i % entries);
            std::array::from_fn(|l| if p * PANEL + l < lanes { at(t, p * PANEL + l) } else { 0.0 })
        })
        .collect()
}

/// Up to `GROUP` rows of length `len` (`rows` `[n,len]`) as `[len][GROUP]`, zero padded.
fn interleave(rows: &[f32], len: usize) -> Vec<[f32; GROUP]> {
    (0..len).map(|e| std::array::from_fn(|n| rows.get(n * len + e).copied().unwrap_or(0.0))).collect()
}

/// The `GROUP x PANEL` product `sum_t a[t][n] * b[t][l]`: the one micro-kernel, with every
/// accumulator in registers and fixed-size inner loops the compiler vectorises over `l`.
fn tile(a: &[[f32; GROUP]], b: &[[f32; PANEL]]) -> [[f32; PANEL]; GROUP] {
    let mut acc = [[0.0f32; PANEL]; GROUP];
    for (a, b) in a.iter().zip(b) {
        for (acc, &x) in acc.iter_mut().zip(a) {
            for (acc, &y) in acc.iter_mut().zip(b) {
                *acc += x * y;
            }
        }
    }
    acc
}

/// Replaces the scores `[Lk][GROUP]` of a group of rows by `exp(score - row max)` and returns
/// `1 / sum` per row (NaN stays NaN).
fn softmax_numerators(scores: &mut [[f32; GROUP]]) -> [f32; GROUP] {
    let max = scores.iter().fold([f32::NEG_INFINITY; GROUP], |m, s| std::array::from_fn(|n| m[n].max(s[n])));
    let mut total = [0.0f32; GROUP];
    for s in scores.iter_mut() {
        for ((s, m), t) in s.iter_mut().zip(max).zip(&mut total) {
            *s = (*s - m).exp();
            *t += *s;
        }
    }
    total.map(|t| 1.0 / t)
}
