//! The shared check cases (the same ones `fape check` runs) on every backend, one test per
//! backend. A missing GPU backend is a printed skip, or a failure under FAPE_NO_SKIP=1 (Cube)
//! or FAPE_TEST_CUDA=1 (CUDA).

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
    // Without a GPU this is a printed skip, a failure only under FAPE_TEST_CUDA=1.
    cuda_backend_passes_the_check_cases => DeviceKind::Cuda,
}
