"""Cross-checks `fape op` against independent numpy implementations of the three op contracts,
the way a user validates the kernels: write inputs with numpy, run `fape op`, compare. f32 inputs
first, then bf16 and f16 ones, which `fape op` runs in their own dtype (the fused bf16 LoRA-MoE
and the tensor-core attention on CUDA) and writes back in it; the references read the same
rounded values in f64. numpy has no bf16: bf16 tensors travel as their uint16 bit patterns, and
the safetensors files are read and written here directly (the format is a JSON header and raw
little-endian data), so no ml_dtypes or torch is needed.

Usage: python3 tools/numpy_crosscheck.py [path/to/fape] [--device cpu|reference|cube|cuda]
Needs numpy (pip install numpy). Exits 1 on any mismatch."""
import json, os, struct, subprocess, sys, tempfile
import numpy as np

FAPE = next((a for a in sys.argv[1:] if not a.startswith("--") and a not in ("cpu", "reference", "cube", "cuda")), "target/debug/fape")
DEVICE = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
rng = np.random.default_rng(0)
failures = 0


# Rel-L2 tolerances of the 16-bit paths (fape_kernels::lora_moe::TOLERANCE_BF16 and
# attention::TOLERANCE_BF16, which attention also applies to f16).
LORA_BF16_TOL, ATTENTION_16_TOL = 1e-2, 2e-2


class Bf16:
    """A bf16 tensor: its uint16 bit patterns (round to nearest even from f32)."""
    def __init__(self, x):
        u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
        self.bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)

    def value(self):
        return (self.bits.astype(np.uint32) << 16).view(np.float32)


def save(path, tensors):
    """Writes {name: float32/float16 array or Bf16} as safetensors."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        dtype, raw = ("BF16", t.bits) if isinstance(t, Bf16) else ({np.float32: "F32", np.float16: "F16"}[t.dtype.type], t)
        blob = np.ascontiguousarray(raw).astype(raw.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(raw.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob); offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def load(path):
    """Reads a safetensors file as {name: (dtype, float64 array)}."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header, body, out = json.loads(data[8:8 + n]), data[8 + n:], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw, dtype = body[begin:end], info["dtype"]
        if dtype == "BF16":
            values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            values = np.frombuffer(raw, {"F32": "<f4", "F16": "<f2"}[dtype])
        out[name] = (dtype, values.astype(np.float64).reshape(info["shape"]))
    return out


def fape_op(op, tensors, *flags):
    """Runs `fape op`; returns (exit code, stderr, outputs as {name: (dtype, array)} or None)."""
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.safetensors"), os.path.join(d, "out.safetensors")
        save(src, tensors)
        p = subprocess.run([FAPE, "op", op, "--input", src, "--output", dst, "--device", DEVICE, *flags],
                           capture_output=True, text=True)
        return p.returncode, p.stderr, (load(dst) if p.returncode == 0 else None)


def run(op, tensors, *flags, dtype="F32"):
    """Runs `fape op`, checks that it succeeds and that every output is stored as `dtype`."""
    code, stderr, out = fape_op(op, tensors, *flags)
    if code != 0:
        sys.exit(f"fape op {op} {' '.join(flags)} failed ({code}): {stderr}")
    wrong = {k: d for k, (d, _) in out.items() if d != dtype}
    check(f"{op} {' '.join(flags)} outputs are {dtype}", not wrong, f"got {wrong}")
    return {k: v for k, (_, v) in out.items()}


def check(name, ok, detail=""):
    global failures
    failures += not ok
    print(f"{name:<52} {'pass' if ok else 'FAIL ' + detail}")


def report(name, got, want, tol):
    global failures
    err = np.linalg.norm(got.astype(np.float64) - want) / max(np.linalg.norm(want), 1e-300)
    ok = err <= tol
    failures += not ok
    print(f"{name:<52} rel-L2 {err:.2e} (tol {tol:.0e}) {'pass' if ok else 'FAIL'}")


def value(t):
    """The values a tensor holds (bf16 decoded), in f64."""
    return (t.value() if isinstance(t, Bf16) else t).astype(np.float64)


def gaussian(taps, sigma):
    k = np.arange(taps) - (taps - 1) / 2
    h = np.exp(-k * k / (2 * sigma * sigma))
    return h / h.sum()


def lowpass_tokens(x, h):  # x [T, d], zero padding
    half = (len(h) - 1) // 2
    pad = np.pad(x, ((half, half), (0, 0)))
    return sum(h[j] * pad[j:j + x.shape[0]] for j in range(len(h)))


def lora_moe(x, W, bias, A, B, R, bands, taps=9, sigma=2.0, temp=5.0, lam=0.5, top_k=0, scale=None):
    E, r, _ = A.shape
    scale = 1.0 / r if scale is None else scale
    h = gaussian(taps, sigma)
    ys, gs = [], []
    for xb in x.astype(np.float64):
        low = lowpass_tokens(xb, h)
        bx = [{"low": low, "high": xb - low, "full": xb}[b] for b in bands]
        energy = np.array([np.mean(v * v) for v in bx])
        prior = energy / (energy.sum() + 1e-12)
        logits = xb @ R.T.astype(np.float64) / temp
        w = np.exp(logits - logits.max(1, keepdims=True)); w /= w.sum(1, keepdims=True)
        g = lam * w + (1 - lam) * prior
        if top_k:
            order = np.argsort(-g, axis=1, kind="stable")
            mask = np.zeros_like(g); np.put_along_axis(mask, order[:, :top_k], 1.0, 1)
            g = g * mask; g /= g.sum(1, keepdims=True)
        y = xb @ W.T + bias
        for e in range(E):
            y = y + scale * g[:, e:e + 1] * ((bx[e] @ A[e].T) @ B[e].T)
        ys.append(y); gs.append(g)
    return np.stack(ys), np.stack(gs)


def freq_split(x, cutoff=0.15, mask="hard", edges=(0, 0.15, 0.35, 0.45, 0.9, 1)):
    H, W = x.shape[-2:]
    fy, fx = np.meshgrid(np.fft.fftfreq(H), np.fft.fftfreq(W), indexing="ij")
    rho = np.sqrt(fy ** 2 + fx ** 2) / np.sqrt(0.5)
    M = (rho <= cutoff).astype(np.float64) if mask == "hard" else np.exp(-rho ** 2 / (2 * cutoff ** 2))
    X = np.fft.fft2(x.astype(np.float64))
    low = np.real(np.fft.ifft2(X * M))
    power = np.abs(X) ** 2 / (H * W)
    bands = []
    for i in range(len(edges) - 1):
        last = i == len(edges) - 2
        sel = (rho >= edges[i]) & ((rho <= edges[i + 1]) if last else (rho < edges[i + 1]))
        bands.append((power * sel).sum((-2, -1)))
    return low, x - low, np.stack(bands, -1)


def attention(q, k, v, qn=None, kn=None, cos=None, sin=None, scale=None):
    q, k, v = (t.astype(np.float64) for t in (q, k, v))
    def norm(t, w):
        return t / np.sqrt(np.mean(t * t, -1, keepdims=True) + 1e-6) * w
    def rope(t, c, s):
        L = t.shape[-2]
        a, b = t[..., 0::2], t[..., 1::2]
        out = np.empty_like(t)
        out[..., 0::2] = a * c[:L] - b * s[:L]
        out[..., 1::2] = a * s[:L] + b * c[:L]
        return out
    if qn is not None: q = norm(q, qn)
    if kn is not None: k = norm(k, kn)
    if cos is not None: q, k = rope(q, cos, sin), rope(k, cos, sin)
    s = (q @ np.swapaxes(k, -1, -2)) * (1 / np.sqrt(q.shape[-1]) if scale is None else scale)
    p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    return p @ v


f32 = lambda *s, lo=-1.0, hi=1.0: rng.uniform(lo, hi, s).astype(np.float32)

# lora_moe: B=2 T=37 d=24 n=20 E=2 r=4, bias, top_k 1, bands low,high
t = dict(x=f32(2, 37, 24), weight=f32(20, 24, lo=-.3, hi=.3), bias=f32(20), lora_a=f32(2, 4, 24, lo=-.3, hi=.3),
         lora_b=f32(2, 20, 4), router=f32(2, 24))
out = run("lora-moe", t, "--top-k", "1")
y, g = lora_moe(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["router"], ["low", "high"], top_k=1)
report("lora_moe.y (top_k 1)", out["y"], y, 1e-4); report("lora_moe.gates", out["gates"], g, 1e-4)
out = run("lora-moe", t, "--bands", "full,high", "--lambda", "0.2", "--temperature", "2", "--scale", "0.7", "--taps", "5", "--sigma", "1.5")
y, g = lora_moe(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["router"], ["full", "high"], taps=5, sigma=1.5, temp=2, lam=0.2, scale=0.7)
report("lora_moe.y (flags)", out["y"], y, 1e-4)

# freq_split: odd sizes and both masks
for shape, mask, cutoff in [((2, 3, 7, 5), "hard", 0.3), ((1, 2, 16, 12), "gaussian", 0.15), ((1, 1, 33, 64), "hard", 0.15)]:
    x = f32(*shape)
    out = run("freq-split", {"x": x}, "--mask", mask, "--cutoff", str(cutoff))
    low, high, be = freq_split(x, cutoff, mask)
    report(f"freq_split {shape} {mask}.low", out["low"], low, 1e-5)
    report(f"freq_split {shape} {mask}.high", out["high"], high, 1e-5)
    report(f"freq_split {shape} {mask}.band_energy", out["band_energy"], be, 1e-5)

# attention: Lq != Lk, norms and RoPE (tables longer than needed)
B, H, Lq, Lk, D = 2, 3, 37, 53, 64
theta = np.arange(60)[:, None] * 10000.0 ** (-2 * np.arange(D // 2)[None] / D)
t = dict(q=f32(B, H, Lq, D), k=f32(B, H, Lk, D), v=f32(B, H, Lk, D), q_norm=f32(D, lo=.5, hi=1.5), k_norm=f32(D, lo=.5, hi=1.5),
         rope_cos=np.cos(theta).astype(np.float32), rope_sin=np.sin(theta).astype(np.float32))
out = run("attention", t)
report("attention.out (norm+rope)", out["out"], attention(t["q"], t["k"], t["v"], t["q_norm"], t["k_norm"], t["rope_cos"], t["rope_sin"]), 1e-4)
out = run("attention", {k: t[k] for k in "qkv"}, "--scale", "0.3")
report("attention.out (scale 0.3)", out["out"], attention(t["q"], t["k"], t["v"], scale=0.3), 1e-4)

# bf16: LoRA-MoE and attention run in bf16 and write bf16; the references read the rounded values.
t = dict(x=f32(2, 37, 24), weight=f32(20, 24, lo=-.3, hi=.3), bias=f32(20), lora_a=f32(2, 4, 24, lo=-.3, hi=.3),
         lora_b=f32(2, 20, 4), router=f32(2, 24))
t16 = {k: Bf16(v) for k, v in t.items()}
out = run("lora-moe", t16, dtype="BF16")
y, g = lora_moe(*(value(t16[k]) for k in ("x", "weight", "bias", "lora_a", "lora_b", "router")), ["low", "high"])
report("[bf16] lora_moe.y", out["y"], y, LORA_BF16_TOL); report("[bf16] lora_moe.gates", out["gates"], g, LORA_BF16_TOL)
wide = run("lora-moe", t16, "--output-dtype", "f32")
check("[bf16] lora_moe --output-dtype f32 = bf16 output widened", np.array_equal(wide["y"], out["y"]))

B, H, Lq, Lk, D = 1, 2, 45, 29, 64
theta = np.arange(50)[:, None] * 10000.0 ** (-2 * np.arange(D // 2)[None] / D)
t = dict(q=f32(B, H, Lq, D), k=f32(B, H, Lk, D), v=f32(B, H, Lk, D), q_norm=f32(D, lo=.5, hi=1.5), k_norm=f32(D, lo=.5, hi=1.5),
         rope_cos=np.cos(theta).astype(np.float32), rope_sin=np.sin(theta).astype(np.float32))
names = ("q", "k", "v", "q_norm", "k_norm", "rope_cos", "rope_sin")
for tag, cast, dtype in [("bf16", Bf16, "BF16"), ("f16", lambda a: a.astype(np.float16), "F16")]:
    t16 = {k: cast(v) for k, v in t.items()}
    out = run("attention", t16, dtype=dtype)
    report(f"[{tag}] attention.out (norm+rope)", out["out"], attention(*(value(t16[k]) for k in names)), ATTENTION_16_TOL)

# bf16 into an f32-only op: a clear error, unless --compute-dtype f32 widens the inputs.
x = Bf16(f32(1, 2, 12, 10))
code, stderr, _ = fape_op("freq-split", {"x": x})
check("[bf16] freq-split refuses bf16 (exit 2, names x)", code == 2 and "`x`" in stderr and "bf16" in stderr, stderr)
out = run("freq-split", {"x": x}, "--compute-dtype", "f32")
low, high, be = freq_split(value(x))
report("[bf16] freq_split --compute-dtype f32 .low", out["low"], low, 1e-5)
report("[bf16] freq_split --compute-dtype f32 .band_energy", out["band_energy"], be, 1e-5)

print(f"numpy cross-check: {failures} mismatches")
sys.exit(1 if failures else 0)
