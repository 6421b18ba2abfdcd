//! `fape bench <op>`: the criterion benches' shapes outside criterion, one table per op with
//! every variant beside its baseline from the same run (see [`fape_kernels::bench`]); `--json`
//! prints one object per row instead, and notes go to stderr.

mod attention;
mod e2e;
mod freq_split;
mod lora_moe;

use std::process::ExitCode;

use clap::{Args, Subcommand};
use fape_kernels::bench::BenchTable;
use fape_kernels::{FapeError, Result};

/// Arguments of `fape bench`.
#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    op: BenchOp,
}

#[derive(Subcommand)]
enum BenchOp {
    /// Fused LoRA-MoE next to the unfused path and the base GEMM alone.
    LoraMoe(lora_moe::Args),
    /// Frequency split next to the FFT-library baseline; effective bandwidth.
    FreqSplit(freq_split::Args),
    /// Flash attention next to the naive baseline; FLOP/s.
    Attention(attention::Args),
    /// The whole restoration pipeline, per stage, fused next to reference.
    E2e(e2e::Args),
}

/// Runs the benchmark asked for and prints its table.
///
/// # Errors
/// Bad flags, an unavailable device, or an op error.
pub fn run(args: BenchArgs) -> Result<ExitCode> {
    match args.op {
        BenchOp::LoraMoe(a) => lora_moe::run(a),
        BenchOp::FreqSplit(a) => freq_split::run(a),
        BenchOp::Attention(a) => attention::run(a),
        BenchOp::E2e(a) => e2e::run(a),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// Prints `table` (as JSON rows when `json`) and then `lines`: on stdout under a text table,
/// on stderr beside JSON so that stdout stays one object per line.
fn print_table(table: &BenchTable, json: bool, lines: &[String]) {
    print!("{}", table.render(json));
    for line in lines {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

/// The `--shapes` entry `s`: positive integers joined by `x`, as many as one of `ranks`;
/// `spelling` (such as `TxDxN`) and `example` name the form in the error.
///
/// # Errors
/// [`FapeError::Config`] (field `shapes`) naming `s` when it does not parse.
fn parse_dims(s: &str, ranks: &[usize], spelling: &str, example: &str) -> Result<Vec<usize>> {
    let bad = || FapeError::Config {
        op: "bench",
        field: "shapes",
        message: format!("`{s}` is not {spelling} with positive integers (such as {example})"),
    };
    let dims: Vec<usize> = s.split('x').map(|p| p.trim().parse().map_err(|_| bad())).collect::<Result<_>>()?;
    if ranks.contains(&dims.len()) && dims.iter().all(|&d| d > 0) {
        Ok(dims)
    } else {
        Err(bad())
    }
}
