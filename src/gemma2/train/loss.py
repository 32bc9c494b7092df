"""The causal-LM loss without float32 logits for every position over the whole vocabulary at once.

Gemma's vocabulary has 256000 entries: float32 logits cost 1 GiB per 1000 tokens, and autograd
would keep them for the backward pass. Here the hidden states are projected a chunk of positions
at a time, soft-capped (tanh(x / cap) * cap, as in the forward pass), and turned into a summed
cross-entropy; each chunk is recomputed in the backward pass (activation checkpointing), so only
one chunk's logits ever exist. The result equals the plain loss (mean over non-ignored labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float | None
) -> torch.Tensor:
    logits = (hidden @ weight.T).float()
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    final_logit_softcapping: float | None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Mean shifted cross-entropy of hidden [B, T, d] against labels [B, T] (-100 ignored)."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    keep = targets != IGNORE_INDEX
    count = keep.sum()
    if int(count) == 0:
        return flat.sum() * 0.0  # no target: a zero that still belongs to the graph
    flat, targets = flat[keep], targets[keep]  # ignored positions need no logits at all
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_size):
        part, goal = flat[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and (part.requires_grad or lm_head_weight.requires_grad):
            total = total + torch.utils.checkpoint.checkpoint(
                _chunk_loss_sum, part, lm_head_weight, goal, final_logit_softcapping, use_reentrant=False
            )
        else:
            total = total + _chunk_loss_sum(part, lm_head_weight, goal, final_logit_softcapping)
    return total / count
