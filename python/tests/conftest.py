"""Options ctest passes (python/CMakeLists.txt): where the built package, the `kestrel` binary
and the source tree are. Run by hand:

    python3 -m pytest python/tests --kestrel-python=build/python --kestrel-binary=build/kestrel
"""

import os
import sys

import pytest

SOURCE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    parser.addoption("--kestrel-python", help="directory holding the built kestrel package")
    parser.addoption("--kestrel-binary", help="the kestrel CLI binary (for cross-checks)")
    parser.addoption("--kestrel-source", default=SOURCE_DIR, help="Kestrel's source tree")


def pytest_configure(config):
    package_dir = config.getoption("--kestrel-python")
    if package_dir:
        sys.path.insert(0, os.path.abspath(package_dir))


@pytest.fixture(scope="session")
def source_dir(request):
    return request.config.getoption("--kestrel-source")


@pytest.fixture(scope="session")
def golden_dir(source_dir):
    return os.path.join(source_dir, "tests", "golden")


@pytest.fixture(scope="session")
def kestrel_binary(request):
    path = request.config.getoption("--kestrel-binary")
    if not path or not os.access(path, os.X_OK):
        pytest.skip("no kestrel binary given (--kestrel-binary)")
    return path


def tokenizer_dir(source_dir, vocab):
    """The npm tokenizer package's files that scripts/setup fetches (qwen3, llama3_1)."""
    path = os.path.join(source_dir, ".cache", "tokenizers", vocab, "models")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        pytest.fail(f"{path}: no tokenizer.json (run scripts/setup)")
    return path
