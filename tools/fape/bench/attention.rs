//! `fape bench attention`: the CUDA flash kernel beside the naive cuBLAS baseline (bf16, device-
//! resident inputs, timed to a stream sync) at FLUX's shapes, plus every backend at a small shape
//! (f32, with RMSNorm and RoPE); `--shapes` runs every backend at the shapes given.
//! The rate counts 4 B H Lq Lk D FLOPs.

use std::time::Duration;

use clap::Args as ClapArgs;
#[cfg(feature = "cuda")]
use fape_kernels::attention::CudaAttention;
use fape_kernels::attention::{attention_typed, rope_tables, AttentionConfig, AttentionElement, AttentionInputs, OP};
use fape_kernels::bench::{host_timed, measure, BenchBackend, BenchPlan, BenchRow, BenchTable, Work};
#[cfg(feature = "cuda")]
use fape_kernels::testing::compare;
use fape_kernels::testing::{rng, uniform};
use fape_kernels::{Device, DeviceKind, FapeError, Result, Tensor, View};
#[cfg(feature = "cuda")]
use half::bf16;

/// Arguments of this benchmark.
#[derive(ClapArgs)]
pub struct Args {
    /// Backends to run (repeatable) [default: cuda, cpu and cube, those present]. CUDA runs
    /// FLUX's shapes (and the small one when a host backend is asked for too); the host backends
    /// run the small shape.
    #[arg(long = "device")]
    devices: Vec<DeviceKind>,
    /// Shapes `BxHxLqxLkxD` (or `BxHxLxD`), comma-separated, run on every backend asked for
    /// [default: CUDA 1x24x1536x1536x128,1x24x4608x4608x128,4x24x1536x1536x128 beside the host
    /// backends' 1x4x512x512x128].
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
    /// Timed runs per row (after the warm-up runs) [default: at least 3 and 0.5 s on the host,
    /// at least 10 on CUDA].
    #[arg(long)]
    runs: Option<usize>,
    /// One JSON object per row instead of the table.
    #[arg(long)]
    json: bool,
}

/// `[B, H, Lq, Lk, D]`.
type Shape = [usize; 5];

/// The CUDA rows: FLUX at 512 px and 1024 px, and a batch of four at 512 px.
#[cfg(feature = "cuda")]
const CUDA_SHAPES: [Shape; 3] = [[1, 24, 1536, 1536, 128], [1, 24, 4608, 4608, 128], [4, 24, 1536, 1536, 128]];

/// Where every backend runs (the host ones in f32).
const SMALL_SHAPE: Shape = [1, 4, 512, 512, 128];

/// The `--shapes` entry `s`: `BxHxLqxLkxD`, or `BxHxLxD` for `Lq = Lk`.
fn parse_shape(s: &str) -> Result<Shape> {
    match super::parse_dims(s, &[4, 5], "BxHxLqxLkxD (or BxHxLxD)", "1x24x1536x1536x128")?[..] {
        [b, h, l, d] => Ok([b, h, l, l, d]),
        [b, h, lq, lk, d] => Ok([b, h, lq, lk, d]),
        _ => unreachable!("parse_dims returns 4 or 5 dims"),
    }
}

/// Owned inputs of one shape: random `q`, `k`, `v`, norm weights and FLUX RoPE tables.
struct Inputs<T> {
    shape: Shape,
    /// `[B,H,Lq,D]` and `[B,H,Lk,D]`.
    q_shape: [usize; 4],
    kv_shape: [usize; 4],
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    norm: Vec<T>,
    cos: Tensor<T>,
    sin: Tensor<T>,
}

impl<T: AttentionElement> Inputs<T> {
    fn generate(shape: Shape, seed: u64) -> Result<Self> {
        let [b, h, lq, lk, d] = shape;
        let mut g = rng(seed);
        let mut random = |n: usize, lo: f32, hi: f32| -> Vec<T> {
            uniform(&mut g, n, lo, hi).into_iter().map(|x| T::from_f64(f64::from(x))).collect()
        };
        let q = random(b * h * lq * d, -1.0, 1.0);
        let (k, v) = (random(b * h * lk * d, -1.0, 1.0), random(b * h * lk * d, -1.0, 1.0));
        let norm = random(d, 0.5, 1.5);
        let (cos, sin) = rope_tables(lq.max(lk), d)?;
        let narrow = |t: Tensor<f32>| t.map(|&x| T::from_f64(f64::from(x)));
        let (q_shape, kv_shape) = ([b, h, lq, d], [b, h, lk, d]);
        Ok(Self { shape, q_shape, kv_shape, q, k, v, norm, cos: narrow(cos), sin: narrow(sin) })
    }

    /// The inputs, with the norm weights (for both q and k) and RoPE when `extras`.
    fn view(&self, extras: bool) -> Result<AttentionInputs<'_, T>> {
        let inputs = AttentionInputs::new(
            View::new(OP, "q", &self.q, &self.q_shape)?,
            View::new(OP, "k", &self.k, &self.kv_shape)?,
            View::new(OP, "v", &self.v, &self.kv_shape)?,
        );
        if !extras {
            return Ok(inputs);
        }
        let norm_shape = &self.shape[4..];
        let norm = View::new(OP, "q_norm", &self.norm, norm_shape)?;
        Ok(inputs.with_norms(norm, norm).with_rope(self.cos.view(), self.sin.view()))
    }

    fn spelling(&self) -> String {
        let [b, h, lq, lk, d] = self.shape;
        format!("{b}x{h}x{lq}x{lk}x{d}")
    }

    fn flops(&self) -> f64 {
        let [b, h, lq, lk, d] = self.shape;
        4.0 * (b * h * lq * lk * d) as f64
    }
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// An op error on a backend that is present (an absent backend only prints a note).
pub fn run(args: Args) -> Result<()> {
    let shapes: Vec<Shape> = args.shapes.iter().map(|s| parse_shape(s)).collect::<Result<_>>()?;
    let mut table = BenchTable::new(OP, "naive");
    table
        .notes
        .push("shape BxHxLqxLkxD; CUDA rows bf16 on device-resident inputs, host rows f32 through the host API".into());
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))] // `plan` times the CUDA rows
    let (plan, host_plan) = match args.runs {
        Some(runs) => {
            let exact = BenchPlan {
                min_runs: runs.max(1),
                max_runs: runs.max(1),
                min_time: Duration::ZERO,
                ..BenchPlan::default()
            };
            (exact, exact)
        }
        None => (BenchPlan::default(), BenchPlan { warmup: 1, min_runs: 3, ..BenchPlan::default() }),
    };
    let explicit = !args.devices.is_empty();
    let kinds = if explicit { args.devices } else { vec![DeviceKind::Cuda, DeviceKind::Cpu, DeviceKind::Cube] };
    #[cfg(feature = "cuda")]
    let host_rows = kinds.iter().any(|&k| k != DeviceKind::Cuda);
    for kind in kinds {
        let device = match Device::open(kind) {
            Ok(device) => device,
            Err(err) if !explicit => {
                eprintln!("{kind}: skipped ({err})");
                continue;
            }
            Err(err) => return Err(err),
        };
        match &device {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                eprintln!("cuda: {}", cuda.info());
                // The small shape too when a host backend runs it, for a same-shape comparison.
                let small = host_rows.then_some(SMALL_SHAPE);
                let defaults: Vec<Shape> = small.iter().chain(&CUDA_SHAPES).copied().collect();
                let chosen = if shapes.is_empty() { &defaults } else { &shapes };
                for (i, &shape) in chosen.iter().enumerate() {
                    let inputs = Inputs::<bf16>::generate(shape, 50 + i as u64)?;
                    cuda_rows(cuda, &inputs, plan, &mut table)?;
                }
            }
            _ => {
                let chosen = if shapes.is_empty() { &[SMALL_SHAPE][..] } else { &shapes };
                for (i, &shape) in chosen.iter().enumerate() {
                    host_row(&device, &Inputs::<f32>::generate(shape, 50 + i as u64)?, host_plan, &mut table)?;
                }
            }
        }
    }
    super::print_table(&table, args.json, &[]);
    Ok(())
}

#[cfg(feature = "cuda")]
/// The naive baseline, the flash kernel, and the flash kernel with QK-RMSNorm and RoPE (its
/// pre-pass included), bf16 on the device, each timed to a stream sync; then the flash output
/// is compared with the naive one (a sanity line on stderr).
fn cuda_rows(
    cuda: &fape_kernels::backend::cuda::CudaDevice,
    inputs: &Inputs<bf16>,
    plan: BenchPlan,
    table: &mut BenchTable,
) -> Result<()> {
    let config = AttentionConfig::default();
    let mut plain = CudaAttention::new(cuda, &inputs.view(false)?, &config)?;
    let mut extras = CudaAttention::new(cuda, &inputs.view(true)?, &config)?;
    let mut push = |variant: &str, timing| {
        let work = Work::Flops(inputs.flops());
        table.rows.push(BenchRow::new(BenchBackend::cuda(cuda), inputs.spelling(), variant, timing, work))
    };
    let naive = match measure(plan, || host_timed(|| plain.naive().and_then(|()| plain.synchronize()))) {
        Err(FapeError::BackendUnavailable { reason, .. }) => {
            eprintln!("naive baseline skipped: {reason}");
            None
        }
        other => Some(other?),
    };
    if let Some(timing) = naive {
        push("naive", timing);
    }
    push("flash", measure(plan, || host_timed(|| plain.flash().and_then(|()| plain.synchronize())))?);
    push("flash+norm+rope", measure(plan, || host_timed(|| extras.flash().and_then(|()| extras.synchronize())))?);

    if naive.is_some() {
        plain.naive()?;
        let naive_out = plain.output()?;
        plain.flash()?;
        let flash_out = plain.output()?;
        let naive_f64: Vec<f64> = naive_out.data.iter().map(|x| x.to_f64()).collect();
        let c = compare(&flash_out.data, &naive_f64);
        eprintln!("{}: flash vs naive (bf16) rel-L2 {:.3e}", inputs.spelling(), c.rel_l2);
    }
    Ok(())
}

/// One host backend (f32) at one shape, with norms and RoPE.
fn host_row(device: &Device, inputs: &Inputs<f32>, plan: BenchPlan, table: &mut BenchTable) -> Result<()> {
    let config = AttentionConfig::default();
    let view = inputs.view(true)?;
    let timing = match measure(plan, || host_timed(|| attention_typed(device, &view, &config))) {
        Err(FapeError::Unsupported { what, .. }) => {
            eprintln!("{}: skipped ({what})", device.kind());
            return Ok(());
        }
        other => other?,
    };
    let work = Work::Flops(inputs.flops());
    table.rows.push(BenchRow::new(BenchBackend::of(device), inputs.spelling(), "f32+norm+rope", timing, work));
    Ok(())
}
