//! The frequency split made visible (what `fape split` writes): the low- and high-frequency
//! images of [`freq::freq_split`] and the log-magnitude spectrum of the grey image with the
//! cutoff drawn.

use super::image::Image;
use crate::backend::Device;
use crate::error::Result;
use crate::freq::{self, FreqSplitConfig};

/// Added to the high-frequency image for display: it is zero-mean, signed, so 0 shows as mid
/// grey.
pub const HIGH_OFFSET: f32 = 0.5;

/// The three display images.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitImages {
    /// `low` of the split, `[3,H,W]` (values may leave `[0,1]` slightly: ringing of the hard
    /// mask; saving clamps).
    pub low: Image,
    /// `high + HIGH_OFFSET`, `[3,H,W]`.
    pub high: Image,
    /// `log(1 + |fft2(grey)|)` fftshifted (DC at the centre, `(H/2, W/2)`), scaled to `[0,1]`
    /// by its maximum, in grey, with the hard mask's edge (the bins with `rho <= cutoff` that
    /// border one beyond it) in red.
    pub spectrum: Image,
}

/// The display images of `image` split under `config` on `device`.
///
/// # Errors
/// As [`freq::freq_split`] (an invalid config, an unavailable or unsupported backend) and
/// [`Image::validate`].
pub fn split_images(device: &Device, image: &Image, config: &FreqSplitConfig) -> Result<SplitImages> {
    let shape = image.shape();
    let out = freq::freq_split(device, image.view(&shape)?, config)?;
    let (w, h) = (image.width, image.height);
    let low = Image::new(w, h, out.low.data)?;
    let high = Image::new(w, h, out.high.data.iter().map(|v| v + HIGH_OFFSET).collect())?;
    Ok(SplitImages { low, high, spectrum: spectrum_image(image, config.cutoff) })
}

/// The spectrum image of [`SplitImages::spectrum`].
fn spectrum_image(image: &Image, cutoff: f64) -> Image {
    let (w, h) = (image.width, image.height);
    let bins = freq::fft2_real(&image.to_grey(), h, w);
    // Shifted position i holds bin (i - n/2) mod n.
    let unshift = |i: usize, n: usize| (i + n - n / 2) % n;
    let rho = |sy: usize, sx: usize| freq::rho(freq::fftfreq(h, unshift(sy, h)), freq::fftfreq(w, unshift(sx, w)));
    let log_mag: Vec<f32> =
        (0..h * w).map(|i| (1.0 + bins[unshift(i / w, h) * w + unshift(i % w, w)].norm()).ln()).collect();
    let max = log_mag.iter().cloned().fold(f32::MIN_POSITIVE, f32::max);
    Image::from_fn(w, h, |x, y| {
        let inside = rho(y, x) <= cutoff;
        let neighbours = [(x.wrapping_sub(1), y), (x + 1, y), (x, y.wrapping_sub(1)), (x, y + 1)];
        let edge = inside && neighbours.iter().any(|&(nx, ny)| nx < w && ny < h && rho(ny, nx) > cutoff);
        if edge {
            [1.0, 0.0, 0.0]
        } else {
            [log_mag[y * w + x] / max; 3]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_images_reassemble_and_the_spectrum_peaks_at_the_centre() {
        let image = Image::from_fn(40, 30, |x, y| [0.5 + 0.3 * ((x as f32) * 0.9).sin(), (y as f32) / 30.0, 0.2]);
        let split = split_images(&Device::Cpu, &image, &FreqSplitConfig::default()).unwrap();
        for i in 0..image.data.len() {
            let sum = split.low.data[i] + split.high.data[i] - HIGH_OFFSET;
            assert!((sum - image.data[i]).abs() < 1e-5, "value {i}: low + high = {sum}, image {}", image.data[i]);
        }
        let s = &split.spectrum;
        let centre = 15 * 40 + 20;
        assert_eq!(s.data[centre], 1.0, "DC is the largest bin and sits at (H/2, W/2)");
        let red = (0..s.pixels()).filter(|&i| s.data[i] == 1.0 && s.data[s.pixels() + i] == 0.0).count();
        assert!(red > 8, "the cutoff circle is drawn ({red} red pixels)");
    }
}
