"""Native matrix-vector kernels for CPU decoding, and the Linear layer that uses them.

Decoding one token reads every weight once, so its speed is memory bandwidth. PyTorch's bf16
matmul reaches about 60 % of it for a single row on AVX-512 CPUs, and its weight-only int8/int4
kernels less. cpu_kernels.c reads each weight row once for up to MAX_ROWS activation rows and
runs close to the bandwidth of a plain reduction (see `gemma2 bench`).

The C file ships with the package and is compiled on first use with the system C compiler into
the cache (keyed by its sha256), then loaded with ctypes. Everything falls back to PyTorch's own
kernels when the library cannot be used: not x86-64 Linux, no AVX-512 BF16, no compiler, or
GEMMA2_NATIVE_KERNELS=0. The bf16 kernel only runs where they are exact stand-ins for F.linear in
bf16: CPU tensors, bf16 activations, no autograd, at most MAX_ROWS rows, K a multiple of 32.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
SCALAR_SOURCE = Path(__file__).with_name("cpu_kernels_scalar.c")
MAX_ROWS = 8  # activation rows per call; must match MAX_ROWS in cpu_kernels.c and cpu_kernels_scalar.c
SMALL_OP_ROWS = 64  # rows up to which the single-threaded norm runs natively (decode and small batches)
CPU_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni")  # /proc/cpuinfo names
FLAGS = ["-O3", *(f"-m{feature.replace('_', '')}" for feature in CPU_FEATURES), "-fopenmp", "-shared", "-fPIC"]
SCALAR_FLAGS = ["-O2", "-fopenmp", "-shared", "-fPIC"]
# Which variant _library() loads: "auto" (the default) is avx512 where the CPU has it and PyTorch's
# kernels elsewhere, since the scalar variant is a portable correctness reference, not a fast path.
# GEMMA2_NATIVE_KERNELS=0 (the older switch) means "off" too.
VARIANT_ENV = "GEMMA2_CPU_KERNELS"
VARIANT_CHOICES = ("auto", "avx512", "scalar", "off")

_c_int64, _c_ptr = ctypes.c_int64, ctypes.c_void_p


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: the same entry points (and ABI) from another C source."""

    source: Path
    flags: tuple[str, ...]
    cpu_features: tuple[str, ...] = ()  # /proc/cpuinfo names it needs on x86-64 Linux; () runs anywhere
    optional_flags: tuple[str, ...] = ()  # dropped on a second try when the compiler rejects them


VARIANTS = {
    "avx512": Variant(SOURCE, tuple(FLAGS), CPU_FEATURES),
    # Builds without OpenMP too (a compiler without it, e.g. Apple's clang): one thread then.
    "scalar": Variant(SCALAR_SOURCE, tuple(SCALAR_FLAGS), optional_flags=("-fopenmp",)),
}

_loaded: dict[str, ctypes.CDLL] = {}  # the libraries load_variant has loaded, by variant


def _cpu_supports_kernels(features: tuple[str, ...] = CPU_FEATURES) -> bool:
    if not features:
        return True
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {feature}" in flags for feature in features)


def _build(directory: Path, name: str = "avx512") -> Path:
    """Compile variant `name` into directory (atomically: a half-written library never appears)."""
    variant = VARIANTS[name]
    library = directory / "libgemma2_cpu.so"
    if library.exists():
        return library
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found (set CC)")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        partial = Path(scratch) / library.name
        attempts = [variant.flags]
        if variant.optional_flags:
            attempts.append(tuple(flag for flag in variant.flags if flag not in variant.optional_flags))
        for flags in attempts:
            result = subprocess.run(
                [compiler, *flags, str(variant.source), "-o", str(partial), "-lm"],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode == 0:
                break
        else:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    return library


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    """Set the argument and result types of every entry point (the same for every variant)."""
    library.gemma2_linear_int8.restype = library.gemma2_linear_int4.restype = ctypes.c_int
    library.gemma2_linear_bf16.argtypes = [_c_ptr, _c_ptr, _c_ptr, _c_int64, _c_int64, _c_int64, ctypes.c_int]
    library.gemma2_linear_int8.argtypes = [_c_ptr, _c_ptr, _c_ptr, _c_ptr, _c_int64, _c_int64, _c_int64, ctypes.c_int]
    library.gemma2_linear_int4.argtypes = [
        *(_c_ptr,) * 4,
        *(_c_int64,) * 4,
        ctypes.c_int,
    ]
    library.gemma2_dequantize_int4.argtypes = [_c_ptr, _c_ptr, _c_ptr, _c_int64, _c_int64, _c_int64, ctypes.c_int]
    library.gemma2_decode_attention.argtypes = [
        *(_c_ptr,) * 5,
        _c_int64,
        _c_ptr,
        _c_int64,
        _c_ptr,
        _c_int64,
        _c_ptr,
        *(_c_int64,) * 7,
        ctypes.c_float,
        ctypes.c_float,
        ctypes.c_int,
    ]
    library.gemma2_dequantize_int8.argtypes = [_c_ptr, _c_ptr, _c_ptr, _c_int64, _c_int64, ctypes.c_int]
    library.gemma2_rms_norm.argtypes = [_c_ptr, _c_ptr, _c_ptr, _c_int64, _c_int64, ctypes.c_float]
    library.gemma2_rotary.argtypes = [*(_c_ptr,) * 4, *(_c_int64,) * 4]
    library.gemma2_decode_layers.argtypes = [_c_int64, *(_c_ptr,) * 5, _c_int64, ctypes.c_int]
    library.gemma2_decode_layers.restype = _c_int64
    library.gemma2_soft_cap.argtypes = [_c_ptr, _c_ptr, _c_int64, ctypes.c_float, ctypes.c_int]
    library.gemma2_argmax_bf16.argtypes = [_c_ptr, _c_int64, _c_int64, _c_ptr]
    return library


def load_variant(name: str) -> ctypes.CDLL:
    """Build (once, into the cache) and load variant `name` of the kernels, whatever GEMMA2_CPU_KERNELS says.

    Raises ValueError for an unknown name and OSError where it cannot be built or loaded, or where
    this CPU lacks the instructions it needs. Loading one variant does not change which one
    _library() uses, so tests can call two side by side.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown CPU kernel variant {name!r}: expected one of {', '.join(VARIANTS)}")
    if name in _loaded:
        return _loaded[name]
    variant = VARIANTS[name]
    if not _cpu_supports_kernels(variant.cpu_features):
        raise OSError(f"the {name} kernels need x86-64 Linux with {', '.join(variant.cpu_features)}")
    from gemma2.assets import cache_dir

    # The variant, its source and its flags all go into the key: each build gets its own directory.
    key = name.encode() + b"\0" + variant.source.read_bytes() + " ".join(variant.flags).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    library = _declare(ctypes.CDLL(str(_build(cache_dir() / "kernels" / digest, name))))
    _loaded[name] = library
    return library


def _requested_variant() -> str:
    """GEMMA2_CPU_KERNELS (auto, avx512, scalar or off; GEMMA2_NATIVE_KERNELS=0 means off)."""
    raw = os.environ.get(VARIANT_ENV, "auto")
    value = raw.strip().lower() or "auto"
    if value not in VARIANT_CHOICES:
        raise ValueError(f"{VARIANT_ENV}={raw!r} is not one of {', '.join(VARIANT_CHOICES)}")
    return "off" if os.environ.get("GEMMA2_NATIVE_KERNELS", "1") == "0" else value


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The kernels GEMMA2_CPU_KERNELS selects, or None for PyTorch's own (a failed build warns)."""
    name = _requested_variant()
    if name == "auto":
        name = "avx512" if _cpu_supports_kernels(VARIANTS["avx512"].cpu_features) else "off"
    if name == "off":
        return None
    try:
        return load_variant(name)
    except OSError as error:
        logger.warning("gemma2: native CPU kernels unavailable, using PyTorch's (%s)", error)
        return None


def variant() -> str | None:
    """Which variant _library() loaded ("avx512" or "scalar"), or None when it uses PyTorch's kernels."""
    library = _library()
    return next((name for name, loaded in _loaded.items() if loaded is library), None)


def available() -> bool:
    """Whether native kernels (of the selected variant) are compiled, loaded and usable on this CPU."""
    return _library() is not None


def row_count(x: torch.Tensor) -> int:
    """Rows of x seen as [rows, x.shape[-1]] (0 for an empty last dimension)."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) may run natively: a small bf16 batch on the CPU, no autograd."""
    return (
        0 < row_count(x) <= MAX_ROWS
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.shape[-1] % 32 == 0
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and _library() is not None
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def linear_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] bf16 times weight [N, K] bf16 -> [..., N] bf16; call only where `applies`."""
    library = _library()
    assert library is not None
    rows, weight = _rows(x), weight.contiguous()
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.bfloat16)
    library.gemma2_linear_bf16(
        rows.data_ptr(), weight.data_ptr(), out.data_ptr(), *out.shape, weight.shape[1], torch.get_num_threads()
    )
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x [..., K] bf16 times (int8 weight [N, K] * float32 scale [N]) -> [..., N] bf16.

    None when x holds NaN or infinities (the integer kernel cannot carry them; compute in floats).
    """
    library = _library()
    assert library is not None
    rows, weight, scale = _rows(x), weight.contiguous(), scale.contiguous()
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.bfloat16)
    non_finite = library.gemma2_linear_int8(
        rows.data_ptr(),
        weight.data_ptr(),
        scale.data_ptr(),
        out.data_ptr(),
        *out.shape,
        weight.shape[1],
        torch.get_num_threads(),
    )
    return None if non_finite else out.view(*x.shape[:-1], weight.shape[0])


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """x [..., K] bf16 times int4 weights (packed uint8 [N, K/2], scales [N, K/G]) -> [..., N] bf16.

    None when x holds NaN or infinities, as linear_int8.
    """
    library = _library()
    assert library is not None
    rows, packed, scale = _rows(x), packed.contiguous(), scale.contiguous()
    out = torch.empty(rows.shape[0], packed.shape[0], dtype=torch.bfloat16)
    non_finite = library.gemma2_linear_int4(
        rows.data_ptr(),
        packed.data_ptr(),
        scale.data_ptr(),
        out.data_ptr(),
        *out.shape,
        rows.shape[1],
        group_size,
        torch.get_num_threads(),
    )
    return None if non_finite else out.view(*x.shape[:-1], packed.shape[0])


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """The bf16 weight [N, K] of packed int4 weights (native; see quantization for the layout)."""
    library = _library()
    assert library is not None
    N, K = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(N, K, dtype=torch.bfloat16)
    library.gemma2_dequantize_int4(
        packed.data_ptr(), scale.data_ptr(), out.data_ptr(), N, K, group_size, torch.get_num_threads()
    )
    return out


def small_op_applies(*tensors: torch.Tensor) -> bool:
    """Whether tensors are bf16 CPU tensors of a decode step (no autograd) and the library is loaded."""
    return (
        all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and _library() is not None
    )


def decode_attention_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether decode_attention can take this call: one bf16 query per row over dense cache slots."""
    _, H, T, D = query.shape
    return (
        T == 1
        and D % 32 == 0
        and H % key.shape[1] == 0
        and key.stride() == value.stride()
        and key.stride(3) == 1
        and key.stride(2) == D
        and small_op_applies(query, key, value)
    )


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_positions: torch.Tensor,
    query_positions: torch.Tensor,
    window: int | None,
    key_padding: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """Eager attention of one query per row (see cpu_kernels.c); [B, H, 1, D] -> [B, 1, H, D].

    Row b's query at position query_positions[b] sees the keys whose slot position
    (key_positions [B or 1, S], -1 for an empty one) is at most its own, within `window` of it, and
    True in key_padding [B or 1, S].
    """
    library = _library()
    assert library is not None
    B, H, _, D = query.shape
    K, S = key.shape[1], key.shape[2]
    query = query.reshape(B, H, D).contiguous()
    positions = key_positions.to(torch.int64).expand(B, S).contiguous()
    queries = query_positions.to(torch.int64).reshape(-1).expand(B).contiguous()
    padding = None if key_padding is None else key_padding.to(torch.uint8).contiguous()
    padding_stride = 0 if padding is None or padding.shape[0] == 1 else S
    out = torch.empty(B, 1, H, D, dtype=torch.bfloat16)
    library.gemma2_decode_attention(
        query.data_ptr(),
        key.data_ptr(),
        value.data_ptr(),
        None,
        positions.data_ptr(),
        S,
        None if padding is None else padding.data_ptr(),
        padding_stride,
        queries.data_ptr(),
        window or 0,
        out.data_ptr(),
        B,
        H,
        K,
        S,
        D,
        key.stride(0),
        key.stride(1),
        scaling,
        softcap or 0.0,
        torch.get_num_threads(),
    )
    return out


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The bf16 weight [N, K] of int8 weights [N, K] with float32 row scales [N] (K % 16 == 0)."""
    library = _library()
    assert library is not None
    weight, scale = weight.contiguous(), scale.contiguous()
    out = torch.empty(weight.shape, dtype=torch.bfloat16)
    library.gemma2_dequantize_int8(
        weight.data_ptr(), scale.data_ptr(), out.data_ptr(), *weight.shape, torch.get_num_threads()
    )
    return out


def rms_norm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether rms_norm can take this call: a few bf16 rows (decode), a contiguous bf16 weight."""
    return 0 < row_count(x) <= SMALL_OP_ROWS and weight.is_contiguous() and small_op_applies(x, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm with the reference's roundings (see cpu_kernels.c); call only where it applies."""
    library = _library()
    assert library is not None
    rows = _rows(x)
    out = torch.empty_like(rows)
    library.gemma2_rms_norm(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), *rows.shape, eps)
    return out.view(x.shape)


def rotary_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether rotary can take this call: x [B, heads, 1, D] laid out as [B, heads, D], cos/sin [B or 1, 1, D]."""
    B, heads, T, D = x.shape
    return (
        T == 1
        and x.stride(3) == 1
        and x.stride(1) == D
        and x.stride(0) == heads * D
        and cos.shape == sin.shape
        and cos.shape[0] in (1, B)
        and cos.shape[1:] == (1, D)
        and cos.is_contiguous()
        and sin.is_contiguous()
        and small_op_applies(x, cos, sin)
    )


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, 1, D] rotated by cos/sin [B or 1, 1, D] with the reference's bf16 roundings."""
    library = _library()
    assert library is not None
    B, heads, _, D = x.shape
    out = torch.empty(B, heads, 1, D, dtype=x.dtype)
    cos_stride = D if cos.shape[0] == B and B > 1 else 0
    library.gemma2_rotary(x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(), B, heads, D, cos_stride)
    return out


def logits_op_applies(logits: torch.Tensor) -> bool:
    """Whether soft_cap / argmax can take these logits: a decode step's few bf16 rows, contiguous."""
    return (
        logits.dim() >= 1
        and 0 < row_count(logits) <= SMALL_OP_ROWS
        and logits.is_contiguous()
        and small_op_applies(logits)
    )


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """tanh(logits / cap) * cap with the bf16 roundings of those three tensor ops; where logits_op_applies."""
    library = _library()
    assert library is not None
    out = torch.empty_like(logits)
    library.gemma2_soft_cap(logits.data_ptr(), out.data_ptr(), logits.numel(), cap, torch.get_num_threads())
    return out


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) (first largest; first NaN if any); where logits_op_applies."""
    library = _library()
    assert library is not None
    out = torch.empty(logits.shape[:-1], dtype=torch.int64)
    library.gemma2_argmax_bf16(logits.data_ptr(), row_count(logits), logits.shape[-1], out.data_ptr())
    return out


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose decode-sized bf16 calls run natively."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.bfloat16 or not applies(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        out = linear_bf16(x, self.weight)
        return out if self.bias is None else out + self.bias
