"""The collectives tensor parallelism runs, on one process group, each one counted.

Every call goes through `Collectives`, which records per kind the number of calls, the bytes this
rank hands to the collective (its payload) and the seconds spent inside it, so the benchmark
reports what was sent rather than an estimate. A ring all-reduce sends 2 (N - 1) / N of its
payload per rank, an all-gather (N - 1) / N of the gathered result (`sent_bytes`).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class CollectiveStats:
    calls: Counter[str] = field(default_factory=Counter)
    payload_bytes: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)

    def reset(self) -> None:
        self.calls.clear()
        self.payload_bytes.clear()
        self.seconds.clear()

    def sent_bytes(self, size: int) -> dict[str, float]:
        """Bytes one rank sends per kind, by the ring algorithms' counts (gloo's and NCCL's)."""
        factor = {"all_reduce": 2 * (size - 1) / size, "all_gather": (size - 1) / size, "broadcast": 1.0}
        return {kind: self.payload_bytes[kind] * factor.get(kind, 1.0) for kind in self.calls}


class Collectives:
    """all_reduce / all_gather / broadcast on `group` (None: the default group), counted in `stats`."""

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("tensor parallelism needs an initialised torch.distributed process group")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.stats = CollectiveStats()

    def _record(self, kind: str, nbytes: int, started: float) -> None:
        self.stats.calls[kind] += 1
        self.stats.payload_bytes[kind] += nbytes
        self.stats.seconds[kind] = self.stats.seconds.get(kind, 0.0) + time.perf_counter() - started

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or "max") across ranks, in place; returns the tensor."""
        started = time.perf_counter()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        self._record("all_reduce", tensor.numel() * tensor.element_size(), started)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's tensor, concatenated along `dim` in rank order."""
        started = time.perf_counter()
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.group)
        self._record("all_gather", tensor.numel() * tensor.element_size() * self.size, started)
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
        started = time.perf_counter()
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, source) if self.group else source, group=self.group)
        self._record("broadcast", tensor.numel() * tensor.element_size(), started)
        return tensor

    def argmax(self, local: torch.Tensor, offset: int) -> torch.Tensor:
        """The index [..] of the largest value across every rank's shard of the last dimension.

        Each rank sends its own largest value and its index (offset to the whole vocabulary), in
        float64 so that neither rounds: a few bytes per row where gathering the logits would be the
        whole vocabulary. Ties go to the lowest index, as torch.argmax breaks them on one process.
        """
        index = local.argmax(dim=-1, keepdim=True)
        best = torch.cat([local.gather(-1, index).double(), (index + offset).double()], dim=-1)  # [.., 2]
        gathered = self.all_gather(best[None], dim=0)  # [N, .., 2]
        values, indices = gathered[..., 0], gathered[..., 1]
        # NaN counts as the largest value, as in torch.argmax.
        values = torch.where(values.isnan(), torch.full_like(values, float("inf")), values)
        winner = values.argmax(dim=0, keepdim=True)  # the first rank with the top value
        return indices.gather(0, winner)[0].long()
