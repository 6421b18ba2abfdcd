//! Blocked flash attention on the CPU, generic over the SIMD level ([`crate::simd`]).
//!
//! One head's keys are prepared (RMSNorm, RoPE: [`RowPrep`]) and packed with its values once
//! ([`PackedHead`]); a [`Block`] of at most [`Layout::block_rows`] query rows, prepared and
//! scaled as it starts, then walks the keys in blocks of [`KEY_BLOCK`]
//! with an online softmax, holding only `[KEY_BLOCK, block_rows]` scores. Scores are kept
//! transposed (`st[key][row]`), so that the running max, the exponentials and the sums are
//! vertical vector operations with one query row per lane, and two register-tiled
//! micro-kernels do the products: [`scores`] (`KEY_GROUP` broadcast keys times `RV` vectors of
//! rows) and [`weighted_values`] (`MR` broadcast rows times `NV` vectors of value columns).
//! Every row is computed on its own lanes, so a NaN in one query row reaches no other row.

use std::array::from_fn;

use super::reference::prepare_row;
use crate::simd::{exp, Isa, Simd, SimdKernel};

/// Keys per packed key panel: the broadcast side of the [`scores`] tile.
pub(super) const KEY_GROUP: usize = 6;

/// Keys per block of the online softmax (a multiple of [`KEY_GROUP`]).
pub(super) const KEY_BLOCK: usize = 20 * KEY_GROUP;

/// Query rows per [`weighted_values`] tile.
const VALUE_ROWS: usize = 4;

/// The extents a SIMD level packs and tiles with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    /// f32 lanes per vector of the level.
    pub lanes: usize,
    /// `D`.
    pub head_dim: usize,
    /// `D` rounded up to whole vectors: the row length of packed values and of the outputs.
    pub padded_dim: usize,
    /// Query rows per block: the row vectors of the [`scores`] tile times the lanes.
    pub block_rows: usize,
}

impl Layout {
    /// The layout of `isa` (resolved: the level that runs) for head dimension `head_dim`.
    pub(super) fn new(isa: Isa, head_dim: usize) -> Self {
        let lanes = isa.resolved().lanes();
        Self { lanes, head_dim, padded_dim: head_dim.next_multiple_of(lanes), block_rows: lanes * row_vectors(lanes) }
    }
}

/// Row vectors of the [`scores`] tile at `lanes` lanes: with `KEY_GROUP` = 6 broadcast keys,
/// 24 accumulators in AVX-512's 32 registers, 12 in AVX2's 16.
const fn row_vectors(lanes: usize) -> usize {
    if lanes >= 16 {
        4
    } else {
        2
    }
}

/// What turns a raw `q` or `k` row into the one attention multiplies: the optional RMSNorm
/// weight `[D]` and RoPE tables `[L, D/2]`, then a factor (the softmax scale for `q`).
#[derive(Debug, Clone, Copy)]
pub(super) struct RowPrep<'a> {
    pub norm: Option<&'a [f32]>,
    pub rope: Option<(&'a [f32], &'a [f32])>,
    pub factor: f64,
}

impl RowPrep<'_> {
    /// Calls `put(e, value)` for every entry `e` of the prepared row `src` `[D]` at sequence
    /// position `position`, computed in f64 in `scratch` `[D]` (copied as is when there is
    /// nothing to apply).
    #[inline(always)]
    fn apply(&self, src: &[f32], position: usize, scratch: &mut [f64], mut put: impl FnMut(usize, f32)) {
        if self.norm.is_none() && self.rope.is_none() && self.factor == 1.0 {
            src.iter().enumerate().for_each(|(e, &x)| put(e, x));
            return;
        }
        prepare_row(src, position, self.norm, self.rope, scratch);
        scratch.iter().enumerate().for_each(|(e, &x)| put(e, (x * self.factor) as f32));
    }
}

/// One head's keys and values in the layouts the micro-kernels read, zero padded to whole key
/// panels (`Lkp` keys) and whole vectors of `D`.
pub(super) struct PackedHead {
    /// `[Lkp/KEY_GROUP][D][KEY_GROUP]`: key `g*KEY_GROUP + j`, entry `e` at `(g*D + e)*KEY_GROUP + j`.
    keys: Vec<f32>,
    /// `[Lkp][padded_dim]`.
    values: Vec<f32>,
    /// `Lk`: keys past it are padding.
    k_len: usize,
    layout: Layout,
}

impl PackedHead {
    /// Packs one head's `k` (raw rows, prepared by `prep` here) and `v`, both `[Lk, D]`.
    pub(super) fn new(k: &[f32], v: &[f32], prep: &RowPrep<'_>, layout: Layout) -> Self {
        let (d, dp) = (layout.head_dim, layout.padded_dim);
        let k_len = k.len() / d;
        let padded_len = k_len.next_multiple_of(KEY_GROUP);
        let mut keys = vec![0.0; padded_len * d];
        let mut scratch = vec![0.0; d];
        for (j, key) in k.chunks_exact(d).enumerate() {
            let (group, lane) = (j / KEY_GROUP, j % KEY_GROUP);
            let panel = &mut keys[group * d * KEY_GROUP..][..d * KEY_GROUP];
            prep.apply(key, j, &mut scratch, |e, x| panel[e * KEY_GROUP + lane] = x);
        }
        let mut values = vec![0.0; padded_len * dp];
        for (dst, src) in values.chunks_exact_mut(dp).zip(v.chunks_exact(d)) {
            dst[..d].copy_from_slice(src);
        }
        Self { keys, values, k_len, layout }
    }
}

/// Attention of up to `block_rows` raw query rows `q` `[rows, D]` (at sequence positions
/// `first..first + rows`, prepared by `prep`) over one packed head, written to `out`
/// `[rows, D]`; run with [`Isa::run`] at the head's level.
pub(super) struct Block<'a> {
    pub head: &'a PackedHead,
    pub q: &'a [f32],
    pub first: usize,
    pub prep: &'a RowPrep<'a>,
    pub out: &'a mut [f32],
}

impl SimdKernel for Block<'_> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        if S::LANES >= 16 {
            self.attend::<S, { row_vectors(16) }, 4>(s);
        } else {
            self.attend::<S, { row_vectors(8) }, 2>(s);
        }
    }
}

impl Block<'_> {
    /// The block with `RV` row vectors per score tile and `NV` column vectors per value tile.
    #[inline(always)]
    fn attend<S: Simd, const RV: usize, const NV: usize>(self, s: S) {
        let Layout { lanes, head_dim: d, padded_dim: dp, block_rows: br } = self.head.layout;
        assert!(lanes == S::LANES && br == RV * lanes, "attention block laid out for another SIMD level");
        // Prepared queries transposed, `[D][br]`, zero rows past the block's rows.
        let mut qt = vec![0.0f32; d * br];
        let mut scratch = vec![0.0; d];
        for (i, row) in self.q.chunks_exact(d).enumerate() {
            self.prep.apply(row, self.first + i, &mut scratch, |e, x| qt[e * br + i] = x);
        }
        let mut st = vec![0.0f32; KEY_BLOCK * br];
        let mut acc = vec![0.0f32; br * dp];
        let mut alpha = vec![0.0f32; br];
        let mut max = [s.splat(f32::NEG_INFINITY); RV];
        let mut total = [s.splat(0.0); RV];
        let padded_len = self.head.values.len() / dp;
        for start in (0..padded_len).step_by(KEY_BLOCK) {
            let keys = (padded_len - start).min(KEY_BLOCK);
            let st = &mut st[..keys * br];
            scores::<S, RV>(s, &self.head.keys[start * d..][..keys * d], &qt, st, d);
            let valid = self.head.k_len.saturating_sub(start).min(keys);
            st[valid * br..].fill(f32::NEG_INFINITY);
            softmax_step(s, st, &mut max, &mut total, &mut alpha);
            for (row, &a) in acc.chunks_exact_mut(dp).zip(&alpha) {
                if a != 1.0 {
                    let a = s.splat(a);
                    for c in row.chunks_exact_mut(lanes) {
                        s.store(c, s.mul(s.load(c), a));
                    }
                }
            }
            weighted_values::<S, NV>(s, st, &self.head.values[start * dp..][..keys * dp], &mut acc, dp);
        }
        let mut totals = vec![0.0f32; br];
        for (t, chunk) in total.iter().zip(totals.chunks_exact_mut(lanes)) {
            s.store(chunk, *t);
        }
        for ((out, row), t) in self.out.chunks_exact_mut(d).zip(acc.chunks_exact(dp)).zip(totals) {
            let inverse = 1.0 / t;
            for (o, &x) in out.iter_mut().zip(row) {
                *o = x * inverse;
            }
        }
    }
}

/// `st[j][i] = keys_j . q_i` for one block: `keys` the block's packed panels
/// (`[keys/KEY_GROUP][D][KEY_GROUP]`), `qt` the queries `[D][RV*LANES]`, `st` `[keys][RV*LANES]`.
#[inline(always)]
fn scores<S: Simd, const RV: usize>(s: S, keys: &[f32], qt: &[f32], st: &mut [f32], d: usize) {
    let (w, br) = (S::LANES, RV * S::LANES);
    for (panel, tile) in keys.chunks_exact(d * KEY_GROUP).zip(st.chunks_exact_mut(KEY_GROUP * br)) {
        let mut acc = [[s.splat(0.0); RV]; KEY_GROUP];
        for (key_entries, q_entries) in panel.chunks_exact(KEY_GROUP).zip(qt.chunks_exact(br)) {
            let q: [S::V; RV] = from_fn(|r| s.load(&q_entries[r * w..]));
            for (acc, &k) in acc.iter_mut().zip(key_entries) {
                let k = s.splat(k);
                for (a, &q) in acc.iter_mut().zip(&q) {
                    *a = s.mul_add(k, q, *a);
                }
            }
        }
        for (row, acc) in tile.chunks_exact_mut(br).zip(&acc) {
            for (r, &a) in acc.iter().enumerate() {
                s.store(&mut row[r * w..], a);
            }
        }
    }
}

/// The online-softmax step of one key block: per row (lane), the new running max over the
/// block's scores `st` `[keys][rows]`; the scores replaced by `exp(score - max)`; the running
/// `total` rescaled and increased by their sum; `alpha` `[rows]` set to the factor
/// `exp(old max - new max)` the accumulated outputs are to be rescaled by.
#[inline(always)]
fn softmax_step<S: Simd, const RV: usize>(
    s: S,
    st: &mut [f32],
    max: &mut [S::V; RV],
    total: &mut [S::V; RV],
    alpha: &mut [f32],
) {
    let (w, br) = (S::LANES, RV * S::LANES);
    let mut new_max = *max;
    for row in st.chunks_exact(br) {
        for (m, r) in new_max.iter_mut().zip(0..) {
            *m = s.max(*m, s.load(&row[r * w..]));
        }
    }
    let mut sums = [s.splat(0.0); RV];
    for row in st.chunks_exact_mut(br) {
        for ((sum, &m), r) in sums.iter_mut().zip(&new_max).zip(0..) {
            let p = exp(s, s.sub(s.load(&row[r * w..]), m));
            s.store(&mut row[r * w..], p);
            *sum = s.add(*sum, p);
        }
    }
    for r in 0..RV {
        let a = exp(s, s.sub(max[r], new_max[r]));
        total[r] = s.mul_add(total[r], a, sums[r]);
        max[r] = new_max[r];
        s.store(&mut alpha[r * w..], a);
    }
}

/// `acc[i][c] += sum_j p[j][i] v[j][c]` for one key block: `p` `[keys][rows]`, `v`
/// `[keys][dp]`, `acc` `[rows][dp]`, in tiles of [`VALUE_ROWS`] rows and `NV` column vectors
/// (one vector at a time for the columns left over).
#[inline(always)]
fn weighted_values<S: Simd, const NV: usize>(s: S, p: &[f32], v: &[f32], acc: &mut [f32], dp: usize) {
    let (w, br) = (S::LANES, acc.len() / dp);
    let vectors = dp / w;
    let wide = vectors - vectors % NV;
    for c in (0..wide).step_by(NV) {
        for i in (0..br).step_by(VALUE_ROWS) {
            value_tile::<S, NV>(s, p, v, acc, i, c * w, dp);
        }
    }
    for c in wide..vectors {
        for i in (0..br).step_by(VALUE_ROWS) {
            value_tile::<S, 1>(s, p, v, acc, i, c * w, dp);
        }
    }
}

/// One [`weighted_values`] tile: rows `i..i + VALUE_ROWS`, columns `c..c + NV*LANES`.
#[inline(always)]
fn value_tile<S: Simd, const NV: usize>(s: S, p: &[f32], v: &[f32], acc: &mut [f32], i: usize, c: usize, dp: usize) {
    let (w, br) = (S::LANES, acc.len() / dp);
    let mut tile: [[S::V; NV]; VALUE_ROWS] = from_fn(|r| from_fn(|n| s.load(&acc[(i + r) * dp + c + n * w..])));
    for (p_row, v_row) in p.chunks_exact(br).zip(v.chunks_exact(dp)) {
        let weights = &p_row[i..i + VALUE_ROWS];
        let values: [S::V; NV] = from_fn(|n| s.load(&v_row[c + n * w..]));
        for (tile, &weight) in tile.iter_mut().zip(weights) {
            let weight = s.splat(weight);
            for (t, &x) in tile.iter_mut().zip(&values) {
                *t = s.mul_add(weight, x, *t);
            }
        }
    }
    for (r, tile) in tile.iter().enumerate() {
        for (n, &t) in tile.iter().enumerate() {
            s.store(&mut acc[(i + r) * dp + c + n * w..], t);
        }
    }
}
