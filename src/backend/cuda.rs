//! CUDA through cudarc: device discovery, NVRTC compilation, a process-wide module cache and
//! the helpers every kernel launch wrapper shares.
//!
//! cudarc is built with `dynamic-loading`: libcuda and libnvrtc are opened on first use, and
//! cudarc *panics* if one is missing (or lacks a symbol). So every entry point here first probes
//! the libraries with `is_culib_present` and reports a missing one as
//! [`FapeError::BackendUnavailable`] (or `Err(reason)` from [`CudaDevice::probe`]); driver
//! calls at the discovery boundary additionally run under `catch_unwind`, so a broken
//! installation is an error, never a panic of the caller.
//!
//! Kernels are compiled at run time with NVRTC for the device's own architecture
//! (compute capability `X.Y` -> `sm_XY`, `sm_90a` for 9.0 so Hopper-only instructions are
//! available), with the options of [`NVRTC_OPTIONS`], and loaded once per (context, source,
//! arch) for the whole process.

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    sys as cu, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError, LaunchConfig,
};
use cudarc::nvrtc::{self, Ptx};
use sha2::{Digest, Sha256};

use crate::error::{FapeError, Result};

const BACKEND: &str = "cuda";

/// `kernels/lora_moe.cu`: the LoRA-MoE kernels (token low-pass, fused expert dispatch).
pub(crate) const LORA_MOE_CU: (&str, &str) = ("lora_moe.cu", include_str!("../../kernels/lora_moe.cu"));

/// `kernels/attention.cu`: the attention kernels (row pre-pass, flash forward, naive softmax).
pub(crate) const ATTENTION_CU: (&str, &str) = ("attention.cu", include_str!("../../kernels/attention.cu"));
/// `kernels/freq_split.cu`: the FFT frequency split (fused small images, three-pass, cuFFT glue).
pub(crate) const FREQ_SPLIT_CU: (&str, &str) = ("freq_split.cu", include_str!("../../kernels/freq_split.cu"));
/// `kernels/lora_moe_bf16.cu`: the fused bf16 LoRA-MoE path (shrink/energy, gate/filter, weight packing).
pub(crate) const LORA_MOE_BF16_CU: (&str, &str) = ("lora_moe_bf16.cu", include_str!("../../kernels/lora_moe_bf16.cu"));

/// Every kernel source shipped in `kernels/*.cu`, as `(file name, CUDA C source)`.
///
/// The device compiles from this list and `tests/kernels_compile.rs` compiles and assembles
/// every entry, so a kernel file added to the crate must be added here.
pub const KERNEL_SOURCES: &[(&str, &str)] = &[LORA_MOE_CU, LORA_MOE_BF16_CU, ATTENTION_CU, FREQ_SPLIT_CU];

/// The NVRTC options every kernel is compiled with, besides `--gpu-architecture=<arch>`:
/// C++17, IEEE-accurate f32 (no fast math: no flush-to-zero, exact division and square root;
/// FMA contraction stays on, it only makes results more accurate) and line info for profilers.
pub const NVRTC_OPTIONS: &[&str] =
    &["--std=c++17", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "--fmad=true", "--generate-line-info"];

/// Maximum `gridDim.x`, and of `gridDim.y` / `gridDim.z`, of every CUDA device we can compile for.
const MAX_GRID_X: usize = (1 << 31) - 1;
const MAX_GRID_YZ: usize = 65_535;

// ---------------------------------------------------------------------------------------------
// Library discovery
// ---------------------------------------------------------------------------------------------

/// Whether libcuda (the driver) can be loaded; the reason when not. Probed once per process.
fn libcuda() -> std::result::Result<(), String> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: `is_culib_present` only tries `dlopen` on cudarc's fixed list of library names
    // and closes what it opened; it calls nothing in the library, so it is sound to call
    // whether or not libcuda exists. It is the check that makes later cudarc calls panic-free.
    #[cfg(feature = "cuda-dynamic-loading")]
    let present = *PRESENT.get_or_init(|| unsafe { cu::is_culib_present() });
    // Linked at build time (`candle-cuda`): the process would not have started without it.
    #[cfg(not(feature = "cuda-dynamic-loading"))]
    let present = *PRESENT.get_or_init(|| true);
    if present {
        Ok(())
    } else {
        Err(format!("libcuda (the NVIDIA driver library) was not found; searched {}", candidates("cuda")))
    }
}

/// Whether libnvrtc can be loaded; the reason when not. Probed once per process.
fn libnvrtc() -> std::result::Result<(), String> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: as in `libcuda`: only `dlopen`/`dlclose` of cudarc's candidate names.
    #[cfg(feature = "cuda-dynamic-loading")]
    let present = *PRESENT.get_or_init(|| unsafe { nvrtc::sys::is_culib_present() });
    #[cfg(not(feature = "cuda-dynamic-loading"))]
    let present = *PRESENT.get_or_init(|| true);
    if present {
        Ok(())
    } else {
        Err(format!(
            "libnvrtc (the CUDA run-time compiler) was not found; searched {} \
             (install the CUDA 13 NVRTC library and add its directory to LD_LIBRARY_PATH)",
            candidates("nvrtc")
        ))
    }
}

// Linked at build time (`candle-cuda`), cudarc 0.19.10 emits link flags for every library it
// binds but cuFFT; freq_split's cuFFT route needs it, so it is linked here.
#[cfg(not(feature = "cuda-dynamic-loading"))]
#[link(name = "cufft")]
extern "C" {}

/// A CUDA math library some op paths load on first use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MathLibrary {
    /// libcublas (the unfused baselines).
    Cublas,
    /// libcublasLt (the fused LoRA-MoE GEMM).
    CublasLt,
    /// libcufft (freq_split at sizes that are not powers of two, and its baseline).
    Cufft,
}

/// `Ok` when `lib` can be loaded, else [`FapeError::BackendUnavailable`] naming it and `needed_by`.
/// Probed once per process per library, so the cudarc calls after it cannot panic on a missing
/// library.
pub(crate) fn require_library(lib: MathLibrary, needed_by: &str) -> Result<()> {
    static PRESENT: OnceLock<Mutex<HashMap<&'static str, bool>>> = OnceLock::new();
    let name = match lib {
        MathLibrary::Cublas => "cublas",
        MathLibrary::CublasLt => "cublasLt",
        MathLibrary::Cufft => "cufft",
    };
    let mut known = PRESENT.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: `is_culib_present` only tries `dlopen` on cudarc's fixed list of names for the
    // library and closes what it opened; nothing in the library is called.
    #[cfg(feature = "cuda-dynamic-loading")]
    let present = *known.entry(name).or_insert_with(|| unsafe {
        match lib {
            MathLibrary::Cublas => cudarc::cublas::sys::is_culib_present(),
            MathLibrary::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
            MathLibrary::Cufft => cudarc::cufft::sys::is_culib_present(),
        }
    });
    // Linked at build time (`candle-cuda`): the process would not have started without it.
    #[cfg(not(feature = "cuda-dynamic-loading"))]
    let present = *known.entry(name).or_insert(true);
    if present {
        Ok(())
    } else {
        Err(unavailable(format!("lib{name} was not found ({needed_by} needs it); searched {}", candidates(name))))
    }
}

/// The library file names cudarc tries for `lib`, for error messages.
#[cfg(feature = "cuda-dynamic-loading")]
fn candidates(lib: &str) -> String {
    let mut names = cudarc::get_lib_name_candidates(lib);
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names.join(", ")
}

/// Linked at build time (`candle-cuda`): there is no search list.
#[cfg(not(feature = "cuda-dynamic-loading"))]
fn candidates(lib: &str) -> String {
    format!("lib{lib} (linked at build time)")
}

fn unavailable(reason: impl Into<String>) -> FapeError {
    FapeError::BackendUnavailable { backend: BACKEND, reason: reason.into() }
}

/// Runs `f`, turning a panic inside cudarc (a driver library without a symbol cudarc binds)
/// into an error. Only for the discovery boundary; kernels run after discovery succeeded.
fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".to_string());
        Err(unavailable(format!("{what}: the CUDA libraries are unusable: {message}")))
    })
}

/// The NVRTC version `(major, minor)`. Requires [`libnvrtc`] to have succeeded.
fn nvrtc_version() -> std::result::Result<(i32, i32), String> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: libnvrtc is loaded (checked by the caller); nvrtcVersion writes two ints through
    // valid, exclusive pointers.
    unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| format!("nvrtcVersion failed: {e:?}"))?;
    Ok((major, minor))
}

/// The CUDA version the driver supports, `(major, minor)`. Requires [`libcuda`].
fn driver_version() -> std::result::Result<(i32, i32), DriverError> {
    let mut version = 0;
    // SAFETY: libcuda is loaded (checked by the caller); cuDriverGetVersion writes one int
    // through a valid, exclusive pointer and needs no cuInit.
    unsafe { cu::cuDriverGetVersion(&mut version) }.result()?;
    Ok((version / 1000, (version % 1000) / 10))
}

/// The NVRTC architecture for a compute capability: `sm_XY`, `sm_90a` for 9.0.
pub(crate) fn arch_for(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// The driver errors that mean "no usable CUDA here" rather than "CUDA failed".
fn means_unavailable(e: &DriverError) -> bool {
    use cu::CUresult as R;
    matches!(
        e.0,
        R::CUDA_ERROR_NO_DEVICE
            | R::CUDA_ERROR_INVALID_DEVICE
            | R::CUDA_ERROR_STUB_LIBRARY
            | R::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
            | R::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE
    )
}

/// `CUDA_ERROR_X: description` for a driver error.
fn describe_driver_error(e: &DriverError) -> String {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(text) => format!("{name}: {}", text.to_string_lossy()),
        Err(_) => name,
    }
}

/// Maps a driver error to [`FapeError::Device`], naming what was being done.
pub(crate) fn driver_error(context: impl Into<String>, e: DriverError) -> FapeError {
    FapeError::Device { backend: BACKEND, context: context.into(), message: describe_driver_error(&e) }
}

/// `map_err` adaptor for [`driver_error`]: `.map_err(dev_err("copying `x` to the device"))`.
pub(crate) fn dev_err(context: impl Into<String>) -> impl FnOnce(DriverError) -> FapeError {
    let context = context.into();
    move |e| driver_error(context, e)
}

/// Discovery-time mapping: "no device"-like errors are [`FapeError::BackendUnavailable`].
fn open_error(context: &str, e: DriverError) -> FapeError {
    if means_unavailable(&e) {
        unavailable(format!("{context}: {}", describe_driver_error(&e)))
    } else {
        driver_error(context, e)
    }
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

// ---------------------------------------------------------------------------------------------
// Compilation
// ---------------------------------------------------------------------------------------------

/// Compiles CUDA C `source` to PTX for `arch` (`"sm_80"`, `"sm_90a"`, ...) with
/// [`NVRTC_OPTIONS`]. `kernel_file` names the source in diagnostics (`lora_moe.cu(12): error`).
///
/// Needs only libnvrtc, no GPU and no driver.
///
/// # Errors
/// [`FapeError::BackendUnavailable`] when libnvrtc cannot be loaded;
/// [`FapeError::Nvrtc`] when NVRTC rejects the source or the options (an unknown `arch`
/// included), carrying NVRTC's full log.
pub fn compile_ptx(kernel_file: &str, source: &str, arch: &str) -> Result<Ptx> {
    compile_ptx_with_log(kernel_file, source, arch).map(|(ptx, _)| ptx)
}

/// As [`compile_ptx`], also returning NVRTC's log of a successful compilation: empty when the
/// source compiled without warnings, else the warnings (NVRTC has no warnings-as-errors switch,
/// so `tests/kernels_compile.rs` checks this log to keep the shipped kernels warning-free).
///
/// # Errors
/// As [`compile_ptx`].
pub fn compile_ptx_with_log(kernel_file: &str, source: &str, arch: &str) -> Result<(Ptx, String)> {
    libnvrtc().map_err(unavailable)?;
    let nvrtc_error = |message: String, log: String| FapeError::Nvrtc {
        kernel: kernel_file.to_string(),
        arch: arch.to_string(),
        message,
        log,
    };
    let nul = || nvrtc_error("source, file name or arch contains a NUL byte".into(), String::new());
    if arch.contains('\0') {
        return Err(nul());
    }
    let src = CString::new(source).map_err(|_| nul())?;
    let name = CString::new(kernel_file).map_err(|_| nul())?;
    let mut options: Vec<String> = NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));

    let program = nvrtc::result::create_program(&src, Some(&name))
        .map_err(|e| nvrtc_error(format!("nvrtcCreateProgram: {e:?}"), String::new()))?;
    let program = Program(program);
    // SAFETY (this block and the two below): `program.0` was created above and is destroyed
    // only by `Program::drop`, after these calls; the source and name it references (`src`,
    // `name`) are declared before `program` and so dropped after it. The options contain no
    // NUL (checked above), so cudarc's CString conversion of them cannot panic.
    let compiled = unsafe { nvrtc::result::compile_program(program.0, &options) };
    // SAFETY: see above.
    let log = unsafe { nvrtc::result::get_program_log(program.0) }
        .map(c_text)
        .unwrap_or_else(|e| format!("(nvrtcGetProgramLog failed: {e:?})"));
    if let Err(e) = compiled {
        return Err(nvrtc_error(format!("{e:?} with options {}", options.join(" ")), log));
    }
    // SAFETY: see above.
    let ptx = unsafe { nvrtc::result::get_ptx(program.0) }
        .map_err(|e| nvrtc_error(format!("nvrtcGetPTX: {e:?}"), log.clone()))?;
    Ok((Ptx::from_src(c_text(ptx)), log.trim().to_string()))
}

/// Owns an NVRTC program and destroys it on drop.
struct Program(nvrtc::sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed only here.
        // A failure to destroy only leaks it.
        let _ = unsafe { nvrtc::result::destroy_program(self.0) };
    }
}

/// A NUL-terminated C string buffer from NVRTC as text.
fn c_text(buffer: Vec<c_char>) -> String {
    let bytes: Vec<u8> = buffer.into_iter().take_while(|&c| c != 0).map(|c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The environment variable naming a directory of kernel sources that replace the shipped
/// `kernels/*.cu` of the same file name (the others stay as shipped): for iterating on a kernel
/// without rebuilding the crate, and for the emulator's tests that plant bugs in copies.
pub const KERNEL_DIR_ENV: &str = "FAPE_CUDA_KERNEL_DIR";

/// The replacement source of `kernel_file` from [`KERNEL_DIR_ENV`], if there is one; read once
/// per process.
fn kernel_override(kernel_file: &str) -> Result<Option<Arc<str>>> {
    static READ: OnceLock<Mutex<HashMap<String, Option<Arc<str>>>>> = OnceLock::new();
    let Some(dir) = std::env::var_os(KERNEL_DIR_ENV) else {
        return Ok(None);
    };
    let mut read = READ.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(text) = read.get(kernel_file) {
        return Ok(text.clone());
    }
    let path = std::path::Path::new(&dir).join(kernel_file);
    let text = if path.exists() {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| FapeError::File { path: path.display().to_string(), message: e.to_string() })?;
        Some(Arc::from(text))
    } else {
        None
    };
    read.insert(kernel_file.to_string(), text.clone());
    Ok(text)
}

/// Process-wide module cache: (context, SHA-256 of the source, arch) -> loaded module.
/// The context is part of the key because a module belongs to the context it was loaded in;
/// the cached module keeps that context alive, so the key is never reused by another one.
type ModuleKey = (usize, [u8; 32], String);

fn module_cache() -> &'static Mutex<HashMap<ModuleKey, Arc<CudaModule>>> {
    static CACHE: OnceLock<Mutex<HashMap<ModuleKey, Arc<CudaModule>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

// ---------------------------------------------------------------------------------------------
// The device
// ---------------------------------------------------------------------------------------------

/// An opened CUDA device: its primary context, one non-blocking stream all ops of this handle
/// (and its clones) run on in order, and the NVRTC architecture of the device.
///
/// Cloning is cheap and shares the context, the stream and the process-wide module cache.
#[derive(Clone)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: Arc<str>,
    name: Arc<str>,
    driver: (i32, i32),
    nvrtc: (i32, i32),
    poison: bool,
}

impl CudaDevice {
    /// Opens CUDA device `ordinal` (0 = first) and creates its stream.
    ///
    /// # Errors
    /// [`FapeError::BackendUnavailable`] when libcuda or libnvrtc is absent, the driver finds
    /// no device with that ordinal, or the driver is older than NVRTC (its PTX would not load);
    /// [`FapeError::Device`] when the driver fails otherwise. Never panics.
    pub fn open(ordinal: usize) -> Result<Self> {
        libcuda().map_err(unavailable)?;
        libnvrtc().map_err(unavailable)?;
        no_panic("opening the CUDA device", || Self::open_checked(ordinal))
    }

    fn open_checked(ordinal: usize) -> Result<Self> {
        let nvrtc = nvrtc_version().map_err(unavailable)?;
        let driver = driver_version().map_err(|e| open_error("cuDriverGetVersion", e))?;
        if driver < nvrtc {
            return Err(unavailable(format!(
                "the driver supports CUDA {}.{} but NVRTC is {}.{}: the driver cannot load its PTX \
                 (update the driver or use an NVRTC no newer than the driver)",
                driver.0, driver.1, nvrtc.0, nvrtc.1
            )));
        }
        let count = CudaContext::device_count().map_err(|e| open_error("counting CUDA devices", e))?;
        let count = usize::try_from(count).unwrap_or(0);
        if ordinal >= count {
            return Err(unavailable(format!("no CUDA device with ordinal {ordinal} ({count} device(s) found)")));
        }
        let context = format!("creating the context of CUDA device {ordinal}");
        let ctx = CudaContext::new(ordinal).map_err(|e| open_error(&context, e))?;
        // The stream created below is the context's second one, which switches cudarc to
        // multi-stream event tracking: an event record and a wait per buffer argument of every
        // launch and copy. Everything of this device runs on that one stream; the one second
        // stream of the crate (`LoraMoeLinear::forward_overlapped`) is ordered with explicit
        // events both ways, on every path.
        // SAFETY: no buffer of this context exists yet, so none is left with tracking on; the
        // obligations of untracked buffers (no use on another stream before its allocation or
        // after its free, no concurrent writes from two streams) hold because buffers are used
        // on the device's stream only, apart from the side stream of `forward_overlapped`, which
        // waits for the device's stream before its first launch and is waited for before the
        // call returns.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(dev_err("reading the device name"))?;
        let (major, minor) = ctx.compute_capability().map_err(dev_err("reading the compute capability"))?;
        let stream = ctx.new_stream().map_err(dev_err("creating a stream"))?;
        Ok(Self { ctx, stream, arch: arch_for(major, minor).into(), name: name.into(), driver, nvrtc, poison: false })
    }

    /// A handle on an existing `stream` (such as candle's) and its context: ops launched
    /// through it run on that stream, and modules load into that context (cached as for
    /// [`CudaDevice::open`]). Output poisoning is off.
    ///
    /// # Errors
    /// As [`CudaDevice::open`] for the library and version checks; [`FapeError::Device`] when
    /// the device's name or compute capability cannot be read.
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<Self> {
        libcuda().map_err(unavailable)?;
        libnvrtc().map_err(unavailable)?;
        no_panic("adopting a CUDA stream", || {
            let nvrtc = nvrtc_version().map_err(unavailable)?;
            let driver = driver_version().map_err(|e| open_error("cuDriverGetVersion", e))?;
            let ctx = stream.context().clone();
            let name = ctx.name().map_err(dev_err("reading the device name"))?;
            let (major, minor) = ctx.compute_capability().map_err(dev_err("reading the compute capability"))?;
            Ok(Self {
                ctx,
                stream,
                arch: arch_for(major, minor).into(),
                name: name.into(),
                driver,
                nvrtc,
                poison: false,
            })
        })
    }

    /// The device attribute `attribute` (shared memory limits, L2 size, ...).
    ///
    /// # Errors
    /// [`FapeError::Device`] when the driver cannot answer.
    pub(crate) fn attribute(&self, attribute: cu::CUdevice_attribute) -> Result<i32> {
        self.ctx.attribute(attribute).map_err(dev_err(format!("reading device attribute {attribute:?}")))
    }

    /// One line per CUDA device: ordinal, name, compute capability and NVRTC arch, the CUDA
    /// version of the driver, memory; or `Err(reason)` when libcuda or libnvrtc is missing,
    /// the driver fails to initialise, or there is no device. Creates no context. Never panics.
    pub fn probe() -> std::result::Result<Vec<String>, String> {
        libcuda()?;
        libnvrtc()?;
        no_panic("probing CUDA devices", Self::probe_checked).map_err(|e| match e {
            FapeError::BackendUnavailable { reason, .. } => reason,
            other => other.to_string(),
        })
    }

    fn probe_checked() -> Result<Vec<String>> {
        use cu::CUdevice_attribute as A;
        use cudarc::driver::result::device;
        let nvrtc = nvrtc_version().map_err(unavailable)?;
        let driver = driver_version().map_err(|e| open_error("cuDriverGetVersion", e))?;
        let count = CudaContext::device_count().map_err(|e| open_error("counting CUDA devices", e))?;
        if count <= 0 {
            return Err(unavailable("the driver reports no CUDA devices"));
        }
        let mut lines = Vec::new();
        for ordinal in 0..count {
            let dev = device::get(ordinal).map_err(|e| open_error("cuDeviceGet", e))?;
            let name = device::get_name(dev).map_err(dev_err("cuDeviceGetName"))?;
            // SAFETY: `dev` is a valid device handle from cuDeviceGet after cuInit (done by
            // device_count); the attribute queries and cuDeviceTotalMem only write plain values.
            let (major, minor, memory) = unsafe {
                (
                    device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                    device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
                    device::total_mem(dev),
                )
            };
            let major = major.map_err(dev_err("reading the compute capability"))?;
            let minor = minor.map_err(dev_err("reading the compute capability"))?;
            let memory = memory.map_err(dev_err("reading the device memory size"))?;
            let mut line = format!(
                "{ordinal}: {name}, compute {major}.{minor} ({}), driver CUDA {}.{}, {:.1} GiB, NVRTC {}.{}",
                arch_for(major, minor),
                driver.0,
                driver.1,
                gib(memory),
                nvrtc.0,
                nvrtc.1
            );
            if driver < nvrtc {
                line.push_str(" (unusable: driver older than NVRTC)");
            }
            lines.push(line);
        }
        Ok(lines)
    }

    /// One line: device name, NVRTC arch, CUDA version of the driver.
    pub fn info(&self) -> String {
        format!(
            "{}, {}, driver CUDA {}.{}, NVRTC {}.{}{}",
            self.name,
            self.arch,
            self.driver.0,
            self.driver.1,
            self.nvrtc.0,
            self.nvrtc.1,
            if self.poison { ", poisoned outputs" } else { "" }
        )
    }

    /// Whether the device's name carries [`super::EMULATED_DEVICE_MARK`]: the CPU emulator
    /// of the CUDA libraries, not a GPU.
    pub fn is_emulated(&self) -> bool {
        self.name.contains(super::EMULATED_DEVICE_MARK)
    }

    /// This handle with output poisoning on or off (default off). When on, every kernel output
    /// buffer is filled with NaN before the kernel runs, so an element a kernel fails to write
    /// shows up as NaN in a comparison instead of a plausible zero. Clones made afterwards share
    /// the setting; clones made before keep theirs.
    pub fn poisoned(mut self, on: bool) -> Self {
        self.poison = on;
        self
    }

    /// Whether output poisoning is on (see [`CudaDevice::poisoned`]).
    pub fn is_poisoned(&self) -> bool {
        self.poison
    }

    /// The NVRTC architecture kernels are compiled for (`"sm_80"`, `"sm_90a"`, ...).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The stream every op of this handle runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The module compiled from `source` for this device's arch, compiling it with NVRTC and
    /// loading it on first use. Modules are cached for the process by (context, SHA-256 of
    /// `source`, arch); `kernel_file` names the source in errors. When [`KERNEL_DIR_ENV`]
    /// names a directory holding a file `kernel_file`, that file's text is compiled instead.
    ///
    /// # Errors
    /// [`FapeError::Nvrtc`] with the compiler log when NVRTC rejects the source;
    /// [`FapeError::Device`] when the driver cannot load the PTX; [`FapeError::File`] when the
    /// replacement source cannot be read.
    pub fn module(&self, kernel_file: &str, source: &str) -> Result<Arc<CudaModule>> {
        let replaced = kernel_override(kernel_file)?;
        let source = replaced.as_deref().unwrap_or(source);
        let key: ModuleKey =
            (self.ctx.cu_ctx() as usize, Sha256::digest(source.as_bytes()).into(), self.arch.to_string());
        // Held across compilation so two threads never compile the same module twice. A
        // panic elsewhere cannot leave the map inconsistent, so poisoning is ignored.
        let mut cache = module_cache().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(module) = cache.get(&key) {
            return Ok(module.clone());
        }
        let ptx = compile_ptx(kernel_file, source, &self.arch)?;
        let module = self.ctx.load_module(ptx).map_err(|e| FapeError::Device {
            backend: BACKEND,
            context: format!(
                "loading the PTX of `{kernel_file}` for {} (NVRTC {}.{}, driver CUDA {}.{})",
                self.arch, self.nvrtc.0, self.nvrtc.1, self.driver.0, self.driver.1
            ),
            message: describe_driver_error(&e),
        })?;
        cache.insert(key, module.clone());
        Ok(module)
    }

    /// Kernel `name` of the kernel source `(file, source)` (one of [`KERNEL_SOURCES`]).
    ///
    /// # Errors
    /// As [`CudaDevice::module`]; [`FapeError::Device`] when the module has no such kernel.
    pub(crate) fn function(&self, (file, source): (&str, &str), name: &str) -> Result<CudaFunction> {
        self.module(file, source)?
            .load_function(name)
            .map_err(dev_err(format!("looking up kernel `{name}` in `{file}`")))
    }

    /// Copies a host f32 slice to a new device buffer on this device's stream.
    ///
    /// # Errors
    /// [`FapeError::Device`] naming `what` when allocation or the copy fails.
    pub(crate) fn upload(&self, what: &str, host: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream.clone_htod(host).map_err(dev_err(format!("copying `{what}` ({} f32) to the device", host.len())))
    }

    /// A device buffer of `len` f32 for a kernel output: zeros, or NaN when the handle is
    /// [`poisoned`](CudaDevice::poisoned).
    ///
    /// # Errors
    /// [`FapeError::Device`] naming `what` when allocation fails.
    pub(crate) fn output(&self, what: &str, len: usize) -> Result<CudaSlice<f32>> {
        let context = || format!("allocating output `{what}` ({len} f32)");
        if self.poison {
            self.stream.clone_htod(&vec![f32::NAN; len]).map_err(dev_err(context()))
        } else {
            self.stream.alloc_zeros::<f32>(len).map_err(dev_err(context()))
        }
    }

    /// Copies a device buffer back to the host and synchronizes the stream, so that an error
    /// of any kernel launched before on this stream surfaces here.
    ///
    /// # Errors
    /// [`FapeError::Device`] naming `what` when the copy or an earlier kernel failed.
    pub(crate) fn download(&self, what: &str, device: &CudaSlice<f32>) -> Result<Vec<f32>> {
        let context = format!("copying `{what}` back to the host (or an earlier kernel on the stream failed)");
        let host = self.stream.clone_dtoh(device).map_err(dev_err(context.as_str()))?;
        self.stream.synchronize().map_err(dev_err(context))?;
        Ok(host)
    }

    /// A CUDA graph of the work `enqueue` issues on this device's stream, captured (not run)
    /// in thread-local mode: [`DeviceGraph::launch`] replays it, with the arguments and
    /// pointers of the capture, at one launch's host cost. `enqueue` must only enqueue on this
    /// stream: no allocation, synchronisation or host copy (run it once beforehand so that
    /// cached plans and tables exist).
    ///
    /// # Errors
    /// The error of `enqueue` (the capture is ended and discarded); [`FapeError::Device`] when
    /// the driver refuses to capture or instantiate, or `enqueue` issued nothing.
    pub fn capture_graph(&self, enqueue: impl FnOnce() -> Result<()>) -> Result<DeviceGraph> {
        let mode = cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        self.stream.begin_capture(mode).map_err(dev_err("beginning a stream capture"))?;
        let enqueued = enqueue();
        // Ended on every path, so the stream leaves capture mode.
        let ended = self.stream.end_capture(cu::CUgraphInstantiate_flags(0));
        enqueued?;
        match ended.map_err(dev_err("ending the stream capture (or instantiating its graph)"))? {
            Some(graph) => Ok(DeviceGraph { graph }),
            None => Err(FapeError::Device {
                backend: BACKEND,
                context: "ending the stream capture".into(),
                message: "nothing was captured".into(),
            }),
        }
    }
}

/// Work captured from a [`CudaDevice`]'s stream by [`CudaDevice::capture_graph`].
pub struct DeviceGraph {
    graph: cudarc::driver::CudaGraph,
}

impl DeviceGraph {
    /// Enqueues one replay of the graph on the stream it was captured from.
    ///
    /// # Errors
    /// [`FapeError::Device`] when the launch fails.
    pub fn launch(&self) -> Result<()> {
        self.graph.launch().map_err(dev_err("launching a CUDA graph"))
    }
}

// ---------------------------------------------------------------------------------------------
// Launch-configuration helpers
// ---------------------------------------------------------------------------------------------

/// `ceil(n / tile)`, the number of tiles covering `n` elements.
pub(crate) fn tiles(n: usize, tile: usize) -> usize {
    n.div_ceil(tile)
}

/// A launch configuration for a grid of `grid` = (x, y, z) blocks of `block` threads.
///
/// # Errors
/// [`FapeError::Unsupported`] for `op` when the grid exceeds the CUDA limits
/// (x < 2^31, y and z <= 65535) or is empty.
pub(crate) fn launch_config(
    op: &'static str,
    grid: (usize, usize, usize),
    block: (u32, u32, u32),
    shared_mem_bytes: u32,
) -> Result<LaunchConfig> {
    let (x, y, z) = grid;
    if x == 0 || y == 0 || z == 0 || x > MAX_GRID_X || y > MAX_GRID_YZ || z > MAX_GRID_YZ {
        return Err(FapeError::Unsupported {
            op,
            backend: BACKEND,
            what: format!("a launch grid of {grid:?} blocks (CUDA allows 1..2^31-1 x 1..65535 x 1..65535)"),
        });
    }
    Ok(LaunchConfig { grid_dim: (x as u32, y as u32, z as u32), block_dim: block, shared_mem_bytes })
}

/// `value` as the `int` a kernel takes.
///
/// # Errors
/// [`FapeError::Unsupported`] for `op` when `value` exceeds `i32::MAX`.
pub(crate) fn kernel_int(op: &'static str, what: &str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| FapeError::Unsupported {
        op,
        backend: BACKEND,
        what: format!("{what} = {value} exceeds the kernel's 32-bit index range"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        assert_eq!(arch_for(8, 0), "sm_80");
        assert_eq!(arch_for(8, 6), "sm_86");
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(12, 0), "sm_120");
    }

    #[test]
    fn launch_limits() {
        assert!(launch_config("t", (1, 1, 1), (32, 1, 1), 0).is_ok());
        assert!(launch_config("t", (MAX_GRID_X, MAX_GRID_YZ, 1), (32, 1, 1), 0).is_ok());
        assert!(launch_config("t", (MAX_GRID_X + 1, 1, 1), (32, 1, 1), 0).is_err());
        assert!(launch_config("t", (1, MAX_GRID_YZ + 1, 1), (32, 1, 1), 0).is_err());
        assert!(launch_config("t", (0, 1, 1), (32, 1, 1), 0).is_err());
        assert_eq!(tiles(65, 32), 3);
        assert!(kernel_int("t", "n", i32::MAX as usize + 1).is_err());
    }
}
