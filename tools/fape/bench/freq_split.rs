//! `fape bench freq-split`: the frequency split at the production shapes on every backend asked
//! for, with effective bandwidth (12 bytes per pixel: read `x`, write `low` and `high`) beside
//! the cuFFT-plus-mask baseline measured in the same run.
//!
//! CUDA rows keep `x` and the outputs on the device and time `reps` back-to-back splits
//! between CUDA events (`fape` = this crate's kernels, `cufft+mask` = cuFFT R2C, the mask and
//! energy kernel, cuFFT C2R and a subtraction), then one split per run timed on the host from
//! enqueue to synchronise (`fape host-to-host`, the latents' 10 us bar) and the host time of
//! the enqueue alone (`fape enqueue`; its rate column is not a bandwidth), and the split as one
//! CUDA graph replay (`fape graph`, where the route can be captured). Host backends are timed on the host, and the
//! Cube backend's time includes its transfers (variant `cube+copies`). The CPU skips shapes
//! above `--cpu-max-pixels` (too slow to be useful).

use clap::Args as ClapArgs;
use fape_kernels::bench::{host_timed, measure, BenchBackend, BenchPlan, BenchRow, BenchTable, Work};
use fape_kernels::freq::{freq_split, FreqSplitConfig, MaskKind, OP};
use fape_kernels::testing::{rng, uniform};
use fape_kernels::{Device, DeviceKind, Result, View};

/// The shapes, `[B,C,H,W]`.
const DEFAULT_SHAPES: [[usize; 4]; 4] = [[8, 3, 512, 512], [64, 3, 512, 512], [1, 3, 1024, 1024], [1, 16, 64, 64]];

/// Arguments of this benchmark.
#[derive(ClapArgs)]
pub struct Args {
    /// Backends to run (repeatable) [default: cuda and cpu, those present].
    #[arg(long = "device")]
    devices: Vec<DeviceKind>,
    /// Shapes `BxCxHxW`, comma-separated [default: 8x3x512x512,64x3x512x512,1x3x1024x1024,1x16x64x64].
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
    /// Mask shape.
    #[arg(long, default_value = "hard")]
    mask: MaskKind,
    /// Normalised cutoff radius.
    #[arg(long, default_value_t = 0.15)]
    cutoff: f64,
    /// Minimum measured time per row, milliseconds.
    #[arg(long, default_value_t = 500)]
    min_time_ms: u64,
    /// Exactly this many timed runs per row (after 3 warm-up runs) instead of `--min-time-ms`.
    #[arg(long)]
    runs: Option<usize>,
    /// The CPU backend runs only shapes of at most this many pixels.
    #[arg(long, default_value_t = 1 << 23)]
    cpu_max_pixels: usize,
    /// One JSON object per row instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_shape(s: &str) -> Result<[usize; 4]> {
    match super::parse_dims(s, &[4], "BxCxHxW", "1x3x512x512")?[..] {
        [b, c, h, w] => Ok([b, c, h, w]),
        _ => unreachable!("parse_dims returns 4 dims"),
    }
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// Bad flags, a backend asked for by name that is missing, or an op error.
pub fn run(args: Args) -> Result<()> {
    let shapes: Vec<[usize; 4]> = if args.shapes.is_empty() {
        DEFAULT_SHAPES.to_vec()
    } else {
        args.shapes.iter().map(|s| parse_shape(s)).collect::<Result<_>>()?
    };
    let devices = if args.devices.is_empty() {
        [DeviceKind::Cuda, DeviceKind::Cpu].into_iter().filter_map(|k| Device::open(k).ok()).collect()
    } else {
        args.devices.iter().map(|&k| Device::open(k)).collect::<Result<Vec<_>>>()?
    };
    let config = FreqSplitConfig { cutoff: args.cutoff, mask: args.mask, ..FreqSplitConfig::default() };
    config.validate()?;
    let plan = match args.runs {
        Some(runs) => {
            let runs = runs.max(1);
            BenchPlan { min_runs: runs, max_runs: runs, min_time: std::time::Duration::ZERO, ..BenchPlan::default() }
        }
        None => BenchPlan { min_time: std::time::Duration::from_millis(args.min_time_ms), ..BenchPlan::default() },
    };
    let mut table = BenchTable::new(OP, "cufft+mask");
    table.notes.push(format!(
        "shape BxCxHxW, {} mask, cutoff {}; rate = 12 bytes per pixel (read x, write low and high)",
        config.mask, config.cutoff
    ));
    let mut lines = Vec::new();
    for shape in &shapes {
        let label = format!("{}x{}x{}x{}", shape[0], shape[1], shape[2], shape[3]);
        let len: usize = shape.iter().product();
        let x = uniform(&mut rng(4), len, -1.0, 1.0);
        let view = View::new(OP, "x", &x, shape)?;
        let work = Work::Bytes(12.0 * len as f64);
        for device in &devices {
            let mut push = |variant: &str, timing| {
                table.rows.push(BenchRow::new(BenchBackend::of(device), label.clone(), variant, timing, work))
            };
            match device {
                #[cfg(feature = "cuda")]
                Device::Cuda(d) => {
                    use fape_kernels::freq::{CudaFftPath, CudaSplitBuffers};
                    let mut buffers = CudaSplitBuffers::new(d, view, &config)?;
                    // Enough back-to-back splits per event pair that a run is well above the
                    // event resolution (about 0.5 us).
                    let reps = ((1usize << 24) / len).clamp(1, 200);
                    for (variant, path) in [("cufft+mask", CudaFftPath::Cufft), ("fape", CudaFftPath::Auto)] {
                        push(variant, measure(plan, || buffers.time_runs(d, &config, path, reps))?);
                    }
                    // What a caller waits for per call (enqueue, GPU time, synchronise), and the
                    // host's share of it.
                    let auto = CudaFftPath::Auto;
                    let host_to_host = measure(plan, || {
                        host_timed(|| buffers.run(d, &config, auto).and_then(|()| buffers.synchronize(d)))
                    })?;
                    push("fape host-to-host", host_to_host);
                    push("fape enqueue", measure(plan, || buffers.time_enqueue(d, &config, auto, reps))?);
                    // The repeated call as one graph launch (the tables and plans exist by now).
                    match buffers.capture(d, &config, auto) {
                        Ok(graph) => push("fape graph", measure(plan, || buffers.time_graph(d, &graph, reps))?),
                        Err(e) => lines.push(format!("bench: no `fape graph` row at {label}: {e}")),
                    }
                }
                _ if device.kind() == DeviceKind::Cpu && len > args.cpu_max_pixels => {
                    lines.push(format!(
                        "bench: cpu skips {label} ({len} pixels > --cpu-max-pixels {})",
                        args.cpu_max_pixels
                    ));
                }
                _ => {
                    let variant = if device.kind() == DeviceKind::Cube { "cube+copies" } else { "host" };
                    push(variant, measure(plan, || host_timed(|| freq_split(device, view, &config)))?);
                }
            }
        }
    }
    super::print_table(&table, args.json, &lines);
    Ok(())
}
