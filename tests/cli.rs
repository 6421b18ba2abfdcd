//! The `fape` command as a user meets it: `fape op` on safetensors files, and bad input giving
//! exit code 2 with one line naming what is at fault.

use std::path::Path;

use fape_kernels::io::{self, TensorFile};
use fape_kernels::lora_moe::{reference, Band, LoraMoeConfig, LoraMoeInputs, TOLERANCE_F32};
use fape_kernels::testing::{assert_close, rng, uniform};
use fape_kernels::{Tensor, View};

mod common;
use common::cli::{assert_bad_input, fape, scratch};

fn write(path: &Path, tensors: &[(&str, Tensor<f32>)]) {
    let refs: Vec<(&str, &Tensor<f32>)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    io::write(path, &refs).unwrap();
}

fn random(seed: u64, shape: &[usize]) -> Tensor<f32> {
    Tensor::new(uniform(&mut rng(seed), shape.iter().product(), -1.0, 1.0), shape.to_vec()).unwrap()
}

fn lora_inputs() -> Vec<(&'static str, Tensor<f32>)> {
    vec![
        ("x", random(1, &[2, 11, 16])),
        ("weight", random(2, &[12, 16])),
        ("bias", random(3, &[12])),
        ("lora_a", random(4, &[2, 4, 16])),
        ("lora_b", random(5, &[2, 12, 4])),
        ("router", random(6, &[2, 16])),
    ]
}

#[test]
fn op_lora_moe_writes_outputs_matching_the_reference() {
    let (input, output) = (scratch("lora_in.safetensors"), scratch("lora_out.safetensors"));
    let tensors = lora_inputs();
    write(&input, &tensors);
    let out = fape(&[
        "op",
        "lora-moe",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--top-k",
        "1",
        "--bands",
        "low,full",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let get = |name: &str| &tensors.iter().find(|(n, _)| *n == name).unwrap().1;
    let view = |name: &'static str| View::new("t", name, &get(name).data, &get(name).shape).unwrap();
    let inputs = LoraMoeInputs {
        x: view("x"),
        weight: view("weight"),
        bias: Some(view("bias")),
        lora_a: view("lora_a"),
        lora_b: view("lora_b"),
        router: view("router"),
        guidance: None,
    };
    let cfg = LoraMoeConfig { bands: vec![Band::Low, Band::Full], top_k: 1, ..LoraMoeConfig::default() };
    let expected = reference::lora_moe(&inputs, &cfg).unwrap();
    let written = TensorFile::read(&output).unwrap();
    let y = written.require("t", "y").unwrap();
    assert_eq!(y.shape(), &[2, 11, 12]);
    assert_close("y", y.data(), &expected.y.data, TOLERANCE_F32);
    assert_close("gates", written.require("t", "gates").unwrap().data(), &expected.gates.data, TOLERANCE_F32);
}

#[test]
fn op_reads_bf16_inputs() {
    let (input, output) = (scratch("bf16_in.safetensors"), scratch("bf16_out.safetensors"));
    let x = random(9, &[1, 2, 5, 6]);
    let bf16: Vec<u8> = x.data.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, x.shape.clone(), &bf16).unwrap();
    safetensors::serialize_to_file([("x", view)], None, &input).unwrap();
    let out = fape(&[
        "op",
        "freq-split",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--device",
        "reference",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written = TensorFile::read(&output).unwrap();
    let (low, high) = (written.require("t", "low").unwrap(), written.require("t", "high").unwrap());
    let rounded: Vec<f64> = x.data.iter().map(|&v| half::bf16::from_f32(v).to_f64()).collect();
    let sum: Vec<f32> = low.data().iter().zip(high.data()).map(|(a, b)| a + b).collect();
    assert_close("low + high", &sum, &rounded, 1e-6);
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let good = scratch("good.safetensors");
    write(&good, &lora_inputs());
    let good = good.to_str().unwrap();
    let out_path = scratch("unused.safetensors");
    let out_arg = out_path.to_str().unwrap();

    // A missing tensor.
    let missing = scratch("missing.safetensors");
    write(&missing, &lora_inputs()[1..]);
    assert_bad_input(
        &fape(&["op", "lora-moe", "--input", missing.to_str().unwrap(), "--output", out_arg]),
        &["`x`", "missing"],
    );
    // Wrong rank.
    let rank = scratch("rank.safetensors");
    write(&rank, &[("x", random(1, &[3, 4]))]);
    assert_bad_input(
        &fape(&["op", "freq-split", "--input", rank.to_str().unwrap(), "--output", out_arg]),
        &["`x`", "[3, 4]"],
    );
    // Mismatched shapes between tensors.
    let mut mismatched = lora_inputs();
    mismatched[4].1 = random(5, &[2, 12, 3]);
    let mm = scratch("mismatch.safetensors");
    write(&mm, &mismatched);
    assert_bad_input(
        &fape(&["op", "lora-moe", "--input", mm.to_str().unwrap(), "--output", out_arg]),
        &["lora_b", "[2, 12, 3]"],
    );
    // Config flags out of their domain.
    assert_bad_input(&fape(&["op", "lora-moe", "--input", good, "--output", out_arg, "--taps", "8"]), &["taps"]);
    let image = scratch("image.safetensors");
    write(&image, &[("x", random(1, &[1, 1, 4, 4]))]);
    let image = image.to_str().unwrap();
    assert_bad_input(&fape(&["op", "freq-split", "--input", image, "--output", out_arg, "--cutoff", "0"]), &["cutoff"]);
    assert_bad_input(
        &fape(&["op", "freq-split", "--input", image, "--output", out_arg, "--taps", "3"]),
        &["taps", "does not apply"],
    );
    assert_bad_input(
        &fape(&["op", "freq-split", "--input", image, "--output", out_arg, "--mask", "square"]),
        &["square"],
    );
    assert_bad_input(&fape(&["op", "lora-moe", "--input", good, "--output", out_arg, "--taps", "many"]), &["many"]);
    // Unreadable and truncated files.
    assert_bad_input(
        &fape(&["op", "freq-split", "--input", "/nonexistent/in.safetensors", "--output", out_arg]),
        &["/nonexistent/in.safetensors"],
    );
    let bytes = std::fs::read(good).unwrap();
    let truncated = scratch("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_bad_input(
        &fape(&["op", "lora-moe", "--input", truncated.to_str().unwrap(), "--output", out_arg]),
        &["truncated.safetensors"],
    );
    // An unknown device name.
    assert_bad_input(&fape(&["op", "lora-moe", "--input", good, "--output", out_arg, "--device", "tpu"]), &["tpu"]);
}

#[test]
fn devices_lists_every_backend() {
    let out = fape(&["devices"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for kind in ["reference", "cpu", "cube", "cuda"] {
        assert!(stdout.lines().any(|l| l.starts_with(kind)), "{kind} missing from:\n{stdout}");
    }
}

#[test]
fn check_passes_on_the_cpu_backend() {
    let out = fape(&["check", "--device", "cpu"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("check: ") && stdout.contains(" 0 failed"), "{stdout}");
}

#[test]
fn bench_runs_any_shape_on_the_cpu_and_prints_json_rows() {
    let cases: [(&str, &str, &str); 3] = [
        ("attention", "1x2x9x13x6", "1x2x9x13x6"),
        ("lora-moe", "7x16x12", "7x16x12"),
        ("freq-split", "1x1x6x10", "1x1x6x10"),
    ];
    for (op, shapes, spelled) in cases {
        let out = fape(&["bench", op, "--device", "cpu", "--shapes", shapes, "--runs", "1", "--json"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{op}: {}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<serde_json::Value> =
            stdout.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
        assert!(!rows.is_empty(), "{op}: no rows");
        for row in &rows {
            assert_eq!(row["shape"], spelled, "{op}: {row}");
            assert_eq!((row["backend"].as_str(), row["emulated"].as_bool()), (Some("cpu"), Some(false)), "{row}");
            assert!(row["median_s"].as_f64().is_some_and(|t| t > 0.0) && row["runs"] == 1, "{row}");
            assert!(row["op"].is_string() && row["variant"].is_string(), "{row}");
        }
    }
    // The text table prints times and rates with units that fit.
    let out = fape(&["bench", "attention", "--device", "cpu", "--shapes", "1x1x8x8", "--runs", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("1x1x8x8x8"), "{stdout}");
    assert!(!stdout.contains(" 0.0 "), "a zero rate or time in:\n{stdout}");
}

#[test]
fn bench_rejects_a_malformed_shape_with_one_line() {
    for (op, bad) in
        [("attention", "1x2x3"), ("lora-moe", "1024x3072"), ("freq-split", "1x3x0x8"), ("attention", "axb")]
    {
        assert_bad_input(&fape(&["bench", op, "--device", "cpu", "--shapes", bad]), &["shapes", bad]);
    }
}
