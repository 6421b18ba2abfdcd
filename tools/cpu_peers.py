"""PyTorch eager on the CPU at the shapes of `fape bench ... --device cpu`, the same ops as this
crate's contracts (see README, "Op contracts"), f32, timed like `fape bench` (3 warm-up runs, then
at least 10 runs and 0.5 s; median). Prints one JSON object per row with the fields of
`fape bench --json` (op, shape, variant, backend, median_s, min_s, runs), then a table.

Usage: python3 tools/cpu_peers.py [--threads N] [--json] [--check path/to/fape]
         [--lora-moe 1024x3072x3072,...] [--freq-split 1x3x512x512,...] [--attention 1x24x1536x1536x128,...]
Shapes spell as in `fape bench`: lora-moe TxDxN (B=1, E=2 experts low/high, rank 8, bias),
freq-split BxCxHxW (hard mask, cutoff 0.15, the default band edges), attention BxHxLqxLkxD
(RMSNorm of q and k, FLUX RoPE, softmax scale 1/sqrt(D)). Run it right after `fape bench` on the
same machine: only ratios measured back to back mean anything on a shared machine.
`--check target/release/fape` checks these torch ops against the crate's f64 reference at small
awkward shapes instead (needs safetensors).
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

WARMUP, MIN_RUNS, MIN_TIME = 3, 10, 0.5


def measure(fn):
    """Median and minimum seconds of `fn` over the runs `fape bench` makes (BenchPlan::default)."""
    for _ in range(WARMUP):
        fn()
    times = []
    while len(times) < MIN_RUNS or sum(times) < MIN_TIME:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if len(times) >= 1000:
            break
    times.sort()
    mid = len(times) // 2
    median = times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])
    return median, times[0], len(times)


def parse(spec, rank):
    shapes = []
    for s in filter(None, spec.split(",")):
        dims = [int(p) for p in s.split("x")]
        if len(dims) != rank or min(dims) <= 0:
            raise SystemExit(f"error: `{s}` is not {rank} positive integers joined by x")
        shapes.append(dims)
    return shapes


# ---- LoRA-MoE (src/lora_moe/reference.rs) -------------------------------------------------
def gaussian_taps(taps=9, sigma=2.0):
    k = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    w = torch.exp(-k * k / (2 * sigma * sigma))
    return (w / w.sum()).float()


def lora_moe_inputs(t, d, n, experts=2, rank=8):
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.empty(1, t, d).uniform_(-1, 1, generator=g),
        "weight": torch.empty(n, d).uniform_(-1, 1, generator=g) / math.sqrt(d),
        "bias": torch.empty(n).uniform_(-1, 1, generator=g),
        "lora_a": torch.empty(experts, rank, d).uniform_(-1, 1, generator=g) / math.sqrt(d),
        "lora_b": torch.empty(experts, n, rank).uniform_(-1, 1, generator=g),
        "router": torch.empty(experts, d).uniform_(-1, 1, generator=g),
    }


def lora_moe_op(x, weight, bias, lora_a, lora_b, router, temperature=5.0, lam=0.5):
    """y = x W^T + bias + scale * sum_e gate_e * (band_e(x) A_e^T) B_e^T with bands (low, high),
    gates = lam * softmax(router . x / temperature) + (1 - lam) * band-energy prior; returns the
    closure computing {y, gates} (the filter taps made once, outside it)."""
    d, rank = x.shape[-1], lora_a.shape[1]
    fir = gaussian_taps().view(1, 1, -1).expand(d, 1, -1).contiguous()
    scale = 1.0 / rank
    w, a, b = weight, lora_a, lora_b

    def layer():
        xt = x.transpose(1, 2)  # [B, d, T]: depthwise FIR along tokens, zero padding
        low = F.conv1d(xt, fir, padding=fir.shape[-1] // 2, groups=d).transpose(1, 2)
        high = x - low
        bands = (low, high)
        energy = torch.stack([v.square().mean(dim=(1, 2)) for v in bands], -1)  # [B, E]
        prior = energy / (energy.sum(-1, keepdim=True) + 1e-12)
        gate = lam * torch.softmax(F.linear(x, router) / temperature, -1) + (1 - lam) * prior[:, None, :]
        y = F.linear(x, w, bias)
        for e, band in enumerate(bands):
            y = y + (scale * gate[..., e : e + 1]) * F.linear(F.linear(band, a[e]), b[e])
        return {"y": y, "gates": gate}

    return layer


def lora_moe_rows(t, d, n):
    inputs = lora_moe_inputs(t, d, n)
    x, w, bias = inputs["x"], inputs["weight"], inputs["bias"]
    spelling, flops = f"{t}x{d}x{n}", 2.0 * t * d * n
    yield "lora_moe", spelling, "torch-eager", measure(lora_moe_op(**inputs)), flops, "FLOP"
    yield "lora_moe", spelling, "torch-base-linear", measure(lambda: F.linear(x, w, bias)), flops, "FLOP"


# ---- freq_split (src/freq/) ----------------------------------------------------------------
def fftfreq_rho(h, w):
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    return torch.sqrt(fy * fy + fx * fx) / math.sqrt(0.5)  # [H, W/2+1]


def freq_split_inputs(bsz, c, h, w):
    return {"x": torch.empty(bsz, c, h, w).uniform_(-1, 1, generator=torch.Generator().manual_seed(4))}


def freq_split_op(x, cutoff=0.15, edges=(0.0, 0.15, 0.35, 0.45, 0.9, 1.0)):
    """low = irfft2(rfft2(x) * [rho <= cutoff]), high = x - low, band energies
    sum |X|^2 / (H W) over the full spectrum (a half-spectrum bin stands for its mirror too);
    the mask and band tables are made once, outside the returned closure."""
    bsz, c, h, w = x.shape
    rho = fftfreq_rho(h, w)
    mask = (rho <= cutoff).float()
    kx = torch.arange(w // 2 + 1)
    mirrored = ((kx > 0) & ((w % 2 == 1) | (kx < w // 2))).float()  # bins with a conjugate twin
    weight = ((1.0 + mirrored)[None, :].expand(h, -1) / (h * w)).reshape(-1)
    e = torch.tensor(edges, dtype=torch.float64)
    band = (torch.searchsorted(e, rho.reshape(-1), right=True) - 1).clamp(max=len(edges) - 2)
    inside = (rho.reshape(-1) >= e[0]) & (rho.reshape(-1) <= e[-1])
    weight = weight * inside.float()
    band = band.clamp(min=0)
    nbands = len(edges) - 1

    def split():
        spectrum = torch.fft.rfft2(x)
        low = torch.fft.irfft2(spectrum * mask, s=(h, w))
        high = x - low
        power = (spectrum.real.square() + spectrum.imag.square()).reshape(bsz * c, -1) * weight
        energy = torch.zeros(bsz * c, nbands).index_add_(1, band, power)
        return {"low": low, "high": high, "band_energy": energy.reshape(bsz, c, nbands)}

    return split


def freq_split_rows(bsz, c, h, w):
    inputs = freq_split_inputs(bsz, c, h, w)
    split = freq_split_op(**inputs)
    yield "freq_split", f"{bsz}x{c}x{h}x{w}", "torch-eager", measure(split), 12.0 * bsz * c * h * w, "B"


# ---- attention (src/attention/reference.rs) -----------------------------------------------
def rope_tables(rows, d):
    i = torch.arange(d // 2, dtype=torch.float64)
    angles = torch.arange(rows, dtype=torch.float64)[:, None] * 10000.0 ** (-2.0 * i / d)[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


def rope(x, cos, sin):
    """Each pair (x[2i], x[2i+1]) of row l rotated by the angle of table row l, column i."""
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)


def attention_inputs(bsz, heads, lq, lk, d):
    g = torch.Generator().manual_seed(50)
    cos, sin = rope_tables(max(lq, lk), d)
    norm = torch.empty(d).uniform_(0.5, 1.5, generator=g)
    return {
        "q": torch.empty(bsz, heads, lq, d).uniform_(-1, 1, generator=g),
        "k": torch.empty(bsz, heads, lk, d).uniform_(-1, 1, generator=g),
        "v": torch.empty(bsz, heads, lk, d).uniform_(-1, 1, generator=g),
        "q_norm": norm,
        "k_norm": norm.clone(),
        "rope_cos": cos,
        "rope_sin": sin,
    }


def attention_op(q, k, v, q_norm, k_norm, rope_cos, rope_sin):
    """softmax(rope(rms_norm(q)) rope(rms_norm(k))^T / sqrt(D)) v, RMSNorm eps 1e-6."""
    lq, lk, d = q.shape[2], k.shape[2], q.shape[3]

    def attend():
        qn = rope(F.rms_norm(q, (d,), q_norm, eps=1e-6), rope_cos[:lq], rope_sin[:lq])
        kn = rope(F.rms_norm(k, (d,), k_norm, eps=1e-6), rope_cos[:lk], rope_sin[:lk])
        return {"out": F.scaled_dot_product_attention(qn, kn, v)}

    return attend


def attention_rows(bsz, heads, lq, lk, d):
    attend = attention_op(**attention_inputs(bsz, heads, lq, lk, d))
    spelling = f"{bsz}x{heads}x{lq}x{lk}x{d}"
    yield "attention", spelling, "torch-eager", measure(attend), 4.0 * bsz * heads * lq * lk * d, "FLOP"


def si(value, unit):
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def check(fape):
    """Runs each op at small awkward shapes here and through `fape op --device reference` (the
    f64 contract) on the same inputs; returns the number of outputs off by more than 1e-4 rel-L2."""
    import os, subprocess, tempfile
    from safetensors.torch import load_file, save_file

    cases = [("lora-moe", lora_moe_inputs(37, 40, 24), lora_moe_op),
             ("freq-split", freq_split_inputs(2, 1, 15, 22), freq_split_op),
             ("attention", attention_inputs(1, 2, 19, 33, 10), attention_op)]
    failures = 0
    for op, inputs, make in cases:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
            save_file({name: t.contiguous() for name, t in inputs.items()}, src)
            subprocess.run([fape, "op", op, "--input", src, "--output", dst, "--device", "reference"], check=True)
            want = load_file(dst)
        got = make(**inputs)()
        for name, value in got.items():
            ref = want[name].double()
            err = ((value.double().reshape(ref.shape) - ref).norm() / ref.norm().clamp(min=1e-300)).item()
            failures += err > 1e-4
            print(f"check {op:<10} {name:<12} rel-L2 {err:.2e} {'pass' if err <= 1e-4 else 'FAIL'}")
    return failures


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's choice]")
    p.add_argument("--json", action="store_true", help="JSON rows only, no table")
    p.add_argument("--lora-moe", default="1024x3072x3072")
    p.add_argument("--freq-split", default="1x3x512x512")
    p.add_argument("--attention", default="1x24x1536x1536x128")
    p.add_argument("--check", metavar="FAPE", help="only check the ops against `FAPE op --device reference`")
    args = p.parse_args()
    if args.check:
        raise SystemExit(1 if check(args.check) else 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    jobs = [(lora_moe_rows, parse(args.lora_moe, 3)), (freq_split_rows, parse(args.freq_split, 4)),
            (attention_rows, parse(args.attention, 5))]
    table = []
    with torch.inference_mode():
        for rows, shapes in jobs:
            for shape in shapes:
                for op, spelling, variant, (median, fastest, runs), work, unit in rows(*shape):
                    row = {"op": op, "shape": spelling, "variant": variant, "backend": "torch-cpu",
                           "median_s": median, "min_s": fastest, "runs": runs, "threads": torch.get_num_threads(),
                           "torch": torch.__version__}
                    print(json.dumps(row), flush=True)
                    table.append((op, spelling, variant, median, runs, si(work / median, unit + "/s")))
    if not args.json:
        print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
        print(f"{'op':<11} {'shape':<20} {'variant':<18} {'median':>10} {'runs':>5} {'rate':>14}")
        for op, spelling, variant, median, runs, rate in table:
            print(f"{op:<11} {spelling:<20} {variant:<18} {median * 1e3:>7.2f} ms {runs:>5} {rate:>14}")


if __name__ == "__main__":
    main()
