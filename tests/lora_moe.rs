//! The LoRA-MoE reference: hand-checked cases, relations and properties; the CPU backend
//! against it; bad input. (Every backend runs the shared check cases in tests/backends.rs.)

use candle_core::{DType, Device as CDevice, Tensor as CTensor};
use fape_kernels::candle_ops::{self, LoraMoeWeights};
use fape_kernels::lora_moe::{
    self, reference, Band, LoraMoeConfig, LoraMoeDims, LoraMoeInputs, LoraMoeTensors, TOLERANCE_BF16, TOLERANCE_F32,
};
use fape_kernels::testing::assert_close;
use fape_kernels::{Device, FapeError, Tensor, View};
use half::bf16;
use proptest::prelude::*;

type Problem = LoraMoeTensors;

fn dims(b: usize, t: usize, d: usize, n: usize, e: usize, r: usize) -> LoraMoeDims {
    LoraMoeDims { batch: b, tokens: t, d, n, experts: e, rank: r, dg: d }
}

fn random(seed: u64, b: usize, t: usize, d: usize, n: usize, e: usize, r: usize) -> Problem {
    LoraMoeTensors::random(seed, dims(b, t, d, n, e, r), true)
}

/// A problem from explicit values: x, weight, bias, lora_a, lora_b, router.
fn from_parts([b, t, d, n, e, r]: [usize; 6], values: [Vec<f32>; 6]) -> Problem {
    let [x, weight, bias, lora_a, lora_b, router] = values;
    let tensor = |data, shape: &[usize]| Tensor::new(data, shape.to_vec()).unwrap();
    LoraMoeTensors {
        x: tensor(x, &[b, t, d]),
        weight: tensor(weight, &[n, d]),
        bias: Some(tensor(bias, &[n])),
        lora_a: tensor(lora_a, &[e, r, d]),
        lora_b: tensor(lora_b, &[e, n, r]),
        router: tensor(router, &[e, d]),
        guidance: None,
    }
}

/// `x W^T + bias`, computed here independently of the crate.
fn base_projection(p: &Problem) -> Vec<f64> {
    let d = p.x.shape[2];
    let bias = &p.bias.as_ref().unwrap().data;
    let mut y = Vec::new();
    for row in p.x.data.chunks(d) {
        for (w, b) in p.weight.data.chunks(d).zip(bias) {
            y.push(row.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() + *b as f64);
        }
    }
    y
}

fn config(bands: &[Band]) -> LoraMoeConfig {
    LoraMoeConfig { bands: bands.to_vec(), ..LoraMoeConfig::default() }
}

/// A config whose gates ignore the band-energy prior (lambda = 1). With one expert the gate is
/// then exactly 1; with the prior it would be 1 - (1-lambda) * 1e-12 / energy (the contract's
/// epsilon), which exact hand computations should not have to model.
fn router_only(bands: &[Band]) -> LoraMoeConfig {
    LoraMoeConfig { lambda: 1.0, ..config(bands) }
}

#[test]
fn reference_single_full_expert_matches_hand_computation() {
    // y = 2x + 0.5 + scale(=1/r=1) * gate(=1) * (3x) * 4 = 14x + 0.5
    let p =
        from_parts([1, 3, 1, 1, 1, 1], [vec![1.0, 2.0, -1.0], vec![2.0], vec![0.5], vec![3.0], vec![4.0], vec![1.0]]);
    let out = reference::lora_moe(&p.inputs(), &router_only(&[Band::Full])).unwrap();
    assert_eq!(out.y.shape, vec![1, 3, 1]);
    assert_close("y", &out.y.data, &[14.5, 28.5, -13.5], 1e-15);
    assert_close("gates", &out.gates.data, &[1.0, 1.0, 1.0], 1e-15);
}

#[test]
fn reference_low_band_matches_hand_computation() {
    // One expert on the low band, taps 3, sigma 1: h = [a, 1, a] / (1 + 2a), a = e^-1/2.
    let p =
        from_parts([1, 3, 1, 1, 1, 1], [vec![1.0, 2.0, 3.0], vec![0.0], vec![0.0], vec![1.0], vec![1.0], vec![1.0]]);
    let cfg = LoraMoeConfig { taps: 3, sigma: 1.0, ..router_only(&[Band::Low]) };
    let a = (-0.5f64).exp();
    let s = 1.0 + 2.0 * a;
    let expected = [(1.0 + 2.0 * a) / s, (a + 2.0 + 3.0 * a) / s, (2.0 * a + 3.0) / s];
    let out = reference::lora_moe(&p.inputs(), &cfg).unwrap();
    assert_close("y", &out.y.data, &expected, 1e-15);
}

#[test]
fn reference_prior_follows_band_energies() {
    // lambda = 0: the gates are the prior, the same for every token of the image; a slowly
    // varying sequence puts nearly all its energy in the low band.
    let t = 64;
    let x: Vec<f32> = (0..t).map(|i| (i as f32 * 0.05).sin() + 2.0).collect();
    let p = from_parts([1, t, 1, 1, 2, 1], [x, vec![1.0], vec![0.0], vec![1.0, 1.0], vec![1.0, 1.0], vec![1.0, -1.0]]);
    let cfg = LoraMoeConfig { lambda: 0.0, ..config(&[Band::Low, Band::High]) };
    let out = reference::lora_moe(&p.inputs(), &cfg).unwrap();
    let first = [out.gates.data[0], out.gates.data[1]];
    assert!(first[0] > 0.95, "low-band prior {first:?}");
    for g in out.gates.data.chunks(2) {
        assert_eq!(g, first);
    }
}

#[test]
fn cpu_matches_reference_on_awkward_shapes() {
    for (seed, (b, t, d, n, e, r)) in
        [(1, 1, 8, 3, 1, 4), (3, 37, 40, 24, 2, 8), (2, 130, 24, 72, 4, 16)].into_iter().enumerate()
    {
        let p = random(seed as u64, b, t, d, n, e, r);
        for top_k in [0, 1] {
            let bands: Vec<Band> = (0..e).map(|i| [Band::Low, Band::High, Band::Full][i % 3]).collect();
            let cfg = LoraMoeConfig { top_k, ..config(&bands) };
            let got = lora_moe::lora_moe(&Device::Cpu, &p.inputs(), &cfg).unwrap();
            let expected = reference::lora_moe(&p.inputs(), &cfg).unwrap();
            let what = format!("cpu y B{b} T{t} d{d} n{n} E{e} r{r} k{top_k}");
            assert_close(&what, &got.y.data, &expected.y.data, TOLERANCE_F32);
            assert_close(&format!("{what} gates"), &got.gates.data, &expected.gates.data, TOLERANCE_F32);
        }
    }
}

#[test]
fn cpu_matches_reference_with_guidance_without_bias_and_long_filters() {
    // Guidance (the router's separate GEMM), no bias (no ones column), filters longer than the
    // sequence and token counts across the energy blocks of 16.
    let cases =
        [(2, 17, 40, 24, 2, 8, 12, false, 9), (1, 5, 33, 7, 3, 4, 33, true, 21), (3, 33, 16, 40, 2, 2, 5, false, 1)];
    for (seed, (b, t, d, n, e, r, dg, bias, taps)) in cases.into_iter().enumerate() {
        let p = LoraMoeTensors::random(
            10 + seed as u64,
            LoraMoeDims { batch: b, tokens: t, d, n, experts: e, rank: r, dg },
            bias,
        );
        let bands: Vec<Band> = (0..e).map(|i| [Band::High, Band::Full, Band::Low][i % 3]).collect();
        let cfg = LoraMoeConfig { taps, ..config(&bands) };
        let got = lora_moe::lora_moe(&Device::Cpu, &p.inputs(), &cfg).unwrap();
        let expected = reference::lora_moe(&p.inputs(), &cfg).unwrap();
        let what = format!("cpu y B{b} T{t} d{d} n{n} E{e} r{r} dg{dg} bias {bias} taps {taps}");
        assert_close(&what, &got.y.data, &expected.y.data, TOLERANCE_F32);
        assert_close(&format!("{what} gates"), &got.gates.data, &expected.gates.data, TOLERANCE_F32);
    }
}

#[test]
fn nan_in_x_propagates_without_crash() {
    let mut p = random(5, 2, 9, 8, 4, 2, 2);
    p.x.data[3] = f32::NAN;
    for device in [Device::Reference, Device::Cpu] {
        let out =
            lora_moe::lora_moe(&device, &p.inputs(), &LoraMoeConfig { top_k: 1, ..config(&[Band::Low, Band::High]) })
                .unwrap();
        // The NaN poisons image 0's energy prior, hence all of image 0; image 1 stays finite.
        let per_image = p.x.shape[1] * p.weight.shape[0];
        assert!(out.y.data[..per_image].iter().all(|v| v.is_nan()), "{device:?}");
        assert!(out.y.data[per_image..].iter().all(|v| v.is_finite()), "{device:?}");
    }
}

fn expect_config_error(p: &Problem, cfg: LoraMoeConfig, field: &str) {
    match reference::lora_moe(&p.inputs(), &cfg) {
        Err(FapeError::Config { field: f, .. }) => assert_eq!(f, field),
        other => panic!("expected a config error on `{field}`, got {other:?}"),
    }
}

#[test]
fn bad_config_is_a_typed_error() {
    let p = random(9, 1, 5, 8, 4, 2, 2);
    let base = config(&[Band::Low, Band::High]);
    expect_config_error(&p, LoraMoeConfig { taps: 8, ..base.clone() }, "taps");
    expect_config_error(&p, LoraMoeConfig { sigma: 0.0, ..base.clone() }, "sigma");
    expect_config_error(&p, LoraMoeConfig { sigma: f64::NAN, ..base.clone() }, "sigma");
    expect_config_error(&p, LoraMoeConfig { temperature: -1.0, ..base.clone() }, "temperature");
    expect_config_error(&p, LoraMoeConfig { lambda: 1.5, ..base.clone() }, "lambda");
    expect_config_error(&p, LoraMoeConfig { top_k: 3, ..base.clone() }, "top_k");
    expect_config_error(&p, config(&[Band::Low]), "bands");
}

#[test]
fn mismatched_shapes_name_the_tensor() {
    let p = random(10, 1, 5, 8, 4, 2, 2);
    let short = vec![0.5f32; 2 * 4 * 3];
    let shape = [2, 4, 3];
    let inputs = LoraMoeInputs { lora_b: View::new("lora_moe", "lora_b", &short, &shape).unwrap(), ..p.inputs() };
    match reference::lora_moe(&inputs, &config(&[Band::Low, Band::High])) {
        Err(FapeError::Shape { tensor: "lora_b", actual, .. }) => assert_eq!(actual, vec![2, 4, 3]),
        other => panic!("expected a shape error on lora_b, got {other:?}"),
    }
    let empty: Vec<f32> = Vec::new();
    let empty_shape = [1, 0, 8];
    let inputs = LoraMoeInputs { x: View::new("lora_moe", "x", &empty, &empty_shape).unwrap(), ..p.inputs() };
    assert!(matches!(
        lora_moe::lora_moe(&Device::Cpu, &inputs, &LoraMoeConfig::default()),
        Err(FapeError::Shape { tensor: "x", .. })
    ));
}

/// Seeded random problems of small awkward extents.
fn problem_strategy() -> impl Strategy<Value = (u64, LoraMoeDims)> {
    (any::<u64>(), 1usize..3, 1usize..20, 1usize..12, 1usize..10, 1usize..4, 1usize..5)
        .prop_map(|(seed, b, t, d, n, e, r)| (seed, dims(b, t, d, n, e, r)))
}

fn cycling_bands(experts: usize) -> Vec<Band> {
    (0..experts).map(|i| [Band::Low, Band::High, Band::Full][i % 3]).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn zero_lora_b_gives_the_base_projection((seed, dims) in problem_strategy()) {
        let mut p = LoraMoeTensors::random(seed, dims, true);
        p.lora_b.data.iter_mut().for_each(|v| *v = 0.0);
        let out = reference::lora_moe(&p.inputs(), &config(&cycling_bands(dims.experts))).unwrap();
        assert_close("y", &out.y.data, &base_projection(&p), 1e-12);
    }

    #[test]
    fn gates_sum_to_one_and_top_k_keeps_k((seed, dims) in problem_strategy(), k in 0usize..4, lambda in 0.0f64..=1.0) {
        // x in [0.5, 1): every band's energy is at least (h_center * 0.5)^2 > 0.01 (h_center =
        // 0.204 for 9 taps, sigma 2), so the prior's 1e-12 epsilon moves the sum by < 1e-10.
        let mut p = LoraMoeTensors::random(seed, dims, true);
        p.x.data.iter_mut().for_each(|v| *v = 0.5 + v.abs() / 2.0);
        let top_k = k.min(dims.experts);
        let cfg = LoraMoeConfig { top_k, lambda, ..config(&cycling_bands(dims.experts)) };
        let out = reference::lora_moe(&p.inputs(), &cfg).unwrap();
        for g in out.gates.data.chunks(dims.experts) {
            let sum: f64 = g.iter().sum();
            prop_assert!((sum - 1.0).abs() < 1e-9, "gates {:?}", g);
            let nonzero = g.iter().filter(|&&v| v != 0.0).count();
            prop_assert!(nonzero <= if top_k == 0 { dims.experts } else { top_k }, "gates {:?}", g);
            prop_assert!(nonzero >= 1);
        }
    }

    #[test]
    fn one_full_expert_is_plain_lora((seed, dims) in problem_strategy(), scale in -2.0f64..2.0) {
        let LoraMoeDims { d, n, rank: r, .. } = dims;
        let p = LoraMoeTensors::random(seed, LoraMoeDims { experts: 1, ..dims }, true);
        let cfg = LoraMoeConfig { scale: Some(scale), ..router_only(&[Band::Full]) };
        let out = reference::lora_moe(&p.inputs(), &cfg).unwrap();
        let mut expected = base_projection(&p);
        for (row, y) in p.x.data.chunks(d).zip(expected.chunks_mut(n)) {
            let shrunk: Vec<f64> =
                p.lora_a.data.chunks(d).map(|a| row.iter().zip(a).map(|(&x, &w)| x as f64 * w as f64).sum()).collect();
            for (o, yo) in y.iter_mut().enumerate() {
                let b = &p.lora_b.data[o * r..(o + 1) * r];
                *yo += scale * b.iter().zip(&shrunk).map(|(&b, s)| b as f64 * s).sum::<f64>();
            }
        }
        assert_close("y", &out.y.data, &expected, 1e-12);
    }

    #[test]
    fn low_plus_high_experts_with_equal_weights_see_x((seed, dims) in problem_strategy()) {
        // Two experts with the same A and B and lambda = 1 with a zero router: gates 1/2 each,
        // so the LoRA term is scale/2 * ((low + high) A^T) B^T = scale/2 * (x A^T) B^T.
        let one = LoraMoeTensors::random(seed, LoraMoeDims { experts: 1, ..dims }, true);
        let doubled = |t: &Tensor<f32>| {
            let shape = [vec![2], t.shape[1..].to_vec()].concat();
            Tensor::new([t.data.clone(), t.data.clone()].concat(), shape).unwrap()
        };
        let mut two = LoraMoeTensors { lora_a: doubled(&one.lora_a), lora_b: doubled(&one.lora_b), router: doubled(&one.router), ..one.clone() };
        two.router.data.iter_mut().for_each(|v| *v = 0.0);
        let cfg = LoraMoeConfig { lambda: 1.0, scale: Some(2.0), ..config(&[Band::Low, Band::High]) };
        let split = reference::lora_moe(&two.inputs(), &cfg).unwrap();
        let whole = reference::lora_moe(&one.inputs(), &LoraMoeConfig { scale: Some(1.0), ..router_only(&[Band::Full]) }).unwrap();
        assert_close("y", &split.y.data, &whole.y.data, 1e-12);
    }
}

#[test]
fn cpu_bf16_matches_reference_on_the_same_bf16_values() {
    for (seed, (b, t, d, n, e, r)) in [(11, (1, 1, 8, 3, 1, 4)), (12, (3, 37, 40, 24, 2, 8))] {
        let p = random(seed, b, t, d, n, e, r).cast::<bf16>();
        let bands = cycling_bands(e);
        for top_k in [0, 1] {
            let cfg = LoraMoeConfig { top_k, ..config(&bands) };
            let got = lora_moe::lora_moe(&Device::Cpu, &p.inputs(), &cfg).unwrap();
            let expected = reference::lora_moe(&p.inputs(), &cfg).unwrap();
            let what = format!("cpu bf16 y B{b} T{t} d{d} n{n} E{e} r{r} k{top_k}");
            assert_close(&what, &got.y.data, &expected.y.data, TOLERANCE_BF16);
            assert_close(&format!("{what} gates"), &got.gates.data, &expected.gates.data, TOLERANCE_BF16);
        }
    }
}

/// `tensors` as candle CPU tensors in `dtype`: x, weights and guidance.
fn candle_problem(p: &Problem, dtype: DType) -> (CTensor, LoraMoeWeights, Option<CTensor>) {
    let t = |v: &Tensor<f32>| {
        CTensor::from_slice(&v.data, v.shape.as_slice(), &CDevice::Cpu).unwrap().to_dtype(dtype).unwrap()
    };
    let weights = LoraMoeWeights {
        weight: t(&p.weight),
        bias: p.bias.as_ref().map(t),
        lora_a: t(&p.lora_a),
        lora_b: t(&p.lora_b),
        router: t(&p.router),
    };
    (t(&p.x), weights, p.guidance.as_ref().map(t))
}

#[test]
fn candle_op_matches_reference_in_f32_and_bf16() {
    for (seed, guided) in [(21u64, false), (22, true)] {
        let dims =
            LoraMoeDims { batch: 2, tokens: 13, d: 24, n: 10, experts: 2, rank: 4, dg: if guided { 16 } else { 24 } };
        let p = LoraMoeTensors::random(seed, dims, true);
        let cfg = LoraMoeConfig { top_k: 1, ..config(&[Band::Low, Band::High]) };
        for (dtype, tolerance) in [(DType::F32, TOLERANCE_F32), (DType::BF16, TOLERANCE_BF16)] {
            let (x, weights, guidance) = candle_problem(&p, dtype);
            let y = candle_ops::lora_moe(&x, &weights, guidance.as_ref(), &cfg).unwrap();
            assert_eq!((y.dims(), y.dtype()), (&[2, 13, 10][..], dtype));
            let got: Vec<f32> = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            // The reference reads the values the op saw (bf16-rounded for bf16).
            let seen = if dtype == DType::BF16 { p.cast::<bf16>().cast::<f32>() } else { p.clone() };
            let expected = reference::lora_moe(&seen.inputs(), &cfg).unwrap();
            assert_close(&format!("candle {dtype:?} guided {guided}"), &got, &expected.y.data, tolerance);
        }
    }
}

#[test]
fn candle_op_bad_input_is_a_typed_error() {
    let p = random(23, 1, 5, 8, 4, 2, 2);
    let (x, weights, _) = candle_problem(&p, DType::F32);
    let cfg = config(&[Band::Low, Band::High]);
    let fape_error = |e: candle_core::Error| -> String { e.to_string() };
    // lora_b with the wrong rank.
    let bad_b =
        LoraMoeWeights { lora_b: CTensor::zeros((2, 4, 3), DType::F32, &CDevice::Cpu).unwrap(), ..weights.clone() };
    let msg = fape_error(candle_ops::lora_moe(&x, &bad_b, None, &cfg).unwrap_err());
    assert!(msg.contains("lora_b"), "{msg}");
    // A weight in another dtype than x.
    let mixed = LoraMoeWeights { router: weights.router.to_dtype(DType::BF16).unwrap(), ..weights.clone() };
    let msg = fape_error(candle_ops::lora_moe(&x, &mixed, None, &cfg).unwrap_err());
    assert!(msg.contains("router") && msg.contains("dtype"), "{msg}");
    // Even taps, and an empty x.
    let msg =
        fape_error(candle_ops::lora_moe(&x, &weights, None, &LoraMoeConfig { taps: 4, ..cfg.clone() }).unwrap_err());
    assert!(msg.contains("taps"), "{msg}");
    let empty = CTensor::zeros((1, 0, 8), DType::F32, &CDevice::Cpu).unwrap();
    let msg = fape_error(candle_ops::lora_moe(&empty, &weights, None, &cfg).unwrap_err());
    assert!(msg.contains("`x`"), "{msg}");
}

#[test]
fn more_bad_config_and_shapes_are_typed_errors() {
    let p = random(24, 2, 5, 8, 4, 2, 2);
    let base = config(&[Band::Low, Band::High]);
    expect_config_error(&p, LoraMoeConfig { temperature: 0.0, ..base.clone() }, "temperature");
    expect_config_error(&p, LoraMoeConfig { lambda: -0.1, ..base.clone() }, "lambda");
    expect_config_error(&p, LoraMoeConfig { lambda: f64::NAN, ..base.clone() }, "lambda");
    expect_config_error(&p, LoraMoeConfig { sigma: -2.0, ..base.clone() }, "sigma");
    expect_config_error(&p, LoraMoeConfig { taps: 0, ..base.clone() }, "taps");
    expect_config_error(&p, LoraMoeConfig { scale: Some(f64::INFINITY), ..base.clone() }, "scale");

    // Each tensor whose extents disagree with the others is named, for f32 and bf16 alike.
    let wrong = |tensor: &'static str, shape: &[usize]| {
        let data = vec![0.25f32; shape.iter().product()];
        let view = View::new("lora_moe", "t", &data, shape).unwrap();
        let inputs = match tensor {
            "router" => LoraMoeInputs { router: view, ..p.inputs() },
            "weight" => LoraMoeInputs { weight: view, ..p.inputs() },
            "lora_a" => LoraMoeInputs { lora_a: view, ..p.inputs() },
            "bias" => LoraMoeInputs { bias: Some(view), ..p.inputs() },
            "guidance" => LoraMoeInputs { guidance: Some(view), ..p.inputs() },
            other => panic!("no tensor {other}"),
        };
        match lora_moe::lora_moe(&Device::Cpu, &inputs, &base) {
            Err(FapeError::Shape { tensor: t, .. }) => assert_eq!(t, tensor),
            other => panic!("expected a shape error on `{tensor}`, got {other:?}"),
        }
        let bf = LoraMoeTensors::<bf16>::from_inputs(&inputs);
        match lora_moe::lora_moe(&Device::Cpu, &bf.inputs(), &base) {
            Err(FapeError::Shape { tensor: t, .. }) => assert_eq!(t, tensor),
            other => panic!("bf16: expected a shape error on `{tensor}`, got {other:?}"),
        }
    };
    wrong("router", &[3, 8]); // E = 3 against lora_a's 2 experts
    wrong("weight", &[4, 6]); // d = 6 against x's 8
    wrong("lora_a", &[2, 2, 7]);
    wrong("bias", &[5]);
    wrong("guidance", &[1, 5, 8]); // one image against x's two
    wrong("router", &[2, 0]); // empty
}

#[test]
fn nan_in_bf16_x_propagates_without_crash() {
    let mut p = random(25, 2, 9, 8, 4, 2, 2);
    p.x.data[3] = f32::NAN;
    let p = p.cast::<bf16>();
    let cfg = LoraMoeConfig { top_k: 1, ..config(&[Band::Low, Band::High]) };
    let out = lora_moe::lora_moe(&Device::Cpu, &p.inputs(), &cfg).unwrap();
    let per_image = 9 * 4;
    assert!(out.y.data[..per_image].iter().all(|v| v.is_nan()));
    assert!(out.y.data[per_image..].iter().all(|v| v.is_finite()));
}
