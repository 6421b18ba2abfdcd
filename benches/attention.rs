//! attention: the f64 reference and every backend that has the op at a small shape (f32), then
//! on CUDA the flash kernel beside the naive cuBLAS baseline in bf16 at FLUX's shapes
//! (device-resident inputs, each iteration ends with a stream sync).
//! Throughput counts 4 B H Lq Lk D floating-point operations.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
#[cfg(feature = "cuda")]
use fape_kernels::attention::CudaAttention;
use fape_kernels::attention::{attention, reference, rope_tables, AttentionConfig, AttentionInputs, OP};
use fape_kernels::testing::{rng, uniform};
use fape_kernels::{Device, DeviceKind, FapeError, View};
#[cfg(feature = "cuda")]
use half::bf16;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    group.sample_size(10);
    let (b, h, l, d) = (1usize, 4usize, 512usize, 128usize);
    let shape = [b, h, l, d];
    let mut g = rng(4);
    let [q, k, v] = [(); 3].map(|_| uniform(&mut g, b * h * l * d, -1.0, 1.0));
    let norm = uniform(&mut g, d, 0.5, 1.5);
    let (cos, sin) = rope_tables(l, d).expect("rope tables");
    let norm_shape = [d];
    let inputs = AttentionInputs::new(
        View::new(OP, "q", &q, &shape).expect("q"),
        View::new(OP, "k", &k, &shape).expect("k"),
        View::new(OP, "v", &v, &shape).expect("v"),
    )
    .with_norms(
        View::new(OP, "q_norm", &norm, &norm_shape).expect("norm"),
        View::new(OP, "k_norm", &norm, &norm_shape).expect("norm"),
    )
    .with_rope(cos.view(), sin.view());
    let config = AttentionConfig::default();
    let label = format!("B{b} H{h} L{l} D{d} norm+rope");
    group.throughput(Throughput::Elements((4 * b * h * l * l * d) as u64));
    group.bench_function(BenchmarkId::new("reference-f64", &label), |bch| {
        bch.iter(|| reference::attention(&inputs, &config).expect("reference"))
    });
    for kind in [DeviceKind::Cpu, DeviceKind::Cube, DeviceKind::Cuda] {
        let Ok(device) = Device::open(kind) else { continue };
        match attention(&device, &inputs, &config) {
            Err(FapeError::Unsupported { what, .. }) => eprintln!("bench: {kind}: {what}"),
            _ => {
                group.bench_function(BenchmarkId::new(kind.name(), &label), |bch| {
                    bch.iter(|| attention(&device, &inputs, &config).expect("attention"))
                });
            }
        }
    }
    group.finish();
}

#[cfg(feature = "cuda")]
/// `(B, H, L, D)` of the CUDA rows: FLUX at 512 px and 1024 px, and a batch of four at 512 px.
const CUDA_SHAPES: [(usize, usize, usize, usize); 3] = [(1, 24, 1536, 128), (1, 24, 4608, 128), (4, 24, 1536, 128)];

#[cfg(feature = "cuda")]
fn bench_cuda(c: &mut Criterion) {
    let Ok(Device::Cuda(cuda)) = Device::open(DeviceKind::Cuda) else {
        eprintln!("bench: no CUDA device, skipping the bf16 flash/naive group");
        return;
    };
    let mut group = c.benchmark_group("attention-cuda-bf16");
    group.sample_size(10);
    for (i, &(b, h, l, d)) in CUDA_SHAPES.iter().enumerate() {
        let shape = [b, h, l, d];
        let mut g = rng(60 + i as u64);
        let [q, k, v] = [(); 3]
            .map(|_| uniform(&mut g, b * h * l * d, -1.0, 1.0).into_iter().map(bf16::from_f32).collect::<Vec<_>>());
        let inputs = AttentionInputs::new(
            View::new(OP, "q", &q, &shape).expect("q"),
            View::new(OP, "k", &k, &shape).expect("k"),
            View::new(OP, "v", &v, &shape).expect("v"),
        );
        let mut run = CudaAttention::new(&cuda, &inputs, &AttentionConfig::default()).expect("upload");
        let label = format!("B{b} H{h} L{l} D{d}");
        group.throughput(Throughput::Elements((4 * b * h * l * l * d) as u64));
        group.bench_function(BenchmarkId::new("naive", &label), |bch| {
            bch.iter(|| run.naive().and_then(|()| run.synchronize()).expect("naive"))
        });
        group.bench_function(BenchmarkId::new("flash", &label), |bch| {
            bch.iter(|| run.flash().and_then(|()| run.synchronize()).expect("flash"))
        });
    }
    group.finish();
}

#[cfg(feature = "cuda")]
criterion_group!(benches, bench, bench_cuda);
#[cfg(not(feature = "cuda"))]
criterion_group!(benches, bench);
criterion_main!(benches);
