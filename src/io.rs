//! Reading op inputs from and writing op outputs to safetensors files (what `fape op` uses, so
//! users can validate the kernels against tensors dumped from PyTorch or numpy).

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::error::{FapeError, Result};
use crate::tensor::{Tensor, View};

/// The tensors of one safetensors file, converted to f32 (stored as f32, bf16 or f16).
#[derive(Debug, Clone)]
pub struct TensorFile {
    path: String,
    tensors: BTreeMap<String, Tensor<f32>>,
}

fn file_error(path: &str, message: impl Into<String>) -> FapeError {
    FapeError::File { path: path.to_string(), message: message.into() }
}

fn to_f32(path: &str, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let chunks = |width: usize| bytes.chunks_exact(width);
    match dtype {
        Dtype::F32 => Ok(chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        Dtype::BF16 => Ok(chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
        Dtype::F16 => Ok(chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
        other => Err(file_error(path, format!("tensor `{name}` has dtype {other:?}; only F32, BF16 and F16 are read"))),
    }
}

impl TensorFile {
    /// Reads every tensor of the file at `path`.
    ///
    /// # Errors
    /// [`FapeError::File`] when the file cannot be read, is not valid safetensors (truncated,
    /// corrupt header) or holds a tensor of another dtype.
    pub fn read(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| file_error(&shown, format!("cannot read: {e}")))?;
        let parsed = SafeTensors::deserialize(&bytes)
            .map_err(|e| file_error(&shown, format!("not a valid safetensors file: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in parsed.iter() {
            let data = to_f32(&shown, name, view.dtype(), view.data())?;
            tensors.insert(name.to_string(), Tensor::new(data, view.shape().to_vec())?);
        }
        Ok(Self { path: shown, tensors })
    }

    /// A view of tensor `name`, which `op` requires.
    ///
    /// # Errors
    /// [`FapeError::File`] naming the missing tensor and the tensors the file has.
    pub fn require(&self, op: &'static str, name: &'static str) -> Result<View<'_, f32>> {
        self.optional(op, name)?.ok_or_else(|| {
            let have: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
            file_error(&self.path, format!("{op} needs tensor `{name}`, which is missing (the file has {have:?})"))
        })
    }

    /// A view of tensor `name` if the file has it.
    ///
    /// # Errors
    /// None in practice: the stored shape always matches the data (kept fallible so a view is
    /// built in one place).
    pub fn optional(&self, op: &'static str, name: &'static str) -> Result<Option<View<'_, f32>>> {
        self.tensors.get(name).map(|t| View::new(op, name, &t.data, &t.shape)).transpose()
    }
}

/// Writes `tensors` (name, tensor) as f32 to a safetensors file at `path`.
///
/// # Errors
/// [`FapeError::File`] when the file cannot be written.
pub fn write(path: &Path, tensors: &[(&str, &Tensor<f32>)]) -> Result<()> {
    let shown = path.display().to_string();
    let views = tensors
        .iter()
        .map(|(name, t)| {
            safetensors::tensor::TensorView::new(Dtype::F32, t.shape.clone(), bytemuck::cast_slice(&t.data))
                .map(|v| (name.to_string(), v))
                .map_err(|e| file_error(&shown, format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| file_error(&shown, format!("cannot write: {e}")))
}
