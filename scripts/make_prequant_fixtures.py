#!/usr/bin/env python3
"""Writes the AWQ / GPTQ test fixtures in tests/golden/prequant/ (python3 + numpy only; no torch,
no AutoAWQ, no AutoGPTQ).

Sources: the tiny HF checkpoints of tests/golden/models (made by make_golden.py). Every linear
of every decoder layer is quantized with numpy to 4 bits per group of input columns and packed
in the published layouts; embeddings, lm_head, norms and biases stay as they are in the source:
  - AWQ (AutoAWQ GEMM, quant_method awq, version gemm, zero_point true): qweight int32
    [in, out/8] and qzeros int32 [in/group, out/8] pack eight outputs per word, nibble k holding
    output 8j + (0, 2, 4, 6, 1, 3, 5, 7)[k]; scales fp16 [in/group, out]; zeros stored as they are.
  - GPTQ (AutoGPTQ, quant_method gptq, desc_act false): qweight int32 [in/8, out] packs eight
    inputs per word in plain order; qzeros int32 [in/group, out/8] eight outputs per word in
    plain order; scales fp16 [in/group, out]; g_idx int32 [in] = i // group. checkpoint_format
    "gptq" (v1) stores zero - 1, "gptq_v2" the zero itself. sym true means every zero is 8.
Quantizers: asymmetric per group s = (max - min) / 15 (fp16), z = round(-min / s) clamped to
0..15 (1..15 for GPTQ v1, whose z - 1 cannot hold -1), q = clamp(round(w / s) + z, 0, 15);
symmetric s = max|w| * 2 / 15 (fp16), z = 8, q = clamp(round(w / s) + 8, 0, 15).

References (independent of Kestrel): the forward pass of make_gguf_fixtures.py (checked there
against HF transformers) over
  - logits.f32: the quantized linears dequantized as the formats define, (q - z) * s, and every
    other tensor as stored: what an fp32 load must reproduce;
  - logits_native.f32: the same, with the embedding table and an untied lm_head quantized by
    Kestrel's rules for the format the checkpoint loads into by default (sym_int4 for GPTQ sym,
    else asym_int4; block 32, as make_golden.py's fake_quant): what the default load computes.
Output per fixture NAME: a directory NAME/ with config.json, generation_config.json,
model.safetensors and the two logits files, and an entry in manifest.json.
"""
import json
import os
import shutil
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_gguf_fixtures as mg  # noqa: E402

OUT = os.path.join(mg.ROOT, "tests", "golden", "prequant")

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble k of a word holds output 8j + AWQ_ORDER[k]


def write_safetensors(path, tensors):
    """tensors: name -> (numpy array, safetensors dtype string)."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a, dtype = tensors[name]
        if dtype == "BF16":
            raw = (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) >> 16) \
                .astype("<u2").tobytes()
        else:
            raw = np.ascontiguousarray(a, dtype={"F32": "<f4", "F16": "<f2", "I32": "<i4"}[dtype]) \
                .tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def quantize(w, group, sym, min_zero=0):
    """w [out, in] -> codes [out, in], zeros [out, in/group], fp16 scales [out, in/group]."""
    out, cols = w.shape
    b = w.reshape(out, cols // group, group).astype(np.float64)
    if sym:
        s = (np.abs(b).max(axis=-1) * 2 / 15).astype(np.float16).astype(np.float64)
        z = np.full(s.shape, 8)
    else:
        lo, hi = np.minimum(b.min(axis=-1), 0), np.maximum(b.max(axis=-1), 0)
        s = ((hi - lo) / 15).astype(np.float16).astype(np.float64)
        z = np.clip(np.round(-lo / np.where(s > 0, s, 1)), min_zero, 15).astype(np.int64)
    safe = np.where(s > 0, s, 1)[..., None]
    q = np.clip(np.round(b / safe) + z[..., None], 0, 15).astype(np.int64)
    return q.reshape(out, cols), z, s.astype(np.float16)


def dequantize(q, z, s, group):
    out, cols = q.shape
    qq = q.reshape(out, cols // group, group).astype(np.float64)
    return ((qq - z[..., None]) * s.astype(np.float64)[..., None]).reshape(out, cols)


def pack_awq(values):
    """[rows, n] nibbles -> int32 [rows, n/8] in AutoAWQ's interleaved order."""
    rows, n = values.shape
    words = np.zeros((rows, n // 8), dtype=np.uint32)
    v = values.astype(np.uint32).reshape(rows, n // 8, 8)
    for k in range(8):
        words |= v[:, :, AWQ_ORDER[k]] << np.uint32(4 * k)
    return words.view(np.int32)


def pack_plain(values):
    """[rows, n] nibbles -> int32 [rows, n/8], nibble k of word j holding value 8j + k."""
    rows, n = values.shape
    words = np.zeros((rows, n // 8), dtype=np.uint32)
    v = values.astype(np.uint32).reshape(rows, n // 8, 8)
    for k in range(8):
        words |= v[:, :, k] << np.uint32(4 * k)
    return words.view(np.int32)


def fake_quant(w, fmt, block=32):
    """Kestrel's sym_int4 / asym_int4 quantize-dequantize (make_golden.py's fake_quant)."""
    rows, cols = w.shape
    b = w.reshape(rows, cols // block, block).astype(np.float32)
    f16 = lambda x: x.astype(np.float16).astype(np.float32)  # noqa: E731
    if fmt == "sym_int4":
        idx = np.abs(b).argmax(axis=-1)[..., None]
        d = f16(np.take_along_axis(b, idx, axis=-1) / np.float32(-8.0))
        inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0).astype(np.float32)
        out = np.clip(np.round(b * inv), -8, 7) * d
    else:
        lo, hi = b.min(axis=-1, keepdims=True), b.max(axis=-1, keepdims=True)
        m, d = f16(lo), f16((hi - lo) / np.float32(15.0))
        safe = np.where(d != 0, d, 1)
        out = np.where(d != 0, np.clip(np.round((b - m) / safe), 0, 15), 0) * d + m
    return out.reshape(rows, cols)


def make(name, case, method, group, sym=False, checkpoint_format="gptq"):
    src = os.path.join(mg.MODELS, case)
    cfg, tensors = mg.read_hf_model(src)
    c = mg.hf_config(cfg)
    ref = json.load(open(os.path.join(src, "reference.json")))
    prompt = ref["prompt"]
    awq = method == "awq"
    v1 = not awq and checkpoint_format == "gptq"
    out_tensors = {}
    used = mg.canonical_weights(c, tensors)
    for hf_name, (a, dtype) in tensors.items():
        layer = hf_name.startswith("model.layers.") and hf_name.endswith("_proj.weight")
        if not layer:
            out_tensors[hf_name] = (a, dtype)
            continue
        prefix = hf_name[:-len(".weight")]
        q, z, s = quantize(a, group, sym, 1 if v1 and not sym else 0)
        if awq:
            out_tensors[prefix + ".qweight"] = (pack_awq(q.T), "I32")
            out_tensors[prefix + ".qzeros"] = (pack_awq(z.T), "I32")
        else:
            out_tensors[prefix + ".qweight"] = (pack_plain(q).T.copy(), "I32")
            out_tensors[prefix + ".qzeros"] = (pack_plain(z.T - (1 if v1 else 0)), "I32")
            out_tensors[prefix + ".g_idx"] = (np.arange(a.shape[1], dtype=np.int32) // group,
                                              "I32")
        out_tensors[prefix + ".scales"] = (s.T.copy(), "F16")
        layer_index = int(hf_name.split(".")[2])
        canon = next(k for k, v in mg.HF_NAMES.items() if prefix.endswith(v))
        used[f"blk.{layer_index}.{canon}"] = dequantize(q, z, s, group).astype(np.float32)

    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    qc = {"quant_method": method, "bits": 4, "group_size": group}
    if awq:
        qc.update(zero_point=True, version="gemm")
    else:
        qc.update(desc_act=False, sym=sym, checkpoint_format=checkpoint_format)
    cfg["quantization_config"] = qc
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
        f.write("\n")
    shutil.copy(os.path.join(src, "generation_config.json"), d)
    write_safetensors(os.path.join(d, "model.safetensors"), out_tensors)

    logits = mg.forward(c, used, prompt).astype(np.float32)
    logits.astype("<f4").tofile(os.path.join(d, "logits.f32"))
    fmt = "sym_int4" if not awq and sym else "asym_int4"
    native = dict(used)
    native["tok_embd"] = fake_quant(used["tok_embd"], fmt)
    if "output" in used:
        native["output"] = fake_quant(used["output"], fmt)
    native_logits = mg.forward(c, native, prompt).astype(np.float32)
    native_logits.astype("<f4").tofile(os.path.join(d, "logits_native.f32"))
    hf = np.fromfile(os.path.join(src, "logits.f32"), "<f4").reshape(len(prompt), -1)
    entry = {"source": f"tests/golden/models/{case}", "prompt": prompt, "vocab": c["vocab"],
             "quantization_config": qc, "native_format": fmt,
             "rel_error_vs_hf_fp32": mg.rel_error(logits, hf),
             "native_rel_error_vs_fp32_reference": mg.rel_error(native_logits, logits)}
    print(f"{name}: vs HF fp32 {entry['rel_error_vs_hf_fp32']:.3g}, native reference vs "
          f"fp32 reference {entry['native_rel_error_vs_fp32_reference']:.3g}")
    return entry


def main():
    os.makedirs(OUT, exist_ok=True)
    manifest = {
        "qwen2-tied.awq-g64": make("qwen2-tied.awq-g64", "qwen2-tied-f32", "awq", 64),
        "llama3-scaled.gptq-asym-g32": make("llama3-scaled.gptq-asym-g32",
                                            "llama3-scaled-bf16-sharded", "gptq", 32),
        "llama-tied-bias.gptq-sym-g32": make("llama-tied-bias.gptq-sym-g32",
                                             "llama-tied-bias-f16", "gptq", 32, sym=True),
        "llama-tied-bias.awq-g32": make("llama-tied-bias.awq-g32", "llama-tied-bias-f16", "awq",
                                        32),
        "qwen2-tied.gptq-v2-g64": make("qwen2-tied.gptq-v2-g64", "qwen2-tied-f32", "gptq", 64,
                                       checkpoint_format="gptq_v2"),
    }
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
