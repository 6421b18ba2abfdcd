//! The restoration pipeline end to end on the CPU with the tiny preset: sizes in and out on both
//! transformer paths, load errors, and the `fape restore` (one image or a folder, sharded and
//! resumed) / `fape bench e2e` commands as a user meets them (bad input exits 2 with one line).

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{DType, Device};
use fape_kernels::pipeline::flux::ExecPath;
use fape_kernels::pipeline::image::Image;
use fape_kernels::pipeline::restore::{restore, test_scene, Pipeline, WeightsSource};
use fape_kernels::pipeline::vae::{Vae, VaeConfig};
use fape_kernels::FapeError;

mod common;
use common::cli::{assert_bad_input, fape, scratch};
use common::SeededWeights;

fn tiny_pipeline(seed: u64) -> Pipeline {
    Pipeline::load(WeightsSource::Synthetic(seed), "tiny", Device::Cpu, DType::F32).expect("tiny pipeline loads")
}

fn assert_restored(input: &Image, output: &Image) {
    assert_eq!((output.width, output.height), (input.width, input.height));
    assert_eq!(output.data.len(), 3 * input.width * input.height);
    if let Some((i, v)) = output.data.iter().enumerate().find(|(_, v)| !(0.0..=1.0).contains(*v)) {
        panic!("value {v} at {i} is not a finite value in [0, 1]");
    }
}

#[test]
fn restore_keeps_an_awkward_size_on_both_paths() {
    let pipeline = tiny_pipeline(1);
    let input = test_scene(37, 50, 2); // 37 wide, 50 high: neither a multiple of 8
    for path in [ExecPath::Reference, ExecPath::Fused] {
        let restored = restore(&input, &pipeline, path).expect("restore runs");
        assert_restored(&input, &restored.image);
        assert_eq!(restored.geometry.padded, (64, 48));
        assert!(restored.plan.line().starts_with("Task:"), "plan line: {}", restored.plan.line());
        assert!(restored.timings.vae_encode > std::time::Duration::ZERO);
        let spread = restored.image.data.iter().cloned().fold(f32::MIN, f32::max)
            - restored.image.data.iter().cloned().fold(f32::MAX, f32::min);
        assert!(spread > 0.0, "output is constant");
    }
}

#[test]
fn restore_downscales_a_long_side_and_returns_the_input_size() {
    let pipeline = tiny_pipeline(2);
    let input = test_scene(530, 9, 3); // longer than the tiny preset's 512 px
    let restored = restore(&input, &pipeline, ExecPath::Fused).expect("restore runs");
    assert_eq!(restored.geometry.work, (9, 512));
    assert_eq!(restored.geometry.padded, (16, 512));
    assert_restored(&input, &restored.image);
}

#[test]
fn restore_rejects_an_image_whose_data_does_not_match_its_size() {
    let pipeline = tiny_pipeline(3);
    let empty = Image { width: 0, height: 4, data: vec![] };
    let short = Image { width: 4, height: 4, data: vec![0.5; 47] };
    for image in [empty, short] {
        match restore(&image, &pipeline, ExecPath::Fused) {
            Err(FapeError::Layout { tensor: "image", .. }) => {}
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("{}x{} image with {} values restored", image.width, image.height, image.data.len()),
        }
    }
}

#[test]
fn load_errors_name_the_preset_dtype_folder_and_tensor() {
    let err = |r: fape_kernels::Result<Pipeline>| r.err().expect("load fails").to_string();
    let synthetic = WeightsSource::Synthetic(0);
    assert!(err(Pipeline::load(synthetic.clone(), "huge", Device::Cpu, DType::F32)).contains("preset"));
    assert!(err(Pipeline::load(synthetic, "tiny", Device::Cpu, DType::BF16)).contains("BF16"));
    let missing = scratch("no-such-weights");
    let message = err(Pipeline::load(WeightsSource::Dir(missing.clone()), "tiny", Device::Cpu, DType::F32));
    assert!(message.contains(&missing.join("vae").display().to_string()), "{message}");

    // A VAE checkpoint lacking one tensor.
    let weights = SeededWeights::new(4);
    Vae::load(weights.var_builder(DType::F32), &VaeConfig::tiny()).unwrap();
    let mut tensors = weights.tensors();
    let absent = "encoder.mid_block.attentions.0.to_v.bias";
    tensors.remove(absent).unwrap();
    let dir = scratch("weights-missing-tensor");
    std::fs::create_dir_all(dir.join("vae")).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("vae").join("diffusion_pytorch_model.safetensors")).unwrap();
    let message = err(Pipeline::load(WeightsSource::Dir(dir), "tiny", Device::Cpu, DType::F32));
    assert!(message.contains(absent), "{message}");
}

fn write_scene(path: &Path, width: usize, height: usize) {
    test_scene(width, height, 5).save(path).expect("scene written");
}

fn run_ok(args: &[&str]) -> String {
    let out = fape(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "fape {args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cli_restore_reads_png_and_jpeg_and_writes_png_and_tiff_of_the_input_size() {
    let (png_in, jpeg_in) = (scratch("in.png"), scratch("in.jpg"));
    write_scene(&png_in, 45, 30);
    write_scene(&jpeg_in, 45, 30);
    let (png_out, tiff_out) = (scratch("out.png"), scratch("out.tiff"));
    let common = ["--synthetic", "7", "--preset", "tiny", "--device", "cpu"];
    for (input, output, path) in [(&png_in, &png_out, "fused"), (&jpeg_in, &tiff_out, "reference")] {
        let mut args = vec!["restore", input.to_str().unwrap(), "-o", output.to_str().unwrap(), "--path", path];
        args.extend(common);
        let stdout = run_ok(&args);
        assert!(stdout.contains("plan: Task:"), "no plan printed: {stdout}");
        assert!(stdout.contains("NOT a restoration"), "no synthetic note: {stdout}");
        let written = image::open(output).expect("output readable");
        assert_eq!((written.width(), written.height()), (45, 30));
    }
}

#[test]
fn synthesised_weight_files_restore_exactly_as_the_in_place_synthetic_weights() {
    let (dir, input) = (scratch("synth-weights"), scratch("synth-in.png"));
    write_scene(&input, 40, 24);
    run_ok(&["weights", "synth", "--preset", "tiny", "--out", dir.to_str().unwrap(), "--seed", "11", "--dtype", "f32"]);
    let restored = |source: &[&str], output: &PathBuf| {
        let mut args = vec!["restore", input.to_str().unwrap(), "-o", output.to_str().unwrap()];
        args.extend(["--preset", "tiny", "--device", "cpu"]);
        args.extend(source);
        run_ok(&args);
        image::open(output).expect("output readable").to_rgb8().into_raw()
    };
    let from_files = restored(&["--weights", dir.to_str().unwrap()], &scratch("synth-files.png"));
    let in_place = restored(&["--synthetic", "11"], &scratch("synth-in-place.png"));
    assert_eq!(from_files, in_place, "weights written by `fape weights synth` restore differently from --synthetic");
}

#[test]
fn cli_restore_handles_or_refuses_16_bit_rgba_clearly() {
    let (input, output) = (scratch("rgba16.png"), scratch("rgba16-out.png"));
    let pixels: Vec<u16> = (0..20 * 12 * 4).map(|i| (i * 997 % 65536) as u16).collect();
    image::ImageBuffer::<image::Rgba<u16>, _>::from_raw(20, 12, pixels).unwrap().save(&input).unwrap();
    let out = fape(&[
        "restore",
        input.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
        "--synthetic",
        "1",
        "--preset",
        "tiny",
        "--device",
        "cpu",
    ]);
    if out.status.code() == Some(0) {
        let written = image::open(&output).expect("output readable");
        assert_eq!((written.width(), written.height()), (20, 12));
    } else {
        assert_bad_input(&out, &[input.to_str().unwrap()]);
    }
}

/// A PNG whose header claims a 0 x 0 image (valid signature and CRC).
fn zero_size_png() -> Vec<u8> {
    let crc32 = |bytes: &[u8]| {
        !bytes.iter().fold(!0u32, |mut crc, &b| {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
            crc
        })
    };
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend([0, 0, 0, 0, 0, 0, 0, 0, 8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    png.extend(0u32.to_be_bytes());
    png.extend(b"IEND");
    png.extend(crc32(b"IEND").to_be_bytes());
    png
}

#[test]
fn cli_restore_bad_input_exits_2_with_one_line() {
    let good = scratch("good.png");
    write_scene(&good, 16, 16);
    let not_image = scratch("not-image.png");
    std::fs::write(&not_image, "this is text, not a PNG").unwrap();
    let zero = scratch("zero.png");
    std::fs::write(&zero, zero_size_png()).unwrap();
    let truncated = scratch("truncated.png");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let out = scratch("bad-out.png");
    let (good, out) = (good.to_str().unwrap(), out.to_str().unwrap());
    let tiny = ["--preset", "tiny", "--device", "cpu"];
    let run = |input: &str, extra: &[&str]| {
        let mut args = vec!["restore", input, "-o", out];
        args.extend(extra);
        fape(&args)
    };
    let with_tiny = |extra: &[&'static str]| -> Vec<&'static str> { extra.iter().chain(&tiny).copied().collect() };
    let missing = scratch("missing.png");
    assert_bad_input(&run(missing.to_str().unwrap(), &with_tiny(&["--synthetic", "1"])), &["missing.png"]);
    assert_bad_input(&run(not_image.to_str().unwrap(), &with_tiny(&["--synthetic", "1"])), &["not-image.png"]);
    assert_bad_input(&run(zero.to_str().unwrap(), &with_tiny(&["--synthetic", "1"])), &["zero.png"]);
    assert_bad_input(&run(truncated.to_str().unwrap(), &with_tiny(&["--synthetic", "1"])), &["truncated.png"]);
    assert_bad_input(&run(good, &["--synthetic", "1", "--preset", "huge", "--device", "cpu"]), &["huge"]);
    assert_bad_input(&run(good, &with_tiny(&["--weights", "/no/such/weights"])), &["/no/such/weights"]);
    assert_bad_input(&run(good, &with_tiny(&[])), &["--weights"]);
    assert_bad_input(&run(good, &with_tiny(&["--synthetic", "1", "--dtype", "bf16"])), &["BF16"]);
    assert_bad_input(&run(good, &with_tiny(&["--synthetic", "1", "--weights", "/w"])), &["--synthetic"]);
    let bmp = scratch("out.bmp");
    let args = ["restore", good, "-o", bmp.to_str().unwrap(), "--synthetic", "1", "--preset", "tiny"];
    assert_bad_input(&fape(&args), &["out.bmp"]);
}

#[test]
fn cli_bench_e2e_prints_every_stage_for_both_paths() {
    let image = scratch("bench.png");
    write_scene(&image, 40, 24);
    let stdout = run_ok(&[
        "bench",
        "e2e",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--image",
        image.to_str().unwrap(),
    ]);
    for stage in ["planner", "vae-encode", "transformer", "vae-decode", "total"] {
        for variant in ["reference", "fused"] {
            let row = format!("{stage} 40x24");
            assert!(
                stdout.lines().any(|l| l.starts_with(&row) && l.contains(variant)),
                "no `{row}` row for `{variant}` in:\n{stdout}"
            );
        }
    }
    assert!(stdout.contains("peak memory"), "no peak memory line:\n{stdout}");
    assert!(stdout.contains("NOT a restoration"), "no synthetic note:\n{stdout}");
}

/// `fape restore DIR -o OUT ARGS..` with the tiny preset and synthetic weights on the CPU.
fn restore_dir(dir: &Path, out: &Path, args: &[&str]) -> Output {
    let mut all = vec!["restore", dir.to_str().unwrap(), "-o", out.to_str().unwrap()];
    all.extend(["--synthetic", "3", "--preset", "tiny", "--device", "cpu"]);
    all.extend(args);
    fape(&all)
}

/// The file names a folder run restored, in order, from its `restored IN -> OUT (..)` lines.
fn restored_names(out: &Output) -> Vec<String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("restored ")?.split(" -> ").next())
        .map(|input| Path::new(input).file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// A folder of images in every format, written out of order, beside what must be passed over.
fn image_folder(name: &str, images: &[&str]) -> PathBuf {
    let dir = scratch(name);
    std::fs::create_dir_all(dir.join("nested")).unwrap();
    for (i, image) in images.iter().enumerate() {
        write_scene(&dir.join(image), 17 + 3 * i, 21 - i);
    }
    write_scene(&dir.join("nested").join("inner.png"), 16, 16);
    write_scene(&dir.join(".hidden.png"), 16, 16);
    std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
    dir
}

#[test]
fn cli_restore_dir_shards_the_sorted_list_disjointly_and_a_rerun_resumes() {
    let sorted = ["a.png", "b.tif", "c.png", "d.jpg", "e.png"];
    let dir = image_folder("batch-in", &["c.png", "e.png", "a.png", "d.jpg", "b.tif"]);
    let out = scratch("batch-out");
    let mut shards = Vec::new();
    for shard in ["0/2", "1/2", "5/6"] {
        let run = restore_dir(&dir, &out, &["--shard", shard]);
        assert_eq!(run.status.code(), Some(0), "shard {shard}: {}", String::from_utf8_lossy(&run.stderr));
        shards.push(restored_names(&run));
    }
    assert_eq!(
        shards,
        [vec!["a.png", "c.png", "e.png"], vec!["b.tif", "d.jpg"], vec![]],
        "file k goes to shard k mod N"
    );
    let mut union: Vec<&String> = shards.iter().flatten().collect();
    union.sort();
    assert_eq!(union, sorted, "the shards cover the sorted list, each file once");
    assert_eq!(listing(&out), sorted, "one output per image, nothing else (no partial files)");
    for name in sorted {
        let (input, output) = (image::open(dir.join(name)).unwrap(), image::open(out.join(name)).unwrap());
        assert_eq!((output.width(), output.height()), (input.width(), input.height()), "{name}");
    }

    // An existing output is skipped (left as it is); a missing one is restored.
    std::fs::write(out.join("c.png"), "left alone").unwrap();
    std::fs::remove_file(out.join("d.jpg")).unwrap();
    let rerun = restore_dir(&dir, &out, &[]);
    assert_eq!(rerun.status.code(), Some(0), "{}", String::from_utf8_lossy(&rerun.stderr));
    assert_eq!(restored_names(&rerun), ["d.jpg"]);
    assert!(String::from_utf8_lossy(&rerun.stdout).contains("done: 1 restored, 4 skipped"), "{rerun:?}");
    assert_eq!(std::fs::read(out.join("c.png")).unwrap(), b"left alone");
    assert_eq!(listing(&out), sorted);
}

#[test]
fn cli_restore_dir_reports_a_bad_image_restores_the_rest_and_retries_it() {
    let dir = image_folder("batch-bad-in", &["a.png", "c.png"]);
    std::fs::write(dir.join("b.png"), "text, not a PNG").unwrap();
    let out = scratch("batch-bad-out");
    for _ in 0..2 {
        let run = restore_dir(&dir, &out, &[]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(errors.len(), 2, "the image's line, then the summary: {stderr}");
        assert!(errors[0].contains("b.png") && errors[1].contains("1 of"), "{stderr}");
        assert_eq!(listing(&out), ["a.png", "c.png"]);
    }
}

#[test]
fn cli_restore_dir_bad_shards_and_folders_exit_2_with_one_line() {
    let dir = image_folder("batch-flags-in", &["a.png"]);
    let out = scratch("batch-flags-out");
    for bad in ["2/2", "0/0", "x/2", "1", "1/2/3", "", "-1/2", "1/-2", "0.5/2"] {
        let shard = format!("--shard={bad}");
        assert_bad_input(&restore_dir(&dir, &out, &[&shard]), &["--shard", &format!("`{bad}`")]);
    }
    let single = dir.join("a.png");
    assert_bad_input(&restore_dir(&single, &scratch("single.png"), &["--shard", "0/2"]), &["shard", "not a folder"]);
    assert_bad_input(&restore_dir(&dir, &dir, &[]), &["input folder"]);
    let empty = scratch("batch-empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_bad_input(&restore_dir(&empty, &out, &[]), &["batch-empty", "no images"]);
    let file = scratch("batch-out-is-a-file");
    std::fs::write(&file, "a file").unwrap();
    assert_bad_input(&restore_dir(&dir, &file, &[]), &["batch-out-is-a-file"]);
    assert!(!out.exists(), "no output folder for rejected runs");
}
