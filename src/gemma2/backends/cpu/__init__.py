"""The native CPU backend: C kernels for decode-sized work, picked per CPU (library.py), installed into a model.

from gemma2.backends.cpu import apply
apply(model)   # projections, norms, rotary, decode attention, the logits' soft-cap, quantized
               # layers' kernels and the fused decode step (decode.py)
"""

from __future__ import annotations

from typing import Any

from gemma2.backends import Kernels, install
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
from gemma2.model import Gemma2Model

__all__ = ["KERNELS", "apply", "available", "variant"]

KERNELS = Kernels(
    linear=NativeLinear,
    norm=NativeRMSNorm,
    attention=native_attention,
    rotary=native_rotary,
    soft_cap=native_soft_cap,
    greedy_tokens=native_greedy_tokens,
    quantized_decode=quantized_decode,
    quantized_expand=quantized_expand,
    decode_step=decode.decode_step,
)


def apply(model: Any) -> None:
    """Install the native kernels into a model, and plan its fused decode step once."""
    if not available():
        raise InputError(
            "the cpu backend needs the native kernels, which are not available here "
            "(GEMMA2_CPU_KERNELS / GEMMA2_NATIVE_KERNELS, the CPU's features, or no C compiler)"
        )
    install(model, KERNELS)
    for module in model.modules():
        if isinstance(module, Gemma2Model):
            decode.plan(module)
