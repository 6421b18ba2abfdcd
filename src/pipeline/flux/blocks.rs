//! The transformer blocks of the executor with diffusers' `FluxTransformerBlock` (double-stream)
//! and `FluxSingleTransformerBlock` (single-stream) tensor names; the LoRA-MoE adapters sit on
//! the image stream's projections (see [`super::lora`]).

use candle_core::{Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};

use super::config::FluxConfig;
use super::layers::{attention, gelu_tanh, layer_norm, rms_norm};
use super::lora::LoraMoeProjection;
use super::ExecPath;

/// What every block reads besides its tokens.
pub(crate) struct BlockInputs<'a> {
    /// `silu(conditioning)` `[B, dim]`, the input of every modulation linear.
    pub conditioning: &'a Tensor,
    /// RoPE tables `(cos, sin)` `[N_txt + N_img, head_dim/2]` f32.
    pub rope: (&'a Tensor, &'a Tensor),
    /// The executor's config (heads, LoRA-MoE settings).
    pub config: &'a FluxConfig,
    /// Which implementation runs.
    pub path: ExecPath,
}

/// `norm(x) * (1 + scale) + shift` with `shift`, `scale` `[B, dim]`.
pub(crate) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, path: ExecPath) -> candle_core::Result<Tensor> {
    layer_norm(x, path)?.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// `x + gate * y` with `gate` `[B, dim]`.
fn gated_residual(x: &Tensor, gate: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    x + y.broadcast_mul(&gate.unsqueeze(1)?)?
}

/// `[B,L,H*D]` to heads `[B,H,L,D]`.
fn to_heads(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, l, width) = x.dims3()?;
    x.reshape((b, l, heads, width / heads))?.transpose(1, 2)?.contiguous()
}

/// Heads `[B,H,L,D]` back to `[B,L,H*D]`.
fn from_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, l, h * d))
}

/// diffusers' `FeedForward` with GELU-tanh: `net.2(gelu(net.0.proj(x)))`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn load(vb: VarBuilder, dim: usize, hidden: usize) -> candle_core::Result<Self> {
        Ok(Self {
            proj_in: candle_nn::linear(dim, hidden, vb.pp("net.0.proj"))?,
            proj_out: candle_nn::linear(hidden, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor, path: ExecPath) -> candle_core::Result<Tensor> {
        self.proj_out.forward(&gelu_tanh(&self.proj_in.forward(x)?, path)?)
    }
}

/// The per-head RMSNorm weights `[head_dim]` of one stream's queries and keys.
#[derive(Debug, Clone)]
struct QkNorm {
    q: Tensor,
    k: Tensor,
}

impl QkNorm {
    fn load(vb: &VarBuilder, q_name: &str, k_name: &str, head_dim: usize) -> candle_core::Result<Self> {
        Ok(Self { q: vb.pp(q_name).get(head_dim, "weight")?, k: vb.pp(k_name).get(head_dim, "weight")? })
    }
}

/// A double-stream block: text and image tokens keep separate weights and meet in a joint
/// attention over `[text; image]`. Tensors under `transformer_blocks.{i}`: `norm1.linear`,
/// `norm1_context.linear` (`[6 dim, dim]`), `attn.{to_q,to_k,to_v}` (LoRA-MoE),
/// `attn.{add_q_proj,add_k_proj,add_v_proj}`, `attn.{norm_q,norm_k,norm_added_q,norm_added_k}.weight`
/// `[head_dim]`, `attn.to_out.0` (LoRA-MoE), `attn.to_add_out`, `ff.net.{0.proj,2}`,
/// `ff_context.net.{0.proj,2}`.
#[derive(Debug, Clone)]
pub(crate) struct DoubleBlock {
    norm1: Linear,
    norm1_context: Linear,
    to_q: LoraMoeProjection,
    to_k: LoraMoeProjection,
    to_v: LoraMoeProjection,
    to_out: LoraMoeProjection,
    add_q: Linear,
    add_k: Linear,
    add_v: Linear,
    to_add_out: Linear,
    image_norm: QkNorm,
    text_norm: QkNorm,
    ff: FeedForward,
    ff_context: FeedForward,
}

impl DoubleBlock {
    pub(crate) fn load(vb: VarBuilder, c: &FluxConfig) -> candle_core::Result<Self> {
        let (dim, e, r) = (c.dim, c.lora_experts, c.lora_rank);
        let attn = vb.pp("attn");
        let lora = |name: &str| LoraMoeProjection::load(attn.pp(name), dim, dim, e, r);
        let plain = |name: &str| candle_nn::linear(dim, dim, attn.pp(name));
        Ok(Self {
            norm1: candle_nn::linear(dim, 6 * dim, vb.pp("norm1.linear"))?,
            norm1_context: candle_nn::linear(dim, 6 * dim, vb.pp("norm1_context.linear"))?,
            to_q: lora("to_q")?,
            to_k: lora("to_k")?,
            to_v: lora("to_v")?,
            to_out: lora("to_out.0")?,
            add_q: plain("add_q_proj")?,
            add_k: plain("add_k_proj")?,
            add_v: plain("add_v_proj")?,
            to_add_out: plain("to_add_out")?,
            image_norm: QkNorm::load(&attn, "norm_q", "norm_k", c.head_dim)?,
            text_norm: QkNorm::load(&attn, "norm_added_q", "norm_added_k", c.head_dim)?,
            ff: FeedForward::load(vb.pp("ff"), dim, c.mlp_dim())?,
            ff_context: FeedForward::load(vb.pp("ff_context"), dim, c.mlp_dim())?,
        })
    }

    /// The block on image tokens `img` `[B,N_img,dim]` and text tokens `txt` `[B,N_txt,dim]`;
    /// returns both updated.
    pub(crate) fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        inp: &BlockInputs,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (path, heads, moe) = (inp.path, inp.config.heads, &inp.config.lora_moe);
        let m = self.norm1.forward(inp.conditioning)?.chunk(6, D::Minus1)?;
        let c = self.norm1_context.forward(inp.conditioning)?.chunk(6, D::Minus1)?;
        let img_in = modulate(img, &m[0], &m[1], path)?;
        let txt_in = modulate(txt, &c[0], &c[1], path)?;

        let image_heads = |p: &LoraMoeProjection| to_heads(&p.forward(&img_in, moe, path)?, heads);
        let text_heads = |p: &Linear| to_heads(&p.forward(&txt_in)?, heads);
        let q_img = rms_norm(&image_heads(&self.to_q)?, &self.image_norm.q, path)?;
        let k_img = rms_norm(&image_heads(&self.to_k)?, &self.image_norm.k, path)?;
        let q_txt = rms_norm(&text_heads(&self.add_q)?, &self.text_norm.q, path)?;
        let k_txt = rms_norm(&text_heads(&self.add_k)?, &self.text_norm.k, path)?;
        let q = Tensor::cat(&[q_txt, q_img], 2)?;
        let k = Tensor::cat(&[k_txt, k_img], 2)?;
        let v = Tensor::cat(&[text_heads(&self.add_v)?, image_heads(&self.to_v)?], 2)?;
        let joint = from_heads(&attention(&q, &k, &v, None, Some(inp.rope), path)?)?;
        let n_txt = txt.dim(1)?;
        let txt_attn = self.to_add_out.forward(&joint.narrow(1, 0, n_txt)?)?;
        let img_attn = self.to_out.forward(&joint.narrow(1, n_txt, img.dim(1)?)?.contiguous()?, moe, path)?;

        let img = gated_residual(img, &m[2], &img_attn)?;
        let img = gated_residual(&img, &m[5], &self.ff.forward(&modulate(&img, &m[3], &m[4], path)?, path)?)?;
        let txt = gated_residual(txt, &c[2], &txt_attn)?;
        let txt = gated_residual(&txt, &c[5], &self.ff_context.forward(&modulate(&txt, &c[3], &c[4], path)?, path)?)?;
        Ok((img, txt))
    }
}

/// A single-stream block over the joint sequence `[text; image]`. Tensors under
/// `single_transformer_blocks.{i}`: `norm.linear` (`[3 dim, dim]`), `attn.{to_q,to_k,to_v}`
/// (LoRA-MoE on the image tokens; the text tokens take the base projection),
/// `attn.{norm_q,norm_k}.weight` `[head_dim]`, `proj_mlp` (`[mlp, dim]`), `proj_out`
/// (`[dim, dim + mlp]`, over `[attention, gelu(proj_mlp)]`).
#[derive(Debug, Clone)]
pub(crate) struct SingleBlock {
    norm: Linear,
    to_q: LoraMoeProjection,
    to_k: LoraMoeProjection,
    to_v: LoraMoeProjection,
    qk_norm: QkNorm,
    proj_mlp: Linear,
    proj_out: Linear,
}

impl SingleBlock {
    pub(crate) fn load(vb: VarBuilder, c: &FluxConfig) -> candle_core::Result<Self> {
        let (dim, e, r) = (c.dim, c.lora_experts, c.lora_rank);
        let attn = vb.pp("attn");
        let lora = |name: &str| LoraMoeProjection::load(attn.pp(name), dim, dim, e, r);
        Ok(Self {
            norm: candle_nn::linear(dim, 3 * dim, vb.pp("norm.linear"))?,
            to_q: lora("to_q")?,
            to_k: lora("to_k")?,
            to_v: lora("to_v")?,
            qk_norm: QkNorm::load(&attn, "norm_q", "norm_k", c.head_dim)?,
            proj_mlp: candle_nn::linear(dim, c.mlp_dim(), vb.pp("proj_mlp"))?,
            proj_out: candle_nn::linear(dim + c.mlp_dim(), dim, vb.pp("proj_out"))?,
        })
    }

    /// The block on the joint sequence `x` `[B, n_txt + N_img, dim]`.
    pub(crate) fn forward(&self, x: &Tensor, n_txt: usize, inp: &BlockInputs) -> candle_core::Result<Tensor> {
        let (path, heads, moe) = (inp.path, inp.config.heads, &inp.config.lora_moe);
        let m = self.norm.forward(inp.conditioning)?.chunk(3, D::Minus1)?;
        let h = modulate(x, &m[0], &m[1], path)?;
        let mlp = gelu_tanh(&self.proj_mlp.forward(&h)?, path)?;
        let heads_of = |p: &LoraMoeProjection| to_heads(&p.forward_joint(&h, n_txt, moe, path)?, heads);
        let (q, k, v) = (heads_of(&self.to_q)?, heads_of(&self.to_k)?, heads_of(&self.to_v)?);
        let norms = (&self.qk_norm.q, &self.qk_norm.k);
        let attn = from_heads(&attention(&q, &k, &v, Some(norms), Some(inp.rope), path)?)?;
        let out = self.proj_out.forward(&Tensor::cat(&[attn, mlp], D::Minus1)?)?;
        gated_residual(x, &m[2], &out)
    }
}
