//! Timing shared by `fape bench` and the criterion benches' summaries: repeated runs of one
//! closure, medians, and a table that puts every row beside a baseline from the same run.
//!
//! A closure returns the time of one run. Host-timed runs use [`host_timed`], which includes the
//! device sync the closure must end with; GPU paths that record CUDA events may return the event
//! time instead (say so in the row's `timer`).

use std::fmt;
use std::time::{Duration, Instant};

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
    /// Floating-point operations: the rate prints as TFLOP/s.
    Flops(f64),
    /// Bytes moved: the rate prints as GB/s.
    Bytes(f64),
}

/// One measured variant at one shape.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// The shape, spelled by the op (rows of equal shape share a baseline).
    pub shape: String,
    /// What ran: `fused`, `unfused`, `base-gemm`, `cufft+mask`, ...
    pub variant: String,
    /// The backend, such as `cuda` or `cpu`.
    pub backend: String,
    /// The timing.
    pub timing: Timing,
    /// The work of one run.
    pub work: Work,
}

impl BenchRow {
    /// TFLOP/s or GB/s at the median time.
    pub fn rate(&self) -> f64 {
        match self.work {
            Work::Flops(f) => f / self.timing.median_s / 1e12,
            Work::Bytes(b) => b / self.timing.median_s / 1e9,
        }
    }

    fn unit(&self) -> &'static str {
        match self.work {
            Work::Flops(_) => "TFLOP/s",
            Work::Bytes(_) => "GB/s",
        }
    }
}

/// Rows of one run, printed with each row's time over its shape's baseline variant.
#[derive(Debug, Clone)]
pub struct BenchTable {
    /// The op benchmarked.
    pub op: String,
    /// The variant other rows are divided by (`ratio` = time / baseline time, same shape).
    pub baseline: String,
    /// The rows, in the order measured.
    pub rows: Vec<BenchRow>,
}

impl BenchTable {
    /// An empty table for `op` whose ratios divide by the `baseline` variant's time.
    pub fn new(op: impl Into<String>, baseline: impl Into<String>) -> Self {
        Self { op: op.into(), baseline: baseline.into(), rows: Vec::new() }
    }

    /// The time of `row` over the baseline variant's time at the same shape, when measured.
    pub fn ratio(&self, row: &BenchRow) -> Option<f64> {
        self.rows
            .iter()
            .find(|b| b.shape == row.shape && b.variant == self.baseline)
            .map(|b| row.timing.median_s / b.timing.median_s)
    }
}

impl fmt::Display for BenchTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: ratio = median time / median time of `{}` at the same shape", self.op, self.baseline)?;
        writeln!(
            f,
            "{:<28} {:<14} {:<8} {:>12} {:>12} {:>6} {:>14} {:>8}",
            "shape", "variant", "backend", "median", "min", "runs", "rate", "ratio"
        )?;
        for row in &self.rows {
            let ratio = self.ratio(row).map_or_else(|| "-".to_string(), |r| format!("{r:.3}x"));
            writeln!(
                f,
                "{:<28} {:<14} {:<8} {:>9.1} us {:>9.1} us {:>6} {:>6.1} {:<7} {:>8}",
                row.shape,
                row.variant,
                row.backend,
                row.timing.median_s * 1e6,
                row.timing.min_s * 1e6,
                row.timing.runs,
                row.rate(),
                row.unit(),
                ratio
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
        let row = |shape: &str, variant: &str, ms: f64| BenchRow {
            shape: shape.into(),
            variant: variant.into(),
            backend: "cpu".into(),
            timing: Timing { median_s: ms * 1e-3, min_s: ms * 1e-3, runs: 1 },
            work: Work::Flops(2e9),
        };
        let mut table = BenchTable::new("op", "base");
        table.rows = vec![row("a", "base", 2.0), row("a", "fused", 3.0), row("b", "fused", 1.0)];
        assert_eq!(table.ratio(&table.rows[1]), Some(1.5));
        assert_eq!(table.ratio(&table.rows[2]), None);
        assert!((table.rows[0].rate() - 1.0).abs() < 1e-12);
        assert!(table.to_string().contains("1.500x"));
    }
}
