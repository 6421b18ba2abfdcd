//! The CPU emulator of the CUDA libraries (tools/cuda-emu) is able to fail: copies of the
//! shipped kernels with planted bugs run through `fape check --device cuda` on it (via
//! `FAPE_CUDA_KERNEL_DIR`), and each bug is caught by the check itself or by the checker made
//! for it. The shipped kernels pass the same runs, so every failure is the planted bug's.
//!
//! A last test runs the C++ test of the cuBLAS, cuBLASLt and cuFFT stand-ins.
//!
//! The test builds the emulator itself (tools/cuda-emu/build.sh into target/cuda-emu); it skips
//! with a printed reason when there is no C++ compiler, and fails then under FAPE_NO_SKIP=1.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use fape_kernels::testing::skip;

const FAPE: &str = env!("CARGO_BIN_EXE_fape");
const KERNELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");

/// The emulator's library directory, built once per process if needed; `None` (after a
/// printed skip) when the build cannot run.
fn emulator(test: &str) -> Option<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out =
            std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from).join("cuda-emu");
        match Command::new("bash").arg(root.join("tools/cuda-emu/build.sh")).arg(&out).status() {
            Ok(s) if s.success() => Ok(out),
            Ok(s) => panic!("tools/cuda-emu/build.sh failed ({s})"),
            Err(e) => Err(format!("cannot run tools/cuda-emu/build.sh: {e}")),
        }
    });
    match built {
        Ok(dir) => Some(dir.clone()),
        Err(reason) => {
            skip(test, reason);
            None
        }
    }
}

/// A directory holding `file` (from kernels/) with `from` replaced by `to`; `from` must occur
/// exactly once, so that the test notices when the kernel it plants into changes.
fn planted(name: &str, file: &str, from: &str, to: &str) -> PathBuf {
    let source = std::fs::read_to_string(Path::new(KERNELS).join(file)).expect("read kernel");
    assert_eq!(source.matches(from).count(), 1, "{name}: `{from}` must occur once in kernels/{file}");
    let dir = std::env::temp_dir().join(format!("fape-planted-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join(file), source.replace(from, to)).expect("write planted kernel");
    dir
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `fape check --device cuda --op OP` on the emulator at `lib`, with `kernels` replacing the
/// shipped sources when given, under `sanitizer` (`""`: none).
fn check(lib: &Path, op: &str, kernels: Option<&Path>, sanitizer: &str) -> Run {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = if sanitizer.is_empty() {
        Command::new(FAPE)
    } else {
        let mut c = Command::new(root.join("tools/cuda-emu/sanitize"));
        c.args([sanitizer, "--", FAPE]);
        c
    };
    cmd.args(["check", "--device", "cuda", "--op", op]);
    let path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    cmd.env("LD_LIBRARY_PATH", format!("{}:{path}", lib.display()));
    cmd.env("FAPE_CUDA_EMU_DIR", lib);
    match kernels {
        Some(dir) => cmd.env("FAPE_CUDA_KERNEL_DIR", dir),
        None => cmd.env_remove("FAPE_CUDA_KERNEL_DIR"),
    };
    let out = cmd.output().expect("run fape");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts the shipped kernels pass `op` under `sanitizer`, then that the planted copy fails,
/// with `evidence` in its output.
fn caught(test: &str, op: &str, kernels: &Path, sanitizer: &str, evidence: &str) {
    let Some(lib) = emulator(test) else { return };
    let clean = check(&lib, op, None, sanitizer);
    assert_eq!(
        clean.code,
        Some(0),
        "{test}: the shipped kernels must pass `check --op {op}` under `{sanitizer}`:\n{}\n{}",
        clean.stdout,
        clean.stderr
    );
    let bad = check(&lib, op, Some(kernels), sanitizer);
    let all = format!("{}\n{}", bad.stdout, bad.stderr);
    assert_ne!(bad.code, Some(0), "{test}: the planted bug went unnoticed:\n{all}");
    assert!(all.contains(evidence), "{test}: expected `{evidence}` in the output:\n{all}");
    let _ = std::fs::remove_dir_all(kernels);
}

#[test]
fn a_wrong_ldmatrix_row_address_fails_the_check() {
    // Q fragments from rows lane % 8 instead of lane % 16: half the rows of every tile are wrong.
    let dir = planted(
        "ldmatrix",
        "attention.cu",
        "return s_q + (warp * WARP_ROWS + mt * 16 + (lane & 15)) * STRIDE",
        "return s_q + (warp * WARP_ROWS + mt * 16 + (lane & 7)) * STRIDE",
    );
    caught("a_wrong_ldmatrix_row_address_fails_the_check", "attention", &dir, "", "FAIL");
}

#[test]
fn a_missing_syncthreads_is_a_racecheck_hazard() {
    // Without the barrier at the end of an iteration, the next tile's cp.async overwrites a K/V
    // buffer other warps may still read.
    let dir = planted(
        "barrier",
        "attention.cu",
        "        __syncthreads();  // every warp is done with buffer buf before iteration j+1 refills it",
        "",
    );
    caught("a_missing_syncthreads_is_a_racecheck_hazard", "attention", &dir, "racecheck", "WAR hazard");
}

#[test]
fn a_tile_bound_off_by_one_is_a_memcheck_error() {
    // K/V rows up to and including Lk are fetched: the row past the last head is outside v.
    let dir = planted(
        "bound",
        "attention.cu",
        "const bool valid = row0 + r < limit;",
        "const bool valid = row0 + r <= limit;",
    );
    caught("a_tile_bound_off_by_one_is_a_memcheck_error", "attention", &dir, "memcheck", "fape-cuda-emu memcheck");
}

#[test]
fn a_barrier_in_divergent_code_is_a_synccheck_error() {
    // The block reduction's first barrier reached by half of warp 0 only.
    let dir = planted(
        "divergent",
        "attention.cu",
        "    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;\n    __syncthreads();",
        "    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;\n    if (threadIdx.x < 16) __syncthreads();",
    );
    caught("a_barrier_in_divergent_code_is_a_synccheck_error", "attention", &dir, "", "synccheck");
}

#[test]
fn the_math_library_stand_ins_match_naive_loops() {
    // tools/cuda-emu/tests/mathlib_test.cpp: cuBLAS, cuBLASLt and cuFFT stand-ins against f64
    // loops, their refusals, and their initcheck/memcheck reports; built here with g++.
    let test = "the_math_library_stand_ins_match_naive_loops";
    let emu = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/cuda-emu");
    let exe = std::env::temp_dir().join(format!("fape-mathlib-test-{}", std::process::id()));
    let mut build = Command::new(std::env::var("CXX").unwrap_or_else(|_| "g++".into()));
    build.args(["-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-I"]).arg(emu.join("include"));
    for src in ["src/memory.cpp", "src/cublas.cpp", "src/cublaslt.cpp", "src/cufft.cpp", "tests/mathlib_test.cpp"] {
        build.arg(emu.join(src));
    }
    match build.arg("-o").arg(&exe).status() {
        Ok(s) => assert!(s.success(), "{test}: building mathlib_test failed"),
        Err(e) => return skip(test, &format!("no C++ compiler: {e}")),
    }
    let out = Command::new(&exe).env_remove("FAPE_CUDA_EMU_SANITIZER").output().expect("run mathlib_test");
    let _ = std::fs::remove_file(&exe);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{test}: mathlib_test failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(" 0 failed"), "{test}: unexpected summary:\n{text}");
}
