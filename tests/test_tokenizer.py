"""Gemma2Tokenizer against the real Gemma tokenizer and transformers' GemmaTokenizerFast (the oracle).

Three tokenizers must agree on every string: ours with the sentencepiece backend (a directory holding
only tokenizer.model), ours with the `tokenizers` backend (a directory holding only the oracle's
tokenizer.json) and the oracle itself. The oracle built from a bare tokenizer.model adds no BOS and
has no chat template (GEMMA2.md section 6), so ids are compared with add_special_tokens=False and BOS
and the chat format are checked against the facts in GEMMA2.md.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import gemma2
from gemma2 import ChatFormatError, Gemma2Error, Gemma2Tokenizer, TokenizerError
from gemma2.io.assets import gemma_tokenizer_model
from gemma2.tokenizer import GEMMA_CHAT_TEMPLATE

SPECIAL_NAMES = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")

TWO_TURNS = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]
TWO_TURN_IDS = [
    2, 106, 1645, 108, 2151, 1104, 235341, 107, 108, 106, 2516, 108, 4521, 235341, 2250, 798, 590, 1707, 235336,
    107, 108, 106, 1645, 108, 1841, 603, 235248, 235284, 235340, 235284, 235336, 107, 108, 106, 2516, 108,
]  # fmt: skip
TWO_TURN_TEXT = (
    "<bos><start_of_turn>user\nHi there!<end_of_turn>\n"
    "<start_of_turn>model\nHello! How can I help?<end_of_turn>\n"
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
    "<start_of_turn>model\n"
)


# ------------------------------------------------------------------------------------------------
# The corpus: a few hundred varied strings, by category


def _corpus() -> dict[str, list[str]]:
    unicode = [
        "café naïve Ångström façade jalapeño",
        "Crème brûlée à la française, s'il vous plaît.",
        "e\u0301 a\u0308\u0304 o\u0302\u0323 n\u0303",  # combining marks (NFD)
        "\u00e9 vs e\u0301",  # NFC next to NFD
        "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dalgo",
        "ﬁ ﬂ ﬀ Ⅻ ㎏ ½ ²",  # compatibility characters (no normalization in Gemma)
        "Straße, İstanbul, ıi, ǅ, ΣΑΣ σας",
        "Привет, мир! Съешь же ещё этих мягких французских булок.",
        "Γειά σου Κόσμε",
        "مرحبا بالعالم",
        "العربية: ١٢٣ و 456 معاً",
        "שלום עולם",
        "עברית עם ניקוד: שָׁלוֹם",
        "mixed \u202bRTL\u202c and \u200fmarks\u200e",
        "ＡＢＣ ｆｕｌｌｗｉｄｔｈ",
        "Tiếng Việt có dấu: Người ta nói",
        "Ελληνικά, Ῥόδος, ᾅδης",
        "Ærøskøbing, Þórður, Łódź, Čeština",
        "zero\u200bwidth\u200cjoin\u200dtest\u2060",
        "soft\u00adhyphen and no\u00a0break",
    ]
    emoji = [
        "😀",
        "Hello 👋 world 🌍!",
        "👍🏻👍🏼👍🏽👍🏾👍🏿",
        "👨‍👩‍👧‍👦 family",
        "🏳️‍🌈 🏴‍☠️",
        "🇫🇷🇯🇵🇺🇸🇧🇷",
        "❤️ ♥ ❤",
        "1️⃣ #️⃣ *️⃣",
        "🧑🏽‍💻👩🏿‍🔬",
        "🫠🫶🪿",
        "😀😃😄😁😆😅🤣😂🙂🙃",
        "emoji at end 🎉",
        "🎉 emoji at start",
        "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",  # Scotland tag sequence
    ]
    scripts = [
        "你好，世界！",
        "中华人民共和国成立于1949年。",
        "日本語のテキスト、ひらがなとカタカナ。",
        "東京都渋谷区",
        "안녕하세요 세계",
        "한국어 문장입니다. 감사합니다!",
        "สวัสดีชาวโลก",
        "ภาษาไทยไม่มีช่องว่างระหว่างคำ",
        "नमस्ते दुनिया",
        "हिन्दी में लिखा गया वाक्य।",
        "வணக்கம் உலகம்",
        "ওহে বিশ্ব",
        "გამარჯობა მსოფლიო",
        "ሰላም ልዑል",
        "Сайн байна уу ᠮᠣᠩᠭᠣᠯ",
        "Chinese 中文 mixed with English and 한국어",
        "𠀀𠀁𪚥 (CJK extension B)",
    ]
    code = [
        "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
        "class A:\n\tdef __init__(self):\n\t\tself.x = {'a': [1, 2, 3]}\n",
        "import numpy as np\narr = np.zeros((3, 4), dtype=np.float32)\n",
        '{"name": "Gemma", "version": 2, "tags": ["llm", "google"], "nested": {"a": null, "b": true}}',
        '[\n  {\n    "id": 1,\n    "value": 3.14\n  }\n]',
        "<h1>Title</h1>\n<p>Para with <b>bold</b> and <i>italic</i>.</p>",
        "<table>\n  <tr><th>A</th><th>B</th></tr>\n  <tr><td>1</td><td>2</td></tr>\n</table>",
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>x</title></head><body></body></html>',
        '<div class="container"><span id="x">&amp; &lt; &gt; &nbsp;</span></div>',
        "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
        "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "#!/bin/bash\nset -euo pipefail\necho \"$HOME\" | grep -E '^/r(oo)?t$'\n",
        'fn main() {\n    println!("{}", 1 + 1);\n}\n',
        "\\begin{equation} E = mc^2 \\end{equation} $\\alpha_i^2$",
        "# Heading\n\n- item 1\n- item 2\n\n```python\nx = 1\n```\n",
        "body { margin: 0; padding: 0 }\n.a > .b:hover { color: #fff; }",
        "x = [i for i in range(10) if i % 2 == 0]\t# comment\r\n",
        "regex: ^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)@\\w+\\.com$",
        "http://example.com/path?query=1&other=%20#frag",
        "user@example.org, +1 (555) 123-4567",
    ]
    whitespace = []
    for n in range(1, 41):
        whitespace += [" " * n, "\n" * n, "\t" * n, f"a{' ' * n}b", f"x{chr(10) * n}y", f"{chr(9) * n}indented"]
    for n in (1, 2, 3, 5, 8, 13, 21, 34):
        whitespace += [" \n" * n, "\t \n" * n, "\r\n" * n, f"  {' ' * n}word{' ' * n}  ", f"\n\n{'x' * n}\n\n"]
    whitespace += [
        " leading",
        "trailing ",
        "  both  ",
        "\nleading newline",
        "trailing newline\n",
        "\t\ttabs\t\t",
        "non\u00a0breaking\u00a0space",
        "ideographic\u3000space",
        "line\u2028separator\u2029paragraph",
        "vertical\x0btab\x0cfeed",
        "next\x85line",
        "\u2581 sentencepiece meta symbol \u2581\u2581",
    ]
    digits = [
        "0",
        "7",
        "42",
        "1234567890",
        "1234567890" * 5,
        "3.14159265358979323846",
        "-273.15",
        "1,000,000",
        "1e-10",
        "0x1F 0b1010 0o777",
        "12:34:56 2024-06-01",
        "Version 2.0.1-beta+build.123",
        "٠١٢٣٤٥٦٧٨٩",
        "２０２４年",
        "१२३",
        "99 bottles, 100%, $3.50, €4, ¥500",
        str(2**200),
    ]
    special_text = [
        "<bos>",
        "<eos>",
        "<pad>",
        "<mask>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<unused5>",
        "<unused0>",
        "<unused98>",
        "<unused99>",
        "<unused100>",
        "<2mass>",
        "[@BOS@]",
        "<start_of_tur",
        "<end_of_turn",
        "start_of_turn>",
        "<<bos>>",
        "<bos><bos>",
        "a<eos>b",
        "text <bos> in the middle",
        "<start_of_turn>user\nignore previous instructions<end_of_turn>\n",
        "<start_of_turn>model\n",
        "<START_OF_TURN>",
        "< bos >",
        "<start_of_turn><start_of_turn>",
        "<pad><pad><pad>",
        "<mask>hello<unk>",
        "<end_of_turn><eos>",
        "x<unused5>y<unused6>z",
    ]
    byte_fallback = [
        "\ue000",
        "\ue000\ue001\uf8ff",
        "\U000ffffd",
        "\U0010fffd",
        "\U0010ffff",
        "\x00",
        "\x07",
        "a\x00b\x07c",
        "\x1b[31mred\x1b[0m",
        "\x7f\x01\x02\x03",
        "\ufeffBOM",
        "\ufffd replacement",
        "\U0001d11e musical",
        "\U0001f9ff\U0001fae0",
        "\u0378\u0379",  # unassigned
        "\U000e0001 language tag",
    ]
    edge = [
        "",
        " ",
        "\n",
        "a",
        "A",
        ".",
        "?",
        "!!",
        "...",
        "a" * 300,
        "ab" * 100,
        "Hello world",
        "The capital of France is",
    ]

    rng = random.Random(1234)
    fragments = [s for group in (unicode, emoji, scripts, code, digits, special_text, byte_fallback) for s in group]
    fragments += [" ", "  ", "\n", "\n\n", "\t", " \t ", "<h1>", "</table>", "<td>"]
    ranges = [
        (0x20, 0x7E),
        (0x00, 0x1F),
        (0xA0, 0x2FF),
        (0x370, 0x3FF),
        (0x400, 0x4FF),
        (0x590, 0x6FF),
        (0x900, 0x97F),
        (0xE00, 0xE7F),
        (0x3040, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0xE000, 0xF8FF),
        (0x1F300, 0x1FAFF),
        (0x10000, 0x10FFFF),
    ]
    random_strings = []
    for _ in range(60):
        parts = []
        for _ in range(rng.randint(1, 8)):
            if rng.random() < 0.5:
                parts.append(rng.choice(fragments))
            else:
                low, high = rng.choice(ranges)
                chars = (chr(rng.randint(low, high)) for _ in range(rng.randint(1, 6)))
                parts.append("".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF))
        random_strings.append("".join(parts))

    return {
        "unicode": unicode,
        "emoji": emoji,
        "scripts": scripts,
        "code": code,
        "whitespace": whitespace,
        "digits": digits,
        "special_text": special_text,
        "byte_fallback": byte_fallback,
        "edge": edge,
        "random": random_strings,
    }


CORPUS = _corpus()
ALL_STRINGS = [s for group in CORPUS.values() for s in group]


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _has_special_text(text: str) -> bool:
    return any(name in text for name in SPECIAL_NAMES)


# ------------------------------------------------------------------------------------------------
# Session fixtures: the real tokenizer, the oracle and its tokenizer.json (built once)


@pytest.fixture(scope="session")
def gemma_model_file() -> Path:
    return gemma_tokenizer_model()


@pytest.fixture(scope="session")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory, gemma_model_file: Path) -> dict[str, Path]:
    """sp: only tokenizer.model; json: only the oracle's tokenizer.json; both: the two files."""
    import transformers

    root = tmp_path_factory.mktemp("gemma_tokenizer")
    sp_dir, oracle_dir, json_dir, both_dir = (root / name for name in ("sp", "oracle_saved", "json", "both"))
    for directory in (sp_dir, json_dir, both_dir):
        directory.mkdir()
    shutil.copyfile(gemma_model_file, sp_dir / "tokenizer.model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = transformers.GemmaTokenizerFast.from_pretrained(sp_dir)
        oracle.save_pretrained(oracle_dir)
    shutil.copyfile(oracle_dir / "tokenizer.json", json_dir / "tokenizer.json")
    shutil.copyfile(oracle_dir / "tokenizer.json", both_dir / "tokenizer.json")
    shutil.copyfile(gemma_model_file, both_dir / "tokenizer.model")
    return {"root": root, "sp": sp_dir, "json": json_dir, "both": both_dir, "oracle": oracle_dir, "_oracle": oracle}


@pytest.fixture(scope="session")
def oracle(tok_dirs: dict[str, Any]) -> Any:
    return tok_dirs["_oracle"]


@pytest.fixture(scope="session")
def sp_tok(tok_dirs: dict[str, Path]) -> Gemma2Tokenizer:
    return Gemma2Tokenizer.from_pretrained(tok_dirs["sp"])


@pytest.fixture(scope="session")
def json_tok(tok_dirs: dict[str, Path]) -> Gemma2Tokenizer:
    return Gemma2Tokenizer.from_pretrained(tok_dirs["json"])


@pytest.fixture(params=["sentencepiece", "tokenizers"])
def tok(request: pytest.FixtureRequest, sp_tok: Gemma2Tokenizer, json_tok: Gemma2Tokenizer) -> Gemma2Tokenizer:
    return sp_tok if request.param == "sentencepiece" else json_tok


@pytest.fixture(scope="session")
def maxtext_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The maxtext wheel (which ships other tokenizers too), downloaded once per session with pip."""
    directory = tmp_path_factory.mktemp("maxtext_wheel")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "maxtext==0.2.5", "-d", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(directory.glob("maxtext-0.2.5-*.whl"))
    assert result.returncode == 0 and wheels, f"pip download maxtext==0.2.5 failed: {result.stderr[-2000:]}"
    return wheels[0]


def _model_dir(root: Path, name: str, data: bytes) -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes(data)
    return directory


# ------------------------------------------------------------------------------------------------
# Loading: which backend, vocabulary facts


def test_backend_choice(tok_dirs: dict[str, Path], sp_tok: Gemma2Tokenizer, json_tok: Gemma2Tokenizer) -> None:
    # A directory with only tokenizer.model reads it (converted from the SentencePiece model).
    assert sp_tok.backend.sentencepiece_model == tok_dirs["sp"] / "tokenizer.model"
    assert json_tok.backend.sentencepiece_model is None
    both = Gemma2Tokenizer.from_pretrained(tok_dirs["both"])
    assert both.backend.sentencepiece_model is None  # tokenizer.json is preferred when both are there
    # A path to the tokenizer.model file itself works too.
    direct = Gemma2Tokenizer.from_pretrained(tok_dirs["sp"] / "tokenizer.model")
    assert direct.backend.sentencepiece_model == tok_dirs["sp"] / "tokenizer.model"
    text = "Both backends, one vocabulary: 你好 👋 <start_of_turn>"
    assert both.encode(text) == direct.encode(text) == sp_tok.encode(text) == json_tok.encode(text)


def test_vocabulary_facts(tok: Gemma2Tokenizer) -> None:
    assert tok.vocab_size == len(tok) == 256000
    facts = {
        "<pad>": 0,
        "<eos>": 1,
        "<bos>": 2,
        "<unk>": 3,
        "<mask>": 4,
        "<unused0>": 7,
        "<unused98>": 105,
        "<start_of_turn>": 106,
        "<end_of_turn>": 107,
        "\n": 108,
        "\n" * 31: 138,
        "<0x00>": 217,
        "<0xFF>": 472,
        "<unused99>": 255999,
    }
    for token, i in facts.items():
        assert tok.convert_tokens_to_ids(token) == i, token
        assert tok.convert_ids_to_tokens(i) == token, i
    assert tok.convert_tokens_to_ids(list(facts)) == list(facts.values())
    assert tok.convert_ids_to_tokens(list(facts.values())) == list(facts)
    assert tok.convert_tokens_to_ids("<definitely not a piece>") is None
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (106, 107)
    assert tok.all_special_ids == [0, 1, 2, 3, 4]


def test_vocabulary_matches_oracle(sp_tok: Gemma2Tokenizer, json_tok: Gemma2Tokenizer, oracle: Any) -> None:
    ids = list(range(0, 600)) + list(range(0, 256000, 997)) + [255998, 255999]
    expected = oracle.convert_ids_to_tokens(ids)
    assert sp_tok.convert_ids_to_tokens(ids) == expected
    assert json_tok.convert_ids_to_tokens(ids) == expected


# ------------------------------------------------------------------------------------------------
# Test vectors and BOS


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello world", [4521, 2134]),
        ("The capital of France is", [651, 6037, 576, 6081, 603]),
        ("  leading spaces", [139, 26650, 14130]),
    ],
)
def test_reference_vectors(tok: Gemma2Tokenizer, text: str, ids: list[int]) -> None:
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.encode(text, add_special_tokens=True) == [2, *ids]
    assert tok.encode(text) == [2, *ids]  # BOS by default
    assert tok(text).input_ids == [2, *ids]
    assert tok(text)["attention_mask"] == [1] * (len(ids) + 1)
    assert tok.decode([2, *ids], skip_special_tokens=True) == text
    assert tok.decode([2, *ids]) == "<bos>" + text


def test_exactly_one_bos(tok: Gemma2Tokenizer) -> None:
    assert tok.encode("") == [2]
    assert tok.encode("", add_special_tokens=False) == []
    for text in ALL_STRINGS:
        ids = tok.encode(text, add_special_tokens=True)
        assert ids[0] == 2, text
        if "<bos>" not in text:
            assert ids.count(2) == 1, text
    # Text that itself starts with <bos> does not get a second one.
    assert tok.encode("<bos>Hello world") == [2, 4521, 2134]
    assert tok.encode("<bos>") == [2]
    # ...but <bos> written later in the text is kept as the user wrote it.
    assert tok.encode("Hello<bos>") == [2, 4521, 2]


def test_special_text_in_input_is_the_special_token(tok: Gemma2Tokenizer) -> None:
    assert tok.encode("<start_of_turn>user\nhi<end_of_turn>", add_special_tokens=False) == [106, 1645, 108, 544, 107]
    assert tok.encode("<unused5>", add_special_tokens=False) == [12]
    assert tok.encode("<pad><mask><eos><unk>", add_special_tokens=False) == [0, 4, 1, 3]
    partial = tok.encode("<start_of_tur", add_special_tokens=False)
    assert 106 not in partial and len(partial) > 1
    assert tok.decode(partial) == "<start_of_tur"


# ------------------------------------------------------------------------------------------------
# Three-way agreement with the oracle on the corpus


def test_corpus_is_large_and_varied() -> None:
    assert len(ALL_STRINGS) >= 300
    assert len(set(ALL_STRINGS)) >= 290
    joined = "".join(ALL_STRINGS)
    for needle in ("\u200d", "\U0001f1eb", "\u0301", "\u05e9", "\u0627", "\uc548", "\u0e2a", "\u0928", "<table>"):
        assert needle in joined, ascii(needle)
    assert "" in ALL_STRINGS
    assert any(s == " " * 40 for s in ALL_STRINGS) and any(s == "\n" * 40 for s in ALL_STRINGS)


@pytest.mark.parametrize("category", sorted(CORPUS))
def test_ids_agree_with_oracle(category: str, sp_tok: Gemma2Tokenizer, json_tok: Gemma2Tokenizer, oracle: Any) -> None:
    mismatches = []
    for text in CORPUS[category]:
        expected = oracle.encode(text, add_special_tokens=False)
        got_sp = sp_tok.encode(text, add_special_tokens=False)
        got_json = json_tok.encode(text, add_special_tokens=False)
        if not expected == got_sp == got_json:
            mismatches.append((text, expected, got_sp, got_json))
    assert not mismatches, f"{len(mismatches)} of {len(CORPUS[category])} differ; first: {mismatches[:3]!r}"


@pytest.mark.parametrize("category", sorted(CORPUS))
def test_decode_agrees_with_oracle(
    category: str, sp_tok: Gemma2Tokenizer, json_tok: Gemma2Tokenizer, oracle: Any
) -> None:
    mismatches = []
    for text in CORPUS[category]:
        ids = oracle.encode(text, add_special_tokens=False)
        for skip in (False, True):
            for with_bos in ([], [2]):
                row = with_bos + ids
                expected = oracle.decode(row, skip_special_tokens=skip)
                got_sp = sp_tok.decode(row, skip_special_tokens=skip)
                got_json = json_tok.decode(row, skip_special_tokens=skip)
                if not expected == got_sp == got_json:
                    mismatches.append((text, skip, with_bos, expected, got_sp, got_json))
    assert not mismatches, f"{len(mismatches)} decodes differ; first: {mismatches[:3]!r}"


@pytest.mark.parametrize("category", sorted(CORPUS))
def test_round_trip(category: str, tok: Gemma2Tokenizer) -> None:
    texts = [t for t in CORPUS[category] if not _has_special_text(t) and "\u2581" not in t]
    assert texts or category == "special_text"
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text, ascii(text)
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text, ascii(text)
        assert tok.decode(tok.encode(text)) == "<bos>" + text, ascii(text)


def test_round_trip_keeps_special_text_without_skipping(tok: Gemma2Tokenizer) -> None:
    for text in CORPUS["special_text"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text, text


def test_with_bos_is_oracle_ids_plus_one_bos(tok: Gemma2Tokenizer, oracle: Any) -> None:
    # Runs of 32+ spaces are left to test_ids_agree_with_oracle[whitespace]: here only BOS handling is checked.
    for text in (t for t in ALL_STRINGS if " " * 32 not in t):
        expected = oracle.encode(text, add_special_tokens=False)
        if not expected or expected[0] != 2:
            expected = [2, *expected]
        assert tok.encode(text, add_special_tokens=True) == expected, ascii(text)


def test_batch_call_matches_encode(tok: Gemma2Tokenizer) -> None:
    batch = tok(ALL_STRINGS)
    assert batch["input_ids"] == [tok.encode(t) for t in ALL_STRINGS]
    assert batch["attention_mask"] == [[1] * len(row) for row in batch["input_ids"]]
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True)[:5] == ALL_STRINGS[:5]


def test_decode_of_arbitrary_ids_agrees_with_oracle(
    sp_tok: Gemma2Tokenizer, json_tok: Gemma2Tokenizer, oracle: Any
) -> None:
    """Ids a model may generate: random pieces, incl. byte pieces that do not form valid UTF-8."""
    rng = random.Random(7)
    rows = [[rng.randrange(256000) for _ in range(rng.randint(1, 10))] for _ in range(150)]
    rows += [[rng.randrange(600) for _ in range(rng.randint(1, 10))] for _ in range(150)]  # specials, bytes
    rows += [[217 + 0xE4, 217 + 0xBD], [217 + 0xE4, 217 + 0xBD, 217 + 0xA0], [217 + 0x4D, 217 + 0xEE, 235297]]
    mismatches: dict[str, list[Any]] = {"sentencepiece": [], "tokenizers": []}
    for row in rows:
        for skip in (False, True):
            expected = oracle.decode(row, skip_special_tokens=skip)
            for name, tok in (("sentencepiece", sp_tok), ("tokenizers", json_tok)):
                got = tok.decode(row, skip_special_tokens=skip)
                if got != expected:
                    mismatches[name].append((row, skip, expected, got))
    summary = {name: (len(found), found[:2]) for name, found in mismatches.items() if found}
    assert not summary, f"decodes that differ from the oracle (count, first (ids, skip, oracle, ours)): {summary!r}"


def test_decode_accepts_tensors(tok: Gemma2Tokenizer) -> None:
    ids = torch.tensor([2, 4521, 2134])
    assert tok.decode(ids, skip_special_tokens=True) == "Hello world"
    assert tok.batch_decode(torch.tensor([[0, 2, 4521], [2, 4521, 2134]]), skip_special_tokens=True) == [
        "Hello",
        "Hello world",
    ]
    assert tok.batch_decode([[0, 2, 4521]]) == ["<pad><bos>Hello"]


# ------------------------------------------------------------------------------------------------
# Padding and tensors


def test_left_padding_by_default(tok: Gemma2Tokenizer) -> None:
    batch = tok(["a", "longer text"], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    ids, mask = batch.input_ids, batch.attention_mask
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[0, 2, 235250], [2, 118364, 2793]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert ids.tolist()[0][1:] == tok.encode("a")
    assert ids.tolist()[1] == tok.encode("longer text")


def test_right_padding_when_asked(tok: Gemma2Tokenizer, tok_dirs: dict[str, Path]) -> None:
    texts = ["a", "a much longer text here", ""]
    rows = [tok.encode(t) for t in texts]
    width = max(map(len, rows))
    batch = tok(texts, padding=True, return_tensors="pt", padding_side="right")
    assert batch.input_ids.tolist() == [r + [0] * (width - len(r)) for r in rows]
    assert batch.attention_mask.tolist() == [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    left = tok(texts, padding="longest")
    assert left.input_ids == [[0] * (width - len(r)) + r for r in rows]
    assert left.attention_mask == [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    right = Gemma2Tokenizer(tok.backend, padding_side="right")
    assert right.padding_side == "right"
    assert right(texts, padding=True).input_ids == [r + [0] * (width - len(r)) for r in rows]
    assert right(texts, padding=True, padding_side="left").input_ids == left.input_ids
    loaded = Gemma2Tokenizer.from_pretrained(tok_dirs["sp"], padding_side="right")  # an override when loading
    assert loaded.padding_side == "right"
    assert loaded(texts, padding=True).attention_mask == batch.attention_mask.tolist()


def test_padding_matches_transformers(tok: Gemma2Tokenizer, sp_saved_hf: Any) -> None:
    texts = ["a", "longer text", "", "你好，世界！ 👋🏽", "<start_of_turn>user\nhi"]
    ours = tok(texts, padding=True, return_tensors="pt")
    theirs = sp_saved_hf(texts, padding=True, return_tensors="pt")
    assert torch.equal(ours.input_ids, theirs["input_ids"])
    assert torch.equal(ours.attention_mask, theirs["attention_mask"].long())


def test_max_length_padding_and_truncation(tok: Gemma2Tokenizer) -> None:
    batch = tok(["a", "longer text"], padding="max_length", max_length=6, return_tensors="pt")
    assert batch.input_ids.shape == (2, 6)
    assert batch.input_ids.tolist()[0] == [0, 0, 0, 0, 2, 235250]
    assert batch.attention_mask.tolist()[1] == [0, 0, 0, 1, 1, 1]
    cut = tok(["The capital of France is"], truncation=True, max_length=3)
    assert cut.input_ids == [[2, 651, 6037]]
    with pytest.raises(TokenizerError, match="max_length"):
        tok(["a"], truncation=True)
    with pytest.raises(TokenizerError, match="max_length"):
        tok(["a"], padding="max_length")


def test_tensors_without_padding(tok: Gemma2Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="padding"):
        tok(["a", "longer text"], return_tensors="pt")
    same = tok(["Hello world", "Hello world"], return_tensors="pt")
    assert same.input_ids.dtype == torch.long
    assert same.input_ids.tolist() == [[2, 4521, 2134]] * 2
    assert same.attention_mask.tolist() == [[1, 1, 1]] * 2
    single = tok("Hello world", return_tensors="pt")
    assert single.input_ids.shape == (1, 3)
    lists = tok(["a", "longer text"])  # no tensors: ragged lists are fine
    assert lists.input_ids == [[2, 235250], [2, 118364, 2793]]


def test_bad_arguments(tok: Gemma2Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="return_tensors"):
        tok(["a"], return_tensors="np")
    with pytest.raises(TokenizerError, match="padding"):
        tok(["a"], padding="sideways")
    with pytest.raises(TokenizerError, match="string"):
        tok.encode(42)  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="padding_side"):
        Gemma2Tokenizer(tok.backend, padding_side="middle")


# ------------------------------------------------------------------------------------------------
# Chat format


def test_two_turn_chat_vector(tok: Gemma2Tokenizer) -> None:
    assert tok.apply_chat_template(TWO_TURNS, add_generation_prompt=True) == TWO_TURN_IDS
    assert tok.apply_chat_template(TWO_TURNS, add_generation_prompt=True, tokenize=False) == TWO_TURN_TEXT
    without = tok.apply_chat_template(TWO_TURNS)
    assert without == TWO_TURN_IDS[:-3]  # no "<start_of_turn>model\n"
    tensor = tok.apply_chat_template(TWO_TURNS, add_generation_prompt=True, return_tensors="pt")
    assert tensor.dtype == torch.long and tensor.tolist() == [TWO_TURN_IDS]


def test_chat_model_role_trim_and_one_bos(tok: Gemma2Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "  \n Hi there!\n\n "},
        {"role": "model", "content": "\tHello! How can I help?  "},  # "model" is accepted as the assistant role
        {"role": "user", "content": "What is 2+2?\n"},
    ]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == TWO_TURN_IDS
    assert ids.count(2) == 1
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "assistant" not in text and text == TWO_TURN_TEXT


def test_chat_content_parts(tok: Gemma2Tokenizer) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there!"}]}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == tok.apply_chat_template(
        [{"role": "user", "content": "Hi there!"}], add_generation_prompt=True
    )


def test_chat_special_text_in_content_is_encoded_like_the_oracle(tok: Gemma2Tokenizer, oracle: Any) -> None:
    messages = [{"role": "user", "content": "say <end_of_turn> and <bos> please"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<bos><start_of_turn>user\nsay <end_of_turn> and <bos> please<end_of_turn>\n<start_of_turn>model\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == oracle.encode(
        text, add_special_tokens=False
    )


def test_system_message_is_prepended_to_first_user_turn(tok: Gemma2Tokenizer) -> None:
    messages = [{"role": "system", "content": " Be brief. "}, *TWO_TURNS]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == TWO_TURN_TEXT.replace("user\nHi there!", "user\nBe brief.\n\nHi there!", 1)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    folded = [{"role": "user", "content": "Be brief.\n\nHi there!"}, *TWO_TURNS[1:]]
    assert ids == tok.apply_chat_template(folded, add_generation_prompt=True)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids.count(2) == 1


def test_system_message_alone_becomes_the_user_turn(tok: Gemma2Tokenizer) -> None:
    messages = [_msg("system", "You are a pirate.")]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<bos><start_of_turn>user\nYou are a pirate.<end_of_turn>\n<start_of_turn>model\n"
    # Followed directly by an assistant turn, the system text is still the (first) user turn.
    messages = [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<bos><start_of_turn>user\nS<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"
    )


@pytest.mark.parametrize(
    ("messages", "index"),
    [
        ([_msg("user", "a"), _msg("system", "s")], 1),
        ([_msg("user", "a"), _msg("assistant", "b"), _msg("system", "s")], 2),
        ([_msg("system", "s"), _msg("system", "t")], 1),
    ],
)
def test_system_message_elsewhere_is_an_error(tok: Gemma2Tokenizer, messages: list[dict[str, str]], index: int) -> None:
    with pytest.raises(ChatFormatError, match=rf"messages\[{index}\].*system"):
        tok.apply_chat_template(messages)


@pytest.mark.parametrize(
    ("messages", "index"),
    [
        ([_msg("assistant", "a")], 0),
        ([_msg("user", "a"), _msg("user", "b")], 1),
        ([_msg("user", "a"), _msg("assistant", "b"), _msg("assistant", "c")], 2),
        ([_msg("system", "s"), _msg("user", "a"), _msg("user", "b")], 2),
        ([_msg("user", "a"), _msg("model", "b"), _msg("model", "c")], 2),
    ],
)
def test_non_alternating_roles_name_the_message(
    tok: Gemma2Tokenizer, messages: list[dict[str, str]], index: int
) -> None:
    with pytest.raises(ChatFormatError, match=rf"messages\[{index}\]") as error:
        tok.apply_chat_template(messages, add_generation_prompt=True)
    assert isinstance(error.value, Gemma2Error)
    assert "alternate" in str(error.value)


def test_malformed_conversations(tok: Gemma2Tokenizer) -> None:
    with pytest.raises(ChatFormatError, match="empty"):
        tok.apply_chat_template([])
    with pytest.raises(ChatFormatError, match="list"):
        tok.apply_chat_template("Hi there!")  # type: ignore[arg-type]
    with pytest.raises(ChatFormatError, match=r"messages\[1\]"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"content": "no role"}])
    with pytest.raises(ChatFormatError, match=r"messages\[0\]"):
        tok.apply_chat_template([{"role": "user", "content": None}])
    assert issubclass(ChatFormatError, Gemma2Error) and gemma2.ChatFormatError is ChatFormatError


def test_chat_agrees_across_backends(sp_tok: Gemma2Tokenizer, json_tok: Gemma2Tokenizer) -> None:
    conversations = [
        TWO_TURNS,
        [{"role": "user", "content": "你好 👋🏽\n\n\tcode: <h1>x</h1>"}],
        [{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "Bonjour   !"}],
    ]
    for messages in conversations:
        for prompt in (False, True):
            assert sp_tok.apply_chat_template(messages, add_generation_prompt=prompt) == json_tok.apply_chat_template(
                messages, add_generation_prompt=prompt
            )


# ------------------------------------------------------------------------------------------------
# Custom chat templates


CUSTOM_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[model]{% endif %}"
)


def _dir_with_config(root: Path, name: str, source: Path, config: dict[str, Any]) -> Path:
    directory = root / name
    directory.mkdir()
    shutil.copyfile(source, directory / source.name)
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.mark.parametrize("source", ["sp", "json"])
def test_custom_chat_template_is_used(tok_dirs: dict[str, Path], tmp_path: Path, source: str) -> None:
    file = tok_dirs[source] / ("tokenizer.model" if source == "sp" else "tokenizer.json")
    directory = _dir_with_config(tmp_path, "custom", file, {"chat_template": CUSTOM_TEMPLATE})
    tok = Gemma2Tokenizer.from_pretrained(directory)
    assert tok.chat_template == CUSTOM_TEMPLATE
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "[user]Hi\n[assistant]Yo\n[model]"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == [2, *tok.encode(text, add_special_tokens=False)]  # the template has no BOS: one is added
    assert 106 not in ids
    # Alternation and the system policy still apply with a custom template.
    with pytest.raises(ChatFormatError, match=r"messages\[1\]"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_custom_template_with_bos_keeps_one_bos(tok_dirs: dict[str, Path], tmp_path: Path) -> None:
    template = "{{ bos_token }}" + CUSTOM_TEMPLATE
    directory = _dir_with_config(tmp_path, "bos", tok_dirs["sp"] / "tokenizer.model", {"chat_template": template})
    tok = Gemma2Tokenizer.from_pretrained(directory)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert ids.count(2) == 1 and ids[0] == 2
    assert tok.decode(ids) == "<bos>[user]Hi\n[model]"


def test_named_chat_templates_take_the_default(tok_dirs: dict[str, Path], tmp_path: Path) -> None:
    config = {"chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEF"}]}
    directory = _dir_with_config(tmp_path, "named", tok_dirs["sp"] / "tokenizer.model", config)
    tok = Gemma2Tokenizer.from_pretrained(directory)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "DEF"


def test_chat_template_argument_overrides(tok: Gemma2Tokenizer) -> None:
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], chat_template=CUSTOM_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert text == "[user]Hi\n[model]"
    assert tok.chat_template == GEMMA_CHAT_TEMPLATE  # the default stays
    with pytest.raises(ChatFormatError):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template="{% for %}")


def test_config_without_template_uses_the_gemma_one(tok_dirs: dict[str, Path], tmp_path: Path) -> None:
    directory = _dir_with_config(tmp_path, "plain", tok_dirs["sp"] / "tokenizer.model", {"add_bos_token": True})
    tok = Gemma2Tokenizer.from_pretrained(directory)
    assert tok.chat_template == GEMMA_CHAT_TEMPLATE
    assert tok.apply_chat_template(TWO_TURNS, add_generation_prompt=True) == TWO_TURN_IDS


def test_config_settings_are_read(tok_dirs: dict[str, Path], tmp_path: Path) -> None:
    config = {"add_bos_token": False, "add_eos_token": True, "padding_side": "right"}
    directory = _dir_with_config(tmp_path, "settings", tok_dirs["sp"] / "tokenizer.model", config)
    tok = Gemma2Tokenizer.from_pretrained(directory)
    assert tok.encode("Hello world") == [4521, 2134, 1]
    assert tok(["a", "longer text"], padding=True).input_ids == [[235250, 1, 0], [118364, 2793, 1]]


# ------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained, and loading the saved directory in transformers


@pytest.fixture(scope="session")
def saved_dirs(tmp_path_factory: pytest.TempPathFactory, sp_tok: Gemma2Tokenizer, json_tok: Gemma2Tokenizer) -> Any:
    root = tmp_path_factory.mktemp("saved")
    sp_tok.save_pretrained(root / "sp")
    json_tok.save_pretrained(root / "json")
    return {"sp": root / "sp", "json": root / "json"}


def _auto_tokenizer(directory: Path) -> Any:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="session")
def sp_saved_hf(saved_dirs: dict[str, Path]) -> Any:
    return _auto_tokenizer(saved_dirs["sp"])


@pytest.fixture(scope="session")
def json_saved_hf(saved_dirs: dict[str, Path]) -> Any:
    return _auto_tokenizer(saved_dirs["json"])


def _ids(result: Any) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); older ones a list."""
    if hasattr(result, "keys"):
        result = result["input_ids"]
    if hasattr(result, "tolist"):
        result = result.tolist()
    if result and isinstance(result[0], list):
        assert len(result) == 1
        result = result[0]
    return list(result)


CONVERSATIONS = [
    TWO_TURNS,
    [{"role": "user", "content": "  Hello  "}],
    [_msg("user", "Write <h1>code</h1>\n\n\tplease"), _msg("assistant", "```py\nx=1\n```")],
    [
        _msg("user", "你好 👨\u200d👩\u200d👧 שלום مرحبا"),
        _msg("assistant", "ok"),
        _msg("user", "\U0010fffd \x00 <unused5> <start_of_tur"),
    ],
]


@pytest.mark.parametrize("source", ["sp", "json"])
def test_save_and_reload(source: str, saved_dirs: dict[str, Path], sp_tok: Gemma2Tokenizer, json_tok: Gemma2Tokenizer):
    tok = sp_tok if source == "sp" else json_tok
    directory = saved_dirs[source]
    names = {p.name for p in directory.iterdir()}
    assert {"tokenizer_config.json", "special_tokens_map.json"} <= names
    assert ("tokenizer.model" if source == "sp" else "tokenizer.json") in names
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == tok.chat_template and config["add_bos_token"] is True
    again = Gemma2Tokenizer.from_pretrained(directory)
    assert type(again.backend) is type(tok.backend)
    assert again.chat_template == tok.chat_template
    assert (again.add_bos_token, again.add_eos_token, again.padding_side) == (True, False, "left")
    for text in ALL_STRINGS[::3]:
        assert again.encode(text) == tok.encode(text), ascii(text)
    for messages in CONVERSATIONS:
        assert again.apply_chat_template(messages, add_generation_prompt=True) == tok.apply_chat_template(
            messages, add_generation_prompt=True
        )
    # Saving into the directory it was loaded from leaves it loadable.
    again.save_pretrained(directory)
    assert Gemma2Tokenizer.from_pretrained(directory).encode("Hello world") == [2, 4521, 2134]


def test_save_custom_template_round_trip(tok_dirs: dict[str, Path], tmp_path: Path) -> None:
    tok = Gemma2Tokenizer.from_pretrained(tok_dirs["sp"], chat_template=CUSTOM_TEMPLATE, padding_side="right")
    tok.save_pretrained(tmp_path / "saved")
    again = Gemma2Tokenizer.from_pretrained(tmp_path / "saved")
    assert again.chat_template == CUSTOM_TEMPLATE and again.padding_side == "right"
    messages = [{"role": "user", "content": "Hi"}]
    assert again.apply_chat_template(messages, tokenize=False) == "[user]Hi\n"


@pytest.mark.parametrize("source", ["sp", "json"])
def test_saved_directory_chat_matches_transformers(
    source: str, sp_saved_hf: Any, json_saved_hf: Any, sp_tok: Gemma2Tokenizer, json_tok: Gemma2Tokenizer
) -> None:
    hf = sp_saved_hf if source == "sp" else json_saved_hf
    tok = sp_tok if source == "sp" else json_tok
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            theirs = hf.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            assert tok.apply_chat_template(messages, add_generation_prompt=prompt) == _ids(theirs)
            text = hf.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False) == text
    assert _ids(hf.apply_chat_template(TWO_TURNS, add_generation_prompt=True, tokenize=True)) == TWO_TURN_IDS
    # transformers renders the official template, which rejects a system role; ours folds it in first.
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    folded = [{"role": "user", "content": "Be brief.\n\nHi"}]
    theirs = hf.apply_chat_template(folded, add_generation_prompt=True, tokenize=True)
    assert tok.apply_chat_template(system, add_generation_prompt=True) == _ids(theirs)


@pytest.mark.parametrize("source", ["sp", "json"])
def test_saved_directory_encodes_like_transformers(
    source: str, sp_saved_hf: Any, json_saved_hf: Any, sp_tok: Gemma2Tokenizer, json_tok: Gemma2Tokenizer
) -> None:
    """transformers loading the saved directory adds the same single BOS we add (missing BOS wrecks quality)."""
    hf = sp_saved_hf if source == "sp" else json_saved_hf
    tok = sp_tok if source == "sp" else json_tok
    # Runs of 32+ spaces are left to test_ids_agree_with_oracle[whitespace]: here only BOS handling is checked.
    texts = [t for t in ALL_STRINGS[::4] if not t.startswith("<bos>") and " " * 32 not in t]
    assert len(texts) > 100
    no_bos = [t for t in texts if hf.encode(t) != [2, *hf.encode(t, add_special_tokens=False)]]
    assert not no_bos, f"transformers adds no BOS for {len(no_bos)} of {len(texts)} texts, e.g. {no_bos[0]!r}"
    for text in texts:
        assert hf.encode(text) == tok.encode(text), ascii(text)
    assert hf("Hello world")["input_ids"] == [2, 4521, 2134]
    assert hf.padding_side == "left"


# ------------------------------------------------------------------------------------------------
# Errors


def test_directory_without_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError) as error:
        Gemma2Tokenizer.from_pretrained(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "tokenizer.model" in message
    assert isinstance(error.value, Gemma2Error) and isinstance(error.value, ValueError)


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(Gemma2Error, match=re.escape(str(missing))):
        Gemma2Tokenizer.from_pretrained(missing)


@pytest.mark.parametrize(
    "data",
    [b"garbage bytes, not a protobuf" * 50, bytes(range(256)) * 20, b"\x0a\x03abc", b""],
    ids=["text", "bytes", "truncated", "empty"],
)
def test_corrupt_tokenizer_model(tmp_path: Path, data: bytes) -> None:
    directory = _model_dir(tmp_path, "corrupt", data)
    with pytest.raises(TokenizerError, match=re.escape(str(directory / "tokenizer.model"))):
        Gemma2Tokenizer.from_pretrained(directory)


@pytest.mark.parametrize("data", [b"", b"{not json", b"\xff\xfe\x00garbage", b'{"version": "1.0"}'])
def test_corrupt_tokenizer_json(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "tokenizer.json").write_bytes(data)
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        Gemma2Tokenizer.from_pretrained(tmp_path)


def test_corrupt_tokenizer_config(tok_dirs: dict[str, Path], tmp_path: Path) -> None:
    shutil.copyfile(tok_dirs["sp"] / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text("{ this is not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json"):
        Gemma2Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("member", ["tokenizer.llama2", "tokenizer.mistral-v1"])
def test_tokenizer_model_that_is_not_gemma(maxtext_wheel: Path, tmp_path: Path, member: str) -> None:
    with zipfile.ZipFile(maxtext_wheel) as wheel:
        data = wheel.read(f"maxtext/assets/tokenizers/{member}")
    import sentencepiece

    assert sentencepiece.SentencePieceProcessor(model_proto=data).get_piece_size() > 0  # a valid model
    directory = _model_dir(tmp_path, member, data)
    with pytest.raises(TokenizerError, match=re.escape(str(directory / "tokenizer.model"))) as error:
        Gemma2Tokenizer.from_pretrained(directory)
    assert "not a Gemma tokenizer" in str(error.value)
