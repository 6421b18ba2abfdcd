//! Timing shared by `fape bench` and the criterion benches' summaries: repeated runs of one
//! closure, medians, and a table that puts every row beside a baseline from the same run.
//!
//! A closure returns the time of one run. Host-timed runs use [`host_timed`], which includes the
//! device sync the closure must end with; GPU paths that record CUDA events may return the event
//! time instead (say so in the row's `timer`).

use std::fmt;
use std::time::{Duration, Instant};

use crate::backend::Device;
use crate::error::Result;

/// How long and how often to run a closure.
#[derive(Debug, Clone, Copy)]
pub struct BenchPlan {
    /// Untimed runs first (compilation, caches, clocks).
    pub warmup: usize,
    /// Timed runs at least.
    pub min_runs: usize,
    /// Keep running until this much time has been measured (or `max_runs`).
    pub min_time: Duration,
    /// Never more runs than this.
    pub max_runs: usize,
}

impl Default for BenchPlan {
    fn default() -> Self {
        Self { warmup: 3, min_runs: 10, min_time: Duration::from_millis(500), max_runs: 1000 }
    }
}

/// Statistics of the timed runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// Median time of one run, seconds.
    pub median_s: f64,
    /// Fastest run, seconds.
    pub min_s: f64,
    /// Number of timed runs.
    pub runs: usize,
}

/// Runs `run` per `plan`; each call returns the duration of one run.
///
/// # Errors
/// The first error `run` returns.
pub fn measure(plan: BenchPlan, mut run: impl FnMut() -> Result<Duration>) -> Result<Timing> {
    for _ in 0..plan.warmup {
        run()?;
    }
    let mut times = Vec::with_capacity(plan.min_runs);
    let mut total = Duration::ZERO;
    while times.len() < plan.max_runs.max(1) && (times.len() < plan.min_runs.max(1) || total < plan.min_time) {
        let t = run()?;
        total += t;
        times.push(t.as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let mid = times.len() / 2;
    let median_s = if times.len() % 2 == 1 { times[mid] } else { 0.5 * (times[mid - 1] + times[mid]) };
    Ok(Timing { median_s, min_s: times[0], runs: times.len() })
}

/// Wall time of `f`, which must return only after its device work is finished.
///
/// # Errors
/// The error `f` returns.
pub fn host_timed<T>(f: impl FnOnce() -> Result<T>) -> Result<Duration> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed())
}

/// What one run of a row does, for its rate column.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Work {
    /// Floating-point operations: the rate prints in FLOP/s (G, T, ... as fits).
    Flops(f64),
    /// Bytes moved: the rate prints in B/s (G, T, ... as fits).
    Bytes(f64),
}

impl Work {
    /// The rate's unit without a prefix.
    fn unit(self) -> &'static str {
        match self {
            Work::Flops(_) => "FLOP/s",
            Work::Bytes(_) => "B/s",
        }
    }

    fn amount(self) -> f64 {
        match self {
            Work::Flops(x) | Work::Bytes(x) => x,
        }
    }
}

/// Where a row ran: the backend's name and whether its times are real device times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchBackend {
    /// The backend, such as `cuda` or `cpu`.
    pub name: String,
    /// The device is the CPU emulator of the CUDA libraries (its name contains
    /// [`crate::backend::EMULATED_DEVICE_MARK`]): its times are not GPU figures.
    pub emulated: bool,
}

impl BenchBackend {
    /// A backend that is what it says (not an emulator).
    pub fn real(name: impl Into<String>) -> Self {
        Self { name: name.into(), emulated: false }
    }

    /// The backend of `device`, emulated when it is a CUDA device whose name carries
    /// [`crate::backend::EMULATED_DEVICE_MARK`].
    pub fn of(device: &Device) -> Self {
        Self { name: device.kind().name().into(), emulated: device.is_emulated() }
    }

    /// The backend of a candle device (the pipeline's): `cpu`, or `cuda`, emulated as in
    /// [`BenchBackend::of`] (known with feature `candle-cuda`).
    pub fn of_candle(device: &candle_core::Device) -> Self {
        #[cfg(feature = "candle-cuda")]
        if let candle_core::Device::Cuda(cuda) = device {
            let handle = crate::backend::cuda::CudaDevice::on_stream(cuda.cuda_stream());
            return Self { name: "cuda".into(), emulated: handle.is_ok_and(|d| d.is_emulated()) };
        }
        Self::real(if device.is_cpu() { "cpu" } else { "cuda" })
    }

    /// The backend of an opened CUDA device (see [`BenchBackend::of`]).
    #[cfg(feature = "cuda")]
    pub fn cuda(device: &crate::backend::cuda::CudaDevice) -> Self {
        Self { name: crate::backend::DeviceKind::Cuda.name().into(), emulated: device.is_emulated() }
    }
}

/// One measured variant at one shape.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// The shape, spelled as the bench's `--shapes` takes it (rows of equal shape share a
    /// baseline).
    pub shape: String,
    /// What ran: `fused`, `unfused`, `base-gemm`, `cufft+mask`, ...
    pub variant: String,
    /// Where it ran.
    pub backend: BenchBackend,
    /// The timing.
    pub timing: Timing,
    /// The work of one run.
    pub work: Work,
}

impl BenchRow {
    /// A row of `variant` at `shape` on `backend`.
    pub fn new(
        backend: BenchBackend,
        shape: impl Into<String>,
        variant: impl Into<String>,
        timing: Timing,
        work: Work,
    ) -> Self {
        Self { shape: shape.into(), variant: variant.into(), backend, timing, work }
    }

    /// FLOP/s or B/s at the median time.
    pub fn rate(&self) -> f64 {
        self.work.amount() / self.timing.median_s
    }
}

/// `seconds` with three significant digits in ns, us, ms or s, whichever keeps the number
/// at least 1 (such as `12.3 ms`, `850 us`, `1.25 s`).
pub fn format_seconds(seconds: f64) -> String {
    let (value, unit) = match seconds.abs() {
        s if s >= 1.0 || s == 0.0 || !s.is_finite() => (seconds, "s"),
        s if s >= 1e-3 => (seconds * 1e3, "ms"),
        s if s >= 1e-6 => (seconds * 1e6, "us"),
        _ => (seconds * 1e9, "ns"),
    };
    format!("{} {unit}", three_digits(value))
}

/// `value` (per second, of `unit` such as `FLOP/s`) with three significant digits and the SI
/// prefix that keeps the number between 1 and 1000 (`312 GFLOP/s`, `1.52 TB/s`).
pub fn format_rate(value: f64, unit: &str) -> String {
    const PREFIXES: [(f64, &str); 6] = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")];
    let (factor, prefix) = PREFIXES.iter().copied().find(|&(f, _)| value.abs() >= f).unwrap_or((1.0, ""));
    format!("{} {prefix}{unit}", three_digits(value / factor))
}

/// Three significant digits, without an exponent, for numbers from 1 to 999.
fn three_digits(value: f64) -> String {
    let decimals = match value.abs() {
        v if v >= 100.0 => 0,
        v if v >= 10.0 => 1,
        _ => 2,
    };
    format!("{value:.decimals$}")
}

/// Rows of one run, printed with each row's time over its shape's baseline variant.
#[derive(Debug, Clone)]
pub struct BenchTable {
    /// The op benchmarked (`lora_moe`, `freq_split`, `attention`, `e2e`).
    pub op: String,
    /// The variant other rows are divided by (`ratio` = time / baseline time, same shape).
    pub baseline: String,
    /// Lines printed under the table's title (what the shapes mean, the config).
    pub notes: Vec<String>,
    /// The rows, in the order measured.
    pub rows: Vec<BenchRow>,
}

impl BenchTable {
    /// An empty table for `op` whose ratios divide by the `baseline` variant's time.
    pub fn new(op: impl Into<String>, baseline: impl Into<String>) -> Self {
        Self { op: op.into(), baseline: baseline.into(), notes: Vec::new(), rows: Vec::new() }
    }

    /// The time of `row` over the baseline variant's time at the same shape, when measured.
    pub fn ratio(&self, row: &BenchRow) -> Option<f64> {
        self.rows
            .iter()
            .find(|b| b.shape == row.shape && b.variant == self.baseline)
            .map(|b| row.timing.median_s / b.timing.median_s)
    }

    /// One JSON object per row, one per line: `op`, `shape`, `variant`, `backend`, `emulated`,
    /// `median_s`, `min_s`, `runs`, `work` and its `work_unit` (`FLOP` or `B`), `rate` (per
    /// second) and `ratio` (over the baseline, `null` without one).
    pub fn json_lines(&self) -> String {
        self.rows
            .iter()
            .map(|row| {
                let work_unit = match row.work {
                    Work::Flops(_) => "FLOP",
                    Work::Bytes(_) => "B",
                };
                let object = serde_json::json!({
                    "op": self.op,
                    "shape": row.shape,
                    "variant": row.variant,
                    "backend": row.backend.name,
                    "emulated": row.backend.emulated,
                    "median_s": row.timing.median_s,
                    "min_s": row.timing.min_s,
                    "runs": row.timing.runs,
                    "work": row.work.amount(),
                    "work_unit": work_unit,
                    "rate": row.rate(),
                    "ratio": self.ratio(row),
                });
                format!("{object}\n")
            })
            .collect()
    }

    /// The table as text, or as [`BenchTable::json_lines`] when `json`.
    pub fn render(&self, json: bool) -> String {
        if json {
            self.json_lines()
        } else {
            self.to_string()
        }
    }
}

impl fmt::Display for BenchTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: ratio = median time / median time of `{}` at the same shape", self.op, self.baseline)?;
        for note in &self.notes {
            writeln!(f, "  {note}")?;
        }
        let shape_width = self.rows.iter().map(|r| r.shape.len()).max().unwrap_or(0).max(5);
        let variant_width = self.rows.iter().map(|r| r.variant.len()).max().unwrap_or(0).max(7);
        writeln!(
            f,
            "{:<shape_width$}  {:<variant_width$}  {:<9} {:>10} {:>10} {:>6} {:>14} {:>8}",
            "shape", "variant", "backend", "median", "min", "runs", "rate", "ratio"
        )?;
        for row in &self.rows {
            let ratio = self.ratio(row).map_or_else(|| "-".to_string(), |r| format!("{r:.3}x"));
            let backend = format!("{}{}", row.backend.name, if row.backend.emulated { "*" } else { "" });
            writeln!(
                f,
                "{:<shape_width$}  {:<variant_width$}  {:<9} {:>10} {:>10} {:>6} {:>14} {:>8}",
                row.shape,
                row.variant,
                backend,
                format_seconds(row.timing.median_s),
                format_seconds(row.timing.min_s),
                row.timing.runs,
                format_rate(row.rate(), row.work.unit()),
                ratio
            )?;
        }
        if self.rows.iter().any(|r| r.backend.emulated) {
            writeln!(
                f,
                "* emulated: these rows ran on the CPU emulator of the CUDA libraries; their times are \
                 CPU times, not GPU figures"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_runs() {
        let mut times = [3u64, 1, 2].into_iter().cycle();
        let plan = BenchPlan { warmup: 0, min_runs: 3, min_time: Duration::ZERO, max_runs: 3 };
        let t = measure(plan, || Ok(Duration::from_millis(times.next().unwrap_or(0)))).expect("measure");
        assert_eq!((t.median_s, t.min_s, t.runs), (0.002, 0.001, 3));
        let mut times = [4u64, 1, 2, 3].into_iter();
        let plan = BenchPlan { min_runs: 4, max_runs: 4, ..plan };
        let t = measure(plan, || Ok(Duration::from_millis(times.next().unwrap_or(0)))).expect("measure");
        assert!((t.median_s - 0.0025).abs() < 1e-12, "median {}", t.median_s);
    }

    #[test]
    fn ratio_divides_by_the_baseline_at_the_same_shape() {
        let row = |shape: &str, variant: &str, ms: f64| {
            let timing = Timing { median_s: ms * 1e-3, min_s: ms * 1e-3, runs: 1 };
            BenchRow::new(BenchBackend::real("cpu"), shape, variant, timing, Work::Flops(2e9))
        };
        let mut table = BenchTable::new("op", "base");
        table.rows = vec![row("a", "base", 2.0), row("a", "fused", 3.0), row("b", "fused", 1.0)];
        assert_eq!(table.ratio(&table.rows[1]), Some(1.5));
        assert_eq!(table.ratio(&table.rows[2]), None);
        assert!((table.rows[0].rate() - 1e12).abs() < 1.0);
        let text = table.to_string();
        assert!(text.contains("1.500x") && text.contains("1.00 TFLOP/s") && text.contains("2.00 ms"), "{text}");
        assert!(!text.contains("emulated"), "{text}");
    }

    #[test]
    fn times_and_rates_pick_their_unit() {
        assert_eq!(format_seconds(2.5e-9), "2.50 ns");
        assert_eq!(format_seconds(850e-6), "850 us");
        assert_eq!(format_seconds(0.0123), "12.3 ms");
        assert_eq!(format_seconds(1.25), "1.25 s");
        assert_eq!(format_rate(3.12e11, "FLOP/s"), "312 GFLOP/s");
        assert_eq!(format_rate(1.52e12, "B/s"), "1.52 TB/s");
        assert_eq!(format_rate(4.2e7, "FLOP/s"), "42.0 MFLOP/s");
        assert_eq!(format_rate(0.5, "B/s"), "0.50 B/s");
    }

    #[test]
    fn emulated_rows_say_so_in_text_and_json() {
        let timing = Timing { median_s: 1e-3, min_s: 1e-3, runs: 3 };
        let mut table = BenchTable::new("op", "base");
        let emulated = BenchBackend { name: "cuda".into(), emulated: true };
        table.rows = vec![
            BenchRow::new(emulated, "1x2", "base", timing, Work::Bytes(1e6)),
            BenchRow::new(BenchBackend::real("cpu"), "1x2", "host", timing, Work::Bytes(1e6)),
        ];
        let text = table.to_string();
        assert!(text.contains("cuda*") && text.contains("not GPU figures"), "{text}");
        let rows: Vec<serde_json::Value> =
            table.json_lines().lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["emulated"], true);
        assert_eq!(rows[1]["emulated"], false);
        for (key, value) in [("op", "op"), ("shape", "1x2"), ("variant", "host"), ("backend", "cpu")] {
            assert_eq!(rows[1][key], value, "{key}");
        }
        assert_eq!((rows[1]["median_s"].as_f64(), rows[1]["runs"].as_u64()), (Some(1e-3), Some(3)));
        assert_eq!(rows[1]["ratio"].as_f64(), Some(1.0));
    }
}
