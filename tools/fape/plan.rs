//! `fape plan`: a plan line for an image, with the statistics it rests on: from the built-in
//! planner, or from an OpenAI-compatible MLLM endpoint with the built-in planner as fallback.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use fape_kernels::pipeline::planner::openai::OpenAiPlanner;
use fape_kernels::pipeline::planner::{self, Plan};
use fape_kernels::{FapeError, Result};

use crate::image_limit::ImageLimitArgs;

/// Which planner writes the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlannerKind {
    /// The built-in, label-free rules over pixel statistics.
    Builtin,
    /// An OpenAI-compatible chat endpoint serving a vision model (needs --endpoint, --model).
    Openai,
}

#[derive(Args)]
pub struct PlanArgs {
    /// Image to plan for (PNG, JPEG or TIFF; 16-bit read exactly, alpha composited over white).
    image: PathBuf,
    /// Print one JSON object (task, focus, rationale, pipeline, line, statistics, planner).
    #[arg(long)]
    json: bool,
    /// The planner.
    #[arg(long, value_enum, default_value = "builtin")]
    planner: PlannerKind,
    /// openai: the endpoint, an http:// URL with an optional port and path (e.g. http://127.0.0.1:8000/v1).
    #[arg(long)]
    endpoint: Option<String>,
    /// openai: the model name the endpoint serves.
    #[arg(long)]
    model: Option<String>,
    /// The size limit of the image.
    #[command(flatten)]
    images: ImageLimitArgs,
    /// openai: seconds each request may take, connecting to the last byte of the reply (two requests at most) [default: 120].
    #[arg(long)]
    timeout: Option<f64>,
}

fn flag_error(field: &'static str, message: impl Into<String>) -> FapeError {
    FapeError::Config { op: "fape plan", field, message: message.into() }
}

/// Reads the image, plans, prints the plan line and the statistics (or the JSON object). A
/// failed MLLM plan prints one `warning:` line on stderr and the built-in plan.
///
/// # Errors
/// An unreadable, truncated, non-image or zero-size file; openai flags given to the built-in
/// planner, or the openai planner without --endpoint or --model; a timeout that is not a
/// positive number of seconds.
pub fn run(args: PlanArgs) -> Result<()> {
    let image = args.images.load(&args.image)?;
    let (plan, source) = match args.planner {
        PlannerKind::Builtin => {
            let given = [
                ("endpoint", args.endpoint.is_some()),
                ("model", args.model.is_some()),
                ("timeout", args.timeout.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
                return Err(flag_error(flag, "applies to --planner openai only"));
            }
            (planner::plan(&image)?, "builtin")
        }
        PlannerKind::Openai => {
            let endpoint = args.endpoint.ok_or_else(|| flag_error("endpoint", "is required by --planner openai"))?;
            let model = args.model.ok_or_else(|| flag_error("model", "is required by --planner openai"))?;
            let seconds = args.timeout.unwrap_or(120.0);
            let timeout = Duration::try_from_secs_f64(seconds)
                .ok()
                .filter(|t| !t.is_zero())
                .ok_or_else(|| flag_error("timeout", format!("must be a positive number of seconds, got {seconds}")))?;
            let planned = OpenAiPlanner { endpoint, model, timeout }.plan(&image)?;
            if let Some(warning) = &planned.warning {
                eprintln!("warning: {}", warning.lines().next().unwrap_or_default());
            }
            (planned.plan, if planned.warning.is_some() { "builtin" } else { "openai" })
        }
    };
    print_plan(&plan, source, &args.image, args.json);
    Ok(())
}

fn print_plan(plan: &Plan, source: &str, path: &std::path::Path, json: bool) {
    if json {
        let mut object = plan.to_json();
        object["planner"] = source.into();
        println!("{object}");
        return;
    }
    println!("{}", plan.line());
    println!(
        "statistics of {} ({}x{}), plan by the {source} planner:",
        path.display(),
        plan.stats.width,
        plan.stats.height
    );
    for (name, value) in plan.stats.measured() {
        println!("  {name:<18} {value:.5}");
    }
}
