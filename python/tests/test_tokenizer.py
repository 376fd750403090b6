"""kestrel.AutoTokenizer against the Hugging Face fixtures in tests/golden/tokenizer and
tests/golden/templates (recorded with `tokenizers` and `transformers`)."""

import json
import os

import numpy as np
import pytest

import kestrel
from conftest import tokenizer_dir

VOCABS = ["qwen3", "llama3_1"]


def jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module", params=VOCABS)
def vocab_tokenizer(request, source_dir):
    return request.param, kestrel.AutoTokenizer.from_pretrained(tokenizer_dir(source_dir, request.param))


def test_encode_matches_hf(vocab_tokenizer, golden_dir):
    vocab, tok = vocab_tokenizer
    rows = jsonl(os.path.join(golden_dir, "tokenizer", "golden.jsonl"))
    assert len(rows) >= 2000
    bad = [
        r["text"][:40]
        for r in rows
        if tok.encode(r["text"], add_special_tokens=r["add_special_tokens"]) != r[vocab]
    ]
    assert not bad, f"{len(bad)} rows differ from HF, e.g. {bad[:3]}"
    # __call__ gives the same ids as encode.
    assert tok(rows[5]["text"], add_special_tokens=False).input_ids == rows[5][vocab]


def test_decode_matches_hf(golden_dir, source_dir):
    toks = {v: kestrel.AutoTokenizer.from_pretrained(tokenizer_dir(source_dir, v)) for v in VOCABS}
    rows = jsonl(os.path.join(golden_dir, "tokenizer", "golden_decode.jsonl"))
    assert len(rows) >= 1000
    bad = [
        (r["vocab"], r["ids"][:8])
        for r in rows
        if toks[r["vocab"]].decode(r["ids"], skip_special_tokens=r["skip_special_tokens"])
        != r["text"]
    ]
    assert not bad, f"{len(bad)} rows differ from HF, e.g. {bad[:3]}"
    # batch_decode and NumPy input decode the same way.
    sample = [r for r in rows if r["vocab"] == "qwen3"][:20]
    tok = toks["qwen3"]
    got = tok.batch_decode([np.asarray(r["ids"]) for r in sample])
    assert got == [tok.decode(r["ids"]) for r in sample]


def test_vocabulary_and_special_tokens(vocab_tokenizer, golden_dir):
    vocab, tok = vocab_tokenizer
    with open(os.path.join(golden_dir, "tokenizer", "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)[vocab]
    assert len(tok) == meta["vocab_size"]
    for token, i in meta["token_to_id"].items():
        assert tok.convert_tokens_to_ids(token) == i, token
    for i, token in meta["id_to_token"].items():
        assert tok.convert_ids_to_tokens(int(i)) == token, i
    if vocab == "qwen3":
        assert tok.eos_token == "<|im_end|>"
        # Qwen's ids (public facts of its vocabulary): <|endoftext|> 151643, <|im_end|> 151645.
        assert tok.eos_token_id == 151645
        assert tok.bos_token_id is None
        assert tok.pad_token_id == 151643
    else:
        assert tok.bos_token_id == meta["token_to_id"]["<|begin_of_text|>"]
        assert tok.encode("hi")[0] == tok.bos_token_id
        assert tok.encode("hi", add_special_tokens=False)[0] != tok.bos_token_id
    assert tok.eos_token_id in tok.all_special_ids


@pytest.mark.parametrize("vocab", ["qwen3", "llama3_1"])
def test_chat_template_matches_transformers(vocab, source_dir, golden_dir):
    tok = kestrel.AutoTokenizer.from_pretrained(tokenizer_dir(source_dir, vocab))
    cases = jsonl(os.path.join(golden_dir, "templates", f"{vocab}.jsonl"))
    assert cases
    checked = 0
    for case in cases:
        if "expected" not in case:
            continue
        extra = case.get("extra") or {}
        got = tok.apply_chat_template(
            case["messages"],
            add_generation_prompt=case["add_generation_prompt"],
            tokenize=False,
            **extra,
        )
        assert got == case["expected"], case["id"]
        checked += 1
    assert checked >= 10
    # tokenize=True (transformers' default) gives the ids of the rendered text.
    case = cases[0]
    ids = tok.apply_chat_template(case["messages"], add_generation_prompt=True)
    text = tok.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False)
    assert ids == tok.encode(text, add_special_tokens=False)
    arr = tok.apply_chat_template(case["messages"], return_tensors="np")
    assert arr.shape[0] == 1 and arr.dtype == np.int64


def test_npm_package_root_is_a_tokenizer_directory(source_dir):
    models = tokenizer_dir(source_dir, "qwen3")
    root = kestrel.AutoTokenizer.from_pretrained(os.path.dirname(models))
    assert root.eos_token_id == 151645 and root.chat_template
    assert root.encode("Hello world") == kestrel.AutoTokenizer.from_pretrained(models).encode(
        "Hello world"
    )


def test_padding_and_tensors(source_dir):
    tok = kestrel.AutoTokenizer.from_pretrained(tokenizer_dir(source_dir, "qwen3"), padding_side="left")
    texts = ["Hello", "Hello there, how are you today?"]
    enc = tok(texts, padding=True, return_tensors="np")
    assert enc.input_ids.shape == enc.attention_mask.shape
    short = tok.encode(texts[0])
    width = enc.input_ids.shape[1]
    assert enc.input_ids[0, width - len(short) :].tolist() == short
    assert enc.input_ids[0, : width - len(short)].tolist() == [tok.pad_token_id] * (width - len(short))
    assert enc.attention_mask[0].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert enc["input_ids"] is enc.input_ids
    with pytest.raises(ValueError, match="padding"):
        tok(texts, return_tensors="np")
    # An empty batch pads to nothing; a negative max_length is refused, not a slice from the end.
    assert tok([], padding=True)["input_ids"] == []
    with pytest.raises(ValueError, match="max_length"):
        tok(texts, truncation=True, max_length=-1)


def test_bad_arguments(source_dir, tmp_path):
    path = tokenizer_dir(source_dir, "qwen3")
    with pytest.raises(ValueError, match="unsupported arguments revision"):
        kestrel.AutoTokenizer.from_pretrained(path, revision="main")
    with pytest.raises(ValueError, match="use_fast"):
        kestrel.AutoTokenizer.from_pretrained(path, use_fast=False)
    with pytest.raises(kestrel.KestrelError):
        kestrel.AutoTokenizer.from_pretrained(str(tmp_path / "missing"))
    tok = kestrel.AutoTokenizer.from_pretrained(path)
    with pytest.raises(ValueError):
        tok.decode(["a"])
    with pytest.raises(ValueError, match="list of message dicts"):
        tok.apply_chat_template("hello")
    # A tokenizer without a chat template: the engine's message, as a Python exception.
    import shutil

    shutil.copy(os.path.join(path, "tokenizer.json"), tmp_path / "tokenizer.json")
    bare = kestrel.AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer.json"))
    assert bare.encode("Hello") == tok.encode("Hello")
    with pytest.raises(kestrel.KestrelError, match="tokenizer_config.json"):
        bare.apply_chat_template([{"role": "user", "content": "Hello"}])
    # A FIFO where tokenizer_config.json belongs is refused, not waited on.
    os.mkfifo(tmp_path / "tokenizer_config.json")
    with pytest.raises(ValueError, match="not a regular file"):
        kestrel.AutoTokenizer.from_pretrained(str(tmp_path))
