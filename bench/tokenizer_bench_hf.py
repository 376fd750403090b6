#!/usr/bin/env python3
"""HF `tokenizers` encode throughput, single thread: the reference row of bench/tokenizer_bench.

Same workload as bench/tokenizer_bench.cpp: the texts of tests/golden/tokenizer/golden.jsonl (rows
without special tokens added), repeated until the total reaches --mb megabytes; each text is
encoded with add_special_tokens=False. MB/s = UTF-8 bytes of the workload / best wall time of
--reps passes (after one warm-up pass, as HF's BPE word cache is warm in steady state too).

Usage: TOKENIZERS_PARALLELISM=false RAYON_NUM_THREADS=1 \\
         bench/tokenizer_bench_hf.py --cache .cache/tokenizers [--golden FILE] [--mb 4] [--json OUT]
"""

import argparse
import json
import os
import platform
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from tokenizers import Tokenizer, __version__ as tokenizers_version  # noqa: E402


def workload(golden, mb):
    texts = []
    with open(golden, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if not row["add_special_tokens"]:
                texts.append(row["text"])
    base = sum(len(t.encode()) for t in texts)
    reps = max(1, -(-int(mb * 1e6) // base))
    return texts * reps, base * reps


def best_time(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=".cache/tokenizers")
    ap.add_argument("--golden", default="tests/golden/tokenizer/golden.jsonl")
    ap.add_argument("--mb", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    texts, nbytes = workload(args.golden, args.mb)
    results = {"tokenizers_version": tokenizers_version, "python": platform.python_version(),
               "cpu": platform.processor() or platform.machine(), "bytes": nbytes, "texts": len(texts),
               "rows": []}
    for vocab in ["llama3_1", "qwen3"]:
        tok = Tokenizer.from_file(os.path.join(args.cache, vocab, "models", "tokenizer.json"))
        ntok = sum(len(e.ids) for e in tok.encode_batch(texts[: len(texts)], add_special_tokens=False))
        loop = best_time(lambda: [tok.encode(t, add_special_tokens=False) for t in texts], args.reps)
        batch = best_time(lambda: tok.encode_batch(texts, add_special_tokens=False), args.reps)
        fast = None
        if hasattr(tok, "encode_batch_fast"):
            fast = best_time(lambda: tok.encode_batch_fast(texts, add_special_tokens=False), args.reps)
        row = {"vocab": vocab, "tokens": ntok, "encode_loop_mb_s": nbytes / loop / 1e6,
               "encode_batch_mb_s": nbytes / batch / 1e6,
               "encode_batch_fast_mb_s": nbytes / fast / 1e6 if fast else None}
        results["rows"].append(row)
        print(f"HF tokenizers {tokenizers_version} {vocab}: {nbytes / 1e6:.2f} MB, {ntok} tokens; "
              f"encode loop {row['encode_loop_mb_s']:.2f} MB/s, encode_batch {row['encode_batch_mb_s']:.2f} MB/s"
              + (f", encode_batch_fast {row['encode_batch_fast_mb_s']:.2f} MB/s" if fast else ""),
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
