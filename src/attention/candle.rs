//! Attention as a candle `CustomOp3` over `q`, `k`, `v`; the optional norm weights and RoPE
//! tables travel inside the op. CPU tensors run this crate's CPU backend; CUDA tensors (feature
//! `candle-cuda`) run the CUDA kernels on candle's own stream, reading and writing candle's
//! buffers directly.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType};

use super::{attention_typed, AttentionConfig, AttentionDims, AttentionElement, AttentionInputs, OP};
use crate::backend::Device;
use crate::candle_ops::{candle_error, cpu_slice};
use crate::tensor::View;

/// Attention of candle tensors: `q` `[B,H,Lq,D]`, `k`, `v` `[B,H,Lk,D]`, optional RMSNorm weights
/// `(q_norm, k_norm)` `[D]` and RoPE tables `(cos, sin)` `[L,D/2]` with `L >= max(Lq,Lk)`, as
/// [`super::attention`] (the same contract and reference); returns `[B,H,Lq,D]` of `q`'s dtype.
///
/// `q`, `k` and `v` must share a dtype (f32, bf16 or f16); the norm weights and tables are
/// converted to it. Strided inputs are made contiguous first. Forward only (no gradient).
/// On CUDA (feature `candle-cuda`), bf16/f16 run the tensor-core kernel (D = 64 or 128) and f32
/// the f32 kernel (D <= 256), on the tensors' device and stream.
///
/// # Errors
/// A candle error wrapping [`FapeError::Shape`](crate::FapeError::Shape) (rank, mismatched
/// `B`/`H`/`D`, a short or misshapen table) or [`FapeError::Config`](crate::FapeError::Config)
/// (invalid scale); candle's dtype error when `k` or `v` differs from `q` or the dtype is not
/// f32/bf16/f16; [`FapeError::Unsupported`](crate::FapeError::Unsupported) for a head dimension
/// the CUDA kernel lacks; device errors.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    norms: Option<(&Tensor, &Tensor)>,
    rope: Option<(&Tensor, &Tensor)>,
    config: &AttentionConfig,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(candle_core::Error::UnsupportedDTypeForOp(dtype, OP));
    }
    for other in [k, v] {
        if other.dtype() != dtype {
            return Err(candle_core::Error::DTypeMismatchBinaryOp { lhs: dtype, rhs: other.dtype(), op: OP });
        }
    }
    let extra = |t: &Tensor| t.to_dtype(dtype)?.contiguous();
    let norms = norms.map(|(a, b)| Ok::<_, candle_core::Error>((extra(a)?, extra(b)?))).transpose()?;
    let rope = rope.map(|(a, b)| Ok::<_, candle_core::Error>((extra(a)?, extra(b)?))).transpose()?;
    let dims = validate_shapes(q, k, v, norms.as_ref(), rope.as_ref(), config).map_err(candle_error)?;
    let op = AttentionOp { norms, rope, config: *config, dims };
    q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

/// The contract's shape checks on the tensors' dims alone (zero-sized stand-ins for the data).
fn validate_shapes(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    norms: Option<&(Tensor, Tensor)>,
    rope: Option<&(Tensor, Tensor)>,
    config: &AttentionConfig,
) -> crate::Result<AttentionDims> {
    let units = |t: &Tensor| vec![(); t.elem_count()];
    let all: Vec<(&'static str, &Tensor)> = [("q", q), ("k", k), ("v", v)]
        .into_iter()
        .chain(norms.into_iter().flat_map(|(a, b)| [("q_norm", a), ("k_norm", b)]))
        .chain(rope.into_iter().flat_map(|(a, b)| [("rope_cos", a), ("rope_sin", b)]))
        .collect();
    let data: Vec<Vec<()>> = all.iter().map(|(_, t)| units(t)).collect();
    let views = all
        .iter()
        .zip(&data)
        .map(|((name, t), d)| View::new(OP, name, d, t.dims()))
        .collect::<crate::Result<Vec<View<'_, ()>>>>()?;
    let mut inputs = AttentionInputs::new(views[0], views[1], views[2]);
    let mut rest = views[3..].iter().copied();
    if norms.is_some() {
        if let (Some(a), Some(b)) = (rest.next(), rest.next()) {
            inputs = inputs.with_norms(a, b);
        }
    }
    if rope.is_some() {
        if let (Some(a), Some(b)) = (rest.next(), rest.next()) {
            inputs = inputs.with_rope(a, b);
        }
    }
    config.validate()?;
    inputs.validate()
}

/// The candle op: norm weights and RoPE tables (contiguous, `q`'s dtype) and the validated dims.
struct AttentionOp {
    norms: Option<(Tensor, Tensor)>,
    rope: Option<(Tensor, Tensor)>,
    config: AttentionConfig,
    dims: AttentionDims,
}

impl AttentionOp {
    /// The extra tensors in order, with their names.
    fn extras(&self) -> Vec<(&'static str, &Tensor)> {
        let norms = self.norms.iter().flat_map(|(a, b)| [("q_norm", a), ("k_norm", b)]);
        norms.chain(self.rope.iter().flat_map(|(a, b)| [("rope_cos", a), ("rope_sin", b)])).collect()
    }

    /// The output shape `[B,H,Lq,D]`.
    fn out_shape(&self) -> Shape {
        let AttentionDims { batch, heads, q_len, head_dim, .. } = self.dims;
        Shape::from_dims(&[batch, heads, q_len, head_dim])
    }

    fn cpu_typed<T: AttentionElement + WithDType>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> candle_core::Result<CpuStorage> {
        let guards: Vec<_> = self.extras().into_iter().map(|(name, t)| (name, t.storage_and_layout())).collect();
        let mut extra_slices = Vec::with_capacity(guards.len());
        for (name, (storage, layout)) in &guards {
            let Storage::Cpu(cpu) = &**storage else {
                return Err(candle_core::Error::DeviceMismatchBinaryOp {
                    lhs: candle_core::DeviceLocation::Cpu,
                    rhs: storage.device().location(),
                    op: OP,
                });
            };
            extra_slices.push((*name, cpu_slice::<T>(OP, name, cpu, layout)?, layout.dims()));
        }
        let view = |name: &'static str, data, dims| View::new(OP, name, data, dims).map_err(candle_error);
        let mut inputs = AttentionInputs::new(
            view("q", cpu_slice::<T>(OP, "q", s1, l1)?, l1.dims())?,
            view("k", cpu_slice::<T>(OP, "k", s2, l2)?, l2.dims())?,
            view("v", cpu_slice::<T>(OP, "v", s3, l3)?, l3.dims())?,
        );
        for (name, data, dims) in extra_slices {
            let v = Some(view(name, data, dims)?);
            match name {
                "q_norm" => inputs.q_norm = v,
                "k_norm" => inputs.k_norm = v,
                "rope_cos" => inputs.rope_cos = v,
                _ => inputs.rope_sin = v,
            }
        }
        let out = attention_typed(&Device::Cpu, &inputs, &self.config).map_err(candle_error)?;
        Ok(T::to_cpu_storage_owned(out.data))
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fape-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let args = ((s1, l1), (s2, l2), (s3, l3));
        let out = match s1.dtype() {
            DType::F32 => self.cpu_typed::<f32>(args.0, args.1, args.2)?,
            DType::BF16 => self.cpu_typed::<half::bf16>(args.0, args.1, args.2)?,
            DType::F16 => self.cpu_typed::<half::f16>(args.0, args.1, args.2)?,
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other, OP)),
        };
        Ok((out, self.out_shape()))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let args = ((s1, l1), (s2, l2), (s3, l3));
        let out = match s1.dtype() {
            DType::F32 => self.cuda_typed::<f32>(args.0, args.1, args.2)?,
            DType::BF16 => self.cuda_typed::<half::bf16>(args.0, args.1, args.2)?,
            DType::F16 => self.cuda_typed::<half::f16>(args.0, args.1, args.2)?,
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other, OP)),
        };
        Ok((out, self.out_shape()))
    }
}

#[cfg(feature = "candle-cuda")]
impl AttentionOp {
    fn cuda_typed<T>(
        &self,
        (s1, l1): (&candle_core::CudaStorage, &Layout),
        (s2, l2): (&candle_core::CudaStorage, &Layout),
        (s3, l3): (&candle_core::CudaStorage, &Layout),
    ) -> candle_core::Result<candle_core::CudaStorage>
    where
        T: AttentionElement
            + candle_core::cuda_backend::CudaDType
            + cudarc::driver::DeviceRepr
            + cudarc::driver::ValidAsZeroBits,
    {
        use super::cuda::{forward, DeviceInputs, Kernels};
        use crate::candle_ops::cuda_view;
        use crate::error::FapeError;
        use candle_core::backend::BackendDevice;
        use cudarc::driver::CudaView;

        // bf16/f16/f32 as the kernels' bit pattern (u16 or f32): same size, same bits.
        fn bits<'a, T: AttentionElement>(view: CudaView<'a, T>) -> candle_core::Result<CudaView<'a, T::Bits>> {
            let len = view.len();
            // SAFETY: `T::Bits` has the size of `T` and every bit pattern of `T` is a valid
            // `T::Bits` (u16 for the 16-bit floats, f32 for f32), so the reinterpretation of
            // `len` elements stays inside the view and reads valid values.
            unsafe { view.transmute::<T::Bits>(len) }.ok_or_else(|| {
                candle_error(crate::FapeError::Unsupported { op: OP, backend: "cuda", what: "a view".into() })
            })
        }

        let device = s1.device().clone();
        let guards: Vec<_> = self.extras().into_iter().map(|(name, t)| (name, t.storage_and_layout())).collect();
        let mut extras = Vec::with_capacity(guards.len());
        for (name, (storage, layout)) in &guards {
            let Storage::Cuda(cuda) = &**storage else {
                return Err(candle_core::Error::DeviceMismatchBinaryOp {
                    lhs: device.location(),
                    rhs: storage.device().location(),
                    op: OP,
                });
            };
            extras.push((*name, bits::<T>(cuda_view::<T>(OP, name, cuda, layout)?)?));
        }
        let mut inputs = DeviceInputs {
            q: bits::<T>(cuda_view::<T>(OP, "q", s1, l1)?)?,
            k: bits::<T>(cuda_view::<T>(OP, "k", s2, l2)?)?,
            v: bits::<T>(cuda_view::<T>(OP, "v", s3, l3)?)?,
            q_norm: None,
            k_norm: None,
            rope: None,
        };
        let mut cos = None;
        for (name, view) in extras {
            match name {
                "q_norm" => inputs.q_norm = Some(view),
                "k_norm" => inputs.k_norm = Some(view),
                "rope_cos" => cos = Some(view),
                _ => inputs.rope = cos.take().map(|c| (c, view)),
            }
        }
        let kernels = Kernels::on_stream(device.cuda_stream()).map_err(candle_error)?;
        let len = self.out_shape().elem_count();
        let mut out = kernels
            .stream()
            .alloc_zeros::<T>(len)
            .map_err(|e| candle_error(crate::backend::cuda::driver_error("allocating the attention output", e)))?;
        {
            // SAFETY: as in `bits`: same size, every pattern valid both ways.
            let mut out_bits = unsafe { out.transmute_mut::<T::Bits>(len) }.ok_or_else(|| {
                candle_error(FapeError::Unsupported { op: OP, backend: "cuda", what: "the output view".into() })
            })?;
            let scale = self.config.scale_for(self.dims.head_dim);
            forward::<T>(&kernels, &inputs, self.dims, scale, &mut out_bits).map_err(candle_error)?;
        }
        Ok(candle_core::CudaStorage::wrap_cuda_slice(out, device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{reference, rope_tables};
    use crate::testing::{assert_close, rng, uniform};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(uniform(&mut rng(seed), n, -1.0, 1.0), shape, &candle_core::Device::Cpu).expect("tensor")
    }

    /// The candle op on the CPU against the f64 reference, f32 and bf16, with norms and RoPE.
    #[test]
    fn candle_cpu_matches_reference() {
        let (b, h, lq, lk, d) = (2, 3, 19, 27, 64);
        let q = random(&[b, h, lq, d], 1);
        let k = random(&[b, h, lk, d], 2);
        let v = random(&[b, h, lk, d], 3);
        let q_norm = random(&[d], 4).affine(0.25, 1.0).expect("norm");
        let k_norm = random(&[d], 5).affine(0.25, 1.0).expect("norm");
        let (cos, sin) = rope_tables(lq.max(lk), d).expect("tables");
        let cpu = candle_core::Device::Cpu;
        let cos = Tensor::from_vec(cos.data, cos.shape, &cpu).expect("cos");
        let sin = Tensor::from_vec(sin.data, sin.shape, &cpu).expect("sin");
        let config = AttentionConfig::default();
        for (dtype, tolerance) in
            [(DType::F32, super::super::TOLERANCE_F32), (DType::BF16, super::super::TOLERANCE_BF16)]
        {
            let cast = |t: &Tensor| t.to_dtype(dtype).expect("cast");
            let (qc, kc, vc) = (cast(&q), cast(&k), cast(&v));
            let got = attention(&qc, &kc, &vc, Some((&q_norm, &k_norm)), Some((&cos, &sin)), &config).expect("op");
            assert_eq!(got.dims(), &[b, h, lq, d]);
            assert_eq!(got.dtype(), dtype);
            // The reference on exactly the values the op saw (rounded to `dtype`).
            let host =
                |t: &Tensor| t.to_dtype(DType::F32).and_then(|t| t.flatten_all()?.to_vec1::<f32>()).expect("host");
            let (qh, kh, vh) = (host(&qc), host(&kc), host(&vc));
            let (qn, kn, ch, sh) = (host(&cast(&q_norm)), host(&cast(&k_norm)), host(&cast(&cos)), host(&cast(&sin)));
            let (qs, ks, ns, ts) = ([b, h, lq, d], [b, h, lk, d], [d], [lq.max(lk), d / 2]);
            let inputs = AttentionInputs::new(
                View::new(OP, "q", &qh, &qs).expect("q"),
                View::new(OP, "k", &kh, &ks).expect("k"),
                View::new(OP, "v", &vh, &ks).expect("v"),
            )
            .with_norms(View::new(OP, "q_norm", &qn, &ns).expect("n"), View::new(OP, "k_norm", &kn, &ns).expect("n"))
            .with_rope(
                View::new(OP, "rope_cos", &ch, &ts).expect("c"),
                View::new(OP, "rope_sin", &sh, &ts).expect("s"),
            );
            let expected = reference::attention(&inputs, &config).expect("reference");
            assert_close(&format!("candle attention {dtype:?}"), &host(&got), &expected.data, tolerance);
        }
    }

    /// Bad shapes are typed errors naming the tensor, not panics.
    #[test]
    fn candle_bad_shapes_are_errors() {
        let q = random(&[1, 2, 5, 64], 1);
        let k3 = random(&[2, 5, 64], 2);
        let err = attention(&q, &k3, &k3, None, None, &AttentionConfig::default()).expect_err("rank 3 k");
        assert!(err.to_string().contains("`k`"), "{err}");
        let k = random(&[1, 2, 7, 32], 3);
        let err = attention(&q, &k, &k, None, None, &AttentionConfig::default()).expect_err("D mismatch");
        assert!(err.to_string().contains("`k`"), "{err}");
        let kv = random(&[1, 2, 7, 64], 4);
        let short = random(&[6, 32], 5);
        let err = attention(&q, &kv, &kv, None, Some((&short, &short)), &AttentionConfig::default())
            .expect_err("short table");
        assert!(err.to_string().contains("rope_cos"), "{err}");
    }
}
