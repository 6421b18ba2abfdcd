//! `fape check` cases of [`freq_split`]: seeded inputs uniform in `[-1,1)` at awkward shapes
//! (odd, prime, 1-pixel, non-square), both masks, one row per output tensor.

use super::reference::freq_split as reference;
use super::{freq_split, tolerance_f32, FreqSplitConfig, MaskKind, BAND_ENERGY_TOLERANCE, OP};
use crate::backend::Device;
use crate::check::{CaseSet, CheckRow};
use crate::tensor::View;
use crate::testing::{rng, uniform};

/// `[B,C,H,W]` of the default cases: seconds on a CPU for every host backend. On CUDA they take
/// every route: 64x64 the fused kernel, 256x32 the three passes, the others cuFFT.
const DEFAULT_SHAPES: [[usize; 4]; 6] =
    [[1, 1, 1, 1], [1, 3, 7, 5], [2, 3, 64, 64], [1, 16, 64, 64], [2, 1, 33, 20], [1, 2, 256, 32]];

/// The production image sizes [`CaseSet::Large`] adds.
const LARGE_SHAPES: [[usize; 4]; 2] = [[1, 3, 512, 512], [1, 1, 1024, 2048]];

/// The rows of every case in `cases` on `device`.
pub(crate) fn check_rows(device: &Device, cases: CaseSet) -> Vec<CheckRow> {
    let large: &[[usize; 4]] = match cases {
        CaseSet::Default => &[],
        CaseSet::Large => &LARGE_SHAPES,
    };
    DEFAULT_SHAPES
        .iter()
        .chain(large)
        .enumerate()
        .flat_map(|(i, shape)| {
            MaskKind::ALL.into_iter().flat_map(move |mask| {
                let config = FreqSplitConfig { mask, ..FreqSplitConfig::default() };
                check_case(device, *shape, &config, 0xF4E0 + i as u64)
            })
        })
        .collect()
}

/// The three rows (`low`, `high`, `band_energy`) of one case, or one row for the op when it
/// errs (a backend without the op gives a non-failing n/a row).
fn check_case(device: &Device, shape: [usize; 4], config: &FreqSplitConfig, seed: u64) -> Vec<CheckRow> {
    let x = uniform(&mut rng(seed), shape.iter().product(), -1.0, 1.0);
    let label = format!("{}x{}x{}x{} {}", shape[0], shape[1], shape[2], shape[3], config.mask.name());
    let row_name = |output: &str| format!("{OP}.{output}");
    let outputs = View::new(OP, "x", &x, &shape)
        .and_then(|view| Ok((freq_split(device, view, config)?, reference(view, config)?)));
    let (got, expected) = match outputs {
        Ok(pair) => pair,
        Err(err) => return vec![CheckRow::errored(OP.to_string(), device, "f32", label, err)],
    };
    let tol = tolerance_f32(shape[2], shape[3]);
    vec![
        CheckRow::compared(row_name("low"), device, label.clone(), &got.low.data, &expected.low.data, tol),
        CheckRow::compared(row_name("high"), device, label.clone(), &got.high.data, &expected.high.data, tol),
        CheckRow::compared(
            row_name("band_energy"),
            device,
            label,
            &got.band_energy.data,
            &expected.band_energy.data,
            BAND_ENERGY_TOLERANCE,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cases_pass_on_the_host_backends() {
        for device in [Device::Reference, Device::Cpu] {
            let start = std::time::Instant::now();
            let rows = check_rows(&device, CaseSet::Default);
            eprintln!("freq check_rows(Default) on {device:?}: {:?}", start.elapsed());
            assert_eq!(rows.len(), DEFAULT_SHAPES.len() * MaskKind::ALL.len() * 3);
            for row in &rows {
                assert!(!row.failed(), "{row}");
            }
        }
    }
}
