//! The frequency split: hand-checked cases and properties of the f64 reference, an independent
//! naive-DFT cross-check, every backend against the reference, and input validation.

use std::f64::consts::PI;

use fape_kernels::freq::{
    self, tolerance_f32, FreqSplitConfig, FreqSplitOutput, MaskKind, BAND_ENERGY_TOLERANCE, OP, TOLERANCE_F32,
};
use fape_kernels::testing::{assert_close, device_or_skip, rng, uniform};
use fape_kernels::{Device, DeviceKind, FapeError, Real, View};
use proptest::prelude::*;

/// Tolerance of the f64 reference against closed forms and the naive DFT.
const EXACT: f64 = 1e-12;

fn reference<T: Real>(x: &[T], shape: &[usize], config: &FreqSplitConfig) -> FreqSplitOutput<f64> {
    let view = View::new(OP, "x", x, shape).expect("test shapes match their data");
    freq::reference::freq_split(view, config).expect("valid test input")
}

fn on_device(device: &Device, x: &[f32], shape: &[usize], config: &FreqSplitConfig) -> FreqSplitOutput<f32> {
    let view = View::new(OP, "x", x, shape).expect("test shapes match their data");
    freq::freq_split(device, view, config).expect("valid test input")
}

fn random_image(seed: u64, shape: &[usize]) -> Vec<f32> {
    uniform(&mut rng(seed), shape.iter().product(), -1.0, 1.0)
}

fn config(cutoff: f64, mask: MaskKind) -> FreqSplitConfig {
    FreqSplitConfig { cutoff, mask, ..FreqSplitConfig::default() }
}

/// `cos(2 pi (fy y + fx x))` on an `h x w` grid, with `fy = ky/h`, `fx = kx/w`; in f64 so that
/// no rounding of the input leaks energy into other bins.
fn cosine(h: usize, w: usize, ky: usize, kx: usize) -> Vec<f64> {
    (0..h * w)
        .map(|i| {
            let (y, x) = ((i / w) as f64, (i % w) as f64);
            (2.0 * PI * (ky as f64 * y / h as f64 + kx as f64 * x / w as f64)).cos()
        })
        .collect()
}

fn sum_of_squares<T: Real>(x: &[T]) -> f64 {
    x.iter().map(|v| v.to_f64() * v.to_f64()).sum()
}

fn widen<T: Real>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

// ---- hand-checked cases of the reference ----

#[test]
fn reference_constant_image_has_all_energy_in_band_0_and_low_equals_x() {
    let shape = [1, 2, 6, 9];
    let x = vec![0.75f32; 108];
    for mask in MaskKind::ALL {
        let out = reference(&x, &shape, &config(0.01, mask));
        assert_close("low", &out.low.data, &widen(&x), EXACT);
        assert!(out.high.data.iter().all(|v| v.abs() < 1e-12), "{mask}: high of a constant is 0");
        let per_channel = 0.75f64 * 0.75 * 54.0;
        let expected = [per_channel, 0.0, 0.0, 0.0, 0.0].repeat(2);
        assert_close("band_energy", &out.band_energy.data, &expected, EXACT);
        assert_eq!(out.band_energy.shape, [1, 2, 5]);
    }
}

#[test]
fn reference_single_pixel_image_is_all_low() {
    let out = reference(&[-0.5], &[1, 1, 1, 1], &FreqSplitConfig::default());
    assert_eq!(out.low.data, [-0.5]);
    assert_eq!(out.high.data, [0.0]);
    assert_eq!(out.band_energy.data, [0.25, 0.0, 0.0, 0.0, 0.0]);
}

#[test]
fn reference_cosine_above_hard_cutoff_lands_in_its_band_and_in_high() {
    // fy = 4/16 = 0.25, fx = 0: rho = 0.25 / sqrt(0.5) = 0.354, band 2 = [0.35, 0.45).
    let (h, w) = (16, 12);
    let x = cosine(h, w, 4, 0);
    let out = reference(&x, &[1, 1, h, w], &config(0.3, MaskKind::Hard));
    assert!(out.low.data.iter().all(|v| v.abs() < 1e-12), "low holds nothing above the cutoff");
    assert_close("high", &out.high.data, &widen(&x), EXACT);
    let expected = [0.0, 0.0, sum_of_squares(&x), 0.0, 0.0];
    assert_close("band_energy", &out.band_energy.data, &expected, EXACT);
}

#[test]
fn reference_cosine_below_hard_cutoff_is_all_low() {
    // fy = 1/16, fx = 2/12: rho = 0.252, below the cutoff 0.3; band 1 = [0.15, 0.35).
    let (h, w) = (16, 12);
    let x = cosine(h, w, 1, 2);
    let out = reference(&x, &[1, 1, h, w], &config(0.3, MaskKind::Hard));
    assert_close("low", &out.low.data, &widen(&x), EXACT);
    let expected = [0.0, sum_of_squares(&x), 0.0, 0.0, 0.0];
    assert_close("band_energy", &out.band_energy.data, &expected, EXACT);
}

#[test]
fn reference_gaussian_mask_scales_a_cosine_by_its_mask_value() {
    let (h, w, cutoff) = (16, 12, 0.15);
    let x = cosine(h, w, 4, 0);
    let rho2 = 0.25f64 * 0.25 / 0.5;
    let gain = (-rho2 / (2.0 * cutoff * cutoff)).exp();
    let out = reference(&x, &[1, 1, h, w], &config(cutoff, MaskKind::Gaussian));
    let low: Vec<f64> = x.iter().map(|&v| gain * v).collect();
    let high: Vec<f64> = x.iter().map(|&v| (1.0 - gain) * v).collect();
    assert_close("low", &out.low.data, &low, EXACT);
    assert_close("high", &out.high.data, &high, EXACT);
}

#[test]
fn reference_checkerboard_lands_in_the_last_band_closed_at_its_top() {
    // (-1)^(y+x) sits at fy = fx = -0.5: rho = 1 exactly, the last edge.
    let (h, w) = (6, 8);
    let x: Vec<f32> = (0..h * w).map(|i| if (i / w + i % w) % 2 == 0 { 1.0 } else { -1.0 }).collect();
    let out = reference(&x, &[1, 1, h, w], &config(0.99, MaskKind::Hard));
    assert_close("band_energy", &out.band_energy.data, &[0.0, 0.0, 0.0, 0.0, 48.0], EXACT);
    assert!(out.low.data.iter().all(|v| v.abs() < 1e-12), "rho 1 is above the cutoff 0.99");
}

#[test]
fn reference_reads_f64_input_exactly_like_the_same_f32_values() {
    let shape = [1, 2, 5, 7];
    let x = random_image(7, &shape);
    let wide = widen(&x);
    let config = FreqSplitConfig::default();
    assert_eq!(reference(&wide, &shape, &config), reference(&x, &shape, &config));
}

// ---- the reference against a naive O(N^2) DFT written from the contract ----

/// numpy.fft.fftfreq(n)[k], spelled as numpy's source does.
fn numpy_fftfreq(n: usize, k: usize) -> f64 {
    let positive = (n - 1) / 2 + 1;
    let index = if k < positive { k as f64 } else { -((n - k) as f64) };
    index * (1.0 / n as f64)
}

fn naive_split(x: &[f32], h: usize, w: usize, config: &FreqSplitConfig) -> (Vec<f64>, Vec<f64>) {
    let nbands = config.edges.len() - 1;
    let (mut low, mut energy) = (vec![0.0; h * w], vec![0.0; nbands]);
    for ky in 0..h {
        for kx in 0..w {
            let (mut re, mut im) = (0.0, 0.0);
            for (i, &v) in x.iter().enumerate() {
                let phase = -2.0 * PI * ((ky * (i / w)) as f64 / h as f64 + (kx * (i % w)) as f64 / w as f64);
                re += f64::from(v) * phase.cos();
                im += f64::from(v) * phase.sin();
            }
            let (fy, fx) = (numpy_fftfreq(h, ky), numpy_fftfreq(w, kx));
            let rho = (fy * fy + fx * fx).sqrt() / 0.5f64.sqrt();
            let last = nbands - 1;
            let band = (0..nbands).find(|&b| {
                config.edges[b] <= rho && (rho < config.edges[b + 1] || (b == last && rho == config.edges[b + 1]))
            });
            if let Some(b) = band {
                energy[b] += (re * re + im * im) / (h * w) as f64;
            }
            let m = match config.mask {
                MaskKind::Hard => f64::from(u8::from(rho <= config.cutoff)),
                MaskKind::Gaussian => (-rho * rho / (2.0 * config.cutoff * config.cutoff)).exp(),
            };
            for (i, l) in low.iter_mut().enumerate() {
                let phase = 2.0 * PI * ((ky * (i / w)) as f64 / h as f64 + (kx * (i % w)) as f64 / w as f64);
                *l += m * (re * phase.cos() - im * phase.sin()) / (h * w) as f64;
            }
        }
    }
    (low, energy)
}

#[test]
fn reference_matches_a_naive_dft_on_odd_even_and_prime_shapes() {
    let partial_edges = vec![0.1, 0.3, 0.62, 0.8];
    for (seed, (h, w)) in [(1, 1), (1, 8), (7, 1), (7, 5), (6, 9), (13, 11), (8, 8)].into_iter().enumerate() {
        for mask in MaskKind::ALL {
            for edges in [FreqSplitConfig::default().edges, partial_edges.clone()] {
                let config = FreqSplitConfig { cutoff: 0.4, mask, edges };
                let x = random_image(seed as u64, &[1, 1, h, w]);
                let out = reference(&x, &[1, 1, h, w], &config);
                let (low, energy) = naive_split(&x, h, w, &config);
                let what = format!("{h}x{w} {mask} {:?}", config.edges);
                assert_close(&format!("{what} low"), &out.low.data, &low, 1e-10);
                assert_close(&format!("{what} energy"), &out.band_energy.data, &energy, 1e-10);
            }
        }
    }
}

// ---- properties of the reference ----

fn shape_and_input() -> impl Strategy<Value = ([usize; 4], Vec<f32>)> {
    (1usize..3, 1usize..3, 1usize..20, 1usize..20, any::<u64>())
        .prop_map(|(b, c, h, w, seed)| ([b, c, h, w], random_image(seed, &[b, c, h, w])))
}

fn mask_kind() -> impl Strategy<Value = MaskKind> {
    prop_oneof![Just(MaskKind::Hard), Just(MaskKind::Gaussian)]
}

proptest! {
    #[test]
    fn prop_reference_low_plus_high_equals_x((shape, x) in shape_and_input(), cutoff in 0.01f64..1.5, mask in mask_kind()) {
        let out = reference(&x, &shape, &config(cutoff, mask));
        let sum: Vec<f64> = out.low.data.iter().zip(&out.high.data).map(|(l, h)| l + h).collect();
        assert_close("low + high", &sum, &widen(&x), EXACT);
    }

    #[test]
    fn prop_reference_band_energies_sum_to_sum_of_squares((shape, x) in shape_and_input(), mask in mask_kind()) {
        let out = reference(&x, &shape, &config(0.15, mask));
        let images = shape[0] * shape[1];
        let pixels = x.len() / images;
        for (i, (image, bands)) in x.chunks(pixels).zip(out.band_energy.data.chunks(5)).enumerate() {
            let (total, expected) = (bands.iter().sum::<f64>(), sum_of_squares(image));
            prop_assert!((total - expected).abs() <= 1e-10 * expected, "image {i}: {total} vs {expected}");
        }
    }

    #[test]
    fn prop_reference_hard_cutoff_of_one_or_more_keeps_everything_low((shape, x) in shape_and_input(), cutoff in 1.0f64..10.0) {
        let out = reference(&x, &shape, &config(cutoff, MaskKind::Hard));
        assert_close("low", &out.low.data, &widen(&x), EXACT);
    }
}

// ---- backends against the reference ----

const AWKWARD_SHAPES: [[usize; 4]; 8] = [
    [1, 1, 1, 1],
    [1, 2, 1, 17],
    [3, 1, 19, 1],
    [2, 3, 7, 5],
    [1, 1, 31, 33],
    [1, 2, 64, 48],
    [3, 1, 97, 13],
    [1, 1, 128, 257],
];

fn assert_matches_reference(device: &Device, shape: &[usize], config: &FreqSplitConfig, seed: u64) {
    let x = random_image(seed, shape);
    let got = on_device(device, &x, shape, config);
    let expected = reference(&x, shape, config);
    let what = format!("{device:?} {shape:?} {}", config.mask);
    let tol = tolerance_f32(shape[2], shape[3]);
    assert_eq!(got.low.shape, shape);
    assert_eq!(got.band_energy.shape, expected.band_energy.shape);
    assert_close(&format!("{what} low"), &got.low.data, &expected.low.data, tol);
    assert_close(&format!("{what} high"), &got.high.data, &expected.high.data, tol);
    assert_close(
        &format!("{what} band_energy"),
        &got.band_energy.data,
        &expected.band_energy.data,
        BAND_ENERGY_TOLERANCE,
    );
}

#[test]
fn cpu_matches_reference_on_awkward_shapes_with_hard_mask() {
    for (seed, shape) in AWKWARD_SHAPES.iter().enumerate() {
        assert_matches_reference(&Device::Cpu, shape, &config(0.15, MaskKind::Hard), seed as u64);
    }
}

#[test]
fn cpu_matches_reference_on_awkward_shapes_with_gaussian_mask() {
    for (seed, shape) in AWKWARD_SHAPES.iter().enumerate() {
        assert_matches_reference(&Device::Cpu, shape, &config(0.15, MaskKind::Gaussian), 100 + seed as u64);
    }
}

#[test]
fn cpu_matches_reference_with_custom_cutoff_and_partial_edges() {
    let config = FreqSplitConfig { cutoff: 0.6, mask: MaskKind::Hard, edges: vec![0.05, 0.2, 0.21, 0.7] };
    assert_matches_reference(&Device::Cpu, &[2, 2, 45, 30], &config, 5);
}

#[test]
fn cpu_repeated_calls_at_one_size_give_identical_results() {
    let shape = [2, 3, 24, 40];
    let x = random_image(11, &shape);
    let config = FreqSplitConfig::default();
    assert_eq!(on_device(&Device::Cpu, &x, &shape, &config), on_device(&Device::Cpu, &x, &shape, &config));
}

#[test]
fn reference_device_returns_the_reference_rounded_to_f32() {
    let shape = [1, 2, 9, 10];
    let x = random_image(3, &shape);
    let config = config(0.3, MaskKind::Gaussian);
    let expected = reference(&x, &shape, &config).map(|&v| v as f32);
    assert_eq!(on_device(&Device::Reference, &x, &shape, &config), expected);
}

#[test]
fn every_available_backend_matches_reference_or_reports_unsupported() {
    let (shape, config) = ([2, 3, 33, 20], FreqSplitConfig::default());
    let x = random_image(21, &shape);
    for kind in DeviceKind::ALL {
        let Some(device) = device_or_skip("every_available_backend_matches_reference_or_reports_unsupported", kind)
        else {
            continue;
        };
        match freq::freq_split(&device, View::new(OP, "x", &x, &shape).unwrap(), &config) {
            Ok(_) => assert_matches_reference(&device, &shape, &config, 21),
            Err(FapeError::Unsupported { op, .. }) => assert_eq!(op, OP),
            Err(other) => panic!("{kind}: {other}"),
        }
    }
}

#[test]
fn cpu_pairs_images_without_mixing_them() {
    // The CPU backend transforms two images at once: odd and even image counts, images 1e3 and
    // 1e-2 in size in one pair (each checked on its own), and a NaN or infinity in the second
    // image of a pair (which then goes alone and must not reach the first).
    let shape = [1, 3, 17, 12];
    let mut x = random_image(8, &shape);
    let pixels = 17 * 12;
    x[..pixels].iter_mut().for_each(|v| *v *= 1e3);
    x[pixels..2 * pixels].iter_mut().for_each(|v| *v *= 1e-2);
    let config = FreqSplitConfig { mask: MaskKind::Gaussian, ..FreqSplitConfig::default() };
    let got = on_device(&Device::Cpu, &x, &shape, &config);
    let expected = reference(&x, &shape, &config);
    for image in 0..3 {
        let part = image * pixels..(image + 1) * pixels;
        let tol = tolerance_f32(17, 12);
        assert_close(&format!("image {image} low"), &got.low.data[part.clone()], &expected.low.data[part.clone()], tol);
        assert_close(&format!("image {image} high"), &got.high.data[part.clone()], &expected.high.data[part], tol);
        let bands = image * 5..(image + 1) * 5;
        let (g, e) = (&got.band_energy.data[bands.clone()], &expected.band_energy.data[bands]);
        assert_close(&format!("image {image} band_energy"), g, e, BAND_ENERGY_TOLERANCE);
    }
    for bad in [f32::NAN, f32::INFINITY] {
        let mut x = random_image(9, &[1, 2, 6, 5]);
        x[30 + 7] = bad;
        let out = on_device(&Device::Cpu, &x, &[1, 2, 6, 5], &FreqSplitConfig::default());
        assert!(out.low.data[..30].iter().all(|v| v.is_finite()), "{bad}: the first image is untouched");
        assert!(out.low.data[30..].iter().any(|v| !v.is_finite()), "{bad}: reaches its own image");
    }
}

#[test]
fn nan_in_x_propagates_without_panicking_on_host_backends() {
    let shape = [2, 1, 5, 6];
    let mut x = random_image(4, &shape);
    x[3] = f32::NAN;
    for device in [Device::Reference, Device::Cpu] {
        let out = on_device(&device, &x, &shape, &FreqSplitConfig::default());
        assert!(out.low.data[..30].iter().all(|v| v.is_nan()), "{device:?}: NaN fills its image");
        assert!(out.low.data[30..].iter().all(|v| v.is_finite()), "{device:?}: the other image is untouched");
        assert!(out.band_energy.data[..5].iter().all(|v| v.is_nan()));
    }
}

// ---- validation ----

fn expect_shape_error(result: fape_kernels::Result<FreqSplitOutput<f32>>) {
    match result {
        Err(FapeError::Shape { op, tensor, .. }) => assert_eq!((op, tensor), (OP, "x")),
        other => panic!("expected a shape error naming x, got {other:?}"),
    }
}

fn expect_config_error(config: &FreqSplitConfig, field: &str) {
    let shape = [1, 1, 4, 4];
    let x = random_image(9, &shape);
    let view = View::new(OP, "x", &x, &shape).unwrap();
    let results = [
        config.validate().map(|_| ()),
        freq::reference::freq_split(view, config).map(|_| ()),
        freq::freq_split(&Device::Cpu, view, config).map(|_| ()),
    ];
    for result in results {
        match result {
            Err(FapeError::Config { op, field: f, .. }) => assert_eq!((op, f), (OP, field)),
            other => panic!("{config:?}: expected a config error naming {field}, got {other:?}"),
        }
    }
}

#[test]
fn rejects_empty_x_naming_tensor_x() {
    let shape = [1, 1, 0, 4];
    let view = View::new(OP, "x", &[], &shape).unwrap();
    for device in [Device::Reference, Device::Cpu] {
        expect_shape_error(freq::freq_split(&device, view, &FreqSplitConfig::default()));
    }
}

#[test]
fn rejects_rank_3_x_naming_tensor_x() {
    let shape = [2, 4, 4];
    let x = random_image(1, &shape);
    let view = View::new(OP, "x", &x, &shape).unwrap();
    for device in [Device::Reference, Device::Cpu] {
        expect_shape_error(freq::freq_split(&device, view, &FreqSplitConfig::default()));
    }
}

#[test]
fn rejects_zero_negative_nan_and_infinite_cutoff_naming_cutoff() {
    for cutoff in [0.0, -0.1, f64::NAN, f64::INFINITY] {
        expect_config_error(&config(cutoff, MaskKind::Hard), "cutoff");
    }
}

#[test]
fn rejects_edges_not_strictly_increasing_naming_edges() {
    for edges in [vec![0.0, 0.5, 0.5, 1.0], vec![0.0, 0.6, 0.4, 1.0]] {
        expect_config_error(&FreqSplitConfig { edges, ..FreqSplitConfig::default() }, "edges");
    }
}

#[test]
fn rejects_edges_outside_the_unit_interval_naming_edges() {
    for edges in [vec![-0.1, 0.5], vec![0.0, 1.5], vec![0.0, f64::NAN]] {
        expect_config_error(&FreqSplitConfig { edges, ..FreqSplitConfig::default() }, "edges");
    }
}

#[test]
fn rejects_fewer_than_two_edges_naming_edges() {
    for edges in [vec![], vec![0.5]] {
        expect_config_error(&FreqSplitConfig { edges, ..FreqSplitConfig::default() }, "edges");
    }
}

#[test]
fn mask_kind_parses_its_names_and_rejects_others_naming_mask() {
    for kind in MaskKind::ALL {
        assert_eq!(kind.name().parse::<MaskKind>().unwrap(), kind);
    }
    match "box".parse::<MaskKind>() {
        Err(FapeError::Config { op, field, .. }) => assert_eq!((op, field), (OP, "mask")),
        other => panic!("expected a config error naming mask, got {other:?}"),
    }
}

#[test]
fn default_config_and_tolerances_are_the_documented_ones() {
    let d = FreqSplitConfig::default();
    assert_eq!((d.cutoff, d.mask, d.edges.as_slice()), (0.15, MaskKind::Hard, &[0.0, 0.15, 0.35, 0.45, 0.9, 1.0][..]));
    assert_eq!(tolerance_f32(1, 1), TOLERANCE_F32);
    assert_eq!(tolerance_f32(512, 300), TOLERANCE_F32);
    assert!((tolerance_f32(1024, 2048) - TOLERANCE_F32 * 11.0 / 9.0).abs() < 1e-18);
}

// ---- CUDA (run with FAPE_TEST_CUDA=1 on a GPU machine; skipped elsewhere) ----

/// Shapes of every CUDA route: fused (powers of two up to 128), three passes (powers of two
/// up to 4096 per side, chunked over images), cuFFT (everything else, `H x 1` and `1 x W`
/// included).
const CUDA_FUSED_SHAPES: [[usize; 4]; 7] =
    [[1, 1, 1, 1], [2, 1, 1, 8], [1, 2, 16, 1], [2, 3, 64, 64], [1, 16, 64, 64], [1, 2, 128, 128], [3, 1, 4, 128]];
const CUDA_PASS_SHAPES: [[usize; 4]; 6] =
    [[1, 1, 256, 512], [2, 1, 512, 256], [1, 1, 1, 4096], [1, 1, 4096, 2], [1, 2, 2048, 256], [1, 1, 256, 1]];
const CUDA_CUFFT_SHAPES: [[usize; 4]; 7] =
    [[2, 3, 7, 5], [1, 2, 1, 17], [3, 1, 19, 1], [2, 1, 33, 20], [1, 1, 128, 257], [1, 1, 96, 64], [1, 1, 300, 500]];

fn cuda_device(test: &str) -> Option<Device> {
    device_or_skip(test, DeviceKind::Cuda)
}

#[test]
fn cuda_matches_reference_on_every_route_with_both_masks() {
    let Some(device) = cuda_device("cuda_matches_reference_on_every_route_with_both_masks") else { return };
    let shapes = CUDA_FUSED_SHAPES.iter().chain(&CUDA_PASS_SHAPES).chain(&CUDA_CUFFT_SHAPES);
    for (seed, shape) in shapes.enumerate() {
        for mask in MaskKind::ALL {
            assert_matches_reference(&device, shape, &config(0.15, mask), 300 + seed as u64);
        }
    }
}

#[test]
fn cuda_matches_reference_with_custom_cutoff_and_partial_edges() {
    let Some(device) = cuda_device("cuda_matches_reference_with_custom_cutoff_and_partial_edges") else { return };
    let config = FreqSplitConfig { cutoff: 0.6, mask: MaskKind::Hard, edges: vec![0.05, 0.2, 0.21, 0.7] };
    for shape in [[2, 2, 45, 30], [2, 2, 32, 64], [1, 1, 512, 512]] {
        assert_matches_reference(&device, &shape, &config, 5);
    }
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_cufft_baseline_path_matches_reference_at_powers_of_two() {
    let Some(Device::Cuda(device)) = cuda_device("cuda_cufft_baseline_path_matches_reference_at_powers_of_two") else {
        return;
    };
    for (seed, shape) in [[2, 3, 64, 64], [1, 2, 512, 256]].iter().enumerate() {
        for mask in MaskKind::ALL {
            let config = config(0.2, mask);
            let x = random_image(seed as u64, shape);
            let view = View::new(OP, "x", &x, shape).unwrap();
            let mut buffers = freq::CudaSplitBuffers::new(&device, view, &config).expect("upload");
            buffers.run(&device, &config, freq::CudaFftPath::Cufft).expect("cufft+mask");
            let got = buffers.download(&device).expect("download");
            let expected = reference(&x, shape, &config);
            let tol = tolerance_f32(shape[2], shape[3]);
            assert_close(&format!("cufft {shape:?} {mask} low"), &got.low.data, &expected.low.data, tol);
            assert_close(&format!("cufft {shape:?} {mask} high"), &got.high.data, &expected.high.data, tol);
            let energy = &expected.band_energy.data;
            assert_close(
                &format!("cufft {shape:?} {mask} energy"),
                &got.band_energy.data,
                energy,
                BAND_ENERGY_TOLERANCE,
            );
        }
    }
}

/// A captured split replays: outputs allocated NaN-poisoned and never written outside the graph
/// match the reference after one replay (the fused route; another split at the shape ran first,
/// so its tables exist and the capture only enqueues).
#[cfg(feature = "cuda")]
#[test]
fn cuda_graph_replay_of_a_split_matches_reference() {
    let Some(Device::Cuda(device)) = cuda_device("cuda_graph_replay_of_a_split_matches_reference") else {
        return;
    };
    let shape = [2, 3, 64, 32];
    let config = config(0.3, MaskKind::Gaussian);
    let x = random_image(23, &shape);
    let view = View::new(OP, "x", &x, &shape).unwrap();
    let auto = freq::CudaFftPath::Auto;
    freq::CudaSplitBuffers::new(&device, view, &config).expect("upload").run(&device, &config, auto).expect("split");
    let mut buffers = freq::CudaSplitBuffers::new(&device, view, &config).expect("upload");
    let graph = buffers.capture(&device, &config, auto).expect("capture");
    graph.launch().expect("replay");
    let got = buffers.download(&device).expect("download");
    let expected = reference(&x, &shape, &config);
    let tol = tolerance_f32(shape[2], shape[3]);
    assert_close("graph low", &got.low.data, &expected.low.data, tol);
    assert_close("graph high", &got.high.data, &expected.high.data, tol);
    assert_close("graph energy", &got.band_energy.data, &expected.band_energy.data, BAND_ENERGY_TOLERANCE);
}

#[test]
fn cuda_relations_low_plus_high_parseval_cosine_and_full_cutoff() {
    let Some(device) = cuda_device("cuda_relations_low_plus_high_parseval_cosine_and_full_cutoff") else { return };
    for shape in [[1, 2, 64, 64], [1, 1, 256, 256], [1, 1, 24, 40]] {
        let x = random_image(17, &shape);
        let out = on_device(&device, &x, &shape, &FreqSplitConfig::default());
        let sum: Vec<f64> =
            out.low.data.iter().zip(&out.high.data).map(|(l, h)| f64::from(*l) + f64::from(*h)).collect();
        assert_close(&format!("{shape:?} low + high"), &sum, &widen(&x), 1e-6);
        let pixels = shape[2] * shape[3];
        for (image, bands) in x.chunks(pixels).zip(out.band_energy.data.chunks(5)) {
            let total: f64 = bands.iter().map(|&e| f64::from(e)).sum();
            let expected = sum_of_squares(image);
            assert!(
                (total - expected).abs() <= BAND_ENERGY_TOLERANCE * expected,
                "{shape:?}: Parseval {total} vs {expected}"
            );
        }
        let all_low = on_device(&device, &x, &shape, &config(1.0, MaskKind::Hard));
        assert_close(&format!("{shape:?} cutoff 1 low"), &all_low.low.data, &widen(&x), TOLERANCE_F32);
    }
    // fy = 4/16: rho = 0.354, band 2; above the cutoff 0.3, so all of it is high.
    for (h, w) in [(16, 16), (16, 12), (256, 512)] {
        let x: Vec<f32> = cosine(h, w, 4 * h / 16, 0).iter().map(|&v| v as f32).collect();
        let out = on_device(&device, &x, &[1, 1, h, w], &config(0.3, MaskKind::Hard));
        let energy: Vec<f64> = out.band_energy.data.iter().map(|&e| f64::from(e)).collect();
        let total = sum_of_squares(&x);
        assert_close(&format!("{h}x{w} cosine bands"), &energy, &[0.0, 0.0, total, 0.0, 0.0], 1e-5);
        assert_close(&format!("{h}x{w} cosine high"), &out.high.data, &widen(&x), 1e-5);
    }
}

#[test]
fn cuda_is_deterministic_and_propagates_nan() {
    let Some(device) = cuda_device("cuda_is_deterministic_and_propagates_nan") else { return };
    for shape in [[2, 1, 64, 64], [2, 1, 512, 512], [2, 1, 30, 50]] {
        let mut x = random_image(8, &shape);
        let config = FreqSplitConfig::default();
        assert_eq!(on_device(&device, &x, &shape, &config), on_device(&device, &x, &shape, &config), "{shape:?}");
        let pixels = shape[2] * shape[3];
        x[3] = f32::NAN;
        let out = on_device(&device, &x, &shape, &config);
        assert!(out.low.data[..pixels].iter().all(|v| v.is_nan()), "{shape:?}: NaN fills its image");
        assert!(out.low.data[pixels..].iter().all(|v| v.is_finite()), "{shape:?}: the other image is untouched");
        assert!(out.band_energy.data[..5].iter().all(|v| v.is_nan()));
        assert!(out.band_energy.data[5..].iter().all(|v| v.is_finite()));
    }
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_rejects_more_bands_than_its_kernels_take() {
    let Some(device) = cuda_device("cuda_rejects_more_bands_than_its_kernels_take") else { return };
    let edges: Vec<f64> =
        (0..=freq::CUDA_MAX_BANDS + 1).map(|i| i as f64 / (freq::CUDA_MAX_BANDS + 1) as f64).collect();
    let shape = [1, 1, 8, 8];
    let x = random_image(2, &shape);
    let result = freq::freq_split(
        &device,
        View::new(OP, "x", &x, &shape).unwrap(),
        &FreqSplitConfig { edges, ..FreqSplitConfig::default() },
    );
    assert!(matches!(result, Err(FapeError::Unsupported { op: OP, .. })), "{result:?}");
}

#[test]
fn cuda_grey_band_energies_match_the_cpu() {
    let Some(device) = cuda_device("cuda_grey_band_energies_match_the_cpu") else { return };
    let edges = [0.0, 0.1, 0.3, 0.7, 1.0];
    for shape in [[2, 3, 64, 64], [1, 3, 512, 512], [2, 3, 45, 30]] {
        let rgb = uniform(&mut rng(23), shape.iter().product(), 0.0, 1.0);
        let view = View::new(OP, "x", &rgb, &shape).unwrap();
        let got = freq::band_energies_grey(&device, view, &edges).expect("cuda");
        let expected = freq::band_energies_grey(&Device::Reference, view, &edges).expect("reference");
        let expected: Vec<f64> = expected.data.iter().map(|&e| f64::from(e)).collect();
        assert_close(&format!("{shape:?} grey band energies"), &got.data, &expected, BAND_ENERGY_TOLERANCE);
    }
}
