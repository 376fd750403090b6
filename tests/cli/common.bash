# Shared by the CLI tests (sourced; not a test itself): `cli_setup "$@"` sets $kestrel (the binary),
# $src (the source tree) and $tmp (removed on exit); `cli_check NAME COMMAND...` counts a failed
# COMMAND, and `cli_finish` exits non-zero when any check failed.
cli_setup() {
  kestrel="$1"
  src="$2"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  failures=0
}

cli_check() {
  local name="$1"
  shift
  if "$@"; then echo "ok   $name"; else echo "FAIL $name"; failures=$((failures + 1)); fi
}

cli_finish() {
  [ "$failures" -eq 0 ] || { echo "$failures failure(s)"; exit 1; }
}
