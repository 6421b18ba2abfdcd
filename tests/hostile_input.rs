//! Hostile input: the size bounds of every loader (a header that claims terabytes, a tensor whose
//! bytes run past the file, an image header claiming 100000 x 100000), the MLLM planner against
//! a misbehaving endpoint on loopback, and the fuzz targets' seed corpora (`fuzz/corpus/`, made
//! here: `FAPE_WRITE_FUZZ_SEEDS=1 cargo test --test hostile_input` rewrites them).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Cursor, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use common::cli::{assert_bad_input, fape, scratch};
use common::files::{png_claiming, safetensors_bytes};
use fape_kernels::io::TensorFile;
use fape_kernels::pipeline::flux::FluxConfig;
use fape_kernels::pipeline::image::{Image, DEFAULT_MAX_PIXELS};
use fape_kernels::pipeline::planner::openai::reply_plan_line;
use fape_kernels::pipeline::planner::PlanLine;
use fape_kernels::pipeline::scenes::scene;
use fape_kernels::pipeline::vae::VaeConfig;
use fape_kernels::pipeline::weights::{CheckedSafetensors, INDEX_FILE};
use fape_kernels::testing::{load_model_input, FILE_SEPARATOR};
use fape_kernels::FapeError;
use image::{DynamicImage, ImageBuffer, ImageFormat};

/// Runs `fape args` with its address space limited to 2 GiB, so that any allocation sized by a
/// claim rather than by the file's bytes kills it instead of passing unseen.
fn fape_in_2_gib(args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 2097152 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_fape"))
        .args(args)
        .output()
        .expect("sh runs")
}

/// A file error's message, or a panic naming what came instead.
fn file_message<T: std::fmt::Debug>(result: fape_kernels::Result<T>) -> String {
    match result {
        Err(err @ FapeError::File { .. }) => err.to_string(),
        other => panic!("expected a file error, got {other:?}"),
    }
}

// ---- size bounds ----

/// 2^20 x 2^20 f32: 4 TiB claimed by a file of a few hundred bytes.
const TERABYTES: &str = r#"{"x":{"dtype":"F32","shape":[1048576,1048576],"data_offsets":[0,4398046511104]}}"#;
/// A [2, 3] f32 tensor (24 bytes) of which the file holds 20.
const PAST_EOF: &str = r#"{"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;

#[test]
fn tensor_files_claiming_more_than_they_hold_are_refused_before_allocating() {
    let cases = [
        (safetensors_bytes(TERABYTES, &[0; 16]), "4.0 TiB"),
        (safetensors_bytes(PAST_EOF, &[0; 20]), "past the end"),
        ((1u64 << 42).to_le_bytes().to_vec(), "4.0 TiB claimed"),
    ];
    for (i, (bytes, needle)) in cases.iter().enumerate() {
        let message = file_message(TensorFile::from_bytes("hostile.safetensors", bytes));
        assert!(message.contains(needle), "{needle}: {message}");
        let path = scratch(&format!("hostile-{i}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        let shown = path.to_str().unwrap();
        let out = fape_in_2_gib(&[
            "op",
            "freq-split",
            "--input",
            shown,
            "--output",
            scratch("never.safetensors").to_str().unwrap(),
        ]);
        assert_bad_input(&out, &[shown, needle]);

        // The weights loader reads the same headers.
        let model = scratch(&format!("hostile-model-{i}"));
        std::fs::create_dir_all(model.join("transformer")).unwrap();
        std::fs::write(model.join("transformer/diffusion_pytorch_model.safetensors"), bytes).unwrap();
        let message = file_message(CheckedSafetensors::open(&model, "transformer"));
        assert!(message.contains(needle), "weights, {needle}: {message}");
    }
}

#[test]
fn a_file_that_never_ends_is_read_no_further_than_its_size() {
    // /dev/zero says it holds 0 bytes and would give zeros for ever.
    let out = fape_in_2_gib(&[
        "op",
        "freq-split",
        "--input",
        "/dev/zero",
        "--output",
        scratch("never.safetensors").to_str().unwrap(),
    ]);
    assert_bad_input(&out, &["/dev/zero", "shorter than 8 bytes"]);
    let out = fape_in_2_gib(&[
        "weights",
        "synth",
        "--config",
        "/dev/zero",
        "--out",
        scratch("never-model").to_str().unwrap(),
    ]);
    assert_bad_input(&out, &["/dev/zero", "not a FLUX config"]);
}

#[test]
fn an_index_naming_a_shard_outside_its_folder_is_refused() {
    let model = scratch("escaping-index");
    std::fs::create_dir_all(model.join("transformer")).unwrap();
    std::fs::write(model.join("x.safetensors"), safetensors_bytes(PAST_EOF, &[0; 24])).unwrap();
    let index = r#"{"weight_map":{"x":"../x.safetensors"}}"#;
    std::fs::write(model.join("transformer").join(INDEX_FILE), index).unwrap();
    let message = file_message(CheckedSafetensors::open(&model, "transformer"));
    assert!(message.contains("../x.safetensors") && message.contains("not a file name"), "{message}");
}

#[test]
fn an_image_claiming_100000_by_100000_is_refused_from_its_header() {
    let claim = png_claiming(100_000, 100_000);
    let message = file_message(Image::from_bytes("huge.png", &claim, DEFAULT_MAX_PIXELS));
    assert!(message.contains("100000x100000") && message.contains("--max-image-pixels"), "{message}");

    let path = scratch("huge.png");
    std::fs::write(&path, &claim).unwrap();
    let shown = path.to_str().unwrap();
    for command in [vec!["plan", shown], vec!["split", shown, "--out-dir", scratch("never").to_str().unwrap()]] {
        assert_bad_input(&fape_in_2_gib(&command), &[shown, "100000x100000", "--max-image-pixels"]);
    }
    // Lowered, the limit refuses a small image too; raised, a 9000 x 9000 claim (over the
    // default) gets to the decoder, which finds no pixels.
    let small = scratch("small.png");
    scene(1, 40, 30).save(&small).unwrap();
    assert_bad_input(&fape(&["plan", small.to_str().unwrap(), "--max-image-pixels", "1000"]), &["40x30 = 1200 pixels"]);
    let over_default = scratch("over-default.png");
    std::fs::write(&over_default, png_claiming(9000, 9000)).unwrap();
    let shown = over_default.to_str().unwrap();
    assert_bad_input(&fape(&["plan", shown]), &["9000x9000", "67108864"]);
    let raised = fape_in_2_gib(&["plan", shown, "--max-image-pixels", "100000000"]);
    assert_bad_input(&raised, &[shown, "cannot decode"]);
}

/// A JPEG on which zune-jpeg 0.5.15 (the image crate's decoder) panics in its AVX2 IDCT: found
/// by the `image` fuzz target.
const DECODER_PANIC: &[u8] = include_bytes!("data/zune-jpeg-idct-panic.jpg");

#[test]
fn a_decoder_that_panics_is_an_error_of_one_line() {
    let message = file_message(Image::from_bytes("panic.jpg", DECODER_PANIC, DEFAULT_MAX_PIXELS));
    assert!(message.contains("the decoder failed"), "{message}");
    let path = scratch("decoder-panic.jpg");
    std::fs::write(&path, DECODER_PANIC).unwrap();
    let shown = path.to_str().unwrap();
    assert_bad_input(&fape(&["plan", shown]), &[shown, "the decoder failed"]);
}

#[test]
fn the_size_caps_are_in_help() {
    let help = String::from_utf8_lossy(&fape(&["plan", "--help"]).stdout).into_owned();
    assert!(help.contains("--max-image-pixels <PIXELS>") && help.contains("67108864"), "{help}");
}

// ---- the planner against a misbehaving endpoint ----

/// How the loopback endpoint misbehaves, after reading the request.
#[derive(Clone, Copy, Debug)]
enum Endpoint {
    /// Never answers (holds the connection open).
    Silent,
    /// A valid status line and headers, then one body byte every 50 ms.
    Drip,
    /// A 64 MiB body, as fast as it is read.
    Huge,
    /// A chat completion whose content is not UTF-8.
    InvalidUtf8,
    /// An HTML page with status 200.
    NotJson,
    /// The status code, with a JSON error body.
    Status(u16),
    /// Bytes that are not HTTP at all.
    NotHttp,
}

/// Reads one HTTP request (headers and a Content-Length body) from `stream`.
fn read_request(stream: &TcpStream) {
    let mut reader = BufReader::new(stream);
    let (mut line, mut length) = (String::new(), 0u64);
    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
        line.clear();
    }
    let _ = std::io::copy(&mut reader.take(length), &mut std::io::sink());
}

fn respond(mut stream: TcpStream, endpoint: Endpoint) {
    read_request(&stream);
    let end = Instant::now() + Duration::from_secs(30);
    let reply = |status: &str, body: &[u8]| {
        let mut raw = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        raw.extend_from_slice(body);
        raw
    };
    // Write errors mean the planner hung up, which is what it should do: stop then.
    let _ = match endpoint {
        Endpoint::Silent => {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
            let _ = stream.read(&mut [0u8; 1]);
            Ok(())
        }
        Endpoint::Drip => {
            let mut result = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{");
            while result.is_ok() && Instant::now() < end {
                thread::sleep(Duration::from_millis(50));
                result = stream.write_all(b" ");
            }
            result
        }
        Endpoint::Huge => {
            let mut result = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 67108864\r\n\r\n");
            let block = vec![b'a'; 1 << 20];
            for _ in 0..64 {
                result = result.and_then(|()| stream.write_all(&block));
            }
            result
        }
        Endpoint::InvalidUtf8 => {
            stream.write_all(&reply("200 OK", b"{\"choices\":[{\"message\":{\"content\":\"Task: \xff\xfe\"}}]}"))
        }
        Endpoint::NotJson => stream.write_all(&reply("200 OK", b"<html><body>It works!</body></html>")),
        Endpoint::Status(code) => {
            stream.write_all(&reply(&format!("{code} Oops"), b"{\"error\":{\"message\":\"model not loaded\"}}"))
        }
        Endpoint::NotHttp => stream.write_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\nProtocol mismatch.\n"),
    };
}

/// A loopback endpoint misbehaving as `endpoint` on every connection; its `http://` URL.
fn serve(endpoint: Endpoint) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || respond(stream, endpoint));
        }
    });
    url
}

#[test]
fn a_misbehaving_endpoint_costs_bounded_time_and_gives_the_builtin_plan_with_exit_0() {
    let image = scratch("planner.png");
    scene(9, 200, 150).save(&image).unwrap();
    let cases = [
        (Endpoint::Silent, "no complete reply within the timeout"),
        (Endpoint::Drip, "no complete reply within the timeout"),
        (Endpoint::Huge, "larger than 4194304 bytes"),
        (Endpoint::InvalidUtf8, "not JSON"),
        (Endpoint::NotJson, "not JSON"),
        (Endpoint::Status(500), "HTTP 500"),
        (Endpoint::Status(404), "HTTP 404"),
        (Endpoint::Status(302), "HTTP 302"),
        (Endpoint::NotHttp, "no HTTP status line"),
    ];
    let timeout = 1.0;
    let runs: Vec<_> = cases
        .into_iter()
        .map(|(endpoint, needle)| {
            let url = serve(endpoint);
            let image = image.clone();
            thread::spawn(move || {
                let start = Instant::now();
                let args = ["plan", image.to_str().unwrap(), "--planner", "openai", "--endpoint", &url, "--model", "m"];
                let out = fape(&[&args[..], &["--timeout", &timeout.to_string(), "--json"]].concat());
                (endpoint, needle, out, start.elapsed())
            })
        })
        .collect();
    for run in runs {
        let (endpoint, needle, out, elapsed) = run.join().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{endpoint:?}: {stderr}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints the plan");
        assert_eq!(json["planner"], "builtin", "{endpoint:?}");
        assert_eq!(json["task"], "super_resolution", "{endpoint:?}: the built-in plan of a 200x150 image");
        let warnings: Vec<&str> = stderr.lines().filter(|l| !l.contains("XDG_RUNTIME_DIR")).collect();
        assert_eq!(warnings.len(), 1, "{endpoint:?}: {stderr}");
        assert!(warnings[0].starts_with("warning: ") && warnings[0].contains(needle), "{endpoint:?}: {stderr}");
        assert!(warnings[0].ends_with("using the built-in planner"), "{endpoint:?}: {stderr}");
        // At most two requests of `timeout` each, plus the process and the built-in planner
        // (the servers themselves would go on for 30 s).
        assert!(elapsed < Duration::from_secs_f64(2.0 * timeout + 8.0), "{endpoint:?} took {elapsed:?}");
    }
}

// ---- the fuzz targets' seed corpora ----

/// One seed: its file name (`ok-*` must be accepted by the target's entry point, `bad-*`
/// refused) and bytes.
type Seeds = Vec<(String, Vec<u8>)>;

fn seed(name: &str, bytes: impl Into<Vec<u8>>) -> (String, Vec<u8>) {
    (name.to_string(), bytes.into())
}

fn tensor_file_seeds() -> Seeds {
    let f32s: Vec<u8> =
        [1.0f32, -2.5, 0.0, 3.25, f32::NAN, f32::INFINITY].iter().flat_map(|v| v.to_le_bytes()).collect();
    let mixed = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[3],"data_offsets":[8,14]}}"#;
    vec![
        seed("ok-f32.safetensors", safetensors_bytes(PAST_EOF, &f32s)),
        seed("ok-bf16-f16-metadata.safetensors", safetensors_bytes(mixed, &[0x3f; 14])),
        seed(
            "ok-scalar-and-empty.safetensors",
            safetensors_bytes(
                r#"{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"e":{"dtype":"F32","shape":[0,5],"data_offsets":[4,4]}}"#,
                &[0, 0, 128, 63],
            ),
        ),
        seed(
            "bad-i32.safetensors",
            safetensors_bytes(r#"{"i":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}"#, &[1, 0, 0, 0]),
        ),
        seed("bad-past-eof.safetensors", safetensors_bytes(PAST_EOF, &f32s[..20])),
        seed("bad-terabytes.safetensors", safetensors_bytes(TERABYTES, &[0; 16])),
        seed("bad-header-length.safetensors", (1u64 << 42).to_le_bytes().to_vec()),
    ]
}

/// A `weights` fuzz input: the index (empty for none) and shards a, b, c.
fn model_input(index: &str, shards: &[&[u8]]) -> Vec<u8> {
    let mut out = index.as_bytes().to_vec();
    for shard in shards {
        out.extend_from_slice(FILE_SEPARATOR);
        out.extend_from_slice(shard);
    }
    out
}

fn weights_seeds() -> Seeds {
    let x = safetensors_bytes(r#"{"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#, &[0x3f; 16]);
    let y = safetensors_bytes(r#"{"y":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]}}"#, &[0x3f; 6]);
    let index = r#"{"metadata":{"total_size":22},"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#;
    vec![
        seed("ok-single", model_input("", &[&x])),
        seed("ok-sharded", model_input(index, &[&x, &y])),
        seed("bad-missing-tensor", model_input(r#"{"weight_map":{"z":"a.safetensors"}}"#, &[&x])),
        seed("bad-escaping-shard", model_input(r#"{"weight_map":{"x":"../a.safetensors"}}"#, &[&x])),
        seed("bad-duplicate", model_input("", &[&x, &x])),
        seed("bad-shard-past-eof", model_input(index, &[&x, &y[..y.len() - 1]])),
    ]
}

fn encoded(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn image_seeds() -> Seeds {
    let ramp = |x: u32, y: u32, c: u32| ((x * 37 + y * 11 + c * 71) % 256) as u8;
    let wide = |x: u32, y: u32, c: u32| ((x * 9001 + y * 577 + c * 13331) % 65536) as u16;
    let grey8 = |w, h| DynamicImage::ImageLuma8(ImageBuffer::from_fn(w, h, |x, y| image::Luma([ramp(x, y, 0)])));
    let grey16 = |w, h| DynamicImage::ImageLuma16(ImageBuffer::from_fn(w, h, |x, y| image::Luma([wide(x, y, 0)])));
    let grey_alpha =
        DynamicImage::ImageLumaA8(ImageBuffer::from_fn(7, 2, |x, y| image::LumaA([ramp(x, y, 0), ramp(x, y, 3)])));
    let rgb8 =
        |w, h| DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| image::Rgb([0, 1, 2].map(|c| ramp(x, y, c)))));
    let rgba8 = |w, h| {
        DynamicImage::ImageRgba8(ImageBuffer::from_fn(w, h, |x, y| image::Rgba([0, 1, 2, 3].map(|c| ramp(x, y, c)))))
    };
    let rgb16 = |w, h| {
        DynamicImage::ImageRgb16(ImageBuffer::from_fn(w, h, |x, y| image::Rgb([0, 1, 2].map(|c| wide(x, y, c)))))
    };
    let rgba16 = |w, h| {
        DynamicImage::ImageRgba16(ImageBuffer::from_fn(w, h, |x, y| image::Rgba([0, 1, 2, 3].map(|c| wide(x, y, c)))))
    };
    let (png, jpeg, tiff) = (ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Tiff);
    let mut truncated = encoded(rgb8(6, 5), png);
    truncated.truncate(truncated.len() - 20);
    vec![
        seed("ok-grey8-1x1.png", encoded(grey8(1, 1), png)),
        seed("ok-grey16-3x5.png", encoded(grey16(3, 5), png)),
        seed("ok-grey-alpha-7x2.png", encoded(grey_alpha, png)),
        seed("ok-rgba8-4x4.png", encoded(rgba8(4, 4), png)),
        seed("ok-rgb16-65x3.png", encoded(rgb16(65, 3), png)),
        seed("ok-rgba16-5x5.png", encoded(rgba16(5, 5), png)),
        seed("ok-rgb-9x7.jpg", encoded(rgb8(9, 7), jpeg)),
        seed("ok-grey-17x1.jpg", encoded(grey8(17, 1), jpeg)),
        seed("ok-rgb8-3x3.tif", encoded(rgb8(3, 3), tiff)),
        seed("ok-grey16-5x2.tif", encoded(grey16(5, 2), tiff)),
        seed("ok-rgba8-2x3.tif", encoded(rgba8(2, 3), tiff)),
        seed("ok-rgba16-1x7.tif", encoded(rgba16(1, 7), tiff)),
        seed("bad-claims-100000x100000.png", png_claiming(100_000, 100_000)),
        seed("bad-zero-width.png", png_claiming(0, 4)),
        seed("bad-truncated.png", truncated),
        seed("bad-zune-jpeg-idct-panic.jpg", DECODER_PANIC),
    ]
}

fn plan_line_seeds() -> Seeds {
    vec![
        seed(
            "ok-denoise",
            "Task: denoising, Focus: high, Rationale: fine grain noise over flat areas, Pipeline: denoise",
        ),
        seed("ok-deraining", "Task: deraining, Focus: high, Rationale: streaks, strong ones, Pipeline: a -> b c"),
        seed(
            "ok-dehazing",
            "  Task: dehazing, Focus: low, Rationale: veiled, low contrast, Pipeline: estimate haze -> dehaze  ",
        ),
        seed("bad-focus", "Task: dehazing, Focus: high, Rationale: r, Pipeline: a"),
        seed("bad-two-lines", "Task: denoising, Focus: high,\nRationale: r, Pipeline: a"),
        seed("bad-no-pipeline", "Task: denoising, Focus: high, Rationale: r"),
    ]
}

fn flux_config_seeds() -> Seeds {
    vec![
        seed("ok-tiny.json", r#"{"preset":"tiny"}"#),
        seed("ok-empty.json", "{}"),
        seed(
            "ok-full.json",
            r#"{ "preset": "tiny", "name": "my-model", "in_channels": 64, "dim": 256, "heads": 4,
  "head_dim": 64, "double_blocks": 3, "single_blocks": 6, "context_dim": 128,
  "pooled_dim": 64, "mlp_ratio": 4, "axes_dims_rope": [8, 28, 28], "rope_theta": 10000.0,
  "guidance_embeds": true, "guidance": 3.5, "max_plan_tokens": 512,
  "lora_moe": { "experts": 2, "rank": 8, "bands": ["low", "high"], "taps": 9,
                "sigma": 2.0, "temperature": 5.0, "lambda": 0.5, "top_k": 0, "scale": null } }"#,
        ),
        seed(
            "bad-huge-dim.json",
            r#"{"preset":"tiny","dim":4611686018427387904,"heads":1,"head_dim":4611686018427387904}"#,
        ),
        seed("bad-unknown-key.json", r#"{"preset":"tiny","width":3}"#),
        seed("bad-taps.json", r#"{"preset":"tiny","lora_moe":{"taps":1000001}}"#),
    ]
}

fn vae_config_seeds() -> Seeds {
    vec![
        seed("ok-tiny.json", r#"{"preset":"tiny"}"#),
        seed(
            "ok-full.json",
            r#"{ "preset": "tiny", "in_channels": 3, "block_out_channels": [16, 32, 32, 32],
  "layers_per_block": 1, "norm_groups": 8, "latent_channels": 16,
  "scaling_factor": 0.3611, "shift_factor": 0.1159 }"#,
        ),
        seed("bad-levels.json", r#"{"preset":"tiny","block_out_channels":[8,8,8,8,8,8,8,8,8,8,8,8]}"#),
        seed("bad-groups.json", r#"{"preset":"tiny","norm_groups":7}"#),
        seed("bad-scaling.json", r#"{"preset":"tiny","scaling_factor":0}"#),
    ]
}

fn openai_reply_seeds() -> Seeds {
    let line = "Task: super_resolution, Focus: high, Rationale: tiny input, Pipeline: upsample -> sharpen";
    let body =
        serde_json::json!({"choices": [{"message": {"role": "assistant", "content": format!("Sure.\n**{line}**")}}]})
            .to_string();
    let sized =
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let (head, tail) = body.split_at(body.len() / 2);
    let chunked = format!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{head}\r\n{:x};ext=1\r\n{tail}\r\n0\r\n\r\n",
        head.len(),
        tail.len()
    );
    let mut invalid = b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n".to_vec();
    invalid.extend_from_slice(b"{\"choices\":[{\"message\":{\"content\":\"\xff\"}}]}");
    vec![
        seed("ok-sized", sized),
        seed("ok-chunked", chunked),
        seed("bad-500", "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops"),
        seed("bad-not-json", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
        seed("bad-invalid-utf8", invalid),
        seed("bad-no-task", "HTTP/1.1 200 OK\r\n\r\n{\"choices\":[{\"message\":{\"content\":\"rainy\"}}]}"),
        seed("bad-chunk-size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab\r\n"),
    ]
}

/// Whether a fuzz target's entry point accepts an input.
type Accepts = Box<dyn Fn(&[u8]) -> bool>;

/// Every target's seeds, and what it accepts.
fn corpora() -> Vec<(&'static str, Seeds, Accepts)> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let model_dir = scratch("seed-model");
    vec![
        ("tensor_file", tensor_file_seeds(), Box::new(|b: &[u8]| TensorFile::from_bytes("seed", b).is_ok())),
        ("weights", weights_seeds(), Box::new(move |b: &[u8]| load_model_input(&model_dir, b).is_ok())),
        ("image", image_seeds(), Box::new(|b: &[u8]| Image::from_bytes("seed", b, 1 << 16).is_ok())),
        ("plan_line", plan_line_seeds(), Box::new(move |b: &[u8]| PlanLine::parse(&text(b)).is_ok())),
        ("flux_config", flux_config_seeds(), Box::new(move |b: &[u8]| FluxConfig::from_json("seed", &text(b)).is_ok())),
        ("vae_config", vae_config_seeds(), Box::new(move |b: &[u8]| VaeConfig::from_json("seed", &text(b)).is_ok())),
        ("openai_reply", openai_reply_seeds(), Box::new(|b: &[u8]| reply_plan_line(b).is_ok())),
    ]
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

fn committed(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(listing) = std::fs::read_dir(dir) else { return BTreeMap::new() };
    listing
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn seeds_are_accepted_or_refused_as_named_and_match_the_committed_corpora() {
    let write = std::env::var_os("FAPE_WRITE_FUZZ_SEEDS").is_some_and(|v| v == "1");
    let mut total = 0;
    for (target, seeds, accepts) in corpora() {
        for (name, bytes) in &seeds {
            assert_eq!(accepts(bytes), name.starts_with("ok-"), "{target}/{name}");
            total += bytes.len();
        }
        let dir = corpus_dir().join(target);
        let made: BTreeMap<String, Vec<u8>> = seeds.into_iter().collect();
        if write {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in &made {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
        assert!(
            committed(&dir) == made,
            "fuzz/corpus/{target} is stale: FAPE_WRITE_FUZZ_SEEDS=1 cargo test --test hostile_input"
        );
    }
    assert!(total < 1 << 20, "the corpora should stay small: {total} bytes");
}
