//! `fape bench lora-moe`: the fused bf16 LoRA-MoE next to the unfused baseline and the base GEMM
//! alone (cuBLASLt, same shapes) on CUDA, device-resident and timed with CUDA events; the host
//! APIs of the reference, cpu and cube backends on a small shape (host-timed, uploads included).
//! The figure of merit is fused / base-gemm at each shape (issue #3's bar: <= 1.08x).

use std::time::Duration;

use clap::Args as ClapArgs;
use fape_kernels::bench::{host_timed, measure, BenchPlan, BenchRow, BenchTable, Timing, Work};
use fape_kernels::lora_moe::{lora_moe, reference, LoraMoeConfig, LoraMoeDims, LoraMoeTensors};
use fape_kernels::{Device, DeviceKind, FapeError, Result};
use half::bf16;

/// The production shapes T x d x n (E = 2, r = 8, bf16).
const SHAPES: &[(usize, usize, usize)] = &[(1024, 3072, 3072), (1536, 3072, 9216), (4096, 3072, 3072)];
/// CUDA runs per timed sample (back to back, so host launch overhead overlaps device work).
#[cfg(feature = "cuda")]
const REPS: usize = 10;
/// The host backends' shape (the f64 reference is slow).
const SMALL: (usize, usize, usize) = (256, 512, 512);

/// Arguments of this benchmark.
#[derive(ClapArgs)]
pub struct Args {
    /// Backends to bench (repeatable); default: every one found here (reference, cpu, cube, cuda).
    #[arg(long = "device", value_name = "reference|cpu|cube|cuda")]
    devices: Vec<DeviceKind>,
    /// CUDA shapes as TxDxN, comma-separated [default: 1024x3072x3072,1536x3072x9216,4096x3072x3072].
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
    /// Timed runs per row (after 3 warm-up runs) [default: at least 10 and 0.5 s].
    #[arg(long)]
    runs: Option<usize>,
}

fn parse_shape(s: &str) -> Result<(usize, usize, usize)> {
    let bad = || FapeError::Config {
        op: "bench",
        field: "shapes",
        message: format!("`{s}` is not TxDxN with positive integers (such as 1024x3072x3072)"),
    };
    let parts: Vec<usize> = s.split('x').map(|p| p.trim().parse().map_err(|_| bad())).collect::<Result<_>>()?;
    match parts[..] {
        [t, d, n] if t > 0 && d > 0 && n > 0 => Ok((t, d, n)),
        _ => Err(bad()),
    }
}

fn dims((tokens, d, n): (usize, usize, usize)) -> LoraMoeDims {
    LoraMoeDims { batch: 1, tokens, d, n, experts: 2, rank: 8, dg: d }
}

fn label((t, d, n): (usize, usize, usize)) -> String {
    format!("T{t} d{d} n{n} E2 r8 bf16")
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// Bad flags, a backend named with `--device` that is unavailable, or an op error.
pub fn run(args: Args) -> Result<()> {
    let plan = match args.runs {
        Some(runs) => {
            BenchPlan { min_runs: runs.max(1), max_runs: runs.max(1), min_time: Duration::ZERO, ..BenchPlan::default() }
        }
        None => BenchPlan::default(),
    };
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))] // parsed (and checked) everywhere
    let shapes = if args.shapes.is_empty() {
        SHAPES.to_vec()
    } else {
        args.shapes.iter().map(|s| parse_shape(s)).collect::<Result<Vec<_>>>()?
    };
    let mut devices = Vec::new();
    if args.devices.is_empty() {
        for kind in DeviceKind::ALL {
            match Device::open(kind) {
                Ok(d) => devices.push(d),
                Err(e) => println!("skipping {kind}: {e}"),
            }
        }
    } else {
        for kind in args.devices {
            devices.push(Device::open(kind)?);
        }
    }

    let config = LoraMoeConfig::default();
    let mut table = BenchTable::new("lora_moe", "base-gemm");
    let small = dims(SMALL);
    let host = LoraMoeTensors::random(1, small, true).cast::<bf16>();
    let flops = |(t, d, n): (usize, usize, usize)| Work::Flops(2.0 * (t * d * n) as f64);
    for device in &devices {
        let row = |timing: Timing, variant: &str| BenchRow {
            shape: label(SMALL),
            variant: variant.into(),
            backend: device.kind().name().into(),
            timing,
            work: flops(SMALL),
        };
        let timing = match device {
            Device::Reference => {
                let small_plan = BenchPlan { warmup: 1, min_runs: 3, max_runs: 3, ..plan };
                measure(small_plan, || host_timed(|| reference::lora_moe(&host.inputs(), &config)))?
            }
            _ => measure(plan, || host_timed(|| lora_moe(device, &host.inputs(), &config)))?,
        };
        let variant = if device.kind() == DeviceKind::Reference { "reference-f64" } else { "host-api" };
        table.rows.push(row(timing, variant));
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = device {
            cuda_rows(cuda, &shapes, &config, plan, &mut table)?;
        }
    }
    if !devices.iter().any(|d| d.kind() == DeviceKind::Cuda) {
        println!("skipped the fused / unfused / base-gemm rows: they need a CUDA device");
    }
    print!("{table}");
    for row in table.rows.iter().filter(|r| r.variant.starts_with("fused")) {
        if let Some(ratio) = table.ratio(row) {
            println!("figure of merit at {}: {} / base-gemm = {ratio:.3}x (bar: <= 1.08x)", row.shape, row.variant);
        }
    }
    Ok(())
}

/// The device-resident CUDA rows: base GEMM, fused and unfused at every shape.
#[cfg(feature = "cuda")]
fn cuda_rows(
    device: &fape_kernels::backend::cuda::CudaDevice,
    shapes: &[(usize, usize, usize)],
    config: &LoraMoeConfig,
    plan: BenchPlan,
    table: &mut BenchTable,
) -> Result<()> {
    use fape_kernels::lora_moe::{CudaBenchProblem, CudaVariant};
    for &shape in shapes {
        let mut problem = CudaBenchProblem::new(device, 2, dims(shape), config)?;
        for variant in CudaVariant::ALL {
            let timing = measure(plan, || problem.time(variant, REPS).map(|t| t / REPS as u32))?;
            let (t, d, n) = shape;
            table.rows.push(BenchRow {
                shape: label(shape),
                variant: variant.name().into(),
                backend: "cuda".into(),
                timing,
                work: Work::Flops(2.0 * (t * d * n) as f64),
            });
        }
        problem.synchronize()?;
    }
    Ok(())
}
