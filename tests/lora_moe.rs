//! The LoRA-MoE reference: hand-checked cases, relations and properties; the CPU backend
//! against it; bad input. (Every backend runs the shared check cases in tests/backends.rs.)

use fape_kernels::lora_moe::{self, reference, Band, LoraMoeConfig, LoraMoeInputs, TOLERANCE_F32};
use fape_kernels::testing::{assert_close, rng, uniform};
use fape_kernels::{Device, FapeError, View};
use proptest::prelude::*;

/// Owned tensors of one LoRA-MoE problem.
#[derive(Debug, Clone)]
struct Problem {
    b: usize,
    t: usize,
    d: usize,
    n: usize,
    e: usize,
    r: usize,
    x: Vec<f32>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    lora_a: Vec<f32>,
    lora_b: Vec<f32>,
    router: Vec<f32>,
    shapes: [Vec<usize>; 6],
}

impl Problem {
    fn random(seed: u64, b: usize, t: usize, d: usize, n: usize, e: usize, r: usize) -> Self {
        let mut g = rng(seed);
        Self::from_parts(
            [b, t, d, n, e, r],
            uniform(&mut g, b * t * d, -1.0, 1.0),
            uniform(&mut g, n * d, -0.5, 0.5),
            uniform(&mut g, n, -0.5, 0.5),
            uniform(&mut g, e * r * d, -0.5, 0.5),
            uniform(&mut g, e * n * r, -0.5, 0.5),
            uniform(&mut g, e * d, -1.0, 1.0),
        )
    }

    fn from_parts(
        [b, t, d, n, e, r]: [usize; 6],
        x: Vec<f32>,
        weight: Vec<f32>,
        bias: Vec<f32>,
        lora_a: Vec<f32>,
        lora_b: Vec<f32>,
        router: Vec<f32>,
    ) -> Self {
        let shapes = [vec![b, t, d], vec![n, d], vec![n], vec![e, r, d], vec![e, n, r], vec![e, d]];
        Self { b, t, d, n, e, r, x, weight, bias, lora_a, lora_b, router, shapes }
    }

    fn inputs(&self) -> LoraMoeInputs<'_, f32> {
        let op = lora_moe::OP;
        let s = &self.shapes;
        LoraMoeInputs {
            x: View::new(op, "x", &self.x, &s[0]).unwrap(),
            weight: View::new(op, "weight", &self.weight, &s[1]).unwrap(),
            bias: Some(View::new(op, "bias", &self.bias, &s[2]).unwrap()),
            lora_a: View::new(op, "lora_a", &self.lora_a, &s[3]).unwrap(),
            lora_b: View::new(op, "lora_b", &self.lora_b, &s[4]).unwrap(),
            router: View::new(op, "router", &self.router, &s[5]).unwrap(),
            guidance: None,
        }
    }

    /// `x W^T + bias`, computed here independently of the crate.
    fn base_projection(&self) -> Vec<f64> {
        let mut y = Vec::new();
        for row in self.x.chunks(self.d) {
            for o in 0..self.n {
                let w = &self.weight[o * self.d..(o + 1) * self.d];
                let dot: f64 = row.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum();
                y.push(dot + self.bias[o] as f64);
            }
        }
        y
    }
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
    let p = Problem::from_parts([1, 3, 1, 1, 1, 1], vec![1.0, 2.0, -1.0], vec![2.0], vec![0.5], vec![3.0], vec![4.0], vec![1.0]);
    let out = reference::lora_moe(&p.inputs(), &router_only(&[Band::Full])).unwrap();
    assert_eq!(out.y.shape, vec![1, 3, 1]);
    assert_close("y", &out.y.data, &[14.5, 28.5, -13.5], 1e-15);
    assert_close("gates", &out.gates.data, &[1.0, 1.0, 1.0], 1e-15);
}

#[test]
fn reference_low_band_matches_hand_computation() {
    // One expert on the low band, taps 3, sigma 1: h = [a, 1, a] / (1 + 2a), a = e^-1/2.
    let p = Problem::from_parts([1, 3, 1, 1, 1, 1], vec![1.0, 2.0, 3.0], vec![0.0], vec![0.0], vec![1.0], vec![1.0], vec![1.0]);
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
    let p = Problem::from_parts([1, t, 1, 1, 2, 1], x, vec![1.0], vec![0.0], vec![1.0, 1.0], vec![1.0, 1.0], vec![1.0, -1.0]);
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
    for (seed, (b, t, d, n, e, r)) in [(1, 1, 8, 3, 1, 4), (3, 37, 40, 24, 2, 8), (2, 130, 24, 72, 4, 16)].into_iter().enumerate() {
        let p = Problem::random(seed as u64, b, t, d, n, e, r);
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
fn nan_in_x_propagates_without_crash() {
    let mut p = Problem::random(5, 2, 9, 8, 4, 2, 2);
    p.x[3] = f32::NAN;
    for device in [Device::Reference, Device::Cpu] {
        let out = lora_moe::lora_moe(&device, &p.inputs(), &LoraMoeConfig { top_k: 1, ..config(&[Band::Low, Band::High]) }).unwrap();
        // The NaN poisons image 0's energy prior, hence all of image 0; image 1 stays finite.
        let per_image = p.t * p.n;
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
    let p = Problem::random(9, 1, 5, 8, 4, 2, 2);
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
    let p = Problem::random(10, 1, 5, 8, 4, 2, 2);
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
    assert!(matches!(lora_moe::lora_moe(&Device::Cpu, &inputs, &LoraMoeConfig::default()), Err(FapeError::Shape { tensor: "x", .. })));
}

fn problem_strategy() -> impl Strategy<Value = Problem> {
    (any::<u64>(), 1usize..3, 1usize..20, 1usize..12, 1usize..10, 1usize..4, 1usize..5)
        .prop_map(|(seed, b, t, d, n, e, r)| Problem::random(seed, b, t, d, n, e, r))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn zero_lora_b_gives_the_base_projection(mut p in problem_strategy()) {
        p.lora_b.iter_mut().for_each(|v| *v = 0.0);
        let bands: Vec<Band> = (0..p.e).map(|i| [Band::Low, Band::High, Band::Full][i % 3]).collect();
        let out = reference::lora_moe(&p.inputs(), &config(&bands)).unwrap();
        assert_close("y", &out.y.data, &p.base_projection(), 1e-12);
    }

    #[test]
    fn gates_sum_to_one_and_top_k_keeps_k(mut p in problem_strategy(), k in 0usize..4, lambda in 0.0f64..=1.0) {
        // |x| in [0.5, 1): band energies of order 0.1 or more, so the prior's 1e-12 epsilon
        // moves the sum by less than 1e-10.
        p.x.iter_mut().for_each(|v| *v = v.signum() * (0.5 + v.abs() / 2.0));
        let top_k = k.min(p.e);
        let bands: Vec<Band> = (0..p.e).map(|i| [Band::Low, Band::High, Band::Full][i % 3]).collect();
        let cfg = LoraMoeConfig { top_k, lambda, ..config(&bands) };
        let out = reference::lora_moe(&p.inputs(), &cfg).unwrap();
        for g in out.gates.data.chunks(p.e) {
            let sum: f64 = g.iter().sum();
            prop_assert!((sum - 1.0).abs() < 1e-10, "gates {:?}", g);
            let nonzero = g.iter().filter(|&&v| v != 0.0).count();
            prop_assert!(nonzero <= if top_k == 0 { p.e } else { top_k }, "gates {:?}", g);
            prop_assert!(nonzero >= 1);
        }
    }

    #[test]
    fn one_full_expert_is_plain_lora(p in problem_strategy(), scale in -2.0f64..2.0) {
        let p = Problem::random(p.x.len() as u64, p.b, p.t, p.d, p.n, 1, p.r);
        let cfg = LoraMoeConfig { scale: Some(scale), ..router_only(&[Band::Full]) };
        let out = reference::lora_moe(&p.inputs(), &cfg).unwrap();
        let mut expected = p.base_projection();
        for (row, y) in p.x.chunks(p.d).zip(expected.chunks_mut(p.n)) {
            let shrunk: Vec<f64> = p.lora_a.chunks(p.d).map(|a| row.iter().zip(a).map(|(&x, &w)| x as f64 * w as f64).sum()).collect();
            for (o, yo) in y.iter_mut().enumerate() {
                let b = &p.lora_b[o * p.r..(o + 1) * p.r];
                *yo += scale * b.iter().zip(&shrunk).map(|(&b, s)| b as f64 * s).sum::<f64>();
            }
        }
        assert_close("y", &out.y.data, &expected, 1e-12);
    }

    #[test]
    fn low_plus_high_experts_with_equal_weights_see_x(p in problem_strategy()) {
        // Two experts with the same A and B and lambda = 1 with a zero router: gates 1/2 each,
        // so the LoRA term is scale/2 * ((low + high) A^T) B^T = scale/2 * (x A^T) B^T.
        let mut two = Problem::random(p.x.len() as u64 + 1, p.b, p.t, p.d, p.n, 2, p.r);
        let (a, b) = (two.lora_a[..p.r * p.d].to_vec(), two.lora_b[..p.n * p.r].to_vec());
        two.lora_a = [a.clone(), a].concat();
        two.lora_b = [b.clone(), b].concat();
        two.router.iter_mut().for_each(|v| *v = 0.0);
        let cfg = LoraMoeConfig { lambda: 1.0, scale: Some(2.0), ..config(&[Band::Low, Band::High]) };
        let split = reference::lora_moe(&two.inputs(), &cfg).unwrap();
        let mut one = two.clone();
        one.e = 1;
        one.lora_a.truncate(p.r * p.d);
        one.lora_b.truncate(p.n * p.r);
        one.router.truncate(p.d);
        one.shapes[3][0] = 1;
        one.shapes[4][0] = 1;
        one.shapes[5][0] = 1;
        let whole = reference::lora_moe(&one.inputs(), &LoraMoeConfig { scale: Some(1.0), ..router_only(&[Band::Full]) }).unwrap();
        assert_close("y", &split.y.data, &whole.y.data, 1e-12);
    }
}
