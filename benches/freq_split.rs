//! freq_split: the f64 reference and every backend that has the op, same shapes, one run.
//! Effective bandwidth counts 12 bytes per pixel (read x, write low and high).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fape_kernels::freq::{freq_split, reference, FreqSplitConfig, OP};
use fape_kernels::testing::{rng, uniform};
use fape_kernels::{Device, DeviceKind, FapeError, View};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("freq_split");
    group.sample_size(10);
    let config = FreqSplitConfig::default();
    for shape in [[1usize, 16, 64, 64], [1, 3, 512, 512]] {
        let x = uniform(&mut rng(3), shape.iter().product(), -1.0, 1.0);
        let view = View::new(OP, "x", &x, &shape).expect("shape");
        let label = format!("{}x{}x{}x{}", shape[0], shape[1], shape[2], shape[3]);
        group.throughput(Throughput::Bytes((x.len() * 12) as u64));
        group.bench_function(BenchmarkId::new("reference-f64", &label), |b| {
            b.iter(|| reference::freq_split(view, &config).expect("reference"))
        });
        for kind in [DeviceKind::Cpu, DeviceKind::Cube, DeviceKind::Cuda] {
            let Ok(device) = Device::open(kind) else { continue };
            match freq_split(&device, view, &config) {
                Err(FapeError::Unsupported { what, .. }) => eprintln!("bench: {kind}: {what}"),
                _ => {
                    group.bench_function(BenchmarkId::new(kind.name(), &label), |b| {
                        b.iter(|| freq_split(&device, view, &config).expect("freq_split"))
                    });
                }
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
