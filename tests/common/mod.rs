//! Helpers shared by the integration tests: the `fape` binary's CLI rules ([`cli`]), seeded
//! random weights for any candle model, tensor conversions, and whether python3 has numpy.
#![allow(dead_code)] // each test crate uses a part

pub mod cli;
pub mod files;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use fape_kernels::pipeline::weights;
use fape_kernels::testing::{rng, uniform};

/// The pipeline's seeded synthetic weights ([`weights::synthetic_tensor`]: per name, scaled by
/// role, never zero) that also record every tensor they hand out, for f64 re-computations.
#[derive(Clone)]
pub struct SeededWeights {
    seed: u64,
    made: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl SeededWeights {
    /// Weights drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed, made: Arc::default() }
    }

    /// A CPU VarBuilder of `dtype` drawing from these weights.
    pub fn var_builder(&self, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, Device::Cpu)
    }

    /// Every tensor handed out so far, by full name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.made.lock().unwrap().clone()
    }

    /// The tensor handed out under `name`, as f64 values.
    pub fn get_f64(&self, name: &str) -> Vec<f64> {
        to_f64(&self.made.lock().unwrap()[name])
    }
}

impl SimpleBackend for SeededWeights {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = weights::synthetic_tensor(self.seed, name, s.dims(), dtype, dev)?;
        self.made.lock().unwrap().insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("seeded weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Whether `python3` can import numpy and safetensors (the numpy cross-checks' optional needs).
pub fn numpy_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import numpy, safetensors.numpy"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The values of `t` (any device, any float dtype) as f64.
pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// A CPU f32 tensor of `shape`, values uniform in `[lo, hi)` from `seed`.
pub fn random_tensor(seed: u64, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(uniform(&mut rng(seed), n, lo, hi), shape, &Device::Cpu).unwrap()
}
