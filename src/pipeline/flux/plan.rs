//! The plan encoder: the planner's plan line as the executor's context tokens.
//!
//! Tensors (under `plan_encoder.` in the transformer folder):
//! `plan_encoder.byte_embedding.weight` `[256, context_dim]` (one row per byte value) and
//! `plan_encoder.pooled_proj.{weight [pooled_dim, context_dim], bias [pooled_dim]}`.
//!
//! Token `i` of a line is `byte_embedding[byte_i] + pe(i)`, with the fixed sinusoidal position
//! encoding `pe(i)[2j] = sin(i / 10000^(2j/context_dim))`, `pe(i)[2j+1] = cos(...)` (the text
//! tokens' RoPE ids are zero, as in FLUX, so order enters here); the line is cut after
//! `max_plan_tokens` bytes. The pooled vector is `pooled_proj(mean_i token_i)`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use super::config::FluxConfig;
use crate::candle_ops::candle_error;
use crate::error::FapeError;

/// Byte values: the rows of the embedding table.
pub const BYTE_VALUES: usize = 256;

/// The context the executor reads: the plan's tokens and its pooled vector.
#[derive(Debug, Clone)]
pub struct PlanTokens {
    /// `[1, N_txt, context_dim]`.
    pub tokens: Tensor,
    /// `[1, pooled_dim]`.
    pub pooled: Tensor,
}

/// The byte-level plan encoder (module docs).
#[derive(Debug, Clone)]
pub struct PlanEncoder {
    table: Tensor,
    pooled_proj: Linear,
    max_tokens: usize,
}

impl PlanEncoder {
    /// Loads `plan_encoder.*` from `vb` (the transformer folder's root).
    ///
    /// # Errors
    /// The config's validation error; the backend's error naming a missing, mis-shaped or
    /// mis-typed tensor.
    pub fn load(vb: VarBuilder, cfg: &FluxConfig) -> candle_core::Result<Self> {
        cfg.validate().map_err(candle_error)?;
        let vb = vb.pp("plan_encoder");
        Ok(Self {
            table: vb.pp("byte_embedding").get((BYTE_VALUES, cfg.context_dim), "weight")?,
            pooled_proj: candle_nn::linear(cfg.context_dim, cfg.pooled_dim, vb.pp("pooled_proj"))?,
            max_tokens: cfg.max_plan_tokens,
        })
    }

    /// The context of `plan_line` on `device`, in the encoder's dtype: one token per byte (at
    /// most `max_plan_tokens`).
    ///
    /// # Errors
    /// [`FapeError::Config`] (field `plan_line`) for an empty line; candle errors.
    pub fn encode(&self, plan_line: &str, device: &Device) -> candle_core::Result<PlanTokens> {
        let bytes = &plan_line.as_bytes()[..plan_line.len().min(self.max_tokens)];
        if bytes.is_empty() {
            let message = "is empty: the executor needs at least one plan token".to_string();
            return Err(candle_error(FapeError::Config { op: "plan_encoder", field: "plan_line", message }));
        }
        let (n, width) = (bytes.len(), self.table.dim(1)?);
        let ids = Tensor::from_vec(bytes.iter().map(|&b| u32::from(b)).collect::<Vec<_>>(), n, self.table.device())?;
        let positions = Tensor::from_vec(sinusoids(n, width), (n, width), self.table.device())?;
        let tokens =
            (self.table.index_select(&ids, 0)?.to_dtype(DType::F32)? + positions)?.to_dtype(self.table.dtype())?;
        let pooled = self.pooled_proj.forward(&tokens.mean_keepdim(0)?)?;
        Ok(PlanTokens { tokens: tokens.unsqueeze(0)?.to_device(device)?, pooled: pooled.to_device(device)? })
    }
}

/// The fixed position encoding `[n, width]` of the module docs, row-major.
fn sinusoids(n: usize, width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * width);
    for i in 0..n {
        out.extend((0..width).map(|c| {
            let angle = i as f64 / 10_000f64.powf((c - c % 2) as f64 / width as f64);
            (if c % 2 == 0 { angle.sin() } else { angle.cos() }) as f32
        }));
    }
    out
}
