//! `fape bench lora-moe` (issue #3).

use clap::Args as ClapArgs;
use fape_kernels::{FapeError, Result};

/// Arguments of this benchmark.
#[derive(ClapArgs)]
pub struct Args {}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// Always, until issue #3 lands it.
pub fn run(_args: Args) -> Result<()> {
    Err(FapeError::Unsupported { op: "bench", backend: "any", what: "not written yet (issue #3)".into() })
}
