//! LoRA-MoE and its token low-pass: the f64 reference and every backend found (cpu, cube, cuda)
//! through the host API (bf16 inputs, small shape; each iteration includes uploads and the
//! device sync), and on CUDA the production shapes device-resident (fused, unfused, base GEMM;
//! CUDA-event times). `fape bench lora-moe` prints the same rows as one table with the ratios.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fape_kernels::lora_moe::{lora_moe, reference, token_lowpass, LoraMoeConfig, LoraMoeDims, LoraMoeTensors};
use fape_kernels::testing::{rng, uniform};
use fape_kernels::{Device, DeviceKind, View};
use half::bf16;

fn devices() -> Vec<Device> {
    [DeviceKind::Cpu, DeviceKind::Cube, DeviceKind::Cuda]
        .into_iter()
        .filter_map(|k| Device::open(k).map_err(|e| eprintln!("bench: skipping {k}: {e}")).ok())
        .collect()
}

fn bench_lowpass(c: &mut Criterion) {
    let mut group = c.benchmark_group("token_lowpass");
    let shape = [1usize, 1024, 3072];
    let x = uniform(&mut rng(1), shape.iter().product(), -1.0, 1.0);
    let view = View::new("bench", "x", &x, &shape).expect("shape");
    group.throughput(Throughput::Bytes((x.len() * 8) as u64));
    for device in devices() {
        group.bench_function(BenchmarkId::new(device.kind().name(), "1x1024x3072"), |b| {
            b.iter(|| token_lowpass(&device, view, 9, 2.0).expect("lowpass"))
        });
    }
    group.finish();
}

fn bench_lora_moe(c: &mut Criterion) {
    let mut group = c.benchmark_group("lora_moe");
    group.sample_size(10);
    // The host APIs on a small shape (the f64 reference is slow), bf16 inputs.
    let dims = LoraMoeDims { batch: 1, tokens: 256, d: 512, n: 512, experts: 2, rank: 8, dg: 512 };
    let LoraMoeDims { tokens: t, d, n, experts: e, rank: r, .. } = dims;
    let tensors = LoraMoeTensors::random(2, dims, true).cast::<bf16>();
    let inputs = tensors.inputs();
    let config = LoraMoeConfig::default();
    group.throughput(Throughput::Elements((2 * t * d * n) as u64));
    let label = format!("T{t} d{d} n{n} E{e} r{r} bf16");
    group.bench_function(BenchmarkId::new("reference-f64", &label), |b| {
        b.iter(|| reference::lora_moe(&inputs, &config).expect("reference"))
    });
    for device in devices() {
        group.bench_function(BenchmarkId::new(device.kind().name(), &label), |b| {
            b.iter(|| lora_moe(&device, &inputs, &config).expect("lora_moe"))
        });
    }
    group.finish();
}

/// The production shapes on CUDA, device-resident, timed with CUDA events: the base GEMM alone
/// (cuBLASLt), the fused path and the unfused baseline; fused / base-gemm is the figure of merit.
#[cfg(feature = "cuda")]
fn bench_lora_moe_cuda(c: &mut Criterion) {
    use fape_kernels::lora_moe::{CudaBenchProblem, CudaVariant};
    let cuda = match Device::open(DeviceKind::Cuda) {
        Ok(Device::Cuda(d)) => d,
        Ok(_) => return,
        Err(e) => {
            eprintln!("bench: skipping the CUDA LoRA-MoE rows: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group("lora_moe_cuda");
    let config = LoraMoeConfig::default();
    for (t, d, n) in [(1024, 3072, 3072), (1536, 3072, 9216), (4096, 3072, 3072)] {
        let dims = LoraMoeDims { batch: 1, tokens: t, d, n, experts: 2, rank: 8, dg: d };
        let mut problem = CudaBenchProblem::new(&cuda, 3, dims, &config).expect("bench problem");
        group.throughput(Throughput::Elements((2 * t * d * n) as u64));
        let label = format!("T{t} d{d} n{n} E2 r8 bf16");
        for variant in CudaVariant::ALL {
            group.bench_function(BenchmarkId::new(variant.name(), &label), |b| {
                b.iter_custom(|iters| problem.time(variant, iters as usize).expect("timed runs"))
            });
        }
    }
    group.finish();
}

#[cfg(not(feature = "cuda"))]
fn bench_lora_moe_cuda(_c: &mut Criterion) {
    eprintln!("bench: skipping the CUDA LoRA-MoE rows: this build has no `cuda` feature");
}

criterion_group!(benches, bench_lowpass, bench_lora_moe, bench_lora_moe_cuda);
criterion_main!(benches);
