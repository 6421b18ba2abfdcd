//! A candle model calling this crate's candle ops: an attention block whose q, k and v
//! projections are LoRA-MoE layers (`candle_ops::lora_moe`), with the fused attention op
//! (`candle_ops::attention`) in place of candle's matmul-softmax-matmul, and the frequency split
//! (`candle_ops::freq_split`) reading an image's band energies. The block's attention is checked
//! against plain candle ops on the same q, k, v.
//!
//! Run: `cargo run --release --example candle_model` (the CPU, f32). Built with
//! `--no-default-features --features candle-cuda,cube` it runs on CUDA device 0 when there is
//! one, in bf16, the ops launching this crate's kernels on candle's stream.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::Linear;
use fape_kernels::attention::AttentionConfig;
use fape_kernels::candle_ops::{self, LoraMoeWeights};
use fape_kernels::freq::FreqSplitConfig;
use fape_kernels::lora_moe::LoraMoeConfig;
use fape_kernels::testing::{rng, uniform};

/// A seeded tensor of `shape`, uniform in `[-scale, scale)`.
fn random(seed: u64, shape: &[usize], scale: f32, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
    let data = uniform(&mut rng(seed), shape.iter().product(), -scale, scale);
    Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
}

/// Self-attention over `d` features in `heads` heads; q, k, v are LoRA-MoE projections.
struct AdapterAttention {
    q: LoraMoeWeights,
    k: LoraMoeWeights,
    v: LoraMoeWeights,
    out: Linear,
    heads: usize,
    config: LoraMoeConfig,
}

impl AdapterAttention {
    /// Seeded weights: `experts` experts of rank `rank` per projection.
    fn new(
        d: usize,
        heads: usize,
        experts: usize,
        rank: usize,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        let w = 1.0 / (d as f32).sqrt();
        let projection = |seed: u64| -> candle_core::Result<LoraMoeWeights> {
            Ok(LoraMoeWeights {
                weight: random(seed, &[d, d], w, device, dtype)?,
                bias: Some(random(seed + 1, &[d], 0.1, device, dtype)?),
                lora_a: random(seed + 2, &[experts, rank, d], w, device, dtype)?,
                lora_b: random(seed + 3, &[experts, d, rank], 0.5, device, dtype)?,
                router: random(seed + 4, &[experts, d], 1.0, device, dtype)?,
            })
        };
        let out = Linear::new(random(40, &[d, d], w, device, dtype)?, None);
        Ok(Self {
            q: projection(10)?,
            k: projection(20)?,
            v: projection(30)?,
            out,
            heads,
            config: LoraMoeConfig::default(),
        })
    }

    /// `[B,T,d]` -> `[B,H,T,d/H]`.
    fn split_heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        x.reshape((b, t, self.heads, d / self.heads))?.transpose(1, 2)?.contiguous()
    }

    /// The heads' q, k, v `[B,H,T,d/H]` of `x` `[B,T,d]`.
    fn qkv(&self, x: &Tensor) -> candle_core::Result<[Tensor; 3]> {
        let project = |w: &LoraMoeWeights| self.split_heads(&candle_ops::lora_moe(x, w, None, &self.config)?);
        Ok([project(&self.q)?, project(&self.k)?, project(&self.v)?])
    }
}

impl Module for AdapterAttention {
    /// `x` `[B,T,d]` (tokens in raster order) -> `x + out(attention(q, k, v))` `[B,T,d]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let [q, k, v] = self.qkv(x)?;
        let heads = candle_ops::attention(&q, &k, &v, None, None, &AttentionConfig::default())?;
        let (b, t, d) = x.dims3()?;
        let merged = heads.transpose(1, 2)?.reshape((b, t, d))?;
        x + self.out.forward(&merged)?
    }
}

/// `softmax(q k^T / sqrt(D)) v` in plain candle ops, in f32.
fn plain_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let (q, k, v) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
    let scores = (q.matmul(&k.t()?.contiguous()?)? / (q.dim(D::Minus1)? as f64).sqrt())?;
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)
}

fn main() -> candle_core::Result<()> {
    let device = Device::cuda_if_available(0)?;
    let dtype = if device.is_cuda() { DType::BF16 } else { DType::F32 };
    // d = 128 in 2 heads of 64: the bf16 CUDA kernels need d % 8 == 0 and D = 64 or 128.
    let (batch, tokens, d, heads) = (2, 96, 128, 2);
    let block = AdapterAttention::new(d, heads, 2, 8, &device, dtype)?;
    let x = random(1, &[batch, tokens, d], 1.0, &device, dtype)?;
    let y = block.forward(&x)?;
    println!("{:?} {dtype:?}: x {:?} -> y {:?}", device.location(), x.dims(), y.dims());

    let [q, k, v] = block.qkv(&x)?;
    let fused = candle_ops::attention(&q, &k, &v, None, None, &AttentionConfig::default())?.to_dtype(DType::F32)?;
    let plain = plain_attention(&q, &k, &v)?;
    let diff = (&fused - &plain)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let norm = plain.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    println!("fused attention vs plain candle ops: rel-L2 {:.2e}", diff / norm);

    // The frequency split of a [1,3,64,48] image (f32): low + high = x, and band energies.
    let image = random(2, &[1, 3, 64, 48], 0.5, &device, DType::F32)?;
    let (low, high, energy) = candle_ops::freq_split(&image, &FreqSplitConfig::default())?;
    let residual = (&low + &high - &image)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!(
        "freq_split: max |low + high - x| = {residual:.1e}; band energies of channel 0: {:?}",
        energy.get(0)?.get(0)?.to_vec1::<f32>()?
    );
    Ok(())
}
