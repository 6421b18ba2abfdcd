//! `fape devices` and `fape check`.

use std::process::ExitCode;

use clap::Args;
use fape_kernels::backend::{discover, BackendReport};
use fape_kernels::check::{self, CaseSet, CheckOp, CheckRow, Outcome, HEADER};
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
    let mut tallies = Vec::new();
    for device in opened {
        let (kind, mut tally) = (device.kind(), Tally::default());
        for row in check::run_ops(&device.poisoned(true), cases, &ops) {
            println!("{row}");
            tally.add(&row);
        }
        tallies.push((kind, tally));
    }
    let mut total = Tally::default();
    for (kind, tally) in &tallies {
        println!("{:<10} {tally}", format!("{kind}:"));
        total.merge(tally);
    }
    println!("check: {} passed, {} failed", total.passed, total.failed);
    if total.not_implemented > 0 {
        println!("({} op/backend pairs have no kernel yet; see the n/a rows)", total.not_implemented);
    }
    Ok(if total.failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The rows of one backend (or of all): run, passed, failed, no kernel yet.
#[derive(Debug, Default)]
struct Tally {
    run: usize,
    passed: usize,
    failed: usize,
    not_implemented: usize,
}

impl Tally {
    fn add(&mut self, row: &CheckRow) {
        self.run += 1;
        match (&row.outcome, row.failed()) {
            (Outcome::NotImplemented(_), _) => self.not_implemented += 1,
            (_, true) => self.failed += 1,
            (_, false) => self.passed += 1,
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.run += other.run;
        self.passed += other.passed;
        self.failed += other.failed;
        self.not_implemented += other.not_implemented;
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} rows run, {} passed, {} failed", self.run, self.passed, self.failed)?;
        if self.not_implemented > 0 {
            write!(f, ", {} n/a", self.not_implemented)?;
        }
        Ok(())
    }
}
