//! The executor of FAPE-IR: a FLUX-shaped MMDiT that restores an image's VAE latent in one step,
//! conditioned on the planner's plan line, with LoRA-MoE adapters (this crate's `lora_moe` op) on
//! the image stream's attention projections.
//!
//! # Tensors
//!
//! Names are diffusers' `FluxTransformer2DModel`'s (all linears have `.weight` `[out, in]` and
//! `.bias` `[out]`; `dim` = heads x head_dim, `mlp` = mlp_ratio x dim):
//!
//! | name | shape |
//! |---|---|
//! | `x_embedder` | linear `in_channels -> dim` |
//! | `context_embedder` | linear `context_dim -> dim` |
//! | `time_text_embed.timestep_embedder.linear_{1,2}` | `256 -> dim -> dim` |
//! | `time_text_embed.guidance_embedder.linear_{1,2}` | `256 -> dim -> dim` (when `guidance_embeds`) |
//! | `time_text_embed.text_embedder.linear_{1,2}` | `pooled_dim -> dim -> dim` |
//! | `transformer_blocks.{i}.norm1.linear`, `.norm1_context.linear` | `dim -> 6 dim` (shift, scale, gate of attention, then of the MLP) |
//! | `transformer_blocks.{i}.attn.{to_q,to_k,to_v,to_out.0}` | `dim -> dim`, **LoRA-MoE** |
//! | `transformer_blocks.{i}.attn.{add_q_proj,add_k_proj,add_v_proj,to_add_out}` | `dim -> dim` |
//! | `transformer_blocks.{i}.attn.{norm_q,norm_k,norm_added_q,norm_added_k}.weight` | `[head_dim]` |
//! | `transformer_blocks.{i}.{ff,ff_context}.net.0.proj`, `.net.2` | `dim -> mlp`, `mlp -> dim` |
//! | `single_transformer_blocks.{i}.norm.linear` | `dim -> 3 dim` (shift, scale, gate) |
//! | `single_transformer_blocks.{i}.attn.{to_q,to_k,to_v}` | `dim -> dim`, **LoRA-MoE** |
//! | `single_transformer_blocks.{i}.attn.{norm_q,norm_k}.weight` | `[head_dim]` |
//! | `single_transformer_blocks.{i}.proj_mlp`, `.proj_out` | `dim -> mlp`, `dim + mlp -> dim` |
//! | `norm_out.linear` | `dim -> 2 dim` (scale, then shift) |
//! | `proj_out` | `dim -> in_channels` |
//! | `plan_encoder.byte_embedding.weight` | `[256, context_dim]` ([`PlanEncoder`]) |
//! | `plan_encoder.pooled_proj` | `context_dim -> pooled_dim` |
//!
//! Each **LoRA-MoE** projection `P` adds `P.lora_moe.lora_a` `[E,r,dim]`, `P.lora_moe.lora_b`
//! `[E,dim,r]` and `P.lora_moe.router` `[E,dim]` (E = `lora_experts`, r = `lora_rank`; the router
//! reads the projection's input). In double blocks it runs on the image tokens; in single blocks
//! on the image part of the joint sequence (the text tokens take the base projection `P`), so
//! the token low-pass always runs along an image's raster-order tokens.
//!
//! # Computation
//!
//! As FLUX: LayerNorms without affine parameters (eps 1e-6) modulated by `norm(x)(1 + scale) +
//! shift`, gated residuals, GELU-tanh MLPs, per-head RMSNorm of queries and keys (each stream its
//! own weights), joint attention over `[text; image]` with 3-axis RoPE
//! ([`embed::rope_tables`]: text ids zero, image token `(row, col)` at `(0, row, col)`),
//! timesteps and guidance scaled by 1000 into 256 sinusoidal features. Two paths through the
//! same weights, chosen per call by [`ExecPath`].

mod blocks;
mod config;
pub mod embed;
mod layers;
mod lora;
mod model;
mod plan;

pub use config::{read_config_file, FluxConfig, MAX_CONFIG_BYTES, MAX_EXTENT, MAX_PARAMETERS, TIMESTEP_FEATURES};
pub use layers::LAYER_NORM_EPS;
pub use lora::LoraMoeProjection;
pub use model::{one_step, tensor_specs, FluxTransformer, ENTRY_TIME, TRANSFORMER_SUBFOLDER};
pub use plan::{PlanEncoder, PlanTokens, BYTE_VALUES};

/// Which implementation of the executor's hot ops runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExecPath {
    /// Plain candle ops throughout: LoRA-MoE, attention, norms and GELU written as their formulas
    /// (norms, softmax, RoPE and the LoRA-MoE gating in f32).
    Reference,
    /// This crate's LoRA-MoE and attention ops, candle's fused LayerNorm, RMSNorm and GELU.
    Fused,
}

impl std::str::FromStr for ExecPath {
    type Err = crate::FapeError;

    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "reference" => Ok(Self::Reference),
            "fused" => Ok(Self::Fused),
            _ => Err(crate::FapeError::Config {
                op: "flux",
                field: "path",
                message: format!("`{s}` is not one of reference, fused"),
            }),
        }
    }
}
