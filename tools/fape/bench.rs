//! `fape bench <op>`: the criterion benches' shapes outside criterion, one table per op with
//! every variant beside its baseline from the same run (see [`fape_kernels::bench`]).

mod attention;
mod e2e;
mod freq_split;
mod lora_moe;

use std::process::ExitCode;

use clap::{Args, Subcommand};
use fape_kernels::Result;

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
    /// Flash attention next to the naive baseline; TFLOP/s.
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
