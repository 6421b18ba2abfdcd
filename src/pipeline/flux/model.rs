//! The executor: FLUX-shaped MMDiT ([`FluxTransformer`]) and FAPE-IR's one restoration step
//! ([`one_step`]).

use candle_core::{DType, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};

use super::blocks::{modulate, BlockInputs, DoubleBlock, SingleBlock};
use super::config::{FluxConfig, TIMESTEP_FEATURES};
use super::embed::{pack, position_ids, rope_tables, timestep_features, unpack, MlpEmbedder};
use super::plan::{PlanEncoder, PlanTokens};
use super::ExecPath;
use crate::candle_ops::candle_error;
use crate::error::FapeError;
use crate::pipeline::weights::{Recorder, TensorSpec};

/// The subfolder of a weights directory that holds the executor (and its plan encoder).
pub const TRANSFORMER_SUBFOLDER: &str = "transformer";

/// The op name of the executor's input errors.
const OP: &str = "flux";

/// The time at which FAPE-IR's degraded latent enters the flow (300 of 1000 steps).
pub const ENTRY_TIME: f64 = 0.3;

/// FLUX's scaling of timesteps and guidance before their sinusoidal features.
const TIME_SCALE: f64 = 1000.0;

fn input_error(tensor: &'static str, expected: String, actual: &[usize]) -> candle_core::Error {
    candle_error(FapeError::Shape { op: OP, tensor, expected, actual: actual.to_vec() })
}

/// The FLUX-shaped transformer with diffusers' `FluxTransformer2DModel` tensor names (module
/// docs of [`super`]) and LoRA-MoE adapters on the image stream.
#[derive(Debug, Clone)]
pub struct FluxTransformer {
    config: FluxConfig,
    dtype: DType,
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: MlpEmbedder,
    guidance_embedder: Option<MlpEmbedder>,
    text_embedder: MlpEmbedder,
    double_blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    norm_out: Linear,
    proj_out: Linear,
}

impl FluxTransformer {
    /// Loads every tensor of the model (names in the module docs of [`super`]) from `vb` (its
    /// root: `x_embedder.weight` and so on), in `vb`'s dtype and on its device.
    ///
    /// # Errors
    /// The config's validation error; the backend's error naming a missing, mis-shaped or
    /// mis-typed tensor.
    pub fn load(vb: VarBuilder, cfg: &FluxConfig) -> candle_core::Result<Self> {
        cfg.validate().map_err(candle_error)?;
        let dim = cfg.dim;
        let embed = vb.pp("time_text_embed");
        let guidance_embedder = cfg
            .guidance_embeds
            .then(|| MlpEmbedder::load(embed.pp("guidance_embedder"), TIMESTEP_FEATURES, dim))
            .transpose()?;
        Ok(Self {
            config: cfg.clone(),
            dtype: vb.dtype(),
            x_embedder: candle_nn::linear(cfg.in_channels, dim, vb.pp("x_embedder"))?,
            context_embedder: candle_nn::linear(cfg.context_dim, dim, vb.pp("context_embedder"))?,
            timestep_embedder: MlpEmbedder::load(embed.pp("timestep_embedder"), TIMESTEP_FEATURES, dim)?,
            guidance_embedder,
            text_embedder: MlpEmbedder::load(embed.pp("text_embedder"), cfg.pooled_dim, dim)?,
            double_blocks: (0..cfg.double_blocks)
                .map(|i| DoubleBlock::load(vb.pp(format!("transformer_blocks.{i}")), cfg))
                .collect::<candle_core::Result<_>>()?,
            single_blocks: (0..cfg.single_blocks)
                .map(|i| SingleBlock::load(vb.pp(format!("single_transformer_blocks.{i}")), cfg))
                .collect::<candle_core::Result<_>>()?,
            norm_out: candle_nn::linear(dim, 2 * dim, vb.pp("norm_out.linear"))?,
            proj_out: candle_nn::linear(dim, cfg.in_channels, vb.pp("proj_out"))?,
        })
    }

    /// The config the model was loaded with.
    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// The dtype of the weights (the dtype the model computes in).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The flow velocity `[B,C,h,w]` (same shape and dtype as `latent`) of the normalised VAE
    /// latent `latent` `[B,C,h,w]` (C = `in_channels/4`, h and w even) at `timestep` in 0..1,
    /// conditioned on `plan` (batch 1, shared by every image, or batch B).
    ///
    /// The latent is packed into 2x2-patch tokens (raster order), the plan tokens go first in the
    /// joint sequence (RoPE ids zero), the image tokens after them at `(0, row, col)`.
    ///
    /// # Errors
    /// [`FapeError::Shape`] naming `latent`, `plan.tokens` or `plan.pooled` when they do not
    /// fit the config; [`FapeError::Config`] for a non-finite `timestep`; candle errors.
    pub fn forward(
        &self,
        latent: &Tensor,
        plan: &PlanTokens,
        timestep: f64,
        path: ExecPath,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let dims = latent.dims();
        let [b, c, h, w] = *dims else {
            return Err(input_error("latent", format!("[B,{},h,w]", cfg.latent_channels()), dims));
        };
        if c != cfg.latent_channels() || h == 0 || w == 0 || !h.is_multiple_of(2) || !w.is_multiple_of(2) {
            return Err(input_error(
                "latent",
                format!("[B,{},h,w] with h, w even and positive", cfg.latent_channels()),
                dims,
            ));
        }
        if !timestep.is_finite() {
            let message = format!("must be finite, got {timestep}");
            return Err(candle_error(FapeError::Config { op: OP, field: "timestep", message }));
        }
        let (tokens, pooled) = self.plan_for_batch(plan, b)?;
        let device = latent.device();
        let n_txt = tokens.dim(1)?;

        let img = self.x_embedder.forward(&pack(&latent.to_dtype(self.dtype)?)?)?;
        let txt = self.context_embedder.forward(&tokens)?;
        let features = |value: f64| timestep_features(&vec![value * TIME_SCALE; b], device)?.to_dtype(self.dtype);
        let mut conditioning =
            (self.timestep_embedder.forward(&features(timestep)?)? + self.text_embedder.forward(&pooled)?)?;
        if let Some(g) = &self.guidance_embedder {
            conditioning = (conditioning + g.forward(&features(cfg.guidance)?)?)?;
        }
        let conditioning = candle_nn::ops::silu(&conditioning)?;
        let ids = position_ids(n_txt, h / 2, w / 2);
        let (cos, sin) = rope_tables(&ids, cfg.axes_dims_rope, cfg.rope_theta, device)?;
        let inputs = BlockInputs { conditioning: &conditioning, rope: (&cos, &sin), config: cfg, path };

        let (mut img, mut txt) = (img, txt);
        for block in &self.double_blocks {
            (img, txt) = block.forward(&img, &txt, &inputs)?;
        }
        let mut joint = Tensor::cat(&[txt, img], 1)?;
        for block in &self.single_blocks {
            joint = block.forward(&joint, n_txt, &inputs)?;
        }
        let img = joint.narrow(1, n_txt, (h / 2) * (w / 2))?;
        let m = self.norm_out.forward(&conditioning)?.chunk(2, D::Minus1)?;
        let img = modulate(&img, &m[1], &m[0], path)?; // norm_out's chunks are (scale, shift)
        unpack(&self.proj_out.forward(&img)?, h, w)?.to_dtype(latent.dtype())
    }

    /// The plan's tokens `[B,N_txt,context_dim]` and pooled vector `[B,pooled_dim]` in the
    /// model's dtype, broadcast from batch 1 when needed.
    fn plan_for_batch(&self, plan: &PlanTokens, batch: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let cfg = &self.config;
        let t = plan.tokens.dims();
        let ok = t.len() == 3 && (t[0] == 1 || t[0] == batch) && t[1] > 0 && t[2] == cfg.context_dim;
        if !ok {
            return Err(input_error("plan.tokens", format!("[1 or {batch},N_txt>0,{}]", cfg.context_dim), t));
        }
        let p = plan.pooled.dims();
        if p.len() != 2 || p[0] != t[0] || p[1] != cfg.pooled_dim {
            return Err(input_error("plan.pooled", format!("[{},{}]", t[0], cfg.pooled_dim), p));
        }
        let tokens = plan.tokens.to_dtype(self.dtype)?.broadcast_as((batch, t[1], t[2]))?.contiguous()?;
        let pooled = plan.pooled.to_dtype(self.dtype)?.broadcast_as((batch, p[1]))?.contiguous()?;
        Ok((tokens, pooled))
    }
}

/// Every tensor [`FluxTransformer::load`] and [`PlanEncoder::load`] take for `cfg` (the contents
/// of the [`TRANSFORMER_SUBFOLDER`]), listed without allocating them.
///
/// # Errors
/// [`FapeError::Config`] when `cfg` is invalid.
pub fn tensor_specs(cfg: &FluxConfig) -> crate::Result<Vec<TensorSpec>> {
    cfg.validate()?;
    let recorder = Recorder::new();
    let recorded = FluxTransformer::load(recorder.var_builder(DType::F32), cfg)
        .and_then(|_| PlanEncoder::load(recorder.var_builder(DType::F32), cfg));
    recorded.map_err(|e| FapeError::Device {
        backend: "candle",
        context: "recording the executor's tensors".into(),
        message: e.to_string(),
    })?;
    Ok(recorder.specs())
}

/// FAPE-IR's one restoration step: the degraded image's latent `z` `[B,C,h,w]` enters the flow at
/// t = [`ENTRY_TIME`] (300 of 1000), the model predicts the velocity `v`, and the restored latent
/// is `x0 = z - 0.3 v` (same shape and dtype as `z`).
///
/// # Errors
/// Those of [`FluxTransformer::forward`].
pub fn one_step(model: &FluxTransformer, z: &Tensor, plan: &PlanTokens, path: ExecPath) -> candle_core::Result<Tensor> {
    let v = model.forward(z, plan, ENTRY_TIME, path)?;
    z - (v * ENTRY_TIME)?
}
