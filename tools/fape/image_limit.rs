//! `--max-image-pixels`: the image-size limit of every command that reads images.

use std::path::Path;

use clap::Args;
use fape_kernels::pipeline::image::{Image, DEFAULT_MAX_PIXELS};
use fape_kernels::Result;

/// The flag that bounds what reading an image may cost.
#[derive(Args, Debug, Clone, Copy)]
pub struct ImageLimitArgs {
    /// Largest image read, in pixels (width x height; 67108864 = 8192 x 8192): a larger one is
    /// refused from its header, before any pixel is decoded.
    #[arg(long, value_name = "PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,
}

impl ImageLimitArgs {
    /// Reads the image at `path` under this limit ([`Image::load_limited`]).
    ///
    /// # Errors
    /// As [`Image::load_limited`].
    pub fn load(&self, path: &Path) -> Result<Image> {
        Image::load_limited(path, self.max_image_pixels)
    }
}
