#![cfg(feature = "cuda")]
use fape_kernels::backend::cuda::CudaDevice;
use fape_kernels::{Device, DeviceKind, FapeError};

#[test]
fn cuda_absent_is_unavailable_not_panic() {
    let open = Device::open(DeviceKind::Cuda);
    println!("open: {:?}", open.as_ref().map(|_| ()).map_err(|e| e.to_string()));
    assert!(matches!(open, Err(FapeError::BackendUnavailable { backend: "cuda", .. })));
    let probe = CudaDevice::probe();
    println!("probe: {probe:?}");
    assert!(probe.is_err());
    let direct = CudaDevice::open(3);
    assert!(matches!(direct, Err(FapeError::BackendUnavailable { .. })));
    let reports = fape_kernels::backend::discover();
    for r in reports { println!("{:?}: {:?}", r.kind, r.devices); }
    // compile without nvrtc
    let c = fape_kernels::backend::cuda::compile_ptx("a.cu", "extern \"C\" __global__ void k() {}", "sm_80");
    println!("compile: {:?}", c.as_ref().map(|_| ()).map_err(|e| e.to_string()));
}
