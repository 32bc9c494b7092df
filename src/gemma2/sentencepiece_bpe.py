"""Gemma's tokenizer.model (SentencePiece BPE) as a `tokenizers` BPE tokenizer, like tokenizer.json.

Why convert instead of calling sentencepiece to encode: the reference tokenizer (transformers'
GemmaTokenizerFast, and every tokenizer.json on the hub) is this conversion, and it differs from
sentencepiece's own segmentation in corner cases: a run of 32 or more spaces (sentencepiece takes
the 31-space piece first, the BPE merges pair up 16 + 16) and invalid UTF-8 in byte-fallback
pieces (decoded to one U+FFFD per byte). Converting gives the reference's ids and text exactly,
and the same tokenizer whether a checkpoint ships tokenizer.json or only tokenizer.model.

The layout (all of it read from the SentencePiece model with sentencepiece's own protobuf schema):
- vocabulary: every piece at its id;
- merges: every split of a piece into two pieces that are both in the vocabulary, ranked by the
  id of the merged piece (lower ids are more frequent merges), then by the length of the left part;
- added tokens: every control, unknown and user-defined piece (`<bos>`, `<start_of_turn>`, newline
  runs, ...), matched in raw text before BPE; `<pad> <eos> <bos> <unk> <mask>` are special;
- normalizer " " -> "▁", byte fallback, and a decoder that undoes both;
- a post-processor that adds `<bos>`, so that transformers adds it when it loads the saved file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from gemma2.errors import SentencePieceError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # ModelProto.SentencePiece.Type
SPECIAL_TOKEN_NAMES = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")


def read_pieces(path: Path) -> list[tuple[str, int]]:
    """(piece, type) for every id of a SentencePiece model file."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as error:
        raise SentencePieceError(f"{path}: not a SentencePiece model ({error})") from None
    if not proto.pieces:
        raise SentencePieceError(f"{path}: not a SentencePiece model (it has no pieces)")
    if proto.trainer_spec.model_type != 2:  # BPE
        raise SentencePieceError(f"{path}: a SentencePiece model of type {proto.trainer_spec.model_type}, not BPE")
    return [(p.piece, p.type) for p in proto.pieces]


def bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a piece, ordered by the merged piece's id."""
    ranked: list[tuple[int, int, int, int, str, str]] = []
    for merged, merged_id in vocab.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab and right in vocab:
                ranked.append((merged_id, len(left), len(right), vocab[left], left, right))
    ranked.sort(key=lambda r: r[:4])
    return [(left, right) for *_, left, right in ranked]


def tokenizer_json(path: Path) -> dict[str, Any]:
    """The tokenizer.json document for a SentencePiece BPE model file."""
    pieces = read_pieces(path)
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    added = [
        {
            "id": i,
            "content": piece,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": piece in SPECIAL_TOKEN_NAMES,
        }
        for i, (piece, kind) in enumerate(pieces)
        if kind in (UNKNOWN, CONTROL, USER_DEFINED)
    ]
    bos = vocab.get("<bos>")
    post_processor = None
    if bos is not None:
        post_processor = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": "<bos>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<bos>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [bos], "tokens": ["<bos>"]}},
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        # A no-op after the normalizer (no spaces are left), kept because the reference has it.
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"String": " "},
            "behavior": "MergedWithPrevious",
            "invert": False,
        },
        "post_processor": post_processor,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>" if "<unk>" in vocab else None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(pair) for pair in bpe_merges(vocab)],
        },
    }


def converted_tokenizer_file(path: Path, cache: Path) -> Path:
    """Path of a tokenizer.json converted from `path`, cached in `cache` by the file's sha256."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
    target = cache / f"{digest}.tokenizer.json"
    if target.exists():
        return target
    text = json.dumps(tokenizer_json(path), ensure_ascii=False)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{digest[:8]}.partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(target)
    except OSError:
        # Nowhere to cache it (a read-only disk): a temporary file, converted again next time.
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as handle:
            handle.write(text)
        return Path(handle.name)
    return target
