"""Cross-checks `fape op` against independent numpy implementations of the three op contracts,
the way a user validates the kernels: write inputs with numpy, run `fape op`, compare.

Usage: python3 tools/numpy_crosscheck.py [path/to/fape] [--device cpu|reference|cube|cuda]
Needs numpy and safetensors (pip install numpy safetensors). Exits 1 on any mismatch."""
import os, subprocess, sys, tempfile
import numpy as np
from safetensors.numpy import save_file, load_file

FAPE = next((a for a in sys.argv[1:] if not a.startswith("--") and a not in ("cpu", "reference", "cube", "cuda")), "target/debug/fape")
DEVICE = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
rng = np.random.default_rng(0)
failures = 0


def run(op, tensors, *flags):
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.safetensors"), os.path.join(d, "out.safetensors")
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, src)
        subprocess.run([FAPE, "op", op, "--input", src, "--output", dst, "--device", DEVICE, *flags], check=True)
        return load_file(dst)


def report(name, got, want, tol):
    global failures
    err = np.linalg.norm(got.astype(np.float64) - want) / max(np.linalg.norm(want), 1e-300)
    ok = err <= tol
    failures += not ok
    print(f"{name:<40} rel-L2 {err:.2e} (tol {tol:.0e}) {'pass' if ok else 'FAIL'}")


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

print(f"numpy cross-check: {failures} mismatches")
sys.exit(1 if failures else 0)
