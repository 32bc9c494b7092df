"""The model the command line uses when no --model is given.

Until the project ships its trained demo model, this is a tiny randomly initialised Gemma 2 (seeded,
so always the same) paired with the real Gemma tokenizer: it exercises every step of the pipeline
offline, and its output is random text. It is built once and cached next to the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gemma2.assets import cache_dir, gemma_tokenizer_model

NAME = "random-tiny-gemma2-v1"
NOTICE = (
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


def default_model_dir() -> Path:
    """The cached default checkpoint directory, built on first use."""
    directory = cache_dir() / NAME
    if (directory / "model.safetensors").exists() and (directory / "tokenizer.model").exists():
        return directory
    import shutil

    import torch

    from gemma2.checkpoint import AtomicDirectory
    from gemma2.config import Gemma2Config
    from gemma2.heads import Gemma2ForCausalLM
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
    json.loads((directory / "config.json").read_text())  # fail loudly if something is off
    return directory
