#!/usr/bin/env bash
# A GGUF model with its own tokenizer and chat template through every text command: a tiny Qwen2
# in Q8_0 written here (scripts/gguf_writer.py) with the real Qwen tokenizer in llama.cpp's
# metadata layout. The GGUF tokenizer must give the ids and renderings of the tokenizer.json it
# came from, and run / chat / template / tokenize / convert must accept `-m model.gguf`.
set -uo pipefail
source "$(dirname "$0")/common.bash"
cli_setup "$@"
hf_tok="$src/.cache/tokenizers/qwen3/models"
model="$tmp/tiny-qwen2.Q8_0.gguf"

python3 - "$src/scripts" "$hf_tok" "$model" <<'PY'
import json, random, struct, sys
sys.path.insert(0, sys.argv[1])
import gguf_writer as gw
tok = json.load(open(sys.argv[2] + "/tokenizer.json"))
cfg = json.load(open(sys.argv[2] + "/tokenizer_config.json"))
by_id = {i: (t, gw_type) for t, i in tok["model"]["vocab"].items() for gw_type in [1]}
for a in tok["added_tokens"]:
    by_id[a["id"]] = (a["content"], 3 if a["special"] else 4)
n = max(by_id) + 1
tokens = [by_id.get(i, (f"[PAD{i}]", 5))[0] for i in range(n)]
types = [by_id.get(i, ("", 5))[1] for i in range(n)]
merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
w = gw.GgufWriter()
for key, vtype, value in (
        ("general.architecture", gw.STRING, "qwen2"), ("qwen2.context_length", gw.U32, 256),
        ("qwen2.embedding_length", gw.U32, 64), ("qwen2.block_count", gw.U32, 1),
        ("qwen2.feed_forward_length", gw.U32, 128), ("qwen2.attention.head_count", gw.U32, 4),
        ("qwen2.attention.head_count_kv", gw.U32, 2), ("qwen2.rope.freq_base", gw.F32, 1e6),
        ("qwen2.attention.layer_norm_rms_epsilon", gw.F32, 1e-6),
        ("tokenizer.ggml.model", gw.STRING, "gpt2"), ("tokenizer.ggml.pre", gw.STRING, "qwen2"),
        ("tokenizer.ggml.tokens", gw.ARRAY, (gw.STRING, tokens)),
        ("tokenizer.ggml.token_type", gw.ARRAY, (gw.I32, types)),
        ("tokenizer.ggml.merges", gw.ARRAY, (gw.STRING, merges)),
        ("tokenizer.ggml.bos_token_id", gw.U32, 151643),
        ("tokenizer.ggml.eos_token_id", gw.U32, 151645),
        ("tokenizer.ggml.add_bos_token", gw.BOOL, False),
        ("tokenizer.chat_template", gw.STRING, cfg["chat_template"])):
    w.add(key, vtype, value)
rng = random.Random(1)
def q8(rows, cols):
    d = struct.pack("<e", 0.02)
    return b"".join(d + rng.randbytes(32) for _ in range(rows * cols // 32))
def f32(n, value):
    return struct.pack(f"<{n}f", *([value] * n))
w.add_tensor("token_embd.weight", [64, n], gw.GGML_Q8_0, q8(n, 64))
for name, rows, cols in (("attn_q", 64, 64), ("attn_k", 32, 64), ("attn_v", 32, 64),
                         ("attn_output", 64, 64), ("ffn_gate", 128, 64), ("ffn_up", 128, 64),
                         ("ffn_down", 64, 128)):
    w.add_tensor(f"blk.0.{name}.weight", [cols, rows], gw.GGML_Q8_0, q8(rows, cols))
for name, rows in (("attn_q", 64), ("attn_k", 32), ("attn_v", 32)):
    w.add_tensor(f"blk.0.{name}.bias", [rows], gw.GGML_F32, f32(rows, 0.0))
for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
    w.add_tensor(name, [64], gw.GGML_F32, f32(64, 1.0))
w.write(sys.argv[3])
PY
[ -f "$model" ] || { echo "FAIL could not write the GGUF model (is the tokenizer cache there?)"; exit 1; }

run_ok() {
  "$kestrel" run -m "$model" -p "Hello there" -n 4 --temp 0 >"$tmp/run.out" 2>"$tmp/run.err" &&
    [ -s "$tmp/run.out" ] && grep -q "Q8_0 x 8 -> sym_int8 (copied)" "$tmp/run.err"
}
cli_check "run -p on a GGUF (its tokenizer, one load line)" run_ok

text=$'Hello world, 12345 naïve 你好\n<|im_start|>user'
tokenize_same() {
  printf '%s' "$text" | "$kestrel" tokenize --tokenizer "$model" >"$tmp/ids_gguf" &&
    printf '%s' "$text" | "$kestrel" tokenize --tokenizer "$hf_tok" >"$tmp/ids_hf" && cmp -s "$tmp/ids_gguf" "$tmp/ids_hf"
}
cli_check "tokenize: GGUF ids equal tokenizer.json's" tokenize_same

echo '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]' \
  >"$tmp/messages.json"
template_same() {
  "$kestrel" template -m "$model" --messages "$tmp/messages.json" --add-generation-prompt \
    >"$tmp/a" && "$kestrel" template -m "$hf_tok" --messages "$tmp/messages.json" \
    --add-generation-prompt >"$tmp/b" && cmp -s "$tmp/a" "$tmp/b"
}
cli_check "template: the GGUF's chat template renders as tokenizer_config.json's" template_same

chat_ok() {
  printf 'hello\n' | timeout 120 "$kestrel" chat -m "$model" -n 4 -q >"$tmp/chat.out" 2>"$tmp/chat.err"
}
cli_check "chat on a GGUF" chat_ok

convert_ok() {
  "$kestrel" convert -m "$model" -o "$tmp/converted" -q 2>/dev/null &&
    [ -f "$tmp/converted/tokenizer.json" ] && [ -f "$tmp/converted/tokenizer_config.json" ] &&
    "$kestrel" logits -m "$model" --ids 1,2,3 -o "$tmp/a.f32" -q 2>/dev/null &&
    "$kestrel" logits -m "$tmp/converted" --ids 1,2,3 -o "$tmp/b.f32" -q 2>/dev/null &&
    cmp -s "$tmp/a.f32" "$tmp/b.f32" &&
    printf '%s' "$text" | "$kestrel" tokenize --tokenizer "$tmp/converted" | cmp -s - "$tmp/ids_hf"
}
cli_check "convert: same logits, tokenizer written beside" convert_ok

cli_finish
