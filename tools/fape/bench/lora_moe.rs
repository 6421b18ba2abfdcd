//! `fape bench lora-moe`: the fused bf16 LoRA-MoE next to the unfused baseline and the base GEMM
//! alone (cuBLASLt, same shapes) on CUDA, device-resident and timed with CUDA events; on the
//! host, the op through its host API (cpu and cube in f32, reference in f64) and, on the cpu, the
//! base linear `x W^T + bias` alone with the same GEMM (`base-gemm`), host-timed.
//! The figure of merit is fused / base-gemm at each shape (issue #3's bar on CUDA: <= 1.08x).

use std::time::Duration;

use clap::Args as ClapArgs;
use fape_kernels::bench::{host_timed, measure, BenchBackend, BenchPlan, BenchRow, BenchTable, Timing, Work};
use fape_kernels::cpu_gemm::linear;
use fape_kernels::lora_moe::{lora_moe, reference, LoraMoeConfig, LoraMoeDims, LoraMoeTensors};
use fape_kernels::{Device, DeviceKind, Result};

/// `T x d x n`.
type Shape = (usize, usize, usize);

/// The production shapes T x d x n (E = 2, r = 8) CUDA runs by default.
#[cfg(feature = "cuda")]
const SHAPES: &[Shape] = &[(1024, 3072, 3072), (1536, 3072, 9216), (4096, 3072, 3072)];
/// CUDA runs per timed sample (back to back, so host launch overhead overlaps device work).
#[cfg(feature = "cuda")]
const REPS: usize = 10;
/// The host backends' default shape (the f64 reference is slow).
const SMALL: Shape = (256, 512, 512);

/// Arguments of this benchmark.
#[derive(ClapArgs)]
pub struct Args {
    /// Backends to bench (repeatable); default: every one found here (reference, cpu, cube, cuda).
    #[arg(long = "device", value_name = "reference|cpu|cube|cuda")]
    devices: Vec<DeviceKind>,
    /// Shapes TxDxN (B = 1, E = 2, r = 8, with bias), comma-separated, for every backend asked
    /// for [default: CUDA 1024x3072x3072,1536x3072x9216,4096x3072x3072; host 256x512x512].
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
    /// Timed runs per row (after 3 warm-up runs) [default: at least 10 and 0.5 s].
    #[arg(long)]
    runs: Option<usize>,
    /// One JSON object per row instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_shape(s: &str) -> Result<Shape> {
    match super::parse_dims(s, &[3], "TxDxN", "1024x3072x3072")?[..] {
        [t, d, n] => Ok((t, d, n)),
        _ => unreachable!("parse_dims returns 3 dims"),
    }
}

fn dims((tokens, d, n): Shape) -> LoraMoeDims {
    LoraMoeDims { batch: 1, tokens, d, n, experts: 2, rank: 8, dg: d }
}

fn label((t, d, n): Shape) -> String {
    format!("{t}x{d}x{n}")
}

fn flops((t, d, n): Shape) -> Work {
    Work::Flops(2.0 * (t * d * n) as f64)
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
    let shapes: Vec<Shape> = args.shapes.iter().map(|s| parse_shape(s)).collect::<Result<_>>()?;
    let mut devices = Vec::new();
    let mut lines = Vec::new();
    if args.devices.is_empty() {
        for kind in DeviceKind::ALL {
            match Device::open(kind) {
                Ok(d) => devices.push(d),
                Err(e) => lines.push(format!("skipping {kind}: {e}")),
            }
        }
    } else {
        for kind in args.devices {
            devices.push(Device::open(kind)?);
        }
    }

    let config = LoraMoeConfig::default();
    let mut table = BenchTable::new("lora_moe", "base-gemm");
    table.notes.push(
        "shape TxDxN, B=1, E=2 (low, high), r=8, with bias; CUDA rows bf16 on device-resident inputs, host rows f32 (reference f64) through the host API"
            .into(),
    );
    for device in &devices {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = device {
            if shapes.is_empty() {
                // The host API (bf16, uploads included) at the host backends' shape, beside them.
                let host = LoraMoeTensors::random(1, dims(SMALL), true).cast::<half::bf16>();
                let timing = measure(plan, || host_timed(|| lora_moe(device, &host.inputs(), &config)))?;
                table.rows.push(BenchRow::new(
                    BenchBackend::of(device),
                    label(SMALL),
                    "host-api",
                    timing,
                    flops(SMALL),
                ));
            }
            let chosen = if shapes.is_empty() { SHAPES } else { &shapes };
            cuda_rows(cuda, chosen, &config, plan, &mut table)?;
            continue;
        }
        for &shape in if shapes.is_empty() { &[SMALL][..] } else { &shapes } {
            host_rows(device, shape, &config, plan, &mut table)?;
        }
    }
    if !devices.iter().any(|d| d.kind() == DeviceKind::Cuda) {
        lines.push("skipped the fused / unfused rows of CUDA: they need a CUDA device".into());
    }
    for row in table.rows.iter().filter(|r| r.variant.starts_with("fused")) {
        if let Some(ratio) = table.ratio(row) {
            let emulated = if row.backend.emulated { " (emulated: CPU times, not a GPU figure)" } else { "" };
            lines.push(format!(
                "figure of merit at {} on {}: {} / base-gemm = {ratio:.3}x{emulated}",
                row.shape, row.backend.name, row.variant
            ));
        }
    }
    super::print_table(&table, args.json, &lines);
    Ok(())
}

/// The host rows at one shape: on the cpu the base GEMM and the fused op (f32), on cube the op
/// (f32, uploads included), on the reference the f64 op (3 runs).
fn host_rows(
    device: &Device,
    shape: Shape,
    config: &LoraMoeConfig,
    plan: BenchPlan,
    table: &mut BenchTable,
) -> Result<()> {
    let tensors = LoraMoeTensors::random(1, dims(shape), true);
    let inputs = tensors.inputs();
    let row = |variant: &str, timing: Timing| {
        BenchRow::new(BenchBackend::of(device), label(shape), variant, timing, flops(shape))
    };
    match device {
        Device::Reference => {
            let plan = BenchPlan { warmup: 1, min_runs: 3, max_runs: 3, ..plan };
            table
                .rows
                .push(row("reference-f64", measure(plan, || host_timed(|| reference::lora_moe(&inputs, config)))?));
        }
        Device::Cpu => {
            let bias = inputs.bias;
            let base = measure(plan, || host_timed(|| linear(inputs.x, inputs.weight, bias)))?;
            table.rows.push(row("base-gemm", base));
            table.rows.push(row("fused", measure(plan, || host_timed(|| lora_moe(device, &inputs, config)))?));
        }
        #[allow(unreachable_patterns)] // cube (CUDA never comes here); absent without those features
        _ => table.rows.push(row("host-api", measure(plan, || host_timed(|| lora_moe(device, &inputs, config)))?)),
    }
    Ok(())
}

/// The device-resident CUDA rows: base GEMM, fused and unfused at every shape.
#[cfg(feature = "cuda")]
fn cuda_rows(
    device: &fape_kernels::backend::cuda::CudaDevice,
    shapes: &[Shape],
    config: &LoraMoeConfig,
    plan: BenchPlan,
    table: &mut BenchTable,
) -> Result<()> {
    use fape_kernels::lora_moe::{CudaBenchProblem, CudaVariant};
    for &shape in shapes {
        let mut problem = CudaBenchProblem::new(device, 2, dims(shape), config)?;
        for variant in CudaVariant::ALL {
            let timing = measure(plan, || problem.time(variant, REPS).map(|t| t / REPS as u32))?;
            table.rows.push(BenchRow::new(
                BenchBackend::cuda(device),
                label(shape),
                variant.name(),
                timing,
                flops(shape),
            ));
        }
        problem.synchronize()?;
    }
    Ok(())
}
