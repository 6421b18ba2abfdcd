//! The naive GPU baseline of attention: materialise the scores with cuBLAS, softmax them with
//! one kernel (`attention_softmax_<t>` in `kernels/attention.cu`), multiply by `v` with cuBLAS.
//! What a framework's eager attention does; the benchmarks' baseline and, in f32, a second GPU
//! reference for the device tests.

use std::ffi::{c_int, c_longlong, c_void};

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, PushKernelArg};

use super::cuda::Kernels;
use super::{AttentionDims, AttentionElement, OP};
use crate::backend::cuda::{dev_err, kernel_int, launch_config, require_library, MathLibrary};
use crate::error::{FapeError, Result};

/// Mirrors `attention_softmax_cfg` in `kernels/attention.cu`.
mod softmax_cfg {
    /// `blockDim.x`.
    pub const THREADS: u32 = 256;
    /// The most blocks launched; the kernel grid-strides over further rows.
    pub const MAX_BLOCKS: usize = 1 << 20;
}

/// A cuBLAS handle on the kernels' stream.
pub(crate) struct Naive {
    blas: CudaBlas,
}

/// The cuBLAS element type of `T`.
fn blas_type<T: AttentionElement>() -> blas_sys::cudaDataType_t {
    match T::DTYPE {
        "bf16" => blas_sys::cudaDataType_t::CUDA_R_16BF,
        "f16" => blas_sys::cudaDataType_t::CUDA_R_16F,
        _ => blas_sys::cudaDataType_t::CUDA_R_32F,
    }
}

fn blas_error(what: &str) -> impl FnOnce(blas::CublasError) -> FapeError + '_ {
    move |e| FapeError::Device { backend: "cuda", context: format!("cuBLAS {what}"), message: format!("{e:?}") }
}

/// One column-major strided batched GEMM `C = alpha op(A) op(B)` (beta 0), f32 compute.
struct Gemm {
    transa: blas_sys::cublasOperation_t,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    stride_a: usize,
    stride_b: usize,
    stride_c: usize,
    batch: usize,
    alpha: f32,
}

impl Naive {
    /// A cuBLAS handle bound to the stream of `kernels`.
    ///
    /// # Errors
    /// [`FapeError::BackendUnavailable`] when libcublas cannot be loaded; [`FapeError::Device`]
    /// when creating the handle fails.
    pub(crate) fn new(kernels: &Kernels) -> Result<Self> {
        require_library(MathLibrary::Cublas, "the naive attention baseline")?;
        let blas = CudaBlas::new(kernels.stream().clone()).map_err(blas_error("creating a handle"))?;
        Ok(Self { blas })
    }

    /// `out` `[B,H,Lq,D]` = softmax(`q` `k`^T * `scale`) `v` for prepared `q` `[B,H,Lq,D]`,
    /// `k`, `v` `[B,H,Lk,D]` of `T`, through a materialised score matrix `[B,H,Lq,Lk]` of `T`.
    /// Enqueued on the stream; nothing is synchronized.
    ///
    /// # Errors
    /// [`FapeError::Unsupported`] when a buffer is too short or an extent exceeds cuBLAS's or
    /// the kernel's 32-bit arguments; [`FapeError::Device`] from allocation, cuBLAS, the launch.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run<T: AttentionElement>(
        &self,
        kernels: &Kernels,
        q: &CudaView<'_, T::Bits>,
        k: &CudaView<'_, T::Bits>,
        v: &CudaView<'_, T::Bits>,
        out: &mut CudaViewMut<'_, T::Bits>,
        dims: AttentionDims,
        scale: f64,
    ) -> Result<()> {
        let AttentionDims { batch, heads, q_len, k_len, head_dim } = dims;
        let bh = batch * heads;
        let need = [("q", q.len(), bh * q_len * head_dim), ("k", k.len(), bh * k_len * head_dim)];
        let need =
            need.into_iter().chain([("v", v.len(), bh * k_len * head_dim), ("out", out.len(), bh * q_len * head_dim)]);
        for (name, have, want) in need {
            if have < want {
                return Err(FapeError::Unsupported {
                    op: OP,
                    backend: "cuda",
                    what: format!("naive baseline: buffer `{name}` holds {have} elements, {want} needed"),
                });
            }
        }
        let scores_len = bh * q_len * k_len;
        let stream = kernels.stream();
        let mut scores = stream
            .alloc_zeros::<T::Bits>(scores_len)
            .map_err(dev_err(format!("allocating the scores ({scores_len} {})", T::DTYPE)))?;
        // Row-major S [Lq,Lk] = Q [Lq,D] K^T is column-major S^T [Lk,Lq] = K^T' Q' with K, Q
        // read column-major as [D,Lk], [D,Lq] (ld D): op(A) = A^T.
        let scores_gemm = Gemm {
            transa: blas_sys::cublasOperation_t::CUBLAS_OP_T,
            m: k_len,
            n: q_len,
            k: head_dim,
            lda: head_dim,
            ldb: head_dim,
            ldc: k_len,
            stride_a: k_len * head_dim,
            stride_b: q_len * head_dim,
            stride_c: q_len * k_len,
            batch: bh,
            alpha: scale as f32,
        };
        self.gemm::<T>(stream, &scores_gemm, k, q, &mut scores.as_view_mut(), "S = q k^T")?;
        self.softmax::<T>(kernels, &mut scores.as_view_mut(), bh * q_len, k_len)?;
        // Row-major O [Lq,D] = P [Lq,Lk] V [Lk,D] is column-major O^T [D,Lq] = V^T P^T with V,
        // P read column-major as [D,Lk] (ld D), [Lk,Lq] (ld Lk): no transposes.
        let output_gemm = Gemm {
            transa: blas_sys::cublasOperation_t::CUBLAS_OP_N,
            m: head_dim,
            n: q_len,
            k: k_len,
            lda: head_dim,
            ldb: k_len,
            ldc: head_dim,
            stride_a: k_len * head_dim,
            stride_b: q_len * k_len,
            stride_c: q_len * head_dim,
            batch: bh,
            alpha: 1.0,
        };
        self.gemm::<T>(stream, &output_gemm, v, &scores.as_view(), out, "out = P v")
    }

    /// Runs `g` with `a`, `b` and `c` (each holding `batch` strided matrices, checked by the
    /// caller through the buffer lengths).
    fn gemm<T: AttentionElement>(
        &self,
        stream: &CudaStream,
        g: &Gemm,
        a: &CudaView<'_, T::Bits>,
        b: &CudaView<'_, T::Bits>,
        c: &mut CudaViewMut<'_, T::Bits>,
        what: &str,
    ) -> Result<()> {
        let int = |name: &str, v: usize| kernel_int(OP, name, v).map(|v| v as c_int);
        let long = |name: &str, v: usize| {
            c_longlong::try_from(v).map_err(|_| FapeError::Unsupported {
                op: OP,
                backend: "cuda",
                what: format!("{name} = {v} exceeds cuBLAS's 64-bit stride"),
            })
        };
        let (m, n, k) = (int("GEMM m", g.m)?, int("GEMM n", g.n)?, int("GEMM k", g.k)?);
        let (lda, ldb, ldc) = (int("lda", g.lda)?, int("ldb", g.ldb)?, int("ldc", g.ldc)?);
        let (stride_a, stride_b, stride_c) =
            (long("stride a", g.stride_a)?, long("stride b", g.stride_b)?, long("stride c", g.stride_c)?);
        let batch = int("GEMM batch", g.batch)?;
        let beta = 0.0f32;
        let ty = blas_type::<T>();
        let (a_ptr, _a_sync) = a.device_ptr(stream);
        let (b_ptr, _b_sync) = b.device_ptr(stream);
        let (c_ptr, _c_sync) = c.device_ptr_mut(stream);
        // SAFETY: the handle is live and bound to the kernels' stream; the operand pointers
        // are device buffers of that context kept alive (and their stream use recorded) by the
        // guards above until after the call is enqueued. Each of the `batch` matrices of A, B
        // and C lies within its buffer: A is op-shaped m x k (transa) or k x m with leading
        // dimension lda, B k x n (ldb), C m x n (ldc), strided by stride_a/b/c, and the caller
        // checked that the buffers hold batch * stride elements (q, k, v, out against B*H*L*D,
        // the scores allocated as B*H*Lq*Lk). alpha and beta are f32 as CUBLAS_COMPUTE_32F
        // requires; the data types name the buffers' element type.
        unsafe {
            blas::gemm_strided_batched_ex(
                *self.blas.handle(),
                g.transa,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&g.alpha) as *const f32 as *const c_void,
                a_ptr as *const c_void,
                ty,
                lda,
                stride_a,
                b_ptr as *const c_void,
                ty,
                ldb,
                stride_b,
                (&beta) as *const f32 as *const c_void,
                c_ptr as *mut c_void,
                ty,
                ldc,
                stride_c,
                batch,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_error(what))
    }

    /// Row softmax in place over `scores` `[rows, cols]` with `attention_softmax_<t>`.
    fn softmax<T: AttentionElement>(
        &self,
        kernels: &Kernels,
        scores: &mut CudaViewMut<'_, T::Bits>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let rows_i = kernel_int(OP, "score rows", rows)?;
        let cols_i = kernel_int(OP, "score columns", cols)?;
        let blocks = rows.min(softmax_cfg::MAX_BLOCKS);
        let cfg = launch_config(OP, (blocks, 1, 1), (softmax_cfg::THREADS, 1, 1), 0)?;
        let kernel = format!("attention_softmax_{}", T::DTYPE);
        let function = kernels.function(&kernel)?;
        let stream = kernels.stream();
        let mut launch = stream.launch_builder(&function);
        launch.arg(scores).arg(&rows_i).arg(&cols_i);
        // SAFETY: the arguments match `attention_softmax_<t>(T* x, int rows, int cols)` in
        // order and type; block b handles rows b, b + gridDim.x, ... < rows and touches x only at
        // [row*cols, (row+1)*cols) with 64-bit offsets, inside the rows*cols elements the
        // scores buffer was allocated with. The buffer outlives the launch (its use is recorded
        // on the stream before it can be freed).
        unsafe { launch.launch(cfg) }.map_err(dev_err(format!("launching {kernel}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::softmax_cfg;
    use crate::attention::cuda::mirrored_constants::kernel_constant;

    #[test]
    fn softmax_threads_match_the_kernel_source() {
        assert_eq!(kernel_constant("attention_softmax_cfg", "THREADS"), i64::from(softmax_cfg::THREADS));
    }
}
