//! `fape restore DIR -o OUT_DIR [--shard I/N]`: every image of a folder through the pipeline,
//! resumable (existing outputs are skipped) and shardable over independent processes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use fape_kernels::pipeline::flux::ExecPath;
use fape_kernels::pipeline::restore::{restore, Pipeline};
use fape_kernels::{FapeError, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::image_limit::ImageLimitArgs;
use crate::restore::{synthetic_note, PipelineArgs};

/// The file extensions `fape restore` reads from a folder and writes (compared case-insensitively).
const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "tif", "tiff"];

/// Whether `path` ends in one of [`IMAGE_EXTENSIONS`], in any case.
pub fn has_image_extension(path: &Path) -> bool {
    let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    extension.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// `--shard I/N`: file `k` of the sorted list belongs to shard `k mod N`; this process takes
/// shard `I` (0-based, as SLURM array and Kubernetes indexed-job indices count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: usize,
    count: usize,
}

impl Shard {
    /// The whole list (`0/1`).
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// The items of `sorted` this shard takes, in order.
    pub fn take<T>(self, sorted: Vec<T>) -> Vec<T> {
        sorted.into_iter().enumerate().filter(|(k, _)| k % self.count == self.index).map(|(_, item)| item).collect()
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{s}` is not I/N with 0 <= I < N (such as 0/4)");
        let (index, count) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = index.parse().map_err(|_| bad())?;
        let count: usize = count.parse().map_err(|_| bad())?;
        if index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

fn file_error(path: &Path, message: impl Into<String>) -> FapeError {
    FapeError::File { path: path.display().to_string(), message: message.into() }
}

/// The images directly in `dir` (not in subfolders; hidden files passed over), sorted by name.
///
/// # Errors
/// [`FapeError::File`] when `dir` cannot be listed or holds no image.
pub fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| file_error(dir, format!("cannot list folder: {e}")))?;
    let mut images = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| file_error(dir, format!("cannot list folder: {e}")))?.path();
        let visible = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| !n.starts_with('.'));
        if visible && has_image_extension(&path) && path.is_file() {
            images.push(path);
        }
    }
    if images.is_empty() {
        return Err(file_error(dir, format!("no images in the folder (looked for .{})", IMAGE_EXTENSIONS.join(", ."))));
    }
    images.sort();
    Ok(images)
}

/// Creates `out_dir` if needed and checks that it is a folder other than `dir`.
fn prepare_output(dir: &Path, out_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(out_dir).map_err(|e| file_error(out_dir, format!("cannot create output folder: {e}")))?;
    let canonical = |p: &Path| p.canonicalize().map_err(|e| file_error(p, format!("cannot resolve: {e}")));
    if canonical(dir)? == canonical(out_dir)? {
        return Err(file_error(out_dir, "the output folder is the input folder: give another -o"));
    }
    Ok(())
}

/// Restores `input` to `target`, writing a temporary file beside it first so that an
/// interrupted run never leaves a partial output a rerun would skip.
fn restore_one(
    input: &Path,
    target: &Path,
    pipeline: &Pipeline,
    images: ImageLimitArgs,
    path: ExecPath,
) -> Result<String> {
    let image = images.load(input)?;
    let named = |err: FapeError| file_error(input, err.to_string());
    let restored = restore(&image, pipeline, path).map_err(named)?;
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("output");
    let partial = target.with_file_name(format!(".fape-partial-{}-{name}", std::process::id()));
    let written = restored.image.save(&partial).and_then(|()| {
        std::fs::rename(&partial, target).map_err(|e| file_error(target, format!("cannot move output in place: {e}")))
    });
    if let Err(err) = written {
        // The partial file may not exist; its removal failing changes nothing.
        let _ = std::fs::remove_file(&partial);
        return Err(named(err));
    }
    Ok(format!("{}, {:.1} ms", restored.plan.task, restored.timings.total().as_secs_f64() * 1e3))
}

/// Restores this shard's images of `dir` into `out_dir` (same file names, so same formats),
/// skipping those whose output exists. Images that fail are reported and passed over.
///
/// # Errors
/// An unreadable or empty `dir`, an unusable `out_dir`, pipeline load errors; after the run,
/// [`FapeError::File`] naming `dir` when any image failed.
pub fn run(dir: &Path, out_dir: &Path, shard: Option<Shard>, args: &PipelineArgs, path: ExecPath) -> Result<()> {
    let all = images_in(dir)?;
    let total = all.len();
    prepare_output(dir, out_dir)?;
    let shard = shard.unwrap_or(Shard::WHOLE);
    let jobs = shard.take(all).into_iter().filter_map(|input| Some((out_dir.join(input.file_name()?), input)));
    let (done, todo): (Vec<_>, Vec<_>) = jobs.partition(|(target, _)| target.exists());
    println!(
        "{}: {total} images, shard {shard} takes {}: {} already in {}, {} to restore",
        dir.display(),
        done.len() + todo.len(),
        done.len(),
        out_dir.display(),
        todo.len()
    );
    if todo.is_empty() {
        return Ok(());
    }
    let pipeline = args.load(false)?;
    let note = synthetic_note(pipeline.weights());
    if let Some(note) = &note {
        println!("{note}");
    }
    let style = ProgressStyle::with_template("restore [{bar:30}] {pos}/{len} {wide_msg} ({elapsed}, eta {eta})")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::new(todo.len() as u64).with_style(style);
    let mut failed = 0usize;
    for (target, input) in &todo {
        bar.set_message(input.display().to_string());
        match restore_one(input, target, &pipeline, args.images, path) {
            Ok(summary) => bar.suspend(|| println!("restored {} -> {} ({summary})", input.display(), target.display())),
            Err(err) => {
                failed += 1;
                let message = err.to_string();
                bar.suspend(|| eprintln!("error: {}", message.lines().next().unwrap_or_default()));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("done: {} restored, {} skipped (output exists), {failed} failed", todo.len() - failed, done.len());
    if let Some(note) = note {
        println!("{note}");
    }
    if failed > 0 {
        return Err(file_error(
            dir,
            format!("{failed} of {} images failed (listed above); a rerun retries them", todo.len()),
        ));
    }
    Ok(())
}
