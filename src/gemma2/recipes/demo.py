"""The recipe of the bundled demo model: a small Gemma 2 trained from scratch on Python's own docs.

    python -m gemma2.recipes.demo --out DIR [--minutes 30] [--max-steps 1000] [--seed 0]

1. Corpus (every machine with Python has it; Python Software Foundation License): the language
   reference topics in the standard library's `pydoc_data.topics`, and the docstrings of the
   standard library's modules, classes and functions (read with `ast`, nothing is imported), each
   function's with its signature. One document per topic / docstring; about 2 % of the documents,
   chosen by a hash of their text, are held out.
2. A SentencePiece BPE tokenizer in Gemma's layout (<pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask>,
   <start_of_turn>, <end_of_turn>; byte fallback, digits split, no dummy prefix, whitespace kept).
3. A Gemma 2 of the same architecture (about 8 M parameters, sliding window 128 inside a 256-token
   training context, so the sliding layers matter), trained with gemma2's own training loop on
   documents packed with <bos> each, within a wall-time budget.
4. The checkpoint (bf16 safetensors), tokenizer files and a report with the held-out perplexity.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIG: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    query_pre_attn_scalar=64,
    sliding_window=128,
    max_position_embeddings=1024,
)
VOCAB_SIZE = 8000
SEQ_LEN = 256


def stdlib_documents() -> list[str]:
    """Language-reference topics and standard-library docstrings, in a fixed order."""
    import pydoc_data.topics

    documents = [text.strip() for _, text in sorted(pydoc_data.topics.topics.items())]
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if skip & set(relative.parts):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        documents.extend(_docstrings(tree, module))
    return [doc for doc in documents if len(doc) >= 40]


def _docstrings(tree: ast.Module, module: str) -> list[str]:
    found = []
    doc = ast.get_docstring(tree)
    if doc:
        found.append(f"Module {module}\n\n{doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.name.startswith("_") and not child.name.startswith("__"):
                    continue
                name = f"{prefix}.{child.name}"
                text = ast.get_docstring(child)
                if text:
                    if isinstance(child, ast.ClassDef):
                        header = f"class {name}"
                    else:
                        header = f"{name}({ast.unparse(child.args)})"
                    found.append(f"{header}\n\n{text}")
                if isinstance(child, ast.ClassDef):
                    visit(child, name)

    visit(tree, module)
    return found


def is_held_out(document: str) -> bool:
    return int(hashlib.sha1(document.encode()).hexdigest(), 16) % 50 == 0


def train_tokenizer(documents: list[str], directory: Path, seed: int) -> Path:
    import sentencepiece as spm

    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(documents), encoding="utf-8")
    prefix = directory / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        max_sentencepiece_length=16,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>", "\n", "\n\n", "▁▁", "▁▁▁▁", "▁▁▁▁▁▁▁▁"],
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=1_000_000,
        num_threads=2,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def build(out: Path, minutes: float, seed: int, max_steps: int) -> dict[str, float]:
    import shutil

    import torch

    from gemma2 import Gemma2Config, Gemma2ForCausalLM, Gemma2Tokenizer
    from gemma2.io.checkpoint import AtomicDirectory
    from gemma2.train.data import pack_documents
    from gemma2.train.trainer import TrainSettings, evaluate, train_causal_lm

    torch.manual_seed(seed)
    started = time.perf_counter()
    documents = stdlib_documents()
    train_docs = [d for d in documents if not is_held_out(d)]
    held_docs = [d for d in documents if is_held_out(d)]
    print(f"corpus: {len(documents)} documents, {sum(map(len, documents)) / 1e6:.1f} M characters", file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        model_file = train_tokenizer(train_docs, Path(scratch), seed)
        tokenizer_dir = Path(scratch) / "tok"
        tokenizer_dir.mkdir()
        shutil.copyfile(model_file, tokenizer_dir / "tokenizer.model")
        tokenizer = Gemma2Tokenizer.from_pretrained(tokenizer_dir)
        encode = tokenizer.backend.encode_batch
        train_rows = pack_documents(encode(train_docs), SEQ_LEN, tokenizer.bos_token_id)
        held_rows = pack_documents(encode(held_docs), SEQ_LEN, tokenizer.bos_token_id)
        print(
            f"tokens: {train_rows.tokens():,} train, {held_rows.tokens():,} held out; {tokenizer.vocab_size} pieces",
            file=sys.stderr,
        )
        config = Gemma2Config(vocab_size=tokenizer.vocab_size, **CONFIG)
        model = Gemma2ForCausalLM(config)
        budget = minutes * 60 - (time.perf_counter() - started) - 60  # leave a minute to save
        settings = TrainSettings(
            max_steps=max_steps,
            batch_size=16,
            lr=3e-3,
            warmup_steps=min(200, max_steps // 10 + 1),
            weight_decay=0.1,
            bf16=True,
            seed=seed,
            eval_every=500,
            max_seconds=budget,
        )
        result = train_causal_lm(model, train_rows, settings, eval_rows=held_rows)
        model = model.to(torch.bfloat16)
        result["eval_loss_bf16"] = evaluate(model, held_rows, 16)
        result["eval_perplexity_bf16"] = math.exp(result["eval_loss_bf16"])
        with AtomicDirectory(out, keep_other_files=False) as target:
            model.save_pretrained(target)
            tokenizer.save_pretrained(target)
            report = {
                "corpus_documents": len(documents),
                "train_tokens": train_rows.tokens(),
                "held_out_tokens": held_rows.tokens(),
                "parameters": model.num_parameters(),
                "minutes": (time.perf_counter() - started) / 60,
                **result,
            }
            (target / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
            (target / "README.md").write_text(
                "A small Gemma 2 (about 8 M parameters) trained by gemma2's recipe "
                "(`python -m gemma2.recipes.demo`) on the Python standard library's documentation "
                "(pydoc_data.topics and docstrings; Python Software Foundation License).\n"
            )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-time budget for the whole recipe")
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = build(args.out, args.minutes, args.seed, args.max_steps)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
