#!/usr/bin/env python3
"""Full-size reference check (issue 4 item 4): Kestrel on CUDA against Hugging Face transformers.

Runs on the GPU machine (torch, transformers 5, numpy; no network). For each model shape it
  1. builds the HF model from the real architecture config (DESIGN.md's reference numbers) with
     seeded random weights at HF's init scale (linear weights and embeddings N(0, 0.02), norms
     1 + N(0, 0.1), Qwen2's q/k/v biases N(0, 0.05)) and saves it with save_pretrained (fp16
     safetensors in 5 GB shards, so HF and Kestrel read the very same bytes);
  2. loads it back with HF from_pretrained in fp16 and runs a 256-token greedy continuation of a
     fixed random prompt with the KV cache, keeping the logits of every step;
  3. runs the Kestrel CLI on the same directory with --device cuda, fp16 and sym_int4:
     `kestrel logits` on the prompt plus HF's greedy tokens (the prefill path, teacher-forced)
     and `kestrel run --temp 0 -n 256 --print-ids` (the decode path, CUDA graph, free-running);
  4. recomputes references in float32 with the same HF model: the unquantized weights (for fp16)
     and the weights quantize-dequantized by Kestrel's documented sym_int4 rules
     (make_golden.fake_quant, the same function the golden fixtures use), each teacher-forced on
     HF's sequence and on Kestrel's own free-running sequence.

Measures, per model and Kestrel format: relative error ||a - b|| / ||b|| of the prompt's
last-position logits; top-1 agreement with HF's greedy tokens over 256 positions, teacher-forced
(a free-running comparison stops meaning anything after the first differing token); top-1
agreement of Kestrel's own free-running greedy tokens with the float32 reference's argmax on the
same prefixes (the decode path); and how many free-running tokens match HF's before the first
difference.

    python3 scripts/hf_reference_check.py --kestrel build-gpu/kestrel \
        [--models qwen2-1.5b,llama3.1-8b] [--workdir /tmp/kestrel-reference] \
        [--markdown OUT.md] [--json OUT.json]

Random weights make near-uniform next-token distributions: the top-1/top-2 logit margin is a
small fraction of the logits' spread (printed), so quantization noise flips many top-1 choices
that a trained model would keep. The fp16 rows test exactness; the sym_int4 rows against the
fake-quantized reference test the int4 kernels; sym_int4 against plain fp16 shows the
quantization noise itself.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden import fake_quant  # noqa: E402  (Kestrel's quantization rules, in torch)

MODELS = {
    "qwen2-1.5b": dict(
        cfg=Qwen2Config, model=Qwen2ForCausalLM,
        kwargs=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                    num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=True)),
    "llama3.1-8b": dict(
        cfg=LlamaConfig, model=LlamaForCausalLM,
        kwargs=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=False,
                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0,
                                      original_max_position_embeddings=8192))),
}

PROMPT_LEN = 32
NEW_TOKENS = 256
FORMATS = ["fp16", "sym_int4"]
INT4_BLOCK = 32  # Kestrel's default block for sym_int4


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_and_save(name, spec, out_dir, seed):
    """Random HF model made directly on the GPU in fp16, saved as HF safetensors."""
    config = spec["cfg"](**spec["kwargs"])
    config.bos_token_id = 1
    config.eos_token_id = 2
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = spec["model"](config).eval()
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device="cuda"))
            elif pname.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen, device="cuda"))
            else:
                p.normal_(0.0, 0.02, generator=gen)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(out_dir, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    files = sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors"))
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
    log(f"{name}: saved {len(files)} safetensors file(s), {size / 1e9:.2f} GB, in {out_dir}")


@torch.no_grad()
def hf_greedy(model, prompt, n_new):
    """Greedy continuation with the KV cache; returns tokens and each step's logits [n_new, V]."""
    out = model(input_ids=torch.tensor([prompt], device="cuda"), use_cache=True)
    past = out.past_key_values
    step_logits = [out.logits[0, -1].float()]
    tokens = []
    for i in range(n_new):
        token = int(torch.argmax(step_logits[-1]))
        tokens.append(token)
        if i + 1 == n_new:
            break
        out = model(input_ids=torch.tensor([[token]], device="cuda"), past_key_values=past,
                    use_cache=True)
        past = out.past_key_values
        step_logits.append(out.logits[0, -1].float())
    return tokens, torch.stack(step_logits)


@torch.no_grad()
def teacher_forced(model, prompt, tokens):
    """Logits [len(tokens), V] predicting each of `tokens` after prompt + the tokens before it."""
    seq = torch.tensor([prompt + tokens[:-1]], device="cuda")
    return model(input_ids=seq, use_cache=False).logits[0, len(prompt) - 1:].float()


def run_kestrel(kestrel, args, log_path):
    start = time.time()
    proc = subprocess.run([kestrel] + args, capture_output=True, text=True)
    with open(log_path, "a") as f:
        f.write("$ kestrel " + " ".join(a if len(a) < 200 else a[:200] + "..." for a in args))
        f.write(f"\n[exit {proc.returncode}, {time.time() - start:.1f} s]\n{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"kestrel {args[0]} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-800:]}")
    return proc.stdout, proc.stderr, time.time() - start


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


def agreement(logits, tokens):
    ref = torch.tensor(tokens, device=logits.device)
    return float((logits.argmax(dim=-1) == ref).float().mean())


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def check_model(name, args):
    spec = MODELS[name]
    vocab = spec["kwargs"]["vocab_size"]
    model_dir = os.path.join(args.workdir, name)
    log_path = os.path.join(args.workdir, f"{name}-kestrel.log")
    open(log_path, "w").close()
    times = {}
    t = time.time()
    build_and_save(name, spec, model_dir, args.seed)
    times["build_and_save_s"] = time.time() - t

    prompt = torch.randint(0, vocab, (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(args.seed + 1)).tolist()
    t = time.time()
    hf = spec["model"].from_pretrained(model_dir, dtype=torch.float16, device_map="cuda",
                                       attn_implementation="sdpa").eval()
    times["hf_load_s"] = time.time() - t
    t = time.time()
    hf_tokens, hf16_steps = hf_greedy(hf, prompt, NEW_TOKENS)  # [256, V]
    times["hf_greedy_s"] = time.time() - t
    log(f"{name}: HF fp16 greedy {NEW_TOKENS} tokens in {times['hf_greedy_s']:.1f} s, "
        f"{len(set(hf_tokens))} distinct")
    # HF's fp16 copy stays on the GPU beside Kestrel's (16 GB + 16 GB at most for 8B fp16 on an
    # 80 GB card) and becomes the float32 reference afterwards: no second load.
    torch.cuda.empty_cache()

    ids_hf = ",".join(str(i) for i in prompt + hf_tokens[:-1])
    ids_prompt = ",".join(str(i) for i in prompt)
    kestrel = {}
    for fmt in FORMATS:
        out_file = os.path.join(args.workdir, f"{name}-{fmt}.f32")
        _, _, secs = run_kestrel(args.kestrel, ["logits", "-m", model_dir, "--ids", ids_hf,
                                                "--device", "cuda", "--low-bit", fmt, "-q",
                                                "-o", out_file], log_path)
        logits = np.fromfile(out_file, dtype="<f4").reshape(PROMPT_LEN + NEW_TOKENS - 1, vocab)
        os.remove(out_file)
        stdout, stderr, secs_run = run_kestrel(
            args.kestrel, ["run", "-m", model_dir, "--ids", ids_prompt, "-n", str(NEW_TOKENS),
                           "--temp", "0", "--print-ids", "--device", "cuda", "--low-bit", fmt],
            log_path)
        run_tokens = [int(x) for x in stdout.split()]
        if len(run_tokens) != NEW_TOKENS:
            raise RuntimeError(f"kestrel run printed {len(run_tokens)} ids, not {NEW_TOKENS}")
        speed = [line for line in stderr.splitlines() if line.startswith("prompt ")]
        kestrel[fmt] = dict(
            steps=torch.from_numpy(logits[PROMPT_LEN - 1:]).cuda(),  # [256, V]
            run_tokens=run_tokens, logits_s=secs, run_s=secs_run,
            speed=speed[-1] if speed else "")
        log(f"{name}: kestrel {fmt}: logits {secs:.1f} s, run {secs_run:.1f} s; "
            f"{speed[-1] if speed else ''}")

    # float32 references on the very same weights, then on their sym_int4 images.
    t = time.time()
    ref = hf.float()
    del hf
    ref32_hf = teacher_forced(ref, prompt, hf_tokens)
    ref32_k16 = teacher_forced(ref, prompt, kestrel["fp16"]["run_tokens"])
    ref32_k4 = teacher_forced(ref, prompt, kestrel["sym_int4"]["run_tokens"])
    with torch.no_grad():
        for _, p in ref.named_parameters():
            if p.dim() == 2:  # every linear weight and the embedding (lm_head when tied)
                p.copy_(fake_quant(p.detach(), "sym_int4", INT4_BLOCK))
    fq_hf = teacher_forced(ref, prompt, hf_tokens)
    fq_k4 = teacher_forced(ref, prompt, kestrel["sym_int4"]["run_tokens"])
    del ref
    torch.cuda.empty_cache()
    times["fp32_references_s"] = time.time() - t
    if not args.keep:
        shutil.rmtree(model_dir, ignore_errors=True)

    top2 = torch.topk(ref32_hf, 2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]) / ref32_hf.std(dim=-1)
    result = dict(
        model=name, prompt=prompt, hf_tokens=hf_tokens, times=times,
        logits_std=float(ref32_hf.std()),
        distinct_hf_tokens=len(set(hf_tokens)),
        median_top1_margin_over_std=float(margins.median()),
        rows={})
    result["rows"]["HF fp16"] = dict(
        rel_last_vs_hf16=0.0,
        rel_last_vs_ref=rel_error(hf16_steps[0], ref32_hf[0]),
        mean_rel_vs_hf16=0.0,
        top1_vs_hf16=1.0,
        top1_vs_ref=agreement(ref32_hf, hf_tokens),
        decode_vs_ref=agreement(ref32_hf, hf_tokens),
        same_run_prefix=NEW_TOKENS)
    for fmt in FORMATS:
        k = kestrel[fmt]
        steps = k["steps"]
        ref_hf, ref_run = (ref32_hf, ref32_k16) if fmt == "fp16" else (fq_hf, fq_k4)
        result["rows"][f"Kestrel {fmt}"] = dict(
            rel_last_vs_hf16=rel_error(steps[0], hf16_steps[0]),
            rel_last_vs_ref=rel_error(steps[0], ref_hf[0]),
            rel_last_vs_fp32=rel_error(steps[0], ref32_hf[0]),
            mean_rel_vs_hf16=float(np.mean([rel_error(steps[i], hf16_steps[i])
                                            for i in range(NEW_TOKENS)])),
            top1_vs_hf16=agreement(steps, hf_tokens),
            top1_vs_ref=agreement(steps, ref_hf.argmax(dim=-1).tolist()),
            decode_vs_ref=agreement(ref_run, k["run_tokens"]),
            same_run_prefix=first_difference(k["run_tokens"], hf_tokens),
            run_tokens=k["run_tokens"], speed=k["speed"], logits_s=k["logits_s"],
            run_s=k["run_s"])
    if "Kestrel sym_int4" in result["rows"]:
        result["fake_quant_vs_fp32_rel_last"] = rel_error(fq_hf[0], ref32_hf[0])
    return result


def markdown(results, header):
    lines = [header, "",
             "| model | engine | rel. error, last prompt position: vs HF fp16 | vs fp32 ref | "
             "mean rel. error, 256 positions, vs HF fp16 | top-1 = HF fp16 greedy token "
             "(teacher-forced, 256) | top-1 = fp32 ref argmax | decode path: own greedy token "
             "= fp32 ref argmax | free-running tokens equal to HF's |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for engine, row in r["rows"].items():
            lines.append(
                f"| {r['model']} | {engine} | {row['rel_last_vs_hf16']:.2e} | "
                f"{row['rel_last_vs_ref']:.2e} | {row['mean_rel_vs_hf16']:.2e} | "
                f"{row['top1_vs_hf16']:.1%} | {row['top1_vs_ref']:.1%} | "
                f"{row['decode_vs_ref']:.1%} | {row['same_run_prefix']} of {NEW_TOKENS} |")
    lines.append("")
    for r in results:
        extra = ""
        if "fake_quant_vs_fp32_rel_last" in r:
            extra = (f"; sym_int4 fake-quant reference vs fp32: rel. error "
                     f"{r['fake_quant_vs_fp32_rel_last']:.3f}, Kestrel sym_int4 vs fp32 "
                     f"{r['rows']['Kestrel sym_int4']['rel_last_vs_fp32']:.3f}")
        lines.append(f"- {r['model']}: logits std {r['logits_std']:.3f}, median top-1/top-2 "
                     f"margin {r['median_top1_margin_over_std']:.3f} std, HF greedy "
                     f"{r['distinct_hf_tokens']} distinct tokens{extra}; times "
                     + ", ".join(f"{k} {v:.0f}" for k, v in r["times"].items()))
        for fmt in FORMATS:
            row = r["rows"].get(f"Kestrel {fmt}")
            if row and row["speed"]:
                lines.append(f"  - Kestrel {fmt} run: {row['speed']}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kestrel", required=True, help="path of the kestrel binary (CUDA build)")
    parser.add_argument("--models", default="qwen2-1.5b,llama3.1-8b")
    parser.add_argument("--workdir", default="/tmp/kestrel-reference")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--keep", action="store_true", help="keep the saved HF directories")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    free, total = shutil.disk_usage(args.workdir)[2], shutil.disk_usage(args.workdir)[0]
    header = (f"Reference check: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"transformers {transformers.__version__}; prompt {PROMPT_LEN} random ids, "
              f"{NEW_TOKENS} greedy tokens; seed {args.seed}")
    log(f"{header}; workdir {args.workdir} ({free / 1e9:.0f} of {total / 1e9:.0f} GB free)")
    results = []
    failed = False
    for name in args.models.split(","):
        try:
            results.append(check_model(name, args))
        except Exception as e:  # one model's failure must not hide the other's numbers
            failed = True
            log(f"{name}: FAILED: {type(e).__name__}: {e}")
        text = markdown(results, header)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    print(text, end="")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
