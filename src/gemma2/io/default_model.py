"""The model the command line uses when no --model is given.

The package ships a small Gemma 2 that the project trained itself (`python -m gemma2.recipes.demo`;
about 8 M parameters, trained on Python's own documentation), in the same Hugging Face layout as
any checkpoint, so the commands work offline on a fresh machine. Should the bundled files be
missing (a trimmed install), a tiny randomly initialised Gemma 2 with the real Gemma tokenizer is
built once and cached instead, and the command says its output is random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemma2.io.assets import cache_dir, gemma_tokenizer_model

BUNDLED = Path(__file__).parents[1] / "demo_model"
BUNDLED_NOTICE = (
    "note: no --model given: using the bundled demo model (a small Gemma 2 trained on Python's documentation)"
)
RANDOM_NAME = "random-tiny-gemma2-v1"
RANDOM_NOTICE = (
    "note: no --model given: using a tiny randomly initialised Gemma 2 with the real tokenizer; its output is random"
)

TINY_RANDOM: dict[str, Any] = dict(
    vocab_size=256000,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=64,
    max_position_embeddings=8192,
)


def default_model() -> tuple[Path, str]:
    """The default checkpoint directory and the one-line notice the CLI prints about it."""
    if (BUNDLED / "model.safetensors").exists() and (BUNDLED / "tokenizer.json").exists():
        return BUNDLED, BUNDLED_NOTICE
    return random_model_dir(), RANDOM_NOTICE


def random_model_dir() -> Path:
    """A tiny random Gemma 2 (seed 0) with the real Gemma tokenizer, built on first use and cached."""
    directory = cache_dir() / RANDOM_NAME
    if (directory / "model.safetensors").exists() and (directory / "tokenizer.model").exists():
        return directory
    import shutil

    import torch

    from gemma2.config import Gemma2Config
    from gemma2.heads import Gemma2ForCausalLM
    from gemma2.io.checkpoint import AtomicDirectory
    from gemma2.tokenizer import Gemma2Tokenizer

    tokenizer_path = gemma_tokenizer_model()
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(**TINY_RANDOM)).to(torch.bfloat16)
    # Like an instruction-tuned checkpoint: stop on <eos> and <end_of_turn>.
    model.generation_config = {"eos_token_id": [1, 107]}
    with AtomicDirectory(directory) as scratch:
        model.save_pretrained(scratch)
        shutil.copyfile(tokenizer_path, scratch / "tokenizer.model")
        Gemma2Tokenizer.from_pretrained(scratch).save_pretrained(scratch)
        (scratch / "README.md").write_text("A tiny randomly initialised Gemma 2 (seed 0): its output is random.\n")
    return directory
