#!/usr/bin/env python3
"""Deterministic tokenizer conformance corpus.

Writes one JSON string per line (UTF-8, ensure_ascii=False) covering what byte-level BPE
tokenizers get wrong: prose in many scripts, code, numbers of every length, emoji sequences,
combining marks and non-NFC text, whitespace runs, contractions in any case, special tokens
inside prose, Unicode edge cases and very long inputs. The same seed always gives the same
corpus (only `random.Random` with a fixed seed is used), so fixtures can be regenerated.

Usage: scripts/gen_tokenizer_corpus.py [-o FILE] [--seed N]   (default: stdout)
"""

import argparse
import json
import random
import sys

PROSE = {
    "en": "the quick brown fox jumps over lazy dog while engineers measure throughput latency "
    "memory bandwidth and everything else they can find in a benchmark report today",
    "fr": "où est la bibliothèque élève garçon façade naïve cœur déjà très été forêt Noël "
    "l'homme qu'il s'était aperçu à côté de l'hôpital",
    "de": "Größe Straße Übermaß fußball Äpfel Öl müssen schön Grüße Mädchen Fräulein "
    "Schwarzwälder Kirschtorte Donaudampfschifffahrtsgesellschaft",
    "es": "niño señor año mañana corazón acción pingüino ¿qué tal? ¡olé! cigüeña jamón",
    "pl": "zażółć gęślą jaźń łódź źdźbło pchnąć w tę łódź jeża lub ośm skrzyń fig",
    "vi": "Tiếng Việt người đường phố hà nội thành phố hồ chí minh phở bò cảm ơn rất nhiều",
    "tr": "İstanbul ılık şoför çiçek ğüşöç Iğdır büyükşehir belediyesi",
    "ru": "Съешь же ещё этих мягких французских булок да выпей чаю Привет мир ёжик",
    "uk": "Чуєш їх доцю га кумедна ж ти прощайся без ґольфів Україна їжак",
    "el": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία καλημέρα κόσμε Ελλάδα ΑΘΗΝΑ ϊΐ",
    "ar": "مرحبا بالعالم اللغة العربية جميلة جدا الذكاء الاصطناعي كتاب مدرسة",
    "he": "שלום עולם עברית היא שפה שמית ספר בית ספר ירושלים",
    "hi": "नमस्ते दुनिया हिन्दी भाषा कृत्रिम बुद्धिमत्ता क़लम ज़रूर विद्यालय",
    "bn": "আমি বাংলায় গান গাই বাংলাদেশ কলকাতা ভাষা",
    "ta": "வணக்கம் உலகம் தமிழ் மொழி கணினி",
    "th": "สวัสดีชาวโลก ภาษาไทย ปัญญาประดิษฐ์ กรุงเทพมหานคร",
    "zh": "你好世界 人工智能 机器学习 深度学习 自然语言处理 中华人民共和国 繁體中文測試",
    "ja": "こんにちは世界 日本語のテキスト カタカナ ひらがな 東京都 ｶﾀｶﾅ 漢字",
    "ko": "안녕하세요 세계 한국어 텍스트 서울특별시 인공지능 대한민국",
    "ka": "გამარჯობა მსოფლიო ქართული ენა",
    "hy": "Բարեւ աշխարհ հայերեն լեզու",
    "am": "ሰላም ለዓለም አማርኛ ቋንቋ",
}

PUNCT = [".", ",", "!", "?", ";", ":", "...", " -", " —", "…", "،", "。", "、", "！", "？", "»", "«"]

CODE = [
    'def {f}(x, y=None):\n    """Docstring."""\n    if x > {n}:\n        return x ** 2\n    return [i for i in range(x)]\n',
    "#include <vector>\nint {f}(const std::vector<int>& v) {{\n\tint s = 0;\n\tfor (int x : v) s += x * {n};\n\treturn s;\n}}\n",
    "const {f} = async (url) => {{\n  const res = await fetch(`${{url}}/api?id={n}`);\n  return res.json();\n}};\n",
    "fn {f}(v: &[u32]) -> u64 {{\n    v.iter().map(|&x| x as u64 * {n}).sum::<u64>()\n}}\n",
    "func {f}(ch chan<- int) {{\n\tfor i := 0; i < {n}; i++ {{\n\t\tch <- i\n\t}}\n\tclose(ch)\n}}\n",
    "SELECT u.id, COUNT(*) AS n FROM users u JOIN orders o ON o.uid = u.id WHERE o.total > {n} GROUP BY u.id;\n",
    '<div class="{f}" data-n="{n}">\n  <a href="https://example.com/?q={f}&amp;x=1">link</a>\n</div>\n',
    '{{"name": "{f}", "values": [{n}, -1.5e-3, true, null], "nested": {{"k": "v\\n"}}}}\n',
    "for f in *.txt; do\n  grep -c '{f}' \"$f\" | awk '{{s+=$1}} END {{print s}}'; done 2>/dev/null && echo {n}\n",
    "    \t// {f}: trailing spaces and tabs   \t\n\n\n    return {n};;;\r\n",
    "x<<={n}; y>>=2; z=a&&b||!c; p->q; a::b; i++; --j; k!=l; m**=2; r//=3; s%=4; t^=~u;\n",
    "@media (max-width: {n}px) {{ .{f} {{ margin: 0 auto; color: #ff00ff; }} }}\n",
]

SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_247|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|vision_start|>",
    "<|image_pad|>",
    "<tool_response>",
]

NEAR_SPECIALS = [
    "<|im_start",
    "im_start|>",
    "<|im_start|>>",
    "<<|im_end|>",
    "<|IM_START|>",
    "< |im_end| >",
    "<|eot_id|",
    "<|begin_of_text|><|begin_of_text|>",
    "<|reserved_special_token_999|>",
    "<thinking>",
    "</think >",
]

EMOJI = [
    "😀", "🚀", "❤️", "👍", "👍🏽", "👩🏿‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸", "🇯🇵", "🇩🇪🇫🇷",
    "1️⃣", "#️⃣", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "🧑‍🤝‍🧑", "👁️‍🗨️", "🤷‍♀️", "🫠", "🪿", "✅", "☕", "©️", "™",
]

WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", "\u00a0", "\u3000", "\u2009", "\u200b",
              "\u2028", "\u2029", "\u0085", "\u180e", "\u000b", "\u000c", "\u1680", "\u202f", "\ufeff"]

CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ve", "'M", "'LL",
                "'lL", "'D", "'ſ", "'K", "’s", "’ll", "''s", "'x", "'"]

# Code points chosen for edge cases: replacement char, joiners, bidi controls, noncharacters,
# private use, the maximum scalar value, letters and digits assigned after Unicode 14 (where the
# regex engine's Unicode tables may lag HF's), and characters whose NFC form differs.
EDGE_CHARS = [
    "\ufffd", "\u200d", "\u200c", "\u200e", "\u200f", "\u202e", "\u2066", "\u2069", "\ufeff",
    "\ufffe", "\uffff", "\ue000", "\U000f0000", "\U0010ffff", "\x00", "\x01", "\x07", "\x1b",
    "\x7f", "\x80", "\x9f", "\u00ad", "\u034f", "\ufe0f", "\U000e0001", "\U00031350", "\U0002ebf0",
    "\U00011f00", "\U0001e4d0", "\U00010d40", "\U00011f50", "\U0001e4f0", "\U0001d2c0", "\u0c5d",
    "\U0001f6dd", "\U0001fae8", "\u212b", "\u2126", "\uf900", "\u0344", "\u0958", "\ufb1d",
    "\u1e9b\u0323", "\U0001d15e", "\u0f73", "\u2adc", "\U0002f800", "\u0340", "\u0374", "\u037e",
    "\u0387", "\u1100\u1161\u11a8", "\uac00\u11a8", "\u0e33", "\u00c5", "\u0041\u030a",
    "\u0065\u0301", "\u0301", "\u0301\u0065", "\u0063\u0327\u0301", "\u0061\u0316\u0301\u0334",
    "\u05d0\u05b8\u05bc", "\u0915\u093c", "\u09c7\u09be", "\u0b47\u0b3e", "\u1025\u102e",
]

LONG_WORD_ALPHABETS = ["abcdefghij", "ᄀᄁᄂ가각갂", "αβγδε", "кошка", "的一是不了", "0123456789", "!@#$%^&*"]


def words(lang):
    return PROSE[lang].split()


def sentence(rng, lang, n=None):
    ws = words(lang)
    n = n or rng.randint(3, 14)
    out = []
    for i in range(n):
        w = rng.choice(ws)
        if i == 0 and rng.random() < 0.5:
            w = w[:1].upper() + w[1:]
        out.append(w)
        if rng.random() < 0.12:
            out[-1] += rng.choice(PUNCT)
    sep = "" if lang in ("zh", "ja", "th") and rng.random() < 0.6 else " "
    return sep.join(out) + rng.choice([".", "!", "?", "", "。", " ", "\n"])


def number(rng, length):
    digits = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(length - 1))
    style = rng.randrange(9)
    if style == 0:
        return digits
    if style == 1:  # thousands separators
        head = len(digits) % 3 or 3
        parts = [digits[:head]] + [digits[i:i + 3] for i in range(head, len(digits), 3)]
        return rng.choice([",", ".", " ", "\u00a0", "_", "'"]).join(parts)
    if style == 2:
        cut = rng.randint(0, len(digits))
        return "-" + digits[:cut] + "." + digits[cut:]
    if style == 3:
        return digits + rng.choice(["kg", "%", "px", "e-10", "th", " MB/s", "€", "$", "km²"])
    if style == 4:  # non-ASCII digits
        base = rng.choice([0x660, 0x966, 0xFF10, 0x9E6, 0xE50, 0x1D7CE, 0x6F0])
        return "".join(chr(base + int(d)) for d in digits)
    if style == 5:
        return "v" + ".".join(digits[i:i + 2] for i in range(0, len(digits), 2))
    if style == 6:
        return "+" + digits[:2] + " (" + digits[2:5] + ") " + digits[5:]
    if style == 7:
        return digits + rng.choice(["½", "²", "³", "¼", "Ⅻ", "⅔", "①", "𝟙"])
    return "0x" + format(int(digits) % (1 << 64), "X") + " " + digits


def random_codepoints(rng, n):
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
              (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF),
              (0x2000, 0x206F), (0x2190, 0x22FF), (0x3000, 0x30FF), (0x4E00, 0x9FFF),
              (0xAC00, 0xD7A3), (0xFB00, 0xFDFF), (0xFE00, 0xFE6F), (0xFF00, 0xFFEF),
              (0x1F300, 0x1FAFF), (0x10000, 0x1007F), (0x1D400, 0x1D7FF), (0x20000, 0x2A6DF),
              (0x0, 0x1F), (0x80, 0x9F), (0xE000, 0xE0FF), (0xE0000, 0xE007F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(blocks)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def whitespace_soup(rng):
    parts = []
    for _ in range(rng.randint(1, 8)):
        r = rng.random()
        if r < 0.5:
            parts.append(rng.choice(WHITESPACE) * rng.randint(1, 6))
        elif r < 0.8:
            parts.append(rng.choice(words(rng.choice(list(PROSE)))))
        else:
            parts.append(rng.choice(PUNCT + ["123", "x", "'s", "😀"]))
    return "".join(parts)


def special_prose(rng):
    parts = []
    for _ in range(rng.randint(1, 6)):
        r = rng.random()
        if r < 0.4:
            parts.append(rng.choice(SPECIALS))
        elif r < 0.5:
            parts.append(rng.choice(NEAR_SPECIALS))
        else:
            parts.append(sentence(rng, rng.choice(["en", "fr", "zh", "ru"]), rng.randint(1, 5)))
        if rng.random() < 0.5:
            parts.append(rng.choice(["", " ", "\n", "  ", "\t"]))
    return "".join(parts)


def chat(rng):
    roles = ["system", "user", "assistant"]
    out = []
    for role in roles[: rng.randint(1, 3)]:
        body = sentence(rng, rng.choice(list(PROSE)))
        if rng.random() < 0.5:
            out.append(f"<|im_start|>{role}\n{body}<|im_end|>\n")
        else:
            out.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{body}<|eot_id|>")
    if rng.random() < 0.5:
        out.insert(0, "<|begin_of_text|>")
    return "".join(out)


def mixed(rng, target_chars):
    gens = [
        lambda: sentence(rng, rng.choice(list(PROSE))),
        lambda: rng.choice(CODE).format(f="fn_" + str(rng.randint(0, 999)), n=rng.randint(0, 10**6)),
        lambda: number(rng, rng.randint(1, 40)),
        lambda: "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 4))),
        lambda: whitespace_soup(rng),
        lambda: special_prose(rng),
        lambda: random_codepoints(rng, rng.randint(1, 12)),
        lambda: rng.choice(EDGE_CHARS),
    ]
    out = []
    size = 0
    while size < target_chars:
        piece = rng.choice(gens)()
        if rng.random() < 0.7:
            piece += rng.choice([" ", "\n", "", "\n\n", "\t"])
        out.append(piece)
        size += len(piece)
    return "".join(out)[:target_chars]


def generate(seed):
    rng = random.Random(seed)
    corpus = ["", " ", "\n", "a", "A", "0", "'", "''", "'s", "😀", "\r\n", "  \n  "]

    for lang in PROSE:  # prose per script, plus all-caps and title-case variants
        for _ in range(28):
            s = sentence(rng, lang)
            r = rng.random()
            corpus.append(s.upper() if r < 0.1 else s.title() if r < 0.2 else s)
    for _ in range(120):  # paragraphs mixing scripts
        langs = rng.sample(list(PROSE), rng.randint(2, 4))
        corpus.append(" ".join(sentence(rng, lang) for lang in langs))

    for _ in range(10):  # code
        for tmpl in CODE:
            corpus.append(tmpl.format(f=rng.choice(["foo", "bar_baz", "Ünïcode", "x1", "getHTTPResponse"]),
                                      n=rng.randint(0, 10**rng.randint(1, 12))))

    for length in range(1, 41):  # numbers of every length with separators
        for _ in range(6):
            corpus.append(number(rng, length))
        corpus.append("Total: " + number(rng, length) + " items, " + number(rng, length) + ".")

    for _ in range(120):  # emoji
        seq = "".join(rng.choice(EMOJI) + rng.choice(["", "", " ", "\u200d"]) for _ in range(rng.randint(1, 6)))
        corpus.append(rng.choice(["", "I love it ", "ok"]) + seq + rng.choice(["", "!", " yes", "\n"]))

    for c in EDGE_CHARS:  # unicode edge cases alone, in words and next to each other
        corpus.append(c)
        corpus.append("abc" + c + "def")
        corpus.append(" " + c + " " + c + c)
    for _ in range(60):
        corpus.append("".join(rng.choice(EDGE_CHARS) for _ in range(rng.randint(2, 8))))

    for _ in range(100):  # combining marks: zalgo, decomposed letters, stacked marks
        base = rng.choice(["a", "e", "o", "Z", "ㄱ", "क", "α", " ", "1", "\u3042"])
        marks = "".join(chr(rng.randint(0x300, 0x36F)) for _ in range(rng.randint(1, 7)))
        corpus.append(base + marks + rng.choice(["", "x", " y", marks[::-1]]))

    for _ in range(150):  # whitespace runs
        corpus.append(whitespace_soup(rng))
    for n in range(1, 40, 3):
        corpus.append(" " * n + "x" + " " * n)
        corpus.append("\t" * n + "y\n" + "\n" * n)
        corpus.append("a" + "\r\n" * n + "b")
        corpus.append("word" + " " * n)

    for _ in range(100):  # contractions in any case
        w1 = rng.choice(["it", "IT", "He", "they", "We", "you", "I", "don", "Can", "o"])
        c = rng.choice(CONTRACTIONS)
        corpus.append(w1 + c + rng.choice(["", " ", " go", "n't", "s", "'s", c.upper()]))

    for _ in range(160):  # special tokens inside prose and chat-shaped text
        corpus.append(special_prose(rng))
    for _ in range(60):
        corpus.append(chat(rng))
    for s in SPECIALS + NEAR_SPECIALS:
        corpus.append(s)
        corpus.append("x" + s + "y")
        corpus.append(" " + s + " ")

    for _ in range(200):  # random code point soup
        corpus.append(random_codepoints(rng, rng.randint(1, 40)))
    for _ in range(200):  # random mixtures of everything
        corpus.append(mixed(rng, rng.randint(10, 600)))

    for alphabet in LONG_WORD_ALPHABETS:  # long runs: one huge pre-token each
        corpus.append("".join(rng.choice(alphabet) for _ in range(rng.randint(3000, 6000))))
    corpus.append(" " * 5000)
    corpus.append("\n" * 3000 + "x")
    corpus.append("a" * 8000)
    for size in (20000, 12000):  # very long mixed inputs
        corpus.append(mixed(rng, size))
    return corpus


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", help="output file (default: stdout)")
    ap.add_argument("--seed", type=int, default=20261125)
    args = ap.parse_args()
    corpus = generate(args.seed)
    for s in corpus:  # every entry must be valid UTF-8 text (no surrogates)
        s.encode("utf-8")
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    for s in corpus:
        out.write(json.dumps(s, ensure_ascii=False) + "\n")
    if args.output:
        out.close()
    print(f"{len(corpus)} strings, {sum(len(s.encode()) for s in corpus)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
