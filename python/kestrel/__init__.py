"""Kestrel from Python, with the API of the transformers stack.

    from kestrel import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit="sym_int4")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("Once upon a time", return_tensors="np").input_ids
    print(tokenizer.decode(model.generate(ids, max_new_tokens=32)[0]))

The model runs in Kestrel's C++ engine (CPU, CUDA or Vulkan); generation releases the GIL, and
Ctrl-C stops it with KeyboardInterrupt.
"""

from ._kestrel import KestrelError
from ._model import AutoModelForCausalLM, CausalLMOutput, GenerationConfig, KestrelConfig
from ._model import KestrelForCausalLM
from ._streamer import TextIteratorStreamer, TextStreamer
from ._tokenizer import AutoTokenizer, BatchEncoding, KestrelTokenizer

__all__ = [
    "AutoModelForCausalLM",
    "AutoTokenizer",
    "BatchEncoding",
    "CausalLMOutput",
    "GenerationConfig",
    "KestrelConfig",
    "KestrelError",
    "KestrelForCausalLM",
    "KestrelTokenizer",
    "TextIteratorStreamer",
    "TextStreamer",
]
