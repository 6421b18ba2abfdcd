//! `fape plan`: the built-in planner's plan line for an image, with the statistics it read.

use std::path::PathBuf;

use clap::Args;
use fape_kernels::pipeline::image::Image;
use fape_kernels::pipeline::planner;
use fape_kernels::Result;

#[derive(Args)]
pub struct PlanArgs {
    /// Image to plan for (PNG, JPEG or TIFF; 16-bit read exactly, alpha composited over white).
    image: PathBuf,
    /// Print one JSON object (task, focus, rationale, pipeline, line, statistics) instead.
    #[arg(long)]
    json: bool,
}

/// Reads the image, plans, prints the plan line and the statistics (or the JSON object).
///
/// # Errors
/// An unreadable, truncated, non-image or zero-size file.
pub fn run(args: PlanArgs) -> Result<()> {
    let image = Image::load(&args.image)?;
    let plan = planner::plan(&image)?;
    if args.json {
        println!("{}", plan.to_json());
        return Ok(());
    }
    println!("{}", plan.line());
    println!("statistics of {} ({}x{}):", args.image.display(), plan.stats.width, plan.stats.height);
    for (name, value) in plan.stats.measured() {
        println!("  {name:<18} {value:.5}");
    }
    Ok(())
}
