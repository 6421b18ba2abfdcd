//! CUDA launch wrappers of attention (kernels in `kernels/attention.cu`).
//!
//! One forward pass is the row pre-pass `attention_prepare_<t>` (RMSNorm then RoPE of `q` and
//! `k`, f32 math, stored as `<t>`; skipped without norms and RoPE) followed by a flash kernel:
//! `attention_flash_<bf16|f16>_d<64|128>` on tensor cores (mma.sync m16n8k16, ldmatrix,
//! cp.async double buffering) or `attention_flash_f32` (plain f32 FMA, the f32 check path).
//! [`forward`] runs them on device views (used by [`CudaAttention`] and the candle op);
//! [`super::naive`] is the cuBLAS baseline on the same buffers.

use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, PushKernelArg,
};

use super::{naive, AttentionConfig, AttentionDims, AttentionElement, AttentionInputs, OP, RMS_EPS};
use crate::backend::cuda::{dev_err, kernel_int, launch_config, tiles, CudaDevice, ATTENTION_CU};
use crate::error::{FapeError, Result};
use crate::tensor::{Tensor, View};

/// The head dimensions the tensor-core kernel is instantiated for.
pub const TENSOR_CORE_HEAD_DIMS: [usize; 2] = [64, 128];

/// Mirrors `attention_flash_cfg` in `kernels/attention.cu`.
mod flash_cfg {
    /// `blockDim.x`: 4 warps.
    pub const THREADS: u32 = 128;
    /// Query rows per block (32 per warp, as two 16-row m-tiles).
    pub const BLOCK_M: usize = 128;
    /// 16-bit elements of padding per shared-memory row.
    pub const PAD: usize = 8;

    /// Keys per K/V tile at D = 64.
    pub const BLOCK_N_D64: usize = 64;
    /// Keys per K/V tile at D = 128 (where S must leave registers for the O accumulators).
    pub const BLOCK_N_D128: usize = 32;

    /// Keys per K/V tile for head dimension `d` (64 or 128; `FlashShape<D>::BLOCK_N`).
    pub fn block_n(d: usize) -> usize {
        if d <= 64 {
            BLOCK_N_D64
        } else {
            BLOCK_N_D128
        }
    }
    /// Dynamic shared memory of the kernel for head dimension `d`: the Q tile and two K and two
    /// V tiles of padded 16-bit rows (`FlashShape<D>::SMEM_BYTES`).
    pub fn smem_bytes(d: usize) -> usize {
        (BLOCK_M + 4 * block_n(d)) * (d + PAD) * 2
    }
}

/// Mirrors `attention_flash_f32_cfg` in `kernels/attention.cu`.
mod flash_f32_cfg {
    /// `blockDim.x`: 4 warps.
    pub const THREADS: u32 = 128;
    /// Query rows per block (4 per warp).
    pub const BLOCK_M: usize = 16;
    /// Keys per tile (one per lane).
    pub const BLOCK_N: usize = 32;
    /// The largest head dimension (8 output columns per lane).
    pub const MAX_D: usize = 256;

    /// Dynamic shared memory for head dimension `d`: q `[BLOCK_M][d]`, k `[BLOCK_N][d+1]`,
    /// v `[BLOCK_N][d]` in f32.
    pub fn smem_bytes(d: usize) -> usize {
        (BLOCK_M * d + BLOCK_N * (d + 1) + BLOCK_N * d) * 4
    }
}

/// Mirrors `attention_prepare_cfg` in `kernels/attention.cu`.
mod prepare_cfg {
    /// Rows (one per warp) per block.
    pub const WARPS: usize = 4;
    /// `blockDim.x`.
    pub const THREADS: u32 = 128;
}

/// Shared memory a kernel may use without opting in.
const DEFAULT_SMEM: usize = 48 * 1024;

/// The attention module loaded in one CUDA context, and the stream its kernels run on.
pub(crate) struct Kernels {
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
}

impl Kernels {
    /// The kernels of `kernels/attention.cu` on `device`'s stream.
    ///
    /// # Errors
    /// [`FapeError::Nvrtc`] / [`FapeError::Device`] from compiling or loading the module.
    pub(crate) fn of_device(device: &CudaDevice) -> Result<Self> {
        let (file, source) = ATTENTION_CU;
        Ok(Self { stream: device.stream().clone(), module: device.module(file, source)? })
    }

    /// The kernels compiled for the device of `stream` and loaded in its context (candle's).
    ///
    /// # Errors
    /// As [`Kernels::of_device`].
    #[cfg(feature = "candle-cuda")]
    pub(crate) fn on_stream(stream: Arc<CudaStream>) -> Result<Self> {
        Self::of_device(&CudaDevice::on_stream(stream)?)
    }

    /// The stream the kernels run on.
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Kernel `name` of the module.
    pub(crate) fn function(&self, name: &str) -> Result<CudaFunction> {
        self.module.load_function(name).map_err(dev_err(format!("looking up kernel `{name}` in `attention.cu`")))
    }
}

/// Borrowed RoPE tables `(cos, sin)` on the device.
type DeviceRope<'a, B> = (CudaView<'a, B>, CudaView<'a, B>);

/// Borrowed device inputs of one attention call, each dense row-major as its host tensor in
/// [`AttentionInputs`]; `B` is the element's bit pattern ([`AttentionElement::Bits`]).
pub(crate) struct DeviceInputs<'a, B> {
    pub q: CudaView<'a, B>,
    pub k: CudaView<'a, B>,
    pub v: CudaView<'a, B>,
    pub q_norm: Option<CudaView<'a, B>>,
    pub k_norm: Option<CudaView<'a, B>>,
    pub rope: Option<DeviceRope<'a, B>>,
}

/// `FapeError::Unsupported` on the CUDA backend.
fn unsupported(what: impl Into<String>) -> FapeError {
    FapeError::Unsupported { op: OP, backend: "cuda", what: what.into() }
}

/// Checks that device buffer `name` holds at least `need` elements.
fn expect_len<B>(name: &str, view: &CudaView<'_, B>, need: usize) -> Result<()> {
    if view.len() < need {
        return Err(unsupported(format!("device buffer `{name}` holds {} elements but {need} are needed", view.len())));
    }
    Ok(())
}

/// Checks the lengths of every buffer of `inputs` against `dims` (RoPE tables need
/// `max(Lq,Lk)` rows of `D/2`).
fn expect_lengths<B>(inputs: &DeviceInputs<'_, B>, dims: AttentionDims) -> Result<()> {
    let AttentionDims { batch, heads, q_len, k_len, head_dim } = dims;
    expect_len("q", &inputs.q, batch * heads * q_len * head_dim)?;
    expect_len("k", &inputs.k, batch * heads * k_len * head_dim)?;
    expect_len("v", &inputs.v, batch * heads * k_len * head_dim)?;
    for (name, norm) in [("q_norm", &inputs.q_norm), ("k_norm", &inputs.k_norm)] {
        if let Some(w) = norm {
            expect_len(name, w, head_dim)?;
        }
    }
    if let Some((cos, sin)) = &inputs.rope {
        let need = q_len.max(k_len) * (head_dim / 2);
        expect_len("rope_cos", cos, need)?;
        expect_len("rope_sin", sin, need)?;
    }
    Ok(())
}

/// Runs attention on device buffers: `inputs` (validated `dims`), softmax scale `scale`;
/// writes `out` `[B,H,Lq,D]`. Enqueued on the kernels' stream; nothing is synchronized.
///
/// # Errors
/// [`FapeError::Unsupported`] when `D` is not one of [`TENSOR_CORE_HEAD_DIMS`] for a 16-bit
/// `T` (or exceeds 256 for f32), a buffer is too short or misaligned, or an extent exceeds the
/// kernels' 32-bit indexing or the grid limits; [`FapeError::Device`] from the launches.
pub(crate) fn forward<T: AttentionElement>(
    kernels: &Kernels,
    inputs: &DeviceInputs<'_, T::Bits>,
    dims: AttentionDims,
    scale: f64,
    out: &mut CudaViewMut<'_, T::Bits>,
) -> Result<()> {
    check_head_dim::<T>(dims.head_dim)?;
    expect_lengths(inputs, dims)?;
    let (q, k) = prepared::<T>(kernels, inputs, dims)?;
    let q = q.as_ref().map_or_else(|| inputs.q.slice(..), CudaSlice::as_view);
    let k = k.as_ref().map_or_else(|| inputs.k.slice(..), CudaSlice::as_view);
    launch_flash::<T>(kernels, &q, &k, &inputs.v, out, dims, scale)
}

/// Rejects head dimensions the kernel for `T` does not have.
fn check_head_dim<T: AttentionElement>(head_dim: usize) -> Result<()> {
    if T::TENSOR_CORES && !TENSOR_CORE_HEAD_DIMS.contains(&head_dim) {
        return Err(unsupported(format!(
            "head dimension D = {head_dim} in {} (the tensor-core kernel has D = 64 and 128; run f32 or \
             another backend)",
            T::DTYPE
        )));
    }
    if !T::TENSOR_CORES && head_dim > flash_f32_cfg::MAX_D {
        return Err(unsupported(format!("head dimension D = {head_dim} in f32 (the f32 kernel has D <= 256)")));
    }
    Ok(())
}

/// `q` and `k` after the pre-pass, or `None` each when there are no norms and no RoPE (the
/// inputs are used as they are).
#[allow(clippy::type_complexity)]
pub(crate) fn prepared<T: AttentionElement>(
    kernels: &Kernels,
    inputs: &DeviceInputs<'_, T::Bits>,
    dims: AttentionDims,
) -> Result<(Option<CudaSlice<T::Bits>>, Option<CudaSlice<T::Bits>>)> {
    if inputs.q_norm.is_none() && inputs.k_norm.is_none() && inputs.rope.is_none() {
        return Ok((None, None));
    }
    let rows_per_head = [("q", dims.q_len, &inputs.q, &inputs.q_norm), ("k", dims.k_len, &inputs.k, &inputs.k_norm)];
    let mut prepared = rows_per_head.into_iter().map(|(name, seq_len, x, norm)| {
        let len = dims.batch * dims.heads * seq_len * dims.head_dim;
        let mut out = kernels
            .stream
            .alloc_zeros::<T::Bits>(len)
            .map_err(dev_err(format!("allocating the prepared `{name}` ({len} elements)")))?;
        launch_prepare::<T>(
            kernels,
            name,
            x,
            norm.as_ref(),
            inputs.rope.as_ref(),
            &mut out.as_view_mut(),
            seq_len,
            dims,
        )?;
        Ok::<_, FapeError>(out)
    });
    let q = prepared.next().transpose()?;
    let k = prepared.next().transpose()?;
    Ok((q, k))
}

/// `out = rope(rms_norm(x))` over the `B*H*seq_len` rows of `x` with `attention_prepare_<t>`.
#[allow(clippy::too_many_arguments)]
fn launch_prepare<T: AttentionElement>(
    kernels: &Kernels,
    name: &str,
    x: &CudaView<'_, T::Bits>,
    norm: Option<&CudaView<'_, T::Bits>>,
    rope: Option<&DeviceRope<'_, T::Bits>>,
    out: &mut CudaViewMut<'_, T::Bits>,
    seq_len: usize,
    dims: AttentionDims,
) -> Result<()> {
    let rows = dims.batch * dims.heads * seq_len;
    if out.len() < rows * dims.head_dim {
        return Err(unsupported(format!("prepared `{name}` buffer holds {} elements", out.len())));
    }
    let rows_i = kernel_int(OP, "B*H*L rows", rows)?;
    let seq_i = kernel_int(OP, "sequence length", seq_len)?;
    let d_i = kernel_int(OP, "head dimension", dims.head_dim)?;
    let (use_norm, use_rope) = (i32::from(norm.is_some()), i32::from(rope.is_some()));
    // Unread placeholders when a table is absent (the kernel reads weight only with use_norm,
    // cos/sin only with use_rope).
    let weight = norm.unwrap_or(x);
    let (cos, sin) = rope.map_or((x, x), |(c, s)| (c, s));
    let eps = RMS_EPS as f32;
    let cfg = launch_config(OP, (tiles(rows, prepare_cfg::WARPS), 1, 1), (prepare_cfg::THREADS, 1, 1), 0)?;
    let kernel = format!("attention_prepare_{}", T::DTYPE);
    let function = kernels.function(&kernel)?;
    let mut launch = kernels.stream.launch_builder(&function);
    launch.arg(x).arg(weight).arg(cos).arg(sin).arg(out).arg(&rows_i).arg(&seq_i).arg(&d_i);
    launch.arg(&use_norm).arg(&use_rope).arg(&eps);
    // SAFETY: the arguments match `attention_prepare_<t>(const T* x, const T* weight, const T*
    // cos, const T* sin, T* out, int rows, int seq_len, int head_dim, int use_norm, int use_rope,
    // float eps)` in order and type (T is the element's bit pattern, the kernel's storage type).
    // Warp r of the grid (rows <= 4 * blocks) reads x and writes out at [r*D, (r+1)*D), below
    // rows*D: x was checked by `expect_lengths` and out above; weight is read below D only with
    // use_norm (checked to hold D), cos/sin below max(Lq,Lk)*D/2 only with use_rope (checked;
    // row r reads position r % seq_len < seq_len). `out` is a fresh allocation distinct from the
    // inputs. The buffers outlive the launch: they are dropped only after the stream's later
    // work (cudarc records their use on the stream).
    unsafe { launch.launch(cfg) }.map_err(dev_err(format!("launching {kernel} for `{name}`")))?;
    Ok(())
}

/// The 16-byte alignment the tensor-core kernel's vector loads and stores need.
fn expect_aligned(name: &str, address: u64) -> Result<()> {
    if !address.is_multiple_of(16) {
        return Err(unsupported(format!("device buffer `{name}` at address {address:#x} is not 16-byte aligned")));
    }
    Ok(())
}

/// The flash kernel for `T` on prepared `q`, `k` and `v`, writing `out`.
fn launch_flash<T: AttentionElement>(
    kernels: &Kernels,
    q: &CudaView<'_, T::Bits>,
    k: &CudaView<'_, T::Bits>,
    v: &CudaView<'_, T::Bits>,
    out: &mut CudaViewMut<'_, T::Bits>,
    dims: AttentionDims,
    scale: f64,
) -> Result<()> {
    let AttentionDims { batch, heads, q_len, k_len, head_dim } = dims;
    if out.len() < batch * heads * q_len * head_dim {
        return Err(unsupported(format!("device buffer `out` holds {} elements", out.len())));
    }
    let heads_total = batch * heads;
    let q_len_i = kernel_int(OP, "Lq", q_len)?;
    let k_len_i = kernel_int(OP, "Lk", k_len)?;
    let d_i = kernel_int(OP, "head dimension", head_dim)?;
    let (kernel, (block_m, block_n), threads, smem) = if T::TENSOR_CORES {
        let kernel = format!("attention_flash_{}_d{head_dim}", T::DTYPE);
        let tile = (flash_cfg::BLOCK_M, flash_cfg::block_n(head_dim));
        (kernel, tile, flash_cfg::THREADS, flash_cfg::smem_bytes(head_dim))
    } else {
        (
            "attention_flash_f32".to_string(),
            (flash_f32_cfg::BLOCK_M, flash_f32_cfg::BLOCK_N),
            flash_f32_cfg::THREADS,
            flash_f32_cfg::smem_bytes(head_dim),
        )
    };
    // Row indices are formed up to a whole tile past Lq and Lk in int.
    kernel_int(OP, "Lq rounded up to a tile", tiles(q_len, block_m) * block_m)?;
    kernel_int(OP, "Lk rounded up to a tile", tiles(k_len, block_n) * block_n)?;
    let smem_u32 = u32::try_from(smem).map_err(|_| unsupported(format!("{smem} bytes of shared memory")))?;
    let cfg = launch_config(OP, (tiles(q_len, block_m), heads_total, 1), (threads, 1, 1), smem_u32)?;
    let function = kernels.function(&kernel)?;
    if smem > DEFAULT_SMEM {
        function
            .set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(dev_err(format!("allowing {kernel} {smem} bytes of dynamic shared memory")))?;
    }
    let stream = kernels.stream.clone();
    if T::TENSOR_CORES {
        let (q_ptr, _q_sync) = q.device_ptr(&stream);
        let (k_ptr, _k_sync) = k.device_ptr(&stream);
        let (v_ptr, _v_sync) = v.device_ptr(&stream);
        let (o_ptr, _o_sync) = out.device_ptr_mut(&stream);
        for (name, address) in [("q", q_ptr), ("k", k_ptr), ("v", v_ptr), ("out", o_ptr)] {
            expect_aligned(name, address)?;
        }
    }
    let mut launch = stream.launch_builder(&function);
    launch.arg(q).arg(k).arg(v).arg(out).arg(&q_len_i).arg(&k_len_i);
    let log2e = std::f64::consts::LOG2_E;
    let (scale_log2, scale_f32) = ((scale * log2e) as f32, scale as f32);
    if T::TENSOR_CORES {
        launch.arg(&scale_log2);
    } else {
        launch.arg(&d_i).arg(&scale_f32);
    }
    // SAFETY: the arguments match `attention_flash_<t>_d<D>(const u16* q, const u16* k, const
    // u16* v, u16* out, int q_len, int k_len, float scale_log2)` for 16-bit T (D = head_dim,
    // one of the instantiated 64/128, checked by `check_head_dim`), and `attention_flash_f32(
    // const float* q, const float* k, const float* v, float* out, int q_len, int k_len, int
    // head_dim, float scale)` for f32 (head_dim <= 256, checked). Block (x, y) reads q rows
    // [x*BLOCK_M, +BLOCK_M) of head y only below q_len, k and v rows of head y only below k_len
    // (rows past them are zero-filled without reading), and writes out rows below q_len of head
    // y < B*H: q and out hold B*H*Lq*D elements and k, v B*H*Lk*D (checked by `expect_lengths`,
    // the prepared buffers are allocated at exactly that size, out checked above). The 16-byte
    // vector accesses of the tensor-core kernel are aligned (base pointers checked above, rows
    // are 128 or 256 bytes; the f32 kernel makes 4-byte accesses only). The grid is
    // ceil(Lq/BLOCK_M) x B*H blocks of THREADS with the dynamic shared memory the kernel's
    // shape needs (opted in above when over 48 KiB), every extent fits the kernel's int
    // arithmetic (checked) and offsets are 64-bit in the kernel.
    // `out` is borrowed mutably, so it is distinct from the inputs. The buffers outlive the
    // launch: cudarc records their use on the stream before they can be freed.
    unsafe { launch.launch(cfg) }.map_err(dev_err(format!("launching {kernel}")))?;
    Ok(())
}

/// Device copies of the inputs of one attention call.
struct InputBuffers<B> {
    q: CudaSlice<B>,
    k: CudaSlice<B>,
    v: CudaSlice<B>,
    q_norm: Option<CudaSlice<B>>,
    k_norm: Option<CudaSlice<B>>,
    rope: Option<(CudaSlice<B>, CudaSlice<B>)>,
}

impl<B> InputBuffers<B> {
    fn views(&self) -> DeviceInputs<'_, B> {
        DeviceInputs {
            q: self.q.as_view(),
            k: self.k.as_view(),
            v: self.v.as_view(),
            q_norm: self.q_norm.as_ref().map(CudaSlice::as_view),
            k_norm: self.k_norm.as_ref().map(CudaSlice::as_view),
            rope: self.rope.as_ref().map(|(c, s)| (c.as_view(), s.as_view())),
        }
    }
}

/// Attention inputs resident on a CUDA device, with an output buffer: for repeated runs of the
/// flash kernel ([`CudaAttention::flash`]) and of the naive cuBLAS baseline
/// ([`CudaAttention::naive`]) on the same data, as the benchmarks and device tests do.
pub struct CudaAttention<T: AttentionElement> {
    kernels: Kernels,
    inputs: InputBuffers<T::Bits>,
    out: CudaSlice<T::Bits>,
    dims: AttentionDims,
    scale: f64,
    naive: Option<naive::Naive>,
}

impl<T: AttentionElement> CudaAttention<T> {
    /// Validates `inputs` and `config` and copies the inputs to `device`; the output buffer
    /// `[B,H,Lq,D]` starts as NaN when the device is [poisoned](CudaDevice::poisoned).
    ///
    /// # Errors
    /// Shape and config errors as [`AttentionInputs::validate`] and
    /// [`AttentionConfig::validate`]; [`FapeError::Unsupported`] for a head dimension the
    /// kernel for `T` lacks; [`FapeError::Nvrtc`] / [`FapeError::Device`] from compilation and
    /// transfers.
    pub fn new(device: &CudaDevice, inputs: &AttentionInputs<'_, T>, config: &AttentionConfig) -> Result<Self> {
        let dims = inputs.validate()?;
        config.validate()?;
        check_head_dim::<T>(dims.head_dim)?;
        let kernels = Kernels::of_device(device)?;
        let upload = |name: &str, view: View<'_, T>| -> Result<CudaSlice<T::Bits>> {
            let bits: &[T::Bits] = bytemuck::cast_slice(view.data());
            let context = format!("copying `{name}` ({} {}) to the device", bits.len(), T::DTYPE);
            kernels.stream.clone_htod(bits).map_err(dev_err(context))
        };
        let buffers = InputBuffers {
            q: upload("q", inputs.q)?,
            k: upload("k", inputs.k)?,
            v: upload("v", inputs.v)?,
            q_norm: inputs.q_norm.map(|w| upload("q_norm", w)).transpose()?,
            k_norm: inputs.k_norm.map(|w| upload("k_norm", w)).transpose()?,
            rope: inputs
                .rope()
                .map(|(c, s)| Ok::<_, FapeError>((upload("rope_cos", c)?, upload("rope_sin", s)?)))
                .transpose()?,
        };
        let len = inputs.q.data().len();
        let out = if device.is_poisoned() {
            let nan: T::Bits = bytemuck::cast(T::from_f64(f64::NAN));
            kernels.stream.clone_htod(&vec![nan; len])
        } else {
            kernels.stream.alloc_zeros::<T::Bits>(len)
        }
        .map_err(dev_err(format!("allocating output `out` ({len} {})", T::DTYPE)))?;
        Ok(Self { kernels, inputs: buffers, out, dims, scale: config.scale_for(dims.head_dim), naive: None })
    }

    /// The validated extents.
    pub fn dims(&self) -> AttentionDims {
        self.dims
    }

    /// Enqueues the pre-pass and the flash kernel into the output buffer; returns without
    /// waiting (see [`CudaAttention::synchronize`]).
    ///
    /// # Errors
    /// [`FapeError::Device`] from allocation and launches (an earlier asynchronous failure
    /// may surface here).
    pub fn flash(&mut self) -> Result<()> {
        forward::<T>(&self.kernels, &self.inputs.views(), self.dims, self.scale, &mut self.out.as_view_mut())
    }

    /// Enqueues the naive baseline into the output buffer: the same pre-pass, `S = q k^T *
    /// scale` (cuBLAS strided batched GEMM, `T` in and out, f32 compute), a row softmax kernel
    /// over `S` in place, `out = S v` (cuBLAS). Materialises `S` `[B,H,Lq,Lk]` of `T`: with
    /// 16-bit `T` the scores are rounded to `T` (as a framework's eager attention does), so use
    /// f32 for a reference. Returns without waiting.
    ///
    /// # Errors
    /// [`FapeError::BackendUnavailable`] when libcublas cannot be loaded; [`FapeError::Device`]
    /// from allocation, cuBLAS and launches; [`FapeError::Unsupported`] when an extent exceeds
    /// cuBLAS's 32-bit arguments.
    pub fn naive(&mut self) -> Result<()> {
        if self.naive.is_none() {
            self.naive = Some(naive::Naive::new(&self.kernels)?);
        }
        let baseline = self.naive.as_ref().ok_or_else(|| unsupported("the cuBLAS handle is missing"))?;
        let inputs = self.inputs.views();
        let (q, k) = prepared::<T>(&self.kernels, &inputs, self.dims)?;
        let q = q.as_ref().map_or_else(|| inputs.q.slice(..), CudaSlice::as_view);
        let k = k.as_ref().map_or_else(|| inputs.k.slice(..), CudaSlice::as_view);
        baseline.run::<T>(&self.kernels, &q, &k, &inputs.v, &mut self.out.as_view_mut(), self.dims, self.scale)
    }

    /// Waits for the work enqueued so far.
    ///
    /// # Errors
    /// [`FapeError::Device`] when a kernel enqueued before failed.
    pub fn synchronize(&self) -> Result<()> {
        self.kernels.stream.synchronize().map_err(dev_err("waiting for the attention kernels"))
    }

    /// Copies the output `[B,H,Lq,D]` back to the host (synchronizing the stream).
    ///
    /// # Errors
    /// [`FapeError::Device`] when the copy or an earlier kernel failed.
    pub fn output(&self) -> Result<Tensor<T>> {
        let context = "copying `out` back to the host (or an earlier kernel on the stream failed)";
        let bits = self.kernels.stream.clone_dtoh(&self.out).map_err(dev_err(context))?;
        self.kernels.stream.synchronize().map_err(dev_err(context))?;
        let AttentionDims { batch, heads, q_len, head_dim, .. } = self.dims;
        Ok(Tensor { data: bytemuck::cast_slice(&bits).to_vec(), shape: vec![batch, heads, q_len, head_dim] })
    }
}

/// The tensor-core kernel's operand addressing, replayed on the host: `ldmatrix` and
/// `mma.m16n8k16` emulated from their PTX ISA fragment layouts, driven by the same lane address
/// and register formulas as `flash_body` in `kernels/attention.cu` (transcribed below, keep them
/// in step), for one warp's S = Q K^T and O = P V over one 64-key tile, against plain products.
#[cfg(test)]
mod fragment_layouts {
    /// One 32-bit register: two 16-bit elements (low half first), as f64.
    type Reg = [f64; 2];

    /// `ldmatrix.m8n8.x4[.trans]`: lane `8m + r` gives the (row, column) where row `r` of matrix
    /// `m` starts; returns each lane's four registers.
    fn ldmatrix(tile: &[Vec<f64>], address: impl Fn(usize) -> (usize, usize), trans: bool) -> [[Reg; 4]; 32] {
        let mut regs = [[[0.0; 2]; 4]; 32];
        for (lane, lane_regs) in regs.iter_mut().enumerate() {
            let (g, t) = (lane / 4, lane % 4);
            for (m, reg) in lane_regs.iter_mut().enumerate() {
                let at = |r: usize, c: usize| {
                    let (row, col) = address(8 * m + r);
                    tile[row][col + c]
                };
                *reg = if trans { [at(2 * t, g), at(2 * t + 1, g)] } else { [at(g, 2 * t), at(g, 2 * t + 1)] };
            }
        }
        regs
    }

    /// `mma.m16n8k16.row.col`: `d += A B` from every lane's A (4 registers) and B (2) fragments.
    fn mma(d: &mut [[f64; 4]; 32], a: &[[Reg; 4]; 32], b: &[[Reg; 2]; 32]) {
        let (mut am, mut bm) = ([[0.0; 16]; 16], [[0.0; 8]; 16]);
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for i in 0..2 {
                am[g][2 * t + i] = a[lane][0][i];
                am[g + 8][2 * t + i] = a[lane][1][i];
                am[g][2 * t + 8 + i] = a[lane][2][i];
                am[g + 8][2 * t + 8 + i] = a[lane][3][i];
                bm[2 * t + i][g] = b[lane][0][i];
                bm[2 * t + 8 + i][g] = b[lane][1][i];
            }
        }
        for (lane, dl) in d.iter_mut().enumerate() {
            let (g, t) = (lane / 4, lane % 4);
            for (c, value) in dl.iter_mut().enumerate() {
                let (row, col) = (g + 8 * (c / 2), 2 * t + c % 2);
                *value += (0..16).map(|k| am[row][k] * bm[k][col]).sum::<f64>();
            }
        }
    }

    fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<Vec<f64>> {
        let values = crate::testing::uniform(&mut crate::testing::rng(seed), rows * cols, -1.0, 1.0);
        values.chunks(cols).map(|r| r.iter().map(|&x| f64::from(x)).collect()).collect()
    }

    fn check(d: usize) {
        const BLOCK_N: usize = 64;
        let (q, k, v) = (matrix(16, d, 1), matrix(BLOCK_N, d, 2), matrix(BLOCK_N, d, 3));
        // S = Q K^T: q_frag[kk] at row lane % 16, column 16kk + 8 (lane / 16); K at key
        // 16p + 8 (lane / 16) + lane % 8, column 16kk + 8 ((lane / 8) % 2).
        let mut s = vec![[[0.0; 4]; 32]; BLOCK_N / 8];
        for kk in 0..d / 16 {
            let q_frag = ldmatrix(&q, |lane| (lane & 15, kk * 16 + (lane >> 4) * 8), false);
            for p in 0..BLOCK_N / 16 {
                let b = ldmatrix(
                    &k,
                    |lane| (p * 16 + (lane >> 4) * 8 + (lane & 7), kk * 16 + ((lane >> 3) & 1) * 8),
                    false,
                );
                let lo: [[Reg; 2]; 32] = std::array::from_fn(|l| [b[l][0], b[l][1]]);
                let hi: [[Reg; 2]; 32] = std::array::from_fn(|l| [b[l][2], b[l][3]]);
                mma(&mut s[2 * p], &q_frag, &lo);
                mma(&mut s[2 * p + 1], &q_frag, &hi);
            }
        }
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        for (nb, block) in s.iter().enumerate() {
            for (lane, regs) in block.iter().enumerate() {
                let (g, t) = (lane / 4, lane % 4);
                for (c, &got) in regs.iter().enumerate() {
                    let (row, key) = (g + 8 * (c / 2), nb * 8 + 2 * t + c % 2);
                    assert!((got - dot(&q[row], &k[key])).abs() < 1e-9, "D={d} S[{row}][{key}]");
                }
            }
        }
        // O = P V with P = S: a = pack(S[2kk].c0,c1), pack(S[2kk].c2,c3), pack(S[2kk+1].c0,c1),
        // pack(S[2kk+1].c2,c3); V (.trans) at key 16kk + 8 ((lane / 8) % 2) + lane % 8, column
        // 16p + 8 (lane / 16).
        let mut o = vec![[[0.0; 4]; 32]; d / 8];
        for kk in 0..BLOCK_N / 16 {
            let a: [[Reg; 4]; 32] = std::array::from_fn(|l| {
                let (x, y) = (&s[2 * kk][l], &s[2 * kk + 1][l]);
                [[x[0], x[1]], [x[2], x[3]], [y[0], y[1]], [y[2], y[3]]]
            });
            for p in 0..d / 16 {
                let b =
                    ldmatrix(&v, |lane| (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7), p * 16 + (lane >> 4) * 8), true);
                let lo: [[Reg; 2]; 32] = std::array::from_fn(|l| [b[l][0], b[l][1]]);
                let hi: [[Reg; 2]; 32] = std::array::from_fn(|l| [b[l][2], b[l][3]]);
                mma(&mut o[2 * p], &a, &lo);
                mma(&mut o[2 * p + 1], &a, &hi);
            }
        }
        for (db, block) in o.iter().enumerate() {
            for (lane, regs) in block.iter().enumerate() {
                let (g, t) = (lane / 4, lane % 4);
                for (c, &got) in regs.iter().enumerate() {
                    let (row, col) = (g + 8 * (c / 2), db * 8 + 2 * t + c % 2);
                    let expected: f64 = (0..BLOCK_N).map(|key| dot(&q[row], &k[key]) * v[key][col]).sum();
                    assert!((got - expected).abs() < 1e-9, "D={d} O[{row}][{col}]: {got} vs {expected}");
                }
            }
        }
    }

    #[test]
    fn flash_operand_addressing_computes_q_k_and_p_v() {
        check(64);
        check(128);
    }
}

/// The tile constants mirrored in this file (and in `super::naive`) against the `constexpr int`s
/// of `kernels/attention.cu`: a drift would size the dynamic shared memory or the grid wrongly,
/// which only a GPU run would otherwise show.
#[cfg(test)]
pub(super) mod mirrored_constants {
    use super::{flash_cfg, flash_f32_cfg, prepare_cfg, ATTENTION_CU};

    /// The value of `constexpr int name` in `namespace space` of `kernels/attention.cu`; the
    /// right-hand side is a chain of `*` and `/` over literals and earlier names of the
    /// namespace, evaluated left to right as C++ does.
    pub(in crate::attention) fn kernel_constant(space: &str, name: &str) -> i64 {
        let source = ATTENTION_CU.1;
        let start = source.find(&format!("namespace {space} {{")).unwrap_or_else(|| panic!("no namespace {space}"));
        let body = &source[start..];
        let body = &body[..body.find("}  // namespace").unwrap_or_else(|| panic!("namespace {space} is not closed"))];
        let mut values: Vec<(&str, i64)> = Vec::new();
        for line in body.lines() {
            let code = line.split("//").next().unwrap_or_default().trim();
            let Some(definition) = code.strip_prefix("constexpr int ") else { continue };
            let (lhs, rhs) = definition.trim_end_matches(';').split_once('=').expect("constexpr int NAME = EXPR;");
            let operand = |token: &str| -> i64 {
                token.parse().unwrap_or_else(|_| {
                    values.iter().find(|(n, _)| *n == token).unwrap_or_else(|| panic!("{space}::{token}?")).1
                })
            };
            let mut tokens = rhs.split_whitespace();
            let mut value = operand(tokens.next().expect("an operand"));
            while let (Some(op), Some(right)) = (tokens.next(), tokens.next()) {
                let right = operand(right);
                value = match op {
                    "*" => value * right,
                    "/" => value / right,
                    other => panic!("{space}::{lhs}: operator {other}"),
                };
            }
            values.push((lhs.trim(), value));
        }
        values.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no {space}::{name}")).1
    }

    #[test]
    fn launch_constants_match_the_kernel_source() {
        let flash = |name| kernel_constant("attention_flash_cfg", name);
        assert_eq!(flash("THREADS"), i64::from(flash_cfg::THREADS));
        assert_eq!(flash("BLOCK_M"), flash_cfg::BLOCK_M as i64);
        assert_eq!(flash("BLOCK_N_D64"), flash_cfg::BLOCK_N_D64 as i64);
        assert_eq!(flash("BLOCK_N_D128"), flash_cfg::BLOCK_N_D128 as i64);
        assert_eq!(flash("WARPS") * flash("WARP_ROWS"), flash_cfg::BLOCK_M as i64);
        assert_eq!(flash("PAD"), flash_cfg::PAD as i64);
        let f32_flash = |name| kernel_constant("attention_flash_f32_cfg", name);
        assert_eq!(f32_flash("THREADS"), i64::from(flash_f32_cfg::THREADS));
        assert_eq!(f32_flash("BLOCK_M"), flash_f32_cfg::BLOCK_M as i64);
        assert_eq!(f32_flash("BLOCK_N"), flash_f32_cfg::BLOCK_N as i64);
        assert_eq!(f32_flash("MAX_D"), flash_f32_cfg::MAX_D as i64);
        let prepare = |name| kernel_constant("attention_prepare_cfg", name);
        assert_eq!(prepare("THREADS"), i64::from(prepare_cfg::THREADS));
        assert_eq!(prepare("WARPS"), prepare_cfg::WARPS as i64);
    }

    /// The tensor-core kernel at D = 128 (and the f32 kernel at D = 256) needs the opt-in above
    /// 48 KiB; both stay within an H100's 227 KiB per block.
    #[test]
    fn shared_memory_sizes() {
        assert_eq!(flash_cfg::smem_bytes(64), (128 + 4 * 64) * 72 * 2);
        assert_eq!(flash_cfg::smem_bytes(128), (128 + 4 * 32) * 136 * 2);
        assert!(flash_cfg::smem_bytes(128) > super::DEFAULT_SMEM);
        assert!(flash_f32_cfg::smem_bytes(flash_f32_cfg::MAX_D) > super::DEFAULT_SMEM);
        for bytes in [flash_cfg::smem_bytes(128), flash_f32_cfg::smem_bytes(flash_f32_cfg::MAX_D)] {
            assert!(bytes <= 227 * 1024, "{bytes} bytes");
        }
    }
}
