//! Attention: hand-checked reference cases, properties of the reference, the CPU backend
//! against the reference, numerical edge cases and input validation.

use fape_kernels::attention::{self, reference, AttentionConfig, AttentionDims, AttentionInputs, OP, TOLERANCE_F32};
use fape_kernels::testing::{assert_close, rng, uniform};
use fape_kernels::{Device, FapeError, Real, Tensor};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Owned inputs of one attention call.
#[derive(Debug, Clone)]
struct Owned<T> {
    q: Tensor<T>,
    k: Tensor<T>,
    v: Tensor<T>,
    q_norm: Option<Tensor<T>>,
    k_norm: Option<Tensor<T>>,
    rope_cos: Option<Tensor<T>>,
    rope_sin: Option<Tensor<T>>,
}

impl<T: Real> Owned<T> {
    fn inputs(&self) -> AttentionInputs<'_, T> {
        AttentionInputs {
            q_norm: self.q_norm.as_ref().map(Tensor::view),
            k_norm: self.k_norm.as_ref().map(Tensor::view),
            rope_cos: self.rope_cos.as_ref().map(Tensor::view),
            rope_sin: self.rope_sin.as_ref().map(Tensor::view),
            ..AttentionInputs::new(self.q.view(), self.k.view(), self.v.view())
        }
    }

    /// The same inputs with RoPE tables of `rows` rows whose row `l`, column `i` holds the
    /// angle `angle(l, i)`.
    fn with_rope(self, rows: usize, angle: impl Fn(usize, usize) -> f64) -> Self {
        let half = self.q.shape[3] / 2;
        let table = |f: fn(f64) -> f64| {
            let data = (0..rows * half).map(|n| T::from_f64(f(angle(n / half, n % half)))).collect();
            tensor(data, &[rows, half])
        };
        Self { rope_cos: Some(table(f64::cos)), rope_sin: Some(table(f64::sin)), ..self }
    }
}

fn tensor<T>(data: Vec<T>, shape: &[usize]) -> Tensor<T> {
    Tensor::new(data, shape.to_vec()).expect("test tensor layout")
}

fn f32s(data: &[f32], shape: &[usize]) -> Tensor<f32> {
    tensor(data.to_vec(), shape)
}

fn random<T: Real>(rng: &mut rand_chacha::ChaCha8Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor<T> {
    let n = shape.iter().product();
    let data = uniform(rng, n, lo, hi).into_iter().map(|x| T::from_f64(x as f64)).collect();
    tensor(data, shape)
}

fn dims(batch: usize, heads: usize, q_len: usize, k_len: usize, head_dim: usize) -> AttentionDims {
    AttentionDims { batch, heads, q_len, k_len, head_dim }
}

/// Random `q`, `k`, `v` in [-1,1) and, where asked, norm weights in [0.5,1.5); no RoPE.
fn random_case<T: Real>(seed: u64, d: AttentionDims, q_norm: bool, k_norm: bool) -> Owned<T> {
    let mut rng = rng(seed);
    let AttentionDims { batch: b, heads: h, q_len: lq, k_len: lk, head_dim: hd } = d;
    Owned {
        q: random(&mut rng, &[b, h, lq, hd], -1.0, 1.0),
        k: random(&mut rng, &[b, h, lk, hd], -1.0, 1.0),
        v: random(&mut rng, &[b, h, lk, hd], -1.0, 1.0),
        q_norm: q_norm.then(|| random(&mut rng, &[hd], 0.5, 1.5)),
        k_norm: k_norm.then(|| random(&mut rng, &[hd], 0.5, 1.5)),
        rope_cos: None,
        rope_sin: None,
    }
}

/// Real RoPE angles `l * 10000^(-2i/D)`.
fn flux_angle(head_dim: usize) -> impl Fn(usize, usize) -> f64 {
    move |l, i| l as f64 * 10_000f64.powf(-2.0 * i as f64 / head_dim as f64)
}

fn reference_out<T: Real>(case: &Owned<T>) -> Tensor<f64> {
    reference::attention(&case.inputs(), &AttentionConfig::default()).expect("valid inputs")
}

/// Row `row` (flattened over B, H, Lq) of a `[B,H,Lq,D]` tensor.
fn row<T>(t: &Tensor<T>, row: usize) -> &[T] {
    let d = t.shape[3];
    &t.data[row * d..(row + 1) * d]
}

fn assert_all_close(what: &str, got: &[f64], expected: &[f64], abs: f64) {
    assert_eq!(got.len(), expected.len(), "{what}: lengths");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!((g - e).abs() <= abs, "{what}[{i}]: got {g}, expected {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-checked reference cases

#[test]
fn reference_with_one_key_returns_its_value() {
    for (norms, rope) in [(false, false), (true, true)] {
        let mut case = random_case::<f32>(1, dims(2, 3, 5, 1, 8), norms, norms);
        if rope {
            case = case.with_rope(5, flux_angle(8));
        }
        let out = reference_out(&case);
        for r in 0..2 * 3 * 5 {
            let v: Vec<f64> = row(&case.v, r / 5).iter().map(|&x| x as f64).collect();
            assert_all_close("out", row(&out, r), &v, 1e-15);
        }
    }
}

#[test]
fn reference_with_two_keys_weights_by_known_scores() {
    // D = 4, default scale 1/2: scores q.k0/2 = 1 and q.k1/2 = 0.
    let case = Owned {
        q: f32s(&[2.0, 0.0, 0.0, 0.0], &[1, 1, 1, 4]),
        k: f32s(&[1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0], &[1, 1, 2, 4]),
        v: f32s(&[1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 2.0], &[1, 1, 2, 4]),
        q_norm: None,
        k_norm: None,
        rope_cos: None,
        rope_sin: None,
    };
    let expect =
        |p0: f64| -> Vec<f64> { (0..4).map(|c| p0 * (1.0 + c as f64) + (1.0 - p0) * (c as f64 - 1.0)).collect() };
    let e = std::f64::consts::E;
    assert_all_close("default scale", &reference_out(&case).data, &expect(e / (e + 1.0)), 1e-15);

    // An explicit scale of 2: scores 4 and 0.
    let config = AttentionConfig { scale: Some(2.0) };
    let out = reference::attention(&case.inputs(), &config).unwrap();
    let e4 = 4f64.exp();
    assert_all_close("scale 2", &out.data, &expect(e4 / (e4 + 1.0)), 1e-15);
}

#[test]
fn reference_applies_rms_norm_with_its_weight() {
    // q = [3,4] with weight [1,2]; k rows [1,0], [0,1] with weight [1,1]; scale 1.
    let case = Owned {
        q: f32s(&[3.0, 4.0], &[1, 1, 1, 2]),
        k: f32s(&[1.0, 0.0, 0.0, 1.0], &[1, 1, 2, 2]),
        v: f32s(&[1.0, 0.0, 0.0, 1.0], &[1, 1, 2, 2]),
        q_norm: Some(f32s(&[1.0, 2.0], &[2])),
        k_norm: Some(f32s(&[1.0, 1.0], &[2])),
        rope_cos: None,
        rope_sin: None,
    };
    let q_rms = (12.5f64 + 1e-6).sqrt();
    let k_rms = (0.5f64 + 1e-6).sqrt();
    let (s0, s1) = (3.0 / q_rms / k_rms, 8.0 / q_rms / k_rms);
    let p0 = 1.0 / (1.0 + (s1 - s0).exp());
    let out = reference::attention(&case.inputs(), &AttentionConfig { scale: Some(1.0) }).unwrap();
    assert_all_close("out", &out.data, &[p0, 1.0 - p0], 1e-14);
}

#[test]
fn reference_rotates_pairs_by_the_angle_of_each_position() {
    // Table row 0: angle 0; row 1: angle pi/2 (cos 0, sin 1). D = 2, scale 1.
    // q row 0 = [1,0] stays; q row 1 = [0,1] turns into [-1,0].
    // k row 0 = [1,0] stays; k row 1 = [1,0] turns into [0,1].
    let case = Owned {
        q: f32s(&[1.0, 0.0, 0.0, 1.0], &[1, 1, 2, 2]),
        k: f32s(&[1.0, 0.0, 1.0, 0.0], &[1, 1, 2, 2]),
        v: f32s(&[1.0, 2.0, 3.0, 4.0], &[1, 1, 2, 2]),
        q_norm: None,
        k_norm: None,
        rope_cos: Some(f32s(&[1.0, 0.0, 0.5], &[3, 1])),
        rope_sin: Some(f32s(&[0.0, 1.0, 0.5], &[3, 1])),
    };
    let out = reference::attention(&case.inputs(), &AttentionConfig { scale: Some(1.0) }).unwrap();
    let mix = |p0: f64| [p0 * 1.0 + (1.0 - p0) * 3.0, p0 * 2.0 + (1.0 - p0) * 4.0];
    let e = std::f64::consts::E;
    // Row 0: scores 1, 0. Row 1: scores -1, 0.
    let expected: Vec<f64> = [mix(e / (e + 1.0)), mix(1.0 / (1.0 + e))].concat();
    assert_all_close("out", &out.data, &expected, 1e-15);
}

#[test]
fn reference_device_is_the_reference_rounded_to_f32() {
    let case = random_case::<f32>(2, dims(1, 2, 9, 11, 16), true, true).with_rope(12, flux_angle(16));
    let config = AttentionConfig::default();
    let got = attention::attention(&Device::Reference, &case.inputs(), &config).unwrap();
    let expected = reference_out(&case).map(|&x| x as f32);
    assert_eq!(got, expected);
}

// ---------------------------------------------------------------------------------------------
// Properties of the reference (f64 inputs, so RoPE tables are exact rotations)

fn small_dims(even: bool) -> impl Strategy<Value = AttentionDims> {
    (1..=2usize, 1..=3usize, 1..=12usize, 1..=16usize, 1..=12usize)
        .prop_map(move |(b, h, lq, lk, half)| dims(b, h, lq, lk, if even { 2 * half } else { 2 * half - 1 }))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn identical_keys_average_the_values(seed in any::<u64>(), d in small_dims(false), norms in any::<(bool, bool)>()) {
        let mut case = random_case::<f64>(seed, d, norms.0, norms.1);
        // Every key row of a head equals the head's first key row.
        let hd = d.head_dim;
        for head in case.k.data.chunks_exact_mut(d.k_len * hd) {
            let first = head[..hd].to_vec();
            head.chunks_exact_mut(hd).for_each(|r| r.copy_from_slice(&first));
        }
        let out = reference_out(&case);
        for r in 0..d.batch * d.heads * d.q_len {
            let head = r / d.q_len;
            let mean: Vec<f64> = (0..hd)
                .map(|c| (0..d.k_len).map(|j| row(&case.v, head * d.k_len + j)[c]).sum::<f64>() / d.k_len as f64)
                .collect();
            assert_all_close("out", row(&out, r), &mean, 1e-12);
        }
    }

    #[test]
    fn rope_with_zero_angles_is_the_identity(seed in any::<u64>(), d in small_dims(true), extra in 0..4usize, norms in any::<(bool, bool)>()) {
        let plain = random_case::<f64>(seed, d, norms.0, norms.1);
        let rows = d.q_len.max(d.k_len) + extra;
        let rotated = plain.clone().with_rope(rows, |_, _| 0.0);
        assert_close("zero-angle rope", &reference_out(&rotated).data, &reference_out(&plain).data, 1e-15);
    }

    #[test]
    fn rope_with_one_angle_for_every_position_changes_nothing(
        seed in any::<u64>(), d in small_dims(true), angles in prop::collection::vec(-10.0..10.0f64, 12), norms in any::<(bool, bool)>()
    ) {
        // Rotating q and k by the same angles keeps every q.k, hence the norm of every vector.
        let plain = random_case::<f64>(seed, d, norms.0, norms.1);
        let rotated = plain.clone().with_rope(d.q_len.max(d.k_len), |_, i| angles[i]);
        assert_close("shared-angle rope", &reference_out(&rotated).data, &reference_out(&plain).data, 1e-12);
    }

    #[test]
    fn rope_depends_only_on_relative_positions(seed in any::<u64>(), d in small_dims(true), shift in 1..1000usize) {
        // Shifting every position by the same offset leaves every q_l.k_m (a function of l - m).
        let plain = random_case::<f64>(seed, d, true, true);
        let rows = d.q_len.max(d.k_len);
        let angle = flux_angle(d.head_dim);
        let at_zero = plain.clone().with_rope(rows, &angle);
        let shifted = plain.with_rope(rows, |l, i| angle(l + shift, i));
        assert_close("shifted rope", &reference_out(&shifted).data, &reference_out(&at_zero).data, 1e-10);
    }

    #[test]
    fn outputs_are_convex_combinations_of_value_rows(seed in any::<u64>(), d in small_dims(true), norms in any::<bool>(), rope in any::<bool>()) {
        let mut case = random_case::<f64>(seed, d, norms, norms);
        if rope {
            case = case.with_rope(d.q_len.max(d.k_len), flux_angle(d.head_dim));
        }
        let out = reference_out(&case);
        for r in 0..d.batch * d.heads * d.q_len {
            let head = r / d.q_len;
            for (c, &o) in row(&out, r).iter().enumerate() {
                let column = (0..d.k_len).map(|j| row(&case.v, head * d.k_len + j)[c]);
                let (lo, hi) = column.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
                prop_assert!(lo - 1e-12 <= o && o <= hi + 1e-12, "row {r} column {c}: {o} outside [{lo}, {hi}]");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The CPU backend against the reference

fn assert_cpu_matches(what: &str, case: &Owned<f32>, config: &AttentionConfig) {
    let got = attention::attention(&Device::Cpu, &case.inputs(), config).unwrap();
    let expected = reference::attention(&case.inputs(), config).unwrap();
    assert_eq!(got.shape, expected.shape, "{what}: shape");
    assert_close(what, &got.data, &expected.data, TOLERANCE_F32);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn cpu_matches_reference_on_awkward_shapes(
        seed in any::<u64>(),
        (b, h, lq, lk) in (1..=2usize, 1..=3usize, 1..=75usize, 1..=90usize),
        d in prop::sample::select(vec![1usize, 2, 3, 6, 15, 16, 30, 33, 64, 72, 130]),
        norms in any::<(bool, bool)>(),
        rope in any::<bool>(),
        extra_rows in 0..3usize,
        scale in prop::sample::select(vec![None, Some(0.05), Some(1.0), Some(-0.7)]),
    ) {
        let mut case = random_case::<f32>(seed, dims(b, h, lq, lk, d), norms.0, norms.1);
        let rope = rope && d % 2 == 0;
        if rope {
            case = case.with_rope(lq.max(lk) + extra_rows, flux_angle(d));
        }
        let what = format!("cpu [{b},{h},{lq},{lk},{d}] norms {norms:?} rope {rope} scale {scale:?}");
        assert_cpu_matches(&what, &case, &AttentionConfig { scale });
    }
}

#[test]
fn cpu_matches_reference_across_query_blocks() {
    for (lq, lk, d) in [(64, 64, 64), (65, 1, 128), (97, 200, 128), (1, 333, 80)] {
        let case =
            random_case::<f32>(lq as u64, dims(2, 2, lq, lk, d), true, true).with_rope(lq.max(lk), flux_angle(d));
        assert_cpu_matches(&format!("cpu Lq {lq} Lk {lk} D {d}"), &case, &AttentionConfig::default());
    }
}

// ---------------------------------------------------------------------------------------------
// Numerical edge cases

#[test]
fn huge_scores_stay_finite_and_match() {
    // q and k scaled by 200: scores of order 1e4, far beyond exp's f32 and f64 range.
    let mut case = random_case::<f32>(3, dims(2, 3, 37, 53, 64), false, false).with_rope(53, flux_angle(64));
    for x in case.q.data.iter_mut().chain(case.k.data.iter_mut()) {
        *x *= 200.0;
    }
    let expected = reference_out(&case);
    assert!(expected.data.iter().all(|x| x.is_finite()), "reference produced a non-finite output");
    for device in [Device::Reference, Device::Cpu] {
        let got = attention::attention(&device, &case.inputs(), &AttentionConfig::default()).unwrap();
        assert!(got.data.iter().all(|x| x.is_finite()), "{device:?}: non-finite output");
        assert_close(&format!("{device:?} huge scores"), &got.data, &expected.data, TOLERANCE_F32);
    }
}

#[test]
fn nan_in_q_reaches_only_its_row() {
    let d = dims(2, 2, 40, 13, 8);
    for (norms, rope) in [(false, false), (true, true)] {
        let mut clean = random_case::<f32>(4, d, norms, norms);
        if rope {
            clean = clean.with_rope(40, flux_angle(8));
        }
        let mut poisoned = clean.clone();
        let bad_row = (d.heads + 1) * d.q_len + 33; // batch 1, head 1, query 33 (second block)
        poisoned.q.data[bad_row * d.head_dim + 3] = f32::NAN;
        for device in [Device::Reference, Device::Cpu] {
            let config = AttentionConfig::default();
            let want = attention::attention(&device, &clean.inputs(), &config).unwrap();
            let got = attention::attention(&device, &poisoned.inputs(), &config).unwrap();
            for r in 0..d.batch * d.heads * d.q_len {
                if r == bad_row {
                    assert!(row(&got, r).iter().all(|x| x.is_nan()), "{device:?}: row {r} should be NaN");
                } else {
                    assert_eq!(row(&got, r), row(&want, r), "{device:?}: row {r} changed");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

/// What a bad input must produce.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Shape(&'static str),
    Config(&'static str),
}

/// Shapes of one call; data is filled in at random.
#[derive(Debug, Clone)]
struct Spec {
    q: Vec<usize>,
    k: Vec<usize>,
    v: Vec<usize>,
    q_norm: Option<Vec<usize>>,
    k_norm: Option<Vec<usize>>,
    rope_cos: Option<Vec<usize>>,
    rope_sin: Option<Vec<usize>>,
    scale: Option<f64>,
}

impl Spec {
    /// A valid call: q [1,2,3,4], k/v [1,2,5,4], norms [4], RoPE tables [5,2].
    fn valid() -> Self {
        Self {
            q: vec![1, 2, 3, 4],
            k: vec![1, 2, 5, 4],
            v: vec![1, 2, 5, 4],
            q_norm: Some(vec![4]),
            k_norm: Some(vec![4]),
            rope_cos: Some(vec![5, 2]),
            rope_sin: Some(vec![5, 2]),
            scale: None,
        }
    }

    fn build(&self) -> Owned<f32> {
        let mut rng = rng(5);
        let mut make = |shape: &[usize]| random::<f32>(&mut rng, shape, 0.5, 1.5);
        Owned {
            q: make(&self.q),
            k: make(&self.k),
            v: make(&self.v),
            q_norm: self.q_norm.as_deref().map(&mut make),
            k_norm: self.k_norm.as_deref().map(&mut make),
            rope_cos: self.rope_cos.as_deref().map(&mut make),
            rope_sin: self.rope_sin.as_deref().map(&mut make),
        }
    }
}

fn bad_cases() -> Vec<(&'static str, Spec, Expect)> {
    let ok = Spec::valid;
    vec![
        ("q rank 3", Spec { q: vec![2, 3, 4], ..ok() }, Expect::Shape("q")),
        ("q rank 5", Spec { q: vec![1, 1, 2, 3, 4], ..ok() }, Expect::Shape("q")),
        ("q empty rows", Spec { q: vec![1, 2, 0, 4], ..ok() }, Expect::Shape("q")),
        (
            "q empty heads",
            Spec { q: vec![1, 0, 3, 4], k: vec![1, 0, 5, 4], v: vec![1, 0, 5, 4], ..ok() },
            Expect::Shape("q"),
        ),
        ("k batch", Spec { k: vec![2, 2, 5, 4], v: vec![2, 2, 5, 4], ..ok() }, Expect::Shape("k")),
        ("k heads", Spec { k: vec![1, 3, 5, 4], v: vec![1, 3, 5, 4], ..ok() }, Expect::Shape("k")),
        ("k head dim", Spec { k: vec![1, 2, 5, 6], v: vec![1, 2, 5, 6], ..ok() }, Expect::Shape("k")),
        ("k rank 3", Spec { k: vec![2, 5, 4], ..ok() }, Expect::Shape("k")),
        ("k empty", Spec { k: vec![1, 2, 0, 4], v: vec![1, 2, 0, 4], ..ok() }, Expect::Shape("k")),
        ("v length", Spec { v: vec![1, 2, 6, 4], ..ok() }, Expect::Shape("v")),
        ("v head dim", Spec { v: vec![1, 2, 5, 2], ..ok() }, Expect::Shape("v")),
        ("v batch", Spec { v: vec![2, 2, 5, 4], ..ok() }, Expect::Shape("v")),
        ("v rank 5", Spec { v: vec![1, 1, 2, 5, 4], ..ok() }, Expect::Shape("v")),
        ("q_norm length", Spec { q_norm: Some(vec![5]), ..ok() }, Expect::Shape("q_norm")),
        ("q_norm rank 2", Spec { q_norm: Some(vec![1, 4]), ..ok() }, Expect::Shape("q_norm")),
        ("k_norm length", Spec { k_norm: Some(vec![2]), ..ok() }, Expect::Shape("k_norm")),
        ("cos without sin", Spec { rope_sin: None, ..ok() }, Expect::Config("rope_sin")),
        ("sin without cos", Spec { rope_cos: None, ..ok() }, Expect::Config("rope_cos")),
        ("cos width D", Spec { rope_cos: Some(vec![5, 4]), ..ok() }, Expect::Shape("rope_cos")),
        ("sin width", Spec { rope_sin: Some(vec![5, 1]), ..ok() }, Expect::Shape("rope_sin")),
        ("cos rows < Lk", Spec { rope_cos: Some(vec![4, 2]), ..ok() }, Expect::Shape("rope_cos")),
        ("sin rows < Lk", Spec { rope_sin: Some(vec![4, 2]), ..ok() }, Expect::Shape("rope_sin")),
        ("cos rows < Lq", Spec { q: vec![1, 2, 7, 4], rope_cos: Some(vec![6, 2]), ..ok() }, Expect::Shape("rope_cos")),
        ("cos rank 1", Spec { rope_cos: Some(vec![10]), ..ok() }, Expect::Shape("rope_cos")),
        (
            "odd D with rope",
            Spec { q: vec![1, 2, 3, 5], k: vec![1, 2, 5, 5], v: vec![1, 2, 5, 5], q_norm: None, k_norm: None, ..ok() },
            Expect::Shape("q"),
        ),
        ("NaN scale", Spec { scale: Some(f64::NAN), ..ok() }, Expect::Config("scale")),
        ("infinite scale", Spec { scale: Some(f64::NEG_INFINITY), ..ok() }, Expect::Config("scale")),
    ]
}

fn assert_error(what: &str, err: FapeError, expect: Expect) {
    match (&err, expect) {
        (FapeError::Shape { op, tensor, .. }, Expect::Shape(name)) => {
            assert_eq!((*op, *tensor), (OP, name), "{what}: {err}");
        }
        (FapeError::Config { op, field, .. }, Expect::Config(name)) => {
            assert_eq!((*op, *field), (OP, name), "{what}: {err}");
        }
        _ => panic!("{what}: expected {expect:?}, got {err:?}"),
    }
    assert!(err.to_string().contains(match expect {
        Expect::Shape(n) | Expect::Config(n) => n,
    }));
}

#[test]
fn the_valid_spec_is_valid() {
    let case = Spec::valid().build();
    let d = case.inputs().validate().unwrap();
    assert_eq!(d, dims(1, 2, 3, 5, 4));
    assert!(attention::attention(&Device::Cpu, &case.inputs(), &AttentionConfig::default()).is_ok());
}

#[test]
fn bad_inputs_give_typed_errors_naming_the_tensor() {
    for (what, spec, expect) in bad_cases() {
        let case = spec.build();
        let config = AttentionConfig { scale: spec.scale };
        assert_error(
            &format!("{what} (reference)"),
            reference::attention(&case.inputs(), &config).unwrap_err(),
            expect,
        );
        for device in [Device::Reference, Device::Cpu] {
            let err = attention::attention(&device, &case.inputs(), &config).unwrap_err();
            assert_error(&format!("{what} ({device:?})"), err, expect);
        }
    }
}

#[test]
fn config_validation() {
    assert!(AttentionConfig::default().validate().is_ok());
    assert!(AttentionConfig { scale: Some(0.0) }.validate().is_ok());
    assert_error(
        "inf",
        AttentionConfig { scale: Some(f64::INFINITY) }.validate().unwrap_err(),
        Expect::Config("scale"),
    );
    assert_eq!(AttentionConfig::default().scale_for(64), 0.125);
    assert_eq!(AttentionConfig { scale: Some(0.3) }.scale_for(64), 0.3);
}

#[test]
fn rope_tables_follow_the_flux_frequencies() {
    let (cos, sin) = attention::rope_tables(7, 8).unwrap();
    assert_eq!((cos.shape.as_slice(), sin.shape.as_slice()), ([7, 4].as_slice(), [7, 4].as_slice()));
    let angle = flux_angle(8);
    for l in 0..7 {
        for i in 0..4 {
            assert!((cos.data[l * 4 + i] as f64 - angle(l, i).cos()).abs() < 1e-7);
            assert!((sin.data[l * 4 + i] as f64 - angle(l, i).sin()).abs() < 1e-7);
        }
    }
    for (rows, d, field) in [(3, 5, "head_dim"), (3, 0, "head_dim"), (0, 4, "rows")] {
        assert_error("rope_tables", attention::rope_tables(rows, d).unwrap_err(), Expect::Config(field));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// RoPE keeps norms, read straight off the softmax: one query q at position 0, keys
    /// [q (same position, so the same rotation R), 0] and values [e0, e1] give out = [p0, p1]
    /// with ln(p0 / p1) = scale * |R q|^2, which must equal scale * |q|^2.
    #[test]
    fn rope_keeps_norms(seed in any::<u64>(), half in 1usize..9, angles in prop::collection::vec(-10.0f64..10.0, 8)) {
        let d = 2 * half;
        let mut g = rng(seed);
        let q: Tensor<f64> = random(&mut g, &[1, 1, 1, d], -1.0, 1.0);
        let k = tensor([q.data.clone(), vec![0.0; d]].concat(), &[1, 1, 2, d]);
        let v = tensor((0..2 * d).map(|i| if i == 0 || i == d + 1 { 1.0 } else { 0.0 }).collect(), &[1, 1, 2, d]);
        let row0: Vec<f64> = angles[..half].to_vec();
        let table = |f: fn(f64) -> f64| tensor(row0.iter().chain(&row0).map(|&a| f(a)).collect(), &[2, half]);
        let case = Owned { q: q.clone(), k, v, q_norm: None, k_norm: None, rope_cos: Some(table(f64::cos)), rope_sin: Some(table(f64::sin)) };
        let scale = 0.1;
        let out = reference::attention(&case.inputs(), &AttentionConfig { scale: Some(scale) }).unwrap();
        let norm2: f64 = q.data.iter().map(|x| x * x).sum();
        let rotated_norm2 = (out.data[0] / out.data[1]).ln() / scale;
        prop_assert!((rotated_norm2 - norm2).abs() <= 1e-10 * norm2.max(1.0), "|Rq|^2 {} vs |q|^2 {}", rotated_norm2, norm2);
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA (skipped without a GPU; a failure under FAPE_TEST_CUDA=1)

/// The CUDA device with poisoned outputs, or `None` after printing a skip.
#[cfg(feature = "cuda")]
fn cuda_or_skip(test: &str) -> Option<fape_kernels::backend::cuda::CudaDevice> {
    match fape_kernels::testing::device_or_skip(test, fape_kernels::DeviceKind::Cuda)? {
        Device::Cuda(d) => Some(d),
        other => panic!("{test}: opening CUDA gave {other:?}"),
    }
}

/// `(B,H,Lq,Lk,D)` around the kernels' tiles (64 query rows / 64 keys on tensor cores, 16 / 32
/// in f32): single rows, exact multiples, one past, Lq != Lk both ways.
#[cfg(feature = "cuda")]
const CUDA_SHAPES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 1, 1, 1, 64),
    (2, 3, 37, 53, 64),
    (1, 2, 100, 77, 128),
    (1, 1, 64, 64, 64),
    (1, 2, 65, 129, 128),
    (2, 1, 1, 300, 128),
    (1, 1, 130, 17, 64),
];

/// A random case in `T` with norms and FLUX RoPE when `extras`.
#[cfg(feature = "cuda")]
fn cuda_case<T: Real>(seed: u64, (b, h, lq, lk, d): (usize, usize, usize, usize, usize), extras: bool) -> Owned<T> {
    let case = random_case::<T>(seed, dims(b, h, lq, lk, d), extras, extras);
    if extras {
        case.with_rope(lq.max(lk), flux_angle(d))
    } else {
        case
    }
}

#[cfg(feature = "cuda")]
fn cuda_flash_matches_reference<T: attention::AttentionElement>(test: &str, tolerance: f64) {
    let Some(device) = cuda_or_skip(test) else { return };
    for (i, &shape) in CUDA_SHAPES.iter().enumerate() {
        for extras in [false, true] {
            let case = cuda_case::<T>(40 + i as u64, shape, extras);
            let mut run = attention::CudaAttention::new(&device, &case.inputs(), &AttentionConfig::default())
                .unwrap_or_else(|e| panic!("{test}: {e}"));
            run.flash().unwrap_or_else(|e| panic!("{test}: {e}"));
            let got = run.output().unwrap_or_else(|e| panic!("{test}: {e}"));
            let what = format!("{test} {} {shape:?} norms+rope={extras}", T::DTYPE);
            assert_close(&what, &got.data, &reference_out(&case).data, tolerance);
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_flash_bf16_matches_reference() {
    cuda_flash_matches_reference::<half::bf16>("cuda_flash_bf16_matches_reference", attention::TOLERANCE_BF16);
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_flash_f16_matches_reference() {
    cuda_flash_matches_reference::<half::f16>("cuda_flash_f16_matches_reference", attention::TOLERANCE_F16);
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_flash_f32_matches_reference() {
    cuda_flash_matches_reference::<f32>("cuda_flash_f32_matches_reference", TOLERANCE_F32);
}

/// The naive cuBLAS baseline in f32 is a second GPU reference: it matches the f64 reference,
/// and the bf16 tensor-core kernel matches it.
#[cfg(feature = "cuda")]
#[test]
fn cuda_naive_baseline_is_a_second_reference() {
    let test = "cuda_naive_baseline_is_a_second_reference";
    let Some(device) = cuda_or_skip(test) else { return };
    let shape = (1, 3, 150, 211, 128);
    let case = cuda_case::<f32>(7, shape, true);
    let config = AttentionConfig::default();
    let mut naive = attention::CudaAttention::new(&device, &case.inputs(), &config).expect("upload");
    naive.naive().expect("naive");
    let naive_out = naive.output().expect("naive output");
    assert_close(test, &naive_out.data, &reference_out(&case).data, TOLERANCE_F32);

    let bf16_case = cuda_case::<half::bf16>(7, shape, true);
    let mut flash = attention::CudaAttention::new(&device, &bf16_case.inputs(), &config).expect("upload");
    flash.flash().expect("flash");
    let flash_out = flash.output().expect("flash output");
    let naive_f64: Vec<f64> = naive_out.data.iter().map(|&x| f64::from(x)).collect();
    assert_close(&format!("{test}: bf16 flash vs f32 naive"), &flash_out.data, &naive_f64, attention::TOLERANCE_BF16);
}

/// Scores of order 1e4 stay finite on tensor cores (no RoPE: see `attention::check`).
#[cfg(feature = "cuda")]
#[test]
fn cuda_huge_scores_stay_finite() {
    let test = "cuda_huge_scores_stay_finite";
    let Some(device) = cuda_or_skip(test) else { return };
    let mut case = cuda_case::<f32>(9, (1, 2, 70, 90, 64), false);
    for x in case.q.data.iter_mut().chain(case.k.data.iter_mut()) {
        *x *= 200.0;
    }
    let case = Owned {
        q: case.q.map(|&x| half::bf16::from_f32(x)),
        k: case.k.map(|&x| half::bf16::from_f32(x)),
        v: case.v.map(|&x| half::bf16::from_f32(x)),
        q_norm: None,
        k_norm: None,
        rope_cos: None,
        rope_sin: None,
    };
    let got = attention::attention_typed(&Device::Cuda(device), &case.inputs(), &AttentionConfig::default())
        .expect("attention");
    assert!(got.data.iter().all(|x| x.is_finite()), "{test}: non-finite output");
    assert_close(test, &got.data, &reference_out(&case).data, attention::TOLERANCE_BF16);
}

/// Head dimensions without a tensor-core instantiation are a typed error in bf16, and run in f32.
#[cfg(feature = "cuda")]
#[test]
fn cuda_other_head_dims() {
    let test = "cuda_other_head_dims";
    let Some(device) = cuda_or_skip(test) else { return };
    let device = Device::Cuda(device);
    let bf16_case = cuda_case::<half::bf16>(11, (1, 2, 20, 30, 96), true);
    match attention::attention_typed(&device, &bf16_case.inputs(), &AttentionConfig::default()) {
        Err(FapeError::Unsupported { what, .. }) => assert!(what.contains("D = 96"), "{what}"),
        other => panic!("{test}: expected Unsupported, got {:?}", other.map(|_| ())),
    }
    let f32_case = cuda_case::<f32>(11, (1, 2, 20, 30, 96), true);
    let got = attention::attention(&device, &f32_case.inputs(), &AttentionConfig::default()).expect("f32 D=96");
    assert_close(test, &got.data, &reference_out(&f32_case).data, TOLERANCE_F32);
}
