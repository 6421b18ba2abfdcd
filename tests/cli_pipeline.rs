//! `fape plan` and `fape split` as a user meets them: a plan for a degraded PNG, three readable
//! images from a split, and bad input (missing, non-image, zero-size files) giving exit code 2
//! with one line naming the file.

use std::process::Output;

use fape_kernels::pipeline::degrade::Degradation;
use fape_kernels::pipeline::image::Image;
use fape_kernels::pipeline::planner::{PlanLine, Task};
use fape_kernels::pipeline::scenes::scene;

mod common;
use common::cli::{assert_bad_input, fape, scratch};
use common::files;

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "fape failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn plan_reads_a_rainy_png() {
    let path = scratch("rainy.png");
    let rain = Degradation::Rain { density: 10.0, length: 30.0, angle_deg: 10.0, intensity: 0.7, width: 0.8 };
    rain.apply(&scene(7, 512, 384), 7).unwrap().save(&path).unwrap();

    let text = stdout(&fape(&["plan", path.to_str().unwrap()]));
    let line = text.lines().next().unwrap();
    let plan = PlanLine::parse(line).unwrap();
    assert_eq!(plan.task, Task::Deraining, "{text}");
    assert!(text.contains("streak_strength"), "the statistics follow the line: {text}");

    let json: serde_json::Value = serde_json::from_str(&stdout(&fape(&["plan", "--json", path.to_str().unwrap()])))
        .expect("--json prints one JSON object");
    assert_eq!(json["task"], "deraining");
    assert_eq!(json["line"], line);
    assert_eq!(json["statistics"]["width"], 512);
}

#[test]
fn split_writes_three_readable_images() {
    let (input, dir) = (scratch("split_in.png"), scratch("split_out"));
    scene(8, 96, 64).save(&input).unwrap();
    let out = fape(&["split", input.to_str().unwrap(), "--out-dir", dir.to_str().unwrap(), "--cutoff", "0.2"]);
    stdout(&out);
    for name in ["low.png", "high.png", "spectrum.png"] {
        let image = Image::load(&dir.join(name)).unwrap();
        assert_eq!((image.width, image.height), (96, 64), "{name}");
    }
    let bad = fape(&["split", input.to_str().unwrap(), "--out-dir", dir.to_str().unwrap(), "--cutoff=-1"]);
    assert_bad_input(&bad, &["cutoff"]);
}

#[test]
fn bad_images_exit_2_with_one_line_naming_the_file() {
    let missing = scratch("missing.png");
    let text = scratch("notes.png");
    std::fs::write(&text, "plain text, not pixels").unwrap();
    let empty = scratch("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let zero = scratch("zero.png");
    std::fs::write(&zero, files::png_claiming(0, 4)).unwrap();
    for path in [&missing, &text, &empty, &zero] {
        let shown = path.to_str().unwrap();
        assert_bad_input(&fape(&["plan", shown]), &[shown]);
        assert_bad_input(&fape(&["split", shown, "--out-dir", scratch("never").to_str().unwrap()]), &[shown]);
    }
}

#[test]
fn openai_planner_falls_back_with_one_warning_and_flags_are_checked() {
    let path = scratch("small.png");
    scene(9, 200, 150).save(&path).unwrap();
    let shown = path.to_str().unwrap();
    // Nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}/v1");
    let out = fape(&["plan", shown, "--planner", "openai", "--endpoint", &endpoint, "--model", "m", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!((json["task"].as_str(), json["planner"].as_str()), (Some("super_resolution"), Some("builtin")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr.lines().filter(|l| !l.contains("XDG_RUNTIME_DIR")).collect();
    assert!(warnings.len() == 1 && warnings[0].starts_with("warning: cannot connect"), "{stderr}");

    assert_bad_input(&fape(&["plan", shown, "--planner", "openai", "--model", "m"]), &["endpoint"]);
    assert_bad_input(&fape(&["plan", shown, "--endpoint", &endpoint]), &["endpoint", "openai"]);
    let zero = ["plan", shown, "--planner", "openai", "--endpoint", &endpoint, "--model", "m", "--timeout", "0"];
    assert_bad_input(&fape(&zero), &["timeout"]);
}
