//! The shared check cases (the same ones `fape check` runs) on every backend, one test per
//! backend. A missing GPU backend is a printed skip, or a failure under FAPE_NO_SKIP=1.

use fape_kernels::check::{self, CaseSet};
use fape_kernels::testing::device_or_skip;
use fape_kernels::DeviceKind;

fn check_backend(test: &str, kind: DeviceKind) {
    let Some(device) = device_or_skip(test, kind) else {
        return;
    };
    let rows = check::run(&device, CaseSet::Default);
    let compared = rows.iter().filter(|r| matches!(r.outcome, check::Outcome::Compared { .. })).count();
    let failures: Vec<String> = rows.iter().filter(|r| r.failed()).map(|r| r.to_string()).collect();
    for row in &rows {
        eprintln!("{row}");
    }
    assert!(failures.is_empty(), "{test}: {} failing rows:\n{}", failures.len(), failures.join("\n"));
    assert!(compared > 0, "{test}: no case ran a kernel on {kind}");
}

macro_rules! backend_tests {
    ($($name:ident => $kind:expr),* $(,)?) => {
        $(#[test]
        fn $name() {
            check_backend(stringify!($name), $kind);
        })*
    };
}

backend_tests! {
    reference_backend_passes_the_check_cases => DeviceKind::Reference,
    cpu_backend_passes_the_check_cases => DeviceKind::Cpu,
    cube_backend_passes_the_check_cases => DeviceKind::Cube,
}

// CUDA needs a GPU: here it is a printed skip (CI has none, so it is not in FAPE_NO_SKIP's
// reach); on a GPU machine run `fape check --device cuda`.
#[test]
fn cuda_backend_passes_the_check_cases() {
    if std::env::var("FAPE_TEST_CUDA").is_err() {
        eprintln!("SKIP cuda_backend_passes_the_check_cases: set FAPE_TEST_CUDA=1 on a GPU machine");
        return;
    }
    check_backend("cuda_backend_passes_the_check_cases", DeviceKind::Cuda);
}
