#!/usr/bin/env python3
"""Reference fixtures for Kestrel's model tests, made by Hugging Face transformers.

Runs where torch and transformers are installed (the GPU machine; no network needed). Builds tiny
random Qwen2 and Llama checkpoints -- random biases and norm weights included -- saves them the way
HF does (single file or shards, fp32 / bf16 / fp16 storage), and records HF's float32 logits for
every prompt position plus a 32-token greedy continuation. Kestrel's own output is never used here.

    python3 scripts/make_golden.py OUT_DIR

writes OUT_DIR/<case>/{config.json, generation_config.json, model*.safetensors,
reference.json, logits.f32, logits_<format>_b<block>.f32}. Logits files are little-endian float32,
row-major [prompt_len, vocab].

The logits_<format>_b<block>.f32 files are HF's float32 logits with every linear weight and the
embedding replaced by its quantize-dequantize image under Kestrel's documented quantization rules
(src/quant/format.h), implemented here independently in torch. Against them, Kestrel's integer
formats are checked for everything but the rounding of activations, with bounds far tighter than
the raw quantization noise of these small random models allows against plain float32.
"""
import json
import os
import sys

import torch
import transformers
from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

CASES = [
    # name, config class, model class, config kwargs, storage dtype, shard size, prompt length
    dict(name="qwen2-tied-f32", cfg=Qwen2Config, model=Qwen2ForCausalLM, storage=torch.float32,
         shard=None, prompt_len=40, eos=[7],
         kwargs=dict(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    # Llama 3.1 style: llama3 rope scaling whose original_max_position_embeddings (32) the prompt
    # (48 tokens) runs past, an explicit head_dim that differs from hidden/heads, GQA 4:1,
    # bf16 storage in shards with an index.
    dict(name="llama3-scaled-bf16-sharded", cfg=LlamaConfig, model=LlamaForCausalLM,
         storage=torch.bfloat16, shard="60KB", prompt_len=48, eos=[5, 6],
         kwargs=dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                     max_position_embeddings=256, rope_theta=500000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=False,
                     rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0,
                                       original_max_position_embeddings=32))),
    # Llama 3.2 style: tied embeddings, plain rope, attention bias, fp16 storage.
    dict(name="llama-tied-bias-f16", cfg=LlamaConfig, model=LlamaForCausalLM,
         storage=torch.float16, shard=None, prompt_len=24, eos=[3],
         kwargs=dict(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128,
                     rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     attention_bias=True)),
]

GREEDY_TOKENS = 32

# (format, block) pairs whose fake-quantized reference logits are recorded.
FAKE_QUANT = [("sym_int8", 32), ("sym_int4", 32), ("asym_int4", 32), ("sym_int4", 64)]


def fp16_round(x):
    return x.to(torch.float16).to(torch.float32)


def fake_quant(w, fmt, block):
    """Quantize-dequantize a [rows, cols] float32 weight per format.h's rules."""
    rows, cols = w.shape
    b = w.reshape(rows, cols // block, block)
    if fmt == "sym_int4":
        idx = b.abs().argmax(dim=-1, keepdim=True)
        amax = torch.gather(b, -1, idx)  # signed value of largest magnitude
        d = fp16_round(amax / -8.0)
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        q = torch.clamp(torch.round(b * inv), -8, 7)
        out = q * d
    elif fmt == "sym_int8":
        d = fp16_round(b.abs().amax(dim=-1, keepdim=True) / 127.0)
        safe = torch.where(d != 0, d, torch.ones_like(d))
        q = torch.where(d != 0, torch.clamp(torch.round(b / safe), -127, 127), torch.zeros_like(b))
        out = q * d
    elif fmt == "asym_int4":
        lo = b.amin(dim=-1, keepdim=True)
        hi = b.amax(dim=-1, keepdim=True)
        m = fp16_round(lo)
        d = fp16_round((hi - lo) / 15.0)
        safe = torch.where(d != 0, d, torch.ones_like(d))
        q = torch.where(d != 0, torch.clamp(torch.round((b - m) / safe), 0, 15),
                        torch.zeros_like(b))
        out = q * d + m
    else:
        raise ValueError(fmt)
    return out.reshape(rows, cols)


def fake_quant_logits(model, prompt, fmt, block):
    import copy
    q = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if p.dim() == 2:  # every linear weight and the embedding table (lm_head when tied)
                if p.shape[1] % block:
                    return None
                p.copy_(fake_quant(p.detach().float(), fmt, block))
        return q(torch.tensor([prompt])).logits[0].float().contiguous()


def randomize(model, generator):
    """Every parameter random (HF's init leaves biases at zero and norms at one)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.25 * torch.randn(p.shape, generator=generator))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=generator) * (1.5 / fan_in ** 0.5))


def load_kwargs(dtype):
    # transformers 5 renamed torch_dtype to dtype.
    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def make_case(case, out_root):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1234)
    config = case["cfg"](**case["kwargs"], attn_implementation="eager")
    config.bos_token_id = 1
    config.eos_token_id = case["eos"][0]
    model = case["model"](config).eval()
    randomize(model, generator)

    out = os.path.join(out_root, case["name"])
    os.makedirs(out, exist_ok=True)
    # Save in the storage dtype, then reload in float32 so the reference computes on exactly the
    # (rounded) weights that are on disk.
    model.to(case["storage"])
    save_kwargs = dict(safe_serialization=True)
    if case["shard"]:
        save_kwargs["max_shard_size"] = case["shard"]
    model.save_pretrained(out, **save_kwargs)
    GenerationConfig(bos_token_id=1, eos_token_id=case["eos"]).save_pretrained(out)

    ref = case["model"].from_pretrained(out, attn_implementation="eager",
                                        **load_kwargs(torch.float32)).eval()
    prompt_gen = torch.Generator().manual_seed(99)
    vocab = case["kwargs"]["vocab_size"]
    prompt = torch.randint(0, vocab, (case["prompt_len"],), generator=prompt_gen).tolist()

    with torch.no_grad():
        logits = ref(torch.tensor([prompt])).logits[0].float().contiguous()
        ids = list(prompt)
        margins = []
        for _ in range(GREEDY_TOKENS):
            # Full recomputation each step: no cache, the plainest possible reference.
            last = ref(torch.tensor([ids])).logits[0, -1].float()
            top2 = torch.topk(last, 2)
            margins.append(float(top2.values[0] - top2.values[1]))
            ids.append(int(torch.argmax(last)))
    logits.numpy().astype("<f4").tofile(os.path.join(out, "logits.f32"))
    fake = {}
    for fmt, block in FAKE_QUANT:
        fq = fake_quant_logits(ref, prompt, fmt, block)
        if fq is None:
            continue
        name = f"logits_{fmt}_b{block}.f32"
        fq.numpy().astype("<f4").tofile(os.path.join(out, name))
        rel = float((fq - logits).norm() / logits.norm())
        fake[f"{fmt}_b{block}"] = dict(file=name, rel_error_vs_fp32=rel)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    reference = dict(
        case=case["name"], transformers=transformers.__version__, torch=torch.__version__,
        prompt=prompt, greedy=ids[len(prompt):], vocab_size=vocab,
        logits_shape=[len(prompt), vocab], min_greedy_margin=min(margins),
        storage=str(case["storage"]).replace("torch.", ""), files=files, fake_quant=fake)
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1)
    print(f"{case['name']}: files={files} min greedy top1-top2 margin={min(margins):.4g} "
          f"logits std={float(logits.std()):.3f} fake-quant vs fp32: "
          + ", ".join(f"{k} {v['rel_error_vs_fp32']:.3g}" for k, v in fake.items()))


def main():
    out_root = sys.argv[1] if len(sys.argv) > 1 else "tests/golden/models"
    for case in CASES:
        make_case(case, out_root)


if __name__ == "__main__":
    main()
