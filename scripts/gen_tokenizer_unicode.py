#!/usr/bin/env python3
"""Generates src/tokenizer/unicode_tables.cpp: the Unicode data Kestrel's tokenizer needs to agree
with HF `tokenizers` 0.23 exactly.

1. Regex character classes. HF runs the pre-tokenizer regex with Oniguruma (onig_sys 69.9.3, whose
   tables are Unicode 16.0); Kestrel runs it with PCRE2 (Debian 12: 10.42, Unicode 14.0). The
   letters and numbers assigned since Unicode 14 are emitted as ranges that Kestrel adds to \\p{L}
   and \\p{N}, and Oniguruma's \\s (the White_Space property, which unlike PCRE2's \\s does not
   contain U+180E) is emitted as an explicit set. The Oniguruma sets come from HF itself: the
   hf_unicode.json that scripts/make_golden_tokenizer.py records on a machine with HF installed.
   The PCRE2 baseline is this Python's unicodedata (Unicode 14.0 here, the same as PCRE2 10.42).

2. NFC. HF's NFC normalizer is unicode-normalization-alignments 0.1.12, whose tables are
   Unicode 9.0. Canonical decompositions, combining classes and composition exclusions never change
   for an assigned character (Unicode stability policy), so the Unicode 9.0 tables are this
   Python's tables restricted to the code points assigned by Unicode 9.0. Character ages come from
   ICU (libicuuc, via ctypes). hf_unicode.json also holds HF's NFC output per code point, which the
   unit tests compare against.

Usage: scripts/gen_tokenizer_unicode.py --hf-unicode tests/golden/tokenizer/hf_unicode.json \\
           [-o src/tokenizer/unicode_tables.cpp]
"""

import argparse
import ctypes
import ctypes.util
import glob
import json
import unicodedata

NFC_UNICODE_AGE = (9, 0)
MAX_CP = 0x10FFFF


def load_icu_age():
    candidates = glob.glob("/usr/lib/*/libicuuc.so.*") + glob.glob("/usr/lib/libicuuc.so.*")
    name = ctypes.util.find_library("icuuc")
    if name:
        candidates.insert(0, name)
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in [""] + [f"_{v}" for v in range(90, 50, -1)]:
            fn = getattr(lib, "u_charAge" + suffix, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int32, ctypes.c_char_p]
                fn.restype = None

                def age(cp, fn=fn):
                    buf = ctypes.create_string_buffer(4)
                    fn(cp, buf)
                    return tuple(buf.raw[:2])

                return age
    raise SystemExit("ICU (libicuuc) not found: install libicu-dev / libicu72")


def ranges_to_set(ranges):
    out = set()
    for lo, hi in ranges:
        out.update(range(lo, hi + 1))
    return out


def to_ranges(cps):
    out = []
    for c in sorted(cps):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def python_category_set(prefix):
    return {c for c in range(MAX_CP + 1) if unicodedata.category(chr(c)).startswith(prefix)}


def canonical_mapping(cp):
    d = unicodedata.decomposition(chr(cp))
    if not d or d.startswith("<"):
        return None
    return [int(x, 16) for x in d.split()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-unicode", required=True)
    ap.add_argument("-o", "--output", default="src/tokenizer/unicode_tables.cpp")
    args = ap.parse_args()

    hf = json.load(open(args.hf_unicode, encoding="utf-8"))
    onig_letter = ranges_to_set(hf["L"])
    onig_number = ranges_to_set(hf["N"])
    onig_space = ranges_to_set(hf["s"])
    base_letter = python_category_set("L")
    base_number = python_category_set("N")
    # Kestrel adds to PCRE2's classes; it cannot take code points out of \p{L} or \p{N}.
    for name, onig, base in [("L", onig_letter, base_letter), ("N", onig_number, base_number)]:
        removed = base - onig
        if removed:
            raise SystemExit(f"\\p{{{name}}}: {len(removed)} code points left the class, e.g. "
                             f"{sorted(removed)[:5]}; the add-only scheme no longer suffices")
    letter_extra = to_ranges(onig_letter - base_letter)
    number_extra = to_ranges(onig_number - base_number)
    space = to_ranges(onig_space)

    age = load_icu_age()
    assigned = {c for c in range(MAX_CP + 1) if age(c) != (0, 0) and age(c) <= NFC_UNICODE_AGE}

    ccc = {c: unicodedata.combining(chr(c)) for c in assigned if unicodedata.combining(chr(c))}

    def full_decomposition(cp):
        m = canonical_mapping(cp)
        if m is None or cp not in assigned:
            return [cp]
        out = []
        for x in m:
            out.extend(full_decomposition(x))
        return out

    decomp = {}
    for c in sorted(assigned):
        if 0xAC00 <= c <= 0xD7A3:  # Hangul syllables decompose algorithmically
            continue
        if canonical_mapping(c) is not None:
            decomp[c] = full_decomposition(c)

    # Primary composites: two-element canonical mappings that NFC leaves intact (not excluded,
    # not singletons, starter first element).
    compositions = []
    for c in sorted(assigned):
        m = canonical_mapping(c)
        if m is None or len(m) != 2 or 0xAC00 <= c <= 0xD7A3:
            continue
        if unicodedata.normalize("NFC", chr(c)) != chr(c) or ccc.get(m[0], 0) != 0:
            continue
        compositions.append((m[0], m[1], c))

    # Characters that can change under NFC (NFC_Quick_Check != Yes) or carry a combining class.
    unsafe = set(ccc)
    for c, d in decomp.items():
        if unicodedata.normalize("NFC", chr(c)) != chr(c):
            unsafe.add(c)
    unsafe.update(second for _, second, _ in compositions)
    unsafe.update(range(0x1161, 0x1176))  # Hangul V jamo compose with a preceding L
    unsafe.update(range(0x11A8, 0x11C3))  # Hangul T jamo compose with a preceding LV
    assert min(unsafe) >= 0x300, "the NFC fast path assumes nothing below U+0300 can change"

    ccc_ranges = []
    for c in sorted(ccc):
        if ccc_ranges and ccc_ranges[-1][1] == c - 1 and ccc_ranges[-1][2] == ccc[c]:
            ccc_ranges[-1][1] = c
        else:
            ccc_ranges.append([c, c, ccc[c]])

    flat = []
    decomp_rows = []
    for c, d in sorted(decomp.items()):
        decomp_rows.append((c, len(flat), len(d)))
        flat.extend(d)
    assert len(flat) < 65536

    def fmt_rows(rows, per_line):
        lines = []
        for i in range(0, len(rows), per_line):
            lines.append("    " + " ".join(rows[i:i + per_line]))
        return "\n".join(lines)

    def range_rows(rs):
        return fmt_rows([f"{{0x{a:X}, 0x{b:X}}}," for a, b in rs], 4)

    out = []
    out.append("// Generated by scripts/gen_tokenizer_unicode.py; do not edit by hand.")
    out.append(f"// Regex classes: Oniguruma (HF tokenizers {hf.get('tokenizers_version', '?')}) minus "
               f"Unicode {unicodedata.unidata_version} (PCRE2's baseline).")
    out.append("// NFC: Unicode 9.0 (unicode-normalization-alignments 0.1.12, used by HF's NFC).")
    out.append('#include "tokenizer/unicode_tables.h"\n')
    out.append("// clang-format off")
    out.append("namespace kestrel::unicode_tables {\nnamespace {\n")
    out.append(f"const CodeRange kLetterExtra[] = {{\n{range_rows(letter_extra)}\n}};\n")
    out.append(f"const CodeRange kNumberExtra[] = {{\n{range_rows(number_extra)}\n}};\n")
    out.append(f"const CodeRange kWhiteSpace[] = {{\n{range_rows(space)}\n}};\n")
    out.append("const CccRange kCombiningClass[] = {\n" +
               fmt_rows([f"{{0x{a:X}, 0x{b:X}, {k}}}," for a, b, k in ccc_ranges], 3) + "\n};\n")
    out.append("const uint32_t kDecompositionData[] = {\n" +
               fmt_rows([f"0x{x:X}," for x in flat], 8) + "\n};\n")
    out.append("const Decomposition kDecompositions[] = {\n" +
               fmt_rows([f"{{0x{c:X}, {o}, {n}}}," for c, o, n in decomp_rows], 4) + "\n};\n")
    out.append("const Composition kCompositions[] = {\n" +
               fmt_rows([f"{{0x{a:X}, 0x{b:X}, 0x{c:X}}}," for a, b, c in sorted(compositions)], 3) +
               "\n};\n")
    out.append(f"const CodeRange kNfcUnsafe[] = {{\n{range_rows(to_ranges(unsafe))}\n}};\n")
    out.append("}  // namespace\n")
    for fn, arr, typ in [("letter_extra", "kLetterExtra", "CodeRange"),
                         ("number_extra", "kNumberExtra", "CodeRange"),
                         ("white_space", "kWhiteSpace", "CodeRange"),
                         ("combining_classes", "kCombiningClass", "CccRange"),
                         ("decomposition_data", "kDecompositionData", "uint32_t"),
                         ("decompositions", "kDecompositions", "Decomposition"),
                         ("compositions", "kCompositions", "Composition"),
                         ("nfc_unsafe", "kNfcUnsafe", "CodeRange")]:
        out.append(f"std::span<const {typ}> {fn}() {{ return {arr}; }}")
    out.append("\n}  // namespace kestrel::unicode_tables")
    out.append("// clang-format on")
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
    print(f"{args.output}: {len(letter_extra)} letter, {len(number_extra)} number extra ranges; "
          f"{len(ccc_ranges)} ccc ranges, {len(decomp_rows)} decompositions, "
          f"{len(compositions)} compositions, {len(to_ranges(unsafe))} unsafe ranges")


if __name__ == "__main__":
    main()
