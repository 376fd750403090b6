"""python -m kestrel.bench --config config.yaml [-o results.csv] [kestrel bench options]

The all-in-one benchmark from Python: the same YAML and the same CSV as `kestrel bench`, because
it is `kestrel bench` (the CLI the package carries in kestrel/bin/), so existing benchmark scripts
keep their shape. Every option of `kestrel bench` is accepted (`--help` lists them); Ctrl-C stops
the run as it does there.
"""

import os
import sys


def cli_path():
    """The `kestrel` binary of this package (a build tree links it, a wheel carries a copy)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin", "kestrel")
    if not os.access(path, os.X_OK):
        raise SystemExit(
            f"kestrel.bench: {path}: no kestrel binary in this package "
            "(build the `kestrel` CMake target, or reinstall the package)"
        )
    return path


def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in args) and not any(
        a in ("-h", "--help") for a in args
    ):
        raise SystemExit("usage: python -m kestrel.bench --config FILE.yaml [-o results.csv] ...")
    cli = cli_path()
    sys.stdout.flush()
    sys.stderr.flush()
    # The process becomes `kestrel bench`: its exit status, signals and output are the CLI's.
    os.execv(cli, [cli, "bench", *args])


if __name__ == "__main__":
    main()
