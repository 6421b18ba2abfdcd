//! The LoRA-MoE projection of the image stream (this crate's `lora_moe` op, contract in the
//! README) on both paths. Tensors of the projection `P` (such as
//! `transformer_blocks.0.attn.to_q`): `P.weight` `[n,d]`, `P.bias` `[n]`, and the adapter
//! `P.lora_moe.lora_a` `[E,r,d]`, `P.lora_moe.lora_b` `[E,n,r]`, `P.lora_moe.router` `[E,d]`
//! (the router reads the projection's input: no guidance).

use candle_core::{DType, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};

use super::ExecPath;
use crate::candle_ops::candle_error;
use crate::candle_ops::{self, LoraMoeWeights};
use crate::lora_moe::{gaussian_taps, Band, LoraMoeConfig};

/// A projection `d -> n` with a LoRA-MoE adapter.
#[derive(Debug, Clone)]
pub struct LoraMoeProjection {
    weights: LoraMoeWeights,
    /// The base projection alone (for the text tokens the adapter does not see).
    base: Linear,
}

impl LoraMoeProjection {
    /// Loads `weight`, `bias` and `lora_moe.{lora_a,lora_b,router}` under `vb` for a projection
    /// `d -> n` with `experts` experts of rank `rank`.
    ///
    /// # Errors
    /// The backend's error naming a missing, mis-shaped or mis-typed tensor.
    pub fn load(vb: VarBuilder, d: usize, n: usize, experts: usize, rank: usize) -> candle_core::Result<Self> {
        let weight = vb.get((n, d), "weight")?;
        let bias = vb.get(n, "bias")?;
        let adapter = vb.pp("lora_moe");
        let weights = LoraMoeWeights {
            weight: weight.clone(),
            bias: Some(bias.clone()),
            lora_a: adapter.get((experts, rank, d), "lora_a")?,
            lora_b: adapter.get((experts, n, rank), "lora_b")?,
            router: adapter.get((experts, d), "router")?,
        };
        Ok(Self { weights, base: Linear::new(weight, Some(bias)) })
    }

    /// `y` `[B,T,n]` of the image tokens `x` `[B,T,d]` (raster order).
    ///
    /// # Errors
    /// Shape errors of the op; config errors of `config`.
    pub fn forward(&self, x: &Tensor, config: &LoraMoeConfig, path: ExecPath) -> candle_core::Result<Tensor> {
        match path {
            ExecPath::Reference => self.reference(x, config),
            ExecPath::Fused => candle_ops::lora_moe(&x.contiguous()?, &self.weights, None, config),
        }
    }

    /// The projection of a joint sequence `x` `[B, n_txt + T, d]`: the base projection of the
    /// first `n_txt` (text) tokens and the LoRA-MoE projection of the `T` image tokens after them.
    ///
    /// # Errors
    /// As [`Self::forward`].
    pub fn forward_joint(
        &self,
        x: &Tensor,
        n_txt: usize,
        config: &LoraMoeConfig,
        path: ExecPath,
    ) -> candle_core::Result<Tensor> {
        let tokens = x.dim(1)?;
        let text = self.base.forward(&x.narrow(1, 0, n_txt)?)?;
        let image = self.forward(&x.narrow(1, n_txt, tokens - n_txt)?, config, path)?;
        Tensor::cat(&[text, image], 1)
    }

    /// The op's contract in candle ops: full-width band filtering per expert, router softmax,
    /// energy prior, gating and one LoRA path per expert. Filtering, energies and gates in f32;
    /// the projections in `x`'s dtype.
    fn reference(&self, x: &Tensor, config: &LoraMoeConfig) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let tokens = x.dim(1)?;
        let x32 = x.to_dtype(DType::F32)?;
        let taps = gaussian_taps(config.taps, config.sigma).map_err(candle_error)?;
        let half = (taps.len() - 1) / 2;
        let padded = x32.pad_with_zeros(1, half, half)?;
        let mut low = (padded.narrow(1, 0, tokens)? * taps[0])?;
        for (j, &h) in taps.iter().enumerate().skip(1) {
            low = (low + (padded.narrow(1, j, tokens)? * h)?)?;
        }
        let bands: Vec<Tensor> = config
            .bands
            .iter()
            .map(|band| match band {
                Band::Low => Ok(low.clone()),
                Band::High => &x32 - &low,
                Band::Full => Ok(x32.clone()),
            })
            .collect::<candle_core::Result<_>>()?;
        // prior [B,E]: each band's mean square over the image, normalised over the experts.
        let energies: Vec<Tensor> =
            bands.iter().map(|b| b.sqr()?.mean_keepdim((1, 2))?.flatten_all()).collect::<candle_core::Result<_>>()?;
        let energies = Tensor::stack(&energies, 1)?;
        let prior = energies.broadcast_div(&(energies.sum_keepdim(1)? + 1e-12)?)?;
        // router softmax [B,T,E] blended with the prior.
        let router = self.weights.router.to_dtype(DType::F32)?;
        let logits = (x32.broadcast_matmul(&router.t()?)? / config.temperature)?;
        let exp = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?.exp()?;
        let softmax = exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?;
        let mut gates = ((softmax * config.lambda)?.broadcast_add(&(prior.unsqueeze(1)? * (1.0 - config.lambda))?))?;
        if config.top_k > 0 && config.top_k < config.bands.len() {
            let order = gates.arg_sort_last_dim(false)?;
            let rank = order.arg_sort_last_dim(true)?;
            let kept = (gates * rank.lt(config.top_k as u32)?.to_dtype(DType::F32)?)?;
            gates = kept.broadcast_div(&kept.sum_keepdim(D::Minus1)?)?;
        }
        let rank = self.weights.lora_a.dim(1)?;
        let scaled = (gates * config.scale_for(rank))?;
        let mut y = self.base.forward(x)?;
        for (e, band) in bands.iter().enumerate() {
            let a = self.weights.lora_a.get(e)?;
            let b = self.weights.lora_b.get(e)?;
            let shrunk = band.to_dtype(dtype)?.broadcast_matmul(&a.t()?)?;
            let up = shrunk.broadcast_matmul(&b.t()?)?;
            let gate = scaled.narrow(D::Minus1, e, 1)?.to_dtype(dtype)?;
            y = (y + up.broadcast_mul(&gate)?)?;
        }
        Ok(y)
    }
}
