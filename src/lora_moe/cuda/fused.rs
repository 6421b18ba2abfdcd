//! The fused bf16 LoRA-MoE on CUDA (kernels in `kernels/lora_moe_bf16.cu`, issue #3).
//!
//! [`LoraMoeLinear`] holds the weights of one or more projections that read the same `x`
//! (q, k, v), pre-packed once on the device: the shrink matrix `[A_cat of each projection ;
//! routers]` and the stacked GEMM weight `Wp = [W_p | 0 .. B_p .. 0]` of `[N_total, K_pad]`,
//! `K_pad = round_up(d + P*E*r, 8)`. [`LoraMoeLinear::forward`] then runs, on the device only:
//! one pass over `x` (shrink, router logits, band energies, copy of `x` into the augmented
//! activations `xa`), one gate/filter kernel (per-image prior, gates, `u = scale * gate *
//! band(s)` into `xa`), and one cuBLASLt bf16 GEMM `y = xa . Wp^T + bias` (f32 accumulate,
//! bias in the epilogue). [`lora_moe`] is the host functional form the dispatcher calls.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceRepr, PushKernelArg, ValidAsZeroBits,
};
use half::bf16;

use super::gemm::GemmPlans;
use super::shared::{bf16_kernel, check_len};
use crate::backend::cuda::{dev_err, kernel_int, launch_config, tiles, CudaDevice};
use crate::error::{FapeError, Result};
use crate::lora_moe::config::{LoraMoeConfig, LoraMoeDims, LoraMoeInputs, LoraMoeOutput, OP};
use crate::lora_moe::lowpass::gaussian_taps;
use crate::tensor::Tensor;

/// Mirrors `lora_moe_shrink_cfg` in `kernels/lora_moe_bf16.cu`.
mod shrink_cfg {
    /// `blockDim.x`.
    pub const THREADS: u32 = 256;
    /// Tokens per block (two m16 tiles of the tensor-core shrink).
    pub const TOKENS: usize = 32;
    /// Shrink-matrix rows per block (grid y): four n8 tiles.
    pub const SLAB: usize = 32;
    /// The shrink matrices' rows are padded with zeros to a multiple of this (one n8 tile).
    pub const ROW_PAD: usize = 8;
    /// Columns of x per block (the d split of grid x).
    pub const SPLIT_COLS: usize = 256;
    /// Padded shared row, bf16.
    pub const STRIDE: usize = 72;
    /// Static shared memory of the kernel (`red`: 8 warps x 3 doubles).
    pub const STATIC_SMEM_BYTES: usize = 8 * 3 * 8;

    /// Dynamic shared memory of a launch: the taps (f32, padded to 16 bytes), then the tile
    /// plus halo rows and the slab rows, STRIDE bf16 each.
    pub const fn dynamic_smem_bytes(taps: usize) -> usize {
        taps.next_multiple_of(4) * 4 + ((TOKENS + taps - 1) + SLAB) * STRIDE * 2
    }
}

/// Mirrors `lora_moe_gate_cfg` in `kernels/lora_moe_bf16.cu`.
mod gate_cfg {
    /// `blockDim.x`.
    pub const THREADS: u32 = 256;
    /// Tokens per block.
    pub const TOKENS: usize = 32;
    /// u columns staged per pass.
    pub const COLS: usize = 32;
    /// Experts the kernel's register arrays hold.
    pub const MAX_EXPERTS: usize = 16;
    /// Projections per group its shared gate array holds.
    pub const MAX_PROJECTIONS: usize = 4;
    /// Static shared memory of the kernel (`red`, `prior`, `gate_s`).
    pub const STATIC_SMEM_BYTES: usize = 8 * 3 * 8 + MAX_EXPERTS * 4 + TOKENS * MAX_PROJECTIONS * MAX_EXPERTS * 4;

    /// Dynamic shared memory of a launch: the staged s rows (tile plus halo) and the taps.
    pub const fn dynamic_smem_bytes(taps: usize) -> usize {
        ((TOKENS + taps - 1) * COLS + taps) * 4
    }
}

/// Longest filter the bf16 kernels stage in their 48 KiB of shared memory.
pub const MAX_TAPS: usize = 101;
// Both kernels launch without the opt-in for more than 48 KiB of shared memory
// (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`): static plus dynamic shared memory must stay
// within it up to MAX_TAPS taps.
const _: () = assert!(shrink_cfg::STATIC_SMEM_BYTES + shrink_cfg::dynamic_smem_bytes(MAX_TAPS) <= 48 * 1024);
const _: () = assert!(gate_cfg::STATIC_SMEM_BYTES + gate_cfg::dynamic_smem_bytes(MAX_TAPS) <= 48 * 1024);

/// Largest LoRA rank of the bf16 path.
pub const MAX_RANK: usize = 64;

const BACKEND: &str = "cuda";

fn unsupported(what: impl Into<String>) -> FapeError {
    FapeError::Unsupported { op: OP, backend: BACKEND, what: what.into() }
}

/// `d` (or `dg`) as the bf16 kernels need it: a multiple of 8 (16-byte rows).
fn check_multiple_of_8(tensor: &'static str, shape: &[usize], extent: usize) -> Result<()> {
    if extent.is_multiple_of(8) {
        Ok(())
    } else {
        Err(FapeError::Shape {
            op: OP,
            tensor,
            expected: "a last extent divisible by 8 (the CUDA bf16 path reads 16-byte rows)".to_string(),
            actual: shape.to_vec(),
        })
    }
}

/// The device address of `buf` must be 16-byte aligned (the kernels load 8 bf16 at a time).
fn check_aligned<T, P: DevicePtr<T>>(tensor: &'static str, buf: &P, stream: &CudaStream) -> Result<()> {
    let (ptr, _sync) = buf.device_ptr(stream);
    if ptr.is_multiple_of(16) {
        Ok(())
    } else {
        Err(unsupported(format!("tensor `{tensor}` starts at a device address not aligned to 16 bytes")))
    }
}

/// One projection's weights on the device, bf16 (PEFT layouts). `n` is its output width.
#[derive(Debug, Clone, Copy)]
pub struct LoraMoeProjection<'a> {
    /// `[n, d]`.
    pub weight: &'a CudaView<'a, bf16>,
    /// `[n]`, optional.
    pub bias: Option<&'a CudaView<'a, bf16>>,
    /// `[E, r, d]`.
    pub lora_a: &'a CudaView<'a, bf16>,
    /// `[E, n, r]`.
    pub lora_b: &'a CudaView<'a, bf16>,
    /// `[E, dg]`.
    pub router: &'a CudaView<'a, bf16>,
    /// Output features n.
    pub n: usize,
}

/// How [`LoraMoeLinear`] orders its work on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// The design: shrink/energy pass, gate/filter kernel, then ONE GEMM over the
    /// augmented K `[x | u] . [W | B]^T` (x copied into the augmented activations).
    OneGemm,
    /// The base GEMM `x W^T + bias` runs on the layer's stream while the shrink and gate kernels
    /// run on a second stream; a small GEMM then adds `u B^T` into `y` (beta = 1).
    Overlapped,
}

/// Scratch buffers of [`LoraMoeLinear::forward`], kept between calls and grown on demand.
struct Workspace {
    rows: usize,
    xa: CudaSlice<bf16>,
    s: CudaSlice<f32>,
    logits: Option<CudaSlice<f32>>,
    partials: CudaSlice<f64>,
}

/// A LoRA-MoE linear layer of `P` projections reading the same `x` (`P = 1` for one
/// projection, 3 for q, k, v), with its weights pre-packed on the device for the fused bf16
/// path. All projections share `d`, `E`, `r`, `dg` and the config; their outputs are
/// concatenated along features (`y [B*T, n_1 + .. + n_P]`), their gates stacked (`[P, B*T, E]`).
pub struct LoraMoeLinear {
    device: CudaDevice,
    /// The GEMMs' cuBLASLt handle and workspace, and their plans per shape.
    gemms: GemmPlans,
    shrink: CudaFunction,
    gate: CudaFunction,
    d: usize,
    dg: usize,
    experts: usize,
    rank: usize,
    outputs: Vec<usize>,
    k_pad: usize,
    /// `[mat_rows, d]`: the P shrink matrices `A_cat [E*r, d]`, then (when `dg == d`) the P
    /// routers `[E, d]`, then zero rows up to a multiple of 8 (the tensor cores' n8 tiles).
    shrink_mat: CudaSlice<bf16>,
    mat_rows: usize,
    routers_in_shrink: bool,
    /// `[router_rows, dg]`: the P routers for a guided call, zero rows up to a multiple of 8.
    router_mat: CudaSlice<bf16>,
    router_rows: usize,
    /// `[N_total, k_pad]`.
    weight: CudaSlice<bf16>,
    /// `[N_total]`.
    bias: Option<CudaSlice<bf16>>,
    h: CudaSlice<f32>,
    bands: CudaSlice<i32>,
    config: LoraMoeConfig,
    workspace: Mutex<Option<Workspace>>,
    /// The second stream of [`Schedule::Overlapped`], created on its first use (the candle op
    /// builds a layer per call and never needs it).
    side: OnceLock<Arc<CudaStream>>,
}

impl LoraMoeLinear {
    /// Packs `projections` (all on `device`'s stream) for inputs of `d` features whose router
    /// reads `dg` features, `experts` experts of rank `rank`.
    ///
    /// # Errors
    /// [`FapeError::Layout`] when a buffer's length disagrees with its shape;
    /// [`FapeError::Shape`] when `d` or `dg` is not a multiple of 8; [`FapeError::Config`] for
    /// a bad config or `bands` not matching `experts`; [`FapeError::Unsupported`] for more than
    /// 4 projections, more than 16 experts, a rank above 64, more than [`MAX_TAPS`] taps, or
    /// extents past 32-bit indexing; device and cuBLASLt errors.
    pub fn new(
        device: &CudaDevice,
        d: usize,
        dg: usize,
        experts: usize,
        rank: usize,
        projections: &[LoraMoeProjection<'_>],
        config: &LoraMoeConfig,
    ) -> Result<Self> {
        let count = projections.len();
        if count == 0 || count > gate_cfg::MAX_PROJECTIONS {
            return Err(unsupported(format!("{count} projections per group (1..=4 supported)")));
        }
        if experts == 0 || experts > gate_cfg::MAX_EXPERTS || rank == 0 || rank > MAX_RANK || d == 0 || dg == 0 {
            return Err(unsupported(format!("d {d}, dg {dg}, E {experts}, r {rank} (need E <= 16, r <= 64)")));
        }
        let outputs: Vec<usize> = projections.iter().map(|p| p.n).collect();
        let dims = LoraMoeDims { batch: 1, tokens: 1, d, n: outputs[0], experts, rank, dg };
        config.validate_for(&dims)?;
        if config.taps > MAX_TAPS {
            return Err(unsupported(format!("{} taps (the bf16 kernels stage at most {MAX_TAPS})", config.taps)));
        }
        check_multiple_of_8("x", &[d], d)?;
        check_multiple_of_8("router", &[experts, dg], dg)?;
        let stream = device.stream().clone();
        for p in projections {
            check_len("weight", p.weight.len(), &[p.n, d])?;
            if let Some(bias) = p.bias {
                check_len("bias", bias.len(), &[p.n])?;
            }
            check_len("lora_a", p.lora_a.len(), &[experts, rank, d])?;
            check_len("lora_b", p.lora_b.len(), &[experts, p.n, rank])?;
            check_len("router", p.router.len(), &[experts, dg])?;
            if p.n == 0 {
                return Err(FapeError::Shape {
                    op: OP,
                    tensor: "weight",
                    expected: "at least one element".into(),
                    actual: vec![0, d],
                });
            }
        }
        let width = experts * rank;
        let n_total: usize = outputs.iter().sum();
        let k_pad = (d + count * width).next_multiple_of(8);
        let routers_in_shrink = dg == d;
        let shrink_rows = count * width + if routers_in_shrink { count * experts } else { 0 };
        let mat_rows = shrink_rows.next_multiple_of(shrink_cfg::ROW_PAD);
        let router_rows = (count * experts).next_multiple_of(shrink_cfg::ROW_PAD);
        for (what, v) in
            [("packed weight", n_total * k_pad), ("shrink matrix", mat_rows * d), ("router matrix", router_rows * dg)]
        {
            kernel_int(OP, what, v)?;
        }

        let alloc = |what: &str, len: usize| {
            stream.alloc_zeros::<bf16>(len).map_err(dev_err(format!("allocating `{what}` ({len} bf16)")))
        };
        let mut shrink_mat = alloc("shrink matrix", mat_rows * d)?;
        let mut router_mat = alloc("router matrix", router_rows * dg)?;
        for (i, p) in projections.iter().enumerate() {
            let a_rows = i * width..(i + 1) * width;
            copy_rows(&stream, "lora_a", p.lora_a, &mut shrink_mat, a_rows, d)?;
            if routers_in_shrink {
                let at = count * width + i * experts;
                copy_rows(&stream, "router", p.router, &mut shrink_mat, at..at + experts, d)?;
            }
            copy_rows(&stream, "router", p.router, &mut router_mat, i * experts..(i + 1) * experts, dg)?;
        }

        let mut weight = alloc("packed weight", n_total * k_pad)?;
        let pack = bf16_kernel(device, "lora_moe_pack_bf16")?;
        let mut row0 = 0;
        for (i, p) in projections.iter().enumerate() {
            launch_pack(&stream, &pack, p, &mut weight, (d, experts, rank, k_pad), d + i * width, row0)?;
            row0 += p.n;
        }
        let bias = if projections.iter().any(|p| p.bias.is_some()) {
            let mut packed = alloc("packed bias", n_total)?;
            let mut at = 0;
            for p in projections {
                if let Some(b) = p.bias {
                    let mut dst = packed.slice_mut(at..at + p.n);
                    stream.memcpy_dtod(b, &mut dst).map_err(dev_err("copying `bias` into the packed bias"))?;
                }
                at += p.n;
            }
            Some(packed)
        } else {
            None
        };

        let h64 = gaussian_taps(config.taps, config.sigma)?;
        let h32: Vec<f32> = h64.iter().map(|&w| w as f32).collect();
        let h = stream.clone_htod(&h32).map_err(dev_err("copying the filter taps to the device"))?;
        let codes: Vec<i32> = config.bands.iter().map(|b| b.kernel_code() as i32).collect();
        let bands = stream.clone_htod(&codes).map_err(dev_err("copying `bands` to the device"))?;
        let gemms = GemmPlans::new(&stream)?;
        Ok(Self {
            device: device.clone(),
            gemms,
            shrink: bf16_kernel(device, "lora_moe_shrink_bf16")?,
            gate: bf16_kernel(device, "lora_moe_gate_bf16")?,
            d,
            dg,
            experts,
            rank,
            outputs,
            k_pad,
            shrink_mat,
            mat_rows,
            routers_in_shrink,
            router_mat,
            router_rows,
            weight,
            bias,
            h,
            bands,
            config: config.clone(),
            workspace: Mutex::new(None),
            side: OnceLock::new(),
        })
    }

    /// Output features of each projection, in order (`y`'s columns are their concatenation).
    pub fn outputs(&self) -> &[usize] {
        &self.outputs
    }

    /// Total output features `n_1 + .. + n_P`.
    pub fn n_total(&self) -> usize {
        self.outputs.iter().sum()
    }

    /// The augmented K of the GEMM: `d + P*E*r` rounded up to 8.
    pub fn k_augmented(&self) -> usize {
        self.k_pad
    }

    /// The stream every launch of this layer runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.device.stream()
    }

    /// The layer on device buffers, on [`Self::stream`] (asynchronous: nothing is read back).
    /// `x`: `[B*T, d]` bf16 (`batch` images of `tokens` tokens, row-major, 16-byte aligned);
    /// `guidance`: `[B*T, dg]` bf16, what the routers read (x when `None`, which needs
    /// `dg == d`); writes `y` `[B*T, N_total]` bf16 and `gates` `[P, B*T, E]` f32.
    ///
    /// # Errors
    /// [`FapeError::Layout`] when a buffer's length disagrees with its shape;
    /// [`FapeError::Shape`] for an empty input or a missing guidance with `dg != d`;
    /// [`FapeError::Unsupported`] for misaligned inputs or extents past the kernels' indexing
    /// and grid limits; device and cuBLASLt errors.
    pub fn forward(
        &self,
        x: &CudaView<'_, bf16>,
        batch: usize,
        tokens: usize,
        guidance: Option<&CudaView<'_, bf16>>,
        y: &mut CudaViewMut<'_, bf16>,
        gates: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        self.run(Schedule::OneGemm, x, batch, tokens, guidance, y, gates)
    }

    /// As [`Self::forward`], scheduled as [`Schedule::Overlapped`]: `y = x W^T + bias` on
    /// [`Self::stream`] while the shrink and gate kernels run on a second stream, then
    /// `y += u B^T` (a K = P*E*r GEMM accumulating into `y`). Same result up to bf16 rounding
    /// of the intermediate `y`; which schedule is faster is for `fape bench lora-moe` to say.
    ///
    /// # Errors
    /// As [`Self::forward`].
    pub fn forward_overlapped(
        &self,
        x: &CudaView<'_, bf16>,
        batch: usize,
        tokens: usize,
        guidance: Option<&CudaView<'_, bf16>>,
        y: &mut CudaViewMut<'_, bf16>,
        gates: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        self.run(Schedule::Overlapped, x, batch, tokens, guidance, y, gates)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        schedule: Schedule,
        x: &CudaView<'_, bf16>,
        batch: usize,
        tokens: usize,
        guidance: Option<&CudaView<'_, bf16>>,
        y: &mut CudaViewMut<'_, bf16>,
        gates: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        use shrink_cfg as sh;
        let (d, dg, experts) = (self.d, self.dg, self.experts);
        let count = self.outputs.len();
        let rows = batch * tokens;
        if rows == 0 {
            return Err(FapeError::Shape {
                op: OP,
                tensor: "x",
                expected: "at least one element".into(),
                actual: vec![batch, tokens, d],
            });
        }
        let stream = self.device.stream();
        check_len("x", x.len(), &[batch, tokens, d])?;
        check_aligned("x", x, stream)?;
        check_len("y", y.len(), &[batch, tokens, self.n_total()])?;
        check_len("gates", gates.len(), &[count, batch, tokens, experts])?;
        match guidance {
            Some(gd) => {
                check_len("guidance", gd.len(), &[batch, tokens, dg])?;
                check_aligned("guidance", gd, stream)?;
            }
            None if !self.routers_in_shrink => {
                return Err(FapeError::Shape {
                    op: OP,
                    tensor: "router",
                    expected: format!("[{experts},{d}] without guidance (the router reads x)"),
                    actual: vec![experts, dg],
                });
            }
            None => {}
        }
        let tiles_shrink = tiles(tokens, sh::TOKENS);
        let splits = tiles(d, sh::SPLIT_COLS);
        let g_splits = tiles(dg, sh::SPLIT_COLS);
        let pcount = tiles_shrink * splits;
        for (what, v) in [
            ("augmented activations", rows * self.k_pad),
            ("output", rows * self.n_total()),
            ("shrink partials", splits * rows * self.mat_rows),
            ("router partials", g_splits * rows * self.router_rows),
            ("x", rows * d.max(dg)),
            ("tokens plus a tile", tokens + sh::TOKENS + self.config.taps),
        ] {
            kernel_int(OP, what, v)?;
        }

        let mut guard = self.workspace.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|w| w.rows < rows || (guidance.is_some() && w.logits.is_none())) {
            let dev = &self.device;
            *guard = Some(Workspace {
                rows,
                xa: scratch(dev, "augmented activations", rows * self.k_pad, bf16::NAN)?,
                s: scratch(dev, "shrink partials", splits * rows * self.mat_rows, f32::NAN)?,
                logits: guidance
                    .map(|_| scratch(dev, "router partials", g_splits * rows * self.router_rows, f32::NAN))
                    .transpose()?,
                partials: scratch(dev, "energy partials", batch * pcount * 3, f64::NAN)?,
            });
        }
        let Some(ws) = guard.as_mut() else {
            return Err(unsupported("the workspace could not be allocated"));
        };
        // Sized for `rows` only when it was allocated for them: recheck the per-call extents.
        if ws.partials.len() < batch * pcount * 3 {
            ws.partials = scratch(&self.device, "energy partials", batch * pcount * 3, f64::NAN)?;
        }

        // The stream the shrink and gate kernels run on: the layer's, or (overlapped) the side
        // stream, which first waits for the work already queued on the layer's stream.
        let ks = match schedule {
            Schedule::OneGemm => stream,
            Schedule::Overlapped => {
                let side = self.side_stream()?;
                let queued = stream.record_event(None).map_err(dev_err("recording an event"))?;
                side.wait(&queued).map_err(dev_err("ordering the side stream"))?;
                side
            }
        };

        // On the side stream, the layer's stream joins it again (below) even when a launch failed,
        // so that no later use or free of the workspace on the layer's stream races its kernels:
        // cudarc's event tracking is off on this crate's contexts.
        let kernels = self.shrink_and_gate(ks, schedule, ws, x, batch, tokens, guidance, gates);
        let (n_total, k_pad) = (self.n_total(), self.k_pad);
        let weight = self.weight.slice(..);
        match schedule {
            // 3. y = xa . Wp^T + bias: one GEMM over the augmented K.
            Schedule::OneGemm => {
                kernels?;
                let a = ws.xa.slice(..rows * k_pad);
                self.gemms.gemm((&a, k_pad), (&weight, k_pad), self.bias.as_ref(), y, (rows, n_total, k_pad), 0.0)
            }
            // 3. y = x . W^T + bias (the first d columns of Wp), meanwhile the kernels above run
            // on the side stream; then y += u . B^T over the columns d.. of xa and Wp.
            Schedule::Overlapped => {
                let base = self.gemms.gemm((x, d), (&weight, k_pad), self.bias.as_ref(), y, (rows, n_total, d), 0.0);
                // Join the side stream even when a launch failed (see above).
                let done = ks.record_event(None).map_err(dev_err("recording an event"))?;
                stream.wait(&done).map_err(dev_err("waiting for the side stream"))?;
                kernels?;
                base?;
                let u = ws.xa.slice(d..rows * k_pad);
                let lora = self.weight.slice(d..);
                self.gemms.gemm((&u, k_pad), (&lora, k_pad), None, y, (rows, n_total, k_pad - d), 1.0)
            }
        }
    }
}

impl LoraMoeLinear {
    /// Steps 1 and 2 of [`Self::run`] on `ks` (the layer's stream, or the side stream of
    /// [`Schedule::Overlapped`]): the shrink/energy pass over `x` (and the router pass over the
    /// guidance), then the gate/filter kernel writing `u` into `ws.xa` and the gates. Extents
    /// were checked by the caller, which sized `ws` for them.
    ///
    /// # Errors
    /// [`FapeError::Unsupported`] past the kernels' int indexing; launch errors.
    #[allow(clippy::too_many_arguments)]
    fn shrink_and_gate(
        &self,
        ks: &Arc<CudaStream>,
        schedule: Schedule,
        ws: &mut Workspace,
        x: &CudaView<'_, bf16>,
        batch: usize,
        tokens: usize,
        guidance: Option<&CudaView<'_, bf16>>,
        gates: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        use gate_cfg as g;
        use shrink_cfg as sh;
        let (d, dg, experts, rank) = (self.d, self.dg, self.experts, self.rank);
        let count = self.outputs.len();
        let tiles_shrink = tiles(tokens, sh::TOKENS);
        let splits = tiles(d, sh::SPLIT_COLS);
        let g_splits = tiles(dg, sh::SPLIT_COLS);
        let pcount = tiles_shrink * splits;
        let taps = self.config.taps;
        let taps_i = kernel_int(OP, "taps", taps)?;
        let tokens_i = kernel_int(OP, "tokens", tokens)?;
        let k_pad_i = kernel_int(OP, "augmented K", self.k_pad)?;
        let shrink_smem = shrink_cfg::dynamic_smem_bytes(taps);
        // 1. One pass over x: shrink (+ router logits), copy into xa, band-energy partials.
        {
            let d_i = kernel_int(OP, "d", d)?;
            let mat_rows_i = kernel_int(OP, "shrink rows", self.mat_rows)?;
            let grid = (tiles_shrink * splits, tiles(self.mat_rows, sh::SLAB), batch);
            let cfg = launch_config(OP, grid, (sh::THREADS, 1, 1), shrink_smem as u32)?;
            let null: u64 = 0;
            let mut launch = ks.launch_builder(&self.shrink);
            launch.arg(x).arg(&self.shrink_mat).arg(&mut ws.s);
            match schedule {
                Schedule::OneGemm => launch.arg(&mut ws.xa),
                // The x part of y comes from x itself: no copy into xa.
                Schedule::Overlapped => launch.arg(&null),
            };
            launch
                .arg(&mut ws.partials)
                .arg(&self.h)
                .arg(&tokens_i)
                .arg(&d_i)
                .arg(&mat_rows_i)
                .arg(&k_pad_i)
                .arg(&taps_i);
            // SAFETY: the arguments match `lora_moe_shrink_bf16(const bf16* x, const bf16* mat,
            // float* s, bf16* xa, double* partials, const float* h, int tokens, int d,
            // int mat_rows, int xa_stride, int taps)`. x holds B*T*d bf16 (checked) at a
            // 16-byte aligned address with d % 8 == 0, so its 16-byte row loads are aligned and
            // in bounds (t < T, c < d); mat holds mat_rows*d (allocated so), s holds
            // splits*B*T*mat_rows f32 (mat_rows % 8 == 0: the kernel's 8-byte stores of
            // column pairs are aligned), xa B*T*k_pad bf16 (k_pad % 8 == 0, columns written < d)
            // or null (two 64-bit zeros, tested by the kernel before any access),
            // partials B*tiles*splits*3 f64 (workspace sized for these extents above), h taps
            // f32. The grid is (tiles*splits, ceil(mat_rows/SLAB), B) with gridDim.z = B as the
            // kernel assumes (it stages and multiplies only the slab rows below mat_rows), and
            // the dynamic shared memory is round_up(taps, 4) floats and ((TOKENS + taps - 1) +
            // SLAB) * STRIDE bf16 (<= 48 KiB for taps <= MAX_TAPS). Every extent fits int
            // (checked).
            unsafe { launch.launch(cfg) }.map_err(dev_err("launching lora_moe_shrink_bf16"))?;
        }
        if let (Some(gd), Some(logits)) = (guidance, ws.logits.as_mut()) {
            let dg_i = kernel_int(OP, "dg", dg)?;
            let router_rows_i = kernel_int(OP, "router rows", self.router_rows)?;
            let grid = (tiles_shrink * g_splits, tiles(self.router_rows, sh::SLAB), batch);
            let cfg = launch_config(OP, grid, (sh::THREADS, 1, 1), shrink_smem as u32)?;
            let null: u64 = 0;
            let mut launch = ks.launch_builder(&self.shrink);
            launch
                .arg(gd)
                .arg(&self.router_mat)
                .arg(logits)
                .arg(&null)
                .arg(&null)
                .arg(&self.h)
                .arg(&tokens_i)
                .arg(&dg_i)
                .arg(&router_rows_i)
                .arg(&k_pad_i)
                .arg(&taps_i);
            // SAFETY: as the launch above, over guidance [B*T, dg] (length and 16-byte alignment
            // checked, dg % 8 == 0) and the router matrix [router_rows, dg]; `logits` holds
            // g_splits*B*T*router_rows f32. xa and partials are null (two 64-bit zeros), which
            // the kernel tests before any access, so it neither copies nor computes energies.
            unsafe { launch.launch(cfg) }.map_err(dev_err("launching lora_moe_shrink_bf16 (guidance)"))?;
        }

        // 2. Prior, gates and u = scale * gate * band(s) into xa[:, d..].
        {
            let width = experts * rank;
            let (lg, lg_splits, lg_stride, lg_col) = match (guidance, ws.logits.as_ref()) {
                (Some(_), Some(l)) => (l, g_splits, self.router_rows, 0),
                _ => (&ws.s, splits, self.mat_rows, count * width),
            };
            let gate_smem = gate_cfg::dynamic_smem_bytes(taps);
            let cfg = launch_config(OP, (tiles(tokens, g::TOKENS), 1, batch), (g::THREADS, 1, 1), gate_smem as u32)?;
            let ints = [
                kernel_int(OP, "splits", splits)?,
                kernel_int(OP, "shrink rows", self.mat_rows)?,
                kernel_int(OP, "router splits", lg_splits)?,
                kernel_int(OP, "router stride", lg_stride)?,
                kernel_int(OP, "router column", lg_col)?,
                kernel_int(OP, "energy partials per image", pcount)?,
            ];
            let entries = (tokens * d) as f64;
            let dims_i = [
                kernel_int(OP, "projections", count)?,
                kernel_int(OP, "experts", experts)?,
                kernel_int(OP, "rank", rank)?,
            ];
            let temperature = self.config.temperature as f32;
            let lambda = self.config.lambda as f32;
            let top_k = kernel_int(OP, "top_k", self.config.top_k)?;
            let scale = self.config.scale_for(rank) as f32;
            let u_col = kernel_int(OP, "d", d)?;
            let mut launch = ks.launch_builder(&self.gate);
            launch
                .arg(&ws.s)
                .arg(&ints[0])
                .arg(&ints[1])
                .arg(lg)
                .arg(&ints[2])
                .arg(&ints[3])
                .arg(&ints[4])
                .arg(&ws.partials)
                .arg(&ints[5])
                .arg(&entries)
                .arg(&self.bands)
                .arg(&self.h)
                .arg(&taps_i)
                .arg(&tokens_i)
                .arg(&dims_i[0])
                .arg(&dims_i[1])
                .arg(&dims_i[2])
                .arg(&temperature)
                .arg(&lambda)
                .arg(&top_k)
                .arg(&scale)
                .arg(&mut ws.xa)
                .arg(&k_pad_i)
                .arg(&u_col)
                .arg(gates);
            // SAFETY: the arguments match `lora_moe_gate_bf16(const float* s, int s_splits,
            // int s_stride, const float* lg, int lg_splits, int lg_stride, int lg_col,
            // const double* partials, int pcount, double entries, const int* bands,
            // const float* h, int taps, int tokens, int projections, int experts, int rank,
            // float temperature, float lambda, int top_k, float scale, bf16* xa, int xa_stride,
            // int u_col, float* gates)`. It reads s below splits*B*T*mat_rows (columns <
            // P*E*r <= mat_rows), lg below lg_splits*B*T*lg_stride (columns lg_col + P*E <=
            // lg_stride: the routers follow the shrink rows, or fill the router matrix),
            // partials below B*pcount*3, bands below E and h below taps; it writes xa columns
            // d .. k_pad of rows < B*T and gates below P*B*T*E (length checked). P <= 4 and
            // E <= 16 (checked in `new`) bound its shared gate array; the grid is
            // (ceil(T/32), 1, B) with gridDim.z = B, and the dynamic shared memory holds
            // (32 + taps - 1) * 32 + taps floats. s and lg were written by the launches above
            // on the same stream `ks`.
            unsafe { launch.launch(cfg) }.map_err(dev_err("launching lora_moe_gate_bf16"))?;
        }
        Ok(())
    }

    /// The side stream of [`Schedule::Overlapped`], created on first use.
    ///
    /// # Errors
    /// [`FapeError::Device`] when the stream cannot be created.
    fn side_stream(&self) -> Result<&Arc<CudaStream>> {
        if let Some(side) = self.side.get() {
            return Ok(side);
        }
        let side = self.device.stream().context().new_stream().map_err(dev_err("creating the side stream"))?;
        Ok(self.side.get_or_init(|| side))
    }
}

/// A scratch buffer of `len` elements: zeros, or `nan` everywhere when `device` poisons its
/// outputs (so an element a kernel fails to write shows up in the result).
fn scratch<T: DeviceRepr + ValidAsZeroBits + Clone>(
    device: &CudaDevice,
    what: &str,
    len: usize,
    nan: T,
) -> Result<CudaSlice<T>> {
    let context = || format!("allocating `{what}` ({len} elements)");
    if device.is_poisoned() {
        device.stream().clone_htod(&vec![nan; len]).map_err(dev_err(context()))
    } else {
        device.stream().alloc_zeros::<T>(len).map_err(dev_err(context()))
    }
}

/// Copies the rows of `src` (`[rows.len(), cols]`) into rows `rows` of `dst` (`[_, cols]`).
fn copy_rows(
    stream: &Arc<CudaStream>,
    what: &str,
    src: &CudaView<'_, bf16>,
    dst: &mut CudaSlice<bf16>,
    rows: std::ops::Range<usize>,
    cols: usize,
) -> Result<()> {
    let mut view = dst.slice_mut(rows.start * cols..rows.end * cols);
    stream.memcpy_dtod(src, &mut view).map_err(dev_err(format!("copying `{what}` into the packed weights")))
}

/// Packs one projection into rows `row0..row0 + n` of the stacked weight (`lora_moe_pack_bf16`).
fn launch_pack(
    stream: &Arc<CudaStream>,
    pack: &CudaFunction,
    p: &LoraMoeProjection<'_>,
    out: &mut CudaSlice<bf16>,
    (d, experts, rank, k_pad): (usize, usize, usize, usize),
    u_col: usize,
    row0: usize,
) -> Result<()> {
    let ints = [
        kernel_int(OP, "n", p.n)?,
        kernel_int(OP, "d", d)?,
        kernel_int(OP, "experts", experts)?,
        kernel_int(OP, "rank", rank)?,
        kernel_int(OP, "augmented K", k_pad)?,
        kernel_int(OP, "u column", u_col)?,
        kernel_int(OP, "output row", row0)?,
    ];
    let blocks = tiles(p.n * k_pad, 256).min(1 << 16);
    let cfg = launch_config(OP, (blocks, 1, 1), (256, 1, 1), 0)?;
    let mut launch = stream.launch_builder(pack);
    launch.arg(p.weight).arg(p.lora_b).arg(out);
    for v in &ints {
        launch.arg(v);
    }
    // SAFETY: the arguments match `lora_moe_pack_bf16(const bf16* w, const bf16* lora_b,
    // bf16* out, int n, int d, int experts, int rank, int k_pad, int u_col, int row0)`. The
    // kernel grid-strides over n*k_pad entries, reading w below n*d and lora_b below
    // E*n*rank (lengths checked in `LoraMoeLinear::new`) and writing out at rows row0..row0+n
    // of k_pad columns, inside the [N_total, k_pad] allocation (row0 + n <= N_total).
    unsafe { launch.launch(cfg) }.map_err(dev_err("launching lora_moe_pack_bf16"))?;
    Ok(())
}

/// The LoRA-MoE layer in bf16 on the GPU from host tensors: uploads, packs one projection
/// ([`LoraMoeLinear`]), runs it in `schedule` and reads `y` and the gates back.
///
/// # Errors
/// (`dims` come from [`LoraMoeInputs::validate`].) [`FapeError::Shape`] when `d` or `dg` is not
/// a multiple of 8; the errors of [`LoraMoeLinear::new`] and [`LoraMoeLinear::forward`].
pub(crate) fn lora_moe(
    device: &CudaDevice,
    inputs: &LoraMoeInputs<'_, bf16>,
    dims: LoraMoeDims,
    config: &LoraMoeConfig,
    schedule: Schedule,
) -> Result<LoraMoeOutput<bf16>> {
    let LoraMoeDims { batch, tokens, d, n, experts, rank, dg } = dims;
    check_multiple_of_8("x", inputs.x.shape(), d)?;
    if let Some(g) = inputs.guidance {
        check_multiple_of_8("guidance", g.shape(), dg)?;
    }
    let stream = device.stream();
    let up = |what: &str, data: &[bf16]| {
        stream.clone_htod(data).map_err(dev_err(format!("copying `{what}` ({} bf16) to the device", data.len())))
    };
    let x = up("x", inputs.x.data())?;
    let weight = up("weight", inputs.weight.data())?;
    let bias = inputs.bias.map(|b| up("bias", b.data())).transpose()?;
    let lora_a = up("lora_a", inputs.lora_a.data())?;
    let lora_b = up("lora_b", inputs.lora_b.data())?;
    let router = up("router", inputs.router.data())?;
    let guidance = inputs.guidance.map(|g| up("guidance", g.data())).transpose()?;
    let views =
        (weight.slice(..), bias.as_ref().map(|b| b.slice(..)), lora_a.slice(..), lora_b.slice(..), router.slice(..));
    let projection = LoraMoeProjection {
        weight: &views.0,
        bias: views.1.as_ref(),
        lora_a: &views.2,
        lora_b: &views.3,
        router: &views.4,
        n,
    };
    let layer = LoraMoeLinear::new(device, d, dg, experts, rank, &[projection], config)?;

    let rows = batch * tokens;
    let poison = |len: usize| -> Result<CudaSlice<bf16>> {
        let fill = if device.is_poisoned() { bf16::NAN } else { bf16::ZERO };
        up("y", &vec![fill; len])
    };
    let mut y = poison(rows * n)?;
    let mut gates = device.output("gates", rows * experts)?;
    let g_view = guidance.as_ref().map(|g| g.slice(..));
    layer.run(
        schedule,
        &x.slice(..),
        batch,
        tokens,
        g_view.as_ref(),
        &mut y.slice_mut(..),
        &mut gates.slice_mut(..),
    )?;
    let context = "copying `y` back to the host (or an earlier kernel on the stream failed)";
    let y_host = stream.clone_dtoh(&y).map_err(dev_err(context))?;
    let gates_host = device.download("gates", &gates)?;
    Ok(LoraMoeOutput {
        y: Tensor { data: y_host, shape: vec![batch, tokens, n] },
        gates: Tensor {
            data: gates_host.into_iter().map(bf16::from_f32).collect(),
            shape: vec![batch, tokens, experts],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::{LoraMoeLinear, LoraMoeProjection, Schedule};
    use crate::backend::{Device, DeviceKind};
    use crate::error::FapeError;
    use crate::lora_moe::{lora_moe, reference, Band, LoraMoeConfig, LoraMoeDims, LoraMoeTensors, TOLERANCE_BF16};
    use crate::testing::{assert_close, device_or_skip};
    use half::bf16;

    fn dims(batch: usize, tokens: usize, d: usize, n: usize, experts: usize, rank: usize, dg: usize) -> LoraMoeDims {
        LoraMoeDims { batch, tokens, d, n, experts, rank, dg }
    }

    /// The fused bf16 path against the f64 reference on the same bf16 values, every top_k.
    fn sweep(device: &Device, seed: u64, dims: LoraMoeDims, bias: bool, bands: &[Band], taps: usize) {
        let tensors = LoraMoeTensors::random(seed, dims, bias).cast::<bf16>();
        let inputs = tensors.inputs();
        for top_k in 0..=dims.experts {
            let config = LoraMoeConfig { bands: bands.to_vec(), taps, top_k, ..LoraMoeConfig::default() };
            let got = lora_moe(device, &inputs, &config).unwrap();
            let expected = reference::lora_moe(&inputs, &config).unwrap();
            let what = format!("cuda bf16 {dims:?} bias {bias} k{top_k} taps {taps}");
            assert_close(&format!("{what} y"), &got.y.data, &expected.y.data, TOLERANCE_BF16);
            assert_close(&format!("{what} gates"), &got.gates.data, &expected.gates.data, TOLERANCE_BF16);
        }
    }

    #[test]
    fn cuda_bf16_matches_reference_on_awkward_shapes() {
        let Some(device) = device_or_skip("cuda_bf16_matches_reference_on_awkward_shapes", DeviceKind::Cuda) else {
            return;
        };
        use Band::{Full, High, Low};
        // Token tails (T not a tile multiple), d splits with a partial last chunk (d = 1032),
        // guidance, no bias, a lone token, every band, E = 16 x r = 64 (several slabs).
        sweep(&device, 1, dims(2, 37, 200, 72, 3, 5, 24), false, &[Low, High, Full], 9);
        sweep(&device, 2, dims(3, 1, 8, 9, 2, 4, 8), true, &[High, Low], 9);
        sweep(&device, 3, dims(1, 70, 1032, 65, 2, 8, 1032), true, &[Low, High], 9);
        sweep(&device, 4, dims(1, 23, 40, 33, 16, 64, 40), true, &[Low, High, Full, Low].repeat(4), 9);
        sweep(&device, 5, dims(2, 50, 24, 17, 2, 4, 24), true, &[Low, High], 65);
    }

    #[test]
    fn cuda_bf16_rejects_d_not_divisible_by_8() {
        let Some(device) = device_or_skip("cuda_bf16_rejects_d_not_divisible_by_8", DeviceKind::Cuda) else {
            return;
        };
        let tensors = LoraMoeTensors::random(7, dims(1, 5, 12, 8, 2, 4, 12), true).cast::<bf16>();
        match lora_moe(&device, &tensors.inputs(), &LoraMoeConfig::default()) {
            Err(FapeError::Shape { tensor: "x", actual, .. }) => assert_eq!(actual, vec![1, 5, 12]),
            other => panic!("expected a shape error on x, got {other:?}"),
        }
    }

    /// q, k, v sharing one x and guidance (one shrink, one GEMM over the concatenated N), on
    /// device buffers: each projection's columns of y and its gates against the reference.
    #[test]
    fn cuda_grouped_projections_match_the_reference_per_projection() {
        let test = "cuda_grouped_projections_match_the_reference_per_projection";
        let Some(Device::Cuda(device)) = device_or_skip(test, DeviceKind::Cuda) else {
            return;
        };
        let (batch, tokens, d, experts, rank, dg) = (2, 45, 64, 2, 8, 16);
        let config = LoraMoeConfig { top_k: 1, ..LoraMoeConfig::default() };
        let outputs = [24usize, 40, 8];
        let first =
            LoraMoeTensors::random(40, dims(batch, tokens, d, outputs[0], experts, rank, dg), true).cast::<bf16>();
        let (x, guidance) = (first.x.clone(), first.guidance.clone().expect("dg != d gives guidance"));
        let problems: Vec<LoraMoeTensors<bf16>> = outputs
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let p = LoraMoeTensors::random(41 + i as u64, dims(batch, tokens, d, n, experts, rank, dg), i != 2);
                LoraMoeTensors { x: x.clone(), guidance: Some(guidance.clone()), ..p.cast::<bf16>() }
            })
            .collect();
        let stream = device.stream();
        let up = |v: &[bf16]| stream.clone_htod(v).unwrap();
        let buffers: Vec<_> = problems
            .iter()
            .map(|p| {
                let bias = p.bias.as_ref().map(|b| up(&b.data));
                (up(&p.weight.data), bias, up(&p.lora_a.data), up(&p.lora_b.data), up(&p.router.data))
            })
            .collect();
        let views: Vec<_> = buffers
            .iter()
            .map(|(w, b, a, lb, r)| {
                (w.slice(..), b.as_ref().map(|b| b.slice(..)), a.slice(..), lb.slice(..), r.slice(..))
            })
            .collect();
        let projections: Vec<LoraMoeProjection<'_>> = views
            .iter()
            .zip(outputs)
            .map(|(v, n)| LoraMoeProjection {
                weight: &v.0,
                bias: v.1.as_ref(),
                lora_a: &v.2,
                lora_b: &v.3,
                router: &v.4,
                n,
            })
            .collect();
        let layer = LoraMoeLinear::new(&device, d, dg, experts, rank, &projections, &config).unwrap();
        assert_eq!((layer.n_total(), layer.k_augmented()), (72, 64 + 48));
        let (x_dev, g_dev) = (up(&x.data), up(&guidance.data));
        let rows = batch * tokens;
        let g_view = g_dev.slice(..);
        for schedule in [Schedule::OneGemm, Schedule::Overlapped] {
            let mut y = up(&vec![bf16::NAN; rows * 72]);
            let mut gates = stream.clone_htod(&vec![f32::NAN; 3 * rows * experts]).unwrap();
            let (x_view, mut y_view, mut g_out) = (x_dev.slice(..), y.slice_mut(..), gates.slice_mut(..));
            match schedule {
                Schedule::OneGemm => layer.forward(&x_view, batch, tokens, Some(&g_view), &mut y_view, &mut g_out),
                Schedule::Overlapped => {
                    layer.forward_overlapped(&x_view, batch, tokens, Some(&g_view), &mut y_view, &mut g_out)
                }
            }
            .unwrap();
            let y = stream.clone_dtoh(&y).unwrap();
            let gates = stream.clone_dtoh(&gates).unwrap();
            stream.synchronize().unwrap();
            let mut col0 = 0;
            for (i, p) in problems.iter().enumerate() {
                let n = outputs[i];
                let expected = reference::lora_moe(&p.inputs(), &config).unwrap();
                let got: Vec<bf16> = y.chunks(72).flat_map(|row| row[col0..col0 + n].iter().copied()).collect();
                assert_close(&format!("{schedule:?} projection {i} y"), &got, &expected.y.data, TOLERANCE_BF16);
                let g = &gates[i * rows * experts..(i + 1) * rows * experts];
                assert_close(&format!("{schedule:?} projection {i} gates"), g, &expected.gates.data, TOLERANCE_BF16);
                col0 += n;
            }
        }
    }

    #[test]
    fn cuda_bf16_propagates_nan_in_x() {
        let Some(device) = device_or_skip("cuda_bf16_propagates_nan_in_x", DeviceKind::Cuda) else {
            return;
        };
        let mut tensors = LoraMoeTensors::random(6, dims(2, 9, 16, 8, 2, 2, 16), true);
        tensors.x.data[3] = f32::NAN;
        let tensors = tensors.cast::<bf16>();
        let config = LoraMoeConfig { top_k: 1, ..LoraMoeConfig::default() };
        let got = lora_moe(&device, &tensors.inputs(), &config).unwrap();
        let per_image = 9 * 8;
        assert!(got.y.data[..per_image].iter().all(|v| v.is_nan()));
        assert!(got.y.data[per_image..].iter().all(|v| v.is_finite()));
    }
}
