//! candle integration: each op's `CustomOp` lives beside its kernels (`<op>/candle.rs`) and is
//! re-exported here; this module holds their shared glue: contiguous views of candle storage and
//! the mapping of [`FapeError`] into candle's error.
//!
//! On the CPU the ops run this crate's CPU backend; on CUDA (feature `candle-cuda`) they launch
//! this crate's kernels on candle's own stream, reading and writing candle's buffers directly.

use candle_core::{CpuStorage, Layout, WithDType};

use crate::error::FapeError;

pub use crate::attention::candle::attention;
pub use crate::freq::candle::freq_split;
pub use crate::lora_moe::candle::{lora_moe, LoraMoeWeights};

/// `err` as a candle error (its message keeps the op, tensor and shape).
pub(crate) fn candle_error(err: FapeError) -> candle_core::Error {
    candle_core::Error::wrap(err)
}

/// The contiguous elements of `tensor` (an input of `op`) in `storage`.
///
/// # Errors
/// [`FapeError::NotContiguous`] when the layout is strided, a dtype error when `T` is not its dtype.
pub(crate) fn cpu_slice<'a, T: WithDType>(
    op: &'static str,
    tensor: &'static str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_error(FapeError::NotContiguous { op, tensor, shape: layout.dims().to_vec() }))?;
    Ok(&storage.as_slice::<T>()?[start..end])
}

/// The contiguous elements of `tensor` (an input of `op`) in candle's CUDA `storage`, as a view
/// this crate's kernels take.
///
/// # Errors
/// [`FapeError::NotContiguous`] when the layout is strided, a dtype error when `T` is not its dtype.
#[cfg(feature = "candle-cuda")]
pub(crate) fn cuda_view<'a, T: candle_core::cuda_backend::CudaDType>(
    op: &'static str,
    tensor: &'static str,
    storage: &'a candle_core::CudaStorage,
    layout: &Layout,
) -> candle_core::Result<cudarc::driver::CudaView<'a, T>> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_error(FapeError::NotContiguous { op, tensor, shape: layout.dims().to_vec() }))?;
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}
