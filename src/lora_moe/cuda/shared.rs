//! What the CUDA LoRA-MoE submodules share: the bf16 kernels' lookup and the buffer-length check.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::CudaFunction;

use crate::backend::cuda::{CudaDevice, LORA_MOE_BF16_CU};
use crate::error::{FapeError, Result};
use crate::lora_moe::config::OP;

/// Kernel `name` of `kernels/lora_moe_bf16.cu` on `device`, looked up once per context and kept
/// for the process, so layers built per call (the candle op) skip hashing the source. The
/// function holds its module, hence its context, so the key (the context's address) is never
/// reused by another context.
///
/// # Errors
/// As [`CudaDevice::module`]; [`FapeError::Device`] when the module has no such kernel.
pub(crate) fn bf16_kernel(device: &CudaDevice, name: &'static str) -> Result<CudaFunction> {
    type Key = (usize, &'static str);
    static FUNCTIONS: OnceLock<Mutex<HashMap<Key, CudaFunction>>> = OnceLock::new();
    let key = (device.stream().context().cu_ctx() as usize, name);
    let mut functions = FUNCTIONS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(function) = functions.get(&key) {
        return Ok(function.clone());
    }
    let function = device.function(LORA_MOE_BF16_CU, name)?;
    functions.insert(key, function.clone());
    Ok(function)
}

/// A device buffer must hold exactly `needed` elements.
pub(crate) fn check_len(tensor: &'static str, len: usize, shape: &[usize]) -> Result<()> {
    let needed: usize = shape.iter().product();
    if len == needed {
        Ok(())
    } else {
        Err(FapeError::Layout { op: OP, tensor, len, shape: shape.to_vec(), needed })
    }
}
