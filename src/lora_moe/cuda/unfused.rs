//! The unfused bf16 LoRA-MoE baseline on CUDA: the reference's code path
//! ([`crate::lora_moe::reference::lora_moe`]) literally, on the device. Per expert: the band of `x` at
//! full width (`[B*T, d]`), its per-image energy, `s_e = band_e(x) A_e^T` and `t_e = s_e B_e^T`
//! (cuBLAS); the gates from the router logits (cuBLAS) and the priors; `y = x W^T + bias +
//! scale * sum_e gate_e * t_e`. Kept for the benchmarks (the cost fusion saves) and as a
//! second GPU reference. Kernels `lora_moe_unfused_*` in `kernels/lora_moe_bf16.cu`.

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, CudaViewMut, PushKernelArg};
use half::bf16;

use super::shared::bf16_kernel;
use crate::backend::cuda::{dev_err, kernel_int, launch_config, require_library, tiles, CudaDevice, MathLibrary};
use crate::error::{FapeError, Result};
use crate::lora_moe::config::{LoraMoeConfig, LoraMoeDims, LoraMoeTensors, OP};
use crate::lora_moe::lowpass::gaussian_taps;

/// Threads per block of every unfused kernel; grid-stride loops cap the blocks.
const THREADS: u32 = 256;
const MAX_BLOCKS: usize = 1 << 16;

/// `c [m, n] = a [m, k] . b [n, k]^T` in bf16 through cuBLAS (f32 accumulate), row-major.
fn gemm_nt(
    blas: &CudaBlas,
    a: &CudaView<'_, bf16>,
    b: &CudaView<'_, bf16>,
    c: &mut CudaViewMut<'_, bf16>,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    if a.len() < m * k || b.len() < n * k || c.len() < m * n {
        return Err(FapeError::Unsupported {
            op: OP,
            backend: "cuda",
            what: format!("unfused GEMM {m}x{n}x{k} on buffers of {} / {} / {}", a.len(), b.len(), c.len()),
        });
    }
    let int = |what: &str, v: usize| kernel_int(OP, what, v);
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_T,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: int("GEMM n", n)?,
        n: int("GEMM m", m)?,
        k: int("GEMM k", k)?,
        alpha: bf16::ONE,
        lda: int("GEMM k", k)?,
        ldb: int("GEMM k", k)?,
        beta: bf16::ZERO,
        ldc: int("GEMM n", n)?,
    };
    // SAFETY: column-major, C^T [n, m] (ldc = n) = B^T . A with B stored k x n (lda = k, used
    // transposed) and A stored k x m (ldb = k): cuBLAS reads n*k of b, m*k of a and writes m*n
    // of c, which the buffers hold (checked above). cudarc orders the call on the handle's
    // stream, the stream of every other launch of this baseline.
    unsafe { blas.gemm(cfg, b, a, c) }.map_err(|e| FapeError::Device {
        backend: "cuda",
        context: format!("cuBLAS bf16 GEMM {m}x{n}x{k}"),
        message: format!("{e:?}"),
    })
}

/// The baseline's weights and scratch buffers on one device, for one problem size.
pub(crate) struct Unfused {
    device: CudaDevice,
    blas: CudaBlas,
    band_fn: CudaFunction,
    energy_fn: CudaFunction,
    gate_fn: CudaFunction,
    add_fn: CudaFunction,
    dims: LoraMoeDims,
    config: LoraMoeConfig,
    weight: CudaSlice<bf16>,
    bias: Option<CudaSlice<bf16>>,
    lora_a: CudaSlice<bf16>,
    lora_b: CudaSlice<bf16>,
    router: CudaSlice<bf16>,
    h: CudaSlice<f32>,
    /// `E x [B*T, d]`: each expert's band of x.
    bands: Vec<CudaSlice<bf16>>,
    /// `[E, B]` f64.
    energies: CudaSlice<f64>,
    /// `[B*T, E]`.
    logits: CudaSlice<bf16>,
    gates: CudaSlice<f32>,
    /// `[B*T, n]`: x W^T.
    base: CudaSlice<bf16>,
    /// `[B*T, r]`.
    shrunk: CudaSlice<bf16>,
    /// `[B*T, n]`: one expert's s_e B_e^T.
    expert_out: CudaSlice<bf16>,
    /// `[B*T, n]` f32 running sum.
    acc: CudaSlice<f32>,
}

impl Unfused {
    /// Uploads `host` (bf16, no guidance) and allocates the scratch buffers for `dims`.
    ///
    /// # Errors
    /// [`FapeError::Unsupported`] with guidance or more than 16 experts; device and cuBLAS errors.
    pub(crate) fn new(
        device: &CudaDevice,
        host: &LoraMoeTensors<bf16>,
        dims: LoraMoeDims,
        config: &LoraMoeConfig,
    ) -> Result<Self> {
        if host.guidance.is_some() || dims.experts > 16 {
            return Err(FapeError::Unsupported {
                op: OP,
                backend: "cuda",
                what: "the unfused baseline routes on x with at most 16 experts".into(),
            });
        }
        let stream = device.stream();
        let up = |what: &str, data: &[bf16]| {
            stream.clone_htod(data).map_err(dev_err(format!("copying `{what}` ({} bf16) to the device", data.len())))
        };
        let zeros_bf16 = |what: &str, len: usize| {
            stream.alloc_zeros::<bf16>(len).map_err(dev_err(format!("allocating `{what}` ({len} bf16)")))
        };
        let LoraMoeDims { batch, tokens, d, n, experts, rank, .. } = dims;
        let rows = batch * tokens;
        let h64 = gaussian_taps(config.taps, config.sigma)?;
        let h32: Vec<f32> = h64.iter().map(|&w| w as f32).collect();
        let function = |name: &'static str| bf16_kernel(device, name);
        require_library(MathLibrary::Cublas, "the unfused LoRA-MoE baseline")?;
        Ok(Self {
            device: device.clone(),
            blas: CudaBlas::new(stream.clone()).map_err(|e| FapeError::Device {
                backend: "cuda",
                context: "creating the cuBLAS handle".into(),
                message: format!("{e:?}"),
            })?,
            band_fn: function("lora_moe_unfused_band_bf16")?,
            energy_fn: function("lora_moe_unfused_energy_bf16")?,
            gate_fn: function("lora_moe_unfused_gate_bf16")?,
            add_fn: function("lora_moe_unfused_add_bf16")?,
            dims,
            config: config.clone(),
            weight: up("weight", &host.weight.data)?,
            bias: host.bias.as_ref().map(|b| up("bias", &b.data)).transpose()?,
            lora_a: up("lora_a", &host.lora_a.data)?,
            lora_b: up("lora_b", &host.lora_b.data)?,
            router: up("router", &host.router.data)?,
            h: stream.clone_htod(&h32).map_err(dev_err("copying the filter taps to the device"))?,
            bands: (0..experts).map(|_| zeros_bf16("band", rows * d)).collect::<Result<_>>()?,
            energies: stream.alloc_zeros::<f64>(experts * batch).map_err(dev_err("allocating `energies`"))?,
            logits: zeros_bf16("logits", rows * experts)?,
            gates: stream.alloc_zeros::<f32>(rows * experts).map_err(dev_err("allocating `gates`"))?,
            base: zeros_bf16("x W^T", rows * n)?,
            shrunk: zeros_bf16("shrunk", rows * rank)?,
            expert_out: zeros_bf16("expert output", rows * n)?,
            acc: stream.alloc_zeros::<f32>(rows * n).map_err(dev_err("allocating `accumulator`"))?,
        })
    }

    /// Enqueues the layer on `x` `[B*T, d]`, writing `y` `[B*T, n]` (both bf16).
    ///
    /// # Errors
    /// [`FapeError::Unsupported`] for buffers shorter than the problem or extents past int;
    /// launch and cuBLAS errors.
    pub(crate) fn forward(&mut self, x: &CudaSlice<bf16>, y: &mut CudaSlice<bf16>) -> Result<()> {
        let LoraMoeDims { batch, tokens, d, n, experts, rank, .. } = self.dims;
        let rows = batch * tokens;
        if x.len() < rows * d || y.len() < rows * n {
            return Err(FapeError::Unsupported {
                op: OP,
                backend: "cuda",
                what: format!("unfused baseline on x / y buffers of {} / {} elements", x.len(), y.len()),
            });
        }
        let stream = self.device.stream().clone();
        let grid = |total: usize| tiles(total, THREADS as usize).clamp(1, MAX_BLOCKS);
        let tokens_i = kernel_int(OP, "tokens", tokens)?;
        let d_i = kernel_int(OP, "d", d)?;
        let taps_i = kernel_int(OP, "taps", self.config.taps)?;
        let experts_i = kernel_int(OP, "experts", experts)?;
        kernel_int(OP, "tokens + taps", tokens + self.config.taps)?;

        // Per expert: band_e(x) at full width, then its per-image energy.
        stream.memset_zeros(&mut self.energies).map_err(dev_err("zeroing `energies`"))?;
        let total = (rows * d) as i64;
        let per_image = (tokens * d) as i64;
        for (e, band) in self.config.bands.iter().enumerate() {
            let code = band.kernel_code() as i32;
            let cfg = launch_config(OP, (grid(rows * d), 1, 1), (THREADS, 1, 1), 0)?;
            let mut launch = stream.launch_builder(&self.band_fn);
            launch
                .arg(x)
                .arg(&self.h)
                .arg(&mut self.bands[e])
                .arg(&total)
                .arg(&tokens_i)
                .arg(&d_i)
                .arg(&taps_i)
                .arg(&code);
            // SAFETY: matches `lora_moe_unfused_band_bf16(const bf16* x, const float* h, bf16* out,
            // long long total, int tokens, int d, int taps, int band)`; it grid-strides over
            // i < total = B*T*d, reading x (checked to hold B*T*d) at rows of the same image and
            // h below taps, writing out (allocated B*T*d) at i.
            unsafe { launch.launch(cfg) }.map_err(dev_err("launching lora_moe_unfused_band_bf16"))?;

            let blocks = grid(tokens * d).min(1024);
            let cfg = launch_config(OP, (blocks, batch, 1), (THREADS, 1, 1), 0)?;
            let mut energy = self.energies.slice_mut(e * batch..(e + 1) * batch);
            let mut launch = stream.launch_builder(&self.energy_fn);
            launch.arg(&self.bands[e]).arg(&mut energy).arg(&per_image);
            // SAFETY: matches `lora_moe_unfused_energy_bf16(const bf16* v, double* energies,
            // long long per_image)`; block (bx, b) reads v at b*per_image + i < B*T*d and adds
            // to energies[b], b < B = gridDim.y, inside the expert's B-long view.
            unsafe { launch.launch(cfg) }.map_err(dev_err("launching lora_moe_unfused_energy_bf16"))?;
        }

        // Router logits and gates.
        gemm_nt(&self.blas, &x.slice(..), &self.router.slice(..), &mut self.logits.slice_mut(..), (rows, experts, d))?;
        {
            let rows_i = kernel_int(OP, "rows", rows)?;
            let batch_i = kernel_int(OP, "batch", batch)?;
            let entries = (tokens * d) as f64;
            let temperature = self.config.temperature as f32;
            let lambda = self.config.lambda as f32;
            let top_k = kernel_int(OP, "top_k", self.config.top_k)?;
            let cfg = launch_config(OP, (grid(rows), 1, 1), (THREADS, 1, 1), 0)?;
            let mut launch = stream.launch_builder(&self.gate_fn);
            launch
                .arg(&self.logits)
                .arg(&self.energies)
                .arg(&mut self.gates)
                .arg(&rows_i)
                .arg(&tokens_i)
                .arg(&batch_i)
                .arg(&experts_i)
                .arg(&entries)
                .arg(&temperature)
                .arg(&lambda)
                .arg(&top_k);
            // SAFETY: matches `lora_moe_unfused_gate_bf16(const bf16* logits, const double*
            // energies, float* gates, int rows, int tokens, int batch, int experts, double
            // entries, float temperature, float lambda, int top_k)`; it reads logits and writes
            // gates below rows*E (both allocated so) and energies below E*B; E <= 16 (checked
            // in `new`) bounds its register arrays.
            unsafe { launch.launch(cfg) }.map_err(dev_err("launching lora_moe_unfused_gate_bf16"))?;
        }

        // y = x W^T + bias + scale * sum_e gate_e * (band_e A_e^T) B_e^T.
        gemm_nt(&self.blas, &x.slice(..), &self.weight.slice(..), &mut self.base.slice_mut(..), (rows, n, d))?;
        let scale = self.config.scale_for(rank) as f32;
        let total_y = (rows * n) as i64;
        let n_i = kernel_int(OP, "n", n)?;
        let null: u64 = 0;
        for e in 0..experts {
            let a_e = self.lora_a.slice(e * rank * d..(e + 1) * rank * d);
            gemm_nt(&self.blas, &self.bands[e].slice(..), &a_e, &mut self.shrunk.slice_mut(..), (rows, rank, d))?;
            let b_e = self.lora_b.slice(e * n * rank..(e + 1) * n * rank);
            gemm_nt(&self.blas, &self.shrunk.slice(..), &b_e, &mut self.expert_out.slice_mut(..), (rows, n, rank))?;
            let (e_i, first, last) = (kernel_int(OP, "expert", e)?, i32::from(e == 0), i32::from(e + 1 == experts));
            let cfg = launch_config(OP, (grid(rows * n), 1, 1), (THREADS, 1, 1), 0)?;
            let mut launch = stream.launch_builder(&self.add_fn);
            launch.arg(&self.base);
            match &self.bias {
                Some(b) => launch.arg(b),
                None => launch.arg(&null),
            };
            launch
                .arg(&self.expert_out)
                .arg(&self.gates)
                .arg(&mut self.acc)
                .arg(&mut *y)
                .arg(&total_y)
                .arg(&n_i)
                .arg(&e_i)
                .arg(&experts_i)
                .arg(&scale)
                .arg(&first)
                .arg(&last);
            // SAFETY: matches `lora_moe_unfused_add_bf16(const bf16* base, const bf16* bias,
            // const bf16* t, const float* gates, float* acc, bf16* out, long long total, int n,
            // int e, int experts, float scale, int first, int last)`; it grid-strides over
            // i < B*T*n, reading base, t, acc and writing acc / out at i (all allocated or
            // checked to hold B*T*n), bias below n when non-null (a null pointer otherwise, which
            // the kernel tests), gates below B*T*E.
            unsafe { launch.launch(cfg) }.map_err(dev_err("launching lora_moe_unfused_add_bf16"))?;
        }
        Ok(())
    }
}
