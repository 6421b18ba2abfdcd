//! `fape devices` and `fape check`.

use std::process::ExitCode;

use clap::Args;
use fape_kernels::backend::{discover, BackendReport};
use fape_kernels::check::{self, CaseSet, CheckOp, HEADER};
use fape_kernels::{Device, DeviceKind, Result};

#[derive(Args)]
pub struct CheckArgs {
    /// Backends to check (repeatable); default: every available one.
    #[arg(long = "device", value_name = "reference|cpu|cube|cuda")]
    devices: Vec<DeviceKind>,
    /// Also run the production shapes (meant for GPUs; minutes on a CPU).
    #[arg(long)]
    large: bool,
    /// Ops to check (repeatable); default: every op.
    #[arg(long = "op", value_name = "lora-moe|freq-split|attention")]
    ops: Vec<CheckOp>,
}

/// Prints what discovery found.
pub fn devices() {
    for BackendReport { kind, devices } in discover() {
        match devices {
            Ok(found) => {
                for line in found {
                    println!("{:<10} available    {line}", kind.name());
                }
            }
            Err(reason) => println!("{:<10} missing      {reason}", kind.name()),
        }
    }
}

/// Runs the check table; exit code 1 when any row fails.
///
/// # Errors
/// A backend named with `--device` that is unavailable.
pub fn run(args: CheckArgs) -> Result<ExitCode> {
    let cases = if args.large { CaseSet::Large } else { CaseSet::Default };
    let ops = if args.ops.is_empty() { CheckOp::ALL.to_vec() } else { args.ops };
    let mut opened = Vec::new();
    if args.devices.is_empty() {
        for kind in DeviceKind::ALL.into_iter().filter(|k| *k != DeviceKind::Reference) {
            match Device::open(kind) {
                Ok(device) => opened.push(device),
                Err(err) => println!("skipping {kind}: {err}"),
            }
        }
    } else {
        for kind in args.devices {
            opened.push(Device::open(kind)?);
        }
    }
    println!("{HEADER}");
    let (mut passed, mut failed, mut not_implemented) = (0usize, 0usize, 0usize);
    for device in opened {
        for row in check::run_ops(&device.poisoned(true), cases, &ops) {
            println!("{row}");
            match (&row.outcome, row.failed()) {
                (check::Outcome::NotImplemented(_), _) => not_implemented += 1,
                (_, true) => failed += 1,
                (_, false) => passed += 1,
            }
        }
    }
    println!("check: {passed} passed, {failed} failed");
    if not_implemented > 0 {
        println!("({not_implemented} op/backend pairs have no kernel yet; see the n/a rows)");
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
