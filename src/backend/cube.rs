//! CubeCL (0.10, wgpu runtime) backend: adapter discovery, the shared device handle, and the
//! buffer/launch helpers every CubeCL kernel of the crate goes through.
//!
//! # Adapter selection
//! [`CubeDevice::open`] never lets cubecl pick an adapter itself (cubecl-wgpu panics when it
//! finds none). It creates its own `wgpu::Instance`, enumerates the adapters of the backends in
//! `WGPU_BACKEND` (default: the primary ones — Vulkan, Metal, DX12), ranks them (discrete GPU >
//! integrated > virtual > other > CPU, e.g. Mesa's lavapipe), optionally narrowed by the
//! case-insensitive substring in `WGPU_ADAPTER_NAME`, requests the wgpu device itself and hands
//! the finished setup to cubecl through `cubecl::wgpu::init_device`. The whole sequence runs
//! under [`std::panic::catch_unwind`] as a last resort, and its outcome — success or the reason
//! of failure — is cached for the life of the process, so every `open` shares one wgpu device.
//!
//! # Helpers for kernels (crate-private)
//! A launch wrapper uploads with `CubeDevice::upload`, allocates its outputs with
//! `CubeDevice::output` (NaN-poisoned when [`CubeDevice::poisoned`] is on), launches inside
//! `CubeDevice::guarded` with `CubeDevice::cube_count_1d` (or its own grid) and
//! `GpuArray::arg`, and reads back with `CubeDevice::read`, which also surfaces launch and
//! wgpu validation errors as [`FapeError::Device`].

use std::any::Any;
use std::fmt;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use bytemuck::Pod;
use cubecl::bytes::Bytes;
use cubecl::client::ComputeClient;
use cubecl::prelude::{ArrayArg, CubeCount, CubeDim};
use cubecl::server::Handle;
use cubecl::wgpu::{init_device, RuntimeOptions, WgpuRuntime};
use cubecl::Runtime;

use crate::error::{FapeError, Result};

const BACKEND: &str = "cube";

/// The cubecl client type every CubeCL kernel of the crate launches on.
pub(crate) type Client = ComputeClient<WgpuRuntime>;

/// An opened wgpu adapter driven by CubeCL. Cloning is cheap (the device is shared).
#[derive(Clone)]
pub struct CubeDevice {
    inner: Arc<Inner>,
    poison: bool,
}

struct Inner {
    client: Client,
    info: wgpu::AdapterInfo,
    /// wgpu errors no error scope caught (validation, out of memory), recorded instead of the
    /// default handler's panic and drained by [`CubeDevice::read`] / [`CubeDevice::guarded`].
    uncaptured: Arc<Mutex<Vec<String>>>,
}

/// Why the process-wide device could not be opened (cached, so `FapeError` need not be `Clone`).
#[derive(Clone)]
enum OpenFailure {
    /// No usable adapter: [`FapeError::BackendUnavailable`].
    Unavailable(String),
    /// An adapter exists but starting it failed: [`FapeError::Device`].
    Failed(String),
}

impl fmt::Debug for CubeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CubeDevice").field("adapter", &self.name()).field("poison", &self.poison).finish()
    }
}

impl CubeDevice {
    /// Opens the default wgpu adapter (see the module docs for how it is chosen). Every call in
    /// a process returns a handle to the same device; poisoning is off.
    ///
    /// # Errors
    /// [`FapeError::BackendUnavailable`] (backend `"cube"`) when no wgpu adapter exists;
    /// [`FapeError::Device`] when one exists but its device cannot be created or cubecl fails to
    /// start on it. Never panics.
    pub fn open() -> Result<Self> {
        static SHARED: OnceLock<std::result::Result<Arc<Inner>, OpenFailure>> = OnceLock::new();
        let shared = SHARED.get_or_init(|| {
            catch_unwind(open_inner).unwrap_or_else(|payload| {
                Err(OpenFailure::Failed(format!(
                    "panic while starting cubecl on wgpu: {}",
                    panic_message(payload.as_ref())
                )))
            })
        });
        match shared {
            Ok(inner) => Ok(Self { inner: Arc::clone(inner), poison: false }),
            Err(OpenFailure::Unavailable(reason)) => {
                Err(FapeError::BackendUnavailable { backend: BACKEND, reason: reason.clone() })
            }
            Err(OpenFailure::Failed(message)) => Err(device_error("opening the wgpu adapter", message.clone())),
        }
    }

    /// One line per wgpu adapter found (name, backend, device type, driver), the one
    /// [`CubeDevice::open`] picks marked `[default]`; `Err(reason)` when there is none. Never
    /// panics and never starts cubecl.
    pub fn probe() -> std::result::Result<Vec<String>, String> {
        let found = catch_unwind(|| {
            let (_, adapters) = enumerate_adapters();
            let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
            let chosen = pick_adapter(&infos);
            (infos, chosen)
        })
        .map_err(|payload| format!("wgpu panicked while enumerating adapters: {}", panic_message(payload.as_ref())))?;
        let (infos, chosen) = found;
        if infos.is_empty() {
            return Err(no_adapter_reason());
        }
        Ok(infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                let mut line = adapter_line(info);
                if chosen == Some(i) {
                    line.push_str(" [default]");
                }
                line
            })
            .collect())
    }

    /// The adapter's one-line name, e.g. `llvmpipe (LLVM 19.1.7, 256 bits) [Vulkan Cpu]`.
    pub fn name(&self) -> String {
        let info = &self.inner.info;
        format!("{} [{:?} {:?}]", info.name, info.backend, info.device_type)
    }

    /// Returns the device with output poisoning on or off. When on, every kernel output buffer
    /// (`CubeDevice::output`) is filled with NaN (all bits set) before launch, so elements
    /// a kernel fails to write show up in checks. Off by default: the production path does not
    /// pay for the extra upload.
    pub fn poisoned(self, on: bool) -> Self {
        Self { poison: on, ..self }
    }

    /// Whether outputs are NaN-poisoned (see [`CubeDevice::poisoned`]).
    #[allow(dead_code)]
    pub(crate) fn is_poisoned(&self) -> bool {
        self.poison
    }

    /// The cubecl client kernels launch on.
    pub(crate) fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Runs `f` (typically a `launch_unchecked`), turning a panic inside cubecl or wgpu, and any
    /// wgpu error recorded meanwhile, into [`FapeError::Device`] with `context`.
    pub(crate) fn guarded<T>(&self, context: &str, f: impl FnOnce() -> T) -> Result<T> {
        let out = catch_unwind(AssertUnwindSafe(f))
            .map_err(|payload| device_error(context, format!("panic: {}", panic_message(payload.as_ref()))));
        self.take_uncaptured(context)?;
        out
    }

    /// Copies `data` to a new device buffer.
    ///
    /// # Errors
    /// [`FapeError::Device`] when the buffer exceeds the adapter's storage-binding limit or the
    /// upload fails.
    pub(crate) fn upload<T: Pod + Send + Sync>(&self, data: &[T]) -> Result<GpuArray<T>> {
        let context = format!("uploading {} x {}", data.len(), std::any::type_name::<T>());
        let mut bytes: Vec<u8> = bytemuck::cast_slice(data).to_vec();
        let padded = padded_size(bytes.len());
        self.check_size(&context, padded)?;
        bytes.resize(padded, 0);
        let handle = self.guarded(&context, || self.client().create(Bytes::from_elems(bytes)))?;
        Ok(GpuArray::new(handle, data.len()))
    }

    /// Allocates a device buffer of `len` elements for a kernel to write. Its contents are
    /// unspecified (recycled memory) unless poisoning is on, in which case every byte is `0xFF`
    /// (NaN for `f32`/`f16`, `MAX` for unsigned integers).
    ///
    /// # Errors
    /// [`FapeError::Device`] when the buffer exceeds the adapter's storage-binding limit or the
    /// allocation fails.
    pub(crate) fn output<T: Pod>(&self, len: usize) -> Result<GpuArray<T>> {
        let context = format!("allocating {len} x {}", std::any::type_name::<T>());
        let size =
            len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| device_error(&context, "size overflows usize"))?;
        let padded = padded_size(size);
        self.check_size(&context, padded)?;
        let handle = if self.poison {
            self.guarded(&context, || self.client().create(Bytes::from_elems(vec![u8::MAX; padded])))?
        } else {
            self.guarded(&context, || self.client().empty(padded))?
        };
        Ok(GpuArray::new(handle, len))
    }

    /// Waits for the work queued on `array` and copies it back to the host.
    ///
    /// # Errors
    /// [`FapeError::Device`] carrying cubecl's error when a launch that wrote `array` failed
    /// (compilation, resource limits) or the read fails, and any wgpu validation error recorded
    /// since the last check.
    pub(crate) fn read<T: Pod>(&self, array: &GpuArray<T>) -> Result<Vec<T>> {
        let context = format!("reading back {} x {}", array.len, std::any::type_name::<T>());
        let bytes = self
            .guarded(&context, || self.client().read_one(array.handle.clone()))?
            .map_err(|e| device_error(&context, format!("{e:?}")))?;
        let want = array.len * std::mem::size_of::<T>();
        if bytes.len() < want {
            return Err(device_error(&context, format!("device returned {} bytes, expected {want}", bytes.len())));
        }
        Ok(bytemuck::pod_collect_to_vec(&bytes[..want]))
    }

    /// A cube count covering `units` work units of `cube_dim` each, spread over the grid's
    /// x/y/z axes when one axis would exceed the adapter's limit (kernels index with
    /// `ABSOLUTE_POS` and must bounds-check it: the grid may hold a few extra cubes).
    pub(crate) fn cube_count_1d(&self, units: usize, cube_dim: CubeDim) -> CubeCount {
        cubecl::calculate_cube_count_elemwise(self.client(), units, cube_dim)
    }

    /// The largest buffer, in bytes, a kernel can bind.
    pub(crate) fn max_buffer_bytes(&self) -> u64 {
        self.client().properties().memory.max_page_size
    }

    fn check_size(&self, context: &str, bytes: usize) -> Result<()> {
        let max = self.max_buffer_bytes();
        if bytes as u64 > max {
            return Err(device_error(
                context,
                format!("{bytes} bytes exceed the adapter's storage-buffer binding limit of {max} bytes"),
            ));
        }
        Ok(())
    }

    fn take_uncaptured(&self, context: &str) -> Result<()> {
        let mut pending = match self.inner.uncaptured.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if pending.is_empty() {
            return Ok(());
        }
        let message = pending.drain(..).collect::<Vec<_>>().join("; ");
        Err(device_error(context, format!("wgpu error: {message}")))
    }
}

/// A typed device buffer of `len` elements. Cloning shares the buffer.
#[derive(Clone)]
pub(crate) struct GpuArray<T> {
    handle: Handle,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T> GpuArray<T> {
    fn new(handle: Handle, len: usize) -> Self {
        Self { handle, len, _elem: PhantomData }
    }

    /// Elements in the buffer.
    #[allow(dead_code)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The cubecl handle (for cubecl APIs taking one directly).
    #[allow(dead_code)]
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The buffer as an `Array<T>` kernel argument of length [`GpuArray::len`].
    pub(crate) fn arg(&self) -> ArrayArg<WgpuRuntime> {
        // SAFETY: `from_raw_parts` trusts the length; every `GpuArray` is built by `upload` or
        // `output` with a buffer of at least `len * size_of::<T>()` bytes, so `len` elements of
        // `T` are in bounds.
        unsafe { ArrayArg::from_raw_parts(self.handle.clone(), self.len) }
    }
}

/// A [`FapeError::Device`] of the cube backend.
pub(crate) fn device_error(context: impl Into<String>, message: impl Into<String>) -> FapeError {
    FapeError::Device { backend: BACKEND, context: context.into(), message: message.into() }
}

/// Buffer sizes are rounded up to wgpu's 4-byte copy alignment, and never zero (wgpu rejects
/// empty storage bindings).
fn padded_size(bytes: usize) -> usize {
    bytes.max(4).next_multiple_of(4)
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// The backends searched: `WGPU_BACKEND` when set, otherwise the primary ones (GL is left out:
/// cubecl's compute shaders target Vulkan, Metal and DX12).
fn backends() -> wgpu::Backends {
    wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY)
}

fn enumerate_adapters() -> (wgpu::Instance, Vec<wgpu::Adapter>) {
    let backends = backends();
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        flags: wgpu::InstanceFlags::default().with_env(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapters = cubecl::future::block_on(instance.enumerate_adapters(backends));
    (instance, adapters)
}

fn no_adapter_reason() -> String {
    format!(
        "no wgpu adapter found for backends {:?} (install a Vulkan driver; Mesa's lavapipe \
         `mesa-vulkan-drivers` gives a software one)",
        backends()
    )
}

/// The adapter `open` uses: the best-ranked device type, the first of equals, among those whose
/// name contains `WGPU_ADAPTER_NAME` (case-insensitive) when that is set.
fn pick_adapter(infos: &[wgpu::AdapterInfo]) -> Option<usize> {
    let wanted = std::env::var("WGPU_ADAPTER_NAME").ok().map(|s| s.to_lowercase()).filter(|s| !s.is_empty());
    let rank = |t: wgpu::DeviceType| match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    infos
        .iter()
        .enumerate()
        .filter(|(_, info)| wanted.as_ref().is_none_or(|w| info.name.to_lowercase().contains(w.as_str())))
        .min_by_key(|(i, info)| (rank(info.device_type), *i))
        .map(|(i, _)| i)
}

fn adapter_line(info: &wgpu::AdapterInfo) -> String {
    let driver = [info.driver.as_str(), info.driver_info.as_str()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "{} | backend {:?} | type {:?} | driver {}",
        info.name,
        info.backend,
        info.device_type,
        if driver.is_empty() { "unknown" } else { &driver }
    )
}

fn open_inner() -> std::result::Result<Arc<Inner>, OpenFailure> {
    let (instance, mut adapters) = enumerate_adapters();
    let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
    let Some(index) = pick_adapter(&infos) else {
        return Err(OpenFailure::Unavailable(if infos.is_empty() {
            no_adapter_reason()
        } else {
            format!(
                "no wgpu adapter name contains WGPU_ADAPTER_NAME={:?}; found: {}",
                std::env::var("WGPU_ADAPTER_NAME").unwrap_or_default(),
                infos.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
            )
        }));
    };
    let adapter = adapters.swap_remove(index);
    let info = infos[index].clone();

    // The same request cubecl-wgpu's WGSL path makes (all adapter limits and features, bar
    // mappable primary buffers), minus wgpu's experimental features, which would need an
    // `unsafe` opt-in and which cubecl's WGSL compiler does not use.
    let descriptor = wgpu::DeviceDescriptor {
        label: Some("fape-kernels cube"),
        required_features: adapter
            .features()
            .difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS)
            .difference(wgpu::Features::all_experimental_mask()),
        required_limits: adapter.limits(),
        memory_hints: wgpu::MemoryHints::MemoryUsage,
        ..Default::default()
    };
    let (device, queue) = cubecl::future::block_on(adapter.request_device(&descriptor))
        .map_err(|e| OpenFailure::Failed(format!("requesting a device on `{}`: {e}", info.name)))?;

    let uncaptured = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&uncaptured);
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        let mut pending = match sink.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        pending.push(e.to_string());
    }));

    let setup = cubecl::wgpu::WgpuSetup { instance, adapter, device, queue, backend: info.backend };
    let wgpu_device = init_device(setup, RuntimeOptions::default());
    let client = WgpuRuntime::client(&wgpu_device);
    Ok(Arc::new(Inner { client, info, uncaptured }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, device_type: wgpu::DeviceType) -> wgpu::AdapterInfo {
        wgpu::AdapterInfo {
            name: name.to_string(),
            vendor: 0,
            device: 0,
            device_type,
            device_pci_bus_id: String::new(),
            driver: String::new(),
            driver_info: String::new(),
            backend: wgpu::Backend::Vulkan,
            subgroup_min_size: 0,
            subgroup_max_size: 0,
            transient_saves_memory: false,
        }
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CubeDevice>();
        assert_send_sync::<GpuArray<f32>>();
    }

    #[test]
    fn ranks_gpus_before_cpu_adapters() {
        let infos = [
            info("llvmpipe", wgpu::DeviceType::Cpu),
            info("igpu", wgpu::DeviceType::IntegratedGpu),
            info("dgpu", wgpu::DeviceType::DiscreteGpu),
        ];
        assert_eq!(pick_adapter(&infos), Some(2));
        assert_eq!(pick_adapter(&infos[..2]), Some(1));
        assert_eq!(pick_adapter(&[]), None);
    }

    /// The device, or `None` (test skipped) where this machine has no wgpu adapter.
    fn device() -> Option<CubeDevice> {
        match CubeDevice::open() {
            Ok(d) => Some(d),
            Err(FapeError::BackendUnavailable { reason, .. }) => {
                eprintln!("skipped: no wgpu adapter: {reason}");
                None
            }
            Err(e) => panic!("opening the cube device failed: {e}"),
        }
    }

    #[test]
    fn poisoned_outputs_read_back_as_nan_and_uploads_round_trip() {
        let Some(d) = device() else { return };
        let out = d.clone().poisoned(true).output::<f32>(7).unwrap();
        let back = d.read(&out).unwrap();
        assert_eq!(back.len(), 7);
        assert!(back.iter().all(|v| v.is_nan()), "{back:?}");

        let data = [1.5f32, -2.0, 3.25];
        assert_eq!(d.read(&d.upload(&data).unwrap()).unwrap(), data);
        let empty = d.upload::<f32>(&[]).unwrap();
        assert!(d.read(&empty).unwrap().is_empty());
    }

    #[test]
    fn oversized_buffers_are_device_errors() {
        let Some(d) = device() else { return };
        let too_many = (d.max_buffer_bytes() / 4 + 1) as usize;
        let err = d.output::<f32>(too_many).err().expect("oversized output must fail");
        assert!(matches!(err, FapeError::Device { backend: "cube", .. }), "{err}");
    }

    #[test]
    fn sizes_are_padded_and_never_zero() {
        assert_eq!(padded_size(0), 4);
        assert_eq!(padded_size(6), 8);
        assert_eq!(padded_size(8), 8);
    }
}
