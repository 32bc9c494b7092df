"""Shared helpers: tiny random Gemma 2 configs and the transformers oracle built from them."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from gemma2 import Gemma2Config

warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")

# A tiny shape that still exercises every feature: GQA (H=4, K=2), H*D != d, a scalar that is
# not head_dim, a window shorter than typical test inputs, an odd layer count.
TINY: dict[str, Any] = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    query_pre_attn_scalar=20,
    sliding_window=5,
    max_position_embeddings=128,
)


def tiny_config(**overrides: Any) -> Gemma2Config:
    return Gemma2Config(**{**TINY, **overrides})


def hf_config(config: Gemma2Config, **extra: Any) -> Any:
    """transformers' Gemma2Config with the same fields, eager attention."""
    import transformers

    data = config.to_dict()
    data.pop("model_type", None)
    data.pop("hidden_act", None)
    data.pop("rope_theta", None)
    data.pop("torch_dtype", None)
    data.pop("dtype", None)
    return transformers.Gemma2Config(**data, attn_implementation="eager", **extra)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Large random weights (norm offsets too), so soft-caps and norms are really exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


def quantizable_model(seed: int = 0, **overrides: Any) -> Any:
    """A random bf16 Gemma2ForCausalLM whose input sizes are multiples of 128 (int4 groups of 64 and 128)
    and output sizes of 16 (PyTorch's int4 kernel), except the vocabulary (the int8 LM head)."""
    from gemma2 import Gemma2ForCausalLM

    sizes: dict[str, Any] = dict(
        vocab_size=203,  # not a multiple of 8: the LM head has tail rows
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=6,
    )
    from gemma2.backends import apply_backend

    model = Gemma2ForCausalLM(tiny_config(**{**sizes, **overrides}))
    randomize_(model, seed=seed, std=0.1)
    model = model.to(torch.bfloat16).eval()
    apply_backend(model, "auto")  # the native CPU kernels where they run (quantize keeps the backend)
    return model


def hf_model(config: Gemma2Config, head: str = "causal", seed: int = 0, std: float = 0.3) -> Any:
    """A random transformers model of the given head ("causal", "sequence", "token", "base")."""
    import transformers

    cls = {
        "causal": transformers.Gemma2ForCausalLM,
        "sequence": transformers.Gemma2ForSequenceClassification,
        "token": transformers.Gemma2ForTokenClassification,
        "base": transformers.Gemma2Model,
    }[head]
    model = cls(hf_config(config))
    randomize_(model, seed=seed, std=std)
    return model.eval()


def save_hf(model: Any, directory: Path, max_shard_size: str = "5GB") -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


@pytest.fixture
def tiny() -> Gemma2Config:
    return tiny_config()
