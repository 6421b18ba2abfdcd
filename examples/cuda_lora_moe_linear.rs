//! `LoraMoeLinear` on device buffers (CUDA, bf16): the q, k and v projections of one `x`
//! packed once into one layer, then each forward is one shrink/energy pass over `x`, one
//! gate/filter kernel and one cuBLASLt GEMM over the concatenated outputs, on the device's
//! stream, with nothing copied to the host. Each projection's columns of `y` and its gates are
//! checked against the f64 reference; exit code 1 when one is off.
//!
//! Run on a machine with an NVIDIA GPU, its driver and libnvrtc 13 on the library path:
//! `cargo run --release --example cuda_lora_moe_linear`. It needs the `cuda` feature (on by
//! default). Without a usable device it prints why on one line and exits with code 2.

use std::process::ExitCode;
use std::time::Instant;

use cudarc::driver::{CudaSlice, DeviceRepr};
use fape_kernels::backend::cuda::CudaDevice;
use fape_kernels::lora_moe::TOLERANCE_BF16;
use fape_kernels::lora_moe::{reference, LoraMoeConfig, LoraMoeDims, LoraMoeLinear, LoraMoeProjection, LoraMoeTensors};
use fape_kernels::testing::compare;
use fape_kernels::{FapeError, Result};
use half::bf16;

/// Images, tokens per image, input features, experts, LoRA rank.
const BATCH: usize = 2;
const TOKENS: usize = 333;
const D: usize = 256;
const EXPERTS: usize = 2;
const RANK: usize = 16;
/// Output features of q, k and v (k and v narrower, as with grouped-query attention).
const OUTPUTS: [usize; 3] = [256, 128, 128];
/// Timed forwards after the checked one.
const RUNS: usize = 20;

/// `data` copied to a new buffer on `device`'s stream.
fn upload<T: DeviceRepr>(device: &CudaDevice, what: &str, data: &[T]) -> Result<CudaSlice<T>> {
    device.stream().clone_htod(data).map_err(|e| FapeError::Device {
        backend: "cuda",
        context: format!("copying `{what}` to the device"),
        message: e.to_string(),
    })
}

/// `buffer` copied back to the host (waits for the stream).
fn download<T: DeviceRepr + Default + Clone>(device: &CudaDevice, what: &str, buffer: &CudaSlice<T>) -> Result<Vec<T>> {
    device.stream().clone_dtoh(buffer).map_err(|e| FapeError::Device {
        backend: "cuda",
        context: format!("copying `{what}` back (or a kernel before it failed)"),
        message: e.to_string(),
    })
}

fn run(device: &CudaDevice) -> Result<bool> {
    let config = LoraMoeConfig::default();
    // Host inputs: one x, three projections' weights (PEFT layouts), rounded to bf16.
    let problems: Vec<LoraMoeTensors<bf16>> = OUTPUTS
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let dims = LoraMoeDims { batch: BATCH, tokens: TOKENS, d: D, n, experts: EXPERTS, rank: RANK, dg: D };
            LoraMoeTensors::random(i as u64 + 1, dims, true).cast::<bf16>()
        })
        .collect();
    let x = problems[0].x.clone();
    let problems: Vec<LoraMoeTensors<bf16>> =
        problems.into_iter().map(|p| LoraMoeTensors { x: x.clone(), ..p }).collect();

    // Device buffers, and the layer packed from them once.
    let mut buffers = Vec::new();
    for p in &problems {
        let bias = p.bias.as_ref().map(|b| upload(device, "bias", &b.data)).transpose()?;
        let weight = upload(device, "weight", &p.weight.data)?;
        let lora_a = upload(device, "lora_a", &p.lora_a.data)?;
        let lora_b = upload(device, "lora_b", &p.lora_b.data)?;
        buffers.push((weight, bias, lora_a, lora_b, upload(device, "router", &p.router.data)?));
    }
    let views: Vec<_> = buffers
        .iter()
        .map(|(w, b, a, lb, r)| (w.slice(..), b.as_ref().map(|b| b.slice(..)), a.slice(..), lb.slice(..), r.slice(..)))
        .collect();
    let projections: Vec<LoraMoeProjection<'_>> = views
        .iter()
        .zip(OUTPUTS)
        .map(|(v, n)| LoraMoeProjection {
            weight: &v.0,
            bias: v.1.as_ref(),
            lora_a: &v.2,
            lora_b: &v.3,
            router: &v.4,
            n,
        })
        .collect();
    let layer = LoraMoeLinear::new(device, D, D, EXPERTS, RANK, &projections, &config)?;

    let rows = BATCH * TOKENS;
    let x_dev = upload(device, "x", &x.data)?;
    let mut y = upload(device, "y", &vec![bf16::ZERO; rows * layer.n_total()])?;
    let mut gates = upload(device, "gates", &vec![0.0f32; OUTPUTS.len() * rows * EXPERTS])?;
    layer.forward(&x_dev.slice(..), BATCH, TOKENS, None, &mut y.slice_mut(..), &mut gates.slice_mut(..))?;
    let (y_host, gates_host) = (download(device, "y", &y)?, download(device, "gates", &gates)?);

    let start = Instant::now();
    for _ in 0..RUNS {
        layer.forward(&x_dev.slice(..), BATCH, TOKENS, None, &mut y.slice_mut(..), &mut gates.slice_mut(..))?;
    }
    device.stream().synchronize().map_err(|e| FapeError::Device {
        backend: "cuda",
        context: "waiting for the timed forwards".into(),
        message: e.to_string(),
    })?;
    let per_call = start.elapsed().as_secs_f64() * 1e3 / RUNS as f64;
    println!(
        "{}: x [{rows}, {D}] -> y [{rows}, {}] (q, k, v), K augmented {}, {per_call:.3} ms per forward",
        device.info(),
        layer.n_total(),
        layer.k_augmented()
    );

    let mut ok = true;
    let mut col0 = 0;
    for (i, (p, n)) in problems.iter().zip(OUTPUTS).enumerate() {
        let expected = reference::lora_moe(&p.inputs(), &config)?;
        let got: Vec<bf16> =
            y_host.chunks(layer.n_total()).flat_map(|row| row[col0..col0 + n].iter().copied()).collect();
        let got_gates = &gates_host[i * rows * EXPERTS..(i + 1) * rows * EXPERTS];
        for (what, c) in [("y", compare(&got, &expected.y.data)), ("gates", compare(got_gates, &expected.gates.data))] {
            let pass = c.rel_l2 <= TOLERANCE_BF16;
            ok &= pass;
            println!(
                "projection {} {what:<5} rel-L2 {:.2e} (tolerance {TOLERANCE_BF16:.0e}) {}",
                ["q", "k", "v"][i],
                c.rel_l2,
                if pass { "pass" } else { "FAIL" }
            );
        }
        col0 += n;
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let device = match CudaDevice::open(0) {
        Ok(device) => device,
        Err(err @ FapeError::BackendUnavailable { .. }) => {
            eprintln!("no CUDA device to run on: {err}");
            return ExitCode::from(2);
        }
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    match run(&device) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(1)
        }
    }
}
