//! The host API on every backend found here: LoRA-MoE (f32 and bf16), the frequency split (f32)
//! and attention with RMSNorm and RoPE (bf16) on seeded random inputs, each compared with the
//! op's f64 reference under its named tolerance. Exit code 1 when any comparison fails.
//!
//! Run: `cargo run --release --example host_api`. Backends this machine lacks (Cube needs a
//! Vulkan adapter, such as Mesa's software Vulkan; CUDA needs a GPU and libnvrtc) are skipped
//! with the reason.

use std::process::ExitCode;

use fape_kernels::attention::{self, AttentionConfig, AttentionInputs};
use fape_kernels::freq::{self, FreqSplitConfig, MaskKind};
use fape_kernels::lora_moe::{self, LoraMoeConfig, LoraMoeDims, LoraMoeTensors};
use fape_kernels::testing::{compare, rng, uniform};
use fape_kernels::{Device, DeviceKind, FapeError, Real, Result, Tensor, View};
use half::bf16;

/// Prints one comparison line; returns whether it is within `tolerance`.
fn report<G: Real>(device: &Device, what: &str, got: &[G], expected: &[f64], tolerance: f64) -> bool {
    let c = compare(got, expected);
    let ok = c.rel_l2 <= tolerance;
    let verdict = if ok { "pass" } else { "FAIL" };
    let backend = device.kind().name();
    println!("{backend:<10} {what:<28} {:<5} rel-L2 {:.2e} (tolerance {tolerance:.0e}) {verdict}", G::DTYPE, c.rel_l2);
    ok
}

/// LoRA-MoE `[2,37,32] -> [2,37,24]`, two experts of rank 4, in f32 and in bf16.
fn lora_moe_on(device: &Device) -> Result<bool> {
    let dims = LoraMoeDims { batch: 2, tokens: 37, d: 32, n: 24, experts: 2, rank: 4, dg: 32 };
    let config = LoraMoeConfig::default();
    let f32_inputs = LoraMoeTensors::random(1, dims, true);
    let got = lora_moe::lora_moe(device, &f32_inputs.inputs(), &config)?;
    let expected = lora_moe::reference::lora_moe(&f32_inputs.inputs(), &config)?;
    let mut ok = report(device, "lora_moe.y", &got.y.data, &expected.y.data, lora_moe::TOLERANCE_F32);
    // bf16 runs the fused bf16 kernels on CUDA; the reference reads the same bf16 values.
    let bf16_inputs = f32_inputs.cast::<bf16>();
    let got = lora_moe::lora_moe(device, &bf16_inputs.inputs(), &config)?;
    let expected = lora_moe::reference::lora_moe(&bf16_inputs.inputs(), &config)?;
    ok &= report(device, "lora_moe.y", &got.y.data, &expected.y.data, lora_moe::TOLERANCE_BF16);
    ok &= report(device, "lora_moe.gates", &got.gates.data, &expected.gates.data, lora_moe::TOLERANCE_BF16);
    Ok(ok)
}

/// The frequency split of a `[1,3,45,38]` image with a Gaussian mask.
fn freq_split_on(device: &Device) -> Result<bool> {
    let shape = [1, 3, 45, 38];
    let x = uniform(&mut rng(2), shape.iter().product(), 0.0, 1.0);
    let config = FreqSplitConfig { cutoff: 0.2, mask: MaskKind::Gaussian, ..FreqSplitConfig::default() };
    let view = View::new(freq::OP, "x", &x, &shape)?;
    let got = freq::freq_split(device, view, &config)?;
    let expected = freq::reference::freq_split(view, &config)?;
    let tolerance = freq::tolerance_f32(shape[2], shape[3]);
    let ok = report(device, "freq_split.low", &got.low.data, &expected.low.data, tolerance);
    let (energy, expected_energy) = (&got.band_energy.data, &expected.band_energy.data);
    Ok(ok & report(device, "freq_split.band_energy", energy, expected_energy, freq::BAND_ENERGY_TOLERANCE))
}

/// Attention `[1,2,37,53,64]` with RMSNorm of q and k and RoPE, in bf16.
fn attention_on(device: &Device) -> Result<bool> {
    let (b, h, lq, lk, d) = (1, 2, 37, 53, 64);
    let mut r = rng(3);
    let mut tensor = |shape: Vec<usize>, lo: f32, hi: f32| {
        let data = uniform(&mut r, shape.iter().product(), lo, hi).into_iter().map(bf16::from_f32).collect();
        Tensor { data, shape }
    };
    let (q, k, v) = (
        tensor(vec![b, h, lq, d], -1.0, 1.0),
        tensor(vec![b, h, lk, d], -1.0, 1.0),
        tensor(vec![b, h, lk, d], -1.0, 1.0),
    );
    let (q_norm, k_norm) = (tensor(vec![d], 0.5, 1.5), tensor(vec![d], 0.5, 1.5));
    let (cos, sin) = attention::rope_tables(lk, d)?;
    let (cos, sin) = (cos.map(|&c| bf16::from_f32(c)), sin.map(|&s| bf16::from_f32(s)));
    let inputs = AttentionInputs::new(q.view(), k.view(), v.view())
        .with_norms(q_norm.view(), k_norm.view())
        .with_rope(cos.view(), sin.view());
    let config = AttentionConfig::default();
    let got = attention::attention_typed(device, &inputs, &config)?;
    let expected = attention::reference::attention(&inputs, &config)?;
    Ok(report(device, "attention.out (norm+rope)", &got.data, &expected.data, attention::TOLERANCE_BF16))
}

fn main() -> ExitCode {
    let mut all_ok = true;
    for kind in DeviceKind::ALL {
        let name = kind.name();
        let device = match Device::open(kind) {
            Ok(device) => device,
            Err(err @ FapeError::BackendUnavailable { .. }) => {
                println!("{name:<10} skipped: {err}");
                continue;
            }
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::from(2);
            }
        };
        println!("{name:<10} {}", device.describe());
        for op in [lora_moe_on, freq_split_on, attention_on] {
            match op(&device) {
                Ok(ok) => all_ok &= ok,
                Err(err) => {
                    println!("{name:<10} error: {err}");
                    all_ok = false;
                }
            }
        }
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
