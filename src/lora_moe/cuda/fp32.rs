//! CUDA launch wrappers of the LoRA-MoE ops (kernels in `kernels/lora_moe.cu`).

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::backend::cuda::{dev_err, kernel_int, launch_config, tiles, CudaDevice, LORA_MOE_CU};
use crate::error::{FapeError, Result};
use crate::lora_moe::lowpass::OP as LOWPASS_OP;
use crate::lora_moe::{LowpassDims, OP};

/// Mirrors `token_lowpass_cfg` in `kernels/lora_moe.cu`.
mod lowpass_cfg {
    /// Channels per block (`blockDim.x`, one warp).
    pub const CHANNELS: usize = 32;
    /// Row groups per block (`blockDim.y`).
    pub const ROW_GROUPS: usize = 8;
    /// Output tokens per block of `token_lowpass_f32` (8 per thread).
    pub const SHORT_TOKENS: usize = ROW_GROUPS * 8;
    /// Output tokens per block of `token_lowpass_long_f32` (16 per thread).
    pub const LONG_TOKENS: usize = ROW_GROUPS * 16;
    /// Filters of at least this many taps run `token_lowpass_long_f32`. On an H200 (B,T,C =
    /// 4,4096,1024 and 16,1024,3072) the short kernel was 7-20% faster at 9 and 31 taps, the
    /// long one 7-23% faster at 65 and 129 taps, and they tied at 47 and 49.
    pub const LONG_TAPS_MIN: usize = 48;
}

/// Token low-pass on the GPU: `x` `[B,T,C]` f32 (row-major, `dims` validated, non-empty),
/// `h` the odd-length FIR; returns `[B,T,C]` f32 with
/// `out[b,t,c] = sum_j h[j] x[b, t+j-(taps-1)/2, c]`, zero padding within each image.
///
/// # Errors
/// [`FapeError::Unsupported`] when an extent exceeds the kernel's 32-bit indexing;
/// [`FapeError::Nvrtc`] / [`FapeError::Device`] from compilation, transfers and the launch.
pub(crate) fn token_lowpass(d: &CudaDevice, x: &[f32], dims: LowpassDims, h: &[f64]) -> Result<Vec<f32>> {
    debug_assert_eq!(x.len(), dims.batch * dims.tokens * dims.channels, "validated by the caller");
    let h32: Vec<f32> = h.iter().map(|&w| w as f32).collect();
    let x_dev = d.upload("x", x)?;
    let h_dev = d.upload("h", &h32)?;
    let mut out = d.output("out", x.len())?;
    launch_token_lowpass(d, LOWPASS_OP, &x_dev, &h_dev, &mut out, dims)?;
    d.download("out", &out)
}

/// Launches the token low-pass on device buffers: `x` and `out` hold `[B,T,C]` f32 of `dims`
/// (non-empty), `h` the odd-length FIR in f32. `op` names the calling op in errors.
///
/// # Errors
/// [`FapeError::Unsupported`] when an extent exceeds the kernel's 32-bit indexing or a buffer
/// is too short; [`FapeError::Nvrtc`] / [`FapeError::Device`] from compilation and the launch.
fn launch_token_lowpass(
    d: &CudaDevice,
    op: &'static str,
    x: &CudaSlice<f32>,
    h: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    dims: LowpassDims,
) -> Result<()> {
    use lowpass_cfg::*;
    let LowpassDims { batch, tokens, channels } = dims;
    let taps = h.len();
    let len = batch * tokens * channels;
    if x.len() < len || out.len() < len || taps.is_multiple_of(2) {
        return Err(FapeError::Unsupported {
            op,
            backend: "cuda",
            what: format!(
                "token low-pass buffers of {} / {} f32 for {len} entries and {taps} taps",
                x.len(),
                out.len()
            ),
        });
    }
    let batch_i = kernel_int(op, "batch", batch)?;
    let tokens_i = kernel_int(op, "tokens", tokens)?;
    let channels_i = kernel_int(op, "channels", channels)?;
    let taps_i = kernel_int(op, "taps", taps)?;
    let (kernel, tile_tokens) = if taps >= LONG_TAPS_MIN {
        ("token_lowpass_long_f32", LONG_TOKENS)
    } else {
        ("token_lowpass_f32", SHORT_TOKENS)
    };
    // The kernel forms token indices up to T + taps + a tile and channels up to a whole
    // tile in int.
    kernel_int(op, "tokens + taps", tokens + taps + tile_tokens)?;
    kernel_int(op, "channels rounded up to a tile", tiles(channels, CHANNELS) * CHANNELS)?;

    let blocks =
        tiles(channels, CHANNELS).checked_mul(tiles(tokens, tile_tokens)).ok_or_else(|| FapeError::Unsupported {
            op,
            backend: "cuda",
            what: format!("{tokens} tokens x {channels} channels is too many tiles"),
        })?;
    // Images beyond gridDim.y are covered by the kernel's grid-stride loop.
    let cfg = launch_config(op, (blocks, batch.min(65_535), 1), (CHANNELS as u32, ROW_GROUPS as u32, 1), 0)?;

    let function = d.function(LORA_MOE_CU, kernel)?;
    let stream = d.stream();
    let mut launch = stream.launch_builder(&function);
    launch.arg(x).arg(h).arg(out).arg(&batch_i).arg(&tokens_i).arg(&channels_i).arg(&taps_i);
    // SAFETY: the arguments match `token_lowpass_f32` / `token_lowpass_long_f32(const float* x,
    // const float* h, float* out, int batch, int tokens, int channels, int taps)` in order and
    // type, and the grid was sized with the chosen kernel's tile; `x` and `out` hold at least
    // batch*tokens*channels f32 and `h` holds taps f32 (checked above), and the kernel only
    // reads x at b < batch, 0 <= t < tokens, c < channels, h below taps, and writes out at the
    // same bounds (all extents checked to fit its int arithmetic above). The buffers outlive
    // the launch: callers download (synchronizing the stream) before they drop, and cudarc's
    // drop waits on the stream otherwise.
    unsafe { launch.launch(cfg) }.map_err(dev_err(format!("launching {kernel}")))?;
    Ok(())
}

/// Mirrors `lora_moe_gemm_cfg` in `kernels/lora_moe.cu`.
mod gemm_cfg {
    /// `blockDim.x` = `blockDim.y`.
    pub const DIM: u32 = 16;
    /// Rows of C per block.
    pub const TILE_M: usize = 64;
    /// Columns of C per block.
    pub const TILE_N: usize = 64;
}

/// Mirrors `lora_moe_energy_cfg` in `kernels/lora_moe.cu`.
mod energy_cfg {
    /// `blockDim.x`.
    pub const THREADS: u32 = 256;
    /// Entries of one image per block.
    pub const CHUNK: usize = 4096;
}

/// `blockDim.x` of `lora_moe_band_scale_f32`, and the cap on its grid (it grid-strides).
const BAND_SCALE_THREADS: u32 = 256;
const BAND_SCALE_MAX_BLOCKS: usize = 1 << 20;

/// One K segment of [`gemm_nt`]'s augmented operands: `a [m,k]`, `b [n,k]`.
struct Segment<'a> {
    a: &'a CudaSlice<f32>,
    b: &'a CudaSlice<f32>,
    k: usize,
}

/// `c [m,n] = [a1 | a2] . [b1 | b2]^T (+ bias [n])`, i.e. `a1 [m,k1] . b1 [n,k1]^T + a2 [m,k2] .
/// b2 [n,k2]^T`, in full f32 (no TF32: cuBLASLt through cudarc is not used, so TF32 can never
/// sneak in) with `lora_moe_gemm_nt_f32`; all operands dense row-major on the device.
#[allow(clippy::too_many_arguments)]
fn gemm_nt(
    d: &CudaDevice,
    what: &str,
    first: Segment<'_>,
    second: Option<Segment<'_>>,
    bias: Option<&CudaSlice<f32>>,
    c: &mut CudaSlice<f32>,
    m: usize,
    n: usize,
) -> Result<()> {
    use gemm_cfg::*;
    let short = |name: &str, have: usize, need: usize| FapeError::Unsupported {
        op: OP,
        backend: "cuda",
        what: format!("{what}: buffer `{name}` holds {have} f32 but {need} are needed"),
    };
    let check = |name: &str, buf: &CudaSlice<f32>, need: usize| {
        if buf.len() < need {
            Err(short(name, buf.len(), need))
        } else {
            Ok(())
        }
    };
    check("a1", first.a, m * first.k)?;
    check("b1", first.b, n * first.k)?;
    let (a2, b2, k2) = match &second {
        Some(seg) => {
            check("a2", seg.a, m * seg.k)?;
            check("b2", seg.b, n * seg.k)?;
            (seg.a, seg.b, seg.k)
        }
        // Unread by the kernel when k2 = 0.
        None => (first.a, first.b, 0),
    };
    if let Some(bias) = bias {
        check("bias", bias, n)?;
    }
    check("c", c, m * n)?;
    // The kernel forms row and column indices up to a whole tile past m and n in int, and
    // offsets (row * k + k) in 64 bits.
    let m_i = kernel_int(OP, "rows", m)?;
    let n_i = kernel_int(OP, "output columns", n)?;
    let k1_i = kernel_int(OP, "K", first.k)?;
    let k2_i = kernel_int(OP, "K", k2)?;
    kernel_int(OP, "rows rounded up to a tile", tiles(m, TILE_M) * TILE_M)?;
    kernel_int(OP, "columns rounded up to a tile", tiles(n, TILE_N) * TILE_N)?;
    kernel_int(OP, "augmented K rounded up to a tile", first.k + k2 + 16)?;
    let has_bias: i32 = bias.is_some().into();
    let bias_arg = bias.unwrap_or(first.b);

    let cfg = launch_config(OP, (tiles(m, TILE_M), tiles(n, TILE_N), 1), (DIM, DIM, 1), 0)?;
    let function = d.function(LORA_MOE_CU, "lora_moe_gemm_nt_f32")?;
    let stream = d.stream();
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(first.a)
        .arg(first.b)
        .arg(&k1_i)
        .arg(a2)
        .arg(b2)
        .arg(&k2_i)
        .arg(bias_arg)
        .arg(&has_bias)
        .arg(c)
        .arg(&m_i)
        .arg(&n_i);
    // SAFETY: the arguments match `lora_moe_gemm_nt_f32(const float* a1, const float* b1, int k1,
    // const float* a2, const float* b2, int k2, const float* bias, int has_bias, float* c,
    // int m, int n)` in order and type. The kernel reads a1 below m*k1, b1 below n*k1, a2 below
    // m*k2, b2 below n*k2 (nothing when k2 = 0), bias below n only when has_bias, and writes c
    // below m*n: every buffer was checked above to hold that many f32, and `c` is a distinct
    // allocation from the inputs (it is borrowed mutably). Extents fit its int arithmetic
    // (checked above), the grid covers ceil(m/64) x ceil(n/64) tiles with (16,16) threads as
    // the kernel assumes. The buffers outlive the launch: the caller downloads (synchronizing
    // the stream) before they drop, and cudarc's drop waits on the stream otherwise.
    unsafe { launch.launch(cfg) }.map_err(dev_err(format!("launching lora_moe_gemm_nt_f32 ({what})")))?;
    Ok(())
}

/// Per-image band-energy sums `[B][low^2, (x-low)^2, x^2]` in f64 of `x` `[B, per_image]` and
/// its token low-pass `low`, from `lora_moe_energy_f32`'s per-block partials (added here).
fn band_sums(
    d: &CudaDevice,
    x: &CudaSlice<f32>,
    low: &CudaSlice<f32>,
    batch: usize,
    per_image: usize,
) -> Result<Vec<[f64; 3]>> {
    use energy_cfg::*;
    let len = batch * per_image;
    if x.len() < len || low.len() < len {
        return Err(FapeError::Unsupported {
            op: OP,
            backend: "cuda",
            what: format!("band energies of {len} entries from buffers of {} / {} f32", x.len(), low.len()),
        });
    }
    let chunks = tiles(per_image, CHUNK);
    let chunks_i = kernel_int(OP, "energy chunks per image", chunks)?;
    let per_image_i = i64::try_from(per_image).map_err(|_| FapeError::Unsupported {
        op: OP,
        backend: "cuda",
        what: format!("{per_image} entries per image"),
    })?;
    let blocks = batch.saturating_mul(chunks);
    kernel_int(OP, "energy blocks", blocks)?;
    let cfg = launch_config(OP, (blocks, 1, 1), (THREADS, 1, 1), 0)?;
    let stream = d.stream();
    let mut partials = stream
        .alloc_zeros::<f64>(blocks * 3)
        .map_err(dev_err(format!("allocating `energy partials` ({} f64)", blocks * 3)))?;
    let function = d.function(LORA_MOE_CU, "lora_moe_energy_f32")?;
    let mut launch = stream.launch_builder(&function);
    launch.arg(x).arg(low).arg(&mut partials).arg(&chunks_i).arg(&per_image_i);
    // SAFETY: the arguments match `lora_moe_energy_f32(const float* x, const float* low,
    // double* partials, int chunks, long long per_image)` in order and type. Block
    // b*chunks + chunk reads x and low at b*per_image + [chunk*4096, min((chunk+1)*4096,
    // per_image)), below batch*per_image, which both buffers hold (checked above), and writes
    // partials at 3*blockIdx.x + {0,1,2} < 3*blocks, the length allocated. The grid has
    // exactly batch*chunks blocks of 256 threads, as the kernel assumes; blockIdx.x fits int.
    // The buffers outlive the launch: they are downloaded (synchronizing the stream) below.
    unsafe { launch.launch(cfg) }.map_err(dev_err("launching lora_moe_energy_f32"))?;
    let context = "copying `energy partials` back to the host (or an earlier kernel on the stream failed)";
    let host = stream.clone_dtoh(&partials).map_err(dev_err(context))?;
    stream.synchronize().map_err(dev_err(context))?;
    Ok(host
        .chunks(chunks * 3)
        .map(|image| {
            let mut sums = [0.0f64; 3];
            for part in image.chunks(3) {
                for (s, p) in sums.iter_mut().zip(part) {
                    *s += p;
                }
            }
            sums
        })
        .collect())
}

/// `u = factor * band_e(s)` with `lora_moe_band_scale_f32`: `s`, `low` (its token low-pass)
/// and `u` are `[rows, E*r]`, `factor` `[rows, E]`, `bands` `[E]` (0 low, 1 high, 2 full).
#[allow(clippy::too_many_arguments)]
fn band_scale(
    d: &CudaDevice,
    s: &CudaSlice<f32>,
    low: &CudaSlice<f32>,
    factor: &CudaSlice<f32>,
    bands: &CudaSlice<i32>,
    u: &mut CudaSlice<f32>,
    rows: usize,
    experts: usize,
    rank: usize,
) -> Result<()> {
    let len = rows * experts * rank;
    if s.len() < len || low.len() < len || u.len() < len || factor.len() < rows * experts || bands.len() < experts {
        return Err(FapeError::Unsupported {
            op: OP,
            backend: "cuda",
            what: format!("band scaling of {rows} x {experts} x {rank} from buffers too short"),
        });
    }
    let rows_i = kernel_int(OP, "rows", rows)?;
    let experts_i = kernel_int(OP, "experts", experts)?;
    let rank_i = kernel_int(OP, "rank", rank)?;
    let blocks = tiles(len, BAND_SCALE_THREADS as usize).min(BAND_SCALE_MAX_BLOCKS);
    let cfg = launch_config(OP, (blocks, 1, 1), (BAND_SCALE_THREADS, 1, 1), 0)?;
    let function = d.function(LORA_MOE_CU, "lora_moe_band_scale_f32")?;
    let stream = d.stream();
    let mut launch = stream.launch_builder(&function);
    launch.arg(s).arg(low).arg(factor).arg(bands).arg(u).arg(&rows_i).arg(&experts_i).arg(&rank_i);
    // SAFETY: the arguments match `lora_moe_band_scale_f32(const float* s, const float* low,
    // const float* factor, const int* bands, float* u, int rows, int experts, int rank)` in
    // order and type. The kernel grid-strides over i < rows*experts*rank (64-bit), reading s,
    // low at i, factor below rows*experts and bands below experts, and writing u at i: every
    // buffer was checked above to hold that many elements, and `u` is a distinct allocation
    // (borrowed mutably). The buffers outlive the launch: the caller downloads (synchronizing
    // the stream) before they drop, and cudarc's drop waits on the stream otherwise.
    unsafe { launch.launch(cfg) }.map_err(dev_err("launching lora_moe_band_scale_f32"))?;
    Ok(())
}

/// The LoRA-MoE layer in f32 on the GPU (issue #3). Mirrors [`crate::lora_moe::cpu::lora_moe`]: shrink
/// first, then one accumulation over the augmented K `[x | u] . [W | B_1 .. B_E]^T + bias`.
///
/// On the device: the shrink `s = x . A_cat^T` and router logits `g . router^T` (f32 GEMM
/// kernel, no TF32), `low(x)` and the per-image band-energy partial sums (f64), `low(s)` and
/// `u = scale * gate * band_e(s)`, the final GEMM with bias. On the host, in f64: the chunk sums
/// of the energies, the priors and the gates (`gating::gate_token`, as every host path), which
/// need the logits `[B*T, E]` and the energies read back once; the factors `scale * gate` go
/// back up as `[B*T, E]` f32. Any extents the kernels' int indexing allows (no alignment
/// requirement on d, n, r or E).
///
/// # Errors
/// (`dims` come from [`crate::lora_moe::LoraMoeInputs::validate`], run by the caller.) [`FapeError::Unsupported`]
/// when an extent exceeds the kernels' 32-bit indexing or the CUDA grid limits;
/// [`FapeError::Nvrtc`] / [`FapeError::Device`] from compilation, transfers and launches.
pub(crate) fn lora_moe(
    d: &CudaDevice,
    inputs: &crate::lora_moe::LoraMoeInputs<'_, f32>,
    dims: crate::lora_moe::LoraMoeDims,
    config: &crate::lora_moe::LoraMoeConfig,
) -> Result<crate::lora_moe::LoraMoeOutput<f32>> {
    use crate::lora_moe::gating::gates_from_band_sums;
    use crate::lora_moe::{gaussian_taps, LoraMoeOutput};
    use crate::tensor::Tensor;

    let h = gaussian_taps(config.taps, config.sigma)?;
    let (rows, width) = (dims.batch * dims.tokens, dims.experts * dims.rank);
    let (n, e_count, rank) = (dims.n, dims.experts, dims.rank);

    let h32: Vec<f32> = h.iter().map(|&w| w as f32).collect();
    let h_dev = d.upload("h", &h32)?;
    let x_dev = d.upload("x", inputs.x.data())?;
    let a_dev = d.upload("lora_a", inputs.lora_a.data())?;
    let router_dev = d.upload("router", inputs.router.data())?;
    let guidance_dev = inputs.guidance.map(|g| d.upload("guidance", g.data())).transpose()?;

    // 1. s = x . A_cat^T; lora_a [E,r,d] is A_cat [E*r, d] already.
    let mut s_dev = d.output("shrunk", rows * width)?;
    gemm_nt(d, "shrink", Segment { a: &x_dev, b: &a_dev, k: dims.d }, None, None, &mut s_dev, rows, width)?;

    // 2. Router logits [B*T, E].
    let mut logits_dev = d.output("logits", rows * e_count)?;
    let g_dev = guidance_dev.as_ref().unwrap_or(&x_dev);
    gemm_nt(d, "router", Segment { a: g_dev, b: &router_dev, k: dims.dg }, None, None, &mut logits_dev, rows, e_count)?;

    // 3. Band energies of x per image.
    let x_dims = LowpassDims { batch: dims.batch, tokens: dims.tokens, channels: dims.d };
    let mut x_low = d.output("low(x)", rows * dims.d)?;
    launch_token_lowpass(d, OP, &x_dev, &h_dev, &mut x_low, x_dims)?;
    let sums = band_sums(d, &x_dev, &x_low, dims.batch, dims.tokens * dims.d)?;
    drop(x_low);
    let logits = d.download("logits", &logits_dev)?;

    // 4. Gates on the host in f64, exactly as the CPU path.
    let (gates, factor) = gates_from_band_sums(&sums, dims.tokens * dims.d, &logits, dims.tokens, config, rank);
    let factor_dev = d.upload("gate factors", &factor)?;
    let codes: Vec<i32> = config.bands.iter().map(|band| band.kernel_code() as i32).collect();
    let bands_dev = d.stream().clone_htod(&codes).map_err(dev_err("copying `bands` to the device"))?;

    // 5. u = scale * gate_e * band_e(s), the band taken along the tokens of each image.
    let s_dims = LowpassDims { batch: dims.batch, tokens: dims.tokens, channels: width };
    let mut s_low = d.output("low(shrunk)", rows * width)?;
    launch_token_lowpass(d, OP, &s_dev, &h_dev, &mut s_low, s_dims)?;
    let mut u_dev = d.output("u", rows * width)?;
    band_scale(d, &s_dev, &s_low, &factor_dev, &bands_dev, &mut u_dev, rows, e_count, rank)?;

    // 6. y = x . W^T + u . B_cat^T + bias, B_cat [n, E*r] with B_cat[o, e*r + j] = lora_b[e, o, j].
    let lora_b = inputs.lora_b.data();
    let mut b_cat = vec![0.0f32; n * width];
    for (o, dst) in b_cat.chunks_mut(width).enumerate() {
        for (e, cols) in dst.chunks_mut(rank).enumerate() {
            cols.copy_from_slice(&lora_b[(e * n + o) * rank..(e * n + o + 1) * rank]);
        }
    }
    let w_dev = d.upload("weight", inputs.weight.data())?;
    let b_cat_dev = d.upload("lora_b", &b_cat)?;
    let bias_dev = inputs.bias.map(|b| d.upload("bias", b.data())).transpose()?;
    let mut y_dev = d.output("y", rows * n)?;
    gemm_nt(
        d,
        "output",
        Segment { a: &x_dev, b: &w_dev, k: dims.d },
        Some(Segment { a: &u_dev, b: &b_cat_dev, k: width }),
        bias_dev.as_ref(),
        &mut y_dev,
        rows,
        n,
    )?;
    let y = d.download("y", &y_dev)?;

    Ok(LoraMoeOutput {
        y: Tensor { data: y, shape: vec![dims.batch, dims.tokens, n] },
        gates: Tensor {
            data: gates.into_iter().map(|g| g as f32).collect(),
            shape: vec![dims.batch, dims.tokens, e_count],
        },
    })
}
