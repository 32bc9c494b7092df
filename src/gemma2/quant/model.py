"""Quantizing a whole model, and the checkpoint's "quantization_config" (see gemma2.quant.layers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gemma2.errors import CheckpointError, InputError
from gemma2.quant.layers import (
    DEFAULT_GROUP_SIZE,
    GROUP_SIZES,
    MODES,
    QUANT_METHOD,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    QuantizedLayer,
)


def quantization_config(mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, Any]:
    """The "quantization_config" entry of config.json for a mode."""
    config: dict[str, Any] = {"quant_method": QUANT_METHOD, "weights": mode, "embedding": "int8"}
    if mode == "int4":
        config["group_size"] = group_size
    return config


def _check_config(config: dict[str, Any], source: str) -> tuple[str, int]:
    if not isinstance(config, dict) or config.get("quant_method") != QUANT_METHOD:
        method = config.get("quant_method") if isinstance(config, dict) else config
        raise CheckpointError(
            f"{source}: quantization_config quant_method {method!r} is not supported "
            f"(gemma2 reads its own {QUANT_METHOD!r} int8/int4 format)"
        )
    mode = config.get("weights")
    if mode not in MODES:
        raise CheckpointError(f"{source}: quantization_config weights must be one of {MODES}, got {mode!r}")
    group_size = config.get("group_size", DEFAULT_GROUP_SIZE)
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise CheckpointError(
            f"{source}: quantization_config group_size must be one of {GROUP_SIZES}, got {group_size}"
        )
    return mode, int(group_size)


def _layer_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    backbone: Any = getattr(model, "backbone", model)
    found = []
    for layer in backbone.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    found.append((parent, name, child))
    return found


def _replace_layers(
    model: Any, mode: str, group_size: int, make: str, absmax: Mapping[nn.Module, torch.Tensor] | None = None
) -> None:
    """Swap every decoder linear, the embedding and the LM head for quantized layers.

    make="quantize" quantizes the existing weights; make="empty" builds meta skeletons to load into.
    `absmax` gives int8 linears whose rows are split across processes their whole rows' largest |w|.
    """
    linears = _layer_linears(model)
    if mode == "int4":
        for parent, name, linear in linears:
            if linear.in_features % group_size:
                raise InputError(
                    f"int4 group size {group_size} does not divide the input size {linear.in_features} "
                    f"of {type(parent).__name__}.{name}; choose one of {GROUP_SIZES} that does"
                )
    for parent, name, linear in linears:
        bias = linear.bias is not None
        if make == "empty":
            new: nn.Module = (
                Int8Linear(linear.in_features, linear.out_features, bias, device="meta")
                if mode == "int8"
                else Int4Linear(linear.in_features, linear.out_features, group_size, bias, device="meta")
            )
        else:
            if mode == "int8":
                new = Int8Linear.from_linear(linear, (absmax or {}).get(linear))
            else:
                new = Int4Linear.from_linear(linear, group_size)
        setattr(parent, name, new)
    backbone: Any = getattr(model, "backbone", model)
    embedding = backbone.embed_tokens
    if make == "empty":
        backbone.embed_tokens = Int8Embedding(
            embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, device="meta"
        )
    else:
        backbone.embed_tokens = Int8Embedding.from_embedding(embedding)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        if model.config.tie_word_embeddings:
            model.tie_weights()  # the head shares the int8 embedding (heads.py)
        elif make == "empty":
            model.lm_head = Int8Linear(head.in_features, head.out_features, head.bias is not None, device="meta")
        else:
            model.lm_head = Int8Linear.from_linear(head)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(module, QuantizedLayer) for module in model.modules())


def quantize(
    model: Any,
    mode: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    absmax: Mapping[nn.Module, torch.Tensor] | None = None,
) -> Any:
    """Quantize a loaded Gemma 2 model's weights in place (see the module docstring); returns it.

    mode "int8": per-output-channel int8 everywhere. mode "int4": group-wise int4 decoder layers
    (group_size 64, 128 or 256 input weights per scale), int8 embedding and LM head. `absmax`:
    see _replace_layers (tensor-parallel loading passes it).
    """
    if getattr(model, "tensor_parallel", None) is not None:
        raise InputError(
            "quantize a model before sharding it for tensor parallelism "
            "(or load it with from_pretrained(..., tp_plan='auto', quantize=...))"
        )
    if mode not in MODES:
        raise InputError(f"quantization mode must be one of {MODES}, got {mode!r}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise InputError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    if is_quantized(model):
        raise InputError("the model is already quantized")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise InputError("cannot quantize a model whose weights are still on the meta device")
    with torch.no_grad():
        _replace_layers(model, mode, group_size, make="quantize", absmax=absmax)
    model.config.extra["quantization_config"] = quantization_config(mode, group_size)
    if getattr(model, "backend", "torch") != "torch":
        # The new layers get the kernels of the backend the model runs (and its fused decode is re-planned).
        from gemma2.backends import apply_backend

        apply_backend(model, model.backend)
    return model


def prepare_for_loading(model: Any, config: dict[str, Any], source: str) -> None:
    """Replace a meta skeleton's layers with empty quantized ones matching a checkpoint's config."""
    mode, group_size = _check_config(config, source)
    try:
        _replace_layers(model, mode, group_size, make="empty")
    except InputError as error:
        raise CheckpointError(f"{source}: quantization_config does not fit the model: {error}") from None


def stored_dtype_tensors(model: nn.Module) -> dict[str, torch.dtype]:
    """State-dict names whose stored dtype is part of the format (never converted on load)."""
    fixed = {}
    for prefix, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            for name in ("weight", "weight_scale"):
                fixed[f"{prefix}.{name}"] = getattr(module, name).dtype
    return fixed
