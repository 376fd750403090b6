"""The Python API on the CUDA backend (the GPU machine; skipped where there is no NVIDIA driver or
the build has no CUDA backend)."""

import json
import os
import re
import subprocess
import time

import numpy as np
import pytest

import kestrel


def _cuda_skip_reason():
    if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")):
        return "no NVIDIA driver on this machine"
    package_dir = os.path.dirname(kestrel.__file__)
    if not os.path.exists(os.path.join(package_dir, "libkestrel_cuda.so")):
        return "this build has no CUDA backend (no libkestrel_cuda.so beside the extension)"
    return None


pytestmark = pytest.mark.skipif(_cuda_skip_reason() is not None, reason=str(_cuda_skip_reason()))

GOLDEN = ["qwen2-tied-f32", "llama-tied-bias-f16", "llama3-scaled-bf16-sharded"]


def reference(golden_dir, name):
    directory = os.path.join(golden_dir, "models", name)
    with open(os.path.join(directory, "reference.json"), encoding="utf-8") as f:
        ref = json.load(f)
    ref["dir"] = directory
    ref["logits"] = np.fromfile(os.path.join(directory, "logits.f32"), dtype="<f4").reshape(
        ref["logits_shape"]
    )
    return ref


@pytest.mark.parametrize("name", GOLDEN)
@pytest.mark.parametrize("low_bit", ["fp32", "fp16"])
def test_cuda_greedy_and_logits_match_hf(name, low_bit, golden_dir):
    ref = reference(golden_dir, name)
    model = kestrel.AutoModelForCausalLM.from_pretrained(
        ref["dir"], load_in_low_bit=low_bit, device="cuda"
    )
    assert model.device == "cuda"
    logits = model(ref["prompt"]).logits[0].astype(np.float64)
    hf = ref["logits"].astype(np.float64)
    worst = np.max(np.linalg.norm(logits - hf, axis=-1) / np.linalg.norm(hf, axis=-1))
    assert worst <= 1e-2  # the C++ CUDA golden tests' bound for both formats
    seq = model.generate(ref["prompt"], max_new_tokens=len(ref["greedy"]), eos_token_id=None)
    assert seq[len(ref["prompt"]):] == ref["greedy"]
    # A batch of different lengths equals each prompt alone.
    p = ref["prompt"]
    prompts = [p[:5], p, p[2:17]]
    alone = [model.generate(q, max_new_tokens=8, eos_token_id=None) for q in prompts]
    assert model.generate(prompts, max_new_tokens=8, eos_token_id=None) == alone


def test_python_overhead_per_token_is_small(kestrel_binary):
    """Python's step time on synthetic:qwen2-1.5b is within 5% of the C++ CLI's."""
    prompt = list(range(1, 17))
    n_new = 129
    run = subprocess.run(
        [kestrel_binary, "run", "-m", "synthetic:qwen2-1.5b", "--ids", ",".join(map(str, prompt)),
         "-n", str(n_new), "--temp", "0", "--ignore-eos", "--device", "cuda", "--print-ids"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    match = re.search(r"decode (\d+) tokens: ([0-9.]+) tok/s", run.stderr)
    assert match, run.stderr
    cli_step = 1.0 / float(match.group(2))
    model = kestrel.AutoModelForCausalLM.from_pretrained("synthetic:qwen2-1.5b", device="cuda")
    model.generate(prompt, max_new_tokens=8, eos_token_id=None)  # graphs captured
    steps = []
    for _ in range(3):
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n_new, eos_token_id=None)
        wall = time.perf_counter() - start
        stats = model.last_generate_stats
        steps.append((wall - stats["prefill_seconds"]) / stats["decode_steps"])
    assert out[len(prompt):] == [int(t) for t in run.stdout.split()]
    python_step = min(steps)
    print(f"CLI step {cli_step * 1e3:.3f} ms, Python step {python_step * 1e3:.3f} ms")
    assert python_step <= 1.05 * cli_step
