//! `fape check`: every op on a device against its f64 reference, on seeded random inputs of
//! awkward shapes (not tile multiples). Each op contributes its cases from `<op>/check.rs`.

use std::fmt;

use crate::backend::{Device, DeviceKind};
use crate::error::FapeError;
use crate::testing::compare;
use crate::Real;

/// One line of the check table: one output tensor of one op at one shape on one backend.
#[derive(Debug, Clone)]
pub struct CheckRow {
    /// The op and output, such as `freq_split.low`.
    pub op: String,
    /// The backend checked.
    pub backend: DeviceKind,
    /// The input dtype.
    pub dtype: &'static str,
    /// The case's shape, spelled by the op.
    pub shape: String,
    /// What happened.
    pub outcome: Outcome,
}

/// The result of one check.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Compared against the reference.
    Compared {
        /// Relative L2 error.
        rel_l2: f64,
        /// The op's named tolerance for this dtype.
        tolerance: f64,
        /// Worst element (index, got, expected), for the failure message.
        worst: Option<(usize, f64, f64)>,
    },
    /// The backend has no kernel for this op yet; not a failure.
    NotImplemented(String),
    /// The op returned an error.
    Error(String),
}

impl CheckRow {
    /// Whether this row counts as a failure.
    pub fn failed(&self) -> bool {
        match &self.outcome {
            Outcome::Compared { rel_l2, tolerance, .. } => rel_l2.is_nan() || rel_l2 > tolerance,
            Outcome::NotImplemented(_) => false,
            Outcome::Error(_) => true,
        }
    }

    /// A row comparing `got` with `expected` under `tolerance`.
    pub(crate) fn compared<G: Real>(
        op: String,
        device: &Device,
        shape: String,
        got: &[G],
        expected: &[f64],
        tolerance: f64,
    ) -> Self {
        let c = compare(got, expected);
        Self {
            op,
            backend: device.kind(),
            dtype: G::DTYPE,
            shape,
            outcome: Outcome::Compared { rel_l2: c.rel_l2, tolerance, worst: c.worst },
        }
    }

    /// A row for an op that failed with `err` (an unsupported op is not a failure).
    pub(crate) fn errored(op: String, device: &Device, dtype: &'static str, shape: String, err: FapeError) -> Self {
        let outcome = match err {
            FapeError::Unsupported { what, .. } => Outcome::NotImplemented(what),
            other => Outcome::Error(other.to_string()),
        };
        Self { op, backend: device.kind(), dtype, shape, outcome }
    }
}

impl fmt::Display for CheckRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let head = format!("{:<24} {:<9} {:<5} {:<26}", self.op, self.backend.name(), self.dtype, self.shape);
        match &self.outcome {
            Outcome::Compared { rel_l2, tolerance, worst } => {
                write!(f, "{head} {rel_l2:>10.3e} {tolerance:>10.1e} {}", if self.failed() { "FAIL" } else { "pass" })?;
                if let (true, Some((i, g, e))) = (self.failed(), worst) {
                    write!(f, "  (worst index {i}: got {g:e}, expected {e:e})")?;
                }
                Ok(())
            }
            Outcome::NotImplemented(why) => write!(f, "{head} {:>10} {:>10} n/a   ({why})", "-", "-"),
            Outcome::Error(msg) => write!(f, "{head} {:>10} {:>10} FAIL  ({msg})", "-", "-"),
        }
    }
}

/// The table header matching [`CheckRow`]'s `Display`.
pub const HEADER: &str =
    "op                       backend   dtype shape                          rel-L2  tolerance pass";

/// Which cases to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaseSet {
    /// Awkward small and medium shapes: seconds on a CPU.
    Default,
    /// Adds the production shapes (1024 tokens x 3072, 512x512 images, 1536-token attention):
    /// meant for GPUs.
    Large,
}

/// The ops the check table covers, each with its cases in `<op>/check.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOp {
    /// `lora_moe` and `token_lowpass`.
    LoraMoe,
    /// `freq_split` and the band energies.
    FreqSplit,
    /// `attention` (and its naive baseline on CUDA).
    Attention,
}

impl CheckOp {
    /// Every op, in table order.
    pub const ALL: [CheckOp; 3] = [CheckOp::LoraMoe, CheckOp::FreqSplit, CheckOp::Attention];

    /// The op's name on the command line: `lora-moe`, `freq-split`, `attention`.
    pub fn name(self) -> &'static str {
        match self {
            CheckOp::LoraMoe => "lora-moe",
            CheckOp::FreqSplit => "freq-split",
            CheckOp::Attention => "attention",
        }
    }

    fn rows(self, device: &Device, cases: CaseSet) -> Vec<CheckRow> {
        match self {
            CheckOp::LoraMoe => crate::lora_moe::check_rows(device, cases),
            CheckOp::FreqSplit => crate::freq::check_rows(device, cases),
            CheckOp::Attention => crate::attention::check_rows(device, cases),
        }
    }
}

impl std::str::FromStr for CheckOp {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL.into_iter().find(|op| op.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|op| op.name()).collect();
            format!("unknown op `{s}` (expected one of {})", names.join(", "))
        })
    }
}

/// Runs every op's cases on `device` and returns the rows (it never panics on a failing case).
pub fn run(device: &Device, cases: CaseSet) -> Vec<CheckRow> {
    run_ops(device, cases, &CheckOp::ALL)
}

/// Runs the cases of `ops` on `device`, in the order given.
pub fn run_ops(device: &Device, cases: CaseSet, ops: &[CheckOp]) -> Vec<CheckRow> {
    ops.iter().flat_map(|op| op.rows(device, cases)).collect()
}
