//! The crate's one error type.

use thiserror::Error;

/// Every failure the crate reports. Shape errors name the op, the tensor, the expected and the
/// actual shape; config errors name the field; device errors carry the backend's own message.
#[derive(Debug, Error)]
pub enum FapeError {
    /// A tensor has the wrong rank or extents for the op.
    #[error("{op}: tensor `{tensor}` has shape {actual:?}, expected {expected}")]
    Shape { op: &'static str, tensor: &'static str, expected: String, actual: Vec<usize> },
    /// A host buffer does not hold exactly the elements its shape claims.
    #[error("{op}: tensor `{tensor}` has {len} elements but shape {shape:?} needs {needed}")]
    Layout { op: &'static str, tensor: &'static str, len: usize, shape: Vec<usize>, needed: usize },
    /// A tensor handed over by a framework is strided where the op needs contiguous elements.
    #[error("{op}: tensor `{tensor}` of shape {shape:?} is not contiguous")]
    NotContiguous { op: &'static str, tensor: &'static str, shape: Vec<usize> },
    /// A tensor's element type is not one the op takes, or differs from the op's other inputs.
    #[error("{op}: tensor `{tensor}` is {dtype}, {message}")]
    Dtype { op: &'static str, tensor: &'static str, dtype: &'static str, message: String },
    /// A config field is out of its domain.
    #[error("{op}: config `{field}` {message}")]
    Config { op: &'static str, field: &'static str, message: String },
    /// The backend asked for is not present on this machine.
    #[error("backend `{backend}` is not available: {reason}")]
    BackendUnavailable { backend: &'static str, reason: String },
    /// The op exists but this backend does not implement it (yet), or not for these arguments.
    #[error("{op}: not supported on the `{backend}` backend: {what}")]
    Unsupported { op: &'static str, backend: &'static str, what: String },
    /// A driver, runtime or wgpu call failed.
    #[error("{backend} device error in {context}: {message}")]
    Device { backend: &'static str, context: String, message: String },
    /// NVRTC rejected a kernel source; `log` is the compiler's log.
    #[error("NVRTC failed to compile `{kernel}` for {arch}: {message}\n{log}")]
    Nvrtc { kernel: String, arch: String, message: String, log: String },
    /// A tensor file could not be read or written, or a tensor in it is unusable.
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// The crate's result type.
pub type Result<T, E = FapeError> = std::result::Result<T, E>;

/// Shorthand for a [`FapeError::Config`].
pub(crate) fn config_error(op: &'static str, field: &'static str, message: impl Into<String>) -> FapeError {
    FapeError::Config { op, field, message: message.into() }
}
