//! LoRA-MoE and its token low-pass: the f64 reference and every backend found (cpu, cube, cuda),
//! same shapes, one run.
//! Every host-API call returns host data, so each iteration includes the device sync.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fape_kernels::lora_moe::{lora_moe, reference, token_lowpass, LoraMoeConfig, LoraMoeDims, LoraMoeTensors};
use fape_kernels::testing::{rng, uniform};
use fape_kernels::{Device, DeviceKind, View};

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
    let dims = LoraMoeDims { batch: 1, tokens: 1024, d: 512, n: 512, experts: 2, rank: 8, dg: 512 };
    let LoraMoeDims { tokens: t, d, n, experts: e, rank: r, .. } = dims;
    let tensors = LoraMoeTensors::random(2, dims, true);
    let inputs = tensors.inputs();
    let config = LoraMoeConfig::default();
    group.throughput(Throughput::Elements((2 * t * d * n) as u64));
    let label = format!("T{t} d{d} n{n} E{e} r{r}");
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

criterion_group!(benches, bench_lowpass, bench_lora_moe);
criterion_main!(benches);
