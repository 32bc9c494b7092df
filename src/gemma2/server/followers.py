"""`gemma2 serve` under tensor parallelism: rank 0 serves HTTP, every other rank repeats its engine's steps.

Rank 0's engine thread drives a `MirroredEngine`: each add, group add and abort is applied to its
own engine and recorded; each step first broadcasts what was recorded, then steps. The other
ranks run `follow`: receive the record, apply it to an engine of their own on their shard of the
model, step. Every rank then runs the same forwards in the same order, which is what the
collectives inside the model need; and every rank samples the same tokens, from the same
gathered logits with the same generators (torch's global one seeded alike on every rank).

The records travel on a group of their own with no practical timeout, since a server may idle
for hours between requests; the model's collectives keep the launch's timeout. A follower
ignores SIGTERM and SIGINT: torchrun passes them to every rank, and rank 0 drains its requests
(which needs the followers) before it sends the word to stop.
"""

from __future__ import annotations

import signal
from collections.abc import Hashable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gemma2.engine import Engine, StepEvent
from gemma2.sampling import SamplingParams

# The control channel's timeout: a server idles between requests.
IDLE_FOREVER = timedelta(days=365)
SAMPLING_SEED = 0  # torch's global generator, alike on every rank (unseeded sampling draws from it)


def control_group() -> Any:
    """The group the records travel on (every rank calls this, in the same order)."""
    return dist.new_group(backend="gloo", timeout=IDLE_FOREVER)


def _send(group: Any, record: list[tuple[str, Any]]) -> None:
    dist.broadcast_object_list([record], src=0, group=group)


def _receive(group: Any) -> list[tuple[str, Any]]:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class MirroredEngine:
    """Rank 0's engine, recording what it is told so that the other ranks can do the same."""

    def __init__(self, engine: Engine, group: Any) -> None:
        self.engine, self.group = engine, group
        self.record: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:  # rows_in_use, row_of, max_batch, has_unfinished, ...
        return getattr(self.engine, name)

    def add_group(
        self, prompt_ids: Sequence[int], params: Sequence[SamplingParams], request_ids: Sequence[Hashable]
    ) -> list[Hashable]:
        ids = self.engine.add_group(prompt_ids, params, request_ids)  # a refusal raises before it is recorded
        self.record.append(("add_group", (list(prompt_ids), list(params), list(request_ids))))
        return ids

    def abort(self, request_id: Hashable) -> bool:
        done = self.engine.abort(request_id)
        if done:
            self.record.append(("abort", request_id))
        return done

    def step(self) -> list[StepEvent]:
        record, self.record = self.record, []
        _send(self.group, [*record, ("step", None)])
        return self.engine.step()

    def close(self) -> None:
        _send(self.group, [("stop", None)])


def follow(engine: Engine, group: Any) -> None:
    """A follower rank's whole life: repeat rank 0's records until it says stop."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        for kind, argument in _receive(group):
            if kind == "stop":
                return
            if kind == "add_group":
                engine.add_group(*argument)
            elif kind == "abort":
                engine.abort(argument)
            elif kind == "step":
                engine.step()


def seed_sampling() -> None:
    torch.manual_seed(SAMPLING_SEED)
