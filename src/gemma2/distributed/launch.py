"""Starting and ending a torch.distributed run, and the rank-0 side of its input and output.

torchrun (torch.distributed.run) starts one process per rank with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set, on one node or, with --nnodes and a c10d rendezvous, on several.
`init_from_env` joins that group: NCCL where CUDA is there (each rank on the GPU of its
LOCAL_RANK), gloo otherwise. Only rank 0 reads stdin and prints; `broadcast_object` hands what
it read to the other ranks, which follow its steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gemma2.errors import InputError

# A rank that waits longer than this on the others fails (the default, 30 minutes, looks like a hang).
DEFAULT_TIMEOUT_S = float(os.environ.get("GEMMA2_DIST_TIMEOUT", "300"))


def under_torchrun() -> bool:
    """Whether this process is one rank of a torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if under_torchrun() else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's device: the GPU of its LOCAL_RANK when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes; False (nothing done) outside torchrun."""
    if not under_torchrun():
        return False
    if not dist.is_available():
        raise InputError("this PyTorch build has no torch.distributed")
    if dist.is_initialized():
        return True
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device())
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def finish() -> None:
    """Leave the process group (every rank together), if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(value: Any = None) -> Any:
    """Rank 0's `value` on every rank (the others pass anything); the value itself outside a group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=device() if dist.get_backend() == "nccl" else None)
    return box[0]


def tensor_parallel_size(requested: int | None) -> int:
    """The TP size of a command's --tp (default: the world size under torchrun, else 1), after
    joining torchrun's group. Checked against the launch before any collective, so that a wrong
    value is the same one-line error on every rank, not a hang."""
    if requested is not None and (isinstance(requested, bool) or requested < 1):
        raise InputError(f"--tp must be an integer >= 1, got {requested}")
    world = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1
    if requested is None:
        requested = world
    if requested > 1 and not under_torchrun():
        raise InputError(
            f"--tp {requested} needs {requested} processes: run it as "
            f"torchrun --nproc-per-node {requested} -m gemma2 ... --tp {requested}"
        )
    if requested != world:
        raise InputError(f"--tp {requested} must equal the number of processes torchrun started ({world})")
    if requested > 1:
        init_from_env()
    return requested


def read_on_main(read: Callable[[], Any]) -> Any:
    """`read()` on rank 0 only (stdin, a terminal), its result handed to every rank."""
    return broadcast_object(read() if is_main() else None)
