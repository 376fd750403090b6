"""python -m kestrel.bench runs the all-in-one YAML and writes `kestrel bench`'s CSV."""

import csv
import os
import subprocess
import sys

import pytest


def test_bench_config_writes_the_cli_csv(tmp_path, request):
    package_dir = request.config.getoption("--kestrel-python")
    if not package_dir:
        pytest.skip("needs --kestrel-python (the built package)")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "repo_id: ['synthetic:tiny-llama']\nwarm_up: 0\nnum_trials: 1\nnum_beams: 1\n"
        "low_bit: 'sym_int4'\nbatch_size: [1, 2]\nin_out_pairs: ['16-4']\n"
    )
    out = tmp_path / "results.csv"
    env = dict(os.environ, PYTHONPATH=os.path.abspath(package_dir))
    run = subprocess.run(
        [sys.executable, "-m", "kestrel.bench", "--config", str(config), "-o", str(out),
         "--device", "cpu", "-q"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader(open(out, newline="")))
    assert [r["batch_size"] for r in rows] == ["1", "2"]
    for r in rows:
        assert r["status"] == "ok"
        assert r["actual input/output tokens"] == "16-4"
        assert float(r["decode tok/s"]) > 0
    # A bad configuration fails as the CLI does: non-zero with its one error line.
    bad = tmp_path / "bad.yaml"
    bad.write_text("repo_id: [synthetic:tiny-qwen2]\nin_out_pairs: ['8-8']\nbatch: 4\n")
    run = subprocess.run(
        [sys.executable, "-m", "kestrel.bench", "--config", str(bad), "-o", str(tmp_path / "b.csv")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode != 0 and "error" in run.stderr
    run = subprocess.run([sys.executable, "-m", "kestrel.bench"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert run.returncode != 0 and "usage" in run.stderr
