"""kestrel.AutoModelForCausalLM: from_pretrained / load_low_bit / save_low_bit / generate /
__call__ with the argument names of transformers (and of ipex-llm's low-bit loading)."""

import contextlib
import json
import os
import re
import struct
import threading
import warnings

from . import _kestrel
from ._arrays import TokenInput, is_int
from ._files import read_json_object

LOW_BIT_FORMATS = ("sym_int4", "asym_int4", "sym_int8", "fp16", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda", "vulkan")
# The metadata key a converted model.safetensors carries (what `kestrel convert` writes).
_CONVERTED_KEY = "kestrel.format_version"
_MAX_HEADER_BYTES = 100 << 20


def _converted_format(directory):
    """The low-bit format a Kestrel-converted directory holds, or None when it is not one."""
    path = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER_BYTES, os.path.getsize(path) - 8):
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or _CONVERTED_KEY not in metadata:
        return None
    return metadata.get("kestrel.low_bit")


class KestrelConfig:
    """A model's configuration with the fields of transformers' config (vocab_size, hidden_size,
    num_hidden_layers, ...): config.json's own fields, with the values the engine loaded."""

    def __init__(self, fields):
        self.__dict__.update(fields)

    def to_dict(self):
        return dict(self.__dict__)

    def get(self, key, default=None):
        return self.__dict__.get(key, default)

    def __repr__(self):
        return f"KestrelConfig {json.dumps(self.__dict__, indent=2, sort_keys=True, default=str)}"


class GenerationConfig(KestrelConfig):
    """generate()'s defaults: transformers' defaults, overridden by the model's
    generation_config.json. Assign attributes to change them for later calls."""

    DEFAULTS = {
        "max_length": 20,
        "max_new_tokens": None,
        "min_new_tokens": 0,
        "do_sample": False,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
        "min_p": None,
        "repetition_penalty": 1.0,
        "num_beams": 1,
        "eos_token_id": None,
        "pad_token_id": None,
        "bos_token_id": None,
    }

    def __init__(self, fields=None):
        values = dict(self.DEFAULTS)
        values.update(fields or {})
        super().__init__(values)

    def __repr__(self):
        return "Generation" + super().__repr__()[len("Kestrel") :]


def _model_config(info, directory):
    fields = {}
    if directory is not None:
        fields.update(read_json_object(os.path.join(directory, "config.json")) or {})
    eos = info["eos_token_ids"]
    fields.update(
        {
            "architectures": [info["architecture"]],
            "model_type": "qwen2" if info["architecture"].startswith("Qwen2") else "llama",
            "vocab_size": info["vocab_size"],
            "hidden_size": info["hidden_size"],
            "intermediate_size": info["intermediate_size"],
            "num_hidden_layers": info["num_hidden_layers"],
            "num_attention_heads": info["num_attention_heads"],
            "num_key_value_heads": info["num_key_value_heads"],
            "head_dim": info["head_dim"],
            "max_position_embeddings": info["max_position_embeddings"],
            "rms_norm_eps": info["rms_norm_eps"],
            "rope_theta": info["rope_theta"],
            "tie_word_embeddings": info["tie_word_embeddings"],
            "bos_token_id": info["bos_token_id"] if info["bos_token_id"] >= 0 else None,
            "eos_token_id": eos[0] if len(eos) == 1 else (list(eos) or None),
            "low_bit": info["low_bit"],
        }
    )
    return KestrelConfig(fields)


def _check_kwargs(where, kwargs, accepted):
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"{where}: unsupported argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)} (Kestrel takes {', '.join(sorted(accepted))})"
        )


def _int_in(name, value, low, high):
    """`value` as an int in [low, high], or a ValueError naming `name` (numpy integers count; a
    value past the engine's types would otherwise meet pybind11's whole-signature TypeError)."""
    if not is_int(value) or not low <= int(value) <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _device_name(device):
    name = str(device)
    if name == "cuda:0":
        name = "cuda"
    # vulkan:N names the N-th device of `kestrel devices`; the engine checks that it exists.
    if name not in DEVICES and not re.fullmatch(r"vulkan:[0-9]{1,6}", name):
        raise ValueError(
            f"device={device!r} is not supported (Kestrel runs on {', '.join(DEVICES)}, vulkan:N)"
        )
    return name


_SIZE_FORMS = "a size (bytes as an int, or a string such as '20GiB', '10GB' or '500MB')"


def _memory_size(name, value):
    """`value` (an int or a size string) as (bytes, text) for EngineOptions.max_memory and
    max_memory_text: the bytes read through the engine's parser for `kestrel --max-memory`, so the
    units, limits and refusals (0, '', '12XB', negatives) are the CLI's, in the CLI's words; the
    text names the argument and value as the engine's messages quote the cap
    ("max_memory 1KB", "max_memory['cpu'] 1KB")."""
    if is_int(value):
        value = str(int(value))
    elif not isinstance(value, str):
        raise ValueError(f"{name} must be {_SIZE_FORMS}, got {value!r}")
    try:
        return _kestrel.parse_max_memory(value), f"{name} {value}"
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _max_memory_keys(device):
    """The keys of a transformers max_memory dict that name `device` (a resolved device name),
    the one to suggest first."""
    if device == "cuda":
        return (0, "0", "cuda", "cuda:0")  # Kestrel's CUDA backend runs on CUDA device 0
    if device.startswith("vulkan:"):
        return (device, "vulkan")
    return (device,)


def _max_memory(value, device):
    """from_pretrained's max_memory as (bytes, text) for the engine; (0, "") for None: no cap."""
    if value is None:
        return 0, ""
    if not isinstance(value, dict):
        if is_int(value) or isinstance(value, str):
            return _memory_size("max_memory", value)
        raise ValueError(
            f"max_memory must be {_SIZE_FORMS}, or a dict of sizes by device as in transformers "
            f"({{0: '20GiB', 'cpu': '30GiB'}}), got {value!r}"
        )
    loads_on = _kestrel.default_device() if device == "auto" else device
    names = _max_memory_keys(loads_on)

    def names_it(key):
        # True == 1 and False == 0 in Python: a bool key names no device.
        if isinstance(key, bool):
            return False
        return (int(key) if is_int(key) else str(key)) in names

    chosen = [key for key in value if names_it(key)]
    given = ", ".join(repr(key) for key in value) or "none"
    if not chosen:
        via = f" (device={device!r})" if device != loads_on else ""
        raise ValueError(
            f"max_memory has no entry for {loads_on}, the device the model loads on{via}; keys "
            f"given: {given}. Kestrel runs on one device and takes only its entry: add "
            f"{names[0]!r}: SIZE"
        )
    if len(chosen) > 1:
        raise ValueError(
            f"max_memory has more than one entry for {loads_on}: "
            f"{', '.join(repr(key) for key in chosen)}; keep one"
        )
    return _memory_size(f"max_memory[{chosen[0]!r}]", value[chosen[0]])


def _low_bit(load_in_low_bit, load_in_4bit, load_in_8bit):
    chosen = []
    if load_in_low_bit is not None:
        if load_in_low_bit not in LOW_BIT_FORMATS:
            raise ValueError(
                f"load_in_low_bit={load_in_low_bit!r} is not supported "
                f"(Kestrel has {', '.join(LOW_BIT_FORMATS)})"
            )
        chosen.append(load_in_low_bit)
    if load_in_4bit:
        chosen.append("sym_int4")
    if load_in_8bit:
        chosen.append("sym_int8")
    if len(set(chosen)) > 1:
        raise ValueError(
            "load_in_low_bit, load_in_4bit and load_in_8bit ask for different formats: "
            f"{', '.join(chosen)}"
        )
    return chosen[0] if chosen else None


_LOAD_ARGS = {
    "load_in_low_bit": None,
    "load_in_4bit": False,
    "load_in_8bit": False,
    "device": "auto",
    "max_context": None,
    "trust_remote_code": False,
    "threads": 0,
    "block": 32,
    "max_batch_size": 1,
    "prefill_chunk": 512,
    "progress": False,
    "run_ahead": None,
    "max_memory": None,
}


class AutoModelForCausalLM:
    """Loads a Qwen2 or Llama-3.x model into Kestrel's engine."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`pretrained_model_name_or_path`: a Hugging Face model directory, a directory written
        by save_low_bit (or `kestrel convert`), or "synthetic:NAME".

        load_in_low_bit: "sym_int4" | "asym_int4" | "sym_int8" | "fp16" | "bf16" | "fp32"
        (load_in_4bit=True is sym_int4, load_in_8bit=True sym_int8); unset: sym_int4, or the
        format a converted directory holds. device: "auto" (CUDA when there is one), "cpu",
        "cuda", "vulkan" or "vulkan:N" (`kestrel devices`). max_context: positions of the KV
        cache (default min(max_position_embeddings, 4096)).

        max_memory: the most memory the weights, KV cache and workspace may take on the device
        (the host's memory on the CPU), checked against the model's plan before any weight is
        built: a cap too small raises KestrelError at once. Unset: the free memory limits. As
        `kestrel --max-memory`: bytes as an int, or a string read by the CLI's parser ("20GiB",
        "10GB", "500MB", "1.5G"; decimal kB/MB/GB/TB, binary KiB/MiB/GiB/TiB and bare K/M/G/T);
        0, "" or an unknown unit is a ValueError. Or a dict by device as in transformers
        ({0: "20GiB", "cpu": "30GiB"}): Kestrel runs on one device and takes only the entry
        naming it (device="auto" is resolved first): CUDA: 0, "0", "cuda" or "cuda:0" (integer
        keys are CUDA devices, as torch's); CPU: "cpu"; Vulkan: "vulkan", or "vulkan:N" for
        device="vulkan:N". Other entries ("disk", other GPUs) are ignored; a dict without the
        device's entry, or with two for it, is a ValueError.

        Kestrel's own: threads (CPU, 0 = all), block (32 | 64 weights per scale),
        max_batch_size (sequences reserved at load; generate reserves more when a batch needs
        them), prefill_chunk, progress, run_ahead (decoding queues each step before the last
        one's tokens are back, which the device feeds itself; the tokens are the same; None,
        the default: where that overlaps anything (CUDA), True or False: always or never;
        KESTREL_RUN_AHEAD=0 or 1 overrides it). trust_remote_code is accepted: Kestrel
        runs no model code. Anything else is a ValueError.
        """
        if args:
            raise ValueError("from_pretrained takes the model path and keyword arguments only")
        _check_kwargs("from_pretrained", kwargs, _LOAD_ARGS)
        options = dict(_LOAD_ARGS)
        options.update(kwargs)
        return KestrelForCausalLM._load(str(pretrained_model_name_or_path), options)

    @classmethod
    def load_low_bit(cls, path, **kwargs):
        """Loads a directory written by save_low_bit (no conversion: the saved weights are used
        as they are). Takes from_pretrained's arguments except the format ones."""
        path = str(path)
        formats = ("load_in_low_bit", "load_in_4bit", "load_in_8bit", "block")
        accepted = {k: v for k, v in _LOAD_ARGS.items() if k not in formats}
        _check_kwargs("load_low_bit", kwargs, accepted)
        if _converted_format(path) is None:
            raise ValueError(
                f"{path}: not a Kestrel low-bit directory (save_low_bit writes one; load a "
                "Hugging Face directory with from_pretrained)"
            )
        options = dict(_LOAD_ARGS)
        options.update(kwargs)
        return KestrelForCausalLM._load(path, options)


class CausalLMOutput:
    """What model(input_ids) returns: `.logits` [batch, positions, vocab] (float32)."""

    def __init__(self, logits):
        self.logits = logits

    def __getitem__(self, key):
        if key in (0, "logits"):
            return self.logits
        raise KeyError(key)

    def keys(self):
        return ["logits"]


_GENERATE_ARGS = (
    "attention_mask",
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "num_beams",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "seed",
    "streamer",
    "generation_config",
)


class KestrelForCausalLM:
    """A model loaded into Kestrel's engine. One thread at a time may use it (generation
    releases the GIL, so other Python threads run meanwhile)."""

    def __init__(self, engine, path, device):
        self._engine = engine
        # The engine runs without the GIL and serves one call at a time: calls from several
        # Python threads wait for each other here instead of racing inside it.
        self._lock = threading.Lock()
        self._owner = None  # the thread inside the engine
        self.name_or_path = path
        directory = path if os.path.isdir(path) else None
        info = engine.info()
        self.info = info
        self.config = _model_config(info, directory)
        gen = {}
        if directory is not None:
            gen = read_json_object(os.path.join(directory, "generation_config.json")) or {}
        gen = {k: v for k, v in gen.items() if k in GenerationConfig.DEFAULTS}
        gen.setdefault("bos_token_id", self.config.bos_token_id)
        gen.setdefault("eos_token_id", self.config.eos_token_id)
        self.generation_config = GenerationConfig(gen)
        self.device = next(
            (d for d in ("cuda", "vulkan") if info["backend"].startswith(d)), "cpu"
        )
        self.last_generate_stats = None

    @contextlib.contextmanager
    def _engine_call(self):
        if self._owner == threading.get_ident():
            # A streamer calling the model from inside generate() would wait on itself.
            raise RuntimeError("the model is already running on this thread (inside generate)")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    @classmethod
    def _load(cls, path, options):
        device = _device_name(options["device"])
        low_bit = _low_bit(
            options["load_in_low_bit"], options["load_in_4bit"], options["load_in_8bit"]
        )
        max_context = options["max_context"]
        if max_context is not None:
            _positive_int("max_context", max_context)
        if options["block"] not in (32, 64):
            raise ValueError(f"block must be 32 or 64, got {options['block']!r}")
        _positive_int("max_batch_size", options["max_batch_size"])
        _positive_int("prefill_chunk", options["prefill_chunk"])
        threads = options["threads"]
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads must be 0 (all) or a positive integer, got {threads!r}")
        if not isinstance(options["trust_remote_code"], bool):
            raise ValueError(
                f"trust_remote_code must be True or False, got {options['trust_remote_code']!r}")
        if options["run_ahead"] is not None and not isinstance(options["run_ahead"], bool):
            raise ValueError(
                f"run_ahead must be True, False or None, got {options['run_ahead']!r}")
        max_memory, max_memory_text = _max_memory(options["max_memory"], device)
        engine = _kestrel.Engine(
            model=path,
            low_bit=low_bit,
            block=options["block"],
            device=device,
            threads=threads,
            max_context=max_context or 0,
            max_seqs=options["max_batch_size"],
            prefill_chunk=options["prefill_chunk"],
            progress=bool(options["progress"]),
            run_ahead=options["run_ahead"],
            max_memory=max_memory,
            max_memory_text=max_memory_text,
        )
        # What the load went past or changed (a prefill chunk shrunk to fit max_memory, a
        # config field it ignored), as the CLI prints them: at the caller's from_pretrained.
        for message in engine.load_warnings:
            warnings.warn(message, stacklevel=3)
        return cls(engine, path, device)

    @property
    def max_context(self):
        return self._engine.max_context

    @property
    def runs_ahead(self):
        """Whether decoding runs ahead of the host (from_pretrained's run_ahead, or the device's
        default)."""
        return self._engine.runs_ahead

    def to(self, device):
        """Returns the model when it already runs on `device`; moving needs a reload."""
        name = _device_name(device)
        if name in ("auto", self.device):
            return self
        raise ValueError(
            f"the model runs on {self.device}; load it with device={name!r} to run on {name}"
        )

    def eval(self):
        return self

    def save_low_bit(self, save_directory, overwrite=False):
        """Writes the loaded low-bit weights with config, generation config and tokenizer files
        (Kestrel's converted format; load it with AutoModelForCausalLM.load_low_bit).
        A directory with files in it is replaced only with overwrite=True."""
        with self._engine_call():
            self._engine.save_converted(str(save_directory), bool(overwrite))

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        """Logits of every position: an object whose `.logits` is [batch, positions, vocab]
        float32 (NumPy, or torch for a torch input). A single unpadded prompt's array is the
        engine's own buffer (no copy)."""
        if kwargs:
            _check_kwargs("model()", kwargs, ())
        tokens = TokenInput(input_ids, attention_mask)
        with self._engine_call():
            rows = [self._engine.prompt_logits(p) for p in tokens.prompts]
        return CausalLMOutput(tokens.logits(rows))

    forward = __call__

    def generate(self, input_ids=None, **kwargs):
        """Continues each prompt; returns prompt + new tokens in the type given: a list for a
        list, a list of lists for a list of lists (prompts of any lengths), a NumPy array or a
        torch tensor [batch, positions] for one (left padding with an attention_mask, as
        transformers does; rows that stop early are padded with pad_token_id).

        Arguments as transformers': max_new_tokens (or max_length), min_new_tokens, do_sample,
        temperature, top_k, top_p, min_p, repetition_penalty, num_beams (1 only), eos_token_id,
        pad_token_id, streamer (put()/end(), batch of one), generation_config; seed for
        do_sample (random when unset; row i draws with seed + i). Defaults come from the
        model's generation_config.json. Ctrl-C raises KeyboardInterrupt and leaves the model
        usable."""
        if input_ids is None:
            if "inputs" in kwargs:
                input_ids = kwargs.pop("inputs")
            else:
                raise ValueError("generate needs input_ids")
        _check_kwargs("generate", kwargs, _GENERATE_ARGS)
        config = dict(self.generation_config.to_dict())
        override = kwargs.pop("generation_config", None)
        if override is not None:
            config.update(
                {k: v for k, v in vars(override).items() if k in GenerationConfig.DEFAULTS}
            )
        streamer = kwargs.pop("streamer", None)
        seed = kwargs.pop("seed", None)
        attention_mask = kwargs.pop("attention_mask", None)
        config.update(kwargs)

        tokens = TokenInput(input_ids, attention_mask)
        prompts = tokens.prompts
        if config["num_beams"] not in (1, None):
            raise ValueError(
                f"num_beams={config['num_beams']} is not supported by generate (Kestrel's "
                "beam search runs in `kestrel bench`); use num_beams=1"
            )
        longest = max(len(p) for p in prompts)
        width = tokens.width if tokens.kind in ("numpy", "torch") else longest
        max_new = config["max_new_tokens"]
        if max_new is None:
            if config["max_length"] is None:
                raise ValueError("pass max_new_tokens (or max_length)")
            max_new = config["max_length"] - width
            if max_new <= 0:
                raise ValueError(
                    f"the prompt has {width} tokens but max_length is {config['max_length']}: "
                    "pass max_new_tokens"
                )
        max_new = _int_in("max_new_tokens", max_new, 0, 2**63 - 1)
        min_new = _int_in("min_new_tokens", config["min_new_tokens"] or 0, 0, 2**63 - 1)
        eos = config["eos_token_id"]
        if eos is None:
            eos_ids = []
        elif is_int(eos):
            eos_ids = [_int_in("eos_token_id", eos, 0, 2**31 - 1)]
        elif isinstance(eos, (list, tuple)):
            eos_ids = [_int_in("eos_token_id", e, 0, 2**31 - 1) for e in eos]
        else:
            raise ValueError(f"eos_token_id must be an integer or a list of them, got {eos!r}")
        pad = config["pad_token_id"]
        if pad is None:
            pad = eos_ids[0] if eos_ids else 0
        pad = _int_in("pad_token_id", pad, -(2**63), 2**63 - 1)
        if config["do_sample"]:
            temperature = float(config["temperature"])
            if not temperature > 0:
                raise ValueError(
                    f"temperature must be a positive number when sampling, got {temperature!r}; "
                    "for greedy decoding pass do_sample=False"
                )
            # As transformers, a top_k past the vocabulary keeps every token.
            top_k = min(_int_in("top_k", config["top_k"] or 0, 0, 2**63 - 1), 2**31 - 1)
            top_p = float(config["top_p"] if config["top_p"] is not None else 1.0)
            min_p = float(config["min_p"] or 0.0)
            if seed is None:
                seed = int.from_bytes(os.urandom(8), "little")
        else:
            temperature, top_k, top_p, min_p = 0.0, 0, 1.0, 0.0
            seed = 0 if seed is None else seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        penalty = config["repetition_penalty"]
        repetition_penalty = 1.0 if penalty is None else float(penalty)

        on_step = None
        if streamer is not None:
            if len(prompts) != 1:
                raise ValueError("a streamer takes a batch of one prompt")
            import numpy as np

            streamer.put(np.asarray(prompts[0], dtype=np.int64))

            def on_step(step_tokens):
                streamer.put(np.asarray(step_tokens, dtype=np.int64))

        try:
            with self._engine_call():
                if len(prompts) > self._engine.max_seqs:
                    self._engine.reserve_sequences(len(prompts))
                generated, reasons, stats = self._engine.generate(
                    prompts=prompts,
                    max_new_tokens=max_new,
                    min_new_tokens=min_new,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    min_p=min_p,
                    repetition_penalty=repetition_penalty,
                    seed=seed,
                    eos_token_ids=eos_ids,
                    stop_at_eos=bool(eos_ids),
                    on_step=on_step,
                )
        finally:
            if streamer is not None:
                streamer.end()
        stats["stop_reasons"] = reasons
        stats["generated_tokens"] = [len(g) for g in generated]
        self.last_generate_stats = stats
        return tokens.sequences(generated, pad)

    def __repr__(self):
        c = self.config
        return (
            f"KestrelForCausalLM({c.architectures[0]}, {c.low_bit}, {self.info['backend']}, "
            f"{self.name_or_path})"
        )
