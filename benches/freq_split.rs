//! freq_split at the shapes: the f64 reference (small shapes only), every host backend,
//! and on CUDA this crate's kernels beside the cuFFT-plus-mask baseline, inputs and outputs
//! resident on the device, timed with CUDA events. Effective bandwidth counts 12 bytes per
//! pixel (read x, write low and high).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fape_kernels::freq::{freq_split, reference, FreqSplitConfig, OP};
use fape_kernels::testing::{rng, uniform};
use fape_kernels::{Device, DeviceKind, FapeError, View};

/// `[B,C,H,W]`: the shapes.
const SHAPES: [[usize; 4]; 4] = [[1, 16, 64, 64], [8, 3, 512, 512], [1, 3, 1024, 1024], [64, 3, 512, 512]];

/// Host backends (and the reference) run shapes up to this many pixels.
const HOST_MAX_PIXELS: usize = 1 << 23;
const REFERENCE_MAX_PIXELS: usize = 1 << 20;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("freq_split");
    group.sample_size(10);
    let config = FreqSplitConfig::default();
    for shape in SHAPES {
        let len: usize = shape.iter().product();
        let x = uniform(&mut rng(3), len, -1.0, 1.0);
        let view = View::new(OP, "x", &x, &shape).expect("shape");
        let label = format!("{}x{}x{}x{}", shape[0], shape[1], shape[2], shape[3]);
        group.throughput(Throughput::Bytes((len * 12) as u64));
        if len <= REFERENCE_MAX_PIXELS {
            group.bench_function(BenchmarkId::new("reference-f64", &label), |b| {
                b.iter(|| reference::freq_split(view, &config).expect("reference"))
            });
        }
        for kind in [DeviceKind::Cpu, DeviceKind::Cube, DeviceKind::Cuda] {
            let Ok(device) = Device::open(kind) else { continue };
            match &device {
                #[cfg(feature = "cuda")]
                Device::Cuda(d) => {
                    use fape_kernels::freq::{CudaFftPath, CudaSplitBuffers};
                    let mut buffers = CudaSplitBuffers::new(d, view, &config).expect("upload");
                    for (variant, path) in [("cuda-cufft+mask", CudaFftPath::Cufft), ("cuda", CudaFftPath::Auto)] {
                        group.bench_function(BenchmarkId::new(variant, &label), |b| {
                            b.iter_custom(|iters| {
                                let reps = usize::try_from(iters).unwrap_or(usize::MAX);
                                let one = buffers.time_runs(d, &config, path, reps).expect("freq_split");
                                one * u32::try_from(iters).unwrap_or(u32::MAX)
                            })
                        });
                    }
                }
                _ if len > HOST_MAX_PIXELS => eprintln!("bench: {kind} skips {label} (too slow to be useful)"),
                _ => match freq_split(&device, view, &config) {
                    Err(FapeError::Unsupported { what, .. }) => eprintln!("bench: {kind}: {what}"),
                    _ => {
                        group.bench_function(BenchmarkId::new(kind.name(), &label), |b| {
                            b.iter(|| freq_split(&device, view, &config).expect("freq_split"))
                        });
                    }
                },
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
