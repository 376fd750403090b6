#!/usr/bin/env python3
"""Determinism under load for `kestrel serve` (issue 11): does a greedy request's output depend on
what else is running? Each of N probe requests (seeded token-id prompts, temperature 0, exact
lengths with `ignore_eos`) is sent alone, then again while `--load` other requests run beside it;
the script reports, per probe, how many leading tokens agree and whether the whole output is
equal. On the CPU backend the outputs must be identical (the server tests assert it); on CUDA,
batch shapes change the reduction order of the matrix products, so this measures the agreement.

    bench/serve_agreement.py --port 8080 --probes 8 --load 15 --max-tokens 64
Standard library only. Exit status 0 when every request succeeded (whatever the agreement).
"""
import argparse
import http.client
import json
import random
import sys
import threading


def complete(host, port, prompt, max_tokens, timeout):
    """One non-streamed greedy completion; returns its text."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {data[:200]!r}")
    return json.loads(data)["choices"][0]["text"]


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--probes", type=int, default=8, help="requests compared alone vs loaded")
    ap.add_argument("--load", type=int, default=15, help="requests running beside each probe")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    if min(args.probes, args.prompt_len, args.max_tokens) <= 0 or args.load < 0:
        sys.exit("serve_agreement: counts must be positive (--load may be 0)")
    rng = random.Random(args.seed)

    def prompt():
        return [rng.randrange(1000, 30000) for _ in range(args.prompt_len)]

    probes = [prompt() for _ in range(args.probes)]
    loads = [prompt() for _ in range(args.load)]
    try:
        alone = [complete(args.host, args.port, p, args.max_tokens, args.timeout) for p in probes]
    except (OSError, RuntimeError, ValueError) as e:
        sys.exit(f"serve_agreement: a request alone failed: {e}")
    equal = 0
    errors = []
    print("| probe | chars alone | leading chars equal under load | equal |")
    print("|---:|---:|---:|---|")
    for i, p in enumerate(probes):
        out = {}

        def run(key, ids):
            try:
                out[key] = complete(args.host, args.port, ids, args.max_tokens, args.timeout)
            except (OSError, RuntimeError, ValueError) as e:
                errors.append(str(e))

        threads = [threading.Thread(target=run, args=(("load", j), q)) for j, q in enumerate(loads)]
        threads.append(threading.Thread(target=run, args=("probe", p)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        loaded = out.get("probe", "")
        same = loaded == alone[i]
        equal += same
        print(f"| {i} | {len(alone[i])} | {common_prefix(alone[i], loaded)} | {'yes' if same else 'no'} |")
    print(f"\n{equal} of {len(probes)} probes equal alone and beside {args.load} other requests")
    if errors:
        sys.exit(f"serve_agreement: {len(errors)} requests failed, first: {errors[0]}")


if __name__ == "__main__":
    main()
