"""Pure mappings from the original Gemma 2 layouts to Hugging Face state-dict keys (GEMMA2.md section 5).

Each mapping turns the source's names and shapes into one `Recipe` per Hugging Face tensor: which
source tensors it reads and how it transforms them. No data is touched here; `architecture_of`
reads the architecture off the shapes so that the variant can be detected and checked.

PyTorch (gemma_pytorch): keys equal the HF keys except `embedder.weight` and the fused
`self_attn.qkv_proj.weight` [(H + 2K) * D, d], rows in q | k | v order. No transposes.

Flax (gemma): einsum kernels, transposed and split:
    q_einsum w [H, d, D]           -> q_proj  = w.transpose(0, 2, 1).reshape(H*D, d)
    kv_einsum w [2, K, d, D]       -> k_proj, v_proj from w[0], w[1], the same way
    attn_vec_einsum w [H, D, d]    -> o_proj  = w.reshape(H*D, d).T
    gating_einsum w 2B [2, d, F]   -> gate = w[0].T, up = w[1].T   (9B/27B [2, F, d]: gate = w[0], up = w[1])
    linear w [F, d]                -> down_proj = w.T
    embedder input_embedding [256128, d] -> embed_tokens = rows [:256000]
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gemma2.config import PRESETS, Gemma2Config
from gemma2.convert.sources import Source
from gemma2.errors import CheckpointError

PRESET_BY_VARIANT = {"2b": "gemma-2-2b", "9b": "gemma-2-9b", "27b": "gemma-2-27b"}


@dataclass
class Recipe:
    sources: tuple[str, ...]
    build: Callable[..., torch.Tensor]  # receives the loaded source tensors, in order
    shape: tuple[int, ...]  # the Hugging Face tensor's shape


@dataclass
class Architecture:
    """What the tensor shapes say about the model (None where a layout cannot tell)."""

    vocab_rows: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    q_size: int  # H * D
    kv_size: int  # K * D
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None

    def matches(self, config: Gemma2Config, padded_vocab: bool) -> bool:
        """Whether the shapes are those of `config`; the embedding may have extra (padding) rows
        only in layouts that pad it (Flax: 256128 rows for 256000 tokens)."""
        H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        return (
            self.hidden_size == config.hidden_size
            and self.intermediate_size == config.intermediate_size
            and self.num_hidden_layers == config.num_hidden_layers
            and self.q_size == H * D
            and self.kv_size == K * D
            and self.num_attention_heads in (None, H)
            and self.num_key_value_heads in (None, K)
            and self.head_dim in (None, D)
            and (self.vocab_rows >= config.vocab_size if padded_vocab else self.vocab_rows == config.vocab_size)
        )

    def describe(self) -> str:
        heads = f"H={self.num_attention_heads}, K={self.num_key_value_heads}, D={self.head_dim}"
        if self.num_attention_heads is None:
            heads = f"H*D={self.q_size}, K*D={self.kv_size}"
        return (
            f"d={self.hidden_size}, F={self.intermediate_size}, {self.num_hidden_layers} layers, {heads}, "
            f"{self.vocab_rows} embedding rows"
        )


def official_variant(arch: Architecture, padded_vocab: bool) -> str | None:
    for variant, preset in PRESET_BY_VARIANT.items():
        if arch.matches(Gemma2Config(**PRESETS[preset]), padded_vocab):
            return variant
    return None


def _layer_count(source: Source, pattern: str) -> int:
    layers = {int(m.group(1)) for key in source if (m := re.match(pattern, key))}
    if not layers:
        return 0
    expected = set(range(max(layers) + 1))
    if layers != expected:
        raise CheckpointError(f"layers {sorted(expected - layers)} are missing from the checkpoint")
    return max(layers) + 1


def _need(source: Source, key: str) -> tuple[int, ...]:
    if key not in source:
        raise CheckpointError(f"checkpoint is missing tensor {key!r}")
    return source[key].shape


# ------------------------------------------------------------------------------------------------
# Family checks: a clear error for checkpoints of other models


def check_family(source: Source, fmt: str) -> None:
    keys = list(source)
    where = next(iter(source.values())).file
    if any(("query_norm" in k or "q_norm" in k or "_query_norm" in k) for k in keys):
        raise CheckpointError(
            f"{where}: a Gemma 3 checkpoint (its attention has query/key norms); this converts Gemma 2"
        )
    if fmt == "pytorch":
        if any(k in ("tok_embeddings.weight", "model.embed_tokens.weight", "lm_head.weight") for k in keys) or any(
            k.endswith(("self_attn.q_proj.weight", "attention.wq.weight")) for k in keys
        ):
            raise CheckpointError(
                f"{where}: not an original Gemma 2 checkpoint (no embedder.weight / fused qkv_proj; Llama or "
                f"Hugging Face layout?)"
            )
        if "embedder.weight" not in source:
            raise CheckpointError(f"{where}: not a Gemma checkpoint (no 'embedder.weight')")
        if not any(k.endswith("pre_feedforward_layernorm.weight") for k in keys):
            raise CheckpointError(
                f"{where}: a Gemma 1 checkpoint (its layers have no pre/post feed-forward norms); this converts Gemma 2"
            )
    else:
        if "transformer/embedder/input_embedding" not in source:
            raise CheckpointError(f"{where}: not a Gemma checkpoint (no 'transformer/embedder/input_embedding')")
        if not any(k.endswith("post_ffw_norm/scale") for k in keys):
            raise CheckpointError(
                f"{where}: a Gemma 1 checkpoint (its layers have no post-attention / post-FFW norms); "
                f"this converts Gemma 2"
            )


# ------------------------------------------------------------------------------------------------
# PyTorch


def pytorch_architecture(source: Source) -> Architecture:
    V, d = _need(source, "embedder.weight")
    layers = _layer_count(source, r"model\.layers\.(\d+)\.")
    if layers == 0:
        raise CheckpointError("checkpoint has no model.layers.*")
    qkv = _need(source, "model.layers.0.self_attn.qkv_proj.weight")[0]
    q_size = _need(source, "model.layers.0.self_attn.o_proj.weight")[1]
    F = _need(source, "model.layers.0.mlp.gate_proj.weight")[0]
    return Architecture(V, d, F, layers, q_size, (qkv - q_size) // 2)


def pytorch_recipes(source: Source, config: Gemma2Config) -> dict[str, Recipe]:
    d, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    recipes: dict[str, Recipe] = {
        "model.embed_tokens.weight": Recipe(("embedder.weight",), lambda w: w[:V], (V, d)),
        "model.norm.weight": Recipe(("model.norm.weight",), lambda w: w, (d,)),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        qkv = (f"{p}.self_attn.qkv_proj.weight",)
        recipes[f"{p}.self_attn.q_proj.weight"] = Recipe(qkv, lambda w: w[: H * D], (H * D, d))
        recipes[f"{p}.self_attn.k_proj.weight"] = Recipe(qkv, lambda w: w[H * D : (H + K) * D], (K * D, d))
        recipes[f"{p}.self_attn.v_proj.weight"] = Recipe(qkv, lambda w: w[(H + K) * D :], (K * D, d))
        shapes = {
            "self_attn.o_proj.weight": (d, H * D),
            "mlp.gate_proj.weight": (F, d),
            "mlp.up_proj.weight": (F, d),
            "mlp.down_proj.weight": (d, F),
            "input_layernorm.weight": (d,),
            "post_attention_layernorm.weight": (d,),
            "pre_feedforward_layernorm.weight": (d,),
            "post_feedforward_layernorm.weight": (d,),
        }
        for name, shape in shapes.items():
            recipes[f"{p}.{name}"] = Recipe((f"{p}.{name}",), lambda w: w, shape)
    return recipes


def pytorch_source_shapes(config: Gemma2Config, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """The shape every source tensor must have for `config` (extra keys are errors)."""
    d, F = config.hidden_size, config.intermediate_size
    H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embedder.weight": (vocab_rows, d), "model.norm.weight": (d,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.self_attn.qkv_proj.weight"] = ((H + 2 * K) * D, d)
        shapes[f"{p}.self_attn.o_proj.weight"] = (d, H * D)
        shapes[f"{p}.mlp.gate_proj.weight"] = (F, d)
        shapes[f"{p}.mlp.up_proj.weight"] = (F, d)
        shapes[f"{p}.mlp.down_proj.weight"] = (d, F)
        for norm in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            shapes[f"{p}.{norm}_layernorm.weight"] = (d,)
    return shapes


# ------------------------------------------------------------------------------------------------
# Flax

_FLAX_NORMS = {
    "pre_attention_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def flax_architecture(source: Source) -> Architecture:
    V, d = _need(source, "transformer/embedder/input_embedding")
    layers = _layer_count(source, r"transformer/layer_(\d+)/")
    if layers == 0:
        raise CheckpointError("checkpoint has no transformer/layer_*")
    H, _, D = _need(source, "transformer/layer_0/attn/q_einsum/w")
    K = _need(source, "transformer/layer_0/attn/kv_einsum/w")[1]
    F = _need(source, "transformer/layer_0/mlp/linear/w")[0]
    return Architecture(V, d, F, layers, H * D, K * D, H, K, D)


def flax_gating_transposed(source: Source, config: Gemma2Config, variant: str | None) -> bool:
    """True for the 2B layout [2, d, F], False for 9B/27B's [2, F, d]."""
    d, F = config.hidden_size, config.intermediate_size
    shape = _need(source, "transformer/layer_0/mlp/gating_einsum/w")
    if d == F:
        # Square gating kernels cannot show their layout; only the official variants say which it is.
        if variant is None:
            raise CheckpointError(
                "hidden_size equals intermediate_size, so the layout of 'mlp/gating_einsum/w' ([2, d, F] in 2B, "
                "[2, F, d] in 9B/27B) cannot be told from its shape"
            )
        return variant == "2b"
    if shape == (2, d, F):
        return True
    if shape == (2, F, d):
        return False
    raise CheckpointError(
        f"tensor 'transformer/layer_0/mlp/gating_einsum/w' has shape {list(shape)}, expected [2, {d}, {F}] "
        f"or [2, {F}, {d}]"
    )


def flax_source_shapes(config: Gemma2Config, vocab_rows: int, transposed_gating: bool) -> dict[str, tuple[int, ...]]:
    d, F = config.hidden_size, config.intermediate_size
    H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "transformer/embedder/input_embedding": (vocab_rows, d),
        "transformer/final_norm/scale": (d,),
    }
    for i in range(config.num_hidden_layers):
        p = f"transformer/layer_{i}"
        shapes[f"{p}/attn/q_einsum/w"] = (H, d, D)
        shapes[f"{p}/attn/kv_einsum/w"] = (2, K, d, D)
        shapes[f"{p}/attn/attn_vec_einsum/w"] = (H, D, d)
        shapes[f"{p}/mlp/gating_einsum/w"] = (2, d, F) if transposed_gating else (2, F, d)
        shapes[f"{p}/mlp/linear/w"] = (F, d)
        for norm in _FLAX_NORMS:
            shapes[f"{p}/{norm}/scale"] = (d,)
    return shapes


def flax_recipes(config: Gemma2Config, transposed_gating: bool) -> dict[str, Recipe]:
    d, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    recipes: dict[str, Recipe] = {
        "model.embed_tokens.weight": Recipe(("transformer/embedder/input_embedding",), lambda w: w[:V], (V, d)),
        "model.norm.weight": Recipe(("transformer/final_norm/scale",), lambda w: w, (d,)),
    }
    for i in range(config.num_hidden_layers):
        p, hf = f"transformer/layer_{i}", f"model.layers.{i}"
        q, kv = (f"{p}/attn/q_einsum/w",), (f"{p}/attn/kv_einsum/w",)
        recipes[f"{hf}.self_attn.q_proj.weight"] = Recipe(q, lambda w: w.transpose(1, 2).reshape(H * D, d), (H * D, d))
        recipes[f"{hf}.self_attn.k_proj.weight"] = Recipe(
            kv, lambda w: w[0].transpose(1, 2).reshape(K * D, d), (K * D, d)
        )
        recipes[f"{hf}.self_attn.v_proj.weight"] = Recipe(
            kv, lambda w: w[1].transpose(1, 2).reshape(K * D, d), (K * D, d)
        )
        recipes[f"{hf}.self_attn.o_proj.weight"] = Recipe(
            (f"{p}/attn/attn_vec_einsum/w",), lambda w: w.reshape(H * D, d).T, (d, H * D)
        )
        gating = (f"{p}/mlp/gating_einsum/w",)
        if transposed_gating:  # 2B: [2, d, F]
            recipes[f"{hf}.mlp.gate_proj.weight"] = Recipe(gating, lambda w: w[0].T, (F, d))
            recipes[f"{hf}.mlp.up_proj.weight"] = Recipe(gating, lambda w: w[1].T, (F, d))
        else:  # 9B / 27B: [2, F, d]
            recipes[f"{hf}.mlp.gate_proj.weight"] = Recipe(gating, lambda w: w[0], (F, d))
            recipes[f"{hf}.mlp.up_proj.weight"] = Recipe(gating, lambda w: w[1], (F, d))
        recipes[f"{hf}.mlp.down_proj.weight"] = Recipe((f"{p}/mlp/linear/w",), lambda w: w.T, (d, F))
        for flax_norm, hf_norm in _FLAX_NORMS.items():
            recipes[f"{hf}.{hf_norm}.weight"] = Recipe((f"{p}/{flax_norm}/scale",), lambda w: w, (d,))
    return recipes
