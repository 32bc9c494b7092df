"""Weight-only int8 and int4 quantization: the layers, `quantize`, and the checkpoint format.

    quantize(model, "int8")                 # per-output-channel int8, in place
    quantize(model, "int4", group_size=128)  # int4 in groups of 64/128/256 along the input

Activations stay in the model's dtype; only weights are stored in fewer bits and expanded inside
the matmul. The decoder layers' linear layers take the chosen width; the embedding, and with it
the tied LM head (the largest single matrix, read once per generated token), are always int8 with
one scale per vocabulary row, so output quality is not bought with a coarser vocabulary.

Arithmetic ("dequantized reference math", what the tests compare against):
    int8: w = q * scale[n]                       q in [-127, 127], scale = max|w[n, :]| / 127
    int4: w = (q - 8) * scale[n, k // G]         q in [0, 15], scale = max|w[n, group]| / 7
and y = x @ w^T. Prompts (many rows) expand a block of weight rows at a time to the activation
dtype and use the bf16 matmul. With the CPU backend (gemma2.backends.cpu), decode-sized inputs run
in its native kernels, which multiply the integer
weights with quantized activations in exact integer arithmetic and scales in float32: for int8
weights the activations are quantized per row to int16 (finer than bf16 for every element within
1/128 of the row's largest), for int4 weights per block of 64 to int8 (as fine as bf16 for each
block's largest elements; fewer instructions per weight, which two cores need to keep up with the
memory). Where those kernels are unavailable, PyTorch's _weight_int8pack_mm /
_weight_int4pack_mm_for_cpu do it with bf16 activations.

Checkpoint format (safetensors; config.json gets "quantization_config"):
    <linear>.weight         int8 [N, K]        or uint8 [N, K/2] (int4, two weights per byte)
    <linear>.weight_scale   float32 [N]        or float32 [N, K/G]
    model.embed_tokens.weight int8 [V, d], model.embed_tokens.weight_scale float32 [V]
int4 bytes: each block of 64 weights along K is 32 bytes; byte j holds weight j of the block in its
low nibble and weight j + 32 in its high nibble.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gemma2.errors import InputError

QUANT_METHOD = "gemma2"
MODES = ("int8", "int4")
GROUP_SIZES = (64, 128, 256)
DEFAULT_GROUP_SIZE = 128
ROW_BLOCK = 8192  # weight rows expanded at a time (bounds the memory of the float copy)
TORCH_KERNEL_ROWS = 8  # activation rows up to which PyTorch's packed weight-only kernels run

# A backend's kernels for a quantized layer (installed by gemma2.backends, never chosen here):
# decode(layer, x) -> y, or None where it does not apply; expand(layer, lo, hi, dtype) -> weight
# rows lo:hi, or None where it does not apply.
DecodeKernel = Callable[[Any, torch.Tensor], "torch.Tensor | None"]
ExpandKernel = Callable[[Any, int, int, torch.dtype], "torch.Tensor | None"]


# ------------------------------------------------------------------------------------------------
# Quantizing and expanding weight matrices


def quantize_int8(weight: torch.Tensor, absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 [N, K], scale float32 [N]).

    `absmax` [N] is each row's largest |w| when the rows are longer than `weight` (a tensor-parallel
    rank holds some of each row's columns), so that every rank quantizes with the whole row's scale.
    """
    qs, scales = [], []
    for start, block in zip(range(0, weight.shape[0], ROW_BLOCK), weight.split(ROW_BLOCK)):
        w = block.float()
        peak = w.abs().amax(dim=1) if absmax is None else absmax[start : start + block.shape[0]].float()
        scale = peak.clamp(min=1e-12) / 127.0
        qs.append(torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        scales.append(scale)
    return torch.cat(qs), torch.cat(scales)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [N, K]."""
    return q.float() * scale.float()[:, None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Unsigned nibbles [N, K] (values 0..15, K % 64 == 0) -> bytes uint8 [N, K/2], module layout."""
    N, K = q.shape
    nibbles = q.to(torch.uint8).view(N, K // 64, 2, 32)
    return (nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes uint8 [N, K/2] -> unsigned nibbles uint8 [N, K] (values 0..15)."""
    N, half = packed.shape
    blocks = packed.view(N, half // 32, 1, 32)
    return torch.cat([blocks & 0xF, blocks >> 4], dim=2).reshape(N, half * 2)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise int4: (packed uint8 [N, K/2], scale float32 [N, K/G])."""
    K = weight.shape[1]
    packed, scales = [], []
    for block in weight.split(ROW_BLOCK):
        w = block.float().view(block.shape[0], K // group_size, group_size)
        scale = w.abs().amax(dim=2).clamp(min=1e-12) / 7.0
        q = torch.round(w / scale[..., None]).clamp_(-8, 7) + 8
        packed.append(pack_int4(q.view(block.shape[0], K)))
        scales.append(scale)
    return torch.cat(packed), torch.cat(scales)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[N, K] in dtype: each weight is (q - 8) * scale rounded to dtype (bf16 for the kernels)."""
    N, G = packed.shape[0], packed.shape[1] * 2 // scale.shape[1]
    q = unpack_int4(packed).float().view(N, -1, G) - 8
    return (q * scale.float()[..., None]).to(dtype).view(N, -1)


def _blockwise_linear(x: torch.Tensor, rows: int, weight_rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """F.linear(x, W) where W [rows, K] is produced ROW_BLOCK rows at a time by weight_rows(lo, hi)."""
    if rows <= ROW_BLOCK:
        return F.linear(x, weight_rows(0, rows))
    return torch.cat([F.linear(x, weight_rows(lo, min(lo + ROW_BLOCK, rows))) for lo in range(0, rows, ROW_BLOCK)], -1)


# ------------------------------------------------------------------------------------------------
# Layers


class _QuantizedLinear(nn.Module):
    """What int8 and int4 linear layers share: the bias and the choice of kernel for each call.

    Decode-sized inputs run the backend's kernel where one is installed (`decode_kernel`), else
    PyTorch's packed kernel; anything else (prompts, float32, autograd, non-finite activations)
    multiplies blocks of weight rows expanded to x's dtype (`expand_kernel`, else in Python).
    """

    decode_kernel: DecodeKernel | None = None
    expand_kernel: ExpandKernel | None = None
    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: nn.Parameter | None
    in_features: int
    out_features: int

    def _set_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def _torch_kernel_applies(self, x: torch.Tensor) -> bool:
        raise NotImplementedError

    def _torch_kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _expand_python(self, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        """Weight rows lo:hi as a [hi - lo, in_features] matrix in dtype."""
        raise NotImplementedError

    def expand_rows(self, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        """Weight rows lo:hi expanded to dtype (the backend's expand kernel where it has one)."""
        if self.expand_kernel is not None:
            rows = self.expand_kernel(self, lo, hi, dtype)
            if rows is not None:
                return rows
        return self._expand_python(lo, hi, dtype)

    def expanded_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T with W expanded a block of rows at a time (no bias): exact for any input."""
        return _blockwise_linear(x, self.out_features, lambda lo, hi: self.expand_rows(lo, hi, x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        if self.decode_kernel is not None:
            out = self.decode_kernel(self, x)
        if (
            out is None
            and x.shape[:-1].numel() <= TORCH_KERNEL_ROWS
            and x.device.type == "cpu"
            and not x.requires_grad
            and self._torch_kernel_applies(x)
        ):
            out = self._torch_kernel(x)
        if out is None:
            out = self.expanded_linear(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class Int8Linear(_QuantizedLinear):
    """y = x @ (q * scale)^T (+ bias), q int8 [out, in], scale float32 [out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device: Any = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, absmax: torch.Tensor | None = None) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        layer.weight, layer.weight_scale = quantize_int8(linear.weight.detach(), absmax)
        layer._set_bias(linear)
        return layer

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale)

    def _expand_python(self, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int8(self.weight[lo:hi], self.weight_scale[lo:hi].float()).to(dtype)

    def _torch_kernel_applies(self, x: torch.Tensor) -> bool:
        return True

    def _torch_kernel(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.weight_scale.to(x.dtype))
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output channel"


class Int4Linear(_QuantizedLinear):
    """y = x @ W^T (+ bias) with W stored as packed nibbles and one float32 scale per group."""

    def __init__(
        self, in_features: int, out_features: int, group_size: int, bias: bool = False, device: Any = None
    ) -> None:
        super().__init__()
        if group_size not in GROUP_SIZES or in_features % group_size:
            raise InputError(
                f"int4 group size must be one of {GROUP_SIZES} and divide the input size {in_features}, "
                f"got {group_size}"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "weight_scale", torch.empty(out_features, in_features // group_size, dtype=torch.float32, device=device)
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        # PyTorch's own int4 layout and its scales, built on first need (where no backend kernel runs).
        self._torch_layout: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        layer = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None, device="meta")
        layer.weight, layer.weight_scale = quantize_int4(linear.weight.detach(), group_size)
        layer._set_bias(linear)
        return layer

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize_int4(self.weight, self.weight_scale, dtype)

    def _expand_python(self, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int4(self.weight[lo:hi], self.weight_scale[lo:hi].float(), dtype)

    def _torch_kernel_applies(self, x: torch.Tensor) -> bool:
        # PyTorch's int4 layout packs 16 output rows together, and its kernel takes bf16.
        return x.dtype == torch.bfloat16 and self.out_features % 16 == 0

    def _torch_kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self._torch_layout is None:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(self.weight).to(torch.int32), 1)
            scale = self.weight_scale.to(torch.bfloat16).t()
            self._torch_layout = packed, torch.stack([scale, torch.zeros_like(scale)], dim=-1).contiguous()
        packed, scales_and_zeros = self._torch_layout
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, self.group_size, scales_and_zeros)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}"


class Int8Embedding(nn.Module):
    """Embedding rows stored as int8 with one float32 scale per row; returns float32 rows."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, device: Any = None
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, dtype=torch.float32, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, device="meta")
        layer.weight, layer.weight_scale = quantize_int8(embedding.weight.detach())
        return layer

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[input_ids].float() * self.weight_scale.float()[input_ids, None]

    def as_linear(self) -> Int8Linear:
        """An LM head sharing this embedding's int8 rows and scales (tied weights)."""
        head = Int8Linear(self.embedding_dim, self.num_embeddings, device="meta")
        head.weight, head.weight_scale = self.weight, self.weight_scale
        return head


QuantizedLayer = Int8Linear | Int4Linear | Int8Embedding
