"""What the CPU backend installs into a built model: modules and functions with the core's signatures.

Each runs its native kernel (kernels.py) where that is an exact stand-in for the PyTorch op; prompts
on CPUs without bf16 matrix instructions multiply in float32 (prefill.py); the core's own op runs
everywhere else (training, float32 models, other devices).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gemma2.attention import MaskSpec, attention, soft_cap
from gemma2.backends.cpu import kernels, prefill
from gemma2.heads import greedy_tokens
from gemma2.model import Gemma2RMSNorm, apply_rotary
from gemma2.quant import Int4Linear, Int8Linear


class NativeLinear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose decode-sized bf16 calls run natively."""

    core_class = nn.Linear  # what gemma2.backends.install swaps it for and from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.bfloat16:
            return F.linear(x, self.weight, self.bias)
        if kernels.applies(x, self.weight):
            out = kernels.linear_bf16(x, self.weight)
        elif prefill.applies(x, self.weight):
            out = prefill.linear(x, self.out_features, lambda lo, hi: self.weight[lo:hi])
        else:
            return F.linear(x, self.weight, self.bias)
        return out if self.bias is None else out + self.bias


class NativeRMSNorm(Gemma2RMSNorm):
    """Gemma2RMSNorm whose decode-sized bf16 calls run natively (the reference's roundings)."""

    core_class = Gemma2RMSNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.rms_norm_applies(x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def native_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary, natively for one token's heads (bit-identical)."""
    if kernels.rotary_applies(x, cos, sin):
        return kernels.rotary(x, cos, sin)
    return apply_rotary(x, cos, sin)


def native_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: MaskSpec,
    scaling: float,
    softcap: float | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The eager attention, with one new token per row read natively from the cache (same roundings)."""
    if dropout == 0.0 and mask.query_segments is None and kernels.decode_attention_applies(query, key, value):
        return kernels.decode_attention(
            query,
            key,
            value,
            mask.key_positions,
            mask.query_positions[:, 0],
            mask.window,
            mask.key_padding,
            scaling,
            softcap,
        )
    matmul = prefill.matmul if prefill.applies(query, key, value) else torch.matmul
    return attention(query, key, value, mask, scaling, softcap, dropout, matmul=matmul)


def native_soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The final soft-cap, natively for a decode step's logits (bit-identical)."""
    if cap is not None and kernels.logits_op_applies(logits):
        return kernels.soft_cap(logits, cap)
    return soft_cap(logits, cap)


def native_greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1), natively for a decode step's bf16 logits (the same index, ties and NaN included)."""
    if kernels.logits_op_applies(logits):
        return kernels.argmax(logits)
    return greedy_tokens(logits)


def quantized_decode(layer: Any, x: torch.Tensor) -> torch.Tensor | None:
    """A quantized layer's matmul (no bias): decode-sized ones natively, prompts in float32 where that
    is faster (prefill.py); None where neither applies.

    Non-finite activations cannot go through the integer kernels: they take the exact float path.
    """
    if not kernels.applies(x, layer.weight_scale):
        if prefill.applies(x):
            return prefill.linear(x, layer.out_features, lambda lo, hi: layer.expand_rows(lo, hi, torch.bfloat16))
        return None
    scale = layer.weight_scale.float()
    if isinstance(layer, Int8Linear):
        out = kernels.linear_int8(x, layer.weight, scale)
    else:
        out = kernels.linear_int4(x, layer.weight, scale, layer.group_size)
    return layer.expanded_linear(x) if out is None else out


def quantized_expand(layer: Any, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Weight rows lo:hi expanded to bf16 natively (bit-identical to the Python expansion)."""
    if dtype != torch.bfloat16 or layer.weight.device.type != "cpu":
        return None
    q, scale = layer.weight[lo:hi], layer.weight_scale[lo:hi].float()
    if isinstance(layer, Int4Linear):
        return kernels.dequantize_int4(q.contiguous(), scale.contiguous(), layer.group_size)
    if q.shape[1] % 16:
        return None
    return kernels.dequantize_int8(q, scale)
