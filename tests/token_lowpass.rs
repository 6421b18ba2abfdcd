//! The token low-pass reference: hand-checked values and properties. (Every backend runs the
//! shared check cases in tests/backends.rs.)

use fape_kernels::lora_moe::{gaussian_taps, reference, token_lowpass};
use fape_kernels::testing::{assert_close, rng, uniform};
use fape_kernels::{Device, FapeError, View};
use proptest::prelude::*;

#[test]
fn taps_are_a_normalised_gaussian() {
    let h = gaussian_taps(9, 2.0).unwrap();
    let raw: Vec<f64> = (-4..=4).map(|k: i32| (-(k * k) as f64 / 8.0).exp()).collect();
    let sum: f64 = raw.iter().sum();
    assert_close("h", &h, &raw.iter().map(|w| w / sum).collect::<Vec<_>>(), 1e-15);
}

#[test]
fn edges_are_zero_padded_within_each_image() {
    // Two images of two tokens; taps 3 sigma 1: h = [a, 1, a] / (1 + 2a).
    let x = [1.0f32, 2.0, 10.0, 20.0];
    let shape = [2, 2, 1];
    let out = reference::token_lowpass(View::new("t", "x", &x, &shape).unwrap(), 3, 1.0).unwrap();
    let a = (-0.5f64).exp();
    let s = 1.0 + 2.0 * a;
    let expected = [(1.0 + 2.0 * a) / s, (a + 2.0) / s, (10.0 + 20.0 * a) / s, (10.0 * a + 20.0) / s];
    assert_close("low", &out.data, &expected, 1e-15);
}

#[test]
fn bad_arguments_are_typed_errors() {
    let x = [1.0f32; 6];
    let shape = [1, 6];
    let view = View::new("t", "x", &x, &shape).unwrap();
    assert!(matches!(token_lowpass(&Device::Cpu, view, 9, 2.0), Err(FapeError::Shape { tensor: "x", .. })));
    let shape3 = [1, 6, 1];
    let view = View::new("t", "x", &x, &shape3).unwrap();
    assert!(matches!(token_lowpass(&Device::Cpu, view, 4, 2.0), Err(FapeError::Config { field: "taps", .. })));
    assert!(matches!(token_lowpass(&Device::Cpu, view, 5, -1.0), Err(FapeError::Config { field: "sigma", .. })));
    assert!(matches!(View::new("t", "x", &x, &[2, 2, 2]), Err(FapeError::Layout { .. })));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn constant_interior_is_preserved_and_cpu_matches(seed in any::<u64>(), b in 1usize..3, t in 1usize..40, c in 1usize..9, half in 0usize..5) {
        let taps = 2 * half + 1;
        let shape = [b, t, c];
        let x = uniform(&mut rng(seed), b * t * c, -1.0, 1.0);
        let view = View::new("t", "x", &x, &shape).unwrap();
        let expected = reference::token_lowpass(view, taps, 1.5).unwrap();
        let got = token_lowpass(&Device::Cpu, view, taps, 1.5).unwrap();
        assert_close("cpu low", &got.data, &expected.data, 1e-6);

        let ones = vec![0.75f32; b * t * c];
        let low = reference::token_lowpass(View::new("t", "x", &ones, &shape).unwrap(), taps, 1.5).unwrap();
        for tok in half..t.saturating_sub(half) {
            for ch in 0..c {
                let v = low.data[tok * c + ch];
                prop_assert!((v - 0.75).abs() < 1e-12, "token {} channel {}: {}", tok, ch, v);
            }
        }
    }
}
