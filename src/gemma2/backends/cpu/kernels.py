"""Native kernels for CPU decoding as tensor functions, each with the check of where it applies.

Decoding one token reads every weight once, so its speed is memory bandwidth. PyTorch's bf16
matmul reaches about 60 % of it for a single row on AVX-512 CPUs, and its weight-only int8/int4
kernels less. The C kernels (kernels_avx512.c) read each weight row once for up to MAX_ROWS
activation rows and run close to the bandwidth of a plain reduction (see `gemma2 bench`).

Each function runs only where it is an exact stand-in for the PyTorch op it replaces: CPU tensors,
bf16 activations, no autograd, decode-sized inputs (the `*_applies` checks), and the library
loaded (library.py).
"""

from __future__ import annotations

import torch

from gemma2.backends.cpu.library import MAX_ROWS, SMALL_OP_ROWS, _library, available

__all__ = ["MAX_ROWS", "SMALL_OP_ROWS", "available"]  # the limits and the switch the callers check


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
    """Eager attention of one query per row (see kernels_avx512*.c); [B, H, 1, D] -> [B, 1, H, D].

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
    """Gemma's RMSNorm with the reference's roundings (see kernels_avx512*.c); call only where it applies."""
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
