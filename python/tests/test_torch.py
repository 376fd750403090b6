"""torch tensors in and out (only where torch is installed: Kestrel does not depend on it)."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kestrel  # noqa: E402


@pytest.fixture(scope="module")
def golden(golden_dir):
    directory = os.path.join(golden_dir, "models", "qwen2-tied-f32")
    with open(os.path.join(directory, "reference.json"), encoding="utf-8") as f:
        ref = json.load(f)
    model = kestrel.AutoModelForCausalLM.from_pretrained(
        directory, load_in_low_bit="fp32", device="cpu"
    )
    return model, ref


def test_generate_returns_a_tensor(golden):
    model, ref = golden
    p = ref["prompt"]
    ids = torch.tensor([p], dtype=torch.long)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                         eos_token_id=None)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.long
    assert out.shape == (1, len(p) + 32)
    assert out[0].tolist() == p + ref["greedy"]
    # A padded batch with its mask, as an HF tokenizer with padding_side="left" returns it.
    short = p[:6]
    ids = torch.tensor([p, [0] * (len(p) - 6) + short])
    mask = torch.tensor([[1] * len(p), [0] * (len(p) - 6) + [1] * 6])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None)
    alone = model.generate(short, max_new_tokens=4, eos_token_id=None)
    assert out[1, len(p) - 6:].tolist() == alone


def test_logits_are_a_tensor(golden):
    model, ref = golden
    logits = model(torch.tensor([ref["prompt"]])).logits
    assert isinstance(logits, torch.Tensor) and logits.dtype == torch.float32
    expected = model(ref["prompt"]).logits
    assert np.array_equal(logits.numpy(), expected)


def test_tokenizer_pt_tensors(source_dir):
    from conftest import tokenizer_dir

    tok = kestrel.AutoTokenizer.from_pretrained(tokenizer_dir(source_dir, "qwen3"))
    enc = tok(["a b c", "a"], padding=True, return_tensors="pt")
    assert isinstance(enc.input_ids, torch.Tensor) and enc.input_ids.shape[0] == 2
    assert tok.batch_decode(enc.input_ids, skip_special_tokens=True) == ["a b c", "a"]
