#!/usr/bin/env python3
"""Cross-checks the executor (tiny preset) against an independent numpy f64 implementation of
FLUX (diffusers' FluxTransformer2DModel semantics), the LoRA-MoE contract and the plan encoder.

Usage: python3 tools/flux_numpy_crosscheck.py WEIGHTS_DIR DUMP.safetensors
WEIGHTS_DIR holds transformer/ as `fape weights synth --preset tiny --dtype f32` writes it;
DUMP holds `z` [B,16,h,w], `plan_bytes` [N] (the plan line's bytes as numbers) and `v`, the
executor's velocity at t = 0.3 (tests/flux.rs writes both and runs this script).
Exits 1 when the rel-L2 of `v` against numpy exceeds 1e-5.
"""
import sys

import numpy as np
from safetensors.numpy import load_file

W = {k: v.astype(np.float64) for k, v in load_file(sys.argv[1] + "/transformer/diffusion_pytorch_model.safetensors").items()}
D = {k: v.astype(np.float64) for k, v in load_file(sys.argv[2]).items()}
dim, heads, hd, ctx, pooled_dim = 128, 2, 64, 64, 32
axes, theta, guidance = [8, 28, 28], 10000.0, 3.5
E, r, taps, sigma, temp, lam = 2, 8, 9, 2.0, 5.0, 0.5

def lin(x, p): return x @ W[p + ".weight"].T + W[p + ".bias"]
def silu(x): return x / (1 + np.exp(-x))
def gelu(x): return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
def ln(x):
    m = x.mean(-1, keepdims=True); v = ((x - m)**2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-6)
def rms(x, w): return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * w
def tfeat(v):
    half = 128; ex = np.exp(-np.log(10000) * np.arange(half) / half); a = v * ex
    return np.concatenate([np.cos(a), np.sin(a)])[None]

def lora_moe(x, p):  # x [T, d], one image
    T = x.shape[0]
    g = np.exp(-((np.arange(taps) - (taps - 1) / 2) ** 2) / (2 * sigma**2)); g /= g.sum()
    low = np.zeros_like(x)
    for t in range(T):
        for j in range(taps):
            s = t + j - (taps - 1) // 2
            if 0 <= s < T: low[t] += g[j] * x[s]
    bands = [low, x - low]
    en = np.array([(b**2).mean() for b in bands]); prior = en / (en.sum() + 1e-12)
    logits = x @ W[p + ".lora_moe.router"].T / temp
    sm = np.exp(logits - logits.max(-1, keepdims=True)); sm /= sm.sum(-1, keepdims=True)
    gate = lam * sm + (1 - lam) * prior
    y = lin(x, p)
    A, B = W[p + ".lora_moe.lora_a"], W[p + ".lora_moe.lora_b"]
    for e in range(E):
        y += (1 / r) * gate[:, e:e+1] * ((bands[e] @ A[e].T) @ B[e].T)
    return y

def rope(x, ids):  # x [H, L, D]; interleaved pairs
    cos_l, sin_l = [], []
    for a, width in enumerate(axes):
        freqs = 1.0 / theta ** (np.arange(0, width, 2) / width)
        ang = np.outer(ids[:, a], freqs)
        cos_l.append(np.repeat(np.cos(ang), 2, axis=1)); sin_l.append(np.repeat(np.sin(ang), 2, axis=1))
    cos = np.concatenate(cos_l, 1); sin = np.concatenate(sin_l, 1)
    xr = x.reshape(*x.shape[:-1], -1, 2)
    rot = np.stack([-xr[..., 1], xr[..., 0]], -1).reshape(x.shape)
    return x * cos + rot * sin

def attend(q, k, v):  # [H, L, D]
    s = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
    p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    return p @ v

def heads_(x): return x.reshape(x.shape[0], heads, hd).transpose(1, 0, 2)
def unheads(x): return x.transpose(1, 0, 2).reshape(x.shape[1], -1)

z = D["z"]; B_, C, h, w = z.shape
# The plan encoder: byte embedding + sinusoidal positions; pooled = projection of the mean.
plan = D["plan_bytes"].astype(np.int64)
pos = np.arange(len(plan))[:, None] / 10000.0 ** ((np.arange(ctx) - np.arange(ctx) % 2) / ctx)
pe = np.where(np.arange(ctx) % 2 == 0, np.sin(pos), np.cos(pos))
tokens = W["plan_encoder.byte_embedding.weight"][plan] + pe
pooled = lin(tokens.mean(0, keepdims=True), "plan_encoder.pooled_proj")
out = []
for b in range(B_):
    lat = z[b]
    packed = lat.reshape(C, h // 2, 2, w // 2, 2).transpose(1, 3, 0, 2, 4).reshape((h // 2) * (w // 2), C * 4)
    img = lin(packed, "x_embedder"); txt = lin(tokens, "context_embedder")
    te = lambda pre, x: lin(silu(lin(x, pre + ".linear_1")), pre + ".linear_2")
    temb = te("time_text_embed.timestep_embedder", tfeat(300.0)) + te("time_text_embed.guidance_embedder", tfeat(guidance * 1000)) + te("time_text_embed.text_embedder", pooled)
    ids = np.zeros((txt.shape[0] + img.shape[0], 3))
    for i in range(img.shape[0]): ids[txt.shape[0] + i] = [0, i // (w // 2), i % (w // 2)]
    Nt = txt.shape[0]
    for i in range(2):
        p = f"transformer_blocks.{i}"
        m = lin(silu(temb), p + ".norm1.linear")[0].reshape(6, dim)
        c = lin(silu(temb), p + ".norm1_context.linear")[0].reshape(6, dim)
        xi = ln(img) * (1 + m[1]) + m[0]; xt = ln(txt) * (1 + c[1]) + c[0]
        a = p + ".attn"
        qi = rms(heads_(lora_moe(xi, a + ".to_q")), W[a + ".norm_q.weight"]); ki = rms(heads_(lora_moe(xi, a + ".to_k")), W[a + ".norm_k.weight"]); vi = heads_(lora_moe(xi, a + ".to_v"))
        qt = rms(heads_(lin(xt, a + ".add_q_proj")), W[a + ".norm_added_q.weight"]); kt = rms(heads_(lin(xt, a + ".add_k_proj")), W[a + ".norm_added_k.weight"]); vt = heads_(lin(xt, a + ".add_v_proj"))
        q = rope(np.concatenate([qt, qi], 1), ids); k = rope(np.concatenate([kt, ki], 1), ids); v = np.concatenate([vt, vi], 1)
        o = unheads(attend(q, k, v))
        ot, oi = o[:Nt], o[Nt:]
        img = img + m[2] * lora_moe(oi, a + ".to_out.0")
        txt = txt + c[2] * lin(ot, a + ".to_add_out")
        img = img + m[5] * lin(gelu(lin(ln(img) * (1 + m[4]) + m[3], p + ".ff.net.0.proj")), p + ".ff.net.2")
        txt = txt + c[5] * lin(gelu(lin(ln(txt) * (1 + c[4]) + c[3], p + ".ff_context.net.0.proj")), p + ".ff_context.net.2")
    x = np.concatenate([txt, img], 0)
    for i in range(2):
        p = f"single_transformer_blocks.{i}"
        m = lin(silu(temb), p + ".norm.linear")[0].reshape(3, dim)
        xn = ln(x) * (1 + m[1]) + m[0]
        mlp = gelu(lin(xn, p + ".proj_mlp"))
        a = p + ".attn"
        proj = lambda name: np.concatenate([lin(xn[:Nt], a + name), lora_moe(xn[Nt:], a + name)], 0)
        q = rope(rms(heads_(proj(".to_q")), W[a + ".norm_q.weight"]), ids)
        k = rope(rms(heads_(proj(".to_k")), W[a + ".norm_k.weight"]), ids)
        v = heads_(proj(".to_v"))
        o = unheads(attend(q, k, v))
        x = x + m[2] * lin(np.concatenate([o, mlp], 1), p + ".proj_out")
    img = x[Nt:]
    mo = lin(silu(temb), "norm_out.linear")[0].reshape(2, dim)
    img = ln(img) * (1 + mo[0]) + mo[1]
    o = lin(img, "proj_out")
    out.append(o.reshape(h // 2, w // 2, C, 2, 2).transpose(2, 0, 3, 1, 4).reshape(C, h, w))
vnp = np.stack(out)
got = D["v"]
err = np.linalg.norm(got - vnp) / np.linalg.norm(vnp)
print(f"executor velocity vs numpy f64: rel-L2 {err:.3e}")
sys.exit(0 if err <= 1e-5 else 1)
