//! Validating the kernels against PyTorch from Rust: read the tensors a PyTorch script dumped
//! (attention's inputs in bf16, f16 or f32, and PyTorch's own output), run attention in the
//! stored dtype on a backend, and compare both outputs with the f64 reference of the same
//! inputs under the named tolerance (`attention::TOLERANCE_BF16` for 16-bit dtypes, which
//! PyTorch's own 16-bit kernel meets too). Exit code 1 when this crate's output is off, 2 on
//! bad input.
//!
//! Make the file with PyTorch (`pip install torch safetensors`; CPU or GPU):
//!
//! ```python
//! import torch
//! from safetensors.torch import save_file
//! torch.manual_seed(0)
//! q, k, v = (torch.randn(1, 4, 333, 128).to(torch.bfloat16) for _ in range(3))
//! torch_out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # bf16, like q
//! save_file({"q": q, "k": k, "v": v, "torch_out": torch_out}, "attention_bf16.safetensors")
//! ```
//!
//! then: `cargo run --release --example validate_pytorch -- attention_bf16.safetensors [cpu|cube|cuda]`
//! (default `cpu`). `fape op attention` does the same from the command line (see the README).

use std::path::Path;
use std::process::ExitCode;

use fape_kernels::attention::{self, AttentionConfig, AttentionElement, AttentionInputs};
use fape_kernels::io::{Dtype, Element, TensorFile};
use fape_kernels::testing::compare;
use fape_kernels::{Device, DeviceKind, FapeError, Result};
use half::{bf16, f16};

/// Runs attention in `T` on `device`; prints this crate's and PyTorch's error against the f64
/// reference; returns whether this crate's is within the tolerance.
fn validate<T: AttentionElement + Element>(file: &TensorFile, device: &Device) -> Result<bool> {
    let op = attention::OP;
    let inputs = AttentionInputs::<T>::new(file.require(op, "q")?, file.require(op, "k")?, file.require(op, "v")?);
    let config = AttentionConfig::default();
    let expected = attention::reference::attention(&inputs, &config)?;
    let got = attention::attention_typed(device, &inputs, &config)?;
    let tolerance = if T::STORED == Dtype::F32 { attention::TOLERANCE_F32 } else { attention::TOLERANCE_BF16 };
    let ours = compare(&got.data, &expected.data);
    let verdict = if ours.rel_l2 <= tolerance { "pass" } else { "FAIL" };
    println!(
        "fape_kernels ({}, {}) vs f64 reference: rel-L2 {:.2e} (tolerance {tolerance:.0e}) {verdict}",
        device.kind().name(),
        T::DTYPE,
        ours.rel_l2
    );
    if let (true, Some((i, g, e))) = (ours.rel_l2 > tolerance, ours.worst) {
        println!("  worst element {i}: got {g:e}, expected {e:e}");
    }
    match file.get("torch_out") {
        Some(stored) => {
            let torch_out = stored.to_f32();
            if torch_out.shape != got.shape {
                return Err(FapeError::Shape {
                    op,
                    tensor: "torch_out",
                    expected: format!("{:?} (q's shape)", got.shape),
                    actual: torch_out.shape,
                });
            }
            let theirs = compare(&torch_out.data, &expected.data);
            println!("PyTorch ({}) vs f64 reference: rel-L2 {:.2e}", stored.dtype(), theirs.rel_l2);
            let ours_wide: Vec<f64> = got.data.iter().map(|v| v.to_f64()).collect();
            println!("fape_kernels vs PyTorch:        rel-L2 {:.2e}", compare(&torch_out.data, &ours_wide).rel_l2);
        }
        None => println!("(no `torch_out` tensor in the file: PyTorch's output not compared)"),
    }
    Ok(ours.rel_l2 <= tolerance)
}

fn run(path: &Path, kind: DeviceKind) -> Result<bool> {
    let file = TensorFile::read(path)?;
    let (dtype, _) = file.common_dtype(attention::OP, &["q", "k", "v"])?;
    let device = Device::open(kind)?;
    match dtype {
        Dtype::F32 => validate::<f32>(&file, &device),
        Dtype::Bf16 => validate::<bf16>(&file, &device),
        Dtype::F16 => validate::<f16>(&file, &device),
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(path), kind) = (args.next(), args.next()) else {
        eprintln!("usage: validate_pytorch FILE.safetensors [reference|cpu|cube|cuda]  (see the example's docs)");
        return ExitCode::from(2);
    };
    let kind = match kind.as_deref().unwrap_or("cpu").parse::<DeviceKind>() {
        Ok(kind) => kind,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    match run(Path::new(&path), kind) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("error: {}", err.to_string().lines().next().unwrap_or_default());
            ExitCode::from(2)
        }
    }
}
