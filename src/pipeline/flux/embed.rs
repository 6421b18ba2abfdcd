//! Embeddings of the executor: sinusoidal timestep features with their MLP embedders, the 3-axis
//! RoPE tables of the joint sequence, and the 2x2 patch packing of the latent.

use candle_core::{Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use super::config::TIMESTEP_FEATURES;

/// The largest period of the sinusoidal features.
const MAX_PERIOD: f64 = 10_000.0;

/// FLUX's sinusoidal features of `values` (already scaled to 0..1000), `[B, 256]` f32:
/// `[cos(v f_i), sin(v f_i)]` with `f_i = 10000^(-i/128)`, `i = 0..128` (cosines first).
///
/// # Errors
/// Candle errors (none for valid devices).
pub fn timestep_features(values: &[f64], device: &Device) -> candle_core::Result<Tensor> {
    let half = TIMESTEP_FEATURES / 2;
    let mut data = Vec::with_capacity(values.len() * TIMESTEP_FEATURES);
    for &v in values {
        let angles: Vec<f64> = (0..half).map(|i| v * (-MAX_PERIOD.ln() * i as f64 / half as f64).exp()).collect();
        data.extend(angles.iter().map(|a| a.cos() as f32));
        data.extend(angles.iter().map(|a| a.sin() as f32));
    }
    Tensor::from_vec(data, (values.len(), TIMESTEP_FEATURES), device)
}

/// `linear_2(silu(linear_1(x)))`: diffusers' `TimestepEmbedding` and `PixArtAlphaTextProjection`
/// (tensors `linear_1.{weight,bias}`, `linear_2.{weight,bias}`).
#[derive(Debug, Clone)]
pub struct MlpEmbedder {
    linear_1: Linear,
    linear_2: Linear,
}

impl MlpEmbedder {
    /// Loads an embedder `input -> dim -> dim` under `vb`.
    ///
    /// # Errors
    /// The backend's error naming a missing, mis-shaped or mis-typed tensor.
    pub fn load(vb: VarBuilder, input: usize, dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(input, dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(dim, dim, vb.pp("linear_2"))?,
        })
    }

    /// `[B, dim]` of `x` `[B, input]`.
    ///
    /// # Errors
    /// Shape errors when `x` is not `[B, input]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2.forward(&candle_nn::ops::silu(&self.linear_1.forward(x)?)?)
    }
}

/// The position ids of the joint sequence: `n_txt` text tokens at `(0,0,0)`, then the image
/// tokens of a `rows x cols` token grid at `(0, row, col)` in raster order.
pub fn position_ids(n_txt: usize, rows: usize, cols: usize) -> Vec<[f64; 3]> {
    let text = std::iter::repeat_n([0.0; 3], n_txt);
    let image = (0..rows * cols).map(|i| [0.0, (i / cols) as f64, (i % cols) as f64]);
    text.chain(image).collect()
}

/// RoPE tables `(cos, sin)`, each `[L, D/2]` f32 with `D = sum(axes)`, of the positions `ids`
/// (`L` rows of 3 coordinates): the columns are the axes in order, axis `a` of width `axes[a]`
/// giving `axes[a]/2` columns `i` with angle `ids[l][a] * theta^(-2i/axes[a])`. Each column
/// rotates the pair `(x[2c], x[2c+1])` (this crate's RoPE convention), which is FLUX's
/// interleaved rotary embedding.
///
/// # Errors
/// Candle errors (none for valid devices).
pub fn rope_tables(
    ids: &[[f64; 3]],
    axes: [usize; 3],
    theta: f64,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half: usize = axes.iter().sum::<usize>() / 2;
    let mut angles = Vec::with_capacity(ids.len() * half);
    for id in ids {
        for (a, &width) in axes.iter().enumerate() {
            angles.extend((0..width / 2).map(|i| id[a] * theta.powf(-2.0 * i as f64 / width as f64)));
        }
    }
    let table = |f: fn(f64) -> f64| {
        Tensor::from_vec(angles.iter().map(|&a| f(a) as f32).collect::<Vec<_>>(), (ids.len(), half), device)
    };
    Ok((table(f64::cos)?, table(f64::sin)?))
}

/// Packs a latent `[B,C,h,w]` (h, w even) into image tokens `[B, (h/2)(w/2), 4C]`: token
/// `(row, col)` in raster order holds channel `c * 4 + dy * 2 + dx` = `latent[c, 2 row + dy,
/// 2 col + dx]` (FLUX's `_pack_latents`).
///
/// # Errors
/// Shape errors for a tensor that is not rank 4 with even h and w.
pub fn pack(latent: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = latent.dims4()?;
    latent.reshape((b, c, h / 2, 2, w / 2, 2))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, (h / 2) * (w / 2), c * 4))
}

/// The inverse of [`pack`]: tokens `[B, (h/2)(w/2), 4C]` to a latent `[B,C,h,w]`.
///
/// # Errors
/// Shape errors when the token count or width does not fit `h`, `w`.
pub fn unpack(tokens: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (b, _, width) = tokens.dims3()?;
    let c = width / 4;
    tokens.reshape((b, h / 2, w / 2, c, 2, 2))?.permute((0, 3, 1, 4, 2, 5))?.reshape((b, c, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn pack_follows_the_documented_layout_and_unpack_inverts_it() {
        let (b, c, h, w) = (2, 3, 4, 6);
        let data: Vec<f32> = (0..b * c * h * w).map(|i| i as f32).collect();
        let latent = Tensor::from_vec(data.clone(), (b, c, h, w), &Device::Cpu).unwrap();
        let tokens = pack(&latent).unwrap();
        assert_eq!(tokens.dims(), &[b, (h / 2) * (w / 2), 4 * c]);
        let packed = host(&tokens);
        for (bi, row, col, ci, dy, dx) in [(1, 1, 2, 2, 1, 0), (0, 0, 1, 1, 0, 1), (1, 0, 0, 0, 1, 1)] {
            let token = row * (w / 2) + col;
            let got = packed[(bi * (h / 2) * (w / 2) + token) * 4 * c + ci * 4 + dy * 2 + dx];
            let want = data[((bi * c + ci) * h + 2 * row + dy) * w + 2 * col + dx];
            assert_eq!(got, want, "b {bi} token ({row},{col}) channel {ci} offset ({dy},{dx})");
        }
        assert_eq!(host(&unpack(&tokens, h, w).unwrap()), data);
    }

    #[test]
    fn rope_columns_follow_the_axes() {
        let ids = position_ids(2, 3, 4);
        assert_eq!(ids.len(), 2 + 12);
        assert_eq!(ids[1], [0.0; 3]);
        assert_eq!(ids[2 + 7], [0.0, 1.0, 3.0]);
        let axes = [4, 6, 6];
        let (cos, sin) = rope_tables(&ids, axes, 10_000.0, &Device::Cpu).unwrap();
        assert_eq!(cos.dims(), &[14, 8]);
        let (cos, sin) = (host(&cos), host(&sin));
        let at = |l: usize, col: usize| (cos[l * 8 + col], sin[l * 8 + col]);
        // Row 9 is image token (1, 3): axis 0 (2 columns) at 0, axis 1 (3 columns) at 1, axis 2 at 3.
        assert_eq!(at(9, 1), (1.0, 0.0));
        let expect = |pos: f64, i: usize, width: usize| {
            let a = pos * 10_000f64.powf(-2.0 * i as f64 / width as f64);
            (a.cos() as f32, a.sin() as f32)
        };
        assert_eq!(at(9, 2), expect(1.0, 0, 6));
        assert_eq!(at(9, 3), expect(1.0, 1, 6));
        assert_eq!(at(9, 5), expect(3.0, 0, 6));
        assert_eq!(at(9, 7), expect(3.0, 2, 6));
        // Text rows do not rotate.
        assert!((0..8).all(|col| at(1, col) == (1.0, 0.0)));
    }

    #[test]
    fn timestep_features_are_cosines_then_sines() {
        let f = host(&timestep_features(&[0.0, 300.0], &Device::Cpu).unwrap());
        assert_eq!(f.len(), 2 * TIMESTEP_FEATURES);
        assert!(f[..128].iter().all(|&v| v == 1.0) && f[128..256].iter().all(|&v| v == 0.0));
        let half = TIMESTEP_FEATURES / 2;
        let freq = (-MAX_PERIOD.ln() * 5.0 / half as f64).exp();
        assert!((f[256 + 5] - (300.0 * freq).cos() as f32).abs() < 1e-6);
        assert!((f[256 + half + 5] - (300.0 * freq).sin() as f32).abs() < 1e-6);
    }
}
