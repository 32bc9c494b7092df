"""Prompt-sized bf16 products in float32, on CPUs without bf16 matrix instructions.

Where the CPU has no bf16 dot products (AVX2 x86-64 CPUs, AArch64 without FEAT_BF16), PyTorch's bf16
matrix product falls back to a plain loop: on a Zen 3 it ran about 5x slower than float32 for a
linear layer and 70x slower for attention's batched products (pytorch/pytorch #146508). So prompts
(more than MAX_ROWS rows) multiply in float32: the activations widened once, the weights a chunk of
rows at a time (never a float32 copy of the whole model), float32 sums rounded once to bf16 as a bf16
matrix product rounds them. The results equal the bf16 path's within bf16 rounding (only the order of
the float32 sums differs). Decode-sized products stay with the native kernels.

GEMMA2_FLOAT32_PREFILL=auto (the default: where the CPU lacks bf16 matrix instructions), 1 or 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache

import torch

from gemma2.backends.cpu.library import MAX_ROWS, cpu_architecture, cpu_features

SETTING_ENV = "GEMMA2_FLOAT32_PREFILL"
CHUNK_BYTES = 4 << 20  # float32 weight rows widened at a time: cache-sized, whatever the layer's width
# /proc/cpuinfo names of bf16 matrix instructions PyTorch's bf16 products use (oneDNN), per architecture.
BF16_MATRIX_FEATURES = {"x86_64": ("avx512_bf16", "amx_bf16"), "aarch64": ("bf16",)}


@lru_cache(maxsize=1)
def _cpu_lacks_bf16_matrix_instructions() -> bool:
    features = BF16_MATRIX_FEATURES.get(cpu_architecture())
    return features is not None and not any(name in cpu_features() for name in features)


def enabled() -> bool:
    """Whether prompts multiply in float32 here (GEMMA2_FLOAT32_PREFILL, else the CPU's features)."""
    raw = os.environ.get(SETTING_ENV, "auto").strip().lower()
    if raw in ("1", "on", "true"):
        return True
    if raw in ("0", "off", "false"):
        return False
    if raw not in ("", "auto"):
        raise ValueError(f"{SETTING_ENV}={raw!r} is not one of auto, 1, 0")
    return _cpu_lacks_bf16_matrix_instructions()


def applies(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a product with x runs here in float32: a prompt-sized bf16 input on the CPU, no autograd."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.numel() > MAX_ROWS * x.shape[-1]
        and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))
        and enabled()
    )


def linear(x: torch.Tensor, rows: int, weight_rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """F.linear(x, W) in float32 sums, rounded to bf16: W [rows, K] comes weight_rows(lo, hi) at a time
    (any dtype: bf16 weights, or quantized ones expanded to bf16) and is widened a chunk at a time."""
    K = x.shape[-1]
    inputs = x.reshape(-1, K).float()
    out = torch.empty(inputs.shape[0], rows, dtype=torch.bfloat16)
    chunk = max(16, CHUNK_BYTES // (4 * max(K, 1)))
    for lo in range(0, rows, chunk):
        hi = min(lo + chunk, rows)
        out[:, lo:hi] = torch.mm(inputs, weight_rows(lo, hi).float().t())
    return out.view(*x.shape[:-1], rows)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.matmul of two bf16 tensors in float32 sums, rounded to bf16 (attention's products)."""
    return torch.matmul(a.float(), b.float()).to(a.dtype)
