"""kestrel.AutoModelForCausalLM on the golden Hugging Face models (tests/golden/models, fixtures
recorded with transformers) and on synthetic models, against the fixtures and the `kestrel` CLI."""

import json
import os
import subprocess

import numpy as np
import pytest

import kestrel

GOLDEN = ["qwen2-tied-f32", "llama-tied-bias-f16", "llama3-scaled-bf16-sharded"]


def load_reference(golden_dir, name):
    directory = os.path.join(golden_dir, "models", name)
    with open(os.path.join(directory, "reference.json"), encoding="utf-8") as f:
        ref = json.load(f)
    ref["dir"] = directory
    shape = ref["logits_shape"]
    ref["logits"] = np.fromfile(os.path.join(directory, "logits.f32"), dtype="<f4").reshape(shape)
    return ref


def worst_rel_error(ours, theirs):
    """The worst position's ||ours - hf|| / ||hf|| (the C++ golden tests' measure)."""
    diff = np.linalg.norm(ours.astype(np.float64) - theirs, axis=-1)
    return float(np.max(diff / np.linalg.norm(theirs.astype(np.float64), axis=-1)))


_models = {}


def load(path, **kwargs):
    """Models are shared between tests (loading converts the weights)."""
    key = (path, tuple(sorted(kwargs.items())))
    if key not in _models:
        kwargs.setdefault("device", "cpu")
        _models[key] = kestrel.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return _models[key]


@pytest.mark.parametrize("name", GOLDEN)
def test_fp32_greedy_and_logits_match_hf(name, golden_dir):
    ref = load_reference(golden_dir, name)
    model = load(ref["dir"], load_in_low_bit="fp32")
    out = model(ref["prompt"])
    assert out.logits.shape == (1, len(ref["prompt"]), ref["vocab_size"])
    assert out.logits.dtype == np.float32
    assert worst_rel_error(out.logits[0], ref["logits"]) <= 1e-3
    # The fixture's greedy continuation has a fixed length: no stop at eos.
    seq = model.generate(ref["prompt"], max_new_tokens=len(ref["greedy"]), eos_token_id=None)
    assert seq == ref["prompt"] + ref["greedy"]


def test_vulkan_device_greedy_and_logits_match_hf(golden_dir):
    ref = load_reference(golden_dir, "qwen2-tied-f32")
    try:
        model = kestrel.AutoModelForCausalLM.from_pretrained(
            ref["dir"], load_in_low_bit="fp32", device="vulkan", progress=False
        )
    except kestrel.KestrelError as e:
        # What the library says when the build or the machine has no Vulkan device.
        if str(e).startswith("device vulkan"):
            pytest.skip(f"no usable Vulkan device: {e}")
        raise
    assert model.device == "vulkan"
    assert worst_rel_error(model(ref["prompt"]).logits[0], ref["logits"]) <= 1e-3
    seq = model.generate(ref["prompt"], max_new_tokens=len(ref["greedy"]), eos_token_id=None)
    assert seq == ref["prompt"] + ref["greedy"]
    with pytest.raises(ValueError, match="vulkan:N"):
        kestrel.AutoModelForCausalLM.from_pretrained(ref["dir"], device="vulkan:x")


@pytest.mark.parametrize("low_bit", ["sym_int4", "asym_int4", "sym_int8"])
def test_low_bit_logits_within_the_cpp_bounds(low_bit, golden_dir):
    ref = load_reference(golden_dir, "qwen2-tied-f32")
    path = os.path.join(ref["dir"], f"logits_{low_bit}_b32.f32")
    fake_quant = np.fromfile(path, dtype="<f4").reshape(ref["logits_shape"])
    model = load(ref["dir"], load_in_low_bit=low_bit)
    assert model.config.low_bit == low_bit
    logits = model(np.asarray([ref["prompt"]], dtype=np.int64)).logits[0]
    assert worst_rel_error(logits, fake_quant) <= 0.12
    agree = np.mean(np.argmax(logits, -1) == np.argmax(fake_quant, -1))
    assert agree >= 0.8


def test_load_in_4bit_is_sym_int4(golden_dir):
    ref = load_reference(golden_dir, "qwen2-tied-f32")
    a = load(ref["dir"], load_in_4bit=True)
    b = load(ref["dir"], load_in_low_bit="sym_int4")
    assert a.config.low_bit == "sym_int4"
    assert np.array_equal(a(ref["prompt"]).logits, b(ref["prompt"]).logits)


def test_logits_are_the_engines_buffer(golden_dir):
    ref = load_reference(golden_dir, "qwen2-tied-f32")
    model = load(ref["dir"], load_in_low_bit="fp32")
    logits = model(ref["prompt"]).logits
    # A view of the array the engine filled, which it hands over without a copy.
    assert not logits.flags["OWNDATA"] and logits.base is not None
    assert logits.flags["C_CONTIGUOUS"]


def test_greedy_matches_the_cli(kestrel_binary):
    prompt = [1, 2, 3, 500, 7000, 42]
    ids = ",".join(map(str, prompt))
    run = subprocess.run(
        [kestrel_binary, "run", "-m", "synthetic:tiny-llama", "--ids", ids, "-n", "24",
         "--temp", "0", "--print-ids", "--ignore-eos", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    cli = [int(t) for t in run.stdout.split()]
    assert len(cli) == 24
    model = load("synthetic:tiny-llama")
    assert model.generate(prompt, max_new_tokens=24, eos_token_id=None)[len(prompt):] == cli


def test_run_ahead_gives_the_same_tokens():
    prompt = [1, 2, 3, 500, 7000, 42]
    plain = load("synthetic:tiny-llama", run_ahead=False)
    ahead = load("synthetic:tiny-llama", run_ahead=True)
    assert ahead.runs_ahead and not plain.runs_ahead
    # By default only where it overlaps anything: not on the CPU.
    assert not load("synthetic:tiny-llama").runs_ahead
    for batch in ([prompt], [prompt, prompt[2:], prompt[:3] + [9, 9, 9, 9]]):
        want = plain.generate(batch, max_new_tokens=17, eos_token_id=None)
        assert ahead.generate(batch, max_new_tokens=17, eos_token_id=None) == want
    with pytest.raises(ValueError, match="run_ahead must be True, False or None"):
        kestrel.AutoModelForCausalLM.from_pretrained("synthetic:tiny-llama", run_ahead="yes")


def test_batches_of_different_lengths_equal_each_prompt_alone(golden_dir):
    ref = load_reference(golden_dir, "qwen2-tied-f32")
    model = load(ref["dir"], load_in_low_bit="fp32")
    p = ref["prompt"]
    prompts = [p[:7], p, p[3:20]]
    alone = [model.generate(q, max_new_tokens=12, eos_token_id=None) for q in prompts]
    # A list of lists: each row without padding.
    assert model.generate(prompts, max_new_tokens=12, eos_token_id=None) == alone
    # A left-padded array with its attention mask, as a tokenizer with padding_side="left" makes.
    width = max(len(q) for q in prompts)
    ids = np.full((3, width), 0, dtype=np.int32)
    mask = np.zeros((3, width), dtype=np.int64)
    for r, q in enumerate(prompts):
        ids[r, width - len(q):] = q
        mask[r, width - len(q):] = 1
    ids[mask == 0] = 3  # the padding's ids come back as given
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None,
                         pad_token_id=0)
    assert isinstance(out, np.ndarray) and out.dtype == np.int32
    assert out.shape == (3, width + 12)
    for r, q in enumerate(prompts):
        assert out[r, width - len(q):].tolist() == alone[r]
        assert (out[r, : width - len(q)] == 3).all()
    # Logits of a padded batch equal each prompt's own (padding positions are zero).
    logits = model(ids, attention_mask=mask).logits
    for r, q in enumerate(prompts):
        own = model(q).logits[0]
        assert np.allclose(logits[r, width - len(q):], own, rtol=0, atol=1e-5)
        assert not logits[r, : width - len(q)].any()


def test_eos_stops_each_row_and_pads_it(golden_dir):
    ref = load_reference(golden_dir, "qwen2-tied-f32")
    model = load(ref["dir"], load_in_low_bit="fp32")
    p = ref["prompt"]
    greedy = ref["greedy"]
    eos = greedy[8]  # first produced at step 8 (0-based) after the full prompt
    first = greedy.index(eos)
    out = model.generate(p, max_new_tokens=20, eos_token_id=eos)
    assert out == p + greedy[: first + 1]
    assert model.last_generate_stats["stop_reasons"] == ["eos"]
    # In an array batch the stopped row is padded on the right with pad_token_id.
    other = p[:10]
    alone_other = model.generate(other, max_new_tokens=20, eos_token_id=eos)
    ids = np.asarray([p, [0] * (len(p) - len(other)) + other])
    mask = (np.arange(len(p))[None, :] >= np.asarray([[0], [len(p) - len(other)]])).astype(int)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos,
                         pad_token_id=-1)
    longest = max(first + 1, len(alone_other) - len(other))
    assert out.shape == (2, len(p) + longest)
    row0 = out[0].tolist()
    assert row0[: len(p) + first + 1] == p + greedy[: first + 1]
    assert set(row0[len(p) + first + 1:]) <= {-1}
    # min_new_tokens suppresses eos until that many tokens exist.
    out = model.generate(p, max_new_tokens=first + 3, min_new_tokens=first + 2, eos_token_id=eos)
    assert eos not in out[len(p): len(p) + first + 2]


def test_input_types_come_back_as_given(golden_dir):
    ref = load_reference(golden_dir, "qwen2-tied-f32")
    model = load(ref["dir"], load_in_low_bit="fp32")
    p = ref["prompt"][:9]
    as_list = model.generate(p, max_new_tokens=5, eos_token_id=None)
    assert isinstance(as_list, list) and as_list[:9] == p
    one_dim = model.generate(np.asarray(p, dtype=np.int64), max_new_tokens=5, eos_token_id=None)
    assert isinstance(one_dim, np.ndarray) and one_dim.ndim == 1 and one_dim.tolist() == as_list
    two_dim = model.generate(np.asarray([p]), max_new_tokens=5, eos_token_id=None)
    assert two_dim.shape == (1, 14) and two_dim[0].tolist() == as_list
    # A tokenizer's output passed on with ** (lists with an all-ones mask).
    assert model.generate(p, attention_mask=[1] * 9, max_new_tokens=5, eos_token_id=None) == as_list
    with pytest.raises(ValueError, match="all ones"):
        model.generate(p, attention_mask=[0] + [1] * 8, max_new_tokens=5)
    # max_length counts the prompt, as in transformers.
    assert len(model.generate(p, max_length=12, eos_token_id=None)) == 12


def test_sampling_is_seeded(golden_dir):
    ref = load_reference(golden_dir, "qwen2-tied-f32")
    model = load(ref["dir"], load_in_low_bit="fp32")
    p = ref["prompt"]
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=0, top_p=1.0,
              eos_token_id=None)
    a = model.generate(p, seed=7, **kw)
    assert a == model.generate(p, seed=7, **kw)
    draws = {tuple(model.generate(p, seed=s, **kw)) for s in range(6)}
    assert len(draws) > 1  # a sampler that ignored the seed (or sampled greedily) gives one
    # top_k=1 is greedy whatever the temperature.
    greedy = model.generate(p, max_new_tokens=16, eos_token_id=None)
    assert model.generate(p, seed=3, **{**kw, "top_k": 1}) == greedy
    # In a batch, row i draws with seed + i: row 0 equals the prompt alone.
    rows = model.generate([p, p[:5]], seed=7, **kw)
    assert rows[0] == a


def test_config_mirrors_hf(golden_dir):
    ref = load_reference(golden_dir, "llama3-scaled-bf16-sharded")
    model = load(ref["dir"], load_in_low_bit="fp32")
    with open(os.path.join(ref["dir"], "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    c = model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                "tie_word_embeddings", "architectures", "model_type"):
        assert getattr(c, key) == hf[key], key
    assert c.eos_token_id == [5, 6]  # generation_config.json's, as the engine stops on
    assert model.generation_config.eos_token_id == [5, 6]
    synthetic = load("synthetic:tiny-qwen2")
    assert synthetic.config.vocab_size == 151936
    assert synthetic.config.architectures == ["Qwen2ForCausalLM"]
    assert synthetic.config.to_dict()["hidden_size"] == synthetic.config.hidden_size


def test_save_low_bit_round_trip_is_bit_identical(golden_dir, tmp_path):
    ref = load_reference(golden_dir, "llama-tied-bias-f16")
    model = load(ref["dir"], load_in_low_bit="asym_int4")
    out = tmp_path / "saved"
    model.save_low_bit(out)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    again = kestrel.AutoModelForCausalLM.load_low_bit(out, device="cpu")
    assert again.config.low_bit == "asym_int4"
    assert np.array_equal(again(ref["prompt"]).logits, model(ref["prompt"]).logits)
    kw = dict(max_new_tokens=16, eos_token_id=None)
    assert again.generate(ref["prompt"], **kw) == model.generate(ref["prompt"], **kw)
    # from_pretrained reads the saved directory too; a different format needs the original.
    with pytest.raises(kestrel.KestrelError):
        kestrel.AutoModelForCausalLM.from_pretrained(out, load_in_low_bit="sym_int8", device="cpu")
    with pytest.raises(kestrel.KestrelError, match="not empty"):
        model.save_low_bit(out)
    model.save_low_bit(out, overwrite=True)
    with pytest.raises(ValueError, match="not a Kestrel low-bit directory"):
        kestrel.AutoModelForCausalLM.load_low_bit(ref["dir"])


def test_bad_arguments(golden_dir):
    path = os.path.join(golden_dir, "models", "qwen2-tied-f32")
    load_ = kestrel.AutoModelForCausalLM.from_pretrained
    with pytest.raises(ValueError, match="unsupported argument.*torch_dtype"):
        load_(path, torch_dtype="auto")
    with pytest.raises(ValueError, match="nf4"):
        load_(path, load_in_low_bit="nf4")
    with pytest.raises(ValueError, match="different formats"):
        load_(path, load_in_low_bit="sym_int8", load_in_4bit=True)
    with pytest.raises(ValueError, match="xpu"):
        load_(path, device="xpu")
    with pytest.raises(ValueError, match="max_context"):
        load_(path, max_context=0)
    with pytest.raises(kestrel.KestrelError, match="no such directory"):
        load_(path + "-missing", device="cpu")
    with pytest.raises(ValueError, match="block"):
        kestrel.AutoModelForCausalLM.load_low_bit(path, block=64)

    model = load(path, load_in_low_bit="fp32", max_context=64)
    p = [1, 2, 3]
    with pytest.raises(ValueError, match="unsupported argument.*output_scores"):
        model.generate(p, output_scores=True)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(p, num_beams=4)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(np.asarray([[1, 2, 0]]), attention_mask=np.asarray([[1, 1, 0]]))
    with pytest.raises(ValueError, match="list of ints"):
        model.generate([1, "2"])
    with pytest.raises(ValueError, match="token id -1"):
        model.generate([1, -1, 2])
    with pytest.raises(ValueError, match="token id 4294967296"):
        model(np.asarray([[1, 2**32]]))
    with pytest.raises(ValueError, match="integers"):
        model.generate(np.asarray([1.0, 2.0]))
    with pytest.raises(ValueError, match="seed"):
        model.generate(p, do_sample=True, seed=-1)
    # The engine's own checks arrive with its message.
    with pytest.raises(kestrel.KestrelError, match="context of 64"):
        model.generate(p, max_new_tokens=100)
    with pytest.raises(kestrel.KestrelError, match="context of 64"):
        model.generate(p, max_new_tokens=2**63 - 1)
    with pytest.raises(kestrel.KestrelError, match="vocabulary"):
        model.generate([1, 2, 5000], max_new_tokens=2)
    with pytest.raises(kestrel.KestrelError, match="vocabulary"):
        model([1, 2, 5000])
    with pytest.raises(kestrel.KestrelError, match="top_p"):
        model.generate(p, do_sample=True, top_p=0.0, max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(p, do_sample=True, temperature=0.0, max_new_tokens=2)
    with pytest.raises(kestrel.KestrelError, match="repetition_penalty"):
        model.generate(p, repetition_penalty=0.0, max_new_tokens=2)  # 0 is not "unset"
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(p, max_length=None)
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(p, eos_token_id=["2"], max_new_tokens=2)
    # Values past the engine's integer types name their argument.
    for bad in ({"eos_token_id": 2**40}, {"min_new_tokens": 1.5}, {"max_new_tokens": 2**63}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            model.generate(p, **bad)
    huge_k = model.generate(p, do_sample=True, top_k=2**40, seed=3, max_new_tokens=3)
    assert huge_k == model.generate(p, do_sample=True, top_k=0, seed=3, max_new_tokens=3)
    # Room for a batch whose KV cache cannot fit (2^26 sequences: terabytes) is refused before
    # the old reservation goes; generate asks for it this way (a review's segfault: the next
    # call found no KV cache).
    with pytest.raises(kestrel.KestrelError, match="lower the context length"):
        model._engine.reserve_sequences(2**26)
    # After errors the model still works.
    assert len(model.generate(p, max_new_tokens=4, eos_token_id=None)) == 7
    assert model(p).logits.shape[1] == 3


def test_max_memory_forms_generate_as_without_a_cap(monkeypatch):
    prompt = [1, 2, 3, 500, 7000, 42]
    want = load("synthetic:tiny-qwen2").generate(prompt, max_new_tokens=8, eos_token_id=None)
    load_ = kestrel.AutoModelForCausalLM.from_pretrained
    # synthetic:tiny-qwen2 plans for 332 MB at its 4096 positions (311 MB of them the logits of a
    # 512-token prefill chunk); the entries for other devices are ignored.
    for cap in (2**30, np.int64(2**30), "1GiB", "1.5G", "2 gib", "1000MB",
                {"cpu": "1GiB", 0: "1KB", "disk": "1TB"}, {"cpu": 2**30}):
        model = load_("synthetic:tiny-qwen2", device="cpu", max_memory=cap)
        assert model.generate(prompt, max_new_tokens=8, eos_token_id=None) == want, cap
    # device="auto" takes the entry of the device it loads on (KESTREL_DEVICE picks it here).
    monkeypatch.setenv("KESTREL_DEVICE", "cpu")
    model = load_("synthetic:tiny-qwen2", max_memory={"cuda:0": "1KB", "cpu": "1GiB"})
    assert model.device == "cpu"
    assert model.generate(prompt, max_new_tokens=8, eos_token_id=None) == want
    # A cap that the 512-token chunk's logits do not fit: the engine halves the chunk until the
    # plan fits, the package says so as a warning at this call, and the tokens are the same.
    with pytest.warns(UserWarning, match=r"prefill chunk 512 -> \d+ tokens per call to fit "
                      r"max_memory 100MB") as caught:
        model = load_("synthetic:tiny-qwen2", device="cpu", max_memory="100MB")
    assert any(w.filename == __file__ for w in caught), [w.filename for w in caught]
    assert model.generate(prompt, max_new_tokens=8, eos_token_id=None) == want


def test_max_memory_too_small_fails_at_load(monkeypatch, golden_dir):
    load_ = kestrel.AutoModelForCausalLM.from_pretrained
    # The engine names the cap as the package gives it, never as the CLI's flag.
    for cap, named in (("1KB", "max_memory 1KB"), (1024, "max_memory 1024"),
                       ({"cpu": "1KB"}, r"max_memory\['cpu'\] 1KB")):
        with pytest.raises(kestrel.KestrelError, match=f"needs .* but {named} allows .*; raise "
                           "the memory cap"):
            load_("synthetic:tiny-qwen2", device="cpu", max_memory=cap)
    # The context's reservation counts too.
    with pytest.raises(kestrel.KestrelError, match="max_memory 20MB allows.*context length"):
        load_("synthetic:tiny-qwen2", device="cpu", max_memory="20MB")
    # Refused from the config, before a weight is built: the 70B in fp32 (280 GB) would take
    # minutes and more memory than the machine has.
    with pytest.raises(kestrel.KestrelError, match="max_memory 1GB"):
        load_("synthetic:llama3.1-70b", device="cpu", load_in_low_bit="fp32", max_memory="1GB")
    path = os.path.join(golden_dir, "models", "qwen2-tied-f32")
    monkeypatch.setenv("KESTREL_DEVICE", "cpu")
    with pytest.raises(kestrel.KestrelError, match=r"max_memory\['cpu'\] 1KB"):
        load_(path, max_memory={0: "1GiB", "cpu": "1KB"})


def test_max_memory_bad_values(tmp_path):
    load_ = kestrel.AutoModelForCausalLM.from_pretrained
    path = "synthetic:tiny-qwen2"
    # The CLI's --max-memory parser and words (`kestrel run --max-memory 12XB`).
    words = "is not a memory size \\(e.g. 24GB, 512MiB, 1.5G or a byte count\\)"
    for bad, message in (
        ("12XB", f"^max_memory: '12XB' {words}$"),
        ("", f"^max_memory: '' {words}$"),
        ("0", "^max_memory: must be more than 0 bytes$"),
        (0, "^max_memory: must be more than 0 bytes$"),
        (-5, f"^max_memory: '-5' {words}$"),
        ("-1GB", f"^max_memory: '-1GB' {words}$"),
        (2**70, f"^max_memory: '{2**70}' {words}$"),
        ({"cpu": "12XB"}, f"^max_memory\\['cpu'\\]: '12XB' {words}$"),
        ({"cpu": 0, 0: "1GiB"}, "^max_memory\\['cpu'\\]: must be more than 0 bytes$"),
        (True, "max_memory must be a size .*got True"),
        (1.5, "max_memory must be a size .*got 1.5"),
        (b"1GB", "max_memory must be a size .*got b'1GB'"),
        ({"cpu": 1.5}, "max_memory\\['cpu'\\] must be a size .*got 1.5"),
        ({"cpu": None}, "max_memory\\['cpu'\\] must be a size .*got None"),
        # No entry for the device the model loads on: say which and what to add.
        ({0: "1GiB", "cuda": "1GiB"}, "no entry for cpu.*keys given: 0, 'cuda'.*add 'cpu': SIZE"),
        ({}, "no entry for cpu.*keys given: none.*add 'cpu': SIZE"),
        ({False: "1GiB", True: "1GiB"}, "no entry for cpu"),
        ({"CPU": "1GiB"}, "no entry for cpu.*keys given: 'CPU'"),
    ):
        with pytest.raises(ValueError, match=message):
            load_(path, device="cpu", max_memory=bad)
    with pytest.raises(ValueError, match="no entry for cuda.*add 0: SIZE"):
        load_(path, device="cuda", max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="no entry for vulkan:1.*add 'vulkan:1': SIZE"):
        load_(path, device="vulkan:1", max_memory={1: "1GiB", "vulkan:0": "1GiB"})
    # Two entries for the one device are ambiguous.
    with pytest.raises(ValueError, match="more than one entry for cuda: 0, 'cuda:0'"):
        load_(path, device="cuda", max_memory={0: "1GiB", "cuda:0": "2GiB"})
    # load_low_bit takes it too, with the same checks.
    load(path).save_low_bit(tmp_path / "saved")
    load_low_bit = kestrel.AutoModelForCausalLM.load_low_bit
    with pytest.raises(ValueError, match="^max_memory: '12XB'"):
        load_low_bit(tmp_path / "saved", max_memory="12XB")
    with pytest.raises(kestrel.KestrelError, match="max_memory 1KB"):
        load_low_bit(tmp_path / "saved", device="cpu", max_memory="1KB")
    model = load_low_bit(tmp_path / "saved", device="cpu", max_memory={"cpu": "1GiB"})
    prompt = [1, 2, 3, 500]
    want = load(path).generate(prompt, max_new_tokens=4, eos_token_id=None)
    assert model.generate(prompt, max_new_tokens=4, eos_token_id=None) == want


def test_small_integer_arrays_are_not_wrapped(golden_dir):
    """int8 and int16 arrays come back as int64 whatever was generated (their continuations
    used to wrap around in the input's type); int32 and wider keep their type."""
    ref = load_reference(golden_dir, "qwen2-tied-f32")
    model = load(ref["dir"], load_in_low_bit="fp32")
    p = ref["prompt"][:6]
    wide = model.generate(np.asarray([p]), max_new_tokens=5, eos_token_id=None)
    assert wide.max() > 127  # the fixture's continuation has ids past int8
    small = [t for t in p if t < 128] or [1, 2]
    expected = model.generate(np.asarray([small]), max_new_tokens=5, eos_token_id=None)
    narrow = model.generate(np.asarray([small], dtype=np.int8), max_new_tokens=5, eos_token_id=None)
    assert narrow.tolist() == expected.tolist()
    assert narrow.dtype == np.int64
    as16 = model.generate(np.asarray([small], dtype=np.int16), max_new_tokens=5, eos_token_id=None)
    assert as16.dtype == np.int64 and as16.tolist() == expected.tolist()
    # numpy integer scalars are ids, as in transformers.
    eos = np.int64(wide[0, 6])
    stopped = model.generate(np.asarray([p]), max_new_tokens=5, eos_token_id=eos)
    assert stopped.tolist() == [wide[0, :7].tolist()]
