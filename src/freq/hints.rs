//! The planner's spectral hints: radial band energies of the grey image, for band edges the
//! planner chooses (rain = mid-band over low-band energy, blur = outer over inner band).
//!
//! Grey is ITU-R BT.601 luma, `Y = 0.299 R + 0.587 G + 0.114 B`, formed per pixel in f32 on
//! the host; the energies are then [`freq_split`](super::freq_split)'s `band_energy` of the
//! `[B,1,H,W]` grey image on the chosen backend (so every backend gives the reference's
//! numbers within [`BAND_ENERGY_TOLERANCE`](super::BAND_ENERGY_TOLERANCE)); on CUDA only the
//! energies are copied back.

use super::{freq_split, FreqSplitConfig, MaskKind, OP};
use crate::backend::Device;
use crate::error::Result;
use crate::tensor::{expect_nonempty, expect_shape, Tensor, View};

/// ITU-R BT.601 luma weights of R, G, B.
pub const BT601_LUMA: [f32; 3] = [0.299, 0.587, 0.114];

/// `[B,H,W]` grey (BT.601 luma) of `rgb` `[B,3,H,W]`, validated by the caller.
fn grey(rgb: &View<'_, f32>) -> Vec<f32> {
    let s = rgb.shape();
    let pixels = s[2] * s[3];
    let mut out = Vec::with_capacity(s[0] * pixels);
    for image in rgb.data().chunks(3 * pixels) {
        let (r, rest) = image.split_at(pixels);
        let (g, b) = rest.split_at(pixels);
        out.extend(
            r.iter().zip(g).zip(b).map(|((&r, &g), &b)| BT601_LUMA[0] * r + BT601_LUMA[1] * g + BT601_LUMA[2] * b),
        );
    }
    out
}

/// Band energies of the BT.601 grey image of `rgb` (`[B,3,H,W]` f32, any `H`, `W` >= 1) between
/// `edges` (at least 2, strictly increasing, within `[0,1]`, in the normalised radius `rho` of
/// [`freq_split`](super::freq_split)), on `device`. Returns `[B,nbands]` f32 with
/// `nbands = edges.len() - 1`: `sum |fft2(grey)|^2 / (H W)` over each band's bins, so with edges
/// covering `[0,1]` the bands of an image sum to `sum grey^2`.
///
/// # Errors
/// [`crate::FapeError::Shape`] naming `x` when `rgb` is empty or not `[B,3,H,W]`;
/// [`crate::FapeError::Config`] naming `edges` as [`FreqSplitConfig::validate`];
/// the backend's errors as [`freq_split`](super::freq_split).
pub fn band_energies_grey(device: &Device, rgb: View<'_, f32>, edges: &[f64]) -> Result<Tensor<f32>> {
    expect_shape(OP, "x", &rgb, "[B,3,H,W]", &[None, Some(3), None, None])?;
    expect_nonempty(OP, "x", &rgb)?;
    // The cutoff and mask shape only `low`/`high`, which are dropped here.
    let config = FreqSplitConfig { cutoff: 1.0, mask: MaskKind::Hard, edges: edges.to_vec() };
    config.validate()?;
    let s = rgb.shape();
    let grey = grey(&rgb);
    let shape = [s[0], 1, s[2], s[3]];
    let grey = View::new(OP, "x", &grey, &shape)?;
    let energy = match device {
        // Only the energies come back from the GPU.
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let mut buffers = super::CudaSplitBuffers::new(d, grey, &config)?;
            buffers.run(d, &config, super::CudaFftPath::Auto)?;
            buffers.download_band_energy(d)?.data
        }
        _ => freq_split(device, grey, &config)?.band_energy.data,
    };
    Tensor::new(energy, vec![s[0], config.nbands()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::freq::reference;
    use crate::freq::BAND_ENERGY_TOLERANCE;
    use crate::testing::{assert_close, rng, uniform};
    use crate::FapeError;

    /// Grey of a pixel in f64, for the reference side.
    fn luma(r: f32, g: f32, b: f32) -> f64 {
        0.299 * f64::from(r) + 0.587 * f64::from(g) + 0.114 * f64::from(b)
    }

    #[test]
    fn matches_the_reference_split_of_the_luma_image_on_host_backends() {
        let (b, h, w) = (2, 19, 24);
        let rgb = uniform(&mut rng(41), b * 3 * h * w, 0.0, 1.0);
        let shape = [b, 3, h, w];
        let edges = [0.0, 0.1, 0.3, 0.7, 1.0];
        let pixels = h * w;
        let grey: Vec<f64> = rgb
            .chunks(3 * pixels)
            .flat_map(|im| (0..pixels).map(move |i| luma(im[i], im[pixels + i], im[2 * pixels + i])))
            .collect();
        let config = FreqSplitConfig { cutoff: 0.5, mask: MaskKind::Gaussian, edges: edges.to_vec() };
        let grey_shape = [b, 1, h, w];
        let expected = reference::freq_split(View::new(OP, "x", &grey, &grey_shape).unwrap(), &config).unwrap();
        for device in [Device::Reference, Device::Cpu] {
            let got = band_energies_grey(&device, View::new(OP, "x", &rgb, &shape).unwrap(), &edges).unwrap();
            assert_eq!(got.shape, [b, 4]);
            assert_close(
                &format!("{device:?} grey band energies"),
                &got.data,
                &expected.band_energy.data,
                BAND_ENERGY_TOLERANCE,
            );
        }
    }

    #[test]
    fn bands_covering_the_unit_interval_sum_to_the_grey_energy() {
        let (h, w) = (8, 8);
        // A grey pixel (r = g = b) has luma r, since the weights sum to 1.
        let v = uniform(&mut rng(5), h * w, -1.0, 1.0);
        let rgb: Vec<f32> = v.iter().chain(&v).chain(&v).copied().collect();
        let shape = [1, 3, h, w];
        let got =
            band_energies_grey(&Device::Cpu, View::new(OP, "x", &rgb, &shape).unwrap(), &[0.0, 0.5, 1.0]).unwrap();
        let total: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        let sum = f64::from(got.data[0]) + f64::from(got.data[1]);
        assert!((sum - total).abs() <= 1e-5 * total, "{sum} vs {total}");
    }

    #[test]
    fn rejects_non_rgb_input_and_bad_edges() {
        let x = vec![0.5f32; 2 * 4 * 4];
        let shape = [1, 2, 4, 4];
        match band_energies_grey(&Device::Cpu, View::new(OP, "x", &x, &shape).unwrap(), &[0.0, 1.0]) {
            Err(FapeError::Shape { tensor, .. }) => assert_eq!(tensor, "x"),
            other => panic!("expected a shape error, got {other:?}"),
        }
        let x = vec![0.5f32; 3 * 4 * 4];
        let shape = [1, 3, 4, 4];
        for edges in [&[0.5, 0.2][..], &[0.0, 1.5], &[0.3]] {
            match band_energies_grey(&Device::Cpu, View::new(OP, "x", &x, &shape).unwrap(), edges) {
                Err(FapeError::Config { field, .. }) => assert_eq!(field, "edges"),
                other => panic!("{edges:?}: expected a config error naming edges, got {other:?}"),
            }
        }
        let empty = [1, 3, 0, 4];
        match band_energies_grey(&Device::Cpu, View::new(OP, "x", &[], &empty).unwrap(), &[0.0, 1.0]) {
            Err(FapeError::Shape { tensor, .. }) => assert_eq!(tensor, "x"),
            other => panic!("expected a shape error, got {other:?}"),
        }
    }
}
