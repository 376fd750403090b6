#!/usr/bin/env python3
"""Writes the seed corpora for the fuzz targets (standard library only).

corpus_safetensors/: small valid safetensors files in the layouts real writers produce.
corpus_config/: the published config.json of Qwen2.5-1.5B and Llama-3.1-8B-Instruct.
corpus_gguf/: small GGUF files with the metadata kinds and tensor types real files carry.
"""
import json
import os
import random
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
import gguf_writer as gw  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
         "U8": 1, "BOOL": 1}


def safetensors_bytes(tensors, metadata=None, align=1, header_pad=8):
    """tensors: list of (name, dtype, shape). Data is seeded random bytes."""
    rng = random.Random(len(tensors))
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    data = b""
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        data += b"\0" * (-len(data) % align)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += bytes(rng.randrange(256) for _ in range(n))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % header_pad)
    return struct.pack("<Q", len(text)) + text + data


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def main():
    st = os.path.join(HERE, "corpus_safetensors")
    write(os.path.join(st, "hf_contiguous.safetensors"),
          safetensors_bytes([("model.embed_tokens.weight", "BF16", [8, 4]),
                             ("model.norm.weight", "F32", [4]),
                             ("lm_head.weight", "F16", [8, 4])],
                            metadata={"format": "pt"}))
    write(os.path.join(st, "aligned_padded.safetensors"),
          safetensors_bytes([("q.data", "U8", [3, 5]), ("q.scales", "F16", [3, 1]),
                             ("bias", "I8", [7]), ("empty", "I32", [0, 3]), ("scalar", "I64", []),
                             ("mask", "BOOL", [2]), ("wide", "F64", [2]), ("short", "I16", [3])],
                            metadata={"format": "kestrel", "low_bit": "sym_int4"},
                            align=64, header_pad=64))
    write(os.path.join(st, "empty.safetensors"), safetensors_bytes([]))

    qwen2 = {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536,
        "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 131072,
        "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 12,
        "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936}
    llama = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 128256}
    cfg = os.path.join(HERE, "corpus_config")
    for name, config in (("qwen2_1.5b.json", qwen2), ("llama3.1_8b.json", llama)):
        write(os.path.join(cfg, name), (json.dumps(config, indent=2) + "\n").encode())
    write(os.path.join(cfg, "generation_config.json"),
          b'{"bos_token_id": 128000, "do_sample": true, "eos_token_id": [128001, 128008, 128009],'
          b' "temperature": 0.6, "top_p": 0.9}\n')

    gg = os.path.join(HERE, "corpus_gguf")
    rng = random.Random(7)
    w = gw.GgufWriter()
    w.add("general.architecture", gw.STRING, "llama")
    w.add("general.alignment", gw.U32, 32)
    w.add("llama.block_count", gw.U32, 1)
    w.add("llama.rope.freq_base", gw.F32, 500000.0)
    w.add("tokenizer.ggml.tokens", gw.ARRAY, (gw.STRING, ["a", "b", "ab"]))
    w.add("tokenizer.ggml.token_type", gw.ARRAY, (gw.I32, [1, 1, 3]))
    w.add("tokenizer.ggml.merges", gw.ARRAY, (gw.STRING, ["a b"]))
    w.add("nested", gw.ARRAY, (gw.ARRAY, [(gw.U8, [1, 2]), (gw.F64, [0.5])]))
    w.add("flag", gw.BOOL, True)
    w.add("big", gw.U64, 1 << 40)
    for name, ggml_type, dims in (("token_embd.weight", gw.GGML_Q4_0, [32, 3]),
                                  ("output_norm.weight", gw.GGML_F32, [32]),
                                  ("blk.0.attn_q.weight", gw.GGML_Q8_0, [32, 2]),
                                  ("blk.0.ffn_up.weight", gw.GGML_Q4_K, [256, 1]),
                                  ("blk.0.ffn_down.weight", gw.GGML_Q6_K, [256, 1]),
                                  ("blk.0.attn_v.weight", gw.GGML_F16, [4, 2]),
                                  ("blk.0.attn_k.weight", gw.GGML_BF16, [4, 2])):
        block, block_bytes = gw.GGML_BLOCK[ggml_type]
        n = dims[0] * (dims[1] if len(dims) > 1 else 1) // block * block_bytes
        w.add_tensor(name, dims, ggml_type, bytes(rng.randrange(256) for _ in range(n)))
    write(os.path.join(gg, "mixed.gguf"), w.to_bytes())
    w = gw.GgufWriter(alignment=64)
    w.add("general.alignment", gw.U32, 64)
    write(os.path.join(gg, "empty_aligned.gguf"), w.to_bytes())


if __name__ == "__main__":
    main()
