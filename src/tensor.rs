//! Shaped host tensors: borrowed views that cross the API and owned results.

use crate::error::{FapeError, Result};

/// A floating-point element the references read: converted to f64 losslessly.
pub trait Real: Copy + Send + Sync + 'static {
    /// The value as f64.
    fn to_f64(self) -> f64;
    /// The nearest value of this type (round to nearest even).
    fn from_f64(v: f64) -> Self;
    /// The dtype's name as safetensors and the check table spell it.
    const DTYPE: &'static str;
}

impl Real for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    const DTYPE: &'static str = "f32";
}

impl Real for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    const DTYPE: &'static str = "f64";
}

impl Real for half::bf16 {
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        half::bf16::from_f64(v)
    }
    const DTYPE: &'static str = "bf16";
}

impl Real for half::f16 {
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        half::f16::from_f64(v)
    }
    const DTYPE: &'static str = "f16";
}

/// A row-major view over host memory with its shape.
#[derive(Debug, Clone, Copy)]
pub struct View<'a, T> {
    data: &'a [T],
    shape: &'a [usize],
}

/// The elements of `shape`, `usize::MAX` when the product overflows (so it never equals a
/// buffer's length).
fn elements(shape: &[usize]) -> usize {
    shape.iter().try_fold(1usize, |a, &s| a.checked_mul(s)).unwrap_or(usize::MAX)
}

impl<'a, T> View<'a, T> {
    /// A view of `data` as a row-major tensor of `shape`.
    ///
    /// # Errors
    /// [`FapeError::Layout`] when `data.len()` is not the product of `shape`; `op` and `tensor`
    /// name the argument in the message.
    pub fn new(op: &'static str, tensor: &'static str, data: &'a [T], shape: &'a [usize]) -> Result<Self> {
        let needed = elements(shape);
        if needed != data.len() {
            return Err(FapeError::Layout { op, tensor, len: data.len(), shape: shape.to_vec(), needed });
        }
        Ok(Self { data, shape })
    }

    /// The elements, row-major.
    pub fn data(&self) -> &'a [T] {
        self.data
    }

    /// The extents, outermost first.
    pub fn shape(&self) -> &'a [usize] {
        self.shape
    }
}

/// An owned row-major tensor: what the ops return.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<T> {
    /// The elements, row-major.
    pub data: Vec<T>,
    /// The extents, outermost first.
    pub shape: Vec<usize>,
}

impl<T> Tensor<T> {
    /// A tensor from its parts.
    ///
    /// # Errors
    /// [`FapeError::Layout`] when `data.len()` is not the product of `shape`.
    pub fn new(data: Vec<T>, shape: Vec<usize>) -> Result<Self> {
        let needed = elements(&shape);
        if needed != data.len() {
            return Err(FapeError::Layout { op: "tensor", tensor: "data", len: data.len(), shape, needed });
        }
        Ok(Self { data, shape })
    }

    /// A borrowed view of the tensor.
    pub fn view(&self) -> View<'_, T> {
        View { data: &self.data, shape: &self.shape }
    }

    /// The same extents with every element mapped through `f`.
    pub fn map<U>(&self, f: impl Fn(&T) -> U) -> Tensor<U> {
        Tensor { data: self.data.iter().map(f).collect(), shape: self.shape.clone() }
    }
}

/// Checks that `view` has rank `dims.len()` and, where `dims[i]` is `Some`, that extent.
/// `expected` is the human spelling of the shape (such as `"[B,T,d]"`).
pub(crate) fn expect_shape<T>(
    op: &'static str,
    tensor: &'static str,
    view: &View<'_, T>,
    expected: &str,
    dims: &[Option<usize>],
) -> Result<()> {
    let shape = view.shape();
    let ok = shape.len() == dims.len() && shape.iter().zip(dims).all(|(s, d)| d.is_none_or(|d| d == *s));
    if ok {
        Ok(())
    } else {
        Err(FapeError::Shape { op, tensor, expected: expected.to_string(), actual: shape.to_vec() })
    }
}

/// Rejects tensors with no elements.
pub(crate) fn expect_nonempty<T>(op: &'static str, tensor: &'static str, view: &View<'_, T>) -> Result<()> {
    if view.data().is_empty() {
        return Err(FapeError::Shape {
            op,
            tensor,
            expected: "at least one element".to_string(),
            actual: view.shape().to_vec(),
        });
    }
    Ok(())
}
