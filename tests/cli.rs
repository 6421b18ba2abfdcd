//! The `fape` command as a user meets it: `fape op` on safetensors files in the stored dtype,
//! `fape check`'s summary, and bad input giving exit code 2 with one line naming what is at fault.

use std::path::Path;

use fape_kernels::attention::{self, AttentionConfig, AttentionInputs};
use fape_kernels::io::{self, Dtype, Element, TensorFile};
use fape_kernels::lora_moe::{reference, Band, LoraMoeConfig, LoraMoeInputs, TOLERANCE_BF16, TOLERANCE_F32};
use fape_kernels::testing::{assert_close, rng, uniform};
use fape_kernels::{Tensor, View};
use half::{bf16, f16};

mod common;
use common::cli::{assert_bad_input, fape, scratch};
use common::numpy_available;

fn write<T: Element>(path: &Path, tensors: &[(&str, Tensor<T>)]) {
    let refs: Vec<(&str, &Tensor<T>)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    io::write(path, &refs).unwrap();
}

/// `tensors` rounded to `T`.
fn rounded<T: Element>(tensors: &[(&'static str, Tensor<f32>)]) -> Vec<(&'static str, Tensor<T>)> {
    tensors.iter().map(|(n, t)| (*n, t.map(|&v| T::from_f64(f64::from(v))))).collect()
}

/// Runs `fape op OP --input IN --output OUT ARGS..` and asserts success.
fn op_ok(op: &str, input: &Path, output: &Path, args: &[&str]) {
    let mut all = vec!["op", op, "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()];
    all.extend(args);
    let out = fape(&all);
    assert!(out.status.success(), "fape {all:?}: {}", String::from_utf8_lossy(&out.stderr));
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
    let y = written.require::<f32>("t", "y").unwrap();
    assert_eq!(y.shape(), &[2, 11, 12]);
    assert_close("y", y.data(), &expected.y.data, TOLERANCE_F32);
    assert_close("gates", written.require::<f32>("t", "gates").unwrap().data(), &expected.gates.data, TOLERANCE_F32);
}

fn lora_view<'a, T>(tensors: &'a [(&'static str, Tensor<T>)], name: &'static str) -> View<'a, T> {
    let t = &tensors.iter().find(|(n, _)| *n == name).unwrap().1;
    View::new("t", name, &t.data, &t.shape).unwrap()
}

#[test]
fn op_lora_moe_runs_bf16_inputs_in_bf16_and_widens_on_request() {
    let (input, output, wide) =
        (scratch("lora16_in.safetensors"), scratch("lora16_out.safetensors"), scratch("lora16_f32.safetensors"));
    let tensors = rounded::<bf16>(&lora_inputs());
    write(&input, &tensors);
    op_ok("lora-moe", &input, &output, &["--top-k", "1"]);
    op_ok("lora-moe", &input, &wide, &["--top-k", "1", "--output-dtype", "f32"]);

    let inputs = LoraMoeInputs {
        x: lora_view(&tensors, "x"),
        weight: lora_view(&tensors, "weight"),
        bias: Some(lora_view(&tensors, "bias")),
        lora_a: lora_view(&tensors, "lora_a"),
        lora_b: lora_view(&tensors, "lora_b"),
        router: lora_view(&tensors, "router"),
        guidance: None,
    };
    let expected = reference::lora_moe(&inputs, &LoraMoeConfig { top_k: 1, ..LoraMoeConfig::default() }).unwrap();
    let (written, widened) = (TensorFile::read(&output).unwrap(), TensorFile::read(&wide).unwrap());
    for (name, expected) in [("y", &expected.y.data), ("gates", &expected.gates.data)] {
        assert_eq!(written.get(name).map(|t| t.dtype()), Some(Dtype::Bf16), "{name} is written in the inputs' dtype");
        let got = written.require::<bf16>("t", name).unwrap();
        assert_close(name, got.data(), expected, TOLERANCE_BF16);
        let as_f32 = widened.require::<f32>("t", name).unwrap();
        let exact: Vec<f64> = got.data().iter().map(|v| v.to_f64()).collect();
        assert_close(&format!("{name} with --output-dtype f32"), as_f32.data(), &exact, 0.0);
    }
}

/// Attention in `T` through `fape op` against the f64 reference on the same `T` values.
fn attention_in<T: Element + attention::AttentionElement>(seed: u64) {
    let (b, h, lq, lk, d) = (1, 2, 13, 21, 64);
    let names = ["q", "k", "v", "q_norm", "k_norm"];
    let shapes = [vec![b, h, lq, d], vec![b, h, lk, d], vec![b, h, lk, d], vec![d], vec![d]];
    let tensors: Vec<(&str, Tensor<T>)> = names
        .iter()
        .zip(shapes)
        .enumerate()
        .map(|(i, (n, s))| (*n, random(seed + i as u64, &s).map(|&v| T::from_f64(f64::from(v)))))
        .collect();
    let (input, output) =
        (scratch(&format!("attn_{}_in.safetensors", T::DTYPE)), scratch(&format!("attn_{}_out.safetensors", T::DTYPE)));
    write(&input, &tensors);
    op_ok("attention", &input, &output, &[]);
    let view = |name| lora_view(&tensors, name);
    let inputs = AttentionInputs::new(view("q"), view("k"), view("v")).with_norms(view("q_norm"), view("k_norm"));
    let expected = attention::reference::attention(&inputs, &AttentionConfig::default()).unwrap();
    let written = TensorFile::read(&output).unwrap();
    assert_eq!(written.get("out").map(|t| t.dtype()), Some(T::STORED));
    assert_close(
        &format!("attention {}", T::DTYPE),
        written.require::<T>("t", "out").unwrap().data(),
        &expected.data,
        attention::TOLERANCE_BF16,
    );
}

#[test]
fn op_attention_runs_bf16_and_f16_inputs_in_their_dtype() {
    attention_in::<bf16>(20);
    attention_in::<f16>(30);
}

fn st_view<'a>(dtype: safetensors::Dtype, shape: &[usize], bytes: &'a [u8]) -> safetensors::tensor::TensorView<'a> {
    safetensors::tensor::TensorView::new(dtype, shape.to_vec(), bytes).unwrap()
}

#[test]
fn op_dtype_errors_name_the_op_tensor_and_dtype() {
    let out_arg = scratch("dtype_unused.safetensors");
    let out_arg = out_arg.to_str().unwrap();
    // An op without the dtype.
    let image = scratch("image_bf16.safetensors");
    write(&image, &rounded::<bf16>(&[("x", random(1, &[1, 1, 4, 4]))]));
    let image = image.to_str().unwrap();
    assert_bad_input(
        &fape(&["op", "freq-split", "--input", image, "--output", out_arg]),
        &["freq_split", "`x`", "bf16", "f32", "--compute-dtype f32"],
    );
    let tokens = scratch("tokens_f16.safetensors");
    write(&tokens, &rounded::<f16>(&[("x", random(1, &[1, 9, 4]))]));
    assert_bad_input(
        &fape(&["op", "token-lowpass", "--input", tokens.to_str().unwrap(), "--output", out_arg]),
        &["token_lowpass", "`x`", "f16"],
    );
    let lora16 = scratch("lora_f16.safetensors");
    write(&lora16, &rounded::<f16>(&lora_inputs()));
    assert_bad_input(
        &fape(&["op", "lora-moe", "--input", lora16.to_str().unwrap(), "--output", out_arg]),
        &["lora_moe", "`x`", "f16", "f32, bf16"],
    );
    // Mixed dtypes among one op's inputs, an optional one included.
    let mixed = scratch("mixed.safetensors");
    let (tensors, bias) = (rounded::<bf16>(&lora_inputs()[..2]), random(3, &[12]));
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), st_view(safetensors::Dtype::BF16, &t.shape, bytemuck::cast_slice(&t.data))))
        .collect();
    views.push(("bias".into(), st_view(safetensors::Dtype::F32, &bias.shape, bytemuck::cast_slice(&bias.data))));
    safetensors::serialize_to_file(views, None, &mixed).unwrap();
    assert_bad_input(
        &fape(&["op", "lora-moe", "--input", mixed.to_str().unwrap(), "--output", out_arg]),
        &["lora_moe", "`bias`", "f32", "`x` is bf16"],
    );
    // Only f32 is a widening dtype.
    assert_bad_input(
        &fape(&["op", "freq-split", "--input", image, "--output", out_arg, "--output-dtype", "bf16"]),
        &["--output-dtype", "bf16"],
    );
}

#[test]
fn op_widens_bf16_inputs_of_an_f32_op_with_compute_dtype_f32() {
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
        "--compute-dtype",
        "f32",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written = TensorFile::read(&output).unwrap();
    let (low, high) = (written.require::<f32>("t", "low").unwrap(), written.require::<f32>("t", "high").unwrap());
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
fn numpy_crosscheck_passes_in_f32_bf16_and_f16() {
    if !numpy_available() {
        // Optional: numpy is no build dependency, so its absence skips even under FAPE_NO_SKIP.
        eprintln!("SKIP numpy_crosscheck_passes_in_f32_bf16_and_f16: python3 with numpy and safetensors not found");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/numpy_crosscheck.py");
    let out = std::process::Command::new("python3").args([script, env!("CARGO_BIN_EXE_fape")]).output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{report}");
    assert!(out.status.success(), "numpy cross-check failed: {report}");
    for dtype in ["bf16", "f16"] {
        assert!(report.contains(&format!("[{dtype}]")), "no {dtype} rows in: {report}");
    }
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
fn check_passes_on_the_cpu_backend_and_sums_up_each_backend() {
    let out = fape(&["check", "--device", "reference", "--device", "cpu"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("check: ") && stdout.contains(" 0 failed"), "{stdout}");
    for backend in ["reference", "cpu"] {
        let rows = stdout.lines().filter(|l| l.split_whitespace().nth(1) == Some(backend)).count();
        let summary = format!("{backend}: ");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&summary))
            .unwrap_or_else(|| panic!("no `{summary}` line in:\n{stdout}"));
        let numbers: Vec<usize> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
        assert!(rows > 0, "no {backend} rows:\n{stdout}");
        assert_eq!(numbers[..3], [rows, rows, 0], "`{line}`: rows run, passed, failed");
        assert!(line.contains("rows run") && line.contains("passed") && line.contains("failed"), "{line}");
    }
    let last = stdout.lines().rev().take(3).collect::<Vec<_>>();
    assert!(last.iter().any(|l| l.starts_with("cpu: ")), "the summary ends the output:\n{stdout}");
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
