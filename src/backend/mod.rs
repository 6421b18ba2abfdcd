//! Backends and their discovery at run time.
//!
//! [`Device::open`] turns a [`DeviceKind`] into a handle the ops dispatch on; asking for a
//! backend that is absent (no Vulkan adapter, no libcuda, no GPU) is a
//! [`FapeError::BackendUnavailable`], never a panic. [`discover`] lists what this machine has
//! and why anything is missing.

#[cfg(feature = "cube")]
pub mod cube;
#[cfg(feature = "cuda")]
pub mod cuda;

use std::fmt;
use std::str::FromStr;

use crate::error::{FapeError, Result};

/// What the name of a CUDA device that is really the CPU emulator of the CUDA libraries
/// contains: its times are CPU times (see [`Device::is_emulated`]).
pub const EMULATED_DEVICE_MARK: &str = "emulated (CPU)";

/// Which backend runs an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// The exact f64 reference implementation of the op contract (results rounded to f32).
    Reference,
    /// The fast f32 CPU path (rustfft, a real GEMM, rayon).
    Cpu,
    /// CubeCL kernels on a wgpu adapter (Vulkan, software Vulkan included).
    Cube,
    /// Hand-written CUDA kernels compiled at run time with NVRTC.
    Cuda,
}

impl DeviceKind {
    /// Every kind, in the order `fape devices` and `fape check` list them.
    pub const ALL: [DeviceKind; 4] = [Self::Reference, Self::Cpu, Self::Cube, Self::Cuda];

    /// The lower-case name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Reference => "reference",
            Self::Cpu => "cpu",
            Self::Cube => "cube",
            Self::Cuda => "cuda",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DeviceKind {
    type Err = FapeError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| FapeError::Config {
            op: "device",
            field: "device",
            message: format!("`{s}` is not one of reference, cpu, cube, cuda"),
        })
    }
}

/// An opened backend. Cloning is cheap: GPU handles are shared.
#[derive(Clone)]
pub enum Device {
    /// See [`DeviceKind::Reference`].
    Reference,
    /// See [`DeviceKind::Cpu`].
    Cpu,
    /// See [`DeviceKind::Cube`].
    #[cfg(feature = "cube")]
    Cube(cube::CubeDevice),
    /// See [`DeviceKind::Cuda`].
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaDevice),
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({})", self.describe())
    }
}

impl Device {
    /// Opens the first device of `kind`.
    ///
    /// # Errors
    /// [`FapeError::BackendUnavailable`] when this build or this machine lacks the backend;
    /// [`FapeError::Device`] when it is present but fails to start.
    pub fn open(kind: DeviceKind) -> Result<Self> {
        match kind {
            DeviceKind::Reference => Ok(Self::Reference),
            DeviceKind::Cpu => Ok(Self::Cpu),
            #[cfg(feature = "cube")]
            DeviceKind::Cube => cube::CubeDevice::open().map(Self::Cube),
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => cuda::CudaDevice::open(0).map(Self::Cuda),
            #[allow(unreachable_patterns)]
            other => Err(FapeError::BackendUnavailable {
                backend: other.name(),
                reason: format!("this build has no `{}` feature", other.name()),
            }),
        }
    }

    /// The kind of this device.
    pub fn kind(&self) -> DeviceKind {
        match self {
            Self::Reference => DeviceKind::Reference,
            Self::Cpu => DeviceKind::Cpu,
            #[cfg(feature = "cube")]
            Self::Cube(_) => DeviceKind::Cube,
            #[cfg(feature = "cuda")]
            Self::Cuda(_) => DeviceKind::Cuda,
        }
    }

    /// Whether this is a CUDA device whose name carries [`EMULATED_DEVICE_MARK`]: the CPU
    /// emulator of the CUDA libraries, whose times are not GPU figures.
    pub fn is_emulated(&self) -> bool {
        match self {
            #[cfg(feature = "cuda")]
            Self::Cuda(d) => d.is_emulated(),
            _ => false,
        }
    }

    /// One line naming the device (adapter or GPU name).
    pub fn describe(&self) -> String {
        match self {
            Self::Reference => "reference (f64, exact contract)".to_string(),
            Self::Cpu => format!("cpu (f32, {} threads)", rayon::current_num_threads()),
            #[cfg(feature = "cube")]
            Self::Cube(d) => format!("cube ({})", d.name()),
            #[cfg(feature = "cuda")]
            Self::Cuda(d) => format!("cuda ({})", d.info()),
        }
    }

    /// The same device with output poisoning switched on or off: GPU backends then fill every
    /// kernel output with NaN before the launch, so elements a kernel fails to write show up in
    /// checks. The host backends write every element by construction and ignore it.
    pub fn poisoned(self, on: bool) -> Self {
        match self {
            #[cfg(feature = "cube")]
            Self::Cube(d) => Self::Cube(d.poisoned(on)),
            #[cfg(feature = "cuda")]
            Self::Cuda(d) => Self::Cuda(d.poisoned(on)),
            _ => {
                let _ = on;
                self
            }
        }
    }
}

/// What discovery found for one backend kind.
#[derive(Debug, Clone)]
pub struct BackendReport {
    /// The backend.
    pub kind: DeviceKind,
    /// One line per device found (adapter, GPU with compute capability and driver), or the
    /// reason none is usable.
    pub devices: std::result::Result<Vec<String>, String>,
}

/// Probes every backend kind without panicking, in [`DeviceKind::ALL`] order.
pub fn discover() -> Vec<BackendReport> {
    DeviceKind::ALL.into_iter().map(|kind| BackendReport { kind, devices: probe(kind) }).collect()
}

fn probe(kind: DeviceKind) -> std::result::Result<Vec<String>, String> {
    match kind {
        DeviceKind::Reference | DeviceKind::Cpu => {
            Ok(vec![Device::open(kind).map(|d| d.describe()).unwrap_or_default()])
        }
        #[cfg(feature = "cube")]
        DeviceKind::Cube => cube::CubeDevice::probe(),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => cuda::CudaDevice::probe(),
        #[allow(unreachable_patterns)]
        other => Err(format!("this build has no `{}` feature", other.name())),
    }
}
