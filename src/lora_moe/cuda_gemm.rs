//! cuBLASLt bf16 GEMMs of the fused LoRA-MoE path: one handle per stream, and
//! `y = a . w^T (+ bias) + beta * y` with the bias in the epilogue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use half::bf16;

use super::config::OP;
use super::cuda_bf16::check_len;
use crate::backend::cuda::{require_library, MathLibrary};
use crate::error::{FapeError, Result};

/// Maps a cuBLASLt error to [`FapeError::Device`], naming what was being done.
fn blas_err(context: impl Into<String>) -> impl FnOnce(cudarc::cublaslt::result::CublasError) -> FapeError {
    let context = context.into();
    move |e| FapeError::Device { backend: "cuda", context, message: format!("cuBLASLt: {e:?}") }
}

/// The cuBLASLt handle (with its workspace) of `stream`, created on first use and kept for the
/// process: layers built per call (the candle op) then share one handle per stream. The cached
/// handle holds its stream, so the key (the stream's address) is never reused by another one.
///
/// # Errors
/// [`FapeError::Device`] when cuBLASLt cannot create the handle.
pub(crate) fn blas_for(stream: &Arc<CudaStream>) -> Result<Arc<CudaBlasLT>> {
    static HANDLES: OnceLock<Mutex<HashMap<usize, Arc<CudaBlasLT>>>> = OnceLock::new();
    let mut handles = HANDLES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    let key = stream.cu_stream() as usize;
    if let Some(handle) = handles.get(&key) {
        return Ok(handle.clone());
    }
    require_library(MathLibrary::CublasLt, "the fused LoRA-MoE GEMM")?;
    let handle = Arc::new(CudaBlasLT::new(stream.clone()).map_err(blas_err("creating the cuBLASLt handle"))?);
    handles.insert(key, handle.clone());
    Ok(handle)
}

/// `y [m, n] = a [m, k] . w [n, k]^T (+ bias [n])` in bf16 with f32 accumulation through
/// cuBLASLt, bias in the epilogue; all row-major and dense. The base GEMM of the benchmarks is
/// this call on `x` and `W` alone.
///
/// # Errors
/// [`FapeError::Layout`] when a buffer is shorter than its extents; cuBLASLt errors.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bias(
    blas: &CudaBlasLT,
    a: &CudaView<'_, bf16>,
    w: &CudaView<'_, bf16>,
    bias: Option<&CudaSlice<bf16>>,
    y: &mut CudaViewMut<'_, bf16>,
    m: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    gemm_strided(blas, (a, k), (w, k), bias, y, (m, n, k), 0.0)
}

/// `y [m, n] = a [m, k] . w [n, k]^T (+ bias [n]) + beta * y` through cuBLASLt (bf16, f32
/// accumulate), row-major with row strides `lda` of `a` and `ldw` of `w` (`>= k`); `y` dense.
pub(crate) fn gemm_strided(
    blas: &CudaBlasLT,
    (a, lda): (&CudaView<'_, bf16>, usize),
    (w, ldw): (&CudaView<'_, bf16>, usize),
    bias: Option<&CudaSlice<bf16>>,
    y: &mut CudaViewMut<'_, bf16>,
    (m, n, k): (usize, usize, usize),
    beta: f32,
) -> Result<()> {
    let short = |tensor: &'static str, len: usize, rows: usize, ld: usize| {
        let needed = (rows - 1) * ld + k;
        if ld < k || len < needed {
            Err(FapeError::Layout { op: OP, tensor, len, shape: vec![rows, ld], needed })
        } else {
            Ok(())
        }
    };
    if m == 0 || n == 0 || k == 0 {
        return Err(FapeError::Unsupported { op: OP, backend: "cuda", what: format!("an empty GEMM {m}x{n}x{k}") });
    }
    short("a", a.len(), m, lda)?;
    short("weight", w.len(), n, ldw)?;
    check_len("y", y.len(), &[m, n])?;
    if let Some(b) = bias {
        check_len("bias", b.len(), &[n])?;
    }
    let bias_view = bias.map(|b| b.slice(..));
    // Row-major y [m, n] is column-major y^T [n, m] = w (column-major [k, n] with leading
    // dimension ldw, transposed) . a (column-major [k, m] with leading dimension lda).
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: ldw as i64,
        ldb: lda as i64,
        beta,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    // SAFETY: in cuBLASLt's column-major terms A = w is k x n with leading dimension ldw >= k,
    // used transposed; B = a is k x m with leading dimension lda >= k; C = y is n x m (ldc = n);
    // bias has n entries. cuBLASLt reads (n-1)*ldw + k elements of w, (m-1)*lda + k of a, and
    // reads (beta != 0) and writes m*n of y: the buffers hold that many (checked above). cudarc
    // orders the call on the handle's stream.
    unsafe { blas.matmul(cfg, w, a, y, bias_view.as_ref(), None) }.map_err(blas_err("bf16 GEMM"))
}
