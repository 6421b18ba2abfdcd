//! The frequency split as a candle `CustomOp1`: on the CPU through this crate's CPU backend, on
//! CUDA (feature `candle-cuda`) through this crate's kernels on candle's own stream, reading
//! and writing candle's buffers with no host copies.
//!
//! The op produces one packed f32 vector `[low | high | band_energy]`; [`freq_split`] returns
//! three views into it (no copies).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::{validate_shape, FreqDims, FreqSplitConfig, OP};
use crate::backend::Device;
use crate::candle_ops::{candle_error, cpu_slice};
use crate::tensor::View;

/// The packed op: `x` `[B,C,H,W]` f32 -> `[2 B C H W + B C nbands]` f32.
struct FreqSplitOp {
    config: FreqSplitConfig,
    dims: FreqDims,
}

impl FreqSplitOp {
    fn packed_len(&self) -> usize {
        2 * self.dims.images * self.dims.pixels() + self.dims.images * self.config.nbands()
    }
}

impl CustomOp1 for FreqSplitOp {
    fn name(&self) -> &'static str {
        "fape-freq-split"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice::<f32>(OP, "x", storage, layout)?;
        let view = View::new(OP, "x", x, layout.dims()).map_err(candle_error)?;
        let out = super::freq_split(&Device::Cpu, view, &self.config).map_err(candle_error)?;
        let mut packed = Vec::with_capacity(self.packed_len());
        packed.extend_from_slice(&out.low.data);
        packed.extend_from_slice(&out.high.data);
        packed.extend_from_slice(&out.band_energy.data);
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{split_device, CudaFftPath};
        use crate::backend::cuda::CudaDevice;
        use crate::candle_ops::cuda_view;

        let x = cuda_view::<f32>(OP, "x", storage, layout)?;
        let candle_device = storage.device.clone();
        let device = CudaDevice::on_stream(candle_device.cuda_stream()).map_err(candle_error)?;
        let len = self.dims.images * self.dims.pixels();
        let total = self.packed_len();
        // SAFETY: uninitialised memory; `split_device` writes every element below `total`
        // (low and high at every pixel, every band energy) before the tensor is read, on
        // candle's stream, which orders those writes before any later use of the tensor.
        let mut packed = unsafe { candle_device.alloc::<f32>(total) }?;
        {
            let (mut low, mut rest) = packed.split_at_mut(len);
            let (mut high, mut energy) = rest.split_at_mut(len);
            split_device(&device, &x, &mut low, &mut high, &mut energy, self.dims, &self.config, CudaFftPath::Auto)
                .map_err(candle_error)?;
        }
        let storage = candle_core::CudaStorage::wrap_cuda_slice(packed, candle_device);
        Ok((storage, Shape::from(total)))
    }
}

/// The frequency split of a candle tensor: `x` `[B,C,H,W]` f32 (any `H`, `W` >= 1; strided
/// input is made contiguous first) on the CPU or, with feature `candle-cuda`, on CUDA on
/// candle's stream. Returns `(low, high, band_energy)`: `low`, `high` `[B,C,H,W]` and
/// `band_energy` `[B,C,nbands]`, all f32, as [`freq_split`](super::freq_split) defines them.
///
/// # Errors
/// A wrapped [`crate::FapeError`]: `Shape` naming `x` when it is empty or not rank 4, `Config`
/// as [`FreqSplitConfig::validate`], the backend's errors; candle's dtype error when `x` is
/// not f32; candle's own error on other devices (Metal).
pub fn freq_split(x: &Tensor, config: &FreqSplitConfig) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let dims = validate_shape(x.dims(), config).map_err(candle_error)?;
    let x = x.contiguous()?;
    let op = FreqSplitOp { config: config.clone(), dims };
    let packed = x.apply_op1_no_bwd(&op)?;
    let len = dims.images * dims.pixels();
    let low = packed.narrow(0, 0, len)?.reshape(x.dims())?;
    let high = packed.narrow(0, len, len)?.reshape(x.dims())?;
    let s = x.dims();
    let energy = packed.narrow(0, 2 * len, dims.images * config.nbands())?.reshape((s[0], s[1], config.nbands()))?;
    Ok((low, high, energy))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device as CandleDevice};

    use super::*;
    use crate::freq::{reference, tolerance_f32, MaskKind, BAND_ENERGY_TOLERANCE};
    use crate::testing::{assert_close, rng, uniform};

    #[test]
    fn cpu_op_matches_the_reference() {
        let shape = [2, 3, 19, 24];
        let x = uniform(&mut rng(12), shape.iter().product(), -1.0, 1.0);
        for mask in MaskKind::ALL {
            let config = FreqSplitConfig { cutoff: 0.25, mask, ..FreqSplitConfig::default() };
            let t = Tensor::from_slice(&x, &shape, &CandleDevice::Cpu).unwrap();
            let (low, high, energy) = freq_split(&t, &config).unwrap();
            assert_eq!(low.dims(), shape);
            assert_eq!(high.dims(), shape);
            assert_eq!(energy.dims(), [2, 3, 5]);
            let expected = reference::freq_split(View::new(OP, "x", &x, &shape).unwrap(), &config).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let tol = tolerance_f32(19, 24);
            assert_close("candle low", &flat(&low), &expected.low.data, tol);
            assert_close("candle high", &flat(&high), &expected.high.data, tol);
            assert_close("candle band_energy", &flat(&energy), &expected.band_energy.data, BAND_ENERGY_TOLERANCE);
        }
    }

    /// On a GPU machine with `--features candle-cuda` and `FAPE_TEST_CUDA=1`: the op on a candle
    /// CUDA tensor (every route: fused, three passes, cuFFT) against the reference.
    #[cfg(feature = "candle-cuda")]
    #[test]
    fn cuda_op_on_candles_stream_matches_the_reference() {
        let test = "cuda_op_on_candles_stream_matches_the_reference";
        if crate::testing::device_or_skip(test, crate::DeviceKind::Cuda).is_none() {
            return;
        }
        let device = CandleDevice::new_cuda(0).expect("candle CUDA device");
        for shape in [[2, 3, 64, 64], [1, 2, 256, 512], [2, 1, 30, 50]] {
            let x = uniform(&mut rng(13), shape.iter().product(), -1.0, 1.0);
            let config = FreqSplitConfig::default();
            let t = Tensor::from_slice(&x, &shape, &device).unwrap();
            let (low, high, energy) = freq_split(&t, &config).unwrap();
            assert!(low.device().is_cuda() && high.device().is_cuda() && energy.device().is_cuda());
            let expected = reference::freq_split(View::new(OP, "x", &x, &shape).unwrap(), &config).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let tol = tolerance_f32(shape[2], shape[3]);
            assert_close(&format!("{shape:?} low"), &flat(&low), &expected.low.data, tol);
            assert_close(&format!("{shape:?} high"), &flat(&high), &expected.high.data, tol);
            let energy_expected = &expected.band_energy.data;
            assert_close(&format!("{shape:?} band_energy"), &flat(&energy), energy_expected, BAND_ENERGY_TOLERANCE);
        }
    }

    #[test]
    fn cpu_op_takes_strided_input_and_rejects_bad_input() {
        let x = uniform(&mut rng(2), 2 * 8 * 6, -1.0, 1.0);
        let t = Tensor::from_slice(&x, (2, 1, 8, 6), &CandleDevice::Cpu).unwrap();
        let strided = t.transpose(2, 3).unwrap();
        let config = FreqSplitConfig::default();
        let (low, _, _) = freq_split(&strided, &config).unwrap();
        let contiguous = strided.contiguous().unwrap();
        let (expected, _, _) = freq_split(&contiguous, &config).unwrap();
        assert_eq!(
            low.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            expected.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );

        let rank3 = Tensor::zeros((2, 8, 6), DType::F32, &CandleDevice::Cpu).unwrap();
        assert!(freq_split(&rank3, &config).unwrap_err().to_string().contains("`x`"));
        let empty = Tensor::zeros((1, 1, 0, 6), DType::F32, &CandleDevice::Cpu).unwrap();
        assert!(freq_split(&empty, &config).is_err());
        let bad = FreqSplitConfig { cutoff: f64::NAN, ..FreqSplitConfig::default() };
        assert!(freq_split(&t, &bad).unwrap_err().to_string().contains("cutoff"));
        let f64_input = t.to_dtype(DType::F64).unwrap();
        assert!(freq_split(&f64_input, &config).is_err());
    }
}
