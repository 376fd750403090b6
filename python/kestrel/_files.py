"""Reading the small JSON files beside a model or tokenizer (config.json, generation_config.json,
tokenizer_config.json) with the limits the C++ side applies to text files."""

import json
import os
import stat

# As the engine's read_text_file: far above any real config.
MAX_JSON_BYTES = 64 << 20


def read_json_object(path):
    """The JSON object in `path`, or None when there is no such file. A file that is not a
    regular file, is larger than MAX_JSON_BYTES, or does not hold a JSON object is a ValueError
    naming it (never a blocking read of a FIFO, never an unbounded one)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: not a regular file")
    if info.st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path}: {info.st_size} bytes is past the limit of {MAX_JSON_BYTES}")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.loads(f.read(MAX_JSON_BYTES + 1))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value
