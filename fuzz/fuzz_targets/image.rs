//! Image decoding through to the VAE's input tensor: PNG, JPEG or TIFF bytes (any bit depth,
//! alpha, grey, any size) decoded under a 2^16-pixel limit, then the pipeline's geometry,
//! downscale, reflect padding and grey conversion.
#![no_main]

use fape_kernels::pipeline::image::Image;
use fape_kernels::pipeline::restore::vae_input;

fape_fuzz::capped_allocator!();

/// The fuzzing limit: large enough for every layout, small enough for many runs a second.
const MAX_PIXELS: u64 = 1 << 16;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(image) = Image::from_bytes("fuzz-image", data, MAX_PIXELS) else {
        return;
    };
    assert!(image.data.iter().all(|v| (0.0..=1.0).contains(v)), "a decoded sample outside [0, 1]");
    let _ = image.to_grey();
    // A longest side of 64 px sends larger images through the downscale, as the pipeline does.
    let (geometry, signed) = vae_input(&image, 64, 16).expect("a decoded image is a valid VAE input");
    assert_eq!(signed.len(), 3 * geometry.padded.0 * geometry.padded.1);
});
