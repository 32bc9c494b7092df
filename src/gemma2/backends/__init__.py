"""Backends: which kernels a built model runs, applied to it explicitly, never looked up by the core.

    from gemma2.backends import apply_backend
    apply_backend(model, "auto")   # "cpu": the native CPU kernels; "torch": PyTorch's ops

The core (model, attention, heads) runs PyTorch's ops and offers hooks: an attention function
and a rotary function per attention module, the logits' soft-cap, quantized layers' kernels and a
fused decode step. A backend fills them in; `reset` puts the PyTorch ones back. `from_pretrained`
applies "auto": the native CPU kernels where they run (a CPU model, GEMMA2_CPU_KERNELS not off,
a CPU they are built for), PyTorch's ops elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gemma2.attention import ATTENTION_FUNCTIONS, AttentionFunction, soft_cap
from gemma2.errors import InputError
from gemma2.heads import greedy_tokens
from gemma2.model import DecodeStep, Gemma2Attention, Gemma2Model, Gemma2RMSNorm, apply_rotary
from gemma2.quant import Int4Linear, Int8Linear
from gemma2.quant.layers import DecodeKernel, ExpandKernel

BACKENDS = ("auto", "cpu", "torch")


@dataclass(frozen=True)
class Kernels:
    """What a backend puts into the core's hooks. Its module classes subclass the core's and name
    it as `core_class`, so that one walk over a model can swap any backend's modules for another's."""

    linear: type[nn.Linear]
    norm: type[Gemma2RMSNorm]
    attention: AttentionFunction
    rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    soft_cap: Callable[[torch.Tensor, float | None], torch.Tensor]
    greedy_tokens: Callable[[torch.Tensor], torch.Tensor]
    quantized_decode: DecodeKernel | None = None
    quantized_expand: ExpandKernel | None = None
    decode_step: DecodeStep | None = None


PYTORCH = Kernels(nn.Linear, Gemma2RMSNorm, ATTENTION_FUNCTIONS["eager"], apply_rotary, soft_cap, greedy_tokens)


def install(model: Any, kernels: Kernels) -> None:
    """Put `kernels` into every hook of a model (whatever backend it ran before)."""
    for module in model.modules():
        core = getattr(type(module), "core_class", type(module))
        # Swapping the class keeps every parameter, tied weight and state-dict key as it is.
        if core is nn.Linear:
            module.__class__ = kernels.linear
        elif core is Gemma2RMSNorm:
            module.__class__ = kernels.norm
        elif isinstance(module, Gemma2Attention):
            module.attention_function, module.rotary = kernels.attention, kernels.rotary
        elif isinstance(module, (Int8Linear, Int4Linear)):
            module.decode_kernel, module.expand_kernel = kernels.quantized_decode, kernels.quantized_expand
        elif isinstance(module, Gemma2Model):
            module.decode_step = kernels.decode_step
    if hasattr(model, "logits_soft_cap"):
        model.logits_soft_cap, model.greedy_tokens = kernels.soft_cap, kernels.greedy_tokens


def reset(model: Any) -> None:
    """Put PyTorch's ops back into every hook (the "torch" backend)."""
    install(model, PYTORCH)


def _on_cpu(model: nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def resolve(model: Any, name: str = "auto") -> str:
    """The backend `name` means for this model: "auto" is "cpu" where the native kernels run, else "torch"."""
    if name not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name != "auto":
        return name
    from gemma2.backends import cpu

    return "cpu" if _on_cpu(model) and cpu.available() else "torch"


def apply_backend(model: Any, name: str = "auto") -> str:
    """Install backend `name` into a built model (after loading, quantizing or merging LoRA); returns its name."""
    resolved = resolve(model, name)
    if resolved == "cpu" and not _on_cpu(model):
        raise InputError("the cpu backend runs models on the CPU; this model has weights on another device")
    if resolved == "cpu":
        from gemma2.backends import cpu

        cpu.apply(model)
    else:
        reset(model)
    model.backend = resolved
    return resolved


def describe(model: Any) -> str:
    """Which backend and kernels the model runs, in words (for `gemma2 info` and the benchmark)."""
    name = getattr(model, "backend", "torch")
    if name == "cpu":
        from gemma2.backends import cpu

        return f"cpu (native {cpu.variant()} kernels)"
    return "torch (PyTorch's ops)"
