//! Non-causal multi-head attention as FLUX-style transformer blocks run it:
//! optional per-head RMSNorm of `q` and `k` (over the head dimension, with a learned weight),
//! then optional rotary position embedding (RoPE) of `q` and `k`, then
//! `out = softmax(q k^T * scale) v` with a row-max-subtracted (stable) softmax.
//!
//! Shapes: `q` `[B,H,Lq,D]`, `k` and `v` `[B,H,Lk,D]`, `q_norm`/`k_norm` `[D]`,
//! `rope_cos`/`rope_sin` `[L,D/2]` with `L >= max(Lq,Lk)`; `out` is `[B,H,Lq,D]`.
//!
//! * RMSNorm: `x / sqrt(mean(x^2) + 1e-6) * w`, applied before RoPE; `q_norm` and `k_norm`
//!   are independent of each other.
//! * RoPE: each consecutive pair `(x[2i], x[2i+1])` of a row at sequence position `l` is rotated
//!   by the angle of table row `l`, column `i`: `(x0 cos - x1 sin, x0 sin + x1 cos)`. `q` reads
//!   rows `0..Lq`, `k` rows `0..Lk`; `v` is not rotated. `D` must be even.
//! * `scale` defaults to `1/sqrt(D)`.
//!
//! The exact f64 contract is [`reference::attention`]; [`attention`] runs it on a [`Device`] in
//! f32 and [`attention_typed`] in f32, bf16 or f16. On CUDA, `CudaAttention` keeps the inputs on
//! the device for repeated runs of the flash kernel and of the naive cuBLAS baseline (benches);
//! `crate::candle_ops::attention` is the candle op.

pub(crate) mod candle;
mod check;
mod cpu;
#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "cuda")]
mod cuda;
mod flash;
#[cfg(feature = "cuda")]
mod naive;
pub mod reference;

pub(crate) use check::check_rows;
#[cfg(feature = "cuda")]
pub use cuda::{CudaAttention, TENSOR_CORE_HEAD_DIMS};

use std::any::TypeId;
use std::borrow::Cow;

use crate::backend::Device;
use crate::error::{config_error, FapeError, Result};
use crate::tensor::{expect_nonempty, expect_shape, Real, Tensor, View};

/// The op's name in errors and in the check table.
pub const OP: &str = "attention";

/// Rel-L2 tolerance of an f32 backend against [`reference::attention`].
pub const TOLERANCE_F32: f64 = 1e-4;

/// Rel-L2 tolerance of a backend computing in bf16 against [`reference::attention`].
pub const TOLERANCE_BF16: f64 = 2e-2;

/// Rel-L2 tolerance of a backend computing in f16 against [`reference::attention`] (f16 keeps
/// 3 more mantissa bits than bf16: P and the output round 8x finer).
pub const TOLERANCE_F16: f64 = 5e-3;

/// The epsilon inside the RMSNorm square root.
pub const RMS_EPS: f64 = 1e-6;

/// The base of the RoPE frequencies [`rope_tables`] uses.
pub const ROPE_THETA: f64 = 10_000.0;

/// An element type attention runs in: f32, bf16 or f16 (sealed).
///
/// On CUDA, bf16 and f16 run the tensor-core flash kernel (16-bit operands, f32 accumulation,
/// head dimensions [`TENSOR_CORE_HEAD_DIMS`]) and f32 the f32 flash kernel; the host backends
/// compute in f32 (widening 16-bit inputs) and round the output to the element type.
pub trait AttentionElement: Real + bytemuck::Pod + private::Sealed {
    /// Whether the CUDA backend runs this type on tensor cores.
    const TENSOR_CORES: bool;
    /// The 16- or 32-bit pattern the CUDA kernels read and write (`u16` for bf16/f16).
    #[cfg(feature = "cuda")]
    type Bits: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + bytemuck::Pod + Unpin;
}

mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

impl AttentionElement for f32 {
    const TENSOR_CORES: bool = false;
    #[cfg(feature = "cuda")]
    type Bits = f32;
}

impl AttentionElement for half::bf16 {
    const TENSOR_CORES: bool = true;
    #[cfg(feature = "cuda")]
    type Bits = u16;
}

impl AttentionElement for half::f16 {
    const TENSOR_CORES: bool = true;
    #[cfg(feature = "cuda")]
    type Bits = u16;
}

/// Scalar settings of attention.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttentionConfig {
    /// The factor applied to `q k^T` before the softmax; `None` means `1/sqrt(D)`.
    pub scale: Option<f64>,
}

impl AttentionConfig {
    /// Checks the fields.
    ///
    /// # Errors
    /// [`FapeError::Config`] (field `scale`) when a given scale is NaN or infinite.
    pub fn validate(&self) -> Result<()> {
        match self.scale {
            Some(s) if !s.is_finite() => Err(config_error(OP, "scale", format!("must be finite, got {s}"))),
            _ => Ok(()),
        }
    }

    /// The scale used for head dimension `head_dim`: the given one, else `1/sqrt(head_dim)`.
    pub fn scale_for(&self, head_dim: usize) -> f64 {
        self.scale.unwrap_or_else(|| 1.0 / (head_dim as f64).sqrt())
    }
}

/// The extents of validated attention inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    /// `B`: sequences (images).
    pub batch: usize,
    /// `H`: attention heads.
    pub heads: usize,
    /// `Lq`: query rows per head.
    pub q_len: usize,
    /// `Lk`: key/value rows per head.
    pub k_len: usize,
    /// `D`: the head dimension.
    pub head_dim: usize,
}

/// The tensors of one attention call, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct AttentionInputs<'a, T> {
    /// Queries `[B,H,Lq,D]`.
    pub q: View<'a, T>,
    /// Keys `[B,H,Lk,D]`.
    pub k: View<'a, T>,
    /// Values `[B,H,Lk,D]`.
    pub v: View<'a, T>,
    /// RMSNorm weight for `q`, `[D]`.
    pub q_norm: Option<View<'a, T>>,
    /// RMSNorm weight for `k`, `[D]`.
    pub k_norm: Option<View<'a, T>>,
    /// RoPE cosines `[L,D/2]`, `L >= max(Lq,Lk)`; given together with `rope_sin`.
    pub rope_cos: Option<View<'a, T>>,
    /// RoPE sines `[L,D/2]`, `L >= max(Lq,Lk)`; given together with `rope_cos`.
    pub rope_sin: Option<View<'a, T>>,
}

impl<'a, T> AttentionInputs<'a, T> {
    /// Plain attention of `q` `[B,H,Lq,D]` over `k`, `v` `[B,H,Lk,D]`: no norms, no RoPE.
    pub fn new(q: View<'a, T>, k: View<'a, T>, v: View<'a, T>) -> Self {
        Self { q, k, v, q_norm: None, k_norm: None, rope_cos: None, rope_sin: None }
    }

    /// The same inputs with RMSNorm weights `q_norm` and `k_norm`, both `[D]`.
    pub fn with_norms(self, q_norm: View<'a, T>, k_norm: View<'a, T>) -> Self {
        Self { q_norm: Some(q_norm), k_norm: Some(k_norm), ..self }
    }

    /// The same inputs with RoPE tables `rope_cos` and `rope_sin`, both `[L,D/2]`.
    pub fn with_rope(self, rope_cos: View<'a, T>, rope_sin: View<'a, T>) -> Self {
        Self { rope_cos: Some(rope_cos), rope_sin: Some(rope_sin), ..self }
    }

    /// Checks every shape against the contract and returns the extents.
    ///
    /// # Errors
    /// [`FapeError::Shape`] naming the tensor when `q`, `k` or `v` is not rank 4, when their
    /// `B`, `H` or `D` disagree, when `k` and `v` differ in `Lk`, when `q` or `k` is empty,
    /// when a norm weight is not `[D]`, when `D` is odd with RoPE, or when a RoPE table is not
    /// `[L,D/2]` with `L >= max(Lq,Lk)`. [`FapeError::Config`] naming the missing table when
    /// only one of `rope_cos`/`rope_sin` is given.
    pub fn validate(&self) -> Result<AttentionDims> {
        expect_shape(OP, "q", &self.q, "[B,H,Lq,D]", &[None; 4])?;
        expect_nonempty(OP, "q", &self.q)?;
        let s = self.q.shape();
        let (batch, heads, q_len, head_dim) = (s[0], s[1], s[2], s[3]);
        let known = [Some(batch), Some(heads), None, Some(head_dim)];
        let kv_spelling = format!("[{batch},{heads},Lk,{head_dim}]");
        expect_shape(OP, "k", &self.k, &kv_spelling, &known)?;
        expect_nonempty(OP, "k", &self.k)?;
        let k_len = self.k.shape()[2];
        let v_dims = [Some(batch), Some(heads), Some(k_len), Some(head_dim)];
        expect_shape(OP, "v", &self.v, &format!("[{batch},{heads},{k_len},{head_dim}]"), &v_dims)?;
        for (name, norm) in [("q_norm", &self.q_norm), ("k_norm", &self.k_norm)] {
            if let Some(w) = norm {
                expect_shape(OP, name, w, &format!("[{head_dim}]"), &[Some(head_dim)])?;
            }
        }
        let dims = AttentionDims { batch, heads, q_len, k_len, head_dim };
        self.validate_rope(&dims)?;
        Ok(dims)
    }

    /// The RoPE part of [`Self::validate`].
    fn validate_rope(&self, dims: &AttentionDims) -> Result<()> {
        let (cos, sin) = match (&self.rope_cos, &self.rope_sin) {
            (None, None) => return Ok(()),
            (Some(cos), Some(sin)) => (cos, sin),
            (Some(_), None) => return Err(config_error(OP, "rope_sin", "is missing: rope_cos is given")),
            (None, Some(_)) => return Err(config_error(OP, "rope_cos", "is missing: rope_sin is given")),
        };
        let d = dims.head_dim;
        if !d.is_multiple_of(2) {
            return Err(FapeError::Shape {
                op: OP,
                tensor: "q",
                expected: "[B,H,Lq,D] with D even (RoPE rotates pairs)".to_string(),
                actual: self.q.shape().to_vec(),
            });
        }
        let rows = dims.q_len.max(dims.k_len);
        for (name, table) in [("rope_cos", cos), ("rope_sin", sin)] {
            let spelling = format!("[L>={rows},{}]", d / 2);
            expect_shape(OP, name, table, &spelling, &[None, Some(d / 2)])?;
            if table.shape()[0] < rows {
                return Err(FapeError::Shape {
                    op: OP,
                    tensor: name,
                    expected: spelling,
                    actual: table.shape().to_vec(),
                });
            }
        }
        Ok(())
    }

    /// The RoPE tables, when both are given.
    pub(crate) fn rope(&self) -> Option<(View<'a, T>, View<'a, T>)>
    where
        T: Copy,
    {
        self.rope_cos.zip(self.rope_sin)
    }
}

/// Attention on `device` in f32. Shapes as [`AttentionInputs`]; returns `out` `[B,H,Lq,D]`.
///
/// `Device::Reference` runs [`reference::attention`] and rounds to f32; `Device::Cpu` runs the
/// fast f32 CPU path (rayon over batch, heads and blocks of query rows); `Device::Cube` a
/// flash-style CubeCL kernel (online softmax over key tiles, norms and RoPE in a pre-pass);
/// `Device::Cuda` the f32 flash kernel of `kernels/attention.cu` after a norm/RoPE pre-pass.
///
/// # Errors
/// Shape and config errors as [`AttentionInputs::validate`] and [`AttentionConfig::validate`];
/// [`FapeError::Unsupported`] on Cube for head dimensions whose key/value tile does not fit the
/// adapter's shared memory, and on CUDA for `D` > 256; device errors from the GPU backends.
pub fn attention(device: &Device, inputs: &AttentionInputs<'_, f32>, config: &AttentionConfig) -> Result<Tensor<f32>> {
    attention_typed(device, inputs, config)
}

/// Attention on `device` with `T` elements (f32, bf16 or f16) in and out. Shapes as
/// [`AttentionInputs`]; returns `out` `[B,H,Lq,D]` of `T`.
///
/// On CUDA, bf16 and f16 run the tensor-core flash kernel (16-bit operands, f32 accumulation;
/// q and k pass through the norm/RoPE pre-pass in f32 and are stored as `T`); f32 runs as
/// [`attention`]. The reference computes in f64, the CPU and Cube backends in f32 (widening
/// 16-bit inputs on the host); all round the result to `T`.
///
/// # Errors
/// As [`attention`]; on CUDA with bf16/f16, [`FapeError::Unsupported`] when `D` is not one of
/// [`TENSOR_CORE_HEAD_DIMS`] (64, 128): run f32 or another backend for other head dimensions.
pub fn attention_typed<T: AttentionElement>(
    device: &Device,
    inputs: &AttentionInputs<'_, T>,
    config: &AttentionConfig,
) -> Result<Tensor<T>> {
    let dims = inputs.validate()?;
    config.validate()?;
    let scale = config.scale_for(dims.head_dim);
    match device {
        Device::Reference => reference::attention(inputs, config).map(|t| t.map(|&v| T::from_f64(v))),
        Device::Cpu => widened(inputs, |wide| Ok(cpu::attention(wide, dims, scale).data)),
        #[cfg(feature = "cube")]
        Device::Cube(d) => widened(inputs, |wide| cube::attention(d, wide, dims, scale)),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let mut run = CudaAttention::new(d, inputs, config)?;
            run.flash()?;
            run.output()
        }
    }
}

/// Runs an f32 host backend `run` (returning `out` `[B,H,Lq,D]` as a flat vector) on `inputs`
/// widened to f32 (borrowed when `T` is f32), and rounds its result to `T`.
fn widened<T: AttentionElement>(
    inputs: &AttentionInputs<'_, T>,
    run: impl FnOnce(&AttentionInputs<'_, f32>) -> Result<Vec<f32>>,
) -> Result<Tensor<T>> {
    let (q, k, v) = (widen(inputs.q), widen(inputs.k), widen(inputs.v));
    let q_norm = inputs.q_norm.map(widen);
    let k_norm = inputs.k_norm.map(widen);
    let rope = inputs.rope().map(|(c, s)| (widen(c), widen(s)));
    // The lengths match `like`'s shape: this cannot fail for validated inputs.
    fn view<'a, T>(name: &'static str, data: &'a [f32], like: View<'a, T>) -> Result<View<'a, f32>> {
        View::new(OP, name, data, like.shape())
    }
    let mut wide = AttentionInputs::new(view("q", &q, inputs.q)?, view("k", &k, inputs.k)?, view("v", &v, inputs.v)?);
    if let (Some(w), Some(like)) = (&q_norm, inputs.q_norm) {
        wide.q_norm = Some(view("q_norm", w, like)?);
    }
    if let (Some(w), Some(like)) = (&k_norm, inputs.k_norm) {
        wide.k_norm = Some(view("k_norm", w, like)?);
    }
    if let (Some((c, s)), Some((like_c, like_s))) = (&rope, inputs.rope()) {
        wide = wide.with_rope(view("rope_cos", c, like_c)?, view("rope_sin", s, like_s)?);
    }
    let out = run(&wide)?;
    Ok(Tensor { data: out.into_iter().map(|x| T::from_f64(f64::from(x))).collect(), shape: inputs.q.shape().to_vec() })
}

/// The elements of `view` as f32: borrowed when `T` is f32, converted otherwise.
fn widen<T: AttentionElement>(view: View<'_, T>) -> Cow<'_, [f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        Cow::Borrowed(bytemuck::cast_slice(view.data()))
    } else {
        Cow::Owned(view.data().iter().map(|x| x.to_f64() as f32).collect())
    }
}

/// RoPE tables `(cos, sin)`, each `[rows, head_dim/2]`, for the 1-D positions `0..rows`:
/// row `l`, column `i` holds the cosine/sine of `l * 10000^(-2i/head_dim)`.
///
/// # Errors
/// [`FapeError::Config`] (field `head_dim`) when `head_dim` is odd or zero, or (field `rows`)
/// when `rows` is zero.
pub fn rope_tables(rows: usize, head_dim: usize) -> Result<(Tensor<f32>, Tensor<f32>)> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(config_error(OP, "head_dim", format!("must be even and positive, got {head_dim}")));
    }
    if rows == 0 {
        return Err(config_error(OP, "rows", "must be positive"));
    }
    let half = head_dim / 2;
    let angles: Vec<f64> = (0..rows * half)
        .map(|n| {
            let (l, i) = (n / half, n % half);
            l as f64 * ROPE_THETA.powf(-2.0 * i as f64 / head_dim as f64)
        })
        .collect();
    let table =
        |f: fn(f64) -> f64| Tensor { data: angles.iter().map(|&a| f(a) as f32).collect(), shape: vec![rows, half] };
    Ok((table(f64::cos), table(f64::sin)))
}
