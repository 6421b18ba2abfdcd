//! The harness every backend is checked with, shared by the tests, `fape check` and the
//! benchmarks: seeded generators, error measures against the f64 references, and skip rules.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::{Device, DeviceKind};
use crate::error::FapeError;

/// The environment variable that turns a "Vulkan adapter or NVRTC missing" skip into a failure
/// (CI sets it).
pub const NO_SKIP_ENV: &str = "FAPE_NO_SKIP";

/// The environment variable that turns a "no CUDA device" skip into a failure: set it on a GPU
/// machine. (CI has no GPU, so [`NO_SKIP_ENV`] does not reach CUDA devices.)
pub const TEST_CUDA_ENV: &str = "FAPE_TEST_CUDA";

/// A reproducible generator for test inputs.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in `[lo, hi)`. Never all zeros for `lo < hi`.
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// How a backend's output compares to the reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// `||got - expected||_2 / ||expected||_2` (the plain norm of the difference when the
    /// reference is all zeros); infinite when NaNs disagree.
    pub rel_l2: f64,
    /// The element with the largest absolute difference: (index, got, expected).
    pub worst: Option<(usize, f64, f64)>,
    /// The first index where exactly one of got/expected is NaN.
    pub nan_mismatch: Option<usize>,
}

/// Compares `got` with the f64 `expected` (same length). NaN in both places counts as equal.
pub fn compare<G: crate::Real>(got: &[G], expected: &[f64]) -> Comparison {
    assert_eq!(got.len(), expected.len(), "compare: length mismatch");
    let (mut diff2, mut ref2) = (0.0f64, 0.0f64);
    let mut worst: Option<(usize, f64, f64)> = None;
    let mut nan_mismatch = None;
    for (i, (&g, &e)) in got.iter().zip(expected).enumerate() {
        let g = g.to_f64();
        match (g.is_nan(), e.is_nan()) {
            (true, true) => continue,
            (false, false) => {}
            _ => {
                nan_mismatch.get_or_insert(i);
                continue;
            }
        }
        let d = g - e;
        diff2 += d * d;
        ref2 += e * e;
        if worst.is_none_or(|(_, wg, we)| (wg - we).abs() < d.abs()) {
            worst = Some((i, g, e));
        }
    }
    let rel_l2 = if nan_mismatch.is_some() || !diff2.is_finite() {
        f64::INFINITY
    } else if ref2 > 0.0 {
        (diff2 / ref2).sqrt()
    } else {
        diff2.sqrt()
    };
    Comparison { rel_l2, worst, nan_mismatch }
}

/// Panics unless `got` is within rel-L2 `tolerance` of `expected`; the message names `what`
/// and prints the worst index with got, expected and the tolerance.
pub fn assert_close<G: crate::Real>(what: &str, got: &[G], expected: &[f64], tolerance: f64) {
    let c = compare(got, expected);
    if let Some(i) = c.nan_mismatch {
        panic!(
            "{what}: NaN mismatch at index {i}: got {}, expected {} (tolerance rel-L2 {tolerance:e})",
            got[i].to_f64(),
            expected[i]
        );
    }
    if c.rel_l2.is_nan() || c.rel_l2 > tolerance {
        let (i, g, e) = c.worst.unwrap_or((0, f64::NAN, f64::NAN));
        panic!(
            "{what}: rel-L2 {:e} > tolerance {tolerance:e}; worst at index {i}: got {g:e}, expected {e:e}",
            c.rel_l2
        );
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Whether a missing Vulkan adapter or NVRTC must fail instead of skip (`FAPE_NO_SKIP=1`).
pub fn skips_are_failures() -> bool {
    env_flag(NO_SKIP_ENV)
}

/// Opens `kind` for a test, with poisoned outputs. When it is unavailable, prints `SKIP` with
/// the reason and returns `None`; panics instead under `FAPE_NO_SKIP=1` (Cube) or
/// `FAPE_TEST_CUDA=1` (CUDA).
pub fn device_or_skip(test: &str, kind: DeviceKind) -> Option<Device> {
    match Device::open(kind) {
        Ok(d) => Some(d.poisoned(true)),
        Err(err @ FapeError::BackendUnavailable { .. }) => {
            let strict_env = if kind == DeviceKind::Cuda { TEST_CUDA_ENV } else { NO_SKIP_ENV };
            skip_unless(test, &err.to_string(), strict_env);
            None
        }
        Err(err) => panic!("{test}: opening {kind} failed: {err}"),
    }
}

/// Reports a skipped test: prints the reason, or panics under `FAPE_NO_SKIP=1`.
pub fn skip(test: &str, reason: &str) {
    skip_unless(test, reason, NO_SKIP_ENV);
}

fn skip_unless(test: &str, reason: &str, strict_env: &str) {
    if env_flag(strict_env) {
        panic!("{test}: {reason} (and {strict_env} is set, so this skip is a failure)");
    }
    eprintln!("SKIP {test}: {reason}");
}

/// Separates the files of one multi-file fuzz input (the `weights` fuzz target's, and the seeds
/// `tests/hostile_input.rs` writes for it).
pub const FILE_SEPARATOR: &[u8] = b"\n@@FILE@@\n";

/// The parts of `data` between [`FILE_SEPARATOR`]s.
pub fn split_files(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(FILE_SEPARATOR.len()).position(|w| w == FILE_SEPARATOR) {
        parts.push(&rest[..at]);
        rest = &rest[at + FILE_SEPARATOR.len()..];
    }
    parts.push(rest);
    parts
}

/// The files of a `weights` fuzz input, in order: the shard index, then three shards.
pub const MODEL_INPUT_FILES: [&str; 4] =
    [crate::pipeline::weights::INDEX_FILE, "a.safetensors", "b.safetensors", "c.safetensors"];

/// Loads the model folder a `weights` fuzz input describes: writes each of its
/// [`split_files`] parts to `dir/transformer/` under its [`MODEL_INPUT_FILES`] name (an empty
/// or missing part removes that file), opens the folder with
/// [`crate::pipeline::weights::CheckedSafetensors::open`] and reads every tensor it lists, in
/// its stored dtype, on the CPU. Returns how many tensors it read.
///
/// # Errors
/// [`FapeError::File`] when a file cannot be written or removed, or a tensor fails to read;
/// the loader's errors as they are.
pub fn load_model_input(dir: &std::path::Path, data: &[u8]) -> crate::Result<usize> {
    use crate::pipeline::weights::CheckedSafetensors;
    let folder = dir.join("transformer");
    let failed = |path: &std::path::Path, e: &dyn std::fmt::Display| FapeError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(&folder).map_err(|e| failed(&folder, &e))?;
    let parts = split_files(data);
    for (i, name) in MODEL_INPUT_FILES.iter().enumerate() {
        let path = folder.join(name);
        match parts.get(i).filter(|p| !p.is_empty()) {
            Some(bytes) => std::fs::write(&path, bytes).map_err(|e| failed(&path, &e))?,
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(failed(&path, &e)),
                _ => {}
            },
        }
    }
    let model = CheckedSafetensors::open(dir, "transformer")?;
    let specs = model.specs();
    for spec in &specs {
        let dtype = model.dtype_of(&spec.name).unwrap_or(candle_core::DType::F32);
        model
            .tensor(&spec.name, Some(&spec.shape), dtype, &candle_core::Device::Cpu)
            .map_err(|e| failed(&folder, &e))?;
    }
    Ok(specs.len())
}
