//! The fast f32 CPU attention: rayon over (batch, head), each head's keys prepared (RMSNorm,
//! RoPE) and packed with its values once ([`PackedHead`]), then rayon over blocks of query rows,
//! each prepared and scaled as it starts and run as a blocked flash attention
//! ([`super::flash`]) on the SIMD level picked at run time ([`Isa::detect`]). Memory beyond the
//! inputs and the output is one packed head per task and `O(block rows * (KEY_BLOCK + D))` per
//! block.

use rayon::prelude::*;

use super::flash::{Block, Layout, PackedHead, RowPrep};
use super::{AttentionDims, AttentionInputs};
use crate::simd::Isa;
use crate::tensor::Tensor;

/// Attention of validated f32 `inputs` with extents `dims` and the resolved `scale`, on the
/// best SIMD level here; returns `out` `[B,H,Lq,D]`.
pub(super) fn attention(inputs: &AttentionInputs<'_, f32>, dims: AttentionDims, scale: f64) -> Tensor<f32> {
    attention_on(Isa::detect(), inputs, dims, scale)
}

/// [`attention`] on the SIMD level `isa` (or the best one below it this CPU runs).
pub(super) fn attention_on(
    isa: Isa,
    inputs: &AttentionInputs<'_, f32>,
    dims: AttentionDims,
    scale: f64,
) -> Tensor<f32> {
    let d = dims.head_dim;
    let layout = Layout::new(isa, d);
    let rope = inputs.rope().map(|(c, s)| (c.data(), s.data()));
    let q_prep = RowPrep { norm: inputs.q_norm.map(|w| w.data()), rope, factor: scale };
    let k_prep = RowPrep { norm: inputs.k_norm.map(|w| w.data()), rope, factor: 1.0 };
    let (q_head, kv_head, block_rows) = (dims.q_len * d, dims.k_len * d, layout.block_rows);
    let mut out = vec![0.0f32; inputs.q.data().len()];
    out.par_chunks_mut(q_head)
        .zip(inputs.q.data().par_chunks(q_head))
        .zip(inputs.k.data().par_chunks(kv_head).zip(inputs.v.data().par_chunks(kv_head)))
        .for_each(|((out_head, q_head), (k_head, v_head))| {
            let head = PackedHead::new(k_head, v_head, &k_prep, layout);
            out_head
                .par_chunks_mut(block_rows * d)
                .zip(q_head.par_chunks(block_rows * d))
                .enumerate()
                .for_each(|(b, (out, q))| isa.run(Block { head: &head, q, first: b * block_rows, prep: &q_prep, out }));
        });
    Tensor { data: out, shape: inputs.q.shape().to_vec() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{reference, rope_tables, AttentionConfig, OP, TOLERANCE_F32};
    use crate::testing::{assert_close, rng, uniform};
    use crate::View;

    /// Every SIMD level this CPU runs (each at least once: `Isa::run` falls back otherwise).
    fn levels() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// Each level against the f64 reference at `[b,h,lq,lk,d]`, inputs scaled by `magnitude`,
    /// with norms and RoPE when `extras` (D even).
    fn check(shape: [usize; 5], extras: bool, magnitude: f32, scale: Option<f64>) {
        let [b, h, lq, lk, d] = shape;
        let mut g = rng((b * 7 + h * 5 + lq * 3 + lk + d) as u64);
        let mut random =
            |n: usize| -> Vec<f32> { uniform(&mut g, n, -1.0, 1.0).iter().map(|x| x * magnitude).collect() };
        let (q, k, v) = (random(b * h * lq * d), random(b * h * lk * d), random(b * h * lk * d));
        let norm: Vec<f32> = random(d).iter().map(|x| 1.0 + 0.5 * x / magnitude).collect();
        let (q_shape, kv_shape, norm_shape) = ([b, h, lq, d], [b, h, lk, d], [d]);
        let mut inputs = AttentionInputs::new(
            View::new(OP, "q", &q, &q_shape).expect("q"),
            View::new(OP, "k", &k, &kv_shape).expect("k"),
            View::new(OP, "v", &v, &kv_shape).expect("v"),
        );
        let tables = extras.then(|| rope_tables(lq.max(lk), d).expect("rope"));
        if let Some((cos, sin)) = &tables {
            let n = View::new(OP, "q_norm", &norm, &norm_shape).expect("norm");
            inputs = inputs.with_norms(n, n).with_rope(cos.view(), sin.view());
        }
        let config = AttentionConfig { scale };
        let dims = inputs.validate().expect("valid");
        let expected = reference::attention(&inputs, &config).expect("reference");
        for isa in levels() {
            let got = attention_on(isa, &inputs, dims, config.scale_for(d));
            let what = format!("{} {shape:?} extras {extras} magnitude {magnitude} scale {scale:?}", isa.name());
            assert_close(&what, &got.data, &expected.data, TOLERANCE_F32);
        }
    }

    #[test]
    fn every_level_matches_the_reference_at_awkward_shapes() {
        // D below, at and across the vector widths; Lq across block rows (16, 64); Lk across key
        // panels (6) and key blocks (120), shorter and longer than Lq.
        for (shape, extras) in [
            ([1, 1, 1, 1, 1], false),
            ([2, 3, 5, 7, 3], false),
            ([1, 2, 17, 121, 8], true),
            ([2, 1, 65, 13, 15], false),
            ([1, 2, 64, 241, 16], true),
            ([1, 1, 130, 250, 33], false),
            ([1, 3, 33, 1, 130], true),
            ([1, 2, 100, 37, 30], true),
        ] {
            check(shape, extras, 1.0, None);
        }
        check([1, 2, 40, 130, 24], true, 1.0, Some(-0.7));
    }

    #[test]
    fn every_level_keeps_huge_scores_finite() {
        // Scores of order 1e4 (inputs times 100, no norms): the max subtraction keeps exp in range.
        check([1, 2, 37, 253, 64], false, 100.0, None);
        check([1, 1, 20, 130, 17], false, 100.0, Some(1.0));
    }

    #[test]
    fn a_nan_query_row_stays_in_its_row_on_every_level() {
        let (lq, lk, d) = (70, 50, 20);
        let mut q = uniform(&mut rng(9), lq * d, -1.0, 1.0);
        let kv = uniform(&mut rng(10), lk * d, -1.0, 1.0);
        let (q_shape, kv_shape) = ([1, 1, lq, d], [1, 1, lk, d]);
        let dims = AttentionDims { batch: 1, heads: 1, q_len: lq, k_len: lk, head_dim: d };
        let run = |isa: Isa, q: &[f32]| {
            let inputs = AttentionInputs::new(
                View::new(OP, "q", q, &q_shape).expect("q"),
                View::new(OP, "k", &kv, &kv_shape).expect("k"),
                View::new(OP, "v", &kv, &kv_shape).expect("v"),
            );
            attention_on(isa, &inputs, dims, 0.3).data
        };
        for isa in levels() {
            let clean = run(isa, &q);
            q[67 * d + 5] = f32::NAN;
            let poisoned = run(isa, &q);
            q[67 * d + 5] = 0.5;
            for (r, (a, b)) in clean.chunks(d).zip(poisoned.chunks(d)).enumerate() {
                if r == 67 {
                    assert!(b.iter().all(|x| x.is_nan()), "{}: row {r} should be NaN", isa.name());
                } else {
                    assert_eq!(a, b, "{}: row {r} changed", isa.name());
                }
            }
        }
    }
}
