//! Reading op inputs from and writing op outputs to safetensors files (what `fape op` uses, so
//! users can validate the kernels against tensors dumped from PyTorch or numpy). Tensors keep
//! the dtype they are stored in (f32, bf16 or f16), so the ops can run in it.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

use half::{bf16, f16};

use crate::error::{FapeError, Result};
use crate::tensor::{Real, Tensor, View};

pub mod header;

/// The element types a tensor file holds for the ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 32-bit IEEE float.
    F32,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    Bf16,
    /// IEEE half precision.
    F16,
}

impl Dtype {
    /// The lower-case name (as [`Real::DTYPE`] spells it).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => f32::DTYPE,
            Self::Bf16 => bf16::DTYPE,
            Self::F16 => f16::DTYPE,
        }
    }

    fn safetensors(self) -> safetensors::Dtype {
        match self {
            Self::F32 => safetensors::Dtype::F32,
            Self::Bf16 => safetensors::Dtype::BF16,
            Self::F16 => safetensors::Dtype::F16,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of a file, in the dtype it is stored in.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// Stored as f32.
    F32(Tensor<f32>),
    /// Stored as bf16.
    Bf16(Tensor<bf16>),
    /// Stored as f16.
    F16(Tensor<f16>),
}

impl Stored {
    /// The stored dtype.
    pub fn dtype(&self) -> Dtype {
        match self {
            Self::F32(_) => Dtype::F32,
            Self::Bf16(_) => Dtype::Bf16,
            Self::F16(_) => Dtype::F16,
        }
    }

    /// The values widened to f32 (exact for every stored dtype).
    pub fn to_f32(&self) -> Tensor<f32> {
        match self {
            Self::F32(t) => t.clone(),
            Self::Bf16(t) => t.map(|v| v.to_f32()),
            Self::F16(t) => t.map(|v| v.to_f32()),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// An element type of tensor files: f32, bf16 or f16 (sealed).
pub trait Element: Real + bytemuck::Pod + sealed::Sealed {
    /// This type's [`Dtype`].
    const STORED: Dtype;
    /// The tensor when it is stored as this type.
    fn stored(tensor: &Stored) -> Option<&Tensor<Self>>;
}

impl Element for f32 {
    const STORED: Dtype = Dtype::F32;
    fn stored(tensor: &Stored) -> Option<&Tensor<Self>> {
        match tensor {
            Stored::F32(t) => Some(t),
            _ => None,
        }
    }
}

impl Element for bf16 {
    const STORED: Dtype = Dtype::Bf16;
    fn stored(tensor: &Stored) -> Option<&Tensor<Self>> {
        match tensor {
            Stored::Bf16(t) => Some(t),
            _ => None,
        }
    }
}

impl Element for f16 {
    const STORED: Dtype = Dtype::F16;
    fn stored(tensor: &Stored) -> Option<&Tensor<Self>> {
        match tensor {
            Stored::F16(t) => Some(t),
            _ => None,
        }
    }
}

/// The tensors of one safetensors file, each in its stored dtype (f32, bf16 or f16).
#[derive(Debug, Clone)]
pub struct TensorFile {
    path: String,
    tensors: BTreeMap<String, Stored>,
}

fn file_error(path: &str, message: impl Into<String>) -> FapeError {
    FapeError::File { path: path.to_string(), message: message.into() }
}

/// The bytes of the file at `path`, refused unread when it says it holds more than `cap`, and
/// never more of them than the size it says it has: so a device or pipe that never ends
/// (`/dev/zero`, size 0) costs nothing. `what` names the kind of file in the error.
///
/// # Errors
/// [`FapeError::File`] naming `path` when it cannot be read or holds more than `cap` bytes.
pub fn read_bounded(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    let shown = path.display().to_string();
    let cannot = |e: std::io::Error| file_error(&shown, format!("cannot read: {e}"));
    let file = std::fs::File::open(path).map_err(cannot)?;
    let len = file.metadata().map_err(cannot)?.len();
    if len > cap {
        return Err(file_error(
            &shown,
            format!("{}, over the {} {what} may have", header::human_bytes(len), header::human_bytes(cap)),
        ));
    }
    let mut bytes = Vec::new();
    file.take(len).read_to_end(&mut bytes).map_err(cannot)?;
    Ok(bytes)
}

/// The little-endian elements of `bytes`, `N` bytes each, decoded by `from`.
fn decode<T, const N: usize>(bytes: &[u8], from: fn([u8; N]) -> T) -> Vec<T> {
    let element = |chunk: &[u8]| {
        let mut le = [0u8; N];
        le.copy_from_slice(chunk);
        from(le)
    };
    bytes.chunks_exact(N).map(element).collect()
}

fn parse(path: &str, entry: &header::HeaderEntry, bytes: &[u8]) -> Result<Stored> {
    let shape = entry.shape.clone();
    match entry.dtype.as_str() {
        "F32" => Tensor::new(decode(bytes, f32::from_le_bytes), shape).map(Stored::F32),
        "BF16" => Tensor::new(decode(bytes, bf16::from_le_bytes), shape).map(Stored::Bf16),
        "F16" => Tensor::new(decode(bytes, f16::from_le_bytes), shape).map(Stored::F16),
        other => {
            Err(file_error(path, format!("tensor `{}` has dtype {other}; only F32, BF16 and F16 are read", entry.name)))
        }
    }
}

impl TensorFile {
    /// Reads every tensor of the file at `path`, keeping its dtype.
    ///
    /// # Errors
    /// [`FapeError::File`] when the file cannot be read, or as [`TensorFile::from_bytes`].
    pub fn read(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        Self::from_bytes(&shown, &read_bounded(path, u64::MAX, "a tensor file")?)
    }

    /// The tensors of the safetensors file held in `bytes`; `path` is what errors name.
    /// Every claim of the header is checked against `bytes` first ([`header::read_header`]),
    /// so nothing is allocated beyond the header and the tensors that are really there.
    ///
    /// # Errors
    /// [`FapeError::File`] naming `path` when the bytes are not valid safetensors (truncated,
    /// a corrupt header, a tensor whose bytes run past the end or disagree with its shape) or
    /// hold a tensor of a dtype other than F32, BF16 and F16 (naming it).
    pub fn from_bytes(path: &str, bytes: &[u8]) -> Result<Self> {
        let entries = header::read_header(path, &mut &bytes[..], bytes.len() as u64)?;
        let mut tensors = BTreeMap::new();
        for entry in &entries {
            // read_header checked offset + bytes against bytes.len(), so both fit usize.
            let start = entry.offset as usize;
            let data = &bytes[start..start + entry.bytes as usize];
            tensors.insert(entry.name.clone(), parse(path, entry, data)?);
        }
        Ok(Self { path: path.to_string(), tensors })
    }

    /// The same tensors, every one widened to f32 (exact).
    pub fn widened(&self) -> Self {
        let tensors = self.tensors.iter().map(|(name, t)| (name.clone(), Stored::F32(t.to_f32()))).collect();
        Self { path: self.path.clone(), tensors }
    }

    /// Tensor `name` as stored, if the file has it.
    pub fn get(&self, name: &str) -> Option<&Stored> {
        self.tensors.get(name)
    }

    /// The dtype the tensors `names` (the inputs of `op`) share, with the name of the first of
    /// them the file has. Names the file lacks are passed over.
    ///
    /// # Errors
    /// [`FapeError::Dtype`] naming the first tensor whose dtype differs from the first one's;
    /// [`FapeError::File`] as [`TensorFile::require`] (for `names[0]`) when the file has none
    /// of them.
    pub fn common_dtype(&self, op: &'static str, names: &[&'static str]) -> Result<(Dtype, &'static str)> {
        let mut present = names.iter().filter_map(|&name| self.tensors.get(name).map(|t| (name, t.dtype())));
        let Some((first, dtype)) = present.next() else {
            return Err(self.missing(op, names.first().copied().unwrap_or("?")));
        };
        match present.find(|&(_, other)| other != dtype) {
            Some((name, other)) => Err(FapeError::Dtype {
                op,
                tensor: name,
                dtype: other.name(),
                message: format!("but `{first}` is {dtype}: the inputs of one op must share a dtype"),
            }),
            None => Ok((dtype, first)),
        }
    }

    fn missing(&self, op: &'static str, name: &str) -> FapeError {
        let have: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        file_error(&self.path, format!("{op} needs tensor `{name}`, which is missing (the file has {have:?})"))
    }

    /// A view of tensor `name`, which `op` requires, stored as `T`.
    ///
    /// # Errors
    /// [`FapeError::File`] naming the missing tensor and the tensors the file has;
    /// [`FapeError::Dtype`] when it is stored in another dtype than `T`.
    pub fn require<T: Element>(&self, op: &'static str, name: &'static str) -> Result<View<'_, T>> {
        self.optional(op, name)?.ok_or_else(|| self.missing(op, name))
    }

    /// A view of tensor `name` (an input of `op`) stored as `T`, if the file has it.
    ///
    /// # Errors
    /// [`FapeError::Dtype`] when it is stored in another dtype than `T`.
    pub fn optional<T: Element>(&self, op: &'static str, name: &'static str) -> Result<Option<View<'_, T>>> {
        let Some(stored) = self.tensors.get(name) else {
            return Ok(None);
        };
        let t = T::stored(stored).ok_or_else(|| FapeError::Dtype {
            op,
            tensor: name,
            dtype: stored.dtype().name(),
            message: format!("expected {}", T::STORED),
        })?;
        View::new(op, name, &t.data, &t.shape).map(Some)
    }
}

/// Writes `tensors` (name, tensor) as `T` (f32, bf16 or f16) to a safetensors file at `path`.
///
/// # Errors
/// [`FapeError::File`] when the file cannot be written.
pub fn write<T: Element>(path: &Path, tensors: &[(&str, &Tensor<T>)]) -> Result<()> {
    let shown = path.display().to_string();
    let views = tensors
        .iter()
        .map(|(name, t)| {
            safetensors::tensor::TensorView::new(
                T::STORED.safetensors(),
                t.shape.clone(),
                bytemuck::cast_slice(&t.data),
            )
            .map(|v| (name.to_string(), v))
            .map_err(|e| file_error(&shown, format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| file_error(&shown, format!("cannot write: {e}")))
}
