//! NaN, +Inf and -Inf in every input of every op (lora_moe, freq_split, attention,
//! token_lowpass) on every backend: reference and CPU always, Cube and CUDA where they open
//! (CUDA also on the CPU emulator: `. tools/cuda-emu/env.sh && FAPE_TEST_CUDA=1`). Each op must
//! return (no panic, no error), with non-finite outputs exactly where the f64 reference has
//! them (the poison propagates, and no further), and a poisoned image must leave every other
//! image of the batch as it was.

use fape_kernels::attention::{attention, AttentionConfig, AttentionInputs};
use fape_kernels::freq::{freq_split, FreqSplitConfig};
use fape_kernels::lora_moe::{lora_moe, token_lowpass, Band, LoraMoeConfig, LoraMoeTensors};
use fape_kernels::testing::{device_or_skip, rng, uniform};
use fape_kernels::{Device, DeviceKind, Result, Tensor, View};

const POISONS: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];

/// Images in every batch; the poison goes into image 0.
const BATCH: usize = 2;

/// One op on one backend: its inputs by name (`batched` when the first extent is the batch), and
/// a run giving every output as f32.
struct Op {
    name: &'static str,
    inputs: Vec<Input>,
    run: Run,
}

/// Runs an op on a device with the inputs' values (in [`Op::inputs`] order): every output's values.
type Run = fn(&Device, &[Vec<f32>]) -> Result<Vec<Vec<f32>>>;

struct Input {
    name: &'static str,
    data: Vec<f32>,
    batched: bool,
}

fn input(name: &'static str, seed: u64, len: usize, batched: bool) -> Input {
    Input { name, data: uniform(&mut rng(seed), len, -1.0, 1.0), batched }
}

fn view<'a>(op: &'static str, name: &'static str, data: &'a [f32], shape: &'a [usize]) -> View<'a, f32> {
    View::new(op, name, data, shape).expect("the test's shapes fit")
}

fn data(t: Tensor<f32>) -> Vec<f32> {
    t.data
}

const LORA: (usize, usize, usize, usize, usize) = (5, 8, 6, 2, 2); // T, d, n, E, r

fn lora_moe_op() -> Op {
    let (t, d, n, e, r) = LORA;
    Op {
        name: "lora_moe",
        inputs: vec![
            input("x", 1, BATCH * t * d, true),
            input("weight", 2, n * d, false),
            input("bias", 3, n, false),
            input("lora_a", 4, e * r * d, false),
            input("lora_b", 5, e * n * r, false),
            input("router", 6, e * d, false),
        ],
        run: |device, v| {
            let (t, d, n, e, r) = LORA;
            let tensor = |i: usize, shape: &[usize]| Tensor::new(v[i].clone(), shape.to_vec()).expect("fits");
            let p = LoraMoeTensors {
                x: tensor(0, &[BATCH, t, d]),
                weight: tensor(1, &[n, d]),
                bias: Some(tensor(2, &[n])),
                lora_a: tensor(3, &[e, r, d]),
                lora_b: tensor(4, &[e, n, r]),
                router: tensor(5, &[e, d]),
                guidance: None,
            };
            let config = LoraMoeConfig { bands: vec![Band::Low, Band::High], ..LoraMoeConfig::default() };
            let out = lora_moe(device, &p.inputs(), &config)?;
            Ok(vec![out.y.data, out.gates.data])
        },
    }
}

const IMAGE: [usize; 4] = [BATCH, 2, 6, 8];

fn freq_split_op() -> Op {
    Op {
        name: "freq_split",
        inputs: vec![input("x", 7, IMAGE.iter().product(), true)],
        run: |device, v| {
            let out = freq_split(device, view("freq_split", "x", &v[0], &IMAGE), &FreqSplitConfig::default())?;
            Ok(vec![out.low.data, out.high.data, out.band_energy.data])
        },
    }
}

const HEADS: [usize; 4] = [BATCH, 2, 5, 8]; // B, H, L, D

fn attention_op() -> Op {
    let len = HEADS.iter().product();
    Op {
        name: "attention",
        inputs: vec![input("q", 8, len, true), input("k", 9, len, true), input("v", 10, len, true)],
        run: |device, v| {
            let [q, k, values] = [0, 1, 2].map(|i| view("attention", "qkv", &v[i], &HEADS));
            attention(device, &AttentionInputs::new(q, k, values), &AttentionConfig::default()).map(|t| vec![data(t)])
        },
    }
}

const TOKENS: [usize; 3] = [BATCH, 12, 4]; // B, T, C

fn token_lowpass_op() -> Op {
    Op {
        name: "token_lowpass",
        inputs: vec![input("x", 11, TOKENS.iter().product(), true)],
        run: |device, v| {
            token_lowpass(device, view("token_lowpass", "x", &v[0], &TOKENS), 9, 2.0).map(|t| vec![data(t)])
        },
    }
}

/// Reference and CPU, and Cube and CUDA where they open.
fn devices(test: &str) -> Vec<Device> {
    let mut out = vec![Device::Reference, Device::Cpu];
    out.extend([DeviceKind::Cube, DeviceKind::Cuda].into_iter().filter_map(|kind| device_or_skip(test, kind)));
    out
}

fn finite_mask(values: &[f32]) -> Vec<bool> {
    values.iter().map(|v| v.is_finite()).collect()
}

fn check(op: Op) {
    let test = format!("{}_propagates_nan_and_inf", op.name);
    let clean_inputs: Vec<Vec<f32>> = op.inputs.iter().map(|i| i.data.clone()).collect();
    for device in devices(&test) {
        let clean = (op.run)(&device, &clean_inputs).unwrap_or_else(|e| panic!("{test} {device:?}: {e}"));
        for out in &clean {
            assert!(out.iter().all(|v| v.is_finite()), "{test} {device:?}: the clean run is not finite");
        }
        for (i, poisoned_input) in op.inputs.iter().enumerate() {
            for poison in POISONS {
                let what = format!("{test} {device:?}: {poison} in `{}`", poisoned_input.name);
                let mut inputs = clean_inputs.clone();
                inputs[i][3] = poison;
                let want = (op.run)(&Device::Reference, &inputs).unwrap_or_else(|e| panic!("{what}: reference: {e}"));
                let got = (op.run)(&device, &inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
                for (o, ((got, want), clean)) in got.iter().zip(&want).zip(&clean).enumerate() {
                    // The first output depends on every input.
                    assert!(o > 0 || got.iter().any(|v| !v.is_finite()), "{what}: output {o} shows no trace of it");
                    assert_eq!(
                        finite_mask(got),
                        finite_mask(want),
                        "{what}: output {o}'s non-finite elements differ from the reference's"
                    );
                    if poisoned_input.batched {
                        let image = got.len() / BATCH;
                        let other = |values: &[f32]| values[image..].to_vec();
                        assert_eq!(other(got), other(clean), "{what}: output {o} changed outside image 0");
                    }
                }
            }
        }
    }
}

#[test]
fn lora_moe_propagates_nan_and_inf() {
    check(lora_moe_op());
}

#[test]
fn freq_split_propagates_nan_and_inf() {
    check(freq_split_op());
}

#[test]
fn attention_propagates_nan_and_inf() {
    check(attention_op());
}

#[test]
fn token_lowpass_propagates_nan_and_inf() {
    check(token_lowpass_op());
}
