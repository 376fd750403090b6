#!/usr/bin/env python3
"""Writes the GGUF test fixtures in tests/golden/gguf/ (python3 + numpy only; no torch, no gguf
package, no llama.cpp).

Sources: the tiny HF checkpoints of tests/golden/models (made by make_golden.py), and one
synthetic model whose row widths are multiples of 256, as the K-quants need. Each fixture is a
GGUF file laid out the way llama.cpp's converter lays one out:
  - tensor names token_embd / blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,
    ffn_gate,ffn_up,ffn_down} / output_norm / output, dimensions in ggml order (columns first);
  - Llama's attn_q / attn_k rows (and biases) permuted from HF's rotate-half order into
    interleaved pairs per head; Qwen2 unpermuted;
  - Llama 3.1 rope scaling as the rope_freqs tensor of per-frequency divisors;
  - norms F32, matrices in the fixture's type ("pure": every matrix the same type), or an
    _M-like mix (Q4_K or Q5_K, with attn_v, ffn_down and output in Q6_K).
Quantizers: Q4_0, Q5_0 and Q8_0 follow ggml's reference rules (quantize_row_q4_0_ref / q5_0_ref /
q8_0_ref: scale = signed absmax / -8, / -16 resp. absmax / 127, fp16 scale, codes by truncation of
x/d + 8.5, + 16.5 resp. round half away from zero). The others use simpler scale choices than
ggml's searches (the block layout and the dequantization formula are what a reader must get
right; any valid choice of scales exercises them): Q4_1 / Q5_1 (max - min) / 15 resp. / 31 with
the min; Q4_K / Q5_K per 32-weight sub-block scale (max - min(min, 0)) / 15 resp. / 31 and min
-min(min, 0) coded in 6 bits against fp16 super-scales d and dmin; Q6_K per 16-weight sub-block
signed absmax / -32 coded as int8 against an fp16 super-scale; Q3_K per 16-weight sub-block
signed absmax / -4 coded in 6 bits (+ 32) against an fp16 super-scale; Q2_K per 16-weight
sub-block (max - min(min, 0)) / 3 and its min in 4 bits each against fp16 d and dmin; IQ4_NL a
block's signed absmax / -127 as its fp16 scale (IQ4_XS per 32-weight sub-block, coded in 6 bits
+ 32 against an fp16 super-scale), each weight the nearest entry of the 16-value codebook.

Usage: scripts/make_gguf_fixtures.py [NAME ...] (run with a python3 that has numpy, e.g. Debian's
/usr/bin/python3 with python3-numpy); with names, only those fixtures and their manifest entries
are rewritten.

References (independent of Kestrel): logits of every prompt position from a float64 numpy forward
pass over the weights exactly as ggml dequantizes them (dequantize_row_q4_0 / q4_1 / q5_0 / q5_1
/ q8_0 / q2_K / q3_K / q4_K / q5_K / q6_K / iq4_nl / iq4_xs, float32 arithmetic). The forward pass is first checked
against the HF transformers logits that make_golden.py recorded (logits.f32) for every golden
model; the script stops if it differs by more than 1e-4 (normalized), so the reference itself is
anchored to HF.

Output per fixture NAME: NAME.gguf, NAME.logits.f32 ([prompt, vocab] float32) and an entry in
manifest.json (source, prompt, vocab, types, reference error against HF where there is one).
"""
import json
import os
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gguf_writer as gw  # noqa: E402

ROOT = os.path.dirname(HERE)
MODELS = os.path.join(ROOT, "tests", "golden", "models")
OUT = os.path.join(ROOT, "tests", "golden", "gguf")


# ---- HF checkpoints -------------------------------------------------------------------------

def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[begin:end]
        if info["dtype"] == "F32":
            a = np.frombuffer(raw, dtype="<f4")
        elif info["dtype"] == "F16":
            a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif info["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{path}: {name}: dtype {info['dtype']}")
        out[name] = (a.reshape(info["shape"]).astype(np.float32), info["dtype"])
    return out


def read_hf_model(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    index = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(os.path.join(d, f)))
    return cfg, tensors


def hf_config(cfg):
    rope = dict(cfg.get("rope_parameters") or {})
    if "rope_theta" in cfg:
        rope.setdefault("rope_theta", cfg["rope_theta"])
    if cfg.get("rope_scaling"):
        rope.update(cfg["rope_scaling"])
    heads = cfg["num_attention_heads"]
    return {
        "arch": "qwen2" if cfg["architectures"][0].startswith("Qwen2") else "llama",
        "vocab": cfg["vocab_size"], "hidden": cfg["hidden_size"],
        "inter": cfg["intermediate_size"], "layers": cfg["num_hidden_layers"],
        "heads": heads, "kv_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "eps": cfg["rms_norm_eps"], "theta": rope.get("rope_theta", 10000.0),
        "rope_type": rope.get("rope_type", rope.get("type", "default")), "rope": rope,
        "ctx": cfg["max_position_embeddings"], "tied": cfg.get("tie_word_embeddings", False),
        "bias": cfg["architectures"][0].startswith("Qwen2") or cfg.get("attention_bias", False),
        "bos": cfg.get("bos_token_id"), "eos": cfg.get("eos_token_id"),
    }


HF_NAMES = {"attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
            "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm", "w_gate": "mlp.gate_proj",
            "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
GGUF_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
              "wo": "attn_output", "ffn_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up",
              "w_down": "ffn_down"}


def canonical_weights(c, tensors):
    """{canonical name: float32 array} from HF tensors (biases as NAME.bias)."""
    w = {"tok_embd": tensors["model.embed_tokens.weight"][0],
         "output_norm": tensors["model.norm.weight"][0]}
    if not c["tied"]:
        w["output"] = tensors["lm_head.weight"][0]
    for i in range(c["layers"]):
        for canon, hf in HF_NAMES.items():
            w[f"blk.{i}.{canon}"] = tensors[f"model.layers.{i}.{hf}.weight"][0]
            bias = f"model.layers.{i}.{hf}.bias"
            if bias in tensors:
                w[f"blk.{i}.{canon}.bias"] = tensors[bias][0]
    return w


# ---- the reference forward pass -------------------------------------------------------------

def rope_inv_freq(c):
    dim = c["head_dim"]
    inv = (1.0 / (np.float32(c["theta"]) ** (np.arange(0, dim, 2, dtype=np.float32) / dim)))
    inv = inv.astype(np.float32)
    if c["rope_type"] == "llama3":
        return inv / llama3_factors(c, inv)
    return inv


def llama3_factors(c, inv):
    """Per-frequency divisors, as llama.cpp's converter stores them in rope_freqs."""
    r = c["rope"]
    factor, low, high = r["factor"], r["low_freq_factor"], r["high_freq_factor"]
    old = r["original_max_position_embeddings"]
    out = []
    for f in inv.astype(np.float64):
        wavelen = 2 * np.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def forward(c, w, ids):
    """Logits [len(ids), vocab] in float64, HF semantics (rotate-half rope, GQA, SwiGLU)."""
    f = {k: v.astype(np.float64) for k, v in w.items()}
    n, hd = len(ids), c["head_dim"]
    x = f["tok_embd"][ids]
    inv = rope_inv_freq(c).astype(np.float64)
    ang = np.arange(n)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, axis=1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, axis=1)[:, None, :]

    def rope(t):
        half = t.shape[-1] // 2
        rot = np.concatenate([-t[..., half:], t[..., :half]], axis=-1)
        return t * cos + rot * sin

    def linear(h, name):
        y = h @ f[name].T
        return y + f[name + ".bias"] if name + ".bias" in f else y

    mask = np.triu(np.full((n, n), -np.inf), 1)
    group = c["heads"] // c["kv_heads"]
    for i in range(c["layers"]):
        p = f"blk.{i}."
        h = rms_norm(x, f[p + "attn_norm"], c["eps"])
        q = rope(linear(h, p + "wq").reshape(n, c["heads"], hd))
        k = rope(linear(h, p + "wk").reshape(n, c["kv_heads"], hd))
        v = linear(h, p + "wv").reshape(n, c["kv_heads"], hd)
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", s, v).reshape(n, c["heads"] * hd)
        x = x + linear(o, p + "wo")
        h = rms_norm(x, f[p + "ffn_norm"], c["eps"])
        g = linear(h, p + "w_gate")
        x = x + linear(g / (1 + np.exp(-g)) * linear(h, p + "w_up"), p + "w_down")
    x = rms_norm(x, f["output_norm"], c["eps"])
    return x @ f["output" if "output" in f else "tok_embd"].T


def rel_error(ours, ref):
    return max(float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(ours, ref))


# ---- ggml block quantizers and dequantizers -------------------------------------------------

def f16(a):
    return np.asarray(a, dtype=np.float32).astype(np.float16)


def quant_q8_0(x):
    b = x.reshape(-1, 32)
    d = np.abs(b).max(axis=1) / 127
    inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0).astype(np.float32)
    v = b * inv[:, None]
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)  # roundf: half away from zero
    out = np.zeros((b.shape[0], 34), np.uint8)
    out[:, :2] = f16(d).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.tobytes()


def dequant_q8_0(raw, n):
    b = np.frombuffer(raw, np.uint8).reshape(-1, 34)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    return (b[:, 2:].view(np.int8).astype(np.float32) * d).reshape(n)


def quant_q4_0(x):
    b = x.reshape(-1, 32).astype(np.float32)
    idx = np.abs(b).argmax(axis=1)  # first of equal magnitudes, as ggml's strict '<' keeps
    mx = b[np.arange(b.shape[0]), idx]
    d = (mx / -8).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.minimum(15, np.trunc(b * inv[:, None] + np.float32(8.5)).astype(np.int8)).astype(np.uint8)
    out = np.zeros((b.shape[0], 18), np.uint8)
    out[:, :2] = f16(d).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out.tobytes()


def dequant_q4_0(raw, n):
    b = np.frombuffer(raw, np.uint8).reshape(-1, 18)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    q = np.concatenate([b[:, 2:] & 15, b[:, 2:] >> 4], axis=1).astype(np.float32) - 8
    return (q * d).reshape(n)


def pack_k4_scales(sc, m):
    """8 six-bit scales and mins into the 12 bytes dequantize_row_q4_K reads."""
    out = np.zeros(12, np.uint8)
    for j in range(4):
        out[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6)
        out[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6)
        out[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4)
    return out


def unpack_k4_scales(s):
    sc, m = np.zeros(8, np.int64), np.zeros(8, np.int64)
    for j in range(8):
        if j < 4:
            sc[j], m[j] = s[j] & 63, s[j + 4] & 63
        else:
            sc[j] = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4)
            m[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4)
    return sc, m


def asym_scales(sub, levels, scale_levels):
    """The K-quants' asymmetric scale choice for sub-blocks `sub` [n, size] with codes
    0..levels: per sub-block scale (max - min(min, 0)) / levels and min -min(min, 0), each coded
    in 0..scale_levels against an fp16 super-scale (d resp. dmin). Returns d, dmin, the scale
    and min codes and the weight codes [n, size]."""
    n = sub.shape[0]
    lo = np.minimum(sub.min(axis=1), 0)
    scale = (sub.max(axis=1) - lo) / levels
    mins = -lo
    d = f16(scale.max() / scale_levels).astype(np.float32)
    dmin = f16(mins.max() / scale_levels).astype(np.float32)
    sc = np.clip(np.rint(scale / d), 0, scale_levels).astype(np.int64) if d > 0 \
        else np.zeros(n, np.int64)
    m = np.clip(np.rint(mins / dmin), 0, scale_levels).astype(np.int64) if dmin > 0 \
        else np.zeros(n, np.int64)
    q = np.zeros(sub.shape, np.int64)
    for j in range(n):
        step = np.float32(d * sc[j])
        if step > 0:
            q[j] = np.clip(np.rint((sub[j] + np.float32(dmin * m[j])) / step), 0, levels)
    return d, dmin, sc, m, q


def quant_q4_k(x):
    blocks = []
    for sb in x.reshape(-1, 256).astype(np.float32):
        d, dmin, sc, m, q = asym_scales(sb.reshape(8, 32), 15, 63)
        blocks.append(k4_block(d, dmin, sc, m, q))
    return b"".join(blocks)


def k4_block(d, dmin, sc, m, q, qh=b""):
    """A Q4_K / Q5_K super-block: d, dmin, the 12 scale bytes, `qh` (Q5_K's fifth bits) and the
    low nibbles of the [8, 32] codes, sub-blocks 2k and 2k + 1 in the low and high nibbles of
    bytes 32k..32k + 31."""
    low = (q & 15).astype(np.uint8)
    qs = np.concatenate([low[2 * k] | (low[2 * k + 1] << 4) for k in range(4)])
    return (f16([d, dmin]).view(np.uint8).tobytes() + pack_k4_scales(sc, m).tobytes() + qh
            + qs.tobytes())


def dequant_q4_k(raw, n):
    out = []
    for b in np.frombuffer(raw, np.uint8).reshape(-1, 144):
        d, dmin = b[:4].copy().view(np.float16).astype(np.float32)
        sc, m = unpack_k4_scales(b[4:16])
        qs = b[16:]
        for k in range(4):
            chunk = qs[32 * k:32 * k + 32]
            for j, q in ((2 * k, chunk & 15), (2 * k + 1, chunk >> 4)):
                d1 = np.float32(d * np.float32(sc[j]))
                m1 = np.float32(dmin * np.float32(m[j]))
                out.append((d1 * q.astype(np.float32) - m1).astype(np.float32))
    return np.concatenate(out).reshape(n)


def sym_scales(sub, half, scale_half):
    """The K-quants' symmetric scale choice for sub-blocks `sub` [n, size] with codes
    -half..half - 1: per sub-block signed absmax / -half, coded in -scale_half..scale_half - 1
    against an fp16 super-scale d. Returns d, the scale codes and the weight codes (signed)."""
    n = sub.shape[0]
    idx = np.abs(sub).argmax(axis=1)
    scale = sub[np.arange(n), idx] / -half
    d = f16(np.abs(scale).max() / (scale_half - 1)).astype(np.float32)
    sc = np.clip(np.rint(scale / d), -scale_half, scale_half - 1).astype(np.int64) if d > 0 \
        else np.zeros(n, np.int64)
    q = np.zeros(sub.shape, np.int64)
    for j in range(n):
        step = np.float32(d * sc[j])
        if step != 0:
            q[j] = np.clip(np.rint(sub[j] / step), -half, half - 1)
    return d, sc, q


def quant_q6_k(x):
    blocks = []
    for sb in x.reshape(-1, 256).astype(np.float32):
        d, sc, q = sym_scales(sb.reshape(16, 16), 32, 128)
        q = (q + 32).reshape(256)
        ql, qh = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
        for h in range(2):
            a, b2, c, e = (q[128 * h + 32 * i:128 * h + 32 * i + 32] for i in range(4))
            ql[64 * h:64 * h + 32] = (a & 15) | ((c & 15) << 4)
            ql[64 * h + 32:64 * h + 64] = (b2 & 15) | ((e & 15) << 4)
            qh[32 * h:32 * h + 32] = (a >> 4) | ((b2 >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)
        blocks.append(ql.tobytes() + qh.tobytes() + sc.astype(np.int8).tobytes()
                      + f16(d).tobytes())
    return b"".join(blocks)


def dequant_q6_k(raw, n):
    out = []
    for b in np.frombuffer(raw, np.uint8).reshape(-1, 210):
        ql, qh = b[:128].astype(np.int64), b[128:192].astype(np.int64)
        sc = b[192:208].view(np.int8).astype(np.float32)
        d = b[208:210].copy().view(np.float16).astype(np.float32)[0]
        y = np.zeros(256, np.float32)
        for h in range(2):
            l0, l1, hh = ql[64 * h:64 * h + 32], ql[64 * h + 32:64 * h + 64], qh[32 * h:32 * h + 32]
            parts = [(l0 & 15) | ((hh & 3) << 4), (l1 & 15) | (((hh >> 2) & 3) << 4),
                     (l0 >> 4) | (((hh >> 4) & 3) << 4), (l1 >> 4) | (((hh >> 6) & 3) << 4)]
            for i, q in enumerate(parts):
                base = 128 * h + 32 * i
                s = np.repeat(sc[base // 16:base // 16 + 2], 16)
                y[base:base + 32] = np.float32(d) * s * (q - 32).astype(np.float32)
        out.append(y)
    return np.concatenate(out).reshape(n)


def min_scale_codes(b, levels):
    """Q4_1 / Q5_1: per 32-weight block d = (max - min) / levels and m = min (both fp16), codes
    0..levels. Returns d, m and the codes [blocks, 32]."""
    lo, hi = b.min(axis=1), b.max(axis=1)
    d = f16((hi - lo) / levels).astype(np.float32)
    m = f16(lo).astype(np.float32)
    inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0).astype(np.float32)
    return d, m, np.clip(np.rint((b - m[:, None]) * inv[:, None]), 0, levels).astype(np.int64)


def quant_q4_1(x):
    b = x.reshape(-1, 32).astype(np.float32)
    d, m, q = min_scale_codes(b, 15)
    q = q.astype(np.uint8)
    out = np.zeros((b.shape[0], 20), np.uint8)
    out[:, :2] = f16(d).view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = f16(m).view(np.uint8).reshape(-1, 2)
    out[:, 4:] = q[:, :16] | (q[:, 16:] << 4)
    return out.tobytes()


def dequant_q4_1(raw, n):
    b = np.frombuffer(raw, np.uint8).reshape(-1, 20)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    q = np.concatenate([b[:, 4:] & 15, b[:, 4:] >> 4], axis=1).astype(np.float32)
    return (q * d + m).reshape(n)


def pack_q5(q):
    """[blocks, 32] five-bit codes -> (qh [blocks, 4], qs [blocks, 16]): bit 4 of code j is bit j
    of the little-endian qh word; codes j and j + 16 share qs byte j (low, high nibble)."""
    bits = ((q >> 4) & 1).astype(np.uint32)
    qh = (bits << np.arange(32, dtype=np.uint32)).sum(axis=1).astype("<u4")
    qs = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
    return qh.view(np.uint8).reshape(-1, 4), qs.astype(np.uint8)


def unpack_q5(qh_bytes, qs):
    qh = qh_bytes.copy().view("<u4").reshape(-1, 1).astype(np.int64)
    low = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int64)
    high = (qh >> np.arange(32)) & 1
    return low | (high << 4)


def quant_q5_0(x):
    b = x.reshape(-1, 32).astype(np.float32)
    idx = np.abs(b).argmax(axis=1)
    d = (b[np.arange(b.shape[0]), idx] / -16).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.minimum(31, np.trunc(b * inv[:, None] + np.float32(16.5)).astype(np.int64))
    qh, qs = pack_q5(q)
    out = np.zeros((b.shape[0], 22), np.uint8)
    out[:, :2] = f16(d).view(np.uint8).reshape(-1, 2)
    out[:, 2:6], out[:, 6:] = qh, qs
    return out.tobytes()


def dequant_q5_0(raw, n):
    b = np.frombuffer(raw, np.uint8).reshape(-1, 22)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    return ((unpack_q5(b[:, 2:6], b[:, 6:]) - 16).astype(np.float32) * d).reshape(n)


def quant_q5_1(x):
    b = x.reshape(-1, 32).astype(np.float32)
    d, m, q = min_scale_codes(b, 31)
    qh, qs = pack_q5(q)
    out = np.zeros((b.shape[0], 24), np.uint8)
    out[:, :2] = f16(d).view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = f16(m).view(np.uint8).reshape(-1, 2)
    out[:, 4:8], out[:, 8:] = qh, qs
    return out.tobytes()


def dequant_q5_1(raw, n):
    b = np.frombuffer(raw, np.uint8).reshape(-1, 24)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (unpack_q5(b[:, 4:8], b[:, 8:]).astype(np.float32) * d + m).reshape(n)


def quant_q5_k(x):
    blocks = []
    for sb in x.reshape(-1, 256).astype(np.float32):
        d, dmin, sc, m, q = asym_scales(sb.reshape(8, 32), 31, 63)
        qh = np.zeros(32, np.uint8)
        for j in range(8):
            qh |= (((q[j] >> 4) & 1) << j).astype(np.uint8)
        blocks.append(k4_block(d, dmin, sc, m, q, qh.tobytes()))
    return b"".join(blocks)


def dequant_q5_k(raw, n):
    out = []
    for b in np.frombuffer(raw, np.uint8).reshape(-1, 176):
        d, dmin = b[:4].copy().view(np.float16).astype(np.float32)
        sc, m = unpack_k4_scales(b[4:16])
        qh, qs = b[16:48].astype(np.int64), b[48:176].astype(np.int64)
        for j in range(8):
            low = (qs[32 * (j // 2):32 * (j // 2) + 32] >> (4 * (j % 2))) & 15
            q = low | (((qh >> j) & 1) << 4)
            d1 = np.float32(d * np.float32(sc[j]))
            m1 = np.float32(dmin * np.float32(m[j]))
            out.append((d1 * q.astype(np.float32) - m1).astype(np.float32))
    return np.concatenate(out).reshape(n)


def pack_2bit(q):
    """256 two-bit fields -> 64 bytes: half h's 32-weight group g in bit pair g of qs[32 h ..]."""
    qs = np.zeros(64, np.uint8)
    for e in range(256):
        h, g, l = e // 128, (e % 128) // 32, e % 32
        qs[32 * h + l] |= np.uint8((int(q[e]) & 3) << (2 * g))
    return qs


def unpack_2bit(qs):
    e = np.arange(256)
    return (qs[32 * (e // 128) + e % 32].astype(np.int64) >> (2 * ((e % 128) // 32))) & 3


def quant_q2_k(x):
    blocks = []
    for sb in x.reshape(-1, 256).astype(np.float32):
        d, dmin, sc, m, q = asym_scales(sb.reshape(16, 16), 3, 15)
        scales = (sc | (m << 4)).astype(np.uint8)
        blocks.append(scales.tobytes() + pack_2bit(q.reshape(256)).tobytes()
                      + f16([d, dmin]).view(np.uint8).tobytes())
    return b"".join(blocks)


def dequant_q2_k(raw, n):
    out = []
    for b in np.frombuffer(raw, np.uint8).reshape(-1, 84):
        scales = b[:16].astype(np.int64)
        q = unpack_2bit(b[16:80]).astype(np.float32)
        d, dmin = b[80:84].copy().view(np.float16).astype(np.float32)
        sub = np.arange(256) // 16
        dl = (d * (scales[sub] & 15).astype(np.float32)).astype(np.float32)
        ml = (dmin * (scales[sub] >> 4).astype(np.float32)).astype(np.float32)
        out.append((dl * q - ml).astype(np.float32))
    return np.concatenate(out).reshape(n)


def pack_q3_scales(s):
    """16 six-bit scales (stored + 32) into 12 bytes: low nibbles in bytes 0-7 (scales 8-15 in
    the high nibbles), the high bit pairs in bytes 8-11 (scale i: byte 8 + i % 4, pair i / 4)."""
    out = np.zeros(12, np.uint8)
    for i in range(16):
        v = int(s[i]) & 63
        if i < 8:
            out[i] |= v & 15
        else:
            out[i - 8] |= (v & 15) << 4
        out[8 + i % 4] |= (v >> 4) << (2 * (i // 4))
    return out


def unpack_q3_scales(b):
    s = np.zeros(16, np.int64)
    for i in range(16):
        low = b[i] & 15 if i < 8 else b[i - 8] >> 4
        s[i] = (int(low) | (((int(b[8 + i % 4]) >> (2 * (i // 4))) & 3) << 4)) - 32
    return s


def quant_q3_k(x):
    blocks = []
    for sb in x.reshape(-1, 256).astype(np.float32):
        d, sc, q = sym_scales(sb.reshape(16, 16), 4, 32)
        levels = (q + 4).reshape(256)  # 0..7
        hmask = np.zeros(32, np.uint8)
        for e in range(256):
            if levels[e] > 3:
                hmask[e % 32] |= np.uint8(1 << (e // 32))
        blocks.append(hmask.tobytes() + pack_2bit(levels & 3).tobytes()
                      + pack_q3_scales(sc + 32).tobytes() + f16(d).tobytes())
    return b"".join(blocks)


def dequant_q3_k(raw, n):
    out = []
    for b in np.frombuffer(raw, np.uint8).reshape(-1, 110):
        hmask = b[:32].astype(np.int64)
        low = unpack_2bit(b[32:96])
        sc = unpack_q3_scales(b[96:108])
        d = b[108:110].copy().view(np.float16).astype(np.float32)[0]
        e = np.arange(256)
        high = (hmask[e % 32] >> (e // 32)) & 1
        q = (low - np.where(high == 1, 0, 4)).astype(np.float32)
        dl = (np.float32(d) * sc[e // 16].astype(np.float32)).astype(np.float32)
        out.append((dl * q).astype(np.float32))
    return np.concatenate(out).reshape(n)


IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                      np.float32)  # GGUF's IQ4_NL / IQ4_XS codebook


def iq4_codes(sub, step):
    """Nearest codebook entry of sub / step, per weight ([n, 32] weights, [n] steps)."""
    safe = np.where(step != 0, step, 1)[:, None, None]
    return np.abs(sub[:, :, None] / safe - IQ4_VALUES).argmin(axis=2).astype(np.uint8)


def iq4_nibbles(codes):
    """[n, 32] codes -> [n, 16] bytes, weights i and i + 16 in byte i."""
    return codes[:, :16] | (codes[:, 16:] << 4)


def quant_iq4_nl(x):
    b = x.reshape(-1, 32).astype(np.float32)
    idx = np.abs(b).argmax(axis=1)
    d = f16(b[np.arange(b.shape[0]), idx] / -127).astype(np.float32)
    out = np.zeros((b.shape[0], 18), np.uint8)
    out[:, :2] = f16(d).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = iq4_nibbles(iq4_codes(b, d))
    return out.tobytes()


def dequant_iq4_nl(raw, n):
    b = np.frombuffer(raw, np.uint8).reshape(-1, 18)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    q = np.concatenate([b[:, 2:] & 15, b[:, 2:] >> 4], axis=1)
    return (d * IQ4_VALUES[q]).astype(np.float32).reshape(n)


def quant_iq4_xs(x):
    blocks = []
    for sb in x.reshape(-1, 256).astype(np.float32):
        sub = sb.reshape(8, 32)
        idx = np.abs(sub).argmax(axis=1)
        scale = sub[np.arange(8), idx] / -127
        d = f16(np.abs(scale).max() / 31).astype(np.float32)
        ls = np.clip(np.rint(scale / d), -32, 31).astype(np.int64) if d > 0 else np.zeros(8, np.int64)
        codes = iq4_codes(sub, (d * ls.astype(np.float32)).astype(np.float32))
        s = ls + 32
        scales_h = sum(((int(s[j]) >> 4) & 3) << (2 * j) for j in range(8))
        scales_l = np.array([(s[2 * k] & 15) | ((s[2 * k + 1] & 15) << 4) for k in range(4)],
                            np.uint8)
        blocks.append(f16(d).tobytes() + np.array([scales_h], "<u2").tobytes()
                      + scales_l.tobytes() + iq4_nibbles(codes).tobytes())
    return b"".join(blocks)


def dequant_iq4_xs(raw, n):
    out = []
    for b in np.frombuffer(raw, np.uint8).reshape(-1, 136):
        d = b[:2].copy().view(np.float16).astype(np.float32)[0]
        scales_h = int(b[2:4].copy().view("<u2")[0])
        for j in range(8):
            s = ((int(b[4 + j // 2]) >> (4 * (j % 2))) & 15) | (((scales_h >> (2 * j)) & 3) << 4)
            dl = np.float32(d * np.float32(s - 32))
            qs = b[8 + 16 * j:8 + 16 * j + 16]
            q = np.concatenate([qs & 15, qs >> 4])
            out.append((dl * IQ4_VALUES[q]).astype(np.float32))
    return np.concatenate(out).reshape(n)


def dequant_f(raw, n, dtype):
    if dtype == "bf16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(n)
    return np.frombuffer(raw, dtype).astype(np.float32).reshape(n)


TYPES = {
    "F32": (gw.GGML_F32, lambda x: x.astype("<f4").tobytes(), lambda r, n: dequant_f(r, n, "<f4")),
    "F16": (gw.GGML_F16, lambda x: x.astype("<f2").tobytes(), lambda r, n: dequant_f(r, n, "<f2")),
    "BF16": (gw.GGML_BF16,
             lambda x: (x.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes(),
             lambda r, n: dequant_f(r, n, "bf16")),
    "Q8_0": (gw.GGML_Q8_0, quant_q8_0, dequant_q8_0),
    "Q4_0": (gw.GGML_Q4_0, quant_q4_0, dequant_q4_0),
    "Q4_K": (gw.GGML_Q4_K, quant_q4_k, dequant_q4_k),
    "Q6_K": (gw.GGML_Q6_K, quant_q6_k, dequant_q6_k),
    "Q4_1": (gw.GGML_Q4_1, quant_q4_1, dequant_q4_1),
    "Q5_0": (gw.GGML_Q5_0, quant_q5_0, dequant_q5_0),
    "Q5_1": (gw.GGML_Q5_1, quant_q5_1, dequant_q5_1),
    "Q2_K": (gw.GGML_Q2_K, quant_q2_k, dequant_q2_k),
    "Q3_K": (gw.GGML_Q3_K, quant_q3_k, dequant_q3_k),
    "Q5_K": (gw.GGML_Q5_K, quant_q5_k, dequant_q5_k),
    "IQ4_NL": (gw.GGML_IQ4_NL, quant_iq4_nl, dequant_iq4_nl),
    "IQ4_XS": (gw.GGML_IQ4_XS, quant_iq4_xs, dequant_iq4_xs),
}


# ---- GGUF writing ---------------------------------------------------------------------------

def permute_rows(w, heads):
    """HF rotate-half rows -> llama.cpp's interleaved pairs, per head (rows, or a bias)."""
    shape = w.shape
    return w.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_fixture(name, c, w, types, prompt, hf_logits=None):
    """types: canonical-name predicate -> GGUF type name for matrices. Returns the manifest entry."""
    arch = c["arch"]
    gwr = gw.GgufWriter()
    gwr.add("general.architecture", gw.STRING, arch)
    gwr.add("general.name", gw.STRING, name)
    gwr.add("general.quantization_version", gw.U32, 2)
    gwr.add(f"{arch}.context_length", gw.U32, c["ctx"])
    gwr.add(f"{arch}.embedding_length", gw.U32, c["hidden"])
    gwr.add(f"{arch}.block_count", gw.U32, c["layers"])
    gwr.add(f"{arch}.feed_forward_length", gw.U32, c["inter"])
    gwr.add(f"{arch}.attention.head_count", gw.U32, c["heads"])
    gwr.add(f"{arch}.attention.head_count_kv", gw.U32, c["kv_heads"])
    gwr.add(f"{arch}.rope.freq_base", gw.F32, float(c["theta"]))
    gwr.add(f"{arch}.attention.layer_norm_rms_epsilon", gw.F32, float(c["eps"]))
    gwr.add(f"{arch}.rope.dimension_count", gw.U32, c["head_dim"])
    if c["head_dim"] * c["heads"] != c["hidden"]:
        gwr.add(f"{arch}.attention.key_length", gw.U32, c["head_dim"])
        gwr.add(f"{arch}.attention.value_length", gw.U32, c["head_dim"])
    gwr.add(f"{arch}.vocab_size", gw.U32, c["vocab"])
    if c["bos"] is not None:
        gwr.add("tokenizer.ggml.bos_token_id", gw.U32, c["bos"])
    if c["eos"] is not None:
        gwr.add("tokenizer.ggml.eos_token_id", gw.U32, c["eos"])

    used = {}  # canonical -> the float32 weights a reader must reconstruct
    counts = {}

    def add(canon, gguf_name, a, type_name):
        ggml_type, quant, dequant = TYPES[type_name]
        stored = a
        if arch == "llama" and canon.split(".")[-1] in ("wq", "wk") or \
                arch == "llama" and canon.endswith((".wq.bias", ".wk.bias")):
            heads = c["heads"] if ".wq" in canon else c["kv_heads"]
            stored = permute_rows(a, heads)
        raw = quant(stored.reshape(-1))
        back = dequant(raw, stored.size).reshape(stored.shape)
        if stored is not a:  # undo the permutation to get the HF-ordered weights back
            heads = c["heads"] if ".wq" in canon else c["kv_heads"]
            back = back.reshape(heads, back.shape[0] // heads // 2, 2, *back.shape[1:]) \
                .swapaxes(1, 2).reshape(back.shape)
        used[canon] = back
        gwr.add_tensor(gguf_name, list(reversed(a.shape)), ggml_type, raw)
        counts[type_name] = counts.get(type_name, 0) + 1

    add("tok_embd", "token_embd.weight", w["tok_embd"], types("tok_embd"))
    for i in range(c["layers"]):
        for canon, gname in GGUF_NAMES.items():
            key = f"blk.{i}.{canon}"
            is_norm = canon.endswith("norm")
            add(key, f"blk.{i}.{gname}.weight", w[key], "F32" if is_norm else types(key))
            if key + ".bias" in w:
                add(key + ".bias", f"blk.{i}.{gname}.bias", w[key + ".bias"], "F32")
    add("output_norm", "output_norm.weight", w["output_norm"], "F32")
    if "output" in w:
        add("output", "output.weight", w["output"], types("output"))
    if c["rope_type"] == "llama3":
        inv = (1.0 / (np.float32(c["theta"]) ** (np.arange(0, c["head_dim"], 2, dtype=np.float32)
                                                  / c["head_dim"]))).astype(np.float32)
        factors = llama3_factors(c, inv)
        gwr.add_tensor("rope_freqs.weight", [len(factors)], gw.GGML_F32,
                       factors.astype("<f4").tobytes())
        counts["F32"] = counts.get("F32", 0) + 1

    gwr.write(os.path.join(OUT, name + ".gguf"))
    logits = forward(c, used, prompt).astype(np.float32)
    logits.astype("<f4").tofile(os.path.join(OUT, name + ".logits.f32"))
    entry = {"prompt": [int(t) for t in prompt], "vocab": c["vocab"], "types": counts}
    if hf_logits is not None:
        entry["reference_rel_error_vs_hf_fp32"] = rel_error(logits, hf_logits)
    print(f"{name}: {counts}")
    return entry


def synthetic_kquant_model():
    """A small Llama whose row widths are multiples of 256, seeded; no HF counterpart."""
    c = {"arch": "llama", "vocab": 96, "hidden": 256, "inter": 256, "layers": 2, "heads": 4,
         "kv_heads": 2, "head_dim": 64, "eps": 1e-5, "theta": 10000.0, "rope_type": "default",
         "rope": {}, "ctx": 128, "tied": False, "bias": False, "bos": 1, "eos": 2}
    rng = np.random.default_rng(20261202)
    w = {}

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    w["tok_embd"] = mat(c["vocab"], c["hidden"])
    w["output"] = mat(c["vocab"], c["hidden"])
    w["output_norm"] = (1 + 0.1 * rng.standard_normal(c["hidden"])).astype(np.float32)
    q, kv = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    for i in range(c["layers"]):
        p = f"blk.{i}."
        w[p + "attn_norm"] = (1 + 0.1 * rng.standard_normal(c["hidden"])).astype(np.float32)
        w[p + "ffn_norm"] = (1 + 0.1 * rng.standard_normal(c["hidden"])).astype(np.float32)
        w[p + "wq"], w[p + "wk"], w[p + "wv"] = mat(q, 256), mat(kv, 256), mat(kv, 256)
        w[p + "wo"] = mat(256, q)
        w[p + "w_gate"], w[p + "w_up"] = mat(c["inter"], 256), mat(c["inter"], 256)
        w[p + "w_down"] = mat(256, c["inter"])
    return c, w


def main():
    """Writes every fixture, or with NAME arguments only those (the others and their manifest
    entries stay as they are: a rerun elsewhere may round the references' last bits
    differently)."""
    only = set(sys.argv[1:])
    os.makedirs(OUT, exist_ok=True)
    manifest = {}
    if only:
        with open(os.path.join(OUT, "manifest.json")) as f:
            manifest = json.load(f)
    golden = {}
    for case in ("qwen2-tied-f32", "llama3-scaled-bf16-sharded", "llama-tied-bias-f16"):
        d = os.path.join(MODELS, case)
        cfg, tensors = read_hf_model(d)
        c = hf_config(cfg)
        w = canonical_weights(c, tensors)
        ref = json.load(open(os.path.join(d, "reference.json")))
        hf = np.fromfile(os.path.join(d, "logits.f32"), "<f4").reshape(len(ref["prompt"]), -1)
        err = rel_error(forward(c, w, ref["prompt"]), hf)
        print(f"{case}: numpy reference vs HF transformers fp32: {err:.2e}")
        if err > 1e-4:
            sys.exit(f"{case}: the numpy forward pass disagrees with HF ({err:.2e})")
        golden[case] = (c, w, ref["prompt"], hf)

    def every(t):
        return lambda name: t

    plan = [("qwen2-tied.F32", "qwen2-tied-f32", every("F32")),
            ("qwen2-tied.Q4_0", "qwen2-tied-f32", every("Q4_0")),
            ("qwen2-tied.Q8_0", "qwen2-tied-f32", every("Q8_0")),
            ("llama3-scaled.BF16", "llama3-scaled-bf16-sharded", every("BF16")),
            ("llama3-scaled.Q8_0", "llama3-scaled-bf16-sharded", every("Q8_0")),
            ("llama-tied-bias.F16", "llama-tied-bias-f16", every("F16")),
            ("llama-tied-bias.Q4_0", "llama-tied-bias-f16", every("Q4_0")),
            ("llama-tied-bias.Q4_1", "llama-tied-bias-f16", every("Q4_1")),
            ("llama-tied-bias.Q5_0", "llama-tied-bias-f16", every("Q5_0")),
            ("llama-tied-bias.Q5_1", "llama-tied-bias-f16", every("Q5_1")),
            ("llama-tied-bias.IQ4_NL", "llama-tied-bias-f16", every("IQ4_NL"))]
    for name, case, types in plan:
        if only and name not in only:
            continue
        c, w, prompt, hf = golden[case]
        manifest[name] = write_fixture(name, c, w, types, prompt, hf)
        manifest[name]["source"] = f"tests/golden/models/{case}"

    c, w = synthetic_kquant_model()
    prompt = list(np.random.default_rng(7).integers(0, c["vocab"], 24))
    def mixed(base):  # llama.cpp's _M mixes: Q6_K for output, attn_v and ffn_down
        return lambda n: "Q6_K" if n == "output" or n.endswith((".wv", ".w_down")) else base

    for name, types in (("kquant-llama.Q4_K", every("Q4_K")), ("kquant-llama.Q6_K", every("Q6_K")),
                        ("kquant-llama.Q4_K_M", mixed("Q4_K")),
                        ("kquant-llama.Q5_K", every("Q5_K")),
                        ("kquant-llama.Q5_K_M", mixed("Q5_K")),
                        ("kquant-llama.Q3_K", every("Q3_K")), ("kquant-llama.Q2_K", every("Q2_K")),
                        ("kquant-llama.IQ4_XS", every("IQ4_XS"))):
        if only and name not in only:
            continue
        manifest[name] = write_fixture(name, c, w, types, prompt)
        manifest[name]["source"] = "synthetic (scripts/make_gguf_fixtures.py)"
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
