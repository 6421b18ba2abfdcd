//! FLUX's autoencoder on seeded random weights: the diffusers layout (names, shapes, parameter
//! count), shapes on awkward sizes, each block and the whole encoder and decoder against a direct
//! f64 computation, the latent normalisation, bf16 against f32, and errors that name a missing or mis-shaped tensor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use fape_kernels::pipeline::vae::blocks::{AttentionBlock, Downsample, ResnetBlock, Upsample};
use fape_kernels::pipeline::vae::{Vae, VaeConfig, NORM_EPS};
use fape_kernels::testing::assert_close;

mod common;
use common::{random_tensor, to_f64, SeededWeights};

/// f32 blocks against the f64 computation (rel-L2).
const TOLERANCE_F32: f64 = 1e-5;
/// A whole bf16 encode/decode against f32 (rel-L2): bf16 keeps 8 bits of mantissa.
#[cfg(feature = "candle-cuda")]
const TOLERANCE_BF16: f64 = 5e-2;

/// Records the names and shapes a model asks for, handing out zeros: a census of the layout,
/// never run.
#[derive(Clone, Default)]
struct Census(Arc<Mutex<HashMap<String, Vec<usize>>>>);

impl SimpleBackend for Census {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.lock().unwrap().insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("census needs a shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Looks a tensor up by its full name, as f64 values.
type Weights<'a> = &'a dyn Fn(&str) -> Vec<f64>;

/// A dense f64 `[C, H, W]` image with the operations of the blocks, for the direct computations.
#[derive(Clone)]
struct Planes {
    c: usize,
    h: usize,
    w: usize,
    v: Vec<f64>,
}

impl Planes {
    fn at(&self, c: usize, y: isize, x: isize) -> f64 {
        if y < 0 || x < 0 || y >= self.h as isize || x >= self.w as isize {
            0.0
        } else {
            self.v[(c * self.h + y as usize) * self.w + x as usize]
        }
    }

    /// Convolution by `name.weight` `[cout, C, k, k]` and `name.bias`, zero padding `pad_before`
    /// at the top/left and `pad_after` at the bottom/right, and `stride`.
    fn conv(&self, w: Weights, name: &str, stride: usize, pad_before: usize, pad_after: usize) -> Self {
        let (weight, bias) = (w(&format!("{name}.weight")), w(&format!("{name}.bias")));
        let cout = bias.len();
        let k = ((weight.len() / (cout * self.c)) as f64).sqrt().round() as usize;
        let oh = (self.h + pad_before + pad_after - k) / stride + 1;
        let ow = (self.w + pad_before + pad_after - k) / stride + 1;
        let mut v = vec![0.0; cout * oh * ow];
        for o in 0..cout {
            for y in 0..oh {
                for x in 0..ow {
                    let mut acc = bias[o];
                    for c in 0..self.c {
                        for ky in 0..k {
                            for kx in 0..k {
                                let sy = (y * stride + ky) as isize - pad_before as isize;
                                let sx = (x * stride + kx) as isize - pad_before as isize;
                                acc += weight[((o * self.c + c) * k + ky) * k + kx] * self.at(c, sy, sx);
                            }
                        }
                    }
                    v[(o * oh + y) * ow + x] = acc;
                }
            }
        }
        Self { c: cout, h: oh, w: ow, v }
    }

    /// A 3x3 convolution with padding 1.
    fn conv3(&self, w: Weights, name: &str) -> Self {
        self.conv(w, name, 1, 1, 1)
    }

    /// GroupNorm by `name.weight`, `name.bias` with `groups` groups.
    fn group_norm(&self, w: Weights, name: &str, groups: usize) -> Self {
        let (scale, shift) = (w(&format!("{name}.weight")), w(&format!("{name}.bias")));
        let per = self.c / groups * self.h * self.w;
        let mut v = self.v.clone();
        for g in 0..groups {
            let chunk = &mut v[g * per..(g + 1) * per];
            let mean = chunk.iter().sum::<f64>() / per as f64;
            let var = chunk.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / per as f64;
            for (i, x) in chunk.iter_mut().enumerate() {
                let c = g * (self.c / groups) + i / (self.h * self.w);
                *x = (*x - mean) / (var + NORM_EPS).sqrt() * scale[c] + shift[c];
            }
        }
        Self { v, ..self.clone() }
    }

    fn silu(&self) -> Self {
        Self { v: self.v.iter().map(|x| x / (1.0 + (-x).exp())).collect(), ..self.clone() }
    }

    fn add(&self, other: &Self) -> Self {
        Self { v: self.v.iter().zip(&other.v).map(|(a, b)| a + b).collect(), ..self.clone() }
    }

    /// The resnet block under `prefix` (with `conv_shortcut` when conv1 changes the channels).
    fn resnet(&self, w: Weights, prefix: &str, groups: usize) -> Self {
        let name = |n: &str| format!("{prefix}.{n}");
        let h = self.group_norm(w, &name("norm1"), groups).silu().conv3(w, &name("conv1"));
        let h = h.group_norm(w, &name("norm2"), groups).silu().conv3(w, &name("conv2"));
        let skip = if h.c == self.c { self.clone() } else { self.conv(w, &name("conv_shortcut"), 1, 0, 0) };
        skip.add(&h)
    }

    /// The single-head attention block under `prefix`.
    fn attention(&self, w: Weights, prefix: &str, groups: usize) -> Self {
        let name = |n: &str| format!("{prefix}.{n}");
        let (c, t) = (self.c, self.h * self.w);
        let n = self.group_norm(w, &name("group_norm"), groups);
        // Token i, channel j of `src` is src(i, j); a projection returns [token][channel].
        let project = |layer: &str, src: &dyn Fn(usize, usize) -> f64| -> Vec<Vec<f64>> {
            let (wm, bias) = (w(&name(&format!("{layer}.weight"))), w(&name(&format!("{layer}.bias"))));
            (0..t)
                .map(|i| (0..c).map(|o| bias[o] + (0..c).map(|j| wm[o * c + j] * src(i, j)).sum::<f64>()).collect())
                .collect()
        };
        let normed = |i: usize, j: usize| n.v[j * t + i];
        let (q, k, v) = (project("to_q", &normed), project("to_k", &normed), project("to_v", &normed));
        let mut attended = vec![vec![0.0; c]; t];
        for i in 0..t {
            let scores: Vec<f64> =
                (0..t).map(|m| (0..c).map(|j| q[i][j] * k[m][j]).sum::<f64>() / (c as f64).sqrt()).collect();
            let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (m, em) in e.iter().enumerate() {
                for j in 0..c {
                    attended[i][j] += em / sum * v[m][j];
                }
            }
        }
        let out = project("to_out.0", &|i, j| attended[i][j]);
        let v = (0..c).flat_map(|j| (0..t).map(move |i| (j, i))).map(|(j, i)| out[i][j] + self.v[j * t + i]).collect();
        Self { v, ..self.clone() }
    }

    /// Zero pad one row and column at the bottom/right, 3x3 stride-2 `prefix.conv`.
    fn downsample(&self, w: Weights, prefix: &str) -> Self {
        self.conv(w, &format!("{prefix}.conv"), 2, 0, 1)
    }

    /// Nearest 2x, then the 3x3 `prefix.conv`.
    fn upsample(&self, w: Weights, prefix: &str) -> Self {
        let (h, wd) = (2 * self.h, 2 * self.w);
        let v = (0..self.c * h * wd)
            .map(|i| self.at(i / (h * wd), ((i / wd) % h / 2) as isize, (i % wd / 2) as isize))
            .collect();
        Self { c: self.c, h, w: wd, v }.conv3(w, &format!("{prefix}.conv"))
    }

    fn mid_block(&self, w: Weights, prefix: &str, groups: usize) -> Self {
        self.resnet(w, &format!("{prefix}.resnets.0"), groups)
            .attention(w, &format!("{prefix}.attentions.0"), groups)
            .resnet(w, &format!("{prefix}.resnets.1"), groups)
    }

    /// The whole encoder's mean, normalised: `(mean - shift) * scale`.
    fn encode(&self, w: Weights, cfg: &VaeConfig) -> Self {
        let g = cfg.norm_groups;
        let levels = cfg.block_out_channels.len();
        let mut x = self.conv3(w, "encoder.conv_in");
        for i in 0..levels {
            for j in 0..cfg.layers_per_block {
                x = x.resnet(w, &format!("encoder.down_blocks.{i}.resnets.{j}"), g);
            }
            if i + 1 < levels {
                x = x.downsample(w, &format!("encoder.down_blocks.{i}.downsamplers.0"));
            }
        }
        let x = x.mid_block(w, "encoder.mid_block", g);
        let moments = x.group_norm(w, "encoder.conv_norm_out", g).silu().conv3(w, "encoder.conv_out");
        let plane = moments.h * moments.w;
        let v = moments.v[..cfg.latent_channels * plane]
            .iter()
            .map(|m| (m - cfg.shift_factor) * cfg.scaling_factor)
            .collect();
        Self { c: cfg.latent_channels, v, ..moments }
    }

    /// The whole decoder of a normalised latent, clamped to [-1, 1].
    fn decode(&self, w: Weights, cfg: &VaeConfig) -> Self {
        let g = cfg.norm_groups;
        let levels = cfg.block_out_channels.len();
        let z = Self { v: self.v.iter().map(|l| l / cfg.scaling_factor + cfg.shift_factor).collect(), ..self.clone() };
        let mut x = z.conv3(w, "decoder.conv_in").mid_block(w, "decoder.mid_block", g);
        for i in 0..levels {
            for j in 0..=cfg.layers_per_block {
                x = x.resnet(w, &format!("decoder.up_blocks.{i}.resnets.{j}"), g);
            }
            if i + 1 < levels {
                x = x.upsample(w, &format!("decoder.up_blocks.{i}.upsamplers.0"));
            }
        }
        let x = x.group_norm(w, "decoder.conv_norm_out", g).silu().conv3(w, "decoder.conv_out");
        Self { v: x.v.iter().map(|v| v.clamp(-1.0, 1.0)).collect(), ..x }
    }
}

/// Splits a `[B, C, H, W]` tensor into per-image f64 planes.
fn planes(t: &Tensor) -> Vec<Planes> {
    let (b, c, h, w) = t.dims4().unwrap();
    let all = to_f64(t);
    (0..b).map(|i| Planes { c, h, w, v: all[i * c * h * w..(i + 1) * c * h * w].to_vec() }).collect()
}

fn concat(images: &[Planes]) -> Vec<f64> {
    images.iter().flat_map(|p| p.v.iter().copied()).collect()
}

#[test]
fn resnet_block_with_shortcut_matches_f64() {
    let weights = SeededWeights::new(11);
    let block = ResnetBlock::load(4, 8, 2, weights.var_builder(DType::F32).pp("r")).unwrap();
    let x = random_tensor(1, &[2, 4, 5, 7], -2.0, 2.0);
    let got = to_f64(&block.forward(&x).unwrap());
    let w = |n: &str| weights.get_f64(n);
    let expected: Vec<Planes> = planes(&x).iter().map(|p| p.resnet(&w, "r", 2)).collect();
    assert_close("resnet block", &got, &concat(&expected), TOLERANCE_F32);
}

#[test]
fn attention_block_matches_f64() {
    let (c, groups) = (8, 4);
    let weights = SeededWeights::new(12);
    let block = AttentionBlock::load(c, groups, weights.var_builder(DType::F32).pp("a")).unwrap();
    let x = random_tensor(2, &[2, c, 3, 5], -2.0, 2.0);
    let got = to_f64(&block.forward(&x).unwrap());
    let w = |n: &str| weights.get_f64(n);
    let expected: Vec<Planes> = planes(&x).iter().map(|p| p.attention(&w, "a", groups)).collect();
    assert_close("attention block", &got, &concat(&expected), TOLERANCE_F32);
}

#[test]
fn downsample_pads_bottom_right_and_halves() {
    let weights = SeededWeights::new(13);
    let block = Downsample::load(3, weights.var_builder(DType::F32).pp("d")).unwrap();
    let x = random_tensor(3, &[1, 3, 6, 10], -1.0, 1.0);
    let y = block.forward(&x).unwrap();
    assert_eq!(y.dims(), &[1, 3, 3, 5]);
    let expected = planes(&x)[0].downsample(&|n: &str| weights.get_f64(n), "d");
    assert_close("downsample", &to_f64(&y), &expected.v, TOLERANCE_F32);
}

#[test]
fn upsample_is_nearest_then_conv() {
    let weights = SeededWeights::new(14);
    let block = Upsample::load(2, weights.var_builder(DType::F32).pp("u")).unwrap();
    let x = random_tensor(4, &[1, 2, 3, 4], -1.0, 1.0);
    let y = block.forward(&x).unwrap();
    assert_eq!(y.dims(), &[1, 2, 6, 8]);
    let expected = planes(&x)[0].upsample(&|n: &str| weights.get_f64(n), "u");
    assert_close("upsample", &to_f64(&y), &expected.v, TOLERANCE_F32);
}

#[test]
fn whole_encoder_and_decoder_match_f64() {
    let weights = SeededWeights::new(15);
    let cfg = VaeConfig::tiny();
    let vae = Vae::load(weights.var_builder(DType::F32), &cfg).unwrap();
    let w = |n: &str| weights.get_f64(n);
    let image = random_tensor(5, &[1, 3, 16, 24], -1.0, 1.0);
    let latent = vae.encode(&image).unwrap();
    let expected_latent = planes(&image)[0].encode(&w, &cfg);
    assert_eq!(latent.dims(), &[1, 16, 2, 3]);
    assert_close("encoder", &to_f64(&latent), &expected_latent.v, TOLERANCE_F32);
    let decoded = vae.decode(&latent).unwrap();
    let expected_image = planes(&latent)[0].decode(&w, &cfg);
    let inside = expected_image.v.iter().filter(|v| v.abs() < 1.0).count();
    assert!(2 * inside > expected_image.v.len(), "only {inside} decoded values escape the clamp");
    assert_close("decoder", &to_f64(&decoded), &expected_image.v, TOLERANCE_F32);
}

#[test]
fn encode_decode_shapes_on_sizes_off_the_64_grid() {
    let vae = Vae::load(SeededWeights::new(21).var_builder(DType::F32), &VaeConfig::tiny()).unwrap();
    let image = random_tensor(5, &[2, 3, 40, 56], -1.0, 1.0);
    let latent = vae.encode(&image).unwrap();
    assert_eq!(latent.dims(), &[2, 16, 5, 7]);
    let values = to_f64(&latent);
    assert!(values.iter().all(|v| v.is_finite()), "latent not finite");
    let spread =
        values.iter().cloned().fold(f64::NEG_INFINITY, f64::max) - values.iter().cloned().fold(f64::INFINITY, f64::min);
    assert!(spread > 1e-3, "latent is constant: spread {spread}");
    let decoded = vae.decode(&latent).unwrap();
    assert_eq!(decoded.dims(), &[2, 3, 40, 56]);
    let out = to_f64(&decoded);
    assert!(out.iter().all(|v| (-1.0..=1.0).contains(v)), "decoded image leaves [-1, 1]");
    assert!(out.iter().any(|v| v.abs() < 1.0), "decoded image is clamped everywhere");
}

#[test]
fn latent_normalisation_is_shift_then_scale_and_decode_inverts_it() {
    let weights = SeededWeights::new(22);
    let flux = VaeConfig::tiny();
    let plain = VaeConfig { scaling_factor: 1.0, shift_factor: 0.0, ..flux.clone() };
    let vae_flux = Vae::load(weights.var_builder(DType::F32), &flux).unwrap();
    let vae_plain = Vae::load(weights.var_builder(DType::F32), &plain).unwrap();
    let image = random_tensor(6, &[1, 3, 16, 24], -1.0, 1.0);
    let mean = to_f64(&vae_plain.encode(&image).unwrap());
    let expected: Vec<f64> = mean.iter().map(|m| (m - 0.1159) * 0.3611).collect();
    let latent = vae_flux.encode(&image).unwrap();
    assert_close("normalised latent", &to_f64(&latent), &expected, TOLERANCE_F32);
    let via_flux = to_f64(&vae_flux.decode(&latent).unwrap());
    let raw =
        Tensor::from_vec(mean.iter().map(|&m| m as f32).collect::<Vec<_>>(), latent.dims(), &Device::Cpu).unwrap();
    let via_plain = to_f64(&vae_plain.decode(&raw).unwrap());
    assert_close("decode of the normalised latent", &via_flux, &via_plain, TOLERANCE_F32);
}

/// bf16 runs on candle's CUDA backend only (candle's CPU matmul has no bf16): compared with f32
/// on the CPU. Skips without a CUDA device unless `FAPE_TEST_CUDA=1`.
#[cfg(feature = "candle-cuda")]
#[test]
fn bf16_encode_decode_on_cuda_follows_f32_on_cpu() {
    let cuda = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(err) => {
            let strict = std::env::var(fape_kernels::testing::TEST_CUDA_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
            assert!(!strict, "no CUDA device for candle: {err}");
            eprintln!("SKIP bf16_encode_decode_on_cuda_follows_f32_on_cpu: {err}");
            return;
        }
    };
    let weights = SeededWeights::new(23);
    let cfg = VaeConfig::tiny();
    let image = random_tensor(7, &[1, 3, 24, 16], -1.0, 1.0);
    let run = |dtype: DType, device: &Device| {
        let vb = VarBuilder::from_backend(Box::new(weights.clone()), dtype, device.clone());
        let vae = Vae::load(vb, &cfg).unwrap();
        let latent = vae.encode(&image.to_device(device).unwrap().to_dtype(dtype).unwrap()).unwrap();
        assert_eq!(latent.dtype(), dtype);
        (to_f64(&latent), to_f64(&vae.decode(&latent).unwrap()))
    };
    let (latent32, image32) = run(DType::F32, &Device::Cpu);
    let (latent16, image16) = run(DType::BF16, &cuda);
    assert_close("bf16 latent", &latent16, &latent32, TOLERANCE_BF16);
    assert_close("bf16 decoded image", &image16, &image32, TOLERANCE_BF16);
}

#[test]
fn flux_dev_layout_has_diffusers_names_and_83_8m_parameters() {
    let census = Census::default();
    let vb = VarBuilder::from_backend(Box::new(census.clone()), DType::F32, Device::Cpu);
    Vae::load(vb, &VaeConfig::flux_dev()).unwrap();
    let shapes = census.0.lock().unwrap().clone();
    let params: usize = shapes.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(params, 83_819_683, "FLUX.1 autoencoder parameter count");
    for (name, shape) in [
        ("encoder.conv_in.weight", vec![128, 3, 3, 3]),
        ("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", vec![256, 128, 1, 1]),
        ("encoder.down_blocks.2.downsamplers.0.conv.weight", vec![512, 512, 3, 3]),
        ("encoder.mid_block.attentions.0.to_out.0.weight", vec![512, 512]),
        ("encoder.mid_block.attentions.0.group_norm.bias", vec![512]),
        ("encoder.conv_out.weight", vec![32, 512, 3, 3]),
        ("decoder.conv_in.weight", vec![512, 16, 3, 3]),
        ("decoder.up_blocks.2.resnets.0.conv_shortcut.weight", vec![256, 512, 1, 1]),
        ("decoder.up_blocks.3.resnets.2.conv2.weight", vec![128, 128, 3, 3]),
        ("decoder.up_blocks.2.upsamplers.0.conv.bias", vec![256]),
        ("decoder.conv_norm_out.weight", vec![128]),
        ("decoder.conv_out.weight", vec![3, 128, 3, 3]),
    ] {
        assert_eq!(shapes.get(name), Some(&shape), "{name}");
    }
    assert!(!shapes.contains_key("encoder.down_blocks.3.downsamplers.0.conv.weight"));
    assert!(!shapes.contains_key("decoder.up_blocks.3.upsamplers.0.conv.weight"));
    assert!(!shapes.keys().any(|k| k.contains("quant_conv")));
}

#[test]
fn missing_or_misshaped_tensor_error_names_it() {
    let weights = SeededWeights::new(24);
    Vae::load(weights.var_builder(DType::F32), &VaeConfig::tiny()).unwrap();
    let all = weights.tensors();
    let missing = "decoder.up_blocks.1.upsamplers.0.conv.weight";
    let mut without = all.clone();
    assert!(without.remove(missing).is_some());
    let err = Vae::load(VarBuilder::from_tensors(without, DType::F32, &Device::Cpu), &VaeConfig::tiny()).unwrap_err();
    assert!(err.to_string().contains(missing), "error `{err}` does not name `{missing}`");

    let misshaped = "encoder.mid_block.attentions.0.to_k.weight";
    let mut wrong = all;
    wrong.insert(misshaped.into(), random_tensor(8, &[64, 32], -1.0, 1.0));
    let err = Vae::load(VarBuilder::from_tensors(wrong, DType::F32, &Device::Cpu), &VaeConfig::tiny()).unwrap_err();
    assert!(err.to_string().contains(misshaped), "error `{err}` does not name `{misshaped}`");
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    let bad_groups = VaeConfig { norm_groups: 12, ..VaeConfig::tiny() };
    let err = Vae::load(SeededWeights::new(25).var_builder(DType::F32), &bad_groups).unwrap_err();
    assert!(err.to_string().contains("norm_groups"), "{err}");
    assert!(VaeConfig::preset("flux-schnell-xl").unwrap_err().to_string().contains("preset"));

    let vae = Vae::load(SeededWeights::new(26).var_builder(DType::F32), &VaeConfig::tiny()).unwrap();
    let err = vae.encode(&random_tensor(9, &[1, 3, 20, 16], -1.0, 1.0)).unwrap_err();
    assert!(err.to_string().contains("image") && err.to_string().contains("[1, 3, 20, 16]"), "{err}");
    let err = vae.encode(&random_tensor(9, &[1, 4, 16, 16], -1.0, 1.0)).unwrap_err();
    assert!(err.to_string().contains("[1, 4, 16, 16]"), "{err}");
    let err = vae.decode(&random_tensor(9, &[1, 8, 2, 2], -1.0, 1.0)).unwrap_err();
    assert!(err.to_string().contains("latent"), "{err}");
}
