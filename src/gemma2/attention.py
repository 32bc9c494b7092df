"""Gemma 2 attention kernels and the masks they use.

One signature for every kernel: queries [B, H, T, D], keys and values [B, K, S, D] (K divides H;
query head h reads key/value head h // (H / K)), a `MaskSpec` saying which keys each query may see,
and the output [B, T, H, D]. The exact kernel follows transformers' eager Gemma 2 op for op:

    s = (q @ k^T) * query_pre_attn_scalar**-0.5
    s = tanh(s / cap) * cap              # soft-cap BEFORE the mask, else masked keys leak (-50)
    s = s + mask                         # 0 or finfo(dtype).min, never -inf: pad rows stay finite
    p = softmax(s, float32).to(dtype)
    out = p @ v

For long inputs the same computation runs one block of queries at a time, so no [B, H, T, S]
score tensor is ever held whole (an 8192-token prefill of gemma-2-2b would otherwise need 2 GiB
per layer in float32). Each block's rows are computed exactly as in the one-shot kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Largest float32 score block (bytes) the tiled kernel holds at once.
DEFAULT_SCORE_BUDGET_BYTES = 256 * 1024 * 1024


@dataclass
class MaskSpec:
    """Which keys each query may attend to, one row at a time: positions per row, built lazily per block of queries.

    Positions are cache slots (0, 1, 2, ... over everything a row has seen), not position_ids:
    that is the reference's convention, and it keeps left-padded rows' windows aligned with slots.
    Rows of one batch may sit at different positions (continuous batching); a leading dimension
    of 1 is shared by every row.
    """

    query_positions: torch.Tensor  # [B or 1, T] slot of each query
    key_positions: torch.Tensor  # [B or 1, S] slot of each key; -1 marks an empty cache slot
    window: int | None = None  # sliding layers: a query at q sees keys k with q - W < k <= q
    key_padding: torch.Tensor | None = None  # [B, S] bool, False for padding keys
    query_segments: torch.Tensor | None = None  # [B, T] packed-document index of each query
    key_segments: torch.Tensor | None = None  # [B, S]
    _whole: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # One row of positions ([T], [S]) is shared by every row of the batch.
        if self.query_positions.dim() == 1:
            self.query_positions = self.query_positions[None]
        if self.key_positions.dim() == 1:
            self.key_positions = self.key_positions[None]

    def allowed(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Boolean mask [B or 1, 1, t, S] for queries start:stop."""
        q = self.query_positions[:, start:stop, None]  # [B, t, 1]
        k = self.key_positions[:, None, :]  # [B, 1, S]
        allowed = (k <= q) & (k >= 0)
        if self.window is not None:
            allowed = allowed & (k > q - self.window)
        if self.key_padding is not None:
            allowed = allowed & self.key_padding[:, None, :]
        if self.query_segments is not None and self.key_segments is not None:
            allowed = allowed & (self.query_segments[:, start:stop, None] == self.key_segments[:, None, :])
        return allowed[:, None]  # [B, 1, t, S]

    def additive(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The mask as the reference adds it to scores: 0 where allowed, finfo(dtype).min elsewhere.

        The whole mask is built once and kept: every layer of a kind shares one MaskSpec per forward.
        """
        whole = start == 0 and (stop is None or stop >= self.query_positions.shape[1])
        if whole and dtype in self._whole:
            return self._whole[dtype]
        allowed = self.allowed(start, stop)
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        mask = torch.where(allowed, zero, torch.finfo(dtype).min)
        if whole:
            self._whole[dtype] = mask
        return mask


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """tanh(x / cap) * cap, Gemma 2's soft-cap of attention scores and final logits; identity when cap is None."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap


def eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: MaskSpec,
    scaling: float,
    softcap: float | None,
    dropout: float = 0.0,
    query_start: int = 0,
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul,
) -> torch.Tensor:
    """Exact attention of all queries at once; returns [B, T, H, D].

    query_start offsets `query` into the mask's queries (used by the tiled kernel). `matmul` computes
    the two products (a backend may sum them another way, rounding to the same dtype).
    """
    B, H, T, D = query.shape
    K, S = key.shape[1], key.shape[2]
    G = H // K
    # Grouped-query attention without copying keys: the G query heads that share a key/value head
    # are contiguous (h = kv * G + g), so fold them into the row dimension: [B, K, G*T, D].
    grouped = query.reshape(B, K, G * T, D)
    scores = matmul(grouped, key.transpose(-1, -2)) * scaling  # [B, K, G*T, S]
    scores = soft_cap(scores, softcap)
    scores = scores.view(B, K, G, T, S) + mask.additive(query.dtype, query_start, query_start + T)[:, :, None]
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=True)
    out = matmul(probs.view(B, K, G * T, S), value)  # [B, K, G*T, D]
    return out.view(B, H, T, D).transpose(1, 2)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: MaskSpec,
    scaling: float,
    softcap: float | None,
    dropout: float = 0.0,
    score_budget_bytes: int | None = None,
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul,
) -> torch.Tensor:
    """Exact attention, tiled over queries when the full score tensor would exceed the budget.

    The budget defaults to DEFAULT_SCORE_BUDGET_BYTES, read at call time; `matmul` as eager_attention's.
    """
    if score_budget_bytes is None:
        score_budget_bytes = DEFAULT_SCORE_BUDGET_BYTES
    B, H, T, _ = query.shape
    S = key.shape[2]
    # float32 probabilities plus the activation-dtype scores: count 8 bytes per score.
    row_bytes = B * H * S * 8
    if T * row_bytes <= score_budget_bytes:
        return eager_attention(query, key, value, mask, scaling, softcap, dropout, matmul=matmul)
    block = max(1, score_budget_bytes // row_bytes)
    outputs = [
        eager_attention(
            query[:, :, lo : lo + block], key, value, mask, scaling, softcap, dropout, query_start=lo, matmul=matmul
        )
        for lo in range(0, T, block)
    ]
    return torch.cat(outputs, dim=1)


# The attention implementations, by name; each takes (query [B, H, T, D], key, value [B, K, S, D],
# mask, scaling, softcap, dropout) and returns [B, T, H, D], with Gemma 2's soft-cap applied before
# the mask. A kernel that cannot soft-cap must not register: dropping the cap is the bug that made
# other stacks' Gemma 2 27B talk nonsense.
AttentionFunction = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, MaskSpec, float, "float | None", float], torch.Tensor
]
ATTENTION_FUNCTIONS: dict[str, AttentionFunction] = {"eager": attention}


def register_attention(name: str, function: AttentionFunction, soft_caps: bool) -> None:
    """Add an implementation to the registry; `soft_caps` must be True (see above)."""
    if not soft_caps:
        raise ValueError(f"attention {name!r} cannot soft-cap its scores, which Gemma 2 needs; not registered")
    ATTENTION_FUNCTIONS[name] = function
