#!/usr/bin/env bash
# Bad model input through the CLI: each case must exit non-zero with exactly one line on stderr
# that names the file and the tensor or field. Never a crash. Progress output is on, so that one
# line also shows that no conversion work started before the input was refused (no wall-clock
# limit: a busy machine may be slow, but it must not do the work).
set -uo pipefail
source "$(dirname "$0")/common.bash"
cli_setup "$@"

good="$src/tests/golden/models/qwen2-tied-f32"

# expect_error NAME MODEL_DIR PATTERN...: runs `kestrel logits` on MODEL_DIR.
expect_error() {
  local name="$1" dir="$2"
  shift 2
  local status lines
  "$kestrel" logits -m "$dir" --ids 1,2,3 --low-bit sym_int4 -o "$tmp/out.f32" \
    >"$tmp/stdout" 2>"$tmp/stderr"
  status=$?
  lines=$(wc -l <"$tmp/stderr")
  if [ "$status" -eq 0 ] || [ "$status" -ge 128 ]; then
    echo "FAIL $name: exit status $status (want a clean non-zero exit)"; failures=$((failures + 1)); return
  fi
  if [ "$lines" -ne 1 ] || ! grep -q "^kestrel: error: " "$tmp/stderr"; then
    echo "FAIL $name: want only the error on stderr (no conversion progress), got $lines lines:"
    cat "$tmp/stderr"; failures=$((failures + 1)); return
  fi
  for pattern in "$@"; do
    if ! grep -q -- "$pattern" "$tmp/stderr"; then
      echo "FAIL $name: stderr lacks '$pattern':"; cat "$tmp/stderr"; failures=$((failures + 1)); return
    fi
  done
  echo "ok   $name: $(cat "$tmp/stderr")"
}

# Copies the good fixture into a fresh dir and lets the caller break it.
fresh() {
  rm -rf "$tmp/m" && cp -r "$good" "$tmp/m" && echo "$tmp/m"
}

python_patch() { python3 - "$@"; }

d=$(fresh); head -c 5 "$good/model.safetensors" >"$d/model.safetensors"
expect_error truncated "$d" "model.safetensors"

d=$(fresh); python_patch "$d/model.safetensors" <<'PY'
import struct, sys
p = sys.argv[1]; b = bytearray(open(p, "rb").read())
b[0:8] = struct.pack("<Q", len(b) * 4)
open(p, "wb").write(b)
PY
expect_error header_past_end "$d" "model.safetensors" "header"

d=$(fresh); python_patch "$d/model.safetensors" <<'PY'
import struct, sys
p = sys.argv[1]; b = bytearray(open(p, "rb").read())
n = struct.unpack("<Q", b[0:8])[0]
b[8:8 + n] = b"{not json" + b" " * (n - 9)
open(p, "wb").write(b)
PY
expect_error header_not_json "$d" "model.safetensors"

# Rewrites the JSON header with a function of the parsed dict, keeping the data region.
rewrite_header() {
  python_patch "$1" "$2" <<'PY'
import json, struct, sys
p, code = sys.argv[1], sys.argv[2]
b = open(p, "rb").read()
n = struct.unpack("<Q", b[0:8])[0]
h = json.loads(b[8:8 + n])
data = b[8 + n:]
exec(code)
hb = json.dumps(h).encode()
open(p, "wb").write(struct.pack("<Q", len(hb)) + hb + data)
PY
}

d=$(fresh); rewrite_header "$d/model.safetensors" \
  "h['model.norm.weight']['data_offsets'] = [len(data) - 4, len(data) + 252]"
expect_error offsets_past_end "$d" "model.safetensors" "model.norm.weight"

d=$(fresh); rewrite_header "$d/model.safetensors" \
  "a = h['model.layers.0.input_layernorm.weight']['data_offsets'][0]; h['model.layers.0.post_attention_layernorm.weight']['data_offsets'] = [a + 4, a + 260]"
expect_error overlapping "$d" "model.safetensors" "overlap"

d=$(fresh); rewrite_header "$d/model.safetensors" \
  "h['model.norm.weight']['shape'] = [65]"
expect_error shape_vs_bytes "$d" "model.safetensors" "model.norm.weight"

d=$(fresh); rewrite_header "$d/model.safetensors" \
  "del h['model.layers.1.mlp.up_proj.weight']"
expect_error missing_tensor "$d" "model.layers.1.mlp.up_proj.weight"

d=$(fresh); sed -i 's/Qwen2ForCausalLM/MistralForCausalLM/' "$d/config.json"
expect_error unknown_architecture "$d" "config.json" "MistralForCausalLM"

d=$(fresh); python_patch "$d/config.json" <<'PY'
import json, sys
p = sys.argv[1]; c = json.load(open(p))
c.pop("rope_parameters", None)
c["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
json.dump(c, open(p, "w"))
PY
expect_error unknown_rope_type "$d" "config.json" "yarn"

d=$(fresh); rm "$d/config.json"
expect_error missing_config "$d" "config.json"

d=$(fresh); sed -i 's/"hidden_size": 64/"hidden_size": "64"/' "$d/config.json"
expect_error wrong_field_type "$d" "config.json" "hidden_size"

d=$(fresh); python_patch "$d/config.json" <<'PY'
import json, sys
p = sys.argv[1]; c = json.load(open(p)); c["hidden_size"] = 128
json.dump(c, open(p, "w"))
PY
expect_error shape_vs_config "$d" "model.embed_tokens.weight"

expect_error not_a_directory "$tmp/nowhere" "nowhere"

# Bad ids are refused too.
if "$kestrel" logits -m "$good" --ids 1,x,3 -q -o "$tmp/o" 2>"$tmp/stderr"; then
  echo "FAIL bad_ids: accepted"; failures=$((failures + 1))
else
  echo "ok   bad_ids: $(cat "$tmp/stderr")"
fi
if "$kestrel" logits -m "$good" --ids 1,99999,3 --low-bit fp32 -q -o "$tmp/o" 2>"$tmp/stderr"; then
  echo "FAIL id_out_of_vocab: accepted"; failures=$((failures + 1))
else
  echo "ok   id_out_of_vocab: $(cat "$tmp/stderr")"
fi

# --- GGUF files: a copy of a fixture, corrupted -------------------------------------------------
gguf="$src/tests/golden/gguf/qwen2-tied.Q4_0.gguf"
# gguf_case NAME PATTERN... with the patch as a Python snippet on stdin (b: the file's bytearray).
gguf_case() {
  local name="$1"
  shift
  cp "$gguf" "$tmp/m.gguf"
  python3 -c "import struct, sys
p = sys.argv[1]; b = bytearray(open(p, 'rb').read())
def at(name): return b.index(name.encode()) + len(name)
$(cat)
open(p, 'wb').write(b)" "$tmp/m.gguf"
  expect_error "gguf_$name" "$tmp/m.gguf" "m.gguf" "$@"
}
echo 'b[:] = b[:100]' | gguf_case truncated "does not fit in the file (100 bytes)"
echo 'b[:] = b[:900]' | gguf_case truncated_infos "truncated: tensor info"
echo 'b[:] = b[:-600]' | gguf_case data_cut_short "past the end of the data section"
echo 'b[8:16] = struct.pack("<Q", 1 << 60)' | gguf_case tensor_count "tensor count"
echo 'b[24:32] = struct.pack("<Q", 1 << 40)' | gguf_case key_length "exceeds the limit"
# general.architecture "qwen2" -> "gemma" (same length)
echo 'i = at("general.architecture") + 12; b[i:i + 5] = b"gemma"' |
  gguf_case architecture "architecture 'gemma' is not supported"
# token_embd's type Q4_0 -> Q8_1 (larger blocks, but its data still fits the file, so only the
# loader can refuse it)
echo 'i = at("token_embd.weight") + 4 + 16; b[i:i + 4] = struct.pack("<I", 9)' |
  gguf_case tensor_type "Q8_1; Kestrel reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS"
# a tensor's offset moved off the alignment
echo 'i = at("output_norm.weight") + 4 + 8 + 4; b[i:i + 8] = struct.pack("<Q", 3)' |
  gguf_case misaligned "not a multiple of the alignment 32"
# blk.0.attn_q's rows claimed twice as many: past the data or into the next tensor
echo 'i = at("blk.0.attn_q.weight") + 4 + 8; b[i:i + 8] = struct.pack("<Q", 128)' |
  gguf_case shape "blk.0.attn_q.weight"

cli_finish
