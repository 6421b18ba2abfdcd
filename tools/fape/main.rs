//! `fape`: run the FAPE-IR hot-path ops on tensors from safetensors files, list the backends,
//! and check every backend against the f64 references.
//!
//! Exit codes: 0 success, 1 a check failed, 2 bad input or an unavailable backend (one line on
//! stderr naming the tensor, flag or file at fault).

mod batch;
mod bench;
mod check;
mod image_limit;
mod op;
mod plan;
mod restore;
mod split;
mod weights;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for bad input (flags, files, tensors) and unavailable backends.
const EXIT_BAD_INPUT: u8 = 2;

#[derive(Parser)]
#[command(name = "fape", version, about = "FAPE-IR executor kernels: run, list backends, check against the references")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one op on the tensors of a safetensors file and write its outputs.
    Op(op::OpArgs),
    /// List the backends found here and why any is missing.
    Devices,
    /// Run every op on every available backend against the f64 reference.
    Check(check::CheckArgs),
    /// Time an op (or the whole pipeline) beside its baseline from the same run.
    Bench(bench::BenchArgs),
    /// Restore an image or a folder: planner, VAE encode, one transformer step, VAE decode.
    Restore(restore::RestoreArgs),
    /// Write synthetic executor weights (`fape weights synth --preset P --out DIR`).
    Weights(weights::WeightsArgs),
    /// The built-in planner's plan line for an image, with the statistics it read.
    Plan(plan::PlanArgs),
    /// Write an image's low- and high-frequency parts and its spectrum with the cutoff drawn.
    Split(split::SplitArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            if err.use_stderr() {
                let rendered = err.render().to_string();
                let first = rendered.lines().next().unwrap_or("invalid arguments");
                eprintln!("{first} (see `fape --help`)");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
            print!("{err}");
            return ExitCode::SUCCESS;
        }
    };
    let result = match cli.command {
        Command::Op(args) => op::run(args).map(|()| ExitCode::SUCCESS),
        Command::Devices => {
            check::devices();
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => check::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Restore(args) => restore::run(args).map(|()| ExitCode::SUCCESS),
        Command::Weights(args) => weights::run(args).map(|()| ExitCode::SUCCESS),
        Command::Plan(args) => plan::run(args).map(|()| ExitCode::SUCCESS),
        Command::Split(args) => split::run(args).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|err| {
        let message = err.to_string();
        eprintln!("error: {}", message.lines().next().unwrap_or_default());
        ExitCode::from(EXIT_BAD_INPUT)
    })
}
