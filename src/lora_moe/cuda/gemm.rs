//! cuBLASLt bf16 GEMMs of the fused LoRA-MoE path: one handle and one workspace per stream, and
//! `y = a . w^T (+ bias) + beta * y` with the bias in the epilogue, through cuBLASLt's own
//! descriptors (cudarc's `Matmul` cannot tell the heuristic the operands' alignment).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::{result as lt, sys, CudaBlasLT, MatmulShared};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::bf16;

use super::shared::check_len;
use crate::backend::cuda::{dev_err, require_library, MathLibrary};
use crate::error::{FapeError, Result};
use crate::lora_moe::config::OP;

/// Maps a cuBLASLt error to [`FapeError::Device`], naming what was being done.
fn blas_err(context: impl Into<String>) -> impl FnOnce(cudarc::cublaslt::result::CublasError) -> FapeError {
    let context = context.into();
    move |e| FapeError::Device { backend: "cuda", context, message: format!("cuBLASLt: {e:?}") }
}

/// The cuBLASLt handle of `stream` (the GEMMs use the workspace of [`workspace_for`]), created on first use and kept for the
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

/// The cuBLASLt workspace of `stream` (32 MiB on Hopper and later, 4 MiB before, as NVIDIA
/// recommends), allocated on first use and kept for the process like the handles.
///
/// # Errors
/// [`FapeError::Device`] when the allocation fails.
fn workspace_for(stream: &Arc<CudaStream>) -> Result<Arc<CudaSlice<u8>>> {
    static WORKSPACES: OnceLock<Mutex<HashMap<usize, Arc<CudaSlice<u8>>>>> = OnceLock::new();
    let mut workspaces = WORKSPACES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    let key = stream.cu_stream() as usize;
    if let Some(workspace) = workspaces.get(&key) {
        return Ok(workspace.clone());
    }
    let major = stream
        .context()
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .map_err(dev_err("reading the compute capability"))?;
    let bytes = if major >= 9 { 32 << 20 } else { 4 << 20 };
    let workspace = Arc::new(stream.alloc_zeros::<u8>(bytes).map_err(dev_err("allocating the cuBLASLt workspace"))?);
    workspaces.insert(key, workspace.clone());
    Ok(workspace)
}

/// The largest power of two up to 256 dividing a device address (what cuBLASLt's
/// `MIN_ALIGNMENT_*_BYTES` preferences take; 256 is their default assumption).
pub(crate) fn pointer_alignment(address: u64) -> u32 {
    1 << address.trailing_zeros().min(8)
}

/// A cuBLASLt matrix layout, destroyed on drop.
struct LtLayout(sys::cublasLtMatrixLayout_t);

impl LtLayout {
    /// A column-major `rows x cols` matrix of `dtype` with leading dimension `ld`.
    fn new(dtype: sys::cudaDataType, rows: usize, cols: usize, ld: usize) -> Result<Self> {
        lt::create_matrix_layout(dtype, rows as u64, cols as u64, ld as i64)
            .map(Self)
            .map_err(blas_err("creating a matrix layout"))
    }
}

impl Drop for LtLayout {
    fn drop(&mut self) {
        // SAFETY: created by `create_matrix_layout` and destroyed only here. A failure leaks it.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

/// A cuBLASLt matmul descriptor (f32 compute and scale), destroyed on drop.
struct LtDesc(sys::cublasLtMatmulDesc_t);

impl LtDesc {
    fn new() -> Result<Self> {
        lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
            .map(Self)
            .map_err(blas_err("creating the matmul descriptor"))
    }

    /// Sets `attr` to `value` (of the attribute's C type).
    fn set<V>(&self, attr: sys::cublasLtMatmulDescAttributes_t, value: &V) -> Result<()> {
        // SAFETY: the descriptor is live; cuBLASLt copies size_of::<V>() bytes from `value`.
        unsafe { lt::set_matmul_desc_attribute(self.0, attr, (value as *const V).cast(), std::mem::size_of::<V>()) }
            .map_err(blas_err(format!("setting {attr:?}")))
    }
}

impl Drop for LtDesc {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_desc` and destroyed only here. A failure leaks it.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

/// A cuBLASLt heuristic preference, destroyed on drop.
struct LtPref(sys::cublasLtMatmulPreference_t);

impl LtPref {
    fn new() -> Result<Self> {
        lt::create_matmul_pref().map(Self).map_err(blas_err("creating the matmul preference"))
    }

    /// Sets `attr` to `value` (of the attribute's C type).
    fn set<V>(&self, attr: sys::cublasLtMatmulPreferenceAttributes_t, value: &V) -> Result<()> {
        // SAFETY: the preference is live; cuBLASLt copies size_of::<V>() bytes from `value`.
        unsafe { lt::set_matmul_pref_attribute(self.0, attr, (value as *const V).cast(), std::mem::size_of::<V>()) }
            .map_err(blas_err(format!("setting {attr:?}")))
    }
}

impl Drop for LtPref {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_pref` and destroyed only here. A failure leaks it.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
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
    let stream = blas.stream();
    let workspace = workspace_for(stream)?;
    // Raw device addresses; the guards keep cudarc's stream ordering of each buffer until the
    // GEMM is enqueued.
    let (w_ptr, _w_sync) = w.device_ptr(stream);
    let (a_ptr, _a_sync) = a.device_ptr(stream);
    let (y_ptr, _y_sync) = y.device_ptr_mut(stream);
    let (ws_ptr, _ws_sync) = workspace.device_ptr(stream);
    let bias_ptr = bias.map(|b| b.device_ptr(stream));
    // Row-major y [m, n] is column-major y^T [n, m] = w^T . a with cuBLASLt's A = w (column-major
    // [k, n], leading dimension ldw, transposed) and B = a (column-major [k, m], leading
    // dimension lda); C = D = y (column-major [n, m], ldc = n). bf16 in and out, f32 compute
    // and scale; the bias epilogue adds bias [n] (bf16, D's type) along D's rows.
    let bf16_type = sys::cudaDataType_t::CUDA_R_16BF;
    let a_layout = LtLayout::new(bf16_type, k, n, ldw)?;
    let b_layout = LtLayout::new(bf16_type, k, m, lda)?;
    let c_layout = LtLayout::new(bf16_type, n, m, n)?;
    let desc = LtDesc::new()?;
    desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
    desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
    if let Some((ptr, _)) = &bias_ptr {
        desc.set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
        )?;
        desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, ptr)?;
        desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bf16_type)?;
    }
    // cuBLASLt's heuristic assumes 256-byte aligned matrices unless told otherwise, and may then
    // pick a kernel that faults or fails on the views this path passes (x of a candle tensor at
    // an offset, xa and Wp from column d on): give it each pointer's real alignment.
    let pref = LtPref::new()?;
    pref.set(sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace.len())?;
    for (attr, ptr) in [
        (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, w_ptr),
        (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, a_ptr),
        (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, y_ptr),
        (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, y_ptr),
    ] {
        pref.set(attr, &pointer_alignment(ptr))?;
    }
    let (alpha, beta) = (1.0f32, beta);
    // SAFETY: the descriptors are live (dropped after this block) and describe the buffers: in
    // cuBLASLt's column-major terms A = w is k x n with leading dimension ldw >= k, used
    // transposed; B = a is k x m with leading dimension lda >= k; C = D = y is n x m (ldc = n);
    // bias has n bf16 entries. cuBLASLt reads (n-1)*ldw + k elements of w, (m-1)*lda + k of a,
    // reads (beta != 0) and writes m*n of y: the buffers hold that many (checked above). The
    // workspace holds the bytes the preference allows, alpha and beta are host f32 (the scale
    // type), and the GEMM is enqueued on the stream of every buffer's guard.
    unsafe {
        let heuristic = lt::get_matmul_algo_heuristic(
            *blas.handle(),
            desc.0,
            a_layout.0,
            b_layout.0,
            c_layout.0,
            c_layout.0,
            pref.0,
        )
        .map_err(blas_err(format!("choosing a bf16 GEMM algorithm for {m}x{n}x{k}")))?;
        lt::matmul(
            *blas.handle(),
            desc.0,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            w_ptr as *const c_void,
            a_layout.0,
            a_ptr as *const c_void,
            b_layout.0,
            y_ptr as *const c_void,
            c_layout.0,
            y_ptr as *mut c_void,
            c_layout.0,
            &heuristic.algo,
            ws_ptr as *mut c_void,
            workspace.len(),
            stream.cu_stream() as sys::cudaStream_t,
        )
        .map_err(blas_err(format!("bf16 GEMM {m}x{n}x{k}")))
    }
}

#[cfg(test)]
mod tests {
    use super::pointer_alignment;

    #[test]
    fn pointer_alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(pointer_alignment(0), 256);
        assert_eq!(pointer_alignment(0x7f00_0000_0000), 256);
        assert_eq!(pointer_alignment(0x7f00_0000_0200), 256);
        // A bf16 view starting at column d = 64 of a 256-byte aligned buffer.
        assert_eq!(pointer_alignment(0x7f00_0000_0000 + 128), 128);
        assert_eq!(pointer_alignment(0x7f00_0000_0000 + 48), 16);
        assert_eq!(pointer_alignment(0x7f00_0000_0000 + 2), 2);
        assert_eq!(pointer_alignment(0x7f00_0000_0001), 1);
    }
}
