//! cuBLASLt bf16 GEMMs of the fused LoRA-MoE path: one handle and one workspace per stream, and
//! `y = a . w^T (+ bias) + beta * y` with the bias in the epilogue, through cuBLASLt's own
//! descriptors (cudarc's `Matmul` cannot tell the heuristic the operands' alignment), kept per
//! shape with the chosen algorithm ([`GemmPlans`]).

use std::collections::hash_map::Entry;
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
fn blas_for(stream: &Arc<CudaStream>) -> Result<Arc<CudaBlasLT>> {
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

/// What a cuBLASLt plan is chosen for: the extents, the row strides of `a` and `w`, the bias
/// epilogue's device address (none without a bias), and the alignments (bytes, up to 256) of
/// `w`, `a` and `y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldw: usize,
    bias: Option<u64>,
    align: [u32; 3],
}

/// One cuBLASLt GEMM shape, set up once: the matmul descriptor (transposes, epilogue), the
/// layouts of `w`, `a` and `y`, and the algorithm the heuristic chose for them.
struct GemmPlan {
    desc: LtDesc,
    w_layout: LtLayout,
    a_layout: LtLayout,
    y_layout: LtLayout,
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are host-side cuBLASLt objects, valid on any thread; a plan is only
// reached through the `Mutex` of its `GemmPlans`, so no two threads touch one at a time.
unsafe impl Send for GemmPlan {}

impl GemmPlan {
    /// Creates the descriptors of `key` and asks cuBLASLt's heuristic for an algorithm that
    /// needs at most `workspace_bytes` of workspace.
    ///
    /// # Errors
    /// cuBLASLt errors, among them no algorithm for the shape and alignments.
    fn new(blas: &CudaBlasLT, key: PlanKey, workspace_bytes: usize) -> Result<Self> {
        let PlanKey { m, n, k, lda, ldw, bias, align } = key;
        // Row-major y [m, n] is column-major y^T [n, m] = w^T . a with cuBLASLt's A = w
        // (column-major [k, n], leading dimension ldw, transposed) and B = a (column-major
        // [k, m], leading dimension lda); C = D = y (column-major [n, m], ldc = n). bf16 in and
        // out, f32 compute and scale; the bias epilogue adds bias [n] (bf16, D's type) along
        // D's rows.
        let bf16_type = sys::cudaDataType_t::CUDA_R_16BF;
        let w_layout = LtLayout::new(bf16_type, k, n, ldw)?;
        let a_layout = LtLayout::new(bf16_type, k, m, lda)?;
        let y_layout = LtLayout::new(bf16_type, n, m, n)?;
        let desc = LtDesc::new()?;
        desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
        desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
        if let Some(ptr) = &bias {
            desc.set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            )?;
            desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, ptr)?;
            desc.set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bf16_type)?;
        }
        // cuBLASLt's heuristic assumes 256-byte aligned matrices unless told otherwise, and may
        // then pick a kernel that faults or fails on the views this path passes (x of a candle
        // tensor at an offset, xa and Wp from column d on): give it each pointer's alignment.
        let pref = LtPref::new()?;
        pref.set(
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &workspace_bytes,
        )?;
        for (attr, alignment) in [
            (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align[0]),
            (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align[1]),
            (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align[2]),
            (sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align[2]),
        ] {
            pref.set(attr, &alignment)?;
        }
        // SAFETY: the handle, descriptors, layouts and preference are live for the call, which
        // only reads them and returns the chosen algorithm by value.
        let heuristic = unsafe {
            lt::get_matmul_algo_heuristic(
                *blas.handle(),
                desc.0,
                w_layout.0,
                a_layout.0,
                y_layout.0,
                y_layout.0,
                pref.0,
            )
        }
        .map_err(blas_err(format!("choosing a bf16 GEMM algorithm for {m}x{n}x{k}")))?;
        Ok(Self { desc, w_layout, a_layout, y_layout, algo: heuristic.algo })
    }
}

/// The cuBLASLt bf16 GEMMs of one owner (a layer, a bench problem) on one stream: the stream's
/// handle and workspace, and per shape and operand alignment a plan (matmul descriptor,
/// layouts, the heuristic's algorithm) built on first use and reused after.
pub struct GemmPlans {
    blas: Arc<CudaBlasLT>,
    workspace: Arc<CudaSlice<u8>>,
    plans: Mutex<HashMap<PlanKey, GemmPlan>>,
}

impl GemmPlans {
    /// The GEMMs of `stream` (its cuBLASLt handle and workspace, [`blas_for`] and
    /// [`workspace_for`]), no plan yet.
    ///
    /// # Errors
    /// [`FapeError::BackendUnavailable`] without cuBLASLt; handle and allocation errors.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        Ok(Self { blas: blas_for(stream)?, workspace: workspace_for(stream)?, plans: Mutex::new(HashMap::new()) })
    }

    /// `y [m, n] = a [m, k] . w [n, k]^T (+ bias [n])` in bf16 with f32 accumulation, bias in
    /// the epilogue; all row-major and dense. The base GEMM of the benchmarks is this call on
    /// `x` and `W` alone.
    ///
    /// # Errors
    /// As [`Self::gemm`].
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bias(
        &self,
        a: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        bias: Option<&CudaSlice<bf16>>,
        y: &mut CudaViewMut<'_, bf16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        self.gemm((a, k), (w, k), bias, y, (m, n, k), 0.0)
    }

    /// `y [m, n] = a [m, k] . w [n, k]^T (+ bias [n]) + beta * y` through cuBLASLt (bf16, f32
    /// accumulate), row-major with row strides `lda` of `a` and `ldw` of `w` (`>= k`); `y`
    /// dense; enqueued on the stream of [`Self::new`]. The first call of a shape (extents,
    /// strides, the bias buffer, the operands' alignments) builds its plan; later ones reuse it.
    ///
    /// # Errors
    /// [`FapeError::Unsupported`] for an empty GEMM; [`FapeError::Layout`] when a buffer is
    /// shorter than its extents; cuBLASLt errors.
    pub(crate) fn gemm(
        &self,
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
        let stream = self.blas.stream();
        // Raw device addresses, taken once per call; the guards keep cudarc's stream ordering
        // of each buffer (when it tracks events) until the GEMM is enqueued.
        let (w_ptr, _w_sync) = w.device_ptr(stream);
        let (a_ptr, _a_sync) = a.device_ptr(stream);
        let (y_ptr, _y_sync) = y.device_ptr_mut(stream);
        let (ws_ptr, _ws_sync) = self.workspace.device_ptr(stream);
        let bias_ptr = bias.map(|b| b.device_ptr(stream));
        let key = PlanKey {
            m,
            n,
            k,
            lda,
            ldw,
            bias: bias_ptr.as_ref().map(|(ptr, _)| *ptr),
            align: [pointer_alignment(w_ptr), pointer_alignment(a_ptr), pointer_alignment(y_ptr)],
        };
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let plan = match plans.entry(key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(GemmPlan::new(&self.blas, key, self.workspace.len())?),
        };
        let (alpha, beta) = (1.0f32, beta);
        // SAFETY: the plan's descriptors are live (held under the lock) and describe the buffers:
        // in cuBLASLt's column-major terms A = w is k x n with leading dimension ldw >= k, used
        // transposed; B = a is k x m with leading dimension lda >= k; C = D = y is n x m
        // (ldc = n); the bias pointer of the plan (part of its key) has n bf16 entries. cuBLASLt reads
        // (n-1)*ldw + k elements of w, (m-1)*lda + k of a, reads (beta != 0) and writes m*n of
        // y: the buffers hold that many (checked above), at the alignments the plan's algorithm
        // was chosen for (part of its key). The workspace holds the bytes the plan's preference
        // allowed, alpha and beta are host f32 (the scale type), and the GEMM is enqueued on
        // the stream of every buffer's guard.
        unsafe {
            lt::matmul(
                *self.blas.handle(),
                plan.desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                w_ptr as *const c_void,
                plan.w_layout.0,
                a_ptr as *const c_void,
                plan.a_layout.0,
                y_ptr as *const c_void,
                plan.y_layout.0,
                y_ptr as *mut c_void,
                plan.y_layout.0,
                &plan.algo,
                ws_ptr as *mut c_void,
                self.workspace.len(),
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
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
