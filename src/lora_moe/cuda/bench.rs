//! Device-resident bf16 LoRA-MoE problems for `fape bench lora-moe` and the criterion bench:
//! inputs uploaded and weights packed once, then each variant enqueued on the device's stream
//! and timed with CUDA events (no uploads, no host work in the timed region beyond launches).

use std::time::Duration;

use cudarc::driver::{sys as cu, CudaSlice};
use half::bf16;

use super::fused::{LoraMoeLinear, LoraMoeProjection};
use super::gemm::GemmPlans;
use super::unfused::Unfused;
use crate::backend::cuda::{dev_err, CudaDevice, DeviceGraph};
use crate::error::{FapeError, Result};
use crate::lora_moe::config::{LoraMoeConfig, LoraMoeDims, LoraMoeTensors, OP};

/// What one timed run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaVariant {
    /// [`LoraMoeLinear::forward`]: shrink/energy pass, gate/filter kernel, one augmented GEMM.
    Fused,
    /// [`LoraMoeLinear::forward_overlapped`]: the base GEMM beside the shrink and gate kernels
    /// (second stream), then `y += u B^T`.
    FusedOverlapped,
    /// The reference's code path on the GPU: full-width band filtering, one LoRA path per
    /// expert (cuBLAS GEMMs), gating and adds.
    Unfused,
    /// `y = x W^T + bias` alone (cuBLASLt bf16, bias epilogue): the cost the fused path is
    /// measured against.
    BaseGemm,
    /// [`Self::Fused`] replayed from a CUDA graph captured on the variant's first run: the
    /// same kernels at one launch's host cost.
    FusedGraph,
}

impl CudaVariant {
    /// Every variant, baseline first.
    pub const ALL: [CudaVariant; 5] =
        [Self::BaseGemm, Self::Fused, Self::FusedGraph, Self::FusedOverlapped, Self::Unfused];

    /// The variant's name in bench tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fused => "fused",
            Self::FusedOverlapped => "fused-2gemm",
            Self::Unfused => "unfused",
            Self::BaseGemm => "base-gemm",
            Self::FusedGraph => "fused-graph",
        }
    }
}

/// One bf16 problem resident on a CUDA device.
pub struct CudaBenchProblem {
    device: CudaDevice,
    layer: LoraMoeLinear,
    unfused: Unfused,
    /// The base GEMM's cuBLASLt plans (cached per shape, as the layer's are).
    base: GemmPlans,
    x: CudaSlice<bf16>,
    weight: CudaSlice<bf16>,
    bias: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    gates: CudaSlice<f32>,
    dims: LoraMoeDims,
    /// The graph of [`CudaVariant::FusedGraph`], captured on its first run.
    graph: Option<DeviceGraph>,
}

impl CudaBenchProblem {
    /// Seeded random bf16 inputs of `dims` (with a bias; guidance when `dg != d`) uploaded to
    /// `device`, the fused layer packed and the unfused baseline prepared.
    ///
    /// # Errors
    /// The errors of [`LoraMoeLinear::new`]; device and cuBLAS(Lt) errors.
    pub fn new(device: &CudaDevice, seed: u64, dims: LoraMoeDims, config: &LoraMoeConfig) -> Result<Self> {
        if dims.dg != dims.d {
            return Err(FapeError::Unsupported {
                op: OP,
                backend: "cuda",
                what: "the bench problems read x in the router (dg = d)".into(),
            });
        }
        let host = LoraMoeTensors::random(seed, dims, true).cast::<bf16>();
        let stream = device.stream();
        let up = |what: &str, data: &[bf16]| {
            stream.clone_htod(data).map_err(dev_err(format!("copying `{what}` ({} bf16) to the device", data.len())))
        };
        let x = up("x", &host.x.data)?;
        let weight = up("weight", &host.weight.data)?;
        let bias_host = host.bias.as_ref().map_or(&[][..], |b| b.data.as_slice());
        let bias = up("bias", bias_host)?;
        let lora_a = up("lora_a", &host.lora_a.data)?;
        let lora_b = up("lora_b", &host.lora_b.data)?;
        let router = up("router", &host.router.data)?;
        let views = (weight.slice(..), bias.slice(..), lora_a.slice(..), lora_b.slice(..), router.slice(..));
        let projection = LoraMoeProjection {
            weight: &views.0,
            bias: Some(&views.1),
            lora_a: &views.2,
            lora_b: &views.3,
            router: &views.4,
            n: dims.n,
        };
        let layer = LoraMoeLinear::new(device, dims.d, dims.dg, dims.experts, dims.rank, &[projection], config)?;
        let unfused = Unfused::new(device, &host, dims, config)?;
        let base = GemmPlans::new(stream)?;
        let rows = dims.batch * dims.tokens;
        let y = stream.alloc_zeros::<bf16>(rows * dims.n).map_err(dev_err("allocating `y`"))?;
        let gates = stream.alloc_zeros::<f32>(rows * dims.experts).map_err(dev_err("allocating `gates`"))?;
        Ok(Self { device: device.clone(), layer, unfused, base, x, weight, bias, y, gates, dims, graph: None })
    }

    /// The problem's extents.
    pub fn dims(&self) -> LoraMoeDims {
        self.dims
    }

    /// Enqueues one run of `variant` on the device's stream (returns before it finishes).
    ///
    /// # Errors
    /// Launch and cuBLAS(Lt) errors.
    pub fn enqueue(&mut self, variant: CudaVariant) -> Result<()> {
        let LoraMoeDims { batch, tokens, d, n, .. } = self.dims;
        match variant {
            CudaVariant::Fused | CudaVariant::FusedOverlapped => {
                let forward = if variant == CudaVariant::Fused {
                    LoraMoeLinear::forward
                } else {
                    LoraMoeLinear::forward_overlapped
                };
                let (mut y, mut gates) = (self.y.slice_mut(..), self.gates.slice_mut(..));
                forward(&self.layer, &self.x.slice(..), batch, tokens, None, &mut y, &mut gates)
            }
            CudaVariant::FusedGraph => {
                if self.graph.is_none() {
                    // A plain run first builds the GEMM plans, so the capture only enqueues.
                    self.enqueue(CudaVariant::Fused)?;
                    let device = self.device.clone();
                    self.graph = Some(device.capture_graph(|| self.enqueue(CudaVariant::Fused))?);
                }
                self.graph.as_ref().map_or(Ok(()), DeviceGraph::launch)
            }
            CudaVariant::Unfused => self.unfused.forward(&self.x, &mut self.y),
            CudaVariant::BaseGemm => self.base.gemm_bias(
                &self.x.slice(..),
                &self.weight.slice(..),
                Some(&self.bias),
                &mut self.y.slice_mut(..),
                batch * tokens,
                n,
                d,
            ),
        }
    }

    /// The device time of `reps` back-to-back runs of `variant`, between CUDA events recorded
    /// on the stream around them. Several runs per sample keep the GPU busy while the host
    /// enqueues the next one, so the time is the device's, not the launch latency (the GEMMs'
    /// cuBLASLt plans are built on a shape's first run, before the timed ones).
    ///
    /// # Errors
    /// As [`Self::enqueue`]; event errors.
    pub fn time(&mut self, variant: CudaVariant, reps: usize) -> Result<Duration> {
        let stream = self.device.stream().clone();
        let ctx = stream.context();
        let flags = Some(cu::CUevent_flags::CU_EVENT_DEFAULT);
        let start = ctx.new_event(flags).map_err(dev_err("creating a CUDA event"))?;
        let end = ctx.new_event(flags).map_err(dev_err("creating a CUDA event"))?;
        start.record(&stream).map_err(dev_err("recording a CUDA event"))?;
        for _ in 0..reps {
            self.enqueue(variant)?;
        }
        end.record(&stream).map_err(dev_err("recording a CUDA event"))?;
        let ms = start.elapsed_ms(&end).map_err(dev_err(format!("timing `{}`", variant.name())))?;
        Ok(Duration::from_secs_f64(f64::from(ms) * 1e-3))
    }

    /// Runs `variant` once and reads `y` `[B*T, n]` back (synchronizing the stream); `y` is
    /// filled with NaN first when the device poisons its outputs.
    ///
    /// # Errors
    /// As [`Self::enqueue`]; the copy, or any failure on the stream.
    pub fn run_and_read(&mut self, variant: CudaVariant) -> Result<Vec<bf16>> {
        if self.device.is_poisoned() {
            // y is shared by the variants: without this, one that skips elements would read
            // back the previous variant's values.
            let nan = vec![bf16::NAN; self.y.len()];
            self.device.stream().memcpy_htod(&nan, &mut self.y).map_err(dev_err("poisoning `y`"))?;
        }
        self.enqueue(variant)?;
        let context = format!("copying `y` of `{}` back to the host", variant.name());
        let y = self.device.stream().clone_dtoh(&self.y).map_err(dev_err(context.as_str()))?;
        self.synchronize()?;
        Ok(y)
    }

    /// Waits for the stream; an error of any earlier launch surfaces here.
    ///
    /// # Errors
    /// The first failure on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.device.stream().synchronize().map_err(dev_err("synchronizing the bench stream"))
    }
}

#[cfg(test)]
mod tests {
    use super::{CudaBenchProblem, CudaVariant};
    use crate::backend::{Device, DeviceKind};
    use crate::lora_moe::{reference, Band, LoraMoeConfig, LoraMoeDims, LoraMoeTensors, TOLERANCE_BF16};
    use crate::testing::{assert_close, device_or_skip};
    use half::bf16;

    #[test]
    fn cuda_fused_unfused_and_reference_agree() {
        let Some(Device::Cuda(device)) = device_or_skip("cuda_fused_unfused_and_reference_agree", DeviceKind::Cuda)
        else {
            return;
        };
        let cases = [
            (
                LoraMoeDims { batch: 3, tokens: 37, d: 200, n: 72, experts: 2, rank: 8, dg: 200 },
                1,
                vec![Band::Low, Band::High],
            ),
            (
                LoraMoeDims { batch: 1, tokens: 130, d: 1032, n: 40, experts: 3, rank: 4, dg: 1032 },
                0,
                vec![Band::Low, Band::High, Band::Full],
            ),
        ];
        for (seed, (dims, top_k, bands)) in cases.into_iter().enumerate() {
            let config = LoraMoeConfig { bands, top_k, ..LoraMoeConfig::default() };
            let mut problem = CudaBenchProblem::new(&device, seed as u64, dims, &config).unwrap();
            let fused = problem.run_and_read(CudaVariant::Fused).unwrap();
            problem.run_and_read(CudaVariant::FusedGraph).unwrap(); // captures, then replays
                                                                    // Replay only, into a NaN-poisoned y: what it reads back the graph wrote.
            let replayed = problem.run_and_read(CudaVariant::FusedGraph).unwrap();
            assert_eq!(replayed, fused, "the graph replay of the fused path differs from a direct run ({dims:?})");
            let overlapped = problem.run_and_read(CudaVariant::FusedOverlapped).unwrap();
            let unfused = problem.run_and_read(CudaVariant::Unfused).unwrap();
            let host = LoraMoeTensors::random(seed as u64, dims, true).cast::<bf16>();
            let expected = reference::lora_moe(&host.inputs(), &config).unwrap();
            assert_close(&format!("fused {dims:?}"), &fused, &expected.y.data, TOLERANCE_BF16);
            assert_close(&format!("fused-2gemm {dims:?}"), &overlapped, &expected.y.data, TOLERANCE_BF16);
            assert_close(&format!("unfused {dims:?}"), &unfused, &expected.y.data, TOLERANCE_BF16);
            let unfused64: Vec<f64> = unfused.iter().map(|v| v.to_f64()).collect();
            assert_close(&format!("fused vs unfused {dims:?}"), &fused, &unfused64, TOLERANCE_BF16);
        }
    }
}
