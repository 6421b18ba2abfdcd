//! `fape bench e2e`: the whole restoration pipeline per stage (planner statistics, VAE encode,
//! transformer, VAE decode, and their total), the fused transformer path next to the reference
//! path in the same run, alternating run by run; plus peak memory. A progress bar on stderr
//! (hidden when stderr is not a terminal) shows the runs.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args as ClapArgs;
use fape_kernels::bench::{measure, BenchBackend, BenchPlan, BenchRow, BenchTable, Timing, Work};
use fape_kernels::pipeline::flux::ExecPath;
use fape_kernels::pipeline::restore::{restore, test_scene, PeakMemory, Restored, StageTimings};
use fape_kernels::{FapeError, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::restore::{synthetic_note, PipelineArgs};

/// Side of the generated test scene used when no `--image` is given.
const SCENE_SIDE: usize = 512;

/// The paths compared, baseline first.
const PATHS: [(&str, ExecPath); 2] = [("reference", ExecPath::Reference), ("fused", ExecPath::Fused)];

/// Arguments of this benchmark.
#[derive(ClapArgs)]
pub struct Args {
    /// Pipeline flags; without `--weights` the weights are synthetic (seed 0 unless `--synthetic`).
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Timed runs per path.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Untimed runs per path first (allocations, kernel compilation).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Image to restore instead of the generated 512x512 test scene.
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// One JSON object per row instead of the table (the other lines go to stderr).
    #[arg(long)]
    json: bool,
}

/// The stage times of the timed runs of one path: one list per stage, then the totals.
#[derive(Default)]
struct Samples {
    stages: [Vec<Duration>; 4],
    total: Vec<Duration>,
}

impl Samples {
    fn push(&mut self, timings: &StageTimings) {
        for (list, (_, time)) in self.stages.iter_mut().zip(timings.stages()) {
            list.push(time);
        }
        self.total.push(timings.total());
    }
}

/// Median and minimum of recorded times (through [`measure`], which only replays them).
fn timing(times: &[Duration]) -> Result<Timing> {
    let mut replay = times.iter().copied();
    let n = times.len();
    measure(BenchPlan { warmup: 0, min_runs: n, min_time: Duration::ZERO, max_runs: n }, || {
        Ok(replay.next().unwrap_or_default())
    })
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// Bad flags, an unreadable `--image`, missing weights, an unavailable device, a pipeline error.
pub fn run(args: Args) -> Result<()> {
    if args.runs == 0 {
        return Err(FapeError::Config { op: "bench e2e", field: "runs", message: "must be at least 1".into() });
    }
    let pipeline = args.pipeline.load(true)?;
    let image = match &args.image {
        Some(path) => args.pipeline.images.load(path)?,
        None => test_scene(SCENE_SIDE, SCENE_SIDE, 0),
    };
    let rounds = args.warmup + args.runs;
    let bar = ProgressBar::new((rounds * PATHS.len()) as u64).with_style(
        ProgressStyle::with_template("e2e [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut samples: [Samples; 2] = Default::default();
    let mut peak = PeakMemory::Unknown;
    let mut last: Option<Restored> = None;
    for round in 0..rounds {
        for ((name, path), samples) in PATHS.iter().zip(samples.iter_mut()) {
            let kind = if round < args.warmup { "warmup" } else { "timed" };
            bar.set_message(format!("{name} ({kind})"));
            let restored = restore(&image, &pipeline, *path)?;
            if round >= args.warmup {
                samples.push(&restored.timings);
            }
            peak = peak.max(restored.peak_memory);
            last = Some(restored);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let Some(last) = last else { return Ok(()) };

    let g = last.geometry;
    let vae = pipeline.vae().config();
    let latent = g.latent(vae.downscale());
    let image_bytes = (3 * g.input.0 * g.input.1 * 4) as f64;
    let latent_bytes = (vae.latent_channels * latent.0 * latent.1 * pipeline.dtype().size_in_bytes()) as f64;
    let work = [
        Work::Bytes(image_bytes),
        Work::Flops(vae.encode_flops(g.padded.0, g.padded.1)),
        Work::Bytes(2.0 * latent_bytes),
        Work::Flops(vae.decode_flops(g.padded.0, g.padded.1)),
    ];
    let mut table = BenchTable::new("e2e", "reference");
    let size = format!("{}x{}", g.input.1, g.input.0);
    let backend = BenchBackend::of_candle(pipeline.device());
    for (s, stage) in StageTimings::NAMES.iter().enumerate() {
        for ((variant, _), samples) in PATHS.iter().zip(&samples) {
            let row = BenchRow::new(
                backend.clone(),
                format!("{stage} {size}"),
                *variant,
                timing(&samples.stages[s])?,
                work[s],
            );
            table.rows.push(row);
        }
    }
    for ((variant, _), samples) in PATHS.iter().zip(&samples) {
        let total = Work::Bytes(2.0 * image_bytes);
        table.rows.push(BenchRow::new(
            backend.clone(),
            format!("total {size}"),
            *variant,
            timing(&samples.total)?,
            total,
        ));
    }
    let mut lines = vec![format!(
        "preset {}, {} {:?}, image {size} -> padded {}x{} -> latent {}x{}x{}; {} timed run(s) per path after {} warmup",
        pipeline.preset(),
        backend.name,
        pipeline.dtype(),
        g.padded.1,
        g.padded.0,
        vae.latent_channels,
        latent.0,
        latent.1,
        args.runs,
        args.warmup
    )];
    lines.push("rates: VAE rows count conv and attention FLOPs; planner, transformer and total rows count only the image or latent bytes in and out, not the model's traffic".into());
    lines.push(format!("plan: {}", last.plan.line()));
    lines.push(peak.to_string());
    lines.extend(synthetic_note(pipeline.weights()));
    super::print_table(&table, args.json, &lines);
    Ok(())
}
