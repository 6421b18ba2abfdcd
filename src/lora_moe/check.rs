//! `fape check` cases of the LoRA-MoE op and its token low-pass.

use super::{lora_moe, reference, token_lowpass, Band, LoraMoeConfig, LoraMoeInputs, OP, TOLERANCE_F32};
use crate::backend::Device;
use crate::check::{CaseSet, CheckRow};
use crate::error::Result;
use crate::testing::{rng, uniform};
use crate::tensor::View;

/// Low-pass cases: (B, T, C, taps).
const LOWPASS_CASES: &[(usize, usize, usize, usize)] = &[(1, 1, 5, 9), (3, 37, 13, 9), (2, 1030, 200, 9), (2, 17, 3, 1), (1, 5, 7, 11)];

/// One LoRA-MoE case.
#[derive(Debug, Clone, Copy)]
struct Case {
    batch: usize,
    tokens: usize,
    d: usize,
    n: usize,
    experts: usize,
    rank: usize,
    top_k: usize,
    guidance_dim: Option<usize>,
    bias: bool,
}

const CASES: &[Case] = &[
    Case { batch: 1, tokens: 1, d: 8, n: 8, experts: 1, rank: 4, top_k: 0, guidance_dim: None, bias: true },
    Case { batch: 3, tokens: 37, d: 200, n: 72, experts: 2, rank: 8, top_k: 1, guidance_dim: Some(24), bias: true },
    Case { batch: 1, tokens: 37, d: 200, n: 136, experts: 4, rank: 16, top_k: 0, guidance_dim: None, bias: false },
    Case { batch: 2, tokens: 1024, d: 64, n: 40, experts: 2, rank: 8, top_k: 0, guidance_dim: None, bias: true },
];

const LARGE_CASES: &[Case] = &[
    Case { batch: 1, tokens: 1024, d: 3072, n: 3072, experts: 2, rank: 8, top_k: 0, guidance_dim: None, bias: true },
    Case { batch: 3, tokens: 37, d: 3072, n: 200, experts: 4, rank: 16, top_k: 1, guidance_dim: None, bias: false },
];

/// The check rows of both ops on `device`.
pub(crate) fn check_rows(device: &Device, cases: CaseSet) -> Vec<CheckRow> {
    let mut rows: Vec<CheckRow> = LOWPASS_CASES.iter().map(|&c| lowpass_row(device, c)).collect();
    let large = if cases == CaseSet::Large { LARGE_CASES } else { &[] };
    for (i, case) in CASES.iter().chain(large).enumerate() {
        rows.extend(lora_moe_rows(device, case, 100 + i as u64));
    }
    rows
}

fn lowpass_row(device: &Device, (batch, tokens, channels, taps): (usize, usize, usize, usize)) -> CheckRow {
    let shape_name = format!("{batch}x{tokens}x{channels} taps {taps}");
    let shape = [batch, tokens, channels];
    let x = uniform(&mut rng(7 + tokens as u64), shape.iter().product(), -1.0, 1.0);
    let run = || -> Result<CheckRow> {
        let view = View::new("token_lowpass", "x", &x, &shape)?;
        let got = token_lowpass(device, view, taps, 2.0)?;
        let expected = reference::token_lowpass(view, taps, 2.0)?;
        Ok(CheckRow::compared("token_lowpass.low".into(), device, shape_name.clone(), &got.data, &expected.data, TOLERANCE_F32))
    };
    run().unwrap_or_else(|e| CheckRow::errored("token_lowpass.low".into(), device, "f32", shape_name.clone(), e))
}

/// Random tensors of one case, in the order of [`LoraMoeInputs`].
struct CaseData {
    x: Vec<f32>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    lora_a: Vec<f32>,
    lora_b: Vec<f32>,
    router: Vec<f32>,
    guidance: Vec<f32>,
}

impl CaseData {
    fn new(c: &Case, seed: u64) -> Self {
        let mut r = rng(seed);
        let dg = c.guidance_dim.unwrap_or(c.d);
        let w_scale = 1.0 / (c.d as f32).sqrt();
        Self {
            x: uniform(&mut r, c.batch * c.tokens * c.d, -1.0, 1.0),
            weight: uniform(&mut r, c.n * c.d, -w_scale, w_scale),
            bias: uniform(&mut r, c.n, -0.1, 0.1),
            lora_a: uniform(&mut r, c.experts * c.rank * c.d, -w_scale, w_scale),
            // Large enough that the LoRA term matters against the base projection.
            lora_b: uniform(&mut r, c.experts * c.n * c.rank, -0.5, 0.5),
            router: uniform(&mut r, c.experts * dg, -1.0, 1.0),
            guidance: uniform(&mut r, c.guidance_dim.map_or(0, |g| c.batch * c.tokens * g), -1.0, 1.0),
        }
    }
}

fn lora_moe_rows(device: &Device, c: &Case, seed: u64) -> Vec<CheckRow> {
    let shape = format!(
        "B{} T{} d{} n{} E{} r{} k{}{}{}",
        c.batch,
        c.tokens,
        c.d,
        c.n,
        c.experts,
        c.rank,
        c.top_k,
        if c.guidance_dim.is_some() { " g" } else { "" },
        if c.bias { " b" } else { "" }
    );
    let data = CaseData::new(c, seed);
    let dg = c.guidance_dim.unwrap_or(c.d);
    let shapes = (
        [c.batch, c.tokens, c.d],
        [c.n, c.d],
        [c.n],
        [c.experts, c.rank, c.d],
        [c.experts, c.n, c.rank],
        [c.experts, dg],
        [c.batch, c.tokens, dg],
    );
    let bands = [Band::Low, Band::High, Band::Full];
    let config = LoraMoeConfig {
        bands: (0..c.experts).map(|e| bands[e % 3]).collect(),
        top_k: c.top_k,
        ..LoraMoeConfig::default()
    };
    let run = || -> Result<Vec<CheckRow>> {
        let inputs = LoraMoeInputs {
            x: View::new(OP, "x", &data.x, &shapes.0)?,
            weight: View::new(OP, "weight", &data.weight, &shapes.1)?,
            bias: c.bias.then(|| View::new(OP, "bias", &data.bias, &shapes.2)).transpose()?,
            lora_a: View::new(OP, "lora_a", &data.lora_a, &shapes.3)?,
            lora_b: View::new(OP, "lora_b", &data.lora_b, &shapes.4)?,
            router: View::new(OP, "router", &data.router, &shapes.5)?,
            guidance: c.guidance_dim.map(|_| View::new(OP, "guidance", &data.guidance, &shapes.6)).transpose()?,
        };
        let got = lora_moe(device, &inputs, &config)?;
        let expected = reference::lora_moe(&inputs, &config)?;
        Ok(vec![
            CheckRow::compared(format!("{OP}.y"), device, shape.clone(), &got.y.data, &expected.y.data, TOLERANCE_F32),
            CheckRow::compared(format!("{OP}.gates"), device, shape.clone(), &got.gates.data, &expected.gates.data, TOLERANCE_F32),
        ])
    };
    run().unwrap_or_else(|e| vec![CheckRow::errored(OP.to_string(), device, "f32", shape.clone(), e)])
}
