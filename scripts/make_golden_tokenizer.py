#!/usr/bin/env python3
"""Records Hugging Face `tokenizers` reference output for Kestrel's tokenizer tests.

Runs where HF `tokenizers` is installed (the GPU machine). Reads the tokenizer.json files fetched by
scripts/fetch_tokenizers.sh and the corpus of scripts/gen_tokenizer_corpus.py, and writes to OUT_DIR:

  golden.jsonl         {"text", "add_special_tokens", "llama3_1": [ids], "qwen3": [ids]} per line:
                       every corpus string without special tokens added, plus a subset with them;
                       "<vocab>_decoded" holds HF's decode(ids, skip_special_tokens=True) where it
                       differs from the text (special tokens left out; Qwen's NFC normalizer)
  golden_added.json    extra added tokens with every lstrip/rstrip/single_word/normalized/special
                       combination, put into the Qwen3 tokenizer, and HF's ids and decodes for
                       strings that exercise them
  meta.json            HF's vocabulary sizes and some token <-> id lookups
  golden_decode.jsonl  {"vocab", "ids", "skip_special_tokens", "text"}: HF decode of real
                       encodings, of truncated encodings (split UTF-8 characters) and of random
                       id sequences (invalid UTF-8 -> U+FFFD as HF replaces it)
  hf_unicode.json      what HF's regex engine (Oniguruma) and NFC normalizer do per code point:
                       the sets matched by \\p{L}, \\p{N}, \\s and the case-insensitive letters of the
                       contraction alternatives, and NFC results that differ from their input
                       (single code points and combining-class probes)
  debug_pretok.jsonl   with --debug: HF pre-tokenizer pieces per string (not committed)

Usage: make_golden_tokenizer.py --cache .cache/tokenizers --out OUT_DIR
"""

import argparse
import json
import os
import random
import sys
import traceback

from tokenizers import AddedToken, Regex, Tokenizer, __version__ as tokenizers_version
from tokenizers import normalizers, pre_tokenizers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_tokenizer_corpus  # noqa: E402

VOCABS = ["llama3_1", "qwen3"]
MAX_CP = 0x10FFFF


def all_scalars():
    return [c for c in range(MAX_CP + 1) if not 0xD800 <= c <= 0xDFFF]


def to_ranges(cps):
    ranges = []
    for c in sorted(cps):
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return ranges


def matched_set(pattern, scalars):
    """Code points that HF's regex engine matches with `pattern` (a one-character class)."""
    split = pre_tokenizers.Split(Regex(pattern), behavior="removed")
    text = "".join(map(chr, scalars))
    kept = set()
    for piece, _ in split.pre_tokenize_str(text):
        kept.update(map(ord, piece))
    return [c for c in scalars if c not in kept]


def unicode_oracle():
    scalars = all_scalars()
    out = {"tokenizers_version": tokenizers_version}
    for name, pattern in [("L", r"\p{L}"), ("N", r"\p{N}"), ("s", r"\s")]:
        out[name] = to_ranges(matched_set(pattern, scalars))
    out["casefold"] = {ch: matched_set(f"(?i:{ch})", scalars) for ch in "strevmld"}

    nfc = normalizers.NFC()
    # "\n" is a starter that composes with nothing, so it isolates each probe.
    probe_cps = [c for c in scalars if c != 0x0A]
    singles = nfc.normalize_str("\n".join(map(chr, probe_cps))).split("\n")
    assert len(singles) == len(probe_cps)
    out["nfc_single"] = {str(c): s for c, s in zip(probe_cps, singles) if s != chr(c)}
    probes = {}
    for name, fmt in [("x_c_0334", "x{}\u0334"), ("x_0301_c", "x\u0301{}"), ("c_0345", "{}\u0345")]:
        texts = [fmt.format(chr(c)) for c in probe_cps]
        got = nfc.normalize_str("\n".join(texts)).split("\n")
        assert len(got) == len(texts)
        probes[name] = {t: g for t, g in zip(texts, got) if g != t}
    out["nfc_probes"] = probes
    return out


EXTRA_ADDED = [  # content, single_word, lstrip, rstrip, normalized, special
    ("<ls>", False, True, False, False, True),
    ("<rs>", False, False, True, False, False),
    ("<both>", False, True, True, False, True),
    ("word", True, False, False, False, False),
    ("hello", True, True, False, False, True),
    ("caf\u00e9", False, False, False, True, False),
    ("\u212b", False, False, False, True, False),
    ("ab", False, False, False, False, False),
    ("abc", False, False, False, False, False),
    ("<n>", False, True, True, True, True),
]

EXTRA_TEXTS = [
    "  <ls>  x", "a<ls>b", "a \u3000\t<ls>", "<ls><ls> <ls>", "x<rs>   y", "x<rs>\n\n", "<rs> <ls>",
    "<rs>   <ls> z", "q <both>  r", " <both> <both> ", "<both>\u00a0\u2003y", "word words sword",
    "word_ word1 (word) w\u00f6rd word\u0301", "aword word.", "hello hello, ahello helloa  hello",
    "  hello", "cafe\u0301 caf\u00e9 CAF\u00c9", "\u212b \u00c5 A\u030a", "xabcx abab abcabc",
    "ab<rs>abc", " <n> ", "a<n>b", "<n> <n>\t<n>", "<|im_start|>word<|im_end|>", "", " ",
]


def added_token_cases(cache):
    tok = Tokenizer.from_file(os.path.join(cache, "qwen3", "models", "tokenizer.json"))
    tokens = []
    for content, single_word, lstrip, rstrip, normalized, special in EXTRA_ADDED:
        t = AddedToken(content, single_word=single_word, lstrip=lstrip, rstrip=rstrip,
                       normalized=normalized, special=special)
        tok.add_tokens([t])
        tokens.append({"content": content, "single_word": single_word, "lstrip": lstrip,
                       "rstrip": rstrip, "normalized": normalized, "special": special,
                       "id": tok.token_to_id(content)})
    cases = []
    for text in EXTRA_TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        cases.append({"text": text, "ids": ids,
                      "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)})
    return {"vocab": "qwen3", "added_tokens": tokens, "cases": cases}


def write_debug_pretok(toks, corpus, path):
    with open(path, "w", encoding="utf-8") as f:
        for text in corpus:
            row = {}
            for v in VOCABS:
                tok = toks[v]
                norm = tok.normalizer.normalize_str(text) if tok.normalizer else text
                row[v] = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(norm)]
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=".cache/tokenizers")
    ap.add_argument("--out", required=True)
    ap.add_argument("--debug", action="store_true", help="also write debug_pretok.jsonl")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    toks = {v: Tokenizer.from_file(os.path.join(args.cache, v, "models", "tokenizer.json")) for v in VOCABS}
    corpus = gen_tokenizer_corpus.generate(20261125)
    print(f"tokenizers {tokenizers_version}; corpus {len(corpus)} strings", flush=True)

    rng = random.Random(7)
    with_special = set(range(0, len(corpus), 37))
    encodings = {}
    with open(os.path.join(args.out, "golden.jsonl"), "w", encoding="utf-8") as f:
        for i, text in enumerate(corpus):
            row = {"text": text, "add_special_tokens": False}
            for v in VOCABS:
                row[v] = toks[v].encode(text, add_special_tokens=False).ids
                encodings.setdefault(v, []).append(row[v])
                decoded = toks[v].decode(row[v], skip_special_tokens=True)
                if decoded != text:
                    row[v + "_decoded"] = decoded
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
            if i in with_special:
                row = {"text": text, "add_special_tokens": True}
                for v in VOCABS:
                    row[v] = toks[v].encode(text, add_special_tokens=True).ids
                f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")

    with open(os.path.join(args.out, "golden_decode.jsonl"), "w", encoding="utf-8") as f:
        for v in VOCABS:
            tok = toks[v]
            n = tok.get_vocab_size(with_added_tokens=True)
            cases = []
            for ids in rng.sample([e for e in encodings[v] if len(e) <= 160], 100):
                cases.append(ids)
                if len(ids) > 2:  # truncations cut multi-byte characters in the middle
                    cases.append(ids[rng.randrange(1, len(ids)):])
                    cases.append(ids[: rng.randrange(1, len(ids))])
            for _ in range(200):  # random ids, added tokens included, out-of-range ids too
                cases.append([rng.randrange(n + 3) for _ in range(rng.randint(1, 16))])
            for ids in cases:
                for skip in (False, True):
                    row = {"vocab": v, "ids": ids, "skip_special_tokens": skip,
                           "text": tok.decode(ids, skip_special_tokens=skip)}
                    f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")

    meta = {"tokenizers_version": tokenizers_version}
    probes = ["<|begin_of_text|>", "<|eot_id|>", "<|im_start|>", "<think>", "<tool_call>", "Ġthe",
              "the", "ĠĠĠ", "Ċ", "ä½ł", "not a token"]
    for v in VOCABS:
        tok = toks[v]
        n = tok.get_vocab_size(with_added_tokens=True)
        meta[v] = {"vocab_size": n, "vocab_size_model": tok.get_vocab_size(with_added_tokens=False),
                   "token_to_id": {p: tok.token_to_id(p) for p in probes},
                   "id_to_token": {str(i): tok.id_to_token(i) for i in
                                   [0, 1, 220, 1000, 100000, n - 30, n - 2, n - 1, n, n + 5]}}
    with open(os.path.join(args.out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)

    failed = False
    try:
        with open(os.path.join(args.out, "golden_added.json"), "w", encoding="utf-8") as f:
            json.dump(added_token_cases(args.cache), f, ensure_ascii=False, indent=1)
    except Exception:  # keep going: the other outputs are independent
        traceback.print_exc()
        failed = True

    if args.debug:
        write_debug_pretok(toks, corpus, os.path.join(args.out, "debug_pretok.jsonl"))

    print("unicode oracle...", flush=True)
    try:
        oracle = unicode_oracle()
        with open(os.path.join(args.out, "hf_unicode.json"), "w", encoding="utf-8") as f:
            json.dump(oracle, f, ensure_ascii=False, separators=(",", ":"))
    except Exception:
        traceback.print_exc()
        failed = True
    print("failed" if failed else "done", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
