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

from typing import Any

from torch import nn

from gemma2.attention import ATTENTION_FUNCTIONS, soft_cap
from gemma2.errors import InputError
from gemma2.heads import greedy_tokens
from gemma2.model import Gemma2Attention, Gemma2Model, Gemma2RMSNorm, apply_rotary
from gemma2.quant import Int4Linear, Int8Linear

BACKENDS = ("auto", "cpu", "torch")


def reset(model: Any) -> None:
    """Put PyTorch's ops back into every hook (the "torch" backend)."""
    from gemma2.backends.cpu.layers import NativeLinear, NativeRMSNorm

    for module in model.modules():
        if type(module) is NativeLinear:
            setattr(module, "__class__", nn.Linear)  # noqa: B010 (the class swap of cpu.apply, undone)
        elif type(module) is NativeRMSNorm:
            setattr(module, "__class__", Gemma2RMSNorm)  # noqa: B010
        elif isinstance(module, Gemma2Attention):
            module.attention_function = ATTENTION_FUNCTIONS["eager"]
            module.rotary = apply_rotary
        elif isinstance(module, (Int8Linear, Int4Linear)):
            module.decode_kernel = module.expand_kernel = None
        elif isinstance(module, Gemma2Model):
            module.decode_step = None
    if hasattr(model, "logits_soft_cap"):
        model.logits_soft_cap = soft_cap
        model.greedy_tokens = greedy_tokens


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
    reset(model)
    if resolved == "cpu":
        from gemma2.backends import cpu

        cpu.apply(model)
    model.backend = resolved
    return resolved


def describe(model: Any) -> str:
    """Which backend and kernels the model runs, in words (for `gemma2 info` and the benchmark)."""
    name = getattr(model, "backend", "torch")
    if name == "cpu":
        from gemma2.backends import cpu

        return f"cpu (native {cpu.variant()} kernels)"
    return "torch (PyTorch's ops)"
