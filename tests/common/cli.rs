//! The `fape` binary as the CLI tests run it: scratch files, a run, and the bad-input rule.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs the `fape` binary built for this test crate with `args`.
pub fn fape(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fape")).args(args).output().expect("fape runs")
}

/// `name` in a scratch folder of this test process (named after the test crate).
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fape-{}-{}", env!("CARGO_CRATE_NAME"), std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir.join(name)
}

/// Asserts exit code 2 and a single stderr line containing every `needle`.
pub fn assert_bad_input(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains("XDG_RUNTIME_DIR")).collect();
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    for needle in needles {
        assert!(lines[0].contains(needle), "`{}` lacks `{needle}`", lines[0]);
    }
}
