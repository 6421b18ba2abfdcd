//! The built-in, label-free planner: pixel statistics ([`stats`]) and rules ([`rules`]) that
//! write one plan line in FAPE-IR's format,
//!
//! ```text
//! Task: <task>, Focus: <high|low>, Rationale: <brief, citing the statistics>, Pipeline: <step -> step>
//! ```
//!
//! with the task one of [`Task::ALL`] and the focus fixed by the task (rain, snow, blur, noise
//! and super-resolution restore high frequencies; haze and low light low ones).
//! [`PlanLine::parse`] validates such a line from any source (an MLLM planner).

pub mod openai;
pub mod rules;
pub mod stats;

use std::fmt;
use std::str::FromStr;

use crate::error::{config_error, FapeError, Result};
use crate::pipeline::image::Image;

pub use stats::Statistics;

/// The op name in the planner's errors.
pub const OP: &str = "plan";

/// The restoration tasks FAPE-IR plans for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// Rain streaks.
    Deraining,
    /// Snow particles.
    Desnowing,
    /// Haze or fog.
    Dehazing,
    /// Motion or defocus blur.
    Deblurring,
    /// Under-exposure.
    LowLightEnhancement,
    /// Sensor noise.
    Denoising,
    /// Low resolution.
    SuperResolution,
}

impl Task {
    /// Every task, in the order tables list them.
    pub const ALL: [Task; 7] = [
        Self::Deraining,
        Self::Desnowing,
        Self::Dehazing,
        Self::Deblurring,
        Self::LowLightEnhancement,
        Self::Denoising,
        Self::SuperResolution,
    ];

    /// The name the plan line uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Deraining => "deraining",
            Self::Desnowing => "desnowing",
            Self::Dehazing => "dehazing",
            Self::Deblurring => "deblurring",
            Self::LowLightEnhancement => "low_light_enhancement",
            Self::Denoising => "denoising",
            Self::SuperResolution => "super_resolution",
        }
    }

    /// The frequency band the task restores.
    pub fn focus(self) -> Focus {
        match self {
            Self::Dehazing | Self::LowLightEnhancement => Focus::Low,
            _ => Focus::High,
        }
    }

    /// The built-in planner's pipeline for the task.
    pub fn pipeline(self) -> [&'static str; 3] {
        match self {
            Self::Deraining => {
                ["locate oriented rain streaks", "remove high-frequency streaks", "restore background texture"]
            }
            Self::Desnowing => {
                ["locate bright snow particles", "remove high-frequency particles", "restore occluded detail"]
            }
            Self::Dehazing => {
                ["estimate airlight and transmission", "restore low-frequency contrast and colour", "keep edges"]
            }
            Self::Deblurring => ["estimate blur extent", "recover high-frequency detail", "suppress ringing"],
            Self::LowLightEnhancement => {
                ["lift global illumination", "correct low-frequency exposure and colour", "suppress amplified noise"]
            }
            Self::Denoising => ["estimate noise level", "suppress high-frequency noise", "preserve edges and texture"],
            Self::SuperResolution => {
                ["upsample to the target resolution", "synthesise high-frequency detail", "sharpen edges"]
            }
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = FapeError;

    /// A task name, case-insensitive, with spaces or hyphens accepted for underscores
    /// (`Low-light enhancement` reads as `low_light_enhancement`).
    ///
    /// # Errors
    /// [`FapeError::Config`] naming `task` for anything else.
    fn from_str(s: &str) -> Result<Self> {
        let norm: String =
            s.trim().to_lowercase().chars().map(|c| if c == ' ' || c == '-' { '_' } else { c }).collect();
        Self::ALL.into_iter().find(|t| t.name() == norm).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
            config_error(OP, "task", format!("`{s}` is not one of {}", names.join(", ")))
        })
    }
}

/// The frequency band a plan restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Focus {
    /// High frequencies (streaks, particles, noise, lost detail).
    High,
    /// Low frequencies (illumination, veils, colour).
    Low,
}

impl Focus {
    /// `high` or `low`.
    pub fn name(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Low => "low",
        }
    }
}

impl fmt::Display for Focus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Focus {
    type Err = FapeError;

    /// `high` or `low`, case-insensitive.
    ///
    /// # Errors
    /// [`FapeError::Config`] naming `focus` for anything else.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_lowercase().as_str() {
            "high" => Ok(Self::High),
            "low" => Ok(Self::Low),
            _ => Err(config_error(OP, "focus", format!("`{s}` is not one of high, low"))),
        }
    }
}

/// The four fields of a plan line, validated: the focus is the task's, the rationale is one
/// trimmed non-empty line, and the pipeline has at least one step, each trimmed, non-empty,
/// on one line and free of `->` and `, Pipeline:` (so that [`PlanLine::parse`] of the
/// [`Display`](fmt::Display) form gives the plan back).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanLine {
    /// What to restore.
    pub task: Task,
    /// Which band to restore; always `task.focus()`.
    pub focus: Focus,
    /// Why, citing statistics.
    pub rationale: String,
    /// The steps, in order.
    pub pipeline: Vec<String>,
}

const PIPELINE_KEY: &str = ", Pipeline:";

fn is_one_trimmed_line(s: &str) -> bool {
    !s.is_empty() && s.trim() == s && !s.contains(['\n', '\r'])
}

impl PlanLine {
    /// A validated plan line.
    ///
    /// # Errors
    /// [`FapeError::Config`] naming `focus`, `rationale` or `pipeline` for a field that breaks
    /// the rules of [`PlanLine`].
    pub fn new(task: Task, focus: Focus, rationale: String, pipeline: Vec<String>) -> Result<Self> {
        if focus != task.focus() {
            return Err(config_error(
                OP,
                "focus",
                format!("`{focus}` contradicts task {task}, whose focus is {}", task.focus()),
            ));
        }
        if !is_one_trimmed_line(&rationale) {
            return Err(config_error(OP, "rationale", "must be one non-empty line"));
        }
        if pipeline.is_empty() {
            return Err(config_error(OP, "pipeline", "needs at least one step"));
        }
        if let Some(step) =
            pipeline.iter().find(|s| !is_one_trimmed_line(s) || s.contains("->") || s.contains(PIPELINE_KEY))
        {
            return Err(config_error(OP, "pipeline", format!("step `{step}` is empty, spans lines or holds `->`")));
        }
        Ok(Self { task, focus, rationale, pipeline })
    }

    /// Parses `Task: <task>, Focus: <focus>, Rationale: <text>, Pipeline: <step> -> <step>...`
    /// (surrounding whitespace ignored; the task name as [`Task::from_str`] reads it; the
    /// rationale runs to the last `, Pipeline:` and may hold commas).
    ///
    /// # Errors
    /// [`FapeError::Config`] naming the missing or invalid field, as [`PlanLine::new`] and
    /// [`Task::from_str`] say, or `line` when the line spans several lines.
    pub fn parse(line: &str) -> Result<Self> {
        let line = line.trim();
        if line.contains(['\n', '\r']) {
            return Err(config_error(OP, "line", "a plan is one line"));
        }
        let missing = |field: &'static str, key: &str| config_error(OP, field, format!("missing `{key}`"));
        let rest = line.strip_prefix("Task:").ok_or_else(|| missing("task", "Task:"))?;
        let (task, rest) = rest.split_once(", Focus:").ok_or_else(|| missing("focus", ", Focus:"))?;
        let (focus, rest) = rest.split_once(", Rationale:").ok_or_else(|| missing("rationale", ", Rationale:"))?;
        let (rationale, pipeline) = rest.rsplit_once(PIPELINE_KEY).ok_or_else(|| missing("pipeline", PIPELINE_KEY))?;
        let steps = pipeline.split("->").map(|s| s.trim().to_string()).collect();
        Self::new(task.parse()?, focus.parse()?, rationale.trim().to_string(), steps)
    }
}

/// Writes the line from its fields.
fn write_line(f: &mut impl fmt::Write, task: Task, focus: Focus, rationale: &str, pipeline: &[String]) -> fmt::Result {
    write!(f, "Task: {task}, Focus: {focus}, Rationale: {rationale}, Pipeline: {}", pipeline.join(" -> "))
}

impl fmt::Display for PlanLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_line(f, self.task, self.focus, &self.rationale, &self.pipeline)
    }
}

/// The built-in planner's plan for one image, with the statistics it read.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// What to restore.
    pub task: Task,
    /// Which band; `task.focus()`.
    pub focus: Focus,
    /// Why, citing the statistics.
    pub rationale: String,
    /// The steps, in order.
    pub pipeline: Vec<String>,
    /// Everything measured.
    pub stats: Statistics,
}

impl Plan {
    /// The plan line in FAPE-IR's format.
    pub fn line(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = write_line(&mut out, self.task, self.focus, &self.rationale, &self.pipeline);
        out
    }

    /// The plan of a validated line (from any planner) for an image with statistics `stats`.
    pub fn from_line(line: PlanLine, stats: Statistics) -> Self {
        Self { task: line.task, focus: line.focus, rationale: line.rationale, pipeline: line.pipeline, stats }
    }

    /// Parses and validates a plan line, see [`PlanLine::parse`].
    ///
    /// # Errors
    /// As [`PlanLine::parse`].
    pub fn parse(line: &str) -> Result<PlanLine> {
        PlanLine::parse(line)
    }

    /// The plan and its statistics as JSON: `task`, `focus`, `rationale`, `pipeline` (array),
    /// `line`, and `statistics` (`width`, `height` and every [`Statistics::measured`] value by
    /// name; NaN as null).
    pub fn to_json(&self) -> serde_json::Value {
        let mut stats = serde_json::Map::new();
        stats.insert("width".into(), self.stats.width.into());
        stats.insert("height".into(), self.stats.height.into());
        for (name, value) in self.stats.measured() {
            stats.insert(name.into(), value.into());
        }
        serde_json::json!({
            "task": self.task.name(),
            "focus": self.focus.name(),
            "rationale": self.rationale,
            "pipeline": self.pipeline,
            "line": self.line(),
            "statistics": stats,
        })
    }
}

/// The built-in planner: measures `image`'s [`Statistics`] and applies [`rules::decide`].
///
/// # Errors
/// [`FapeError::Shape`]/[`FapeError::Layout`] when `image` breaks its invariants;
/// [`FapeError::Config`] naming `image` when it holds a non-finite value.
pub fn plan(image: &Image) -> Result<Plan> {
    image.validate()?;
    if let Some(i) = image.data.iter().position(|v| !v.is_finite()) {
        return Err(config_error(OP, "image", format!("value {i} is not finite")));
    }
    let stats = Statistics::measure(image)?;
    let (task, rationale) = rules::decide(&stats);
    let pipeline = task.pipeline().iter().map(|s| s.to_string()).collect();
    Ok(Plan { task, focus: task.focus(), rationale, pipeline, stats })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_reads_a_fape_ir_line_and_rejects_bad_ones() {
        let line = "Task: deraining, Focus: high, Rationale: streaks, strong ones, Pipeline: a -> b c";
        let parsed = PlanLine::parse(line).unwrap();
        assert_eq!(parsed.task, Task::Deraining);
        assert_eq!(parsed.rationale, "streaks, strong ones");
        assert_eq!(parsed.pipeline, vec!["a", "b c"]);
        assert_eq!(parsed.to_string(), line);
        let loose =
            PlanLine::parse("  Task: Low-Light Enhancement, Focus: LOW, Rationale: dark, Pipeline: x ").unwrap();
        assert_eq!((loose.task, loose.focus), (Task::LowLightEnhancement, Focus::Low));
        for (bad, field) in [
            ("Task: dehazing, Focus: high, Rationale: r, Pipeline: a", "focus"),
            ("Task: sharpening, Focus: high, Rationale: r, Pipeline: a", "task"),
            ("Task: denoising, Focus: high, Pipeline: a", "rationale"),
            ("Task: denoising, Focus: high, Rationale: r", "pipeline"),
            ("Task: denoising, Focus: high, Rationale: r, Pipeline: a -> ", "pipeline"),
            ("Task: denoising, Focus: high, Rationale: , Pipeline: a", "rationale"),
            ("Focus: high", "task"),
            ("Task: denoising, Focus: high, Rationale: r\nsecond, Pipeline: a", "line"),
        ] {
            match PlanLine::parse(bad) {
                Err(FapeError::Config { field: f, .. }) => assert_eq!(f, field, "{bad}"),
                other => panic!("{bad}: expected a config error on {field}, got {other:?}"),
            }
        }
    }

    fn plan_line() -> impl Strategy<Value = PlanLine> {
        let step = "[a-z][a-z ,:.()-]{0,20}[a-z)]"; // no `>`, so no arrow
        (0..Task::ALL.len(), "[ -~]{0,60}[!-~]", proptest::collection::vec(step, 1..5)).prop_map(|(t, r, steps)| {
            let task = Task::ALL[t];
            PlanLine::new(task, task.focus(), r.trim().to_string(), steps).unwrap()
        })
    }

    proptest! {
        #[test]
        fn parse_inverts_display(line in plan_line()) {
            prop_assert_eq!(PlanLine::parse(&line.to_string()).unwrap(), line);
        }
    }

    #[test]
    fn plan_line_and_json_agree() {
        let image = Image::from_fn(64, 48, |x, y| [x as f32 / 64.0, y as f32 / 48.0, 0.5]);
        let plan = plan(&image).unwrap();
        assert_eq!(plan.task, Task::SuperResolution);
        let parsed = Plan::parse(&plan.line()).unwrap();
        assert_eq!((parsed.task, parsed.focus, &parsed.pipeline), (plan.task, plan.focus, &plan.pipeline));
        let json = plan.to_json();
        assert_eq!(json["task"], "super_resolution");
        assert_eq!(json["statistics"]["width"], 64);
        assert_eq!(json["line"], plan.line());
        for (w, h) in [(1, 1), (1, 7), (3, 600)] {
            let tiny = Image::from_fn(w, h, |x, y| [0.5, (x + y) as f32 * 0.001, 0.2]);
            // Degenerate extents plan without panicking; 600 px on one side is not small.
            let task = super::plan(&tiny).unwrap().task;
            assert_eq!(task == Task::SuperResolution, h < 512, "{w}x{h}: {task}");
        }
        let mut nan = image.clone();
        nan.data[5] = f32::NAN;
        assert!(matches!(super::plan(&nan), Err(FapeError::Config { field: "image", .. })));
    }
}
