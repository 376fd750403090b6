#!/usr/bin/env bash
# Fetches the pinned official OpenAI JavaScript client (the `openai` npm package, which has no
# dependencies) with `npm pack` into the gitignored cache, for the server's client test
# (tests/cli/serve_openai.sh):
#
#   .cache/npm/openai/            the package's files (index.mjs, package.json, ...)
#   .cache/npm/openai/.sha256     sha256 of the verified tarball
#
# The tarball's sha256 is checked against the pinned value before anything is extracted.
# Idempotent: skipped when the stamp holds the pinned sha256.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$repo_root/.cache/npm/openai"
spec="openai@5.23.2"
want_sha="a2aa74ff8be1a80a215af201a3d2228e999464d166c1eaec2c9ca313395fbef1"

die() {
  echo "fetch_openai_client.sh: error: $*" >&2
  exit 1
}

if [[ -f "$out/.sha256" && "$(cat "$out/.sha256")" == "$want_sha" && -f "$out/index.mjs" ]]; then
  echo "fetch_openai_client.sh: $spec present"
  exit 0
fi
command -v npm >/dev/null || die "npm is missing (Debian: apt-get install npm)"
staging="$(mktemp -d)"
trap 'rm -rf "$staging"' EXIT
(cd "$staging" && npm pack --silent "$spec" >/dev/null) ||
  die "npm pack $spec failed (is the npm registry reachable?)"
tgz="$staging/openai-5.23.2.tgz"
[[ -f "$tgz" ]] || die "npm pack $spec did not produce $(basename "$tgz")"
got_sha="$(sha256sum "$tgz" | cut -d' ' -f1)"
[[ "$got_sha" == "$want_sha" ]] ||
  die "sha256 mismatch for $spec: expected $want_sha, got $got_sha; refusing to use it"
tar -xzf "$tgz" -C "$staging"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$staging/package" "$out"
echo "$want_sha" >"$out/.sha256"
echo "fetch_openai_client.sh: $spec extracted to $out"
