//! Weights of the pipeline's models as [`candle_nn::VarBuilder`]s: checked safetensors files
//! ([`load`]), seeded synthetic weights made in place on the device ([`synthetic`]), the
//! [`Recorder`] that lists what a model loads without allocating, and [`write_synthetic`], which
//! writes synthetic weights as safetensors files (what `fape weights synth` runs).
//!
//! # Directory layout
//!
//! ```text
//! DIR/transformer/   the executor (crate::pipeline::flux): diffusers FluxTransformer2DModel names,
//!                    plus the LoRA-MoE adapters and the plan encoder (names in crate::pipeline::flux)
//! DIR/vae/           the autoencoder (its own module documents its names)
//! ```
//!
//! Each subfolder holds either one `diffusion_pytorch_model.safetensors`, or shards listed by
//! `diffusion_pytorch_model.safetensors.index.json` (the Hugging Face index: `{"metadata":
//! {"total_size": bytes}, "weight_map": {tensor name: shard file name}}`), or, without an index,
//! any number of `*.safetensors` files whose tensors are taken together (a name in two files is
//! an error). [`load`] takes the subfolder's name, so one loader serves every model.
//!
//! # Checks
//!
//! Every tensor a model asks for is checked for presence, shape and dtype: the dtype stored must
//! be the dtype asked for (candle's own safetensors backends convert silently; this one does
//! not). Each failure is a [`FapeError::File`] naming the folder and the tensor, wrapped in
//! candle's error where it surfaces through a `VarBuilder`.
//!
//! Every header is checked against its file before anything else is read
//! ([`crate::io::header`]: a tensor claiming more bytes than the file holds is an error naming it
//! and the claim), so opening a folder allocates no more than its headers, and reading a tensor
//! no more than its bytes in the file. The index is read only up to [`MAX_INDEX_BYTES`], and
//! each shard it names must be a plain file name in its own folder (no `..`, no absolute path).
//!
//! # Synthetic weights
//!
//! Every element of tensor `name` is a function of `(seed, name, index)` alone, so a tensor does
//! not depend on which other tensors exist or the order they are made in: the tensor's key is
//! `sha256("fape-synthetic-v1" || seed as 8 little-endian bytes || name)`; element `i` is the
//! `(i mod 65536)`-th `f32` draw (`rand`'s `StandardUniform`, in [0,1)) of the `ChaCha8`
//! generator seeded with the key on stream `i / 65536`, mapped to `u = 2 draw - 1` in [-1,1), then
//! scaled by the tensor's role (first rule that matches):
//!
//! | tensor | value |
//! |---|---|
//! | `*.lora_moe.lora_a` `[E,r,d]` | `u / sqrt(d)` |
//! | `*.lora_moe.lora_b` `[E,n,r]` | `0.5 u / sqrt(r)` (small, never zero: the adapters matter) |
//! | `*.lora_moe.router` `[E,d]` | `u / sqrt(d)` |
//! | rank 2, name contains `embedding` (lookup tables) | `u` |
//! | `*.bias` | `0.02 u` |
//! | other rank 1 (norm and scale weights) | `1 + 0.1 u` |
//! | other rank >= 2 (matrices, convolutions) | `u / sqrt(fan_in)`, fan_in = elements / shape\[0\] |
//! | rank 0 | `u` |
//!
//! The values are rounded once from f32 to the dtype asked for, so a synthetic backend and the
//! files [`write_synthetic`] wrote for the same seed and dtype give bit-identical tensors.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{FapeError, Result};
use crate::io::header;

/// The file of an unsharded model.
pub const SINGLE_FILE: &str = "diffusion_pytorch_model.safetensors";
/// The index of a sharded model.
pub const INDEX_FILE: &str = "diffusion_pytorch_model.safetensors.index.json";
/// The largest weight index read: 64 MiB (FLUX.1-dev's is about 120 KiB).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;
/// The default largest shard [`write_synthetic`] writes: 4 GiB.
pub const DEFAULT_SHARD_BYTES: u64 = 4 << 30;

/// Elements per ChaCha stream of the synthetic generator (see the module docs).
const STREAM_ELEMENTS: usize = 1 << 16;
/// Domain separation of the synthetic keys.
const SYNTHETIC_DOMAIN: &[u8] = b"fape-synthetic-v1";
/// Scale of the synthetic `lora_b` relative to `1/sqrt(r)`.
const LORA_B_GAIN: f32 = 0.5;
/// Half-width of synthetic biases.
const BIAS_BOUND: f32 = 0.02;
/// Half-width of the noise around 1 of synthetic norm weights.
const NORM_NOISE: f32 = 0.1;

fn file_error(path: impl AsRef<Path>, message: impl Into<String>) -> FapeError {
    FapeError::File { path: path.as_ref().display().to_string(), message: message.into() }
}

/// A tensor a model loads: its full name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The full dotted name (`transformer_blocks.0.attn.to_q.weight`).
    pub name: String,
    /// Extents, outermost first.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

// ---------------------------------------------------------------------------------------------
// Checked safetensors files

/// Where one stored tensor lives.
#[derive(Debug, Clone)]
struct StoredTensor {
    file: Arc<PathBuf>,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    offset: u64,
    bytes: usize,
}

/// The tensors of one model folder, read lazily (one tensor in host memory at a time).
#[derive(Debug, Clone)]
pub struct CheckedSafetensors {
    folder: PathBuf,
    tensors: BTreeMap<String, StoredTensor>,
}

#[derive(Serialize, Deserialize)]
struct IndexFile {
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
    weight_map: BTreeMap<String, String>,
}

fn candle_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I16" => DType::I16,
        "I32" => DType::I32,
        "I64" => DType::I64,
        _ => return None,
    })
}

fn safetensors_dtype(dtype: DType) -> Result<safetensors::Dtype> {
    match dtype {
        DType::F32 => Ok(safetensors::Dtype::F32),
        DType::BF16 => Ok(safetensors::Dtype::BF16),
        DType::F16 => Ok(safetensors::Dtype::F16),
        other => Err(FapeError::Config {
            op: "weights",
            field: "dtype",
            message: format!("synthetic weights are f32, bf16 or f16, not {other:?}"),
        }),
    }
}

/// Reads the header of the safetensors file at `path` (checked by [`header::read_header`]):
/// each tensor's dtype, shape and location.
fn read_header(path: &Path) -> Result<Vec<(String, StoredTensor)>> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|e| file_error(path, format!("cannot open: {e}")))?;
    let file_len = file.metadata().map_err(|e| file_error(path, format!("cannot stat: {e}")))?.len();
    let shared = Arc::new(path.to_path_buf());
    header::read_header(&shown, &mut file, file_len)?
        .into_iter()
        .map(|entry| {
            let dtype = candle_dtype(&entry.dtype).ok_or_else(|| {
                file_error(path, format!("tensor `{}` has dtype {} that candle cannot hold", entry.name, entry.dtype))
            })?;
            // read_header checked the bytes against the file's length, so they are there to read.
            let bytes = usize::try_from(entry.bytes).map_err(|_| {
                file_error(path, format!("tensor `{}` is larger than this machine's memory", entry.name))
            })?;
            let stored = StoredTensor { file: shared.clone(), dtype, shape: entry.shape, offset: entry.offset, bytes };
            Ok((entry.name, stored))
        })
        .collect()
}

/// Reads the index at `path` (at most [`MAX_INDEX_BYTES`]); every shard it names must be a
/// plain file name in the index's folder.
fn read_index(path: &Path) -> Result<IndexFile> {
    let bytes = crate::io::read_bounded(path, MAX_INDEX_BYTES, "a weight index")?;
    let index: IndexFile =
        serde_json::from_slice(&bytes).map_err(|e| file_error(path, format!("not a weight index: {e}")))?;
    let plain = |shard: &str| {
        let mut parts = Path::new(shard).components();
        matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None))
    };
    if let Some((name, shard)) = index.weight_map.iter().find(|(_, shard)| !plain(shard)) {
        return Err(file_error(
            path,
            format!("tensor `{name}` is put in `{shard}`, which is not a file name in the index's folder"),
        ));
    }
    Ok(index)
}

impl CheckedSafetensors {
    /// Opens the model folder `dir/subfolder` (layout in the module docs) and reads every
    /// header; no tensor data is read yet.
    ///
    /// # Errors
    /// [`FapeError::File`] when the folder has no safetensors file, a file is unreadable or not
    /// safetensors (bad header, truncated, a tensor past the end), the index is over
    /// [`MAX_INDEX_BYTES`], is not an index, names a shard outside the folder, a missing file or
    /// a tensor its file lacks, or a tensor name appears in two files.
    pub fn open(dir: &Path, subfolder: &str) -> Result<Self> {
        let folder = dir.join(subfolder);
        let index_path = folder.join(INDEX_FILE);
        let index = if index_path.is_file() { Some(read_index(&index_path)?) } else { None };
        let files: Vec<PathBuf> = match &index {
            Some(index) => {
                let mut names: Vec<&String> = index.weight_map.values().collect();
                names.sort();
                names.dedup();
                names.into_iter().map(|n| folder.join(n)).collect()
            }
            None => {
                let listing =
                    std::fs::read_dir(&folder).map_err(|e| file_error(&folder, format!("cannot list: {e}")))?;
                let mut files: Vec<PathBuf> = listing
                    .filter_map(|entry| entry.ok().map(|e| e.path()))
                    .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                files.sort();
                files
            }
        };
        if files.is_empty() {
            return Err(file_error(&folder, "holds no *.safetensors file"));
        }
        let mut tensors: BTreeMap<String, StoredTensor> = BTreeMap::new();
        for file in &files {
            for (name, stored) in read_header(file)? {
                if let Some(first) = tensors.get(&name) {
                    return Err(file_error(
                        &folder,
                        format!("tensor `{name}` is in both {} and {}", first.file.display(), file.display()),
                    ));
                }
                tensors.insert(name, stored);
            }
        }
        if let Some(index) = &index {
            for (name, shard) in &index.weight_map {
                let found = tensors.get(name).is_some_and(|t| t.file.as_path() == folder.join(shard));
                if !found {
                    return Err(file_error(
                        &index_path,
                        format!("tensor `{name}` is not in {shard}, where the index puts it"),
                    ));
                }
            }
        }
        Ok(Self { folder, tensors })
    }

    /// The folder the tensors come from.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// Every stored tensor's name and shape, sorted by name.
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.tensors.iter().map(|(name, t)| TensorSpec { name: name.clone(), shape: t.shape.clone() }).collect()
    }

    /// The stored dtype of tensor `name`, if present.
    pub fn dtype_of(&self, name: &str) -> Option<DType> {
        self.tensors.get(name).map(|t| t.dtype)
    }

    /// Reads tensor `name` onto `device` after checking that it is stored with `dtype` and, when
    /// `shape` is given, with that shape.
    ///
    /// # Errors
    /// [`FapeError::File`] naming the tensor when it is missing, has another shape or another
    /// dtype, or cannot be read.
    pub fn tensor(&self, name: &str, shape: Option<&[usize]>, dtype: DType, device: &Device) -> Result<Tensor> {
        let stored =
            self.tensors.get(name).ok_or_else(|| file_error(&self.folder, format!("tensor `{name}` is missing")))?;
        if let Some(shape) = shape.filter(|s| *s != stored.shape.as_slice()) {
            return Err(file_error(
                &self.folder,
                format!("tensor `{name}` has shape {:?}, expected {shape:?}", stored.shape),
            ));
        }
        if stored.dtype != dtype {
            return Err(file_error(
                &self.folder,
                format!("tensor `{name}` is stored as {:?}, expected {dtype:?} (no silent conversion)", stored.dtype),
            ));
        }
        let path = stored.file.as_path();
        let read_error = |e: std::io::Error| file_error(path, format!("tensor `{name}`: cannot read: {e}"));
        let mut file = File::open(path).map_err(read_error)?;
        file.seek(SeekFrom::Start(stored.offset)).map_err(read_error)?;
        let mut bytes = vec![0u8; stored.bytes];
        file.read_exact(&mut bytes).map_err(read_error)?;
        Tensor::from_raw_buffer(&bytes, dtype, &stored.shape, device)
            .map_err(|e| file_error(path, format!("tensor `{name}`: {e}")))
    }
}

impl SimpleBackend for CheckedSafetensors {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tensor(name, Some(s.dims()), dtype, dev).map_err(candle_core::Error::wrap)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tensor(name, None, dtype, dev).map_err(candle_core::Error::wrap)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// A `VarBuilder` over the checked safetensors of `dir/subfolder` (layout in the module docs):
/// every tensor a model takes from it must be present, of the shape asked for, and stored as
/// `dtype`; it is read onto `device` when asked for.
///
/// # Errors
/// Those of [`CheckedSafetensors::open`]. Missing, mis-shaped and mis-typed tensors surface
/// later, as candle errors naming the tensor, from the model's `load`.
pub fn load(dir: &Path, subfolder: &str, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let backend = CheckedSafetensors::open(dir, subfolder)?;
    Ok(VarBuilder::from_backend(Box::new(backend), dtype, device.clone()))
}

// ---------------------------------------------------------------------------------------------
// Synthetic weights

/// The synthetic values of tensor `name` of `shape` for `seed`, in f32 (see the module docs).
pub fn synthetic_values(seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    let mut hasher = Sha256::new();
    hasher.update(SYNTHETIC_DOMAIN);
    hasher.update(seed.to_le_bytes());
    hasher.update(name.as_bytes());
    let key: [u8; 32] = hasher.finalize().into();
    let elements: usize = shape.iter().product();
    let mut out = vec![0f32; elements];
    let map = role_map(name, shape);
    out.par_chunks_mut(STREAM_ELEMENTS).enumerate().for_each(|(stream, chunk)| {
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(stream as u64);
        for v in chunk {
            *v = map(rng.random::<f32>() * 2.0 - 1.0);
        }
    });
    out
}

/// The scaling of `u` in [-1,1) for the tensor's role (the table in the module docs).
fn role_map(name: &str, shape: &[usize]) -> impl Fn(f32) -> f32 + Sync {
    let inv_sqrt = |n: usize| 1.0 / (n.max(1) as f32).sqrt();
    let last = shape.last().copied().unwrap_or(1);
    let (gain, offset) = if name.ends_with(".lora_moe.lora_a") || name.ends_with(".lora_moe.router") {
        (inv_sqrt(last), 0.0)
    } else if name.ends_with(".lora_moe.lora_b") {
        (LORA_B_GAIN * inv_sqrt(last), 0.0)
    } else if shape.len() == 2 && name.contains("embedding") {
        (1.0, 0.0)
    } else if name.ends_with(".bias") || name == "bias" {
        (BIAS_BOUND, 0.0)
    } else if shape.len() == 1 {
        (NORM_NOISE, 1.0)
    } else if shape.len() >= 2 {
        let elements: usize = shape.iter().product();
        (inv_sqrt(elements / shape[0].max(1)), 0.0)
    } else {
        (1.0, 0.0)
    };
    move |u| offset + gain * u
}

/// The synthetic tensor `name` of `shape` for `seed` as `dtype` on `device` (values made on the
/// host, rounded once to `dtype`, copied to the device).
///
/// # Errors
/// A candle error when `dtype` is not f32, bf16 or f16, or the device copy fails.
pub fn synthetic_tensor(
    seed: u64,
    name: &str,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    safetensors_dtype(dtype).map_err(candle_core::Error::wrap)?;
    let values = synthetic_values(seed, name, shape);
    match dtype {
        DType::BF16 => {
            Tensor::from_vec(values.into_par_iter().map(half::bf16::from_f32).collect::<Vec<_>>(), shape, device)
        }
        DType::F16 => {
            Tensor::from_vec(values.into_par_iter().map(half::f16::from_f32).collect::<Vec<_>>(), shape, device)
        }
        _ => Tensor::from_vec(values, shape, device),
    }
}

/// The bytes (little-endian) a safetensors file stores for the synthetic tensor.
fn synthetic_bytes(seed: u64, name: &str, shape: &[usize], dtype: safetensors::Dtype) -> Vec<u8> {
    let values = synthetic_values(seed, name, shape);
    match dtype {
        safetensors::Dtype::BF16 => values.into_iter().flat_map(|v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        safetensors::Dtype::F16 => values.into_iter().flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect(),
        _ => values.into_iter().flat_map(f32::to_le_bytes).collect(),
    }
}

/// The backend of [`synthetic`].
#[derive(Debug, Clone, Copy)]
struct Synthetic {
    seed: u64,
}

impl SimpleBackend for Synthetic {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        synthetic_tensor(self.seed, name, s.dims(), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::wrap(FapeError::Config {
            op: "weights",
            field: "synthetic",
            message: format!("tensor `{name}` was asked for without a shape, which synthetic weights need"),
        }))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A `VarBuilder` of seeded synthetic weights (values in the module docs), made directly on
/// `device` as `dtype` when a model asks for them: no file involved (`--synthetic SEED`).
/// `dtype` must be f32, bf16 or f16 (others fail when the first tensor is made).
pub fn synthetic(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(Synthetic { seed }), dtype, device.clone())
}

// ---------------------------------------------------------------------------------------------
// Recording what a model loads

/// Lists the tensors a model loads, without allocating them: hand [`Recorder::var_builder`] to
/// the model's `load` (each tensor it gets is one zero broadcast to the shape), then read
/// [`Recorder::specs`].
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    specs: Arc<Mutex<Vec<TensorSpec>>>,
}

struct RecordingBackend {
    specs: Arc<Mutex<Vec<TensorSpec>>>,
}

impl SimpleBackend for RecordingBackend {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut specs = self.specs.lock().map_err(|_| candle_core::Error::Msg("recorder lock poisoned".into()))?;
        match specs.iter().find(|spec| spec.name == name) {
            Some(seen) if seen.shape != s.dims() => {
                return Err(candle_core::Error::wrap(file_error(
                    "<recorder>",
                    format!("tensor `{name}` asked for as {:?} and as {:?}", seen.shape, s.dims()),
                )))
            }
            Some(_) => {}
            None => specs.push(TensorSpec { name: name.to_string(), shape: s.dims().to_vec() }),
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::wrap(file_error(
            "<recorder>",
            format!("tensor `{name}` was asked for without a shape"),
        )))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// A `VarBuilder` (CPU, `dtype`) that records every tensor asked of it.
    pub fn var_builder(&self, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(RecordingBackend { specs: self.specs.clone() }), dtype, Device::Cpu)
    }

    /// The tensors asked for so far, in the order first asked.
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.specs.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// Writing synthetic weights

/// One synthetic tensor, generated when the safetensors writer asks for its bytes.
struct LazySynthetic<'a> {
    seed: u64,
    spec: &'a TensorSpec,
    dtype: safetensors::Dtype,
    progress: &'a indicatif::ProgressBar,
}

impl safetensors::View for LazySynthetic<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.spec.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let bytes = synthetic_bytes(self.seed, &self.spec.name, &self.spec.shape, self.dtype);
        self.progress.inc(bytes.len() as u64);
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.spec.elements() * self.dtype.bitsize() / 8
    }
}

/// Splits `specs` (in order) into shards of at most `shard_bytes` each (a larger tensor gets a
/// shard of its own).
fn plan_shards(specs: &[TensorSpec], bytes_per_element: usize, shard_bytes: u64) -> Vec<&[TensorSpec]> {
    let mut shards = Vec::new();
    let (mut start, mut size) = (0usize, 0u64);
    for (i, spec) in specs.iter().enumerate() {
        let bytes = (spec.elements() * bytes_per_element) as u64;
        if i > start && size + bytes > shard_bytes {
            shards.push(&specs[start..i]);
            (start, size) = (i, 0);
        }
        size += bytes;
    }
    if start < specs.len() {
        shards.push(&specs[start..]);
    }
    shards
}

/// Writes the synthetic weights `specs` for `seed` as `dtype` into `dir/subfolder` (created if
/// needed): one [`SINGLE_FILE`] when everything fits `shard_bytes`, else shards
/// `diffusion_pytorch_model-0000i-of-0000N.safetensors` and an [`INDEX_FILE`]. Tensors are
/// generated one at a time while written; `progress` shows a bar on stderr. Returns the files
/// written.
///
/// # Errors
/// [`FapeError::Config`] for a dtype other than f32, bf16, f16, or a duplicate name in `specs`;
/// [`FapeError::File`] when the folder or a file cannot be written.
pub fn write_synthetic(
    dir: &Path,
    subfolder: &str,
    specs: &[TensorSpec],
    seed: u64,
    dtype: DType,
    shard_bytes: u64,
    progress: bool,
) -> Result<Vec<PathBuf>> {
    let st_dtype = safetensors_dtype(dtype)?;
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = specs.iter().find(|s| !seen.insert(s.name.as_str())) {
        return Err(FapeError::Config {
            op: "weights",
            field: "specs",
            message: format!("tensor `{}` is listed twice", dup.name),
        });
    }
    let folder = dir.join(subfolder);
    std::fs::create_dir_all(&folder).map_err(|e| file_error(&folder, format!("cannot create: {e}")))?;
    let total: u64 = specs.iter().map(|s| (s.elements() * dtype.size_in_bytes()) as u64).sum();
    let bar = if progress {
        let style =
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {binary_bytes}/{binary_total_bytes} ({eta})")
                .map_err(|e| file_error(&folder, format!("progress bar: {e}")))?;
        indicatif::ProgressBar::new(total).with_style(style).with_message(format!("{subfolder} (seed {seed})"))
    } else {
        indicatif::ProgressBar::hidden()
    };
    let shards = plan_shards(specs, dtype.size_in_bytes(), shard_bytes);
    let names: Vec<String> = if shards.len() == 1 {
        vec![SINGLE_FILE.to_string()]
    } else {
        (1..=shards.len())
            .map(|i| format!("diffusion_pytorch_model-{i:05}-of-{:05}.safetensors", shards.len()))
            .collect()
    };
    let mut written = Vec::with_capacity(shards.len());
    let mut weight_map = BTreeMap::new();
    for (shard, name) in shards.iter().zip(&names) {
        let path = folder.join(name);
        let views =
            shard.iter().map(|spec| (spec.name.clone(), LazySynthetic { seed, spec, dtype: st_dtype, progress: &bar }));
        safetensors::serialize_to_file(views, None, &path)
            .map_err(|e| file_error(&path, format!("cannot write: {e}")))?;
        weight_map.extend(shard.iter().map(|spec| (spec.name.clone(), name.clone())));
        written.push(path);
    }
    if shards.len() > 1 {
        let mut metadata = serde_json::Map::new();
        metadata.insert("total_size".into(), total.into());
        let index = IndexFile { metadata, weight_map };
        let path = folder.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).map_err(|e| file_error(&path, e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| file_error(&path, format!("cannot write: {e}")))?;
        written.push(path);
    }
    bar.finish();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, shape: &[usize]) -> TensorSpec {
        TensorSpec { name: name.into(), shape: shape.to_vec() }
    }

    #[test]
    fn shards_respect_the_limit_and_keep_order() {
        let specs = [spec("a", &[10]), spec("b", &[10]), spec("c", &[30]), spec("d", &[1])];
        let shards = plan_shards(&specs, 4, 80);
        let names: Vec<Vec<&str>> = shards.iter().map(|s| s.iter().map(|t| t.name.as_str()).collect()).collect();
        assert_eq!(names, vec![vec!["a", "b"], vec!["c"], vec!["d"]]);
    }

    #[test]
    fn roles_scale_as_documented() {
        let norm = synthetic_values(1, "x.norm_q.weight", &[4096]);
        assert!(norm.iter().all(|v| (0.9..=1.1).contains(v)) && norm.iter().any(|v| *v != 1.0));
        let bias = synthetic_values(1, "x.to_q.bias", &[4096]);
        assert!(bias.iter().all(|v| v.abs() <= BIAS_BOUND) && bias.iter().any(|v| *v != 0.0));
        let w = synthetic_values(1, "x.to_q.weight", &[8, 256]);
        assert!(w.iter().all(|v| v.abs() <= 1.0 / 16.0) && w.iter().any(|v| v.abs() > 0.05));
        let b = synthetic_values(1, "x.to_q.lora_moe.lora_b", &[2, 8, 4]);
        assert!(b.iter().all(|v| v.abs() <= 0.25) && b.iter().any(|v| v.abs() > 0.1));
    }

    #[test]
    fn streams_continue_across_chunks() {
        // Values past the first stream differ from the first stream's.
        let v = synthetic_values(3, "t", &[2 * STREAM_ELEMENTS]);
        assert_ne!(v[..16], v[STREAM_ELEMENTS..STREAM_ELEMENTS + 16]);
    }
}
