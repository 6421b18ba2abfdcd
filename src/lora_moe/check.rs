//! `fape check` cases of the LoRA-MoE op and its token low-pass.

use super::{
    lora_moe, reference, token_lowpass, Band, LoraMoeConfig, LoraMoeDims, LoraMoeDtype, LoraMoeInputs, LoraMoeOutput,
    LoraMoeTensors, OP, TOLERANCE_BF16, TOLERANCE_F32,
};
use crate::backend::Device;
use crate::check::{CaseSet, CheckRow};
use crate::error::Result;
use crate::tensor::View;
use crate::testing::{rng, uniform};

/// Low-pass cases: (B, T, C, taps).
const LOWPASS_CASES: &[(usize, usize, usize, usize)] =
    &[(1, 1, 5, 9), (3, 37, 13, 9), (2, 1030, 200, 9), (2, 17, 3, 1), (1, 5, 7, 11)];

/// One LoRA-MoE case: extents (guidance when `dg != d`), top-k, bias.
type Case = (LoraMoeDims, usize, bool);

const fn dims(batch: usize, tokens: usize, d: usize, n: usize, experts: usize, rank: usize, dg: usize) -> LoraMoeDims {
    LoraMoeDims { batch, tokens, d, n, experts, rank, dg }
}

const CASES: &[Case] = &[
    (dims(1, 1, 8, 8, 1, 4, 8), 0, true),
    (dims(3, 37, 200, 72, 2, 8, 24), 1, true),
    (dims(1, 37, 200, 136, 4, 16, 200), 0, false),
    (dims(2, 1024, 64, 40, 2, 8, 64), 0, true),
    (dims(3, 1024, 8, 16, 1, 16, 8), 1, false),
    (dims(1, 1, 200, 24, 4, 4, 200), 1, true),
];

const LARGE_CASES: &[Case] =
    &[(dims(1, 1024, 3072, 3072, 2, 8, 3072), 0, true), (dims(3, 37, 3072, 200, 4, 16, 3072), 1, false)];

/// The check rows of both ops on `device`.
pub(crate) fn check_rows(device: &Device, cases: CaseSet) -> Vec<CheckRow> {
    let mut rows: Vec<CheckRow> = LOWPASS_CASES.iter().map(|&c| lowpass_row(device, c)).collect();
    let large = if cases == CaseSet::Large { LARGE_CASES } else { &[] };
    for (i, case) in CASES.iter().chain(large).enumerate() {
        rows.extend(lora_moe_rows::<f32>(device, case, 100 + i as u64, TOLERANCE_F32, "", &lora_moe));
        rows.extend(lora_moe_rows::<half::bf16>(device, case, 100 + i as u64, TOLERANCE_BF16, "", &lora_moe));
        // On CUDA the fused bf16 layer's second schedule too ("2gemm": the base GEMM beside the
        // shrink, then the small u B^T GEMM), as `fape bench` names it.
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            let overlapped = |_: &Device, inputs: &LoraMoeInputs<'_, half::bf16>, config: &LoraMoeConfig| {
                let dims = inputs.validate(config)?;
                super::cuda::lora_moe_bf16(d, inputs, dims, config, super::cuda::Schedule::Overlapped)
            };
            rows.extend(lora_moe_rows(device, case, 100 + i as u64, TOLERANCE_BF16, " 2gemm", &overlapped));
        }
    }
    rows
}

/// A LoRA-MoE implementation under check: [`lora_moe`] or one CUDA schedule of it.
type LoraMoeFn<'f, T> = dyn Fn(&Device, &LoraMoeInputs<'_, T>, &LoraMoeConfig) -> Result<LoraMoeOutput<T>> + 'f;

fn lowpass_row(device: &Device, (batch, tokens, channels, taps): (usize, usize, usize, usize)) -> CheckRow {
    let shape_name = format!("{batch}x{tokens}x{channels} taps {taps}");
    let shape = [batch, tokens, channels];
    let x = uniform(&mut rng(7 + tokens as u64), shape.iter().product(), -1.0, 1.0);
    let run = || -> Result<CheckRow> {
        let view = View::new("token_lowpass", "x", &x, &shape)?;
        let got = token_lowpass(device, view, taps, 2.0)?;
        let expected = reference::token_lowpass(view, taps, 2.0)?;
        Ok(CheckRow::compared(
            "token_lowpass.low".into(),
            device,
            shape_name.clone(),
            &got.data,
            &expected.data,
            TOLERANCE_F32,
        ))
    };
    run().unwrap_or_else(|e| CheckRow::errored("token_lowpass.low".into(), device, "f32", shape_name.clone(), e))
}

/// The `y` and `gates` rows of one case with inputs in `T` (the reference reads the same
/// `T` values, so only the backend's arithmetic is measured).
fn lora_moe_rows<T: LoraMoeDtype>(
    device: &Device,
    &(dims, top_k, bias): &Case,
    seed: u64,
    tolerance: f64,
    variant: &str,
    run_op: &LoraMoeFn<'_, T>,
) -> Vec<CheckRow> {
    let LoraMoeDims { batch, tokens, d, n, experts, rank, dg } = dims;
    let guided = if dg != d { " g" } else { "" };
    let biased = if bias { " b" } else { "" };
    let shape = format!("B{batch} T{tokens} d{d} n{n} E{experts} r{rank} k{top_k}{guided}{biased}");
    let tensors = LoraMoeTensors::random(seed, dims, bias).cast::<T>();
    let bands = [Band::Low, Band::High, Band::Full];
    let config =
        LoraMoeConfig { bands: (0..experts).map(|e| bands[e % 3]).collect(), top_k, ..LoraMoeConfig::default() };
    let inputs = tensors.inputs();
    let run = || -> Result<Vec<CheckRow>> {
        let got = run_op(device, &inputs, &config)?;
        let expected = reference::lora_moe(&inputs, &config)?;
        Ok(vec![
            CheckRow::compared(
                format!("{OP}.y{variant}"),
                device,
                shape.clone(),
                &got.y.data,
                &expected.y.data,
                tolerance,
            ),
            CheckRow::compared(
                format!("{OP}.gates{variant}"),
                device,
                shape.clone(),
                &got.gates.data,
                &expected.gates.data,
                tolerance,
            ),
        ])
    };
    run().unwrap_or_else(|e| vec![CheckRow::errored(format!("{OP}{variant}"), device, T::DTYPE, shape.clone(), e)])
}
