#!/usr/bin/env python3
"""Serving benchmark for `kestrel serve` (or any OpenAI-compatible server with vLLM's
`ignore_eos`): a fixed, seeded request mix sent at each concurrency level, streamed, timed per
request. Reports, per level, request and token throughput and the p50/p99 of time to first token
(TTFT) and time per output token (TPOT), as vLLM's serving benchmark defines them:

    TTFT = arrival of the first streamed text - start of the request
    TPOT = (arrival of the last text - arrival of the first) / (output tokens - 1)

Prompts are token ids (POST /v1/completions), so their lengths are exact whatever the tokenizer;
`ignore_eos` makes output lengths exact too. Standard library only.

Where the server publishes the weight bytes a decode step streams (Kestrel's /metrics,
kestrel_decode_weight_bytes), each level also shows the weights' GB/s at its median TPOT (a
decode step streams the weights once for every running request, so TPOT is a step's time; the
KV cache's bytes are not counted), and with --roofline-gbs that rate's share of the machine's
bandwidth.

    bench/serve_bench.py --port 8080 --concurrency 1,8,32,64 -o results.csv --markdown table.md \
        --svg plot.svg
"""
import argparse
import csv
import http.client
import json
import queue
import random
import sys
import threading
import time


def parse_list(text, name):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sys.exit(f"serve_bench: {name} must be a comma-separated list of integers: {text!r}")
    if not values or any(v <= 0 for v in values):
        sys.exit(f"serve_bench: {name} must list positive integers: {text!r}")
    return values


def request_mix(n, input_lens, output_lens, seed, id_range):
    """The i-th request of every level: (prompt ids, max_tokens). Lengths cycle through every
    (input, output) pair; ids are drawn from a seeded generator."""
    rng = random.Random(seed)
    pairs = [(i, o) for i in input_lens for o in output_lens]
    mix = []
    for k in range(n):
        n_in, n_out = pairs[k % len(pairs)]
        mix.append(([rng.randrange(*id_range) for _ in range(n_in)], n_out))
    return mix


def run_request(host, port, headers, prompt, max_tokens, timeout, sampling):
    """Streams one completion; returns a dict of its timings and token counts, or its error.
    `sampling`: the request's temperature, top_p and top_k (and a seed when it samples)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, **sampling}
    start = time.perf_counter()
    first = last = None
    usage = None
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            return {"error": f"status {resp.status}: {resp.read()[:200]!r}"}
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            payload = line[len(b"data: "):]
            if payload == b"[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                return {"error": str(event["error"].get("message"))}
            now = time.perf_counter()
            if any(c.get("text") for c in event.get("choices", [])):
                if first is None:
                    first = now
                last = now
            if event.get("usage"):
                usage = event["usage"]
        conn.close()
    except (OSError, http.client.HTTPException, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    if usage is None or first is None:
        return {"error": "the stream ended without text or usage"}
    out = usage["completion_tokens"]
    return {"ttft": first - start, "tpot": (last - first) / (out - 1) if out > 1 else None,
            "latency": end - start, "prompt_tokens": usage["prompt_tokens"],
            "output_tokens": out}


def decode_weight_bytes(host, port, headers, timeout):
    """kestrel_decode_weight_bytes from the server's /metrics, or None."""
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.request("GET", "/metrics", headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace") if resp.status == 200 else ""
        conn.close()
    except (OSError, http.client.HTTPException):
        return None
    for line in text.splitlines():
        if line.startswith("kestrel_decode_weight_bytes "):
            try:
                value = float(line.split()[1])
            except (IndexError, ValueError):
                return None
            return value if value > 0 else None
    return None


def percentile(values, p):
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def sampling_of(args):
    """The sampling fields every request carries: greedy by default (the device picks the token
    and no logit row crosses to the host); with a temperature, the host samples each row."""
    if not 0 <= args.temperature <= 2 or not 0 < args.top_p <= 1 or args.top_k < 0:
        sys.exit("serve_bench: --temperature 0..2, --top-p in (0, 1], --top-k >= 0")
    sampling = {"temperature": args.temperature, "top_p": args.top_p}
    if args.top_k:
        sampling["top_k"] = args.top_k
    return sampling


def run_level(args, headers, concurrency, mix, weight_bytes):
    sampling = sampling_of(args)
    jobs = queue.Queue()
    for job in mix:
        jobs.put(job)
    results = []
    lock = threading.Lock()

    def worker():
        while True:
            try:
                prompt, max_tokens = jobs.get_nowait()
            except queue.Empty:
                return
            r = run_request(args.host, args.port, headers, prompt, max_tokens, args.timeout,
                            sampling)
            r["max_tokens"] = max_tokens
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    duration = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] * 1000 for r in ok]
    tpot = [r["tpot"] * 1000 for r in ok if r["tpot"] is not None]
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(r["prompt_tokens"] for r in ok)
    tpot_p50 = percentile(tpot, 50)
    weight_gbs = (weight_bytes / (tpot_p50 / 1000) / 1e9
                  if weight_bytes and tpot_p50 == tpot_p50 and tpot_p50 > 0 else float("nan"))
    roofline_pct = (100 * weight_gbs / args.roofline_gbs if args.roofline_gbs > 0
                    else float("nan"))
    return {
        "concurrency": concurrency,
        "requests": len(ok),
        "errors": len(results) - len(ok),
        "short": sum(1 for r in ok if r["output_tokens"] != r["max_tokens"]),
        "duration_s": duration,
        "request_per_s": len(ok) / duration,
        "output_tok_per_s": out_tokens / duration,
        "total_tok_per_s": (in_tokens + out_tokens) / duration,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "tpot_p50_ms": tpot_p50,
        "tpot_p99_ms": percentile(tpot, 99),
        "weight_gbs_at_tpot_p50": weight_gbs,
        "roofline_pct": roofline_pct,
        "first_error": next((r["error"] for r in results if "error" in r), ""),
    }


COLUMNS = [("concurrency", "concurrency", "{}"), ("requests", "requests", "{}"),
           ("errors", "errors", "{}"), ("request_per_s", "req/s", "{:.2f}"),
           ("output_tok_per_s", "output tok/s", "{:.1f}"),
           ("total_tok_per_s", "total tok/s", "{:.1f}"),
           ("ttft_p50_ms", "TTFT p50 ms", "{:.1f}"), ("ttft_p99_ms", "TTFT p99 ms", "{:.1f}"),
           ("tpot_p50_ms", "TPOT p50 ms", "{:.2f}"), ("tpot_p99_ms", "TPOT p99 ms", "{:.2f}"),
           ("weight_gbs_at_tpot_p50", "weights GB/s at TPOT p50", "{:.0f}"),
           ("roofline_pct", "% of roofline", "{:.1f}")]


def markdown(rows):
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("-" if row[key] != row[key] else fmt.format(row[key])
                                       for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def svg_plot(rows, title):
    """Two panels over the concurrency levels: output tokens/s, and TTFT and TPOT (p50 solid,
    p99 dashed). Plain SVG, so no plotting library is needed."""
    width, height, pad = 360, 240, 48
    panels = [("output tokens/s", [("output_tok_per_s", "#1f77b4", "")]),
              ("milliseconds", [("ttft_p50_ms", "#d62728", ""), ("ttft_p99_ms", "#d62728", "4 3"),
                                ("tpot_p50_ms", "#2ca02c", ""), ("tpot_p99_ms", "#2ca02c", "4 3")])]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{height + 30}" '
           'font-family="sans-serif" font-size="11">',
           f'<text x="{width}" y="16" text-anchor="middle" font-size="13">{title}</text>']
    n = len(rows)
    for i, (label, series) in enumerate(panels):
        x0, y0 = i * width + pad, 30
        w, h = width - 1.5 * pad, height - pad
        top = max([row[k] for row in rows for k, _, _ in series if row[k] == row[k]] + [1e-9])
        top *= 1.1
        out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#888"/>')
        out.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 32}" text-anchor="middle">concurrency'
                   '</text>')
        out.append(f'<text x="{x0 - 36}" y="{y0 + h / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 {x0 - 36} {y0 + h / 2})">{label}</text>')
        for t in range(5):
            v = top * t / 4
            y = y0 + h - h * t / 4
            out.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end">{v:.3g}</text>')

        def px(j):
            return x0 + (w * (j + 0.5) / n)
        for j, row in enumerate(rows):
            out.append(f'<text x="{px(j)}" y="{y0 + h + 14}" text-anchor="middle">'
                       f'{row["concurrency"]}</text>')
        for k, color, dash in series:
            points = " ".join(f"{px(j):.1f},{y0 + h - h * row[k] / top:.1f}"
                              for j, row in enumerate(rows) if row[k] == row[k])
            out.append(f'<polyline points="{points}" fill="none" stroke="{color}" '
                       f'stroke-width="2" stroke-dasharray="{dash}"/>')
            if len(series) > 1:
                ly = y0 + 12 + 14 * series.index((k, color, dash))
                out.append(f'<line x1="{x0 + 8}" y1="{ly}" x2="{x0 + 28}" y2="{ly}" '
                           f'stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
                out.append(f'<text x="{x0 + 32}" y="{ly + 4}">{k[:-3].replace("_", " ")}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--api-key", default="")
    ap.add_argument("--concurrency", default="1,8,32,64",
                    help="concurrency levels, one run each (default 1,8,32,64)")
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per level (default: 4 x concurrency, at least 16)")
    ap.add_argument("--input-lens", default="128,512,1024", help="prompt tokens of the mix")
    ap.add_argument("--output-lens", default="64,256", help="output tokens of the mix")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--id-range", default="1000,30000",
                    help="prompt token ids are drawn from [lo, hi) (default 1000,30000)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="every request's temperature (0: greedy, the device's argmax)")
    ap.add_argument("--top-p", type=float, default=1.0, help="every request's top_p")
    ap.add_argument("--top-k", type=int, default=0, help="every request's top_k (0: off)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per socket operation")
    ap.add_argument("--roofline-gbs", type=float, default=0,
                    help="the machine's memory bandwidth (GB/s), for the %% of roofline column")
    ap.add_argument("-o", "--csv", help="write the rows as CSV")
    ap.add_argument("--json", help="write the rows and the settings as JSON")
    ap.add_argument("--markdown", help="write the Markdown table")
    ap.add_argument("--svg", help="write a plot of throughput, TTFT and TPOT")
    ap.add_argument("--title", default="kestrel serve", help="the plot's title")
    args = ap.parse_args()

    levels = parse_list(args.concurrency, "--concurrency")
    input_lens = parse_list(args.input_lens, "--input-lens")
    output_lens = parse_list(args.output_lens, "--output-lens")
    id_range = parse_list(args.id_range, "--id-range")
    if len(id_range) != 2 or id_range[0] >= id_range[1]:
        sys.exit("serve_bench: --id-range must be LO,HI with LO < HI")
    if args.requests < 0:
        sys.exit("serve_bench: --requests must be >= 0")
    if not args.roofline_gbs >= 0:
        sys.exit("serve_bench: --roofline-gbs must be >= 0")
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = "Bearer " + args.api_key

    # One short request first: the server's first calls pay for graph capture and warm-up.
    warm = run_request(args.host, args.port, headers, list(range(1000, 1016)), 4, args.timeout,
                       sampling_of(args))
    if "error" in warm:
        sys.exit(f"serve_bench: the server at {args.host}:{args.port} did not answer: "
                 f"{warm['error']}")

    weight_bytes = decode_weight_bytes(args.host, args.port, headers, args.timeout)
    rows = []
    for c in levels:
        n = args.requests or max(16, 4 * c)
        mix = request_mix(n, input_lens, output_lens, args.seed, id_range)
        row = run_level(args, headers, c, mix, weight_bytes)
        rows.append(row)
        print(f"concurrency {c}: {row['requests']} requests in {row['duration_s']:.1f} s, "
              f"{row['output_tok_per_s']:.1f} output tok/s, TTFT p50 {row['ttft_p50_ms']:.1f} "
              f"ms, TPOT p50 {row['tpot_p50_ms']:.2f} ms"
              + (f" ({row['weight_gbs_at_tpot_p50']:.0f} GB/s of weights)"
                 if row["weight_gbs_at_tpot_p50"] == row["weight_gbs_at_tpot_p50"] else "")
              + (f", {row['errors']} errors (first: {row['first_error']})"
                 if row["errors"] else ""), file=sys.stderr, flush=True)

    table = markdown(rows)
    sys.stdout.write(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(svg_plot(rows, args.title))
    if args.json:
        settings = {k: v for k, v in vars(args).items()
                    if k not in ("api_key", "csv", "json", "markdown", "svg")}
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "rows": rows}, f, indent=2)
    return 1 if any(r["errors"] or r["short"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
