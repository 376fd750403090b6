"""The README's Python examples run as written (from the source tree, as the README says)."""

import json
import os
import re
import subprocess
import sys


def python_blocks(source_dir):
    with open(os.path.join(source_dir, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Python"):]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_examples_run(source_dir, request, tmp_path):
    blocks = python_blocks(source_dir)
    assert len(blocks) == 2
    env = dict(os.environ, PYTHONPATH=os.path.abspath(request.config.getoption("--kestrel-python")))
    for block in blocks:
        run = subprocess.run([sys.executable, "-c", block], cwd=source_dir, capture_output=True,
                             text=True, env=env, timeout=600)
        assert run.returncode == 0, f"{block}\n{run.stderr}"
    # The first prints the prompt and its 8 new tokens.
    run = subprocess.run([sys.executable, "-c", blocks[0]], cwd=source_dir, capture_output=True,
                         text=True, env=env, timeout=600)
    ids = json.loads(run.stdout)
    assert ids[:5] == [1, 99, 121, 40, 201] and len(ids) == 13
