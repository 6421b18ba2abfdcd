//! `fape bench attention`: the CUDA flash kernel beside the naive cuBLAS baseline (bf16, device-
//! resident inputs, timed to a stream sync) at FLUX's shapes, plus every backend at a small shape.
//! TFLOP/s counts 4 B H Lq Lk D.

use clap::Args as ClapArgs;
#[cfg(feature = "cuda")]
use fape_kernels::attention::CudaAttention;
use fape_kernels::attention::{attention_typed, rope_tables, AttentionConfig, AttentionElement, AttentionInputs, OP};
use fape_kernels::bench::{host_timed, measure, BenchPlan, BenchRow, BenchTable, Work};
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
}

/// `(B, H, L, D)` of the CUDA rows: FLUX at 512 px and 1024 px, and a batch of four at 512 px.
#[cfg(feature = "cuda")]
const CUDA_SHAPES: [(usize, usize, usize, usize); 3] = [(1, 24, 1536, 128), (1, 24, 4608, 128), (4, 24, 1536, 128)];

/// `(B, H, L, D)` where every backend runs (the host ones in f32).
const SMALL_SHAPE: (usize, usize, usize, usize) = (1, 4, 512, 128);

/// Owned inputs of one shape: random `q`, `k`, `v`, norm weights and FLUX RoPE tables.
struct Inputs<T> {
    shape: [usize; 4],
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    norm: Vec<T>,
    cos: Tensor<T>,
    sin: Tensor<T>,
}

impl<T: AttentionElement> Inputs<T> {
    fn generate((b, h, l, d): (usize, usize, usize, usize), seed: u64) -> Result<Self> {
        let mut g = rng(seed);
        let mut random = |n: usize, lo: f32, hi: f32| -> Vec<T> {
            uniform(&mut g, n, lo, hi).into_iter().map(|x| T::from_f64(f64::from(x))).collect()
        };
        let n = b * h * l * d;
        let (q, k, v) = (random(n, -1.0, 1.0), random(n, -1.0, 1.0), random(n, -1.0, 1.0));
        let norm = random(d, 0.5, 1.5);
        let (cos, sin) = rope_tables(l, d)?;
        let narrow = |t: Tensor<f32>| t.map(|&x| T::from_f64(f64::from(x)));
        Ok(Self { shape: [b, h, l, d], q, k, v, norm, cos: narrow(cos), sin: narrow(sin) })
    }

    /// The inputs, with the norm weights (for both q and k) and RoPE when `extras`.
    fn view(&self, extras: bool) -> Result<AttentionInputs<'_, T>> {
        let inputs = AttentionInputs::new(
            View::new(OP, "q", &self.q, &self.shape)?,
            View::new(OP, "k", &self.k, &self.shape)?,
            View::new(OP, "v", &self.v, &self.shape)?,
        );
        if !extras {
            return Ok(inputs);
        }
        let norm_shape = &self.shape[3..];
        let norm = View::new(OP, "q_norm", &self.norm, norm_shape)?;
        Ok(inputs.with_norms(norm, norm).with_rope(self.cos.view(), self.sin.view()))
    }

    fn spelling(&self) -> String {
        let [b, h, l, d] = self.shape;
        format!("B{b} H{h} L{l} D{d}")
    }

    fn flops(&self) -> f64 {
        let [b, h, l, d] = self.shape;
        4.0 * (b * h * l * l * d) as f64
    }
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// An op error on a backend that is present (an absent backend only prints a note).
pub fn run(args: Args) -> Result<()> {
    let mut table = BenchTable::new(OP, "naive");
    let plan = BenchPlan::default();
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
                for (i, &shape) in small.iter().chain(&CUDA_SHAPES).enumerate() {
                    let inputs = Inputs::<bf16>::generate(shape, 50 + i as u64)?;
                    cuda_rows(cuda, &inputs, plan, &mut table)?;
                }
            }
            _ => host_row(&device, &Inputs::<f32>::generate(SMALL_SHAPE, 50)?, plan, &mut table)?,
        }
    }
    println!("{table}");
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
        table.rows.push(BenchRow {
            shape: inputs.spelling(),
            variant: variant.into(),
            backend: "cuda".into(),
            timing,
            work: Work::Flops(inputs.flops()),
        })
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

/// One host backend (f32) at the small shape, with norms and RoPE.
fn host_row(device: &Device, inputs: &Inputs<f32>, plan: BenchPlan, table: &mut BenchTable) -> Result<()> {
    let config = AttentionConfig::default();
    let view = inputs.view(true)?;
    let plan = BenchPlan { warmup: 1, min_runs: 3, ..plan };
    let timing = match measure(plan, || host_timed(|| attention_typed(device, &view, &config))) {
        Err(FapeError::Unsupported { what, .. }) => {
            eprintln!("{}: skipped ({what})", device.kind());
            return Ok(());
        }
        other => other?,
    };
    table.rows.push(BenchRow {
        shape: inputs.spelling(),
        variant: "f32+norm+rope".into(),
        backend: device.kind().name().into(),
        timing,
        work: Work::Flops(inputs.flops()),
    });
    Ok(())
}
