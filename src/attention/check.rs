//! Attention's rows of `fape check`: seeded random inputs at awkward shapes, with and without
//! norms and RoPE, plus a case whose scores are ~1e4 (the softmax must stay stable); each in f32,
//! bf16 and f16 (the reference reads the same 16-bit values the backend got). One shape has
//! several K/V tiles of every tiled kernel (and a partial last one), so their double buffering
//! runs. On CUDA each case also checks the naive cuBLAS baseline (`attention.naive`), but for the
//! 16-bit huge-score cases (it rounds the scores themselves to 16 bits).
//!
//! The bf16 huge-score case has no RoPE: a bf16 backend rounds the rotated `q` and `k` to bf16
//! before the product (as every bf16 attention does), which at scores of 1e4 moves them by
//! O(10) and legitimately reorders a near-arg-max softmax; the f32 huge case keeps RoPE.

use super::{
    attention_typed, reference, rope_tables, AttentionConfig, AttentionElement, AttentionInputs, OP, TOLERANCE_BF16,
    TOLERANCE_F16, TOLERANCE_F32,
};
use crate::backend::Device;
use crate::check::{CaseSet, CheckRow};
use crate::error::Result;
use crate::tensor::Tensor;
use crate::testing::{rng, uniform};

/// `[B,H,Lq,Lk,D]` of the default cases. `1x1x300x45x128` spans three 128-row query blocks
/// (the last with one warp's rows partly and two warps' wholly past Lq) and a key tail.
const DEFAULT_SHAPES: [[usize; 5]; 5] =
    [[1, 1, 1, 1, 64], [2, 3, 37, 53, 64], [1, 2, 100, 77, 128], [1, 2, 70, 333, 64], [1, 1, 300, 45, 128]];

/// `[B,H,Lq,Lk,D]` added by [`CaseSet::Large`]: FLUX-like token counts.
const LARGE_SHAPES: [[usize; 5]; 2] = [[1, 24, 1536, 1536, 128], [1, 2, 4608, 4608, 128]];

/// The factor on `q` and `k` of the huge-score case: scores of order 1e4 at `D` = 64.
const HUGE: f32 = 200.0;

/// The seed of case 0; case `i` uses `SEED + i`.
const SEED: u64 = 0xA77E_0000;

/// One check case.
#[derive(Debug, Clone, Copy)]
struct Case {
    /// `[B,H,Lq,Lk,D]`.
    shape: [usize; 5],
    /// Whether `q_norm`/`k_norm` are given.
    norms: bool,
    /// Whether RoPE tables are given.
    rope: bool,
    /// The factor on `q` and `k`, whose elements are otherwise in `[-1,1)`.
    magnitude: f32,
    /// The element type the case runs in.
    dtype: Dtype,
}

/// The element types of the cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Case {
    fn plain(shape: [usize; 5], norms_and_rope: bool) -> Self {
        Self { shape, norms: norms_and_rope, rope: norms_and_rope, magnitude: 1.0, dtype: Dtype::F32 }
    }

    /// The shape column of the check table, such as `2x3x37x53x64 norm+rope`.
    fn spelling(&self) -> String {
        let [b, h, lq, lk, d] = self.shape;
        let extras = match (self.norms, self.rope, self.magnitude != 1.0) {
            (true, true, _) => " norm+rope",
            (false, true, true) => " rope huge",
            (_, _, true) => " huge",
            _ => "",
        };
        format!("{b}x{h}x{lq}x{lk}x{d}{extras}")
    }
}

/// The cases of `set`, in table order: the f32 cases, then the same in bf16, then in f16.
fn cases(set: CaseSet) -> Vec<Case> {
    let mut f32_cases: Vec<Case> =
        DEFAULT_SHAPES.iter().flat_map(|&shape| [Case::plain(shape, false), Case::plain(shape, true)]).collect();
    f32_cases.push(Case { rope: true, magnitude: HUGE, ..Case::plain(DEFAULT_SHAPES[1], false) });
    let mut half_cases: Vec<Case> =
        f32_cases.iter().map(|c| Case { rope: c.rope && c.magnitude == 1.0, ..*c }).collect();
    if set == CaseSet::Large {
        f32_cases.extend(LARGE_SHAPES.iter().map(|&shape| Case::plain(shape, true)));
        half_cases.extend(LARGE_SHAPES.iter().flat_map(|&shape| [Case::plain(shape, false), Case::plain(shape, true)]));
    }
    for dtype in [Dtype::Bf16, Dtype::F16] {
        f32_cases.extend(half_cases.iter().map(|c| Case { dtype, ..*c }));
    }
    f32_cases
}

/// Owned random inputs of one case.
struct CaseData<T = f32> {
    q: Tensor<T>,
    k: Tensor<T>,
    v: Tensor<T>,
    norms: Option<(Tensor<T>, Tensor<T>)>,
    rope: Option<(Tensor<T>, Tensor<T>)>,
}

impl CaseData {
    fn generate(case: &Case, seed: u64) -> Result<Self> {
        let [b, h, lq, lk, d] = case.shape;
        let mut rng = rng(seed);
        let mut random = |shape: Vec<usize>, lo: f32, hi: f32, factor: f32| {
            let n = shape.iter().product();
            let data = uniform(&mut rng, n, lo, hi).into_iter().map(|x| x * factor).collect();
            Tensor::new(data, shape)
        };
        let q = random(vec![b, h, lq, d], -1.0, 1.0, case.magnitude)?;
        let k = random(vec![b, h, lk, d], -1.0, 1.0, case.magnitude)?;
        let v = random(vec![b, h, lk, d], -1.0, 1.0, 1.0)?;
        let norms =
            if case.norms { Some((random(vec![d], 0.5, 1.5, 1.0)?, random(vec![d], 0.5, 1.5, 1.0)?)) } else { None };
        let rope = if case.rope { Some(rope_tables(lq.max(lk), d)?) } else { None };
        Ok(Self { q, k, v, norms, rope })
    }

    /// The same data rounded to `T` (a copy for f32).
    fn to<T: AttentionElement>(&self) -> CaseData<T> {
        let cast = |t: &Tensor<f32>| t.map(|&x| T::from_f64(f64::from(x)));
        let pair = |p: &Option<(Tensor<f32>, Tensor<f32>)>| p.as_ref().map(|(a, b)| (cast(a), cast(b)));
        CaseData {
            q: cast(&self.q),
            k: cast(&self.k),
            v: cast(&self.v),
            norms: pair(&self.norms),
            rope: pair(&self.rope),
        }
    }
}

impl<T> CaseData<T> {
    fn inputs(&self) -> AttentionInputs<'_, T> {
        AttentionInputs {
            q_norm: self.norms.as_ref().map(|(w, _)| w.view()),
            k_norm: self.norms.as_ref().map(|(_, w)| w.view()),
            rope_cos: self.rope.as_ref().map(|(c, _)| c.view()),
            rope_sin: self.rope.as_ref().map(|(_, s)| s.view()),
            ..AttentionInputs::new(self.q.view(), self.k.view(), self.v.view())
        }
    }
}

/// Runs every case of `cases` on `device` against [`reference::attention`]: one row per case,
/// and on CUDA a second row of the naive baseline.
pub(crate) fn check_rows(device: &Device, cases_set: CaseSet) -> Vec<CheckRow> {
    cases(cases_set).iter().zip(SEED..).flat_map(|(case, seed)| check_case(device, case, seed)).collect()
}

fn check_case(device: &Device, case: &Case, seed: u64) -> Vec<CheckRow> {
    match case.dtype {
        Dtype::F32 => check_typed::<f32>(device, case, seed, TOLERANCE_F32),
        Dtype::Bf16 => check_typed::<half::bf16>(device, case, seed, TOLERANCE_BF16),
        Dtype::F16 => check_typed::<half::f16>(device, case, seed, TOLERANCE_F16),
    }
}

/// The case's rows: its data rounded to `T`, run on `device` (and through the naive baseline
/// on CUDA), against the reference on the same `T` values.
fn check_typed<T: AttentionElement>(device: &Device, case: &Case, seed: u64, tolerance: f64) -> Vec<CheckRow> {
    let config = AttentionConfig::default();
    let errored = |op: &str, err| CheckRow::errored(op.to_string(), device, T::DTYPE, case.spelling(), err);
    let out = format!("{OP}.out");
    let data = match CaseData::generate(case, seed) {
        Ok(data) => data.to::<T>(),
        Err(err) => return vec![errored(&out, err)],
    };
    let expected = match reference::attention(&data.inputs(), &config) {
        Ok(expected) => expected,
        Err(err) => return vec![errored(&out, err)],
    };
    let row = |op: &str, got: Result<Tensor<T>>| match got {
        Ok(got) => CheckRow::compared(op.to_string(), device, case.spelling(), &got.data, &expected.data, tolerance),
        Err(err) => errored(op, err),
    };
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))] // the naive row is CUDA's
    let mut rows = vec![row(&out, attention_typed(device, &data.inputs(), &config))];
    // The naive baseline materialises the scores as `T`: at scores of 1e4, bf16 keeps them to a
    // spacing of 64 and f16 to one of 8, either of which can reorder a softmax whose leading
    // scores lie O(10) apart, so the 16-bit huge cases check the flash kernel only.
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(d), false) = (device, case.magnitude != 1.0 && case.dtype != Dtype::F32) {
        let naive = || {
            let mut run = super::CudaAttention::new(d, &data.inputs(), &config)?;
            run.naive()?;
            run.output()
        };
        rows.push(row(&format!("{OP}.naive"), naive()));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Outcome;

    #[test]
    fn default_cases_pass_on_host_backends() {
        for device in [Device::Reference, Device::Cpu] {
            let start = std::time::Instant::now();
            let rows = check_rows(&device, CaseSet::Default);
            eprintln!("attention check_rows(Default) on {device:?}: {:?}", start.elapsed());
            assert_eq!(rows.len(), cases(CaseSet::Default).len(), "one row per case off CUDA");
            for row in &rows {
                eprintln!("{row}");
                assert!(matches!(row.outcome, Outcome::Compared { .. }), "{row}");
                assert!(!row.failed(), "{row}");
            }
        }
    }
}
