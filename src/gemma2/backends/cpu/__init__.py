"""The native CPU backend: C kernels for decode-sized work, picked per CPU (library.py), installed into a model.

from gemma2.backends.cpu import apply
apply(model)   # projections, norms, rotary, decode attention, the logits' soft-cap, quantized
               # layers' kernels and the fused decode step (decode.py)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gemma2.backends.cpu import decode
from gemma2.backends.cpu.layers import (
    NativeLinear,
    NativeRMSNorm,
    native_attention,
    native_greedy_tokens,
    native_rotary,
    native_soft_cap,
    quantized_decode,
    quantized_expand,
)
from gemma2.backends.cpu.library import available, variant
from gemma2.errors import InputError
from gemma2.model import Gemma2Attention, Gemma2Model, Gemma2RMSNorm
from gemma2.quant import Int4Linear, Int8Linear

__all__ = ["apply", "available", "variant"]


def apply(model: Any) -> None:
    """Install the native kernels into a model whose core modules are PyTorch's (see backends.reset)."""
    if not available():
        raise InputError(
            "the cpu backend needs the native kernels, which are not available here "
            "(GEMMA2_CPU_KERNELS / GEMMA2_NATIVE_KERNELS, the CPU's features, or no C compiler)"
        )
    for module in model.modules():
        # Swapping the class keeps every parameter, tied weight and state-dict key as it is.
        if type(module) is nn.Linear:
            module.__class__ = NativeLinear
        elif type(module) is Gemma2RMSNorm:
            module.__class__ = NativeRMSNorm
        elif isinstance(module, Gemma2Attention):
            module.attention_function = native_attention
            module.rotary = native_rotary
        elif isinstance(module, (Int8Linear, Int4Linear)):
            module.decode_kernel = quantized_decode
            module.expand_kernel = quantized_expand
    if hasattr(model, "logits_soft_cap"):
        model.logits_soft_cap = native_soft_cap
        model.greedy_tokens = native_greedy_tokens
    for module in model.modules():
        if isinstance(module, Gemma2Model):
            module.decode_step = decode.decode_step
            decode.plan(module)
