#!/usr/bin/env bash
# A program outside the tree builds against the installed Kestrel: `cmake --install` into a
# temporary prefix, then find_package(kestrel) from tests/install/consumer, which compiles every
# public header on its own and runs a tiny model through the API.
set -euo pipefail
build="$1"
src="$2"
cmake="${3:-cmake}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$cmake" --install "$build" --prefix "$tmp/prefix" >"$tmp/install.log"

# What a consumer is handed must not carry the tree's private settings.
targets=$(find "$tmp/prefix" -name 'kestrel-targets.cmake')
if grep -nE -- '-mavx|-mfma|-mf16c|/src[";/ ]|/src$' "$targets"; then
  echo "FAIL the exported target forces private flags or src/ on consumers"; exit 1
fi
if [ -e "$tmp/prefix/include/kestrel" ] && grep -rnE '#include "(backend|model|io|quant|core|runtime|tokenizer|sample|bench)/' "$tmp/prefix/include"; then
  echo "FAIL an installed header includes a private header"; exit 1
fi

# The consumer finds Kestrel's own dependencies where this build found them (on the GPU machine
# they come from .deps, see scripts/gpu-suite), with the same compiler.
cache_value() { sed -n "s/^$1:[A-Z]*=//p" "$build/CMakeCache.txt"; }
prefix_path="$tmp/prefix"
extra=$(cache_value CMAKE_PREFIX_PATH)
[ -z "$extra" ] || prefix_path="$prefix_path;$extra"
args=(-DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=$prefix_path"
      "-DCMAKE_CXX_COMPILER=$(cache_value CMAKE_CXX_COMPILER)")
pkgconf=$(cache_value PKG_CONFIG_EXECUTABLE)
[ -z "$pkgconf" ] || args+=("-DPKG_CONFIG_EXECUTABLE=$pkgconf")
"$cmake" -S "$src/tests/install/consumer" -B "$tmp/build" -G Ninja "${args[@]}" \
  >"$tmp/configure.log" 2>&1 ||
  { cat "$tmp/configure.log"; exit 1; }
"$cmake" --build "$tmp/build" >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; exit 1; }
tokenizer="$src/.cache/tokenizers/qwen3/models"
if [ -f "$tokenizer/tokenizer.json" ]; then
  "$tmp/build/consumer" "$tokenizer"
else
  echo "note: $tokenizer missing (scripts/setup fetches it); the text path is not checked"
  "$tmp/build/consumer"
fi
