//! Helpers shared by the integration tests: the `fape` binary's CLI rules ([`cli`]), seeded
//! random weights for any candle model, and tensor conversions.
#![allow(dead_code)] // each test crate uses a part

pub mod cli;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use fape_kernels::testing::{rng, uniform};

/// Seeded random weights, each tensor drawn from a generator seeded by the seed and its name:
/// GroupNorm scales near 1 and shifts near 0 (never exactly), Kaiming-uniform weights, uniform
/// biases. Records every tensor it hands out.
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

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl SimpleBackend for SeededWeights {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut g = rng(self.seed ^ name_hash(name));
        let n = s.elem_count();
        let values = match h {
            Init::Const(c) => uniform(&mut g, n, -0.2, 0.2).into_iter().map(|v| v + c as f32).collect(),
            Init::Uniform { lo, up } => uniform(&mut g, n, lo as f32, up as f32),
            Init::Kaiming { .. } | Init::Randn { .. } => {
                let fan_in: usize = s.dims()[1..].iter().product();
                let bound = (6.0 / fan_in as f32).sqrt();
                uniform(&mut g, n, -bound, bound)
            }
        };
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
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

/// The values of `t` (any device, any float dtype) as f64.
pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// A CPU f32 tensor of `shape`, values uniform in `[lo, hi)` from `seed`.
pub fn random_tensor(seed: u64, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(uniform(&mut rng(seed), n, lo, hi), shape, &Device::Cpu).unwrap()
}
