#!/usr/bin/env bash
# Bad model input through the CLI: each case must exit non-zero within a second with exactly one
# line on stderr that names the file and the tensor or field. Never a crash.
set -uo pipefail
kestrel="$1"
src="$2"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
limit_ms=1000
[ -z "${KESTREL_TEST_SANITIZED:-}" ] || limit_ms=10000

good="$src/tests/golden/models/qwen2-tied-f32"

# expect_error NAME MODEL_DIR PATTERN...: runs `kestrel logits` on MODEL_DIR.
expect_error() {
  local name="$1" dir="$2"
  shift 2
  local start end status lines
  start=$(date +%s%N)
  "$kestrel" logits -m "$dir" --ids 1,2,3 --low-bit fp32 -q -o "$tmp/out.f32" \
    >"$tmp/stdout" 2>"$tmp/stderr"
  status=$?
  end=$(date +%s%N)
  lines=$(wc -l <"$tmp/stderr")
  local ms=$(((end - start) / 1000000))
  if [ "$status" -eq 0 ] || [ "$status" -ge 128 ]; then
    echo "FAIL $name: exit status $status (want a clean non-zero exit)"; failures=$((failures + 1)); return
  fi
  if [ "$lines" -ne 1 ]; then
    echo "FAIL $name: $lines lines on stderr:"; cat "$tmp/stderr"; failures=$((failures + 1)); return
  fi
  # Sanitized builds (scripts/sanitize sets KESTREL_TEST_SANITIZED) run several times slower.
  if [ "$ms" -gt "$limit_ms" ]; then
    echo "FAIL $name: took ${ms} ms"; failures=$((failures + 1)); return
  fi
  for pattern in "$@"; do
    if ! grep -q -- "$pattern" "$tmp/stderr"; then
      echo "FAIL $name: stderr lacks '$pattern':"; cat "$tmp/stderr"; failures=$((failures + 1)); return
    fi
  done
  echo "ok   $name (${ms} ms): $(cat "$tmp/stderr")"
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

[ "$failures" -eq 0 ] || { echo "$failures failure(s)"; exit 1; }
